"""The tiny clients' ``can`` against a raw request on the same kind of connection.

Each client runs in its own process, as an app would, against a live sidecar
(the bench's memory-hit sidecar), one call at a time on one keep-alive
connection:

- Python: ``SidecarClient.can`` vs the same ``GET`` sent with ``http.client``
  on one ``HTTPConnection`` (request, status, body read; no JSON parse).
- JS (``bench/clients.mjs``): ``SidecarClient.can`` vs ``node:http`` with a
  ``keepAlive`` Agent (request, status, body collected).

Both sides run in alternating rounds, so a burst of load elsewhere on the
machine hits both alike; each side's µs/call is the median of its rounds and
the ratio is the median of the rounds' ratios. ``python -m bench.clients
--url http://127.0.0.1:8700`` measures a running sidecar (the customer and
module must be allowed: ``--customer``, ``--module``).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

__all__ = ["js_row", "measure_python", "python_row"]

ROOT = Path(__file__).resolve().parent.parent
PYTHON_CLIENT = ROOT / "client" / "python"
JS_SCRIPT = Path(__file__).resolve().parent / "clients.mjs"


def _rounds(
    sides: dict[str, Callable[[], None]], calls: int, rounds: int
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """µs per call of each side per round (the sides take turns going first), and the
    CPU µs per call this process spent on each side over all rounds."""
    per_round = max(1, calls // rounds)
    names = list(sides)
    samples: dict[str, list[float]] = {name: [] for name in names}
    cpu = dict.fromkeys(names, 0.0)
    for name in names:  # warm-up: connections open, code paths hot
        for _ in range(max(1, per_round // 4)):
            sides[name]()
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            fn = sides[name]
            cpu_started = time.process_time_ns()
            started = time.perf_counter_ns()
            for _ in range(per_round):
                fn()
            samples[name].append((time.perf_counter_ns() - started) / per_round / 1000)
            cpu[name] += (time.process_time_ns() - cpu_started) / 1000
    return samples, {name: total / (per_round * rounds) for name, total in cpu.items()}


def summarize(
    samples: dict[str, list[float]], cpu: dict[str, float], calls: int, rounds: int
) -> dict[str, Any]:
    """The row: medians, the median of the rounds' ratios, and every round."""
    client, raw = samples["client"], samples["raw"]
    return {
        "calls": max(1, calls // rounds) * rounds,
        "rounds": rounds,
        "client_us": round(statistics.median(client), 1),
        "raw_us": round(statistics.median(raw), 1),
        "ratio": round(statistics.median(c / r for c, r in zip(client, raw, strict=True)), 3),
        "client_cpu_us": round(cpu["client"], 1),
        "raw_cpu_us": round(cpu["raw"], 1),
        "client_rounds_us": [round(x, 1) for x in client],
        "raw_rounds_us": [round(x, 1) for x in raw],
    }


def measure_python(
    url: str, customer: str, module: str, calls: int, rounds: int, client_dir: Path = PYTHON_CLIENT
) -> dict[str, Any]:
    """The Python row, in this process (``client_dir`` holds the client module to measure)."""
    sys.path.insert(0, str(client_dir))
    from vellum_sidecar_client import SidecarClient

    parts = urlsplit(url)
    path = f"/v1/customers/{quote(customer, safe='')}/can/{quote(module, safe='')}"
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=5)
    client = SidecarClient(url, timeout=5)

    def raw() -> None:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200 or not body:
            raise RuntimeError(f"raw request answered {resp.status}: {body!r}")

    def sdk() -> None:
        if client.can(customer, module) is not True:
            raise RuntimeError(f"client.can({customer!r}, {module!r}) is not True")

    try:
        samples, cpu = _rounds({"client": sdk, "raw": raw}, calls, rounds)
    finally:
        conn.close()
        client.close()
    return summarize(samples, cpu, calls, rounds) | {"python": sys.version.split()[0]}


async def _run_json(argv: Sequence[str], timeout: float) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"{argv[0]} {argv[1]}: no result within {timeout:g}s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} exited {proc.returncode}: {err.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


def _args(url: str, customer: str, module: str, calls: int, rounds: int) -> list[str]:
    return ["--url", url, "--customer", customer, "--module", module,
            "--calls", str(calls), "--rounds", str(rounds)]  # fmt: skip


async def python_row(
    url: str, customer: str, module: str, calls: int, rounds: int
) -> dict[str, Any]:
    """The Python row, measured in a fresh interpreter (as an app's process)."""
    argv = [sys.executable, "-m", "bench.clients", *_args(url, customer, module, calls, rounds)]
    return await _run_json(argv, timeout=600)


async def js_row(url: str, customer: str, module: str, calls: int, rounds: int) -> dict[str, Any]:
    """The JS row, measured by ``node bench/clients.mjs``."""
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is not installed: the JS client row needs Node 18+")
    argv = [node, str(JS_SCRIPT), *_args(url, customer, module, calls, rounds)]
    return await _run_json(argv, timeout=600)


def main(argv: Sequence[str] | None = None) -> int:
    doc = __doc__.split("\n\n")[0]
    p = argparse.ArgumentParser(prog="python -m bench.clients", description=doc)
    p.add_argument("--url", required=True, help="a running sidecar's local API")
    p.add_argument("--customer", default="cus_000000")
    p.add_argument("--module", default="reports")
    p.add_argument("--calls", type=int, default=20_000, help="measured calls per side")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument(
        "--client-dir",
        type=Path,
        default=PYTHON_CLIENT,
        help="the folder holding the vellum_sidecar_client.py to measure (e.g. an older copy)",
    )
    a = p.parse_args(argv)
    row = measure_python(a.url, a.customer, a.module, a.calls, a.rounds, a.client_dir)
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
