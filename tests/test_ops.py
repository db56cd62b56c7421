"""Ops listener: health, readiness states, metrics; the browser guard."""

from __future__ import annotations

import platform
from typing import get_args

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar import __version__
from sidecar.appkeys import LIFECYCLE
from sidecar.emulator import Emulator
from sidecar.metrics import REDIS_STATES, UPSTREAM_STATES
from sidecar.redis.conn import RedisState
from sidecar.upstream import UpstreamState

from .conftest import Sidecar, SidecarFactory, eventually
from .harness import RedisServer


async def scrape(sc: Sidecar) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """``GET /metrics`` parsed: (sample name, labels) -> value."""
    resp = await sc.ops.get("/metrics")
    assert resp.status == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(await resp.text())
        for sample in family.samples
    }


async def states(sc: Sidecar, metric: str) -> dict[str, float]:
    """A ``*_state`` gauge's series: state -> value."""
    name = f"vellum_sidecar_{metric}_state"
    return {
        dict(labels)["state"]: value
        for (sample, labels), value in (await scrape(sc)).items()
        if sample == name
    }


def current(series: dict[str, float]) -> str:
    [state] = [s for s, v in series.items() if v == 1.0]
    assert all(v in (0.0, 1.0) for v in series.values()), series
    return state


async def test_healthz_and_readyz(make_sidecar: SidecarFactory, redis_url: str) -> None:
    sc = await make_sidecar(redis_url)
    assert (await sc.ops.get("/healthz")).status == 200
    resp = await sc.ops.get("/readyz")
    assert resp.status == 200
    assert await resp.json() == {
        "status": "ready",
        "redis": "ok",
        "upstream": "ok",
        "fanout": "ok",
    }
    for metric in ("redis", "upstream", "fanout"):
        assert current(await states(sc, metric)) == "ok", metric


async def test_readyz_memory_mode_and_phases(make_sidecar: SidecarFactory) -> None:
    sc = await make_sidecar(None)
    body = await (await sc.ops.get("/readyz")).json()
    assert body["redis"] == "disabled"
    assert "fanout" not in body
    assert await states(sc, "redis") == {"ok": 0.0, "oom": 0.0, "down": 0.0, "disabled": 1.0}
    assert current(await states(sc, "fanout")) == "disabled"
    for phase in ("starting", "stopping"):
        sc.app[LIFECYCLE].phase = phase
        resp = await sc.ops.get("/readyz")
        assert resp.status == 503
        assert (await resp.json())["status"] == phase
    assert (await sc.ops.get("/healthz")).status == 200


async def test_readyz_reports_redis_down_and_back(
    make_sidecar: SidecarFactory, own_redis: RedisServer, emulator: Emulator, tenant: str
) -> None:
    emulator.set_entitlements(tenant, "cus_1", {"status": "active", "modules": ["m"]})
    sc = await make_sidecar(own_redis.url)
    own_redis.kill()
    # The next read notices; the answer still comes (from the upstream).
    resp = await sc.client.get("/v1/customers/cus_1/can/m")
    assert resp.status == 200
    assert (await resp.json())["allowed"] is True
    body = await (await sc.ops.get("/readyz")).json()
    assert body["redis"] == "down"
    assert (await sc.ops.get("/readyz")).status == 200, "still answering, so still ready"
    assert current(await states(sc, "redis")) == "down"
    own_redis.start()

    async def recovered() -> bool:
        state = await (await sc.ops.get("/readyz")).json()
        return bool(state["redis"] == "ok" and state["fanout"] == "ok")

    await eventually(recovered, timeout=15)
    assert current(await states(sc, "redis")) == "ok"
    assert current(await states(sc, "fanout")) == "ok"


async def test_fanout_state_follows_the_subscription(
    make_sidecar: SidecarFactory, own_redis: RedisServer
) -> None:
    """Redis down takes the subscription with it: both gauges say so, and both recover."""
    sc = await make_sidecar(own_redis.url)
    assert current(await states(sc, "fanout")) == "ok"
    own_redis.stop()

    async def fanout_down() -> bool:
        return current(await states(sc, "fanout")) == "down"

    await eventually(fanout_down, timeout=15)
    assert (await (await sc.ops.get("/readyz")).json())["fanout"] == "down"
    own_redis.start()

    async def fanout_up() -> bool:
        return current(await states(sc, "fanout")) == "ok"

    await eventually(fanout_up, timeout=15)


async def test_readyz_reports_upstream_down(
    make_sidecar: SidecarFactory, emulator: Emulator
) -> None:
    emulator.fail("get_entitlements", 503, None)
    sc = await make_sidecar(None, SIDECAR_UPSTREAM_TIMEOUT="0.3")
    for i in range(6):
        await sc.client.get(f"/v1/customers/c{i}/entitlements")
    body = await (await sc.ops.get("/readyz")).json()
    assert body["upstream"] == "down"
    assert await states(sc, "upstream") == {
        "ok": 0.0,
        "degraded": 0.0,
        "down": 1.0,
        "auth_failed": 0.0,
    }


