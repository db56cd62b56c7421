"""The front door (sidecar/http/hot.py): which requests it answers below the router,
and that those answers are the router's, byte for byte, header for header."""

from __future__ import annotations

import asyncio
import gzip
import io
import logging
from collections.abc import Awaitable, Callable

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from aiohttp.web_request import BaseRequest
from yarl import URL

from sidecar.app import LOCAL_MAX_BODY
from sidecar.emulator import Emulator
from sidecar.http.hot import HOT_ROUTES, GuardedHot, HotRoute, front_door
from sidecar.http.inputs import MAX_ID_LENGTH
from sidecar.http.routes import HOT

from .conftest import Sidecar, SidecarFactory

DOC = {"status": "active", "modules": ["reports", "m.v2"], "config": {}}
CAN_LABEL = "/v1/customers/{customer}/can/{module}"
FLAG_LABEL = "/v1/customers/{customer}/flags/{name}"
SUB_DELIMS = "cus-._~!$&'()*+,;=:@1"

OFREP_LABEL = "/ofrep/v1/evaluate/flags/{key}"
SUB_DELIMS = "cus-._~!$&'()*+,;=:@1"

Taken = list[tuple[str, ...]]


def _door(
    taken: Taken, routed: list[str]
) -> Callable[[BaseRequest], Awaitable[web.StreamResponse]]:
    """The front door over an app whose hot handlers and router only record calls."""
    app = web.Application()

    def hot(method: str, path: str) -> HotRoute:
        async def handler(
            app: web.Application, request: BaseRequest, *ids: str
        ) -> web.StreamResponse:
            name = "ofrep" if path.startswith("/ofrep/") else path.split("/")[-2]
            taken.append((name, *ids))
            return web.Response(status=200)

        async def never(request: web.Request) -> web.StreamResponse:
            raise AssertionError("the router's handler")

        return HotRoute(method, path, handler, never)

    routes = [hot(r.method, r.path) for r in HOT]

    app[HOT_ROUTES] = tuple((r, _unguarded(app, r)) for r in routes)

    async def router(request: BaseRequest) -> web.StreamResponse:
        routed.append(request.raw_path)
        return web.Response(status=404)

    return front_door(app, router)


def _unguarded(app: web.Application, route: HotRoute) -> GuardedHot:
    async def call(request: BaseRequest, *ids: str) -> web.StreamResponse:
        return await route.handler(app, request, *ids)

    return call


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", "/v1/customers/cus_1/can/reports", ("can", "cus_1", "reports")),
        ("GET", "/v1/customers/cus_1/flags/new-ui", ("flags", "cus_1", "new-ui")),
        ("GET", f"/v1/customers/{SUB_DELIMS}/can/m.v2", ("can", SUB_DELIMS, "m.v2")),
        ("GET", "/v1/customers/.hidden/can/...", ("can", ".hidden", "...")),
        ("GET", f"/v1/customers/{'c' * MAX_ID_LENGTH}/can/m", ("can", "c" * MAX_ID_LENGTH, "m")),
        ("POST", "/ofrep/v1/evaluate/flags/new-ui", ("ofrep", "new-ui")),
        ("POST", "/ofrep/v1/evaluate/flags/module:reports", ("ofrep", "module:reports")),
    ],
)
async def test_front_door_answers_plain_hot_reads(
    method: str, path: str, expected: tuple[str, ...]
) -> None:
    taken: Taken = []
    routed: list[str] = []
    door = _door(taken, routed)
    await door(make_mocked_request(method, path))
    assert taken == [expected]
    assert routed == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("HEAD", "/v1/customers/cus_1/can/reports"),
        ("POST", "/v1/customers/cus_1/can/reports"),
        ("GET", "/v1/customers/cus%5F1/can/reports"),  # an escape to decode
        ("GET", "/v1/customers/cus_1/flags/new-ui?default=true"),
        ("GET", "/v1/customers/cus_1/can/reports?"),
        ("GET", "/v1/customers/./can/reports"),  # dot segments: the URL parser folds them
        ("GET", "/v1/customers/cus_1/can/.."),
        ("GET", "/v1/customers//can/reports"),  # empty: the router's 400 names it
        ("GET", "/v1/customers/cus_1/can/"),
        ("GET", f"/v1/customers/{'c' * (MAX_ID_LENGTH + 1)}/can/m"),  # too long: a 400
        ("GET", "/v1/customers/cüs/can/reports"),  # not ASCII
        ("GET", "/v1/customers/cus_1/can/reports/extra"),
        ("GET", "/v1/customers/cus_1/entitlements"),
        ("GET", "/v1/customers/cus_1/cannot/reports"),
        ("GET", "http://127.0.0.1/v1/customers/cus_1/can/reports"),  # absolute form
        ("GET", "//v1/customers/cus_1/can/reports"),
        ("GET", "/ofrep/v1/evaluate/flags/new-ui"),
        ("PUT", "/ofrep/v1/evaluate/flags/new-ui"),
        ("POST", "/ofrep/v1/evaluate/flags/new%2Dui"),
        ("POST", "/ofrep/v1/evaluate/flags/new-ui?x=1"),
        ("POST", "/ofrep/v1/evaluate/flags/"),  # empty: the router's FLAG_NOT_FOUND
        ("POST", "/ofrep/v1/evaluate/flags"),  # bulk
        ("POST", "/ofrep/v1/evaluate/flags/.."),
        ("POST", "/ofrep/v1/evaluate/flags/a/b"),
    ],
)
async def test_front_door_leaves_everything_else_to_the_router(method: str, path: str) -> None:
    taken: Taken = []
    routed: list[str] = []
    door = _door(taken, routed)
    await door(make_mocked_request(method, path))
    assert taken == []
    assert routed == [path]


