"""Run the built image as an operator would and check what docs/deploy.md promises.

    uv run python .ci/image_check.py IMAGE

A real ``redis-server`` (tests/harness.py) on a free loopback port, then two
containers of IMAGE on the host's network, each on free loopback ports: the
emulator role (``emulator``) and the sidecar (the image's default command), both
with a read-only root filesystem, every capability dropped and no new privileges.
The sidecar runs with traces on towards a collector that is not there.
Checked: the image's user is 10001 and its HEALTHCHECK is kept (podman's default
OCI format drops it: build with ``--format docker``), each container runs as 10001
and cannot write to its root filesystem, each role's HEALTHCHECK passes, the
sidecar becomes ready on Redis and the emulator, a caller's ``traceparent``
reaches the emulator in the same trace, an emulator change is pushed
(signed) and applied at once, and SIGTERM stops each container with exit 0,
the sidecar leaving its warm-start snapshot on a named volume at
``/var/lib/vellum-sidecar`` (seeded from the image's directory: owned by 10001),
mode 0600, holding what it cached.
Prints the image's size and how long each step took. Exit 1 with the containers'
logs on the first failure.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness import API_KEY, WEBHOOK_SECRET, RedisServer, free_port, wait_until

TENANT = "demo"
UID = 10001


def podman(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", *args], capture_output=True, text=True, check=check, timeout=timeout
    )


def http(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read() or b"null")
    except OSError:
        return 0, None


class Containers:
    """The containers this run started, removed at the end; their logs on failure."""

    def __init__(self, image: str) -> None:
        self.image = image
        self.run_id = uuid.uuid4().hex[:8]
        self.names: list[str] = []
        self.volumes: list[str] = []

    def run(
        self,
        role: str,
        env: dict[str, str],
        mounts: dict[Path, str],
        *cmd: str,
        volumes: dict[str, str] | None = None,
    ) -> str:
        """Start a container; ``mounts`` are read-only host paths, ``volumes`` named
        volumes (created by podman, seeded from the image, writable)."""
        name = f"vellum-sidecar-ci-{role}-{self.run_id}"
        argv = ["run", "--detach", "--name", name, "--network", "host", "--read-only",
                "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
                # No systemd timer here: the checks run the HEALTHCHECK themselves.
                "--health-interval", "disable"]  # fmt: skip
        for key, value in env.items():
            argv += ["--env", f"{key}={value}"]
        for host, inside in mounts.items():
            argv += ["--volume", f"{host}:{inside}:ro"]
        for volume, inside in (volumes or {}).items():
            argv += ["--volume", f"{volume}:{inside}"]
            self.volumes.append(volume)
        podman(*argv, self.image, *cmd)
        self.names.append(name)
        return name

    def state(self, name: str) -> dict[str, Any]:
        state: dict[str, Any] = json.loads(podman("inspect", name).stdout)[0]["State"]
        return state

    def logs(self) -> str:
        out = []
        for name in self.names:
            logs = podman("logs", name, check=False)
            out.append(f"--- {name}\n{logs.stdout}{logs.stderr}")
        return "\n".join(out)

    def remove(self) -> None:
        for name in self.names:
            podman("rm", "--force", "--time", "2", name, check=False)
        for volume in self.volumes:
            podman("volume", "rm", "--force", volume, check=False)


def step(what: str, started: float) -> float:
    now = time.monotonic()
    print(f"ok  {what} ({now - started:.1f} s)", flush=True)
    return now


def check_image(image: str) -> None:
    [info] = json.loads(podman("image", "inspect", image).stdout)
    config = info["Config"]
    user = config.get("User", "")
    assert user == f"{UID}:{UID}", f"the image's user is {user!r}, not {UID}:{UID}"
    health = info.get("Healthcheck") or config.get("Healthcheck")
    assert health and health["Test"] == ["CMD", "vellum-sidecar", "healthcheck"], (
        f"no HEALTHCHECK in the image ({health!r}): build with --format docker"
    )
    assert config.get("StopSignal") == "SIGTERM", config.get("StopSignal")
    print(f"image {image}: {info['Size'] / 1e6:.1f} MB, user {user}, HEALTHCHECK kept")


def check_confinement(name: str) -> None:
    """Runs as 10001, and neither / nor /app (the venv) can be written."""
    ids = podman("exec", name, "id", "-u").stdout.strip()
    assert ids == str(UID), f"{name} runs as uid {ids}"
    for path in ("/probe", "/app/.venv/probe"):
        wrote = podman("exec", name, "sh", "-c", f": > {path}", check=False)
        assert wrote.returncode != 0, f"{name} could write {path}"
        assert "Read-only file system" in wrote.stderr, wrote.stderr


def check_health(name: str) -> None:
    """The image's own HEALTHCHECK, run by podman inside the container."""
    result = podman("healthcheck", "run", name, check=False)
    assert result.returncode == 0, f"{name}'s HEALTHCHECK failed: {result.stdout}{result.stderr}"


def check_sigterm(name: str) -> None:
    podman("kill", "--signal", "TERM", name)
    code = podman("wait", name, timeout=30).stdout.strip()
    assert code == "0", f"{name} exited with {code} after SIGTERM"


