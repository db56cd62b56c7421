"""Isolation (issue 21): no peer on one listener, and no slow work, shuts out pushes,
probes or cached reads; ids never leave the tenant; no path shape is a 500.

One test per row of the issue's table, each at the smallest size that still proves
the point (caps lowered with the settings, so a few dozen sockets stand for
hundreds; ``python -m bench.faults`` runs the full sizes): the real listeners
(``run_sidecar``, tests/served.py), the in-process emulator as the upstream and
as the push sender, raw sockets as the hostile peers.

The rows, in the table's order: ``..._webhook_port_loses_no_push`` (slow bodies on
the public webhook port), ``..._ops_port_leaves_every_probe_answered`` (the same on
ops), ``test_open_event_streams_never_shut_out_requests``,
``test_misses_waiting_on_a_slow_upstream_never_shut_out_cached_reads``,
``test_collection_paths_are_forwarded_or_refused_never_a_500``,
``test_escape_forms_are_refused_before_the_egress_proxy_sees_them``,
``test_trace_and_other_methods_are_405_and_never_forwarded``,
``test_every_405_names_its_methods`` and, for the logs,
``test_log_lines_keep_their_event_name`` and its neighbours. (Keys under floods:
replay keys in tests/test_webhooks.py, drops for unknown customers in
tests/test_shared_tier.py; the example Redis's bound in tests/test_deploy.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import posixpath
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import quote, unquote

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from sidecar.emulator import Emulator
from sidecar.http import inputs
from sidecar.http.inputs import VALID_ID, id_problem, is_id, valid_id
from sidecar.logs import JsonFormatter

from .conftest import eventually
from .harness import API_KEY, WEBHOOK_SECRET, RedisServer, slow_body
from .served import Served, ServeFactory, exchange, json_of, serve, status_of

__all__ = ["serve"]

DOC = {"status": "active", "modules": ["reports"]}
REFUSED = "vellum_sidecar_connections_refused_total"
#: The ``Allow`` of an unknown operation with a method never forwarded.
ALL_FORWARDED = "DELETE,GET,HEAD,PATCH,POST,PUT"


# -- hostile peers ------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def flood(
    count: int, attack: Callable[[asyncio.Event], Awaitable[int]]
) -> AsyncIterator[None]:
    stop = asyncio.Event()
    tasks = [asyncio.ensure_future(attack(stop)) for _ in range(count)]
    try:
        yield
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)


async def refused(sc: Served, listener: str, *reasons: str) -> float:
    return sum([await sc.metric(REFUSED, listener=listener, reason=r) for r in reasons])


async def until_full(sc: Served, listener: str, cap: int) -> None:
    """Until the flood holds the listener at its cap and has had some of its
    sockets cut for being slow (so the case below runs against a full listener)."""

    async def full() -> bool:
        held = await sc.metric("vellum_sidecar_open_connections", listener=listener)
        cut = await refused(sc, listener, "slow_evicted", "too_slow")
        return held >= cap and cut > 0

    await eventually(full, timeout=20, interval=0.05)


# -- listeners ------------------------------------------------------------------------------


async def test_a_slow_body_flood_on_the_webhook_port_loses_no_push(
    serve: ServeFactory, emulator: Emulator, tenant: str
) -> None:
    """30 slow bodies against a cap of 20 (the issue: 128 against 128): each
    authentic push is answered 200 on the first of the emulator's three tries."""
    sc = await serve(SIDECAR_WEBHOOK_MAX_CONNECTIONS="20")
    emulator.webhook_url = f"{sc.url('webhooks')}/webhooks/vellum"
    emulator.webhook_secret = WEBHOOK_SECRET
    port = sc.ports["webhooks"]
    async with flood(30, lambda stop: slow_body(port, "/webhooks/vellum", stop)):
        await until_full(sc, "webhooks", 20)
        pushes = [await emulator.push_event(tenant, customer_id=f"cus_{i}") for i in range(5)]
        statuses = [[a.status for a in p.attempts] for p in pushes]
        assert statuses == [[200]] * 5, [[a.error for a in p.attempts] for p in pushes]
        assert await sc.metric("vellum_sidecar_webhooks_total", result="ok") == 5
    assert await refused(sc, "webhooks", "slow_evicted", "too_slow") > 0


