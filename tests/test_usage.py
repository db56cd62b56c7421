"""Metered usage on the local API, in process: sidecars on ``aiohttp_server`` against the
emulator and a real redis-server.

``POST /v1/customers/{c}/credits/{ct}/consume`` with ``Prefer: respond-async`` is 202
once queued and delivered once; the same key is the same record; bad input is a JSON
4xx and queues nothing; without Redis, or with Redis down, nothing is acknowledged;
a shortfall ends ``insufficient`` and a refusal ``rejected``, neither retried; 5xx,
429 and 401 are retried (``Retry-After`` honoured); order holds per customer and
credit type with two sidecars delivering.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from sidecar.appkeys import USAGE
from sidecar.emulator import Emulator
from sidecar.metrics import exposition

from .conftest import Sidecar, SidecarFactory, eventually
from .harness import RedisServer

PREFER = {"Prefer": "respond-async"}
START = 1000


def consume_path(customer: str = "cus_active", credit_type: str = "api-calls") -> str:
    return f"/v1/customers/{customer}/credits/{credit_type}/consume"


def new_key() -> str:
    return "use_" + uuid.uuid4().hex


async def queue(
    client: TestClient[Any, Any],
    key: str,
    amount: int = 5,
    customer: str = "cus_active",
    credit_type: str = "api-calls",
) -> tuple[int, dict[str, Any], dict[str, str]]:
    resp = await client.post(
        consume_path(customer, credit_type),
        json={"amount": amount, "idempotencyKey": key},
        headers=PREFER,
    )
    return resp.status, await resp.json(), dict(resp.headers)


async def outcome(client: TestClient[Any, Any], key: str) -> dict[str, Any]:
    resp = await client.get(f"/v1/usage/{key}")
    assert resp.status == 200, await resp.text()
    body: dict[str, Any] = await resp.json()
    return body


async def final(client: TestClient[Any, Any], key: str, timeout: float = 15) -> dict[str, Any]:
    """The record's outcome once it is final (polled with a deadline)."""
    found: dict[str, Any] = {}

    async def done() -> bool:
        found.update(await outcome(client, key))
        state: str = found["state"]
        return state != "queued"

    await eventually(done, timeout, 0.05)
    return found


def sent(emulator: Emulator, key: str) -> int:
    """Upstream consume requests that carried ``key``."""
    return sum(
        1
        for r in emulator.requests
        if r.operation == "consume_credits" and isinstance(r.body, dict)
        and r.body.get("idempotencyKey") == key
    )  # fmt: skip


@pytest.fixture
def seeded(emulator: Emulator, tenant: str) -> Emulator:
    emulator.seed_demo(tenant)
    for customer in ("cus_active", "cus_trial"):
        for credit_type in ("api-calls", "exports"):
            emulator.set_credits(tenant, customer, credit_type, START)
    return emulator


@pytest.fixture
async def sidecar(make_sidecar: SidecarFactory, redis_url: str, seeded: Emulator) -> Sidecar:
    return await make_sidecar(redis_url, SIDECAR_USAGE_RETRY_MAX="0.5")


async def test_a_record_is_answered_202_once_queued_and_delivered_once(
    sidecar: Sidecar, seeded: Emulator, tenant: str
) -> None:
    key = new_key()
    status, body, headers = await queue(sidecar.client, key, amount=7)
    assert status == 202
    assert body == {"queued": True, "idempotencyKey": key}
    assert headers["Preference-Applied"] == "respond-async"
    assert headers["Location"] == f"/v1/usage/{key}"
    done = await final(sidecar.client, key)
    assert done["state"] == "delivered" and done["status"] == 200
    assert done["answer"]["balance"] == START - 7 and done["answer"]["consumed"] == 7
    assert done["replayed"] is False and done["attempts"] == 1
    assert seeded.credits_of(tenant, "cus_active")["api-calls"] == START - 7
    assert sent(seeded, key) == 1


