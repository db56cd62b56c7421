"""``python -m bench.usage --smoke``: the metered usage bench's machinery in a tiny run, so
it cannot rot (its shape and its correctness checks, never its timings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_usage_bench_smoke_accepts_delivers_and_compares(tmp_path: Path) -> None:
    out = tmp_path / "usage.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.usage", "--smoke", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())
    accept, deliver, sync = results["accept"], results["deliver"], results["sync"]
    assert accept["errors"] == {} and accept["queued_after"] == accept["records"] == 300
    assert deliver["left_in_queue"] == 0 and deliver["balances_exact"] is True
    assert deliver["upstream_calls"] >= deliver["records"]
    assert deliver["per_second"] > 0 and deliver["upstream_mean_ms"] > 0
    assert sync["errors"] == {} and sync["records"] == 50
    assert "| accepted (Prefer: respond-async, upstream down) | 300 |" in proc.stdout