async def test_a_slow_body_flood_on_the_ops_port_leaves_every_probe_answered(
    serve: ServeFactory,
) -> None:
    """20 slow bodies against an ops cap of 10 (the issue: 34 against 32): 10/10
    probes on new connections answer, as the kubelet's would."""
    sc = await serve(SIDECAR_OPS_MAX_CONNECTIONS="10")
    port = sc.ports["ops"]
    async with flood(20, lambda stop: slow_body(port, "/healthz", stop)):
        await until_full(sc, "ops", 10)
        answered = []
        for _ in range(10):
            timeout = aiohttp.ClientTimeout(total=5)
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,  # a new connection each
                session.get(f"{sc.url('ops')}/healthz") as resp,
            ):
                answered.append(resp.status)
        assert answered == [200] * 10


async def open_stream(
    port: int, customer: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET /ofrep/v1/events?targetingKey={customer} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    )
    return reader, writer


async def test_open_event_streams_never_shut_out_requests(
    serve: ServeFactory, emulator: Emulator, tenant: str
) -> None:
    """60 streams against a stream cap of 20 and a connection cap of 40 (the issue:
    1,100 streams against the 1,024 connections): the cap's 20 streams stay open
    and count apart, the 40 others are refused 503, and 20/20 reads of a cached
    customer on new connections answer 200."""
    emulator.set_entitlements(tenant, "cus_cached", DOC)
    sc = await serve(SIDECAR_MAX_CONNECTIONS="40", SIDECAR_MAX_STREAMS="20")
    assert (await sc.get("/v1/customers/cus_cached/can/reports"))[0] == 200
    port = sc.ports["local"]
    streams = [await open_stream(port, f"cus_{i}") for i in range(60)]
    try:
        heads = [await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10) for r, _ in streams]
        statuses = sorted(int(h.split(b" ", 2)[1]) for h in heads)
        assert statuses == [200] * 20 + [503] * 40
        assert await sc.metric("vellum_sidecar_open_streams") == 20
        assert await refused(sc, "local", "max_streams") == 40
        for i in range(20):
            status, body = await sc.get("/v1/customers/cus_cached/can/reports")
            assert (status, body["allowed"]) == (200, True), i
        # The streams are still open and working: a drop reaches them.
        assert await sc.metric("vellum_sidecar_open_streams") == 20
        opened = next(i for i, head in enumerate(heads) if b" 200 " in head)
        async with aiohttp.ClientSession() as session:
            drop = f"{sc.url()}/v1/customers/cus_{opened}/cache"
            async with session.delete(drop) as resp:
                assert resp.status == 204
        reader = streams[opened][0]
        told = b""
        while b"refetchEvaluation" not in told:
            told += await asyncio.wait_for(reader.read(4096), 10)
    finally:
        for _, writer in streams:
            writer.close()


async def test_misses_waiting_on_a_slow_upstream_never_shut_out_cached_reads(
    serve: ServeFactory, emulator: Emulator, tenant: str
) -> None:
    """110 misses held by the upstream against a connection cap of 60 and at most 20
    calls waiting (the issue: 1,100 misses, the upstream taking 4 s): the 90 beyond
    the bound are answered at once, 503 ``upstream_overloaded`` with Retry-After
    and ``allowed: false``; a customer cached before, even past its freshness, is
    answered (stale), and 20/20 reads of a cached customer on new connections 200."""
    emulator.set_entitlements(tenant, "cus_cached", DOC)
    emulator.set_entitlements(tenant, "cus_stale", DOC)
    sc = await serve(
        SIDECAR_MAX_CONNECTIONS="60", SIDECAR_UPSTREAM_MAX_WAITING="20", SIDECAR_CACHE_TTL="1",
        SIDECAR_UPSTREAM_TIMEOUT="30",
    )  # fmt: skip
    for customer in ("cus_stale", "cus_cached"):
        assert (await sc.get(f"/v1/customers/{customer}/can/reports"))[0] == 200

    async def stale_now() -> bool:  # the 1 s freshness (jittered) has passed
        return time.time() > started + 1.2

    started = time.time()
    hold = emulator.hold("get_entitlements")
    port = sc.ports["local"]

    async def miss(i: int) -> tuple[int, bytes, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"GET /v1/customers/new_{i}/can/reports HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        body = await reader.readexactly(length)
        misses_writers.append(writer)  # held open, idle: what a keep-alive client does
        return int(head.split(b" ", 2)[1]), head, body

    misses_writers: list[asyncio.StreamWriter] = []
    waiting = []
    for i in range(110):
        waiting.append(asyncio.ensure_future(miss(i)))
        await asyncio.sleep(0)  # connect one after the other, as a busy app's pool would
    try:

        async def bounded() -> bool:
            done = [t for t in waiting if t.done()]
            waiting_now = await sc.metric("vellum_sidecar_upstream_waiting")
            return len(done) == 90 and waiting_now == 20

        await eventually(bounded, timeout=20, interval=0.05)
        for status, head, body in (t.result() for t in waiting if t.done()):
            assert status == 503
            assert b"retry-after: 1\r\n" in head.lower()
            answer = orjson.loads(body)
            assert answer["error"]["code"] == "upstream_overloaded"
            assert answer["allowed"] is False
        assert await sc.metric("vellum_sidecar_upstream_overloaded_total") == 90
        for i in range(20):
            status, body = await sc.get("/v1/customers/cus_cached/can/reports")
            assert (status, body["allowed"]) == (200, True), i
        await eventually(stale_now, timeout=5)
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{sc.url()}/v1/customers/cus_stale/entitlements") as resp,
        ):
            assert resp.status == 200
            assert resp.headers["X-Sidecar-Cache"] == "stale", "a cached entry, as always"
    finally:
        hold.release()
        results = await asyncio.gather(*waiting, return_exceptions=True)
        for writer in misses_writers:
            writer.close()
    held = [r for r in results if not isinstance(r, BaseException) and r[0] == 200]
    assert len(held) == 20, "the waiting ones got their answer once the upstream did"


