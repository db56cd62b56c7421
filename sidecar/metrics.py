"""Prometheus metrics, one ``CollectorRegistry`` per app so tests stay isolated."""

from __future__ import annotations

import asyncio
import contextlib
from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

__all__ = ["CONTENT_TYPE_LATEST", "LoopCounter", "LoopHistogram", "Metrics"]

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
        # The three metrics touched on every cached read are loop-local (see
        # LoopCounter); the rest are prometheus-client's own.
        self.requests = LoopCounter(
            f"{p}_requests", "Local API requests by route and status.",
            ("route", "method", "status"), registry=r,
        )  # fmt: skip
        self.request_latency = LoopHistogram(
            f"{p}_request_duration_seconds", "Local API request latency by route.",
            ("route",), buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.cache_lookups = LoopCounter(
            f"{p}_cache_lookups", "Cache lookups by layer (memory, redis) and result.",
            ("layer", "result"), registry=r,
        )  # fmt: skip
        self._request_children: dict[
            tuple[str, str, int], tuple[LoopCounterChild, LoopHistogramChild]
        ] = {}
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
        # Listener limits (sidecar/http/limits.py) and the batch deadline.
        self.connections_refused = Counter(
            f"{p}_connections_refused", "Connections refused at accept or cut by a listener "
            "limit, by listener and reason.", ["listener", "reason"], registry=r,
        )  # fmt: skip
        self.open_connections = Gauge(
            f"{p}_open_connections", "Open connections by listener.", ["listener"], registry=r,
        )  # fmt: skip
        self.check_timeouts = Counter(
            f"{p}_check_timeouts", "POST /v1/check entries answered \"error\": \"timeout\".",
            registry=r,
        )  # fmt: skip

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one local API request and its latency (the hot path: one dict lookup)."""
        key = (route, method, status)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self.requests.labels(route, method, str(status)),
                self.request_latency.labels(route),
            )
        children[0].value += 1
        children[1].observe(seconds)

    def render(self) -> bytes:
        # RuntimeError: no running loop (rendering outside the server).
        with contextlib.suppress(RuntimeError):
            self.tasks.set(len(asyncio.all_tasks()))
        return generate_latest(self.registry)


class LoopCounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class LoopCounter(Collector):
    """A labelled counter for code that runs on the event loop's thread only.

    prometheus-client's ``Counter`` takes a lock on every increment and
    ``labels()`` validates on every call, about 2.5 µs per request in all; these
    children are plain attributes, bumped without a lock because everything that
    touches them (handlers and the ``/metrics`` render) runs on one thread. The
    exposition is prometheus-client's own (``generate_latest``), same names.
    """

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], *,
        registry: CollectorRegistry,
    ) -> None:  # fmt: skip
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], LoopCounterChild] = {}
        registry.register(self)

    def labels(self, *values: str) -> LoopCounterChild:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}")
            child = self._children[values] = LoopCounterChild()
        return child

    def describe(self) -> list[Metric]:
        return [CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            family.add_metric(values, child.value)
        yield family


class LoopHistogramChild:
    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: list[float]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (le = "<=").
        self.counts[bisect_left(self._bounds, value)] += 1
        self.sum += value


class LoopHistogram(Collector):
    """A labelled histogram with :class:`LoopCounter`'s single-thread contract."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], *,
        buckets: Sequence[float], registry: CollectorRegistry,
    ) -> None:  # fmt: skip
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._bounds = sorted(float(b) for b in buckets)
        self._les = [_le(b) for b in self._bounds] + ["+Inf"]
        self._children: dict[tuple[str, ...], LoopHistogramChild] = {}
        registry.register(self)

    def labels(self, *values: str) -> LoopHistogramChild:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}")
            child = self._children[values] = LoopHistogramChild(self._bounds)
        return child

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            cumulative, buckets = 0, []
            for le, count in zip(self._les, child.counts, strict=True):
                cumulative += count
                buckets.append((le, float(cumulative)))
            family.add_metric(values, buckets, child.sum)
        yield family


def _le(bound: float) -> str:
    """A bucket bound as prometheus-client's own histograms print it."""
    return str(floatToGoString(bound))  # type: ignore[no-untyped-call]