def check_snapshot(volume: str) -> None:
    """The sidecar's snapshot on its named volume after SIGTERM: written by uid 10001,
    mode 0600, for the tenant, holding the customer it cached."""
    from sidecar.cache.snapshot import read_snapshot

    mountpoint = podman("volume", "inspect", "--format", "{{.Mountpoint}}", volume)
    path = Path(mountpoint.stdout.strip()) / "snapshot.json"
    info = path.stat()
    assert (info.st_uid, info.st_mode & 0o777) == (UID, 0o600), (info.st_uid, oct(info.st_mode))
    held = {ident for _, ident, _ in read_snapshot(path, TENANT).entries}
    assert "cus_trial" in held, held
    assert API_KEY.encode() not in path.read_bytes()


def main(image: str) -> int:
    check_image(image)
    containers = Containers(image)
    with tempfile.TemporaryDirectory(prefix="vellum-image-") as tmp:
        work = Path(tmp)
        secrets = work / "secrets"
        secrets.mkdir()
        (secrets / "api-key").write_text(API_KEY)
        (secrets / "webhook-secrets").write_text(WEBHOOK_SECRET)
        for path in (secrets, *secrets.iterdir()):
            path.chmod(0o755 if path.is_dir() else 0o644)  # readable by uid 10001
        redis = RedisServer(work)
        redis.process.start()
        emu_port, api_port, hook_port, ops_port = (free_port() for _ in range(4))
        emulator_url = f"http://127.0.0.1:{emu_port}"
        api = f"http://127.0.0.1:{api_port}"
        ops = f"http://127.0.0.1:{ops_port}"
        state = f"vellum-sidecar-ci-state-{containers.run_id}"
        try:
            t = time.monotonic()
            emulator = containers.run(
                "emulator",
                {
                    "EMULATOR_LISTEN": f"127.0.0.1:{emu_port}",
                    "EMULATOR_TENANT": TENANT,
                    "EMULATOR_API_KEYS": API_KEY,
                    "EMULATOR_WEBHOOK_URL": f"http://127.0.0.1:{hook_port}/webhooks/vellum",
                    "VELLUM_WEBHOOK_SECRETS_FILE": "/run/secrets/webhook-secrets",
                },
                {secrets: "/run/secrets"},
                "emulator",
            )
            sidecar = containers.run(
                "sidecar",
                {
                    "VELLUM_TENANT_ID": TENANT,
                    "VELLUM_BASE_URL": emulator_url,
                    "VELLUM_API_KEY_FILE": "/run/secrets/api-key",
                    "VELLUM_WEBHOOK_SECRETS_FILE": "/run/secrets/webhook-secrets",
                    "SIDECAR_REDIS_URL": redis.url,
                    "SIDECAR_LISTEN": f"127.0.0.1:{api_port}",
                    "SIDECAR_WEBHOOK_LISTEN": f"127.0.0.1:{hook_port}",
                    "SIDECAR_OPS_LISTEN": f"127.0.0.1:{ops_port}",
                    # Traces on (the image has the [otel] extra), to a collector
                    # that is not there: nothing may slow or fail.
                    "OTEL_TRACES_EXPORTER": "otlp",
                    "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",
                    "SIDECAR_SNAPSHOT_FILE": "/var/lib/vellum-sidecar/snapshot.json",
                },
                {secrets: "/run/secrets"},
                volumes={state: "/var/lib/vellum-sidecar"},
            )
            wait_until(
                lambda: http("GET", f"{emulator_url}/_emulator/healthz")[0] == 200,
                timeout=30,
                what="the emulator container's health",
            )
            t = step("emulator container started", t)
            wait_until(
                lambda: http("GET", f"{ops}/readyz")[0] == 200,
                timeout=30,
                what="the sidecar container's readiness",
            )
            status, ready = http("GET", f"{ops}/readyz")
            assert (ready["redis"], ready["upstream"]) == ("ok", "ok"), ready
            t = step("sidecar container ready (redis ok, upstream ok)", t)
            for name in (emulator, sidecar):
                assert containers.state(name)["Running"], f"{name} is not running"
                check_confinement(name)
                check_health(name)
            t = step("both run as 10001 on a read-only root; both roles' HEALTHCHECK pass", t)
            trace_id = uuid.uuid4().hex
            status, body = http(
                "GET",
                f"{api}/v1/customers/cus_trial/can/exports",
                headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
            )
            assert (status, body["allowed"]) == (200, False), (status, body)
            _, seen = http("GET", f"{emulator_url}/_emulator/requests?operation=get_entitlements")
            carried = seen["requests"][0]["traceparent"] or ""
            assert carried.split("-")[1:2] == [trace_id], carried
            t = step("traces on, collector unreachable: the caller's trace reached the upstream", t)
            status, reply = http(
                "PUT",
                f"{emulator_url}/_emulator/customers/cus_trial/entitlements",
                {"status": "active", "modules": ["reports", "exports"]},
            )
            assert (status, reply["pushed"]) == (200, True), (status, reply)
            status, body = http("GET", f"{api}/v1/customers/cus_trial/can/exports")
            assert (status, body["allowed"]) == (200, True), (status, body)
            t = step("a signed push from the emulator container applied at once", t)
            check_sigterm(sidecar)
            check_sigterm(emulator)
            t = step("SIGTERM: both exit 0", t)
            check_snapshot(state)
            step("the snapshot on the named volume: 10001's, 0600, what the sidecar cached", t)
        except (AssertionError, RuntimeError, subprocess.SubprocessError) as exc:
            print(f"FAILED: {exc}\n{containers.logs()}", file=sys.stderr)
            return 1
        finally:
            containers.remove()
            redis.process.stop()
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
