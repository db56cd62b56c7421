"""Pushes across a fleet sharing one Redis: today's event ids, deduplication on every
sidecar, what an event drops (scope and axes), and Redis down, hung, restarted or
away long enough to overflow the queue."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from sidecar.appkeys import REDIS
from sidecar.cache.entry import DROPPED
from sidecar.cache.invalidation import QUEUE_LIMIT
from sidecar.cache.kinds import AXES as AXIS_ORDER
from sidecar.cache.kinds import Axis
from sidecar.emulator import Emulator
from sidecar.http.webhooks import Target, classify, event_key
from sidecar.redis.keys import Keys
from sidecar.signature import sign

from .conftest import Sidecar, SidecarFactory, eventually
from .harness import WEBHOOK_SECRET, RedisServer
from .test_webhooks import NEW, OLD, push, source_of, webhook_count


def today(tenant: str, **fields: Any) -> dict[str, Any]:
    """An event as the upstream sends it today: ``eventId``, no ``id``."""
    return {"eventId": "evt_" + uuid.uuid4().hex, "type": "entitlements.updated",
            "tenantId": tenant, **fields}  # fmt: skip


def signed(payload: dict[str, Any], at: int | None = None) -> tuple[bytes, str]:
    body = orjson.dumps(payload)
    return body, sign(WEBHOOK_SECRET, body, at if at is not None else int(time.time()))


def sample(sc: Sidecar, name: str, labels: dict[str, str] | None = None) -> float:
    return sc.metrics.registry.get_sample_value(name, labels or {}) or 0.0


async def all_answer(fleet: list[Sidecar], customer: str, allowed: bool) -> bool:
    answers = await asyncio.gather(*(source_of(sc, customer) for sc in fleet))
    return all(a == allowed for _, a in answers)


@contextmanager
def hung(server: RedisServer) -> Iterator[None]:
    """Redis SIGSTOPped: it accepts connections and answers nothing."""
    server.pause()
    try:
        yield
    finally:
        server.resume()


@asynccontextmanager
async def listening(url: str, tenant: str) -> AsyncIterator[list[dict[str, Any]]]:
    """Every fan-out message published for ``tenant`` while inside."""
    client = aioredis.Redis.from_url(url)
    pubsub = client.pubsub()
    await pubsub.subscribe(Keys(tenant).channel)
    messages: list[dict[str, Any]] = []

    async def collect() -> None:
        async for msg in pubsub.listen():
            if msg["type"] == "message":
                messages.append(orjson.loads(msg["data"]))

    task = asyncio.create_task(collect())
    try:
        yield messages
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await client.aclose()


# -- deduplication -----------------------------------------------------------------


async def test_event_id_without_id_invalidates_everywhere_and_its_retry_is_a_duplicate(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str, redis_url: str
) -> None:
    emulator.set_entitlements(tenant, "cus_1", OLD)
    fleet = [await make_sidecar(redis_url) for _ in range(3)]
    for sc in fleet:
        await source_of(sc, "cus_1")
        assert await source_of(sc, "cus_1") == ("hit", False)
    emulator.set_entitlements(tenant, "cus_1", NEW)
    payload = today(tenant, customerId="cus_1", accountId="acct_1")
    body, header = signed(payload)
    assert await push(fleet[0], body, header=header) == (200, {"ok": True})
    await eventually(lambda: all_answer(fleet, "cus_1", True), timeout=5)
    # The upstream signs each attempt afresh: same body, another timestamp.
    retry_body, retry_header = signed(payload, int(time.time()) + 1)
    for sc in fleet:
        assert await push(sc, retry_body, header=retry_header) == (
            200,
            {"ok": True, "duplicate": True},
        )
        assert (await source_of(sc, "cus_1"))[0] == "hit", "a duplicate drops nothing"
    assert [webhook_count(sc, "duplicate") for sc in fleet] == [1, 1, 1]


async def test_event_without_ids_is_deduplicated_by_its_signed_payload(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str, redis_url: str
) -> None:
    emulator.set_entitlements(tenant, "cus_1", OLD)
    a = await make_sidecar(redis_url)
    b = await make_sidecar(redis_url)
    payload = {"type": "entitlements.updated", "tenantId": tenant, "customerId": "cus_1"}
    body, header = signed(payload)
    assert await push(a, body, header=header) == (200, {"ok": True})
    await source_of(b, "cus_1")
    for sc in (a, b):
        assert await push(sc, body, header=header) == (200, {"ok": True, "duplicate": True})
    assert (await source_of(b, "cus_1"))[0] == "hit"
    # The same body signed at another time is another delivery: applied again
    # (an invalidation applied twice is harmless, one never applied is not).
    _, later = signed(payload, int(time.time()) - 5)
    assert await push(b, body, header=later) == (200, {"ok": True})
    assert (await source_of(b, "cus_1"))[0] == "miss"


def test_event_key_prefers_event_id_then_id_then_the_signed_payload() -> None:
    body = b"{}"
    assert event_key({"eventId": "e1", "id": "i1"}, body, 1) == "eventId:e1"
    assert event_key({"eventId": "", "id": "i1"}, body, 1) == "id:i1"
    assert event_key({"id": 42}, body, 1) == "id:42"
    digest = event_key({}, body, 1)
    assert digest.startswith("sha256:")
    assert event_key({"id": True, "eventId": None}, body, 1) == digest
    assert event_key({}, body, 2) != digest, "the timestamp is part of what was signed"
    assert event_key({}, b"{ }", 1) != digest
    long = event_key({"eventId": "x" * 10_000}, body, 1)
    assert long.startswith("eventId:sha256:") and len(long) < 100


# -- what an event drops ---------------------------------------------------------------

E: frozenset[Axis] = frozenset({"entitlements"})
F: frozenset[Axis] = frozenset({"flags"})
AXES = frozenset(AXIS_ORDER)


@pytest.mark.parametrize(
    ("event", "target"),
    [
        ({"type": "entitlements.updated", "customerId": "c", "accountId": "a"},
         Target("customer", "c", "a", E)),
        ({"type": "payment.succeeded", "customerId": "c", "seats": 3, "invoice": {}},
         Target("customer", "c", None, E)),
        ({"type": "payment.failed", "accountId": "a"}, Target("account", None, "a", E)),
        ({"type": "subscription.canceled", "customerId": "c"}, Target("customer", "c", None, E)),
        ({"type": "checkout.completed", "customerId": "c"}, Target("customer", "c", None, E)),
        ({"type": "payment_method.attached", "accountId": "a"}, Target("account", None, "a", E)),
        ({"type": "Customer.Updated", "customerId": "c"}, Target("customer", "c", None, E)),
        ({"type": "account.status_changed"}, Target("tenant", None, None, E)),
        ({"type": "plan.updated"}, Target("tenant", None, None, E)),
        ({"type": "flags.updated", "customerId": "c", "accountId": "a"},
         Target("customer", "c", "a", F)),
        ({"type": "flags.updated"}, Target("tenant", None, None, F)),
        ({"type": "flag_override.deleted", "customerId": "c"}, Target("customer", "c", None, F)),
        # Unknown types: both axes, the widest scope named.
        ({"type": "widget.changed", "customerId": "c", "accountId": "a"},
         Target("account", "c", "a", AXES)),
        ({"type": "widget.changed", "customerId": "c"}, Target("customer", "c", None, AXES)),
        ({"type": "credits.granted"}, Target("tenant", None, None, AXES)),
        ({"customerId": "c"}, Target("customer", "c", None, AXES)),
        ({"type": 7, "customerId": 12, "accountId": ""}, Target("tenant", None, None, AXES)),
    ],
)  # fmt: skip
def test_classify(event: dict[str, Any], target: Target) -> None:
    assert classify(event) == target


async def test_axes_travel_in_the_fanout_message(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str, redis_url: str
) -> None:
    emulator.set_entitlements(tenant, "cus_1", OLD)
    a = await make_sidecar(redis_url)
    b = await make_sidecar(redis_url)
    await source_of(b, "cus_1")
    async with listening(redis_url, tenant) as messages:
        pushes = [
            today(tenant, type="flags.updated", customerId="cus_1"),
            today(tenant, type="payment.succeeded", customerId="cus_1", seats=2, invoice={}),
            today(tenant, type="widget.changed"),
        ]
        for payload in pushes:
            assert await push(a, payload) == (200, {"ok": True})

        async def three() -> bool:
            return len(messages) == 3

        await eventually(three, timeout=5)
    assert [(m["scope"], m["axes"]) for m in messages] == [
        ("customer", ["flags"]),
        ("customer", ["entitlements"]),
        ("tenant", ["entitlements", "flags"]),
    ]


async def test_flags_event_leaves_entitlements_cached(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str, redis_url: str
) -> None:
    emulator.set_entitlements(tenant, "cus_1", OLD)
    a = await make_sidecar(redis_url)
    b = await make_sidecar(redis_url)
    for sc in (a, b):
        await source_of(sc, "cus_1")
    assert (await push(a, today(tenant, type="flags.updated", customerId="cus_1")))[0] == 200
    assert (await push(a, today(tenant, type="flags.updated")))[0] == 200
    for sc in (a, b):
        assert (await source_of(sc, "cus_1"))[0] == "hit"


async def test_unknown_type_drops_the_widest_scope_it_names(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str, redis_url: str
) -> None:
    emulator.set_entitlements(tenant, "cus_1", OLD)
    emulator.set_entitlements(tenant, "cus_2", OLD)  # also acct_1
    emulator.set_entitlements(tenant, "cus_3", {**OLD, "accountId": "acct_3"})
    a = await make_sidecar(redis_url)
    b = await make_sidecar(redis_url)
    for c in ("cus_1", "cus_2", "cus_3"):
        await source_of(b, c)
    known = today(tenant, customerId="cus_1", accountId="acct_1")
    assert await push(a, known) == (200, {"ok": True})

    async def dropped(customer: str) -> bool:
        return (await source_of(b, customer))[0] == "miss"

    await eventually(lambda: dropped("cus_1"), timeout=5)
    assert (await source_of(b, "cus_2"))[0] == "hit", "a known type drops the customer only"
    unknown = today(tenant, type="widget.changed", customerId="cus_1", accountId="acct_1")
    assert await push(a, unknown) == (200, {"ok": True})
    await eventually(lambda: dropped("cus_2"), timeout=5)
    assert (await source_of(b, "cus_3"))[0] == "hit", "another account stays"


# -- Redis down, hung, restarted -------------------------------------------------------


async def test_push_and_drops_while_redis_is_down_are_queued_then_applied(
    make_sidecar: SidecarFactory, own_redis: RedisServer, emulator: Emulator, tenant: str
) -> None:
    """Redis stopped: a push and the cache drops are 200 (applied here, queued); once
    Redis is back the queue reaches the other sidecar, and the push's retry is a
    duplicate everywhere (its key was written to Redis)."""
    emulator.set_entitlements(tenant, "cus_1", OLD)
    emulator.set_entitlements(tenant, "cus_2", OLD)
    a = await make_sidecar(own_redis.url)
    b = await make_sidecar(own_redis.url)
    await source_of(b, "cus_1")
    own_redis.kill()
    emulator.set_entitlements(tenant, "cus_1", NEW)
    payload = today(tenant, customerId="cus_1")
    body, header = signed(payload)
    assert await push(a, body, header=header) == (200, {"ok": True, "queued": True})
    assert await source_of(a, "cus_1") == ("miss", True), "applied here at once"
    assert await push(a, body, header=header) == (200, {"ok": True, "duplicate": True})
    drop = await a.client.delete("/v1/customers/cus_2/cache")
    assert (drop.status, await drop.json()) == (200, {"ok": True, "queued": True})
    assert sample(a, "vellum_sidecar_invalidations_queued") == 2
    drop_all = await a.client.delete("/v1/cache")
    assert (drop_all.status, await drop_all.json()) == (200, {"ok": True, "queued": True})
    assert sample(a, "vellum_sidecar_invalidations_queued") == 1, "the tenant covers both"
    own_redis.start()
    conn = a.app[REDIS]
    assert conn is not None

    async def drained() -> bool:
        return a.invalidator.queued == 0 and conn.state == "ok"

    await eventually(drained, timeout=10)
    # The queue is swapped out before it is applied: wait for that drain to end.
    await a.invalidator.drained()
    await eventually(lambda: all_answer([a, b], "cus_1", True), timeout=5)
    assert sample(a, "vellum_sidecar_invalidations_queue_applied_total") == 1
    assert sample(a, "vellum_sidecar_invalidations_queued") == 0
    assert webhook_count(a, "queued") == 1
    _, retry = signed(payload, int(time.time()) + 1)

    async def shared() -> bool:
        return (await push(b, body, header=retry)) == (200, {"ok": True, "duplicate": True})

    # The key is written right after the queue is applied (same reconnect).
    await eventually(shared, timeout=5)
    assert webhook_count(b, "ok") == 0
    # And Redis is used normally again.
    assert (await a.client.delete("/v1/customers/cus_2/cache")).status == 204


#: The fan-out heartbeat's bound (a PING every 0.25 s, a PONG later than 0.25 s with a
#: 0.2 s Redis timeout counts as lost), with room for a loaded machine.
HANG_NOTICED = 1.0


async def test_push_during_a_redis_hang_reaches_every_sidecar_within_a_second(
    make_sidecar: SidecarFactory,
    own_redis: RedisServer,
    emulator: Emulator,
    tenant: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    emulator.set_entitlements(tenant, "cus_1", OLD)
    fleet = [await make_sidecar(own_redis.url, SIDECAR_REDIS_TIMEOUT="0.2") for _ in range(3)]
    a = fleet[0]
    for sc in fleet:
        await source_of(sc, "cus_1")
    with hung(own_redis):
        emulator.set_entitlements(tenant, "cus_1", NEW)
        payload = today(tenant, customerId="cus_1")
        started = time.monotonic()
        assert await push(a, payload) == (200, {"ok": True, "queued": True})
        answered_in = time.monotonic() - started
        assert answered_in < 1.0, "one Redis timeout, not one per command"
        assert await source_of(a, "cus_1") == ("miss", True)
        # The hang lasts 2 s (the probe's backoff reaches its cap), reads go on meanwhile.
        # The push cannot reach the others through the hung Redis, but their fan-out
        # heartbeat notices the hang (a PONG later than 0.25 s): their in-process
        # layer expires and reads go past the hung Redis to the upstream, which has
        # the change. Before that, memory answers the old document alone.
        while time.monotonic() < started + 2:
            assert (await source_of(a, "cus_1"))[1] is True
            for sc in fleet[1:]:
                source, allowed_new = await source_of(sc, "cus_1")
                if time.monotonic() > started + HANG_NOTICED:
                    assert allowed_new is True, "the hang was noticed: memory expired"
                else:  # the old document from memory, or the new one once noticed
                    assert source in ("hit", "miss"), source
        resumed = time.monotonic()

    async def applied() -> bool:
        # The queued drop reached Redis and the fan-out, and every sidecar answers new.
        queued = sample(a, "vellum_sidecar_invalidations_queue_applied_total") == 1
        return queued and await all_answer(fleet, "cus_1", True)

    await eventually(applied, timeout=5, interval=0.005)
    took = time.monotonic() - resumed
    with capsys.disabled():
        print(f"\n[hang] push answered in {answered_in:.3f}s; every sidecar new {took:.3f}s "
              "after SIGCONT")  # fmt: skip
    assert took < 1.0
    assert sample(a, "vellum_sidecar_invalidations_queue_applied_total") == 1


async def test_first_push_after_a_redis_restart_is_applied_everywhere(
    make_sidecar: SidecarFactory, own_redis: RedisServer, emulator: Emulator, tenant: str
) -> None:
    """The stale pooled connection is retried once on a fresh one: no down, no queue."""
    customers = [f"cus_{i}" for i in range(8)]
    for c in customers:
        emulator.set_entitlements(tenant, c, OLD)
    fleet = [await make_sidecar(own_redis.url) for _ in range(3)]
    a = fleet[0]
    # Several pooled connections on a, all idle when Redis restarts.
    await asyncio.gather(*(source_of(a, c) for c in customers))
    for sc in fleet[1:]:
        await source_of(sc, "cus_0")
    own_redis.restart()

    async def resubscribed() -> bool:
        for sc in fleet:
            state = await (await sc.ops.get("/readyz")).json()
            if state["fanout"] != "ok":
                return False
        return True

    await eventually(resubscribed, timeout=15)
    emulator.set_entitlements(tenant, "cus_0", NEW)
    payload = today(tenant, customerId="cus_0")
    assert await push(a, payload) == (200, {"ok": True})
    await eventually(lambda: all_answer(fleet, "cus_0", True), timeout=1)
    # The first command on a stale pooled connection was retried once on a fresh one:
    # the push's own replay check, or the health check (every 0.25 s) or the epoch
    # renewal when they got there first. Either way no command failed and Redis was
    # never marked down.
    assert a.total("vellum_sidecar_redis_retries_total") >= 1
    assert a.total("vellum_sidecar_redis_errors_total") == 0
    assert sample(a, "vellum_sidecar_redis_state", {"state": "ok"}) == 1
    assert webhook_count(a, "queued") == 0
    body, header = signed(payload, int(time.time()) + 1)
    assert await push(fleet[2], body, header=header) == (200, {"ok": True, "duplicate": True})


async def test_dead_redis_is_still_detected_at_once(
    make_sidecar: SidecarFactory, own_redis: RedisServer, emulator: Emulator, tenant: str
) -> None:
    """The one retry meets a refused connection: marked down within the request."""
    emulator.set_entitlements(tenant, "cus_1", OLD)
    sc = await make_sidecar(own_redis.url)
    await source_of(sc, "cus_1")
    own_redis.kill()
    started = time.monotonic()
    assert await push(sc, today(tenant, customerId="cus_1")) == (
        200,
        {"ok": True, "queued": True},
    )
    assert time.monotonic() - started < 0.5
    conn = sc.app[REDIS]
    assert conn is not None
    assert conn.state == "down"
    assert sample(sc, "vellum_sidecar_redis_errors_total", {"operation": "replay_check"}) == 1


async def test_account_event_during_a_hang_is_resolved_with_what_redis_knows(
    make_sidecar: SidecarFactory, own_redis: RedisServer, emulator: Emulator, tenant: str
) -> None:
    """a knows nothing of acct_1 (b learnt it, into Redis): while Redis hangs a drops
    everything it holds, and once Redis answers the account's customers are dropped
    everywhere, and only them."""
    emulator.set_entitlements(tenant, "cus_1", OLD)
    emulator.set_entitlements(tenant, "cus_3", {**OLD, "accountId": "acct_3"})
    a = await make_sidecar(own_redis.url, SIDECAR_REDIS_TIMEOUT="0.2")
    b = await make_sidecar(own_redis.url, SIDECAR_REDIS_TIMEOUT="0.2")
    for c in ("cus_1", "cus_3"):
        await source_of(b, c)
    await source_of(a, "cus_3")
    with hung(own_redis):
        event = today(tenant, type="payment.failed", accountId="acct_1", seats=1, invoice={})
        assert await push(a, event) == (200, {"ok": True, "queued": True})
        assert a.invalidator.queued == 1
        assert await source_of(a, "cus_3") == ("miss", False), "a dropped all it held"

    async def b_dropped_cus_1() -> bool:
        return (await source_of(b, "cus_1"))[0] == "miss"

    await eventually(b_dropped_cus_1, timeout=5)
    await a.invalidator.drained()
    # Another account is not dropped. (A hang long enough for a to queue the drop may
    # also have renewed the epoch, which revalidates everything once: a precaution,
    # docs/operations.md "Drops and staleness", not a drop.)
    assert b.cache.memory.data["cus_3"].expired != DROPPED, "another account stays"
    if b.total("vellum_sidecar_epoch_changes_total") == 0:
        assert (await source_of(b, "cus_3"))[0] == "hit"
    assert sample(a, "vellum_sidecar_invalidations_queue_applied_total") == 1


async def test_queue_overflow_collapses_into_a_tenant_wide_drop(
    make_sidecar: SidecarFactory, own_redis: RedisServer, emulator: Emulator, tenant: str
) -> None:
    """b keeps answering from memory through the hang (its heartbeat is too slow to
    notice it), so what drops cus_x there afterwards is a's tenant-wide drop."""
    emulator.set_entitlements(tenant, "cus_x", OLD)
    a = await make_sidecar(own_redis.url, SIDECAR_REDIS_TIMEOUT="0.2")
    b = await make_sidecar(own_redis.url, SIDECAR_CHECK_INTERVAL="600")
    await source_of(b, "cus_x")
    with hung(own_redis):
        assert await push(a, today(tenant, customerId="cus_1")) == (
            200,
            {"ok": True, "queued": True},
        )
        for i in range(QUEUE_LIMIT - 1):
            assert not await a.invalidator.customers([f"bulk_{i}"], source="api")
        assert sample(a, "vellum_sidecar_invalidations_queued") == QUEUE_LIMIT
        assert sample(a, "vellum_sidecar_invalidations_queue_overflows_total") == 0
        assert await push(a, today(tenant, customerId="cus_2")) == (
            200,
            {"ok": True, "queued": True},
        )
        assert sample(a, "vellum_sidecar_invalidations_queued") == 1
        assert sample(a, "vellum_sidecar_invalidations_queue_overflows_total") == 1
        assert await source_of(b, "cus_x") == ("hit", False)

    async def b_dropped_everything() -> bool:
        return (await source_of(b, "cus_x"))[0] == "miss"

    await eventually(b_dropped_everything, timeout=5)
    await a.invalidator.drained()
    assert sample(a, "vellum_sidecar_invalidations_queued") == 0
    assert sample(a, "vellum_sidecar_invalidations_queue_applied_total") == 1


