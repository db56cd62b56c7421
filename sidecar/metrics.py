"""Prometheus metrics, one ``CollectorRegistry`` per app so tests stay isolated.

``/metrics`` carries no ``*_created`` series. prometheus-client adds one per
counter and histogram child (a start timestamp that the text format's
consumers ignore); they are dropped where the exposition is written
(:func:`exposition`), registry by registry, rather than with
``prometheus_client.disable_created_metrics()``, which flips a process-global
switch under every other registry in the process (tests build many apps).
"""

from __future__ import annotations

import asyncio
import contextlib
import platform
from abc import abstractmethod
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import Final, Generic, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import __version__

ChildT = TypeVar("ChildT")

__all__ = [
    "CONTENT_TYPE_LATEST",
    "FANOUT_STATES",
    "MAX_UNKNOWN_SHAPES",
    "REDIS_STATES",
    "SNAPSHOT_WRITE_RESULTS",
    "UPSTREAM_STATES",
    "USAGE_RETRY_REASONS",
    "USAGE_STATES",
    "LoopCounter",
    "LoopHistogram",
    "Metrics",
    "StateGauge",
    "exposition",
]

#: The states each ``*_state`` gauge always exports (one series each, the
#: current one 1, the others 0), so an alert can name a state that has not
#: happened yet. They mirror ``/readyz``'s fields.
UPSTREAM_STATES: Final = ("ok", "degraded", "down", "auth_failed")
REDIS_STATES: Final = ("ok", "oom", "down", "disabled")
FANOUT_STATES: Final = ("ok", "down", "disabled")
#: A usage record's states (``vellum_sidecar_usage_records_total`` exports each from 0).
USAGE_STATES: Final = ("queued", "delivered", "insufficient", "rejected")
#: Why a delivery is tried again (``usage.records.verdict``; exported from 0).
USAGE_RETRY_REASONS: Final = ("no_answer", "rate_limited", "server_error", "auth_failed", "other")
#: Snapshot write results (exported from 0: the alert compares the two, and a counter
#: that first appears at 1 gives ``increase()`` nothing to compare its first error with).
SNAPSHOT_WRITE_RESULTS: Final = ("ok", "error")

