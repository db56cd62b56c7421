"""Mirror paths the operation table does not know: forwarded by default, or refused.

A newer SDK calls operations this release has never heard of. The upstream here is
the project's emulator with two operations added that the table lacks (a usage
feed: ``POST`` and ``GET /tenants/{t}/customers/{c}/usage``), standing in for a
newer Vellum API; they go through the emulator's own pipeline (request log, key
check, injected faults) like every upstream route. ``SIDECAR_FORWARD_UNKNOWN=false``
is covered here and in ``tests/test_proxy.py``.
"""

from __future__ import annotations

import io
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from sidecar.emulator import Emulator, create_emulator_app
from sidecar.http.operations import OPERATIONS, path_shape
from sidecar.logs import JsonFormatter
from sidecar.metrics import MAX_UNKNOWN_SHAPES, Metrics

from .conftest import Sidecar, SidecarFactory, eventually
from .harness import API_KEY

CALLER_KEY = "caller_own_key_" + "c" * 20
USAGE: web.AppKey[list[dict[str, Any]]] = web.AppKey("usage", list)
CSV = b"day,events\r\n2024-05-01,3\r\n2024-05-02,\xc3\xa9\r\n"


async def record_usage(request: web.Request) -> web.Response:
    """The newer upstream's write: remembers exactly what reached it."""
    request.app[USAGE].append(
        {
            "raw_path": request.raw_path,
            "customer": request.match_info["customer"],
            "body": await request.read(),
            "headers": {k.lower(): v for k, v in request.headers.items()},
        }
    )
    return web.json_response(
        {"customerId": request.match_info["customer"], "recorded": len(request.app[USAGE])},
        status=201,
    )


async def usage_report(request: web.Request) -> web.Response:
    """The newer upstream's read: a CSV file, not JSON."""
    return web.Response(
        body=CSV,
        headers={
            "Content-Type": "text/csv; charset=utf-8",
            "Content-Disposition": 'attachment; filename="usage.csv"',
            "X-Upstream-Internal": "not passed",
        },
    )


@pytest.fixture
async def emulator_server(
    aiohttp_server: Callable[..., Awaitable[TestServer]], tenant: str
) -> TestServer:
    """conftest's emulator, with two operations the sidecar's table does not have."""
    app = create_emulator_app(api_keys=[API_KEY], default_tenant=tenant)
    app[USAGE] = []
    usage = "/tenants/{tenant}/customers/{customer:[^/]+}/usage"
    app.router.add_route("POST", usage, record_usage)
    app.router.add_route("GET", usage, usage_report)
    return await aiohttp_server(app)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def usage_log(server: TestServer) -> list[dict[str, Any]]:
    return server.app[USAGE]


def url(sc: Sidecar, raw_path: str) -> URL:
    """The sidecar's URL for a raw path, sent as it is (no normalising)."""
    return URL(str(sc.client.make_url("")).rstrip("/") + raw_path, encoded=True)


def samples(metrics: Metrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
        if s.name == name
    }


async def can(sc: Sidecar, customer: str, module: str) -> bool:
    resp = await sc.client.get(f"/v1/customers/{customer}/can/{module}")
    assert resp.status == 200
    return bool((await resp.json())["allowed"])


async def flag(sc: Sidecar, customer: str, name: str) -> bool:
    resp = await sc.client.get(f"/v1/customers/{customer}/flags/{name}")
    assert resp.status == 200
    return bool((await resp.json())["value"])


async def cache_source(sc: Sidecar, customer: str) -> str:
    resp = await sc.client.get(f"/v1/customers/{customer}/entitlements")
    assert resp.status == 200
    return resp.headers["X-Sidecar-Cache"]


# -- forwarded by default ------------------------------------------------------------------


