"""The sidecar on the Redis topologies operators run: TLS, unix sockets, Cluster, Sentinel.

Each topology is real ``redis-server`` processes (``tests/redis_topologies.py``),
started once per module. Two sidecars share each one and must show: reads
shared through Redis (one upstream fetch for both), a push webhook to one
sidecar dropping the entry on the other, and, on Sentinel, reads that keep
answering through a master failover.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp.test_utils import TestClient, TestServer

from sidecar.app import create_app
from sidecar.appkeys import CACHES, INVALIDATOR, LIFECYCLE, REDIS
from sidecar.config import ConfigError, Settings
from sidecar.emulator import Emulator
from sidecar.http.ops import create_ops_app
from sidecar.redis.keys import Keys
from sidecar.redis.url import RedisTarget, parse_redis_url
from sidecar.values import redact_url

from .conftest import Sidecar, SidecarFactory, eventually
from .harness import WEBHOOK_SECRET, RedisServer, free_port, make_tls_files, sidecar_env
from .redis_topologies import ClusterSetup, SentinelSetup

DOC = {"status": "active", "modules": ["reports"], "config": {}, "accountId": "acc_1"}
UPGRADED = {"status": "active", "modules": ["reports", "exports"], "config": {}}

# The in-process layer must not expire during a test: only fan-out may drop it.
LONG_MEMORY = "300"


# -- URL forms (no server needed) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6379/2", RedisTarget("standalone", hosts=(("127.0.0.1", 6379),), db=2)),
        ("redis://cache", RedisTarget("standalone", hosts=(("cache", 6379),))),
        (
            "rediss://:pw@cache.example:6380/0?ssl_ca_certs=/etc/ca.pem&ssl_cert_reqs=required",
            RedisTarget(
                "standalone",
                tls=True,
                hosts=(("cache.example", 6380),),
                password="pw",
                tls_options={"ssl_ca_certs": "/etc/ca.pem", "ssl_cert_reqs": "required"},
            ),
        ),
        ("unix:///run/redis.sock?db=3", RedisTarget("unix", path="/run/redis.sock", db=3)),
        (
            "redis+sentinel://app:s%40cret@s1,s2:26380,[::1]:26381/mymaster/1?sentinel_password=sp",
            RedisTarget(
                "sentinel",
                hosts=(("s1", 26379), ("s2", 26380), ("::1", 26381)),
                service="mymaster",
                db=1,
                username="app",
                password="s@cret",
                sentinel_password="sp",
            ),
        ),
        (
            "rediss+sentinel://s1/cache",
            RedisTarget("sentinel", tls=True, hosts=(("s1", 26379),), service="cache"),
        ),
        (
            "redis://n1:7000,n2:7001,n3",
            RedisTarget("standalone", hosts=(("n1", 7000), ("n2", 7001), ("n3", 6379))),
        ),
    ],
)
def test_url_forms(url: str, expected: RedisTarget) -> None:
    assert parse_redis_url(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://cache:6379", "scheme must be"),
        ("redis+sentinel://s1:26379", "service name"),
        ("redis+sentinel://s1/a/1/x", "/service or /service/db"),
        ("redis://cache:notaport", "invalid port"),
        ("redis://cache:0", "outside 1-65535"),
        ("redis://cache/zero", "database must be a number"),
        ("redis://cache/0?ssl_ca_certs=/x", "needs TLS"),
        ("redis://cache/0?socket_timeout=9", "unknown option 'socket_timeout'"),
        ("rediss://cache/0?ssl_cert_reqs=maybe", "ssl_cert_reqs must be"),
        ("redis://cache?db=2", "in the path"),
        ("unix://?db=1", "socket path"),
        ("redis://a,,b", "empty host"),
    ],
)
def test_bad_urls_are_refused_without_echoing_the_url(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        parse_redis_url(url)
    assert url not in str(info.value)


def _config_problems(**env: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(sidecar_env("t", "http://127.0.0.1:1", **env))
    return info.value.problems


def test_cluster_mode_is_checked_against_the_url() -> None:
    assert _config_problems(SIDECAR_REDIS_CLUSTER="true") == [
        "SIDECAR_REDIS_CLUSTER: true needs SIDECAR_REDIS_URL (cluster nodes' redis:// URL)"
    ]
    [problem] = _config_problems(
        SIDECAR_REDIS_CLUSTER="true", SIDECAR_REDIS_URL="redis+sentinel://:pw@s1/mymaster"
    )
    assert problem.startswith("SIDECAR_REDIS_CLUSTER: Sentinel and Cluster")
    assert "pw" not in problem
    [problem] = _config_problems(SIDECAR_REDIS_URL="redis://n1,n2")
    assert problem.startswith("SIDECAR_REDIS_URL: several hosts")
    [problem] = _config_problems(SIDECAR_REDIS_CLUSTER="maybe", SIDECAR_REDIS_URL="redis://n1")
    assert problem.startswith("SIDECAR_REDIS_CLUSTER: expected true or false")
    settings = Settings.from_env(
        sidecar_env("t", "http://127.0.0.1:1", SIDECAR_REDIS_URL="redis://n1,n2",
                    SIDECAR_REDIS_CLUSTER="true")
    )  # fmt: skip
    assert settings.redis_cluster is True
    assert ("SIDECAR_REDIS_CLUSTER", "true") in settings.redacted()


def test_redaction_covers_host_lists_and_password_options() -> None:
    url = "rediss+sentinel://app:hunter2@s1:26379,s2/mymaster?sentinel_password=s3cret&ssl_cert_reqs=none"
    shown = redact_url(url)
    assert "hunter2" not in shown and "s3cret" not in shown
    assert shown == (
        "rediss+sentinel://app:***@s1:26379,s2/mymaster?sentinel_password=***&ssl_cert_reqs=none"
    )
    assert redact_url("redis://:pw@n1:7000,n2:7001") == "redis://:***@n1:7000,n2:7001"
    assert redact_url("redis://cache:6379/0") == "redis://cache:6379/0"


# -- helpers -------------------------------------------------------------------------------

BareFactory = Callable[..., Awaitable[tuple[TestClient[Any, Any], TestClient[Any, Any]]]]


@pytest.fixture
def bare_sidecar(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
    emulator_server: TestServer,
    tenant: str,
) -> BareFactory:
    """A sidecar whose Redis may never answer (``make_sidecar`` waits for the fan-out)."""

    async def make(**env: str) -> tuple[TestClient[Any, Any], TestClient[Any, Any]]:
        base = str(emulator_server.make_url("")).rstrip("/")
        app = create_app(Settings.from_env(sidecar_env(tenant, base, **env)))
        client = await aiohttp_client(app)
        app[LIFECYCLE].phase = "ready"
        return client, await aiohttp_client(create_ops_app(app))

    return make


async def _doc(sc: Sidecar, customer: str) -> tuple[str, dict[str, Any]]:
    resp = await sc.client.get(f"/v1/customers/{customer}/entitlements")
    assert resp.status == 200, await resp.text()
    return resp.headers["X-Sidecar-Cache"], await resp.json()


async def _shares_reads(a: Sidecar, b: Sidecar, emulator: Emulator, tenant: str) -> None:
    """A's miss fills Redis; B (another process's memory) answers from Redis."""
    emulator.set_entitlements(tenant, "cus_1", DOC)
    source, doc = await _doc(a, "cus_1")
    assert source == "miss"
    assert (doc["found"], doc["status"], doc["modules"]) == (True, "active", ["reports"])
    assert await _doc(b, "cus_1") == ("hit", doc)
    not_found: dict[str, Any] = {"found": False, "status": None, "modules": [], "config": {}}
    assert await _doc(a, "nobody") == ("miss", not_found)
    assert await _doc(b, "nobody") == ("hit", not_found)
    assert emulator.count("get_entitlements", tenant) == 2


async def _webhook_fans_out(a: Sidecar, b: Sidecar, emulator: Emulator, tenant: str) -> None:
    """The emulator pushes a signed event to A only; B drops its in-process copy too."""
    assert a.webhooks is not None
    emulator.set_entitlements(tenant, "cus_2", DOC)
    assert (await _doc(a, "cus_2"))[0] == "miss"
    assert (await _doc(b, "cus_2"))[0] == "hit"
    assert (await _doc(b, "cus_2"))[0] == "hit", "B now answers from its own memory"
    emulator.webhook_url = str(a.webhooks.make_url("/webhooks/vellum"))
    emulator.webhook_secret = WEBHOOK_SECRET
    emulator.set_entitlements(tenant, "cus_2", UPGRADED)
    await emulator.wait_pushes_idle()
    assert emulator.pushes[-1].delivered, emulator.pushes[-1]

    async def b_sees_upgrade() -> bool:
        return "exports" in (await _doc(b, "cus_2"))[1]["modules"]

    await eventually(b_sees_upgrade, timeout=10)
    assert (await _doc(a, "cus_2"))[1]["modules"] == ["reports", "exports"]
    emulator.webhook_url = None  # later changes in the test push nothing


async def _tenant_drop_fans_out(a: Sidecar, b: Sidecar, emulator: Emulator, tenant: str) -> None:
    emulator.set_entitlements(tenant, "cus_3", DOC)
    await _doc(a, "cus_3")
    assert (await _doc(b, "cus_3"))[0] == "hit"
    emulator.set_entitlements(tenant, "cus_3", UPGRADED)
    assert (await a.client.delete("/v1/cache")).status == 204

    async def b_sees_upgrade() -> bool:
        return "exports" in (await _doc(b, "cus_3"))[1]["modules"]

    await eventually(b_sees_upgrade, timeout=10)


async def _usage_delivered(a: Sidecar, b: Sidecar, emulator: Emulator, tenant: str) -> None:
    """Metered usage queued through both sidecars is delivered once each, in order."""
    emulator.seed_demo(tenant)
    lanes = [("cus_active", "api-calls"), ("cus_trial", "exports")]
    for customer, credit_type in lanes:
        emulator.set_credits(tenant, customer, credit_type, 1000)
    keys = []
    for i in range(20):
        customer, credit_type = lanes[i % 2]
        keys.append(f"use_{tenant}_{i}")
        resp = await (a, b)[i % 2].client.post(
            f"/v1/customers/{customer}/credits/{credit_type}/consume",
            json={"amount": 2, "idempotencyKey": keys[-1]},
            headers={"Prefer": "respond-async"},
        )
        assert resp.status == 202, await resp.text()

    async def delivered() -> bool:
        for key in keys:
            resp = await b.client.get(f"/v1/usage/{key}")
            if (await resp.json())["state"] != "delivered":
                return False
        return True

    await eventually(delivered, timeout=20)
    for customer, credit_type in lanes:
        assert emulator.credits_of(tenant, customer)[credit_type] == 1000 - 20
    applied = [r.body["idempotencyKey"] for r in emulator.requests
               if r.operation == "consume_credits"]  # fmt: skip
    assert sorted(applied) == sorted(keys), "each sent once"
    for customer, _ in lanes:
        seen = [r for r in emulator.requests if r.operation == "consume_credits"]
        lane = [r.body["idempotencyKey"] for r in seen if r.params["customer"] == customer]
        assert lane == [k for i, k in enumerate(keys) if lanes[i % 2][0] == customer]


# -- TLS and unix sockets --------------------------------------------------------------------


async def _two_share_reads_and_fanout(
    url: str, make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    a = await make_sidecar(url, SIDECAR_MEMORY_TTL=LONG_MEMORY)
    b = await make_sidecar(url, SIDECAR_MEMORY_TTL=LONG_MEMORY)
    await _shares_reads(a, b, emulator, tenant)
    await _webhook_fans_out(a, b, emulator, tenant)


async def _redis_down_at_start(
    bare_sidecar: BareFactory, emulator: Emulator, tenant: str, **env: str
) -> TestClient[Any, Any]:
    """A sidecar whose Redis cannot be used from the start still answers (a miss), stays
    ready and says Redis is down; its ops client."""
    client, ops = await bare_sidecar(**env)
    emulator.set_entitlements(tenant, "cus_1", DOC)
    resp = await client.get("/v1/customers/cus_1/entitlements")
    assert (resp.status, resp.headers["X-Sidecar-Cache"]) == (200, "miss")
    ready = await ops.get("/readyz")
    assert ready.status == 200
    assert (await ready.json())["redis"] == "down"
    return ops


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server that speaks only TLS, with a throwaway CA."""
    workdir = tmp_path_factory.mktemp("tls")
    with RedisServer(workdir, tls=make_tls_files(workdir)) as server:
        yield server


