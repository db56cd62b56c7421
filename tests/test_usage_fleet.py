"""Metered usage through outages, with real processes: sidecars, a redis-server, the
emulator behind a relay that takes the upstream down and brings it back (``harness.Gate``).

- the issue's case: with the upstream down, 200 records through two sidecars (202
  each); the sidecar that accepted half of them SIGKILLed; the upstream back: within
  30 s every record is applied exactly once (balance = start - sum), in accept order
  per customer and credit type, and ``GET /v1/usage/{key}`` says ``delivered``; a
  shortfall ends ``insufficient`` after one upstream request;
- a SIGTERMed sidecar hands its partitions over at once, not when its leases end;
- with AOF, records acknowledged just before Redis is SIGKILLed are still delivered;
- a Redis restored from a snapshot taken while records were queued sends them again,
  and the upstream applies none of them twice.

Each test prints what it measured (docs/operations.md, "Metered usage through outages").
"""

from __future__ import annotations

import json
import random
import time
import urllib.error
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from .harness import Gate, RedisServer, Sidecar, Stack, wait_until

CUSTOMERS = ("cus_active", "cus_trial", "cus_pastdue", "cus_canceled")
TYPES = ("api-calls", "exports")
START = 10_000
PREFER = {"Prefer": "respond-async", "Content-Type": "application/json"}

Lane = tuple[str, str]