async def test_a_body_the_client_waits_to_send_goes_to_the_router() -> None:
    """``Expect: 100-continue``: the router's expect handler answers ``100 Continue``
    before the handler reads the body; the front door would leave the client waiting."""
    taken: Taken = []
    routed: list[str] = []
    door = _door(taken, routed)
    path = "/ofrep/v1/evaluate/flags/new-ui"
    await door(make_mocked_request("POST", path, headers={"Expect": "100-continue"}))
    assert taken == []
    assert routed == [path]


def test_an_app_without_hot_routes_gets_its_own_handler_back() -> None:
    async def router(request: BaseRequest) -> web.StreamResponse:
        return web.Response()

    assert front_door(web.Application(), router) is router


def test_the_front_door_refuses_an_app_whose_middleware_it_would_skip() -> None:
    @web.middleware
    async def mw(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        return await handler(request)

    async def router(request: BaseRequest) -> web.StreamResponse:
        return web.Response()

    app = web.Application(middlewares=[mw])
    app[HOT_ROUTES] = ()
    assert front_door(app, router) is router  # no hot routes: nothing skipped
    app2 = web.Application(middlewares=[mw])

    async def hot(request: BaseRequest, *ids: str) -> web.StreamResponse:
        return web.Response()

    app2[HOT_ROUTES] = ((HOT[0], hot),)
    with pytest.raises(RuntimeError, match="middlewares"):
        front_door(app2, router)


async def _answer(
    sc: Sidecar, path: str, body: bytes | None = None
) -> tuple[int, bytes, dict[str, str]]:
    """``path`` sent as it is spelled: yarl would decode an escaped unreserved
    character (``%5F`` to ``_``), and the read would take the front door."""
    url = URL(str(sc.client.make_url("/")).rstrip("/") + path, encoded=True)
    assert url.raw_path == path.split("?")[0]
    method = "GET" if body is None else "POST"
    headers = {"Content-Type": "application/json"} if body is not None else None
    async with sc.client.session.request(method, url, data=body, headers=headers) as resp:
        answer = await resp.read()
        keep = ("Content-Type", "X-Sidecar-Cache", "Content-Length")
        return resp.status, answer, {k: resp.headers.get(k, "") for k in keep}


def _count(sc: Sidecar, route: str, status: str, method: str = "GET") -> float:
    return float(sc.metrics.requests.labels(route, method, status).value)


async def test_the_front_door_and_the_router_give_the_same_answers(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    """Each plain request (the front door) against the same read spelled with an escape
    (the router): same status, body and headers, counted under the same route label."""
    emulator.set_entitlements(tenant, "cus_1", DOC)
    emulator.set_flag(tenant, "new-ui", True)
    emulator.set_flag(tenant, "dark", False)
    emulator.set_flag(tenant, "dark", True, customer_id="cus_1")  # TARGETING_MATCH
    sc = await make_sidecar(None)
    cus_1 = b'{"context": {"targetingKey": "cus_1"}}'
    pairs: list[tuple[str, str, str, bytes | None]] = [
        ("/v1/customers/cus_1/can/reports", "/v1/customers/cus%5F1/can/reports", CAN_LABEL, None),
        ("/v1/customers/cus_1/can/billing", "/v1/customers/cus_1/can/%62illing", CAN_LABEL, None),
        ("/v1/customers/nobody/can/reports", "/v1/customers/nob%6Fdy/can/reports", CAN_LABEL,
         None),
        ("/v1/customers/cus_1/flags/new-ui", "/v1/customers/cus%5F1/flags/new-ui", FLAG_LABEL,
         None),
        ("/v1/customers/cus_1/flags/absent", "/v1/customers/cus%5F1/flags/absent", FLAG_LABEL,
         None),
        ("/ofrep/v1/evaluate/flags/new-ui", "/ofrep/v1/evaluate/flags/new%2Dui", OFREP_LABEL,
         cus_1),
        ("/ofrep/v1/evaluate/flags/dark", "/ofrep/v1/evaluate/flags/d%61rk", OFREP_LABEL, cus_1),
        ("/ofrep/v1/evaluate/flags/absent", "/ofrep/v1/evaluate/flags/%61bsent", OFREP_LABEL,
         cus_1),
        ("/ofrep/v1/evaluate/flags/module:reports", "/ofrep/v1/evaluate/flags/module%3Areports",
         OFREP_LABEL, cus_1),
        ("/ofrep/v1/evaluate/flags/module:billing", "/ofrep/v1/evaluate/flags/module%3Abilling",
         OFREP_LABEL, b'{"context": {"targetingKey": "nobody"}}'),
        ("/ofrep/v1/evaluate/flags/new-ui", "/ofrep/v1/evaluate/flags/new%2Dui", OFREP_LABEL,
         b'{"context": {}}'),
        ("/ofrep/v1/evaluate/flags/new-ui", "/ofrep/v1/evaluate/flags/new%2Dui", OFREP_LABEL,
         b"{not json"),
    ]  # fmt: skip
    statuses = ("200", "400", "404")
    for plain, escaped, label, body in pairs:
        method = "GET" if body is None else "POST"
        first = await _answer(sc, escaped, body)  # a miss or a hit: the same on both after this
        before = {s: _count(sc, label, s, method) for s in statuses}
        front = await _answer(sc, plain, body)
        routed = await _answer(sc, escaped, body)
        assert front == routed, (plain, body)
        assert front[0] == first[0], (plain, body)
        status = str(front[0])
        assert _count(sc, label, status, method) == before[status] + 2, (plain, body)
    assert {s: _count(sc, OFREP_LABEL, s, "POST") for s in statuses} == {
        "200": 3 * 4,
        "400": 3 * 2,
        "404": 3 * 1,
    }


async def test_a_client_that_expects_100_continue_is_answered(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    """The router's ``100 Continue``, then the evaluation, as without the header."""
    emulator.set_flag(tenant, "new-ui", True)
    sc = await make_sidecar(None)
    resp = await sc.client.post(
        "/ofrep/v1/evaluate/flags/new-ui",
        json={"context": {"targetingKey": "cus_1"}},
        expect100=True,
    )
    assert resp.status == 200
    assert (await resp.json())["value"] is True


async def test_the_front_door_keeps_the_guard_and_the_json_errors(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    emulator.set_entitlements(tenant, "cus_1", DOC)
    sc = await make_sidecar(None, SIDECAR_UPSTREAM_TIMEOUT="0.5")
    refused = await sc.client.get(
        "/v1/customers/cus_1/can/reports", headers={"Origin": "https://evil.example"}
    )
    assert refused.status == 403
    assert (await refused.json())["error"]["code"] == "forbidden"
    assert _count(sc, CAN_LABEL, "403") == 1
    emulator.fail("get_entitlements", 500, None)
    down = await sc.client.get("/v1/customers/cus_2/can/reports")
    assert down.status == 503
    body = await down.json()
    assert body["allowed"] is False
    assert body["error"]["code"] == "upstream_unavailable"


@pytest.mark.parametrize("key", ["new-ui", "new%2Dui"])  # the front door, the router
async def test_an_evaluation_body_over_the_limit_is_a_413(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str, key: str
) -> None:
    """Over ``LOCAL_MAX_BODY`` as sent (it arrives after the handler starts), and as a
    small gzip body that inflates past it (whole before the handler runs)."""
    emulator.set_flag(tenant, "new-ui", True)
    sc = await make_sidecar(None)
    url = URL(f"{str(sc.client.make_url('/')).rstrip('/')}/ofrep/v1/evaluate/flags/{key}",
              encoded=True)  # fmt: skip
    padded = b'{"context": {"targetingKey": "cus_1"}, "pad": "' + b"x" * LOCAL_MAX_BODY + b'"}'
    inflating = gzip.compress(padded)
    assert len(inflating) < 4096
    for body, headers in [
        (padded, {"Content-Type": "application/json"}),
        (inflating, {"Content-Type": "application/json", "Content-Encoding": "gzip"}),
    ]:
        data = io.BytesIO(body)
        async with sc.client.session.post(url, data=data, headers=headers) as resp:
            assert resp.status == 413, headers
            assert (await resp.json())["error"]["code"] == "payload_too_large"
    small = gzip.compress(b'{"context": {"targetingKey": "cus_1"}}')
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    async with sc.client.session.post(url, data=small, headers=headers) as resp:
        assert resp.status == 200
        assert (await resp.json())["value"] is True
    assert _count(sc, OFREP_LABEL, "413", "POST") == 2


@pytest.mark.parametrize(
    "path",
    [
        "/ofrep/v1/evaluate/flags/new-ui",  # the front door
        "/ofrep/v1/evaluate/flags/new%2Dui",  # the router
        "/v1/check",
        "/v1/customers/cus_1/credits/api/consume",
    ],
)
async def test_a_body_that_does_not_decode_is_a_400_and_closes_quietly(
    make_sidecar: SidecarFactory,
    emulator: Emulator,
    tenant: str,
    path: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``Content-Encoding: gzip`` on a body that is not gzip: a JSON 400, and the
    connection closes after it. It used to stay open: aiohttp then read on to drain the
    body, hit the same error and logged it as an unhandled exception with a traceback."""
    emulator.set_flag(tenant, "new-ui", True)
    sc = await make_sidecar(None)
    base = sc.client.make_url("/")
    caplog.set_level(logging.DEBUG)
    body = b'{"not": "gzip"}'
    reader, writer = await asyncio.open_connection(base.host, base.port)
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Encoding: gzip\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    # Everything the sidecar sends, until it closes the connection.
    answer = await asyncio.wait_for(reader.read(-1), timeout=10)
    writer.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), head
    assert b"\r\nConnection: close" in head, head
    answer_body = orjson.loads(payload)
    if path.startswith("/ofrep/"):  # OFREP's own error shape, never the local envelope
        assert answer_body["errorCode"] == "PARSE_ERROR", answer_body
    else:
        assert answer_body["error"]["code"] == "invalid_body", answer_body
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    resp = await sc.client.get("/v1/customers/cus_1/flags/new-ui")
    assert resp.status == 200
