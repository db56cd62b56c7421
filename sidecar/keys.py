"""Typed application keys shared by the three listeners' apps."""

from __future__ import annotations

from typing import Literal

from aiohttp import web

from .cache import EntitlementCache
from .config import Settings
from .guard import HostGuard
from .health import HealthMonitor
from .invalidation import Invalidator
from .metrics import Metrics
from .redisio import RedisConn
from .upstream import VellumClient

__all__ = [
    "CACHE",
    "CORE",
    "GUARD",
    "HEALTH",
    "INVALIDATOR",
    "LIFECYCLE",
    "METRICS",
    "REDIS",
    "SETTINGS",
    "UPSTREAM",
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
CACHE = web.AppKey("cache", EntitlementCache)
INVALIDATOR = web.AppKey("invalidator", Invalidator)
HEALTH = web.AppKey("health", HealthMonitor)
#: The ops and webhook apps reach the shared resources through the core (local API) app.
CORE = web.AppKey("core", web.Application)
