"""``python -m bench.usage``: metered usage's rates on real processes.

A redis-server, the emulator behind a relay (``tests.harness.Gate``) and
``--sidecars`` sidecars (default 2), with ``--customers`` customers (default 64)
each holding both credit types (so twice as many lanes, delivered in parallel):

1. **Accept**: with the upstream down (the relay not started), ``--records``
   ``consume_credits`` calls with ``Prefer: respond-async`` (default 20,000),
   spread over the sidecars on ``--connections`` keep-alive connections (default
   64): records accepted per second and the 202's latency (p50, p99).
2. **Deliver**: the upstream comes back; the time from the first delivery until
   the fleet's queue in Redis is empty, so records delivered per second, and the
   upstream calls it took. The balances are checked (start - sum, each record
   applied once). The sidecars run with ``SIDECAR_USAGE_RETRY_MAX=1``, so the
   moment each resumes (its next probe of the upstream) does not blur the rate;
   how soon deliveries resume with the defaults is ``tests/test_usage_fleet.py``'s
   measure.
3. **Synchronous, for comparison**: ``--sync`` calls without the header
   (default 2,000), each waiting for the upstream, on the same connections.

The delivery rate is bounded by the emulator (one Python process) as much as by
the sidecars: the row says how fast the fleet drains a backlog against it, on
this machine. Prints a table, writes JSON to ``bench/results/``; ``--smoke``
runs in seconds with tiny numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from tests.harness import API_KEY, Gate, Process, Sidecar, Stack, wait_until

from . import __main__ as main_bench
from .load import percentile

TENANT = "bench_usage"
TYPES = ("api-calls", "exports")
START = 10**9
PREFER = {"Prefer": "respond-async"}


def _say(message: str) -> None:
    print(f"bench.usage: {message}", file=sys.stderr, flush=True)


async def _customers(session: aiohttp.ClientSession, stack: Stack, count: int) -> list[str]:
    """``count`` customers of the seeded account ``acme``, each with ``START`` of both
    credit types (created on the emulator directly, with the API key)."""
    ids = [f"cus_u{i:04d}" for i in range(count)]
    base = f"{stack.emulator_url}/tenants/{stack.tenant}"
    for customer in ids:
        async with session.post(
            f"{base}/accounts/acme/customers",
            json={"customerId": customer},
            headers={"x-api-key": API_KEY},
        ) as resp:
            assert resp.status == 201, await resp.text()
        for credit_type in TYPES:
            path = f"/_emulator/tenants/{stack.tenant}/customers/{customer}/credits/{credit_type}"
            async with session.put(stack.emulator_url + path, json={"balance": START}) as resp:
                assert resp.status == 200, await resp.text()
    return ids


async def _send(
    session: aiohttp.ClientSession,
    sidecars: Sequence[Process],
    records: Sequence[tuple[str, str, int, str]],
    connections: int,
    headers: dict[str, str],
    expect: int,
) -> dict[str, Any]:
    """Each record once, ``connections`` at a time, round robin over the sidecars."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < len(records):
            i = next_index
            next_index += 1
            customer, credit_type, amount, key = records[i]
            url = (f"{sidecars[i % len(sidecars)].url()}/v1/customers/{customer}/credits/"
                   f"{credit_type}/consume")  # fmt: skip
            started = time.perf_counter()
            async with session.post(
                url, json={"amount": amount, "idempotencyKey": key}, headers=headers
            ) as resp:
                await resp.read()
                status = resp.status
            latencies.append(time.perf_counter() - started)
            if status != expect:
                errors[str(status)] = errors.get(str(status), 0) + 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    seconds = time.perf_counter() - started
    latencies.sort()
    return {
        "records": len(records),
        "seconds": round(seconds, 3),
        "per_second": round(len(records) / seconds, 1),
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 3),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 3),
        "errors": errors,
    }


def _queued(stack: Stack) -> int:
    assert stack.redis is not None
    with stack.redis.client() as c:
        return sum(c.xlen(k) for k in c.scan_iter("vsc:{" + stack.tenant + "}:u:s:*"))


