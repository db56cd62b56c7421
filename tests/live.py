"""A real emulator and a real sidecar, each its own process, for the client tests.

The tiny clients speak plain HTTP over real sockets (and the JS one runs in
another process), so they need a sidecar that listens the way production does:
``python -m sidecar serve`` in front of ``python -m sidecar emulator``, with
signed pushes between them, on free ports of this machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

from .conftest import API_KEY, WEBHOOK_SECRET, free_port, wait_until

STARTUP_TIMEOUT = 30.0


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 (our own http URLs)
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


class Process:
    """One child process with its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        self._out = self.log.open("ab")
        self.proc = subprocess.Popen(
            self.argv, env=self.env, stdout=self._out, stderr=subprocess.STDOUT
        )

    def wait_for(self, url: str, status: int = 200) -> None:
        def ready() -> bool:
            if not self.running:
                raise RuntimeError(f"{self.name} exited early; its log:\n{self.tail()}")
            return _status(url) == status

        try:
            wait_until(ready, timeout=STARTUP_TIMEOUT, interval=0.05)
        except AssertionError:
            raise RuntimeError(
                f"{self.name} did not answer {url} with {status}; its log:\n{self.tail()}"
            ) from None

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM (the sidecar drains and exits 0), SIGKILL if that takes too long."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
            self.proc = None
        if self._out is not None:
            self._out.close()
            self._out = None


def _clean_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("VELLUM_", "SIDECAR_", "EMULATOR_"))
    }


class Stack:
    """The emulator (seeded demo data in a fresh tenant) and a sidecar in front of it.

    ``url`` is the local API as a client takes it (``http://...`` or
    ``unix:/path``). ``upstream=False`` leaves the emulator out and points the
    sidecar at a port where nothing listens: an upstream that is down.
    """

    def __init__(
        self, workdir: Path, *, listen: str | None = None, upstream: bool = True, **env: str
    ) -> None:
        self.workdir = workdir
        self.tenant = "t_" + uuid.uuid4().hex[:10]
        self.emulator_port = free_port()
        self.ops_port = free_port()
        self.webhook_port = free_port()
        self.listen = listen or f"127.0.0.1:{free_port()}"
        self.upstream = upstream
        base = _clean_env()
        emulator_argv = [
            sys.executable, "-m", "sidecar", "emulator",
            "--listen", f"127.0.0.1:{self.emulator_port}",
            "--api-keys", API_KEY,
            "--tenant", self.tenant,
            "--webhook-url", f"http://127.0.0.1:{self.webhook_port}/webhooks/vellum",
        ]  # fmt: skip
        self.emulator = Process(
            "emulator",
            emulator_argv,
            {**base, "EMULATOR_WEBHOOK_SECRET": WEBHOOK_SECRET, "SIDECAR_LOG_LEVEL": "warning"},
            workdir / "emulator.log",
        )
        sidecar_env = {
            **base,
            "VELLUM_API_KEY": API_KEY,
            "VELLUM_TENANT_ID": self.tenant,
            "VELLUM_BASE_URL": f"http://127.0.0.1:{self.emulator_port}",
            "VELLUM_WEBHOOK_SECRETS": WEBHOOK_SECRET,
            "SIDECAR_LISTEN": self.listen,
            "SIDECAR_OPS_LISTEN": f"127.0.0.1:{self.ops_port}",
            "SIDECAR_WEBHOOK_LISTEN": f"127.0.0.1:{self.webhook_port}",
            "SIDECAR_UPSTREAM_TIMEOUT": "2",
            "SIDECAR_SHUTDOWN_GRACE": "2",
            "SIDECAR_LOG_LEVEL": "warning",
            **env,
        }
        self.sidecar = Process(
            "sidecar",
            [sys.executable, "-m", "sidecar", "serve"],
            sidecar_env,
            workdir / "sidecar.log",
        )

    @property
    def url(self) -> str:
        if self.listen.startswith("unix:"):
            return self.listen
        return f"http://{self.listen}"

    @property
    def emulator_url(self) -> str:
        return f"http://127.0.0.1:{self.emulator_port}"

    def start(self) -> Stack:
        if self.upstream:
            self.emulator.start()
            self.emulator.wait_for(f"{self.emulator_url}/_emulator/healthz")
        self.start_sidecar()
        return self

    def start_sidecar(self) -> None:
        self.sidecar.start()
        self.sidecar.wait_for(f"http://127.0.0.1:{self.ops_port}/readyz")

    def stop_sidecar(self) -> None:
        self.sidecar.stop()

    def close(self) -> None:
        self.sidecar.stop()
        self.emulator.stop()

    def __enter__(self) -> Stack:
        """Start everything; leaving the block stops it, even after a failed start."""
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    def logs(self) -> str:
        return f"--- sidecar\n{self.sidecar.tail()}\n--- emulator\n{self.emulator.tail()}"

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        """Call the emulator's admin API (``/_emulator/...``); the parsed JSON answer."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310
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
