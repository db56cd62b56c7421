"""Push webhooks: verification, replay protection, scopes, fan-out, and the race."""

from __future__ import annotations

import asyncio
import io
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypedDict

import orjson
import pytest
import redis.asyncio as aredis
from aiohttp.test_utils import TestClient, TestServer

from sidecar.app import create_app
from sidecar.appkeys import LIFECYCLE, REDIS
from sidecar.config import Settings
from sidecar.emulator import EMULATOR, Emulator, create_emulator_app
from sidecar.http.webhooks import REPLAY_WINDOW, ReplayGuard, create_webhook_app
from sidecar.signature import sign, sign_many

from .conftest import Sidecar, SidecarFactory, eventually
from .harness import API_KEY, WEBHOOK_SECRET, free_port, sidecar_env

OLD = {"status": "active", "modules": ["reports"], "accountId": "acct_1"}
NEW = {"status": "active", "modules": ["reports", "exports"], "accountId": "acct_1"}


class Tampering(TypedDict, total=False):
    """What :func:`push` signs with instead of the right secret and the time now."""

    secret: str
    timestamp: int
    header: str


def event(tenant: str, **fields: Any) -> dict[str, Any]:
    return {"id": "evt_" + uuid.uuid4().hex, "type": "entitlements.updated", "tenantId": tenant,
            **fields}  # fmt: skip


async def push(
    sc: Sidecar,
    payload: dict[str, Any] | bytes,
    *,
    secret: str = WEBHOOK_SECRET,
    timestamp: int | None = None,
    header: str | None = None,
) -> tuple[int, Any]:
    assert sc.webhooks is not None
    body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    sig = header if header is not None else sign(secret, body, timestamp or int(time.time()))
    headers = {"Content-Type": "application/json"}
    if sig:
        headers["X-Vellum-Signature"] = sig
    data = io.BytesIO(body) if len(body) > 512 * 1024 else body
    resp = await sc.webhooks.post("/webhooks/vellum", data=data, headers=headers)
    return resp.status, await resp.json()


async def source_of(sc: Sidecar, customer: str, module: str = "exports") -> tuple[str, bool]:
    resp = await sc.client.get(f"/v1/customers/{customer}/can/{module}")
    return resp.headers["X-Sidecar-Cache"], bool((await resp.json())["allowed"])


def webhook_count(sc: Sidecar, result: str) -> float:
    value = sc.metrics.registry.get_sample_value(
        "vellum_sidecar_webhooks_total", {"result": result}
    )
    return value or 0.0


async def test_push_updates_another_sidecar(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str, redis_url: str
) -> None:
    emulator.set_entitlements(tenant, "cus_1", OLD)
    receiver = await make_sidecar(redis_url)
    other = await make_sidecar(redis_url)
    assert await source_of(other, "cus_1") == ("miss", False)
    assert await source_of(other, "cus_1") == ("hit", False)
    emulator.set_entitlements(tenant, "cus_1", NEW)
    status, body = await push(receiver, event(tenant, customerId="cus_1"))
    assert (status, body) == (200, {"ok": True})

    async def other_sees_new() -> bool:
        return await source_of(other, "cus_1") == ("miss", True)

    await eventually(other_sees_new, timeout=5)
    assert webhook_count(receiver, "ok") == 1
    fanout = other.metrics.registry.get_sample_value(
        "vellum_sidecar_invalidation_fanout_seconds_count"
    )
    assert fanout == 1