async def _when(predicate: Callable[[], bool], timeout: float) -> float:
    """When ``predicate`` first held (``time.perf_counter()``), polled with a deadline by
    the harness's ``wait_until`` in a thread (it reads Redis synchronously); the
    deadline's time if it never did."""
    with contextlib.suppress(AssertionError):
        await asyncio.to_thread(wait_until, predicate, timeout, 0.01, what="the queue")
    return time.perf_counter()


async def _upstream_mean_ms(session: aiohttp.ClientSession, sidecars: Sequence[Process]) -> float:
    """The sidecars' mean upstream call time for ``consume_credits`` (deliveries and the
    synchronous calls), from their histograms."""
    total = count = 0.0
    for proc in sidecars:
        async with session.get(f"{proc.url('ops')}/metrics") as resp:
            text = await resp.text()
        for line in text.splitlines():
            if 'operation="consume_credits"' not in line:
                continue
            if line.startswith("vellum_sidecar_upstream_request_duration_seconds_sum"):
                total += float(line.rsplit(" ", 1)[1])
            elif line.startswith("vellum_sidecar_upstream_request_duration_seconds_count"):
                count += float(line.rsplit(" ", 1)[1])
    return round(total / count * 1000, 3) if count else 0.0


async def _balances(session: aiohttp.ClientSession, stack: Stack, customers: Sequence[str]
                    ) -> dict[tuple[str, str], int]:  # fmt: skip
    out = {}
    for customer in customers:
        path = f"/_emulator/tenants/{stack.tenant}/customers/{customer}/credits"
        async with session.get(stack.emulator_url + path) as resp:
            credits = (await resp.json())["credits"]
        for credit_type in TYPES:
            out[(customer, credit_type)] = int(credits[credit_type])
    return out


async def run(opts: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "machine": main_bench.machine(),
        "options": {k: v for k, v in vars(opts).items() if k != "json"},
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
    }
    with tempfile.TemporaryDirectory(prefix="bench-usage-") as tmp:
        work = Path(tmp)
        with Stack(work, tenant=TENANT, redis=True, push=False, sidecar=False) as stack:
            assert stack.redis is not None
            gate = Gate(work, stack.emulator_url)
            connector = aiohttp.TCPConnector(limit=opts.connections * 2)
            async with aiohttp.ClientSession(connector=connector) as session:
                customers = await _customers(session, stack, opts.customers)
                sidecars: list[Process] = []
                for n in range(opts.sidecars):
                    proc = Sidecar(work, stack.tenant, gate.url(), name=f"sidecar{n}",
                                   SIDECAR_REDIS_URL=stack.redis.url,
                                   SIDECAR_UPSTREAM_TIMEOUT="5",
                                   SIDECAR_USAGE_RETRY_MAX="1")  # fmt: skip
                    stack.add(proc)
                    sidecars.append(proc)
                lanes = [(c, t) for c in customers for t in TYPES]
                records = [(*lanes[i % len(lanes)], 1 + i % 7, "use_" + uuid.uuid4().hex)
                           for i in range(opts.records)]  # fmt: skip
                _say(f"accepting {len(records):,} records, upstream down")
                results["accept"] = await _send(
                    session, sidecars, records, opts.connections, PREFER, 202
                )
                results["accept"]["queued_after"] = _queued(stack)
                _say("upstream back: delivering")
                queued = results["accept"]["queued_after"]
                started = time.perf_counter()
                stack.add(gate)
                # The first delivery waits for the sidecars' next probe of the upstream
                # (at most SIDECAR_USAGE_RETRY_MAX after it came back); the rate is
                # measured from there to an empty queue.
                first = await _when(lambda: _queued(stack) < queued, opts.deliver_timeout)
                done = await _when(lambda: _queued(stack) == 0, opts.deliver_timeout)
                left = _queued(stack)
                seconds = done - first
                calls = len(stack.upstream_requests("consume_credits"))
                balances = await _balances(session, stack, customers)
                spent: dict[tuple[str, str], int] = {}
                for customer, credit_type, amount, _ in records:
                    spent[(customer, credit_type)] = spent.get((customer, credit_type), 0) + amount
                exact = all(balances[lane] == START - spent.get(lane, 0) for lane in lanes)
                results["deliver"] = {
                    "records": len(records),
                    "first_after_s": round(first - started, 3),
                    "seconds": round(seconds, 3),
                    "per_second": round(len(records) / max(seconds, 1e-6), 1),
                    "left_in_queue": left,
                    "upstream_calls": calls,
                    "balances_exact": exact,
                }
                _say(f"synchronous: {opts.sync:,} calls")
                sync = [(*lanes[i % len(lanes)], 1, "sync_" + uuid.uuid4().hex)
                        for i in range(opts.sync)]  # fmt: skip
                results["sync"] = await _send(session, sidecars, sync, opts.connections, {}, 200)
                results["deliver"]["upstream_mean_ms"] = await _upstream_mean_ms(session, sidecars)
            results["rss_mib"] = {p.name: round(p.rss_mib(), 1) for p in sidecars}
            results["cpu_seconds"] = {p.name: round(p.cpu_seconds(), 2) for p in sidecars}
    results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return results


