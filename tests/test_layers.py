"""The unit set (``pytest -m unit``) starts no process and opens no socket, and the check can fail.

``tests/layers.py`` decides which tests are unit tests; these tests run that set
(and a planted offender) in a child pytest under Python's audit hooks.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from .layers import STARTS_PROCESSES, is_unit

ROOT = Path(__file__).resolve().parent.parent
THIS = "test_the_unit_set_opens_no_socket_and_starts_no_process"


def run_pytest(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SIDECAR_TEST_AUDIT": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def counts(output: str) -> dict[str, int]:
    """``{"passed": n, "failed": m, ...}`` from pytest's last line."""
    return {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", output.splitlines()[-1])}


def test_the_unit_set_opens_no_socket_and_starts_no_process() -> None:
    # Never this test itself, whatever the classification says: no child of a child.
    done = run_pytest("-m", "unit", "--deselect", f"tests/{Path(__file__).name}::{THIS}")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    found = counts(done.stdout)
    assert found.get("failed", 0) == 0 and found.get("error", 0) == 0, done.stdout[-2000:]
    assert found["passed"] >= 100, f"the unit set shrank to {found['passed']} tests"
    assert "skipped" not in found, "a unit test skipped itself"


def test_a_unit_test_that_binds_or_spawns_fails_by_name(tmp_path: Path) -> None:
    """Planted offenders, collected with this suite's conftest: both fail, naming themselves."""
    suite = tmp_path / "tests"
    suite.mkdir()
    (suite / "__init__.py").write_text("")
    (suite / "conftest.py").write_text("from tests_real.conftest import *  # noqa: F403\n")
    # Each offender hides what it does in a helper, out of the classification's sight.
    (suite / "test_planted.py").write_text(
        "import socket, subprocess, sys\n"
        "def listen():\n"
        "    with socket.socket() as s:\n"
        "        s.bind(('127.0.0.1', 0))\n"
        "def run_python():\n"
        "    subprocess.run([sys.executable, '-c', 'pass'], check=True)\n"
        "def test_binds():\n"
        "    listen()\n"
        "def test_spawns():\n"
        "    run_python()\n"
        "def test_pure():\n"
        "    assert sum(range(4)) == 6\n"
    )
    (tmp_path / "tests_real").symlink_to(ROOT / "tests")
    done = run_pytest("-m", "unit", "-p", "no:randomly", "tests", cwd=tmp_path)
    assert counts(done.stdout) == {"failed": 2, "passed": 1}, done.stdout[-3000:]
    for name, event in (("test_binds", "socket.bind"), ("test_spawns", "subprocess.Popen")):
        line = next(
            x
            for x in done.stdout.splitlines()
            if x.startswith(f"tests/test_planted.py::{name} is marked unit")
        )
        assert event in line and "STARTS_PROCESSES" in line, line


def test_which_tests_are_unit_tests() -> None:
    assert is_unit("tests/test_x.py::test_a", ["tmp_path", "monkeypatch", "tenant"])
    assert is_unit("tests/test_x.py::test_a", ["_function_event_loop"]), "an asyncio loop is fine"
    assert not is_unit("tests/test_x.py::test_a", ["tmp_path", "aiohttp_server"])
    assert not is_unit("tests/test_x.py::test_a", ["redis_url"])
    assert not is_unit("tests/test_x.py::test_a", ["stack"]), "a fixture of its own module"
    assert not is_unit(STARTS_PROCESSES[0], [])
    assert not is_unit("tests/test_cli.py::test_anything", [])
    assert not is_unit("tests/test_x.py::test_a", [], _spawns), "its own code names subprocess"
    assert is_unit("tests/test_x.py::test_a", [], _pure)


def _spawns() -> None:
    subprocess.run([sys.executable, "-c", "pass"], check=True)


def _pure() -> None:
    assert sum(range(4)) == 6
