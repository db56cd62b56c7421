"""App factories. ``create_app(settings)`` builds the local API app, which owns every
shared resource (one ``cleanup_ctx`` entry each); the ops and webhook apps reach
those resources through it, so the three listeners share one cache and one
upstream session in one event loop.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from . import __version__
from .appkeys import (
    CACHE,
    CACHES,
    GUARD,
    HEALTH,
    INVALIDATOR,
    LIFECYCLE,
    METRICS,
    OFREP_STREAMS,
    REDIS,
    SETTINGS,
    SNAPSHOT,
    TRACING,
    UPSTREAM,
    USAGE,
    Lifecycle,
)
from .cache.cache import Caches
from .cache.invalidation import Invalidator
from .cache.snapshot import Snapshotter
from .config import Settings
from .health import HealthMonitor
from .http.guard import HostGuard
from .http.routes import add_routes
from .http.streams import Streams
from .metrics import Metrics
from .redis.conn import RedisConn, RedisDown
from .redis.keys import Keys
from .redis.url import create_redis
from .tracing import NO_TRACING, Tracing
from .upstream import VellumClient
from .usage import UsageQueue

__all__ = ["create_app"]

#: The local API accepts bodies up to 1 MiB (a full batch of 1,000 checks fits easily).
LOCAL_MAX_BODY = 1024 * 1024


def create_app(
    settings: Settings, *, metrics: Metrics | None = None, tracing: Tracing = NO_TRACING
) -> web.Application:
    """The local API app; its startup opens the upstream session, Redis and the listener.

    ``tracing`` (``tracing.from_env``) wraps the routes registered here and is
    closed (its last spans flushed) when the app's resources are.
    """
    # No middleware: every route's handler is wrapped instead (http/middleware.py).
    app = web.Application(client_max_size=LOCAL_MAX_BODY)
    app[SETTINGS] = settings
    app[METRICS] = metrics if metrics is not None else Metrics()
    app[LIFECYCLE] = Lifecycle()
    app[GUARD] = HostGuard(settings.allowed_hosts)
    app[TRACING] = tracing
    app.cleanup_ctx.append(_tracing_ctx)
    app.cleanup_ctx.append(_upstream_ctx)
    app.cleanup_ctx.append(_redis_ctx)
    app.cleanup_ctx.append(_cache_ctx)
    app.cleanup_ctx.append(_snapshot_ctx)
    app.cleanup_ctx.append(_usage_ctx)
    app.cleanup_ctx.append(_health_ctx)
    app.cleanup_ctx.append(_streams_ctx)
    app.cleanup_ctx.append(_drops_traced_ctx)
    # Before the listeners wait for requests in flight: an open stream would never end.
    app.on_shutdown.append(_end_streams)
    add_routes(app)
    return app


async def _tracing_ctx(app: web.Application) -> AsyncIterator[None]:
    """First in, last out: spans of every other resource's shutdown still leave."""
    yield
    await app[TRACING].close()


async def _drops_traced_ctx(app: web.Application) -> AsyncIterator[None]:
    """A span for each drop applied here (a push's, a fan-out message's, a cache drop's)."""
    tracing = app[TRACING]
    unwatch = app[INVALIDATOR].watch(tracing.dropped) if tracing.enabled else None
    yield
    if unwatch is not None:
        unwatch()


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    connector = aiohttp.TCPConnector(limit=100, ttl_dns_cache=60, enable_cleanup_closed=True)
    session = aiohttp.ClientSession(
        connector=connector,
        headers={"User-Agent": f"vellum-sidecar/{__version__}", "Accept": "application/json"},
        skip_auto_headers=("Accept-Encoding",),
        raise_for_status=False,
        auto_decompress=True,
    )
    app[UPSTREAM] = VellumClient(settings, session, app[METRICS], tracing=app[TRACING])
    yield
    await session.close()


async def _redis_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    if settings.redis_url is None:
        app[REDIS] = None
        yield
        return
    client = create_redis(
        settings.redis_url.reveal(),
        cluster=settings.redis_cluster,
        timeout=settings.redis_timeout,
        pool_size=settings.redis_pool_size,
    )
    conn = RedisConn(client, Keys(settings.tenant_id), app[METRICS])
    with contextlib.suppress(RedisDown):
        await conn.run("ping", lambda r: r.ping())
    app[REDIS] = conn
    yield
    await conn.close()


async def _cache_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    caches = Caches(settings, app[UPSTREAM], app[METRICS], app[REDIS])
    invalidator = Invalidator(
        caches,
        app[REDIS],
        app[METRICS],
        sidecar_id=f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}",
        link_ttl=settings.cache_ttl + settings.stale_ttl,
        heartbeat=settings.check_interval,
        stall_after=max(settings.redis_timeout, settings.check_interval),
    )
    app[CACHES] = caches
    app[CACHE] = caches.entitlements
    app[INVALIDATOR] = invalidator
    invalidator.start()
    yield
    await invalidator.stop()
    await caches.close()


async def _snapshot_ctx(app: web.Application) -> AsyncIterator[None]:
    """The local snapshot (cache/snapshot.py): loaded here, at start-up, so before the
    listeners report ready; written every interval, and once more on the way out
    (after the listeners finished their requests, before the caches close)."""
    settings = app[SETTINGS]
    if settings.snapshot_file is None:
        app[SNAPSHOT] = None
        yield
        return
    snapshotter = Snapshotter(
        settings.snapshot_file,
        tenant=settings.tenant_id,
        interval=settings.snapshot_interval,
        caches=app[CACHES],
        metrics=app[METRICS],
    )
    app[SNAPSHOT] = snapshotter
    await snapshotter.load()
    snapshotter.start()
    yield
    await snapshotter.stop()


async def _usage_ctx(app: web.Application) -> AsyncIterator[None]:
    """Metered usage (sidecar/usage): with Redis, the queue and this sidecar's deliveries."""
    redis = app[REDIS]
    if redis is None:
        app[USAGE] = None
        yield
        return
    queue = UsageQueue(
        app[SETTINGS], redis, app[UPSTREAM], app[METRICS], holder=app[INVALIDATOR].sidecar_id
    )
    app[USAGE] = queue
    queue.start()
    yield
    await queue.stop()


async def _health_ctx(app: web.Application) -> AsyncIterator[None]:
    """The active checks behind /readyz (sidecar/health.py)."""
    monitor = HealthMonitor(
        app[SETTINGS], app[UPSTREAM], app[REDIS], app[INVALIDATOR], app[METRICS], app[SNAPSHOT]
    )
    app[HEALTH] = monitor
    monitor.start()
    yield
    await monitor.stop()


async def _streams_ctx(app: web.Application) -> AsyncIterator[None]:
    streams = Streams()
    app[OFREP_STREAMS] = streams
    unwatch = app[INVALIDATOR].watch(streams.notify)
    yield
    unwatch()
    streams.close()


async def _end_streams(app: web.Application) -> None:
    if OFREP_STREAMS in app:
        app[OFREP_STREAMS].close()