def test_state_gauges_name_every_state_the_code_has() -> None:
    """An alert may name a state before it happens: each one is always exported."""
    assert set(get_args(UpstreamState)) <= set(UPSTREAM_STATES)
    assert set(get_args(RedisState)) | {"disabled"} <= set(REDIS_STATES)


async def test_readiness_changes_count_each_flip_of_readyz(make_sidecar: SidecarFactory) -> None:
    sc = await make_sidecar(None)
    name: tuple[str, frozenset[tuple[str, str]]] = (
        "vellum_sidecar_readiness_changes_total",
        frozenset(),
    )
    assert (await scrape(sc))[name] == 0.0
    for phase, status in [
        ("ready", 200), ("starting", 503), ("stopping", 503), ("ready", 200), ("ready", 200),
    ]:  # fmt: skip
        sc.app[LIFECYCLE].phase = phase  # type: ignore[assignment]
        assert (await sc.ops.get("/readyz")).status == status
    assert (await scrape(sc))[name] == 2.0, "ready -> not ready -> ready"


async def test_metrics_exposition(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str, redis_url: str
) -> None:
    emulator.set_entitlements(tenant, "cus_1", {"status": "active", "modules": ["m"]})
    sc = await make_sidecar(redis_url)
    await sc.client.get("/v1/customers/cus_1/can/m")
    await sc.client.get("/v1/customers/cus_1/can/m")
    await sc.client.delete("/v1/customers/cus_1/cache")
    resp = await sc.ops.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    for line in (
        'vellum_sidecar_requests_total{method="GET",route="/v1/customers/{customer}/can/{module}",'
        'status="200"} 2.0',
        'vellum_sidecar_cache_lookups_total{kind="entitlements",layer="memory",result="hit"} 1.0',
        'vellum_sidecar_cache_lookups_total{kind="entitlements",layer="redis",result="miss"} 1.0',
        'vellum_sidecar_cache_lookups_total{kind="entitlements",layer="upstream",result="fetch"}'
        " 1.0",
        'vellum_sidecar_upstream_requests_total{operation="get_entitlements",status="200"} 1.0',
        'vellum_sidecar_invalidations_total{scope="customer",source="api"} 1.0',
        'vellum_sidecar_redis_state{state="ok"} 1.0',
        'vellum_sidecar_redis_state{state="down"} 0.0',
        'vellum_sidecar_upstream_state{state="ok"} 1.0',
        f'vellum_sidecar_build_info{{python="{platform.python_version()}",version="{__version__}"}}'
        " 1.0",
    ):
        assert line in text, line
    for name in (
        "vellum_sidecar_request_duration_seconds_bucket",
        "vellum_sidecar_upstream_request_duration_seconds_bucket",
        "vellum_sidecar_webhooks_total",
        "vellum_sidecar_redis_errors_total",
        "vellum_sidecar_upstream_state",
    ):
        assert name in text, name
    # No *_created series (a start timestamp per counter and histogram child).
    assert "_created" not in text
    assert "vellum_sidecar_upstream_requests_total" in text


async def test_unknown_ops_route_is_json(make_sidecar: SidecarFactory) -> None:
    sc = await make_sidecar(None)
    resp = await sc.ops.get("/nope")
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Host": "127.0.0.1:8700"}, 200),
        ({"Host": "localhost"}, 200),
        ({"Host": "[::1]:8700"}, 200),
        ({"Host": "app.localhost:8700"}, 200),
        ({"Host": "evil.example"}, 403),
        ({"Host": "evil.example:8700"}, 403),
        ({"Host": "127.0.0.1.nip.io"}, 403),
        ({"Host": "127.0.0.1:8700", "Origin": "http://127.0.0.1:8700"}, 403),
        ({"Host": "127.0.0.1", "Origin": "null"}, 403),
    ],
)
async def test_browser_guard(
    make_sidecar: SidecarFactory, headers: dict[str, str], status: int
) -> None:
    sc = await make_sidecar(None)
    resp = await sc.client.get("/openapi.json", headers=headers)
    assert resp.status == status
    if status == 403:
        assert (await resp.json())["error"]["code"] == "forbidden"
        assert "Access-Control-Allow-Origin" not in resp.headers


async def test_allowed_hosts_extend_the_guard(make_sidecar: SidecarFactory) -> None:
    sc = await make_sidecar(None, SIDECAR_ALLOWED_HOSTS="sidecar.internal")
    ok = await sc.client.get("/openapi.json", headers={"Host": "sidecar.internal:8700"})
    assert ok.status == 200
    no = await sc.client.get("/openapi.json", headers={"Host": "other.internal"})
    assert no.status == 403
