"""The in-process layer kept coherent by the fan-out (docs/performance.md, "Coherent
memory"): while the subscription is confirmed, entries answer from memory until their
own freshness ends; a sidecar that loses it drops the layer, so a message it could not
see never leaves it wrong for longer than the detection takes."""

from __future__ import annotations

import time

from sidecar.cache.invalidation import Invalidator
from sidecar.emulator import Emulator
from sidecar.redis.keys import Keys

from .conftest import Sidecar, SidecarFactory, eventually
from .harness import RedisServer
from .test_webhooks import NEW, OLD, source_of

#: Longer than any test: only a drop of the layer can make a sidecar read Redis again.
LONG = "3600"


def invalidate_unseen(server: RedisServer, tenant: str, customer: str) -> None:
    """What another sidecar's invalidation does in Redis (generation bump, entry deleted),
    without the fan-out message: a PUBLISH this sidecar never sees."""
    keys = Keys(tenant)
    with server.client() as r:
        r.incr(keys.gen(customer))
        r.delete(keys.entry(customer))


def answer_until(sc: Sidecar, customer: str) -> float:
    entry = sc.cache.memory.data[customer]
    return entry.answer_until


async def test_confirmed_fanout_keeps_memory_until_freshness_ends(
    make_sidecar: SidecarFactory, own_redis: RedisServer, emulator: Emulator, tenant: str
) -> None:
    emulator.set_entitlements(tenant, "cus_1", OLD)
    sc = await make_sidecar(own_redis.url, SIDECAR_MEMORY_TTL="1")
    assert await source_of(sc, "cus_1") == ("miss", False)
    entry = sc.cache.memory.data["cus_1"]
    assert entry.answer_until == entry.fresh_until > time.time() + 60, "not SIDECAR_MEMORY_TTL"


async def test_a_killed_subscription_drops_the_layer_so_a_missed_message_is_not_kept(
    make_sidecar: SidecarFactory, own_redis: RedisServer, emulator: Emulator, tenant: str
) -> None:
    emulator.set_entitlements(tenant, "cus_1", OLD)
    sc = await make_sidecar(own_redis.url, SIDECAR_MEMORY_TTL=LONG)
    assert await source_of(sc, "cus_1") == ("miss", False)
    emulator.set_entitlements(tenant, "cus_1", NEW)
    invalidate_unseen(own_redis, tenant, "cus_1")
    assert await source_of(sc, "cus_1") == ("hit", False), "memory answers alone meanwhile"
    with own_redis.client() as r:
        assert r.client_kill_filter(_type="pubsub") == 1

    async def new_value() -> bool:
        return (await source_of(sc, "cus_1"))[1]

    await eventually(new_value, timeout=5)

    async def confirmed_again() -> bool:
        return sc.invalidator.subscribed.is_set() and sc.cache.coherent

    await eventually(confirmed_again, timeout=5)


async def test_until_confirmed_again_memory_answers_for_at_most_the_memory_ttl(
    make_sidecar: SidecarFactory, own_redis: RedisServer, emulator: Emulator, tenant: str
) -> None:
    emulator.set_entitlements(tenant, "cus_1", OLD)
    sc = await make_sidecar(own_redis.url, SIDECAR_MEMORY_TTL="30")
    invalidator: Invalidator = sc.invalidator
    await invalidator.stop()  # the listener gone: nothing is confirmed any more
    assert not sc.cache.coherent
    before = time.time()
    assert (await source_of(sc, "cus_1"))[0] == "miss"
    assert before + 30 * 0.8 - 1 < answer_until(sc, "cus_1") <= time.time() + 30


async def test_losing_the_subscription_keeps_entries_only_as_the_stale_fallback(
    make_sidecar: SidecarFactory, own_redis: RedisServer, emulator: Emulator, tenant: str
) -> None:
    emulator.set_entitlements(tenant, "cus_1", OLD)
    sc = await make_sidecar(own_redis.url, SIDECAR_MEMORY_TTL=LONG)
    assert await source_of(sc, "cus_1") == ("miss", False)
    own_redis.kill()

    async def lost() -> bool:
        return not sc.cache.coherent

    await eventually(lost, timeout=5)
    assert sc.cache.memory.data["cus_1"].answer_until == 0, "no longer answers alone"
    emulator.fail("get_entitlements", 503, None)
    assert await source_of(sc, "cus_1") == ("stale", False), "Redis and upstream down: stale"
    emulator.clear_faults()


async def test_a_silent_subscription_expires_the_layer_within_the_heartbeat_bound(
    make_sidecar: SidecarFactory, own_redis: RedisServer, emulator: Emulator, tenant: str
) -> None:
    """Redis SIGSTOPped: the subscribed connection stays open and says nothing. The
    heartbeat goes unanswered, the layer stops answering alone, and the next read
    (Redis timing out) asks the upstream, which has the new value the sidecar never
    heard of."""
    emulator.set_entitlements(tenant, "cus_1", OLD)
    sc = await make_sidecar(own_redis.url, SIDECAR_MEMORY_TTL=LONG, SIDECAR_REDIS_TIMEOUT="0.2")
    assert await source_of(sc, "cus_1") == ("miss", False)
    emulator.set_entitlements(tenant, "cus_1", NEW)
    assert await source_of(sc, "cus_1") == ("hit", False), "memory answers alone meanwhile"
    own_redis.pause()
    try:

        async def expired() -> bool:
            entry = sc.cache.memory.data.get("cus_1")
            return not sc.cache.coherent and (entry is None or entry.answer_until == 0)

        await eventually(expired, timeout=5)

        async def new_value() -> bool:
            return (await source_of(sc, "cus_1"))[1]

        await eventually(new_value, timeout=5)
    finally:
        own_redis.resume()

    async def confirmed_again() -> bool:
        return sc.invalidator.subscribed.is_set() and sc.cache.coherent

    await eventually(confirmed_again, timeout=10)
