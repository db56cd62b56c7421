"""The one process harness of the tests and the benchmark (``bench`` imports ``tests.harness``).

Real processes on free loopback ports (never the machine's 6379 or 8080), each
logging to a file in a work directory:

- :func:`free_port`, :func:`wait_until` (the one poll-with-a-deadline loop) and
  :func:`http_status`;
- :class:`Process`: a child process with its log, readiness check and stop
  (SIGTERM, wait, SIGKILL on timeout), plus the CPU and memory of its tree;
- :class:`RedisServer`: a ``redis-server`` on TCP, TLS or a unix socket, with a
  password or extra options (cluster node, replica, sentinel), that a test may
  kill, restart or pause;
- :class:`Emulator` and :class:`Sidecar`: ``python -m sidecar emulator`` and
  ``serve``; :func:`sidecar_env` is the one place a sidecar's environment is built;
- :class:`Gate`: a TCP relay process in front of the emulator, killed and started
  again to take the upstream down and back without losing its data;
- :class:`Stack`: Redis, the emulator and sidecars composed, stopped in reverse
  order when its block ends, even after a failed start;
- :func:`slow_body`: the hostile peer of the isolation cases (tests and
  ``bench.faults``), a body a byte at a time.

No pytest here: ``python -m bench`` runs without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self
from urllib.parse import quote

import redis

__all__ = [
    "API_KEY",
    "WEBHOOK_SECRET",
    "Emulator",
    "Gate",
    "Process",
    "RedisServer",
    "Sidecar",
    "Stack",
    "TLSFiles",
    "free_port",
    "http_status",
    "make_tls_files",
    "require",
    "sidecar_command",
    "sidecar_env",
    "slow_body",
    "wait_until",
]

#: The key the emulator accepts and every sidecar sends; the secret pushes are signed with.
API_KEY = "test_key_" + "k" * 24
WEBHOOK_SECRET = "whsec_test_" + "s" * 24

#: How long a process may take to answer its readiness check.
STARTUP_TIMEOUT = 30.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require(binary: str, hint: str = "apt-get install redis-server") -> str:
    """The path of ``binary``, or a clear error naming how to install it."""
    path = shutil.which(binary)
    if path is None:
        raise RuntimeError(f"{binary} is not installed ({hint})")
    return path


def wait_until(
    predicate: Callable[[], bool],
    timeout: float = 10.0,
    interval: float = 0.02,
    *,
    process: Process | None = None,
    what: str = "condition",
) -> None:
    """Poll ``predicate`` until it holds; AssertionError after ``timeout`` seconds.

    With ``process``, its exit ends the wait at once (RuntimeError), and either
    error carries the end of its log.
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if process is not None and not process.running:
            raise RuntimeError(
                f"{process.name} exited with {process.returncode} while waiting for {what}; "
                f"its log:\n{process.tail()}"
            )
        if time.monotonic() >= deadline:
            log = f"; its log:\n{process.tail()}" if process is not None else ""
            raise AssertionError(f"{what} not met within {timeout}s{log}")
        time.sleep(interval)


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The status ``url`` answers a GET with; None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code
    except OSError:
        return None


