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
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final

from ..config import Settings
from ..errors import UpstreamError
from ..metrics import Metrics
from ..redis.conn import RedisConn, RedisDown
from ..redis.keys import KindKeys
from ..redis.url import RedisClient
from ..upstream import VellumClient
from .entry import Entry, Lookup
from .kinds import AXES, ENTITLEMENTS, FLAGS, GLOBAL_FLAGS, Axis, Kind
from .memory import MemoryLayer

__all__ = ["Caches", "DocumentCache", "Flight"]

log = logging.getLogger("sidecar.cache")

# SET the entry only if neither the document's nor the kind's tenant-wide generation
# moved since the fill began. KEYS: entry, document gen, tenant gen. ARGV: expected
# document gen, expected tenant gen, value, ttl ms.
_STORE_SCRIPT: Final = """
if (redis.call('GET', KEYS[2]) or '0') ~= ARGV[1] then return 0 end
if (redis.call('GET', KEYS[3]) or '0') ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
return 1
"""
# Delete the lock only if we still hold it.
_UNLOCK_SCRIPT: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


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
    ) -> None:
        self.kind = kind
        self.settings = settings
        self.upstream = upstream
        self.metrics = metrics
        self.redis = redis
        self.keys: KindKeys | None = redis.keys.kind(kind.key) if redis is not None else None
        self.memory = MemoryLayer(settings.memory_max_entries)
        self._ttl = kind.ttl(settings)
        # With Redis shared, memory answers alone only briefly, so a sidecar that
        # missed a fan-out message is wrong for at most SIDECAR_MEMORY_TTL.
        self._memory_ttl = settings.memory_ttl if redis is not None else float("inf")
        self._inflight: dict[str, Flight] = {}
        self._background: set[asyncio.Task[Any]] = set()
        #: Called with (customer, entry) after every upstream fetch (account index).
        self.on_fetched: Callable[[str, Entry], Awaitable[None]] | None = None
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
        """The in-process answer when memory may give it alone, else ``None``.

        Synchronous, so a handler's memory hit costs no coroutine (the hot path),
        and it reaches into the LRU's dict directly: each method call saved is
        worth a few percent of a hit (see docs/performance.md).
        """
        data = self.memory.data
        item = data.get(customer)
        if item is not None:
            now = time.time()
            entry, answer_until = item
            if now < answer_until:
                data.move_to_end(customer)
                self._m_mem_hit.value += 1
                if now >= entry.refresh_at:
                    self._refresh_ahead(customer, entry)
                return Lookup(entry, "hit")
        return None

    async def get(self, customer: str) -> Lookup:
        """The customer's entry; raises ``UpstreamError`` only when nothing usable exists."""
        found = self.hit(customer)
        if found is not None:
            return found
        item = self.memory.get(customer)
        self._m_mem_miss.inc()
        flight = self._inflight.get(customer)
        if flight is None:
            flight = self._start(customer, item[0] if item else None, refresh_after=None)
        assert flight.task is not None
        return await asyncio.shield(flight.task)

    async def get_many(self, customers: Iterable[str], concurrency: int = 32) -> dict[str, Any]:
        """Look up distinct customers, at most ``concurrency`` fills at once.

        Values are ``Lookup`` or the ``UpstreamError`` raised for that customer.
        """
        sem = asyncio.Semaphore(concurrency)

        async def one(c: str) -> Lookup | UpstreamError:
            async with sem:
                try:
                    return await self.get(c)
                except UpstreamError as exc:
                    return exc

        distinct = list(dict.fromkeys(customers))
        results = await asyncio.gather(*(one(c) for c in distinct))
        return dict(zip(distinct, results, strict=True))

    def _start(self, customer: str, stale: Entry | None, refresh_after: float | None) -> Flight:
        flight = Flight()
        task = asyncio.get_running_loop().create_task(
            self._fill(customer, flight, stale, refresh_after)
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
        self, customer: str, flight: Flight, stale: Entry | None, refresh_after: float | None
    ) -> Lookup:
        now = time.time()
        redis = self.redis
        gens: tuple[str, str] | None = None
        lock: str | None = None
        if redis is not None:
            found = await self._redis_get(customer)
            # A refresh-ahead only accepts an entry newer than the one it refreshes.
            floor = refresh_after if refresh_after is not None else now
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
            if redis is not None and gens is not None and not flight.invalidated:
                await self._redis_store(customer, entry, gens)
        finally:
            # Released only after the store: a sidecar waiting on the lock that sees
            # it go finds the entry, instead of fetching the customer again (the
            # bench's fleet run: 36 upstream calls for 20 customers, now 20).
            if lock:
                await self._unlock(customer, lock)
        self._remember(customer, entry, flight)
        if self.on_fetched is not None and entry.account_id is not None:
            await self.on_fetched(customer, entry)
        return Lookup(entry, "miss")

    def _entry_from(self, status: int, body: bytes) -> Entry:
        """The upstream's 200 or 404 as an entry, its TTL jittered by ±10 %."""
        s = self.settings
        ttl = (s.negative_ttl if status == 404 else self._ttl) * random.uniform(0.9, 1.1)
        return Entry.from_upstream(
            status, body, now=time.time(), fresh_for=ttl, stale_for=s.stale_ttl, kind=self.kind
        )

    def _remember(self, customer: str, entry: Entry, flight: Flight) -> None:
        if flight.invalidated:
            return
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
        assert self.redis is not None and self.keys is not None
        key = self.keys.entry(customer)
        try:
            raw = await self.redis.run("get", lambda r: r.get(key))
        except RedisDown:
            self._m_redis_error.inc()
            return None
        return self._loads(raw)

    def _loads(self, raw: Any) -> Entry | None:
        return Entry.loads(raw, self.kind) if isinstance(raw, bytes) else None

    async def _begin_fetch(self, customer: str) -> tuple[tuple[str, str], str | None, Entry | None]:
        """Read the generations, try to take the fetch lock and re-read the entry, in
        one round trip.

        Returns the generations, the lock token (``None`` when another sidecar is
        already fetching this customer) and the entry if one was stored since the
        caller's first read (the fetch that raced ours finished in between).
        """
        assert self.redis is not None and self.keys is not None
        keys = self.keys
        token = secrets.token_hex(8)
        lock_ms = int((self.settings.upstream_timeout + 1) * 1000)

        async def call(r: RedisClient) -> list[Any]:
            async with r.pipeline(transaction=False) as pipe:
                # Two GETs, not MGET: redis-py's cluster pipeline refuses multi-key commands.
                pipe.get(keys.gen(customer))
                pipe.get(keys.tenant_gen)
                pipe.set(keys.lock(customer), token, nx=True, px=lock_ms)
                pipe.get(keys.entry(customer))
                return await pipe.execute()

        cgen, tgen, won, raw = await self.redis.run("begin_fetch", call)
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

    async def _redis_store(self, customer: str, entry: Entry, gens: tuple[str, str]) -> None:
        assert self.redis is not None and self.keys is not None
        keys = self.keys
        ttl_ms = max(int((entry.stale_until - time.time()) * 1000), 1)
        value = entry.dumps()
        with contextlib.suppress(RedisDown):
            stored = await self.redis.run(
                "store",
                lambda r: r.eval(
                    _STORE_SCRIPT,
                    3,
                    keys.entry(customer),
                    keys.gen(customer),
                    keys.tenant_gen,
                    gens[0],
                    gens[1],
                    value,
                    ttl_ms,
                ),
            )
            if not stored:
                log.debug(
                    "store_refused_by_generation",
                    extra={"fields": {"kind": self.kind.name, "customer": customer}},
                )

    # -- invalidation (local part; cache/invalidation.py does Redis and fan-out) ------

    def drop_local(self, customers: Iterable[str] | None) -> None:
        """Forget customers (``None``: everyone) in this process, overtaking fills in flight."""
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

    async def close(self) -> None:
        tasks = [f.task for f in self._inflight.values() if f.task is not None]
        tasks.extend(self._background)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Caches:
    """The cache of every kind, one ``DocumentCache`` each, sharing Redis and the upstream."""

    def __init__(
        self,
        settings: Settings,
        upstream: VellumClient,
        metrics: Metrics,
        redis: RedisConn | None,
    ) -> None:
        def make(kind: Kind) -> DocumentCache:
            return DocumentCache(kind, settings, upstream, metrics, redis)

        self.entitlements = make(ENTITLEMENTS)
        self.flags = make(FLAGS)
        self.global_flags = make(GLOBAL_FLAGS)
        self.all: tuple[DocumentCache, ...] = (self.entitlements, self.flags, self.global_flags)
        self._by_kind = {c.kind.name: c for c in self.all}
        # Read when /metrics is collected, so the hot path never sets a gauge.
        metrics.memory_entries.set_function(lambda: sum(len(c.memory) for c in self.all))
        metrics.inflight_fetches.set_function(lambda: sum(c.inflight for c in self.all))

    def of_kind(self, kind: Kind) -> DocumentCache:
        return self._by_kind[kind.name]

    def of(self, axes: Iterable[Axis] = AXES) -> list[DocumentCache]:
        """The caches of these axes."""
        wanted = set(axes)
        return [c for c in self.all if c.kind.axis in wanted]

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.all))


def _s(value: Any) -> str:
    if value is None:
        return "0"
    return value.decode() if isinstance(value, bytes) else str(value)
