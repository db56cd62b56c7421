"""SIGTERM under keep-alive load, and the tiny clients' one retry on a closed connection."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from vellum_sidecar_client import AsyncSidecarClient, SidecarClient, SidecarUnavailable

from .closing_server import closing_server
from .harness import Stack, http_status

CONNECTIONS = 16


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    with Stack(tmp_path, SIDECAR_SHUTDOWN_DRAIN="2", SIDECAR_SHUTDOWN_GRACE="5") as stack:
        stack.set_entitlements("cus_1", {"status": "active", "modules": ["m"]})
        yield stack


def _request(sock: socket.socket, path: str) -> bytes:
    """One keep-alive request on ``sock``; the whole answer (by Content-Length)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def test_requests_on_idle_keep_alive_connections_are_answered_during_the_drain(
    stack: Stack,
) -> None:
    host, port = stack.sidecar.listen.rsplit(":", 1)
    sockets = [socket.create_connection((host, int(port)), timeout=10) for _ in range(CONNECTIONS)]
    try:
        for sock in sockets:
            answer = _request(sock, "/v1/customers/cus_1/can/m")
            assert answer.startswith(b"HTTP/1.1 200")
            assert b"connection: close" not in answer.lower(), "kept alive"
        proc = stack.sidecar
        proc.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()

        def draining() -> bool:
            return http_status(f"{stack.sidecar.ops_url}/readyz") == 503

        deadline = time.monotonic() + 10
        while not draining():
            assert time.monotonic() < deadline, "readyz never turned 503"
            time.sleep(0.01)
        # Every idle connection sends a request now: each is answered, then closed.
        for sock in sockets:
            answer = _request(sock, "/v1/customers/cus_1/can/m")
            assert answer.startswith(b"HTTP/1.1 200"), answer[:60]
            assert b'"allowed":true' in answer
            assert b"connection: close" in answer.lower()
            assert sock.recv(1) == b"", "closed after the answer"
        # A new connection during the drain is answered too (with Connection: close).
        late = socket.create_connection((host, int(port)), timeout=10)
        answer = _request(late, "/v1/customers/cus_1/can/m")
        late.close()
        assert answer.startswith(b"HTTP/1.1 200")
        assert b"connection: close" in answer.lower()
        assert proc.wait(15) == 0
        # The emulator's kept-alive push connection stays idle: the drain runs its 2 s.
        assert time.monotonic() - stopped_at < 2 + 3
    finally:
        for sock in sockets:
            sock.close()


# -- the tiny Python client's one retry ------------------------------------------------------


@pytest.fixture
def stack_client() -> Iterator[Callable[[str], SidecarClient]]:
    clients: list[SidecarClient] = []

    def make(url: str) -> SidecarClient:
        clients.append(SidecarClient(url))
        return clients[-1]

    yield make
    for client in clients:
        client.close()


def test_sync_client_retries_an_idempotent_request_once(
    stack_client: Callable[[str], SidecarClient],
) -> None:
    with closing_server("close") as server:
        client = stack_client(server.url)
        assert client.can("c", "m") is True
        assert client.can("c", "m") is True, "cut under it, then sent again"
        assert server.cut == 1
        assert [n for n, _ in server.requests] == [1, 1, 2], "the retry used a new connection"


def test_sync_client_retries_the_batch_check(stack_client: Callable[[str], SidecarClient]) -> None:
    with closing_server("close") as server:
        client = stack_client(server.url)
        assert client.check([("c", "m")]) == [True]
        assert client.check([("c", "m")]) == [True]
        assert server.cut == 1


def test_sync_client_never_sends_a_write_twice(
    stack_client: Callable[[str], SidecarClient],
) -> None:
    with closing_server("close") as server:
        client = stack_client(server.url)
        assert client.can("c", "m") is True
        with pytest.raises(SidecarUnavailable):
            client.create_customer(account_id="a", customer_id="c2")
        assert len(server.requests) == 2, "a POST without an Idempotency-Key went once"


def test_sync_client_does_not_retry_after_part_of_the_answer(
    stack_client: Callable[[str], SidecarClient],
) -> None:
    with closing_server("partial") as server:
        client = stack_client(server.url)
        assert client.can("c", "m") is True
        assert client.can("c", "m") is False, "fail closed: part of an answer came"
        assert len(server.requests) == 2


async def test_async_client_retries_an_idempotent_request_once() -> None:
    with closing_server("close") as server:
        async with AsyncSidecarClient(server.url) as client:
            assert await client.can("c", "m") is True
            assert await client.can("c", "m") is True
            assert await client.check([("c", "m")]) == [True]
        assert server.cut == 1
        assert [n for n, _ in server.requests][:3] == [1, 1, 2]


async def test_async_client_never_sends_a_write_twice() -> None:
    with closing_server("close") as server:
        async with AsyncSidecarClient(server.url) as client:
            assert await client.can("c", "m") is True
            with pytest.raises(SidecarUnavailable):
                await client.create_customer(account_id="a", customer_id="c2")
        assert len(server.requests) == 2


async def test_async_client_does_not_retry_after_part_of_the_answer() -> None:
    with closing_server("partial") as server:
        async with AsyncSidecarClient(server.url) as client:
            assert await client.can("c", "m") is True
            assert await client.can("c", "m") is False
        assert len(server.requests) == 2
