"""The cache: an in-process LRU in front of Redis, single-flight fills, for every
document kind.

One mechanism, ``DocumentCache``, instantiated once per kind (``kinds.py``:
entitlements, a customer's flags, the tenant's global flags); ``Caches`` holds
the three. Everything below holds for each kind alike, with the kind's own TTL,
Redis keys and metric label.

Lookup order: memory (fresh) -> Redis (fresh) -> upstream. Misses for one
document share one fill (single-flight in this process, a short Redis lock
across sidecars), and an entry past its fresh window is still served, marked
``stale``, when the upstream cannot answer, until ``SIDECAR_STALE_TTL`` ends.

The invalidation race: a fill records what it started from (a ``Flight`` in this
process, the document's and the kind's tenant-wide generation numbers in Redis).
An invalidation marks the flight and bumps the generations, so the answer
fetched before it is handed to the callers already waiting but never stored: the
store script compares the generations atomically, and memory checks the flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection

from ..config import Settings
from ..errors import UpstreamError, UpstreamTimeout
from ..metrics import Metrics
from ..redis.conn import RedisConn, RedisDown
from ..redis.keys import KindKeys
from ..redis.url import RedisClient
from ..tasks import cancel_and_wait
from ..upstream import VellumClient
from .entry import Entry, Lookup
from .kinds import AXES, ENTITLEMENTS, FLAGS, GLOBAL_FLAGS, Axis, Kind
from .memory import MemoryLayer

__all__ = ["Caches", "DocumentCache", "Flight"]

log = logging.getLogger("sidecar.cache")

# A miss costs Redis two round trips of its own besides the read it shares with the
# other reads of its loop iteration (``RedisReads``): _BEGIN_SCRIPT, and after the
# upstream's answer _STORE_SCRIPT.
#
# Read the generations, try to take the fetch lock and read the entry again.
# KEYS: entry, document gen, tenant gen, lock. ARGV: lock token, lock ms.
# Returns {document gen, tenant gen, 1 if the lock was taken, the entry or nil}.
_BEGIN_SCRIPT: Final = """
local won = redis.call('SET', KEYS[4], ARGV[1], 'NX', 'PX', ARGV[2])
return {redis.call('GET', KEYS[2]) or '0', redis.call('GET', KEYS[3]) or '0',
        won and 1 or 0, redis.call('GET', KEYS[1])}
"""
# SET the entry only if neither the document's nor the kind's tenant-wide generation
# moved since the fill began (and the fill was not overtaken here: ARGV[5] = 1),
# release the fetch lock if we still hold it, and record the customer's account.
# KEYS: entry, document gen, tenant gen, lock[, account set]. ARGV: expected document
# gen, expected tenant gen, value, ttl ms, store (1/0), lock token or ''[, customer,
# account set ttl s]. Returns 1 when stored.
_STORE_SCRIPT: Final = """
local stored = 0
if ARGV[5] == '1' and (redis.call('GET', KEYS[2]) or '0') == ARGV[1]
    and (redis.call('GET', KEYS[3]) or '0') == ARGV[2] then
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
  stored = 1
end
if ARGV[6] ~= '' and redis.call('GET', KEYS[4]) == ARGV[6] then
  redis.call('DEL', KEYS[4])
end
if KEYS[5] then
  redis.call('SADD', KEYS[5], ARGV[7])
  redis.call('EXPIRE', KEYS[5], ARGV[8])
