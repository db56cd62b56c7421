"""The clients as users get them: built as packages, installed in scratch environments.

The Python client is built with ``uv build`` (sdist, then the wheel from the sdist)
and installed in a fresh virtual environment; the JS client is packed with ``npm
pack`` and installed from its tarball into an empty folder. Each then calls a live
sidecar (the emulator behind it) from outside this repository, so a missing file
in a package, a wrong entry point or a module that imports only from the source
tree fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import Stack, require

ROOT = Path(__file__).resolve().parent.parent
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("packages")) as stack:
        yield stack


def run(argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        argv,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, (
        f"{argv} exited {result.returncode}:\n{result.stdout}{result.stderr}"
    )
    return result.stdout


def test_python_client_wheel_installs_and_calls_a_sidecar(tmp_path: Path, stack: Stack) -> None:
    uv = require("uv", "pip install uv")
    dist = tmp_path / "dist"
    run([uv, "build", "--quiet", "--out-dir", str(dist), str(ROOT / "client" / "python")])
    [wheel] = dist.glob("*.whl")
    [sdist] = dist.glob("*.tar.gz")
    assert wheel.name == f"vellum_sidecar_client-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        files = {n for n in zf.namelist() if not n.startswith("vellum_sidecar_client-")}
    assert files == {"vellum_sidecar_client/__init__.py", "vellum_sidecar_client/py.typed"}
    with tarfile.open(sdist) as tf:
        names = {Path(n).name for n in tf.getnames()}
    assert {"vellum_sidecar_client.py", "py.typed", "README.md", "pyproject.toml"} <= names

    venv = tmp_path / "venv"
    run([uv, "venv", "--quiet", "--python", sys.executable, str(venv)])
    python = venv / "bin" / "python"
    run([uv, "pip", "install", "--quiet", "--offline", "--python", str(python), str(wheel)])
    smoke = """
import pathlib, sys, vellum_sidecar_client as m
from vellum_sidecar_client import SidecarClient
here = pathlib.Path(m.__file__).parent
assert here.parent.name == "site-packages", m.__file__
assert (here / "py.typed").exists()
c = SidecarClient()
print(m.__version__, c.can("cus_active", "reports"), c.can("cus_trial", "exports"),
      sorted(c.get_entitlements("cus_active").modules))
"""
    out = run([str(python), "-I", "-c", smoke], cwd=tmp_path, env={"VELLUM_SIDECAR_URL": stack.url})
    assert out.split(" ", 3)[:3] == [VERSION, "True", "False"], out
    assert "reports" in out.split(" ", 3)[3]


def test_js_client_tarball_installs_and_calls_a_sidecar(tmp_path: Path, stack: Stack) -> None:
    npm = require("npm", "apt-get install npm")
    node = require("node", "apt-get install nodejs")
    dist = tmp_path / "dist"
    dist.mkdir()
    packed = json.loads(
        run([npm, "pack", "--json", "--pack-destination", str(dist), str(ROOT / "client" / "js")])
    )
    [entry] = packed
    assert entry["version"] == VERSION
    assert {f["path"] for f in entry["files"]} == {
        "package.json",
        "README.md",
        "vellum-sidecar-client.js",
        "vellum-sidecar-client.d.ts",
    }
    tarball = dist / entry["filename"]
    app = tmp_path / "app"
    app.mkdir()
    (app / "package.json").write_text('{"name": "smoke", "private": true, "type": "module"}')
    run(
        [npm, "install", "--no-audit", "--no-fund", "--offline", "--loglevel=error", str(tarball)],
        cwd=app,
    )
    installed = app / "node_modules" / "vellum-sidecar-client"
    assert not installed.is_symlink() and (installed / "vellum-sidecar-client.d.ts").exists()
    (app / "smoke.js").write_text(
        """
import { SidecarClient, VERSION } from "vellum-sidecar-client";
const c = new SidecarClient({ baseUrl: process.env.SIDECAR_URL });
const out = [VERSION, await c.can("cus_active", "reports"), await c.can("cus_trial", "exports")];
c.close();
console.log(out.join(" "));
"""
    )
    out = run([node, "smoke.js"], cwd=app, env={"SIDECAR_URL": stack.url})
    assert out.split() == [VERSION, "true", "false"], out
