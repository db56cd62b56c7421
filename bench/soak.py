"""``python -m bench.soak``: resource bounds of a real sidecar process.

Two measurements, printed as a table and written as JSON (``bench/results/``):

1. **Memory under many distinct customers.** Requests ``--customers`` distinct
   customers (default 1,000,000) through ``POST /v1/check`` batches of 1,000.
   None is known upstream, so each is one upstream fetch (a 404) and one cache
   entry. The in-process layer must stay at ``SIDECAR_MEMORY_MAX_ENTRIES``
   (default 100,000) and the resident set must level off; RSS is sampled as
   the run goes.
2. **Leaks over many requests.** ``--requests`` requests (default 100,000) of
   ``can`` over 1,000 customers, half on keep-alive connections and half on a
   new connection each, so a leaked socket or task per connection would show.
   Open file descriptors (``/proc/<pid>/fd``) and asyncio tasks
   (``vellum_sidecar_asyncio_tasks``) are read before and after.

The sidecar runs in memory-only mode (``SIDECAR_REDIS_URL`` unset): the bound
under test is this process's, and Redis's own memory is Redis's business.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from tests.harness import Process, Stack


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def _metric(session: aiohttp.ClientSession, proc: Process, name: str) -> float:
    async with session.get(f"{proc.url('ops')}/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise RuntimeError(f"{name} missing from /metrics")


async def memory_phase(
    session: aiohttp.ClientSession, proc: Process, customers: int, say: Any
) -> dict[str, Any]:
    batch = 1000
    samples: list[dict[str, Any]] = []
    sem = asyncio.Semaphore(4)
    started = time.perf_counter()
    done = 0
    next_sample = 0

    async def one(start: int) -> None:
        nonlocal done
        checks = [{"customerId": f"soak_{i}", "module": "m"} for i in range(start, start + batch)]
        url = f"{proc.url()}/v1/check"
        async with sem, session.post(url, json={"checks": checks}) as resp:
            body = await resp.json()
            if resp.status != 200 or len(body["results"]) != batch:
                raise RuntimeError(f"batch at {start}: {resp.status}")
        done += batch

    step = max(customers // 10, batch)
    for start in range(0, customers, batch * 16):
        stop = min(start + batch * 16, customers)
        await asyncio.gather(*(one(s) for s in range(start, stop, batch)))
        if done >= next_sample or done >= customers:
            entries = await _metric(session, proc, "vellum_sidecar_memory_entries")
            sample = {
                "requested": done,
                "memory_entries": int(entries),
                "rss_mib": round(proc.rss_mib(), 1),
                "seconds": round(time.perf_counter() - started, 1),
            }
            samples.append(sample)
            say(f"  {done:>9,} customers  entries {int(entries):>7,}  RSS {sample['rss_mib']} MiB")
            next_sample = done + step
    return {
        "customers": customers,
        "samples": samples,
        "peak_rss_mib": round(proc.peak_rss_mib(), 1),
        "final_entries": samples[-1]["memory_entries"],
        "seconds": round(time.perf_counter() - started, 1),
    }


async def leak_phase(
    session: aiohttp.ClientSession, proc: Process, requests: int, say: Any
) -> dict[str, Any]:
    url = proc.url()
    # Warm up: fill the customers and open the keep-alive connections.
    for i in range(0, 1000, 100):
        checks = [{"customerId": f"leak_{j}", "module": "m"} for j in range(i, i + 100)]
        async with session.post(f"{url}/v1/check", json={"checks": checks}) as resp:
            await resp.read()
    fresh = aiohttp.TCPConnector(force_close=True, limit=16)
    errors = 0

    async with aiohttp.ClientSession(connector=fresh) as churn:

        async def worker(k: int, client: aiohttp.ClientSession, count: int) -> None:
            nonlocal errors
            for n in range(k, count // 2, 16):
                async with client.get(f"{url}/v1/customers/leak_{n % 1000}/can/m") as resp:
                    await resp.read()
                    errors += resp.status != 200

        async def round_of(count: int) -> None:
            await asyncio.gather(
                *(worker(k, session, count) for k in range(16)),
                *(worker(k, churn, count) for k in range(16)),
            )

        async def settled() -> int:
            # Connections closed by the clients are reaped by the server shortly
            # after: wait until the count holds still for half a second.
            deadline = time.monotonic() + 10
            last, still_since = _fds(proc.pid), time.monotonic()
            while time.monotonic() < deadline and time.monotonic() - still_since < 0.5:
                await asyncio.sleep(0.05)
                now = _fds(proc.pid)
                if now != last:
                    last, still_since = now, time.monotonic()
            return last

        # A first round opens the 16 keep-alive connections the baseline includes.
        await round_of(1000)
        fds_before = await settled()
        tasks_before = await _metric(session, proc, "vellum_sidecar_asyncio_tasks")
        rss_before = proc.rss_mib()
        started = time.perf_counter()
        await round_of(requests)
        seconds = time.perf_counter() - started
        fds_after = await settled()
    result = {
        "requests": requests,
        "errors": errors,
        "seconds": round(seconds, 1),
        "fds_before": fds_before,
        "fds_after": fds_after,
        "tasks_before": int(tasks_before),
        "tasks_after": int(await _metric(session, proc, "vellum_sidecar_asyncio_tasks")),
        "rss_before_mib": round(rss_before, 1),
        "rss_after_mib": round(proc.rss_mib(), 1),
    }
    say(
        f"  {requests:,} requests in {result['seconds']} s, errors {errors}; "
        f"fds {result['fds_before']} -> {result['fds_after']}, "
        f"tasks {result['tasks_before']} -> {result['tasks_after']}"
    )
    return result


async def run(customers: int, requests: int, max_entries: int) -> dict[str, Any]:
    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    workdir = tempfile.TemporaryDirectory(prefix="vellum-soak-")
    with workdir as tmp, Stack(Path(tmp), seed=False, push=False, sidecar=False) as stack:
        proc = stack.add_sidecar(
            "soak",
            SIDECAR_MEMORY_MAX_ENTRIES=str(max_entries),
            SIDECAR_UPSTREAM_TIMEOUT="30",
        )
        connector = aiohttp.TCPConnector(limit=16)
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            say(f"memory: {customers:,} distinct customers, cap {max_entries:,}")
            memory = await memory_phase(session, proc, customers, say)
            say(f"leaks: {requests:,} requests")
            leaks = await leak_phase(session, proc, requests, say)
        return {
            "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "memory_max_entries": max_entries,
            "memory": memory,
            "leaks": leaks,
        }


def table(r: dict[str, Any]) -> str:
    m, leak = r["memory"], r["leaks"]
    first, last = m["samples"][0], m["samples"][-1]
    rows = [
        ("distinct customers requested", f"{m['customers']:,}"),
        ("in-process entries at the end (cap)",
         f"{m['final_entries']:,} ({r['memory_max_entries']:,})"),
        (f"RSS after {first['requested']:,} / {last['requested']:,}",
         f"{first['rss_mib']} / {last['rss_mib']} MiB"),
        ("peak RSS", f"{m['peak_rss_mib']} MiB"),
        ("requests (half on new connections)", f"{leak['requests']:,}, {leak['errors']} errors"),
        ("open fds before / after", f"{leak['fds_before']} / {leak['fds_after']}"),
        ("asyncio tasks before / after", f"{leak['tasks_before']} / {leak['tasks_after']}"),
        ("RSS before / after", f"{leak['rss_before_mib']} / {leak['rss_after_mib']} MiB"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    lines = [f"| {'measure'.ljust(width)} | value |", f"|{'-' * (width + 2)}|---|"]
    lines += [f"| {k.ljust(width)} | {v} |" for k, v in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--max-entries", type=int, default=100_000)
    parser.add_argument("--json", type=Path, default=None, help="where to write the results")
    args = parser.parse_args(argv)
    results = asyncio.run(run(args.customers, args.requests, args.max_entries))
    print(table(results))
    path = args.json or Path("bench/results") / (
        "soak-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + ".json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    print(f"results: {path}", file=sys.stderr)
    ok = results["memory"]["final_entries"] <= args.max_entries and results["leaks"]["errors"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