end
return stored
"""
# Delete the lock only if we still hold it.
_UNLOCK_SCRIPT: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
#: Keys per MGET; a larger batch is split (each part its own round trip, at once).
_MGET_BATCH: Final = 256
#: Connections borrowed from the pool for the coalesced reads (``RedisReads``).
_READERS: Final = 4


class RedisReads:
    """Entry reads coalesced: every ``get`` issued in one loop iteration, of any kind,
    goes to Redis as one ``MGET`` (the tenant's keys share one hash slot, so this
    holds on a cluster too).

    The first ``get`` of an iteration schedules the flush with ``call_soon``, which
    runs after every task already ready in that iteration, so the reads of all the
    requests parsed together travel in one round trip.

    The round trips go over up to ``_READERS`` connections borrowed from the pool
    for good (one server or Sentinel; a cluster keeps its own routing): redis-py's
    pool spends more per command on taking, checking and returning a connection
    than the read itself costs (docs/performance.md). A borrowed connection
    carries one read at a time; when every one is busy, the read takes the pool
    path. A failed read closes every idle borrowed connection, since they share
    the failure's cause (a restarted Redis leaves them all stale), and each
    reconnects on its next use, so ``RedisConn``'s one retry meets a fresh one.
    """

    def __init__(self, redis: RedisConn, pool_size: int) -> None:
        self.redis = redis
        self._pending: dict[str, list[asyncio.Future[Any]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        client = redis.client
        self._pool: ConnectionPool | None = (
            client.connection_pool if isinstance(client, Redis) else None
        )
        #: At most a quarter of the pool, so scripts and the fan-out keep theirs.
        self._max_readers = min(_READERS, pool_size // 4)
        self._readers: list[AbstractConnection] = []
        self._idle: list[AbstractConnection] = []
        self._borrowing = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def borrowed(self) -> int:
        """Connections borrowed from the pool so far (at most ``_READERS``)."""
        return len(self._readers)

    def get(self, key: str) -> asyncio.Future[Any]:
        """A future for the key's value (``bytes`` or ``None``); ``RedisDown`` on failure."""
        loop = self._loop
        if loop is None:
            # Kept: on Python 3.11 each get_running_loop() is a getpid() system call.
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        waiting = self._pending.get(key)
        if waiting is not None:
            waiting.append(future)
            return future
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending[key] = [future]
        return future

    def _flush(self) -> None:
        pending, self._pending = self._pending, {}
        loop = self._loop
        assert loop is not None  # get() scheduled this call on it
        keys = list(pending)
        for start in range(0, len(keys), _MGET_BATCH):
            part = {k: pending[k] for k in keys[start : start + _MGET_BATCH]}
            task = loop.create_task(self._read(part))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _read(self, part: dict[str, list[asyncio.Future[Any]]]) -> None:
        keys = list(part)
        operation = "get" if len(keys) == 1 else "mget"
        try:
            values = await self.redis.run(operation, lambda r: self._mget(r, keys))
        except RedisDown as exc:
            for futures in part.values():
                for f in futures:
                    if not f.done():
                        f.set_exception(RedisDown(*exc.args))
            return
        for futures, value in zip(part.values(), values, strict=True):
            for f in futures:
                if not f.done():
                    f.set_result(value)

    async def _mget(self, client: RedisClient, keys: list[str]) -> list[Any]:
        """The values of ``keys``, over an idle borrowed connection when there is one."""
        conn = await self._reader()
        if conn is None:
            if len(keys) == 1:
                return [await client.get(keys[0])]
            return list(await client.mget(keys))
        try:
            if not conn.is_connected:
                # Through connect() (as the pool does), which a Sentinel connection
                # overrides to ask for the current master's address first.
                await conn.connect()  # type: ignore[no-untyped-call]
            if len(keys) == 1:
                await conn.send_command("GET", keys[0])
                values = [await conn.read_response()]
            else:
                await conn.send_command("MGET", *keys)
                values = list(await conn.read_response())
        except BaseException:
            # redis-py closed this connection on its way out; the idle ones go too
            # (without waiting for their sockets to close: nothing here may hang).
            for other in list(self._idle):
                await other.disconnect(nowait=True)
            raise
        finally:
            self._idle.append(conn)
        return values

    async def _reader(self) -> AbstractConnection | None:
        """An idle borrowed connection (borrowing one more while below the limit)."""
        if self._idle:
            return self._idle.pop()
        if self._pool is None or self._borrowing + len(self._readers) >= self._max_readers:
            return None
        self._borrowing += 1  # counted across the await: another read may ask meanwhile
        try:
            conn: AbstractConnection = await self._pool.get_connection()  # type: ignore[no-untyped-call]
        finally:
            self._borrowing -= 1
        self._readers.append(conn)
        return conn

    async def close(self) -> None:
        await cancel_and_wait(self._tasks)
        # Closed, not handed back: the pool is closing too (the app's cleanup closes
        # the client next), and taking its locks here could wait on a command stuck
        # in it. Its close skips a connection already closed.
        for conn in self._readers:
            await conn.disconnect(nowait=True)
        self._readers.clear()
        self._idle.clear()


