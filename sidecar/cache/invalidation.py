"""Invalidation: drop entries in Redis, fan out to every sidecar, learn account links.

An invalidation is a delete plus a generation bump, never a write of new data,
so duplicated or reordered messages are harmless. The sidecar that issues it
deletes the Redis entries, bumps the generations (so fills already in flight
anywhere cannot store their older answer), publishes one message on the
tenant's channel and drops its own in-process entries at once. Every other
sidecar drops its in-process entries when the message arrives.

Every drop names its axes (``kinds.Axis``: entitlements, flags; both unless
narrowed) and applies to each kind of those axes: a customer's drop to the
per-customer kinds, a tenant-wide drop to every kind of the axes (the global
flags included). Watchers (``watch``) hear of every drop applied here, issued
or received, which is how the OFREP event streams learn of changes.

Redis pub/sub is at-most-once: a sidecar that was disconnected may have missed
messages, so every (re)subscribe drops the whole in-process layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Final, Literal

import orjson
from redis.asyncio.cluster import ClusterPubSub, RedisCluster

from ..metrics import Metrics
from ..redis.conn import RedisConn, RedisDown
from ..redis.keys import Keys
from ..redis.url import REDIS_ERRORS, RedisClient
from .cache import Caches, DocumentCache
from .entry import Entry
from .kinds import AXES, Axis

__all__ = ["DropWatcher", "Invalidator", "Scope"]

log = logging.getLogger("sidecar.invalidation")

Scope = Literal["customer", "account", "tenant"]

_GEN_TTL_S: Final = 3600
_SCAN_BATCH: Final = 500
_MAX_LOCAL_LINKS: Final = 100_000


class _Resubscribe(Exception):
    """The server ended our shard-channel subscription (slot migration, failover)."""


_LISTEN_ERRORS: Final[tuple[type[BaseException], ...]] = (*REDIS_ERRORS, _Resubscribe)

#: Told of each drop applied on this sidecar: the customers (``None``: everyone)
#: and the axes. Called synchronously; it must not block.
DropWatcher = Callable[[Sequence[str] | None, tuple[Axis, ...]], None]


class Invalidator:
    def __init__(
        self,
        caches: Caches,
        redis: RedisConn | None,
        metrics: Metrics,
        *,
        sidecar_id: str,
        link_ttl: float,
    ) -> None:
        self.caches = caches
        self.redis = redis
        self.metrics = metrics
        self.sidecar_id = sidecar_id
        self._link_ttl = int(link_ttl)
        # account -> customers learnt from writes, for memory-only mode and while
        # Redis is down (bounded LRU of accounts).
        self._links: OrderedDict[str, set[str]] = OrderedDict()
        self._listener: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()
        self._watchers: list[DropWatcher] = []
        if redis is not None:
            metrics.fanout_state.follow(lambda: "ok" if self.subscribed.is_set() else "down")
        caches.entitlements.on_fetched = self._learn_from_entry

    def watch(self, watcher: DropWatcher) -> Callable[[], None]:
        """Call ``watcher`` on every drop applied here; returns the function that stops it."""
        self._watchers.append(watcher)
        return lambda: self._watchers.remove(watcher)

    # -- issuing -----------------------------------------------------------------

    async def customers(
        self,
        customers: Sequence[str],
        *,
        source: str,
        scope: Scope = "customer",
        axes: Sequence[Axis] = AXES,
    ) -> bool:
        """Drop these customers' documents of ``axes`` on every sidecar.

        Returns whether every sidecar was reached: False when Redis is configured
        but could not be written, in which case only this sidecar dropped them.
        """
        if not customers:
            return True
        axes = _ordered(axes)
        kinds = [c.kind for c in self._caches(axes, customers)]

        async def call(r: RedisClient, keys: Keys, cluster: bool) -> None:
            # One slot (the tenant's hash tag), so MULTI works on a cluster too.
            async with r.pipeline(transaction=True) as pipe:
                for kind in kinds:
                    names = keys.kind(kind.key)
                    for c in customers:
                        pipe.incr(names.gen(c))
                        pipe.expire(names.gen(c), _GEN_TTL_S)
                        pipe.delete(names.entry(c))
                message = self._message("customer", list(customers), axes)
                if cluster:
                    pipe.spublish(keys.channel, message)
                else:
                    pipe.publish(keys.channel, message)
                await pipe.execute()

        shared = await self._everywhere(customers, axes, "invalidate", call)
        self.metrics.invalidations.labels(scope, source).inc()
        return shared

    async def account(
        self, account: str, *, source: str, axes: Sequence[Axis] = AXES
    ) -> tuple[Scope, bool]:
        """Drop an account's known customers; everything for the tenant when none are known.

        Returns the scope applied and whether every sidecar was reached.
        """
        known = set(self._links.get(account, ()))
        known |= self.caches.entitlements.memory.customers_of(account)
        if self.redis is not None:
            key = self.redis.keys.account(account)
            with contextlib.suppress(RedisDown):
                members = await self.redis.run("account_members", lambda r: r.smembers(key))
                known |= {m.decode() if isinstance(m, bytes) else str(m) for m in members}
        if not known:
            return "tenant", await self.tenant(source=source, axes=axes)
        shared = await self.customers(sorted(known), source=source, scope="account", axes=axes)
        return "account", shared

    async def tenant(self, *, source: str, axes: Sequence[Axis] = AXES) -> bool:
        """Drop every document of ``axes`` for the tenant on every sidecar (see
        ``customers``); for the flags axis that includes the global flags."""
        axes = _ordered(axes)
        kinds = [c.kind for c in self._caches(axes, None)]

        async def call(r: RedisClient, keys: Keys, cluster: bool) -> None:
            for kind in kinds:
                await r.incr(keys.kind(kind.key).tenant_gen)
            for kind in kinds:
                batch: list[Any] = []
                # On a cluster, scan_iter walks every primary (right even while
                # the tenant's slot migrates); the keys share one slot, so UNLINK
                # of a batch is one command.
                pattern = keys.kind(kind.key).entry_pattern
                async for key in r.scan_iter(match=pattern, count=_SCAN_BATCH):
                    batch.append(key)
                    if len(batch) >= _SCAN_BATCH:
                        await r.unlink(*batch)
                        batch = []
                if batch:
                    await r.unlink(*batch)
            message = self._message("tenant", None, axes)
            if cluster:
                await r.spublish(keys.channel, message)
            else:
                await r.publish(keys.channel, message)

        shared = await self._everywhere(None, axes, "invalidate_all", call)
        self.metrics.invalidations.labels("tenant", source).inc()
        return shared

    async def _everywhere(
        self,
        customers: Sequence[str] | None,
        axes: tuple[Axis, ...],
        operation: str,
        call: Callable[[RedisClient, Keys, bool], Awaitable[None]],
    ) -> bool:
        """Drop ``customers`` (``None``: everyone) here at once, then run the Redis part.

        ``call`` gets the client, the key names and whether Redis is a cluster.
        Returns False when Redis is configured but the call failed.
        """
        self._drop_here(customers, axes)
        redis = self.redis
        if redis is None:
            return True
        try:
            await redis.run(operation, lambda r: call(r, redis.keys, redis.cluster))
        except RedisDown:
            return False
        return True

    def _caches(self, axes: Sequence[Axis], customers: Sequence[str] | None) -> list[DocumentCache]:
        """The caches a drop applies to: a customer's drop leaves the tenant-wide kinds."""
        return [c for c in self.caches.of(axes) if customers is None or c.kind.per_customer]

    def _drop_here(self, customers: Sequence[str] | None, axes: tuple[Axis, ...]) -> None:
        for cache in self._caches(axes, customers):
            cache.drop_local(customers)
        for watcher in list(self._watchers):
            try:
                watcher(customers, axes)
            except Exception:
                log.exception("drop_watcher_failed")

    def _message(self, scope: str, customers: list[str] | None, axes: tuple[Axis, ...]) -> bytes:
        return orjson.dumps(
            {
                "scope": scope,
                "customers": customers,
                "axes": list(axes),
                "origin": self.sidecar_id,
                "at": time.time(),
            }
        )

    # -- account index -----------------------------------------------------------

    async def link(self, account: str, customer: str) -> None:
        """Remember that ``customer`` belongs to ``account`` (learnt from a call or a document)."""
        if not account or not customer:
            return
        members = self._links.get(account)
        if members is None:
            members = self._links[account] = set()
            while len(self._links) > _MAX_LOCAL_LINKS:
                self._links.popitem(last=False)
        else:
            self._links.move_to_end(account)
        fresh = customer not in members
        members.add(customer)
        if self.redis is not None and fresh:
            key = self.redis.keys.account(account)

            async def call(r: RedisClient) -> Any:
                async with r.pipeline(transaction=False) as pipe:
                    pipe.sadd(key, customer)
                    pipe.expire(key, self._link_ttl)
                    return await pipe.execute()

            with contextlib.suppress(RedisDown):
                await self.redis.run("link", call)

    async def _learn_from_entry(self, customer: str, entry: Entry) -> None:
        if entry.account_id is not None:
            await self.link(entry.account_id, customer)

    # -- listening -----------------------------------------------------------------

    def start(self) -> None:
        if self.redis is not None and self._listener is None:
            self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
            self._listener = None

    async def _listen(self) -> None:
        """Subscribe, apply messages; on any failure resubscribe with backoff."""
        assert self.redis is not None
        channel = self.redis.keys.channel
        backoff = 0.05
        failed = False
        while True:
            client = self.redis.client
            pubsub = client.pubsub()
            try:
                if isinstance(client, RedisCluster):
                    # The shard channel's node comes from the slot map: load it,
                    # and reload it after a failure (the shard may have failed over).
                    await client.initialize()
                    if failed:
                        await client.nodes_manager.initialize()
                if isinstance(pubsub, ClusterPubSub):
                    await pubsub.ssubscribe(channel)
                else:
                    await pubsub.subscribe(channel)
                # Messages may have been missed while (re)connecting.
                self._drop_here(None, AXES)
                self.subscribed.set()
                backoff = 0.05
                failed = False
                log.info("fanout_subscribed")
                while True:
                    if isinstance(pubsub, ClusterPubSub):
                        msg = await pubsub.get_sharded_message(timeout=5.0)
                        if msg is not None and msg.get("type") == "sunsubscribe":
                            # The slot moved or its shard failed over: resubscribe.
                            raise _Resubscribe
                    else:
                        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                    if msg is not None and msg.get("type") in ("message", "smessage"):
                        self._apply(msg["data"])
            except asyncio.CancelledError:
                raise
            except _LISTEN_ERRORS as exc:
                self.subscribed.clear()
                failed = True
                log.warning("fanout_disconnected", extra={"fields": {"error": type(exc).__name__}})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                with contextlib.suppress(*REDIS_ERRORS):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _apply(self, data: Any) -> None:
        try:
            msg = orjson.loads(data)
            scope = msg["scope"]
            sent_at = float(msg.get("at", 0))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("fanout_message_malformed")
            return
        if msg.get("origin") == self.sidecar_id:
            return  # applied locally when issued
        # A message without axes (a sidecar from before flags) drops both.
        named = msg.get("axes")
        axes = _ordered(a for a in named if a in AXES) if isinstance(named, list) else AXES
        customers = msg.get("customers")
        if scope == "customer" and isinstance(customers, list):
            self._drop_here([c for c in customers if isinstance(c, str)], axes)
        else:
            self._drop_here(None, axes)
        if sent_at:
            self.metrics.fanout_latency.observe(max(time.time() - sent_at, 0.0))


def _ordered(axes: Iterable[Any]) -> tuple[Axis, ...]:
    """The axes named, each once, in ``AXES`` order."""
    named = set(axes)
    return tuple(a for a in AXES if a in named)
