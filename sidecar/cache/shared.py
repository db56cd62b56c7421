"""The shared tier: every Redis command on documents, locks, generations, epochs and
account sets, behind one interface (``SharedTier``) with two implementations.

``RedisTier`` is the fleet's shared cache; ``LocalTier`` is memory-only mode, where
the in-process layer is the whole cache and there is no fleet to coordinate: its
reads miss, its fills always win, its drops have nothing to reach. ``DocumentCache``
(memory, single-flight, fill policy) and ``Invalidator`` (issuing, the queue, the
fan-out listener) talk only to this interface. (Unleash Edge's persistence layer is
the model: one trait, a Redis and a file implementation.)

Its read path, every read of a loop iteration in one ``MGET``, is ``reads.py``.

The data, per tenant (``redis.keys``; every key shares the tenant's hash tag, so the
scripts below are single-slot on a cluster):

- ``entry`` (per kind and customer, TTL = the entry's stale deadline): the stored
  form (``Entry.dumps``), stamped with the kind's tenant generation (``tg``) and the
  tenant's epoch (``ep``) read when its fill began.
- ``lock`` (per kind and customer, TTL = the upstream timeout + 1 s): the fleet's
  single-flight: the one fill allowed to store a valid answer holds it.
- ``gen`` (per kind and customer, TTL 60 s): bumped only while a lock is held, so a
  fill of a previous release (which compares it) refuses to store; bounded by the
  fills in flight, so a flood of drops for unknown customers writes no key.
- ``tgen`` (per kind) and ``epoch`` (per tenant): tokens ``<redis ms>-<random>``,
  never counters, so a key lost and created again can never match an old stamp.
  No TTL: a handful of keys per tenant that an eviction policy must never take
  (``volatile-lru`` only evicts keys with a TTL).
- ``seq`` (per tenant, no TTL): incremented by every drop; a server whose ``seq``
  is lower than one a sidecar already saw went back in time.
- account sets (TTL ``SIDECAR_CACHE_TTL + SIDECAR_STALE_TTL``): customers per
  billing account, learnt from fills and writes.

Invariants (tests/test_shared_tier.py checks each against a real redis-server):

1. **A drop expires, it never destroys.** A customer drop prefixes the stored value
   with ``!`` (explicitly dropped) and keeps its TTL; a tenant-wide drop sets a new
   ``tgen``, so every stored entry of the kind mismatches. Either way the value
   stays as the stale fallback. Under ``maxmemory`` with nothing to evict, where a
   write is refused (OOM), a customer drop deletes instead and a tenant-wide drop
   deletes ``tgen`` (no stored stamp ever matches an absent generation).
2. **A stored entry is valid** only while unmarked, its ``tg`` equals the kind's
   current ``tgen`` and its ``ep`` the current ``epoch``, and this sidecar trusts
   Redis (``RedisTier.trusted``: not between losing Redis or the fan-out and the
   epoch renewal that follows). Everything else is the stale fallback.
3. **Only the lock holder stores a valid answer.** A drop takes the lock away from a
   fill in flight; that fill then stores its answer only as the fallback (marked),
   and only where no valid entry is. So no answer fetched before a drop is ever
   stored as valid after it.
4. **The epoch moves when Redis may have lost writes**: when it is found missing
   (FLUSHALL, an empty restart), when ``seq`` went backwards (a restore, a lagging
   replica), when Redis stalled for ``SIDECAR_REDIS_TIMEOUT`` (no sidecar's health
   check ran meanwhile, and the one that finally ran had waited in Redis: long
   enough for some sidecar to give up, queue a drop and perhaps die with it), and
   when a sidecar gets Redis back after losing its connection (refused, reset:
   Redis restarted, failed over, became unreachable) unless someone renewed it after
   this sidecar's last contact: one renewal per outage for the whole fleet, each
   active customer revalidated once (the fill lock) with its old entry kept as the
   fallback.

Scripts are registered once (``register_script``: EVALSHA, loaded again by redis-py
when a restarted server has forgotten them).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from ..redis.conn import RedisConn, RedisDown
from ..redis.url import RedisClient
from .entry import DROPPED, PRECAUTION, Entry, Stamp
from .kinds import Kind
from .reads import RedisReads

__all__ = [
    "Check",
    "LocalTier",
    "RedisTier",
    "SharedTier",
    "Ticket",
    "judge",
]

#: TTL of the fleet's last check (``beat``): a fleet away this long renews the epoch.
_BEAT_TTL_MS: Final = 60_000
#: TTL of a per-customer generation (only bumped while a fill holds the lock).
_GEN_TTL_MS: Final = 60_000
#: ``_CHECK``'s reasons for a new epoch.
_CHANGED: Final = {1: "flushed", 2: "regressed", 3: "stalled"}
#: The ``!`` that marks a stored value as explicitly dropped.
_DROPPED_MARK: Final = b"!"

# Lua. ``redis.pcall`` around every write that Redis refuses under OOM (a script
# without flags runs, and only its denied commands fail), so drops still apply.

# KEYS: entry, lock, tgen, epoch, beat. ARGV: lock token, lock ms, random suffix, beat
# TTL ms. Takes the lock (NX), creates a missing tgen or epoch (a fresh token: an
# absent one matches no stamp; an epoch made here starts the fleet's beat too, as the
# health check's would), and returns {tgen or nil, epoch or nil, won (1 taken, 0 held
# by another, -1 refused: OOM), the stored entry or nil}.
_BEGIN: Final = """
local function now_ms()
  local t = redis.call('TIME')
  return t[1] * 1000 + math.floor(t[2] / 1000)
