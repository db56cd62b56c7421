"""The commands as real processes: check-config, serve (checked from outside), demo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .harness import (
    API_KEY,
    WEBHOOK_SECRET,
    Process,
    Stack,
    free_port,
    http_status,
    sidecar_command,
    wait_until,
)


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def http(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
            raw = resp.read()
            return resp.status, dict(resp.headers), json.loads(raw) if raw else None
    except urllib.error.HTTPError as err:
        with err:
            raw = err.read()
        return err.code, dict(err.headers), json.loads(raw) if raw else None


def test_check_config_ok_redacts_secrets(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(API_KEY)
    result = run_cli(
        "check-config",
        "--tenant-id",
        "acme",
        env={
            "VELLUM_API_KEY_FILE": str(key_file),
            "VELLUM_WEBHOOK_SECRETS": WEBHOOK_SECRET,
            "SIDECAR_REDIS_URL": "redis://:redispw@127.0.0.1:6390/0",
        },
    )
    assert result.returncode == 0, result.stderr
    printed = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert printed["VELLUM_TENANT_ID"] == "acme"
    assert printed["VELLUM_API_KEY_FILE"] == str(key_file)
    assert printed["SIDECAR_REDIS_URL"] == "redis://:***@127.0.0.1:6390/0"
    everything = result.stdout + result.stderr
    for secret in (API_KEY, WEBHOOK_SECRET, "redispw"):
        assert secret not in everything


def test_check_config_errors_exit_2_one_line_each() -> None:
    result = run_cli(
        "check-config",
        env={
            "VELLUM_API_KEY": API_KEY,
            "SIDECAR_CACHE_TTL": "forever",
            "SIDECAR_LISTEN": "0.0.0.0:1",
        },
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3
    assert any("VELLUM_TENANT_ID" in line for line in lines)
    assert any("SIDECAR_CACHE_TTL" in line for line in lines)
    assert any("SIDECAR_LISTEN" in line and "SIDECAR_ALLOW_REMOTE" in line for line in lines)
    assert API_KEY not in result.stdout + result.stderr


def test_check_config_hides_url_credentials_and_reads_the_redis_url_file(tmp_path: Path) -> None:
    url_file = tmp_path / "redis-url"
    url_file.write_text(
        "redis+sentinel://app:redispw@s1,s2:26380/mymaster?sentinel_password=sentpw\n"
    )
    env = {
        "VELLUM_API_KEY": API_KEY,
        "VELLUM_TENANT_ID": "acme",
        "VELLUM_BASE_URL": "https://svc:basepw@vellum.internal",
        "SIDECAR_REDIS_URL_FILE": str(url_file),
    }
    result = run_cli("check-config", env=env)
    assert result.returncode == 0, result.stderr
    printed = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert printed["VELLUM_BASE_URL"] == "https://svc:***@vellum.internal"
    assert printed["SIDECAR_REDIS_URL"] == (
        "redis+sentinel://app:***@s1,s2:26380/mymaster?sentinel_password=***"
    )
    assert printed["SIDECAR_REDIS_URL_FILE"] == str(url_file)
    # Errors name the variable and hide the credentials of the URL they quote.
    bad = run_cli(
        "check-config", "--redis-url", "redis://h/0",
        env={**env, "VELLUM_BASE_URL": "ftp://svc:basepw@vellum.internal"},
    )  # fmt: skip
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 2
    assert "VELLUM_BASE_URL: expected an http:// or https:// URL" in lines[0]
    assert "SIDECAR_REDIS_URL: set either SIDECAR_REDIS_URL or SIDECAR_REDIS_URL_FILE" in lines[1]
    everything = result.stdout + result.stderr + bad.stdout + bad.stderr
    for secret in (API_KEY, "basepw", "redispw", "sentpw"):
        assert secret not in everything


def test_serve_logs_never_show_url_credentials(tmp_path: Path) -> None:
    """Upstream and Redis unreachable, debug and access logs on: no credential in the output."""
    url_file = tmp_path / "redis-url"
    url_file.write_text(f"redis://app:redispw@127.0.0.1:{free_port()}/0\n")
    api, ops = free_port(), free_port()
    env = {
        "VELLUM_API_KEY": API_KEY,
        "VELLUM_TENANT_ID": "acme",
        "VELLUM_BASE_URL": f"http://svc:basepw@127.0.0.1:{free_port()}",
        "SIDECAR_REDIS_URL_FILE": str(url_file),
        "SIDECAR_LISTEN": f"127.0.0.1:{api}",
        "SIDECAR_WEBHOOK_LISTEN": f"127.0.0.1:{free_port()}",
        "SIDECAR_OPS_LISTEN": f"127.0.0.1:{ops}",
        "SIDECAR_LOG_LEVEL": "debug",
        "SIDECAR_ACCESS_LOG": "true",
        "SIDECAR_UPSTREAM_TIMEOUT": "0.5",
    }
    sidecar = Process(
        "sidecar",
        sidecar_command("serve"),
        tmp_path,
        env=env,
        ready_url=f"http://127.0.0.1:{ops}/healthz",
    ).start()
    try:
        # /healthz answers while the local API is still starting (its listener binds
        # after the ops one): wait for the local API itself.
        sidecar.wait_ready(f"http://127.0.0.1:{api}/openapi.json")
        status, _, body = http("GET", f"http://127.0.0.1:{api}/v1/customers/c1/can/reports")
        assert (status, body["allowed"]) == (503, False)
        status, _, ready = http("GET", f"http://127.0.0.1:{ops}/readyz")
        assert ready["redis"] == "down"
    finally:
        assert sidecar.stop() == 0
    output = sidecar.output()
    assert '"redis_down"' in output, "the failure paths were logged"
    for secret in (API_KEY, "basepw", "redispw"):
        assert secret not in output


def test_serve_refuses_bad_config_with_exit_2() -> None:
    result = run_cli("serve", env={"VELLUM_TENANT_ID": "t"})
    assert result.returncode == 2
    assert "VELLUM_API_KEY" in result.stderr


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """Redis, the emulator and a sidecar (debug logs, access log on), each a real process."""
    with Stack(
        tmp_path, redis=True, tenant="acme", SIDECAR_LOG_LEVEL="debug", SIDECAR_ACCESS_LOG="true"
    ) as stack:
        yield stack


def test_serve_from_outside(stack: Stack) -> None:
    api, emu, ops = stack.url, stack.emulator_url, stack.sidecar.ops_url
    status, headers, body = http("GET", f"{api}/v1/customers/cus_active/entitlements")
    assert status == 200
    assert headers["X-Sidecar-Cache"] == "miss"
    assert body["found"] is True
    status, headers, body = http("GET", f"{api}/v1/customers/cus_active/can/reports")
    assert (status, headers["X-Sidecar-Cache"], body["allowed"]) == (200, "hit", True)
    assert http("GET", f"{api}/v1/customers/cus_trial/can/exports")[2]["allowed"] is False
    _push_applies_at_once(api, emu)
    assert http("GET", f"{api}/v1/customers/ghost/entitlements")[2]["found"] is False
    assert http("GET", f"{api}/v1/customers/x/can/y", headers={"Origin": "http://a"})[0] == 403
    status, _, ready = http("GET", f"{ops}/readyz")
    assert (status, ready["redis"], ready["upstream"]) == (200, "ok", "ok")
    ops_port = ops.rsplit(":", 1)[1]
    health = run_cli("healthcheck", env={"SIDECAR_OPS_LISTEN": f"127.0.0.1:{ops_port}"})
    assert health.returncode == 0
    with urllib.request.urlopen(f"{ops}/metrics", timeout=5) as resp:  # noqa: S310
        metrics = resp.read().decode()
    assert 'vellum_sidecar_webhooks_total{result="ok"} 1.0' in metrics
    # SIGTERM: clean exit 0; nothing printed (debug logs and access log on) carries a secret.
    assert stack.sidecar.stop() == 0
    output = stack.sidecar.output()
    assert '"event": "stopped"' in output or '"event":"stopped"' in output
    for secret in (API_KEY, WEBHOOK_SECRET):
        assert secret not in output
    assert run_cli("healthcheck", env={"SIDECAR_OPS_LISTEN": f"127.0.0.1:{ops_port}"}).returncode


def _push_applies_at_once(api: str, emu: str) -> None:
    """An emulator change is pushed to the sidecar's webhook listener and applies at once."""
    status, _, reply = http(
        "PUT",
        f"{emu}/_emulator/customers/cus_trial/entitlements",
        {"status": "active", "modules": ["reports", "exports"]},
    )
    assert status == 200
    assert reply["pushed"] is True
    assert http("GET", f"{api}/v1/customers/cus_trial/can/exports")[2]["allowed"] is True


