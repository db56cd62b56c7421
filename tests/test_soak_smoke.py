"""The soak script's machinery in a tiny run, so it cannot rot (shape, never timings)."""

from __future__ import annotations

from bench.soak import run, table


async def test_soak_smoke() -> None:
    results = await run(customers=3000, requests=600, max_entries=500)
    memory, leaks = results["memory"], results["leaks"]
    assert memory["customers"] == 3000
    assert memory["final_entries"] == 500, "the in-process layer stays at its cap"
    assert memory["samples"][-1]["requested"] == 3000
    assert leaks["requests"] == 600
    assert leaks["errors"] == 0
    assert leaks["fds_before"] > 0
    assert leaks["tasks_before"] > 0
    rendered = table(results)
    assert "in-process entries at the end (cap)" in rendered
    assert "500 (500)" in rendered
