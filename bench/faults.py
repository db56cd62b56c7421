"""``python -m bench.faults``: hostile clients and faults against two real sidecars.

Starts its own ``redis-server``, the emulator and two sidecars sharing that
Redis, all on free loopback ports, and runs, each under a steady load of
legitimate reads (the built-in generator: keep-alive connections to both
sidecars, every answer checked against the data seeded in the emulator):

hostile clients (issue 14)
    ``slowloris`` half request lines and ``silent`` sockets on all three
    listeners, ``slow_body`` (a body one byte at a time), a ``flood`` of idle
    sockets on the public webhook port, ``cross_site`` requests as an
    ``<img>`` tag sends them, a DNS-``rebinding`` Host on the ops port,
    ``long_ids`` (two 512-character ids of 4-byte UTF-8 in one path) and a
    ``batch`` of unknown customers against a slow upstream;
isolation (issue 21, one case per row of its table)
    ``slow_pushes`` (slow bodies flooding the webhook port while the
    upstream's sender pushes), ``slow_probes`` (the same on ops, with probes),
    ``streams`` (OFREP event streams by the thousand, then cached reads),
    ``waiting_misses`` (a thousand misses on a 4 s upstream, then cached
    reads), ``replay_flood`` (authentic events by the thousand: Redis keys),
    ``collection_paths``, ``escape_forms``, ``trace`` and ``allow_405``;
faults
    ``redis_killed`` (SIGKILL, then a new server on the same port),
    ``redis_hung`` (SIGSTOP, then SIGCONT), ``upstream_down`` (the emulator
    killed, then restarted), ``key_refused`` (the upstream refuses the key,
    then accepts it again) and ``sigterm`` (one sidecar stopped under load);
coherence (issue 20)
    ``queued_drop_killed`` (a push acknowledged while Redis hangs, its sidecar
    SIGKILLed before Redis answers), ``lost_writes`` (Redis restarted from a
    snapshot taken before a push), ``emptied_upstream_down`` (the upstream down,
    then Redis restarted empty) and ``tenant_drop_upstream_down`` (the upstream
    down, then everything dropped): reads of the old document later than 2 s
    after Redis answered, and non-2xx reads of cached customers.

For each it prints the legitimate requests, how many were answered non-2xx,
answered wrong, or not answered at all, plus what the case measures (how
long hostile sockets lived, how fast ``/readyz`` showed the fault). Every run
is bounded: ``--duration`` seconds per fault run, the sidecars' own deadlines
for the hostile cases. ``--smoke`` runs everything with tiny sizes and short
deadlines (what the test suite does).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import resource
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
import orjson
from yarl import URL

from sidecar.signature import sign
from tests.harness import (
    API_KEY,
    WEBHOOK_SECRET,
    Emulator,
    Process,
    RedisServer,
    Sidecar,
    free_port,
    slow_body,
)

__all__ = ["main", "run"]

TENANT = "bench"
MODULES = ("reports", "exports", "api")


@dataclass
class Options:
    smoke: bool
    duration: float
    connections: int
    customers: int
    sockets: int
    batch: int
    json_path: Path | None
    #: Streams and misses of the isolation cases (the issue's 1,100).
    crowd: int = 1100
    cases: frozenset[str] | None = None

    def wants(self, name: str) -> bool:
        return self.cases is None or name in self.cases


def _parse(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="every case, tiny and fast (tests)")
    p.add_argument("--duration", type=float, help="seconds per fault run (default 8)")
    p.add_argument("--connections", type=int, help="legitimate keep-alive connections (default 8)")
    p.add_argument("--customers", type=int, help="customers seeded and read (default 200)")
    p.add_argument("--sockets", type=int, help="hostile sockets per listener (default 200)")
    p.add_argument("--batch", type=int, help="unknown customers in the batch case (default 1000)")
    p.add_argument("--crowd", type=int,
                   help="event streams, and misses on a slow upstream (default 1100)")  # fmt: skip
    p.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = p.parse_args(argv)

    def pick(value: Any, full: Any, smoke: Any) -> Any:
        return value if value is not None else (smoke if a.smoke else full)

    return Options(
        smoke=a.smoke,
        duration=pick(a.duration, 8.0, 3.0),
        connections=pick(a.connections, 8, 4),
        customers=pick(a.customers, 200, 30),
        sockets=pick(a.sockets, 200, 20),
        batch=pick(a.batch, 1000, 100),
        json_path=a.json,
        crowd=pick(a.crowd, 1100, 120),
        cases=frozenset(c.strip() for c in a.cases.split(",")) if a.cases else None,
    )


# -- the processes (tests/harness.py) ---------------------------------------------------


class Rig:
    """Redis, the emulator and sidecars ``a`` and ``b``, and the faults done to them."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = env
        self.sidecars: dict[str, Sidecar] = {}
        self.redis = RedisServer(workdir)
        self.emulator_port = free_port()
        self.emulator: Emulator | None = None
        #: A second emulator whose only job is to push, signed, to sidecar a (the
        #: upstream's sender: three tries back to back).
        self.pusher: Emulator | None = None

    def start_pusher(self) -> None:
        self.pusher = Emulator(self.workdir, TENANT, seed=False, name="pusher",
                               webhook_url=self.sidecars["a"].webhook_url)  # fmt: skip
        self.pusher.start()

    def start_upstream(self) -> None:
        self.redis.start()
        self.start_emulator()

    def start_sidecars(self, upstream_url: str) -> None:
        for name in ("a", "b"):
            # The harness's test defaults dropped: the upstream checks run (key_refused
            # on warm sidecars needs them) and SIGTERM gets the default grace.
            sidecar = Sidecar(
                self.workdir, TENANT, upstream_url, name=name,
                SIDECAR_REDIS_URL=self.redis.url, SIDECAR_UPSTREAM_CHECK_INTERVAL=None,
                SIDECAR_SHUTDOWN_GRACE=None, **self.env,
            )  # fmt: skip
            self.sidecars[name] = sidecar
            sidecar.start()

    def close(self) -> None:
        """Stop every process, the sidecars first; raise the first failure after."""
        failure: BaseException | None = None
        procs: list[Process] = [*self.sidecars.values()]
        for emulator in (self.emulator, self.pusher):
            if emulator is not None:
                procs.append(emulator)
        for proc in procs:
            try:
                proc.stop()
            except Exception as exc:  # keep stopping the others
                failure = failure or exc
        if self.redis.process.running:
            self.redis.kill()  # SIGKILL: a paused server goes too
        if failure is not None:
            raise failure

    @property
    def emulator_url(self) -> str:
        return f"http://127.0.0.1:{self.emulator_port}"

    def kill_redis(self) -> None:
        self.redis.kill()

    def restart_redis(self) -> None:
        """A new redis-server on the killed one's port (the sidecars' URL): empty, unless a
        case saved a snapshot it loads."""
        self.redis.start()

    def pause_redis(self) -> None:
        self.redis.pause()

    def resume_redis(self) -> None:
        self.redis.resume()

    def kill_emulator(self) -> None:
        assert self.emulator is not None
        self.emulator.kill()

    def start_emulator(self, api_key: str = API_KEY) -> None:
        """The emulator (again), on its port, accepting ``api_key`` (its data is gone).

        No pushes: the cases change data through the emulator's admin API only."""
        emulator = Emulator(self.workdir, TENANT, port=self.emulator_port, seed=False)
        emulator.env["EMULATOR_API_KEYS"] = api_key
        self.emulator = emulator
        emulator.start()

    def terminate(self, name: str) -> Sidecar:
        proc = self.sidecars[name]
        proc.send_signal(signal.SIGTERM)
        return proc