# -- the emulator's own pushes ---------------------------------------------------------


def deliver_to(emulator: Emulator, sc: Sidecar) -> None:
    assert sc.webhooks is not None
    emulator.webhook_url = str(sc.webhooks.make_url("/webhooks/vellum"))
    emulator.webhook_secret = WEBHOOK_SECRET


async def test_emulator_pushes_reach_the_fleet_and_a_redelivery_is_a_duplicate(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str, redis_url: str
) -> None:
    emulator.set_entitlements(tenant, "cus_1", OLD)
    fleet = [await make_sidecar(redis_url) for _ in range(3)]
    for sc in fleet:
        await source_of(sc, "cus_1")
    deliver_to(emulator, fleet[0])
    emulator.set_entitlements(tenant, "cus_1", NEW)
    await emulator.wait_pushes_idle()
    pushed = emulator.pushes[-1]
    assert "id" not in pushed.event and pushed.event["eventId"].startswith("evt_")
    assert [a.status for a in pushed.attempts] == [200]
    assert orjson.loads(pushed.response_body) == {"ok": True}
    await eventually(lambda: all_answer(fleet, "cus_1", True), timeout=5)
    # The same event again (as a retry would carry it), to another sidecar.
    deliver_to(emulator, fleet[2])
    again = await emulator.deliver(pushed.event)
    assert orjson.loads(again.response_body) == {"ok": True, "duplicate": True}