def test_demo_prints_working_curl_lines(tmp_path: Path) -> None:
    api, hooks, ops, emu = free_port(), free_port(), free_port(), free_port()
    demo = Process(
        "demo",
        sidecar_command("demo", "--listen", f"127.0.0.1:{api}", "--webhook-listen",
                        f"127.0.0.1:{hooks}", "--ops-listen", f"127.0.0.1:{ops}",
                        "--emulator-listen", f"127.0.0.1:{emu}"),
        tmp_path,
    ).start()  # fmt: skip
    try:
        wait_until(lambda: "Ctrl-C" in demo.output(), timeout=20)
        banner = demo.output()
        base = f"http://127.0.0.1:{api}"
        assert f"curl -i {base}/v1/customers/cus_active/entitlements" in banner
        first = http("GET", f"{base}/v1/customers/cus_active/entitlements")
        second = http("GET", f"{base}/v1/customers/cus_active/entitlements")
        assert (first[1]["X-Sidecar-Cache"], second[1]["X-Sidecar-Cache"]) == ("miss", "hit")
        assert http("GET", f"{base}/v1/customers/cus_active/can/reports")[2]["allowed"] is True
        assert http("GET", f"{base}/v1/customers/cus_trial/can/exports")[2]["allowed"] is False
        assert http("GET", f"{base}/v1/customers/nobody/entitlements")[2]["found"] is False
        _push_applies_at_once(base, f"http://127.0.0.1:{emu}")
        for line in ("/v1/customers/cus_active/flags", "/v1/customers/cus_active/credits/exports",
                     "/tenants/demo/accounts/acme/invoices"):  # fmt: skip
            assert f"curl -s {base}{line} " in banner, line
        flags = http("GET", f"{base}/v1/customers/cus_active/flags")[2]["flags"]
        assert flags["new-dashboard"] is True, "the customer's override"
        credits = http("GET", f"{base}/v1/customers/cus_active/credits/exports")[2]
        assert (credits["creditTypeId"], credits["balance"]) == ("exports", 20)
        invoices = http("GET", f"{base}/tenants/demo/accounts/acme/invoices")[2]["invoices"]
        assert [i["number"] for i in invoices] == ["ACME-0001", "ACME-0002"]
        assert http("GET", f"http://127.0.0.1:{ops}/readyz")[0] == 200
    finally:
        code = demo.stop(sig=signal.SIGINT)
    assert code == 0


