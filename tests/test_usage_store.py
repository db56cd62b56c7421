"""The usage queue's invariants (``sidecar/usage/store.py``), script by script, against a
real redis-server and without HTTP: acknowledged means stored (or nothing is), one key
is one record, one deliverer per partition (a dead holder's pending entries are claimed
and read back in order), only the holder finishes, fair shares, and no TTL on anything
not yet delivered."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from sidecar.metrics import Metrics
from sidecar.redis.conn import RedisConn
from sidecar.redis.keys import Keys
from sidecar.redis.url import create_redis
from sidecar.usage.records import PARTITIONS, Record, outcome_body, partition_of
from sidecar.usage.store import GROUP, Entry, UsageStore

from .harness import RedisServer

LEASE_MS = 5000


async def make_store(server: RedisServer, tenant: str, **kw: int) -> UsageStore:
    client = create_redis(server.url, cluster=False, timeout=1.0, pool_size=8)
    conn = RedisConn(client, Keys(tenant), Metrics())
    return UsageStore(
        conn, max_queued=kw.get("max_queued", 1000), outcome_ttl=kw.get("outcome_ttl", 60)
    )


@pytest.fixture
async def store(own_redis: RedisServer) -> AsyncIterator[UsageStore]:
    s = await make_store(own_redis, "t_" + uuid.uuid4().hex[:8])
    yield s
    await s.redis.close()


def record(key: str, customer: str = "cus_1", credit_type: str = "api-calls", amount: int = 3
           ) -> Record:  # fmt: skip
    return Record(key, customer, credit_type, amount)


async def take_all(store: UsageStore, holder: str) -> frozenset[int]:
    """Every partition for ``holder`` (alone in the fleet)."""
    found = await store.lease_round(holder, LEASE_MS, 0)
    return found.kept | found.taken


async def test_accept_stores_the_entry_and_the_record_without_a_ttl(
    store: UsageStore, own_redis: RedisServer
) -> None:
    rec = record("k1")
    assert (await store.accept(rec)).result == "queued"
    with own_redis.client() as c:
        stream = store.streams[rec.partition]
        entries = c.xrange(stream)
        assert len(entries) == 1
        assert entries[0][1][b"k"] == b"k1" and entries[0][1][b"a"] == b"3"
        # Nothing not yet delivered can be taken by an eviction policy that only
        # evicts keys with a TTL (volatile-lru).
        assert c.pttl(stream) == -1
        assert c.pttl(store.keys.usage_record("k1")) == -1
        assert c.xinfo_groups(stream)[0]["name"] == GROUP.encode()
    fields = await store.outcome("k1")
    assert fields is not None
    body = outcome_body(fields)
    assert body["state"] == "queued" and body["amount"] == 3 and body["attempts"] == 0
    assert body["customerId"] == "cus_1" and body["creditTypeId"] == "api-calls"


async def test_the_same_key_is_the_same_record_and_another_body_a_conflict(
    store: UsageStore, own_redis: RedisServer
) -> None:
    assert (await store.accept(record("k1"))).result == "queued"
    again = await store.accept(record("k1"))
    assert (again.result, again.state) == ("existing", "queued")
    assert (await store.accept(record("k1", amount=4))).result == "conflict"
    assert (await store.accept(record("k1", customer="cus_2"))).result == "conflict"
    assert (await store.accept(record("k1", credit_type="exports"))).result == "conflict"
    with own_redis.client() as c:
        assert sum(c.xlen(s) for s in store.streams) == 1


async def test_a_full_queue_refuses_and_writes_nothing(own_redis: RedisServer) -> None:
    store = await make_store(own_redis, "t_full", max_queued=2)
    try:
        assert (await store.accept(record("a", customer="c1"))).result == "queued"
        assert (await store.accept(record("b", customer="c2"))).result == "queued"
        assert (await store.accept(record("c", customer="c3"))).result == "full"
        assert await store.outcome("c") is None
        # A key already queued is still the same record (no new entry).
        assert (await store.accept(record("a", customer="c1"))).result == "existing"
    finally:
        await store.redis.close()


async def test_a_write_refused_by_oom_queues_nothing(
    store: UsageStore, own_redis: RedisServer
) -> None:
    # One record first, so its partition's stream and group exist: then the refusal
    # comes from XADD, not from creating the group.
    first = record("k0")
    assert (await store.accept(first)).result == "queued"
    with own_redis.client() as c:
        used = int(c.info("memory")["used_memory"])
        c.config_set("maxmemory-policy", "noeviction")
        c.config_set("maxmemory", used // 2)
    try:
        same_partition = next(
            record(f"k{i}", customer=f"cus_{i}")
            for i in range(1, 1000)
            if partition_of(f"cus_{i}", "api-calls") == first.partition
        )
        other = next(
            record(f"k{i}", customer=f"cus_{i}")
            for i in range(1, 1000)
            if partition_of(f"cus_{i}", "api-calls") != first.partition
        )
        assert (await store.accept(same_partition)).result == "refused"
        assert (await store.accept(other)).result == "refused"
        assert not store.redis.writable  # shown as redis: oom
        assert store.redis.state == "ok"
    finally:
        with own_redis.client() as c:
            c.config_set("maxmemory", 0)
    assert await store.outcome(same_partition.key) is None
    assert await store.outcome(other.key) is None
    with own_redis.client() as c:
        assert sum(c.xlen(s) for s in store.streams) == 1


async def test_fair_shares_a_joining_sidecar_gets_work_a_leaving_one_gives_it_back(
    store: UsageStore,
) -> None:
    a = await take_all(store, "a")
    assert a == frozenset(range(PARTITIONS))
    # b joins: none free yet.
    b = await store.lease_round("b", LEASE_MS, 3)
    assert b.live == 2 and not b.kept | b.taken
    # a's next round sheds what exceeds its share; b's takes it.
    a_round = await store.lease_round("a", LEASE_MS, 0)
    assert len(a_round.kept) == PARTITIONS // 2 and not a_round.taken
    b = await store.lease_round("b", LEASE_MS, 3)
    assert b.taken == frozenset(range(PARTITIONS)) - a_round.kept
    # a leaves (SIGTERM: release): b takes everything in its next round.
    await store.release("a")
    b = await store.lease_round("b", LEASE_MS, 3)
    assert b.live == 1
    assert b.kept | b.taken == frozenset(range(PARTITIONS))


async def test_a_lease_ends_when_not_renewed(store: UsageStore, own_redis: RedisServer) -> None:
    await store.lease_round("a", 200, 0)
    with own_redis.client() as c:
        assert all(0 < c.pttl(lease) <= 200 for lease in store.leases)
    # a dies without a word: b gets nothing while a's leases last, its share once
    # they have ended (a still counts as live until a lease after its last round).
    b = await store.lease_round("b", LEASE_MS, 0)
    assert not b.taken and b.live == 2
    with own_redis.client() as c:
        c.delete(*store.leases)  # what their TTL does
    b = await store.lease_round("b", LEASE_MS, 0)
    assert len(b.taken) == PARTITIONS // 2


async def test_a_dead_holders_pending_entries_are_claimed_and_read_in_order(
    store: UsageStore,
) -> None:
    # Ten records of one customer and credit type: one partition, in accept order.
    keys = [f"k{i:02d}" for i in range(10)]
    for key in keys:
        assert (await store.accept(record(key))).result == "queued"
    part = partition_of("cus_1", "api-calls")
    await take_all(store, "a")
    # a reads six (its pending list) and dies before finishing any.
    read = await store.read("a", [(part, ">", 6)])
    assert [e.record.key for e in read if e.record] == keys[:6]
    await store.release("a")  # its leases end (here at once)
    await take_all(store, "b")
    assert await store.claim(part, "b", LEASE_MS) == 6
    # b reads the claimed history first, in order, then the rest.
    history = await store.read("b", [(part, "0-0", 100)])
    assert [e.record.key for e in history if e.record] == keys[:6]
    rest = await store.read("b", [(part, ">", 100)])
    assert [e.record.key for e in rest if e.record] == keys[6:]


async def test_pending_counts_what_was_read_and_not_finished_per_partition(
    store: UsageStore,
) -> None:
    rec = record("k1")
    await store.accept(rec)
    await store.accept(record("k2"))
    other = next(p for p in range(PARTITIONS) if p != rec.partition)
    assert await store.pending([rec.partition, other]) == {rec.partition: 0, other: 0}
    await take_all(store, "a")
    entries = await store.read("a", [(rec.partition, ">", 10)])
    assert (
        await store.pending([rec.partition]) == {rec.partition: len(entries)} != {rec.partition: 0}
    )
    assert await store.finish("a", entries[0], "delivered", 200, b"{}", False)
    assert await store.pending([rec.partition]) == {rec.partition: len(entries) - 1}


async def test_only_the_lease_holder_finishes_and_the_outcome_then_expires(
    store: UsageStore, own_redis: RedisServer
) -> None:
    rec = record("k1")
    await store.accept(rec)
    await take_all(store, "a")
    [entry] = await store.read("a", [(rec.partition, ">", 10)])
    answer = b'{"balance":7,"consumed":3}'
    # A holder that lost its lease finishes nothing.
    assert not await store.finish("b", entry, "delivered", 200, answer, False)
    assert outcome_body(await store.outcome("k1") or {})["state"] == "queued"
    assert await store.finish("a", entry, "delivered", 200, answer, True)
    with own_redis.client() as c:
        stream = store.streams[rec.partition]
        assert c.xlen(stream) == 0
        assert c.xpending(stream, GROUP)["pending"] == 0
        ttl = c.pttl(store.keys.usage_record("k1"))
        assert 0 < ttl <= 60_000
    body = outcome_body(await store.outcome("k1") or {})
    assert body["state"] == "delivered" and body["status"] == 200 and body["replayed"] is True
    assert body["answer"] == {"balance": 7, "consumed": 3}
    assert body["attempts"] == 1


async def test_a_failed_attempt_is_noted_and_an_old_entry_never_overwrites_a_new_record(
    store: UsageStore, own_redis: RedisServer
) -> None:
    rec = record("k1")
    await store.accept(rec)
    await take_all(store, "a")
    [entry] = await store.read("a", [(rec.partition, ">", 10)])
    await store.note_attempt(entry, "upstream_unavailable")
    body = outcome_body(await store.outcome("k1") or {})
    assert body["attempts"] == 1 and body["lastAttempt"]["error"] == "upstream_unavailable"
    # The same key's record is now another one (say the outcome expired and the key
    # was sent again); an old entry of that key finishing must leave it alone.
    with own_redis.client() as c:
        c.hset(store.keys.usage_record("k1"), "id", "9999999999999-0")
    assert await store.finish("a", entry, "rejected", 404, b"{}", False)
    assert outcome_body(await store.outcome("k1") or {})["state"] == "queued"
    # An unreadable entry is acknowledged and deleted, nothing else.
    gone = Entry(rec.partition, "1-1", None)
    assert await store.finish("a", gone, "rejected", 0, b"", False)


async def test_stats_count_the_queue_and_date_its_oldest(store: UsageStore) -> None:
    empty = await store.stats()
    assert empty.queued == 0 and empty.oldest_ms is None
    for i in range(5):
        await store.accept(record(f"k{i}", customer=f"cus_{i}"))
    stats = await store.stats()
    assert stats.queued == 5
    assert stats.oldest_ms is not None and 0 <= stats.now_ms - stats.oldest_ms < 10_000


async def test_a_flushed_redis_loses_the_group_and_a_claim_makes_it_again(
    store: UsageStore, own_redis: RedisServer
) -> None:
    await store.accept(record("k1"))
    part = record("k1").partition
    await take_all(store, "a")
    own_redis.flush()
    # Reading a partition whose stream is gone is no error: nothing to read.
    assert await store.read("a", [(part, ">", 10)]) == []
    assert await store.claim(part, "a", LEASE_MS) == 0
    await store.accept(record("k2"))
    [entry] = await store.read("a", [(part, ">", 10)])
    assert entry.record is not None and entry.record.key == "k2"