class Gate:
    """A TCP forwarder in front of the emulator: the sidecars' upstream address.

    Closing it is the upstream going down (connections refused, open ones
    reset) without losing the emulator's data, so nothing is answered from a
    half-seeded upstream when it comes back.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._pipe, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        # The open pipes go before waiting: since Python 3.12.1 ``wait_closed``
        # waits for every connection the server accepted, and the sidecars'
        # keep-alive connections would hold it forever.
        for writer in list(self._pipes):
            writer.transport.abort()
        self._pipes.clear()
        if server is not None:
            await server.wait_closed()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        if self._server is None:  # closed while this one was connecting
            writer.transport.abort()
            up_writer.transport.abort()
            return
        self._pipes.update((writer, up_writer))

        async def relay(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(relay(reader, up_writer), relay(up_reader, writer))
        self._pipes.difference_update((writer, up_writer))


# -- data ---------------------------------------------------------------------------------


def cid(i: int) -> str:
    return f"cus_{i:05d}"


def modules_of(i: int) -> list[str]:
    return ["reports", "exports"] if i % 2 == 0 else ["reports"]


async def seed(session: aiohttp.ClientSession, rig: Rig, customers: int) -> None:
    base = f"{rig.emulator_url}/_emulator/tenants/{TENANT}/customers"
    sem = asyncio.Semaphore(16)

    async def put(i: int) -> None:
        doc = {"status": "active", "modules": modules_of(i), "config": {"seats": 1 + i % 9}}
        async with sem, session.put(f"{base}/{cid(i)}/entitlements", json=doc) as resp:
            if resp.status != 200:
                raise RuntimeError(f"seeding {cid(i)}: {resp.status}")

    await asyncio.gather(*(put(i) for i in range(customers)))


async def admin(session: aiohttp.ClientSession, rig: Rig, method: str, path: str,
                body: Any = None) -> Any:  # fmt: skip
    async with session.request(method, f"{rig.emulator_url}/_emulator{path}", json=body) as resp:
        raw = await resp.read()
        if resp.status >= 300:
            raise RuntimeError(f"emulator {method} {path}: {resp.status} {raw[:200]!r}")
        return orjson.loads(raw) if raw else None


# -- the legitimate load --------------------------------------------------------------------


@dataclass
class Tally:
    requests: int = 0
    non_2xx: int = 0
    wrong: int = 0
    #: Sent and never answered (reset, closed, timed out): what a client sees as an outage.
    unanswered: int = 0
    #: Refused at connect once a stopped sidecar had closed its listener.
    refused_after_exit: int = 0
    #: What the unanswered ones failed with, by exception class.
    unanswered_by: dict[str, int] = field(default_factory=dict)
    #: The non-2xx answers by status and error code (``"503 upstream_unavailable"``).
    non_2xx_by: dict[str, int] = field(default_factory=dict)

    def add(self, other: Tally) -> None:
        self.requests += other.requests
        self.non_2xx += other.non_2xx
        self.wrong += other.wrong
        self.unanswered += other.unanswered
        self.refused_after_exit += other.refused_after_exit
        for kind, n in other.unanswered_by.items():
            self.unanswered_by[kind] = self.unanswered_by.get(kind, 0) + n
        for kind, n in other.non_2xx_by.items():
            self.non_2xx_by[kind] = self.non_2xx_by.get(kind, 0) + n

    def refused(self, status: int, body: bytes) -> None:
        """One non-2xx answer, kept by its status and the envelope's error code."""
        self.non_2xx += 1
        try:
            code = orjson.loads(body)["error"]["code"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            code = "?"
        kind = f"{status} {code}"
        self.non_2xx_by[kind] = self.non_2xx_by.get(kind, 0) + 1

    def failed(self, exc: BaseException) -> None:
        self.requests += 1
        self.unanswered += 1
        kind = type(exc).__name__
        self.unanswered_by[kind] = self.unanswered_by.get(kind, 0) + 1


@dataclass
class Load:
    """Keep-alive readers on both sidecars until ``stop`` is set; every answer checked."""

    rig: Rig
    customers: int
    connections: int
    #: The sidecars read (default: all of them).
    names: Sequence[str] | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    stopping: set[str] = field(default_factory=set)  # sidecars sent SIGTERM
    tallies: dict[str, Tally] = field(default_factory=dict)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        names = list(self.names or self.rig.sidecars)
        for n in range(self.connections):
            name = names[n % len(names)]
            self._tasks.append(asyncio.ensure_future(self._worker(name, n)))

    async def finish(self) -> Tally:
        self.stop.set()
        await asyncio.gather(*self._tasks)
        total = Tally()
        for tally in self.tallies.values():
            total.add(tally)
        return total

    async def _worker(self, name: str, n: int) -> None:
        tally = self.tallies.setdefault(name, Tally())
        url = self.rig.sidecars[name].url()
        rng = random.Random(n)
        timeout = aiohttp.ClientTimeout(total=3)
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            while not self.stop.is_set():
                i = rng.randrange(self.customers)
                module = rng.choice(MODULES)
                try:
                    async with session.get(f"{url}/v1/customers/{cid(i)}/can/{module}") as resp:
                        body = await resp.read()
                except aiohttp.ClientConnectorError as exc:
                    if name in self.stopping:
                        tally.refused_after_exit += 1
                        return  # the app would stop using it too
                    tally.failed(exc)
                    await asyncio.sleep(0.05)
                    continue
                except (aiohttp.ClientError, TimeoutError) as exc:
                    tally.failed(exc)
                    continue
                tally.requests += 1
                if resp.status != 200:
                    tally.refused(resp.status, body)
                elif orjson.loads(body).get("allowed") is not (module in modules_of(i)):
                    tally.wrong += 1


async def warm(session: aiohttp.ClientSession, rig: Rig, customers: int) -> None:
    """Every customer read once through each sidecar: the load reads known customers."""
    for proc in rig.sidecars.values():
        for i in range(customers):
            async with session.get(f"{proc.url()}/v1/customers/{cid(i)}/can/reports") as resp:
                if resp.status != 200:
                    raise RuntimeError(f"warming {cid(i)} on {proc.name}: {resp.status}")


# -- readiness watch ------------------------------------------------------------------------


class ReadyWatch:
    """Polls a sidecar's /readyz every 20 ms, remembering when each state was first seen."""

    def __init__(self, proc: Sidecar) -> None:
        self.url = f"{proc.url('ops')}/readyz"
        self.seen: list[tuple[float, int, dict[str, Any]]] = []
        self._task: asyncio.Task[None] | None = None
        self._polled = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._poll())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _poll(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as session:
            while True:
                try:
                    async with session.get(self.url) as resp:
                        self.seen.append((time.monotonic(), resp.status, await resp.json()))
                except (aiohttp.ClientError, TimeoutError, ValueError):
                    self.seen.append((time.monotonic(), 0, {}))
                self._polled.set()
                await asyncio.sleep(0.02)

    async def shown(
        self, since: float, test: Callable[[int, dict[str, Any]], bool], timeout: float
    ) -> None:
        """Until an answer since ``since`` passes ``test``, or ``timeout`` seconds."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self.first(since, test) is None:
                    self._polled.clear()
                    await self._polled.wait()

    def first(self, since: float, test: Callable[[int, dict[str, Any]], bool]) -> float | None:
        """Seconds from ``since`` to the first answer passing ``test`` (None: never)."""
        for at, status, body in self.seen:
            if at >= since and test(status, body):
                return round(at - since, 3)
        return None


# -- hostile clients ------------------------------------------------------------------------


async def _hold(port: int, payload: bytes, limit: float) -> tuple[float, bytes, float]:
    """Open a socket, send ``payload``, read until the server closes it (or ``limit`` s).

    Returns how long the connection lived once open, what came back, and how
    long the connect itself waited (a listener at its backlog leaves SYNs to
    the kernel's retries: the flood waits there, costing the sidecar nothing).
    """
    started = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), limit)
    except (OSError, TimeoutError):
        return 0.0, b"refused", time.monotonic() - started
    opened = time.monotonic()
    writer.write(payload)
    answer = b""
    with contextlib.suppress(TimeoutError, ConnectionError):
        answer = await asyncio.wait_for(reader.read(4096), limit)
        with contextlib.suppress(TimeoutError):
            while await asyncio.wait_for(reader.read(4096), limit):
                pass
    writer.close()
    return time.monotonic() - opened, answer, opened - started


async def _drip(port: int, head: bytes, every: float, limit: float) -> tuple[float, bytes]:
    """A body one byte every ``every`` seconds, until the server answers or closes."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    reading = asyncio.ensure_future(reader.read(4096))
    while not reading.done() and time.monotonic() - started < limit:
        done, _ = await asyncio.wait([reading], timeout=every)
        if not done and not writer.is_closing():
            writer.write(b" ")
    answer = reading.result() if reading.done() and not reading.exception() else b""
    reading.cancel()
    writer.close()
    return time.monotonic() - started, answer


def _statuses(answers: Sequence[bytes]) -> dict[str, int]:
    out: dict[str, int] = {}
    for answer in answers:
        key = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "closed"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


async def _sockets(rig: Rig, opts: Options, payload: bytes, limit: float) -> dict[str, Any]:
    a = rig.sidecars["a"]
    jobs = [
        _hold(a.ports[listener], payload, limit)
        for listener in ("local", "webhooks", "ops")
        for _ in range(opts.sockets)
    ]
    results = await asyncio.gather(*jobs)
    lived = sorted(r[0] for r in results)
    return {
        "sockets": len(jobs),
        "median_open_s": round(lived[len(lived) // 2], 2),
        "longest_open_s": round(lived[-1], 2),
        "answers": _statuses([r[1] for r in results]),
        "longest_connect_wait_s": round(max(r[2] for r in results), 2),
    }


async def case_slowloris(rig: Rig, opts: Options, header_timeout: float) -> dict[str, Any]:
    """Half a request line on every socket, never finished."""
    return await _sockets(rig, opts, b"GET /v1/customers/cus_1/ca", header_timeout * 3)


async def case_silent(rig: Rig, opts: Options, header_timeout: float) -> dict[str, Any]:
    """Sockets that never send a byte."""
    return await _sockets(rig, opts, b"", header_timeout * 3)


async def case_slow_body(rig: Rig, opts: Options, every: float, body_timeout: float
                         ) -> dict[str, Any]:  # fmt: skip
    a = rig.sidecars["a"]
    heads = {
        "local": b"POST /v1/check HTTP/1.1\r\nHost: 127.0.0.1\r\n",
        "webhooks": b"POST /webhooks/vellum HTTP/1.1\r\nHost: 127.0.0.1\r\n",
    }
    count = max(opts.sockets // 10, 2)
    jobs = [
        _drip(a.ports[name], head + b"Content-Length: 1000\r\n\r\n{", every, body_timeout + 10)
        for name, head in heads.items()
        for _ in range(count)
    ]
    results = await asyncio.gather(*jobs)
    return {"sockets": len(jobs), "byte_every_s": every,
            "longest_open_s": round(max(r[0] for r in results), 2),
            "answers": _statuses([r[1] for r in results])}  # fmt: skip


async def case_flood(session: aiohttp.ClientSession, rig: Rig, opts: Options,
                     header_timeout: float) -> dict[str, Any]:  # fmt: skip
    """Idle sockets by the hundred on the public webhook port, held past the header deadline."""
    a = rig.sidecars["a"]
    refused = "vellum_sidecar_connections_refused_total"
    before = await _metric(session, a, refused, 'listener="webhooks"')
    count = opts.sockets + 100
    sockets = []
    for _ in range(count):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", a.ports["webhooks"]))
        sockets.append(s)
    most_open = 0.0
    ends = time.monotonic() + header_timeout + 1
    while time.monotonic() < ends:  # sampled while the legitimate load runs
        open_now = await _metric(session, a, "vellum_sidecar_open_connections",
                                 'listener="webhooks"')  # fmt: skip
        most_open = max(most_open, open_now)
        await asyncio.sleep(0.1)
    cut = await _metric(session, a, refused, 'listener="webhooks"') - before
    for s in sockets:
        s.close()
    return {"idle_sockets": count, "most_webhook_connections_open": int(most_open),
            "cut_or_refused": int(cut)}  # fmt: skip


_BROWSER = {
    "Sec-Fetch-Site": "cross-site",
    "Sec-Fetch-Mode": "no-cors",
    "Sec-Fetch-Dest": "image",
    "Referer": "https://evil.example/page",
}


async def case_cross_site(session: aiohttp.ClientSession, rig: Rig, opts: Options
                          ) -> dict[str, Any]:  # fmt: skip
    a = rig.sidecars["a"]
    fetches = f"/requests?operation=get_entitlements&tenant={TENANT}"
    before = len((await admin(session, rig, "GET", fetches))["requests"])
    statuses: dict[int, int] = {}
    for n in range(50):
        url = f"{a.url()}/v1/customers/stranger_{n}/can/reports"
        async with session.get(url, headers=_BROWSER) as resp:
            statuses[resp.status] = statuses.get(resp.status, 0) + 1
    after = len((await admin(session, rig, "GET", fetches))["requests"])
    return {"requests": 50, "answers": statuses, "upstream_calls": after - before}


async def case_rebinding(session: aiohttp.ClientSession, rig: Rig) -> dict[str, Any]:
    a = rig.sidecars["a"]
    statuses: dict[str, int] = {}
    for path in ("/metrics", "/readyz") * 10:
        async with session.get(f"{a.url('ops')}{path}",
                               headers={"Host": "rebind.attacker.example"}) as resp:  # fmt: skip
            statuses[str(resp.status)] = statuses.get(str(resp.status), 0) + 1
    async with session.get(f"{a.url('ops')}/readyz", headers={"Host": "10.0.0.7:9700"}) as resp:
        probe = resp.status
    return {"answers": statuses, "pod_ip_probe": probe}


async def case_long_ids(rig: Rig) -> dict[str, Any]:
    a = rig.sidecars["a"]
    long_id = "%F0%9F%98%80" * 512
    request = (f"GET /v1/customers/{long_id}/can/{long_id} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               "Connection: close\r\n\r\n").encode()  # fmt: skip
    reader, writer = await asyncio.open_connection("127.0.0.1", a.ports["local"])
    writer.write(request)
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    too_long = b"GET /v1/customers/" + b"x" * 40_000 + b"/can/m HTTP/1.1\r\n\r\n"
    _, refused, _ = await _hold(a.ports["local"], too_long, 10)
    return {"request_line_bytes": len(request.split(b"\r\n")[0]),
            "answers": _statuses([answer]), "over_limit": _statuses([refused]),
            "over_limit_json": b"application/json" in refused}  # fmt: skip


async def case_batch(session: aiohttp.ClientSession, rig: Rig, opts: Options,
                     upstream_timeout: float) -> dict[str, Any]:  # fmt: skip
    a = rig.sidecars["a"]
    await admin(session, rig, "POST", "/faults", {"operation": "get_entitlements", "delay": 1})
    checks = [{"customerId": f"unknown_{n}", "module": "reports"} for n in range(opts.batch)]
    started = time.monotonic()
    try:
        async with session.post(f"{a.url()}/v1/check", json={"checks": checks}) as resp:
            body = await resp.json()
            status = resp.status
    finally:
        await admin(session, rig, "DELETE", "/faults")
    took = time.monotonic() - started
    results = body.get("results", [])
    return {"checks": opts.batch, "status": status, "seconds": round(took, 2),
            "deadline_s": upstream_timeout,
            "timeouts": sum(1 for r in results if r.get("error") == "timeout"),
            "answered": sum(1 for r in results if "error" not in r),
            # Any other error by code (a slow upstream on a busy machine can open the
            # breaker: "upstream_unavailable").
            "other_errors": _counts(r["error"] for r in results
                                    if r.get("error") not in (None, "timeout"))}  # fmt: skip


# -- isolation (issue 21) ----------------------------------------------------------------------

REFUSED: Final = "vellum_sidecar_connections_refused_total"


async def _cap(proc: Sidecar, listener: str) -> int:
    async with aiohttp.ClientSession() as session:
        found = await _metric(session, proc, "vellum_sidecar_connection_limit",
                              f'listener="{listener}"')  # fmt: skip
    return int(found)


async def _until_full(proc: Sidecar, listener: str, cap: int, limit: float) -> int:
    """Until the listener holds its cap (or ``limit`` s); the most it held. Each scrape
    on a new connection: a kept-alive one may be closed for room on a full listener."""
    most = 0.0
    ends = time.monotonic() + limit
    while time.monotonic() < ends and most < cap:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as fresh:
                held = await _metric(fresh, proc, "vellum_sidecar_open_connections",
                                     f'listener="{listener}"')  # fmt: skip
                most = max(most, held)
        await asyncio.sleep(0.05)  # the poll's pace
    return int(most)


async def case_slow_pushes(session: aiohttp.ClientSession, rig: Rig, opts: Options
                           ) -> dict[str, Any]:  # fmt: skip
    """Slow bodies flood the public webhook port (a byte every 0.5 s, reconnecting when
    cut) while the upstream's sender pushes: each push's tries, by status."""
    a, pusher = rig.sidecars["a"], rig.pusher
    assert pusher is not None
    before = await _metric(session, a, REFUSED, 'listener="webhooks"')
    cap = await _cap(a, "webhooks")
    count = max(opts.sockets, cap + cap // 2)  # the issue: 200 against 128
    stop = asyncio.Event()
    attackers = [asyncio.ensure_future(slow_body(a.ports["webhooks"], "/webhooks/vellum", stop))
                 for _ in range(count)]  # fmt: skip
    pushes = 3 if opts.smoke else 10
    try:
        held = await _until_full(a, "webhooks", cap, 10)
        base = pusher.url()
        for i in range(pushes):
            async with session.post(f"{base}/_emulator/tenants/{TENANT}/push",
                                    json={"customerId": f"pushed_{i}"}) as resp:  # fmt: skip
                await resp.read()
        async with session.get(f"{base}/_emulator/pushes") as resp:
            record = (await resp.json())["pushes"][-pushes:]
    finally:
        stop.set()
        made = sum(await asyncio.gather(*attackers))
    tries = [p["statuses"] for p in record]
    cut = await _metric(session, a, REFUSED, 'listener="webhooks"') - before
    return {"attackers": count, "cap": cap, "attacker_connections": made,
            "most_held": held, "pushes": pushes,
            "first_try_200": sum(1 for t in tries if t[:1] == [200]),
            "tries": _counts(str(len(t)) for t in tries), "cut_or_evicted": int(cut)}  # fmt: skip


async def case_slow_probes(session: aiohttp.ClientSession, rig: Rig, opts: Options
                           ) -> dict[str, Any]:  # fmt: skip
    """The same flood on the ops port (60 against its 32), and probes as the kubelet
    sends them: a new connection each, 1 s to answer."""
    a = rig.sidecars["a"]
    cap = await _cap(a, "ops")
    attackers_n = max(60, cap + cap // 2)  # the issue: 34 against 32; the target: 60
    stop = asyncio.Event()
    attackers = [asyncio.ensure_future(slow_body(a.ports["ops"], "/healthz", stop))
                 for _ in range(attackers_n)]  # fmt: skip
    statuses: list[str] = []
    try:
        held = await _until_full(a, "ops", cap, 10)
        for _ in range(10):
            timeout = aiohttp.ClientTimeout(total=1)
            try:
                async with (
                    aiohttp.ClientSession(timeout=timeout) as probe,
                    probe.get(f"{a.url('ops')}/healthz") as resp,
                ):
                    statuses.append(str(resp.status))
            except (aiohttp.ClientError, TimeoutError) as exc:
                statuses.append(type(exc).__name__)
            await asyncio.sleep(0.2)  # the probes' period
    finally:
        stop.set()
        made = sum(await asyncio.gather(*attackers))
    return {"attackers": attackers_n, "cap": cap, "most_held": held,
            "attacker_connections": made, "probes": 10,
            "probes_answered": _counts(statuses)}  # fmt: skip


async def _head(reader: asyncio.StreamReader, limit: float) -> str:
    """The status of the answer ``reader`` gets, or why there is none."""
    try:
        line = await asyncio.wait_for(reader.readline(), limit)
    except (TimeoutError, OSError) as exc:
        return type(exc).__name__
    return line.split(b" ", 2)[1].decode() if line.startswith(b"HTTP/") else "closed"


async def _answer(reader: asyncio.StreamReader, limit: float) -> str:
    """``_head``, with the error code of a JSON error answer (``"503 upstream_overloaded"``)."""
    try:
        async with asyncio.timeout(limit):
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)  # fmt: skip
            body = await reader.readexactly(length)
    except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
        return type(exc).__name__
    status = head.split(b" ", 2)[1].decode()
    try:
        return f"{status} {orjson.loads(body)['error']['code']}"
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return status


async def _cached_reads(proc: Sidecar, count: int) -> dict[str, int]:
    """``count`` reads of a cached customer, each on a new connection (3 s each)."""
    statuses = []
    for _ in range(count):
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as fresh,
                fresh.get(f"{proc.url()}/v1/customers/{cid(0)}/can/reports") as resp,
            ):
                statuses.append(str(resp.status))
        except (aiohttp.ClientError, TimeoutError) as exc:
            statuses.append(type(exc).__name__)
    return _counts(statuses)


async def case_streams(rig: Rig, opts: Options) -> dict[str, Any]:
    """OFREP event streams by the thousand on one sidecar, then cached reads on new
    connections."""
    a = rig.sidecars["a"]
    held: list[asyncio.StreamWriter] = []
    heads: list[asyncio.Future[str]] = []
    try:
        for i in range(opts.crowd):
            reader, writer = await asyncio.open_connection("127.0.0.1", a.ports["local"])
            writer.write(f"GET /ofrep/v1/events?targetingKey={cid(i % opts.customers)} "
                         "HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())  # fmt: skip
            held.append(writer)
            heads.append(asyncio.ensure_future(_head(reader, 15)))
        streams = _counts(await asyncio.gather(*heads))
        reads = await _cached_reads(a, 20)
    finally:
        for writer in held:
            writer.close()
    return {"streams": opts.crowd, "answers": streams, "cached_reads": reads}


async def case_waiting_misses(session: aiohttp.ClientSession, rig: Rig, opts: Options
                              ) -> dict[str, Any]:  # fmt: skip
    """A thousand misses (distinct unknown customers, a connection each) while the
    upstream takes 4 s, then cached reads on new connections."""
    a = rig.sidecars["a"]
    delay = 2 if opts.smoke else 4
    await admin(session, rig, "POST", "/faults", {"operation": "get_entitlements", "delay": delay})
    held: list[asyncio.StreamWriter] = []
    started = time.monotonic()

    async def miss(reader: asyncio.StreamReader) -> tuple[str, float]:
        status = await _answer(reader, delay + 10)
        return status, time.monotonic() - started

    answers: list[asyncio.Future[tuple[str, float]]] = []
    try:
        for i in range(opts.crowd):
            reader, writer = await asyncio.open_connection("127.0.0.1", a.ports["local"])
            writer.write(f"GET /v1/customers/waiting_{i}/can/reports HTTP/1.1\r\n"
                         "Host: 127.0.0.1\r\n\r\n".encode())  # fmt: skip
            held.append(writer)
            answers.append(asyncio.ensure_future(miss(reader)))
        sent = time.monotonic() - started
        reads = await _cached_reads(a, 20)
        reads_done = time.monotonic() - started
        results = await asyncio.gather(*answers)
    finally:
        for writer in held:
            writer.close()
        await admin(session, rig, "DELETE", "/faults")
    refused = [t for status, t in results if status == "503 upstream_overloaded"]
    return {"misses": opts.crowd, "upstream_delay_s": delay, "all_sent_s": round(sent, 2),
            "answers": _counts(status for status, _ in results),
            "slowest_503_s": round(max(refused), 2) if refused else None,
            "cached_reads": reads, "cached_reads_done_s": round(reads_done, 2)}  # fmt: skip


async def case_replay_flood(session: aiohttp.ClientSession, rig: Rig, opts: Options
                            ) -> dict[str, Any]:  # fmt: skip
    """Authentic events by the thousand, each first seen: what they leave in Redis."""
    pusher = rig.pusher
    assert pusher is not None
    count = 200 if opts.smoke else 2000
    with rig.redis.client() as client:
        replay = {k for k in client.keys("*") if k.endswith(b":evts")}
        before = client.dbsize()
    sem = asyncio.Semaphore(16)

    async def one(i: int) -> None:
        async with sem, session.post(f"{pusher.url()}/_emulator/tenants/{TENANT}/push",
                                     json={"customerId": f"flood_{i}",
                                           "type": "payment.succeeded"}) as resp:  # fmt: skip
            await resp.read()

    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(count)))
    took = time.monotonic() - started
    with rig.redis.client() as client:
        replay_after = {k for k in client.keys("*") if k.endswith(b":evts")}
        members = sum(client.zcard(k) for k in replay_after)
        ttl = max((client.ttl(k) for k in replay_after), default=None)
        after = client.dbsize()
    # Each event names its own customer, so each also leaves that customer's
    # generation key (1 h TTL): other_keys_added counts those.
    return {"events": count, "seconds": round(took, 2), "replay_keys": len(replay_after),
            "replay_members": members, "replay_ttl_s": ttl,
            "other_keys_added": after - before - len(replay_after - replay)}  # fmt: skip


async def _answers(session: aiohttp.ClientSession, requests: Sequence[tuple[str, str]],
                   base: str) -> dict[str, int]:  # fmt: skip
    statuses = []
    for method, path in requests:
        async with session.request(method, URL(base + path, encoded=True)) as resp:
            await resp.read()
            allow = "+Allow" if resp.status == 405 and "Allow" in resp.headers else ""
            json_ = "" if resp.content_type == "application/json" or method == "HEAD" else "!json"
            statuses.append(f"{resp.status}{allow}{json_}")
    return _counts(statuses)


async def _upstream_requests(session: aiohttp.ClientSession, rig: Rig) -> int:
    return len((await admin(session, rig, "GET", "/requests"))["requests"])


async def case_collection_paths(session: aiohttp.ClientSession, rig: Rig) -> dict[str, Any]:
    """``/tenants/{t}/accounts`` and ``.../accounts/{a}/customers``, every method."""
    requests = [(method, f"/tenants/{TENANT}/{path}")
                for path in ("accounts", "accounts/acme/customers")
                for method in ("GET", "HEAD", "PUT", "PATCH", "DELETE")]  # fmt: skip
    answers = await _answers(session, requests, rig.sidecars["a"].url())
    return {"requests": len(requests), "answers": answers}


async def case_escape_forms(session: aiohttp.ClientSession, rig: Rig) -> dict[str, Any]:
    """The issue's three forms: nothing may reach the upstream."""
    forms = [
        "/v1/customers/..%2F..%2Fother%2Fcustomers%2Fvictim/entitlements",
        f"/tenants/{TENANT}/customers/..%2F..%2Fother%2Fcustomers%2Fvictim/entitlements",
        f"/tenants/{TENANT}/%2e%2e/other/customers/victim/entitlements",
    ]
    before = await _upstream_requests(session, rig)
    answers = await _answers(session, [("GET", f) for f in forms], rig.sidecars["a"].url())
    return {"forms": len(forms), "answers": answers,
            "upstream_requests": await _upstream_requests(session, rig) - before}  # fmt: skip


async def case_trace(session: aiohttp.ClientSession, rig: Rig) -> dict[str, Any]:
    """TRACE (and other methods never forwarded) on unknown mirror paths."""
    requests = [(m, f"/tenants/{TENANT}/anything/{m.lower()}")
                for m in ("TRACE", "OPTIONS", "PROPFIND")]  # fmt: skip
    before = await _upstream_requests(session, rig)
    answers = await _answers(session, requests, rig.sidecars["a"].url())
    return {"requests": len(requests), "answers": answers,
            "upstream_requests": await _upstream_requests(session, rig) - before}  # fmt: skip


async def case_allow_405(session: aiohttp.ClientSession, rig: Rig) -> dict[str, Any]:
    """405s on both surfaces: each names its methods."""
    requests = [
        ("POST", "/v1/customers/c/entitlements"),
        ("POST", f"/tenants/{TENANT}/customers/c/entitlements"),
        ("PUT", f"/tenants/{TENANT}/flags"),
        ("GET", f"/tenants/{TENANT}/accounts"),
        ("TRACE", f"/tenants/{TENANT}/customers/c/entitlements"),
    ]
    answers = await _answers(session, requests, rig.sidecars["a"].url())
    return {"requests": len(requests), "answers": answers}


def _counts(values: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for value in values:
        out[value] = out.get(value, 0) + 1
    return dict(sorted(out.items()))


async def _metric(
    session: aiohttp.ClientSession, proc: Sidecar, name: str, match: str = ""
) -> float:
    async with session.get(f"{proc.url('ops')}/metrics") as resp:
        text = await resp.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and line[len(name)] in " {" and match in line
    )


# -- coherence under faults ---------------------------------------------------------------

#: The promise: every live sidecar serves the new document this soon after Redis answers.
STALE_BOUND: Final = 2.0
_OLD_DOC: Final = {"status": "active", "modules": ["reports"]}
_NEW_DOC: Final = {"status": "active", "modules": ["reports", "exports"]}


async def _push(session: aiohttp.ClientSession, proc: Sidecar, customer: str) -> dict[str, Any]:
    """A signed ``entitlements.updated`` push for ``customer``; its JSON answer."""
    body = orjson.dumps({"eventId": f"evt_{random.getrandbits(64):x}",
                         "type": "entitlements.updated", "tenantId": TENANT,
                         "customerId": customer})  # fmt: skip
    headers = {"Content-Type": "application/json",
               "X-Vellum-Signature": sign(WEBHOOK_SECRET, body, int(time.time()))}  # fmt: skip
    url = f"{proc.url('webhooks')}/webhooks/vellum"
    async with session.post(url, data=body, headers=headers) as resp:
        answer: dict[str, Any] = await resp.json()
        return answer


async def _allowed(session: aiohttp.ClientSession, proc: Sidecar, customer: str) -> bool:
    async with session.get(f"{proc.url()}/v1/customers/{customer}/can/exports") as resp:
        if resp.status != 200:
            raise RuntimeError(f"{proc.name}: {resp.status} for {customer}")
        return bool((await resp.json())["allowed"])


async def _watch_old(session: aiohttp.ClientSession, procs: Sequence[Sidecar], customer: str,
                     since: float, seconds: float) -> dict[str, Any]:  # fmt: skip
    """Read ``customer`` on ``procs`` for ``seconds``: old answers, the last one's time."""
    reads, old, last = 0, 0, None
    while (now := time.monotonic()) < since + seconds:
        for proc in procs:
            reads += 1
            if not await _allowed(session, proc, customer):
                old += 1
                last = now - since
        await asyncio.sleep(0.02)
    late = 0 if last is None or last <= STALE_BOUND else old
    return {"reads": reads, "old_reads": old,
            "last_old_s": None if last is None else round(last, 3),
            "old_reads_after_2s": late}  # fmt: skip


async def _new_customer(session: aiohttp.ClientSession, rig: Rig, name: str) -> str:
    """A customer outside the load's, cached everywhere with the old document (once the
    sidecars' circuit breakers, opened by an earlier case, let a fetch through)."""
    await admin(session, rig, "PUT", f"/tenants/{TENANT}/customers/{name}/entitlements", _OLD_DOC)
    for proc in rig.sidecars.values():
        deadline = time.monotonic() + 60
        while True:
            url = f"{proc.url()}/v1/customers/{name}/can/exports"
            async with session.get(url) as resp:
                if resp.status == 200 and (await resp.json())["allowed"] is False:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} is not cached old on {proc.name}: {resp.status}")
            await asyncio.sleep(0.1)
    return name


async def _change(session: aiohttp.ClientSession, rig: Rig, customer: str) -> None:
    path = f"/tenants/{TENANT}/customers/{customer}/entitlements"
    await admin(session, rig, "PUT", path, _NEW_DOC)


async def case_queued_drop_killed(
    session: aiohttp.ClientSession, rig: Rig, watch_s: float
) -> dict[str, Any]:
    """A push acknowledged while Redis hangs; its sidecar dies before Redis answers."""
    customer = await _new_customer(session, rig, "coh_killed")
    a, b = rig.sidecars["a"], rig.sidecars["b"]
    await asyncio.to_thread(rig.pause_redis)
    try:
        await _change(session, rig, customer)
        answer = await _push(session, a, customer)
        await asyncio.to_thread(a.kill)
    finally:
        await asyncio.to_thread(rig.resume_redis)
    figures = await _watch_old(session, [b], customer, time.monotonic(), watch_s)
    await asyncio.to_thread(a.start)
    return {"push_answer": answer, **figures}


async def case_lost_writes(session: aiohttp.ClientSession, rig: Rig, watch_s: float
                           ) -> dict[str, Any]:  # fmt: skip
    """Redis crashes after a push and comes back from a snapshot taken before it."""
    customer = await _new_customer(session, rig, "coh_lost")
    procs = list(rig.sidecars.values())
    with rig.redis.client(timeout=5) as client:
        client.save()
    await _change(session, rig, customer)
    answer = await _push(session, procs[0], customer)
    deadline = time.monotonic() + 5
    while not all([await _allowed(session, p, customer) for p in procs]):
        if time.monotonic() > deadline:
            raise RuntimeError("the push was not applied everywhere")
        await asyncio.sleep(0.02)
    await asyncio.to_thread(rig.kill_redis)
    await asyncio.to_thread(rig.restart_redis)  # loads the snapshot
    figures = await _watch_old(session, procs, customer, time.monotonic(), watch_s)
    (rig.workdir / "dump.rdb").unlink()
    return {"push_answer": answer, **figures}


async def case_emptied_upstream_down(rig: Rig, upstream: Gate, seconds: float
                                     ) -> dict[str, Any]:  # fmt: skip
    """The upstream down, then Redis restarted empty: the load's customers were cached."""
    await upstream.close()
    try:
        await asyncio.to_thread(rig.kill_redis)
        await asyncio.to_thread(rig.restart_redis)
        await asyncio.sleep(seconds)
    finally:
        await upstream.open()
    return {"upstream_down_s": seconds}


async def case_tenant_drop_upstream_down(
    session: aiohttp.ClientSession, rig: Rig, upstream: Gate, seconds: float
) -> dict[str, Any]:
    """The upstream down, then everything for the tenant dropped."""
    await upstream.close()
    try:
        async with session.delete(f"{rig.sidecars['a'].url()}/v1/cache") as resp:
            status = resp.status
        await asyncio.sleep(seconds)
    finally:
        await upstream.open()
    return {"drop_status": status, "upstream_down_s": seconds}


# -- fault runs -----------------------------------------------------------------------------


Step = Callable[[], Awaitable[None]]

#: How long past its planned end a fault is held while /readyz has not shown it.
DETECT_WITHIN: Final = 10.0


async def fault_run(
    rig: Rig,
    opts: Options,
    inject: Step,
    fix: Step | None,
    detect: Callable[[int, dict[str, Any]], bool],
    healthy: Callable[[int, dict[str, Any]], bool] | None,
    load: Load | None = None,
) -> tuple[Tally, dict[str, Any]]:
    """Load both sidecars for ``--duration`` s: ``inject`` at 25 %, ``fix`` at 60 %.

    A fault with a ``fix`` is held until /readyz has shown it (at most
    ``DETECT_WITHIN`` s more): on a busy machine detecting a refused key (an
    upstream check once a second without an answer) can take longer than the
    smoke run's 1 s window, and a fault fixed before it shows measures nothing.
    The load and the readiness watch keep going while the steps run (process
    starts and stops go to a thread).
    """
    load = load or Load(rig, opts.customers, opts.connections)
    watch = ReadyWatch(rig.sidecars["a"])
    watch.start()
    load.start()
    d = opts.duration
    await asyncio.sleep(d * 0.25)
    await inject()
    # Measured from the moment the fault is in place (a restarted emulator refusing
    # the key, say, is in place once it is reachable).
    injected = time.monotonic()
    figures: dict[str, Any] = {}
    await asyncio.sleep(d * 0.35)
    if fix is not None:
        await watch.shown(injected, detect, DETECT_WITHIN)
        await fix()
        fixed = time.monotonic()
        await asyncio.sleep(d * 0.4)
        assert healthy is not None
        figures["readyz_recovered_s"] = watch.first(fixed, healthy)
    else:
        await asyncio.sleep(d * 0.4)
    tally = await load.finish()
    await watch.stop()
    return tally, {"readyz_shows_fault_s": watch.first(injected, detect), **figures}


def _thread(work: Callable[[], None]) -> Step:
    async def step() -> None:
        await asyncio.to_thread(work)

    return step


def _state(**want: str) -> Callable[[int, dict[str, Any]], bool]:
    return lambda status, body: all(body.get(k) == v for k, v in want.items())


# -- the run --------------------------------------------------------------------------------


async def run(opts: Options) -> dict[str, Any]:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    header_timeout = 1.0 if opts.smoke else 5.0
    body_timeout = 1.5 if opts.smoke else 10.0
    upstream_timeout = 2.0 if opts.smoke else 5.0
    env = {
        "SIDECAR_HEADER_TIMEOUT": str(header_timeout),
        "SIDECAR_BODY_TIMEOUT": str(body_timeout),
        "SIDECAR_UPSTREAM_TIMEOUT": str(upstream_timeout),
        "SIDECAR_SHUTDOWN_DRAIN": "1",
    }
    if opts.smoke:
        # The crowd cases' caps scaled to their smoke sizes (the batch case's 32
        # fetches at once stay under the waiting bound).
        env |= {"SIDECAR_MAX_STREAMS": "40", "SIDECAR_UPSTREAM_MAX_WAITING": "40"}
    results: dict[str, Any] = {"options": {k: _plain(v) for k, v in asdict(opts).items()},
                               "sidecar_env": env, "cases": {}}  # fmt: skip
    cases: dict[str, Any] = results["cases"]
    with tempfile.TemporaryDirectory(prefix="vellum-faults-") as tmp:
        rig = Rig(Path(tmp), env)
        gate: Gate | None = None
        try:
            _say("starting redis, the emulator and two sidecars")
            await asyncio.to_thread(rig.start_upstream)
            gate = upstream = Gate(rig.emulator_port)
            await gate.open()
            await asyncio.to_thread(rig.start_sidecars, gate.url)
            await asyncio.to_thread(rig.start_pusher)
            async with aiohttp.ClientSession() as session:
                await seed(session, rig, opts.customers)
                await warm(session, rig, opts.customers)

                async def hostile(name: str, work: Awaitable[dict[str, Any]]) -> None:
                    if not opts.wants(name):
                        work.close()  # type: ignore[attr-defined]
                        return
                    _say(f"hostile: {name}")
                    load = Load(rig, opts.customers, opts.connections)
                    load.start()
                    try:
                        figures = await work
                    finally:
                        tally = await load.finish()
                    cases[name] = {"kind": "hostile", **asdict(tally), **figures}

                await hostile("baseline", asyncio.sleep(opts.duration / 2, result={}))
                await hostile("slowloris", case_slowloris(rig, opts, header_timeout))
                await hostile("silent", case_silent(rig, opts, header_timeout))
                every = 0.3 if opts.smoke else 2.0
                await hostile("slow_body", case_slow_body(rig, opts, every, body_timeout))
                await hostile("flood", case_flood(session, rig, opts, header_timeout))
                await hostile("cross_site", case_cross_site(session, rig, opts))
                await hostile("rebinding", case_rebinding(session, rig))
                await hostile("long_ids", case_long_ids(rig))
                await hostile("batch", case_batch(session, rig, opts, upstream_timeout))
                await hostile("slow_pushes", case_slow_pushes(session, rig, opts))
                await hostile("slow_probes", case_slow_probes(session, rig, opts))
                await hostile("streams", case_streams(rig, opts))
                await hostile("waiting_misses", case_waiting_misses(session, rig, opts))
                await hostile("replay_flood", case_replay_flood(session, rig, opts))
                await hostile("collection_paths", case_collection_paths(session, rig))
                await hostile("escape_forms", case_escape_forms(session, rig))
                await hostile("trace", case_trace(session, rig))
                await hostile("allow_405", case_allow_405(session, rig))

                async def replace_upstream(api_key: str) -> None:
                    """A new emulator accepting ``api_key``, seeded before it is reachable."""
                    await upstream.close()
                    await asyncio.to_thread(rig.kill_emulator)
                    await asyncio.to_thread(rig.start_emulator, api_key)
                    await seed(session, rig, opts.customers)
                    await upstream.open()

                async def refuse_key() -> None:
                    await replace_upstream("a_key_the_sidecar_does_not_have")

                async def accept_key() -> None:
                    await replace_upstream(API_KEY)

                # Back to normal: an upstream that answers again reads "degraded" until
                # its circuit breaker has seen a real call succeed.
                def ok(status: int, body: dict[str, Any]) -> bool:
                    return (body.get("redis"), body.get("fanout")) == ("ok", "ok") and body.get(
                        "upstream"
                    ) in ("ok", "degraded")

                runs: list[tuple[str, Step, Step, Callable[[int, dict[str, Any]], bool]]] = [
                    ("redis_killed", _thread(rig.kill_redis), _thread(rig.restart_redis),
                     _state(redis="down")),
                    ("redis_hung", _thread(rig.pause_redis), _thread(rig.resume_redis),
                     _state(redis="down", fanout="down")),
                    ("upstream_down", upstream.close, upstream.open, _state(upstream="down")),
                    ("key_refused", refuse_key, accept_key, _state(upstream="auth_failed")),
                ]  # fmt: skip
                for name, inject, fix, detect in runs:
                    if not opts.wants(name):
                        continue
                    _say(f"fault: {name}")
                    tally, figures = await fault_run(rig, opts, inject, fix, detect, ok)
                    cases[name] = {"kind": "fault", **asdict(tally), **figures}

                async def coherence(
                    name: str, work: Awaitable[dict[str, Any]], names: Sequence[str] | None = None
                ) -> None:
                    if not opts.wants(name):
                        work.close()  # type: ignore[attr-defined]
                        return
                    _say(f"coherence: {name}")
                    load = Load(rig, opts.customers, opts.connections, names)
                    load.start()
                    try:
                        figures = await work
                    finally:
                        tally = await load.finish()
                    cases[name] = {"kind": "coherence", **asdict(tally), **figures}

                watch_s = STALE_BOUND + opts.duration / 2
                # The load reads b only: a is SIGKILLed with requests of its own in flight.
                await coherence(
                    "queued_drop_killed", case_queued_drop_killed(session, rig, watch_s), ["b"]
                )
                await coherence("lost_writes", case_lost_writes(session, rig, watch_s))
                await coherence(
                    "emptied_upstream_down", case_emptied_upstream_down(rig, upstream, watch_s)
                )
                await coherence(
                    "tenant_drop_upstream_down",
                    case_tenant_drop_upstream_down(session, rig, upstream, watch_s),
                )

                if not opts.wants("sigterm"):
                    return results
                _say("fault: sigterm")
                load = Load(rig, opts.customers, opts.connections)

                exited: list[float] = []

                async def stop_a() -> None:
                    load.stopping.add("a")
                    proc = rig.terminate("a")
                    signalled = time.monotonic()

                    def wait() -> None:
                        proc.popen.wait(30)
                        exited.append(time.monotonic() - signalled)

                    waiter.append(asyncio.ensure_future(asyncio.to_thread(wait)))

                waiter: list[asyncio.Future[None]] = []

                tally, figures = await fault_run(
                    rig, opts, stop_a, None, lambda status, body: status == 503, None, load
                )
                await asyncio.gather(*waiter)
                code = rig.sidecars["a"].popen.returncode
                a_tally = load.tallies.get("a", Tally())
                figures.pop("readyz_shows_fault_s")  # the drain may end before a poll sees it
                cases["sigterm"] = {"kind": "fault", **asdict(tally), **figures,
                                    "exit_code": code,
                                    "exited_after_s": round(exited[0], 2) if exited else None,
                                    "stopped_sidecar_unanswered": a_tally.unanswered,
                                    "stopped_sidecar_non_2xx": a_tally.non_2xx}  # fmt: skip
        finally:
            await asyncio.to_thread(rig.close)
            if gate is not None:
                await gate.close()
    return results


def _plain(value: Any) -> Any:
    """An option as JSON holds it (a path as text, the case names as a sorted list)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, frozenset):
        return sorted(value)
    return value


def _say(message: str) -> None:
    print(f"bench.faults: {message}", file=sys.stderr, flush=True)


def table(results: dict[str, Any]) -> str:
    lines = [
        "| case | requests | non-2xx | wrong | unanswered | what it measured |",
        "|---|---:|---:|---:|---:|---|",
    ]
    tally_fields = {"kind", *asdict(Tally())} - {"unanswered_by", "non_2xx_by"}
    for name, case in results["cases"].items():
        figures = ", ".join(
            f"{k}={json.dumps(v, separators=(',', ':'))}"
            for k, v in case.items()
            if k not in tally_fields and v != {}
        )
        if case.get("refused_after_exit"):
            figures += f", refused_after_exit={case['refused_after_exit']}"
        lines.append(
            f"| {name} | {case['requests']:,} | {case['non_2xx']} | {case['wrong']} | "
            f"{case['unanswered']} | {figures} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    opts = _parse(argv)
    results = asyncio.run(run(opts))
    print(table(results))
    if opts.json_path is not None:
        opts.json_path.parent.mkdir(parents=True, exist_ok=True)
        opts.json_path.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
