"""``python -m bench.snapshot --smoke``: the snapshot bench's machinery in a tiny run, so
it cannot rot (its shape, never its timings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_snapshot_bench_smoke_measures_every_strategy(tmp_path: Path) -> None:
    out = tmp_path / "snapshot.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.snapshot", "--smoke", "--strategies", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())
    customers = results["file"]["customers"]
    for name in ("chunked", "thread", "fork"):
        assert results["load"][name]["entries"] == customers, name
    paced = results["paced"]
    assert set(paced) == {"no_write", "chunked", "thread", "fork"}
    assert paced["no_write"]["writes"] == 0, "nothing changed, nothing written"
    for name in ("chunked", "thread", "fork"):
        assert paced[name]["writes"] >= 1, name
        assert paced[name]["errors"] == 0, name
    assert "snapshot of 2,000 customers" in proc.stdout
