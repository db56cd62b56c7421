"""Shared fixtures: a real ``redis-server`` on a free port, the emulator, sidecars.

The Redis fixture starts its own server (never the machine's 6379) so tests can
kill and restart it; ``SIDECAR_TEST_REDIS_URL`` points the suite at an existing
server instead (tests that must kill Redis still start their own).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from sidecar.app import create_app
from sidecar.config import Settings
from sidecar.emulator import EMULATOR, Emulator, create_emulator_app
from sidecar.keys import CACHE, INVALIDATOR, LIFECYCLE, METRICS
from sidecar.ops import create_ops_app
from sidecar.webhooks import create_webhook_app

API_KEY = "test_key_" + "k" * 24
WEBHOOK_SECRET = "whsec_test_" + "s" * 24


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float = 10.0, interval: float = 0.01
) -> None:
    """Poll an async condition with a deadline (instead of sleeping)."""
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


class RedisServer:
    """A ``redis-server`` process this test session owns."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--protected-mode", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_until(self.ping)

    def ping(self) -> bool:
        try:
            with redis.Redis(port=self.port, socket_timeout=0.5) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of the session's Redis."""
    url = os.environ.get("SIDECAR_TEST_REDIS_URL")
    if url:
        yield url
        return
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server.url
    server.stop()


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """The session Redis, emptied before the test."""
    with redis.Redis.from_url(redis_server) as client:
        client.flushall()
    return redis_server


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis only this test uses, which it may kill and restart."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def tenant() -> str:
    return "t_" + uuid.uuid4().hex[:10]


@pytest.fixture
async def emulator_server(
    aiohttp_server: Callable[..., Awaitable[TestServer]], tenant: str
) -> TestServer:
    app = create_emulator_app(api_keys=[API_KEY], default_tenant=tenant)
    return await aiohttp_server(app)


@pytest.fixture
def emulator(emulator_server: TestServer) -> Emulator:
    return emulator_server.app[EMULATOR]


@dataclass
class Sidecar:
    """One sidecar under test: its three apps, with a client on each."""

    app: web.Application
    client: TestClient[Any, Any]
    ops: TestClient[Any, Any]
    webhooks: TestClient[Any, Any] | None

    @property
    def cache(self) -> Any:
        return self.app[CACHE]

    @property
    def invalidator(self) -> Any:
        return self.app[INVALIDATOR]

    @property
    def metrics(self) -> Any:
        return self.app[METRICS]


SidecarFactory = Callable[..., Awaitable[Sidecar]]


def sidecar_env(tenant: str, base_url: str, **overrides: str | None) -> dict[str, str]:
    env = {
        "VELLUM_API_KEY": API_KEY,
        "VELLUM_TENANT_ID": tenant,
        "VELLUM_BASE_URL": base_url,
        "VELLUM_WEBHOOK_SECRETS": WEBHOOK_SECRET,
        "SIDECAR_UPSTREAM_TIMEOUT": "2",
        # No background upstream checks: tests count and fault upstream calls exactly
        # (tests/test_health.py turns them on).
        "SIDECAR_UPSTREAM_CHECK_INTERVAL": "0",
    }
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


@pytest.fixture
async def make_sidecar(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
    emulator_server: TestServer,
    tenant: str,
) -> SidecarFactory:
    """Start sidecars against the emulator; ``redis=None`` for memory-only."""

    async def make(redis: str | None = None, **env: str | None) -> Sidecar:
        base = str(emulator_server.make_url("")).rstrip("/")
        settings = Settings.from_env(sidecar_env(tenant, base, SIDECAR_REDIS_URL=redis, **env))
        app = create_app(settings)
        client = await aiohttp_client(app)
        app[LIFECYCLE].phase = "ready"
        ops = await aiohttp_client(create_ops_app(app))
        hooks = await aiohttp_client(create_webhook_app(app)) if settings.webhooks_enabled else None
        sidecar = Sidecar(app, client, ops, hooks)
        if redis is not None:
            await asyncio.wait_for(sidecar.invalidator.subscribed.wait(), 10)
        return sidecar

    return make
