"""The upstream's own SDK, ``vellumcharter`` 1.4.2 from PyPI, unmodified, through the sidecar.

Every public method of ``VellumCharterClient`` and ``AsyncVellumCharterClient``
runs with its ``base_url`` pointed at the sidecar's drop-in mirror, in front of the
emulator, and its answers are checked. The SDK carries the app's own key, which
the emulator would refuse: every request the emulator saw carried the sidecar's
key instead. The SDK's own caches are off (TTL 0), so every read reaches the
sidecar and the emulator's request counts show which reads (entitlements,
flags) the sidecar answered from its cache. Writes need no ``invalidate()``: the
sidecar drops what a write changed before answering. The journeys are
``tests/sdk_journeys.py``'s, which ``tests/test_emulator_sdk.py`` also runs against
the emulator directly.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
from aiohttp.test_utils import TestServer

from sidecar.emulator import Emulator, create_emulator_app
from sidecar.http.operations import OPERATIONS

from .conftest import Sidecar, SidecarFactory, eventually
from .harness import API_KEY
from .sdk_journeys import ASYNC_PUBLIC, LOCAL, SYNC_PUBLIC, Sdk, Target, every_public_method

CALLER_KEY = "sk_app_own_key_" + "a" * 20


@pytest.fixture
async def emulator_server(
    aiohttp_server: Callable[..., Awaitable[TestServer]], tenant: str
) -> TestServer:
    """The emulator with the demo data in this test's tenant; only the sidecar's key works."""
    app = create_emulator_app(api_keys=[API_KEY], default_tenant=tenant, seed=True)
    return await aiohttp_server(app)


def sdk_on(flavour: str, sc: Sidecar, tenant: str) -> Sdk:
    """The SDK with its base URL on the sidecar, its caches off, the app's own key."""
    base = str(sc.client.make_url("")).rstrip("/")
    return Sdk(flavour, base, tenant, CALLER_KEY, cached=False)


@pytest.fixture(params=["sync", "async"])
async def sdk_and_sidecar(
    request: pytest.FixtureRequest, make_sidecar: SidecarFactory, redis_url: str, tenant: str
) -> tuple[Sdk, Sidecar]:
    sc = await make_sidecar(redis_url)
    return sdk_on(request.param, sc, tenant), sc


# -- the tests -------------------------------------------------------------------------------


def test_the_table_serves_every_method_of_the_sdk() -> None:
    assert SYNC_PUBLIC == ASYNC_PUBLIC
    served = {method for op in OPERATIONS if not op.newer for method in op.sdk}
    assert served == SYNC_PUBLIC - LOCAL, sorted(served ^ (SYNC_PUBLIC - LOCAL))


async def test_every_public_method_through_the_mirror(
    sdk_and_sidecar: tuple[Sdk, Sidecar], emulator: Emulator, tenant: str
) -> None:
    sdk, sc = sdk_and_sidecar
    await every_public_method(Target(sdk, emulator, tenant, sidecar=sc))

    assert emulator.requests, "the upstream saw nothing"
    assert {r.api_key for r in emulator.requests} == {API_KEY}, "only the sidecar's key"
    assert all(r.tenant == tenant for r in emulator.requests)
    assert emulator.count("unknown") == 0, "every call was an operation of the table"
    served = {r.operation for r in emulator.requests}
    assert served == {op.name for op in OPERATIONS if not op.newer}, "every one the SDK calls"


async def test_a_write_through_one_sidecar_reaches_the_sdk_on_another(
    make_sidecar: SidecarFactory, emulator: Emulator, redis_url: str, tenant: str
) -> None:
    """Two sidecars share a Redis; an SDK on each. A subscription change made through
    one is seen through the other without a push (the write's drop fans out)."""
    a, b = await make_sidecar(redis_url), await make_sidecar(redis_url)
    on_a, on_b = sdk_on("async", a, tenant), sdk_on("sync", b, tenant)
    assert await on_b("can", "cus_active", "sso") is False
    assert await Target(on_b, emulator, tenant, sidecar=b).cache_header("cus_active") == "hit"
    await on_a("add_add_on", account_id="acme", customer_id="cus_active", module_id="sso")
    assert await on_a("can", "cus_active", "sso") is True

    async def b_sees_it() -> bool:
        return bool(await on_b("can", "cus_active", "sso"))

    await eventually(b_sees_it, timeout=5)
    assert emulator.webhook_url is None, "no push helped"
