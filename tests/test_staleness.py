"""Coherence under faults, with real processes: no drop is lost or undone by Redis, and
no cached customer is lost to a drop.

Three sidecar processes share one real redis-server; each case breaks the promise
on purpose (SIGKILL a sidecar holding a queued drop, restart Redis from a snapshot
taken before a push, restart it empty, drop everything while the upstream is down)
and reads every sidecar with a deadline:

- every live sidecar serves the new document within 2 s of Redis answering again,
  and keeps serving it (0 reads of the old one after that);
- while the upstream is down, every customer that was cached answers 200, marked
  ``stale`` (0 non-2xx), unless ``SIDECAR_STRICT_DROPS`` asks to fail closed after
  an explicit drop.

Each test prints what it measured (docs/operations.md, "Drops and staleness").
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.signature import sign

from .harness import WEBHOOK_SECRET, Sidecar, Stack, wait_until

OLD = {"status": "active", "modules": ["reports"]}
NEW = {"status": "active", "modules": ["reports", "exports"]}
#: How long after Redis answers again an old answer may still be served.
BOUND = 2.0
#: How long each case keeps reading after that.
WATCH = 4.0


def get(url: str, timeout: float = 5.0) -> tuple[int, dict[str, Any], dict[str, str]]:
    """A GET's status, JSON body and headers (lower-case names)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback
            return (
                resp.status,
                json.loads(resp.read()),
                {k.lower(): v for k, v in resp.headers.items()},
            )
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read()), {k.lower(): v for k, v in exc.headers.items()}


def can(sc: Sidecar, customer: str, module: str = "exports") -> tuple[int, bool, str]:
    """``can``'s status, ``allowed`` and ``X-Sidecar-Cache``."""
    status, body, headers = get(f"{sc.api_url}/v1/customers/{customer}/can/{module}")
    return status, bool(body.get("allowed")), headers.get("x-sidecar-cache", "")


def put(stack: Stack, customer: str, doc: dict[str, Any]) -> None:
    """Change the upstream's document; the emulator pushes nothing (``push=False``)."""
    stack.admin("PUT", f"/tenants/{stack.tenant}/customers/{customer}/entitlements", doc)


def push(sc: Sidecar, tenant: str, customer: str) -> tuple[int, dict[str, Any]]:
    """A signed ``entitlements.updated`` push for ``customer`` to ``sc``."""
    body = json.dumps({"eventId": "evt_" + uuid.uuid4().hex, "type": "entitlements.updated",
                       "tenantId": tenant, "customerId": customer}).encode()  # fmt: skip
    request = urllib.request.Request(  # noqa: S310 - loopback
        sc.webhook_url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json",
                 "X-Vellum-Signature": sign(WEBHOOK_SECRET, body, int(time.time()))},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def watch(sidecars: list[Sidecar], customer: str, since: float) -> list[tuple[float, str, bool]]:
    """Read ``customer`` on every sidecar until ``BOUND + WATCH`` after ``since``: each
    read's time after ``since``, the sidecar and ``allowed``."""
    reads = []
    while (now := time.monotonic()) < since + BOUND + WATCH:
        for sc in sidecars:
            status, allowed, _ = can(sc, customer)
            assert status == 200, (sc.name, status)
            reads.append((now - since, sc.name, allowed))
        time.sleep(0.02)  # pacing of a bounded loop, not a wait for state
    return reads


def report(case: str, reads: list[tuple[float, str, bool]]) -> float | None:
    """Print and return the last time after Redis answered that an old answer came."""
    old = [t for t, _, allowed in reads if not allowed]
    last = max(old) if old else None
    shown = "none" if last is None else f"{last:.3f}s"
    print(f"\n[{case}] {len(reads)} reads, {len(old)} old, last old {shown} after Redis answered")
    return last


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """Redis, the emulator (pushing nothing by itself) and three sidecars: a, b, c."""
    with Stack(tmp_path, redis=True, push=False, SIDECAR_UPSTREAM_TIMEOUT="1") as stack:
        stack.add_sidecar("b")
        stack.add_sidecar("c")
        yield stack


@pytest.mark.parametrize("hang", [0.0, 2.0], ids=["hang-just-long-enough", "hang-2s"])
def test_a_drop_queued_by_a_sidecar_killed_during_a_redis_hang_is_not_lost(
    stack: Stack, hang: float
) -> None:
    """The hang lasts as long as the push takes to give up on Redis (the shortest that
    queues a drop: the others' heartbeats may not have noticed yet), or 2 s more."""
    a, b, c = stack.sidecars
    assert stack.redis is not None
    put(stack, "cus_x", OLD)
    for sc in (a, b, c):
        assert can(sc, "cus_x")[:2] == (200, False)
    stack.redis.pause()
    try:
        put(stack, "cus_x", NEW)
        # a acknowledges the push (Redis does not answer: it is queued in a's memory)...
        assert push(a, stack.tenant, "cus_x") == (200, {"ok": True, "queued": True})
        # ...and dies with its queue before Redis comes back.
        a.kill()
        time.sleep(hang)  # the fault's duration, not a wait for state
    finally:
        stack.redis.resume()
    answering = time.monotonic()
    last_old = report(
        f"killed with a queued drop, hang +{hang}s", watch([b, c], "cus_x", answering)
    )
    assert last_old is None or last_old < BOUND


