"""Every Redis command of metered usage, behind one class (``UsageStore``).

The data, per tenant (``redis.keys``; one hash tag, so every script is single-slot
on a cluster):

- ``u:s:<p>``, 16 partitions (``records.PARTITIONS``): a Redis Stream each, with
  the consumer group ``deliver``. A record is one entry (key, customer, credit
  type, amount, accepted at). No TTL: an eviction policy that only takes keys
  with one (``volatile-lru``) never drops a record not yet delivered.
- ``u:r:<idempotency key>``: the record's hash: its fields, its state and, once
  final, the upstream's answer. No TTL while queued; ``SIDECAR_USAGE_OUTCOME_TTL``
  once final (the outcome's bounded lifetime).
- ``u:l:<p>`` (TTL: the lease): the one sidecar delivering partition ``p``.
- ``u:m``: the delivering sidecars, by Redis time of their last lease round (a
  sidecar not seen for a lease is gone); what each one's fair share is cut from.

Invariants (tests/test_usage_store.py checks each against a real redis-server):

1. **Acknowledged means stored.** ``accept`` writes the entry and the hash in one
   script, or neither (a refused write, OOM, deletes the entry again); the 202
   comes after it returns. The same key again finds the hash: the same record,
   never a second entry; with another customer, credit type or amount it is a
   conflict.
2. **One deliverer per partition.** Only the lease holder reads a partition
   (``XREADGROUP``), and on taking a lease it first claims every pending entry of
   the group (``XAUTOCLAIM``, from a killed or departed holder) and reads them
   back in stream order before any new one, so records of one (customer, credit
   type) are sent in the order they were accepted. A holder whose partition has more
   pending entries in Redis than it holds in memory lost track of some (Redis restored
   from an older snapshot, a failover to a lagging replica): it claims them again.
3. **Only the holder finishes.** ``finish`` acknowledges and deletes the entry and
   writes the outcome only while the caller still holds the lease (a holder that
   lost it, paused or cut off, leaves the record to the new one, which sends it
   again: the upstream answers the same key as before), and writes it only into
   the hash of that entry (a key accepted again later keeps its new record).
4. **Fair shares.** Each lease round renews what the caller holds, lets go of what
   exceeds ``ceil(16 / live sidecars)`` and takes free partitions up to it, in one
   script, so a joining sidecar gets work and a dying one's partitions are taken
   when its leases end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from redis.exceptions import ResponseError

from ..redis.conn import RedisConn, RedisDown
from ..redis.url import RedisClient
from .records import PARTITIONS, Record

__all__ = ["GROUP", "Accepted", "Entry", "LeaseRound", "Stats", "UsageStore"]

#: The consumer group every partition's stream has.
GROUP: Final = "deliver"

# KEYS: record, the record's stream, then every partition's stream. ARGV: key,
# customer, credit type, amount, most queued, group.
# Returns {'queued'} (new), {'existing', state}, {'conflict'}, {'full', total} or
# {'refused'} (OOM: nothing written).
_ACCEPT: Final = """
local cur = redis.call('HMGET', KEYS[1], 's', 'c', 't', 'a')
if cur[1] then
  if cur[2] ~= ARGV[2] or cur[3] ~= ARGV[3] or cur[4] ~= ARGV[4] then return {'conflict'} end
  return {'existing', cur[1]}
end
local total = 0
for i = 3, #KEYS do total = total + redis.call('XLEN', KEYS[i]) end
if total >= tonumber(ARGV[5]) then return {'full', tostring(total)} end
if redis.call('EXISTS', KEYS[2]) == 0 then
  local r = redis.pcall('XGROUP', 'CREATE', KEYS[2], ARGV[6], '0', 'MKSTREAM')
  if type(r) == 'table' and r.err and not string.find(r.err, 'BUSYGROUP') then
    return {'refused'}
  end
end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local id = redis.pcall('XADD', KEYS[2], '*', 'k', ARGV[1], 'c', ARGV[2], 't', ARGV[3],
  'a', ARGV[4], 'at', now)
if type(id) == 'table' and id.err then return {'refused'} end
local r = redis.pcall('HSET', KEYS[1], 's', 'queued', 'k', ARGV[1], 'c', ARGV[2],
  't', ARGV[3], 'a', ARGV[4], 'id', id, 'at', now, 'n', 0)
