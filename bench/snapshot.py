"""``python -m bench.snapshot``: the local snapshot's costs on a real sidecar process.

1. **Load**: a snapshot file of ``--customers`` entitlement documents (default
   100,000) is made here; a sidecar started with it reports how long the load took
   (``vellum_sidecar_snapshot_load_seconds``) and its resident set afterwards,
   beside a sidecar started without one.
2. **Write**: the memory hit's latency (``can``, paced at ``--rate`` requests/s on
   keep-alive connections over ``--hot`` customers) while the sidecar writes its
   snapshot of those 100,000 customers back to back (a cache drop every 0.2 s
   keeps the layer changing, ``SIDECAR_SNAPSHOT_INTERVAL=1``), against the same
   sidecar with no write (the same drops, of customers it does not hold: nothing
   changes, nothing is written). It also reports how long a write takes and the
   share of the run spent writing.

``--strategies`` measures the write the other ways it could be done, for the
choice documented in docs/performance.md ("The local snapshot"): ``thread``
(the ids copied on the loop, entries encoded and written in a thread, which
competes for the GIL) and ``fork`` (a forked child encodes and writes a
copy-on-write image). Those sidecars run this module's ``--serve-strategy``,
which replaces ``Snapshotter.write`` and then runs ``vellum-sidecar serve``:
measurement code, not another mode of the sidecar.

Runs alternate within each repetition and the lowest p99 of each is kept (noise
from elsewhere only ever adds latency). Prints a table, writes JSON to
``bench/results/``; ``--smoke`` runs in seconds with tiny numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from sidecar.cache.entry import Entry
from sidecar.cache.kinds import ENTITLEMENTS
from sidecar.cache.snapshot import (
    Snapshotter,
    encode_lines,
    entry_line,
    header_line,
    write_file,
)
from tests.harness import Process, Sidecar, Stack

from . import __main__ as main_bench
from .load import LoadResult, Req, paced

TENANT = "bench"
STRATEGIES = ("thread", "fork")
#: How the fork strategy's child reports the memory it copied (its log line's prefix).
_FORK_DIRTY = "fork_child_private_dirty_kib="


def make_file(path: Path, customers: int) -> float:
    """A snapshot of ``customers`` entitlement documents, as the sidecar writes them
    (fresh for 300 s, stale for a day); the seconds it took to encode and write."""
    started = time.perf_counter()
    now = time.time()
    entries = (
        (
            ENTITLEMENTS,
            main_bench.cid(i),
            Entry.from_upstream(
                200,
                orjson.dumps(main_bench.entitlement_doc(i, exports=i % 2 == 0)),
                now=now,
                fresh_for=300,
                stale_for=86400,
            ),
        )
        for i in range(customers)
    )
    write_file(path, *encode_lines(TENANT, entries, now))
    return time.perf_counter() - started


async def _metrics(session: aiohttp.ClientSession, proc: Process) -> dict[str, float]:
    async with session.get(f"{proc.url('ops')}/metrics") as resp:
        text = await resp.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("vellum_sidecar_snapshot") and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


async def _drops(
    session: aiohttp.ClientSession, proc: Process, ids: Sequence[str], stop: asyncio.Event
) -> None:
    """A cache drop every 0.2 s, cycling through ``ids``."""
    n = 0
    while not stop.is_set():
        url = f"{proc.url()}/v1/customers/{ids[n % len(ids)]}/cache"
        async with session.delete(url) as resp:
            await resp.read()
        n += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)


async def _measure(
    session: aiohttp.ClientSession,
    proc: Process,
    requests: list[Req],
    rate: float,
    duration: float,
    drop_ids: Sequence[str],
) -> dict[str, Any]:
    before = await _metrics(session, proc)
    stop = asyncio.Event()
    dropper = asyncio.ensure_future(_drops(session, proc, drop_ids, stop))
    started = time.perf_counter()
    result: LoadResult = await paced(
        proc.url(), requests, rate=rate, duration=duration, cpu=proc.cpu_seconds
    )
    elapsed = time.perf_counter() - started
    stop.set()
    await dropper
    after = await _metrics(session, proc)
    key_sum = "vellum_sidecar_snapshot_write_duration_seconds_sum"
    key_count = "vellum_sidecar_snapshot_write_duration_seconds_count"
    writes = after.get(key_count, 0) - before.get(key_count, 0)
    busy = after.get(key_sum, 0) - before.get(key_sum, 0)
    return result.to_json() | {
        "writes": int(writes),
        "write_mean_s": round(busy / writes, 3) if writes else None,
        "writing_share": round(min(busy / elapsed, 1.0), 3),
    }


async def run(opts: argparse.Namespace) -> dict[str, Any]:
    def say(msg: str) -> None:
        print(f"bench.snapshot: {msg}", file=sys.stderr, flush=True)

    results: dict[str, Any] = {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": main_bench.machine(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "options": {
            "customers": opts.customers,
            "hot": opts.hot,
            "rate": opts.rate,
            "duration_s": opts.duration,
            "repeat": opts.repeat,
        },
    }
    strategies = ["chunked", *(STRATEGIES if opts.strategies else ())]
    with tempfile.TemporaryDirectory(prefix="vellum-bench-snapshot-") as tmp, Stack(
        Path(tmp), tenant=TENANT, seed=False, push=False, sidecar=False,
        SIDECAR_UPSTREAM_TIMEOUT=None,
    ) as stack:  # fmt: skip
        work = Path(tmp)
        seed_file = work / "seed.json"
        say(f"making a snapshot of {opts.customers:,} customers")
        made_s = make_file(seed_file, opts.customers)
        results["file"] = {
            "customers": opts.customers,
            "bytes": seed_file.stat().st_size,
            "made_in_s": round(made_s, 3),
        }
        assert stack.emulator is not None
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
            say(f"seeding {opts.hot} hot customers upstream")
            await main_bench.seed(session, stack.emulator, 0, opts.hot)
            bare = stack.add_sidecar("empty")
            results["rss_without_snapshot_mib"] = round(bare.rss_mib(), 1)
            bare.stop()
            procs: dict[str, Process] = {}
            for name in strategies:
                directory = work / name
                directory.mkdir()
                shutil.copy(seed_file, directory / "snapshot.json")
                settings = {
                    # paced() opens its connections up front and some stay unused for
                    # a whole run; past the header deadline (5 s) the sidecar closes
                    # a connection that never sent a request, and a later request
                    # sent on it would never be answered.
                    "SIDECAR_HEADER_TIMEOUT": "120",
                    # No refresh-ahead of the hot set during the runs: a refresh is a
                    # change, and the "no write" rows must change nothing.
                    "SIDECAR_CACHE_TTL": "3600",
                    "SIDECAR_SNAPSHOT_FILE": str(directory / "snapshot.json"),
                    "SIDECAR_SNAPSHOT_INTERVAL": "1",
                    "SIDECAR_MEMORY_MAX_ENTRIES": str(opts.customers + opts.hot),
                }
                say(f"starting the {name} sidecar (loads {opts.customers:,} customers)")
                proc = Sidecar(work, TENANT, stack.emulator_url, name=name,
                               **{**stack.settings, **settings})  # fmt: skip
                if name != "chunked":
                    proc.argv = [sys.executable, "-m", "bench.snapshot", "--serve-strategy", name]
                stack.add(proc)
                procs[name] = proc
                loaded = await _metrics(session, proc)
                results.setdefault("load", {})[name] = {
                    "entries": int(loaded["vellum_sidecar_snapshot_loaded_entries"]),
                    "seconds": round(loaded["vellum_sidecar_snapshot_load_seconds"], 3),
                    "rss_mib": round(proc.rss_mib(), 1),
                    "peak_rss_mib": round(proc.peak_rss_mib(), 1),
                }
            try:
                results["paced"] = await _paced_rows(session, procs, strategies, opts, say)
            except BaseException:
                say(f"failed; the processes' logs:\n{stack.logs()}")
                raise
            if "fork" in procs:
                copied = [
                    int(line.split("=", 1)[1])
                    for line in procs["fork"].output().splitlines()
                    if line.startswith(_FORK_DIRTY)
                ]
                results["fork_child_copied_mib"] = round(max(copied, default=0) / 1024, 1)
    results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return results


async def _paced_rows(
    session: aiohttp.ClientSession,
    procs: dict[str, Process],
    strategies: list[str],
    opts: argparse.Namespace,
    say: Callable[[str], None],
) -> dict[str, Any]:
    requests = main_bench.hot_requests(opts.hot)
    hot_ids = [main_bench.cid(i) for i in range(opts.hot)]
    absent = [f"not_cached_{i}" for i in range(opts.hot)]
    for each in procs.values():  # the hot set answers from memory from now on
        await main_bench._bounded([_reader(session, each, r) for r in requests], concurrency=32)
    for each in procs.values():
        await _settled(session, each)
    runs: dict[str, list[dict[str, Any]]] = {"no_write": []}
    runs |= {name: [] for name in strategies}
    for rep in range(opts.repeat):
        for name in runs:
            measured = procs["chunked" if name == "no_write" else name]
            say(f"{name}: {opts.rate:g} req/s for {opts.duration:g} s "
                f"({rep + 1}/{opts.repeat})")  # fmt: skip
            drop_ids = absent if name == "no_write" else hot_ids
            row = await _measure(session, measured, requests, opts.rate, opts.duration, drop_ids)
            runs[name].append(row)
    return {
        name: min(rs, key=lambda r: r["p99_ms"])
        | {"all_p99_ms": [round(r["p99_ms"], 3) for r in rs]}
        for name, rs in runs.items()
    }


async def _settled(session: aiohttp.ClientSession, proc: Process) -> None:
    """Until the writes the warm-up caused are done: the write count holds still for
    two intervals (the "no write" rows must write nothing)."""
    key = 'vellum_sidecar_snapshot_writes_total{result="ok"}'
    last = (await _metrics(session, proc)).get(key, 0.0)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        await asyncio.sleep(2.0)
        now = (await _metrics(session, proc)).get(key, 0.0)
        if now == last:
            return
        last = now
    raise RuntimeError(f"{proc.name} kept writing its snapshot with nothing changing")


def _reader(session: aiohttp.ClientSession, proc: Process, req: Req) -> Callable[[], Any]:
    async def job() -> None:
        async with session.get(proc.url() + req.path) as resp:
            await resp.read()

    return job


def table(r: dict[str, Any]) -> str:
    f, o = r["file"], r["options"]
    load = r["load"]["chunked"]
    lines = [
        f"Load average before {r['load_average_before']}, after {r['load_average_after']}; "
        f"{r['machine']['cores']} cores, Python {r['machine']['python']}, "
        f"{r['machine']['event_loop']}.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| snapshot of {f['customers']:,} customers | {f['bytes'] / 1e6:.1f} MB |",
        f"| load at start ({load['entries']:,} entries) | {load['seconds']:.2f} s |",
        f"| RSS after the load (peak during it) / without a snapshot | {load['rss_mib']:.0f} "
        f"({load['peak_rss_mib']:.0f}) / {r['rss_without_snapshot_mib']:.0f} MiB |",
        "",
        f"Memory hit (`can`) paced at {o['rate']:g} req/s over {o['hot']:,} customers, "
        f"{o['duration_s']:g} s per run, lowest p99 of {o['repeat']}:",
        "",
        "| while | p50 ms | p99 ms | writes | mean write s | share of the run writing |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    labels = {
        "no_write": "no snapshot write",
        "chunked": "writing: on the loop, 1 ms slices and pauses, I/O in a thread (shipped)",
        "thread": "writing: encoded and written in a thread",
        "fork": "writing: a forked child encodes and writes",
    }
    if "fork_child_copied_mib" in r:
        labels["fork"] += f" (the child copied up to {r['fork_child_copied_mib']:.0f} MiB)"
    for name, row in r["paced"].items():
        mean = f"{row['write_mean_s']:.2f}" if row["write_mean_s"] is not None else "-"
        lines.append(
            f"| {labels[name]} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['writes']} "
            f"| {mean} | {row['writing_share'] * 100:.0f} % |"
        )
    return "\n".join(lines)


# -- the alternative strategies, run inside a sidecar process ------------------------------


async def _thread_write(self: Snapshotter) -> bool:
    started = time.perf_counter()
    now = time.time()
    views = [(c.kind, c.memory.data, list(dict.keys(c.memory.data))) for c in self.caches.all]

    def work() -> tuple[int, int]:
        lines = [header_line(self.tenant, now)]
        for kind, data, idents in views:
            for ident in idents:
                entry = data.get(ident)
                if entry is not None and now < entry.stale_until:
                    lines.append(entry_line(kind, ident, entry))
        return write_file(self.path, lines, len(lines) - 1), len(lines) - 1

    size, entries = await asyncio.get_running_loop().run_in_executor(None, work)
    _record(self, started, entries, size)
    return True


async def _fork_write(self: Snapshotter) -> bool:
    started = time.perf_counter()
    now = time.time()
    pid = os.fork()
    if pid == 0:  # the child: a copy-on-write image of the layer as it is now
        code = 1
        try:
            items = [
                (cache.kind, ident, entry)
                for cache in self.caches.all
                for ident, entry in dict.items(cache.memory.data)
                if now < entry.stale_until
            ]
            lines = (entry_line(kind, ident, entry) for kind, ident, entry in items)
            # Streamed: the child allocates little of its own, so its private memory
            # is what it had to copy (reading an entry writes its reference count).
            write_file(self.path, itertools.chain([header_line(self.tenant, now)], lines),
                       len(items))  # fmt: skip
            print(f"{_FORK_DIRTY}{_private_dirty_kib()}", file=sys.stderr, flush=True)
            code = 0
        finally:
            os._exit(code)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222 - WNOHANG: never blocks
        if done:
            break
        await asyncio.sleep(0.005)
    _record(self, started, 0, 0)
    return status == 0


def _private_dirty_kib() -> int:
    with open("/proc/self/smaps_rollup", encoding="ascii") as f:
        for line in f:
            if line.startswith("Private_Dirty:"):
                return int(line.split()[1])
    return 0


def _record(self: Snapshotter, started: float, entries: int, size: int) -> None:
    m = self.metrics
    m.snapshot_writes.labels("ok").inc()
    m.snapshot_write_seconds.observe(time.perf_counter() - started)
    m.snapshot_entries.set(entries)
    m.snapshot_bytes.set(size)


def serve_strategy(name: str) -> int:
    from sidecar.__main__ import main as sidecar_main

    Snapshotter.write = _thread_write if name == "thread" else _fork_write  # type: ignore[method-assign]
    return sidecar_main(["serve"])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.snapshot", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--smoke", action="store_true", help="tiny and fast (tests)")
    p.add_argument("--customers", type=int, help="customers in the snapshot (default 100000)")
    p.add_argument("--hot", type=int, help="customers the paced load reads (default 1000)")
    p.add_argument("--rate", type=float, help="paced requests/s (default 1000)")
    p.add_argument("--duration", type=float, help="seconds per paced run (default 10)")
    p.add_argument("--repeat", type=int, help="runs per row, lowest p99 kept (default 3)")
    p.add_argument("--strategies", action="store_true", help="also measure thread and fork")
    p.add_argument("--json", type=Path, default=None, help="where to write the results")
    p.add_argument("--serve-strategy", choices=STRATEGIES, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.serve_strategy:
        return serve_strategy(a.serve_strategy)

    def pick(value: Any, full: Any, smoke: Any) -> Any:
        return value if value is not None else (smoke if a.smoke else full)

    a.customers = pick(a.customers, 100_000, 2_000)
    a.hot = pick(a.hot, 1000, 20)
    a.rate = pick(a.rate, 1000.0, 100.0)
    a.duration = pick(a.duration, 10.0, 2.5)
    a.repeat = pick(a.repeat, 3, 1)
    results = asyncio.run(run(a))
    print(table(results))
    path = a.json
    if path is None and not a.smoke:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path(__file__).parent / "results" / f"snapshot-{stamp}.json"
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"results written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
