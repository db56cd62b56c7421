"""The local read API against the emulator, with and without a real Redis."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.emulator import Emulator

from .conftest import SidecarFactory

DOC = {"status": "active", "modules": ["reports", "exports"], "config": {"seats": 5}}


@pytest.fixture(params=["memory", "redis"])
def mode(request: pytest.FixtureRequest, redis_url: str) -> str | None:
    return None if request.param == "memory" else redis_url


async def test_miss_then_hit_one_upstream_call(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str, mode: str | None
) -> None:
    emulator.set_entitlements(tenant, "cus_1", {**DOC, "extra": {"kept": True}})
    sc = await make_sidecar(mode)
    first = await sc.client.get("/v1/customers/cus_1/entitlements")
    assert first.status == 200
    assert first.headers["X-Sidecar-Cache"] == "miss"
    assert first.headers["Age"] == "0"
    body = await first.json()
    assert body["found"] is True
    assert body["modules"] == ["reports", "exports"]
    assert body["config"] == {"seats": 5}
    assert body["extra"] == {"kept": True}, "unknown fields pass through"
    second = await sc.client.get("/v1/customers/cus_1/entitlements")
    assert second.headers["X-Sidecar-Cache"] == "hit"
    assert await second.json() == body
    assert emulator.count("get_entitlements", tenant) == 1


async def test_can_allowed_and_denied(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str, mode: str | None
) -> None:
    emulator.set_entitlements(tenant, "cus_1", DOC)
    sc = await make_sidecar(mode)
    yes = await sc.client.get("/v1/customers/cus_1/can/reports")
    assert yes.status == 200
    assert await yes.json() == {
        "allowed": True,
        "customerId": "cus_1",
        "module": "reports",
        "status": "active",
    }
    no = await sc.client.get("/v1/customers/cus_1/can/billing")
    assert (await no.json())["allowed"] is False
    assert no.headers["X-Sidecar-Cache"] == "hit"
    assert emulator.count("get_entitlements", tenant) == 1


async def test_unknown_customer_is_found_false_and_cached(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str, mode: str | None
) -> None:
    sc = await make_sidecar(mode)
    for expected in ("miss", "hit"):
        resp = await sc.client.get("/v1/customers/nobody/entitlements")
        assert resp.status == 200
        assert resp.headers["X-Sidecar-Cache"] == expected
        assert await resp.json() == {"found": False, "status": None, "modules": [], "config": {}}
    can = await sc.client.get("/v1/customers/nobody/can/reports")
    assert await can.json() == {
        "allowed": False,
        "customerId": "nobody",
        "module": "reports",
        "status": None,
    }
    assert emulator.count("get_entitlements", tenant) == 1


async def test_negative_entries_expire_sooner(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    sc = await make_sidecar(None, SIDECAR_NEGATIVE_TTL="0")
    await sc.client.get("/v1/customers/later/entitlements")
    emulator.set_entitlements(tenant, "later", DOC)
    resp = await sc.client.get("/v1/customers/later/entitlements")
    assert resp.headers["X-Sidecar-Cache"] == "miss"
    assert (await resp.json())["found"] is True
    assert emulator.count("get_entitlements", tenant) == 2


async def test_200_concurrent_misses_make_one_upstream_call(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str, mode: str | None
) -> None:
    emulator.set_entitlements(tenant, "cus_hot", DOC)
    emulator.delay("get_entitlements", 0.2)
    sc = await make_sidecar(mode)
    responses = await asyncio.gather(
        *(sc.client.get("/v1/customers/cus_hot/can/reports") for _ in range(200))
    )
    bodies = [await r.json() for r in responses]
    assert all(r.status == 200 for r in responses)
    assert all(b["allowed"] is True for b in bodies)
    assert emulator.count("get_entitlements", tenant) == 1


async def test_two_sidecars_sharing_redis_make_one_upstream_call(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str, redis_url: str
) -> None:
    emulator.set_entitlements(tenant, "cus_1", DOC)
    a = await make_sidecar(redis_url)
    b = await make_sidecar(redis_url)
    assert (await a.client.get("/v1/customers/cus_1/entitlements")).headers[
        "X-Sidecar-Cache"
    ] == "miss"
    from_b = await b.client.get("/v1/customers/cus_1/entitlements")
    assert from_b.headers["X-Sidecar-Cache"] == "hit"
    assert (await from_b.json())["modules"] == ["reports", "exports"]
    assert emulator.count("get_entitlements", tenant) == 1


async def test_concurrent_misses_on_three_sidecars_make_one_upstream_call(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str, redis_url: str
) -> None:
    emulator.set_entitlements(tenant, "cus_1", DOC)
    emulator.delay("get_entitlements", 0.3)
    sidecars = [await make_sidecar(redis_url) for _ in range(3)]
    responses = await asyncio.gather(
        *(sc.client.get("/v1/customers/cus_1/can/exports") for sc in sidecars for _ in range(20))
    )
    bodies = [await r.json() for r in responses]
    assert [b["allowed"] for b in bodies] == [True] * 60
    assert emulator.count("get_entitlements", tenant) == 1


async def test_batch_check_in_order_one_fetch_per_customer(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str, mode: str | None
) -> None:
    emulator.set_entitlements(tenant, "a", {"status": "active", "modules": ["x"]})
    emulator.set_entitlements(tenant, "b", {"status": "trialing", "modules": ["y"]})
    sc = await make_sidecar(mode)
    checks = [{"customerId": c, "module": m} for c in ("a", "b", "ghost") for m in ("x", "y")] * 50
    resp = await sc.client.post("/v1/check", json={"checks": checks})
    assert resp.status == 200
    results = (await resp.json())["results"]
    assert len(results) == len(checks) == 300
    expected = {("a", "x"): True, ("a", "y"): False, ("b", "x"): False, ("b", "y"): True}
    for check, result in zip(checks, results, strict=True):
        assert result["customerId"] == check["customerId"]
        assert result["module"] == check["module"]
        assert result["allowed"] is expected.get((check["customerId"], check["module"]), False)
    assert emulator.count("get_entitlements", tenant) == 3


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"", "invalid_json"),
        (b"{not json", "invalid_json"),
        (b"\xff\xfe", "invalid_json"),
        (b"[]", "invalid_body"),
        (b'{"checks": {}}', "invalid_body"),
        (b'{"checks": [1]}', "invalid_body"),
        (b'{"checks": [{"customerId": "a"}]}', "invalid_body"),
        (b'{"checks": [{"customerId": "", "module": "m"}]}', "invalid_body"),
        (b'{"checks": [{"customerId": 5, "module": "m"}]}', "invalid_body"),
    ],
)
async def test_batch_check_rejects_bad_bodies(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str, body: bytes, code: str
) -> None:
    sc = await make_sidecar(None)
    resp = await sc.client.post("/v1/check", data=body)
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == code
    assert emulator.count("get_entitlements", tenant) == 0


async def test_batch_check_limit(make_sidecar: SidecarFactory) -> None:
    sc = await make_sidecar(None)
    checks = [{"customerId": f"c{i}", "module": "m"} for i in range(1001)]
    resp = await sc.client.post("/v1/check", json={"checks": checks})
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "batch_too_large"


async def test_drop_one_customer(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str, mode: str | None
) -> None:
    emulator.set_entitlements(tenant, "cus_1", DOC)
    emulator.set_entitlements(tenant, "cus_2", DOC)
    sc = await make_sidecar(mode)
    await sc.client.get("/v1/customers/cus_1/entitlements")
    await sc.client.get("/v1/customers/cus_2/entitlements")
    emulator.set_entitlements(tenant, "cus_1", {"status": "canceled", "modules": []})
    resp = await sc.client.delete("/v1/customers/cus_1/cache")
    assert resp.status == 204
    again = await sc.client.get("/v1/customers/cus_1/can/reports")
    assert again.headers["X-Sidecar-Cache"] == "miss"
    assert (await again.json())["allowed"] is False
    other = await sc.client.get("/v1/customers/cus_2/entitlements")
    assert other.headers["X-Sidecar-Cache"] == "hit"


async def test_drop_all(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str, mode: str | None
) -> None:
    for c in ("cus_1", "cus_2"):
        emulator.set_entitlements(tenant, c, DOC)
    sc = await make_sidecar(mode)
    for c in ("cus_1", "cus_2"):
        await sc.client.get(f"/v1/customers/{c}/entitlements")
    assert (await sc.client.delete("/v1/cache")).status == 204
    for c in ("cus_1", "cus_2"):
        resp = await sc.client.get(f"/v1/customers/{c}/entitlements")
        assert resp.headers["X-Sidecar-Cache"] == "miss"
    assert emulator.count("get_entitlements", tenant) == 4


async def test_drop_reaches_the_other_sidecar(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str, redis_url: str
) -> None:
    emulator.set_entitlements(tenant, "cus_1", DOC)
    a = await make_sidecar(redis_url)
    b = await make_sidecar(redis_url)
    await a.client.get("/v1/customers/cus_1/entitlements")
    await b.client.get("/v1/customers/cus_1/entitlements")
    emulator.set_entitlements(tenant, "cus_1", {"status": "active", "modules": ["new"]})
    assert (await a.client.delete("/v1/customers/cus_1/cache")).status == 204

    async def b_sees_new() -> bool:
        resp = await b.client.get("/v1/customers/cus_1/can/new")
        return bool((await resp.json())["allowed"])

    from .conftest import eventually

    await eventually(b_sees_new, timeout=5)


async def test_ids_with_odd_characters_round_trip(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    odd = "cus 1?ü%..#"
    emulator.set_entitlements(tenant, odd, DOC)
    sc = await make_sidecar(None)
    from urllib.parse import quote

    resp = await sc.client.get(f"/v1/customers/{quote(odd, safe='')}/can/reports")
    assert resp.status == 200
    body = await resp.json()
    assert body["customerId"] == odd
    assert body["allowed"] is True


async def test_mirror_entitlements_reads_through_cache(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    emulator.set_entitlements(tenant, "cus_1", DOC)
    sc = await make_sidecar(None)
    path = f"/tenants/{tenant}/customers/cus_1/entitlements"
    first = await sc.client.get(path, headers={"x-api-key": "callers-own-key"})
    assert first.status == 200
    body = await first.json()
    assert "found" not in body
    assert body["modules"] == DOC["modules"]
    second = await sc.client.get(path)
    assert second.headers["X-Sidecar-Cache"] == "hit"
    missing = await sc.client.get(f"/tenants/{tenant}/customers/ghost/entitlements")
    assert missing.status == 404
    other = await sc.client.get("/tenants/someone-else/customers/cus_1/entitlements")
    assert other.status == 404
    assert emulator.count("get_entitlements", tenant) == 2
    assert {r.api_key for r in emulator.requests} == {emulator_key()}


def emulator_key() -> str:
    from .harness import API_KEY

    return API_KEY


async def test_upstream_down_and_nothing_cached_is_503(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    emulator.fail("get_entitlements", 500, None)
    sc = await make_sidecar(None, SIDECAR_UPSTREAM_TIMEOUT="0.5")
    resp = await sc.client.get("/v1/customers/cus_1/entitlements")
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "upstream_unavailable"
    can = await sc.client.get("/v1/customers/cus_1/can/reports")
    assert can.status == 503
    body = await can.json()
    assert body["allowed"] is False
    assert body["error"]["code"] == "upstream_unavailable"


async def test_stale_entry_served_when_upstream_fails(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str, mode: str | None
) -> None:
    emulator.set_entitlements(tenant, "cus_1", DOC)
    sc = await make_sidecar(mode, SIDECAR_CACHE_TTL="0.05", SIDECAR_UPSTREAM_TIMEOUT="0.5")
    await sc.client.get("/v1/customers/cus_1/entitlements")
    emulator.fail("get_entitlements", 503, None)

    async def stale() -> bool:
        resp = await sc.client.get("/v1/customers/cus_1/can/reports")
        return resp.headers["X-Sidecar-Cache"] == "stale" and (await resp.json())["allowed"]

    from .conftest import eventually

    await eventually(stale, timeout=5)


async def test_unknown_routes_and_methods_are_json(make_sidecar: SidecarFactory) -> None:
    sc = await make_sidecar(None)
    resp = await sc.client.get("/nope")
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "not_found"
    resp = await sc.client.put("/v1/check")
    assert resp.status == 405
    assert (await resp.json())["error"]["code"] == "method_not_allowed"


async def test_overlong_id_is_400(make_sidecar: SidecarFactory) -> None:
    sc = await make_sidecar(None)
    resp = await sc.client.get("/v1/customers/" + "x" * 600 + "/entitlements")
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "invalid_id"


async def test_openapi_lists_the_routes(make_sidecar: SidecarFactory) -> None:
    sc = await make_sidecar(None)
    resp = await sc.client.get("/openapi.json")
    assert resp.status == 200
    doc = await resp.json()
    assert doc["openapi"].startswith("3.1")
    routes = {(method.upper(), path) for path, item in doc["paths"].items() for method in item}
    for route in sc.app.router.routes():
        info = route.resource.canonical if route.resource else None
        if route.method == "HEAD" or info is None:
            continue
        if route.resource is not None and route.resource.name == "unmatched":
            # The last catch-all: the JSON 404/405 for paths no route serves.
            assert (route.method, info) == ("*", "/{path}")
            continue
        if route.method == "*":
            # The mirror's catch-all for unknown operations spans any number of segments,
            # which no OpenAPI path template can; the document's description names it.
            assert info == "/tenants/{tenant}/{path}"
            assert "SIDECAR_FORWARD_UNKNOWN" in doc["info"]["description"]
            continue
        assert (route.method, info) in routes, f"{route.method} {info} missing from openapi.json"


async def test_ids_with_braces_work_on_every_route(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    from urllib.parse import quote

    odd = "cus_{1}"
    emulator.set_entitlements(tenant, odd, DOC)
    sc = await make_sidecar(None)
    c = quote(odd, safe="")
    for path in (f"/v1/customers/{c}/entitlements", f"/v1/customers/{c}/can/reports"):
        resp = await sc.client.get(path)
        assert resp.status == 200, path
    assert (await sc.client.get(f"/v1/customers/{c}/can/%7Bm%7D")).status == 200
    assert (await sc.client.delete(f"/v1/customers/{c}/cache")).status == 204
    empty = await sc.client.get("/v1/customers/%20/can/")
    assert empty.status == 400
    assert (await empty.json())["error"]["code"] == "invalid_id"


async def test_head_on_cached_reads(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    emulator.set_entitlements(tenant, "cus_1", DOC)
    sc = await make_sidecar(None)
    for path in (
        "/v1/customers/cus_1/entitlements",
        f"/tenants/{tenant}/customers/cus_1/entitlements",
        "/v1/customers/cus_1/can/reports",
    ):
        resp = await sc.client.head(path)
        assert resp.status == 200, path
        assert resp.headers["X-Sidecar-Cache"] in ("miss", "hit")
        assert await resp.read() == b""
    assert emulator.count("get_entitlements", tenant) == 1
