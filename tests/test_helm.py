"""The Helm chart (deploy/helm/vellum-sidecar), rendered and linted by the real Helm.

Helm here is Helm's own Go library (v4) loaded by ``helm-python-sdk`` (Debian has
no ``helm``): the same template engine, chart loader and linter as the CLI. The
chart's sidecar container must be the kustomize Component's, field for field, so
the two cannot drift: ``tests/helm/shop`` (a team's chart including the templates)
and ``tests/kustomize`` (the same workloads with the Component) are rendered and
their sidecars compared, with the environment compared as the kubelet builds it
(the Component reads two ConfigMaps, the chart one).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from .test_deploy import pod_env, render

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "vellum-sidecar"
SHOP = ROOT / "tests" / "helm" / "shop"
MONITORING = ROOT / "deploy" / "kubernetes" / "monitoring"
TENANT = {"config": {"VELLUM_TENANT_ID": "acme"}}
EVERY_OPTION = {
    **TENANT,
    "podMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    "prometheusRule": {"enabled": True},
    "dashboard": {"enabled": True},
    "networkPolicy": {"enabled": True},
    "podDisruptionBudget": {"enabled": True},
}


def helm_template(chart: Path, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """``helm template web <chart> -n shop``: the objects, in file order."""
    with helm.Chart.load(str(chart)) as loaded:
        files = loaded.render(values or {}, name="web", namespace="shop")
    return [doc for text in files.values() for doc in yaml.safe_load_all(text) if doc]


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/helm/shop with its dependency in charts/, as `helm dependency build` leaves it."""
    root = tmp_path_factory.mktemp("helm") / "shop"
    shutil.copytree(SHOP, root)
    shutil.copytree(CHART, root / "charts" / "vellum-sidecar")
    return root


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''} in the render"
    return found[0]


def sidecar_of(workload: dict[str, Any]) -> dict[str, Any]:
    inits = workload["spec"]["template"]["spec"]["initContainers"]
    assert inits[0]["name"] == "vellum-sidecar", "the sidecar comes first"
    return dict(inits[0])


def sidecar_volumes(workload: dict[str, Any]) -> list[dict[str, Any]]:
    volumes = workload["spec"]["template"]["spec"]["volumes"]
    return [v for v in volumes if v["name"].startswith("vellum-sidecar-")]


@pytest.fixture(scope="module")
def both(shop: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return helm_template(shop), render(ROOT / "tests" / "kustomize")


@pytest.mark.parametrize(("kind", "name"), [("Deployment", "shop"), ("StatefulSet", "orders")])
def test_the_charts_sidecar_is_the_components(
    both: tuple[list[dict[str, Any]], list[dict[str, Any]]], kind: str, name: str
) -> None:
    charted, kustomized = both
    from_chart = one(charted, kind, name)
    from_component = one(kustomized, kind, name)
    chart_c, component_c = sidecar_of(from_chart), sidecar_of(from_component)
    # The environment as the kubelet builds it: the same settings either way.
    assert pod_env(chart_c, charted) == pod_env(component_c, kustomized)
    assert pod_env(chart_c, charted)["SIDECAR_MEMORY_MAX_ENTRIES"] == "50000"
    chart_c.pop("envFrom")
    component_c.pop("envFrom")
    assert chart_c == component_c
    assert sidecar_volumes(from_chart) == sidecar_volumes(from_component)
    labels = from_chart["spec"]["template"]["metadata"]["labels"]
    assert labels["vellum-sidecar/injected"] == "true"
    assert labels["vellum-sidecar/release"] == "web"
    # The team's own init container, containers and volumes stay where they were.
    assert [c["name"] for c in from_chart["spec"]["template"]["spec"]["initContainers"]] == [
        c["name"] for c in from_component["spec"]["template"]["spec"]["initContainers"]
    ]
    assert (
        from_chart["spec"]["template"]["spec"]["containers"]
        == from_component["spec"]["template"]["spec"]["containers"]
    )


def test_a_settings_change_rolls_the_pods(shop: Path) -> None:
    def checksum(values: dict[str, Any]) -> str:
        deployment = one(helm_template(shop, values), "Deployment", "shop")
        return str(deployment["spec"]["template"]["metadata"]["annotations"]
                   ["checksum/vellum-sidecar-config"])  # fmt: skip

    same = checksum({})
    assert checksum({}) == same
    changed = {"vellum-sidecar": {"config": {"SIDECAR_LOG_LEVEL": "debug"}}}
    assert checksum(changed) != same


def test_rendering_without_a_tenant_fails_and_says_why(shop: Path) -> None:
    with pytest.raises(helm.HelmError, match=r"config\.VELLUM_TENANT_ID"):
        helm_template(shop, {"vellum-sidecar": {"config": {"VELLUM_TENANT_ID": ""}}})


def test_the_chart_alone_renders_its_settings_and_the_webhook_service() -> None:
    docs = helm_template(CHART, TENANT)
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "Service"]
    config = one(docs, "ConfigMap")
    assert config["metadata"]["name"] == "web-vellum-sidecar"
    assert config["data"] == {"VELLUM_TENANT_ID": "acme", "SIDECAR_MEMORY_MAX_ENTRIES": "100000"}
    service = one(docs, "Service")
    assert service["metadata"]["name"] == "web-vellum-sidecar-webhooks"
    assert service["spec"]["selector"] == {
        "vellum-sidecar/injected": "true",
        "vellum-sidecar/release": "web",
    }
    assert service["spec"]["ports"] == [
        {"name": "webhooks", "port": 8701, "targetPort": "vellum-webhooks", "protocol": "TCP"}
    ]
    off = helm_template(CHART, {**TENANT, "webhookService": {"enabled": False}})
    assert [d["kind"] for d in off] == ["ConfigMap"]


