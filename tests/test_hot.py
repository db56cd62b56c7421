"""The front door (sidecar/http/hot.py): which requests it answers below the router,
and that those answers are the router's, byte for byte, header for header."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from aiohttp.web_request import BaseRequest

from sidecar.emulator import Emulator
from sidecar.http.hot import HOT_ROUTES, front_door
from sidecar.http.inputs import MAX_ID_LENGTH

from .conftest import Sidecar, SidecarFactory

DOC = {"status": "active", "modules": ["reports", "m.v2"], "config": {}}
CAN_LABEL = "/v1/customers/{customer}/can/{module}"
FLAG_LABEL = "/v1/customers/{customer}/flags/{name}"
SUB_DELIMS = "cus-._~!$&'()*+,;=:@1"

Taken = list[tuple[str, str, str]]


def _door(
    taken: Taken, routed: list[str]
) -> Callable[[BaseRequest], Awaitable[web.StreamResponse]]:
    """The front door over an app whose hot handlers and router only record calls."""
    app = web.Application()

    def hot(verb: str) -> Callable[[BaseRequest, str, str], Awaitable[web.StreamResponse]]:
        async def handler(request: BaseRequest, first: str, second: str) -> web.StreamResponse:
            taken.append((verb, first, second))
            return web.Response(status=200)

        return handler

    app[HOT_ROUTES] = {"can": hot("can"), "flags": hot("flags")}

    async def router(request: BaseRequest) -> web.StreamResponse:
        routed.append(request.raw_path)
        return web.Response(status=404)

    return front_door(app, router)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v1/customers/cus_1/can/reports", ("can", "cus_1", "reports")),
        ("/v1/customers/cus_1/flags/new-ui", ("flags", "cus_1", "new-ui")),
        (f"/v1/customers/{SUB_DELIMS}/can/m.v2", ("can", SUB_DELIMS, "m.v2")),
        ("/v1/customers/.hidden/can/...", ("can", ".hidden", "...")),
        (f"/v1/customers/{'c' * MAX_ID_LENGTH}/can/m", ("can", "c" * MAX_ID_LENGTH, "m")),
    ],
)
async def test_front_door_answers_plain_hot_reads(path: str, expected: tuple[str, ...]) -> None:
    taken: Taken = []
    routed: list[str] = []
    door = _door(taken, routed)
    await door(make_mocked_request("GET", path))
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
    ],
)
async def test_front_door_leaves_everything_else_to_the_router(method: str, path: str) -> None:
    taken: Taken = []
    routed: list[str] = []
    door = _door(taken, routed)
    await door(make_mocked_request(method, path))
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
    app[HOT_ROUTES] = {}
    assert front_door(app, router) is router  # no hot routes: nothing skipped
    app2 = web.Application(middlewares=[mw])

    async def hot(request: BaseRequest, first: str, second: str) -> web.StreamResponse:
        return web.Response()

    app2[HOT_ROUTES] = {"can": hot}
    with pytest.raises(RuntimeError, match="middlewares"):
        front_door(app2, router)


async def _answer(sc: Sidecar, path: str) -> tuple[int, bytes, dict[str, str]]:
    resp = await sc.client.get(path)
    body = await resp.read()
    keep = ("Content-Type", "X-Sidecar-Cache", "Content-Length")
    return resp.status, body, {k: resp.headers.get(k, "") for k in keep}


def _count(sc: Sidecar, route: str, status: str) -> float:
    return float(sc.metrics.requests.labels(route, "GET", status).value)


async def test_the_front_door_and_the_router_give_the_same_answers(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    """Each plain request (the front door) against the same read spelled with an escape
    (the router): same status, body and headers, counted under the same route label."""
    emulator.set_entitlements(tenant, "cus_1", DOC)
    emulator.set_flag(tenant, "new-ui", True)
    sc = await make_sidecar(None)
    pairs = [
        ("/v1/customers/cus_1/can/reports", "/v1/customers/cus%5F1/can/reports", CAN_LABEL),
        ("/v1/customers/cus_1/can/billing", "/v1/customers/cus_1/can/%62illing", CAN_LABEL),
        ("/v1/customers/nobody/can/reports", "/v1/customers/nob%6Fdy/can/reports", CAN_LABEL),
        ("/v1/customers/cus_1/flags/new-ui", "/v1/customers/cus%5F1/flags/new-ui", FLAG_LABEL),
        ("/v1/customers/cus_1/flags/absent", "/v1/customers/cus%5F1/flags/absent", FLAG_LABEL),
    ]
    for plain, escaped, label in pairs:
        first = await _answer(sc, escaped)  # a miss or a hit: the same on both after this
        before = {s: _count(sc, label, s) for s in ("200", "404")}
        front = await _answer(sc, plain)
        routed = await _answer(sc, escaped)
        assert front == routed, plain
        assert front[0] == first[0], plain
        status = str(front[0])
        assert _count(sc, label, status) == before[status] + 2, plain


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
