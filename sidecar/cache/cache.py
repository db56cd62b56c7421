"""The cache: an in-process LRU in front of the shared tier (Redis), single-flight
fills, for every document kind.

One mechanism, ``DocumentCache``, instantiated once per kind (``kinds.py``:
entitlements, a customer's flags, the tenant's global flags); ``Caches`` holds
the three. Everything below holds for each kind alike, with the kind's own TTL,
Redis keys and metric label. Every Redis command lives in ``shared.py``; this
module holds memory, single-flight and the fill policy.

Lookup order: memory (fresh) -> the shared tier (fresh and valid) -> upstream.
Misses for one document share one fill (single-flight in this process, the
shared tier's lock across sidecars), and an entry that may not answer as a hit
(past its fresh window, or expired by a drop) is still served, marked
``stale``, when the upstream cannot answer, until ``SIDECAR_STALE_TTL`` ends
(``SIDECAR_NEGATIVE_STALE_TTL`` for "not found").

**A drop expires, it never destroys** (RFC 5861 stale-if-error): a drop marks
the entries on both layers so the next read revalidates, and keeps them as the
stale fallback (``Entry.expire``). ``SIDECAR_STRICT_DROPS`` refuses the stale
fallback after an explicit drop (fail closed).

The invalidation race: a fill records what it started from (a ``Flight`` in this
process, the shared tier's lock and stamp). A drop marks the flight and takes the
lock away, so the answer fetched before it is handed to the callers already
waiting but is kept only as the fallback, never as a valid entry (``shared.py``,
invariant 3).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

from ..config import Settings
from ..errors import UpstreamError, UpstreamTimeout
from ..metrics import Metrics
from ..redis.conn import RedisConn, RedisDown
from ..tasks import cancel_and_wait
from ..upstream import VellumClient
from .entry import DROPPED, PRECAUTION, Entry, Lookup
from .kinds import AXES, ENTITLEMENTS, FLAGS, GLOBAL_FLAGS, KINDS, Axis, Kind
from .memory import MemoryLayer
from .shared import LocalTier, RedisTier, SharedTier, Ticket

__all__ = ["Caches", "DocumentCache", "Flight"]

log = logging.getLogger("sidecar.cache")


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
        tier: SharedTier,
    ) -> None:
        self.kind = kind
        self.settings = settings
        self.upstream = upstream
        self.metrics = metrics
        self.tier = tier
        self.memory = MemoryLayer(settings.memory_max_entries)
        self._ttl = kind.ttl(settings)
        self._strict = settings.strict_drops
        # With Redis shared and the fan-out not confirmed live, memory answers alone
        # only briefly, so a sidecar that missed a message is wrong for at most
        # SIDECAR_MEMORY_TTL.
        self._memory_ttl = settings.memory_ttl if tier.shared else float("inf")
        #: Set by the invalidator while its fan-out subscription is confirmed live
        #: (heartbeats answered): the in-process layer is kept coherent by the fan-out,
        #: so an entry answers from memory until its own freshness ends. The
        #: invalidator expires the layer the moment it cannot confirm the subscription.
        self.coherent = False
        self._inflight: dict[str, Flight] = {}
        #: Drops applied here so far: a Redis read that saw this number change while it
        #: waited (a drop overtook it) answers its caller but is not remembered.
        self._drops = 0
        self._background: set[asyncio.Task[Any]] = set()
        #: Called with (customer, entry) after every upstream fetch of a document naming
        #: an account (the account index, ``Invalidator``).
        self.on_fetched: Callable[[str, Entry], None] | None = None
        #: The TTL (s) of the account sets a fill's store adds the fetched customer to;
        #: ``None``: no account sets.
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
        percent of a hit (see docs/performance.md). An expired entry's
        ``answer_until`` is 0, so this one comparison also keeps it out.
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
        routes ask memory first themselves): the shared tier, then a fill."""
        item = self.memory.get(customer)
        self._m_mem_miss.inc()
        stale = item[0] if item else None
        flight = self._inflight.get(customer)
        if flight is None and self.tier.shared:
            # The shared tier first, read with the loop iteration's other reads and
            # without a task of its own: most misses in memory are hits in Redis.
            drops = self._drops
            try:
                stored = await self.tier.read(self.kind, customer)
            except RedisDown:
                self._m_redis_error.inc()
                stored = None
            if stored is not None and stored.is_fresh(time.time()):
                self._m_redis_hit.inc()
                if self._drops == drops:  # no drop here overtook the read
                    self._put_memory(customer, stored)
                return Lookup(stored, "hit")
            self._m_redis_miss.inc()
            flight = self._inflight.get(customer)  # started by another caller meanwhile
            if flight is None:
                flight = self._start(customer, _newest(stale, stored), None, read=False)
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
        """The shared tier (unless the caller just read it: ``read`` false), the fleet's
        fill lock, the upstream, the store."""
        tier = self.tier
        kind = self.kind
        ticket: Ticket | None = None
        if tier.shared:
            # A refresh-ahead only accepts an entry newer than the one it refreshes.
            floor = refresh_after if refresh_after is not None else time.time()
            if read:
                try:
                    found = await tier.read(kind, customer)
                except RedisDown:
                    self._m_redis_error.inc()
                    found = None
                if found is not None and found.is_fresh(floor):
                    self._m_redis_hit.inc()
                    self._remember(customer, found, flight)
                    return Lookup(found, "hit")
                self._m_redis_miss.inc()
                stale = _newest(stale, found)
            for attempt in range(2):
                try:
                    ticket = await tier.begin_fill(kind, customer)
                except RedisDown:
                    ticket = None
                    break
                stale = _newest(stale, ticket.raced)
                if ticket.raced is not None and ticket.raced.is_fresh(floor):
                    # Another sidecar stored it between our read and our lock attempt.
                    await tier.release(kind, customer, ticket)
                    self._m_redis_hit.inc()
                    self._remember(customer, ticket.raced, flight)
                    return Lookup(ticket.raced, "hit")
                if not ticket.held or attempt:
                    break
                waited = await tier.wait_fill(kind, customer, floor)
                if waited is not None:
                    self._m_redis_hit.inc()
                    self._remember(customer, waited, flight)
                    return Lookup(waited, "hit")
                # The holder let go without a valid answer (its fetch failed, or a drop
                # took its lock): try once more to become the fill that stores.
        entry: Entry | None = None
        try:
            try:
                resp = await self.upstream.read(kind.operation, kind.segments(customer))
                entry = self._entry_from(resp.status, resp.body)
            except UpstreamError:
                if stale is not None and stale.is_servable_stale(time.time(), self._strict):
                    self._m_stale.inc()
                    return Lookup(stale, "stale")
                raise
            self._m_upstream.inc()
        finally:
            # The store releases the lock only after it stored: a sidecar waiting on
            # the lock that sees it go finds the entry, instead of fetching the
            # customer again (the bench's fleet run: 36 upstream calls for 20
            # customers, now 20). Without an entry, only the lock goes.
            if ticket is not None:
                account = entry.account_id if entry is not None else None
                link = (account, self.link_ttl) if account and self.link_ttl else None
                await tier.finish_fill(
                    kind, customer, ticket, entry, overtaken=flight.invalidated, account=link
                )
        assert entry is not None  # the upstream answered (else we returned or raised)
        self._remember(customer, entry, flight)
        if self.on_fetched is not None and entry.account_id is not None:
            self.on_fetched(customer, entry)
        return Lookup(entry, "miss")

    def _entry_from(self, status: int, body: bytes) -> Entry:
        """The upstream's 200 or 404 as an entry, its TTL jittered by ±10 %. A "not
        found" keeps the short ``SIDECAR_NEGATIVE_STALE_TTL`` stale window: an unknown
        id costs memory and Redis only briefly, whoever sends it."""
        s = self.settings
        if status == 404:
            ttl, stale_for = s.negative_ttl, s.negative_stale_ttl
        else:
            ttl, stale_for = self._ttl, s.stale_ttl
        return Entry.from_upstream(
            status,
            body,
            now=time.time(),
            fresh_for=ttl * random.uniform(0.9, 1.1),
            stale_for=stale_for,
            kind=self.kind,
        )

    def _remember(self, customer: str, entry: Entry, flight: Flight) -> None:
        if not flight.invalidated:
            self._put_memory(customer, entry)
            return
        # A drop overtook this fill: its answer may predate the change, so it is kept
        # only as the fallback, and only if it is newer than the one memory holds.
        entry.expire(DROPPED)
        held = self.memory.data.get(customer)
        if held is None or held.fetched_at <= entry.fetched_at:
            self.memory.put(customer, entry, 0.0)

    def _put_memory(self, customer: str, entry: Entry) -> None:
        if entry.expired:
            answer_until = 0.0
        elif self.coherent and self._memory_ttl > 0:
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

    # -- invalidation (local part; cache/invalidation.py issues and fans out) --------

    def drop_local(self, customers: Iterable[str] | None) -> None:
        """An explicit drop of customers (``None``: everyone) in this process: their
        entries expire (kept as the stale fallback), fills in flight are overtaken."""
        self._expire(customers, DROPPED)

    def expire_local(self) -> None:
        """A precaution: no entry of this process answers alone any more (each is kept
        as the stale fallback, and revalidated by its next read); fills in flight
        are overtaken."""
        self._expire(None, PRECAUTION)

    def _expire(self, customers: Iterable[str] | None, level: int) -> None:
        self._drops += 1
        memory = self.memory
        if customers is None:
            for entry in memory.data.values():
                if entry.expired < level:  # the local snapshot writes the mark ("x")
                    memory.changes += 1
                entry.expire(level)
            for flight in self._inflight.values():
                flight.invalidated = True
            self._inflight.clear()
            return
        data = memory.data
        for c in customers:
            held = data.get(c)
            if held is not None:
                if held.expired < level:
                    memory.changes += 1
                held.expire(level)
            overtaken = self._inflight.pop(c, None)
            if overtaken is not None:
                overtaken.invalidated = True

    async def close(self) -> None:
        tasks = [f.task for f in self._inflight.values() if f.task is not None]
        await cancel_and_wait([*tasks, *self._background])


