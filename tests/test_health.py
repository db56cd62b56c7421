"""Readiness from active checks: /readyz and the state metric follow faults within a second."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from sidecar.emulator import Emulator

from .conftest import Sidecar, SidecarFactory, eventually
from .harness import API_KEY, RedisServer

#: Faults must show within a second; the margin absorbs a loaded test machine.
WITHIN = 1.5
CHECKS = {"SIDECAR_UPSTREAM_CHECK_INTERVAL": "0.25"}


async def readyz(sc: Sidecar) -> tuple[int, dict[str, str]]:
    resp = await sc.ops.get("/readyz")
    return resp.status, await resp.json()


async def seconds_until(sc: Sidecar, **states: str) -> float:
    """How long until /readyz reports every one of ``states`` (polled, with a deadline)."""
    started = time.monotonic()

    async def reported() -> bool:
        _, body = await readyz(sc)
        return all(body.get(k) == v for k, v in states.items())

    await eventually(reported, timeout=10, interval=0.02)
    return time.monotonic() - started


async def state_metric(sc: Sidecar, dependency: str) -> str:
    text = await (await sc.ops.get("/metrics")).text()
    current = [
        line.split('state="')[1].split('"')[0]
        for line in text.splitlines()
        if line.startswith(f'vellum_sidecar_dependency_state{{dependency="{dependency}"')
        and line.endswith(" 1.0")
    ]
    assert len(current) == 1, current
    return current[0]


@pytest.fixture
def stoppable_redis(own_redis: RedisServer) -> Iterator[RedisServer]:
    yield own_redis
    if own_redis.process.running:
        own_redis.resume()


async def test_redis_killed_shows_within_a_second_without_traffic(
    make_sidecar: SidecarFactory, own_redis: RedisServer
) -> None:
    sc = await make_sidecar(own_redis.url)
    assert await readyz(sc) == (200, {"status": "ready", "redis": "ok", "upstream": "ok",
                                      "fanout": "ok"})  # fmt: skip
    own_redis.stop()
    assert await seconds_until(sc, redis="down", fanout="down") < WITHIN
    assert await state_metric(sc, "redis") == "down"
    assert (await readyz(sc))[0] == 200, "still answering from memory and the upstream"
    own_redis.start()
    assert await seconds_until(sc, redis="ok", fanout="ok") < 5


async def test_a_hung_redis_shows_within_a_second(
    make_sidecar: SidecarFactory, stoppable_redis: RedisServer, emulator: Emulator, tenant: str
) -> None:
    emulator.set_entitlements(tenant, "cus_1", {"status": "active", "modules": ["m"]})
    sc = await make_sidecar(stoppable_redis.url)
    stoppable_redis.pause()
    assert await seconds_until(sc, redis="down", fanout="down") < WITHIN
    assert await state_metric(sc, "fanout") == "down"
    resp = await sc.client.get("/v1/customers/cus_1/can/m")
    assert resp.status == 200, "reads skip the hung Redis"
    stoppable_redis.resume()
    assert await seconds_until(sc, redis="ok", fanout="ok") < 5


async def test_a_refused_key_shows_as_auth_failed_while_idle(
    make_sidecar: SidecarFactory, emulator: Emulator
) -> None:
    sc = await make_sidecar(None, **CHECKS)
    assert await seconds_until(sc, upstream="ok") < WITHIN
    emulator.api_keys.clear()
    emulator.api_keys.add("a_rotated_key")
    assert await seconds_until(sc, upstream="auth_failed") < WITHIN
    assert await state_metric(sc, "upstream") == "auth_failed"
    text = await (await sc.ops.get("/metrics")).text()
    assert 'vellum_sidecar_upstream_requests_total{operation="health_check",status="401"}' in text
    emulator.api_keys.add(API_KEY)
    assert await seconds_until(sc, upstream="ok") < WITHIN


async def test_a_refused_key_shows_at_the_first_real_call(
    make_sidecar: SidecarFactory, emulator: Emulator
) -> None:
    sc = await make_sidecar(None)  # no background checks: the answer itself is the evidence
    emulator.api_keys.clear()
    resp = await sc.client.get("/v1/customers/cus_1/entitlements")
    assert resp.status == 502
    assert (await readyz(sc))[1]["upstream"] == "auth_failed"


async def test_an_upstream_answering_5xx_shows_as_down_while_idle(
    make_sidecar: SidecarFactory, emulator: Emulator
) -> None:
    sc = await make_sidecar(None, **CHECKS)
    assert await seconds_until(sc, upstream="ok") < WITHIN
    emulator.fail(None, 503, None)
    assert await seconds_until(sc, upstream="down") < WITHIN
    emulator.clear_faults()
    assert await seconds_until(sc, upstream="ok") < WITHIN


async def test_readyz_stays_200_whatever_is_down(
    make_sidecar: SidecarFactory, own_redis: RedisServer, emulator: Emulator
) -> None:
    sc = await make_sidecar(own_redis.url, **CHECKS)
    emulator.api_keys.clear()
    own_redis.stop()
    await seconds_until(sc, upstream="auth_failed", redis="down", fanout="down")
    status, body = await readyz(sc)
    assert (status, body["status"]) == (200, "ready"), "it still answers (fail closed)"
    resp = await sc.client.get("/v1/customers/never_seen/can/m")
    assert (resp.status, (await resp.json())["allowed"]) == (503, False)
