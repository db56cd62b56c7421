"""Load generators over loopback keep-alive connections.

- :func:`wrk` drives ``wrk`` (when installed) with a Lua script that rotates
  through the given requests and prints its summary as JSON.
- :func:`closed_loop` is the built-in generator: ``connections`` aiohttp
  keep-alive connections, each sending its next request as soon as the last
  answer arrived (what wrk does).
- :func:`paced` sends at a fixed rate (the latency-at-half-peak measurement):
  wrk cannot pace (its ``delay()`` releases every connection on the same
  millisecond tick, a burst the server then queues), so this one is built in,
  on raw keep-alive connections. Latency is measured from each request's
  actual send time; ``late_p99_ms`` says how far behind schedule it fell.

Every result carries the CPU the server used during the run (share of one
core), so a run limited by the generator rather than the server shows itself.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import aiohttp

__all__ = ["LoadResult", "Req", "closed_loop", "have_wrk", "paced", "percentile", "wrk"]


@dataclass(frozen=True)
class Req:
    method: str
    path: str
    body: bytes | None = None


@dataclass
class LoadResult:
    generator: str
    connections: int
    seconds: float
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    server_cpu: float | None = None
    target_rps: float | None = None
    late_p99_ms: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def _lua_string(s: str) -> str:
    level = "=" * 4
    assert f"]{level}]" not in s
    return f"[{level}[{s}]{level}]"


_WRK_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\\n@@BENCH@@{"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"errors":%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.status + e.timeout))
end
"""


def _wrk_script(requests: Sequence[Req]) -> str:
    lines = ["local reqs = {}", "local n = 0", "init = function(args)"]
    for r in requests:
        if r.body is None:
            lines.append(f"  reqs[#reqs + 1] = wrk.format({_lua_string(r.method)}, "
                         f"{_lua_string(r.path)})")  # fmt: skip
        else:
            lines.append(
                f"  reqs[#reqs + 1] = wrk.format({_lua_string(r.method)}, {_lua_string(r.path)}, "
                f'{{["Content-Type"] = "application/json"}}, {_lua_string(r.body.decode())})'
            )
    lines += [
        "  n = math.random(#reqs) - 1",
        "end",
        "request = function()",
        "  n = n % #reqs + 1",
        "  return reqs[n]",
        "end",
        _WRK_DONE,
    ]
    return "\n".join(lines)


async def wrk(
    base_url: str,
    requests: Sequence[Req],
    *,
    connections: int,
    duration: float,
    warmup: float,
    cpu: Callable[[], float] | None = None,
) -> LoadResult:
    """One wrk thread (the server gets the other core), after a warm-up run."""
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        script = Path(tmp) / "bench.lua"
        script.write_text(_wrk_script(requests))

        async def run(seconds: float) -> tuple[dict[str, Any], float, float]:
            argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(seconds, 1):.0f}s",
                    "--timeout", "5s", "-s", str(script), base_url]  # fmt: skip
            cpu0, t0 = (cpu() if cpu else 0.0), time.perf_counter()
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
            out, err = await proc.communicate()
            wall = time.perf_counter() - t0
            used = (cpu() - cpu0) if cpu else 0.0
            text = out.decode()
            if proc.returncode != 0 or "@@BENCH@@" not in text:
                raise RuntimeError(f"wrk failed ({proc.returncode}): {err.decode()}{text}")
            return json.loads(text.split("@@BENCH@@", 1)[1].splitlines()[0]), used, wall

        if warmup > 0:
            await run(warmup)
        summary, used, wall = await run(duration)
    seconds = summary["duration_us"] / 1e6
    return LoadResult(
        generator="wrk",
        connections=connections,
        seconds=seconds,
        requests=summary["requests"],
        rps=summary["requests"] / seconds,
        p50_ms=summary["p50_us"] / 1000,
        p99_ms=summary["p99_us"] / 1000,
        errors=summary["errors"],
        server_cpu=(used / wall) if cpu else None,
    )


