"""``SIDECAR_WORKERS=N``: N sidecar processes behind the same listening sockets.

The process started as ``serve`` becomes a supervisor that starts N workers
(``python -m sidecar serve`` again, same settings) and keeps them running. Each
worker binds the local API and webhook addresses itself with ``SO_REUSEPORT``,
so the kernel spreads connections across the workers, and a worker that dies
takes its socket with it (no connection waits on a dead process). A ``unix:``
listener cannot be shared that way: the supervisor binds it once and passes the
socket to every worker, which all accept from it.

Each worker is a whole sidecar (event loop, upstream session, Redis pool,
in-process layer), kept coherent with its siblings exactly as separate sidecars
are: invalidations fan out through Redis and fills are shared through Redis and
its lock. That is why more than one worker needs ``SIDECAR_REDIS_URL``.

Ops stay one address. The supervisor serves ``SIDECAR_OPS_LISTEN``; each worker
serves its own ops app on a private unix socket, which the supervisor asks:

- ``/readyz``: 200 when every worker answers 200 (each worker's readiness is the
  single-process one, unchanged), else 503; the body has the worst state of
  each field and every worker's own answer.
- ``/metrics``: every worker's registry, each sample labelled ``worker="<i>"``,
  plus ``vellum_sidecar_workers`` and ``vellum_sidecar_worker_restarts_total``.
  Per-worker series rather than sums: a restarted worker's counters start from
  zero, which Prometheus handles per series (``rate``), but a summed counter
  would appear to go backwards. ``sum without (worker) (...)`` gives the total.
- ``/healthz``: 200 while the supervisor runs.

A worker that exits on its own is restarted (after 1 s, doubling up to 30 s
while it keeps dying young); one that fails before the first time all were
ready stops the whole sidecar with its exit code (a bad address, say). On
SIGTERM/SIGINT readiness turns 503, every worker gets SIGTERM and drains as a
single sidecar does, then the supervisor exits 0. Workers stop by themselves if
the supervisor disappears.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from typing import Any, Final

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from .cache.snapshot import worker_file
from .config import Settings
from .http.guard import HostGuard, guard_middleware
from .http.limits import listener_guards
from .http.middleware import json_errors
from .http.responses import json_response
from .metrics import exposition
from .server import Listener, bind, listening_unix_socket, run_sidecar
from .values import Listen

__all__ = ["WORKER_INDEX_ENV", "run_workers"]

log = logging.getLogger("sidecar.workers")

#: Set by the supervisor in a worker's environment (internal, not configuration).
WORKER_INDEX_ENV: Final = "_SIDECAR_WORKER_INDEX"
_WORKER_OPS_ENV: Final = "_SIDECAR_WORKER_OPS"
_WORKER_FDS_ENV: Final = "_SIDECAR_WORKER_FDS"

_PROBE_TIMEOUT: Final = 2.0
_YOUNG: Final = 10.0  # a worker that dies younger than this backs off longer
_STATE_ORDER: Final = {"ok": 0, "disabled": 0, "degraded": 1, "down": 2, "auth_failed": 3}


async def run_workers(settings: Settings, env: Mapping[str, str]) -> int:
    """Run as a worker when the supervisor started us, else as the supervisor."""
    if WORKER_INDEX_ENV in env:
        return await _worker(settings, env)
    try:
        supervisor = Supervisor(settings, env)
    except OSError as exc:
        # The workers' private ops sockets live in a temporary directory; with a
        # read-only root filesystem, TMPDIR (or /tmp) must be a writable volume.
        log.error("cannot_create_worker_dir", extra={"fields": {"error": str(exc)}})
        return 1
    return await supervisor.run()


# -- worker --------------------------------------------------------------------------


async def _worker(settings: Settings, env: Mapping[str, str]) -> int:
    sockets: dict[str, socket.socket] = {}
    for item in filter(None, env.get(_WORKER_FDS_ENV, "").split(",")):
        name, fd = item.split("=", 1)
        sockets[name] = socket.socket(fileno=int(fd))
    stop = asyncio.Event()
    watchdog = asyncio.get_running_loop().create_task(_orphan_watch(os.getppid(), stop))
    try:
        own = dataclasses.replace(settings, ops_listen=Listen(path=env[_WORKER_OPS_ENV]))
        if settings.snapshot_file is not None:
            # Each worker writes its own file; every one loads them all (cache/snapshot.py).
            index = int(env[WORKER_INDEX_ENV])
            own = dataclasses.replace(own, snapshot_file=worker_file(settings.snapshot_file, index))
        return await run_sidecar(
            own,
            sockets=sockets,
            reuse_port=True,
            stop=stop,
        )
    finally:
        watchdog.cancel()
        await asyncio.gather(watchdog, return_exceptions=True)


async def _orphan_watch(parent: int, stop: asyncio.Event) -> None:
    """Stop when the supervisor is gone, so no orphan keeps serving the port."""
    # Nothing signals a parent's death portably; a once-a-second look costs nothing.
    while os.getppid() == parent:  # noqa: ASYNC110
        await asyncio.sleep(1.0)
    log.warning("supervisor_gone")
    stop.set()


# -- supervisor ------------------------------------------------------------------------


@dataclasses.dataclass
class Worker:
    index: int
    ops_path: str
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    failures: int = 0
    session: aiohttp.ClientSession | None = None

    async def ask(self, path: str) -> tuple[int, bytes] | None:
        """GET ``path`` from the worker's private ops socket; ``None`` if it cannot answer."""
        if self.session is None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=self.ops_path),
                timeout=aiohttp.ClientTimeout(total=_PROBE_TIMEOUT),
            )
        try:
            async with self.session.get(f"http://localhost{path}") as resp:
                return resp.status, await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None


