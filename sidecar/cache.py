"""The entitlement cache: an in-process LRU in front of Redis, single-flight fills.

Lookup order: memory (fresh) -> Redis (fresh) -> upstream. Misses for one
customer share one fill (single-flight in this process, a short Redis lock
across sidecars), and an entry past its fresh window is still served, marked
``stale``, when the upstream cannot answer, until ``SIDECAR_STALE_TTL`` ends.

The invalidation race: a fill records what it started from (a ``Flight`` in this
process, the customer's and the tenant's generation numbers in Redis). An
invalidation marks the flight and bumps the generations, so the answer fetched
before it is handed to the callers already waiting but never stored: the store
script compares the generations atomically, and memory checks the flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final, Literal

import orjson

from .config import Settings
from .errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from .metrics import Metrics
from .redisclient import RedisClient
from .redisio import RedisConn, RedisDown
from .upstream import VellumClient

__all__ = ["EntitlementCache", "Entry", "Lookup", "MemoryLayer", "Source"]

log = logging.getLogger("sidecar.cache")

Source = Literal["hit", "miss", "stale"]

#: The body answered for a customer the upstream does not know.
NOT_FOUND_DOC: Final[dict[str, Any]] = {"found": False, "status": None, "modules": [], "config": {}}
NOT_FOUND_BODY: Final = orjson.dumps(NOT_FOUND_DOC)

# SET the entry only if neither the customer's nor the tenant's generation moved
# since the fill began. KEYS: entry, customer gen, tenant gen. ARGV: expected
# customer gen, expected tenant gen, value, ttl ms.
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


class Entry:
    """One customer's answer: the upstream document, or ``None`` for "not found"."""

    __slots__ = (
        "_body",
        "_modules",
        "doc",
        "fetched_at",
        "fresh_until",
        "not_found_body",
        "refresh_at",
        "stale_until",
    )

    def __init__(
        self,
        doc: dict[str, Any] | None,
        fetched_at: float,
        fresh_until: float,
        stale_until: float,
        not_found_body: bytes | None = None,
    ) -> None:
        self.doc = doc
        self.fetched_at = fetched_at
        self.fresh_until = fresh_until
        self.stale_until = stale_until
        # Stale-while-revalidate: a hit in the last tenth of the fresh window
        # (at most 30 s) starts one background refresh.
        self.refresh_at = fresh_until - min((fresh_until - fetched_at) * 0.1, 30.0)
        self.not_found_body = not_found_body
        self._body: bytes | None = None
        self._modules: frozenset[str] | None = None

    @property
    def found(self) -> bool:
        return self.doc is not None

    @property
    def status(self) -> Any:
        return self.doc.get("status") if self.doc is not None else None

    @property
    def account_id(self) -> str | None:
        account = self.doc.get("accountId") if self.doc is not None else None
        return account if isinstance(account, str) and account else None

    def has(self, module: str) -> bool:
        if self._modules is None:
            modules = self.doc.get("modules") if self.doc is not None else None
            self._modules = frozenset(
                m for m in (modules if isinstance(modules, list) else ()) if isinstance(m, str)
            )
        return module in self._modules

    def body(self) -> bytes:
        """The local API body: the upstream document plus ``"found"``; built once."""
        if self._body is None:
            # orjson returns bytes with a ~4 KiB allocation behind them; a body kept
            # for the entry's lifetime is copied to its own size (100,000 cached
            # customers: ~400 MiB less resident memory).
            self._body = (
                memoryview(orjson.dumps({**self.doc, "found": True})).tobytes()
                if self.doc is not None
                else NOT_FOUND_BODY
            )
        return self._body

    def upstream_body(self) -> bytes:
        """The body as the upstream gave it (for the drop-in mirror)."""
        if self.doc is not None:
            return orjson.dumps(self.doc)
        return self.not_found_body or orjson.dumps(
            {"error": {"code": "not_found", "message": "customer has no entitlements"}}
        )

    def dumps(self) -> bytes:
        return orjson.dumps(
            {
                "v": 1,
                "f": self.fetched_at,
                "fu": self.fresh_until,
                "su": self.stale_until,
                "d": self.doc,
                "nf": self.not_found_body.decode("utf-8", "replace")
                if self.not_found_body
                else None,
            }
        )

    @classmethod
    def loads(cls, raw: bytes) -> Entry | None:
        """Parse a stored entry; anything unreadable counts as a miss, never an error."""
        try:
            data = orjson.loads(raw)
            doc = data["d"]
            if doc is not None and not isinstance(doc, dict):
                return None
            nf = data.get("nf")
            return cls(
                doc,
                float(data["f"]),
                float(data["fu"]),
                float(data["su"]),
                nf.encode() if isinstance(nf, str) else None,
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None


class Lookup:
    __slots__ = ("entry", "source")

    def __init__(self, entry: Entry, source: Source) -> None:
        self.entry = entry
        self.source = source


class MemoryLayer:
    """Bounded LRU of entries; each remembers until when memory may answer alone."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._data: OrderedDict[str, tuple[Entry, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str) -> tuple[Entry, float] | None:
        item = self._data.get(key)
        if item is not None:
            self._data.move_to_end(key)
        return item

    def put(self, key: str, entry: Entry, answer_until: float) -> None:
        if self.max_entries <= 0:
            return
        self._data[key] = (entry, answer_until)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def pop(self, key: str) -> None:
        self._data.pop(key, None)

    def clear(self) -> None:
        self._data.clear()

    def customers_of(self, account: str) -> set[str]:
        return {c for c, (e, _) in self._data.items() if e.account_id == account}


class Flight:
    """One fill in progress; ``invalidated`` is set when an invalidation overtakes it."""

    __slots__ = ("invalidated", "task")

    def __init__(self) -> None:
        self.invalidated = False
        self.task: asyncio.Task[Lookup] | None = None


class EntitlementCache:
    def __init__(
        self,
        settings: Settings,
        upstream: VellumClient,
        metrics: Metrics,
        redis: RedisConn | None,
    ) -> None:
        self.settings = settings
        self.upstream = upstream
        self.metrics = metrics
        self.redis = redis
        self.memory = MemoryLayer(settings.memory_max_entries)
        # With Redis shared, memory answers alone only briefly, so a sidecar that
        # missed a fan-out message is wrong for at most SIDECAR_MEMORY_TTL.
        self._memory_ttl = settings.memory_ttl if redis is not None else float("inf")
        self._inflight: dict[str, Flight] = {}
        self._background: set[asyncio.Task[Any]] = set()
        #: Called with (customer, entry) after every upstream fetch (account index).
        self.on_fetched: Callable[[str, Entry], Awaitable[None]] | None = None
        m = metrics.cache_lookups
        self._m_mem_hit = m.labels("memory", "hit")
        self._m_mem_miss = m.labels("memory", "miss")
        self._m_redis_hit = m.labels("redis", "hit")
        self._m_redis_miss = m.labels("redis", "miss")
        self._m_redis_error = m.labels("redis", "error")
        self._m_upstream = m.labels("upstream", "fetch")
        self._m_stale = m.labels("upstream", "stale")

    # -- reads -----------------------------------------------------------------

    def hit(self, customer: str) -> Lookup | None:
        """The in-process answer when memory may give it alone, else ``None``.

        Synchronous, so a handler's memory hit costs no coroutine (the hot path),
        and it reaches into the LRU's dict directly: each method call saved is
        worth a few percent of a hit (see README "Performance").
        """
        data = self.memory._data
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

    def _start(self, customer: str, stale: Entry | None, refresh_after: float | None) -> Flight:
        flight = Flight()
        task = asyncio.get_running_loop().create_task(
            self._fill(customer, flight, stale, refresh_after)
        )
        flight.task = task
        self._inflight[customer] = flight
        self.metrics.inflight_fetches.set(len(self._inflight))

        def done(t: asyncio.Task[Lookup]) -> None:
            if self._inflight.get(customer) is flight:
                del self._inflight[customer]
            self.metrics.inflight_fetches.set(len(self._inflight))
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
            if found is not None and found.fresh_until > floor:
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
            if raced is not None and raced.fresh_until > floor:
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
                resp = await self.upstream.get_entitlements(customer)
                entry = self._entry_from(resp.status, resp.body, resp.headers.get("Content-Type"))
            except UpstreamError:
                if stale is not None and time.time() < stale.stale_until:
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

    def _entry_from(self, status: int, body: bytes, content_type: str | None) -> Entry:
        now = time.time()
        s = self.settings
        if status == 404:
            ttl = s.negative_ttl * random.uniform(0.9, 1.1)
            nf = body if body and len(body) <= 4096 and _is_json(body) else None
            return Entry(None, now, now + ttl, now + ttl + s.stale_ttl, nf)
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            doc = None
        if not isinstance(doc, dict):
            raise UpstreamUnavailable("the upstream sent an entitlement document that is not JSON")
        doc.pop("found", None)
        ttl = s.cache_ttl * random.uniform(0.9, 1.1)
        return Entry(doc, now, now + ttl, now + ttl + s.stale_ttl)

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
        self.metrics.memory_entries.set(len(self.memory))

    # -- Redis layer -------------------------------------------------------------

    async def _redis_get(self, customer: str) -> Entry | None:
        assert self.redis is not None
        key = self.redis.keys.entry(customer)
        try:
            raw = await self.redis.run("get", lambda r: r.get(key))
        except RedisDown:
            self._m_redis_error.inc()
            return None
        return Entry.loads(raw) if isinstance(raw, bytes) else None

    async def _begin_fetch(self, customer: str) -> tuple[tuple[str, str], str | None, Entry | None]:
        """Read the generations, try to take the fetch lock and re-read the entry, in
        one round trip.

        Returns the generations, the lock token (``None`` when another sidecar is
        already fetching this customer) and the entry if one was stored since the
        caller's first read (the fetch that raced ours finished in between).
        """
        assert self.redis is not None
        keys = self.redis.keys
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
        raced = Entry.loads(raw) if isinstance(raw, bytes) else None
        return (_s(cgen), _s(tgen)), token if won else None, raced

    async def _wait_for_other(self, customer: str, floor: float) -> Entry | None:
        """Another sidecar holds the fetch lock: poll for its answer until it lets go."""
        assert self.redis is not None
        keys = self.redis.keys
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
            if raw is not None:
                entry = Entry.loads(raw)
                if entry is not None and entry.fresh_until > floor:
                    return entry
            if not locked:
                return None
        return None

    async def _unlock(self, customer: str, token: str) -> None:
        assert self.redis is not None
        key = self.redis.keys.lock(customer)
        with contextlib.suppress(RedisDown):
            await self.redis.run("unlock", lambda r: r.eval(_UNLOCK_SCRIPT, 1, key, token))

    async def _redis_store(self, customer: str, entry: Entry, gens: tuple[str, str]) -> None:
        assert self.redis is not None
        keys = self.redis.keys
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
                log.debug("store_refused_by_generation", extra={"fields": {"customer": customer}})

    # -- invalidation (local part; invalidation.py does Redis and fan-out) ------------

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
        self.metrics.memory_entries.set(len(self.memory))
        self.metrics.inflight_fetches.set(len(self._inflight))

    async def close(self) -> None:
        tasks = [f.task for f in self._inflight.values() if f.task is not None]
        tasks.extend(self._background)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _s(value: Any) -> str:
    if value is None:
        return "0"
    return value.decode() if isinstance(value, bytes) else str(value)


def _is_json(body: bytes) -> bool:
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return True
