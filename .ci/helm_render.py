"""Render and lint the Helm chart with the real Helm (Helm's Go library, helm-python-sdk).

    uv run python .ci/helm_render.py OUTDIR

Writes OUTDIR/helm-chart.yaml (the chart alone, every option on) and
OUTDIR/helm-shop.yaml (tests/helm/shop: a team's chart including the sidecar in a
Deployment and a StatefulSet), which .ci/run then validates with the kustomize
renders (kubernetes-validate, the CRD schemas, promtool). Exit 1 when either
render fails or `helm lint --strict` reports a warning or an error.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import helm_python as helm

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "vellum-sidecar"
EVERY_OPTION: dict[str, Any] = {
    "config": {"VELLUM_TENANT_ID": "acme"},
    "podMonitor": {"enabled": True},
    "prometheusRule": {"enabled": True},
    "dashboard": {"enabled": True},
    "networkPolicy": {"enabled": True},
    "podDisruptionBudget": {"enabled": True},
}


def render_and_lint(chart: Path, values: dict[str, Any], out: Path) -> bool:
    with helm.Chart.load(str(chart)) as loaded:
        files = loaded.render(values, name="web", namespace="shop")
    out.write_text("\n---\n".join(text for text in files.values() if text.strip()))
    report = helm.lint(str(chart), values, strict=True, with_subcharts=True)
    problems = [m for m in report["messages"] if m["severity"] > 1] + report["errors"]
    for problem in problems:
        print(f"helm lint --strict {chart.name}: {problem}", file=sys.stderr)
    print(f"helm {helm.helm_sdk_version()}: {chart.name} rendered to {out.name}, lint clean"
          if not problems else f"{chart.name}: lint problems")  # fmt: skip
    return not problems


def main(outdir: Path) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        shop = Path(tmp) / "shop"
        shutil.copytree(ROOT / "tests" / "helm" / "shop", shop)
        shutil.copytree(CHART, shop / "charts" / "vellum-sidecar")  # helm dependency build
        ok = render_and_lint(CHART, EVERY_OPTION, outdir / "helm-chart.yaml")
        ok = render_and_lint(shop, {}, outdir / "helm-shop.yaml") and ok
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1])))