async def test_the_same_key_again_is_the_same_record_never_a_second_consumption(
    sidecar: Sidecar, seeded: Emulator, tenant: str
) -> None:
    key = new_key()
    seeded.fail("consume_credits", 503, times=None)  # keep it queued for a while
    first = await queue(sidecar.client, key, amount=3)
    again = await queue(sidecar.client, key, amount=3)
    assert first[0] == again[0] == 202 and first[1] == again[1]
    seeded.clear_faults()
    done = await final(sidecar.client, key)
    assert done["state"] == "delivered"
    status, body, headers = await queue(sidecar.client, key, amount=3)
    assert status == 200 and "Preference-Applied" not in headers
    assert body["queued"] is False and body["state"] == "delivered"
    assert body["answer"] == done["answer"]
    assert seeded.credits_of(tenant, "cus_active")["api-calls"] == START - 3
    # Another body for the key: refused, nothing queued.
    resp = await sidecar.client.post(
        consume_path(), json={"amount": 4, "idempotencyKey": key}, headers=PREFER
    )
    assert resp.status == 422
    assert (await resp.json())["error"]["code"] == "idempotency_key_reused"


async def test_a_key_the_upstream_applied_before_is_delivered_as_replayed(
    sidecar: Sidecar, seeded: Emulator, tenant: str
) -> None:
    key = new_key()
    # The synchronous call (no Prefer) first: forwarded now, as before.
    resp = await sidecar.client.post(consume_path(), json={"amount": 2, "idempotencyKey": key})
    assert resp.status == 200 and "Preference-Applied" not in resp.headers
    assert (await sidecar.client.get(f"/v1/usage/{key}")).status == 404
    assert (await queue(sidecar.client, key, amount=2))[0] == 202
    done = await final(sidecar.client, key)
    assert done["state"] == "delivered" and done["replayed"] is True
    assert seeded.credits_of(tenant, "cus_active")["api-calls"] == START - 2


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"amount": 5}, "invalid_body"),
        ({"amount": 5, "idempotencyKey": None}, "invalid_body"),
        ({"idempotencyKey": "k"}, "invalid_body"),
        ({"amount": 0, "idempotencyKey": "k"}, "invalid_body"),
        ({"amount": -3, "idempotencyKey": "k"}, "invalid_body"),
        ({"amount": "5", "idempotencyKey": "k"}, "invalid_body"),
        ({"amount": 1.5, "idempotencyKey": "k"}, "invalid_body"),
        ({"amount": True, "idempotencyKey": "k"}, "invalid_body"),
        ({"amount": 2**53, "idempotencyKey": "k"}, "invalid_body"),
        ({"amount": 5, "idempotencyKey": ""}, "invalid_idempotency_key"),
        ({"amount": 5, "idempotencyKey": 12}, "invalid_idempotency_key"),
        ({"amount": 5, "idempotencyKey": "a/b"}, "invalid_idempotency_key"),
        ({"amount": 5, "idempotencyKey": "a\\b"}, "invalid_idempotency_key"),
        ({"amount": 5, "idempotencyKey": ".."}, "invalid_idempotency_key"),
        ({"amount": 5, "idempotencyKey": "a\nb"}, "invalid_idempotency_key"),
        ({"amount": 5, "idempotencyKey": "k" * 256}, "invalid_idempotency_key"),
        ([1, 2], "invalid_body"),
    ],
)
async def test_bad_input_is_a_json_400_and_queues_nothing(
    sidecar: Sidecar, body: Any, code: str
) -> None:
    resp = await sidecar.client.post(consume_path(), json=body, headers=PREFER)
    assert resp.status == 400, await resp.text()
    assert (await resp.json())["error"]["code"] == code
    usage = sidecar.app[USAGE]
    assert usage is not None
    assert (await usage.store.stats()).queued == 0