#: Distinct path shapes ``forwarded_unknown`` keeps as label values.
MAX_UNKNOWN_SHAPES: Final = 100
_HTTP_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)  # fmt: skip
_SNAPSHOT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


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
        self.cache_lookups_by_kind = LoopCounter(
            f"{p}_cache_lookups",
            "Cache lookups by document kind, layer (memory, redis, upstream) and result.",
            ("kind", "layer", "result"), registry=r,
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
        self.upstream_state = StateGauge(
            f"{p}_upstream_state",
            "Upstream state as /readyz reports it: 1 for the current state "
            "(down: breaker open or the last check unanswered; degraded: failures in the "
            "last 30 s or a 429; auth_failed: the latest answer was 401/403).",
            UPSTREAM_STATES, initial="ok", registry=r,
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
        self.redis_retries = Counter(
            f"{p}_redis_retries",
            "Redis commands retried once on a fresh connection after a stale pooled "
            "connection failed (Redis restarted since it was pooled), by operation.",
            ["operation"], registry=r,
        )  # fmt: skip
        self.invalidations_queued = Gauge(
            f"{p}_invalidations_queued",
            "Invalidations applied here but waiting for Redis (to reach Redis and the "
            "other sidecars once it answers).",
            registry=r,
        )  # fmt: skip
        self.invalidations_queue_applied = Counter(
            f"{p}_invalidations_queue_applied",
            "Queued invalidations applied to Redis and fanned out once it answered.",
            registry=r,
        )  # fmt: skip
        self.invalidations_queue_overflows = Counter(
            f"{p}_invalidations_queue_overflows",
            "Times the invalidation queue was full and collapsed into one tenant-wide drop.",
            registry=r,
        )  # fmt: skip
        self.epoch_renewals = Counter(
            f"{p}_epoch_renewals",
            "Times this sidecar renewed the tenant's epoch, so every sidecar revalidates "
            "what Redis holds (reason: outage, flushed, regressed, stalled).",
            ["reason"], registry=r,
        )  # fmt: skip
        self.epoch_changes = Counter(
            f"{p}_epoch_changes",
            "Epoch renewals this sidecar saw (its own or another sidecar's): each expires "
            "the in-process layer, kept as the stale fallback.",
            registry=r,
        )  # fmt: skip
        self.redis_state = StateGauge(
            f"{p}_redis_state",
            "Redis state as /readyz reports it: 1 for the current state.",
            REDIS_STATES, initial="disabled", registry=r,
        )  # fmt: skip
        self.fanout_state = StateGauge(
            f"{p}_fanout_state",
            "The invalidation fan-out subscription (Redis pub/sub): 1 for the current state.",
            FANOUT_STATES, initial="disabled", registry=r,
        )  # fmt: skip
        self.readiness_changes = Counter(
            f"{p}_readiness_changes",
            "Times the /readyz answer changed between ready (200) and not ready (503).",
            registry=r,
        )  # fmt: skip
        self._ready: bool | None = None
        self.memory_entries = Gauge(
            f"{p}_memory_entries", "Entries in the in-process cache layer (every kind).",
            registry=r,
        )  # fmt: skip
        self.tasks = Gauge(
            f"{p}_asyncio_tasks", "asyncio tasks alive in the event loop (a leak shows here).",
            registry=r,
        )  # fmt: skip
        # process_resident_memory_bytes, process_open_fds, ... for this process.
        ProcessCollector(registry=r)
        Info(f"{p}_build", "The running build: 1, labelled with its versions.", registry=r).info(
            {"version": __version__, "python": platform.python_version()}
        )
        self.inflight_fetches = Gauge(
            f"{p}_inflight_fetches",
            "Upstream fetches of cached documents in flight (single-flight, every kind).",
            registry=r,
        )  # fmt: skip
        # Listener limits (sidecar/http/limits.py) and the batch deadline.
        self.connections_refused = Counter(
            f"{p}_connections_refused", "Connections refused at accept or cut by a listener "
            "limit, by listener and reason.", ["listener", "reason"], registry=r,
        )  # fmt: skip
        self.open_connections = Gauge(
            f"{p}_open_connections", "Open connections by listener (event streams aside).",
            ["listener"], registry=r,
        )  # fmt: skip
        self.connection_limit = Gauge(
            f"{p}_connection_limit", "The open-connections cap in force, by listener (lowered "
            "to fit the open-files limit when it must be).", ["listener"], registry=r,
        )  # fmt: skip
        self.open_streams = Gauge(
            f"{p}_open_streams", "Open OFREP event streams (GET /ofrep/v1/events), held apart "
            "from the local API's connection cap.", registry=r,
        )  # fmt: skip
        self.stream_limit = Gauge(
            f"{p}_stream_limit", "The event-streams cap in force (SIDECAR_MAX_STREAMS).",
            registry=r,
        )  # fmt: skip
        self.upstream_waiting = Gauge(
            f"{p}_upstream_waiting", "Upstream calls under way or waiting for one of the "
            "upstream connections (bounded by SIDECAR_UPSTREAM_MAX_WAITING).", registry=r,
        )  # fmt: skip
        self.upstream_overloaded = Counter(
            f"{p}_upstream_overloaded", "Upstream calls refused without being sent, because "
            "SIDECAR_UPSTREAM_MAX_WAITING calls were already waiting (an uncached read: 503 "
            "upstream_overloaded; a cached one is answered from its stale entry).", registry=r,
        )  # fmt: skip
        self.check_timeouts = Counter(
            f"{p}_check_timeouts", "POST /v1/check entries answered \"error\": \"timeout\".",
            registry=r,
        )  # fmt: skip
        self.forwarded_unknown = Counter(
            f"{p}_forwarded_unknown",
            "Mirror requests for operations the sidecar does not know, forwarded upstream, "
            "by method and path shape (ids replaced).",
            ["method", "shape"], registry=r,
        )  # fmt: skip
        self._unknown_shapes: set[str] = set()
        # The local snapshot (sidecar/cache/snapshot.py).
        self.snapshot_loads = Counter(
            f"{p}_snapshot_loads", "Snapshot loads at start by result: loaded, absent "
            "(no file yet), or why the file was ignored (damaged, truncated, foreign_tenant, "
            "newer_format, unreadable).", ["result"], registry=r,
        )  # fmt: skip
        self.snapshot_loaded_entries = Gauge(
            f"{p}_snapshot_loaded_entries",
            "Entries installed from the snapshot at start (the stale fallback), every kind.",
            registry=r,
        )  # fmt: skip
        self.snapshot_load_seconds = Gauge(
            f"{p}_snapshot_load_seconds", "Seconds the start-up snapshot load took.", registry=r,
        )  # fmt: skip
        self.snapshot_writes = Counter(
            f"{p}_snapshot_writes", "Snapshot writes by result (ok, error).", ["result"],
            registry=r,
        )  # fmt: skip
        self.snapshot_write_seconds = Histogram(
            f"{p}_snapshot_write_duration_seconds",
            "Seconds one snapshot write took, encoding (on the event loop, in slices) to the "
            "rename.", buckets=_SNAPSHOT_BUCKETS, registry=r,
        )  # fmt: skip
        self.snapshot_entries = Gauge(
            f"{p}_snapshot_entries", "Entries in the last snapshot written.", registry=r,
        )  # fmt: skip
        self.snapshot_bytes = Gauge(
            f"{p}_snapshot_bytes", "Size of the last snapshot written.", registry=r,
        )  # fmt: skip
        self.snapshot_last_write = Gauge(
            f"{p}_snapshot_last_write_timestamp_seconds",
            "Unix time of the last snapshot written (0: none yet).", registry=r,
        )  # fmt: skip
        # Metered usage (sidecar/usage): the queue is the fleet's, so every sidecar
        # reports the same queued and oldest values (aggregate with max, not sum).
        self.usage_records = Counter(
            f"{p}_usage_records",
            "Metered usage records by state: queued (accepted by this sidecar), delivered, "
            "insufficient, rejected (finished by this sidecar).",
            ["state"], registry=r,
        )  # fmt: skip
        self.usage_retries = Counter(
            f"{p}_usage_retries",
            "Usage deliveries that will be tried again, by reason (no_answer, "
            "rate_limited, server_error, auth_failed, other).",
            ["reason"], registry=r,
        )  # fmt: skip
        self.usage_queued = Gauge(
            f"{p}_usage_queued",
            "Usage records accepted and not yet delivered, in the whole fleet's queue "
            "(read from Redis at each lease round).",
            registry=r,
        )  # fmt: skip
        self.usage_oldest = Gauge(
            f"{p}_usage_oldest_queued_seconds",
            "Age of the oldest usage record not yet delivered, in the whole fleet's queue "
            "(0 when none).",
            registry=r,
        )  # fmt: skip
        self.usage_partitions = Gauge(
            f"{p}_usage_partitions",
            "Partitions of the usage queue this sidecar delivers (its leases).",
            registry=r,
        )  # fmt: skip
        for state in USAGE_STATES:
            self.usage_records.labels(state)
        for reason in USAGE_RETRY_REASONS:
            self.usage_retries.labels(reason)
        for result in SNAPSHOT_WRITE_RESULTS:
            self.snapshot_writes.labels(result)

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

    def count_unknown(self, method: str, shape: str) -> None:
        """Count one forwarded unknown operation, with bounded label values.

        ``method`` outside the usual HTTP methods is ``OTHER``; past
        :data:`MAX_UNKNOWN_SHAPES` distinct shapes, a new one is ``other``, so a
        caller inventing paths cannot grow the exposition without end.
        """
        if method not in _HTTP_METHODS:
            method = "OTHER"
        if shape not in self._unknown_shapes:
            if len(self._unknown_shapes) >= MAX_UNKNOWN_SHAPES:
                shape = "other"
            else:
                self._unknown_shapes.add(shape)
        self.forwarded_unknown.labels(method, shape).inc()

    def observe_readiness(self, ready: bool) -> None:
        """Record the answer ``/readyz`` just gave; a change counts once."""
        if self._ready is not None and ready != self._ready:
            self.readiness_changes.inc()
        self._ready = ready

    def render(self) -> bytes:
        # RuntimeError: no running loop (rendering outside the server).
        with contextlib.suppress(RuntimeError):
            self.tasks.set(len(asyncio.all_tasks()))
        return exposition(self.registry)


def exposition(registry: Collector) -> bytes:
    """The Prometheus text format of ``registry``, without ``*_created`` samples."""
    return generate_latest(_WithoutCreated(registry))


class _WithoutCreated(Collector):
    _TYPES: Final = frozenset({"counter", "histogram", "summary", "gaugehistogram"})

    def __init__(self, registry: Collector) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            if family.type in self._TYPES:
                kept = Metric(family.name, family.documentation, family.type, family.unit)
                kept.samples = [s for s in family.samples if not s.name.endswith("_created")]
                family = kept
            yield family


class StateGauge(Collector):
    """A state as a labelled gauge: ``name{state="ok"} 1``, every other state 0.

    The current state is read when the registry is collected, from the function
    given to :meth:`follow` (the owner's own state, so the gauge cannot drift
    from what ``/readyz`` says), else it is the last one :meth:`set`. A state
    outside ``states`` is still exported (as the one series at 1).
    """

    def __init__(
        self, name: str, documentation: str, states: Sequence[str], *, initial: str,
        registry: CollectorRegistry,
    ) -> None:  # fmt: skip
        self.name = name
        self.documentation = documentation
        self.states = tuple(states)
        self._current = initial
        self._source: Callable[[], str] | None = None
        registry.register(self)

    @property
    def state(self) -> str:
        return self._source() if self._source is not None else self._current

    def set(self, state: str) -> None:
        self._source = None
        self._current = state

    def follow(self, source: Callable[[], str]) -> None:
        self._source = source

    def describe(self) -> list[Metric]:
        return [GaugeMetricFamily(self.name, self.documentation, labels=("state",))]

    def collect(self) -> Iterator[Metric]:
        current = self.state
        family = GaugeMetricFamily(self.name, self.documentation, labels=("state",))
        for state in self.states if current in self.states else (*self.states, current):
            family.add_metric((state,), 1.0 if state == current else 0.0)
        yield family


class LoopCounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _LoopMetric(Collector, Generic[ChildT]):
    """Children by label values, made on first use: :class:`LoopCounter`'s and
    :class:`LoopHistogram`'s common part (a child found costs one dict lookup)."""

    _family: Callable[..., Metric]

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str],
        registry: CollectorRegistry,
    ) -> None:  # fmt: skip
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], ChildT] = {}
        registry.register(self)

    def labels(self, *values: str) -> ChildT:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}")
            child = self._children[values] = self._child()
        return child

    @abstractmethod
    def _child(self) -> ChildT:
        """A new child (a counter's or a histogram's)."""

    def family(self) -> Metric:
        """An empty family of this metric's type, name and labels."""
        return self._family(self.name, self.documentation, labels=self.labelnames)

    def describe(self) -> list[Metric]:
        return [self.family()]