if type(r) == 'table' and r.err then
  redis.call('DEL', KEYS[1])
  redis.call('XDEL', KEYS[2], id)
  return {'refused'}
end
return {'queued'}
"""

# KEYS: lease, stream[, record]. ARGV: holder, entry id, group[, state, status, answer,
# replayed (1/0), outcome ttl ms, key, customer, credit type, amount, accepted ms].
# Returns 1 finished, 0 the lease is not the caller's (nothing done). Without a record
# (an entry that was unreadable) it only acknowledges and deletes the entry.
_FINISH: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('XACK', KEYS[2], ARGV[3], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
if not KEYS[3] then return 1 end
local owner = redis.call('HGET', KEYS[3], 'id')
if owner and owner ~= ARGV[2] then return 1 end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local r = redis.pcall('HSET', KEYS[3], 's', ARGV[4], 'st', ARGV[5], 'b', ARGV[6],
  'rp', ARGV[7], 'ft', now, 'k', ARGV[9], 'c', ARGV[10], 't', ARGV[11], 'a', ARGV[12],
  'id', ARGV[2])
if type(r) == 'table' and r.err then
  redis.call('DEL', KEYS[3])
  return 1
end
if redis.call('HEXISTS', KEYS[3], 'at') == 0 then redis.call('HSET', KEYS[3], 'at', ARGV[13]) end
redis.call('HINCRBY', KEYS[3], 'n', 1)
redis.call('PEXPIRE', KEYS[3], ARGV[8])
return 1
"""

# KEYS: record. ARGV: entry id, error. A failed attempt, noted on the record it was for.
_NOTE: Final = """
if redis.call('HGET', KEYS[1], 'id') ~= ARGV[1] then return 0 end
local t = redis.call('TIME')
redis.pcall('HSET', KEYS[1], 'la', t[1] * 1000 + math.floor(t[2] / 1000), 'le', ARGV[2])
redis.pcall('HINCRBY', KEYS[1], 'n', 1)
return 1
"""