def test_every_option_renders_what_the_kustomize_monitoring_holds() -> None:
    docs = helm_template(CHART, EVERY_OPTION)
    selector = {"vellum-sidecar/injected": "true", "vellum-sidecar/release": "web"}
    monitor = one(docs, "PodMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["selector"]["matchLabels"] == selector
    kustomize_monitor = yaml.safe_load((MONITORING / "podmonitor.yaml").read_text())
    assert (
        monitor["spec"]["podMetricsEndpoints"] == kustomize_monitor["spec"]["podMetricsEndpoints"]
    )
    rule = one(docs, "PrometheusRule")
    kustomize_rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert rule["spec"] == kustomize_rule["spec"]
    dashboard = one(docs, "ConfigMap", "web-vellum-sidecar-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["vellum-sidecar.json"]) == json.loads(
        (MONITORING / "grafana-dashboard.json").read_text()
    )
    ingress = one(docs, "NetworkPolicy", "web-vellum-sidecar")
    egress = one(docs, "NetworkPolicy", "web-vellum-sidecar-egress")
    for policy in (ingress, egress):
        assert policy["spec"]["podSelector"]["matchLabels"] == selector
    ports = [p["port"] for rule in ingress["spec"]["ingress"] for p in rule["ports"]]
    assert ports == ["vellum-webhooks", "vellum-ops"]
    # The egress rules are the example's (deploy/kubernetes/networkpolicy-egress.yaml).
    example = yaml.safe_load(
        (ROOT / "deploy" / "kubernetes" / "networkpolicy-egress.yaml").read_text()
    )
    assert egress["spec"]["egress"] == example["spec"]["egress"]
    pdb = one(docs, "PodDisruptionBudget")
    assert (pdb["spec"]["maxUnavailable"], pdb["spec"]["selector"]["matchLabels"]) == (1, selector)


def test_app_rules_are_added_to_the_policies() -> None:
    app_in = [{"ports": [{"port": "http", "protocol": "TCP"}]}]
    app_out = [{"to": [{"podSelector": {"matchLabels": {"app": "db"}}}],
                "ports": [{"port": 5432, "protocol": "TCP"}]}]  # fmt: skip
    values = {
        **TENANT,
        "networkPolicy": {"enabled": True, "appIngress": app_in, "appEgress": app_out},
    }
    docs = helm_template(CHART, values)
    assert one(docs, "NetworkPolicy", "web-vellum-sidecar")["spec"]["ingress"][-1] == app_in[0]
    assert (
        one(docs, "NetworkPolicy", "web-vellum-sidecar-egress")["spec"]["egress"][-1] == app_out[0]
    )


def test_helm_lint_strict_finds_nothing_above_info(shop: Path) -> None:
    for path, values in ((CHART, EVERY_OPTION), (shop, {})):
        report = helm.lint(str(path), values, strict=True, with_subcharts=True)
        problems = [m for m in report["messages"] if m["severity"] > 1]
        assert (problems, report["errors"]) == ([], []), report


def test_the_generated_files_are_current() -> None:
    from scripts.gen_chart import outputs

    for path, text in outputs().items():
        assert path.read_text(encoding="utf-8") == text, (
            f"{path} is stale: run scripts/gen_chart.py"
        )
