"""OpenTelemetry traces, off unless the standard ``OTEL_*`` variables ask for them.

``OTEL_TRACES_EXPORTER=otlp`` (OTLP over HTTP/protobuf, to
``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) or
``console`` turns them on; unset, ``none`` or ``OTEL_SDK_DISABLED=true`` leave the
sidecar exactly as without this module: no wrapper on any route, nothing read or
written on any request. The SDK and exporter are the optional ``[otel]`` extra
(the image has it); asked for without it, the sidecar logs ``tracing_unavailable``
and runs untraced. The SDK reads the other variables itself
(``OTEL_TRACES_SAMPLER``/``_ARG``, ``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_BSP_*``, ``OTEL_EXPORTER_OTLP_HEADERS``...).

When on:

- every local route and the webhook receiver accept W3C ``traceparent`` and
  ``tracestate`` and answer inside a SERVER span (the sampler decides; with the
  default ``parentbased_always_on`` a caller's unsampled trace records nothing),
  which names the route, the status and, for cached reads, ``hit``/``miss``/``stale``;
- every upstream call is a CLIENT span, each attempt a child span whose context
  is sent upstream in ``traceparent`` (so the upstream request is in the caller's
  trace), retries and breaker refusals included;
- applying a push is a span; every drop applied here (a push's, a fan-out
  message's, a cache drop's) is a span under whatever caused it.

Spans leave through a ``BatchSpanProcessor``: a bounded queue (spans beyond it are
dropped, never waited for) exported by a background thread, with a 2 s export
timeout unless ``OTEL_EXPORTER_OTLP_TIMEOUT``/``OTEL_BSP_EXPORT_TIMEOUT`` say
otherwise, so an unreachable collector never slows or fails a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Final, TypeVar

from aiohttp import web

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

__all__ = ["NO_TRACING", "Tracing", "from_env", "record"]

log = logging.getLogger("sidecar.tracing")

#: Export timeout (seconds) when the environment names none: a dead collector costs
#: the exporting thread this much per batch, and never a request anything.
EXPORT_TIMEOUT: Final = 2.0
#: How long shutdown may spend flushing the last spans.
SHUTDOWN_TIMEOUT: Final = 3.0

H = TypeVar("H", bound=Callable[..., Awaitable[web.StreamResponse]])

_NULL: Final[AbstractContextManager[None]] = contextlib.nullcontext()


class Tracing:
    """The hooks the call sites use. ``NO_TRACING`` is the disabled one: its
    ``wrap`` returns the handler as it is and its context managers do nothing."""

    enabled = False

    def wrap(self, route: str, method: str | None, handler: H) -> H:
        """``handler`` in a SERVER span named ``METHOD route`` (``method`` None:
        the request's); unchanged when tracing is off."""
        return handler

    def span(
        self, name: str, attributes: Mapping[str, Any] | None = None
    ) -> AbstractContextManager[Span | None]:
        """An INTERNAL span, child of the current one."""
        return _NULL

    def upstream_call(self, operation: str, method: str) -> AbstractContextManager[Span | None]:
        """The CLIENT span of one logical upstream call (its attempts are children)."""
        return _NULL

    def upstream_attempt(self, attempt: int, headers: Any) -> AbstractContextManager[Span | None]:
        """One attempt's span; its context is injected into ``headers`` (``traceparent``)."""
        return _NULL

    def server(self, name: str, headers: Mapping[str, str]) -> AbstractContextManager[Span | None]:
        """A SERVER span whose parent comes from ``headers`` (the webhook receiver)."""
        return _NULL

    def dropped(self, customers: Sequence[str] | None, axes: Sequence[str]) -> None:
        """An invalidation watcher: a span for each drop applied in this process."""

    async def close(self) -> None:
        """Flush what is queued (bounded by ``SHUTDOWN_TIMEOUT``) and stop exporting."""


NO_TRACING: Final = Tracing()


def from_env(env: Mapping[str, str]) -> Tracing:
    """The tracing ``env`` asks for: ``NO_TRACING`` unless ``OTEL_TRACES_EXPORTER``
    names ``otlp`` or ``console`` (and ``OTEL_SDK_DISABLED`` is not ``true``)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return NO_TRACING
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",")]
    names = [n for n in names if n and n != "none"]
    if not names:
        return NO_TRACING
    unknown = sorted(set(names) - {"otlp", "console"})
    if unknown:
        log.warning(
            "tracing_exporter_unknown",
            extra={"fields": {"exporters": unknown, "known": ["otlp", "console"]}},
        )
        names = [n for n in names if n not in unknown]
        if not names:
            return NO_TRACING
    protocol = env.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "")
    )
    if "otlp" in names and protocol.strip() not in ("", "http/protobuf"):
        log.warning(
            "tracing_protocol_unsupported",
            extra={"fields": {"protocol": protocol, "used": "http/protobuf"}},
        )
    try:
        return _SdkTracing(names, env)
    except ImportError as exc:
        log.warning(
            "tracing_unavailable",
            extra={
                "fields": {
                    "reason": f"{exc.name or exc} is not installed",
                    "fix": "install vellum-sidecar[otel] (the image has it)",
                }
            },
        )
        return NO_TRACING


class _SdkTracing(Tracing):
    """Tracing through the OpenTelemetry SDK (imported only here)."""

    enabled = True

    def __init__(self, exporters: Sequence[str], env: Mapping[str, str]) -> None:
        from opentelemetry import propagate, trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SpanExporter,
        )

        from . import __version__

        resource = Resource.create(
            {"service.name": "vellum-sidecar", "service.version": __version__}
        ).merge(Resource.create())  # OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES win
        self._provider: TracerProvider = TracerProvider(resource=resource)
        export_ms = None if "OTEL_BSP_EXPORT_TIMEOUT" in env else int(EXPORT_TIMEOUT * 1000)
        for name in exporters:
            exporter: SpanExporter
            if name == "otlp":
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                    OTLPSpanExporter,
                )

                named = (
                    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT" in env
                    or "OTEL_EXPORTER_OTLP_TIMEOUT" in env
                )
                exporter = OTLPSpanExporter(timeout=None if named else EXPORT_TIMEOUT)
            else:
                exporter = ConsoleSpanExporter()
            self._provider.add_span_processor(
                BatchSpanProcessor(exporter, export_timeout_millis=export_ms)
            )
        self._tracer: Tracer = self._provider.get_tracer("vellum-sidecar", __version__)
        self._trace = trace
        self._propagator = propagate.get_global_textmap()
        self._kinds = trace.SpanKind

    # -- the hooks

    def wrap(self, route: str, method: str | None, handler: H) -> H:
        start = self._tracer.start_as_current_span
        extract = self._propagator.extract
        server = self._kinds.SERVER

        async def traced(request: Any, *args: Any) -> web.StreamResponse:
            verb = method or request.method
            context = extract(request.headers) if "traceparent" in request.headers else None
            with start(
                f"{verb} {route}",
                context=context,
                kind=server,
                attributes={"http.request.method": verb, "http.route": route},
            ) as span:
                response = await handler(request, *args)
                if span.is_recording():
                    span.set_attribute("http.response.status_code", response.status)
                    cache = response.headers.get("X-Sidecar-Cache")
                    if cache is not None:
                        span.set_attribute("vellum_sidecar.cache", cache)
                    if response.status >= 500:
                        span.set_status(self._trace.StatusCode.ERROR)
                return response

        traced.__name__ = traced.__qualname__ = getattr(handler, "__name__", "handler")
        return traced  # type: ignore[return-value]

    def span(
        self, name: str, attributes: Mapping[str, Any] | None = None
    ) -> AbstractContextManager[Span | None]:
        return self._tracer.start_as_current_span(name, attributes=dict(attributes or {}))

    def upstream_call(self, operation: str, method: str) -> AbstractContextManager[Span | None]:
        return self._tracer.start_as_current_span(
            f"vellum {operation}",
            kind=self._kinds.CLIENT,
            attributes={"http.request.method": method, "vellum.operation": operation},
        )

    @contextlib.contextmanager
    def upstream_attempt(self, attempt: int, headers: Any) -> Iterator[Span | None]:
        with self._tracer.start_as_current_span(
            f"vellum attempt {attempt}",
            kind=self._kinds.CLIENT,
            attributes={"http.request.resend_count": attempt - 1},
        ) as span:
            self._propagator.inject(headers)
            yield span

    def server(self, name: str, headers: Mapping[str, str]) -> AbstractContextManager[Span | None]:
        context = self._propagator.extract(headers) if "traceparent" in headers else None
        return self._tracer.start_as_current_span(name, context=context, kind=self._kinds.SERVER)

    def dropped(self, customers: Sequence[str] | None, axes: Sequence[str]) -> None:
        with self._tracer.start_as_current_span(
            "vellum_sidecar.drop",
            attributes={
                "vellum_sidecar.drop.scope": "tenant" if customers is None else "customer",
                "vellum_sidecar.drop.customers": 0 if customers is None else len(customers),
                "vellum_sidecar.drop.axes": list(axes),
            },
        ):
            pass

    async def close(self) -> None:
        # The processors flush and join their threads here, which a dead collector
        # can hold for an export timeout: in a daemon thread of its own, waited for
        # at most SHUTDOWN_TIMEOUT, so neither the loop nor the exit waits longer.
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def shutdown() -> None:
            try:
                self._provider.shutdown()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop may be gone
                    loop.call_soon_threadsafe(_finish, done)

        threading.Thread(target=shutdown, name="otel-shutdown", daemon=True).start()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SHUTDOWN_TIMEOUT):
                await done


def _finish(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


def record(span: Span | None, **attributes: Any) -> None:
    """Set attributes on ``span`` when it records (None: tracing is off)."""
    if span is not None and span.is_recording():
        for key, value in attributes.items():
            if value is not None:
                span.set_attribute(key, value)
