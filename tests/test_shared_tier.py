"""The shared tier's invariants (``sidecar/cache/shared.py``), script by script, against
a real redis-server and without HTTP: a drop expires and never destroys, a stored
entry is valid only under the current generation and epoch, only the fill holding the
lock stores a valid answer, floods of drops write no keys, writes refused (OOM) still
drop, and the epoch moves exactly once when Redis lost writes."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from sidecar.cache.entry import DROPPED, PRECAUTION, Entry
from sidecar.cache.kinds import ENTITLEMENTS, FLAGS, KINDS
from sidecar.cache.shared import LocalTier, RedisTier, judge
from sidecar.metrics import Metrics
from sidecar.redis.conn import RedisConn
from sidecar.redis.keys import Keys
from sidecar.redis.url import create_redis

from .harness import RedisServer

OLD = b'{"status":"active","modules":["reports"],"config":{}}'
NEW = b'{"status":"active","modules":["reports","exports"],"config":{}}'


def entry(body: bytes = OLD, fetched_at: float | None = None) -> Entry:
    now = time.time() if fetched_at is None else fetched_at
    return Entry.from_upstream(200, body, now=now, fresh_for=300, stale_for=3600)


async def make_tier(server: RedisServer, tenant: str) -> RedisTier:
    client = create_redis(server.url, cluster=False, timeout=1.0, pool_size=8)
    return RedisTier(
        RedisConn(client, Keys(tenant), Metrics()), KINDS.values(), pool_size=8, upstream_timeout=2
    )


@pytest.fixture
async def tier(own_redis: RedisServer) -> AsyncIterator[RedisTier]:
    t = await make_tier(own_redis, "t_" + uuid.uuid4().hex[:8])
    yield t
    await t.close()
    await t.redis.close()


async def stored(tier: RedisTier, customer: str = "cus_1") -> Entry | None:
    return await tier.read(ENTITLEMENTS, customer)


async def fill(tier: RedisTier, customer: str = "cus_1", body: bytes = OLD) -> Entry:
    """One whole fill: lock, answer, store."""
    ticket = await tier.begin_fill(ENTITLEMENTS, customer)
    assert ticket.won
    answer = entry(body)
    assert await tier.finish_fill(ENTITLEMENTS, customer, ticket, answer, overtaken=False) == 1
    return answer


def raw(server: RedisServer, key: str) -> bytes | None:
    with server.client() as c:
        value = c.get(key)
        assert value is None or isinstance(value, bytes)
        return value


def message() -> bytes:
    return b'{"scope":"customer","origin":"test"}'


async def test_a_customer_drop_marks_the_entry_and_keeps_it(
    tier: RedisTier, own_redis: RedisServer
) -> None:
    await fill(tier)
    found = await stored(tier)
    assert found is not None and found.is_fresh(time.time())
    key = tier.keys.entry("cus_1")
    with own_redis.client() as c:
        ttl_before = c.pttl(key)
    seq = await tier.expire_customers([ENTITLEMENTS], ["cus_1"], message())
    assert seq == 1
    value = raw(own_redis, key)
    assert value is not None and value.startswith(b"!")
    with own_redis.client() as c:
        assert 0 < c.pttl(key) <= ttl_before  # KEEPTTL: the fallback lives as long as before
    found = await stored(tier)
    assert found is not None
    assert found.expired == DROPPED
    assert not found.is_fresh(time.time())
    assert found.is_servable_stale(time.time())
    assert not found.is_servable_stale(time.time(), strict=True)
    assert found.modules == frozenset({"reports"})
    # A second drop leaves one mark, and the sequence counts both.
    assert await tier.expire_customers([ENTITLEMENTS], ["cus_1"], message()) == 2
    second = raw(own_redis, key)
    assert second is not None and second.startswith(b"!") and not second.startswith(b"!!")


async def test_a_tenant_drop_expires_every_entry_of_its_kinds_only(
    tier: RedisTier, own_redis: RedisServer
) -> None:
    await fill(tier, "cus_1")
    await fill(tier, "cus_2")
    ticket = await tier.begin_fill(FLAGS, "cus_1")
    flags = Entry.from_upstream(
        200, b'{"flags":{"beta":true}}', now=time.time(), fresh_for=30, stale_for=60, kind=FLAGS
    )
    assert await tier.finish_fill(FLAGS, "cus_1", ticket, flags, overtaken=False) == 1
    keys_before = set(own_redis.client().keys("*"))
    await tier.expire_tenant([ENTITLEMENTS], b'{"scope":"tenant","origin":"test"}')
    for customer in ("cus_1", "cus_2"):
        found = await stored(tier, customer)
        assert found is not None and found.expired == DROPPED
    flag_entry = await tier.read(FLAGS, "cus_1")
    assert flag_entry is not None and flag_entry.is_fresh(time.time()), "the other axis stays"
    # O(1): no key deleted, none added but the drop sequence (the generation existed).
    assert set(own_redis.client().keys("*")) == keys_before | {tier.keys.seq.encode()}
    # A fill after the drop is valid again.
    await fill(tier, "cus_1", NEW)
    found = await stored(tier, "cus_1")
    assert found is not None and found.is_fresh(time.time()) and "exports" in found.modules


async def test_a_drop_takes_the_lock_so_the_fill_in_flight_stores_only_a_fallback(
    tier: RedisTier, own_redis: RedisServer
) -> None:
    # A fill holds the lock (its upstream answer predates the drop), then a drop arrives.
    early = await tier.begin_fill(ENTITLEMENTS, "cus_2")
    assert early.won
    await tier.expire_customers([ENTITLEMENTS], ["cus_2"], message())
    assert raw(own_redis, tier.keys.lock("cus_2")) is None, "the drop took the lock"
    # The overtaken fill's answer is kept only as the (marked) fallback.
    result = await tier.finish_fill(ENTITLEMENTS, "cus_2", early, entry(OLD), overtaken=False)
    assert result == 2
    found = await stored(tier, "cus_2")
    assert found is not None and found.expired == DROPPED
    # A previous release's fill compares the generation: the drop bumped it (with a TTL).
    with own_redis.client() as c:
        assert c.get(tier.keys.gen("cus_2")) == b"1"
        assert 0 < c.pttl(tier.keys.gen("cus_2")) <= 60_000
    # The next fill (after the drop) takes the lock and stores a valid answer.
    await fill(tier, "cus_2", NEW)
    found = await stored(tier, "cus_2")
    assert found is not None and found.is_fresh(time.time()) and "exports" in found.modules


async def test_an_overtaken_fill_never_replaces_a_valid_entry(tier: RedisTier) -> None:
    early = await tier.begin_fill(ENTITLEMENTS, "cus_1")
    assert early.won
    await tier.expire_customers([ENTITLEMENTS], ["cus_1"], message())
    await fill(tier, "cus_1", NEW)  # the fill after the drop, valid
    result = await tier.finish_fill(ENTITLEMENTS, "cus_1", early, entry(OLD), overtaken=False)
    assert result == 0
    found = await stored(tier)
    assert found is not None and found.is_fresh(time.time()) and "exports" in found.modules
    # Overtaken in this process (``overtaken``), even while holding the lock: fallback only.
    ticket = await tier.begin_fill(ENTITLEMENTS, "cus_3")
    assert await tier.finish_fill(ENTITLEMENTS, "cus_3", ticket, entry(), overtaken=True) == 2


async def test_drops_for_unknown_customers_write_no_keys(
    tier: RedisTier, own_redis: RedisServer
) -> None:
    await tier.check(0, b'{"scope":"epoch","origin":"test"}')
    before = own_redis.client().dbsize()
    customers = [f"nobody_{i}" for i in range(2000)]
    for start in range(0, len(customers), 500):
        await tier.expire_customers(list(KINDS.values()), customers[start : start + 500], message())
    assert own_redis.client().dbsize() == before + 1  # the drop sequence, once


async def test_writes_refused_by_oom_still_drop(tier: RedisTier, own_redis: RedisServer) -> None:
    epoch_msg = b'{"scope":"epoch","origin":"test"}'
    await fill(tier, "cus_1")
    await fill(tier, "cus_2")
    assert (await tier.check(0, epoch_msg)).writable
    # maxmemory below what Redis already uses, nothing it may evict: every write is
    # refused (OOM) and reads still answer.
    with own_redis.client() as c:
        used = int(c.info("memory")["used_memory"])
        c.config_set("maxmemory-policy", "noeviction")
        c.config_set("maxmemory", used // 2)
    check = await tier.check(0, epoch_msg)
    assert not check.writable
    # A customer drop cannot mark (a write): it deletes instead.
    await tier.expire_customers([ENTITLEMENTS], ["cus_1"], message())
    assert raw(own_redis, tier.keys.entry("cus_1")) is None
    # A tenant-wide drop cannot set a new generation: it deletes it, so no stored
    # stamp matches any more.
    await tier.expire_tenant([ENTITLEMENTS], b'{"scope":"tenant","origin":"test"}')
    found = await stored(tier, "cus_2")
    assert found is not None and found.expired == DROPPED
    # A fill neither stores nor fails: the refusal is reported, Redis stays up.
    ticket = await tier.begin_fill(ENTITLEMENTS, "cus_3")
    assert not ticket.won and ticket.stamp is None
    assert await tier.finish_fill(ENTITLEMENTS, "cus_3", ticket, entry(), overtaken=False) == 0
    assert raw(own_redis, tier.keys.entry("cus_3")) is None
    assert tier.redis.state == "ok"
    with own_redis.client() as c:
        c.config_set("maxmemory", 0)
    check = await tier.check(0, epoch_msg)
    assert check.writable
    # The check made the deleted generation again: a new fill is valid.
    await fill(tier, "cus_2", NEW)
    found = await stored(tier, "cus_2")
    assert found is not None and found.is_fresh(time.time())


async def test_a_missing_epoch_is_made_once_and_a_regressed_one_renewed_once(
    own_redis: RedisServer,
) -> None:
    tenant = "t_" + uuid.uuid4().hex[:8]
    tiers = [await make_tier(own_redis, tenant) for _ in range(4)]
    try:
        epoch_msg = b'{"scope":"epoch","origin":"test"}'
        first = await asyncio.gather(*(t.check(0, epoch_msg) for t in tiers))
        assert [c.changed for c in first].count("flushed") == 1
        assert len({c.epoch for c in first}) == 1
        await fill(tiers[0])
        seq = await tiers[0].expire_customers([ENTITLEMENTS], ["cus_9"], message())
        # Redis goes back in time (a restore from before the drop): seq is lower than
        # what the sidecars saw. Of four concurrent checks, exactly one renews.
        with own_redis.client() as c:
            c.set(Keys(tenant).seq, 0)
        checks = await asyncio.gather(*(t.check(seq, epoch_msg) for t in tiers))
        assert [c.changed for c in checks].count("regressed") == 1
        assert len({c.epoch for c in checks}) == 1 and checks[0].epoch != first[0].epoch
        assert all(c.seq == seq for c in checks)
        found = await stored(tiers[1], "cus_1")
        assert found is not None and found.expired == PRECAUTION
        # FLUSHALL: the next check makes a new epoch.
        own_redis.flush()
        after = await tiers[2].check(0, epoch_msg)
        assert after.changed == "flushed" and after.epoch not in (None, checks[0].epoch)
    finally:
        for t in tiers:
            await t.close()
            await t.redis.close()


async def test_after_an_outage_one_renewal_for_the_fleet(own_redis: RedisServer) -> None:
    tenant = "t_" + uuid.uuid4().hex[:8]
    a, b = await make_tier(own_redis, tenant), await make_tier(own_redis, tenant)
    try:
        epoch_msg = b'{"scope":"epoch","origin":"test"}'
        last_contact = (await a.check(0, epoch_msg)).now_ms
        await fill(a)
        # Both lost Redis; whoever comes back first renews, the other finds it renewed
        # after its own last contact.
        assert await a.renew_epoch(last_contact, epoch_msg)
        assert not await b.renew_epoch(last_contact, epoch_msg)
        found = await stored(b)
        assert found is not None and found.expired == PRECAUTION
        assert found.is_servable_stale(time.time(), strict=True), "a precaution stays servable"
        # Unconditionally (a sidecar that never had contact): always.
        assert await b.renew_epoch(None, epoch_msg)
    finally:
        for t in (a, b):
            await t.close()
            await t.redis.close()


async def test_an_untrusting_sidecar_reads_entries_only_as_the_fallback(tier: RedisTier) -> None:
    await fill(tier)
    tier.distrust()
    found = await stored(tier)
    assert found is not None and found.expired == PRECAUTION
    raced = (await tier.begin_fill(ENTITLEMENTS, "cus_1")).raced
    assert raced is not None and raced.expired == PRECAUTION
    tier.trusted = True
    found = await stored(tier)
    assert found is not None and found.is_fresh(time.time())


async def test_scripts_are_loaded_again_after_the_server_forgot_them(
    tier: RedisTier, own_redis: RedisServer
) -> None:
    await fill(tier)
    with own_redis.client() as c:
        c.script_flush()
    await tier.expire_customers([ENTITLEMENTS], ["cus_1"], message())
    found = await stored(tier)
    assert found is not None and found.expired == DROPPED


def test_judge_reads_stamps_marks_and_previous_releases() -> None:
    e = entry()
    stamp = ("100-aa", "200-bb")
    valid = judge(e.dumps(stamp), ENTITLEMENTS, "100-aa", "200-bb", True)
    assert valid is not None and valid.expired == 0
    assert judge(b"!" + e.dumps(stamp), ENTITLEMENTS, "100-aa", "200-bb", True).expired == DROPPED  # type: ignore[union-attr]
    assert judge(e.dumps(stamp), ENTITLEMENTS, "101-aa", "200-bb", True).expired == DROPPED  # type: ignore[union-attr]
    assert judge(e.dumps(stamp), ENTITLEMENTS, None, "200-bb", True).expired == DROPPED  # type: ignore[union-attr]
    assert judge(e.dumps(stamp), ENTITLEMENTS, "100-aa", "201-bb", True).expired == PRECAUTION  # type: ignore[union-attr]
    assert judge(e.dumps(stamp), ENTITLEMENTS, "100-aa", None, True).expired == PRECAUTION  # type: ignore[union-attr]
    # A previous release stored no stamp: revalidated once, a precaution.
    assert judge(e.dumps(), ENTITLEMENTS, "100-aa", "200-bb", True).expired == PRECAUTION  # type: ignore[union-attr]
    assert judge(b"not json", ENTITLEMENTS, "1", "2", True) is None
    assert judge(None, ENTITLEMENTS, "1", "2", True) is None


async def test_the_local_tier_shares_nothing() -> None:
    local = LocalTier()
    assert not local.shared
    assert await local.read(ENTITLEMENTS, "cus_1") is None
    ticket = await local.begin_fill(ENTITLEMENTS, "cus_1")
    assert ticket.stamp is None and not ticket.held
    assert await local.finish_fill(ENTITLEMENTS, "cus_1", ticket, entry(), overtaken=False) == 0
    assert await local.expire_customers([ENTITLEMENTS], ["cus_1"], message()) == 0
    assert await local.members("acc_1") == set()


async def test_a_stall_renews_the_epoch_only_when_the_check_waited_through_it(
    tier: RedisTier, own_redis: RedisServer
) -> None:
    """No check for 1 s: a fleet whose processes were paused (the check that follows did
    not wait in Redis) is not a stall; one whose check sat in Redis for 0.4 s is, and
    of the checks that follow only that one renews."""
    epoch_msg = b'{"scope":"epoch","origin":"test"}'
    first = await tier.check(0, epoch_msg)
    with own_redis.client() as c:
        c.set(tier.keys.beat, first.now_ms - 1000)
    paused = await tier.check(0, epoch_msg, sent_ms=first.now_ms + 5, offset_ms=0)
    assert paused.changed is None and paused.epoch == first.epoch
    with own_redis.client() as c:
        c.set(tier.keys.beat, paused.now_ms - 1000)
    # Sent 400 ms before Redis ran it, with clocks that usually agree: it waited.
    stalled = await tier.check(0, epoch_msg, sent_ms=paused.now_ms - 400, offset_ms=0)
    assert stalled.changed == "stalled" and stalled.epoch != paused.epoch
    after = await tier.check(0, epoch_msg, sent_ms=stalled.now_ms - 400, offset_ms=0)
    assert after.changed is None, "the stalled check set the fleet's beat"
    # A fleet gone longer than the beat's TTL (the beat expired, the epoch did not).
    with own_redis.client() as c:
        c.delete(tier.keys.beat)
    assert (await tier.check(0, epoch_msg)).changed == "stalled"