def table(r: dict[str, Any]) -> str:
    a, d, s = r["accept"], r["deliver"], r["sync"]
    o = r["options"]
    lines = [
        f"metered usage: {o['sidecars']} sidecars, {o['customers']} customers x "
        f"{len(TYPES)} credit types, {o['connections']} connections; load average before "
        f"{r['load_average_before']}, after {r['load_average_after']}.",
        "",
        "| row | records | seconds | per second | p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|---|",
        f"| accepted (Prefer: respond-async, upstream down) | {a['records']:,} | "
        f"{a['seconds']} | {a['per_second']:,.0f} | {a['p50_ms']} | {a['p99_ms']} | "
        f"{a['errors'] or 0} |",
        f"| delivered (the backlog, from the first delivery to an empty queue) | "
        f"{d['records']:,} | {d['seconds']} | {d['per_second']:,.0f} | | | "
        f"left {d['left_in_queue']} |",
        f"| synchronous consume (for comparison) | {s['records']:,} | {s['seconds']} | "
        f"{s['per_second']:,.0f} | {s['p50_ms']} | {s['p99_ms']} | {s['errors'] or 0} |",
        "",
        f"first delivery {d['first_after_s']} s after the upstream came back; upstream calls "
        f"to deliver: {d['upstream_calls']:,}; balances exact: "
        f"{d['balances_exact']}; sidecar RSS MiB {r['rss_mib']}, CPU s {r['cpu_seconds']}.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.usage", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny and fast (tests)")
    p.add_argument("--records", type=int, help="records accepted then delivered (default 20000)")
    p.add_argument("--sync", type=int, help="synchronous calls for comparison (default 2000)")
    p.add_argument("--customers", type=int, help="customers, two lanes each (default 64)")
    p.add_argument("--sidecars", type=int, default=2, help="sidecar processes (default 2)")
    p.add_argument("--connections", type=int, help="keep-alive connections (default 64)")
    p.add_argument("--deliver-timeout", type=float, default=600.0, help="seconds (default 600)")
    p.add_argument("--json", type=Path, default=None, help="where to write the results")
    a = p.parse_args(argv)

    def pick(value: Any, full: Any, smoke: Any) -> Any:
        return value if value is not None else (smoke if a.smoke else full)

    a.records = pick(a.records, 20_000, 300)
    a.sync = pick(a.sync, 2_000, 50)
    a.customers = pick(a.customers, 64, 4)
    a.connections = pick(a.connections, 64, 8)
    if a.json is None and not a.smoke:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        a.json = Path(__file__).parent / "results" / f"usage-{stamp}.json"
    results = asyncio.run(run(a))
    print(table(results))
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(results, indent=2) + "\n")
        _say(f"wrote {a.json}")
    failed = results["accept"]["errors"] or results["sync"]["errors"]
    if failed or results["deliver"]["left_in_queue"] or not results["deliver"]["balances_exact"]:
        _say("FAILED: see the table")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