async def test_tls_reads_and_fanout(
    tls_redis: RedisServer, make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    assert tls_redis.tls is not None
    url = f"rediss://127.0.0.1:{tls_redis.port}/0?ssl_ca_certs={tls_redis.tls.ca}"
    assert url == tls_redis.url
    await _two_share_reads_and_fanout(url, make_sidecar, emulator, tenant)


async def test_tls_refuses_an_unknown_ca(
    tls_redis: RedisServer, bare_sidecar: BareFactory, emulator: Emulator, tenant: str
) -> None:
    """Verification is on by default: a server cert no CA vouches for counts as Redis down."""
    url = f"rediss://127.0.0.1:{tls_redis.port}/0"
    await _redis_down_at_start(bare_sidecar, emulator, tenant, SIDECAR_REDIS_URL=url)


@pytest.fixture
def unix_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server listening on a unix socket only."""
    with RedisServer(tmp_path, unix_socket=tmp_path / "redis.sock") as server:
        yield server


async def test_unix_socket_reads_and_fanout(
    unix_redis: RedisServer, make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    url = f"unix://{unix_redis.unix_socket}?db=0"
    assert url == unix_redis.url
    await _two_share_reads_and_fanout(url, make_sidecar, emulator, tenant)
    with redis.Redis(unix_socket_path=str(unix_redis.unix_socket)) as client:
        assert client.exists(Keys(tenant).entry("cus_1")) == 1


@pytest.fixture
def password_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server with ``requirepass``; the password needs quoting in a URL."""
    with RedisServer(tmp_path, password="s3cret@/pw") as server:
        yield server


async def test_password_reads_and_fanout(
    password_redis: RedisServer, make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    url = password_redis.url
    assert url == f"redis://:s3cret%40%2Fpw@127.0.0.1:{password_redis.port}/0"
    anonymous = redis.Redis(port=password_redis.port)
    with anonymous, pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    await _two_share_reads_and_fanout(url, make_sidecar, emulator, tenant)


async def test_wrong_password_is_redis_down_and_never_shown(
    password_redis: RedisServer, bare_sidecar: BareFactory, emulator: Emulator, tenant: str
) -> None:
    url = f"redis://:not-the-pw@127.0.0.1:{password_redis.port}/0"
    ops = await _redis_down_at_start(bare_sidecar, emulator, tenant, SIDECAR_REDIS_URL=url)
    for path in ("/readyz", "/metrics"):
        shown = await (await ops.get(path)).text()
        assert "not-the-pw" not in shown and "s3cret" not in shown


# -- Redis Cluster ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterSetup]:
    setup = ClusterSetup(tmp_path_factory.mktemp("cluster"))
    try:
        setup.start()
        yield setup
    finally:
        setup.stop()


@pytest.fixture
async def cluster_pair(
    cluster: ClusterSetup, make_sidecar: SidecarFactory
) -> tuple[Sidecar, Sidecar]:
    env = {"SIDECAR_REDIS_CLUSTER": "true", "SIDECAR_MEMORY_TTL": LONG_MEMORY}
    return await make_sidecar(cluster.url, **env), await make_sidecar(cluster.url, **env)


async def test_cluster_reads_are_shared_and_stay_on_the_tenants_shard(
    cluster: ClusterSetup,
    cluster_pair: tuple[Sidecar, Sidecar],
    emulator: Emulator,
    tenant: str,
) -> None:
    a, b = cluster_pair
    assert (conn := a.app[REDIS]) is not None and conn.cluster
    await _shares_reads(a, b, emulator, tenant)
    keys = Keys(tenant)
    home = cluster.node_of(keys.channel)
    stored = cluster.keys_on(home, keys.prefix + "*")
    assert keys.entry("cus_1").encode() in stored
    assert keys.entry("nobody").encode() in stored
    for port in cluster.ports:
        if port != home:
            assert cluster.keys_on(port, keys.prefix + "*") == [], "a tenant lives on one shard"
    ready = await (await a.ops.get("/readyz")).json()
    assert (ready["redis"], ready["fanout"]) == ("ok", "ok")


async def test_cluster_webhook_fans_out_over_sharded_pubsub(
    cluster: ClusterSetup,
    cluster_pair: tuple[Sidecar, Sidecar],
    emulator: Emulator,
    tenant: str,
) -> None:
    a, b = cluster_pair
    home = cluster.node_of(Keys(tenant).channel)
    # Both listeners hold a shard subscription on the tenant's node, none on classic pub/sub.
    [(_, subscribers)] = redis.Redis(port=home).pubsub_shardnumsub(Keys(tenant).channel)
    assert int(subscribers) == 2
    await _webhook_fans_out(a, b, emulator, tenant)
    await _tenant_drop_fans_out(a, b, emulator, tenant)
    # A drop expires, it never destroys: both entries are still on the tenant's node
    # (cus_2's as the stale fallback, cus_3's fetched again by B since), and so are the
    # epoch and the drop sequence the scripts keep beside them.
    keys = Keys(tenant)
    assert sorted(cluster.keys_on(home, keys.entry_pattern)) == [
        keys.entry("cus_2").encode(),
        keys.entry("cus_3").encode(),
    ]
    assert cluster.keys_on(home, keys.epoch) == [keys.epoch.encode()]
    assert cluster.keys_on(home, keys.seq) == [keys.seq.encode()]


async def test_cluster_usage_is_queued_and_delivered_on_the_tenants_shard(
    cluster: ClusterSetup,
    cluster_pair: tuple[Sidecar, Sidecar],
    emulator: Emulator,
    tenant: str,
) -> None:
    a, b = cluster_pair
    await _usage_delivered(a, b, emulator, tenant)
    keys = Keys(tenant)
    home = cluster.node_of(keys.channel)
    assert cluster.keys_on(home, keys.prefix + "u:*"), "the queue lives beside the cache"
    for port in cluster.ports:
        if port != home:
            assert cluster.keys_on(port, keys.prefix + "*") == [], "a tenant lives on one shard"


# -- Redis Sentinel --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSetup]:
    setup = SentinelSetup(tmp_path_factory.mktemp("sentinel"))
    try:
        setup.start()
        yield setup
    finally:
        setup.stop()


async def test_sentinel_reads_and_fanout(
    sentinel: SentinelSetup, make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    a = await make_sidecar(sentinel.url, SIDECAR_MEMORY_TTL=LONG_MEMORY)
    b = await make_sidecar(sentinel.url, SIDECAR_MEMORY_TTL=LONG_MEMORY)
    await _shares_reads(a, b, emulator, tenant)
    master = redis.Redis(port=sentinel.master_port())
    assert master.exists(Keys(tenant).entry("cus_1")) == 1, "the entry lives on the master"
    await _webhook_fans_out(a, b, emulator, tenant)
    await _usage_delivered(a, b, emulator, tenant)


async def test_sentinel_failover_reads_continue(
    sentinel: SentinelSetup, make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    """Kill the master: reads keep answering 200 throughout; Redis sharing and fan-out
    resume on the promoted replica without a restart."""
    # A checks Redis on every read (no in-process answers), so the outage is felt at once.
    a = await make_sidecar(sentinel.url, SIDECAR_MEMORY_TTL="0")
    b = await make_sidecar(sentinel.url, SIDECAR_MEMORY_TTL=LONG_MEMORY)
    customers = [f"cus_f{i}" for i in range(5)]
    for customer in customers:
        emulator.set_entitlements(tenant, customer, DOC)
        assert (await _doc(a, customer))[0] == "miss"
    sentinel.wait_replicated()
    old_master = sentinel.master_port()

    statuses: dict[int, int] = {}
    stop = asyncio.Event()

    async def read_loop() -> None:
        i = 0
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline:
            c = customers[i % len(customers)]
            resp = await a.client.get(f"/v1/customers/{c}/can/reports")
            statuses[resp.status] = statuses.get(resp.status, 0) + 1
            if resp.status == 200:
                assert (await resp.json())["allowed"] is True
            i += 1
            await asyncio.sleep(0.01)  # pacing for a bounded loop, not a wait for state

    reader = asyncio.get_running_loop().create_task(read_loop())
    killed_at = time.monotonic()
    sentinel.kill_master()

    async def a_saw_outage() -> bool:
        return (conn := a.app[REDIS]) is not None and conn.state == "down"

    await eventually(a_saw_outage, timeout=10)

    async def promoted() -> bool:
        try:
            return sentinel.master_port() != old_master
        except redis.RedisError:
            return False

    await eventually(promoted, timeout=30, interval=0.05)
    promoted_at = time.monotonic()

    async def recovered() -> bool:
        for sc in (a, b):
            body = await (await sc.ops.get("/readyz")).json()
            if (body["redis"], body["fanout"]) != ("ok", "ok"):
                return False
        return True

    await eventually(recovered, timeout=30, interval=0.05)
    recovered_at = time.monotonic()
    stop.set()
    await reader
    print(
        f"\nsentinel failover: promoted {promoted_at - killed_at:.2f}s after the kill, "
        f"sidecars back on Redis {recovered_at - killed_at:.2f}s after it; "
        f"reads during it: {statuses}"
    )
    assert set(statuses) == {200}, statuses
    assert statuses[200] >= 20

    # The promoted replica may lag behind the old master (a drop acknowledged just
    # before the kill may be missing from it), so the fleet renewed the epoch, once for
    # both sidecars, and revalidates each customer once for the whole fleet; the
    # replica's entries are the fallback meanwhile.
    # (Sentinel also disconnects the clients of the replica it promotes, which may
    # count as a second outage for a sidecar that had reconnected already.)
    async def settled() -> bool:
        renewals = sum(sc.total("vellum_sidecar_epoch_renewals_total") for sc in (a, b))
        epochs = {sc.app[INVALIDATOR].epoch for sc in (a, b)}
        trusted = all(sc.app[CACHES].tier.trusted for sc in (a, b))
        return renewals >= 1 and trusted and len(epochs) == 1

    await eventually(settled, timeout=10)
    fetches = emulator.count("get_entitlements", tenant)
    c = await make_sidecar(sentinel.url)
    for customer in customers:
        for sc in (c, a, b):
            assert (await _doc(sc, customer))[1]["modules"] == DOC["modules"]
    assert emulator.count("get_entitlements", tenant) - fetches <= len(customers)
    fetches = emulator.count("get_entitlements", tenant)
    for customer in customers:
        assert (await _doc(c, customer))[0] == "hit"
    assert emulator.count("get_entitlements", tenant) == fetches
    # And fan-out works through the new master.
    await _webhook_fans_out(a, b, emulator, tenant)


@pytest.mark.parametrize(
    "env",
    [
        {"SIDECAR_REDIS_URL": "redis+sentinel://127.0.0.1:{port}/mymaster"},
        {"SIDECAR_REDIS_URL": "redis://127.0.0.1:{port}", "SIDECAR_REDIS_CLUSTER": "true"},
    ],
    ids=["sentinel", "cluster"],
)
async def test_unreachable_topology_at_start_is_redis_down_not_a_crash(
    env: dict[str, str], bare_sidecar: BareFactory, emulator: Emulator, tenant: str
) -> None:
    port = free_port()
    env = {k: v.format(port=port) for k, v in env.items()}
    await _redis_down_at_start(bare_sidecar, emulator, tenant, **env)


async def test_sentinel_pool_waits_for_a_free_connection(
    sentinel: SentinelSetup, make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    """A burst bigger than SIDECAR_REDIS_POOL_SIZE waits for connections (the blocking
    pool), so it is answered from Redis and never mistaken for Redis being down."""
    sc = await make_sidecar(sentinel.url, SIDECAR_REDIS_POOL_SIZE="2")
    checks = [{"customerId": f"cus_b{i}", "module": "reports"} for i in range(40)]
    for check in checks:
        emulator.set_entitlements(tenant, check["customerId"], DOC)
    resp = await sc.client.post("/v1/check", json={"checks": checks})
    assert resp.status == 200
    assert all(r["allowed"] for r in (await resp.json())["results"])
    assert (conn := sc.app[REDIS]) is not None and conn.state == "ok"
    assert "vellum_sidecar_redis_errors_total{" not in sc.metrics.render().decode()


async def test_cluster_burst_waits_for_a_pooled_connection(
    cluster: ClusterSetup, make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    """redis-py's cluster client fails at once when a node's pool is busy; the sidecar
    makes a burst wait for a connection instead, so every lookup still uses Redis."""
    env = {"SIDECAR_REDIS_CLUSTER": "true", "SIDECAR_REDIS_POOL_SIZE": "2"}
    sc = await make_sidecar(cluster.url, **env)
    checks = [{"customerId": f"cus_b{i}", "module": "reports"} for i in range(40)]
    for check in checks:
        emulator.set_entitlements(tenant, check["customerId"], DOC)
    resp = await sc.client.post("/v1/check", json={"checks": checks})
    assert resp.status == 200
    assert all(r["allowed"] for r in (await resp.json())["results"])
    other = await make_sidecar(cluster.url, **env)
    resp = await other.client.post("/v1/check", json={"checks": checks})
    assert all(r["allowed"] for r in (await resp.json())["results"])
    assert emulator.count("get_entitlements", tenant) == len(checks), "all 40 stored in Redis"
    assert (conn := sc.app[REDIS]) is not None and conn.state == "ok"
    ready = await (await sc.ops.get("/readyz")).json()
    assert ready["redis"] == "ok"
    assert "vellum_sidecar_redis_errors_total{" not in sc.metrics.render().decode()
