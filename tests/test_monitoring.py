"""deploy/kubernetes/monitoring agrees with the metrics a live sidecar exports.

Every PromQL expression of the PrometheusRule and of the Grafana dashboard (its
panels and its variables) is parsed with promql-parser, a complete PromQL
parser, and checked against the ``/metrics`` of live sidecars that were first
driven through every case the alerts watch (a fetch, memory and Redis hits, a
fan-out, pushes verified, refused and not shared, an upstream refusing the key,
stale answers, a readiness change): each metric a query names must be exported,
each label it matches or aggregates by must be one of that metric's labels (or
one Prometheus adds to every target), and each value an equality or regex
matcher asks for must occur. ``promtool test rules`` (.ci/run) proves when each
alert fires; the last tests here check the manifests around them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import promql_parser
import yaml
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from sidecar.appkeys import LIFECYCLE
from sidecar.emulator import Emulator

from .conftest import Sidecar, SidecarFactory, eventually
from .harness import RedisServer

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "deploy" / "kubernetes" / "monitoring"
COMPONENT = ROOT / "deploy" / "kubernetes" / "components" / "sidecar"
RULE = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
DASHBOARD = json.loads((MONITORING / "grafana-dashboard.json").read_text())

#: Labels Prometheus gives every series of a PodMonitor's targets.
TARGET_LABELS = frozenset({"namespace", "pod", "container", "endpoint", "job", "instance"})
#: What Grafana puts in place of its variables before the query reaches Prometheus.
GRAFANA_VALUES = {"__rate_interval": "5m", "namespace": ".+", "pod": ".+", "datasource": ""}
_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
_LABEL_VALUES = re.compile(r"^label_values\((.+),\s*(\w+)\)$")
#: promql-parser's MatchOp is not hashable; its repr is "MatchOp.<name>".
_OPS = {"MatchOp.Equal": "=", "MatchOp.NotEqual": "!=", "MatchOp.Re": "=~", "MatchOp.NotRe": "!~"}

DOC = {"status": "active", "modules": ["reports"], "accountId": "acct_1"}


@dataclass(frozen=True)
class Query:
    where: str
    expr: str
    #: A label the query reads besides its expression (label_values' second argument).
    reads: str | None = None


@dataclass
class Analysis:
    selectors: list[tuple[str, list[tuple[str, str, str]]]] = field(default_factory=list)
    grouping: set[str] = field(default_factory=set)


def alert_queries() -> list[Query]:
    return [
        Query(f"alert {rule['alert']}", rule["expr"])
        for group in RULE["spec"]["groups"]
        for rule in group["rules"]
    ]


def dashboard_panels() -> list[dict[str, Any]]:
    return [p for p in DASHBOARD["panels"] if p["type"] != "row"]


def dashboard_queries() -> list[Query]:
    found = [
        Query(f"panel {panel['title']!r} {target['refId']}", target["expr"])
        for panel in dashboard_panels()
        for target in panel["targets"]
    ]
    for variable in DASHBOARD["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = _LABEL_VALUES.match(variable["query"]["query"])
        assert match is not None, variable["query"]
        found.append(Query(f"variable {variable['name']}", match.group(1), match.group(2)))
    return found


def grafana_to_promql(expr: str) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in GRAFANA_VALUES, f"unknown Grafana variable ${name}"
        return GRAFANA_VALUES[name]

    return _VARIABLE.sub(value, expr)


def analyse(expr: str) -> Analysis:
    """The selectors (metric, matchers) and the grouping labels of one expression."""
    found = Analysis()

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"a selector without a metric name in {expr}"
            assert not node.matchers.or_matchers, expr
            matchers = [(m.name, _OPS[repr(m.op)], m.value) for m in node.matchers.matchers]
            found.selectors.append((node.name, matchers))
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            found.grouping.update(node.modifier.labels)
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            matching = node.modifier.matching  # on (...) / ignoring (...)
            found.grouping.update(matching.labels if matching is not None else ())
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    assert found.selectors, f"no metric in {expr}"
    return found


def catalogue(texts: list[str]) -> dict[str, dict[str, set[str]]]:
    """Sample name -> label -> the values seen, over several scrapes."""
    seen: dict[str, dict[str, set[str]]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = seen.setdefault(sample.name, {})
                for label, value in sample.labels.items():
                    labels.setdefault(label, set()).add(value)
    return seen


def problems(query: Query, exported: dict[str, dict[str, set[str]]]) -> list[str]:
    found = analyse(grafana_to_promql(query.expr))
    wrong: list[str] = []
    labels_here: set[str] = set(TARGET_LABELS)
    for metric, matchers in found.selectors:
        if metric not in exported:
            wrong.append(f"{query.where}: {metric} is not exported")
            continue
        labels = exported[metric]
        labels_here |= set(labels)
        for label, op, value in matchers:
            if label in TARGET_LABELS:
                continue
            if label not in labels:
                wrong.append(f"{query.where}: {metric} has no label {label!r}")
            elif op == "=" and value not in labels[label]:
                wrong.append(f"{query.where}: {metric}{{{label}={value!r}}} never seen")
            elif op == "=~" and not any(re.fullmatch(value, v) for v in labels[label]):
                wrong.append(f"{query.where}: {metric}{{{label}=~{value!r}}} never seen")
    for label in found.grouping | ({query.reads} if query.reads else set()):
        if label not in labels_here:
            wrong.append(f"{query.where}: groups or reads by {label!r}, which no series has")
    return wrong


# -- the queries against live sidecars ---------------------------------------------------


async def scrape(sc: Sidecar) -> str:
    resp = await sc.ops.get("/metrics")
    assert resp.status == 200
    return await resp.text()


async def test_every_metric_label_and_value_a_query_names_is_exported(
    make_sidecar: SidecarFactory,
    emulator: Emulator,
    emulator_server: TestServer,
    tenant: str,
    own_redis: RedisServer,
) -> None:
    from .test_webhooks import event, push

    emulator.set_entitlements(tenant, "cus_1", DOC)
    a = await make_sidecar(own_redis.url, SIDECAR_CACHE_TTL="0.3", SIDECAR_UPSTREAM_TIMEOUT="0.5")
    b = await make_sidecar(own_redis.url)
    refused = await make_sidecar(None, VELLUM_API_KEY="revoked_key_" + "r" * 20)

    # Lookups: a fetches then hits memory; b finds the entry in Redis.
    for sc in (a, a, b):
        assert (await sc.client.get("/v1/customers/cus_1/can/reports")).status == 200
    # Pushes: one verified (fanned out to b), one with a bad signature.
    assert await push(a, event(tenant, customerId="cus_2")) == (200, {"ok": True})

    async def fanned_out() -> bool:
        count = b.metrics.registry.get_sample_value(
            "vellum_sidecar_invalidation_fanout_seconds_count"
        )
        return bool(count)

    await eventually(fanned_out, timeout=5)
    assert (await push(a, event(tenant, customerId="cus_2"), secret="not-the-secret"))[0] == 401
    # An operation the sidecar does not know, forwarded (the mirror's fallback).
    tenant_path = f"/tenants/{tenant}/customers/cus_1/usage"
    assert (await a.client.get(tenant_path)).status == 404, "the upstream's own answer"
    # The upstream refuses a revoked key: 401 upstream, 502 to the caller.
    assert (await refused.client.get("/v1/customers/cus_1/entitlements")).status == 502
    # Readiness changes (what a drain or a failing check does).
    for phase in ("ready", "stopping", "ready"):
        a.app[LIFECYCLE].phase = phase
        await a.ops.get("/readyz")
    # Redis down: a push is applied to a at once and queued (result "queued").
    own_redis.stop()
    assert await push(a, event(tenant, customerId="cus_2")) == (200, {"ok": True, "queued": True})
    # The upstream gone: stale answers, and 503 for a customer never seen.
    await emulator_server.close()

    async def stale() -> bool:
        resp = await a.client.get("/v1/customers/cus_1/can/reports")
        return resp.status == 200 and resp.headers["X-Sidecar-Cache"] == "stale"

    await eventually(stale, timeout=10)
    assert (await a.client.get("/v1/customers/never_seen/can/reports")).status == 503

    exported = catalogue([await scrape(sc) for sc in (a, b, refused)])
    queries = alert_queries() + dashboard_queries()
    wrong = [p for query in queries for p in problems(query, exported)]
    assert not wrong, "\n".join(wrong)
    assert len(queries) >= 30


def test_problems_are_found() -> None:
    """The check itself: a query off the exports is reported, with the reason."""
    exported = {
        "vellum_sidecar_webhooks_total": {"result": {"ok", "bad_signature"}},
        "vellum_sidecar_upstream_state": {"state": {"ok", "down"}},
    }
    cases = {
        "rate(vellum_sidecar_webhook_total[5m])": "is not exported",
        'vellum_sidecar_webhooks_total{reason="x"}': "has no label 'reason'",
        'vellum_sidecar_webhooks_total{result="queued"}': "never seen",
        'vellum_sidecar_webhooks_total{result=~"retry|queued"}': "never seen",
        "sum by (status) (vellum_sidecar_webhooks_total)": "groups or reads by 'status'",
        "a unless on (shard) vellum_sidecar_webhooks_total": "is not exported",
    }
    for expr, reason in cases.items():
        found = problems(Query("case", expr), exported)
        assert found and reason in found[0], (expr, found)
    fine = [
        'max by (namespace, pod) (vellum_sidecar_upstream_state{state="down", pod=~"$pod"})',
        'sum(rate(vellum_sidecar_webhooks_total{result=~"bad_.*|ok"}[$__rate_interval]))',
    ]
    for expr in fine:
        assert problems(Query("case", expr), exported) == [], expr


# -- the manifests around the queries ------------------------------------------------------


def test_every_alert_is_covered_by_a_promtool_test() -> None:
    tests = yaml.safe_load((MONITORING / "alerts.test.yaml").read_text())
    assert tests["rule_files"] == ["vellum-sidecar.rules.yaml"]
    tested = {
        case["alertname"]
        for test in tests["tests"]
        for case in test["alert_rule_test"]
        if case.get("exp_alerts")
    }
    alerts = {q.where.removeprefix("alert ") for q in alert_queries()}
    assert tested == alerts
    for group in RULE["spec"]["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
            assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


def test_the_alerts_cover_the_failures_operators_page_on() -> None:
    """Issue 16: upstream down or refusing the key, Redis down, fan-out down, pushes
    refused, stale answers, readiness flapping; issue 21: listeners, streams, the
    upstream's waiting calls, queued drops, unknown operations. Each as a metric
    the alert reads."""
    reads = {
        q.where.removeprefix("alert "): {m for m, _ in analyse(q.expr).selectors}
        for q in alert_queries()
    }
    wanted = {
        "VellumSidecarUpstreamDown": "vellum_sidecar_upstream_state",
        "VellumSidecarUpstreamKeyRefused": "vellum_sidecar_upstream_requests_total",
        "VellumSidecarRedisDown": "vellum_sidecar_redis_state",
        "VellumSidecarFanoutDown": "vellum_sidecar_fanout_state",
        "VellumSidecarPushesRefused": "vellum_sidecar_webhooks_total",
        "VellumSidecarPushesNotShared": "vellum_sidecar_webhooks_total",
        "VellumSidecarServingStale": "vellum_sidecar_cache_lookups_total",
        "VellumSidecarReadinessFlapping": "vellum_sidecar_readiness_changes_total",
        # Issue 21: refused or evicted connections per listener, open streams,
        # waiting calls, queued invalidations, forwarded unknown operations.
        "VellumSidecarListenerFull": "vellum_sidecar_connections_refused_total",
        "VellumSidecarSlowClientFlood": "vellum_sidecar_connections_refused_total",
        "VellumSidecarEventStreamsNearlyFull": "vellum_sidecar_open_streams",
        "VellumSidecarUpstreamOverloaded": "vellum_sidecar_upstream_overloaded_total",
        "VellumSidecarInvalidationsQueued": "vellum_sidecar_invalidations_queued",
        "VellumSidecarUnknownOperationsForwarded": "vellum_sidecar_forwarded_unknown_total",
        # Issue 22: a snapshot that cannot be written (the next restart's fallback ages).
        "VellumSidecarSnapshotNotWritten": "vellum_sidecar_snapshot_writes_total",
    }
    for alert, metric in wanted.items():
        assert metric in reads[alert], alert


def test_dashboard_layout_and_variables() -> None:
    panels = dashboard_panels()
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    cells: set[tuple[int, int]] = set()
    for panel in DASHBOARD["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])}  # fmt: skip
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
    variables = {v["name"] for v in DASHBOARD["templating"]["list"]}
    assert variables == {"datasource", "namespace", "pod"}
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            for match in _VARIABLE.finditer(target["expr"]):
                name = match.group(1) or match.group(2)
                assert name in variables or name.startswith("__"), (panel["title"], name)
            # Every query is narrowed by the dashboard's namespace and pod.
            assert 'namespace=~"$namespace"' in target["expr"], panel["title"]
            assert 'pod=~"$pod"' in target["expr"], panel["title"]
    titles = " | ".join(p["title"] for p in panels).lower()
    for topic in ("request rate by route", "latency", "hit ratio by layer and kind",
                  "upstream calls", "upstream errors", "push to applied", "redis state",
                  "upstream state", "open connections by listener",
                  "refused or cut connections by listener", "open event streams",
                  "upstream calls waiting", "invalidations queued",
                  "unknown operations forwarded"):  # fmt: skip
        assert topic in titles, topic


def test_monitoring_kustomization_ships_the_dashboard_and_scrapes_the_components_port() -> None:
    kustomization = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    on_disk = {p.name for p in MONITORING.glob("*.yaml")} - {
        "kustomization.yaml",
        "alerts.test.yaml",
    }
    assert set(kustomization["resources"]) == on_disk
    [generator] = kustomization["configMapGenerator"]
    [source] = generator["files"]
    assert source.split("=", 1)[1] == "grafana-dashboard.json"
    assert generator["options"]["labels"]["grafana_dashboard"] == "1"

    [monitor] = yaml.safe_load_all((MONITORING / "podmonitor.yaml").read_text())
    patch = yaml.safe_load((COMPONENT / "sidecar.yaml").read_text())
    template = patch["spec"]["template"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        template["metadata"]["labels"].items()
    )
    [sidecar] = template["spec"]["initContainers"]
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    ops = [p for p in sidecar["ports"] if p["name"] == endpoint["port"]]
    assert ops and ops[0]["containerPort"] == 9700
    assert endpoint["path"] == "/metrics"
    # The dashboard's process metrics are narrowed to the sidecar's container.
    rss = [
        t["expr"]
        for p in dashboard_panels()
        for t in p["targets"]
        if "process_resident_memory_bytes" in t["expr"]
    ]
    assert rss and all(f'container="{sidecar["name"]}"' in e for e in rss)