class Supervisor:
    def __init__(self, settings: Settings, env: Mapping[str, str]) -> None:
        self.settings = settings
        self.env = dict(env)
        self.phase = "starting"
        self.stop = asyncio.Event()
        self.fatal: int | None = None
        self.workdir = tempfile.mkdtemp(prefix="vellum-sidecar-")  # mode 0700
        self.workers = [
            Worker(i, os.path.join(self.workdir, f"worker-{i}.sock"))
            for i in range(settings.workers)
        ]
        self.shared: dict[str, socket.socket] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        Gauge(
            "vellum_sidecar_workers", "Worker processes configured (SIDECAR_WORKERS).",
            registry=self.registry,
        ).set(settings.workers)  # fmt: skip
        self.restarts = Counter(
            "vellum_sidecar_worker_restarts", "Workers restarted after exiting on their own.",
            registry=self.registry,
        )  # fmt: skip
        self._tasks: list[asyncio.Task[None]] = []

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop.set)
        ops: Listener | None = None
        try:
            self._bind_shared()
            ops = Listener("ops", self._ops_app(), self.settings.ops_listen)
            # The supervisor's own ops listener: the same limits, counted by no one
            # (its registry would clash with the workers' merged series).
            ops.guard = listener_guards(self.settings, None)["ops"]
            await bind(ops, shutdown_timeout=1.0, access_log=False)
            log.info("listening", extra={"fields": {"listener": "ops", "at": str(ops.listen)}})
            for worker in self.workers:
                await self._spawn(worker)
            self._tasks = [loop.create_task(self._keep(w)) for w in self.workers]
            await self._wait_first_ready()
            if self.fatal is None:
                self.phase = "ready"
                log.info("ready", extra={"fields": {"workers": len(self.workers)}})
                await self.stop.wait()
        except OSError as exc:
            log.error("cannot_listen", extra={"fields": {"error": str(exc)}})
            self.fatal = 1
        finally:
            self.phase = "stopping"
            log.info("stopping")
            await self._stop_workers()
            for sock in self.shared.values():
                sock.close()
            if ops is not None and ops.runner is not None:
                await ops.runner.cleanup()
            shutil.rmtree(self.workdir, ignore_errors=True)
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
        code = self.fatal or 0
        log.info("stopped", extra={"fields": {"exit_code": code}})
        return code

    def _bind_shared(self) -> None:
        """A ``unix:`` listener is bound here once and inherited by every worker."""
        listeners = {"local": self.settings.listen}
        if self.settings.webhooks_enabled:
            listeners["webhooks"] = self.settings.webhook_listen
        for name, listen in listeners.items():
            if listen.path is None:
                continue
            sock = listening_unix_socket(listen.path, 1024)
            sock.set_inheritable(True)
            self.shared[name] = sock

    async def _spawn(self, worker: Worker) -> None:
        env = dict(self.env)
        env[WORKER_INDEX_ENV] = str(worker.index)
        env[_WORKER_OPS_ENV] = worker.ops_path
        env[_WORKER_FDS_ENV] = ",".join(f"{n}={s.fileno()}" for n, s in self.shared.items())
        worker.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sidecar", "serve",
            env=env, stdin=asyncio.subprocess.DEVNULL,
            pass_fds=[s.fileno() for s in self.shared.values()],
        )  # fmt: skip
        worker.started_at = time.monotonic()
        log.info(
            "worker_started", extra={"fields": {"worker": worker.index, "pid": worker.proc.pid}}
        )

    async def _keep(self, worker: Worker) -> None:
        """Restart ``worker`` whenever it exits on its own, with backoff."""
        while True:
            assert worker.proc is not None
            code = await worker.proc.wait()
            if self.stop.is_set():
                return
            fields = {"worker": worker.index, "pid": worker.proc.pid, "exit_code": code}
            if self.phase == "starting":
                log.error("worker_failed_at_start", extra={"fields": fields})
                self.fatal = code or 1
                self.stop.set()
                return
            young = time.monotonic() - worker.started_at < _YOUNG
            worker.failures = worker.failures + 1 if young else 0
            delay = min(2.0 ** max(worker.failures - 1, 0), 30.0)
            log.warning("worker_exited", extra={"fields": {**fields, "restart_in_s": delay}})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), delay)
            if self.stop.is_set():
                return
            self.restarts.inc()
            await self._spawn(worker)

    async def _wait_first_ready(self) -> None:
        """Until every worker is ready once (or start-up failed, or we are told to stop)."""
        while not self.stop.is_set():
            answers = await asyncio.gather(*(w.ask("/readyz") for w in self.workers))
            if all(a is not None and a[0] == 200 for a in answers):
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 0.05)

    async def _stop_workers(self) -> None:
        self.stop.set()
        running = [w.proc for w in self.workers if w.proc is not None and w.proc.returncode is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        if running:
            _, pending = await asyncio.wait(
                [asyncio.ensure_future(p.wait()) for p in running],
                timeout=self.settings.shutdown_grace + 10,
            )
            for proc in running:
                if proc.returncode is None:
                    log.error("worker_killed", extra={"fields": {"pid": proc.pid}})
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            if pending:
                await asyncio.wait(pending)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for worker in self.workers:
            if worker.session is not None:
                await worker.session.close()

    # -- the supervisor's ops listener ----------------------------------------------------

    def _ops_app(self) -> web.Application:
        guard = HostGuard(self.settings.ops_allowed_hosts, ip_literals=True)
        app = web.Application(middlewares=[json_errors, guard_middleware(guard)])
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def _healthz(self, request: web.Request) -> web.StreamResponse:
        return json_response({"status": "ok", "workers": len(self.workers)})

    async def _readyz(self, request: web.Request) -> web.StreamResponse:
        answers = await asyncio.gather(*(w.ask("/readyz") for w in self.workers))
        per_worker: list[dict[str, Any]] = []
        all_ready = self.phase == "ready"
        for worker, answer in zip(self.workers, answers, strict=True):
            body: dict[str, Any] = {"worker": worker.index}
            if answer is None:
                body["status"] = "down"
                all_ready = False
            else:
                with contextlib.suppress(ValueError):
                    body.update(_json_object(answer[1]))
                all_ready = all_ready and answer[0] == 200
            if worker.proc is not None:
                body["pid"] = worker.proc.pid
            per_worker.append(body)
        if all_ready:
            status = "ready"
        elif self.phase == "stopping":
            status = "stopping"
        elif any(w.get("status") == "waiting" for w in per_worker):
            status = "waiting"  # SIDECAR_WAIT_FOR_DATA: a worker has nothing to answer with
        else:
            status = "starting"
        summary: dict[str, Any] = {"status": status}
        for field in ("redis", "upstream", "fanout"):
            states = [w[field] for w in per_worker if isinstance(w.get(field), str)]
            if states:
                summary[field] = max(states, key=lambda s: _STATE_ORDER.get(s, 3))
        summary["workers"] = per_worker
        return json_response(summary, 200 if all_ready else 503)

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        texts = await asyncio.gather(*(w.ask("/metrics") for w in self.workers))
        scraped = [
            (w.index, answer[1].decode("utf-8", "replace"))
            for w, answer in zip(self.workers, texts, strict=True)
            if answer is not None and answer[0] == 200
        ]
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Merged(self.registry, scraped))
        return web.Response(
            body=exposition(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )


class _Merged(Collector):
    """The supervisor's own metrics plus each worker's, labelled ``worker``."""

    def __init__(self, own: CollectorRegistry, scraped: list[tuple[int, str]]) -> None:
        self.own = own
        self.scraped = scraped

    def collect(self) -> Iterator[Metric]:
        yield from self.own.collect()
        families: dict[str, Metric] = {}
        for index, text in self.scraped:
            for family in text_string_to_metric_families(text):
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit
                    )
                label = str(index)
                merged.samples.extend(
                    s._replace(labels={**s.labels, "worker": label}) for s in family.samples
                )
        yield from families.values()


def _json_object(raw: bytes) -> dict[str, Any]:
    import orjson

    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ValueError("not JSON") from None
    if not isinstance(value, dict):
        raise ValueError("not an object")
    return value