def test_sigterm_under_load_finishes_in_flight_requests(stack: Stack) -> None:
    """In-flight upstream calls finish after SIGTERM, /readyz turns 503 first, exit 0."""
    import concurrent.futures

    api, emu, ops = stack.url, stack.emulator_url, stack.sidecar.ops_url
    status, _, _ = http(
        "POST", f"{emu}/_emulator/faults", {"operation": "get_entitlements", "delay": 1.0}
    )
    assert status in (200, 201)
    customers = [f"load_{i}" for i in range(16)]
    with concurrent.futures.ThreadPoolExecutor(len(customers)) as pool:
        futures = [
            pool.submit(http, "GET", f"{api}/v1/customers/{c}/entitlements") for c in customers
        ]

        def all_arrived() -> bool:
            got = http("GET", f"{emu}/_emulator/requests?operation=get_entitlements")[2]
            items = got["requests"] if isinstance(got, dict) else got
            return len(items) >= len(customers)

        wait_until(all_arrived, timeout=10)
        stack.sidecar.send_signal(signal.SIGTERM)
        wait_until(lambda: http_status(f"{ops}/readyz") in (503, None), timeout=5)
        results = [f.result(timeout=20) for f in futures]
    assert [r[0] for r in results] == [200] * len(customers)
    assert all(r[2]["found"] is False for r in results)
    # Wait for the exit; a second SIGTERM after the drain would kill it for real.
    assert stack.sidecar.wait(timeout=30) == 0


def test_no_secret_in_any_output(stack: Stack) -> None:
    """Grep everything a full run prints or serves for the key and the webhook secret."""
    api, ops, emu = stack.url, stack.sidecar.ops_url, stack.emulator_url
    seen: list[str] = []
    for url in (f"{ops}/readyz", f"{ops}/metrics", f"{api}/openapi.json"):
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310
            seen.append(resp.read().decode())
    # Error paths: refused webhook signatures, malformed input, upstream failures.
    for header in ("t=1,v1=00", "garbage", ""):
        seen.append(
            str(
                http(
                    "POST",
                    stack.sidecar.webhook_url,
                    {"id": "evt_x"},
                    {"X-Vellum-Signature": header},
                )
            )
        )
    seen.append(str(http("POST", f"{api}/v1/check", {"checks": "nope"})))
    http("POST", f"{emu}/_emulator/faults", {"operation": "get_entitlements", "status": 500})
    seen.append(str(http("GET", f"{api}/v1/customers/boom/entitlements")))
    seen.append(str(http("GET", f"{api}/v1/customers/boom/can/x")))
    assert stack.sidecar.stop() == 0
    seen.append(stack.sidecar.output())
    # A sidecar whose key the upstream refuses, and check-config, with debug logs.
    wrong = stack.add_sidecar("wrong", VELLUM_API_KEY=API_KEY + "_wrong", SIDECAR_LOG_LEVEL="debug")
    http("DELETE", f"{emu}/_emulator/faults")
    seen.append(str(http("GET", f"{wrong.api_url}/v1/customers/c/entitlements")))
    assert wrong.stop() == 0
    seen.append(wrong.output())
    checked = run_cli("check-config", env=wrong.env)
    seen.extend([checked.stdout, checked.stderr])
    everything = "\n".join(seen)
    assert "upstream_auth_failed" in everything, "the error paths really ran"
    assert "invalid_signature" in everything
    for secret in (API_KEY, WEBHOOK_SECRET):
        assert secret not in everything


