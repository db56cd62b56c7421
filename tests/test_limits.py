"""Listener limits against real sockets: slowloris, silent sockets, slow bodies, caps.

Every case runs on the real listeners ``run_sidecar`` binds (tests/served.py),
with short deadlines so a case takes about a second.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.emulator import Emulator
from sidecar.http.limits import MAX_FIELD_SIZE, MAX_LINE_SIZE, ListenerLimits, fit_to_fd_limit

from .conftest import eventually
from .harness import API_KEY, WEBHOOK_SECRET, free_port, wait_until
from .served import ServeFactory, exchange, json_of, serve, status_of

__all__ = ["serve"]

#: Short deadlines, the minimum rate off: the deadlines alone (the rate has its own tests).
FAST = {
    "SIDECAR_HEADER_TIMEOUT": "0.5",
    "SIDECAR_BODY_TIMEOUT": "0.6",
    "SIDECAR_WEBHOOK_BODY_TIMEOUT": "0.6",
    "SIDECAR_KEEPALIVE_TIMEOUT": "0.8",
    "SIDECAR_MIN_RATE": "0",
}
LISTENERS = ("local", "webhooks", "ops")
HEAD = {
    "local": b"POST /v1/check HTTP/1.1\r\nHost: localhost\r\n",
    "webhooks": b"POST /webhooks/vellum HTTP/1.1\r\nHost: localhost\r\n",
    "ops": b"POST /readyz HTTP/1.1\r\nHost: localhost\r\n",
}
#: One id of 512 four-byte characters, percent-encoded: 6,144 bytes.
LONG_ID = "%F0%9F%98%80" * 512


@pytest.mark.parametrize("listener", LISTENERS)
async def test_half_a_request_line_is_cut_with_a_json_408(
    serve: ServeFactory, listener: str
) -> None:
    sc = await serve(**FAST)
    answer, lasted = await exchange(sc.ports[listener], b"GET /v1/custo")
    assert status_of(answer) == 408
    assert json_of(answer)["error"]["code"] == "request_timeout"
    assert b"connection: close" in answer.lower()
    assert 0.4 < lasted < 3.0
    assert (
        await sc.metric(
            "vellum_sidecar_connections_refused_total", listener=listener, reason="header_timeout"
        )
        == 1
    )


@pytest.mark.parametrize("listener", LISTENERS)
async def test_a_socket_that_never_sends_is_closed_silently(
    serve: ServeFactory, listener: str
) -> None:
    sc = await serve(**FAST)
    answer, lasted = await exchange(sc.ports[listener], b"")
    assert answer == b"", "no unsolicited answer to a connection that asked nothing"
    assert 0.4 < lasted < 3.0


async def test_headers_dripping_byte_by_byte_are_cut_at_the_header_deadline(
    serve: ServeFactory,
) -> None:
    sc = await serve(**FAST)
    request = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 100
    answer, lasted = await exchange(sc.ports["ops"], request[:5], trickle=request[5:], every=0.1)
    assert status_of(answer) == 408
    assert lasted < 3.0, "the deadline counts from the first byte, whatever keeps arriving"


@pytest.mark.parametrize("listener", LISTENERS)
async def test_a_body_one_byte_at_a_time_is_cut_with_a_json_408(
    serve: ServeFactory, listener: str
) -> None:
    sc = await serve(**FAST)
    head = HEAD[listener] + b"Content-Type: application/json\r\nContent-Length: 50\r\n\r\n"
    answer, lasted = await exchange(sc.ports[listener], head + b"{", trickle=b" " * 48, every=0.2)
    if listener == "ops":
        # No ops route takes a body: the 405 is answered at once and the
        # unread body is cut at the deadline.
        assert status_of(answer) == 405
    else:
        assert status_of(answer) == 408
        assert json_of(answer)["error"]["code"] == "request_timeout"
    assert lasted < 3.0
    assert (
        await sc.metric(
            "vellum_sidecar_connections_refused_total", listener=listener, reason="body_timeout"
        )
        == 1
    )


async def test_keep_alive_connections_close_when_idle(serve: ServeFactory) -> None:
    sc = await serve(**FAST)
    request = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
    answer, lasted = await exchange(sc.ports["ops"], request)
    assert status_of(answer) == 200
    assert b"connection: close" not in answer.lower(), "kept alive"
    assert 0.6 < lasted < 3.0, "closed after SIDECAR_KEEPALIVE_TIMEOUT idle"


async def test_the_cap_refuses_busy_connections_and_evicts_idle_ones(
    serve: ServeFactory,
) -> None:
    # No minimum rate: these heads are judged by their age alone (the rate's own
    # cases are below).
    sc = await serve(
        SIDECAR_WEBHOOK_MAX_CONNECTIONS="3", SIDECAR_HEADER_TIMEOUT="3", SIDECAR_MIN_RATE="0"
    )
    port = sc.ports["webhooks"]
    ask = b"GET /webhooks/vellum HTTP/1.1\r\nHost: localhost\r\n\r\n"  # a JSON 405
    # Three connections each in the middle of a request: none may be closed for room...
    busy = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
    for _, writer in busy:
        writer.write(b"POST /webh")
        await writer.drain()
    answer, _ = await exchange(port, ask)
    assert status_of(answer) == 503
    assert json_of(answer)["error"]["code"] == "too_many_connections"
    # ...until their heads have dribbled for a second (half the 3 s header deadline,
    # at most 1 s): then the oldest makes room. The time passing is what is tested.
    await asyncio.sleep(1.2)
    answer, _ = await exchange(port, ask.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    assert status_of(answer) == 405
    assert await asyncio.wait_for(busy[0][0].read(), 5) == b"", "the oldest slow head closed"
    for _, writer in busy:
        writer.close()

    async def closed() -> bool:
        return await sc.metric("vellum_sidecar_open_connections", listener="webhooks") == 0

    await eventually(closed)
    # Three idle keep-alive connections: the oldest makes room for a new one.
    idle = []
    for _ in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(ask)
        await reader.readuntil(b"}}")
        idle.append((reader, writer))
    answer, _ = await exchange(port, ask.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    assert status_of(answer) == 405
    oldest_reader, _ = idle[0]
    assert await asyncio.wait_for(oldest_reader.read(), 5) == b"", "the oldest idle one closed"
    for _, writer in idle:
        writer.close()
    refused = "vellum_sidecar_connections_refused_total"
    assert await sc.metric(refused, listener="webhooks", reason="max_connections") == 1
    assert await sc.metric(refused, listener="webhooks", reason="idle_evicted") == 1
    assert await sc.metric(refused, listener="webhooks", reason="slow_evicted") == 1


@pytest.mark.parametrize("listener", LISTENERS)
async def test_a_body_below_the_minimum_rate_is_cut_long_before_its_deadline(
    serve: ServeFactory, listener: str
) -> None:
    """A byte every 0.2 s (5 bytes/s, under SIDECAR_MIN_RATE's 500) with a 10 s body
    deadline: cut after the first second, not after ten."""
    sc = await serve(SIDECAR_BODY_TIMEOUT="10", SIDECAR_WEBHOOK_BODY_TIMEOUT="10")
    head = HEAD[listener] + b"Content-Type: application/json\r\nContent-Length: 500\r\n\r\n"
    answer, lasted = await exchange(sc.ports[listener], head + b"{", trickle=b" " * 400, every=0.2)
    if listener == "ops":
        assert status_of(answer) == 405  # answered at once; the unread body is cut
    else:
        assert status_of(answer) == 408
        error = json_of(answer)["error"]
        assert (error["code"], error["message"]) == (
            "request_timeout",
            "the request body arrived slower than 500 bytes/s",
        )
    assert lasted < 5.0
    refused = "vellum_sidecar_connections_refused_total"
    assert await sc.metric(refused, listener=listener, reason="too_slow") == 1
    assert await sc.metric(refused, listener=listener, reason="body_timeout") == 0


async def test_a_head_below_the_minimum_rate_is_cut_with_a_json_408(serve: ServeFactory) -> None:
    sc = await serve(SIDECAR_HEADER_TIMEOUT="30")
    request = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 100
    answer, lasted = await exchange(sc.ports["ops"], request[:5], trickle=request[5:], every=0.2)
    assert status_of(answer) == 408
    assert json_of(answer)["error"]["message"] == (
        "the request's headers arrived slower than 500 bytes/s"
    )
    assert lasted < 5.0, "the 30 s header deadline is not what cut it"
    refused = "vellum_sidecar_connections_refused_total"
    assert await sc.metric(refused, listener="ops", reason="too_slow") == 1


async def test_a_large_body_at_a_normal_pace_is_never_cut(
    serve: ServeFactory, emulator: Emulator, tenant: str
) -> None:
    """40 KiB over about two seconds (20 KiB/s): past the first second, over the
    minimum rate, within the deadline: answered."""
    emulator.set_entitlements(tenant, "cus_1", {"status": "active", "modules": ["m"]})
    sc = await serve()
    body = b'{"checks": [{"customerId": "cus_1", "module": "m"}]' + b" " * 40_000 + b"}"
    head = HEAD["local"] + b"Content-Type: application/json\r\n"
    head += b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.ports["local"])
    writer.write(head)
    for start in range(0, len(body), 4096):
        writer.write(body[start : start + 4096])
        await writer.drain()
        await asyncio.sleep(0.2)  # the client's pace, not a wait for state
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert status_of(answer) == 200, answer[:200]
    assert json_of(answer)["results"] == [{"customerId": "cus_1", "module": "m", "allowed": True}]


async def test_the_webhook_listener_has_its_own_short_body_deadline(serve: ServeFactory) -> None:
    sc = await serve(
        SIDECAR_BODY_TIMEOUT="30", SIDECAR_WEBHOOK_BODY_TIMEOUT="0.6", SIDECAR_MIN_RATE="0"
    )
    head = HEAD["webhooks"] + b"Content-Type: application/json\r\nContent-Length: 50\r\n\r\n"
    answer, lasted = await exchange(sc.ports["webhooks"], head + b"{", trickle=b" " * 48, every=0.1)
    assert status_of(answer) == 408
    assert json_of(answer)["error"]["message"] == "the request body did not arrive within 0.6 s"
    assert lasted < 3.0


async def test_at_the_cap_the_most_behind_goes_first_and_idle_ones_last(
    serve: ServeFactory,
) -> None:
    """Cap 3: a kept-alive idle connection and two bodies arriving at 80 % of the
    minimum rate (not cut before about 5 s), one started 0.6 s before the other.
    Each newcomer closes the one most behind: the older body, then the younger,
    and only then the idle one."""
    sc = await serve(SIDECAR_WEBHOOK_MAX_CONNECTIONS="3", SIDECAR_HEADER_TIMEOUT="30",
                     SIDECAR_WEBHOOK_BODY_TIMEOUT="30")  # fmt: skip
    port = sc.ports["webhooks"]
    ask = b"GET /webhooks/vellum HTTP/1.1\r\nHost: localhost\r\n\r\n"  # a JSON 405
    idle = await asyncio.open_connection("127.0.0.1", port)
    idle[1].write(ask)
    await idle[0].readuntil(b"}}")

    async def body_at_400_bytes_a_second() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(HEAD["webhooks"] + b"Content-Length: 100000\r\n\r\n")

        async def drip() -> None:
            while not writer.is_closing():
                writer.write(b" " * 8)
                await asyncio.sleep(0.02)  # the client's pace, not a wait for state

        drips.append(asyncio.ensure_future(drip()))
        return reader, writer

    drips: list[asyncio.Future[None]] = []
    older = await body_at_400_bytes_a_second()
    started = time.monotonic()

    async def at(seconds: float) -> bool:
        return time.monotonic() >= started + seconds

    await eventually(lambda: at(0.6), timeout=5)
    younger = await body_at_400_bytes_a_second()
    await eventually(lambda: at(1.0), timeout=5)
    newcomers = []
    try:
        for name, (reader, _) in (("older", older), ("younger", younger), ("idle", idle)):
            newcomer = await asyncio.open_connection("127.0.0.1", port)
            newcomer[1].write(ask)
            answer = await asyncio.wait_for(newcomer[0].readuntil(b"}}"), 5)
            assert status_of(answer) == 405, "every newcomer is let in"
            newcomers.append(newcomer)
            # Had another one been closed instead, this read would wait.
            assert await asyncio.wait_for(reader.read(), 5) == b"", f"{name} closed for room"
    finally:
        for _, writer in (older, younger, idle, *newcomers):
            writer.close()
        await asyncio.gather(*drips, return_exceptions=True)
    refused = "vellum_sidecar_connections_refused_total"
    assert await sc.metric(refused, listener="webhooks", reason="slow_evicted") == 2
    assert await sc.metric(refused, listener="webhooks", reason="idle_evicted") == 1
    assert await sc.metric(refused, listener="webhooks", reason="too_slow") == 0


async def test_slowloris_on_every_listener_does_not_starve_the_local_api(
    serve: ServeFactory, emulator: Emulator, tenant: str
) -> None:
    emulator.set_entitlements(tenant, "cus_1", {"status": "active", "modules": ["m"]})
    sc = await serve(
        SIDECAR_MAX_CONNECTIONS="60",
        SIDECAR_WEBHOOK_MAX_CONNECTIONS="20",
        SIDECAR_OPS_MAX_CONNECTIONS="20",
        SIDECAR_HEADER_TIMEOUT="30",
    )
    # 50 half request lines on each listener; the two small ones fill up.
    held = []
    for listener in LISTENERS:
        for _ in range(50):
            reader, writer = await asyncio.open_connection("127.0.0.1", sc.ports[listener])
            writer.write(b"GET /v1/cu")
            held.append((reader, writer))
    try:
        status, body = await sc.get("/v1/customers/cus_1/can/m")
        assert status == 200
        assert body["allowed"] is True, "an uncached read still reaches the upstream"
    finally:
        for _, writer in held:
            writer.close()
    refused = "vellum_sidecar_connections_refused_total"

    async def room_made(listener: str) -> float:
        """Sockets refused at the cap or closed for a newcomer (the most behind)."""
        return sum([await sc.metric(refused, listener=listener, reason=reason)
                    for reason in ("max_connections", "slow_evicted")])  # fmt: skip

    async def counted() -> bool:  # scrapes are refused until the ops sockets are gone
        return await room_made("webhooks") == 30

    await eventually(counted)
    assert await room_made("ops") >= 30
    assert await room_made("local") == 0


# -- parser refusals ---------------------------------------------------------------------


async def test_two_longest_ids_fit_the_request_line(
    serve: ServeFactory, emulator: Emulator, tenant: str
) -> None:
    customer = "\U0001f600" * 512
    emulator.set_entitlements(tenant, customer, {"status": "active", "modules": ["m"]})
    sc = await serve()
    request = (
        f"GET /v1/customers/{LONG_ID}/can/{LONG_ID} HTTP/1.1\r\n"
        "Host: localhost\r\nConnection: close\r\n\r\n"
    ).encode()
    assert len(request) > 8190, "over aiohttp's default limit"
    answer, _ = await exchange(sc.ports["local"], request)
    assert status_of(answer) == 200
    body = json_of(answer)
    assert body["customerId"] == customer
    assert body["allowed"] is False, "module m, not the 512-character one"
    mirror = (
        f"GET /tenants/{tenant}/customers/{LONG_ID}/entitlements HTTP/1.1\r\n"
        "Host: localhost\r\nConnection: close\r\n\r\n"
    ).encode()
    answer, _ = await exchange(sc.ports["local"], mirror)
    assert status_of(answer) == 200
    assert json_of(answer)["modules"] == ["m"]


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (
            b"GET /v1/customers/" + b"x" * (MAX_LINE_SIZE + 10) + b"/can/m HTTP/1.1\r\n\r\n",
            414,
            "uri_too_long",
        ),
        (
            b"GET /openapi.json HTTP/1.1\r\nHost: localhost\r\nX-Big: "
            + b"y" * (MAX_FIELD_SIZE + 10)
            + b"\r\n\r\n",
            431,
            "headers_too_large",
        ),
        (
            b"GET /openapi.json HTTP/1.1\r\nHost: localhost\r\n"
            + b"".join(b"X-H%d: 1\r\n" % i for i in range(200))
            + b"\r\n",
            431,
            "headers_too_large",
        ),
        (b"HELLO WORLD\r\n\r\n", 400, "bad_request"),
        (b"GET /x HTTP/1.1\r\nHost: localhost\r\nBad Header\r\n\r\n", 400, "bad_request"),
        (
            b"POST /v1/check HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"zz\r\nabc\r\n0\r\n\r\n",
            400,
            "bad_request",
        ),
    ],
)
async def test_what_the_parser_refuses_is_a_json_4xx_logged_without_the_path(
    serve: ServeFactory,
    caplog: pytest.LogCaptureFixture,
    request_bytes: bytes,
    status: int,
    code: str,
) -> None:
    sc = await serve()
    with caplog.at_level(logging.DEBUG):
        answer, _ = await exchange(sc.ports["local"], request_bytes)
    assert status_of(answer) == status
    assert json_of(answer)["error"]["code"] == code
    refused = [r for r in caplog.records if r.getMessage() == "request_refused"]
    assert [r.levelno for r in refused] == [logging.WARNING]
    assert refused[0].fields == {  # type: ignore[attr-defined]
        "listener": "local",
        "status": status,
        "reason": refused[0].fields["reason"],  # type: ignore[attr-defined]
    }
    for record in caplog.records:
        text = record.getMessage() + repr(getattr(record, "fields", "")) + str(record.exc_info)
        assert "xxxxxxxx" not in text and "yyyyyyyy" not in text and "HELLO" not in text
        assert record.levelno < logging.ERROR, record.getMessage()


async def test_a_body_broken_after_the_handler_started_is_a_json_400(
    serve: ServeFactory,
) -> None:
    sc = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", sc.ports["local"])
    writer.write(
        b"POST /v1/check HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
        b'Content-Type: application/json\r\n\r\n5\r\n{"che\r\n'
    )
    await writer.drain()
    # Client pacing, so the bad chunk arrives in its own segment after the head was
    # dispatched (either way the answer must be a JSON 400, never a 500).
    await asyncio.sleep(0.1)
    writer.write(b"zz\r\nnot a chunk\r\n")
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert status_of(answer) == 400
    assert json_of(answer)["error"]["code"] in ("invalid_body", "bad_request")


# -- file descriptors -------------------------------------------------------------------


def test_caps_are_lowered_to_fit_the_descriptor_limit() -> None:
    caps = {
        "local": ListenerLimits(max_connections=1024, max_streams=256),
        "webhooks": ListenerLimits(max_connections=128),
        "ops": ListenerLimits(max_connections=32),
    }
    assert fit_to_fd_limit(caps, 100_000, 50) == caps
    fitted = fit_to_fd_limit(caps, 256, 50)
    held = sum(c.max_connections + c.max_streams + 2 * c.backlog for c in fitted.values())
    assert held <= 256 - 64 - 32 - 32 + 3, "caps and two accept batches fit beside the reserve"
    assert fitted["local"].max_connections > fitted["webhooks"].max_connections >= 4
    assert fitted["local"].max_streams >= 4 and fitted["webhooks"].max_streams == 0


def test_idle_sockets_on_the_webhook_port_cannot_exhaust_descriptors(
    tmp_path: Path, emulator_process: tuple[str, str]
) -> None:
    """The issue's case: a sidecar limited to 256 descriptors, 300 idle webhook sockets
    (and more while the flood has not reached it)."""
    base_url, tenant = emulator_process
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1024:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    local, hooks, ops = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VELLUM_", "SIDECAR_"))} | {
        "VELLUM_API_KEY": API_KEY,
        "VELLUM_TENANT_ID": tenant,
        "VELLUM_BASE_URL": base_url,
        "VELLUM_WEBHOOK_SECRETS": WEBHOOK_SECRET,
        "SIDECAR_LISTEN": f"127.0.0.1:{local}",
        "SIDECAR_WEBHOOK_LISTEN": f"127.0.0.1:{hooks}",
        "SIDECAR_OPS_LISTEN": f"127.0.0.1:{ops}",
        "SIDECAR_HEADER_TIMEOUT": "60",
        "SIDECAR_UPSTREAM_CHECK_INTERVAL": "0",
        "SIDECAR_LOG_LEVEL": "warning",
    }

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    log = (tmp_path / "sidecar.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "serve"],
        env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=limit,
    )  # fmt: skip
    sockets = []
    try:
        wait_until(lambda: _status(f"http://127.0.0.1:{ops}/readyz") == 200, timeout=30)

        def open_idle() -> None:
            # Non-blocking: past the listener's small backlog the kernel stops
            # completing handshakes (the flood waits there, costing the sidecar nothing).
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", hooks))
            sockets.append(s)

        for _ in range(300):
            open_idle()

        # The flood reaches the sidecar (slowly: its backlog is small at this limit)
        # and is refused or evicted there. With SYN cookies (Linux's default) the
        # kernel may drop a handshake's last ACK when the accept queue is full: that
        # socket believes it is connected and, sending nothing, never retries, so
        # on a busy machine most of a burst can vanish. More idle sockets, one per
        # poll, until the sidecar has refused some.
        def flood_reached() -> bool:
            if _refused(ops, "webhooks") >= 5:
                return True
            if len(sockets) < 800:
                open_idle()
            return False

        wait_until(flood_reached, timeout=30)
        for i in range(20):
            url = f"http://127.0.0.1:{local}/v1/customers/new_{i}/can/m"
            assert _status(url) == 200, f"uncached read {i} failed"
        assert proc.poll() is None
    finally:
        for s in sockets:
            s.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()
    text = (tmp_path / "sidecar.log").read_text()
    assert "connection_caps_lowered" in text, text[-2000:]
    assert "Too many open files" not in text, text[-2000:]


def _refused(ops_port: int, listener: str) -> float:
    """Connections the listener refused or cut, every reason together."""
    with urllib.request.urlopen(f"http://127.0.0.1:{ops_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vellum_sidecar_connections_refused_total{")
        and f'listener="{listener}"' in line
    )


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


@pytest.fixture
def emulator_process(tmp_path: Path) -> Iterator[tuple[str, str]]:
    port = free_port()
    tenant = "t_fd"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "emulator", "--listen", f"127.0.0.1:{port}",
         "--api-keys", API_KEY, "--tenant", tenant, "--no-seed"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(lambda: _status(f"http://127.0.0.1:{port}/_emulator/healthz") == 200, 30)
        yield f"http://127.0.0.1:{port}", tenant
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