# KEYS: members, then every partition's lease. ARGV: holder, lease ms, first partition
# to try. Returns {kept (renewed), taken (new), live sidecars} (partition numbers).
_LEASE: Final = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ttl = tonumber(ARGV[2])
redis.pcall('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
redis.call('PEXPIRE', KEYS[1], ttl * 2)
local live = math.max(redis.call('ZCARD', KEYS[1]), 1)
local parts = #KEYS - 1
local share = math.ceil(parts / live)
local kept, taken = {}, {}
for i = 2, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    if #kept < share then
      redis.call('PEXPIRE', KEYS[i], ttl)
      kept[#kept + 1] = i - 2
    else
      redis.call('DEL', KEYS[i])
    end
  end
end
local first = tonumber(ARGV[3])
for j = 0, parts - 1 do
  if #kept + #taken >= share then break end
  local p = (first + j) % parts
  local r = redis.pcall('SET', KEYS[p + 2], ARGV[1], 'NX', 'PX', ttl)
  if type(r) == 'table' and r.ok then taken[#taken + 1] = p end
end
return {kept, taken, live}
"""

# KEYS: members, then every partition's lease. ARGV: holder. Lets go of everything.
_RELEASE: Final = """
for i = 2, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then redis.call('DEL', KEYS[i]) end
end
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
"""

# KEYS: every partition's stream. Returns {Redis time ms, records queued, the oldest
# entry's id or ''}.
_STATS: Final = """
local t = redis.call('TIME')
local total, oldest = 0, ''
for i = 1, #KEYS do
  total = total + redis.call('XLEN', KEYS[i])
  local first = redis.call('XRANGE', KEYS[i], '-', '+', 'COUNT', 1)[1]
  if first then
    local ms = tonumber(string.match(first[1], '^(%d+)-'))
    if oldest == '' or ms < oldest then oldest = ms end
  end
end
return {t[1] * 1000 + math.floor(t[2] / 1000), total, tostring(oldest)}
"""


@dataclass(frozen=True, slots=True)
class Accepted:
    """What ``accept`` did: ``queued`` a new record, found an ``existing`` one (with its
    ``state``), or refused it: another record has the key (``conflict``), the queue is
    ``full``, Redis refused the write (``refused``: OOM)."""

    result: Literal["queued", "existing", "conflict", "full", "refused"]
    state: str = "queued"


@dataclass(frozen=True, slots=True)
class Entry:
    """One stream entry read for delivery."""

    partition: int
    id: str
    record: Record | None
    """``None``: the entry is gone (deleted under it) or unreadable; acknowledge it."""
    accepted_ms: int = 0


@dataclass(frozen=True, slots=True)
class LeaseRound:
    kept: frozenset[int]
    """Partitions the caller held and still holds (renewed)."""
    taken: frozenset[int]
    """Partitions it holds from now on (not held by it just before)."""
    live: int
    """Sidecars delivering, the caller included."""


@dataclass(frozen=True, slots=True)
class Stats:
    now_ms: int
    queued: int
    oldest_ms: int | None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class UsageStore:
    """The usage queue in Redis; every method raises ``RedisDown`` when Redis fails."""

    def __init__(self, redis: RedisConn, *, max_queued: int, outcome_ttl: float) -> None:
        self.redis = redis
        self.keys = redis.keys
        self.max_queued = max_queued
        self._outcome_ms = max(int(outcome_ttl * 1000), 1)
        self.streams = tuple(self.keys.usage_stream(p) for p in range(PARTITIONS))
        self.leases = tuple(self.keys.usage_lease(p) for p in range(PARTITIONS))
        client = redis.client
        self._accept = client.register_script(_ACCEPT)
        self._finish = client.register_script(_FINISH)
        self._note = client.register_script(_NOTE)
        self._lease = client.register_script(_LEASE)
        self._release = client.register_script(_RELEASE)
        self._stats = client.register_script(_STATS)

    # -- accepting and reading outcomes ------------------------------------------------

    async def accept(self, record: Record) -> Accepted:
        """Queue ``record`` unless its key names a record already (invariant 1)."""
        keys = [
            self.keys.usage_record(record.key),
            self.streams[record.partition],
            *self.streams,
        ]
        args: list[Any] = [record.key, record.customer, record.credit_type, record.amount,
                           self.max_queued, GROUP]  # fmt: skip
        answer = await self.redis.run("usage_accept", lambda r: self._accept(keys, args, client=r))
        result = _text(answer[0])
        if result == "existing":
            return Accepted("existing", _text(answer[1]))
        if result == "refused":
            self.redis.write_refused()
        return Accepted(result)  # type: ignore[arg-type]

    async def outcome(self, key: str) -> dict[bytes, bytes] | None:
        """The record's stored fields, ``None`` when no record has ``key``."""
        name = self.keys.usage_record(key)
        fields: dict[Any, Any] = await self.redis.run("usage_outcome", lambda r: r.hgetall(name))
        return {bytes(k): bytes(v) for k, v in fields.items()} or None

    # -- delivering ---------------------------------------------------------------------

    async def lease_round(self, holder: str, lease_ms: int, first: int) -> LeaseRound:
        """Renew, shed and take partitions (invariant 4)."""
        keys = [self.keys.usage_members, *self.leases]
        args: list[Any] = [holder, lease_ms, first]
        kept, taken, live = await self.redis.run(
            "usage_lease", lambda r: self._lease(keys, args, client=r)
        )
        return LeaseRound(frozenset(map(int, kept)), frozenset(map(int, taken)), int(live))

    async def release(self, holder: str) -> None:
        keys = [self.keys.usage_members, *self.leases]
        await self.redis.run("usage_release", lambda r: self._release(keys, [holder], client=r))

    async def claim(self, partition: int, holder: str, lease_ms: int) -> int:
        """Take over every pending entry of the partition's group (``XAUTOCLAIM`` from
        any consumer: the caller holds the lease, so no one else may deliver them), and
        forget consumers gone for longer than a lease with nothing pending. Creates the
        group (and the stream) when missing. Returns the entries claimed."""
        stream = self.streams[partition]

        async def call(r: RedisClient) -> int:
            try:
                await r.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            claimed, cursor = 0, "0-0"
            while True:
                # Not JUSTID: redis-py then drops the cursor this loop needs.
                answer = await r.xautoclaim(
                    stream, GROUP, holder, min_idle_time=0, start_id=cursor, count=500
                )
                cursor = _text(answer[0])
                claimed += len(answer[1])
                if cursor == "0-0":
                    break
            for consumer in await r.xinfo_consumers(stream, GROUP):
                name = _text(consumer["name"])
                if name != holder and not consumer["pending"] and consumer["idle"] > lease_ms:
                    await r.xgroup_delconsumer(stream, GROUP, name)
            return claimed

        return await self.redis.run("usage_claim", call)

    async def pending(self, partitions: Sequence[int]) -> dict[int, int]:
        """Entries read and not yet finished (the group's pending lists, every consumer's),
        per partition; a partition whose stream or group is gone counts 0."""

        async def call(r: RedisClient) -> list[Any]:
            async with r.pipeline(transaction=False) as pipe:
                for partition in partitions:
                    pipe.xpending(self.streams[partition], GROUP)
                return await pipe.execute(raise_on_error=False)

        answers = await self.redis.run("usage_pending", call)
        return {
            partition: int(answer["pending"]) if isinstance(answer, dict) else 0
            for partition, answer in zip(partitions, answers, strict=True)
        }

    async def read(self, holder: str, wanted: Sequence[tuple[int, str, int]]) -> list[Entry]:
        """Entries of several partitions in one round trip: for each (partition, from,
        count), ``from`` ``>`` reads new entries, an id reads the caller's own pending
        ones after it (the claimed history). In stream order per partition."""

        async def call(r: RedisClient) -> list[Any]:
            async with r.pipeline(transaction=False) as pipe:
                for partition, start, count in wanted:
                    pipe.xreadgroup(GROUP, holder, {self.streams[partition]: start}, count=count)
                return await pipe.execute(raise_on_error=False)

        answers = await self.redis.run("usage_read", call)
        out: list[Entry] = []
        for (partition, _, _), answer in zip(wanted, answers, strict=True):
            if isinstance(answer, Exception):
                if "NOGROUP" in str(answer):
                    continue  # the stream or its group is gone (FLUSHALL): claim again
                raise RedisDown("usage_read") from answer
            for _stream, entries in answer or ():
                for raw_id, fields in entries:
                    out.append(_entry(partition, _text(raw_id), fields))
        return out

    async def finish(
        self,
        holder: str,
        entry: Entry,
        state: str,
        status: int,
        answer: bytes,
        replayed: bool,
    ) -> bool:
        """Acknowledge the entry and store its outcome, if ``holder`` still holds the
        partition (invariant 3). False: it does not; nothing was done."""
        keys = [self.leases[entry.partition], self.streams[entry.partition]]
        args: list[Any] = [holder, entry.id, GROUP]
        record = entry.record
        if record is not None:
            keys.append(self.keys.usage_record(record.key))
            args += [state, status, answer, "1" if replayed else "0", self._outcome_ms,
                     record.key, record.customer, record.credit_type, record.amount,
                     entry.accepted_ms]  # fmt: skip
        done = await self.redis.run("usage_finish", lambda r: self._finish(keys, args, client=r))
        return bool(done)

    async def note_attempt(self, entry: Entry, error: str) -> None:
        """Count a failed attempt on the entry's record (``attempts``, ``lastAttempt``)."""
        if entry.record is None:
            return
        keys = [self.keys.usage_record(entry.record.key)]
        await self.redis.run("usage_note", lambda r: self._note(keys, [entry.id, error], client=r))

    async def stats(self) -> Stats:
        """Records queued in the tenant's partitions and when the oldest was accepted."""
        keys = list(self.streams)
        now_ms, queued, oldest = await self.redis.run(
            "usage_stats", lambda r: self._stats(keys, [], client=r)
        )
        text = _text(oldest)
        return Stats(int(now_ms), int(queued), int(text) if text else None)


def _entry(partition: int, entry_id: str, fields: Any) -> Entry:
    """A stream entry's fields as a record; ``None`` when deleted or not one of ours."""
    if not fields:
        return Entry(partition, entry_id, None)
    try:
        record = Record(
            key=fields[b"k"].decode(),
            customer=fields[b"c"].decode(),
            credit_type=fields[b"t"].decode(),
            amount=int(fields[b"a"]),
        )
        accepted = int(fields.get(b"at", b"0"))
    except (KeyError, ValueError, UnicodeDecodeError):
        return Entry(partition, entry_id, None)
    return Entry(partition, entry_id, record, accepted)
