"""The shared Redis connection: key names, health, and reconnection with backoff.

Every Redis call goes through ``RedisConn.run``. A failure marks Redis ``down``;
while down, calls fail fast (``RedisDown``) instead of each paying a timeout, and
one background task pings with exponential backoff until Redis answers again,
then runs the reconnect callbacks (the pub/sub listener uses its own connection
and drops the in-process layer when it resubscribes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Final, Literal, TypeVar
from urllib.parse import quote

from redis.asyncio import RedisCluster
from redis.exceptions import MaxConnectionsError

from .metrics import Metrics
from .redisclient import REDIS_ERRORS, RedisClient

__all__ = ["Keys", "RedisConn", "RedisDown", "RedisState"]

log = logging.getLogger("sidecar.redis")

T = TypeVar("T")
RedisState = Literal["ok", "down"]

#: A down Redis is pinged at least once a second, so its return shows within a second.
_MAX_BACKOFF: Final = 1.0


class RedisDown(Exception):
    """Redis did not answer (or is known to be down); callers degrade, never fail."""


class Keys:
    """Key names for one tenant, all sharing the hash tag ``{tenant}``.

    The tag keeps a tenant's keys in one Redis Cluster slot, so multi-key
    scripts (generation checks) work on a cluster. The tenant id is
    percent-encoded: no ``{``, ``}`` or glob characters can reach a key name.
    """

    __slots__ = ("channel", "entry_pattern", "prefix", "tenant_gen")

    def __init__(self, tenant: str) -> None:
        self.prefix = f"vsc:{{{quote(tenant, safe='')}}}:"
        self.tenant_gen = self.prefix + "g"
        self.channel = self.prefix + "inv"
        self.entry_pattern = self.prefix + "e:*"

    def entry(self, customer: str) -> str:
        return self.prefix + "e:" + customer

    def gen(self, customer: str) -> str:
        return self.prefix + "g:" + customer

    def lock(self, customer: str) -> str:
        return self.prefix + "l:" + customer

    def account(self, account: str) -> str:
        return self.prefix + "a:" + account

    def event(self, event_id: str) -> str:
        return self.prefix + "evt:" + event_id


class RedisConn:
    """A ``redis.asyncio.Redis`` (or ``RedisCluster``) client plus its health."""

    def __init__(self, client: RedisClient, keys: Keys, metrics: Metrics) -> None:
        self.client = client
        #: On a cluster the fan-out uses sharded pub/sub (SPUBLISH/SSUBSCRIBE) on
        #: the tenant's hash-tagged channel, so it stays on the tenant's shard.
        self.cluster = isinstance(client, RedisCluster)
        # redis-py's cluster client fails at once when a node's pool is busy (the
        # one-server and Sentinel pools wait), so on a cluster calls wait here for
        # one of the pool's connections, less the fan-out listener's.
        self._slots: asyncio.Semaphore | None = None
        self._slot_wait = 0.5
        if isinstance(client, RedisCluster):
            pool = int(client.connection_kwargs.get("max_connections") or 50)
            self._slots = asyncio.Semaphore(max(pool - 1, 1))
            self._slot_wait = float(client.connection_kwargs.get("socket_timeout") or 0.5)
        self.keys = keys
        self.metrics = metrics
        self.state: RedisState = "ok"
        self._probe: asyncio.Task[None] | None = None
        self._on_reconnect: list[Callable[[], Awaitable[None]]] = []
        metrics.redis_up.set(1)

    def on_reconnect(self, callback: Callable[[], Awaitable[None]]) -> None:
        self._on_reconnect.append(callback)

    async def run(self, operation: str, call: Callable[[RedisClient], Awaitable[T]]) -> T:
        """Run one Redis call; raise ``RedisDown`` if Redis is down or the call fails."""
        if self.state == "down":
            raise RedisDown(operation)
        if self._slots is None:
            return await self._run(operation, call)
        try:
            await asyncio.wait_for(self._slots.acquire(), self._slot_wait)
        except TimeoutError:
            self.metrics.redis_errors.labels(operation).inc()
            raise RedisDown(operation) from None
        try:
            return await self._run(operation, call)
        finally:
            self._slots.release()

    async def _run(self, operation: str, call: Callable[[RedisClient], Awaitable[T]]) -> T:
        try:
            return await call(self.client)
        except MaxConnectionsError as exc:
            # Every pooled connection is busy (a burst): this call degrades, but
            # Redis answers, so it is not marked down.
            self.metrics.redis_errors.labels(operation).inc()
            raise RedisDown(operation) from exc
        except REDIS_ERRORS as exc:
            self.metrics.redis_errors.labels(operation).inc()
            self._mark_down(operation, exc)
            raise RedisDown(operation) from exc

    def _mark_down(self, operation: str, exc: BaseException) -> None:
        if self.state == "down":
            return
        self.state = "down"
        self.metrics.redis_up.set(0)
        log.warning(
            "redis_down", extra={"fields": {"operation": operation, "error": type(exc).__name__}}
        )
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._probe_until_up())

    async def _probe_until_up(self) -> None:
        backoff = 0.05
        while True:
            await asyncio.sleep(random.uniform(backoff / 2, backoff))
            try:
                await self.client.ping()
            except REDIS_ERRORS:
                backoff = min(backoff * 2, _MAX_BACKOFF)
                continue
            break
        # Pooled connections opened before the outage are dead (a restarted Redis
        # reset them): drop the idle ones, or each would fail its next command and
        # mark Redis down again, leaving fetch locks behind that others wait on.
        pool = getattr(self.client, "connection_pool", None)
        if pool is not None:
            with contextlib.suppress(*REDIS_ERRORS):
                await pool.disconnect(inuse_connections=False)
        self.state = "ok"
        self.metrics.redis_up.set(1)
        log.info("redis_up")
        for callback in self._on_reconnect:
            await callback()

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
        await self.client.aclose()