async def test_keys_written_for_unknown_customers_live_at_most_an_hour(
    serve: ServeFactory, own_redis: RedisServer
) -> None:
    """The issue's flood of distinct unknown customers (33,475 in 15 s once left keys
    with a 24 h TTL) and of cache drops for random ids, at a smaller size with the
    default settings: every Redis key written for a customer the API called unknown
    expires within the hour, and the drops for customers nobody holds add none."""
    sc = await serve(own_redis.url)
    assert (await sc.get("/v1/customers/warm_up/entitlements"))[0] == 200
    async with (
        aiohttp.ClientSession() as session,
        session.delete(f"{sc.url()}/v1/customers/warm_up/cache") as dropped,
    ):
        assert dropped.status < 300  # the tenant's drop sequence exists from here on

    def keys() -> set[bytes]:
        """Redis's keys but the metered usage queue's partitions (made once per
        tenant as its delivery starts, at any moment of the test; durable)."""
        with own_redis.client() as c:
            return {k for k in c.keys("*") if b"}:u:" not in k}

    before = keys()
    async with aiohttp.ClientSession() as session:

        async def read(i: int) -> list[int]:
            statuses = []
            for path in ("entitlements", "can/reports", "flags/beta"):
                async with session.get(f"{sc.url()}/v1/customers/stranger_{i}/{path}") as r:
                    statuses.append(r.status)
            ofrep = f"{sc.url()}/ofrep/v1/evaluate/flags/beta"
            context = {"context": {"targetingKey": f"stranger_{i}"}}
            async with session.post(ofrep, json=context) as r:
                statuses.append(r.status)
            return statuses

        answers = await asyncio.gather(*(read(i) for i in range(150)))
        assert all(s < 500 for statuses in answers for s in statuses), answers
        after_reads = keys()
        for _ in range(300):
            url = f"{sc.url()}/v1/customers/random_{random.getrandbits(64):x}/cache"
            async with session.delete(url) as r:
                assert r.status < 300, await r.text()
    added = keys() - before
    assert len(added) >= 150, "the flood's negative entries reached Redis"
    with own_redis.client() as c:
        ttls = {key: c.ttl(key) for key in added}
    assert keys() - after_reads == set(), "drops of nobody's customers add no key"
    # A customer's flags are the API's 200 for any id (the global flags with that
    # customer's overrides, none for a stranger): a positive answer, kept for the
    # stale window like any other (docs/operations.md, Resource bounds). Every key
    # the sidecar writes knowing the customer is unknown expires within the hour.
    flags = {k for k in ttls if b":f:e:" in k}
    assert len(flags) == 150
    lasting = {k: t for k, t in ttls.items() if k not in flags and not 0 < t <= 3600}
    assert lasting == {}, "every key the flood wrote expires within the hour"


# -- paths and ids ------------------------------------------------------------------------


