"""Readiness from active checks: what ``/readyz`` and the state metrics report.

Waiting for a request to stumble on a fault makes readiness lag it (Redis read
``ok`` for seconds after it died, the fan-out through a whole Redis hang, the
upstream while it refused the key). So:

- **redis**: a check every ``SIDECAR_CHECK_INTERVAL`` (0.25 s) through the
  shared connection state (``RedisConn``; one script: ``Invalidator.check``,
  which also watches the epoch): a failure or a timeout
  (``SIDECAR_REDIS_TIMEOUT``) marks Redis ``down`` for every caller at once,
  and its reconnect probe brings it back; a refused write (OOM) shows as
  ``oom`` until a check finds Redis taking writes. States: ``ok``, ``oom``,
  ``down``, ``disabled`` (no ``SIDECAR_REDIS_URL``).
- **fanout**: the pub/sub listener PINGs down its subscribed connection at the
  same interval (``Invalidator``); a PONG later than the Redis timeout makes it
  ``down`` and it resubscribes. States: ``ok``, ``down``.
- **upstream**: every upstream answer is evidence (a 401/403 is
  ``auth_failed`` at once), and while no real call has answered for
  ``SIDECAR_UPSTREAM_CHECK_INTERVAL`` (1 s; 0 turns it off) one authenticated
  ``GET /tenants/{t}/flags`` is sent, so an idle sidecar notices too. States:
  ``ok``; ``degraded`` (recent failures or 429, or the breaker still cooling
  down after a check got an answer again); ``down`` (breaker open, or the
  last check got no answer or a 5xx); ``auth_failed`` (the latest answer was
  401/403: the key is wrong, revoked or not yet rotated in).

Each fault shows in ``/readyz`` and in
``vellum_sidecar_dependency_state{dependency, state}`` within one interval
plus the Redis (or check) timeout: under a second with the defaults.

``/readyz`` answers 503 only while starting and while stopping (the shutdown
drain included), and, with ``SIDECAR_WAIT_FOR_DATA=true``, after start until the
sidecar has had something to answer with (``has_data``: a snapshot loaded,
Redis answered, or the upstream answered once; latched, so it never flips
back). A dependency's state never makes it 503. Whatever is down,
the sidecar still answers: from memory, from Redis, stale entries, fail-open
modules, flag defaults, or a clear fail-closed error. Taking it (and with it
its pod) out of service would turn those answers into refused connections and
a partial outage into a total one, across the fleet at once when the upstream
is what failed. Alert on ``vellum_sidecar_dependency_state`` instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Final, Literal

import aiohttp
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .cache.invalidation import Invalidator
from .cache.snapshot import Snapshotter
from .config import Settings
from .metrics import Metrics
from .redis.conn import RedisConn
from .tasks import cancel_and_wait
from .upstream import VellumClient

__all__ = ["HealthMonitor", "State"]

log = logging.getLogger("sidecar.health")

State = Literal["ok", "oom", "degraded", "down", "auth_failed", "disabled"]

_STATES: Final[dict[str, tuple[State, ...]]] = {
    "redis": ("ok", "oom", "down", "disabled"),
    "fanout": ("ok", "down", "disabled"),
    "upstream": ("ok", "degraded", "down", "auth_failed"),
}
_AUTH_STATUSES: Final = frozenset({401, 403})


class HealthMonitor(Collector):
    """Runs the active checks and answers the states; registered as a metrics collector."""

    def __init__(
        self,
        settings: Settings,
        upstream: VellumClient,
        redis: RedisConn | None,
        invalidator: Invalidator,
        metrics: Metrics,
        snapshot: Snapshotter | None = None,
    ) -> None:
        self.settings = settings
        self.upstream = upstream
        self.redis = redis
        self.invalidator = invalidator
        self.metrics = metrics
        self.snapshot = snapshot
        self._had_data = False
        #: (monotonic time, status or None for no answer) of the latest upstream check.
        self.last_check: tuple[float, int | None] = (0.0, 0)
        self._tasks: list[asyncio.Task[None]] = []
        self._registered = False

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.redis is not None:
            self._tasks.append(loop.create_task(self._redis_loop()))
        if self.settings.upstream_check_interval > 0:
            self._tasks.append(loop.create_task(self._upstream_loop()))
        elif self.settings.wait_for_data:
            self._tasks.append(loop.create_task(self._wait_for_data_loop()))
        self.metrics.registry.register(self)
        self._registered = True
        # vellum_sidecar_upstream_state reports what /readyz does: the active checks.
        self.metrics.upstream_state.follow(self.upstream_state)

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
        if self._registered:
            self.metrics.registry.unregister(self)
            self._registered = False

    # -- checks ------------------------------------------------------------------------

    async def _redis_loop(self) -> None:
        redis = self.redis
        assert redis is not None
        while True:
            # While down, RedisConn's own probe pings until it answers again. The
            # check is the shared tier's (writability, the epoch, stalls:
            # Invalidator.check); the first goes out at once, as a baseline.
            if redis.state == "ok":
                await self.invalidator.check()
            await asyncio.sleep(self.settings.check_interval)

    async def _upstream_loop(self) -> None:
        interval = self.settings.upstream_check_interval
        while True:
            answered_at, _ = self.upstream.last_result
            if time.monotonic() - max(answered_at, self.last_check[0]) >= interval:
                await self.check_upstream()
            await asyncio.sleep(interval / 4)

    async def _wait_for_data_loop(self) -> None:
        """``SIDECAR_WAIT_FOR_DATA`` with the idle checks off: ask the upstream once a
        second until the sidecar has data, so readiness does not wait for traffic
        (which a pod that is not ready may never get)."""
        while not self.has_data():
            await self.check_upstream()
            await asyncio.sleep(1.0)

    async def check_upstream(self) -> int | None:
        """One authenticated ``GET /tenants/{t}/flags``; returns its status (None: no answer)."""
        s = self.settings
        timeout = min(s.upstream_timeout, max(s.upstream_check_interval, 1.0))
        status: int | None = None
        started = time.monotonic()
        try:
            async with self.upstream.session.get(
                self.upstream.url("flags"),
                headers={"x-api-key": s.api_key.current(time.time())},
                timeout=aiohttp.ClientTimeout(
                    total=timeout, connect=min(s.upstream_connect_timeout, timeout)
                ),
                allow_redirects=False,
            ) as resp:
                await resp.content.read(64 * 1024)
                status = resp.status
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.debug("upstream_check_failed", extra={"fields": {"error": type(exc).__name__}})
        self.last_check = (time.monotonic(), status)
        self.metrics.upstream_requests.labels(
            "health_check", str(status) if status is not None else "error"
        ).inc()
        self.metrics.upstream_latency.labels("health_check").observe(time.monotonic() - started)
        return status

    # -- states ------------------------------------------------------------------------

    def has_data(self) -> bool:
        """Whether the sidecar has had something to answer with since it started: a
        snapshot loaded (at least one entry), Redis answered, or the upstream answered
        (a 2xx or a 404) once. Latched: once true, it stays true."""
        if self._had_data:
            return True
        snapshot = self.snapshot
        answers = (self.upstream.last_result[1], self.last_check[1])
        self._had_data = (
            (snapshot is not None and snapshot.loaded > 0)
            or (self.redis is not None and self.redis.state == "ok")
            or any(s is not None and (200 <= s < 300 or s == 404) for s in answers)
        )
        return self._had_data

    def redis_state(self) -> State:
        if self.redis is None:
            return "disabled"
        return "oom" if self.redis.health == "oom" else self.redis.state

    def fanout_state(self) -> State:
        if self.redis is None:
            return "disabled"
        return "ok" if self.invalidator.subscribed.is_set() else "down"

    def upstream_state(self) -> State:
        breaker = self.upstream.state()
        real_at, real_status = self.upstream.last_result
        check_at, check_status = self.last_check
        probe_is_latest = check_at > real_at
        latest = check_status if probe_is_latest else real_status
        if max(real_at, check_at) > 0 and latest in _AUTH_STATUSES:
            return "auth_failed"
        check_failed = check_status is None or check_status >= 500
        if breaker == "down":
            # The breaker stays open through its cool-down; a check that got an
            # answer since its last failure shows the upstream is back.
            recovered = check_at > self.upstream.breaker.last_failure and not check_failed
            return "degraded" if recovered else "down"
        if probe_is_latest and check_failed:
            return "down"
        if breaker == "degraded" or latest == 429:
            return "degraded"
        return "ok"

    def states(self) -> dict[str, State]:
        out: dict[str, State] = {"redis": self.redis_state(), "upstream": self.upstream_state()}
        if self.redis is not None:
            out["fanout"] = self.fanout_state()
        return out

    # -- metrics -------------------------------------------------------------------------

    def describe(self) -> list[Metric]:
        return [self._family()]

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        current = {
            "redis": self.redis_state(),
            "fanout": self.fanout_state(),
            "upstream": self.upstream_state(),
        }
        for dependency, states in _STATES.items():
            for state in states:
                family.add_metric([dependency, state], 1.0 if current[dependency] == state else 0.0)
        yield family

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "vellum_sidecar_dependency_state",
            "1 for each dependency's current state (redis, fanout, upstream), else 0.",
            labels=("dependency", "state"),
        )
