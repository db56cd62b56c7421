"""The deployment artefacts agree with the code: Dockerfile, compose.yaml, deploy/kubernetes.

Ports, probe paths, variable names, the non-root user and the image command are
read from the artefacts and checked against what the code actually serves and
accepts (the listeners' defaults, the ops and webhook routers, ``VARIABLES``, the
CLI parser). The compose wiring is also run for real, without Docker: the
``vellum`` and ``sidecar`` services' commands and environments start as local
processes (hosts and ports mapped to free loopback ports), their healthchecks
must pass, and the example app must see a push webhook's change.
The Kubernetes manifests are checked twice: as files (the Component's patch,
the example), and as ``kubectl kustomize`` renders them (the example, and the
Component on sample workloads in ``tests/kustomize``: a Deployment and a
StatefulSet), which is what a cluster receives. (``.ci/run`` adds ``docker-compose
config``, ``kubernetes-validate`` on the same renders, the CRD kinds against
their schemas and ``promtool``.)
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from sidecar.__main__ import _parser
from sidecar.app import create_app
from sidecar.config import VARIABLES, Settings
from sidecar.emulator import create_emulator_app
from sidecar.http.ops import create_ops_app
from sidecar.http.webhooks import create_webhook_app
from sidecar.values import Listen

from .harness import Process, RedisServer, free_port, sidecar_command, wait_until

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
COMPONENT_DIR = K8S / "components" / "sidecar"
SAMPLE_DIR = ROOT / "tests" / "kustomize"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
VARIABLE_NAMES = {v.name for v in VARIABLES}
DEFAULTS = {v.name: v.default for v in VARIABLES}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def default_port(variable: str) -> int:
    default = DEFAULTS[variable]
    assert default is not None
    port = Listen.parse(default).port
    assert port is not None
    return port


API_PORT = default_port("SIDECAR_LISTEN")
WEBHOOK_PORT = default_port("SIDECAR_WEBHOOK_LISTEN")
OPS_PORT = default_port("SIDECAR_OPS_LISTEN")


def get_routes(app: Any) -> set[str]:
    return {r.resource.canonical for r in app.router.routes() if r.method in ("GET", "POST", "PUT")}


def settings_for(tenant: str = "t") -> Settings:
    return Settings.from_env({"VELLUM_API_KEY": "k", "VELLUM_TENANT_ID": tenant})


OPS_ROUTES = get_routes(create_ops_app(create_app(settings_for())))
WEBHOOK_ROUTES = get_routes(create_webhook_app(create_app(settings_for())))


# -- Dockerfile ------------------------------------------------------------------------------


class Stage:
    def __init__(self, base: str, name: str | None) -> None:
        self.base = base
        self.name = name
        self.instructions: list[tuple[str, str]] = []

    def all(self, instruction: str) -> list[str]:
        return [args for ins, args in self.instructions if ins == instruction]

    def one(self, instruction: str) -> str:
        [args] = self.all(instruction)
        return args


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARGs and the stages, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, "a continuation line runs off the end"
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        instruction, args = instruction.upper(), args.strip()
        if instruction == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name))
        elif not stages:
            assert instruction == "ARG", f"only ARG may precede FROM, got {instruction}"
            key, _, value = args.partition("=")
            global_args[key] = value
        else:
            stages[-1].instructions.append((instruction, args))
    return global_args, stages


DOCKER_ARGS, STAGES = parse_dockerfile((ROOT / "Dockerfile").read_text())
RUNTIME = STAGES[-1]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def image_user() -> tuple[int, int]:
    uid, _, gid = RUNTIME.one("USER").partition(":")
    return int(uid), int(gid)


def test_dockerfile_is_multi_stage_from_the_lock() -> None:
    names = [s.name for s in STAGES]
    assert names[-1] == "runtime" and "build" in names
    build = next(s for s in STAGES if s.name == "build")
    syncs = [r for r in build.all("RUN") if "uv sync" in r]
    assert len(syncs) == 2, "dependencies layer, then the project"
    for run in syncs:
        assert "--locked" in run and "--no-dev" in run
    assert "--no-editable" in syncs[-1], "the runtime needs no source tree"
    for extra in re.findall(r"--extra (\S+)", " ".join(syncs)):
        assert extra in PYPROJECT["project"]["optional-dependencies"]
    # Same Python base in both stages: the venv's interpreter links stay valid.
    assert build.base == RUNTIME.base == "python:${PYTHON_VERSION}-slim-bookworm"
    major, minor = (int(p) for p in DOCKER_ARGS["PYTHON_VERSION"].split("."))
    floor = PYPROJECT["project"]["requires-python"].removeprefix(">=")
    assert (major, minor) >= tuple(int(p) for p in floor.split("."))


def test_ci_replays_the_dockerfiles_uv_steps() -> None:
    """.ci/run runs the build stage's uv commands without Docker: they must be the same."""
    build = next(s for s in STAGES if s.name == "build")
    in_dockerfile = [re.sub(r"^.*?(uv sync .*)$", r"\1", r) for r in build.all("RUN")]
    in_ci = re.findall(r"^\s*(uv sync .*)$", (ROOT / ".ci" / "run").read_text(), re.M)
    assert [c.replace("--quiet ", "") for c in in_ci if "--no-dev" in c] == in_dockerfile
    env = build.one("ENV")
    for setting in ("UV_COMPILE_BYTECODE=1", "UV_LINK_MODE=copy"):
        assert setting in env


