"""The shared Redis connection: health, and reconnection with backoff (``RedisConn``).

Every Redis call goes through ``RedisConn.run``. A failure marks Redis ``down``;
while down, calls fail fast (``RedisDown``) instead of each paying a timeout, and
one background task pings with exponential backoff (capped at half a second, so
work queued while Redis was away is applied soon after it answers) until Redis
answers again, then runs the reconnect callbacks (the invalidation queue, the
replay ids seen meanwhile). The pub/sub listener uses its own connection and drops
the in-process layer when it resubscribes.

A restarted Redis leaves every pooled connection stale, and redis-py finds out
only when a command fails on one ("Connection closed by server"). Such a failure,
a connection error that came without waiting, is retried once on a fresh
connection before Redis is marked down: a dead Redis refuses that connection at
once (still detected fast), and a hung one times out, which is never retried (so
a call is still bounded by ``SIDECAR_REDIS_TIMEOUT``).

A Redis at ``maxmemory`` with nothing it may evict refuses writes ("OOM command
not allowed") and still answers reads: such a refusal is ``RedisDown`` for that
call only, Redis is not marked down, and ``writable`` turns false until a health
check finds it taking writes again (``/readyz`` shows ``redis: oom``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Final, Literal, TypeVar

from redis.asyncio import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError, OutOfMemoryError

from ..metrics import Metrics
from ..tasks import cancel_and_wait
from .keys import Keys
from .url import REDIS_ERRORS, RedisClient

__all__ = ["RedisConn", "RedisDown", "RedisState", "lost_connection"]

log = logging.getLogger("sidecar.redis")

T = TypeVar("T")
RedisState = Literal["ok", "down"]

_MAX_BACKOFF: Final = 0.5


class RedisDown(Exception):
    """Redis did not answer (or is known to be down); callers degrade, never fail."""


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
        #: Redis takes writes (False while it refuses them: OOM).
        self.writable = True
        self._probe: asyncio.Task[None] | None = None
        self._on_reconnect: list[Callable[[], Awaitable[None]]] = []
        self._on_down: list[Callable[[BaseException], None]] = []
        metrics.redis_state.follow(lambda: self.health)

    @property
    def health(self) -> str:
        """What ``/readyz`` reports: ``ok``, ``oom`` (answers, refuses writes) or ``down``."""
        if self.state == "ok" and not self.writable:
            return "oom"
        return self.state

    def on_reconnect(self, callback: Callable[[], Awaitable[None]]) -> None:
        self._on_reconnect.append(callback)

    def on_down(self, callback: Callable[[BaseException], None]) -> None:
        """Call ``callback`` (synchronously, with the failure) each time Redis is marked
        down."""
        self._on_down.append(callback)

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
        except REDIS_ERRORS as exc:
            if not _stale_connection(exc):
                raise self._failed(operation, exc) from exc
        # The connection was most likely stale (Redis restarted since it was
        # pooled), and so are the other idle ones: retry once on a fresh connection.
        self.metrics.redis_retries.labels(operation).inc()
        await self._drop_idle_connections()
        try:
            return await call(self.client)
        except REDIS_ERRORS as exc:
            raise self._failed(operation, exc) from exc

    def write_refused(self) -> None:
        """Redis refused a write (OOM); the next health check tells when it takes them again."""
        if self.writable:
            self.writable = False
            log.warning("redis_write_refused", extra={"fields": {"reason": "oom"}})

    def _failed(self, operation: str, exc: BaseException) -> RedisDown:
        self.metrics.redis_errors.labels(operation).inc()
        if isinstance(exc, OutOfMemoryError):
            # Reads still work: this call degrades, Redis is not marked down.
            self.write_refused()
        elif not isinstance(exc, MaxConnectionsError):
            # MaxConnectionsError: every pooled connection is busy (a burst); this
            # call degrades, but Redis answers, so it is not marked down.
            self._mark_down(operation, exc)
        return RedisDown(operation)

    async def _drop_idle_connections(self) -> None:
        """Close the pool's idle connections; in-use ones are closed by their own failure.

        A cluster client re-creates its node connections itself after a
        connection error, so only the one-server and Sentinel pools need this.
        """
        if isinstance(self.client, RedisCluster):
            return
        with contextlib.suppress(*REDIS_ERRORS):
            await self.client.connection_pool.disconnect(inuse_connections=False)

    def _mark_down(self, operation: str, exc: BaseException) -> None:
        if self.state == "down":
            return
        self.state = "down"
        log.warning(
            "redis_down", extra={"fields": {"operation": operation, "error": type(exc).__name__}}
        )
        for callback in self._on_down:
            callback(exc)
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._probe_until_up())

    async def _probe_until_up(self) -> None:
        while True:
            backoff = 0.05
            while True:
                await asyncio.sleep(random.uniform(backoff / 2, backoff))
                try:
                    await self.client.ping()
                except REDIS_ERRORS:
                    backoff = min(backoff * 2, _MAX_BACKOFF)
                    continue
                break
            self.state = "ok"
            log.info("redis_up")
            for callback in self._on_reconnect:
                try:
                    await callback()
                except Exception:  # one failing callback must not keep the others from running
                    log.exception("redis_reconnect_callback_failed")
            if self.state == "ok":
                return
            # Down again while the callbacks ran: _mark_down saw this task still
            # running and left the probing to it.

    async def close(self) -> None:
        if self._probe is not None:
            await cancel_and_wait([self._probe])
        await self.client.aclose()


def lost_connection(exc: BaseException) -> bool:
    """A failure that says the connection itself went (refused, reset, closed by the
    server: Redis restarted, failed over or became unreachable), not that Redis was
    merely slow to answer (a timeout: a hung Redis, or this process's own delays)."""
    if isinstance(exc, MaxConnectionsError | TimeoutError):
        return False
    if isinstance(exc, RedisConnectionError):
        return not isinstance(exc.__cause__, TimeoutError)
    return isinstance(exc, OSError)


def _stale_connection(exc: BaseException) -> bool:
    """A connection error that came without waiting: the socket was closed under us.

    Not a timeout (a hung Redis), and not the pool's "No connection available"
    (a ``ConnectionError`` raised after waiting for a free connection).
    """
    if not isinstance(exc, RedisConnectionError) or isinstance(exc, MaxConnectionsError):
        return False
    return not isinstance(exc.__cause__, TimeoutError)