async def test_not_json_and_path_ids_are_refused_too(sidecar: Sidecar) -> None:
    resp = await sidecar.client.post(consume_path(), data=b"{nope", headers=PREFER)
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_json"
    resp = await sidecar.client.post(
        "/v1/customers//credits/api-calls/consume",
        json={"amount": 1, "idempotencyKey": "k"},
        headers=PREFER,
    )
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_id"
    for bad in ("a%2Fb", "..", "k" * 256):
        resp = await sidecar.client.get(f"/v1/usage/{bad}")
        assert resp.status in (400, 404), bad
        assert resp.headers["Content-Type"].startswith("application/json")
    resp = await sidecar.client.get("/v1/usage/a%2Fb")
    assert (await resp.json())["error"]["code"] == "invalid_idempotency_key"
    resp = await sidecar.client.get("/v1/usage/nobody-sent-this")
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "usage_not_found"


async def test_the_mirror_ignores_the_preference_and_answers_synchronously(
    sidecar: Sidecar, seeded: Emulator, tenant: str
) -> None:
    key = new_key()
    resp = await sidecar.client.post(
        f"/tenants/{tenant}/customers/cus_active/credits/api-calls/consume",
        json={"amount": 4, "idempotencyKey": key},
        headers=PREFER,
    )
    assert resp.status == 200 and "Preference-Applied" not in resp.headers
    assert (await resp.json())["balance"] == START - 4
    assert (await sidecar.client.get(f"/v1/usage/{key}")).status == 404


async def test_without_redis_the_preference_is_refused_409(
    make_sidecar: SidecarFactory, seeded: Emulator, tenant: str
) -> None:
    sidecar = await make_sidecar(None)
    status, body, _ = await queue(sidecar.client, new_key())
    assert status == 409 and body["error"]["code"] == "async_requires_redis"
    resp = await sidecar.client.get("/v1/usage/anything")
    assert resp.status == 409
    assert (await resp.json())["error"]["code"] == "async_requires_redis"
    # The synchronous call still works.
    resp = await sidecar.client.post(
        consume_path(), json={"amount": 1, "idempotencyKey": new_key()}
    )
    assert resp.status == 200
    assert seeded.credits_of(tenant, "cus_active")["api-calls"] == START - 1


async def test_redis_down_at_accept_time_is_never_acknowledged(
    make_sidecar: SidecarFactory, own_redis: RedisServer, seeded: Emulator, tenant: str
) -> None:
    sidecar = await make_sidecar(own_redis.url, SIDECAR_USAGE_RETRY_MAX="0.5")
    key = new_key()
    own_redis.kill()
    for _ in range(3):  # the first finds out, the next ones fail fast
        status, body, headers = await queue(sidecar.client, key, amount=6)
        assert status == 503, body
        assert body["error"]["code"] == "usage_unavailable"
        assert headers["Retry-After"] == "1"
    own_redis.start()

    async def accepted() -> bool:
        return (await queue(sidecar.client, key, amount=6))[0] == 202

    await eventually(accepted, 10, 0.1)
    assert (await final(sidecar.client, key))["state"] == "delivered"
    assert seeded.credits_of(tenant, "cus_active")["api-calls"] == START - 6


async def test_a_hung_redis_at_accept_time_is_503_within_the_redis_timeout(
    make_sidecar: SidecarFactory, own_redis: RedisServer, seeded: Emulator
) -> None:
    sidecar = await make_sidecar(own_redis.url, SIDECAR_REDIS_TIMEOUT="0.3")
    own_redis.pause()
    try:
        started = time.monotonic()
        status, body, _ = await queue(sidecar.client, new_key())
        took = time.monotonic() - started
    finally:
        own_redis.resume()
    assert status == 503 and body["error"]["code"] == "usage_unavailable"
    assert took < 2.0