def test_runtime_stage_has_no_build_tools_and_copies_only_the_venv() -> None:
    text = " ".join(args for _, args in RUNTIME.instructions)
    for tool in ("apt-get install", "pip install", "/uv", "gcc", "build-essential"):
        assert tool not in text, f"{tool} in the runtime stage"
    [copy] = RUNTIME.all("COPY")
    assert copy == "--from=build /app/.venv /app/.venv"
    assert "PYTHONDONTWRITEBYTECODE=1" in RUNTIME.one("ENV"), "nothing to write: read-only root"


def test_build_context_holds_what_the_build_copies() -> None:
    allowed = {
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    build = next(s for s in STAGES if s.name == "build")
    sources: set[str] = set()
    for copy in build.all("COPY"):
        if copy.startswith("--from"):
            continue
        *srcs, _dest = copy.split()
        sources.update(s.removeprefix("./") for s in srcs)
    for run in build.all("RUN"):
        sources.update(re.findall(r"--mount=type=bind,source=([^,\s]+)", run))
    assert sources == allowed, "the .dockerignore allow-list is exactly what the build reads"
    for source in sources:
        assert (ROOT / source).exists(), source


def test_image_runs_the_console_script_as_a_non_root_user() -> None:
    uid, gid = image_user()
    assert uid != 0 and gid != 0
    [useradd] = [r for r in RUNTIME.all("RUN") if "useradd" in r]
    assert f"--uid {uid}" in useradd and f"--gid {gid}" in useradd
    entrypoint = exec_form(RUNTIME.one("ENTRYPOINT"))
    cmd = exec_form(RUNTIME.one("CMD"))
    assert entrypoint == ["vellum-sidecar"]
    assert entrypoint[0] in PYPROJECT["project"]["scripts"]
    assert cmd == ["serve"]
    assert _parser().parse_args(cmd).command == "serve"


def test_image_exposes_the_three_listeners_and_checks_health_without_curl() -> None:
    exposed = {int(p) for p in RUNTIME.one("EXPOSE").split()}
    assert exposed == {API_PORT, WEBHOOK_PORT, OPS_PORT}
    healthcheck = RUNTIME.one("HEALTHCHECK")
    options, _, command = healthcheck.partition(" CMD ")
    assert "--interval=" in options and "--timeout=" in options
    args = exec_form(command)
    assert args == ["vellum-sidecar", "healthcheck"]
    assert _parser().parse_args(args[1:]).command == "healthcheck"
    assert "curl" not in healthcheck and "wget" not in healthcheck


# -- compose.yaml ----------------------------------------------------------------------------

COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]


def compose_env(service: str) -> dict[str, str]:
    env = SERVICES[service].get("environment", {})
    assert isinstance(env, dict), f"{service}: use the mapping form of environment"
    return {k: str(v) for k, v in env.items()}


def compose_secret_file(service: str, env_value: str) -> Path:
    """The repo file behind ``/run/secrets/<name>`` for ``service``."""
    assert env_value.startswith("/run/secrets/"), env_value
    name = env_value.removeprefix("/run/secrets/")
    assert name in SERVICES[service].get("secrets", []), f"{service} does not mount {name}"
    file: str = COMPOSE["secrets"][name]["file"]
    path = ROOT / file
    assert path.is_file(), path
    return path


def test_compose_services_and_image() -> None:
    assert set(SERVICES) == {"redis", "vellum", "sidecar", "app"}
    for name in ("vellum", "sidecar", "app"):
        assert SERVICES[name]["image"] == "vellum-sidecar:local", "the same image"
        assert SERVICES[name]["build"] == "."
    assert SERVICES["sidecar"]["command"] == ["serve"]
    assert SERVICES["vellum"]["command"] == ["emulator"]
    assert _parser().parse_args(SERVICES["vellum"]["command"]).command == "emulator"
    assert "healthcheck" in SERVICES["redis"]


def test_compose_redis_keeps_queued_usage_through_a_restart() -> None:
    """Metered usage is acknowledged once it is in Redis: an append-only file fsynced
    every second (tests/test_usage_fleet.py runs a redis-server with these options and
    SIGKILLs it), written to a named volume so it outlives the container."""
    command = SERVICES["redis"]["command"]
    assert command[0] == "redis-server"
    options = dict(zip(command[1::2], command[2::2], strict=True))
    assert (options["--appendonly"], options["--appendfsync"]) == ("yes", "everysec")
    [volume] = SERVICES["redis"]["volumes"]
    name, target = volume.split(":")[:2]
    assert target == "/data" and name in COMPOSE["volumes"]


def test_compose_sidecar_waits_for_healthy_redis_and_vellum() -> None:
    depends = SERVICES["sidecar"]["depends_on"]
    assert depends == {
        "redis": {"condition": "service_healthy"},
        "vellum": {"condition": "service_healthy"},
    }
    for name in ("redis", "vellum", "sidecar"):
        assert SERVICES[name]["healthcheck"]["test"][0] == "CMD"


def test_compose_publishes_the_local_api_on_loopback_only() -> None:
    env = compose_env("sidecar")
    listen = Listen.parse(env["SIDECAR_LISTEN"])
    assert listen.port == API_PORT
    published = SERVICES["sidecar"]["ports"]
    by_container = {int(p.rsplit(":", 1)[1]): p for p in published}
    assert by_container[API_PORT] == f"127.0.0.1:{API_PORT}:{API_PORT}"
    for mapping in published + SERVICES["vellum"].get("ports", []):
        assert mapping.startswith("127.0.0.1:"), f"{mapping} would listen on every interface"
    assert WEBHOOK_PORT not in by_container, "the emulator reaches it on the compose network"


