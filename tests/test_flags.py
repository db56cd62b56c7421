"""Flags, the second cached axis: the routes, the cache's behaviour for every kind,
drops narrowed by axis, pushes classified by type, and the Vellum SDK's flag reads
through the mirror."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import orjson
import pytest
from vellumcharter import VellumCharterClient

from sidecar.cache.entry import Entry
from sidecar.cache.kinds import FLAGS, GLOBAL_FLAGS
from sidecar.emulator import Emulator
from sidecar.errors import UpstreamUnavailable
from sidecar.http.webhooks import classify
from sidecar.signature import sign

from .conftest import Sidecar, SidecarFactory, eventually
from .harness import WEBHOOK_SECRET, free_port

DOC = {"status": "active", "modules": ["reports"], "config": {}}
GLOBALS = {"beta": False, "dark-mode": True}


@pytest.fixture(params=["memory", "redis"])
def mode(request: pytest.FixtureRequest, redis_url: str) -> str | None:
    return None if request.param == "memory" else redis_url


@pytest.fixture
def flagged(emulator: Emulator, tenant: str) -> Emulator:
    """Two global flags, cus_1 overriding beta, and entitlements for cus_1."""
    for name, value in GLOBALS.items():
        emulator.set_flag(tenant, name, value)
    emulator.set_flag(tenant, "beta", True, customer_id="cus_1")
    emulator.set_entitlements(tenant, "cus_1", DOC)
    return emulator


async def get(sc: Sidecar, path: str) -> tuple[int, str | None, Any]:
    resp = await sc.client.get(path)
    return resp.status, resp.headers.get("X-Sidecar-Cache"), await resp.json()


def event(tenant: str, type_: str, **fields: Any) -> dict[str, Any]:
    event_id = "evt_" + uuid.uuid4().hex
    return {"eventId": event_id, "id": event_id, "type": type_, "tenantId": tenant, **fields}


async def push(sc: Sidecar, payload: dict[str, Any]) -> int:
    assert sc.webhooks is not None
    body = orjson.dumps(payload)
    headers = {
        "Content-Type": "application/json",
        "X-Vellum-Signature": sign(WEBHOOK_SECRET, body, int(time.time())),
    }
    resp = await sc.webhooks.post("/webhooks/vellum", data=body, headers=headers)
    return resp.status


# -- the routes -------------------------------------------------------------------------


async def test_customer_flags_miss_then_hit_one_upstream_call(
    make_sidecar: SidecarFactory, flagged: Emulator, tenant: str, mode: str | None
) -> None:
    sc = await make_sidecar(mode)
    assert await get(sc, "/v1/customers/cus_1/flags") == (
        200,
        "miss",
        {"flags": {"beta": True, "dark-mode": True}},
    )
    assert await get(sc, "/v1/customers/cus_1/flags") == (
        200,
        "hit",
        {"flags": {"beta": True, "dark-mode": True}},
    )
    # A customer without overrides gets the globals, cached on its own.
    assert (await get(sc, "/v1/customers/cus_2/flags"))[2] == {"flags": GLOBALS}
    assert flagged.count("flags", tenant) == 2
    assert flagged.count("get_entitlements", tenant) == 0, "a separate axis"


async def test_global_flags_cached(
    make_sidecar: SidecarFactory, flagged: Emulator, tenant: str, mode: str | None
) -> None:
    sc = await make_sidecar(mode)
    assert await get(sc, "/v1/flags") == (200, "miss", {"flags": GLOBALS})
    assert await get(sc, "/v1/flags") == (200, "hit", {"flags": GLOBALS})
    assert flagged.count("global_flags", tenant) == 1


async def test_one_flag_with_and_without_default(
    make_sidecar: SidecarFactory, flagged: Emulator, tenant: str
) -> None:
    sc = await make_sidecar(None)
    base = "/v1/customers/cus_1/flags"
    assert await get(sc, f"{base}/beta") == (
        200,
        "miss",
        {"flag": "beta", "customerId": "cus_1", "value": True},
    )
    assert await get(sc, f"{base}/dark-mode?default=false") == (
        200,
        "hit",
        {"flag": "dark-mode", "customerId": "cus_1", "value": True},
    )
    assert await get(sc, f"{base}/nope?default=true") == (
        200,
        "hit",
        {"flag": "nope", "customerId": "cus_1", "value": True, "fallback": True},
    )
    status, source, body = await get(sc, f"{base}/nope")
    assert (status, source, body["error"]["code"]) == (404, "hit", "flag_not_found")
    assert (body["flag"], body["customerId"]) == ("nope", "cus_1")
    for bad in ("yes", "1", "", "true&default=false"):
        status, _, body = await get(sc, f"{base}/beta?default={bad}")
        assert (status, body["error"]["code"]) == (400, "invalid_query"), bad
    assert flagged.count("flags", tenant) == 1


async def test_no_answer_gives_the_default_or_503(
    make_sidecar: SidecarFactory, tenant: str
) -> None:
    sc = await make_sidecar(
        None, VELLUM_BASE_URL=f"http://127.0.0.1:{free_port()}", SIDECAR_UPSTREAM_TIMEOUT="0.5"
    )
    status, source, body = await get(sc, "/v1/customers/cus_1/flags/beta?default=false")
    assert (status, source) == (200, None)
    assert body == {"flag": "beta", "customerId": "cus_1", "value": False, "fallback": True}
    status, _, body = await get(sc, "/v1/customers/cus_1/flags/beta")
    assert (status, body["error"]["code"], body["value"]) == (503, "upstream_unavailable", None)
    status, _, body = await get(sc, "/v1/customers/cus_1/flags")
    assert (status, body["error"]["code"]) == (503, "upstream_unavailable")
    status, _, body = await get(sc, "/v1/flags")
    assert (status, body["error"]["code"]) == (503, "upstream_unavailable")


async def test_the_mirror_reads_flags_from_the_cache(
    make_sidecar: SidecarFactory, flagged: Emulator, tenant: str, redis_url: str
) -> None:
    a = await make_sidecar(redis_url)
    b = await make_sidecar(redis_url)
    headers = {"x-api-key": "ignored"}
    first = await a.client.get(f"/tenants/{tenant}/customers/cus_1/flags", headers=headers)
    second = await b.client.get(f"/tenants/{tenant}/customers/cus_1/flags", headers=headers)
    assert (first.headers["X-Sidecar-Cache"], second.headers["X-Sidecar-Cache"]) == (
        "miss",
        "hit",
    )
    assert await second.json() == {"flags": {"beta": True, "dark-mode": True}}
    glob = await b.client.get(f"/tenants/{tenant}/flags")
    assert (glob.status, await glob.json()) == (200, {"flags": GLOBALS})
    head = await b.client.head(f"/tenants/{tenant}/flags")
    assert (head.status, head.headers["X-Sidecar-Cache"]) == (200, "hit")
    other = await b.client.get("/tenants/someone-else/flags")
    assert other.status == 404
    assert flagged.count("flags", tenant) == 1
    assert flagged.count("global_flags", tenant) == 1


async def test_the_real_sdk_reads_flags_through_the_mirror_from_the_cache(
    make_sidecar: SidecarFactory, flagged: Emulator, tenant: str
) -> None:
    """``vellumcharter`` 1.4.2, unmodified, its own flag cache off: every read reaches
    the sidecar, and the sidecar asks the upstream once per document."""
    sc = await make_sidecar(None)
    sdk = VellumCharterClient(
        api_key="not-the-real-key",
        tenant_id=tenant,
        base_url=str(sc.client.make_url("")).rstrip("/"),
        cache_ttl_ms=0,
        flag_cache_ttl_ms=0,
    )

    def drive() -> None:  # the SDK blocks: it runs in a thread, the servers in this loop
        for _ in range(3):
            assert sdk.flags("cus_1") == {"beta": True, "dark-mode": True}
            assert sdk.flag("beta", "cus_1", default=False) is True
            assert sdk.flag("undefined", "cus_1", default=True) is True
            assert sdk.global_flags() == GLOBALS
        assert sdk.can("cus_1", "reports") is True

    await asyncio.to_thread(drive)
    assert flagged.count("flags", tenant) == 1
    assert flagged.count("global_flags", tenant) == 1


# -- the cache, for the flag kinds -------------------------------------------------------


async def test_flags_have_their_own_ttl(
    make_sidecar: SidecarFactory, flagged: Emulator, tenant: str, redis_url: str
) -> None:
    sc = await make_sidecar(redis_url, SIDECAR_FLAGS_TTL="0.3", SIDECAR_CACHE_TTL="300")
    await sc.client.get("/v1/customers/cus_1/flags")
    await sc.client.get("/v1/customers/cus_1/can/reports")
    flagged.set_flag(tenant, "dark-mode", False)

    async def flags_refetched() -> bool:
        return (await get(sc, "/v1/customers/cus_1/flags"))[2]["flags"]["dark-mode"] is False

    await eventually(flags_refetched, timeout=5)
    can = await sc.client.get("/v1/customers/cus_1/can/reports")
    assert can.headers["X-Sidecar-Cache"] == "hit"
    assert flagged.count("get_entitlements", tenant) == 1
    assert flagged.count("flags", tenant) >= 2


async def test_stale_flags_served_while_the_upstream_fails(
    make_sidecar: SidecarFactory, flagged: Emulator, tenant: str, redis_url: str
) -> None:
    sc = await make_sidecar(redis_url, SIDECAR_FLAGS_TTL="0.2", SIDECAR_MEMORY_TTL="0")
    assert (await get(sc, "/v1/customers/cus_1/flags/beta"))[:2] == (200, "miss")
    flagged.fail("flags", 503, times=None)

    async def stale() -> bool:
        status, source, body = await get(sc, "/v1/customers/cus_1/flags/beta")
        return (status, source, body["value"]) == (200, "stale", True)

    await eventually(stale, timeout=5)
    flagged.clear_faults()


async def test_concurrent_flag_misses_on_three_sidecars_make_one_upstream_call(
    make_sidecar: SidecarFactory, flagged: Emulator, tenant: str, redis_url: str
) -> None:
    flagged.delay("flags", 0.3)
    sidecars = [await make_sidecar(redis_url) for _ in range(3)]
    responses = await asyncio.gather(
        *(sc.client.get("/v1/customers/cus_1/flags/beta") for sc in sidecars for _ in range(20))
    )
    assert [(await r.json())["value"] for r in responses] == [True] * 60
    assert flagged.count("flags", tenant) == 1


async def test_a_flag_drop_during_a_fetch_wins(
    make_sidecar: SidecarFactory, flagged: Emulator, tenant: str, redis_url: str
) -> None:
    """The invalidation race, for flags: the answer fetched before the drop is handed
    to the caller waiting for it, and kept by neither layer."""
    a = await make_sidecar(redis_url)
    b = await make_sidecar(redis_url)
    hold = flagged.hold("flags")
    reading = asyncio.create_task(a.client.get("/v1/customers/cus_1/flags/beta"))
    await asyncio.wait_for(hold.arrived.wait(), 5)
    dropped = await b.client.delete("/v1/customers/cus_1/cache?axis=flags")
    assert dropped.status == 204
    hold.release()
    flagged.clear_faults()
    assert (await (await reading).json())["value"] is True
    flagged.set_flag(tenant, "beta", False, customer_id="cus_1")
    assert (await get(b, "/v1/customers/cus_1/flags/beta"))[1:] == (
        "miss",
        {"flag": "beta", "customerId": "cus_1", "value": False},
    )
    assert (await get(a, "/v1/customers/cus_1/flags/beta"))[1:] == (
        "hit",
        {"flag": "beta", "customerId": "cus_1", "value": False},
    )


async def test_lookups_are_labelled_by_kind(
    make_sidecar: SidecarFactory, flagged: Emulator, redis_url: str
) -> None:
    sc = await make_sidecar(redis_url)
    for path in ("/v1/customers/cus_1/flags", "/v1/flags", "/v1/customers/cus_1/can/reports"):
        await sc.client.get(path)
        await sc.client.get(path)
    value = sc.metrics.registry.get_sample_value
    for kind in ("flags", "global_flags", "entitlements"):
        labels = {"kind": kind, "layer": "upstream", "result": "fetch"}
        assert value("vellum_sidecar_cache_lookups_total", labels) == 1, kind
        labels = {"kind": kind, "layer": "memory", "result": "hit"}
        assert value("vellum_sidecar_cache_lookups_total", labels) == 1, kind
    assert value("vellum_sidecar_memory_entries") == 3
    assert value("vellum_sidecar_inflight_fetches") == 0


def test_a_flags_document_must_have_a_flags_object() -> None:
    for body in (b'{"beta": true}', b'{"flags": [1]}', b"[]"):
        with pytest.raises(UpstreamUnavailable):
            Entry.from_upstream(200, body, now=0, fresh_for=1, stale_for=1, kind=FLAGS)
    entry = Entry.from_upstream(
        200, b'{"flags": {"a": true, "b": "x"}}', now=0, fresh_for=1, stale_for=1, kind=FLAGS
    )
    assert (entry.flag("a"), entry.flag("b"), entry.flag("c")) == (True, None, None)
    stored = Entry.loads(entry.dumps(), GLOBAL_FLAGS)
    assert stored is not None and stored.kind is GLOBAL_FLAGS and stored.flag("a") is True


# -- drops by axis -----------------------------------------------------------------------


async def sources(sc: Sidecar) -> tuple[str | None, str | None, str | None]:
    """Where the next read of each document comes from: cus_1's entitlements, its
    flags, the global flags."""
    ent = (await get(sc, "/v1/customers/cus_1/entitlements"))[1]
    flags = (await get(sc, "/v1/customers/cus_1/flags"))[1]
    glob = (await get(sc, "/v1/flags"))[1]
    return ent, flags, glob


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v1/customers/cus_1/cache", ("miss", "miss", "hit")),
        ("/v1/customers/cus_1/cache?axis=flags", ("hit", "miss", "hit")),
        ("/v1/customers/cus_1/cache?axis=entitlements", ("miss", "hit", "hit")),
        ("/v1/cache", ("miss", "miss", "miss")),
        ("/v1/cache?axis=flags", ("hit", "miss", "miss")),
        ("/v1/cache?axis=entitlements", ("miss", "hit", "hit")),
    ],
)
async def test_drops_narrowed_by_axis(
    make_sidecar: SidecarFactory,
    flagged: Emulator,
    redis_url: str,
    path: str,
    expected: tuple[str, str, str],
) -> None:
    a = await make_sidecar(redis_url)
    b = await make_sidecar(redis_url)
    await sources(a)
    assert await sources(b) == ("hit", "hit", "hit")
    resp = await a.client.delete(path)
    assert resp.status == 204
    assert await sources(a) == expected
    # The other sidecar was told, and Redis lost the same entries: b reads what a
    # just stored, as a hit.
    assert await sources(b) == ("hit", "hit", "hit")


async def test_a_bad_axis_is_400(make_sidecar: SidecarFactory) -> None:
    sc = await make_sidecar(None)
    for path in (
        "/v1/cache?axis=billing",
        "/v1/cache?axis=flags&axis=entitlements",
        "/v1/customers/c/cache?axis=",
    ):
        resp = await sc.client.delete(path)
        assert (resp.status, (await resp.json())["error"]["code"]) == (400, "invalid_query")


def test_event_types_decide_the_axes() -> None:
    def axes_of(event_type: Any) -> frozenset[str]:
        return classify({"type": event_type, "customerId": "c"}).axes

    for flag in ("flags.updated", "flag.deleted", "flag_override.set", "FLAGS.changed"):
        assert axes_of(flag) == {"flags"}, flag
    for known in ("entitlements.updated", "payment.succeeded", "subscription.canceled"):
        assert axes_of(known) == {"entitlements"}, known
    for other in ("flagship.launched", "usage.recorded", None, 3, ""):
        assert axes_of(other) == {"entitlements", "flags"}, other


@pytest.mark.parametrize(
    ("type_", "named", "expected"),
    [
        ("flags.updated", True, ("hit", "miss", "hit")),
        ("flags.updated", False, ("hit", "miss", "miss")),
        ("entitlements.updated", True, ("miss", "hit", "hit")),
        ("something.new", True, ("miss", "miss", "hit")),
        ("something.new", False, ("miss", "miss", "miss")),
    ],
)
async def test_pushes_drop_the_axes_their_type_concerns(
    make_sidecar: SidecarFactory,
    flagged: Emulator,
    tenant: str,
    redis_url: str,
    type_: str,
    named: bool,
    expected: tuple[str, str, str],
) -> None:
    receiver = await make_sidecar(redis_url)
    other = await make_sidecar(redis_url)
    await sources(other)
    fields = {"customerId": "cus_1"} if named else {}
    assert await push(receiver, event(tenant, type_, **fields)) == 200

    async def applied() -> bool:
        return await sources(other) == expected

    await eventually(applied, timeout=5)


async def test_a_flag_change_in_the_emulator_reaches_every_sidecar(
    make_sidecar: SidecarFactory, flagged: Emulator, tenant: str, redis_url: str
) -> None:
    """The emulator pushes ``flags.updated`` to one sidecar; every sidecar sharing the
    Redis answers the new value at once, the entitlements untouched."""
    sidecars = [await make_sidecar(redis_url) for _ in range(3)]
    receiver = sidecars[0]
    assert receiver.webhooks is not None
    flagged.webhook_url = str(receiver.webhooks.make_url("/webhooks/vellum"))
    flagged.webhook_secret = WEBHOOK_SECRET
    for sc in sidecars:
        await sources(sc)
        assert (await get(sc, "/v1/customers/cus_1/flags/beta"))[2]["value"] is True
    _, delivered = await flagged.run(
        lambda: flagged.set_flag(tenant, "beta", False, customer_id="cus_1")
    )
    assert delivered is True
    for sc in sidecars:

        async def new_value(sc: Sidecar = sc) -> bool:
            return (await get(sc, "/v1/customers/cus_1/flags/beta"))[2]["value"] is False

        await eventually(new_value, timeout=5)
        ent = await sc.client.get("/v1/customers/cus_1/can/reports")
        assert ent.headers["X-Sidecar-Cache"] == "hit"
    # A global change names no customer: every customer's flags and the globals go.
    _, delivered = await flagged.run(lambda: flagged.set_flag(tenant, "dark-mode", False))
    assert delivered is True
    for sc in sidecars:

        async def global_value(sc: Sidecar = sc) -> bool:
            glob = (await get(sc, "/v1/flags"))[2]["flags"]["dark-mode"]
            mine = (await get(sc, "/v1/customers/cus_1/flags/dark-mode"))[2]["value"]
            return glob is False and mine is False

        await eventually(global_value, timeout=5)
    assert flagged.count("get_entitlements", tenant) == 1
