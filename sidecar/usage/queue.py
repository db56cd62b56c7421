"""The facade of metered usage: accept a record, read an outcome, deliver (``UsageQueue``)."""

from __future__ import annotations

from typing import Any

from ..config import Settings
from ..metrics import Metrics
from ..redis.conn import RedisConn
from ..upstream import VellumClient
from .delivery import Deliverer
from .records import Record, outcome_body
from .store import Accepted, UsageStore

__all__ = ["UsageQueue", "lease_seconds"]


def lease_seconds(upstream_timeout: float) -> float:
    """How long a partition's lease lasts without renewal: long enough that a holder
    always has an upstream call's timeout (plus a second) left when it sends, renewed
    every fifth of it; at least 5 s. It is also how long a killed sidecar's records
    wait before another sidecar takes them over."""
    return max(5.0, 3 * upstream_timeout)


class UsageQueue:
    """Metered usage with Redis: the queue (``UsageStore``) and this sidecar's share of
    the deliveries (``Deliverer``). Every method raises ``RedisDown`` when Redis fails."""

    def __init__(
        self,
        settings: Settings,
        redis: RedisConn,
        upstream: VellumClient,
        metrics: Metrics,
        *,
        holder: str,
    ) -> None:
        self.metrics = metrics
        self.store = UsageStore(
            redis, max_queued=settings.usage_max_queued, outcome_ttl=settings.usage_outcome_ttl
        )
        self.deliverer = Deliverer(
            self.store,
            upstream,
            metrics,
            holder=holder,
            lease=lease_seconds(settings.upstream_timeout),
            upstream_timeout=settings.upstream_timeout,
            retry_max=settings.usage_retry_max,
        )

    def start(self) -> None:
        self.deliverer.start()

    async def stop(self) -> None:
        await self.deliverer.stop()

    async def accept(self, record: Record) -> Accepted:
        """Queue ``record`` (durable in Redis when this returns) or find its key's record."""
        accepted = await self.store.accept(record)
        if accepted.result == "queued":
            self.metrics.usage_records.labels("queued").inc()
            self.deliverer.wake(record.partition)
        return accepted

    async def outcome(self, key: str) -> dict[str, Any] | None:
        """``GET /v1/usage/{key}``'s body; ``None`` when no record has ``key``."""
        fields = await self.store.outcome(key)
        return outcome_body(fields) if fields is not None else None