async def test_an_unknown_operation_is_forwarded_with_the_sidecars_key(
    make_sidecar: SidecarFactory,
    emulator: Emulator,
    emulator_server: TestServer,
    tenant: str,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.proxy")
    sc = await make_sidecar(None)
    body = b"events=3\nsource=\xff binary\n"
    headers = {
        "x-api-key": CALLER_KEY,
        "Authorization": "Bearer caller-token",
        "Cookie": "session=caller",
        "Content-Type": "application/x-www-form-urlencoded",
        "Idempotency-Key": "usage-1",
        "X-Custom": "not forwarded",
    }
    path = f"/tenants/{tenant}/customers/cus%3F1/usage?source=app&source=web"
    async with session.post(url(sc, path), data=body, headers=headers) as resp:
        assert resp.status == 201
        assert await resp.json() == {"customerId": "cus?1", "recorded": 1}
    (seen,) = usage_log(emulator_server)
    assert seen["raw_path"] == f"/tenants/{tenant}/customers/cus%3F1/usage?source=app&source=web"
    assert seen["customer"] == "cus?1", "the id stayed one segment"
    assert seen["body"] == body, "the body's bytes, as they came"
    assert seen["headers"]["x-api-key"] == API_KEY, "the sidecar's key, never the caller's"
    assert seen["headers"]["content-type"] == "application/x-www-form-urlencoded"
    assert seen["headers"]["idempotency-key"] == "usage-1"
    for name in ("authorization", "cookie", "x-custom"):
        assert name not in seen["headers"], name
    (logged,) = emulator.requests
    assert (logged.operation, logged.api_key) == ("unknown", API_KEY)

    async with session.get(url(sc, f"/tenants/{tenant}/customers/cus%3F1/usage")) as resp:
        assert resp.status == 200
        assert await resp.read() == CSV, "a body that is not JSON comes back byte for byte"
        assert resp.headers["Content-Type"] == "text/csv; charset=utf-8"
        assert resp.headers["Content-Disposition"] == 'attachment; filename="usage.csv"'
        assert "X-Upstream-Internal" not in resp.headers

    counted = samples(sc.metrics, "vellum_sidecar_forwarded_unknown_total")
    shape = "/customers/{customer}/usage"
    assert counted == {
        (("method", "POST"), ("shape", shape)): 1.0,
        (("method", "GET"), ("shape", shape)): 1.0,
    }
    lines = [r for r in caplog.records if r.getMessage() == "forwarded_unknown"]
    fields = [r.fields for r in lines]  # type: ignore[attr-defined]
    assert [(f["method"], f["shape"], f["status"], f["outcome"]) for f in fields] == [
        ("POST", shape, 201, "ok"),
        ("GET", shape, 200, "ok"),
    ]
    formatted = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    for private in ("cus?1", "cus%3F1", CALLER_KEY, API_KEY, "caller-token"):
        assert private not in formatted, private


async def test_a_known_path_with_a_new_method_is_forwarded_too(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    """The operation is the method and the path: PUT on the entitlements is not the read."""
    sc = await make_sidecar(None)
    resp = await sc.client.put(f"/tenants/{tenant}/customers/c1/entitlements", data=b"{}")
    assert resp.status == 405, "the upstream's own answer"
    assert (await resp.json())["error"]["code"] == "method_not_allowed"
    assert emulator.count("unknown") == 1
    assert emulator.count("get_entitlements") == 0


async def test_unknown_writes_drop_the_customer_on_every_sidecar(
    make_sidecar: SidecarFactory,
    emulator: Emulator,
    emulator_server: TestServer,
    tenant: str,
    redis_url: str,
) -> None:
    emulator.set_entitlements(tenant, "cus", {"status": "active", "modules": ["api"]})
    emulator.set_entitlements(tenant, "other", {"status": "active", "modules": ["api"]})
    a = await make_sidecar(redis_url)
    b = await make_sidecar(redis_url)
    emulator.set_flag(tenant, "beta", False)
    for sc in (a, b):
        assert not await can(sc, "cus", "sso")
        assert not await flag(sc, "cus", "beta")
        await cache_source(sc, "other")
    # The upstream changes with no push (this emulator has no webhook URL): the
    # sidecars keep their cached answer until something drops it.
    emulator.set_entitlements(tenant, "cus", {"status": "active", "modules": ["api", "sso"]})
    emulator.set_flag(tenant, "beta", True, customer_id="cus")
    usage = f"/tenants/{tenant}/customers/cus/usage"
    assert (await a.client.get(usage)).status == 200
    assert not await can(a, "cus", "sso"), "a read drops nothing"
    refused = await a.client.post(f"/tenants/{tenant}/customers/cus/no-such-thing", data=b"x")
    assert refused.status == 404, "the upstream refused it"
    assert not await can(a, "cus", "sso"), "a refused write drops nothing"

    assert not await flag(a, "cus", "beta"), "still cached"
    assert (await a.client.post(usage, data=b"events=1")).status == 201
    assert await can(a, "cus", "sso"), "read-your-write on the sidecar that forwarded it"
    # The sidecar cannot know what an unknown write changed: it drops flags too.
    assert await flag(a, "cus", "beta")

    async def b_sees_it() -> bool:
        return await can(b, "cus", "sso") and await flag(b, "cus", "beta")

    await eventually(b_sees_it, timeout=5)
    assert await cache_source(a, "other") == "hit", "only that customer was dropped"
    assert await cache_source(b, "other") == "hit"
    assert len(usage_log(emulator_server)) == 1


async def test_unknown_reads_are_retried_and_writes_sent_once(
    make_sidecar: SidecarFactory, emulator: Emulator, emulator_server: TestServer, tenant: str
) -> None:
    sc = await make_sidecar(None)
    usage = f"/tenants/{tenant}/customers/cus/usage"
    emulator.fail(None, 503, times=2)
    read = await sc.client.get(usage)
    assert read.status == 200
    assert await read.read() == CSV
    assert emulator.count("unknown") == 3
    emulator.fail(None, 503, times=1)
    write = await sc.client.post(usage, data=b"events=1", headers={"Idempotency-Key": "k1"})
    assert write.status == 503, "the upstream's answer, as it is"
    assert (await write.json())["error"]["code"] == "injected_fault"
    assert emulator.count("unknown") == 4, "a write of an unknown operation is never retried"
    assert usage_log(emulator_server) == []


async def test_unknown_operations_answer_the_sidecars_own_failures(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    wrong = await make_sidecar(None, VELLUM_API_KEY="revoked_" + "r" * 24)
    resp = await wrong.client.post(f"/tenants/{tenant}/customers/cus/usage", data=b"x")
    assert resp.status == 502
    assert (await resp.json())["error"]["code"] == "upstream_auth_failed"
    slow = await make_sidecar(None, SIDECAR_UPSTREAM_TIMEOUT="0.3")
    emulator.delay(None, 0.8, times=1)
    resp = await slow.client.post(f"/tenants/{tenant}/customers/cus/usage", data=b"x")
    assert resp.status == 504
    error = (await resp.json())["error"]
    assert error["code"] == "upstream_timeout"
    assert "may or may not have been applied" in error["message"]
    assert emulator.count("unknown") == 2, "sent once, never retried"


# -- path safety -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "forwarded"),
    [
        ("/customers/...%2E/usage", "/customers/%2E%2E%2E%2E/usage"),
        ("/customers/..a/usage", "/customers/..a/usage"),
        ("/customers/%252F/usage", "/customers/%252F/usage"),
        ("/customers/a%3Fb%3D1%23c/usage", "/customers/a%3Fb%3D1%23c/usage"),
        ("/customers/%C3%BC%20x/usage", "/customers/%C3%BC%20x/usage"),
        ("/customers/%FF%FE/usage", "/customers/%FF%FE/usage"),
        ("/customers/a+b~c/usage", "/customers/a%2Bb~c/usage"),
    ],
)
async def test_unknown_paths_stay_inside_the_tenant_one_segment_each(
    make_sidecar: SidecarFactory,
    emulator: Emulator,
    tenant: str,
    session: aiohttp.ClientSession,
    raw: str,
    forwarded: str,
) -> None:
    emulator.create_account(tenant, "canary")
    sc = await make_sidecar(None)
    async with session.post(
        url(sc, f"/tenants/{tenant}{raw}"), data=b"x", headers={"x-api-key": CALLER_KEY}
    ) as resp:
        assert resp.status in (201, 404), await resp.text()
    (seen,) = emulator.requests
    assert seen.path == f"/tenants/{tenant}{forwarded}"
    assert seen.api_key == API_KEY
    assert emulator.create_customer(tenant, "canary", "still-here")["accountId"] == "canary"


@pytest.mark.parametrize(
    ("method", "raw", "status", "code"),
    [
        ("GET", "/tenants/someone-else/customers/c/usage", 404, "unknown_tenant"),
        ("POST", "/tenants/%2E%2E/customers/c/usage", 400, "invalid_id"),
        ("GET", "/tenants/{t}/customers/../usage", 400, "invalid_id"),
        ("GET", "/tenants/{t}/customers/%2e%2e/usage", 400, "invalid_id"),
        ("POST", "/tenants/{t}/x/../../_emulator/reset", 400, "invalid_id"),
        ("POST", "/tenants/{t}/customers/..%2F..%2F_emulator%2Freset/usage", 400, "invalid_id"),
        ("GET", "/tenants/{t}/customers/a%5Cb/usage", 400, "invalid_id"),
        ("GET", "/tenants/{t}/customers/a%09b/usage", 400, "invalid_id"),
        ("GET", "/tenants/{t}/%2e%2e/other/customers/victim/entitlements", 400, "invalid_id"),
        ("GET", "/tenants/{t}/", 404, "unknown_operation"),
        ("GET", "/tenants/{t}/customers//usage", 400, "invalid_id"),
        ("POST", "/tenants/{t}/customers/c/usage/", 400, "invalid_id"),
        ("GET", "/tenants/{t}/customers/" + "x" * 513 + "/usage", 400, "invalid_id"),
    ],
)
async def test_unknown_paths_the_sidecar_refuses(
    make_sidecar: SidecarFactory,
    emulator: Emulator,
    tenant: str,
    session: aiohttp.ClientSession,
    method: str,
    raw: str,
    status: int,
    code: str,
) -> None:
    sc = await make_sidecar(None)
    async with session.request(method, url(sc, raw.replace("{t}", tenant))) as resp:
        assert resp.status == status
        assert (await resp.json())["error"]["code"] == code
    assert emulator.count() == 0


async def test_a_body_over_a_mebibyte_is_413(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    sc = await make_sidecar(None)
    resp = await sc.client.post(
        f"/tenants/{tenant}/customers/c/usage", data=io.BytesIO(b"x" * (1 << 21))
    )
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "payload_too_large"
    assert emulator.count() == 0


# -- turned off ------------------------------------------------------------------------------


async def test_forwarding_off_refuses_every_unknown_operation(
    make_sidecar: SidecarFactory, emulator: Emulator, emulator_server: TestServer, tenant: str
) -> None:
    sc = await make_sidecar(None, SIDECAR_FORWARD_UNKNOWN="false")
    for method in ("GET", "POST", "DELETE"):
        resp = await sc.client.request(method, f"/tenants/{tenant}/customers/c_4711/usage")
        assert resp.status == 404
        error = (await resp.json())["error"]
        assert error["code"] == "unknown_operation"
        assert "/customers/{customer}/usage" in error["message"]
        assert "c_4711" not in error["message"]
    known_path = await sc.client.put(f"/tenants/{tenant}/customers/cus/entitlements")
    assert known_path.status == 405
    assert known_path.headers["Allow"] == "GET,HEAD"
    assert (await sc.client.get(f"/tenants/{tenant}/customers/cus/flags")).status == 200
    assert emulator.count("unknown") == 0 and usage_log(emulator_server) == []
    assert samples(sc.metrics, "vellum_sidecar_forwarded_unknown_total") == {}


# -- the pure pieces -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("segments", "shape"),
    [
        (["customers", "cus_1", "usage"], "/customers/{customer}/usage"),
        (["customers", "usage", "usage"], "/customers/{customer}/usage"),
        (["accounts", "acme", "notes", "n_1"], "/accounts/{account}/notes/{id}"),
        (["accounts", "acme", "notes", "ABC"], "/accounts/{account}/notes/{id}"),
        (["credit-types", "exports", "rates"], "/credit-types/{credit_type}/rates"),
        (["reports", "2024-05"], "/reports/{id}"),
        (["x"] * 12, "/x/x/x/x/x/x/x/x/*"),
    ],
)
def test_path_shape_replaces_ids(segments: list[str], shape: str) -> None:
    assert path_shape(segments) == shape


def test_every_known_operation_has_the_shape_of_its_path() -> None:
    for op in OPERATIONS:
        concrete = op.segments({name: f"Id_{name}" for name in op.params})
        assert op.matches(concrete)
        assert path_shape(concrete) == op.path, op.name


def test_the_metric_keeps_a_bounded_number_of_label_values() -> None:
    metrics = Metrics()
    for i in range(MAX_UNKNOWN_SHAPES + 20):
        metrics.count_unknown("GET", f"/things/{'a' * (i % 30 + 1)}{'b' * (i // 30)}")
    metrics.count_unknown("BREW", "/coffee")
    counted = samples(metrics, "vellum_sidecar_forwarded_unknown_total")
    shapes = {dict(labels)["shape"] for labels in counted}
    assert len(shapes) == MAX_UNKNOWN_SHAPES + 1
    assert counted[(("method", "GET"), ("shape", "other"))] == 20
    assert counted[(("method", "OTHER"), ("shape", "other"))] == 1