def _clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without its own sidecar settings (and tracing
    settings: a test turns traces on itself), plus ``extra``."""
    ours = ("VELLUM_", "SIDECAR_", "EMULATOR_", "OTEL_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    env.update(extra or {})
    return env


def sidecar_command(*args: str) -> list[str]:
    """``python -m sidecar ARGS`` with this interpreter."""
    return [sys.executable, "-m", "sidecar", *args]


def sidecar_env(tenant: str, base_url: str, **settings: str | None) -> dict[str, str]:
    """A sidecar's environment: the emulator's key, ``tenant``, ``base_url``, the push
    secret and a short upstream timeout, then ``settings`` (variable names as
    keywords; None removes a variable, so the sidecar uses its default)."""
    env: dict[str, str | None] = {
        "VELLUM_API_KEY": API_KEY,
        "VELLUM_TENANT_ID": tenant,
        "VELLUM_BASE_URL": base_url,
        "VELLUM_WEBHOOK_SECRETS": WEBHOOK_SECRET,
        "SIDECAR_UPSTREAM_TIMEOUT": "2",
        # No background upstream checks: tests count and fault upstream calls exactly
        # (tests/test_health.py turns them on).
        "SIDECAR_UPSTREAM_CHECK_INTERVAL": "0",
        **settings,
    }
    return {k: v for k, v in env.items() if v is not None}


# -- processes ---------------------------------------------------------------------------------


def _proc_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a multi-worker sidecar is a supervisor plus workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime + stime


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Process:
    """One child process, its output appended to ``<workdir>/<name>.log``.

    ``env`` is added to this process's environment minus its own ``VELLUM_``,
    ``SIDECAR_`` and ``EMULATOR_`` variables. ``ready_url``, when given, must
    answer 200 before :meth:`start` returns. ``ports`` name the TCP ports it
    listens on (``local`` is the main one), for :meth:`url`.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        workdir: Path,
        *,
        env: Mapping[str, str] | None = None,
        ports: Mapping[str, int] | None = None,
        ready_url: str | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env or {})
        self.log = workdir / f"{name}.log"
        self.ports = dict(ports or {})
        self.ready_url = ready_url
        self._popen: subprocess.Popen[bytes] | None = None

    # lifecycle

    def start(self) -> Self:
        """Start (again, after a stop) and wait until ``ready_url`` answers 200; a
        process that does not get there is killed before the error is raised."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        with self.log.open("ab") as out:  # the child keeps its own descriptor
            self._popen = subprocess.Popen(
                self.argv,
                env=_clean_env(self.env),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        if self.ready_url is not None:
            try:
                self.wait_ready(self.ready_url)
            except BaseException:
                self.kill()
                raise
        return self

    def wait_ready(self, url: str, status: int = 200, timeout: float = STARTUP_TIMEOUT) -> None:
        wait_until(
            lambda: http_status(url) == status,
            timeout=timeout,
            interval=0.02,
            process=self,
            what=f"{self.name} answering {url} with {status}",
        )

    @property
    def popen(self) -> subprocess.Popen[bytes]:
        if self._popen is None:
            raise RuntimeError(f"{self.name} was never started")
        return self._popen

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._popen is None else self._popen.poll()

    def send_signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        return self.popen.wait(timeout)

    def stop(self, timeout: float = 20.0, sig: int = signal.SIGTERM) -> int | None:
        """Send ``sig`` (SIGTERM: the sidecar drains and exits 0) and wait; SIGKILL
        when that takes longer than ``timeout``. The exit code; None if never started."""
        if self._popen is None:
            return None
        if self._popen.poll() is None:
            self._popen.send_signal(sig)
            try:
                self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._popen.kill()
                self._popen.wait(10)
        return self._popen.returncode

    def kill(self) -> None:
        """SIGKILL: no goodbye."""
        self.stop(timeout=10, sig=signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP: alive, holding its sockets, answering nothing."""
        self.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.send_signal(signal.SIGCONT)

    # what it said and where it listens

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def url(self, port: str = "local") -> str:
        return f"http://127.0.0.1:{self.ports[port]}"

    # what it costs (the process and its children: a supervisor's workers)

    def cpu_seconds(self) -> float:
        """CPU time, user + system."""
        return sum(_cpu_seconds(p) for p in _proc_tree(self.pid))

    def peak_rss_mib(self) -> float:
        """Peak resident set (VmHWM) of the process, or of its largest worker."""
        return max(_status_kib(p, "VmHWM") for p in _proc_tree(self.pid)) / 1024

    def rss_mib(self) -> float:
        return sum(_status_kib(p, "VmRSS") for p in _proc_tree(self.pid)) / 1024


# -- Redis -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TLSFiles:
    """A throwaway self-signed certificate for 127.0.0.1 that is also its own CA."""

    cert: Path
    key: Path

    @property
    def ca(self) -> Path:
        return self.cert