async def test_collection_paths_are_forwarded_or_refused_never_a_500(
    serve: ServeFactory, emulator: Emulator, tenant: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``GET /tenants/{t}/accounts`` and ``.../accounts/{a}/customers`` (any method):
    forwarded as unknown operations (the upstream's JSON 405, with its Allow), or
    refused 404/405 with forwarding off; never a 500."""
    emulator.create_account(tenant, "acme")
    on = await serve()
    off = await serve(SIDECAR_FORWARD_UNKNOWN="false")
    paths = [f"/tenants/{tenant}/accounts", f"/tenants/{tenant}/accounts/acme/customers"]
    async with aiohttp.ClientSession() as session:
        for sc in (on, off):
            for path in paths:
                for method in ("GET", "HEAD", "PUT", "PATCH", "DELETE"):
                    async with session.request(method, sc.url() + path) as resp:
                        assert resp.status in (404, 405), (method, path, resp.status)
                        if resp.status == 405:
                            assert resp.headers["Allow"] == "POST", (method, path)
                        if method != "HEAD":
                            assert resp.content_type == "application/json"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def normalising_proxy(target: str) -> web.Application:
    """An egress proxy that decodes and normalises paths on their way, as nginx's
    ``proxy_pass http://upstream/;`` does: ``%2F`` becomes ``/``, dot segments are
    resolved, the result is quoted again and sent on."""

    async def relay(request: web.Request) -> web.StreamResponse:
        decoded = unquote(request.raw_path.partition("?")[0])
        path = posixpath.normpath(decoded.replace("\\", "/")) if decoded != "/" else "/"
        request.app[SEEN].append(path)
        url = URL(target + quote(path), encoded=True).with_query(request.query)
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        async with (
            aiohttp.ClientSession() as session,
            session.request(request.method, url, headers=headers, data=await request.read()) as up,
        ):
            body = await up.read()
            return web.Response(status=up.status, body=body, content_type=up.content_type)

    app = web.Application()
    app[SEEN] = []
    app.router.add_route("*", "/{path:.*}", relay)
    return app


SEEN: web.AppKey[list[str]] = web.AppKey("seen", list)


@pytest.mark.parametrize(
    "path",
    [
        "/v1/customers/..%2F..%2Fother%2Fcustomers%2Fvictim/entitlements",
        "/tenants/{t}/customers/..%2F..%2Fother%2Fcustomers%2Fvictim/entitlements",
        "/tenants/{t}/%2e%2e/other/customers/victim/entitlements",
        "/v1/customers/..%5C..%5Cother%5Ccustomers%5Cvictim/entitlements",
        "/tenants/{t}/customers/%2e%2e/%2e%2e/other/customers/victim/entitlements",
        "/v1/customers/victim%00/entitlements",
    ],
)
async def test_escape_forms_are_refused_before_the_egress_proxy_sees_them(
    serve: ServeFactory,
    emulator: Emulator,
    emulator_server: TestServer,
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    tenant: str,
    path: str,
) -> None:
    """The issue's three forms (and their cousins) through a path-normalising proxy:
    the proxy itself hands out the other tenant's document for such a path, and the
    sidecar answers 400 ``invalid_id`` without sending anything."""
    emulator.set_entitlements("other", "victim", {"status": "active", "modules": ["secret"]})
    proxy = await aiohttp_server(normalising_proxy(str(emulator_server.make_url("")).rstrip("/")))
    proxy_url = str(proxy.make_url("")).rstrip("/")
    escape = f"/tenants/{tenant}/customers/..%2F..%2Fother%2Fcustomers%2Fvictim/entitlements"
    async with (
        aiohttp.ClientSession() as session,
        session.get(URL(proxy_url + escape, encoded=True), headers={"x-api-key": API_KEY}) as r,
    ):
        assert r.status == 200, "the proxy normalises: the sidecar is what stands in the way"
        assert (await r.json())["modules"] == ["secret"]
    proxy.app[SEEN].clear()

    sc = await serve(VELLUM_BASE_URL=proxy_url)
    url = URL(sc.url() + path.replace("{t}", tenant), encoded=True)
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "invalid_id"
    assert proxy.app[SEEN] == [], "nothing was sent"


async def test_the_id_rule_holds_on_every_other_surface(
    serve: ServeFactory, emulator: Emulator, tenant: str
) -> None:
    """Besides path ids (tests/test_proxy.py): /v1/check's pairs, OFREP's targeting
    key and flag keys, the event stream's targeting key, /v1's id fields and id
    queries; each a 400 before any upstream call."""
    sc = await serve()
    base = sc.url()
    ofrep = {"context": {"targetingKey": "../other"}}
    cases: list[tuple[str, str, object, int, str]] = [
        ("POST", "/v1/check", {"checks": [{"customerId": "a/b", "module": "m"}]}, 400,
         "invalid_body"),
        ("POST", "/v1/check", {"checks": [{"customerId": "c", "module": "m\u0000"}]}, 400,
         "invalid_body"),
        ("POST", "/ofrep/v1/evaluate/flags/beta", ofrep, 400, "INVALID_CONTEXT"),
        ("POST", "/ofrep/v1/evaluate/flags", ofrep, 400, "INVALID_CONTEXT"),
        ("POST", "/ofrep/v1/evaluate/flags/%2E%2E", {"context": {"targetingKey": "c"}}, 400,
         "GENERAL"),
        ("POST", "/ofrep/v1/evaluate/flags/a%5Cb", {"context": {"targetingKey": "c"}}, 400,
         "GENERAL"),
        ("GET", "/ofrep/v1/events?targetingKey=a%2Fb", None, 400, "INVALID_CONTEXT"),
        ("POST", "/v1/accounts/acme/customers", {"customerId": ".."}, 400, "invalid_body"),
        ("GET", "/v1/accounts/acme/invoices?customerId=a%5Cb", None, 400, "invalid_query"),
    ]  # fmt: skip
    async with aiohttp.ClientSession() as session:
        for method, path, body, status, code in cases:
            url = URL(base + path, encoded=True)
            async with session.request(method, url, json=body) as resp:
                answer = await resp.json()
                assert resp.status == status, (path, answer)
                got = answer["error"]["code"] if "error" in answer else answer["errorCode"]
                assert got == code, (path, answer)
    assert emulator.requests == [], "nothing was sent upstream"


class EchoingUpstream:
    """An upstream (or a proxy on the way) that answers TRACE by echoing the request,
    as RFC 9110 describes it: the headers it received come back in the body."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(request.method)
        head = "".join(f"{k}: {v}\r\n" for k, v in request.headers.items())
        return web.Response(text=f"{request.method} {request.raw_path}\r\n{head}")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self.handle)
        return app


async def test_trace_and_other_methods_are_405_and_never_forwarded(
    serve: ServeFactory,
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    tenant: str,
) -> None:
    echo = EchoingUpstream()
    upstream = await aiohttp_server(echo.app())
    sc = await serve(VELLUM_BASE_URL=str(upstream.make_url("")).rstrip("/"))
    async with aiohttp.ClientSession() as session:
        for method in ("TRACE", "OPTIONS", "PROPFIND", "PURGE"):
            url = f"{sc.url()}/tenants/{tenant}/anything/at/all"
            async with session.request(method, url) as resp:
                body = await resp.read()
                assert resp.status == 405, method
                assert resp.headers["Allow"] == ALL_FORWARDED
                assert orjson.loads(body)["error"]["code"] == "method_not_allowed"
                assert API_KEY.encode() not in body
    # CONNECT names a host, not a path (its authority form): no route, a JSON 404.
    request = b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    answer, _ = await exchange(sc.ports["local"], request)
    assert status_of(answer) == 404
    assert json_of(answer)["error"]["code"] == "not_found"
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{sc.url()}/tenants/{tenant}/anything/at/all") as resp,
    ):
        assert resp.status == 200, "a GET is forwarded as before"
        assert "x-api-key" in (await resp.text()).lower()
    assert echo.seen == ["GET"], "TRACE and the others never reached the upstream"