async def test_emulator_retry_during_a_redis_hang_is_a_duplicate_and_the_event_lands(
    make_sidecar: SidecarFactory,
    own_redis: RedisServer,
    emulator: Emulator,
    tenant: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The upstream gives up on an attempt before the sidecar answers (Redis hangs) and
    retries at once: the retry is a duplicate, the first attempt is still applied (here
    at once, everywhere once Redis answers)."""
    emulator.set_entitlements(tenant, "cus_1", OLD)
    fleet = [await make_sidecar(own_redis.url, SIDECAR_REDIS_TIMEOUT="1") for _ in range(3)]
    a = fleet[0]
    for sc in fleet:
        await source_of(sc, "cus_1")
    deliver_to(emulator, a)
    emulator.push_timeout = 0.3  # gives up before the sidecar's Redis call does
    with hung(own_redis):
        emulator.set_entitlements(tenant, "cus_1", NEW)
        await emulator.wait_pushes_idle()
        pushed = emulator.pushes[-1]
        first, *_, last = pushed.attempts
        assert first.status is None and first.error is not None, "timed out at the sender"
        assert last.status == 200
        assert orjson.loads(last.response_body) == {"ok": True, "duplicate": True}

        async def first_attempt_applied() -> bool:
            return webhook_count(a, "queued") == 1

        await eventually(first_attempt_applied, timeout=5)
        assert await source_of(a, "cus_1") == ("miss", True)
        resumed = time.monotonic()
    await eventually(lambda: all_answer(fleet, "cus_1", True), timeout=5, interval=0.005)
    took = time.monotonic() - resumed
    with capsys.disabled():
        print(f"\n[emulator retry, hang] every sidecar new {took:.3f}s after SIGCONT")
    assert took < 1.0
    assert webhook_count(a, "ok") == 0
