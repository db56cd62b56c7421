"""Fault injection with real processes: Redis killed, restarted empty or hung; the
upstream refusing, failing or hanging; stale serving, the breaker, fail-open."""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from sidecar.emulator import Emulator

from .conftest import Sidecar, SidecarFactory, eventually
from .harness import RedisServer

DOC = {"status": "active", "modules": ["reports"]}


async def read(sc: Sidecar, customer: str, module: str = "reports") -> tuple[int, str, Any]:
    resp = await sc.client.get(f"/v1/customers/{customer}/can/{module}")
    return resp.status, resp.headers.get("X-Sidecar-Cache", ""), await resp.json()


async def ready(sc: Sidecar) -> dict[str, Any]:
    body: dict[str, Any] = await (await sc.ops.get("/readyz")).json()
    return body


async def test_redis_killed_mid_load_no_failed_reads(
    make_sidecar: SidecarFactory, own_redis: RedisServer, emulator: Emulator, tenant: str
) -> None:
    customers = [f"cus_{i}" for i in range(30)]
    for c in customers:
        emulator.set_entitlements(tenant, c, DOC)
    sc = await make_sidecar(own_redis.url, SIDECAR_MEMORY_TTL="0.05")
    results: list[tuple[int, bool]] = []
    stop = asyncio.Event()

    async def load() -> None:
        rng = random.Random(7)
        while not stop.is_set():
            status, _, body = await read(sc, rng.choice(customers))
            results.append((status, body.get("allowed") is True))

    workers = [asyncio.create_task(load()) for _ in range(8)]
    await eventually(lambda: _at_least(results, 200))
    own_redis.kill()
    await eventually(lambda: _ready_is(sc, "redis", "down"))
    mark = len(results)
    await eventually(lambda: _at_least(results, mark + 300))
    own_redis.start()
    await eventually(lambda: _ready_is(sc, "redis", "ok"), timeout=15)
    mark = len(results)
    await eventually(lambda: _at_least(results, mark + 200))
    stop.set()
    await asyncio.gather(*workers)
    assert results
    assert all(r == (200, True) for r in results), [r for r in results if r != (200, True)][:5]
    errors = sc.metrics.registry.get_sample_value(
        "vellum_sidecar_redis_errors_total", {"operation": "get"}
    )
    assert errors is not None and errors >= 1


async def _at_least(results: list[Any], n: int) -> bool:
    await asyncio.sleep(0)
    return len(results) >= n


async def _ready_is(sc: Sidecar, key: str, value: str) -> bool:
    return (await ready(sc)).get(key) == value


async def test_redis_restarted_empty_sharing_and_fanout_resume(
    make_sidecar: SidecarFactory, own_redis: RedisServer, emulator: Emulator, tenant: str
) -> None:
    emulator.set_entitlements(tenant, "cus_1", DOC)
    emulator.set_entitlements(tenant, "cus_2", DOC)
    a = await make_sidecar(own_redis.url)
    b = await make_sidecar(own_redis.url)
    assert (await read(a, "cus_1"))[1] == "miss"
    own_redis.restart()  # all data gone, every connection broken
    for sc in (a, b):
        await eventually(functools.partial(_fanout_and_redis_ok, sc), timeout=15)
    # Sharing resumes: a's fetch lands in the new Redis and b reads it from there.
    assert (await read(a, "cus_2"))[1] == "miss"
    assert (await read(b, "cus_2"))[1] == "hit"
    # Fan-out resumes: a drop on a reaches b.
    emulator.set_entitlements(tenant, "cus_2", {"status": "active", "modules": []})
    assert (await a.client.delete("/v1/customers/cus_2/cache")).status == 204

    async def b_sees_change() -> bool:
        status, _, body = await read(b, "cus_2")
        return status == 200 and body["allowed"] is False

    await eventually(b_sees_change, timeout=5)


async def _fanout_and_redis_ok(sc: Sidecar) -> bool:
    # A read makes the sidecar notice the restart if nothing else has yet.
    await read(sc, "cus_1")
    state = await ready(sc)
    return bool(state["redis"] == "ok" and state["fanout"] == "ok")


async def test_redis_hung_reads_stay_bounded(
    make_sidecar: SidecarFactory, own_redis: RedisServer, emulator: Emulator, tenant: str
) -> None:
    """SIGSTOP: Redis accepts nothing and answers nothing; timeouts keep reads moving."""
    emulator.set_entitlements(tenant, "cus_1", DOC)
    sc = await make_sidecar(own_redis.url, SIDECAR_REDIS_TIMEOUT="0.2", SIDECAR_MEMORY_TTL="0")
    assert (await read(sc, "cus_1"))[0] == 200
    own_redis.pause()
    try:
        for _ in range(5):
            status, _, body = await asyncio.wait_for(read(sc, "cus_1"), timeout=5)
            assert (status, body["allowed"]) == (200, True)
        assert (await ready(sc))["redis"] == "down"
    finally:
        own_redis.resume()
    await eventually(lambda: _ready_is(sc, "redis", "ok"), timeout=15)


