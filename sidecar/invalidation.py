"""Invalidation: drop entries in Redis, fan out to every sidecar, learn account links.

An invalidation is a delete plus a generation bump, never a write of new data,
so duplicated or reordered messages are harmless. The sidecar that issues it
deletes the Redis entries, bumps the generations (so fills already in flight
anywhere cannot store their older answer), publishes one message on the
tenant's channel and drops its own in-process entries at once. Every other
sidecar drops its in-process entries when the message arrives.

Redis pub/sub is at-most-once: a sidecar that was disconnected may have missed
messages, so every (re)subscribe drops the whole in-process layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Final, Literal

import orjson
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterPubSub, RedisCluster

from .cache import EntitlementCache, Entry
from .metrics import Metrics
from .redisclient import REDIS_ERRORS, RedisClient
from .redisio import RedisConn, RedisDown

__all__ = ["Invalidator", "Scope"]

log = logging.getLogger("sidecar.invalidation")

Scope = Literal["customer", "account", "tenant"]

_GEN_TTL_S: Final = 3600
_SCAN_BATCH: Final = 500
_MAX_LOCAL_LINKS: Final = 100_000


class _Resubscribe(Exception):
    """The server ended our shard-channel subscription (slot migration, failover)."""


class _Stalled(Exception):
    """The subscribed connection did not answer a PING in time (a hung Redis)."""


_LISTEN_ERRORS: Final[tuple[type[BaseException], ...]] = (*REDIS_ERRORS, _Resubscribe, _Stalled)
_HEARTBEAT: Final = b"vellum-sidecar-heartbeat"


async def _ping(pubsub: PubSub) -> None:
    """PING down the subscribed connection(s); the PONG comes back as a message."""
    if isinstance(pubsub, ClusterPubSub):
        # Sharded subscriptions live on per-node connections (one: the tenant's shard).
        for node in list(pubsub.node_pubsub_mapping.values()):
            await node.ping(_HEARTBEAT)
    else:
        await pubsub.ping(_HEARTBEAT)


class Invalidator:
    def __init__(
        self,
        cache: EntitlementCache,
        redis: RedisConn | None,
        metrics: Metrics,
        *,
        sidecar_id: str,
        link_ttl: float,
        heartbeat: float = 0.25,
        stall_after: float = 0.5,
    ) -> None:
        self.cache = cache
        self.redis = redis
        self.metrics = metrics
        self.sidecar_id = sidecar_id
        self._link_ttl = int(link_ttl)
        # account -> customers learnt from writes, for memory-only mode and while
        # Redis is down (bounded LRU of accounts).
        self._links: OrderedDict[str, set[str]] = OrderedDict()
        self._listener: asyncio.Task[None] | None = None
        #: Set while the fan-out subscription is confirmed and answering heartbeats.
        self.subscribed = asyncio.Event()
        self._heartbeat = heartbeat
        self._stall_after = stall_after
        cache.on_fetched = self._learn_from_entry

    # -- issuing -----------------------------------------------------------------

    async def customers(
        self, customers: Sequence[str], *, source: str, scope: Scope = "customer"
    ) -> bool:
        """Drop these customers on every sidecar.

        Returns whether every sidecar was reached: False when Redis is configured
        but could not be written, in which case only this sidecar dropped them.
        """
        if not customers:
            return True
        shared = True
        self.cache.drop_local(customers)
        if self.redis is not None:
            keys = self.redis.keys
            cluster = self.redis.cluster

            async def call(r: RedisClient) -> Any:
                # One slot (the tenant's hash tag), so MULTI works on a cluster too.
                async with r.pipeline(transaction=True) as pipe:
                    for c in customers:
                        pipe.incr(keys.gen(c))
                        pipe.expire(keys.gen(c), _GEN_TTL_S)
                        pipe.delete(keys.entry(c))
                    message = self._message("customer", list(customers))
                    if cluster:
                        pipe.spublish(keys.channel, message)
                    else:
                        pipe.publish(keys.channel, message)
                    return await pipe.execute()

            try:
                await self.redis.run("invalidate", call)
            except RedisDown:
                shared = False
        self.metrics.invalidations.labels(scope, source).inc()
        return shared

    async def account(self, account: str, *, source: str) -> tuple[Scope, bool]:
        """Drop an account's known customers; everything for the tenant when none are known.

        Returns the scope applied and whether every sidecar was reached.
        """
        known = set(self._links.get(account, ()))
        known |= self.cache.memory.customers_of(account)
        if self.redis is not None:
            key = self.redis.keys.account(account)
            with contextlib.suppress(RedisDown):
                members = await self.redis.run("account_members", lambda r: r.smembers(key))
                known |= {m.decode() if isinstance(m, bytes) else str(m) for m in members}
        if not known:
            return "tenant", await self.tenant(source=source)
        return "account", await self.customers(sorted(known), source=source, scope="account")

    async def tenant(self, *, source: str) -> bool:
        """Drop everything cached for the tenant on every sidecar (see ``customers``)."""
        shared = True
        self.cache.drop_local(None)
        if self.redis is not None:
            keys = self.redis.keys
            cluster = self.redis.cluster

            async def call(r: RedisClient) -> None:
                await r.incr(keys.tenant_gen)
                batch: list[Any] = []
                # On a cluster, scan_iter walks every primary (right even while
                # the tenant's slot migrates); the keys share one slot, so UNLINK
                # of a batch is one command.
                async for key in r.scan_iter(match=keys.entry_pattern, count=_SCAN_BATCH):
                    batch.append(key)
                    if len(batch) >= _SCAN_BATCH:
                        await r.unlink(*batch)
                        batch = []
                if batch:
                    await r.unlink(*batch)
                message = self._message("tenant", None)
                if cluster:
                    await r.spublish(keys.channel, message)
                else:
                    await r.publish(keys.channel, message)

            try:
                await self.redis.run("invalidate_all", call)
            except RedisDown:
                shared = False
        self.metrics.invalidations.labels("tenant", source).inc()
        return shared

    def _message(self, scope: str, customers: list[str] | None) -> bytes:
        return orjson.dumps(
            {"scope": scope, "customers": customers, "origin": self.sidecar_id, "at": time.time()}
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
        """Subscribe, apply messages; on any failure resubscribe with backoff.

        A PING goes down the subscribed connection every ``heartbeat`` seconds.
        The subscription counts (``subscribed``, the in-process layer dropped)
        only once a PONG comes back, and a PONG later than ``stall_after``
        counts as a failure: a hung Redis accepts connections and commands and
        answers nothing, which would otherwise look like a quiet channel.
        """
        assert self.redis is not None
        channel = self.redis.keys.channel
        loop = asyncio.get_running_loop()
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
                await _ping(pubsub)
                pinged_at, awaiting = loop.time(), True
                while True:
                    now = loop.time()
                    if awaiting and now - pinged_at > self._stall_after:
                        raise _Stalled
                    if not awaiting and now - pinged_at >= self._heartbeat:
                        await _ping(pubsub)
                        pinged_at, awaiting = now, True
                    due = self._stall_after if awaiting else self._heartbeat
                    wait = min(max(pinged_at + due - now, 0.005), self._heartbeat)
                    if isinstance(pubsub, ClusterPubSub):
                        msg = await pubsub.get_sharded_message(timeout=wait)
                    else:
                        msg = await pubsub.get_message(timeout=wait)
                    kind = msg.get("type") if msg is not None else None
                    if kind in ("message", "smessage"):
                        assert msg is not None
                        self._apply(msg["data"])
                    elif kind == "pong":
                        awaiting = False
                        if not self.subscribed.is_set():
                            # Messages may have been missed while (re)connecting.
                            self.cache.drop_local(None)
                            self.subscribed.set()
                            backoff = 0.05
                            failed = False
                            log.info("fanout_subscribed")
                    elif kind == "sunsubscribe":
                        # The slot moved or its shard failed over: resubscribe.
                        raise _Resubscribe
            except asyncio.CancelledError:
                raise
            except _LISTEN_ERRORS as exc:
                self.subscribed.clear()
                failed = True
                log.warning("fanout_disconnected", extra={"fields": {"error": type(exc).__name__}})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
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
        customers = msg.get("customers")
        if scope == "customer" and isinstance(customers, list):
            self.cache.drop_local([c for c in customers if isinstance(c, str)])
        else:
            self.cache.drop_local(None)
        if sent_at:
            self.metrics.fanout_latency.observe(max(time.time() - sent_at, 0.0))