@pytest.mark.parametrize(
    "case", ["bad_signature", "wrong_secret", "stale", "future", "missing", "garbage_header"]
)
async def test_refused_pushes_change_nothing(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str, redis_url: str, case: str
) -> None:
    emulator.set_entitlements(tenant, "cus_1", OLD)
    sc = await make_sidecar(redis_url)
    await source_of(sc, "cus_1")
    emulator.set_entitlements(tenant, "cus_1", NEW)
    payload = event(tenant, customerId="cus_1")
    body = orjson.dumps(payload)
    now = int(time.time())
    tampered: dict[str, Tampering] = {
        "bad_signature": {"header": f"t={now},v1=" + "0" * 64},
        "wrong_secret": {"secret": "whsec_not_ours"},
        "stale": {"timestamp": now - 301},
        "future": {"timestamp": now + 301},
        "missing": {"header": ""},
        "garbage_header": {"header": "nonsense"},
    }
    status, reply = await push(sc, body, **tampered[case])
    assert status == 401
    assert reply["error"]["code"] == "invalid_signature"
    assert await source_of(sc, "cus_1") == ("hit", False), "cache untouched"
    result = "stale" if case in ("stale", "future") else "bad_signature"
    assert webhook_count(sc, result) == 1


async def test_malformed_and_oversized_bodies(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    emulator.set_entitlements(tenant, "cus_1", OLD)
    sc = await make_sidecar(None)
    await source_of(sc, "cus_1")
    for body in (b"{nope", b"[]", b'"evt_1"', b"5", b"null", b"\xff\xfe"):
        status, reply = await push(sc, body)
        assert status == 400, body
        assert reply["error"]["code"] == "malformed_event"
    big = b'{"id": "evt_big", "pad": "' + b"x" * (1024 * 1024) + b'"}'
    status, reply = await push(sc, big)
    assert status == 413
    assert reply["error"]["code"] == "payload_too_large"
    assert await source_of(sc, "cus_1") == ("hit", False)
    assert webhook_count(sc, "malformed") == 6


async def test_authentic_events_without_an_id_are_applied(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    """No id field, an id that is not a string, an id too long to be a key: all applied."""
    emulator.set_entitlements(tenant, "cus_1", OLD)
    sc = await make_sidecar(None)
    bodies = (
        {"type": "entitlements.updated", "customerId": "cus_1"},
        {"id": 5, "customerId": "cus_1"},
        {"eventId": "e" * 5000, "customerId": "cus_1"},
        {"eventId": "", "id": None, "customerId": "cus_1"},
    )
    for payload in bodies:
        await source_of(sc, "cus_1")
        assert (await source_of(sc, "cus_1"))[0] == "hit"
        assert await push(sc, payload) == (200, {"ok": True}), payload
        assert (await source_of(sc, "cus_1"))[0] == "miss", payload
    assert webhook_count(sc, "ok") == 4
    assert webhook_count(sc, "malformed") == 0


async def test_replay_is_a_duplicate_even_on_another_sidecar(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str, redis_url: str
) -> None:
    emulator.set_entitlements(tenant, "cus_1", OLD)
    a = await make_sidecar(redis_url)
    b = await make_sidecar(redis_url)
    payload = orjson.dumps(event(tenant, customerId="cus_1"))
    header = sign(WEBHOOK_SECRET, payload, int(time.time()))
    assert await push(a, payload, header=header) == (200, {"ok": True})
    await source_of(b, "cus_1")
    assert await source_of(b, "cus_1") == ("hit", False)
    for target in (a, b):
        status, reply = await push(target, payload, header=header)
        assert (status, reply) == (200, {"ok": True, "duplicate": True})
    assert await source_of(b, "cus_1") == ("hit", False), "a replay drops nothing"
    assert webhook_count(a, "duplicate") == 1
    assert webhook_count(b, "duplicate") == 1


async def test_a_flood_of_authentic_events_costs_redis_one_bounded_key(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str, redis_url: str
) -> None:
    """Replay keys stay bounded: 300 distinct events (each first seen) through a
    sidecar add one Redis key, whatever their number, with a TTL of the window."""
    sc = await make_sidecar(redis_url)
    client = aredis.Redis.from_url(redis_url)
    try:
        before = set(await client.keys("*"))
        for i in range(300):
            assert await push(sc, event(tenant, id=f"evt_{i}")) == (200, {"ok": True})
        added = set(await client.keys("*")) - before
        events = sc.app[REDIS].keys.events.encode()  # type: ignore[union-attr]
        assert events in added
        assert {k for k in added if b"evt" in k} == {events}, "one key for every event"
        assert await client.zcard(events) == 300
        assert 0 < await client.ttl(events) <= REPLAY_WINDOW
    finally:
        await client.aclose()


async def test_the_shared_replay_set_keeps_the_newest_events_up_to_its_bound(
    make_sidecar: SidecarFactory, redis_url: str
) -> None:
    """``max_shared`` bounds the set; the oldest digests go first, the newest (an
    upstream retry comes within seconds) are still caught on another sidecar."""
    sc = await make_sidecar(redis_url)
    redis = sc.app[REDIS]
    assert redis is not None
    one = ReplayGuard(lambda: redis, max_shared=50)
    for i in range(120):
        assert await one.first_seen(f"eventId:e{i}")
    client = aredis.Redis.from_url(redis_url)
    try:
        assert await client.zcard(redis.keys.events) == 50
    finally:
        await client.aclose()
    other = ReplayGuard(lambda: redis, max_shared=50)  # another sidecar: its own memory
    assert not await other.first_seen("eventId:e119"), "a recent one is a duplicate anywhere"
    assert not await other.first_seen("eventId:e70")
    assert await other.first_seen("eventId:e3"), "past the bound: applied again (harmless)"
    assert not await one.first_seen("eventId:e3"), "this sidecar's own memory still has it"


async def test_replay_caught_in_memory_mode(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    sc = await make_sidecar(None)
    payload = orjson.dumps(event(tenant, customerId="cus_1"))
    header = sign(WEBHOOK_SECRET, payload, int(time.time()))
    assert (await push(sc, payload, header=header))[1] == {"ok": True}
    assert (await push(sc, payload, header=header))[1] == {"ok": True, "duplicate": True}


async def test_rotation_accepts_either_secret(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    sc = await make_sidecar(None, VELLUM_WEBHOOK_SECRETS="whsec_old,whsec_new")
    for secret in ("whsec_old", "whsec_new"):
        status, _ = await push(sc, event(tenant, customerId="c"), secret=secret)
        assert status == 200
    # Vellum signing with both during its own switch-over: one v1 entry per secret.
    body = orjson.dumps(event(tenant, customerId="c"))
    both = sign_many(["whsec_unknown", "whsec_new"], body, int(time.time()))
    assert (await push(sc, body, header=both))[0] == 200
    assert (await push(sc, event(tenant, customerId="c"), secret=WEBHOOK_SECRET))[0] == 401


async def test_other_tenants_events_are_ignored(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    emulator.set_entitlements(tenant, "cus_1", OLD)
    sc = await make_sidecar(None)
    await source_of(sc, "cus_1")
    status, reply = await push(sc, event("someone-else", customerId="cus_1"))
    assert (status, reply) == (200, {"ok": True, "ignored": True})
    assert await source_of(sc, "cus_1") == ("hit", False)
    assert webhook_count(sc, "ignored") == 1


async def test_account_event_drops_that_accounts_customers(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str, redis_url: str
) -> None:
    emulator.set_entitlements(tenant, "cus_1", OLD)
    emulator.set_entitlements(tenant, "cus_2", {**OLD, "accountId": "acct_2"})
    a = await make_sidecar(redis_url)
    b = await make_sidecar(redis_url)
    await source_of(a, "cus_1")  # learnt: acct_1 -> cus_1 (in Redis)
    await source_of(b, "cus_1")
    await source_of(b, "cus_2")
    status, _ = await push(a, event(tenant, accountId="acct_1"))
    assert status == 200

    async def dropped() -> bool:
        return (await source_of(b, "cus_1"))[0] == "miss"

    await eventually(dropped, timeout=5)
    assert (await source_of(b, "cus_2"))[0] == "hit", "another account's customer stays"


async def test_unknown_account_or_no_ids_drops_everything(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str, redis_url: str
) -> None:
    emulator.set_entitlements(tenant, "cus_1", OLD)
    sc = await make_sidecar(redis_url)
    for payload in (event(tenant, accountId="acct_unknown"), event(tenant, type="plan.updated")):
        await source_of(sc, "cus_1")
        assert (await source_of(sc, "cus_1"))[0] == "hit"
        assert (await push(sc, payload))[0] == 200
        assert (await source_of(sc, "cus_1"))[0] == "miss"
    tenant_scope = sc.metrics.registry.get_sample_value(
        "vellum_sidecar_invalidations_total", {"scope": "tenant", "source": "webhook"}
    )
    assert tenant_scope == 2


async def test_invalidation_during_fetch_wins(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str, redis_url: str
) -> None:
    """The race: a push that lands while a fetch is in flight; the old answer is not kept."""
    emulator.set_entitlements(tenant, "cus_1", OLD)
    a = await make_sidecar(redis_url)
    b = await make_sidecar(redis_url)
    hold = emulator.hold("get_entitlements")
    reading = asyncio.create_task(a.client.get("/v1/customers/cus_1/can/exports"))
    await asyncio.wait_for(hold.arrived.wait(), 5)
    # The push lands on another sidecar while this fetch is in flight; the held
    # fetch then answers what the upstream had before the change.
    assert (await push(b, event(tenant, customerId="cus_1")))[0] == 200
    hold.release()
    emulator.clear_faults()
    first = await reading
    assert (await first.json())["allowed"] is False, "the waiting caller gets what was fetched"
    # The change the push announced is now what the upstream answers. Had the
    # older answer been stored in either layer, these reads would be hits on it.
    emulator.set_entitlements(tenant, "cus_1", NEW)
    assert await source_of(b, "cus_1") == ("miss", True), "not stored in Redis"
    # a finds b's fresh answer in Redis; the older one never reached a's memory.
    assert await source_of(a, "cus_1") == ("hit", True), "not stored in memory"
    assert emulator.count("get_entitlements", tenant) == 2


async def test_invalidation_during_fetch_wins_in_memory_mode(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    emulator.set_entitlements(tenant, "cus_1", OLD)
    sc = await make_sidecar(None)
    hold = emulator.hold("get_entitlements")
    reading = asyncio.create_task(sc.client.get("/v1/customers/cus_1/can/exports"))
    await asyncio.wait_for(hold.arrived.wait(), 5)
    assert (await push(sc, event(tenant, customerId="cus_1")))[0] == 200
    hold.release()
    emulator.clear_faults()
    assert (await (await reading).json())["allowed"] is False
    emulator.set_entitlements(tenant, "cus_1", NEW)
    assert await source_of(sc, "cus_1") == ("miss", True)


async def test_emulator_push_end_to_end(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
    tenant: str,
    redis_url: str,
) -> None:
    """The demo loop: an emulator change is pushed, signed, and the sidecar answers anew."""
    emulator_port = free_port()
    base = f"http://127.0.0.1:{emulator_port}"
    settings = Settings.from_env(sidecar_env(tenant, base, SIDECAR_REDIS_URL=redis_url))
    core = create_app(settings)
    client = await aiohttp_client(core)
    core[LIFECYCLE].phase = "ready"
    hooks = await aiohttp_server(create_webhook_app(core))
    emu_app = create_emulator_app(
        api_keys=[API_KEY],
        webhook_url=str(hooks.make_url("/webhooks/vellum")),
        webhook_secret=WEBHOOK_SECRET,
        default_tenant=tenant,
    )
    await aiohttp_server(emu_app, port=emulator_port)
    emu = emu_app[EMULATOR]
    emu.set_entitlements(tenant, "cus_1", OLD)
    await emu.wait_pushes_idle()
    resp = await client.get("/v1/customers/cus_1/can/exports")
    assert (await resp.json())["allowed"] is False
    emu.set_entitlements(tenant, "cus_1", NEW)
    await emu.wait_pushes_idle()
    assert emu.pushes[-1].delivered
    resp = await client.get("/v1/customers/cus_1/can/exports")
    assert resp.headers["X-Sidecar-Cache"] == "miss"
    assert (await resp.json())["allowed"] is True