def test_a_redis_restarted_from_a_snapshot_taken_before_a_push_does_not_undo_it(
    stack: Stack,
) -> None:
    a, b, c = stack.sidecars
    assert stack.redis is not None
    put(stack, "cus_x", OLD)
    for sc in (a, b, c):
        assert can(sc, "cus_x")[:2] == (200, False)
    with stack.redis.client() as client:
        client.save()  # the snapshot holds the old entry, fresh
    put(stack, "cus_x", NEW)
    assert push(a, stack.tenant, "cus_x") == (200, {"ok": True})
    wait_until(lambda: all(can(sc, "cus_x")[1] for sc in (a, b, c)), timeout=5)
    # Redis crashes and comes back from its last snapshot: the push is gone from it.
    stack.redis.kill()
    stack.redis.start()
    answering = time.monotonic()
    last_old = report("restart from an older snapshot", watch([a, b, c], "cus_x", answering))
    assert last_old is None or last_old < BOUND


def test_a_redis_gone_back_in_time_under_open_connections_is_noticed(tmp_path: Path) -> None:
    """No reconnection to notice (a proxy hiding a failover, a reload): the drop
    sequence going backwards is what tells."""
    with Stack(tmp_path, redis=True, push=False, SIDECAR_UPSTREAM_TIMEOUT="1") as stack:
        assert stack.redis is not None
        stack.redis.stop()
        # The same server, but one that lets the test reload its snapshot in place.
        stack.redis.process.argv += ["--enable-debug-command", "yes"]
        stack.redis.start()
        b = stack.add_sidecar("b")
        a = stack.sidecar
        wait_until(lambda: get(f"{a.ops_url}/readyz")[1].get("fanout") == "ok", timeout=10)
        put(stack, "cus_x", OLD)
        for sc in (a, b):
            assert can(sc, "cus_x")[:2] == (200, False)
        with stack.redis.client() as client:
            client.save()
            put(stack, "cus_x", NEW)
            assert push(a, stack.tenant, "cus_x") == (200, {"ok": True})
            wait_until(lambda: all(can(sc, "cus_x")[1] for sc in (a, b)), timeout=5)
            client.execute_command("DEBUG", "RELOAD", "NOSAVE")
        answering = time.monotonic()
        last_old = report("reloaded in place", watch([a, b], "cus_x", answering))
        assert last_old is None or last_old < BOUND
        # One of them renewed the epoch, for that reason (or because no check ran
        # during the reload, when it took as long as a stall).
        reasons = {
            line.split('reason="')[1].split('"')[0]
            for sc in (a, b)
            for line in urllib.request.urlopen(f"{sc.ops_url}/metrics").read().decode().splitlines()  # noqa: S310
            if line.startswith("vellum_sidecar_epoch_renewals_total{") and not line.endswith(" 0.0")
        }
        assert reasons & {"regressed", "stalled"}, reasons


def _cached_everywhere(stack: Stack, customers: list[str]) -> list[Sidecar]:
    sidecars = stack.sidecars
    for customer in customers:
        put(stack, customer, OLD)
        for sc in sidecars:
            assert can(sc, customer)[:2] == (200, False)
    return sidecars


def _all_stale(sidecars: list[Sidecar], customers: list[str]) -> tuple[int, int]:
    """Read every customer on every sidecar for two seconds: (reads, non-2xx)."""
    reads = failures = 0
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        for sc in sidecars:
            for customer in customers:
                status, allowed, source = can(sc, customer, "reports")
                reads += 1
                if status != 200:
                    failures += 1
                else:
                    assert allowed and source == "stale", (sc.name, customer, source)
    return reads, failures


def test_cached_customers_keep_answering_when_redis_restarts_empty_with_the_upstream_down(
    stack: Stack,
) -> None:
    customers = [f"cus_{i}" for i in range(4)]
    sidecars = _cached_everywhere(stack, customers)
    assert stack.emulator is not None and stack.redis is not None
    stack.emulator.kill()
    stack.redis.kill()
    stack.redis.start()  # no persistence: empty
    reads, failures = _all_stale(sidecars, customers)
    print(f"\n[Redis restarted empty, upstream down] {reads} reads, {failures} non-2xx")
    assert failures == 0


