"""Write the Helm chart's derived files from their sources.

    uv run python scripts/gen_chart.py          # rewrite them
    uv run python scripts/gen_chart.py --check  # exit 1 when a committed copy is stale

- ``deploy/helm/vellum-sidecar/files/grafana-dashboard.json``: the dashboard of
  ``deploy/kubernetes/monitoring`` as it is;
- ``deploy/helm/vellum-sidecar/files/prometheusrule-spec.yaml``: the ``spec`` of
  ``deploy/kubernetes/monitoring/prometheusrule.yaml`` (the alerts and their
  promtool tests stay there);
- the values table in ``deploy/helm/vellum-sidecar/README.md`` and in
  ``docs/deploy.md``, from ``values.yaml``: a comment line ``# -- text`` (and
  the comment lines after it) documents the key below it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "vellum-sidecar"
MONITORING = ROOT / "deploy" / "kubernetes" / "monitoring"
BEGIN = "<!-- BEGIN GENERATED: chart values (scripts/gen_chart.py from values.yaml) -->"
END = "<!-- END GENERATED: chart values -->"
TABLES = (CHART / "README.md", ROOT / "docs" / "deploy.md")

_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.-]+):(?: |$)")


def documented(values_text: str) -> list[tuple[str, str]]:
    """``(dotted key, description)`` for each documented key, in file order."""
    out: list[tuple[str, str]] = []
    path: list[tuple[int, str]] = []
    pending: list[str] | None = None
    for line in values_text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            pending = [stripped[4:].strip()]
            continue
        if stripped.startswith("#"):
            if pending is not None:
                pending.append(stripped[1:].strip())
            continue
        match = _KEY.match(line)
        if match is None:
            continue
        indent = len(match["indent"])
        while path and path[-1][0] >= indent:
            path.pop()
        path.append((indent, match["key"]))
        if pending is not None:
            out.append((".".join(k for _, k in path), " ".join(pending)))
            pending = None
    return out


def lookup(values: dict[str, Any], dotted: str) -> Any:
    node: Any = values
    for part in dotted.split("."):
        node = node[part]
    return node


def table(values_text: str) -> str:
    values = yaml.safe_load(values_text)
    rows = ["| value | default | meaning |", "|---|---|---|"]
    for key, text in documented(values_text):
        default = json.dumps(lookup(values, key), separators=(", ", ": "))
        rows.append(f"| `{key}` | `{default}` | {text} |")
    return "\n".join(rows) + "\n"


def with_table(doc: str, rows: str, where: Path) -> str:
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{where}: no {BEGIN} ... {END} markers")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{rows}{END}{tail}"


def outputs() -> dict[Path, str]:
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text(encoding="utf-8"))
    spec = (
        "# Written by scripts/gen_chart.py from deploy/kubernetes/monitoring/prometheusrule.yaml:\n"
        "# edit that file, not this one.\n"
        + yaml.safe_dump(rule["spec"], sort_keys=False, width=1000, allow_unicode=True)
    )
    rows = table((CHART / "values.yaml").read_text(encoding="utf-8"))
    files = {
        CHART / "files" / "grafana-dashboard.json": (
            MONITORING / "grafana-dashboard.json"
        ).read_text(encoding="utf-8"),
        CHART / "files" / "prometheusrule-spec.yaml": spec,
    }
    for path in TABLES:
        files[path] = with_table(path.read_text(encoding="utf-8"), rows, path)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a file is stale")
    args = parser.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        if current == text:
            continue
        if args.check:
            stale.append(str(path.relative_to(ROOT)))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(
            f"stale: {', '.join(stale)}; run `uv run python scripts/gen_chart.py` and commit",
            file=sys.stderr,
        )
        return 1
    if args.check:
        print("the chart's generated files are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