def compose_state_dir(value: str) -> str:
    """The named volume mounted (writable) at the directory of the snapshot file
    ``value``: the image's root is read-only."""
    directory = str(PurePosixPath(value).parent)
    mounts = dict(reversed(v.split(":")[:2]) for v in SERVICES["sidecar"].get("volumes", []))
    assert directory in mounts, f"no volume mounted at {directory}"
    assert mounts[directory] in COMPOSE["volumes"], "a named volume: it outlives the container"
    return directory


def local_snapshot_path(env: dict[str, str], workdir: Path) -> None:
    """Point SIDECAR_SNAPSHOT_FILE (a path on the container's volume) into ``workdir``."""
    value = env.get("SIDECAR_SNAPSHOT_FILE")
    if value is not None:
        (workdir / "state").mkdir(parents=True, exist_ok=True)
        env["SIDECAR_SNAPSHOT_FILE"] = str(workdir / "state" / PurePosixPath(value).name)


def test_compose_sidecar_settings_are_valid(tmp_path: Path) -> None:
    env = compose_env("sidecar")
    assert set(env) <= VARIABLE_NAMES, set(env) - VARIABLE_NAMES
    compose_state_dir(env["SIDECAR_SNAPSHOT_FILE"])
    local_snapshot_path(env, tmp_path)
    for name, value in list(env.items()):
        if name.endswith("_FILE") and name != "SIDECAR_SNAPSHOT_FILE":
            env[name] = str(compose_secret_file("sidecar", value))
    settings = Settings.from_env(env)  # raises ConfigError naming any bad variable
    assert settings.redis_url is not None
    assert urlsplit(settings.redis_url.reveal()).hostname == "redis"
    assert settings.webhooks_enabled


def test_compose_vellum_and_sidecar_agree() -> None:
    emu, side = compose_env("vellum"), compose_env("sidecar")
    main_source = (ROOT / "sidecar" / "__main__.py").read_text()
    for name in emu:
        assert f'"{name}"' in main_source, f"the emulator command does not read {name}"
    emu_port = Listen.parse(emu["EMULATOR_LISTEN"]).port
    assert side["VELLUM_BASE_URL"] == f"http://vellum:{emu_port}"
    assert emu["EMULATOR_TENANT"] == side["VELLUM_TENANT_ID"]
    key = compose_secret_file("sidecar", side["VELLUM_API_KEY_FILE"]).read_text().strip()
    assert emu["EMULATOR_API_KEYS"] == key, "the emulator accepts the sidecar's key"
    assert compose_secret_file("vellum", emu["VELLUM_WEBHOOK_SECRETS_FILE"]) == (
        compose_secret_file("sidecar", side["VELLUM_WEBHOOK_SECRETS_FILE"])
    )
    hook = urlsplit(emu["EMULATOR_WEBHOOK_URL"])
    assert (hook.hostname, hook.port) == ("sidecar", WEBHOOK_PORT)
    assert hook.path in WEBHOOK_ROUTES
    health = urlsplit(SERVICES["vellum"]["healthcheck"]["test"][-1])
    assert health.port == emu_port
    emulator_routes = get_routes(create_emulator_app(api_keys=["k"]))
    assert health.path in emulator_routes


def test_compose_app_shares_the_sidecars_network_namespace() -> None:
    app = SERVICES["app"]
    assert app["network_mode"] == "service:sidecar"
    assert app["depends_on"] == {"sidecar": {"condition": "service_healthy"}}
    assert compose_env("app")["SIDECAR_URL"] == f"http://127.0.0.1:{API_PORT}"
    [volume] = app["volumes"]
    source, target, mode = volume.split(":")
    assert (ROOT / source).is_file() and mode == "ro"
    assert app["entrypoint"] == ["python", target]


def test_compose_hardening() -> None:
    for name in ("vellum", "sidecar", "app"):
        service = SERVICES[name]
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name


# -- the compose wiring, run as local processes -----------------------------------------------


def _get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.load(exc)


def _put(url: str, body: Any) -> int:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="PUT")  # noqa: S310
    with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - loopback
        return int(resp.status)


def _healthcheck_passes(test: list[str], hosts: dict[str, str], env: dict[str, str]) -> bool:
    """Run a compose ``healthcheck.test`` (``CMD`` form) as the container would."""
    assert test[:2] == ["CMD", "vellum-sidecar"], test
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", *(_mapped(a, hosts) for a in test[2:])],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        timeout=30,
        check=False,
    )
    return done.returncode == 0


def _mapped(value: str, hosts: dict[str, str]) -> str:
    for old, new in hosts.items():
        value = value.replace(old, new)
    return value