async def test_every_405_names_its_methods(
    serve: ServeFactory, emulator: Emulator, tenant: str
) -> None:
    """Mirror 405s carry ``Allow`` like the ``/v1`` ones, whichever side answers."""
    on = await serve()
    off = await serve(SIDECAR_FORWARD_UNKNOWN="false")
    cases: list[tuple[Served, str, str, str]] = [
        (on, "POST", "/v1/customers/c/entitlements", "GET,HEAD"),
        (off, "POST", f"/tenants/{tenant}/customers/c/entitlements", "GET,HEAD"),
        (off, "GET", f"/tenants/{tenant}/accounts", "POST"),
        (on, "GET", f"/tenants/{tenant}/accounts", "POST"),  # the upstream's own 405
        (on, "PUT", f"/tenants/{tenant}/customers/c/entitlements", "GET"),  # the upstream's
        (on, "TRACE", f"/tenants/{tenant}/customers/c/entitlements", ALL_FORWARDED),
    ]  # fmt: skip
    async with aiohttp.ClientSession() as session:
        for sc, method, path, allow in cases:
            async with session.request(method, sc.url() + path) as resp:
                assert resp.status == 405, (method, path)
                assert resp.headers.get("Allow", "").replace(" ", "") == allow.replace(" ", "")
                assert resp.content_type == "application/json"


