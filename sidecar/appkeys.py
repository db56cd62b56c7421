"""Typed application keys shared by the three listeners' apps."""

from __future__ import annotations

from typing import Literal

from aiohttp import web

from .cache.cache import Caches, DocumentCache
from .cache.invalidation import Invalidator
from .cache.snapshot import Snapshotter
from .config import Settings
from .health import HealthMonitor
from .http.guard import HostGuard
from .http.streams import Streams
from .metrics import Metrics
from .redis.conn import RedisConn
from .tracing import Tracing
from .upstream import VellumClient
from .usage import UsageQueue

__all__ = [
    "CACHE",
    "CACHES",
    "CORE",
    "GUARD",
    "HEALTH",
    "INVALIDATOR",
    "LIFECYCLE",
    "METRICS",
    "OFREP_STREAMS",
    "REDIS",
    "SETTINGS",
    "SNAPSHOT",
    "TRACING",
    "UPSTREAM",
    "USAGE",
    "Lifecycle",
]

Phase = Literal["starting", "ready", "stopping"]


class Lifecycle:
    """Where the process is in its life; ``/readyz`` answers 200 only while ``ready``."""

    def __init__(self) -> None:
        self.phase: Phase = "starting"


SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
GUARD = web.AppKey("guard", HostGuard)
UPSTREAM = web.AppKey("upstream", VellumClient)
REDIS: web.AppKey[RedisConn | None] = web.AppKey("redis")
#: Every kind's cache.
CACHES = web.AppKey("caches", Caches)
#: The entitlement cache (``CACHES.entitlements``): its own key for the hot path.
CACHE = web.AppKey("cache", DocumentCache)
INVALIDATOR = web.AppKey("invalidator", Invalidator)
#: The local snapshot (``None``: ``SIDECAR_SNAPSHOT_FILE`` unset).
SNAPSHOT: web.AppKey[Snapshotter | None] = web.AppKey("snapshot")
HEALTH = web.AppKey("health", HealthMonitor)
#: The open OFREP event streams (told of every drop by the invalidator).
OFREP_STREAMS = web.AppKey("ofrep_streams", Streams)
#: Metered usage (``sidecar/usage``): the queue and this sidecar's deliveries; ``None``
#: without Redis (memory-only mode has no queue).
USAGE: web.AppKey[UsageQueue | None] = web.AppKey("usage")
#: The ops and webhook apps reach the shared resources through the core (local API) app.
CORE = web.AppKey("core", web.Application)
#: OpenTelemetry traces (``tracing.NO_TRACING`` unless the OTEL_* variables ask).
TRACING = web.AppKey("tracing", Tracing)
