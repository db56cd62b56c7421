"""The Python clients' own HTTP/1.1 against a scripted peer: every shape of answer.

A live sidecar (tests/test_client_python.py) always answers with a Content-Length
on a connection it keeps; the clients must also read what other servers and
proxies send (chunked bodies with trailers, interim 1xx answers, bodies that end
with the connection, answers larger than one read), honour ``Connection:
close``, send exactly the request they mean, and treat a kept-alive connection
closed under them the way the fail-closed rule says. The peer here is a real
socket server on a loopback port that reads each request and writes the next
scripted bytes; both clients are driven through the same tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pytest
from vellum_sidecar_client import (
    AsyncSidecarClient,
    SidecarApiError,
    SidecarClient,
    SidecarUnavailable,
)

from .harness import make_tls_files


class _Drop(enum.Enum):
    DROP = enum.auto()


#: A script step: read the request, then close the connection without answering.
DROP: Final = _Drop.DROP


@dataclass(frozen=True)
class Closing:
    """A script step: answer with these bytes, then close the connection."""

    data: bytes


#: A script step: bytes to answer with (the connection kept), a Closing or DROP.
Step = bytes | Closing | _Drop


@dataclass
class Seen:
    """One request as the peer read it, and the number of the connection it came on."""

    connection: int
    head: bytes
    body: bytes

    @property
    def start_line(self) -> str:
        return self.head.split(b"\r\n", 1)[0].decode()

    def header(self, name: str) -> str | None:
        for line in self.head.decode("latin-1").split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None


@dataclass
class Peer:
    """A loopback HTTP/1.1 server that answers request n with ``script[n]``."""

    script: list[Step]
    tls: ssl.SSLContext | None = None
    seen: list[Seen] = field(default_factory=list)
    server: socket.socket = field(default_factory=socket.socket)
    threads: list[threading.Thread] = field(default_factory=list)
    connections: list[socket.socket] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.server.getsockname()[1]}"

    def start(self) -> Peer:
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(8)
        self._spawn(self._accept)
        return self

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self.threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return  # closed: the test is over
            with self.lock:
                self.connections.append(conn)
                number = len(self.connections) - 1
            self._spawn(self._serve, conn, number)

    def _serve(self, conn: socket.socket, number: int) -> None:
        with contextlib.ExitStack() as stack:
            stack.enter_context(conn)
            stack.enter_context(contextlib.suppress(OSError))  # closed by close(), bad TLS
            if self.tls is not None:
                conn = stack.enter_context(self.tls.wrap_socket(conn, server_side=True))
                with self.lock:
                    self.connections[number] = conn  # what close() must shut down now
            self._answer(conn, number)

    def _answer(self, conn: socket.socket, number: int) -> None:
        data = b""
        while True:
            while b"\r\n\r\n" not in data:
                more = conn.recv(65536)
                if not more:
                    return
                data += more
            head, _, data = data.partition(b"\r\n\r\n")
            seen = Seen(number, head, b"")
            length = int(seen.header("content-length") or 0)
            while len(data) < length:
                more = conn.recv(65536)
                if not more:
                    return
                data += more
            seen.body, data = data[:length], data[length:]
            with self.lock:
                self.seen.append(seen)
                step = self.script.pop(0) if self.script else DROP
            if step is DROP:
                return
            if isinstance(step, Closing):
                conn.sendall(step.data)
                return
            conn.sendall(step)

    def close(self) -> None:
        # shutdown() wakes the threads blocked in accept() and recv(); close() would not.
        for sock in [self.server, *self.connections]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self.threads:
            thread.join(timeout=10)
            assert not thread.is_alive(), "a peer thread did not stop"
        self.server.close()


@pytest.fixture
def peer() -> Iterator[Callable[..., Peer]]:
    """``peer(*script, tls=None)``: a started :class:`Peer`, closed after the test."""
    peers: list[Peer] = []

    def make(*script: Step, tls: ssl.SSLContext | None = None) -> Peer:
        p = Peer(list(script), tls).start()
        peers.append(p)
        return p

    yield make
    for p in peers:
        p.close()


Call = Callable[..., Awaitable[Any]]


@pytest.fixture(params=["sync", "async"])
async def connect(request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., Call]]:
    """``connect(url)`` -> ``await call("method", ...)`` for each flavour of client."""
    sync_clients: list[SidecarClient] = []
    async_clients: list[AsyncSidecarClient] = []

    def make(url: str, **kwargs: Any) -> Call:
        if request.param == "sync":
            client = SidecarClient(url, **kwargs)
            sync_clients.append(client)

            async def sync_call(method: str, /, *a: Any, **kw: Any) -> Any:
                return await asyncio.to_thread(getattr(client, method), *a, **kw)

            return sync_call
        aclient = AsyncSidecarClient(url, **kwargs)
        async_clients.append(aclient)

        async def async_call(method: str, /, *a: Any, **kw: Any) -> Any:
            return await getattr(aclient, method)(*a, **kw)

        return async_call

    yield make
    for client in sync_clients:
        client.close()
    for aclient in async_clients:
        await aclient.aclose()


def answer(body: Any, status: str = "200 OK", *headers: str) -> bytes:
    raw = json.dumps(body).encode()
    lines = [f"HTTP/1.1 {status}", "Content-Type: application/json",
             f"Content-Length: {len(raw)}", *headers]  # fmt: skip
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + raw


ALLOWED = answer({"allowed": True, "customerId": "c", "module": "m"})
DOC = {"status": "active", "modules": ["reports"], "config": {"seats": 3}, "found": True}


# -- what goes out -------------------------------------------------------------------------


async def test_the_requests_on_the_wire(connect: Callable[..., Call], peer: Any) -> None:
    p = peer(ALLOWED, answer({"customerId": "c_1"}, "201 Created"), ALLOWED)
    call = connect(p.url)
    port = p.url.rsplit(":", 1)[1]
    assert await call("can", "cus_1", "reports") is True
    made = await call("create_customer", account_id="a/b", customer_id="c_1", email="x@y.example",
                      idempotency_key="idem-1")  # fmt: skip
    assert made == {"customerId": "c_1"}
    assert await call("can", "cus ä/1", "re?ports") is True

    can, post, quoted = p.seen
    assert can.head.decode() == (
        "GET /v1/customers/cus_1/can/reports HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        "Accept: application/json\r\n"
        "User-Agent: vellum-sidecar-client/0.1.0 (python)"
    )
    assert post.start_line == "POST /v1/accounts/a%2Fb/customers HTTP/1.1"
    assert json.loads(post.body) == {"customerId": "c_1", "email": "x@y.example"}
    assert post.header("content-length") == str(len(post.body))
    assert post.header("content-type") == "application/json"
    assert post.header("idempotency-key") == "idem-1"
    assert quoted.start_line == "GET /v1/customers/cus%20%C3%A4%2F1/can/re%3Fports HTTP/1.1"
    assert {s.connection for s in p.seen} == {0}, "one keep-alive connection for all three"


async def test_a_header_value_with_a_line_break_is_refused_before_sending(
    connect: Callable[..., Call], peer: Any
) -> None:
    p = peer(ALLOWED)
    call = connect(p.url)
    with pytest.raises(ValueError, match="line breaks"):
        await call("set_account_status", account_id="a", status="x",
                   idempotency_key="k\r\nX-Injected: 1")  # fmt: skip
    assert await call("can", "c", "m") is True
    assert [s.start_line.split()[0] for s in p.seen] == ["GET"]


# -- what comes back -------------------------------------------------------------------------


async def test_every_framing_of_an_answer(connect: Callable[..., Call], peer: Any) -> None:
    raw = json.dumps(DOC).encode()
    chunked = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Sidecar-Cache: hit\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        + b"".join(b"%x;ext=1\r\n%s\r\n" % (len(raw[i : i + 7]), raw[i : i + 7])
                   for i in range(0, len(raw), 7))
        + b"0\r\nX-Trailer: yes\r\n\r\n"
    )  # fmt: skip
    interim = b"HTTP/1.1 100 Continue\r\n\r\n" + answer(DOC, "200 OK", "X-Sidecar-Cache: miss")
    big_doc = DOC | {"config": {"blob": "x" * 300_000}}
    until_close = Closing(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + raw)
    p = peer(chunked, interim, answer(big_doc), until_close, ALLOWED)
    call = connect(p.url)

    first = await call("get_entitlements", "c")
    assert (first.status, first.modules, first.cache) == ("active", ("reports",), "hit")
    second = await call("get_entitlements", "c")
    assert (second.config("seats"), second.cache) == (3, "miss")
    big = await call("get_entitlements", "c")
    assert big.config("blob") == "x" * 300_000, "an answer longer than one read"
    assert (await call("get_entitlements", "c")).has("reports"), "a body that ends at close"
    assert await call("can", "c", "m") is True
    assert [s.connection for s in p.seen] == [0, 0, 0, 0, 1], "no reuse after a close-framed body"


async def test_connection_close_is_honoured(connect: Callable[..., Call], peer: Any) -> None:
    p = peer(Closing(answer({"allowed": True}, "200 OK", "Connection: close")), ALLOWED, ALLOWED)
    call = connect(p.url)
    for _ in range(3):
        assert await call("can", "c", "m") is True
    assert [s.connection for s in p.seen] == [0, 1, 1]


async def test_an_error_answer_keeps_the_connection(
    connect: Callable[..., Call], peer: Any
) -> None:
    error = {"error": {"code": "customer_not_found", "message": "no such customer"}}
    p = peer(answer(error, "404 Not Found"), ALLOWED)
    call = connect(p.url)
    with pytest.raises(SidecarApiError) as missing:
        await call("get_subscription", account_id="a", customer_id="c")
    assert (missing.value.status, missing.value.code) == (404, "customer_not_found")
    assert await call("can", "c", "m") is True
    assert [s.connection for s in p.seen] == [0, 0]


# -- broken answers and closed connections -----------------------------------------------------


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "not an HTTP/1.x status line"),
        (b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"allowed"', "middle of the answer"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
    ],
)
async def test_a_broken_answer_is_no_answer(
    connect: Callable[..., Call], peer: Any, script: bytes, reason: str
) -> None:
    p = peer(Closing(script), Closing(script))
    call = connect(p.url)
    assert await call("can", "c", "m") is False, "fail closed"
    with pytest.raises(SidecarUnavailable, match=reason) as broken:
        await call("get_entitlements", "c")
    assert broken.value.status is None
    assert "cannot reach the sidecar" in str(broken.value)


async def test_a_reused_connection_closed_before_answering(
    connect: Callable[..., Call], peer: Any
) -> None:
    """Reads are sent again once on a new connection; a write that may have been acted
    upon is not, and fails as no answer."""
    p = peer(ALLOWED, DROP, ALLOWED, DROP)
    call = connect(p.url)
    assert await call("can", "c", "m") is True
    assert await call("can", "c", "m") is True, "retried on a new connection"
    assert [s.connection for s in p.seen] == [0, 0, 1]
    with pytest.raises(SidecarUnavailable, match="closed the connection without answering"):
        await call("create_customer", account_id="a", customer_id="c")
    assert [s.connection for s in p.seen] == [0, 0, 1, 1], "the write was sent once"


async def test_a_new_connection_closed_before_answering_is_not_retried(
    connect: Callable[..., Call], peer: Any
) -> None:
    p = peer(DROP, ALLOWED)
    call = connect(p.url)
    assert await call("can", "c", "m") is False
    assert len(p.seen) == 1
    assert await call("can", "c", "m") is True


# -- https -----------------------------------------------------------------------------------


async def test_https_verifies_the_certificate(
    connect: Callable[..., Call], peer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = make_tls_files(tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(files.cert, files.key)
    p = peer(ALLOWED, ALLOWED, tls=tls)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    untrusted = connect(p.url)
    assert await untrusted("can", "c", "m") is False, "an unknown certificate is no answer"
    with pytest.raises(SidecarUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        await untrusted("get_entitlements", "c")
    assert p.seen == []

    monkeypatch.setenv("SSL_CERT_FILE", str(files.ca))  # read when a client first connects
    trusted = connect(p.url)
    assert await trusted("can", "c", "m") is True
    assert await trusted("can", "c", "m") is True
    assert [s.connection for s in p.seen] == [2, 2], "one TLS connection, kept alive"
    assert p.seen[0].header("host") == p.url.removeprefix("https://")