@pytest.mark.parametrize("how", ["push", "delete"])
def test_cached_customers_keep_answering_after_a_tenant_wide_drop_with_the_upstream_down(
    stack: Stack, how: str
) -> None:
    customers = [f"cus_{i}" for i in range(4)]
    sidecars = _cached_everywhere(stack, customers)
    assert stack.emulator is not None
    stack.emulator.kill()
    a = sidecars[0]
    if how == "push":
        body = json.dumps({"eventId": "evt_" + uuid.uuid4().hex, "type": "plan.updated",
                           "tenantId": stack.tenant}).encode()  # fmt: skip
        request = urllib.request.Request(  # noqa: S310 - loopback
            a.webhook_url, data=body, method="POST",
            headers={"Content-Type": "application/json",
                     "X-Vellum-Signature": sign(WEBHOOK_SECRET, body, int(time.time()))},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310
            assert resp.status == 200
    else:
        request = urllib.request.Request(f"{a.api_url}/v1/cache", method="DELETE")  # noqa: S310
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310
            assert resp.status == 204
    reads, failures = _all_stale(sidecars, customers)
    print(f"\n[tenant-wide drop by {how}, upstream down] {reads} reads, {failures} non-2xx")
    assert failures == 0


def test_strict_drops_fail_closed_after_an_explicit_drop_but_not_after_a_precaution(
    tmp_path: Path,
) -> None:
    with Stack(tmp_path, redis=True, push=False, SIDECAR_UPSTREAM_TIMEOUT="1",
               SIDECAR_STRICT_DROPS="true") as stack:  # fmt: skip
        b = stack.add_sidecar("b")
        a = stack.sidecar
        for customer in ("cus_dropped", "cus_kept"):
            put(stack, customer, OLD)
            for sc in (a, b):
                assert can(sc, customer, "reports")[:2] == (200, True)
        assert stack.emulator is not None and stack.redis is not None
        stack.emulator.kill()
        # A precaution (Redis restarted empty) is still served stale...
        stack.redis.kill()
        stack.redis.start()
        wait_until(lambda: get(f"{a.ops_url}/readyz")[1].get("fanout") == "ok", timeout=10)
        for sc in (a, b):
            assert can(sc, "cus_kept", "reports") == (200, True, "stale")
        # ...an explicit drop is not: the customer fails closed on every sidecar.
        request = urllib.request.Request(  # noqa: S310 - loopback
            f"{a.api_url}/v1/customers/cus_dropped/cache", method="DELETE"
        )
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310
            assert resp.status == 204
        wait_until(lambda: can(b, "cus_dropped", "reports")[0] == 503, timeout=5)
        for sc in (a, b):
            assert can(sc, "cus_dropped", "reports")[:2] == (503, False)
            assert can(sc, "cus_kept", "reports") == (200, True, "stale")


def test_memory_only_drops_keep_the_fallback_and_stale_answers_say_so(tmp_path: Path) -> None:
    with Stack(tmp_path, push=False, SIDECAR_UPSTREAM_TIMEOUT="1") as stack:
        a = stack.sidecar
        put(stack, "cus_1", OLD)
        stack.admin("PUT", f"/tenants/{stack.tenant}/flags/beta", {"value": True})
        assert can(a, "cus_1", "reports") == (200, True, "miss")
        fresh = get(f"{a.api_url}/v1/customers/cus_1/can/reports")[1]
        assert "stale" not in fresh
        assert get(f"{a.api_url}/v1/customers/cus_1/flags/beta")[0] == 200
        assert stack.emulator is not None
        stack.emulator.kill()
        request = urllib.request.Request(f"{a.api_url}/v1/cache", method="DELETE")  # noqa: S310
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310
            assert resp.status == 204
        status, body, headers = get(f"{a.api_url}/v1/customers/cus_1/can/reports")
        assert (status, headers["x-sidecar-cache"]) == (200, "stale")
        assert body == {**fresh, "stale": True}
        status, body, headers = get(f"{a.api_url}/v1/customers/cus_1/flags/beta")
        assert (status, headers["x-sidecar-cache"]) == (200, "stale")
        assert body == {"flag": "beta", "customerId": "cus_1", "value": True, "stale": True}
        evaluation = urllib.request.Request(  # noqa: S310 - loopback
            f"{a.api_url}/ofrep/v1/evaluate/flags/module:reports",
            data=json.dumps({"context": {"targetingKey": "cus_1"}}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(evaluation, timeout=10) as resp:  # noqa: S310
            assert json.loads(resp.read())["reason"] == "STALE"


def test_a_lost_push_is_corrected_when_the_entry_s_freshness_ends(tmp_path: Path) -> None:
    """Nothing tells the fleet of a change whose push never came: the entry answers
    until its freshness (``SIDECAR_CACHE_TTL``, jittered by 10 %) ends, then the next
    read revalidates."""
    with Stack(tmp_path, redis=True, push=False, SIDECAR_CACHE_TTL="2") as stack:
        a = stack.sidecar
        put(stack, "cus_x", OLD)
        assert can(a, "cus_x") == (200, False, "miss")
        cached = time.monotonic()
        put(stack, "cus_x", NEW)  # and no push
        wait_until(lambda: can(a, "cus_x")[1], timeout=2 * 1.1 + 2)
        took = time.monotonic() - cached
        print(f"\n[a lost push, SIDECAR_CACHE_TTL=2] the new document after {took:.2f}s")
        assert took >= 2 * 0.9 * 0.9, "not before the freshness (less its refresh-ahead) ends"
