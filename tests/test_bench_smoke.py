"""The benchmark's machinery, run tiny (``python -m bench --smoke``) so it cannot rot.

It starts real processes (Redis, the emulator, several sidecars, a two-worker
sidecar, the bare server) and checks the shape of what it reports, never the
numbers: timings on a shared machine prove nothing in a test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ROWS = (
    "bare", "hot", "hot_default", "redis_only", "batch", "flag", "ofrep", "workers",
    "hot_traced", "hot_traced_unsampled",
    "hot_half_peak", "hot_default_half_peak", "bare_half_peak",
)  # fmt: skip
ROW_FIELDS = {"generator", "connections", "requests", "rps", "p50_ms", "p99_ms", "errors"}


def test_bench_smoke_runs_every_phase(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--generator", "builtin", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())

    assert set(results["throughput"]) == set(ROWS)
    for name in ROWS:
        row = results["throughput"][name]
        assert set(row) >= ROW_FIELDS, (name, row)
        assert row["requests"] > 0, (name, row)
        assert row["errors"] == 0, (name, row)
    for name in ("hot", "hot_default", "redis_only", "batch", "flag", "ofrep", "workers",
                 "hot_traced", "hot_traced_unsampled"):  # fmt: skip
        assert isinstance(results["throughput"][name]["vs_bare"], float)
        assert isinstance(results["throughput"][name]["vs_bare_paired"], float)
    for name in ("hot_half_peak", "hot_default_half_peak", "bare_half_peak"):
        row = results["throughput"][name]
        assert len(row["all_p99_ms"]) == results["options"]["repeat"], (name, row)
        assert abs(row["p99_ms"] - min(row["all_p99_ms"])) < 0.001, (name, row)  # the lowest
    assert results["throughput"]["workers"]["workers"] == 2

    fleet = results["fleet"]
    assert fleet["sidecars"] == 3
    assert fleet["failed_reads"] == 0
    assert fleet["upstream_requests"] >= fleet["customers"]
    push = results["push"]
    assert push["not_applied_within_10s"] == 0
    assert {"applied_p50_ms", "applied_p99_ms", "first_applied_p50_ms"} <= set(push)
    rss = results["rss"]
    assert rss["memory_entries"] == rss["customers"]
    assert rss["peak_rss_mib"] > 0
    assert {"cpu", "cores", "python", "aiohttp", "event_loop"} <= set(results["machine"])
    for name in ("python", "js"):  # the tiny clients' sequential `can` against a raw request
        row = results["clients"][name]
        assert row["calls"] > 0 and len(row["client_rounds_us"]) == row["rounds"], (name, row)
        assert row["client_us"] > 0 and row["raw_us"] > 0, (name, row)
        assert row["ratio"] > 0 and row["client_cpu_us"] > 0, (name, row)

    table = proc.stdout
    assert (
        "| scenario | requests/s | p50 ms | p99 ms | vs bare | vs bare, paired | server CPU |"
        in table
    )
    assert "default settings, paced at the same rate" in table
    assert "SIDECAR_WORKERS=2" in table
    assert "`GET /v1/customers/{c}/flags/{name}`, memory hit" in table
    assert "`POST /ofrep/v1/evaluate/flags/{key}` (OFREP), memory hits" in table
    assert "upstream requests for" in table
    assert "push to applied" in table
    assert "peak RSS" in table
    assert "Python `SidecarClient.can` vs `http.client`" in table
    assert "JS `SidecarClient.can` vs `node:http`" in table