def _session(connections: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    return aiohttp.ClientSession(
        connector=connector,
        headers={"Content-Type": "application/json"},
        skip_auto_headers=("Accept-Encoding", "User-Agent"),
        timeout=aiohttp.ClientTimeout(total=10),
    )


async def closed_loop(
    base_url: str,
    requests: Sequence[Req],
    *,
    connections: int,
    duration: float,
    warmup: float,
    cpu: Callable[[], float] | None = None,
) -> LoadResult:
    """``connections`` keep-alive connections, each busy all the time."""
    latencies: list[float] = []
    errors = 0
    count = 0
    loop = asyncio.get_running_loop()
    measuring = False
    stop_at = 0.0
    n = len(requests)

    async with _session(connections) as session:

        async def worker(offset: int) -> None:
            nonlocal errors, count
            i = offset
            now = loop.time()
            while not (measuring and now >= stop_at):
                r = requests[i % n]
                i += 1
                t0 = time.perf_counter()
                try:
                    async with session.request(r.method, base_url + r.path, data=r.body) as resp:
                        await resp.read()
                        ok = resp.status < 400
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                t1 = time.perf_counter()
                now = loop.time()
                if measuring and now < stop_at:
                    count += 1
                    latencies.append(t1 - t0)
                    if not ok:
                        errors += 1

        stride = max(n // connections, 1)
        tasks = [asyncio.ensure_future(worker(k * stride)) for k in range(connections)]
        await asyncio.sleep(warmup)
        measuring, started = True, loop.time()
        stop_at = started + duration
        cpu0 = cpu() if cpu else 0.0
        await asyncio.sleep(duration)
        used = (cpu() - cpu0) if cpu else 0.0
        await asyncio.gather(*tasks)
    latencies.sort()
    return LoadResult(
        generator="builtin",
        connections=connections,
        seconds=duration,
        requests=count,
        rps=count / duration,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        errors=errors,
        server_cpu=(used / duration) if cpu else None,
    )


class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection for :func:`paced`, as light as it gets.

    Requests are pre-encoded bytes; a response is complete once its headers and
    ``Content-Length`` bytes of body are in (the sidecar never chunks these).
    """

    def __init__(self, on_done: Callable[[_Conn, int, float], None]) -> None:
        self.on_done = on_done
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.sent_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they quack like one.
        self.transport = cast(asyncio.Transport, transport)

    def send(self, raw: bytes) -> None:
        assert self.transport is not None
        self.sent_at = time.perf_counter()
        self.transport.write(raw)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        length = _content_length(bytes(self.buf[:end]))
        if len(self.buf) < end + 4 + length:
            return
        status = int(self.buf[9:12])
        del self.buf[: end + 4 + length]
        self.on_done(self, status, time.perf_counter() - self.sent_at)


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise RuntimeError("paced: a response without Content-Length")


def _encode(base_url: str, r: Req) -> bytes:
    host = base_url.split("://", 1)[1].rstrip("/")
    head = f"{r.method} {r.path} HTTP/1.1\r\nHost: {host}\r\n"
    if r.body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(r.body)}\r\n"
    return (head + "\r\n").encode() + (r.body or b"")


async def paced(
    base_url: str,
    requests: Sequence[Req],
    *,
    rate: float,
    duration: float,
    connections: int = 32,
    cpu: Callable[[], float] | None = None,
) -> LoadResult:
    """Send at ``rate`` requests/s for ``duration`` seconds, on schedule (open loop).

    Not aiohttp's client: at ~10k requests/s it would take most of a core, and
    its own scheduling delays would read as server latency. This one sends
    pre-encoded requests on ``connections`` raw keep-alive connections, a few
    microseconds each. A request due while every connection is busy waits for
    one (its wait is ``late_p99_ms``, reported, not hidden); latency is measured
    from the actual send.
    """
    loop = asyncio.get_running_loop()
    raw = [_encode(base_url, r) for r in requests]
    host, port = base_url.split("://", 1)[1].rstrip("/").rsplit(":", 1)
    latencies: list[float] = []
    lateness: list[float] = []
    errors = 0
    idle: list[_Conn] = []
    backlog: list[tuple[bytes, float]] = []
    finished = loop.create_future()
    total = max(int(rate * duration), 1)
    completed = 0

    def on_done(conn: _Conn, status: int, latency: float) -> None:
        nonlocal errors, completed
        latencies.append(latency)
        completed += 1
        if status >= 400:
            errors += 1
        if completed >= total and not finished.done():
            finished.set_result(None)
        if backlog:
            body, due = backlog.pop(0)
            lateness.append(time.perf_counter() - due)
            conn.send(body)
        else:
            idle.append(conn)

    conns = []
    for _ in range(connections):
        _, proto = await loop.create_connection(lambda: _Conn(on_done), host, int(port))
        conns.append(proto)
    idle.extend(conns)
    cpu0 = cpu() if cpu else 0.0
    started = time.perf_counter()
    for k in range(total):
        due = started + k / rate
        wait = due - time.perf_counter()
        if wait > 0.0005:
            await asyncio.sleep(wait)
        body = raw[k % len(raw)]
        if idle:
            lateness.append(max(time.perf_counter() - due, 0.0))
            idle.pop().send(body)
        else:
            backlog.append((body, due))
    await asyncio.wait_for(finished, 30)
    elapsed = time.perf_counter() - started
    used = (cpu() - cpu0) if cpu else 0.0
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()
    latencies.sort()
    lateness.sort()
    return LoadResult(
        generator="builtin-paced",
        connections=connections,
        seconds=elapsed,
        requests=len(latencies),
        rps=len(latencies) / elapsed,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        errors=errors,
        server_cpu=(used / elapsed) if cpu else None,
        target_rps=rate,
        late_p99_ms=percentile(lateness, 0.99) * 1000,
    )