@pytest.fixture
def compose_stack(tmp_path: Path, redis_url: str) -> Iterator[dict[str, str]]:
    """``vellum`` and ``sidecar`` from compose.yaml as processes on free loopback ports."""
    emu_port, api, hooks, ops = free_port(), free_port(), free_port(), free_port()
    emu_env, side_env = compose_env("vellum"), compose_env("sidecar")
    compose_emu_port = Listen.parse(emu_env["EMULATOR_LISTEN"]).port
    hosts = {
        f"0.0.0.0:{compose_emu_port}": f"127.0.0.1:{emu_port}",
        f"127.0.0.1:{compose_emu_port}": f"127.0.0.1:{emu_port}",
        f"vellum:{compose_emu_port}": f"127.0.0.1:{emu_port}",
        f"sidecar:{WEBHOOK_PORT}": f"127.0.0.1:{hooks}",
        f"0.0.0.0:{API_PORT}": f"127.0.0.1:{api}",
    }
    emu_env = {k: _mapped(v, hosts) for k, v in emu_env.items()}
    side_env = {k: _mapped(v, hosts) for k, v in side_env.items()}
    for service, env in (("vellum", emu_env), ("sidecar", side_env)):
        for name, value in env.items():
            if value.startswith("/run/secrets/"):
                env[name] = str(compose_secret_file(service, value))
    local_snapshot_path(side_env, tmp_path)
    assert side_env["SIDECAR_REDIS_URL"].startswith("redis://redis:")
    side_env["SIDECAR_REDIS_URL"] = redis_url
    side_env["SIDECAR_WEBHOOK_LISTEN"] = f"127.0.0.1:{hooks}"
    side_env["SIDECAR_OPS_LISTEN"] = f"127.0.0.1:{ops}"
    assert "127.0.0.1" in emu_env["EMULATOR_WEBHOOK_URL"], "the push target was mapped"
    vellum = Process("vellum", sidecar_command(*SERVICES["vellum"]["command"]), tmp_path,
                     env=emu_env).start()  # fmt: skip
    sidecar: Process | None = None
    try:
        emu_health = SERVICES["vellum"]["healthcheck"]["test"]
        wait_until(
            lambda: _healthcheck_passes(emu_health, hosts, {}),
            timeout=30,
            interval=0.2,
            process=vellum,
            what="the vellum service's healthcheck",
        )
        sidecar = Process("sidecar", sidecar_command(*SERVICES["sidecar"]["command"]), tmp_path,
                          env=side_env).start()  # fmt: skip
        side_health = SERVICES["sidecar"]["healthcheck"]["test"]
        ops_env = {"SIDECAR_OPS_LISTEN": side_env["SIDECAR_OPS_LISTEN"]}
        wait_until(
            lambda: _healthcheck_passes(side_health, hosts, ops_env),
            timeout=30,
            interval=0.2,
            process=sidecar,
            what="the sidecar service's healthcheck",
        )
        sidecar.wait_ready(f"http://127.0.0.1:{ops}/readyz")
        yield {
            "api": f"http://127.0.0.1:{api}",
            "emulator": f"http://127.0.0.1:{emu_port}",
            "ops": f"http://127.0.0.1:{ops}",
        }
    finally:
        codes = {"vellum": vellum.stop()}
        if sidecar is not None:
            codes["sidecar"] = sidecar.stop()
        logs = {p.name: p.read_text()[-2000:] for p in tmp_path.glob("*.log")}
        assert codes == dict.fromkeys(codes, 0), (codes, logs)


