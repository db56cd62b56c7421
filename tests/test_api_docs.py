"""docs/api.md's operation table is written from the operation table (scripts/gen_api_docs.py)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sidecar.http.operations import OPERATIONS

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gen_api_docs.py"


@pytest.fixture
def generator(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    load: Callable[[str], Any] = importlib.import_module
    return load("gen_api_docs")


def test_the_committed_table_is_current() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


def test_a_stale_table_is_rewritten_and_check_fails(generator: Any) -> None:
    text = generator.DOC.read_text()
    stale = text.replace("| `consume_credits` |", "| `spend_credits` |")
    assert stale != text
    assert generator.render_doc(stale) == text
    assert generator.render_doc(text) == text


def test_every_operation_and_sdk_method_is_in_the_page() -> None:
    page = (ROOT / "docs" / "api.md").read_text()
    table = page[
        page.index("BEGIN GENERATED: operations") : page.index("END GENERATED: operations")
    ]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == [op.name for op in OPERATIONS]
    for op, row in zip(OPERATIONS, rows, strict=True):
        assert all(f"`{method}`" in row for method in op.sdk), op.name
        assert row.count("|") == 8, "one cell per column, no stray pipes"
