"""POST /v1/check answers within the read deadline, however slow the upstream."""

from __future__ import annotations

import time

from sidecar.emulator import Emulator

from .conftest import SidecarFactory, eventually

N = 300


async def test_a_batch_of_unknown_customers_answers_within_the_deadline(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    customers = [f"c{i:03d}" for i in range(N)]
    for c in customers:
        emulator.set_entitlements(tenant, c, {"status": "active", "modules": ["m"]})
    emulator.delay("get_entitlements", 0.5)
    sc = await make_sidecar(None, SIDECAR_UPSTREAM_TIMEOUT="1.5")
    started = time.monotonic()
    resp = await sc.client.post(
        "/v1/check", json={"checks": [{"customerId": c, "module": "m"} for c in customers]}
    )
    took = time.monotonic() - started
    assert resp.status == 200
    results = (await resp.json())["results"]
    assert [r["customerId"] for r in results] == customers, "every check, in order"
    answered = [r["customerId"] for r in results if "error" not in r]
    late = [r for r in results if r.get("error") == "timeout"]
    assert took < 1.5 + 0.5, f"answered after {took:.2f}s"
    assert answered and late, (len(answered), len(late))
    assert len(answered) + len(late) == N
    assert all(r["allowed"] is True for r in results if "error" not in r)
    assert all(r["allowed"] is False for r in late), "fail closed"

    # The fetches in flight at the deadline finish and fill the cache; the ones
    # not started never start.
    async def settled() -> bool:
        text = await (await sc.ops.get("/metrics")).text()
        return "vellum_sidecar_inflight_fetches 0.0" in text

    await eventually(settled, timeout=10)
    fetched = {r.params["customer"] for r in emulator.requests if r.operation == "get_entitlements"}
    carried_on = fetched - set(answered)
    assert carried_on, "fetches in flight at the deadline carried on"
    assert len(fetched) < N, "customers not started by the deadline were never fetched"
    for customer in sorted(carried_on)[:5]:
        got = await sc.client.get(f"/v1/customers/{customer}/can/m")
        assert got.headers["X-Sidecar-Cache"] == "hit"
    text = await (await sc.ops.get("/metrics")).text()
    assert f"vellum_sidecar_check_timeouts_total {float(len(late))}" in text