async def test_a_shortfall_ends_insufficient_without_a_retry(
    sidecar: Sidecar, seeded: Emulator, tenant: str
) -> None:
    seeded.set_credits(tenant, "cus_trial", "exports", 3)
    key = new_key()
    assert (await queue(sidecar.client, key, 10, "cus_trial", "exports"))[0] == 202
    done = await final(sidecar.client, key)
    assert done["state"] == "insufficient" and done["status"] == 409
    assert done["answer"]["error"]["code"] == "insufficient_credits"
    assert done["attempts"] == 1
    # Still one upstream request well after (the lane moved on; nothing retries it).
    later = await queue(sidecar.client, new_key(), 1, "cus_trial", "exports")
    assert later[0] == 202
    assert (await final(sidecar.client, later[1]["idempotencyKey"]))["state"] == "delivered"
    assert sent(seeded, key) == 1
    assert seeded.credits_of(tenant, "cus_trial")["exports"] == 2


async def test_a_refusal_ends_rejected_without_a_retry(sidecar: Sidecar, seeded: Emulator) -> None:
    unknown_type, unknown_customer = new_key(), new_key()
    assert (await queue(sidecar.client, unknown_type, 1, "cus_active", "no-such-type"))[0] == 202
    assert (await queue(sidecar.client, unknown_customer, 1, "cus_nobody", "api-calls"))[0] == 202
    for key in (unknown_type, unknown_customer):
        done = await final(sidecar.client, key)
        assert done["state"] == "rejected" and done["status"] == 404
        assert done["attempts"] == 1
    seeded.fail("consume_credits", 400, times=1)
    bad = new_key()
    assert (await queue(sidecar.client, bad, 1))[0] == 202
    assert (await final(sidecar.client, bad))["state"] == "rejected"
    assert [sent(seeded, k) for k in (unknown_type, unknown_customer, bad)] == [1, 1, 1]


async def test_5xx_429_and_a_refused_key_are_retried_until_delivered(
    sidecar: Sidecar, seeded: Emulator, tenant: str
) -> None:
    for status in (503, 500, 429, 401):
        seeded.fail("consume_credits", status, times=1)
    key = new_key()
    assert (await queue(sidecar.client, key, 8))[0] == 202
    done = await final(sidecar.client, key, timeout=20)
    assert done["state"] == "delivered" and done["attempts"] == 5
    assert sent(seeded, key) == 5
    assert seeded.credits_of(tenant, "cus_active")["api-calls"] == START - 8
    assert sidecar.total("vellum_sidecar_usage_retries_total") == 4
    text = exposition(sidecar.metrics.registry).decode()
    for reason in ("server_error", "rate_limited", "auth_failed"):
        assert f'vellum_sidecar_usage_retries_total{{reason="{reason}"}}' in text


async def test_retry_after_is_honoured(sidecar: Sidecar, seeded: Emulator) -> None:
    seeded.fail("consume_credits", 429, times=1, headers={"Retry-After": "2"})
    key = new_key()
    started = time.monotonic()
    assert (await queue(sidecar.client, key, 1))[0] == 202
    done = await final(sidecar.client, key)
    took = time.monotonic() - started
    assert done["state"] == "delivered" and done["attempts"] == 2
    # SIDECAR_USAGE_RETRY_MAX is 0.5 s here: only the header explains the wait.
    assert took >= 1.9


async def test_a_full_queue_is_503_with_retry_after(
    make_sidecar: SidecarFactory, redis_url: str, seeded: Emulator
) -> None:
    sidecar = await make_sidecar(redis_url, SIDECAR_USAGE_MAX_QUEUED="2")
    seeded.fail("consume_credits", 503, times=None)
    assert (await queue(sidecar.client, new_key(), customer="cus_active"))[0] == 202
    assert (await queue(sidecar.client, new_key(), customer="cus_trial"))[0] == 202
    status, body, headers = await queue(sidecar.client, new_key())
    assert status == 503 and body["error"]["code"] == "usage_queue_full"
    assert headers["Retry-After"] == "5"