def make_tls_files(workdir: Path) -> TLSFiles:
    openssl = require("openssl", "apt-get install openssl: it makes the CA")
    files = TLSFiles(workdir / "cert.pem", workdir / "key.pem")
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(files.key), "-out", str(files.cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return files


class RedisServer:
    """A ``redis-server`` this run owns, without persistence, in ``workdir``.

    It listens on ``port`` (a free one by default), or only on ``unix_socket``,
    or only TLS on ``port`` with ``tls``; ``password`` sets ``requirepass``.
    ``config`` (a file, first on the command line) and ``extra`` options make it a
    cluster node, a replica or a sentinel. It keeps its port across restarts.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        unix_socket: Path | None = None,
        tls: TLSFiles | None = None,
        password: str | None = None,
        config: Path | None = None,
        extra: Sequence[str] = (),
        name: str = "redis",
    ) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.unix_socket = unix_socket
        self.tls = tls
        self.password = password
        argv = [require("redis-server"), *([str(config)] if config else [])]
        if unix_socket is not None:
            argv += ["--port", "0", "--unixsocket", str(unix_socket), "--unixsocketperm", "700"]
        elif tls is not None:
            argv += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(tls.cert),
                     "--tls-key-file", str(tls.key), "--tls-ca-cert-file", str(tls.ca),
                     "--tls-auth-clients", "no"]  # fmt: skip
        else:
            argv += ["--port", str(self.port)]
        if password is not None:
            argv += ["--requirepass", password]
        argv += ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(workdir), "--protected-mode", "no", *extra]  # fmt: skip
        self.process = Process(name, argv, workdir)

    @property
    def url(self) -> str:
        """``SIDECAR_REDIS_URL`` for this server, database 0."""
        auth = f":{quote(self.password, safe='')}@" if self.password is not None else ""
        if self.unix_socket is not None:
            return f"unix://{auth}{self.unix_socket}?db=0"
        if self.tls is not None:
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls.ca}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self, timeout: float = 1.0) -> redis.Redis:
        """A client of this server (close it, or use it in a ``with`` block)."""
        common: dict[str, Any] = {
            "password": self.password,
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
        }
        if self.unix_socket is not None:
            return redis.Redis(unix_socket_path=str(self.unix_socket), **common)
        if self.tls is not None:
            return redis.Redis(port=self.port, ssl=True, ssl_ca_certs=str(self.tls.ca), **common)
        return redis.Redis(port=self.port, **common)

    def ping(self) -> bool:
        try:
            with self.client(timeout=0.5) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def start(self) -> Self:
        """Start and wait until it answers PING (killed if it does not)."""
        self.process.start()
        try:
            wait_until(self.ping, timeout=20, process=self.process, what="an answer to PING")
        except BaseException:
            self.kill()
            raise
        return self

    def flush(self) -> None:
        with self.client(timeout=5) as client:
            client.flushall()

    def stop(self) -> None:
        """SIGTERM: a clean shutdown (nothing to save)."""
        self.process.stop()

    def kill(self) -> None:
        """SIGKILL: a crash, every connection broken."""
        self.process.kill()

    def restart(self) -> None:
        """Killed and started again on the same port: all data gone."""
        self.kill()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing answers (a hung server)."""
        self.process.pause()

    def resume(self) -> None:
        self.process.resume()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


# -- the emulator and the sidecar --------------------------------------------------------------


class Emulator(Process):
    """``python -m sidecar emulator`` for ``tenant`` on ``port`` (a free one by default),
    accepting :data:`API_KEY`.

    ``seed`` loads the demo customers; ``webhook_url`` receives its signed pushes.
    """

    def __init__(
        self,
        workdir: Path,
        tenant: str,
        *,
        port: int | None = None,
        seed: bool = True,
        webhook_url: str | None = None,
        name: str = "emulator",
    ) -> None:
        port = port or free_port()
        argv = sidecar_command("emulator", "--listen", f"127.0.0.1:{port}", "--tenant", tenant)
        if webhook_url is not None:
            argv += ["--webhook-url", webhook_url]
        if not seed:
            argv.append("--no-seed")
        super().__init__(
            name,
            argv,
            workdir,
            env={
                "EMULATOR_API_KEYS": API_KEY,  # secrets in the environment, never in argv
                "EMULATOR_WEBHOOK_SECRET": WEBHOOK_SECRET,
                "SIDECAR_LOG_LEVEL": "warning",
            },
            ports={"local": port},
            ready_url=f"http://127.0.0.1:{port}/_emulator/healthz",
        )


class Gate(Process):
    """``tests/gate.py``: a relay on ``port`` (a free one by default) to the
    emulator at ``target``. :meth:`kill` takes the upstream down (connections reset and
    refused); :meth:`start` brings it back on the same port, its data intact."""

    def __init__(self, workdir: Path, target: str, *, port: int | None = None,
                 name: str = "gate") -> None:  # fmt: skip
        port = port or free_port()
        target_port = int(target.rsplit(":", 1)[1])
        script = Path(__file__).with_name("gate.py")
        argv = [sys.executable, str(script), str(port), str(target_port)]
        super().__init__(
            name, argv, workdir, ports={"local": port},
            ready_url=f"http://127.0.0.1:{port}/_emulator/healthz",
        )  # fmt: skip


class Sidecar(Process):
    """``python -m sidecar serve`` for ``tenant`` in front of ``base_url``.

    The ops and webhook listeners take free ports, the local API ``listen``
    (``host:port`` or ``unix:/path``; a free port by default). Its environment is
    :func:`sidecar_env` with warning-level logs, a two-second shutdown grace and
    ``settings`` on top. It keeps its ports across restarts.
    """

    def __init__(
        self,
        workdir: Path,
        tenant: str,
        base_url: str,
        *,
        name: str = "sidecar",
        listen: str | None = None,
        **settings: str | None,
    ) -> None:
        ports = {"ops": free_port(), "webhooks": free_port()}
        listen = listen or f"127.0.0.1:{free_port()}"
        if not listen.startswith("unix:"):
            ports["local"] = int(listen.rsplit(":", 1)[1])
        self.listen = listen
        env = sidecar_env(
            tenant,
            base_url,
            **{
                "SIDECAR_LISTEN": listen,
                "SIDECAR_OPS_LISTEN": f"127.0.0.1:{ports['ops']}",
                "SIDECAR_WEBHOOK_LISTEN": f"127.0.0.1:{ports['webhooks']}",
                "SIDECAR_LOG_LEVEL": "warning",
                "SIDECAR_SHUTDOWN_GRACE": "2",
                **settings,
            },
        )
        ops = f"http://127.0.0.1:{ports['ops']}"
        super().__init__(
            name, sidecar_command("serve"), workdir, env=env, ports=ports, ready_url=f"{ops}/readyz"
        )

    @property
    def api_url(self) -> str:
        """The local API as a client takes it: ``http://host:port`` or ``unix:/path``."""
        return self.listen if self.listen.startswith("unix:") else f"http://{self.listen}"

    @property
    def ops_url(self) -> str:
        return self.url("ops")

    @property
    def webhook_url(self) -> str:
        return f"{self.url('webhooks')}/webhooks/vellum"


# -- the stack ---------------------------------------------------------------------------------


class Stack:
    """Redis (``redis=True``), the emulator and sidecars, started together, stopped together.

    ``tenant`` is fresh by default. The emulator is seeded with the demo data
    (``seed``) and pushes its changes to the main sidecar (``push``);
    ``upstream=False`` leaves it out and points the sidecars at a port where
    nothing listens: an upstream that is down. The main sidecar (``sidecar``;
    ``listen`` for its local API) and every one :meth:`add_sidecar` starts get
    ``settings`` (variable names as keywords, None to drop one) and the Redis URL.
    Entering the block starts everything; leaving it stops every process in
    reverse order, also after a failed start.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        tenant: str | None = None,
        redis: bool = False,
        upstream: bool = True,
        seed: bool = True,
        push: bool = True,
        sidecar: bool = True,
        listen: str | None = None,
        **settings: str | None,
    ) -> None:
        self.workdir = workdir
        self.tenant = tenant or "t_" + uuid.uuid4().hex[:10]
        self.redis = RedisServer(workdir) if redis else None
        if self.redis is not None:
            settings = {"SIDECAR_REDIS_URL": self.redis.url, **settings}
        self.settings = settings
        # Chosen first: the sidecars need the emulator's URL, the emulator the main
        # sidecar's webhook URL. Nothing listens there when upstream=False.
        emulator_port = free_port()
        self.emulator_url = f"http://127.0.0.1:{emulator_port}"
        self._main = self._sidecar("sidecar", listen) if sidecar else None
        self.emulator: Emulator | None = None
        if upstream:
            self.emulator = Emulator(
                workdir,
                self.tenant,
                port=emulator_port,
                seed=seed,
                webhook_url=self.sidecar.webhook_url if push else None,
            )
        self._started: list[Process | RedisServer] = []

    def _sidecar(self, name: str, listen: str | None, **settings: str | None) -> Sidecar:
        base = self.emulator_url
        return Sidecar(self.workdir, self.tenant, base, name=name, listen=listen,
                       **{**self.settings, **settings})  # fmt: skip

    @property
    def sidecar(self) -> Sidecar:
        """The main sidecar."""
        if self._main is None:
            raise RuntimeError("this stack was made with sidecar=False")
        return self._main

    @property
    def url(self) -> str:
        """The main sidecar's local API (``http://...`` or ``unix:/path``)."""
        return self.sidecar.api_url

    @property
    def sidecars(self) -> list[Sidecar]:
        """Every sidecar started, the main one first."""
        return [p for p in self._started if isinstance(p, Sidecar)]

    # lifecycle

    def start(self) -> Self:
        """Start Redis, the emulator and the main sidecar, as asked, each ready."""
        if self.redis is not None:
            self._start(self.redis)
        if self.emulator is not None:
            self._start(self.emulator)
        if self._main is not None:
            self._start(self._main)
        return self

    def _start(self, item: Process | RedisServer) -> None:
        if item not in self._started:
            self._started.append(item)
        item.start()

    def add(self, process: Process) -> Process:
        """Start another process, ready when this returns; it stops with the rest."""
        self._start(process)
        return process

    def add_sidecar(
        self, name: str, *, listen: str | None = None, **settings: str | None
    ) -> Sidecar:
        """Start another sidecar with the stack's settings and ``settings`` on top."""
        sidecar = self._sidecar(name, listen, **settings)
        self._start(sidecar)
        return sidecar

    def start_sidecar(self) -> None:
        """Start the main sidecar again after :meth:`stop_sidecar` (same ports)."""
        self._start(self.sidecar)

    def stop_sidecar(self) -> None:
        self.sidecar.stop()

    def close(self) -> None:
        """Stop every process, the last started first; raise the first failure after."""
        failure: BaseException | None = None
        for item in reversed(self._started):
            try:
                item.stop()
            except Exception as exc:  # keep stopping the others
                failure = failure or exc
        if failure is not None:
            raise failure

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    def logs(self) -> str:
        """The end of every process's log, for a failure message."""
        procs = [i.process if isinstance(i, RedisServer) else i for i in self._started]
        return "\n".join(f"--- {p.name}\n{p.tail()}" for p in procs)

    # the emulator's admin API

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        """Call the emulator's admin API (``/_emulator/...``); the parsed JSON answer."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 - loopback
            f"{self.emulator_url}/_emulator{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310
            raw = resp.read()
        return json.loads(raw) if raw else None

    def set_entitlements(self, customer: str, doc: dict[str, Any]) -> None:
        """Store a document in the emulator; its signed push reaches the sidecar first."""
        path = f"/tenants/{self.tenant}/customers/{quote(customer, safe='')}/entitlements"
        answer = self.admin("PUT", path, doc)
        assert answer["pushed"] is True, f"the push did not reach the sidecar: {answer}"

    def upstream_requests(self, operation: str) -> list[dict[str, Any]]:
        """What the emulator received for ``operation`` (to see what the client sent)."""
        answer = self.admin("GET", f"/requests?operation={operation}&tenant={self.tenant}")
        requests: list[dict[str, Any]] = answer["requests"]
        return requests


# -- hostile peers -----------------------------------------------------------------------------


async def slow_body(port: int, path: str, stop: asyncio.Event, every: float = 0.5) -> int:
    """The slow-body peer of issue 21 until ``stop``: a request head announcing a
    100,000-byte body, then one byte every ``every`` seconds, connecting again
    whenever the server cuts it or answers. Returns how many connections it made."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Content-Length: 100000\r\n\r\n"
    ).encode()
    made = 0
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)  # the peer's pace, not a wait for state
            continue
        made += 1
        try:
            writer.write(head)
            while not stop.is_set():
                writer.write(b" ")
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    if not await asyncio.wait_for(reader.read(4096), every):
                        break  # cut: connect again
        except OSError:
            pass
        finally:
            writer.close()
    return made