class LoopCounter(_LoopMetric[LoopCounterChild]):
    """A labelled counter for code that runs on the event loop's thread only.

    prometheus-client's ``Counter`` takes a lock on every increment and
    ``labels()`` validates on every call, about 2.5 µs per request in all; these
    children are plain attributes, bumped without a lock because everything that
    touches them (handlers and the ``/metrics`` render) runs on one thread. The
    exposition is prometheus-client's own (``generate_latest``), same names.
    """

    _family = CounterMetricFamily

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], *,
        registry: CollectorRegistry,
    ) -> None:  # fmt: skip
        super().__init__(name, documentation, labelnames, registry)

    def _child(self) -> LoopCounterChild:
        return LoopCounterChild()

    def bind(self, *first: str) -> BoundLoopCounter:
        """This counter with its first label values fixed; ``labels()`` takes the rest."""
        return BoundLoopCounter(self, first)

    def collect(self) -> Iterator[Metric]:
        family = self.family()
        assert isinstance(family, CounterMetricFamily)
        for values, child in list(self._children.items()):
            family.add_metric(values, child.value)
        yield family


class BoundLoopCounter:
    __slots__ = ("_counter", "_first")

    def __init__(self, counter: LoopCounter, first: tuple[str, ...]) -> None:
        self._counter = counter
        self._first = first

    def labels(self, *rest: str) -> LoopCounterChild:
        return self._counter.labels(*self._first, *rest)


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


class LoopHistogram(_LoopMetric[LoopHistogramChild]):
    """A labelled histogram with :class:`LoopCounter`'s single-thread contract."""

    _family = HistogramMetricFamily

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], *,
        buckets: Sequence[float], registry: CollectorRegistry,
    ) -> None:  # fmt: skip
        self._bounds = sorted(float(b) for b in buckets)
        self._les = [_le(b) for b in self._bounds] + ["+Inf"]
        super().__init__(name, documentation, labelnames, registry)

    def _child(self) -> LoopHistogramChild:
        return LoopHistogramChild(self._bounds)

    def collect(self) -> Iterator[Metric]:
        family = self.family()
        assert isinstance(family, HistogramMetricFamily)
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
