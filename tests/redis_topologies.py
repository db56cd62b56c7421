"""Real Redis topologies for tests: a three-master Cluster and a Sentinel-watched pair.

Every process is a real ``redis-server`` (``--cluster-enabled yes`` or
``--sentinel``) on free loopback ports, in a temporary directory, started and
killed by these helpers; nothing touches a server the machine already runs.
Readiness is polled with deadlines, never slept for.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from .conftest import RedisServer, free_port, wait_until

__all__ = ["ClusterSetup", "SentinelSetup", "redis_binary", "wait_until"]

SERVICE = "mymaster"


def redis_binary(name: str = "redis-server") -> str:
    binary = shutil.which(name)
    if binary is None:
        raise RuntimeError(f"{name} is not installed (apt-get install redis-server)")
    return binary


def _client(port: int) -> redis.Redis:
    return redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)


def _answers(check: Callable[[], bool]) -> Callable[[], bool]:
    def probe() -> bool:
        try:
            return check()
        except redis.RedisError:
            return False

    return probe


class _Process:
    """One ``redis-server`` process with its own log file."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        self._log_file = log.open("ab")
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            args, stdout=self._log_file, stderr=subprocess.STDOUT
        )

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None
        self._log_file.close()


class ClusterSetup:
    """Three masters, no replicas, all 16384 slots assigned by ``redis-cli --cluster create``."""

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        self.workdir = workdir
        self.ports = [free_port() for _ in range(masters)]
        self._procs: list[_Process] = []

    @property
    def url(self) -> str:
        """The seed-node list, as an operator would write ``SIDECAR_REDIS_URL``."""
        return "redis://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def start(self) -> None:
        server = redis_binary()
        for port in self.ports:
            node_dir = self.workdir / f"node-{port}"
            node_dir.mkdir()
            self._procs.append(
                _Process(
                    [server, "--port", str(port), "--cluster-port", str(free_port()),
                     "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                     "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000",
                     "--save", "", "--appendonly", "no", "--dir", str(node_dir),
                     "--protected-mode", "no"],
                    node_dir / "redis.log",
                )
            )  # fmt: skip
        for port in self.ports:
            wait_until(_answers(lambda port=port: bool(_client(port).ping())), timeout=20)
        subprocess.run(
            [redis_binary("redis-cli"), "--cluster", "create",
             *(f"127.0.0.1:{p}" for p in self.ports), "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        wait_until(self.healthy, timeout=30, interval=0.05)

    def healthy(self) -> bool:
        for port in self.ports:
            try:
                info = _client(port).cluster("info")
            except redis.RedisError:
                return False
            if info.get("cluster_state") != "ok" or int(info.get("cluster_known_nodes", 0)) != len(
                self.ports
            ):
                return False
        return True

    def node_of(self, key: str) -> int:
        """The port of the master that owns ``key``'s slot."""
        client = _client(self.ports[0])
        slot = int(client.cluster("keyslot", key))
        for start, end, primary, *_ in client.cluster("slots"):
            if start <= slot <= end:
                return int(primary[1])
        raise AssertionError(f"no node owns slot {slot}")

    def keys_on(self, port: int, pattern: str) -> list[bytes]:
        return list(_client(port).scan_iter(match=pattern, count=1000))

    def flushall(self) -> None:
        for port in self.ports:
            _client(port).flushall()

    def stop(self) -> None:
        for proc in self._procs:
            proc.kill()
        self._procs.clear()


class SentinelSetup:
    """A master, one replica and three sentinels (quorum 2) watching ``mymaster``."""

    def __init__(self, workdir: Path, sentinels: int = 3, down_after_ms: int = 1000) -> None:
        self.workdir = workdir
        self.master = RedisServer(workdir / "master")
        self.replica = RedisServer(workdir / "replica")
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.down_after_ms = down_after_ms
        self._sentinels: list[_Process] = []
        self._replica_proc: _Process | None = None

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}"

    def start(self) -> None:
        server = redis_binary()
        self.master.workdir.mkdir()
        self.replica.workdir.mkdir()
        self.master.start()
        self._replica_proc = _Process(
            [server, "--port", str(self.replica.port), "--bind", "127.0.0.1",
             "--replicaof", "127.0.0.1", str(self.master.port), "--save", "",
             "--appendonly", "no", "--dir", str(self.replica.workdir), "--protected-mode", "no"],
            self.replica.workdir / "redis.log",
        )  # fmt: skip
        wait_until(
            _answers(lambda: _info(self.replica.port, "replication")["master_link_status"] == "up"),
            timeout=20,
        )
        quorum = len(self.sentinel_ports) // 2 + 1
        for port in self.sentinel_ports:
            sdir = self.workdir / f"sentinel-{port}"
            sdir.mkdir()
            conf = sdir / "sentinel.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {sdir}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.master.port} {quorum}\n"
                f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}\n"
                f"sentinel failover-timeout {SERVICE} 10000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            self._sentinels.append(_Process([server, str(conf), "--sentinel"], sdir / "log"))
        wait_until(self._sentinels_agree, timeout=30, interval=0.1)

    def _sentinels_agree(self) -> bool:
        """Every sentinel knows the master, the replica and the other sentinels."""
        for port in self.sentinel_ports:
            try:
                state = _client(port).sentinel_master(SERVICE)
            except redis.RedisError:
                return False
            if int(state["num-other-sentinels"]) != len(self.sentinel_ports) - 1:
                return False
            if int(state["num-slaves"]) < 1:
                return False
        return True

    def master_port(self) -> int:
        """The master as the sentinels name it now."""
        _, port = _client(self.sentinel_ports[0]).sentinel_get_master_addr_by_name(SERVICE)
        return int(port)

    def wait_replicated(self) -> None:
        """Block until the replica acknowledged every write the master took."""
        acked = _client(self.master_port()).execute_command("WAIT", 1, 5000)
        assert int(acked) >= 1, "the replica did not acknowledge the writes"

    def kill_master(self) -> int:
        """Kill the current master (SIGKILL, no goodbye); return its port."""
        port = self.master_port()
        if port == self.master.port:
            self.master.stop()
        else:
            assert self._replica_proc is not None and port == self.replica.port
            self._replica_proc.kill()
            self._replica_proc = None
        return port

    def stop(self) -> None:
        for proc in self._sentinels:
            proc.kill()
        self._sentinels.clear()
        if self._replica_proc is not None:
            self._replica_proc.kill()
            self._replica_proc = None
        self.master.stop()


def _info(port: int, section: str) -> dict[str, Any]:
    return dict(_client(port).info(section))