class Flight:
    """One fill in progress; ``invalidated`` is set when an invalidation overtakes it."""

    __slots__ = ("invalidated", "task")

    def __init__(self) -> None:
        self.invalidated = False
        self.task: asyncio.Task[Lookup] | None = None


class DocumentCache:
    """The cache of one document kind; ids are customer ids (``GLOBAL_ID`` for the
    tenant-wide kind)."""

    def __init__(
        self,
        kind: Kind,
        settings: Settings,
        upstream: VellumClient,
        metrics: Metrics,
        redis: RedisConn | None,
        reads: RedisReads | None = None,
    ) -> None:
        self.kind = kind
        self.settings = settings
        self.upstream = upstream
        self.metrics = metrics
        self.redis = redis
        self.keys: KindKeys | None = redis.keys.kind(kind.key) if redis is not None else None
        if redis is not None and reads is None:
            reads = RedisReads(redis, settings.redis_pool_size)
        self.reads = reads
        self.memory = MemoryLayer(settings.memory_max_entries)
        self._ttl = kind.ttl(settings)
        # With Redis shared and the fan-out not confirmed live, memory answers alone
        # only briefly, so a sidecar that missed a message is wrong for at most
        # SIDECAR_MEMORY_TTL.
        self._memory_ttl = settings.memory_ttl if redis is not None else float("inf")
        #: Set by the invalidator while its fan-out subscription is confirmed live
        #: (heartbeats answered): the in-process layer is kept coherent by the fan-out,
        #: so an entry answers from memory until its own freshness ends. The
        #: invalidator drops the layer the moment it cannot confirm the subscription.
        self.coherent = False
        self._inflight: dict[str, Flight] = {}
        #: Drops applied here so far: a Redis read that saw this number change while it
        #: waited (a drop overtook it) answers its caller but is not remembered.
        self._drops = 0
        self._background: set[asyncio.Task[Any]] = set()
        #: Called with (customer, entry) after every upstream fetch of a document naming
        #: an account (the account index, ``Invalidator``).
        self.on_fetched: Callable[[str, Entry], None] | None = None
        #: With Redis: the TTL (s) of the account sets the store adds the fetched
        #: customer to; ``None``: no account sets (``learn_accounts``).
        self.link_ttl: int | None = None
        m = metrics.cache_lookups_by_kind
        k = kind.name
        self._m_mem_hit = m.labels(k, "memory", "hit")
        self._m_mem_miss = m.labels(k, "memory", "miss")
        self._m_redis_hit = m.labels(k, "redis", "hit")
        self._m_redis_miss = m.labels(k, "redis", "miss")
        self._m_redis_error = m.labels(k, "redis", "error")
        self._m_upstream = m.labels(k, "upstream", "fetch")
        self._m_stale = m.labels(k, "upstream", "stale")

    @property
    def inflight(self) -> int:
        """Fills in progress in this process."""
        return len(self._inflight)

    # -- reads -----------------------------------------------------------------

    def hit(self, customer: str) -> Lookup | None:
        """The in-process answer when memory may give it alone, else ``None``."""
        entry = self.hit_entry(customer)
        return Lookup(entry, "hit") if entry is not None else None

    def hit_entry(self, customer: str) -> Entry | None:
        """``hit``'s entry, without the ``Lookup`` (the ``can`` route's hot path).

        Synchronous, so a handler's memory hit costs no coroutine, and it reaches
        into the LRU's dict directly: each method call saved is worth a few
        percent of a hit (see docs/performance.md).
        """
        entry = self.memory.data.get(customer)
        if entry is not None:
            now = time.time()
            if now < entry.answer_until:
                self.memory.data.move_to_end(customer)
                self._m_mem_hit.value += 1
                if now >= entry.refresh_at:
                    self._refresh_ahead(customer, entry)
                return entry
        return None

    async def get(self, customer: str) -> Lookup:
        """The customer's entry; raises ``UpstreamError`` only when nothing usable exists."""
        found = self.hit(customer)
        if found is not None:
            return found
        return await self.get_missed(customer)

    async def get_missed(self, customer: str) -> Lookup:
        """``get`` once ``hit_entry`` has said memory cannot answer alone (the hot
        routes ask memory first themselves): Redis, then a fill."""
        item = self.memory.get(customer)
        self._m_mem_miss.inc()
        stale = item[0] if item else None
        flight = self._inflight.get(customer)
        if flight is None and self.reads is not None:
            # Redis first, read with the loop iteration's other reads and without a
            # task of its own: most misses in memory are hits in Redis.
            drops = self._drops
            assert self.keys is not None
            try:  # _redis_get, without a coroutine of its own on this path
                raw = await self.reads.get(self.keys.entry(customer))
            except RedisDown:
                self._m_redis_error.inc()
                raw = None
            stored = self._loads(raw)
            if stored is not None and stored.is_fresh(time.time()):
                self._m_redis_hit.inc()
                if self._drops == drops:  # no drop here overtook the read
                    self._put_memory(customer, stored)
                return Lookup(stored, "hit")
            self._m_redis_miss.inc()
            flight = self._inflight.get(customer)  # started by another caller meanwhile
            if flight is None:
                if stored is not None and (stale is None or stored.fetched_at > stale.fetched_at):
                    stale = stored
                flight = self._start(customer, stale, refresh_after=None, read=False)
        elif flight is None:
            flight = self._start(customer, stale, refresh_after=None)
        assert flight.task is not None
        return await asyncio.shield(flight.task)

    async def get_many(
        self, customers: Iterable[str], concurrency: int = 32, deadline: float | None = None
    ) -> dict[str, Any]:
        """Look up distinct customers, at most ``concurrency`` fills at once.

        Values are ``Lookup`` or the ``UpstreamError`` raised for that customer.
        With a ``deadline`` (seconds), customers not answered by then get an
        ``UpstreamTimeout`` with code ``timeout``: fills already started carry on
        in the background (and fill the cache), fills not started yet never start.
        """
        sem = asyncio.Semaphore(concurrency)

        async def one(c: str) -> Lookup | UpstreamError:
            async with sem:
                try:
                    return await self.get(c)
                except UpstreamError as exc:
                    return exc

        distinct = list(dict.fromkeys(customers))
        if deadline is None:
            results = await asyncio.gather(*(one(c) for c in distinct))
            return dict(zip(distinct, results, strict=True))
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(one(c)) for c in distinct]
        _, pending = await asyncio.wait(tasks, timeout=max(deadline, 0.0))
        for task in pending:
            task.cancel()  # get() shields the fill itself: only the wait is dropped
        await asyncio.gather(*pending, return_exceptions=True)
        late = UpstreamTimeout("not fetched within the batch deadline", code="timeout")
        return {
            c: late if task in pending else task.result()
            for c, task in zip(distinct, tasks, strict=True)
        }

    def _start(
        self, customer: str, stale: Entry | None, refresh_after: float | None, read: bool = True
    ) -> Flight:
        flight = Flight()
        task = asyncio.get_running_loop().create_task(
            self._fill(customer, flight, stale, refresh_after, read)
        )
        flight.task = task
        self._inflight[customer] = flight

        def done(t: asyncio.Task[Lookup]) -> None:
            if self._inflight.get(customer) is flight:
                del self._inflight[customer]
            if not t.cancelled():
                t.exception()  # retrieved here so a background refresh never warns

        task.add_done_callback(done)
        return flight

    def _refresh_ahead(self, customer: str, entry: Entry) -> None:
        """Stale-while-revalidate: one background fill near the end of the fresh window."""
        if customer in self._inflight:
            return
        flight = self._start(customer, entry, refresh_after=entry.fresh_until)
        assert flight.task is not None
        self._background.add(flight.task)
        flight.task.add_done_callback(self._background.discard)

    async def _fill(
        self,
        customer: str,
        flight: Flight,
        stale: Entry | None,
        refresh_after: float | None,
        read: bool = True,
    ) -> Lookup:
        """Redis (unless the caller just read it: ``read`` false), the fetch lock,
        the upstream, the store."""
        now = time.time()
        redis = self.redis
        gens: tuple[str, str] | None = None
        lock: str | None = None
        if redis is not None:
            # A refresh-ahead only accepts an entry newer than the one it refreshes.
            floor = refresh_after if refresh_after is not None else now
            if read:
                found = await self._redis_get(customer)
                if found is not None and found.is_fresh(floor):
                    self._m_redis_hit.inc()
                    self._remember(customer, found, flight)
                    return Lookup(found, "hit")
                self._m_redis_miss.inc()
                if found is not None and (stale is None or found.fetched_at > stale.fetched_at):
                    stale = found
            try:
                gens, lock, raced = await self._begin_fetch(customer)
            except RedisDown:
                gens, lock, raced = None, "", None
            if raced is not None and raced.is_fresh(floor):
                # Another sidecar stored it between our GET and our lock attempt.
                if lock:
                    await self._unlock(customer, lock)
                self._m_redis_hit.inc()
                self._remember(customer, raced, flight)
                return Lookup(raced, "hit")
            if lock is None:
                waited = await self._wait_for_other(customer, floor)
                if waited is not None:
                    self._m_redis_hit.inc()
                    self._remember(customer, waited, flight)
                    return Lookup(waited, "hit")
        entry: Entry | None = None
        try:
            try:
                kind = self.kind
                resp = await self.upstream.read(kind.operation, kind.segments(customer))
                entry = self._entry_from(resp.status, resp.body)
            except UpstreamError:
                if stale is not None and stale.is_servable_stale(time.time()):
                    self._m_stale.inc()
                    return Lookup(stale, "stale")
                raise
            self._m_upstream.inc()
        finally:
            # The store releases the lock only after it stored: a sidecar waiting on
            # the lock that sees it go finds the entry, instead of fetching the
            # customer again (the bench's fleet run: 36 upstream calls for 20
            # customers, now 20). Without an entry, only the lock goes.
            if gens is not None:
                await self._redis_store(customer, entry, gens, lock or "", flight)
            elif lock:
                await self._unlock(customer, lock)
        assert entry is not None  # the upstream answered (else we returned or raised)
        self._remember(customer, entry, flight)
        if self.on_fetched is not None and entry.account_id is not None:
            self.on_fetched(customer, entry)
        return Lookup(entry, "miss")

    def _entry_from(self, status: int, body: bytes) -> Entry:
        """The upstream's 200 or 404 as an entry, its TTL jittered by ±10 %."""
        s = self.settings
        ttl = (s.negative_ttl if status == 404 else self._ttl) * random.uniform(0.9, 1.1)
        return Entry.from_upstream(
            status, body, now=time.time(), fresh_for=ttl, stale_for=s.stale_ttl, kind=self.kind
        )

    def _remember(self, customer: str, entry: Entry, flight: Flight) -> None:
        if not flight.invalidated:
            self._put_memory(customer, entry)

    def _put_memory(self, customer: str, entry: Entry) -> None:
        if self.coherent and self._memory_ttl > 0:
            # Kept coherent by the fan-out: until its own (jittered) freshness ends.
            # (SIDECAR_MEMORY_TTL=0 keeps every read asking Redis.)
            answer_until = entry.fresh_until
        else:
            # Jittered downwards, so "at most SIDECAR_MEMORY_TTL" still holds: entries
            # filled together (start-up, a tenant-wide drop, a resubscribe) would
            # otherwise all go back to Redis in the same instant, every TTL, forever,
            # a burst the hot path queues behind (bench: p99 5.9 ms instead of 1.5 ms).
            ttl = self._memory_ttl * random.uniform(0.8, 1.0)
            answer_until = min(time.time() + ttl, entry.fresh_until)
        # Kept past answer_until (until LRU eviction) as a stale fallback.
        self.memory.put(customer, entry, answer_until)

    # -- Redis layer -------------------------------------------------------------

    async def _redis_get(self, customer: str) -> Entry | None:
        """The stored entry, read with the loop iteration's other reads (``RedisReads``)."""
        assert self.reads is not None and self.keys is not None
        try:
            raw = await self.reads.get(self.keys.entry(customer))
        except RedisDown:
            self._m_redis_error.inc()
            return None
        return self._loads(raw)

    def _loads(self, raw: Any) -> Entry | None:
        return Entry.loads(raw, self.kind) if isinstance(raw, bytes) else None

    async def _begin_fetch(self, customer: str) -> tuple[tuple[str, str], str | None, Entry | None]:
        """Read the generations, try to take the fetch lock and re-read the entry, in
        one round trip (one script).

        Returns the generations, the lock token (``None`` when another sidecar is
        already fetching this customer) and the entry if one was stored since the
        caller's first read (the fetch that raced ours finished in between).
        """
        assert self.redis is not None and self.keys is not None
        keys = self.keys
        token = secrets.token_hex(8)
        lock_ms = int((self.settings.upstream_timeout + 1) * 1000)
        names = (keys.entry(customer), keys.gen(customer), keys.tenant_gen, keys.lock(customer))
        cgen, tgen, won, raw = await self.redis.run(
            "begin_fetch", lambda r: r.eval(_BEGIN_SCRIPT, 4, *names, token, lock_ms)
        )
        return (_s(cgen), _s(tgen)), token if won else None, self._loads(raw)

    async def _wait_for_other(self, customer: str, floor: float) -> Entry | None:
        """Another sidecar holds the fetch lock: poll for its answer until it lets go."""
        assert self.redis is not None and self.keys is not None
        keys = self.keys
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.upstream_timeout
        # Start short: the holder is often a local-network round trip from done.
        delay = 0.002

        async def call(r: RedisClient) -> list[Any]:
            async with r.pipeline(transaction=False) as pipe:
                pipe.get(keys.entry(customer))
                pipe.exists(keys.lock(customer))
                return await pipe.execute()

        while loop.time() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.05)
            try:
                raw, locked = await self.redis.run("wait_fetch", call)
            except RedisDown:
                return None
            entry = self._loads(raw)
            if entry is not None and entry.is_fresh(floor):
                return entry
            if not locked:
                return None
        return None

    async def _unlock(self, customer: str, token: str) -> None:
        assert self.redis is not None and self.keys is not None
        key = self.keys.lock(customer)
        with contextlib.suppress(RedisDown):
            await self.redis.run("unlock", lambda r: r.eval(_UNLOCK_SCRIPT, 1, key, token))

    async def _redis_store(
        self,
        customer: str,
        entry: Entry | None,
        gens: tuple[str, str],
        lock: str,
        flight: Flight,
    ) -> None:
        """One round trip after the fetch: store the entry unless the generations moved
        (``entry`` ``None``: the fetch failed, store nothing), release the lock, and add
        the customer to its account's set."""
        assert self.redis is not None and self.keys is not None
        keys = self.keys
        names = [keys.entry(customer), keys.gen(customer), keys.tenant_gen, keys.lock(customer)]
        store = entry is not None and not flight.invalidated
        value = entry.dumps() if entry is not None and store else b""
        ttl_ms = max(int((entry.stale_until - time.time()) * 1000), 1) if entry else 1
        args: list[Any] = [gens[0], gens[1], value, ttl_ms, "1" if store else "0", lock]
        account = entry.account_id if entry is not None else None
        if account is not None and self.link_ttl is not None:
            names.append(self.redis.keys.account(account))
            args += [customer, self.link_ttl]
        if not store and not lock and len(names) == 4:
            return
        with contextlib.suppress(RedisDown):
            stored = await self.redis.run(
                "store", lambda r: r.eval(_STORE_SCRIPT, len(names), *names, *args)
            )
            if store and not stored:
                log.debug(
                    "store_refused_by_generation",
                    extra={"fields": {"kind": self.kind.name, "customer": customer}},
                )

    # -- invalidation (local part; cache/invalidation.py does Redis and fan-out) ------

    def drop_local(self, customers: Iterable[str] | None) -> None:
        """Forget customers (``None``: everyone) in this process, overtaking fills in flight."""
        self._drops += 1
        if customers is None:
            self.memory.clear()
            for flight in self._inflight.values():
                flight.invalidated = True
            self._inflight.clear()
        else:
            for c in customers:
                self.memory.pop(c)
                overtaken = self._inflight.pop(c, None)
                if overtaken is not None:
                    overtaken.invalidated = True

    def expire_local(self) -> None:
        """No entry of this process answers alone any more (each is kept as the stale
        fallback); fills in flight are overtaken."""
        self._drops += 1
        for entry in self.memory.data.values():
            entry.answer_until = 0.0
        for flight in self._inflight.values():
            flight.invalidated = True
        self._inflight.clear()

    async def close(self) -> None:
        tasks = [f.task for f in self._inflight.values() if f.task is not None]
        await cancel_and_wait([*tasks, *self._background])


