"""SIDECAR_WORKERS: workers behind one port, coherent through Redis, one ops view."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.config import ConfigError, Settings
from sidecar.server import listening_unix_socket

from .harness import Stack, free_port, wait_until


def get(url: str) -> tuple[int, Any]:
    """One request on a new connection (so SO_REUSEPORT may pick either worker)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - loopback
            raw = resp.read()
            return resp.status, json.loads(raw) if raw[:1] in (b"{", b"[") else raw.decode()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read())


def put(url: str, body: Any) -> Any:
    req = urllib.request.Request(  # noqa: S310 - loopback
        url, data=json.dumps(body).encode(), method="PUT"
    )
    with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
        return json.loads(resp.read())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def served_by(metrics: str) -> set[str]:
    """Workers that counted a ``can`` request, from the merged exposition."""
    workers = set()
    for line in metrics.splitlines():
        if line.startswith("vellum_sidecar_requests_total{") and "/can/" in line:
            workers.add(line.split('worker="', 1)[1].split('"', 1)[0])
    return workers


@pytest.fixture
def start_workers(tmp_path: Path) -> Iterator[Callable[[str], Stack]]:
    """Starts Redis, the emulator and a two-worker sidecar with its local API on ``listen``."""
    with contextlib.ExitStack() as stacks:

        def start(listen: str) -> Stack:
            stack = Stack(tmp_path, redis=True, tenant="acme", listen=listen, SIDECAR_WORKERS="2")
            return stacks.enter_context(stack)

        yield start


def test_more_than_one_worker_needs_redis() -> None:
    base = {"VELLUM_API_KEY": "k", "VELLUM_TENANT_ID": "t", "SIDECAR_WORKERS": "2"}
    with pytest.raises(ConfigError) as err:
        Settings.from_env(base)
    assert [p for p in err.value.problems if p.startswith("SIDECAR_WORKERS:")]
    with pytest.raises(ConfigError):
        Settings.from_env({**base, "SIDECAR_WORKERS": "0"})
    settings = Settings.from_env({**base, "SIDECAR_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert settings.workers == 2
    assert Settings.from_env({"VELLUM_API_KEY": "k", "VELLUM_TENANT_ID": "t"}).workers == 1


def test_workers_share_the_port_stay_coherent_and_are_restarted(
    start_workers: Callable[[str], Stack],
) -> None:
    stack = start_workers(f"127.0.0.1:{free_port()}")
    supervisor = stack.sidecar
    api, ops, emu = stack.url, supervisor.ops_url, stack.emulator_url

    status, ready = get(f"{ops}/readyz")
    assert status == 200
    assert (ready["status"], ready["redis"], ready["upstream"], ready["fanout"]) == (
        "ready", "ok", "ok", "ok",
    )  # fmt: skip
    pids = {w["worker"]: w["pid"] for w in ready["workers"]}
    assert sorted(pids) == [0, 1]
    assert len(set(pids.values())) == 2

    # New connections land on both workers; both cache cus_trial (no exports).
    def both_served() -> bool:
        assert get(f"{api}/v1/customers/cus_trial/can/exports")[1]["allowed"] is False
        return served_by(get(f"{ops}/metrics")[1]) == {"0", "1"}

    wait_until(both_served, timeout=20, interval=0)

    # The push lands on one worker; the other learns through the Redis fan-out.
    reply = put(
        f"{emu}/_emulator/customers/cus_trial/entitlements",
        {"status": "active", "modules": ["reports", "exports"]},
    )
    assert reply["pushed"] is True

    def all_see_it() -> bool:
        return all(
            get(f"{api}/v1/customers/cus_trial/can/exports")[1]["allowed"] for _ in range(10)
        )

    wait_until(all_see_it, timeout=10)

    metrics = get(f"{ops}/metrics")[1]
    assert "vellum_sidecar_workers 2.0" in metrics
    assert 'vellum_sidecar_webhooks_total{result="ok",worker=' in metrics
    assert 'process_resident_memory_bytes{worker="1"}' in metrics
    assert 'vellum_sidecar_fanout_state{state="ok",worker="1"} 1.0' in metrics
    assert "_created" not in metrics, "neither the supervisor's series nor the workers'"

    # A worker that dies is restarted; once it is gone (connections already queued
    # on its socket die with it), the port keeps answering through the other.
    os.kill(pids[0], signal.SIGKILL)
    wait_until(lambda: not alive(pids[0]))
    for _ in range(10):
        assert get(f"{api}/v1/customers/cus_active/can/reports")[0] == 200

    def replaced() -> bool:
        status, body = get(f"{ops}/readyz")
        return status == 200 and body["workers"][0]["pid"] not in (pids[0], None)

    wait_until(replaced, timeout=30)
    assert "vellum_sidecar_worker_restarts_total 1.0" in get(f"{ops}/metrics")[1]

    # SIGTERM: every worker drains and exits, then the supervisor, with 0.
    workers = [w["pid"] for w in get(f"{ops}/readyz")[1]["workers"]]
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=30) == 0
    assert not any(alive(pid) for pid in workers)


def test_workers_share_a_unix_socket(tmp_path: Path, start_workers: Callable[[str], Stack]) -> None:
    path = str(tmp_path / "sidecar.sock")
    stack = start_workers(f"unix:{path}")
    assert os.stat(path).st_mode & 0o777 == 0o660

    def over_unix(target: str) -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(path)
            s.sendall(f"GET {target} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)

    def both_served() -> bool:
        reply = over_unix("/v1/customers/cus_active/can/reports")
        assert reply.startswith(b"HTTP/1.0 200") or reply.startswith(b"HTTP/1.1 200"), reply
        return served_by(get(f"{stack.sidecar.ops_url}/metrics")[1]) == {"0", "1"}

    wait_until(both_served, timeout=20, interval=0)


def test_a_unix_listener_replaces_a_stale_socket_never_a_file(tmp_path: Path) -> None:
    """One binding for the single process and the supervisor (server.listening_unix_socket):
    a socket file left by a killed sidecar is replaced, the mode is 0660 before it
    listens, and a path holding anything else is refused, not deleted."""
    path = tmp_path / "sidecar.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(path))  # a killed sidecar's socket: the file stays, nobody listens
    with listening_unix_socket(str(path), 8) as sock:
        assert os.stat(path).st_mode & 0o777 == 0o660
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(path))
            accepted, _ = sock.accept()
            accepted.close()
    precious = tmp_path / "data.txt"
    precious.write_text("keep me")
    with pytest.raises(OSError, match="in use"):
        listening_unix_socket(str(precious), 8)
    assert precious.read_text() == "keep me"
