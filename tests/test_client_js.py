"""The JS client (``client/js``) against live sidecars, through ``node --test``.

The processes are started here and their addresses handed to the node tests in
environment variables (see ``client/js/test/client.test.js``); this test fails
when any node test fails, and when node is not installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.http.operations import OPERATIONS

from .closing_server import ClosingServer
from .harness import Stack, free_port, make_tls_files

ROOT = Path(__file__).resolve().parent.parent
JS = ROOT / "client" / "js"


@pytest.fixture(scope="module")
def stacks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Stack]]:
    folder = Path(tempfile.mkdtemp(prefix="vsc-"))  # unix socket paths must stay short
    started: dict[str, Stack] = {}
    try:
        for name, stack in {
            "main": Stack(tmp_path_factory.mktemp("js"), redis=True),  # usage queues there
            "unix": Stack(tmp_path_factory.mktemp("js-unix"), listen=f"unix:{folder}/s.sock"),
            "down": Stack(
                tmp_path_factory.mktemp("js-down"),
                upstream=False,
                SIDECAR_UPSTREAM_TIMEOUT="1",
                SIDECAR_FAIL_OPEN_MODULES="status_page",
            ),
        }.items():
            started[name] = stack
            stack.start()
        yield started
    finally:
        for stack in started.values():
            stack.close()
        shutil.rmtree(folder, ignore_errors=True)


def test_js_client_against_a_live_sidecar(stacks: dict[str, Stack], tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.fail(
            "node is not installed: the JS client's tests need Node 18+ (apt-get install nodejs)"
        )
    files = sorted(str(p.relative_to(JS)) for p in (JS / "test").glob("*.test.js"))
    assert files, "no JS test files found"
    main = stacks["main"]
    closing = ClosingServer("close")  # retry.test.js: one request cut under it
    threading.Thread(target=closing.serve_forever, daemon=True).start()
    # invoicePdfUrl needs an upstream that redirects: the unix stack's redirects, as
    # upstreams before SDK 1.2 did (the main stack's test switches its own).
    stacks["unix"].admin("PATCH", "/settings", {"invoicePdf": "redirect"})
    env = {
        **os.environ,
        "VSC_URL": main.url,
        "VSC_EMULATOR_URL": main.emulator_url,
        "VSC_TENANT": main.tenant,
        "VSC_UNIX_URL": stacks["unix"].url,
        "VSC_UPSTREAM_DOWN_URL": stacks["down"].url,
        "VSC_STOPPED_URL": f"http://127.0.0.1:{free_port()}",
        "VSC_CLOSING_URL": closing.url,
        "VSC_NEWER_METHODS": ",".join(
            re.sub(r"_(\w)", lambda m: m.group(1).upper(), method)
            for op in OPERATIONS
            if op.newer
            for method in op.sdk
        ),
    }
    env.pop("VELLUM_SIDECAR_URL", None)
    tls = make_tls_files(tmp_path)  # for the https peer of wire.test.js, trusted by node
    env |= {"VSC_TLS_CERT": str(tls.cert), "VSC_TLS_KEY": str(tls.key),
            "NODE_EXTRA_CA_CERTS": str(tls.ca)}  # fmt: skip
    result = subprocess.run(
        # Files by name: node 18-20 take a folder, 21+ take globs, every version takes files.
        [node, "--test", "--test-reporter=spec", *files],
        cwd=JS,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    closing.close()
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"node --test failed:\n{output}\n{main.logs()}"
    assert closing.cut == 1, "the scripted server cut one request, which was retried"
    passed = re.search(r"\bpass (\d+)", output)
    assert re.search(r"\bfail 0\b", output) and passed, output
    assert int(passed.group(1)) >= 10, f"node ran too few tests:\n{output}"


def test_js_package_has_no_dependencies() -> None:
    package = json.loads((JS / "package.json").read_text())
    assert package["name"] == "vellum-sidecar-client"
    assert package["type"] == "module"
    for field in ("dependencies", "devDependencies", "peerDependencies", "optionalDependencies"):
        assert not package.get(field), f"{field} must stay empty: the client is one file"
    assert not (JS / "node_modules").exists()