def call(url: str, method: str, path: str, body: Any = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:  # fmt: skip
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(  # noqa: S310 - loopback
        url + path, data=data, method=method, headers=headers or {}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def queue(sc: Sidecar, lane: Lane, key: str, amount: int) -> tuple[int, dict[str, Any]]:
    path = f"/v1/customers/{lane[0]}/credits/{lane[1]}/consume"
    return call(sc.api_url, "POST", path, {"amount": amount, "idempotencyKey": key}, PREFER)


def state(sc: Sidecar, key: str) -> dict[str, Any]:
    status, body = call(sc.api_url, "GET", f"/v1/usage/{key}")
    assert status == 200, body
    return body


def set_balance(stack: Stack, lane: Lane, balance: int) -> None:
    stack.admin("PUT", f"/tenants/{stack.tenant}/customers/{lane[0]}/credits/{lane[1]}",
                {"balance": balance})  # fmt: skip


def balance(stack: Stack, lane: Lane) -> int:
    answer = stack.admin("GET", f"/tenants/{stack.tenant}/customers/{lane[0]}/credits")
    return int(answer["credits"][lane[1]])


def applied_order(stack: Stack) -> dict[Lane, list[str]]:
    """Per lane, the keys in the order the upstream first saw them."""
    seen: dict[Lane, list[str]] = defaultdict(list)
    for r in stack.upstream_requests("consume_credits"):
        lane = (r["params"]["customer"], r["params"]["credit_type"])
        key = r["body"]["idempotencyKey"]
        if key not in seen[lane]:
            seen[lane].append(key)
    return seen


def sent(stack: Stack, key: str) -> int:
    return sum(
        1 for r in stack.upstream_requests("consume_credits") if r["body"]["idempotencyKey"] == key
    )


def pending_by_consumer(redis: RedisServer, tenant_prefix: str) -> dict[str, int]:
    """Entries read and not yet finished, per consumer, over every partition."""
    out: dict[str, int] = defaultdict(int)
    with redis.client() as c:
        for key in c.scan_iter(f"{tenant_prefix}u:s:*"):
            for consumer in c.xinfo_consumers(key, "deliver"):
                out[consumer["name"].decode()] += consumer["pending"]
    return dict(out)


def prefix(tenant: str) -> str:
    return "vsc:{" + tenant + "}:"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """Redis and the emulator (seeded, no pushes); sidecars are added by each test, in
    front of a ``Gate`` that is not started: the upstream is down."""
    with Stack(tmp_path, redis=True, push=False, sidecar=False) as stack:
        yield stack


def sidecar(stack: Stack, tmp_path: Path, gate: Gate, name: str, **env: str) -> Sidecar:
    assert stack.redis is not None
    process = Sidecar(tmp_path, stack.tenant, gate.url(), name=name,
                      SIDECAR_REDIS_URL=stack.redis.url, **env)  # fmt: skip
    stack.add(process)
    return process


def test_records_accepted_through_an_outage_are_applied_once_after_a_sidecar_dies(
    stack: Stack, tmp_path: Path
) -> None:
    redis = stack.redis
    assert redis is not None
    gate = Gate(tmp_path, stack.emulator_url)
    lanes = [(c, t) for c in CUSTOMERS for t in TYPES]
    for lane in lanes:
        set_balance(stack, lane, START)
    short: Lane = ("cus_canceled", "exports")
    set_balance(stack, short, 3)
    a = sidecar(stack, tmp_path, gate, "a")
    b = sidecar(stack, tmp_path, gate, "b")
    rng = random.Random(24)
    # 200 records over 7 lanes (25 or more each), the shortfall's lane apart.
    full_lanes = [lane for lane in lanes if lane != short]
    plan: dict[Lane, list[tuple[int, Sidecar]]] = {lane: [] for lane in full_lanes}
    for i in range(200):  # every other record through a: half of them each
        plan[full_lanes[i % len(full_lanes)]].append((rng.randint(1, 9), (a, b)[i % 2]))
    accepted: dict[Lane, list[str]] = {lane: [] for lane in full_lanes}
    by_sidecar = {"a": 0, "b": 0}

    def send(lane: Lane) -> None:
        for amount, sc in plan[lane]:
            key = "use_" + uuid.uuid4().hex
            status, body = queue(sc, lane, key, amount)
            assert status == 202, body
            accepted[lane].append(key)
            by_sidecar[sc.name] += 1

    with ThreadPoolExecutor(len(full_lanes)) as pool:
        list(pool.map(send, full_lanes))
    short_key = "use_" + uuid.uuid4().hex
    assert queue(a, short, short_key, 10)[0] == 202
    assert by_sidecar == {"a": 100, "b": 100}
    # Both sidecars are delivering (each holds partitions and has read records into
    # its pending list, every attempt refused: the upstream is down).
    wait_until(lambda: len([n for n in pending_by_consumer(redis, prefix(stack.tenant))
                            .values() if n]) == 2, timeout=15, what="two deliverers with pending "
               "records")  # fmt: skip
    a.kill()
    gate_started = time.monotonic()
    stack.add(gate)  # the upstream is back
    keys = [k for lane in full_lanes for k in accepted[lane]]

    def all_final() -> bool:
        return all(state(b, k)["state"] != "queued" for k in [*keys, short_key])

    wait_until(all_final, timeout=30, interval=0.2, what="every record final within 30 s")
    took = time.monotonic() - gate_started
    states = {k: state(b, k) for k in keys}
    assert {s["state"] for s in states.values()} == {"delivered"}
    for lane in full_lanes:
        spent = sum(amount for amount, _ in plan[lane])
        assert balance(stack, lane) == START - spent, f"{lane}: applied once each"
    order = applied_order(stack)
    for lane in full_lanes:
        assert order[lane] == accepted[lane], f"{lane}: applied out of accept order"
    short_state = state(b, short_key)
    assert short_state["state"] == "insufficient" and short_state["status"] == 409
    assert sent(stack, short_key) == 1, "a shortfall is not retried"
    assert balance(stack, short) == 3
    replayed = sum(1 for s in states.values() if s["replayed"])
    left = pending_by_consumer(redis, prefix(stack.tenant))
    assert not any(left.values()), left
    print(f"\n[usage through an outage] 200 records + 1 shortfall through 2 sidecars, one "
          f"SIGKILLed; all final {took:.2f} s after the upstream came back; "
          f"{len(stack.upstream_requests('consume_credits'))} upstream requests, "
          f"{replayed} answered as replays")  # fmt: skip


def test_records_in_flight_when_their_sidecar_dies_are_applied_once(
    stack: Stack, tmp_path: Path
) -> None:
    """The upstream answers slowly; the only deliverer is SIGKILLed with calls under way.
    The upstream went on applying them; the next holder sends them again and the
    upstream answers those with the first answer (``replayed``), never a second
    deduction."""
    gate = Gate(tmp_path, stack.emulator_url)
    stack.add(gate)
    a = sidecar(stack, tmp_path, gate, "a")
    lanes: list[Lane] = [("cus_active", "api-calls"), ("cus_trial", "exports")]
    for lane in lanes:
        set_balance(stack, lane, START)
    stack.admin("POST", "/faults", {"operation": "consume_credits", "delay": 1.5})
    keys: dict[Lane, list[str]] = {lane: [] for lane in lanes}
    for i in range(10):
        lane = lanes[i % 2]
        keys[lane].append("use_" + uuid.uuid4().hex)
        assert queue(a, lane, keys[lane][-1], 3)[0] == 202
    wait_until(lambda: len(stack.upstream_requests("consume_credits")) >= 2, timeout=15,
               what="deliveries under way")  # fmt: skip
    a.kill()
    in_flight = len(stack.upstream_requests("consume_credits"))
    stack.admin("DELETE", "/faults")
    b = sidecar(stack, tmp_path, gate, "b")
    every = [k for lane in lanes for k in keys[lane]]
    wait_until(lambda: all(state(b, k)["state"] == "delivered" for k in every), timeout=30,
               interval=0.2, what="every record delivered by b")  # fmt: skip
    for lane in lanes:
        assert balance(stack, lane) == START - 3 * len(keys[lane]), f"{lane}: applied once each"
        assert applied_order(stack)[lane] == keys[lane]
    replayed = sum(1 for k in every if state(b, k)["replayed"])
    assert replayed >= 1, "the calls a had under way were applied, and answered as replays"
    print(f"\n[usage, SIGKILL mid-delivery] {in_flight} calls under way when a died; "
          f"{replayed} answered to b as replays; balances exact")  # fmt: skip


def test_a_sigtermed_sidecar_hands_its_partitions_over_at_once(
    stack: Stack, tmp_path: Path
) -> None:
    gate = Gate(tmp_path, stack.emulator_url)
    # A long lease (upstream timeout 10 s: 30 s): only a release explains a fast takeover.
    a = sidecar(stack, tmp_path, gate, "a", SIDECAR_UPSTREAM_TIMEOUT="10")
    b = sidecar(stack, tmp_path, gate, "b", SIDECAR_UPSTREAM_TIMEOUT="10")

    def held(sc: Sidecar) -> float:
        with urllib.request.urlopen(sc.ops_url + "/metrics", timeout=5) as resp:  # noqa: S310
            text = resp.read().decode()
        name = "vellum_sidecar_usage_partitions "
        return float(next(x for x in text.splitlines() if x.startswith(name)).split()[1])

    wait_until(lambda: held(a) + held(b) == 16 and held(a) > 0 and held(b) > 0, timeout=20,
               what="the partitions shared")  # fmt: skip
    lane: Lane = ("cus_active", "exports")
    keys = []
    for _ in range(10):
        keys.append("use_" + uuid.uuid4().hex)
        assert queue(b, lane, keys[-1], 1)[0] == 202
    assert a.stop() == 0  # SIGTERM: drains, lets go of its leases
    stopped = time.monotonic()
    wait_until(lambda: held(b) == 16, timeout=10, what="b holding every partition")
    took = time.monotonic() - stopped
    assert took < 10, "well before a's 30 s leases could have ended"
    stack.add(gate)
    wait_until(lambda: all(state(b, k)["state"] == "delivered" for k in keys), timeout=30)
    print(f"\n[usage, SIGTERM] b held every partition {took:.2f} s after a stopped (lease 30 s)")


def test_records_acknowledged_before_a_redis_crash_survive_with_aof(
    stack: Stack, tmp_path: Path
) -> None:
    gate = Gate(tmp_path, stack.emulator_url)
    aof = RedisServer(tmp_path / "aof", name="redis-aof",
                      extra=["--appendonly", "yes", "--appendfsync", "everysec"])  # fmt: skip
    (tmp_path / "aof").mkdir()
    aof.start()
    try:
        process = Sidecar(tmp_path, stack.tenant, gate.url(), name="a", SIDECAR_REDIS_URL=aof.url)
        stack.add(process)
        lane: Lane = ("cus_trial", "api-calls")
        set_balance(stack, lane, START)
        keys = ["use_" + uuid.uuid4().hex for _ in range(50)]
        for key in keys:
            assert queue(process, lane, key, 2)[0] == 202
        # A crash right after the last 202: Redis wrote each record to its AOF before
        # answering, so the kernel holds it although no fsync may have run yet.
        aof.kill()
        aof.start()
        stack.add(gate)
        wait_until(lambda: all(state(process, k)["state"] == "delivered" for k in keys),
                   timeout=30, what="every acknowledged record delivered")  # fmt: skip
        assert balance(stack, lane) == START - 2 * len(keys)
    finally:
        aof.kill()


def test_a_redis_restored_from_an_older_snapshot_applies_nothing_twice(
    stack: Stack, tmp_path: Path
) -> None:
    assert stack.redis is not None
    gate = Gate(tmp_path, stack.emulator_url)
    a = sidecar(stack, tmp_path, gate, "a")
    lane: Lane = ("cus_pastdue", "exports")
    set_balance(stack, lane, START)
    keys = ["use_" + uuid.uuid4().hex for _ in range(20)]
    for key in keys:
        assert queue(a, lane, key, 5)[0] == 202
    with stack.redis.client() as client:
        client.save()  # the snapshot holds every record, queued
    stack.add(gate)
    wait_until(lambda: all(state(a, k)["state"] == "delivered" for k in keys), timeout=30)
    assert balance(stack, lane) == START - 100
    # Redis crashes and comes back from the snapshot: every record is queued again.
    stack.redis.kill()
    stack.redis.start()
    wait_until(lambda: all(state(a, k)["state"] == "delivered" for k in keys), timeout=60,
               interval=0.2, what="the restored records delivered again")  # fmt: skip
    assert all(state(a, k)["replayed"] for k in keys), "the upstream knew every key"
    assert balance(stack, lane) == START - 100, "nothing applied twice"
    assert all(sent(stack, k) == 2 for k in keys)