def _newest(held: Entry | None, other: Entry | None) -> Entry | None:
    """The fallback to keep: the entry fetched last."""
    if other is None:
        return held
    if held is None or other.fetched_at > held.fetched_at:
        return other
    return held


class Caches:
    """The cache of every kind, one ``DocumentCache`` each, sharing the shared tier and
    the upstream."""

    def __init__(
        self,
        settings: Settings,
        upstream: VellumClient,
        metrics: Metrics,
        redis: RedisConn | None,
    ) -> None:
        #: The fleet's shared tier (Redis), or memory-only mode's local one. One for
        #: every kind: a tick's reads of all kinds share one MGET.
        self.tier: SharedTier = (
            LocalTier()
            if redis is None
            else RedisTier(
                redis,
                KINDS.values(),
                pool_size=settings.redis_pool_size,
                upstream_timeout=settings.upstream_timeout,
                stall_after=max(settings.redis_timeout, settings.check_interval),
                check_interval=settings.check_interval,
            )
        )

        def make(kind: Kind) -> DocumentCache:
            return DocumentCache(kind, settings, upstream, metrics, self.tier)

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
        fallback. Fills in flight are overtaken. From then on memory answers alone
        for at most ``SIDECAR_MEMORY_TTL`` until the subscription is confirmed again.
        """
        was = self.entitlements.coherent
        for cache in self.all:
            cache.coherent = coherent
        if was and not coherent:
            self.expire_local()

    def expire_local(self) -> None:
        """Every kind's in-process layer expires (a precaution; see ``expire_local``)."""
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
        await self.tier.close()
