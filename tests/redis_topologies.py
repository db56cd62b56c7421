"""Real Redis topologies for tests: a three-master Cluster and a Sentinel-watched pair.

Every process is a :class:`harness.RedisServer` (``--cluster-enabled yes``,
``--replicaof`` or ``--sentinel``) on free loopback ports, in a temporary
directory, started and killed by these helpers; nothing touches a server the
machine already runs. Readiness is polled with deadlines, never slept for.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import redis

from .harness import RedisServer, free_port, require, wait_until

__all__ = ["ClusterSetup", "SentinelSetup"]

SERVICE = "mymaster"


def _client(port: int) -> redis.Redis:
    return redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)


def _answers(check: Callable[[], bool]) -> Callable[[], bool]:
    def probe() -> bool:
        try:
            return check()
        except redis.RedisError:
            return False

    return probe


class ClusterSetup:
    """Three masters, no replicas, all 16384 slots assigned by ``redis-cli --cluster create``."""

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        self.workdir = workdir
        self.nodes: list[RedisServer] = []
        for _ in range(masters):
            port = free_port()
            node_dir = workdir / f"node-{port}"
            node_dir.mkdir()
            self.nodes.append(
                RedisServer(
                    node_dir,
                    port=port,
                    extra=["--cluster-enabled", "yes", "--cluster-port", str(free_port()),
                           "--cluster-config-file", "nodes.conf",
                           "--cluster-node-timeout", "2000"],
                )
            )  # fmt: skip
        self.ports = [node.port for node in self.nodes]

    @property
    def url(self) -> str:
        """The seed-node list, as an operator would write ``SIDECAR_REDIS_URL``."""
        return "redis://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        subprocess.run(
            [require("redis-cli"), "--cluster", "create",
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
        for node in self.nodes:
            node.kill()


class SentinelSetup:
    """A master, one replica and three sentinels (quorum 2) watching ``mymaster``."""

    def __init__(self, workdir: Path, sentinels: int = 3, down_after_ms: int = 1000) -> None:
        self.workdir = workdir
        (workdir / "master").mkdir()
        (workdir / "replica").mkdir()
        self.master = RedisServer(workdir / "master")
        self.replica = RedisServer(
            workdir / "replica", extra=["--replicaof", "127.0.0.1", str(self.master.port)]
        )
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.down_after_ms = down_after_ms
        self._sentinels: list[RedisServer] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}"

    def start(self) -> None:
        self.master.start()
        self.replica.start()
        wait_until(
            _answers(lambda: _info(self.replica.port, "replication")["master_link_status"] == "up"),
            timeout=20,
        )
        quorum = len(self.sentinel_ports) // 2 + 1
        for port in self.sentinel_ports:
            sdir = self.workdir / f"sentinel-{port}"
            sdir.mkdir()
            conf = sdir / "sentinel.conf"  # the sentinel rewrites it: its own copy
            conf.write_text(
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.master.port} {quorum}\n"
                f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}\n"
                f"sentinel failover-timeout {SERVICE} 10000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            sentinel = RedisServer(sdir, port=port, config=conf, extra=["--sentinel"])
            self._sentinels.append(sentinel.start())
        wait_until(self._sentinels_agree, timeout=30, interval=0.1)

    def _sentinels_agree(self) -> bool:
        """Every sentinel knows the master, the replica and the other sentinels."""
        for port in self.sentinel_ports:
            try:
                # A dict from a plain client (redis-py's "| bool" is for a Sentinel object's
                # fan-out, return_responses=False).
                state = cast("dict[str, Any]", _client(port).sentinel_master(SERVICE))
            except redis.RedisError:
                return False
            if int(state["num-other-sentinels"]) != len(self.sentinel_ports) - 1:
                return False
            if int(state["num-slaves"]) < 1:
                return False
        return True

    def master_port(self) -> int:
        """The master as the sentinels name it now."""
        addr = _client(self.sentinel_ports[0]).sentinel_get_master_addr_by_name(SERVICE)
        assert isinstance(addr, tuple), f"the sentinels name no {SERVICE}: {addr!r}"
        _, port = addr
        return int(port)

    def wait_replicated(self) -> None:
        """Block until the replica acknowledged every write the master took."""
        acked = _client(self.master_port()).wait(1, 5000)
        assert int(acked) >= 1, "the replica did not acknowledge the writes"

    def kill_master(self) -> int:
        """Kill the current master (SIGKILL, no goodbye); return its port."""
        port = self.master_port()
        [current] = [s for s in (self.master, self.replica) if s.port == port]
        current.kill()
        return port

    def stop(self) -> None:
        for server in [*self._sentinels, self.replica, self.master]:
            server.kill()


def _info(port: int, section: str) -> dict[str, Any]:
    return dict(_client(port).info(section))
