"""Real processes for the benchmark: Redis, the emulator, sidecars, the bare server.

Everything binds to 127.0.0.1 on free ports (never the machine's 6379), logs to
files in the run's work directory, and is stopped (SIGTERM, then SIGKILL) when
the :class:`Stack` closes, even after an error or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import redis

__all__ = ["API_KEY", "TENANT", "WEBHOOK_SECRET", "Proc", "Stack", "free_port", "proc_tree"]

API_KEY = "bench_key_" + "k" * 22
WEBHOOK_SECRET = "whsec_bench_" + "s" * 20
TENANT = "bench"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(predicate: Callable[[], bool], what: str, proc: subprocess.Popen[bytes] | None,
          timeout: float = 30.0) -> None:  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} while starting")
        if predicate():
            return
        time.sleep(0.02)
    raise RuntimeError(f"{what} not ready within {timeout}s")


def _http_ok(url: str) -> Callable[[], bool]:
    import urllib.error
    import urllib.request

    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 - loopback
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    return check


def proc_tree(pid: int) -> list[int]:
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


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def url(self, port: str = "local") -> str:
        return f"http://127.0.0.1:{self.ports[port]}"

    def cpu_seconds(self) -> float:
        """CPU time of the process and its children (workers), user + system."""
        return sum(_cpu_seconds(p) for p in proc_tree(self.pid))

    def peak_rss_mib(self) -> float:
        """Peak resident set (VmHWM) of the process, or of its largest worker."""
        return max(_status_kib(p, "VmHWM") for p in proc_tree(self.pid)) / 1024

    def rss_mib(self) -> float:
        return sum(_status_kib(p, "VmRSS") for p in proc_tree(self.pid)) / 1024

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        return self.popen.returncode


def _clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The caller's environment without its own sidecar settings, plus ``extra``."""
    ours = ("VELLUM_", "SIDECAR_", "EMULATOR_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    env.update(extra)
    return env


class Stack:
    """Owns every process of a run; closing it stops them in reverse order."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []
        self.redis_port = 0
        self.emulator: Proc | None = None

    def __enter__(self) -> Stack:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop()
        self.procs.clear()

    def _spawn(self, name: str, argv: list[str], env: Mapping[str, str], **ports: int) -> Proc:
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                argv, env=_clean_env(env), stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        proc = Proc(name, popen, log, dict(ports))
        self.procs.append(proc)
        return proc

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def start_redis(self) -> Proc:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.redis_port = free_port()
        argv = [binary, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.workdir),
                "--protected-mode", "no"]  # fmt: skip
        proc = self._spawn("redis", argv, {}, redis=self.redis_port)
        client = redis.Redis(port=self.redis_port, socket_timeout=0.5)

        def ping() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        _wait(ping, "redis-server", proc.popen)
        client.close()
        return proc

    def flush_redis(self) -> None:
        client = redis.Redis(port=self.redis_port, socket_timeout=5)
        client.flushall()
        client.close()

    def start_emulator(self) -> Proc:
        port = free_port()
        argv = [sys.executable, "-m", "sidecar", "emulator", "--listen", f"127.0.0.1:{port}",
                "--api-keys", API_KEY, "--tenant", TENANT, "--no-seed"]  # fmt: skip
        # No --webhook-url: the benchmark signs and times its own pushes, so the
        # emulator's data changes reach the sidecars only through them.
        proc = self._spawn("emulator", argv, {"SIDECAR_LOG_LEVEL": "warning"}, local=port)
        _wait(_http_ok(f"{proc.url()}/_emulator/healthz"), "emulator", proc.popen)
        self.emulator = proc
        return proc

    def start_sidecar(self, name: str, **env: str) -> Proc:
        assert self.emulator is not None
        local, ops, hooks = free_port(), free_port(), free_port()
        settings = {
            "VELLUM_API_KEY": API_KEY,
            "VELLUM_TENANT_ID": TENANT,
            "VELLUM_BASE_URL": self.emulator.url(),
            "VELLUM_WEBHOOK_SECRETS": WEBHOOK_SECRET,
            "SIDECAR_REDIS_URL": self.redis_url,
            "SIDECAR_LISTEN": f"127.0.0.1:{local}",
            "SIDECAR_OPS_LISTEN": f"127.0.0.1:{ops}",
            "SIDECAR_WEBHOOK_LISTEN": f"127.0.0.1:{hooks}",
            "SIDECAR_LOG_LEVEL": "warning",
        }
        settings.update(env)
        argv = [sys.executable, "-m", "sidecar", "serve"]
        proc = self._spawn(name, argv, settings, local=local, ops=ops, webhooks=hooks)
        _wait(_http_ok(f"{proc.url('ops')}/readyz"), f"sidecar {name}", proc.popen)
        return proc

    def start_bare(self) -> Proc:
        port = free_port()
        argv = [sys.executable, "-m", "bench.bare", "--port", str(port)]
        proc = self._spawn("bare", argv, {}, local=port)
        _wait(_http_ok(f"{proc.url()}/healthz"), "bare server", proc.popen)
        return proc