# -- logs -------------------------------------------------------------------------------------


def test_log_lines_keep_their_event_name() -> None:
    """A field named like one of the line's own keys never overwrites it."""
    record = logging.LogRecord("sidecar.webhooks", logging.INFO, __file__, 1, "webhook_applied",
                               None, None)  # fmt: skip
    record.fields = {"event": "eventId:e1", "level": "x", "ts": 0, "customerId": "c"}
    line = orjson.loads(JsonFormatter().format(record))
    assert line["event"] == "webhook_applied"
    assert line["level"] == "info"
    assert line["ts"] != 0
    assert line["field.event"] == "eventId:e1"
    assert line["field.level"] == "x"
    assert line["customerId"] == "c"


def test_an_exception_logs_its_traceback_without_locals() -> None:
    def fail() -> None:
        api_key = "vk_live_secret_value"
        raise ValueError(f"bad thing ({len(api_key)} characters)")

    try:
        fail()
    except ValueError:
        import sys

        record = logging.LogRecord("sidecar.api", logging.ERROR, __file__, 1, "unhandled_error",
                                   None, sys.exc_info())  # fmt: skip
    line = orjson.loads(JsonFormatter().format(record))
    assert line["event"] == "unhandled_error"
    assert line["error"] == "ValueError: bad thing (20 characters)"
    assert "in fail" in line["traceback"] and "test_isolation.py" in line["traceback"]
    assert "vk_live_secret_value" not in line["traceback"], "no frame's locals"


async def test_webhook_log_lines_are_found_by_their_documented_names(
    serve: ServeFactory, emulator: Emulator, tenant: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.webhooks")
    sc = await serve()
    emulator.webhook_url = f"{sc.url('webhooks')}/webhooks/vellum"
    emulator.webhook_secret = WEBHOOK_SECRET
    push = await emulator.push_event(tenant, customer_id="cus_1")
    assert push.delivered
    lines = [orjson.loads(JsonFormatter().format(r)) for r in caplog.records]
    applied = [line for line in lines if line["event"] == "webhook_applied"]
    assert len(applied) == 1, lines
    assert applied[0]["eventKey"] == "eventId:" + push.event["eventId"]
    assert applied[0]["type"] == "entitlements.updated"


def test_the_id_rule_has_one_answer_however_it_is_asked() -> None:
    """``valid_id`` (its fast test, then the pattern), ``VALID_ID`` and ``id_problem``
    agree on every string, and the rule is what the docs say."""
    refused = ["", ".", "..", "a/b", "a\\b", "a\x00b", "\x1f", "a\x7f", "\x85", "\x9f", "y" * 513]
    allowed = ["a", "...", "..a", "a..", "cus 1?#%;", "ü", "\u00a0", "\u200b", "\u202e", "y" * 512]
    for value in refused:
        assert id_problem(value) is not None and not valid_id(value), repr(value)
    for value in allowed:
        assert id_problem(value) is None and valid_id(value), repr(value)
    rng = random.Random(21)
    alphabet = [*"./\\ab", "\x00", "\x1f", "\x7f", "\x85", "\xa0", "\u200b", "\u2028", "é"]
    for _ in range(50_000):
        value = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 5)))
        expected = id_problem(value) is None
        assert valid_id(value) is expected, repr(value)
        assert (VALID_ID(value) is not None) is expected, repr(value)


def test_ids_that_passed_are_remembered_within_a_bound() -> None:
    """``valid_id`` remembers ids that passed (``POST /v1/check`` asks about the same
    ones again and again): a refused id is never remembered, whatever it is asked
    after, and a flood of distinct ids never holds more than the bound."""
    inputs._PASSED.clear()
    for _ in range(3):
        assert [valid_id(v) for v in ("cus_1", "..", "a/b", "cus_1")] == [True, False, False, True]
        assert [is_id(v) for v in ("cus_1", "..", "a\x00", 7, None)] == [True] + [False] * 4
    assert set(inputs._PASSED) == {"cus_1"}
    for i in range(3 * inputs._PASSED_MAX):
        assert valid_id(f"flood_{i}")
        assert len(inputs._PASSED) <= inputs._PASSED_MAX
    assert not valid_id("..") and ".." not in inputs._PASSED
