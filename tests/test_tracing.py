"""OpenTelemetry traces (sidecar/tracing.py) on real processes.

Each sidecar here is a real process with the standard ``OTEL_*`` variables; the
collector is either a port where nothing listens, a socket that accepts and never
answers, or a tiny OTLP/HTTP receiver in this test that decodes the protobuf
export requests (with the ``opentelemetry-proto`` messages) and keeps the spans.
The emulator records the ``traceparent`` each upstream request carried.
"""

from __future__ import annotations

import gzip
import socket
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypedDict

import orjson
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from sidecar import tracing
from sidecar.app import create_app
from sidecar.appkeys import TRACING
from sidecar.config import Settings
from sidecar.http.hot import HOT_ROUTES

from .harness import Stack, free_port, wait_until

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
SAMPLED = f"00-{TRACE_ID}-{CALLER_SPAN}-01"
UNSAMPLED = f"00-{TRACE_ID}-{CALLER_SPAN}-00"


class OtelEnv(TypedDict, total=False):
    """The ``OTEL_*`` variables these tests give a :class:`Stack`, by name (its other
    keywords are not settings)."""

    OTEL_BSP_SCHEDULE_DELAY: str
    OTEL_TRACES_EXPORTER: str
    OTEL_EXPORTER_OTLP_ENDPOINT: str
    OTEL_SERVICE_NAME: str
    OTEL_TRACES_SAMPLER: str


FAST_EXPORT: OtelEnv = {"OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_TRACES_EXPORTER": "otlp"}


def call(
    method: str, url: str, headers: dict[str, str] | None = None, body: Any = None
) -> tuple[int, dict[str, str], Any]:
    data = orjson.dumps(body) if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - loopback
            return resp.status, dict(resp.headers), orjson.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), orjson.loads(err.read() or b"null")


def upstream_requests(stack: Stack, operation: str) -> list[dict[str, Any]]:
    _, _, body = call("GET", f"{stack.emulator_url}/_emulator/requests?operation={operation}")
    return list(body["requests"])