class Caches:
    """The cache of every kind, one ``DocumentCache`` each, sharing Redis and the upstream."""

    def __init__(
        self,
        settings: Settings,
        upstream: VellumClient,
        metrics: Metrics,
        redis: RedisConn | None,
    ) -> None:
        #: One batcher for every kind: a tick's reads of all kinds share one MGET.
        self.reads = RedisReads(redis, settings.redis_pool_size) if redis is not None else None

        def make(kind: Kind) -> DocumentCache:
            return DocumentCache(kind, settings, upstream, metrics, redis, self.reads)

        self.entitlements = make(ENTITLEMENTS)
        self.flags = make(FLAGS)
        self.global_flags = make(GLOBAL_FLAGS)
        self.all: tuple[DocumentCache, ...] = (self.entitlements, self.flags, self.global_flags)
        self._by_kind = {c.kind.name: c for c in self.all}
        # Read when /metrics is collected, so the hot path never sets a gauge.
        metrics.memory_entries.set_function(lambda: sum(len(c.memory) for c in self.all))
        metrics.inflight_fetches.set_function(lambda: sum(c.inflight for c in self.all))

    def set_coherent(self, coherent: bool) -> None:
        """The fan-out is confirmed live (``True``) or not: see ``DocumentCache.coherent``.

        Losing it expires the in-process layer of every kind (entries remembered
        while it held answer until their freshness ends, and a message may be missed
        from now on): no entry answers alone any more, each stays only as the stale
        fallback for when Redis and the upstream both fail (losing the subscription
        often means Redis is down). Fills in flight are overtaken. From then on
        memory answers alone for at most ``SIDECAR_MEMORY_TTL`` until the
        subscription is confirmed again.
        """
        was = self.entitlements.coherent
        for cache in self.all:
            cache.coherent = coherent
        if was and not coherent:
            for cache in self.all:
                cache.expire_local()

    def of_kind(self, kind: Kind) -> DocumentCache:
        return self._by_kind[kind.name]

    def of(self, axes: Iterable[Axis] = AXES) -> list[DocumentCache]:
        """The caches of these axes."""
        wanted = set(axes)
        return [c for c in self.all if c.kind.axis in wanted]

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.all))
        if self.reads is not None:
            await self.reads.close()


def _s(value: Any) -> str:
    if value is None:
        return "0"
    return value.decode() if isinstance(value, bytes) else str(value)
