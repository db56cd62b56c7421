"""Shared fixtures: a real ``redis-server`` on a free port, the emulator, sidecars.

The Redis fixture starts its own server (``harness.RedisServer``, never the
machine's 6379) so tests can kill and restart it; ``SIDECAR_TEST_REDIS_URL``
points the suite at an existing server instead (tests that must kill Redis still
start their own). The emulator and sidecars here run in this process, on
``aiohttp_server``; ``harness.Stack`` runs them as processes.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web_runner import BaseRunner

from sidecar.app import create_app
from sidecar.appkeys import CACHE, INVALIDATOR, LIFECYCLE, METRICS, SETTINGS
from sidecar.cache.cache import DocumentCache
from sidecar.cache.invalidation import Invalidator
from sidecar.config import Settings
from sidecar.emulator import EMULATOR, Emulator, create_emulator_app
from sidecar.http.limits import GuardedRunner, listener_guards
from sidecar.http.ops import create_ops_app
from sidecar.http.webhooks import create_webhook_app
from sidecar.metrics import Metrics

from . import layers
from .harness import API_KEY, RedisServer, sidecar_env

# -- unit and integration tests (tests/layers.py decides; `pytest -m unit`) ------------


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "unit: no process, no socket (tests/layers.py)")
    config.addinivalue_line("markers", "integration: starts processes or listens on sockets")
    if os.environ.get("SIDECAR_TEST_AUDIT") == "1":
        layers.install_audit()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        function = getattr(item, "function", None)
        unit = layers.is_unit(item.nodeid, fixtures, function)
        item.add_marker("unit" if unit else "integration")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    """With ``SIDECAR_TEST_AUDIT=1``, a unit test that opens a socket or starts a process fails."""
    if os.environ.get("SIDECAR_TEST_AUDIT") != "1" or item.get_closest_marker("unit") is None:
        return (yield)
    layers.audit.seen = []
    try:
        result = yield
    finally:
        seen, layers.audit.seen = layers.audit.seen, None
    if seen:
        pytest.fail(
            f"{item.nodeid} is marked unit but opened a socket or started a process: "
            f"{seen[:3]}; add it to STARTS_PROCESSES in tests/layers.py",
            pytrace=False,
        )
    return result


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float = 10.0, interval: float = 0.01
) -> None:
    """Poll an async condition with a deadline (instead of sleeping)."""
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of the session's Redis."""
    url = os.environ.get("SIDECAR_TEST_REDIS_URL")
    if url:
        yield url
        return
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server.url
    server.kill()


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """The session Redis, emptied before the test."""
    with redis.Redis.from_url(redis_server) as client:
        client.flushall()
    return redis_server


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis only this test uses, which it may kill and restart."""
    server = RedisServer(tmp_path).start()
    yield server
    server.kill()


@pytest.fixture
def tenant() -> str:
    return "t_" + uuid.uuid4().hex[:10]


@pytest.fixture
async def emulator_server(
    aiohttp_server: Callable[..., Awaitable[TestServer]], tenant: str
) -> TestServer:
    app = create_emulator_app(api_keys=[API_KEY], default_tenant=tenant)
    return await aiohttp_server(app)


@pytest.fixture
def emulator(emulator_server: TestServer) -> Emulator:
    return emulator_server.app[EMULATOR]


@dataclass
class Sidecar:
    """One sidecar under test: its three apps, with a client on each."""

    app: web.Application
    client: TestClient[Any, Any]
    ops: TestClient[Any, Any]
    webhooks: TestClient[Any, Any] | None

    @property
    def cache(self) -> DocumentCache:
        return self.app[CACHE]

    @property
    def invalidator(self) -> Invalidator:
        return self.app[INVALIDATOR]

    @property
    def metrics(self) -> Metrics:
        return self.app[METRICS]

    def total(self, name: str) -> float:
        """The sum of a metric's samples named ``name`` over every label value."""
        return sum(
            s.value for f in self.metrics.registry.collect() for s in f.samples if s.name == name
        )


SidecarFactory = Callable[..., Awaitable[Sidecar]]


class ListenerServer(TestServer):
    """The local app served as production serves it: ``GuardedRunner``, with the
    listener limits its settings give (counted in its metrics) and the front door
    (``sidecar/http/hot.py``)."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        guard = listener_guards(self.app[SETTINGS], self.app[METRICS])["local"]
        return GuardedRunner(self.app, guard=guard, **kwargs)


@pytest.fixture
async def make_sidecar(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
    emulator_server: TestServer,
    tenant: str,
) -> SidecarFactory:
    """Start sidecars against the emulator; ``redis=None`` for memory-only."""

    async def make(redis: str | None = None, **env: str | None) -> Sidecar:
        base = str(emulator_server.make_url("")).rstrip("/")
        settings = Settings.from_env(sidecar_env(tenant, base, SIDECAR_REDIS_URL=redis, **env))
        app = create_app(settings)
        client = await aiohttp_client(ListenerServer(app))
        app[LIFECYCLE].phase = "ready"
        ops = await aiohttp_client(create_ops_app(app))
        hooks = await aiohttp_client(create_webhook_app(app)) if settings.webhooks_enabled else None
        sidecar = Sidecar(app, client, ops, hooks)
        if redis is not None:
            await asyncio.wait_for(sidecar.invalidator.subscribed.wait(), 10)
        return sidecar

    return make