class Collector:
    """An OTLP/HTTP receiver: ``POST /v1/traces`` with protobuf bodies; the spans kept."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    raw = gzip.decompress(raw)
                export = ExportTraceServiceRequest()
                export.ParseFromString(raw)
                with collector.lock:
                    for resource_spans in export.resource_spans:
                        resource = {a.key: a.value.string_value
                                    for a in resource_spans.resource.attributes}  # fmt: skip
                        for scope_spans in resource_spans.scope_spans:
                            for span in scope_spans.spans:
                                collector.spans.append(_span(span, resource))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def named(self, name: str) -> list[dict[str, Any]]:
        with self.lock:
            return [s for s in self.spans if s["name"] == name]


def _span(span: Any, resource: dict[str, str]) -> dict[str, Any]:
    attributes = {}
    for a in span.attributes:
        value = a.value
        kind = value.WhichOneof("value")
        attributes[a.key] = (
            [v.string_value for v in value.array_value.values]
            if kind == "array_value"
            else getattr(value, kind)
        )
    return {
        "name": span.name,
        "trace_id": span.trace_id.hex(),
        "span_id": span.span_id.hex(),
        "parent": span.parent_span_id.hex(),
        "kind": span.kind,
        "attributes": attributes,
        "resource": resource,
        "status": span.status.code,
    }


@pytest.fixture
def collector() -> Iterator[Collector]:
    c = Collector()
    c.thread.start()
    yield c
    c.server.shutdown()
    c.server.server_close()


def test_callers_trace_reaches_the_upstream_while_the_collector_is_unreachable(
    tmp_path: Path,
) -> None:
    closed = free_port()  # nothing listens here
    env: OtelEnv = {**FAST_EXPORT, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{closed}"}
    with Stack(tmp_path, **env) as stack:
        for i in range(20):
            status, headers, body = call(
                "GET", f"{stack.url}/v1/customers/cus_active/entitlements",
                {"traceparent": SAMPLED, "tracestate": "vendor=x"} if i == 0 else {},
            )  # fmt: skip
            assert status == 200 and body["found"] is True
            assert headers["X-Sidecar-Cache"] == ("miss" if i == 0 else "hit")
        [seen] = upstream_requests(stack, "get_entitlements")
        version, trace_id, parent, flags = seen["traceparent"].split("-")
        # The upstream request is in the caller's trace, a child of the sidecar's span.
        assert (version, trace_id, flags) == ("00", TRACE_ID, "01")
        assert parent != CALLER_SPAN and int(parent, 16) != 0
        assert seen["tracestate"] == "vendor=x"
        # A billing write is carried the same way, and a caller's unsampled trace too.
        status, _, _ = call(
            "POST", f"{stack.url}/v1/accounts/acme/customers",
            {"traceparent": UNSAMPLED}, {"customerId": "cus_traced", "name": "Traced"},
        )  # fmt: skip
        assert status in (200, 201), status
        [created] = upstream_requests(stack, "create_customer")
        assert created["traceparent"].split("-")[1::2] == [TRACE_ID, "00"]
        # The exports keep failing in the background; the sidecar stays ready and
        # stops cleanly.
        assert call("GET", f"{stack.sidecar.ops_url}/readyz")[0] == 200
        assert stack.sidecar.stop() == 0


def test_a_collector_that_never_answers_holds_neither_requests_nor_shutdown(
    tmp_path: Path,
) -> None:
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(64)  # accepted by the kernel, never read
        endpoint = f"http://127.0.0.1:{hole.getsockname()[1]}"
        env: OtelEnv = {**FAST_EXPORT, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}
        with Stack(tmp_path, **env) as stack:
            for i in range(50):
                status, _, _ = call(
                    "GET", f"{stack.url}/v1/customers/cus_{i % 5}/entitlements",
                    {"traceparent": SAMPLED},
                )  # fmt: skip
                assert status == 200
            assert len(upstream_requests(stack, "get_entitlements")) == 5
            assert stack.sidecar.stop() == 0


def test_spans_of_a_miss_its_upstream_call_and_a_push_arrive(
    tmp_path: Path, collector: Collector
) -> None:
    env: OtelEnv = {**FAST_EXPORT, "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
           "OTEL_SERVICE_NAME": "shop-sidecar"}  # fmt: skip
    with Stack(tmp_path, **env) as stack:
        status, _, _ = call(
            "GET", f"{stack.url}/v1/customers/cus_active/entitlements", {"traceparent": SAMPLED}
        )
        assert status == 200
        route = "GET /v1/customers/{customer}/entitlements"
        wait_until(lambda: bool(collector.named(route)), timeout=10, what="the request's span")
        [server] = collector.named(route)
        assert (server["trace_id"], server["parent"]) == (TRACE_ID, CALLER_SPAN)
        assert server["attributes"]["vellum_sidecar.cache"] == "miss"
        assert server["attributes"]["http.response.status_code"] == 200
        assert server["resource"]["service.name"] == "shop-sidecar"
        wait_until(lambda: bool(collector.named("vellum attempt 1")), timeout=10, what="attempt")
        [client] = collector.named("vellum get_entitlements")
        [attempt] = collector.named("vellum attempt 1")
        assert client["parent"] == server["span_id"]
        assert attempt["parent"] == client["span_id"]
        [seen] = upstream_requests(stack, "get_entitlements")
        assert seen["traceparent"] == f"00-{TRACE_ID}-{attempt['span_id']}-01"

        # A push: the receiver's span, the apply, and the drop it applied.
        status, _, reply = call(
            "PUT", f"{stack.emulator_url}/_emulator/customers/cus_trial/entitlements",
            body={"status": "active", "modules": ["reports", "exports"]},
        )  # fmt: skip
        assert (status, reply["pushed"]) == (200, True)
        wait_until(lambda: bool(collector.named("vellum_sidecar.drop")), timeout=10, what="drop")
        [receiver] = collector.named("POST /webhooks/vellum")
        [apply] = collector.named("vellum_sidecar.push.apply")
        [drop] = collector.named("vellum_sidecar.drop")
        assert apply["parent"] == receiver["span_id"]
        assert drop["parent"] == apply["span_id"]
        assert apply["attributes"]["vellum_sidecar.push.scope"] == "customer"
        assert drop["attributes"]["vellum_sidecar.drop.customers"] == 1
        assert stack.sidecar.stop() == 0


def test_a_memory_hit_records_nothing_unless_sampled(tmp_path: Path, collector: Collector) -> None:
    env: OtelEnv = {**FAST_EXPORT, "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
           "OTEL_TRACES_SAMPLER": "parentbased_always_off"}  # fmt: skip
    can = "GET /v1/customers/{customer}/can/{module}"
    with Stack(tmp_path, **env) as stack:
        url = f"{stack.url}/v1/customers/cus_active/can/reports"
        assert call("GET", url)[1]["X-Sidecar-Cache"] == "miss"  # not sampled: no span
        for headers in ({}, {"traceparent": UNSAMPLED}):
            status, answered, _ = call("GET", url, headers)
            assert (status, answered["X-Sidecar-Cache"]) == (200, "hit")
        # The caller's sampled trace: the hit is recorded, in that trace.
        assert call("GET", url, {"traceparent": SAMPLED})[1]["X-Sidecar-Cache"] == "hit"
        wait_until(lambda: bool(collector.named(can)), timeout=10, what="the sampled hit's span")
        assert stack.sidecar.stop() == 0  # flushes what is queued
    [hit] = collector.named(can)
    assert (hit["trace_id"], hit["attributes"]["vellum_sidecar.cache"]) == (TRACE_ID, "hit")
    assert collector.named("vellum get_entitlements") == []


def test_tracing_is_off_without_otel_variables(tmp_path: Path) -> None:
    with Stack(tmp_path) as stack:
        call("GET", f"{stack.url}/v1/customers/cus_active/entitlements", {"traceparent": SAMPLED})
        [seen] = upstream_requests(stack, "get_entitlements")
        assert seen["traceparent"] is None  # neither read nor sent


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"OTEL_TRACES_EXPORTER": "none"},
        {"OTEL_TRACES_EXPORTER": "zipkin"},  # not one we have: logged, off
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"},  # an endpoint alone asks nothing
    ],
)
def test_off_unless_an_exporter_is_asked_for(env: dict[str, str]) -> None:
    assert tracing.from_env(env) is tracing.NO_TRACING


async def test_off_leaves_the_front_door_and_every_route_unwrapped() -> None:
    """Tracing off adds nothing to a memory hit: the handlers are the untraced ones."""
    settings = Settings.from_env({"VELLUM_API_KEY": "k" * 24, "VELLUM_TENANT_ID": "t"})
    off = create_app(settings)
    on = create_app(settings, tracing=tracing.from_env({"OTEL_TRACES_EXPORTER": "console"}))
    try:
        for app, expected in ((off, "guarded_handler"), (on, "traced")):
            hot = [handle for _, handle in app[HOT_ROUTES]]
            routed = [r.handler for r in app.router.routes()]
            for handler in (*hot, *routed):
                assert handler.__code__.co_name == expected, handler
    finally:
        await on[TRACING].close()