end
local r = redis.pcall('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2])
local won = 0
if type(r) == 'table' and r.ok then won = 1 elseif type(r) == 'table' and r.err then won = -1 end
for i = 3, 4 do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    local now = now_ms()
    redis.pcall('SET', KEYS[i], now .. '-' .. ARGV[3], 'NX')
    if i == 4 then redis.pcall('SET', KEYS[5], now, 'PX', ARGV[4], 'NX') end
  end
end
return {redis.call('GET', KEYS[3]), redis.call('GET', KEYS[4]), won, redis.call('GET', KEYS[1])}
"""

# KEYS: entry, lock[, account set]. ARGV: value ('' = nothing to store), ttl ms, lock
# token ('' = never held), overtaken (1/0)[, customer, account set ttl s].
# Returns 1 stored as valid, 2 stored as the (marked) fallback, 0 nothing, -1 refused.
_STORE: Final = """
local mine = ARGV[3] ~= '' and redis.call('GET', KEYS[2]) == ARGV[3]
local result = 0
if ARGV[1] ~= '' then
  local value, stored = ARGV[1], 1
  if not mine or ARGV[4] == '1' then
    local cur = redis.call('GET', KEYS[1])
    if cur and string.byte(cur, 1) ~= 33 then value = nil end
    value, stored = value and ('!' .. value), 2
  end
  if value then
    local r = redis.pcall('SET', KEYS[1], value, 'PX', ARGV[2])
    result = (type(r) == 'table' and r.err) and -1 or stored
  end
end
if mine then redis.call('DEL', KEYS[2]) end
if KEYS[3] then
  if type(redis.pcall('SADD', KEYS[3], ARGV[5])) == 'number' then
    redis.call('EXPIRE', KEYS[3], ARGV[6])
  end
end
return result
"""

# KEYS: lock. ARGV: token. Deletes the lock only if we still hold it.
_UNLOCK: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# The fan-out message: ARGV[1] is a JSON object, to which the drop's seq is added.
_PUBLISH: Final = """
local function publish(seq)
  local message = string.sub(ARGV[1], 1, -2) .. ',"seq":' .. seq .. '}'
  redis.call(ARGV[3], ARGV[2], message)
end
local function next_seq()
  local seq = redis.pcall('INCR', KEYS[1])
  if type(seq) ~= 'number' then return 0 end
  return seq
end
"""

# KEYS: seq, then (entry, lock, gen) per kind and customer. ARGV: message, channel,
# publish command, gen ttl ms. Marks each entry dropped (or deletes it under OOM),
# takes the lock from a fill in flight (bumping the generation a previous release's
# fill compares), publishes. Returns the seq.
_DROP: Final = (
    _PUBLISH
    + """
local seq = next_seq()
for i = 2, #KEYS, 3 do
  local v = redis.call('GET', KEYS[i])
  if v and string.byte(v, 1) ~= 33 then
    local r = redis.pcall('SET', KEYS[i], '!' .. v, 'KEEPTTL')
    if type(r) == 'table' and r.err then redis.call('DEL', KEYS[i]) end
  end
  if redis.call('EXISTS', KEYS[i + 1]) == 1 then
    redis.call('DEL', KEYS[i + 1])
    if type(redis.pcall('INCR', KEYS[i + 2])) == 'number' then
      redis.call('PEXPIRE', KEYS[i + 2], ARGV[4])
    end
  end
end
publish(seq)
return seq
"""
)

# KEYS: seq, then the tenant generations of the kinds dropped. ARGV: message, channel,
# publish command, random suffix. A new token per generation (deleted under OOM).
_DROP_TENANT: Final = (
    _PUBLISH
    + """
local t = redis.call('TIME')
local token = (t[1] * 1000 + math.floor(t[2] / 1000)) .. '-' .. ARGV[4]
local seq = next_seq()
for i = 2, #KEYS do
  local r = redis.pcall('SET', KEYS[i], token)
  if type(r) == 'table' and r.err then redis.call('DEL', KEYS[i]) end
end
publish(seq)
return seq
"""
)

# KEYS: epoch, seq, beat, then every tenant generation. ARGV: random suffix, seq floor
# (the highest the caller saw), message, channel, publish command, stall ms, beat TTL
# ms, the caller's clock at sending (ms), the caller's usual offset of Redis's clock
# from its own ('' when it has none yet), wait ms, '1' when the caller lost Redis
# since its last check. The health check: Redis's clock,
# the epoch and seq, whether Redis takes writes (a SET NX, which OOM refuses even when
# the key exists). And in the same atomic step, so of all the sidecars checking
# exactly one acts:
# - a missing epoch (FLUSHALL, an empty restart) is created (1);
# - the epoch is renewed when seq fell below the floor (2: a restore, a lagging
#   replica), or (3) when no sidecar's check ran for ``stall`` ms and the caller
#   either waited in Redis for ``wait`` ms with this check or lost Redis meanwhile
#   (Redis stalled: a hang long enough for some sidecar to give up and queue a drop
#   that may die with it; a fleet that merely checked nothing, its processes paused,
#   is not a stall), or when ``beat`` is gone while the epoch is not (no sidecar
#   checked for its TTL: the fleet was away);
# - seq is raised to the floor, ``beat`` set to now, a new epoch published.
# Returns {now ms, epoch or nil, seq, writable, 0 | 1 | 2 | 3}.
_CHECK: Final = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local token = now .. '-' .. ARGV[1]
local floor = tonumber(ARGV[2])
local seq = tonumber(redis.call('GET', KEYS[2]) or '0')
local beat = tonumber(redis.call('GET', KEYS[3]))
local changed = 0
local writable = 1
if redis.call('EXISTS', KEYS[1]) == 0 then
  changed = 1
elseif seq < floor then
  changed = 2
elseif not beat then
  changed = 3
elseif now - beat >= tonumber(ARGV[6]) and (ARGV[11] == '1' or (ARGV[9] ~= ''
    and now - tonumber(ARGV[8]) - tonumber(ARGV[9]) >= tonumber(ARGV[10]))) then
  changed = 3
end
if changed >= 2 then
  local r = redis.pcall('SET', KEYS[1], token)
  if type(r) == 'table' and r.err then redis.call('DEL', KEYS[1]) end
end
for i = 1, #KEYS do
  if i ~= 2 and i ~= 3 then
    local r = redis.pcall('SET', KEYS[i], token, 'NX')
    if type(r) == 'table' and r.err then writable = 0 end
  end
end
if changed == 1 and redis.call('EXISTS', KEYS[1]) == 0 then changed = 0 end
redis.pcall('SET', KEYS[3], now, 'PX', ARGV[7])
if seq < floor then
  redis.pcall('SET', KEYS[2], floor)
end
if changed ~= 0 then redis.call(ARGV[5], ARGV[4], ARGV[3]) end
return {now, redis.call('GET', KEYS[1]), math.max(seq, floor), writable, changed}
"""

# KEYS: epoch, beat. ARGV: since ms, random suffix, message, channel, publish command,
# beat TTL ms. After an outage: renews the epoch unless it was set after ``since``
# (Redis time: another sidecar renewed it since this one's last contact), beats, and
# publishes the new epoch. Returns 1 when renewed (under OOM the epoch is deleted: no
# stamp matches).
_RENEW: Final = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local cur = redis.call('GET', KEYS[1])
if cur and ARGV[1] ~= '' then
  local set_at = tonumber(string.match(cur, '^(%d+)-'))
  if set_at and set_at > tonumber(ARGV[1]) then return 0 end
end
local r = redis.pcall('SET', KEYS[1], now .. '-' .. ARGV[2])
if type(r) == 'table' and r.err then redis.call('DEL', KEYS[1]) end
redis.pcall('SET', KEYS[2], now, 'PX', ARGV[6])
redis.call(ARGV[5], ARGV[4], ARGV[3])
return 1
"""


@dataclass(frozen=True, slots=True)
class Ticket:
    """A fill's claim on the shared tier (``SharedTier.begin_fill``)."""

    won: bool
    """This fill holds the fleet's lock: its answer may be stored as valid."""
    held: bool
    """Another fill holds it (wait for its answer: ``wait_fill``)."""
    stamp: Stamp | None
    """What to stamp the stored answer with; ``None``: store nothing."""
    token: str
    """The lock token ('' when not won)."""
    raced: Entry | None
    """An entry stored since the caller's read (judged, see ``judge``)."""


#: A ticket for a fill that stores nothing and waits for nobody.
NO_TICKET: Final = Ticket(won=False, held=False, stamp=None, token="", raced=None)


@dataclass(frozen=True, slots=True)
class Check:
    """One health check of the shared tier (``SharedTier.check``)."""

    now_ms: int
    """Redis's clock (ms)."""
    epoch: str | None
    seq: int
    writable: bool
    """Redis accepts writes (False: OOM)."""
    changed: str | None
    """Why this check made a new epoch: ``flushed`` (it was missing: FLUSHALL, an
    empty restart), ``regressed`` (seq below what the caller saw) or ``stalled`` (no
    sidecar's check ran for the stall bound); ``None``."""


def judge(raw: Any, kind: Kind, tgen: str | None, epoch: str | None, trusted: bool) -> Entry | None:
    """A stored value as an entry, expired unless valid (invariant 2) under the kind's
    current tenant generation ``tgen`` and ``epoch``; ``None`` when there is none or it
    is unreadable."""
    if not isinstance(raw, bytes):
        return None
    dropped = raw[:1] == _DROPPED_MARK
    entry, stamp = Entry.loads_stamped(raw[1:] if dropped else raw, kind)
    if entry is None:
        return None
    if dropped or stamp is None or tgen is None or stamp[0] != tgen:
        # A stored entry without a stamp (a previous release's) is revalidated once.
        entry.expire(DROPPED if dropped or stamp is not None else PRECAUTION)
    elif epoch is None or stamp[1] != epoch or not trusted:
        entry.expire(PRECAUTION)
    return entry


def _text(value: Any) -> str | None:
    if value is None or value is False:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


class SharedTier(ABC):
    """What ``DocumentCache`` and ``Invalidator`` need from the fleet's shared cache."""

    #: Shared by a fleet (Redis). False: memory-only, the in-process layer is the cache.
    shared: bool = False
    #: Whether a valid-looking stored entry may be believed (see ``RedisTier``).
    trusted: bool = True

    def distrust(self) -> None:
        """Redis or the fan-out was lost: a drop may have been acknowledged and not
        reached Redis; stored entries are the fallback until the epoch is renewed."""
        self.trusted = False

    @abstractmethod
    def read(self, kind: Kind, ident: str) -> asyncio.Future[Entry | None]:
        """The stored entry, judged (``judge``): coalesced with the loop iteration's
        other reads. The future raises ``RedisDown``."""

    @abstractmethod
    async def begin_fill(self, kind: Kind, ident: str) -> Ticket:
        """Try to take the fleet's fill lock (raises ``RedisDown``)."""

    @abstractmethod
    async def wait_fill(self, kind: Kind, ident: str, floor: float) -> Entry | None:
        """Another sidecar holds the lock: its answer if it stores one fresh at
        ``floor`` before letting go or timing out, else ``None``."""

    @abstractmethod
    async def finish_fill(
        self,
        kind: Kind,
        ident: str,
        ticket: Ticket,
        entry: Entry | None,
        *,
        overtaken: bool,
        account: tuple[str, int] | None = None,
    ) -> int:
        """Store the answer (valid only while holding the lock and not ``overtaken``;
        else as the fallback), release the lock, add ``ident`` to the ``account``
        set (name, TTL s). Never raises; returns the store script's result."""

    @abstractmethod
    async def release(self, kind: Kind, ident: str, ticket: Ticket) -> None:
        """Let go of the lock ``ticket`` holds without storing anything (never raises)."""

    @abstractmethod
    async def expire_customers(
        self, kinds: Sequence[Kind], customers: Sequence[str], message: bytes
    ) -> int:
        """Drop customers (invariant 1) and publish ``message``; returns the seq
        (raises ``RedisDown``)."""

    @abstractmethod
    async def expire_tenant(self, kinds: Sequence[Kind], message: bytes) -> int:
        """Drop every document of ``kinds`` (invariant 1) and publish ``message``."""

    @abstractmethod
    async def link(self, account: str, customer: str, ttl: int) -> None:
        """Add ``customer`` to ``account``'s set (raises ``RedisDown``)."""

    @abstractmethod
    async def members(self, account: str) -> set[str]:
        """The customers of ``account`` every sidecar learnt (raises ``RedisDown``)."""

    @abstractmethod
    async def check(
        self,
        seq_floor: int,
        message: bytes,
        sent_ms: int = 0,
        offset_ms: int | None = None,
        lost: bool = False,
    ) -> Check:
        """One health check: creates a missing epoch, renews one whose drop sequence
        fell below ``seq_floor``, or after a stall the caller went through (this check
        waited in Redis: sent at ``sent_ms`` by a clock usually ``offset_ms`` behind
        Redis's; or the caller ``lost`` Redis since its last check), publishing
        ``message`` when it did (invariant 4; raises ``RedisDown``)."""

    @abstractmethod
    async def renew_epoch(self, since_ms: int | None, message: bytes) -> bool:
        """After an outage: renew the epoch unless it was renewed after ``since_ms``
        (Redis time; ``None``: unconditionally), publishing ``message``;
        True when renewed (raises ``RedisDown``)."""

    @abstractmethod
    async def close(self) -> None:
        """Release what the tier holds (not the Redis client: the app owns it)."""


class LocalTier(SharedTier):
    """Memory-only mode: nothing is shared, so there is nothing to read, lock, store
    or reach; the in-process layer (and its single-flight) is the whole cache."""

    shared = False

    def read(self, kind: Kind, ident: str) -> asyncio.Future[Entry | None]:
        future: asyncio.Future[Entry | None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    async def begin_fill(self, kind: Kind, ident: str) -> Ticket:
        return NO_TICKET

    async def wait_fill(self, kind: Kind, ident: str, floor: float) -> Entry | None:
        return None

    async def finish_fill(
        self,
        kind: Kind,
        ident: str,
        ticket: Ticket,
        entry: Entry | None,
        *,
        overtaken: bool,
        account: tuple[str, int] | None = None,
    ) -> int:
        return 0

    async def release(self, kind: Kind, ident: str, ticket: Ticket) -> None:
        return None

    async def expire_customers(
        self, kinds: Sequence[Kind], customers: Sequence[str], message: bytes
    ) -> int:
        return 0

    async def expire_tenant(self, kinds: Sequence[Kind], message: bytes) -> int:
        return 0

    async def link(self, account: str, customer: str, ttl: int) -> None:
        return None

    async def members(self, account: str) -> set[str]:
        return set()

    async def check(
        self,
        seq_floor: int,
        message: bytes,
        sent_ms: int = 0,
        offset_ms: int | None = None,
        lost: bool = False,
    ) -> Check:
        return Check(now_ms=0, epoch=None, seq=0, writable=True, changed=None)

    async def renew_epoch(self, since_ms: int | None, message: bytes) -> bool:
        return False

    async def close(self) -> None:
        return None


class RedisTier(SharedTier):
    """The fleet's shared tier in Redis (one server, Sentinel or Cluster).

    ``trusted`` is this sidecar's belief that Redis holds every drop acknowledged
    so far: it is lost with Redis or the fan-out subscription (``distrust``) and
    comes back with ``renew_epoch``'s renewal (``Invalidator``). While it is lost,
    every stored entry is only the stale fallback (invariant 2).
    """

    shared = True

    def __init__(
        self,
        redis: RedisConn,
        kinds: Iterable[Kind],
        *,
        pool_size: int,
        upstream_timeout: float,
        stall_after: float = 0.5,
        check_interval: float = 0.25,
    ) -> None:
        self.redis = redis
        #: No sidecar's check for this long: Redis stalled (``_CHECK``). As long as a
        #: command takes to give up (``SIDECAR_REDIS_TIMEOUT``): a stall that made some
        #: sidecar queue a drop is always this long.
        self._stall_ms = int(stall_after * 1000)
        #: A check sent during such a stall waits at least this long in Redis: checks go
        #: out every ``check_interval``, so one is always that far into it.
        self._wait_ms = int(max(stall_after - check_interval - 0.05, 0.05) * 1000)
        self.keys = redis.keys
        self._kinds = tuple(kinds)
        self._lock_ms = int((upstream_timeout + 1) * 1000)
        self._wait_s = upstream_timeout
        self.trusted = True
        client = redis.client
        self._begin = client.register_script(_BEGIN)
        self._store = client.register_script(_STORE)
        self._unlock = client.register_script(_UNLOCK)
        self._drop = client.register_script(_DROP)
        self._drop_tenant = client.register_script(_DROP_TENANT)
        self._check = client.register_script(_CHECK)
        self._renew = client.register_script(_RENEW)
        self._publish_command = "SPUBLISH" if redis.cluster else "PUBLISH"
        self.reads = RedisReads(redis, self.keys, pool_size, self._judged)

    def tgen_key(self, kind: Kind) -> str:
        return self.keys.kind(kind.key).tenant_gen

    def _judged(self, raw: Any, kind: Kind, tgen: str | None, epoch: str | None) -> Entry | None:
        """``judge`` with this sidecar's trust (``RedisReads`` calls it per value)."""
        return judge(raw, kind, tgen, epoch, self.trusted)

    # -- reads and fills ---------------------------------------------------------------

    def read(self, kind: Kind, ident: str) -> asyncio.Future[Entry | None]:
        return self.reads.get(kind, self.keys.kind(kind.key).entry(ident))

    async def begin_fill(self, kind: Kind, ident: str) -> Ticket:
        names = self.keys.kind(kind.key)
        token = secrets.token_hex(8)
        keys = [
            names.entry(ident),
            names.lock(ident),
            names.tenant_gen,
            self.keys.epoch,
            self.keys.beat,
        ]
        args: list[Any] = [token, self._lock_ms, secrets.token_hex(4), _BEAT_TTL_MS]
        tgen, epoch, won, raw = await self.redis.run(
            "begin_fetch", lambda r: self._begin(keys, args, client=r)
        )
        stamp = (_text(tgen), _text(epoch))
        return Ticket(
            won=won == 1,
            held=won == 0,
            stamp=None if stamp[0] is None or stamp[1] is None else stamp,  # type: ignore[arg-type]
            token=token if won == 1 else "",
            raced=judge(raw, kind, stamp[0], stamp[1], self.trusted),
        )

    async def wait_fill(self, kind: Kind, ident: str, floor: float) -> Entry | None:
        names = self.keys.kind(kind.key)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait_s
        # Start short: the holder is often a local-network round trip from done.
        delay = 0.002

        async def call(r: RedisClient) -> list[Any]:
            async with r.pipeline(transaction=False) as pipe:
                pipe.mget(names.entry(ident), names.tenant_gen, self.keys.epoch)
                pipe.exists(names.lock(ident))
                return await pipe.execute()

        while loop.time() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.05)
            try:
                (raw, tgen, epoch), locked = await self.redis.run("wait_fetch", call)
            except RedisDown:
                return None
            entry = judge(raw, kind, _text(tgen), _text(epoch), self.trusted)
            if entry is not None and entry.is_fresh(floor):
                return entry
            if not locked:
                return None
        return None

    async def finish_fill(
        self,
        kind: Kind,
        ident: str,
        ticket: Ticket,
        entry: Entry | None,
        *,
        overtaken: bool,
        account: tuple[str, int] | None = None,
    ) -> int:
        names = self.keys.kind(kind.key)
        keys = [names.entry(ident), names.lock(ident)]
        store = entry is not None and ticket.stamp is not None
        if not store and not ticket.token and account is None:
            return 0
        value = entry.dumps(ticket.stamp) if entry is not None and store else b""
        ttl_ms = 1
        if entry is not None:
            ttl_ms = max(int((entry.stale_until - time.time()) * 1000), 1)
        args: list[Any] = [value, ttl_ms, ticket.token, "1" if overtaken else "0"]
        if account is not None:
            keys.append(self.keys.account(account[0]))
            args += [ident, account[1]]
        try:
            result = await self.redis.run("store", lambda r: self._store(keys, args, client=r))
        except RedisDown:
            return 0
        if result == -1:
            self.redis.write_refused()
        return int(result)

    # -- drops -------------------------------------------------------------------------

    async def expire_customers(
        self, kinds: Sequence[Kind], customers: Sequence[str], message: bytes
    ) -> int:
        keys: list[str] = [self.keys.seq]
        for kind in kinds:
            names = self.keys.kind(kind.key)
            for c in customers:
                keys += (names.entry(c), names.lock(c), names.gen(c))
        args: list[Any] = [message, self.keys.channel, self._publish_command, _GEN_TTL_MS]
        seq = await self.redis.run("invalidate", lambda r: self._drop(keys, args, client=r))
        return int(seq)

    async def expire_tenant(self, kinds: Sequence[Kind], message: bytes) -> int:
        keys = [self.keys.seq, *(self.tgen_key(k) for k in kinds)]
        args: list[Any] = [message, self.keys.channel, self._publish_command, secrets.token_hex(4)]
        seq = await self.redis.run(
            "invalidate_all", lambda r: self._drop_tenant(keys, args, client=r)
        )
        return int(seq)

    # -- account sets ------------------------------------------------------------------

    async def link(self, account: str, customer: str, ttl: int) -> None:
        key = self.keys.account(account)

        async def call(r: RedisClient) -> Any:
            async with r.pipeline(transaction=False) as pipe:
                pipe.sadd(key, customer)
                pipe.expire(key, ttl)
                return await pipe.execute()

        await self.redis.run("link", call)

    async def members(self, account: str) -> set[str]:
        key = self.keys.account(account)
        found = await self.redis.run("account_members", lambda r: r.smembers(key))
        return {m.decode() if isinstance(m, bytes) else str(m) for m in found}

    # -- the epoch ---------------------------------------------------------------------

    async def check(
        self,
        seq_floor: int,
        message: bytes,
        sent_ms: int = 0,
        offset_ms: int | None = None,
        lost: bool = False,
    ) -> Check:
        keys = [
            self.keys.epoch,
            self.keys.seq,
            self.keys.beat,
            *(self.tgen_key(k) for k in self._kinds),
        ]
        args: list[Any] = [
            secrets.token_hex(4),
            seq_floor,
            message,
            self.keys.channel,
            self._publish_command,
            self._stall_ms,
            _BEAT_TTL_MS,
            sent_ms,
            "" if offset_ms is None else offset_ms,
            self._wait_ms,
            "1" if lost else "0",
        ]
        now_ms, epoch, seq, writable, changed = await self.redis.run(
            "health_check", lambda r: self._check(keys, args, client=r)
        )
        return Check(
            now_ms=int(now_ms),
            epoch=_text(epoch),
            seq=int(seq),
            writable=bool(writable),
            changed=_CHANGED.get(int(changed)),
        )

    async def renew_epoch(self, since_ms: int | None, message: bytes) -> bool:
        keys = [self.keys.epoch, self.keys.beat]
        args: list[Any] = [
            "" if since_ms is None else since_ms,
            secrets.token_hex(4),
            message,
            self.keys.channel,
            self._publish_command,
            _BEAT_TTL_MS,
        ]
        renewed = await self.redis.run("renew_epoch", lambda r: self._renew(keys, args, client=r))
        return bool(renewed)

    async def release(self, kind: Kind, ident: str, ticket: Ticket) -> None:
        if not ticket.token:
            return
        key = self.keys.kind(kind.key).lock(ident)
        args = [ticket.token]
        with contextlib.suppress(RedisDown):
            await self.redis.run("unlock", lambda r: self._unlock([key], args, client=r))

    async def close(self) -> None:
        await self.reads.close()
