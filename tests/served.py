"""A sidecar served the way production serves it, in the test's event loop.

``run_sidecar`` binds the three real listeners (with their limits and guards)
on free loopback ports in front of the in-process emulator, so tests can talk
to them with raw sockets and read ``/metrics`` and ``/readyz`` over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from sidecar.config import Settings
from sidecar.server import run_sidecar

from .harness import free_port, sidecar_env


@dataclass
class Served:
    settings: Settings
    ports: dict[str, int]
    stop: asyncio.Event
    task: asyncio.Task[int]

    def url(self, listener: str = "local") -> str:
        return f"http://127.0.0.1:{self.ports[listener]}"

    async def get(self, path: str, listener: str = "local", **kw: Any) -> tuple[int, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.url(listener) + path, **kw) as resp,
        ):
            body = await resp.read()
            try:
                return resp.status, await resp.json(content_type=None)
            except ValueError:
                return resp.status, body

    async def metrics(self) -> str:
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.url("ops") + "/metrics") as resp,
        ):
            return await resp.text()

    async def metric(self, name: str, **labels: str) -> float:
        """One sample's value from /metrics (0 when absent)."""
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        prefix = f"{name}{{{want}}} " if labels else f"{name} "
        for line in (await self.metrics()).splitlines():
            if line.startswith(prefix):
                return float(line.rsplit(" ", 1)[1])
            if labels and line.startswith(name + "{") and _labels_match(line, labels):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


def _labels_match(line: str, labels: dict[str, str]) -> bool:
    inside = line[line.index("{") + 1 : line.index("}")]
    return all(f'{k}="{v}"' in inside.split(",") for k, v in labels.items())


ServeFactory = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve(emulator_server: TestServer, tenant: str) -> AsyncIterator[ServeFactory]:
    """Start sidecars with ``run_sidecar``; each is stopped (as by SIGTERM) at the end."""
    started: list[Served] = []

    async def start(redis: str | None = None, **env: str | None) -> Served:
        ports = {"local": free_port(), "webhooks": free_port(), "ops": free_port()}
        base = str(emulator_server.make_url("")).rstrip("/")
        settings = Settings.from_env(
            sidecar_env(
                tenant,
                base,
                SIDECAR_REDIS_URL=redis,
                SIDECAR_LISTEN=f"127.0.0.1:{ports['local']}",
                SIDECAR_WEBHOOK_LISTEN=f"127.0.0.1:{ports['webhooks']}",
                SIDECAR_OPS_LISTEN=f"127.0.0.1:{ports['ops']}",
                SIDECAR_SHUTDOWN_DRAIN="0",
                **env,
            )
        )
        stop, ready = asyncio.Event(), asyncio.Event()
        task = asyncio.get_running_loop().create_task(
            run_sidecar(settings, stop=stop, on_ready=ready.set)
        )
        waiter = asyncio.ensure_future(ready.wait())
        await asyncio.wait([waiter, task], timeout=15, return_when=asyncio.FIRST_COMPLETED)
        if not ready.is_set():
            waiter.cancel()
            code = task.result() if task.done() else None
            raise AssertionError(f"the sidecar did not start (exit code {code})")
        served = Served(settings, ports, stop, task)
        started.append(served)
        return served

    yield start
    for served in started:
        served.stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(served.task, 30)


async def exchange(
    port: int,
    data: bytes,
    *,
    trickle: bytes = b"",
    every: float = 0.0,
    timeout: float = 15.0,
) -> tuple[bytes, float]:
    """Send ``data`` (then ``trickle``, one byte each ``every`` s) and read until the
    server closes; returns what came back and how long the connection lasted."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    writer.write(data)

    async def drip() -> None:
        for byte in trickle:
            await asyncio.sleep(every)  # the slow client under test, not a wait for state
            if writer.is_closing():
                return
            writer.write(bytes([byte]))

    dripping = asyncio.ensure_future(drip())
    try:
        answer = await asyncio.wait_for(_read_all(reader), timeout)
    finally:
        dripping.cancel()
        await asyncio.gather(dripping, return_exceptions=True)
        writer.close()
    return answer, time.monotonic() - started


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    chunks = []
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1."), answer[:80]
    return int(answer.split(b" ", 2)[1])


def json_of(answer: bytes) -> Any:
    import json

    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"application/json" in head.lower(), head
    return json.loads(body)
