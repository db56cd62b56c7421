"""Building the redis-py asyncio client from ``SIDECAR_REDIS_URL``."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .config import Settings

__all__ = ["create_redis"]


def create_redis(settings: Settings) -> Redis:
    """A redis-py asyncio client with explicit timeouts, pool size and no hidden retries.

    redis-py 8 retries failed commands by default; the sidecar does its own
    backoff (``RedisConn``), so a dead Redis costs one timeout, not several.
    """
    assert settings.redis_url is not None
    pool = BlockingConnectionPool.from_url(
        settings.redis_url.reveal(),
        max_connections=settings.redis_pool_size,
        timeout=settings.redis_timeout,
        socket_timeout=settings.redis_timeout,
        socket_connect_timeout=settings.redis_timeout,
        health_check_interval=30,
        retry=Retry(NoBackoff(), 0),
        client_name="vellum-sidecar",
    )
    return Redis(connection_pool=pool)
