"""Prometheus metrics, one ``CollectorRegistry`` per app so tests stay isolated."""

from __future__ import annotations

import asyncio
import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)  # fmt: skip


class Metrics:
    """Every ``vellum_sidecar_`` metric of the interface, in one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        p = "vellum_sidecar"
        self.requests = Counter(
            f"{p}_requests", "Local API requests by route and status.",
            ["route", "method", "status"], registry=r,
        )  # fmt: skip
        self.request_latency = Histogram(
            f"{p}_request_duration_seconds", "Local API request latency by route.",
            ["route"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.cache_lookups = Counter(
            f"{p}_cache_lookups", "Cache lookups by layer (memory, redis) and result.",
            ["layer", "result"], registry=r,
        )  # fmt: skip
        self.upstream_requests = Counter(
            f"{p}_upstream_requests", "Upstream requests by operation and status.",
            ["operation", "status"], registry=r,
        )  # fmt: skip
        self.upstream_latency = Histogram(
            f"{p}_upstream_request_duration_seconds", "Upstream request latency by operation.",
            ["operation"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.upstream_state = Gauge(
            f"{p}_upstream_state", "Upstream state: 0 ok, 1 degraded, 2 down (breaker open).",
            registry=r,
        )  # fmt: skip
        self.webhooks = Counter(
            f"{p}_webhooks", "Push webhooks received by result.", ["result"], registry=r,
        )  # fmt: skip
        self.invalidations = Counter(
            f"{p}_invalidations", "Invalidations applied by scope and source.",
            ["scope", "source"], registry=r,
        )  # fmt: skip
        self.fanout_latency = Histogram(
            f"{p}_invalidation_fanout_seconds",
            "Time from an invalidation being issued to this sidecar applying it.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.redis_errors = Counter(
            f"{p}_redis_errors", "Redis commands that failed, by operation.",
            ["operation"], registry=r,
        )  # fmt: skip
        self.redis_up = Gauge(
            f"{p}_redis_up", "1 when Redis answers, 0 when down, absent when disabled.",
            registry=r,
        )  # fmt: skip
        self.memory_entries = Gauge(
            f"{p}_memory_entries", "Entries in the in-process cache layer.", registry=r,
        )  # fmt: skip
        self.tasks = Gauge(
            f"{p}_asyncio_tasks", "asyncio tasks alive in the event loop (a leak shows here).",
            registry=r,
        )  # fmt: skip
        # process_resident_memory_bytes, process_open_fds, ... for this process.
        ProcessCollector(registry=r)
        self.inflight_fetches = Gauge(
            f"{p}_inflight_fetches", "Entitlement fetches in flight (single-flight).",
            registry=r,
        )  # fmt: skip

    def render(self) -> bytes:
        # RuntimeError: no running loop (rendering outside the server).
        with contextlib.suppress(RuntimeError):
            self.tasks.set(len(asyncio.all_tasks()))
        return generate_latest(self.registry)