async def test_upstream_stopped_serves_stale_and_refuses_unknown(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    make_sidecar: SidecarFactory,
    emulator_server: TestServer,
    emulator: Emulator,
    tenant: str,
    redis_url: str,
) -> None:
    emulator.set_entitlements(tenant, "cus_1", DOC)
    sc = await make_sidecar(redis_url, SIDECAR_CACHE_TTL="0.2", SIDECAR_UPSTREAM_TIMEOUT="0.5")
    assert (await read(sc, "cus_1"))[:2] == (200, "miss")
    await emulator_server.close()  # connection refused from now on

    async def stale() -> bool:
        status, source, body = await read(sc, "cus_1")
        return (status, source, body["allowed"]) == (200, "stale", True)

    await eventually(stale, timeout=5)
    resp = await sc.client.get("/v1/customers/cus_1/entitlements")
    assert resp.headers["X-Sidecar-Cache"] == "stale"
    assert int(resp.headers["Age"]) >= 0
    status, _, body = await read(sc, "never_seen")
    assert status == 503
    assert body["allowed"] is False
    assert body["error"]["code"] == "upstream_unavailable"


async def test_stale_window_ends(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    """While the upstream fails, the entry is served stale for its window, then refused.

    The window (1 s) is several upstream deadlines long, so a loaded machine still
    reads inside it; the answers are recorded in order to prove the stale 200s came
    before the 503 (a sidecar that never served stale would fail here).
    """
    emulator.set_entitlements(tenant, "cus_1", DOC)
    sc = await make_sidecar(
        None, SIDECAR_CACHE_TTL="0.1", SIDECAR_STALE_TTL="1", SIDECAR_UPSTREAM_TIMEOUT="0.2"
    )
    assert (await read(sc, "cus_1"))[:2] == (200, "miss")
    emulator.fail("get_entitlements", 503, None)
    answers: list[tuple[int, str, Any]] = []

    async def refused() -> bool:
        status, source, body = await read(sc, "cus_1")
        answers.append((status, source, body.get("allowed")))
        return status == 503

    await eventually(refused, timeout=10)
    *served, last = answers
    assert (200, "stale", True) in served, f"no stale answer before the refusal: {answers}"
    assert all(status == 200 and allowed for status, _, allowed in served), answers
    assert last[0] == 503 and last[2] is False, "the window ended: fail closed"


async def test_breaker_opens_on_500s_and_closes_after(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    emulator.set_entitlements(tenant, "cus_ok", DOC)
    emulator.fail("get_entitlements", 500, None)
    sc = await make_sidecar(None, SIDECAR_UPSTREAM_TIMEOUT="0.3")
    for i in range(4):
        assert (await read(sc, f"c{i}"))[0] == 503
    assert (await ready(sc))["upstream"] == "down"
    before = emulator.count("get_entitlements", tenant)
    for i in range(20):
        assert (await read(sc, f"d{i}"))[0] == 503
    assert emulator.count("get_entitlements", tenant) - before <= 2, "open breaker calls nothing"
    fast_fails = sc.metrics.registry.get_sample_value(
        "vellum_sidecar_upstream_requests_total",
        {"operation": "get_entitlements", "status": "breaker_open"},
    )
    assert fast_fails is not None and fast_fails >= 18
    emulator.clear_faults()

    async def closed() -> bool:
        status, _, _ = await read(sc, "cus_ok")
        return status == 200

    await eventually(closed, timeout=15)
    assert (await ready(sc))["upstream"] in ("ok", "degraded")


async def test_hanging_upstream_is_bounded_by_the_deadline(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    emulator.hold("get_entitlements")
    sc = await make_sidecar(None, SIDECAR_UPSTREAM_TIMEOUT="0.5")
    status, _, body = await asyncio.wait_for(read(sc, "cus_1"), timeout=5)
    assert status == 503
    assert body["error"]["code"] == "upstream_unavailable"
    timeouts = sc.metrics.registry.get_sample_value(
        "vellum_sidecar_upstream_requests_total",
        {"operation": "get_entitlements", "status": "timeout"},
    )
    assert timeouts is not None and timeouts >= 1
    emulator.clear_faults()


async def test_retries_hide_a_transient_failure(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    emulator.set_entitlements(tenant, "cus_1", DOC)
    emulator.fail("get_entitlements", 502, 2)
    sc = await make_sidecar(None)
    status, source, body = await read(sc, "cus_1")
    assert (status, source, body["allowed"]) == (200, "miss", True)
    assert emulator.count("get_entitlements", tenant) == 3


async def test_upstream_auth_failure(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    sc = await make_sidecar(None, VELLUM_API_KEY="wrong-key-" + "z" * 10)
    resp = await sc.client.get("/v1/customers/cus_1/entitlements")
    assert resp.status == 502
    assert (await resp.json())["error"]["code"] == "upstream_auth_failed"
    status, _, body = await read(sc, "cus_1")
    assert status == 503
    assert body["allowed"] is False


async def test_refresh_ahead_keeps_callers_off_the_upstream(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    emulator.set_entitlements(tenant, "cus_1", DOC)
    # 2 s fresh: the refresh-ahead window (its last 10 %) is 200 ms wide, so a
    # caller polling every 10 ms lands in it even on a loaded machine.
    sc = await make_sidecar(None, SIDECAR_CACHE_TTL="2")
    assert (await read(sc, "cus_1"))[1] == "miss"
    sources: list[str] = []

    async def refreshed() -> bool:
        sources.append((await read(sc, "cus_1"))[1])
        return emulator.count("get_entitlements", tenant) >= 3

    await eventually(refreshed, timeout=20, interval=0.01)
    assert set(sources) == {"hit"}, "the refreshes happened in the background"


@pytest.mark.parametrize("mode", ["memory", "redis"])
async def test_fail_open_modules(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str, redis_url: str, mode: str
) -> None:
    emulator.fail("get_entitlements", 503, None)
    sc = await make_sidecar(
        redis_url if mode == "redis" else None,
        SIDECAR_FAIL_OPEN_MODULES="search",
        SIDECAR_UPSTREAM_TIMEOUT="0.3",
    )
    status, _, body = await read(sc, "cus_1", "search")
    assert status == 200
    assert body == {
        "allowed": True,
        "fallback": True,
        "customerId": "cus_1",
        "module": "search",
        "status": None,
    }
    status, _, body = await read(sc, "cus_1", "reports")
    assert (status, body["allowed"]) == (503, False)
    resp = await sc.client.post(
        "/v1/check",
        json={"checks": [{"customerId": "c", "module": "search"},
                         {"customerId": "c", "module": "reports"}]},
    )  # fmt: skip
    results = (await resp.json())["results"]
    assert [r["allowed"] for r in results] == [True, False]
    assert results[0]["fallback"] is True
    assert "fallback" not in results[1]


async def test_fail_open_does_not_override_a_real_answer(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    emulator.set_entitlements(tenant, "cus_1", {"status": "active", "modules": []})
    sc = await make_sidecar(None, SIDECAR_FAIL_OPEN_MODULES="search")
    status, _, body = await read(sc, "cus_1", "search")
    assert (status, body["allowed"]) == (200, False)
    assert "fallback" not in body


async def test_memory_layer_stays_at_its_cap(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    sc = await make_sidecar(None, SIDECAR_MEMORY_MAX_ENTRIES="50")
    checks = [{"customerId": f"c{i}", "module": "m"} for i in range(400)]
    resp = await sc.client.post("/v1/check", json={"checks": checks})
    assert resp.status == 200
    assert len(sc.cache.memory) == 50
    gauge = sc.metrics.registry.get_sample_value("vellum_sidecar_memory_entries")
    assert gauge == 50
    # The most recent are kept (least recently used evicted).
    assert (await read(sc, "c399"))[1] == "hit"
    assert (await read(sc, "c0"))[1] == "miss"


async def test_no_task_leak_after_many_requests(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str, redis_url: str
) -> None:
    sc = await make_sidecar(redis_url)

    async def round_of(n: int) -> None:
        # 50 concurrent callers: misses, hits and single-flight waiters.
        await asyncio.gather(*(read(sc, f"c{n}_{i % 25}") for i in range(50)))

    # The first round opens the keep-alive connections (one server task each);
    # the pool may open a few more later, so allow a small slack. A leak of one
    # task per request or per fetch would add hundreds over these rounds.
    await round_of(0)
    baseline = len(asyncio.all_tasks())
    for n in range(1, 40):
        await round_of(n)
    await eventually(lambda: _tasks_at_most(baseline + 10))


async def _tasks_at_most(n: int) -> bool:
    await asyncio.sleep(0.01)
    return len(asyncio.all_tasks()) <= n


async def test_failing_billing_does_not_open_the_read_breaker(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    emulator.set_entitlements(tenant, "cus_1", DOC)
    emulator.fail("list_invoices", 500, None)
    sc = await make_sidecar(None)
    statuses = set()
    for _ in range(10):
        resp = await sc.client.get("/v1/accounts/acct_1/invoices")
        statuses.add(resp.status)
    # The upstream's 500 passes through until the billing breaker opens (502);
    # retries of this read can open it within the first call.
    assert 502 in statuses
    assert statuses <= {500, 502}
    status, _, body = await read(sc, "cus_1")
    assert (status, body["allowed"]) == (200, True)
    assert (await ready(sc))["upstream"] == "ok"


async def test_unretried_write_gets_the_whole_deadline(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    """A write with no Idempotency-Key is sent once, with all of SIDECAR_UPSTREAM_TIMEOUT."""
    emulator.create_account(tenant, "acct_1")
    emulator.delay("create_customer", 0.8)
    sc = await make_sidecar(None, SIDECAR_UPSTREAM_TIMEOUT="1.2")
    resp = await sc.client.post("/v1/accounts/acct_1/customers", json={"customerId": "cus_slow"})
    assert resp.status == 201, await resp.text()
    assert emulator.count("create_customer", tenant) == 1
