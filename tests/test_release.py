"""Release artefacts: the licence, the changelog and one version everywhere.

``pyproject.toml``'s ``[project] version`` is the one source; everything that shows a
version (the CLI, the OpenAPI document, the clients, the chart) must show it, so a
release that bumps one and forgets another fails here.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import vellum_sidecar_client
import yaml

from sidecar import __version__

ROOT = Path(__file__).resolve().parent.parent
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_the_installed_version_is_pyprojects() -> None:
    assert __version__ == VERSION
    out = subprocess.run(
        [sys.executable, "-m", "sidecar", "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    assert out == f"vellum-sidecar {VERSION}\n"


def test_everything_released_with_the_sidecar_carries_its_version() -> None:
    openapi = json.loads((ROOT / "sidecar" / "openapi.json").read_text())
    client_py = tomllib.loads((ROOT / "client" / "python" / "pyproject.toml").read_text())
    client_js = json.loads((ROOT / "client" / "js" / "package.json").read_text())
    js_source = (ROOT / "client" / "js" / "vellum-sidecar-client.js").read_text()
    [js_constant] = re.findall(r'export const VERSION = "([^"]+)";', js_source)
    chart_dir = ROOT / "deploy" / "helm" / "vellum-sidecar"
    chart = yaml.safe_load((chart_dir / "Chart.yaml").read_text())
    values = yaml.safe_load((chart_dir / "values.yaml").read_text())
    assert {
        "openapi.json info.version": openapi["info"]["version"],
        "client/python/pyproject.toml": client_py["project"]["version"],
        "vellum_sidecar_client.__version__": vellum_sidecar_client.__version__,
        "client/js/package.json": client_js["version"],
        "client/js VERSION": js_constant,
        "Chart.yaml appVersion": chart["appVersion"],
        "Chart.yaml version": chart["version"],
        "values.yaml image.tag": values["image"]["tag"],
    } == dict.fromkeys(
        [
            "openapi.json info.version",
            "client/python/pyproject.toml",
            "vellum_sidecar_client.__version__",
            "client/js/package.json",
            "client/js VERSION",
            "Chart.yaml appVersion",
            "Chart.yaml version",
            "values.yaml image.tag",
        ],
        VERSION,
    )


def test_the_changelog_names_the_version_first() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## \[([^\]]+)\]", text, flags=re.MULTILINE)
    assert headings, "no release heading in CHANGELOG.md"
    assert headings[0] in (VERSION, "Unreleased"), headings
    assert VERSION in headings, f"CHANGELOG.md has no section for {VERSION}"


def test_the_licence_is_apache_2_and_matches_the_metadata() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert len(text.splitlines()) > 150, "the full text, not a notice"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in dockerfile