async def test_metrics_count_outcomes_and_show_the_queue(
    sidecar: Sidecar, seeded: Emulator, tenant: str
) -> None:
    seeded.set_credits(tenant, "cus_trial", "api-calls", 0)
    seeded.fail("consume_credits", 503, times=None)
    keys = [new_key() for _ in range(3)]
    await queue(sidecar.client, keys[0], 1, "cus_active")
    await queue(sidecar.client, keys[1], 1, "cus_trial")
    await queue(sidecar.client, keys[2], 1, "cus_active", "nope")

    def value(name: str) -> float:
        text = exposition(sidecar.metrics.registry).decode()
        line = next(x for x in text.splitlines() if x.startswith(name + " "))
        return float(line.split()[1])

    async def shown() -> bool:
        return value("vellum_sidecar_usage_queued") == 3 and (
            value("vellum_sidecar_usage_oldest_queued_seconds") > 0
        )

    await eventually(shown, 10, 0.1)
    assert value("vellum_sidecar_usage_partitions") > 0
    seeded.clear_faults()
    states = [(await final(sidecar.client, k, timeout=20))["state"] for k in keys]
    assert states == ["delivered", "insufficient", "rejected"]
    text = exposition(sidecar.metrics.registry).decode()
    for state, n in (("queued", 3), ("delivered", 1), ("insufficient", 1), ("rejected", 1)):
        assert f'vellum_sidecar_usage_records_total{{state="{state}"}} {n}.0' in text

    async def drained() -> bool:
        return value("vellum_sidecar_usage_queued") == 0

    await eventually(drained, 10, 0.1)
    assert value("vellum_sidecar_usage_oldest_queued_seconds") == 0


async def test_order_holds_per_customer_and_credit_type_with_two_sidecars(
    make_sidecar: SidecarFactory, redis_url: str, seeded: Emulator, tenant: str
) -> None:
    """Records of each (customer, credit type) are accepted one after another, through
    two sidecars in turn, while the upstream fails half the time; the upstream must
    apply them in accept order. Each balance runs out part way, so the order also
    decides which end ``insufficient``: those are checked against the accept order."""
    a = await make_sidecar(redis_url, SIDECAR_USAGE_RETRY_MAX="0.3")
    b = await make_sidecar(redis_url, SIDECAR_USAGE_RETRY_MAX="0.3")
    lanes = [(c, t) for c in ("cus_active", "cus_trial") for t in ("api-calls", "exports")]
    rng = random.Random(24)
    amounts = {lane: [rng.randint(1, 9) for _ in range(15)] for lane in lanes}
    for (customer, credit_type), series in amounts.items():
        seeded.set_credits(tenant, customer, credit_type, sum(series) // 2)
    seeded.fail("consume_credits", 503, times=40)
    accepted: dict[tuple[str, str], list[str]] = {lane: [] for lane in lanes}

    async def send(lane: tuple[str, str]) -> None:
        for i, amount in enumerate(amounts[lane]):
            key = new_key()
            client = (a, b)[i % 2].client
            status, body, _ = await queue(client, key, amount, *lane)
            assert status == 202, body
            accepted[lane].append(key)

    await asyncio.gather(*(send(lane) for lane in lanes))
    for lane in lanes:
        keys = accepted[lane]
        outcomes = [await final(a.client, k, timeout=30) for k in keys]
        # What the upstream applied, in its own order: the first time it saw each key.
        seen: list[str] = []
        for r in seeded.requests:
            if r.operation != "consume_credits" or (r.params["customer"], r.params[
                    "credit_type"]) != lane:  # fmt: skip
                continue
            k = r.body["idempotencyKey"]
            if k not in seen:
                seen.append(k)
        assert seen == keys, f"{lane}: the upstream saw the records out of accept order"
        balance = sum(amounts[lane]) // 2
        expected = []
        for amount in amounts[lane]:
            if amount <= balance:
                balance -= amount
                expected.append("delivered")
            else:
                expected.append("insufficient")
        assert [o["state"] for o in outcomes] == expected, lane
        assert seeded.credits_of(tenant, lane[0])[lane[1]] == balance