def _run_app(api: str) -> str:
    volume = SERVICES["app"]["volumes"][0].split(":")[0]
    done = subprocess.run(
        [sys.executable, str(ROOT / volume), "--once"],
        env={"PATH": os.environ["PATH"], "SIDECAR_URL": api},
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_compose_demo_flows_push_webhooks_to_the_app(compose_stack: dict[str, str]) -> None:
    api, emulator = compose_stack["api"], compose_stack["emulator"]
    first = _run_app(api)
    assert "cus_active reports: allowed" in first
    assert "cus_trial exports: denied" in first
    ready = _get(compose_stack["ops"] + "/readyz")[1]
    assert (ready["redis"], ready["fanout"]) == ("ok", "ok")
    # The curl line from compose.yaml's header: the emulator pushes a signed webhook.
    curl = next(
        line for line in (ROOT / "compose.yaml").read_text().splitlines() if "-X PUT" in line
    )
    match = re.search(r"http://127\.0\.0\.1:\d+(/\S+)", curl)
    assert match is not None, curl
    path = match.group(1)
    status = _put(emulator + path, {"status": "active", "modules": ["reports", "exports"]})
    assert status == 200
    assert "cus_trial exports: allowed" in _run_app(api), "the push reached the sidecar"
    pushes = _get(emulator + "/_emulator/pushes")[1]
    assert pushes["pushes"] and all(p["delivered"] for p in pushes["pushes"]), pushes


# -- deploy/kubernetes: the Component ----------------------------------------------------------

COMPONENT = yaml.safe_load((COMPONENT_DIR / "kustomization.yaml").read_text())
[PATCH_ENTRY] = COMPONENT["patches"]
PATCH = yaml.safe_load((COMPONENT_DIR / PATCH_ENTRY["path"]).read_text())
POD_PATCH = PATCH["spec"]["template"]
[SIDECAR] = POD_PATCH["spec"]["initContainers"]
INJECT = "vellum-sidecar/inject"

#: Measured (docs/deploy.md, "Resources"): RSS at start, and at most with
#: 100,000 customers' documents cached (bench, SIDECAR_MEMORY_MAX_ENTRIES=100000).
RSS_AT_START_MIB = 61
RSS_PEAK_MIB = 227
RSS_PEAK_ENTRIES = 100_000
#: The snapshot of those 100,000 customers: 24 MiB of entitlement documents like the
#: bench's (bench.snapshot: 25.0 MB), and their flags documents as much again at most.
SNAPSHOT_MIB = 48


def container_port(container: dict[str, Any], name_or_number: str | int) -> int:
    if isinstance(name_or_number, int):
        return name_or_number
    [port] = [p for p in container.get("ports", []) if p["name"] == name_or_number]
    return int(port["containerPort"])


def mebibytes(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return float(quantity.removesuffix(suffix)) * factor
    raise AssertionError(f"write memory in Ki, Mi or Gi: {quantity}")


def render(directory: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize directory``: what a cluster would receive."""
    kubectl = shutil.which("kubectl")
    assert kubectl is not None, (
        "kubectl is not installed: these tests render the kustomizations with it "
        "(apt-get install kubernetes-client)"
    )
    done = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def pod_env(container: dict[str, Any], rendered: list[dict[str, Any]]) -> dict[str, str]:
    """A container's environment as the kubelet builds it: envFrom in order, then env."""
    config_maps = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        assert name in config_maps, f"{container['name']}: no ConfigMap {name} in the render"
        env.update(config_maps[name]["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", [])})
    return env


def test_component_patches_annotated_deployments_and_statefulsets() -> None:
    assert COMPONENT["kind"] == "Component"
    target = PATCH_ENTRY["target"]
    assert (target["group"], target["version"]) == ("apps", "v1")
    for kind in ("Deployment", "StatefulSet"):
        assert re.fullmatch(target["kind"], kind), kind
    for kind in ("DaemonSet", "Job", "CronJob", "MyDeployment"):
        assert not re.fullmatch(target["kind"], kind), kind
    assert target["annotationSelector"] == f"{INJECT}=true"
    # Only the sidecar, its volumes and one pod label: nothing of the app's pod.
    assert set(POD_PATCH) == {"metadata", "spec"}
    assert set(POD_PATCH["metadata"]) == {"labels"}
    assert set(POD_PATCH["spec"]) == {"initContainers", "volumes"}
    names = {v["name"] for v in POD_PATCH["spec"]["volumes"]}
    assert all(n.startswith("vellum-sidecar-") for n in names), "no clash with the app's"
    assert all(p["name"].startswith("vellum-") and len(p["name"]) <= 15 for p in SIDECAR["ports"])


def test_sidecar_is_a_native_sidecar_running_the_image_command() -> None:
    assert SIDECAR["restartPolicy"] == "Always"
    assert SIDECAR["args"] == exec_form(RUNTIME.one("CMD"))
    assert "command" not in SIDECAR, "keep the image's entrypoint"
    [image] = EXAMPLE["images"]
    assert SIDECAR["image"] == image["name"]
    assert image["newTag"] == PYPROJECT["project"]["version"]


def test_probes_hit_the_ops_routes() -> None:
    probes = {kind: SIDECAR[kind]["httpGet"] for kind in ("livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    startup = SIDECAR["startupProbe"]["httpGet"]
    for probe in [*probes.values(), startup]:
        assert probe["path"] in OPS_ROUTES
        assert container_port(SIDECAR, probe["port"]) == OPS_PORT


def test_sidecar_is_locked_down() -> None:
    uid, gid = image_user()
    sc = SIDECAR["securityContext"]
    assert (sc["runAsNonRoot"], sc["runAsUser"], sc["runAsGroup"]) == (True, uid, gid)
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    # The container's own seccomp profile: the Component leaves the pod's alone.
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"


def test_sidecar_resources_fit_the_measured_memory_and_cpu() -> None:
    [defaults] = COMPONENT["configMapGenerator"]
    settings = dict(literal.split("=", 1) for literal in defaults["literals"])
    assert int(settings["SIDECAR_MEMORY_MAX_ENTRIES"]) == RSS_PEAK_ENTRIES, (
        "the memory below was measured for this many entries"
    )
    resources = SIDECAR["resources"]
    request = mebibytes(resources["requests"]["memory"])
    limit = mebibytes(resources["limits"]["memory"])
    assert RSS_PEAK_MIB <= request <= limit, "the full cache fits the request"
    assert limit >= RSS_PEAK_MIB * 1.25, "headroom for documents bigger than the bench's"
    assert "cpu" in resources["requests"]
    assert "cpu" not in resources["limits"], "a CFS quota throttles the hot path in bursts"
    docs = DEPLOY_DOC.read_text()
    for figure in (f"{RSS_PEAK_MIB} MiB", f"{RSS_AT_START_MIB} MiB", "100,000"):
        assert figure in docs, f"docs/deploy.md states {figure}"


def test_workers_get_a_writable_tmp() -> None:
    """SIDECAR_WORKERS > 1: the supervisor's sockets go to tempfile's directory."""
    env_names = {e["name"] for e in SIDECAR["env"]}
    assert not env_names & {"TMPDIR", "TEMP", "TMP"}, "so tempfile picks /tmp"
    [tmp] = [m for m in SIDECAR["volumeMounts"] if m["mountPath"] == "/tmp"]
    [volume] = [v for v in POD_PATCH["spec"]["volumes"] if v["name"] == tmp["name"]]
    assert "emptyDir" in volume and not tmp.get("readOnly", False)
    workers = (ROOT / "sidecar" / "workers.py").read_text()
    assert 'tempfile.mkdtemp(prefix="vellum-sidecar-")' in workers, "no dir=: TMPDIR or /tmp"


def test_the_snapshot_lives_on_a_volume_the_sidecar_owns() -> None:
    """SIDECAR_SNAPSHOT_FILE is on, in compose and in the Component, on a writable
    volume (the root filesystem is read-only); the image's directory there belongs to
    its user (Docker seeds a new named volume from it)."""
    uid, gid = image_user()
    [mkdir] = [r for r in RUNTIME.all("RUN") if "/var/lib/vellum-sidecar" in r]
    assert f"chown {uid}:{gid} /var/lib/vellum-sidecar" in mkdir
    compose_file = compose_env("sidecar")["SIDECAR_SNAPSHOT_FILE"]
    assert compose_state_dir(compose_file) == "/var/lib/vellum-sidecar"
    env = {e["name"]: e.get("value") for e in SIDECAR["env"]}
    assert env["SIDECAR_SNAPSHOT_FILE"] == compose_file
    [mount] = [m for m in SIDECAR["volumeMounts"] if m["mountPath"] == "/var/lib/vellum-sidecar"]
    assert not mount.get("readOnly", False)
    [volume] = [v for v in POD_PATCH["spec"]["volumes"] if v["name"] == mount["name"]]
    limit = mebibytes(volume["emptyDir"]["sizeLimit"])
    assert limit >= 2 * SNAPSHOT_MIB, "room for the file twice (a write replaces it)"


def test_component_renders_onto_a_deployment_and_a_statefulset(tmp_path: Path) -> None:
    source = {
        d["metadata"]["name"]: d
        for d in yaml.safe_load_all((SAMPLE_DIR / "workloads.yaml").read_text())
        if d
    }
    rendered = render(SAMPLE_DIR)
    workloads = {
        d["metadata"]["name"]: d for d in rendered if d["kind"] in ("Deployment", "StatefulSet")
    }
    assert workloads["batch"] == source["batch"], "not asked for: left exactly as it was"
    assert {workloads["shop"]["kind"], workloads["orders"]["kind"]} == {"Deployment", "StatefulSet"}
    for name in ("shop", "orders"):
        got, was = workloads[name], source[name]
        assert got["metadata"]["annotations"][INJECT] == "true"
        pod, pod_was = got["spec"]["template"], was["spec"]["template"]
        assert pod["metadata"]["labels"] == {**pod_was["metadata"]["labels"],
                                             **POD_PATCH["metadata"]["labels"]}  # fmt: skip
        inits = pod["spec"]["initContainers"]
        assert inits[0]["name"] == SIDECAR["name"], "first: ready before the app's init containers"
        assert inits[1:] == pod_was["spec"].get("initContainers", [])
        assert inits[0]["image"] == "registry.example.com/vellum-sidecar:0.1.0"
        # Everything of the app is unchanged; the sidecar's volumes come first.
        assert pod["spec"]["containers"] == pod_was["spec"]["containers"]
        volumes = pod["spec"]["volumes"]
        assert volumes[len(POD_PATCH["spec"]["volumes"]) :] == pod_was["spec"].get("volumes", [])
        rest = {k: v for k, v in pod["spec"].items() if k not in ("initContainers", "volumes")}
        assert rest == {k: v for k, v in pod_was["spec"].items()
                        if k not in ("initContainers", "volumes")}  # fmt: skip
        assert {k: v for k, v in got["spec"].items() if k != "template"} == {
            k: v for k, v in was["spec"].items() if k != "template"
        }
        # The environment the kubelet would give it: the user's ConfigMap wins.
        env = pod_env(inits[0], rendered)
        assert env["VELLUM_TENANT_ID"] == "acme"
        assert env["SIDECAR_MEMORY_MAX_ENTRIES"] == "50000", "the kustomization's own value wins"
        settings = settings_from_k8s_env(env, pod["spec"], inits[0], tmp_path / name)
        assert settings.tenant_id == "acme"


def settings_from_k8s_env(
    env: dict[str, str], pod_spec: dict[str, Any], container: dict[str, Any], workdir: Path
) -> Settings:
    """Settings.from_env on ``env`` with each Secret file as Kubernetes would mount it."""
    assert set(env) <= VARIABLE_NAMES, set(env) - VARIABLE_NAMES
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    workdir.mkdir()
    if "SIDECAR_SNAPSHOT_FILE" in env:
        directory = str(PurePosixPath(env["SIDECAR_SNAPSHOT_FILE"]).parent)
        mount = mounts[directory]
        assert not mount.get("readOnly", False)
        assert "emptyDir" in volumes[mount["name"]], "the snapshot's volume"
        local_snapshot_path(env, workdir)
    for name, value in list(env.items()):
        if not name.endswith("_FILE") or name == "SIDECAR_SNAPSHOT_FILE":
            continue
        directory, _, item = value.rpartition("/")
        mount = mounts[directory]
        assert mount["readOnly"] is True, name
        secret = volumes[mount["name"]]["secret"]
        assert item in {i["path"] for i in secret["items"]}, name
        local = workdir / item
        local.write_text(SECRET_FILES[item])
        env[name] = str(local)
    return Settings.from_env(env)


#: Values for the Secret's keys, as a `kubectl create secret --from-file` would hold them.
SECRET_FILES = {
    "api-key": "vk_live_example_key_0123456789\n",
    "webhook-secrets": "whsec_example_0123456789\n",
    "redis-url": "rediss://:example-password@redis.vellum.svc.cluster.local:6380/0\n",
}


# -- deploy/kubernetes: the example built on the Component ----------------------------------

EXAMPLE = yaml.safe_load((K8S / "kustomization.yaml").read_text())


def load_manifests(*names: str) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for name in names:
        docs.extend(d for d in yaml.safe_load_all((K8S / name).read_text()) if d)
    return docs


MANIFESTS = load_manifests(*EXAMPLE["resources"])
[HTTPROUTE] = load_manifests("httproute.example.yaml")


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


@functools.cache
def example_pod() -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """The rendered example: its Deployment's pod template, the sidecar, everything.

    Rendered once per run; callers read it and must not change it.
    """
    rendered = render(K8S)
    [deployment] = by_kind(rendered, "Deployment")
    pod = deployment["spec"]["template"]
    [sidecar] = [c for c in pod["spec"]["initContainers"] if c["name"] == SIDECAR["name"]]
    return pod, sidecar, rendered


def test_example_lists_every_manifest_and_uses_the_component() -> None:
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    examples = {n for n in on_disk if ".example." in n}
    assert set(EXAMPLE["resources"]) == on_disk - examples
    assert examples == {"httproute.example.yaml"}
    assert EXAMPLE["components"] == ["components/sidecar"]
    assert sorted(d["kind"] for d in MANIFESTS) == [
        "Deployment", "NetworkPolicy", "NetworkPolicy", "PodDisruptionBudget", "Service",
    ]  # fmt: skip
    for doc in [*MANIFESTS, HTTPROUTE]:
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "vellum-app"
    [deployment] = by_kind(MANIFESTS, "Deployment")
    assert deployment["metadata"]["annotations"][INJECT] == "true"
    assert "initContainers" not in deployment["spec"]["template"]["spec"], "the Component adds it"


def test_sidecar_settings_are_valid_and_secrets_come_from_files(tmp_path: Path) -> None:
    pod, sidecar, rendered = example_pod()
    env = pod_env(sidecar, rendered)
    for secret in ("VELLUM_API_KEY", "VELLUM_WEBHOOK_SECRETS", "SIDECAR_REDIS_URL"):
        assert secret not in env, f"{secret} comes from a file, never from a ConfigMap"
        assert f"{secret}_FILE" in env, secret
    settings = settings_from_k8s_env(env, pod["spec"], sidecar, tmp_path / "secrets")
    assert settings.listen.is_loopback, "the local API never leaves the pod"
    assert settings.webhook_listen.port == container_port(sidecar, "vellum-webhooks")
    assert settings.ops_listen.port == container_port(sidecar, "vellum-ops")
    assert settings.redis_url is not None
    assert settings.redis_url.reveal() == SECRET_FILES["redis-url"].strip()
    assert settings.memory_max_entries == RSS_PEAK_ENTRIES
    every_port = {p["containerPort"] for c in pod_containers(pod) for p in c.get("ports", [])}
    assert API_PORT not in every_port
    # docs/deploy.md's `kubectl create secret` line creates exactly these keys.
    docs = DEPLOY_DOC.read_text()
    create = next(line for line in docs.splitlines() if "kubectl create secret generic" in line)
    [volume] = [v for v in pod["spec"]["volumes"] if "secret" in v]
    assert create.split()[4] == volume["secret"]["secretName"]
    keys = set(re.findall(r"--from-file=([\w-]+)=", docs[docs.index(create) :][:400]))
    assert keys == {i["key"] for i in volume["secret"]["items"]} == set(SECRET_FILES)


def pod_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod["spec"].get("initContainers", []), *pod["spec"]["containers"]]


def test_no_prometheus_annotations_the_podmonitor_scrapes() -> None:
    """prometheus.io/* annotations: ignored by the Prometheus Operator, and they
    would take the app's own metrics port. monitoring/podmonitor.yaml scrapes."""
    pod, _, _ = example_pod()
    annotations = pod["metadata"].get("annotations", {})
    assert not [a for a in annotations if a.startswith("prometheus.io/")]
    assert pod["metadata"]["labels"]["vellum-sidecar/injected"] == "true"


def test_every_container_is_locked_down_with_resources() -> None:
    pod, _, _ = example_pod()
    uid, gid = image_user()
    pod_sc = pod["spec"]["securityContext"]
    assert (pod_sc["runAsNonRoot"], pod_sc["runAsUser"], pod_sc["runAsGroup"]) == (True, uid, gid)
    assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["spec"]["automountServiceAccountToken"] is False
    for container in pod_containers(pod):
        sc = container["securityContext"]
        assert sc["runAsNonRoot"] is True, container["name"]
        assert sc["readOnlyRootFilesystem"] is True, container["name"]
        assert sc["allowPrivilegeEscalation"] is False, container["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], container["name"]
        assert "add" not in sc["capabilities"], container["name"]
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), container["name"]
        assert "memory" in resources["limits"], container["name"]


def test_service_and_httproute_expose_only_the_webhook_path() -> None:
    pod, sidecar, _ = example_pod()
    [service] = by_kind(MANIFESTS, "Service")
    [port] = service["spec"]["ports"]
    assert container_port(sidecar, port["targetPort"]) == WEBHOOK_PORT
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert HTTPROUTE["apiVersion"] == "gateway.networking.k8s.io/v1"
    [rule] = HTTPROUTE["spec"]["rules"]
    assert rule["matches"] == [
        {"path": {"type": "Exact", "value": "/webhooks/vellum"}, "method": "POST"}
    ]
    assert rule["matches"][0]["path"]["value"] in WEBHOOK_ROUTES
    [backend] = rule["backendRefs"]
    assert (backend["name"], backend["port"]) == (service["metadata"]["name"], port["port"])
    assert HTTPROUTE["spec"]["parentRefs"][0]["kind"] == "Gateway"


def test_network_policies_select_the_pods_and_allow_what_the_sidecar_needs() -> None:
    pod, _, _ = example_pod()
    labels = pod["metadata"]["labels"].items()
    policies = by_kind(MANIFESTS, "NetworkPolicy")
    for policy in policies:
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels
    [ingress] = [p for p in policies if "Ingress" in p["spec"]["policyTypes"]]
    allowed = {
        container_port(c, p["port"])
        for rule in ingress["spec"]["ingress"]
        for p in rule["ports"]
        for c in pod_containers(pod)
        if isinstance(p["port"], int) or p["port"] in {q["name"] for q in c.get("ports", [])}
    }
    assert WEBHOOK_PORT in allowed and OPS_PORT in allowed
    assert API_PORT not in allowed
    sources = json.dumps(ingress["spec"]["ingress"])
    assert "ingress-nginx" not in sources
    [egress] = [p for p in policies if p["spec"]["policyTypes"] == ["Egress"]]
    ports = {(p["port"], p.get("protocol", "TCP")) for r in egress["spec"]["egress"]
             for p in r["ports"]}  # fmt: skip
    assert {(53, "UDP"), (53, "TCP"), (443, "TCP")} <= ports, "DNS and the HTTPS upstream"
    redis = urlsplit(SECRET_FILES["redis-url"].strip())
    assert (redis.port, "TCP") in ports and (6379, "TCP") in ports, "Redis, TLS or not"
    assert urlsplit(DEFAULTS["VELLUM_BASE_URL"] or "").scheme == "https"


def test_pdb_and_grace_period() -> None:
    pod, _, rendered = example_pod()
    [deployment] = by_kind(rendered, "Deployment")
    [pdb] = by_kind(MANIFESTS, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert pdb["spec"]["maxUnavailable"] < deployment["spec"]["replicas"]
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(DEFAULTS["SIDECAR_SHUTDOWN_GRACE"] or 0)


# -- the example Redis: bounded, evicting only what has a TTL --------------------------------

REDIS_DIR = K8S / "redis"


def redis_example() -> tuple[dict[str, Any], str, list[dict[str, Any]]]:
    """The rendered example Redis: its Deployment, its redis.conf, everything."""
    rendered = render(REDIS_DIR)
    [deployment] = by_kind(rendered, "Deployment")
    [config] = by_kind(rendered, "ConfigMap")
    return deployment, config["data"]["redis.conf"], rendered


def conf_value(conf: str, name: str) -> str:
    [value] = [line.split(None, 1)[1] for line in conf.splitlines() if line.startswith(name + " ")]
    return value


def test_the_redis_examples_bound_memory_and_evict_only_keys_with_a_ttl() -> None:
    """compose.yaml and deploy/kubernetes/redis agree: a maxmemory and volatile-lru, and
    an append-only file fsynced every second on a volume."""
    deployment, conf, rendered = redis_example()
    assert conf_value(conf, "maxmemory-policy") == "volatile-lru"
    assert conf_value(conf, "maxmemory") == "256mb"
    command = SERVICES["redis"]["command"]
    assert command[command.index("--maxmemory-policy") + 1] == "volatile-lru"
    assert command[command.index("--maxmemory") + 1] == "256mb"
    pod = deployment["spec"]["template"]
    [container] = pod["spec"]["containers"]
    limit = mebibytes(container["resources"]["limits"]["memory"])
    assert limit >= 1.4 * 256, "room above maxmemory for fragmentation and buffers"
    assert container["args"] == ["redis-server", "/etc/redis/redis.conf"]
    # Metered usage is acknowledged once it is in Redis: an append-only file, fsynced
    # every second, on a volume that outlives the pod (compose: a named volume).
    assert (conf_value(conf, "appendonly"), conf_value(conf, "appendfsync")) == ("yes", "everysec")
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "everysec"
    [data] = [v for v in pod["spec"]["volumes"] if v["name"] == "data"]
    [claim] = by_kind(rendered, "PersistentVolumeClaim")
    assert data["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert mebibytes(claim["spec"]["resources"]["requests"]["storage"]) >= 2 * 256
    assert deployment["spec"]["strategy"]["type"] == "Recreate", "one pod on the volume"
    # Where the app's egress policy lets the sidecars go, and only they may come.
    assert {d["metadata"].get("namespace") for d in rendered} == {"vellum"}
    policies = by_kind(MANIFESTS, "NetworkPolicy")
    [egress] = [p for p in policies if "Egress" in p["spec"]["policyTypes"]]
    to_redis = [peer for rule in egress["spec"]["egress"] for peer in rule["to"]
                if "podSelector" in peer and "namespaceSelector" in peer
                and peer["namespaceSelector"]["matchLabels"].get("kubernetes.io/metadata.name")
                == "vellum"]  # fmt: skip
    assert to_redis and to_redis[0]["podSelector"]["matchLabels"].items() <= (
        pod["metadata"]["labels"].items()
    )
    [ingress] = by_kind(rendered, "NetworkPolicy")
    [peer] = ingress["spec"]["ingress"][0]["from"]
    app_pod, _, _ = example_pod()
    assert peer["podSelector"]["matchLabels"].items() <= app_pod["metadata"]["labels"].items()
    sc = container["securityContext"]
    assert (sc["readOnlyRootFilesystem"], sc["allowPrivilegeEscalation"]) == (True, False)
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_the_example_redis_config_evicts_cache_keys_and_keeps_durable_ones(
    tmp_path: Path,
) -> None:
    """A real redis-server on the example's redis.conf (its bound lowered to 4 MiB):
    filled with cache-like keys (each with a TTL) far past the bound, it evicts
    them and keeps every key without a TTL."""
    _, conf, _ = redis_example()
    path = tmp_path / "redis.conf"
    path.write_text(conf.replace("dir /data", f"dir {tmp_path}"))
    server = RedisServer(tmp_path, config=path, extra=["--maxmemory", "4mb"]).start()
    try:
        with server.client(timeout=5) as client:
            assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "volatile-lru"}
            client.xadd("durable:stream", {"n": "0"})  # no TTL: durable data
            client.set("durable:counter", 7)
            value = b"x" * 4096
            for start in range(0, 4000, 200):
                with client.pipeline(transaction=False) as pipe:
                    for i in range(start, start + 200):
                        pipe.set(f"vsc:{{t}}:e:cus_{i}", value, px=3_600_000)
                    pipe.execute()
            info = client.info()
            assert info["evicted_keys"] > 0, "16 MB of entries into a 4 MiB Redis"
            assert info["used_memory"] <= 4 * 1024 * 1024 * 1.1
            assert client.get("durable:counter") == b"7"
            assert client.xlen("durable:stream") == 1
            assert client.exists("vsc:{t}:e:cus_3999") == 1, "the newest entries stay"
    finally:
        server.kill()