def _fake_proc(root: Path, pid1: list[str], child: list[str] | None = None) -> str:
    """A /proc holding process 1 (and its first child) with these command lines."""
    (root / "1" / "task" / "1").mkdir(parents=True)
    (root / "1" / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in pid1))
    (root / "1" / "task" / "1" / "children").write_text("7 " if child else "")
    if child:
        (root / "7").mkdir()
        (root / "7" / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in child))
    return str(root)


@pytest.mark.parametrize(
    ("pid1", "child", "env", "url"),
    [
        # The image's HEALTHCHECK in the emulator role probes the emulator, not 9700.
        (
            ["/app/.venv/bin/python", "/app/.venv/bin/vellum-sidecar", "emulator"],
            None,
            {"EMULATOR_LISTEN": "0.0.0.0:8710"},
            "http://127.0.0.1:8710/_emulator/healthz",
        ),
        (
            ["python", "-m", "sidecar", "emulator", "--listen", "127.0.0.1:9911"],
            None,
            {},
            "http://127.0.0.1:9911/_emulator/healthz",
        ),
        # docker run --init: the command is the init's child.
        (
            ["/sbin/docker-init"],
            [
                "/app/.venv/bin/python",
                "/app/.venv/bin/vellum-sidecar",
                "serve",
                "--ops-listen",
                "127.0.0.1:9912",
            ],
            {},
            "http://127.0.0.1:9912/healthz",
        ),
        (
            ["/sbin/tini", "--", "vellum-sidecar", "emulator"],
            None,
            {},
            "http://127.0.0.1:8710/_emulator/healthz",
        ),
        # The sidecar (the image's default command), SIDECAR_OPS_LISTEN from the environment.
        (
            ["/app/.venv/bin/python", "/app/.venv/bin/vellum-sidecar", "serve"],
            None,
            {"SIDECAR_OPS_LISTEN": "0.0.0.0:9913"},
            "http://127.0.0.1:9913/healthz",
        ),
        (
            ["/app/.venv/bin/python", "/app/.venv/bin/vellum-sidecar"],
            None,
            {},
            "http://127.0.0.1:9700/healthz",
        ),
        (["vellum-sidecar", "demo"], None, {}, "http://127.0.0.1:9700/healthz"),
        # On a host, process 1 is the host's init: the sidecar's defaults.
        (
            ["/sbin/init", "splash"],
            None,
            {"SIDECAR_OPS_LISTEN": "127.0.0.1:9914"},
            "http://127.0.0.1:9914/healthz",
        ),
    ],
)
def test_healthcheck_probes_the_role_the_container_runs(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    pid1: list[str],
    child: list[str] | None,
    env: dict[str, str],
    url: str,
) -> None:
    from sidecar.__main__ import _health_url, _serving_argv

    for name in ("EMULATOR_LISTEN", "SIDECAR_OPS_LISTEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert _health_url(_serving_argv(_fake_proc(tmp_path, pid1, child))) == url


def test_healthcheck_of_an_emulator_container_passes(tmp_path: Path) -> None:
    """The emulator role's derived check passes against a live emulator."""
    from sidecar.__main__ import _health_url, _serving_argv

    port = free_port()
    argv = [sys.executable, "-m", "sidecar", "emulator", "--listen", f"127.0.0.1:{port}"]
    url = _health_url(_serving_argv(_fake_proc(tmp_path / "proc", argv)))
    assert url == f"http://127.0.0.1:{port}/_emulator/healthz"
    emulator = Process("emulator", argv, tmp_path, env={"EMULATOR_API_KEYS": API_KEY})
    emulator.start()
    try:
        wait_until(lambda: http_status(url) == 200, timeout=20, what="the emulator's health")
        assert run_cli("healthcheck", "--url", url, env={}).returncode == 0
    finally:
        emulator.stop()
    assert run_cli("healthcheck", "--url", url, env={}).returncode == 1


def test_the_loop_runs_outside_the_event_loop_choice_s_except() -> None:
    """The loop used to run inside ``except ImportError`` (no uvloop installed), so every
    traceback the sidecar logged carried a ``ModuleNotFoundError`` as its context."""
    from sidecar.__main__ import _run

    async def main() -> int:
        try:
            raise ValueError("a handler's error")
        except ValueError as exc:
            return 0 if exc.__context__ is None else 1

    assert _run(main()) == 0
