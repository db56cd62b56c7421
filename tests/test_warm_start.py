"""Warm start with real processes: a sidecar restarted after SIGTERM or SIGKILL, with
the upstream down and Redis empty, away or absent, answers every customer it had
cached from its snapshot (stale, 200); a bad or unreadable file never stops it; the
``snapshot export`` / ``import`` commands round-trip, and a sidecar started from an
imported file with no upstream at all answers every customer in it."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from sidecar.cache.entry import Entry
from sidecar.cache.kinds import ENTITLEMENTS
from sidecar.cache.snapshot import encode_lines, read_snapshot, write_file

from .harness import Sidecar, Stack, free_port, sidecar_command, wait_until

CUSTOMERS = [f"cus_w{i:02d}" for i in range(24)]


def doc(i: int) -> dict[str, Any]:
    modules = ["reports", "exports"] if i % 2 else ["reports"]
    return {"status": "active", "modules": modules, "accountId": f"acct_{i // 4}", "config": {}}


def get(base: str, path: str) -> tuple[int, str | None, Any]:
    """GET ``path``: the status, ``X-Sidecar-Cache`` and the JSON body."""
    try:
        with urllib.request.urlopen(base + path, timeout=10) as resp:  # noqa: S310 - loopback
            return resp.status, resp.headers.get("X-Sidecar-Cache"), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers.get("X-Sidecar-Cache"), json.loads(exc.read())


def paths(customers: list[str]) -> list[str]:
    out = ["/v1/flags", "/v1/customers/nobody_known/entitlements"]
    for c in customers:
        out += [f"/v1/customers/{c}/can/exports", f"/v1/customers/{c}/entitlements"]
    out.append(f"/v1/customers/{customers[0]}/flags")
    return out


def cache_all(stack: Stack, customers: list[str]) -> dict[str, Any]:
    """Read every path once through the main sidecar (a miss, or a hit of what the
    path before it fetched); the bodies."""
    answers = {}
    for path in paths(customers):
        status, source, body = get(stack.url, path)
        assert status == 200 and source in ("miss", "hit"), (path, status, body, stack.logs())
        answers[path] = body
    return answers


def assert_stale_answers(base: str, answers: dict[str, Any]) -> None:
    """Each path answers what it answered before, marked stale (and ``"stale": true``
    in a body with room for it: ``can``)."""
    for path, body in answers.items():
        status, source, now = get(base, path)
        assert (status, source) == (200, "stale"), (path, status, now)
        if "/can/" in path:
            assert now.pop("stale") is True, path
        assert now == body, path


@pytest.fixture
def seeded_stack(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Stack]:
    settings: dict[str, str] = dict(getattr(request, "param", {}))
    with Stack(
        tmp_path,
        redis=settings.pop("redis", "") == "yes",
        # The flags named (at their defaults): mypy matches **settings against any unnamed.
        upstream=True,
        seed=True,
        push=True,
        sidecar=True,
        SIDECAR_SNAPSHOT_FILE=str(tmp_path / "snapshot.json"),
        SIDECAR_UPSTREAM_TIMEOUT="1",
        **settings,
    ) as stack:
        for i, c in enumerate(CUSTOMERS):
            path = f"/tenants/{stack.tenant}/customers/{c}/entitlements"
            stack.admin("PUT", path, doc(i))
        stack.admin("PUT", f"/tenants/{stack.tenant}/flags/beta", {"value": True})
        yield stack


def upstream_down(stack: Stack) -> None:
    assert stack.emulator is not None
    stack.emulator.stop()


@pytest.mark.parametrize(
    ("seeded_stack", "redis_at_restart"),
    [
        ({"SIDECAR_SNAPSHOT_INTERVAL": "3600"}, "absent"),
        ({"SIDECAR_SNAPSHOT_INTERVAL": "3600", "redis": "yes"}, "empty"),
        ({"SIDECAR_SNAPSHOT_INTERVAL": "3600", "redis": "yes"}, "unreachable"),
    ],
    indirect=["seeded_stack"],
    ids=["memory_only", "redis_restarted_empty", "redis_unreachable"],
)
def test_sigterm_then_restart_with_the_upstream_down_answers_every_cached_customer(
    seeded_stack: Stack, redis_at_restart: str
) -> None:
    """The interval is an hour: what the restart answers was written on the way out."""
    stack = seeded_stack
    answers = cache_all(stack, CUSTOMERS)
    assert stack.sidecar.stop() == 0  # SIGTERM: drain, final snapshot, exit 0
    upstream_down(stack)
    if redis_at_restart == "empty":
        assert stack.redis is not None
        stack.redis.restart()  # killed and started again: every key gone
    elif redis_at_restart == "unreachable":
        assert stack.redis is not None
        stack.redis.kill()
    stack.start_sidecar()
    assert_stale_answers(stack.url, answers)
    status, _, body = get(stack.url, "/v1/customers/never_cached/can/exports")
    assert (status, body["allowed"]) == (503, False)  # nothing invented
    assert "snapshot_ignored" not in stack.sidecar.output()


@pytest.mark.parametrize("seeded_stack", [{"SIDECAR_SNAPSHOT_INTERVAL": "0.5"}], indirect=True)
def test_sigkill_loses_at_most_one_interval(seeded_stack: Stack, tmp_path: Path) -> None:
    """What was cached a write ago survives a SIGKILL: the periodic writer has put it
    in the file (polled: the file holds it), and the kill cannot damage the file
    (written beside it, renamed over it)."""
    stack = seeded_stack
    early, late = CUSTOMERS[:16], CUSTOMERS[16:]
    answers = cache_all(stack, early)
    path = tmp_path / "snapshot.json"

    def written() -> bool:
        if not path.exists():
            return False
        held = {ident for _, ident, _ in read_snapshot(path, stack.tenant).entries}
        return set(early) <= held

    wait_until(written, timeout=20, process=stack.sidecar, what="the early customers written")
    for c in late:  # cached within the last interval: may or may not be in the file
        assert get(stack.url, f"/v1/customers/{c}/can/exports")[0] == 200
    stack.sidecar.kill()
    upstream_down(stack)
    stack.start_sidecar()
    assert_stale_answers(stack.url, answers)
    assert "snapshot_ignored" not in stack.sidecar.output()


@pytest.mark.parametrize(
    "seeded_stack",
    [{"SIDECAR_SNAPSHOT_INTERVAL": "3600", "SIDECAR_WORKERS": "2", "redis": "yes"}],
    indirect=True,
)
def test_workers_each_write_a_file_and_each_loads_them_all(
    seeded_stack: Stack, tmp_path: Path
) -> None:
    """SIDECAR_WORKERS=2: a customer is cached by whichever worker served it; after a
    restart any worker may be asked, and answers it (every worker loads every file)."""
    stack = seeded_stack
    answers = cache_all(stack, CUSTOMERS)  # a new connection per request: both workers
    assert stack.sidecar.stop() == 0
    files = sorted(tmp_path.glob("snapshot.json*"))
    assert [p.name for p in files] == ["snapshot.json.w0", "snapshot.json.w1"]
    held = [{i for _, i, _ in read_snapshot(p, stack.tenant).entries} for p in files]
    assert all(held), "each worker served and wrote some"
    assert set(CUSTOMERS) <= held[0] | held[1]
    upstream_down(stack)
    assert stack.redis is not None
    stack.redis.restart()
    stack.start_sidecar()
    for _ in range(2):  # each path twice: both workers are likely asked
        assert_stale_answers(stack.url, answers)


def test_damaged_file_never_stops_the_sidecar(tmp_path: Path) -> None:
    path = tmp_path / "snapshot.json"
    path.write_bytes(b'{"format":"vellum-sidecar-snapshot","version":1,"tenant":"x"}\n{"k":')
    with Stack(tmp_path, SIDECAR_SNAPSHOT_FILE=str(path), SIDECAR_LOG_LEVEL="info") as stack:
        lines = [json.loads(x) for x in stack.sidecar.output().splitlines() if x.startswith("{")]
        warnings = [x for x in lines if x.get("level") == "warning"]
        assert [(w["event"], w["reason"]) for w in warnings] == [("snapshot_ignored", "truncated")]
        assert get(stack.url, "/v1/customers/cus_active/can/reports")[:2] == (200, "miss")


def test_file_without_read_permission_is_ignored_and_replaced(tmp_path: Path) -> None:
    """Permissions: a file mode 000 is ignored with the one warning (``unreadable``),
    and the next write replaces it. As root the sidecar runs without the capabilities
    that bypass file permissions (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), as a
    container's non-root user would."""
    path = tmp_path / "snapshot.json"
    now = time.time()
    entry = Entry.from_upstream(200, orjson.dumps(doc(1)), now=now, fresh_for=60, stale_for=600)
    write_file(path, *encode_lines("whoever", [(ENTITLEMENTS, "cus_1", entry)], now))
    path.chmod(0)
    stack = Stack(tmp_path, SIDECAR_SNAPSHOT_FILE=str(path), SIDECAR_SNAPSHOT_INTERVAL="0.2",
                  SIDECAR_LOG_LEVEL="info", sidecar=False, push=False)  # fmt: skip
    with stack:
        sidecar = Sidecar(
            tmp_path, stack.tenant, stack.emulator_url, name="sidecar", **stack.settings
        )
        if os.geteuid() == 0:
            drop = "--bounding-set=-dac_override,-dac_read_search"
            sidecar.argv = ["setpriv", drop, *sidecar.argv]
        stack.add(sidecar)
        lines = [json.loads(x) for x in sidecar.output().splitlines() if x.startswith("{")]
        warnings = [x for x in lines if x.get("level") == "warning"]
        assert [(w["event"], w["reason"]) for w in warnings] == [("snapshot_ignored", "unreadable")]
        assert get(sidecar.api_url, "/v1/customers/cus_active/can/reports")[0] == 200
        wait_until(lambda: stat.S_IMODE(path.stat().st_mode) == 0o600, timeout=20,
                   process=sidecar, what="the file replaced by a readable one")  # fmt: skip
        assert [e[1] for e in read_snapshot(path, stack.tenant).entries] == ["cus_active"]


# -- offline use: export and import ------------------------------------------------------------


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``vellum-sidecar ARGS`` with only ``env`` of the sidecar's variables (no API key)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("VELLUM_", "SIDECAR_"))}
    return subprocess.run(
        sidecar_command(*args), env={**base, **env}, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    "seeded_stack", [{"SIDECAR_SNAPSHOT_INTERVAL": "0.2", "redis": "yes"}], indirect=True
)
def test_export_and_import_round_trip_to_a_sidecar_without_upstream(
    seeded_stack: Stack, tmp_path: Path
) -> None:
    stack = seeded_stack
    assert stack.redis is not None
    answers = cache_all(stack, CUSTOMERS)
    live = tmp_path / "snapshot.json"
    tenant = {"VELLUM_TENANT_ID": stack.tenant}
    expected = {(kind.name, ident) for kind, ident, _ in _all_entries(stack, live)}

    # From the running sidecar's own file, and from Redis: the same documents.
    out = cli("snapshot", "export", "--out", str(tmp_path / "a.json"),
              SIDECAR_SNAPSHOT_FILE=str(live), **tenant)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert f"exported {len(expected)} entries" in out.stderr
    out = cli("snapshot", "export", "--from-redis", "--out", str(tmp_path / "b.json"),
              SIDECAR_REDIS_URL=stack.redis.url, **tenant)  # fmt: skip
    assert out.returncode == 0, out.stderr
    from_file = read_snapshot(tmp_path / "a.json", stack.tenant)
    from_redis = read_snapshot(tmp_path / "b.json", stack.tenant)
    assert {(k.name, i) for k, i, _ in from_file.entries} == expected
    assert {(k.name, i) for k, i, _ in from_redis.entries} == expected
    bodies = {(k.name, i): e.body() for k, i, e in from_file.entries}
    assert {(k.name, i): e.body() for k, i, e in from_redis.entries} == bodies

    # Imported for a sidecar with no upstream at all and no Redis: every customer answers.
    offline = tmp_path / "offline"
    offline.mkdir()
    target = offline / "snapshot.json"
    out = cli("snapshot", "import", str(tmp_path / "b.json"),
              SIDECAR_SNAPSHOT_FILE=str(target), **tenant)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert oct(target.stat().st_mode & 0o777) == "0o600"
    nowhere = f"http://127.0.0.1:{free_port()}"
    sidecar = Sidecar(tmp_path, stack.tenant, nowhere, name="offline",
                      SIDECAR_SNAPSHOT_FILE=str(target))  # fmt: skip
    stack.add(sidecar)
    assert_stale_answers(sidecar.api_url, answers)


def _all_entries(stack: Stack, live: Path) -> list[Any]:
    """The running sidecar's file once it holds every kind it cached (polled)."""
    held: list[Any] = []

    def complete() -> bool:
        nonlocal held
        if not live.exists():
            return False
        held = read_snapshot(live, stack.tenant).entries
        # Every customer twice? No: one entitlement entry each, the flags entries, the
        # global flags and the unknown customer's "not found".
        return len(held) == len(CUSTOMERS) + 3

    wait_until(complete, timeout=20, process=stack.sidecar, what="every entry written")
    return held


def test_import_restamps_an_old_file_and_refuses_a_foreign_one(tmp_path: Path) -> None:
    """A CI job's file may be days old: import makes its entries servable stale for
    SIDECAR_STALE_TTL from now. A file of another tenant is refused."""
    old = time.time() - 3 * 86400
    entry = Entry.from_upstream(200, orjson.dumps(doc(1)), now=old, fresh_for=60, stale_for=60)
    source = tmp_path / "old.json"
    write_file(source, *encode_lines("t_ci", [(ENTITLEMENTS, "cus_ci", entry)], old))
    assert read_snapshot(source, "t_ci").entries == []  # expired as it stands
    target = tmp_path / "snapshot.json"
    out = cli("snapshot", "import", str(source), VELLUM_TENANT_ID="t_ci",
              SIDECAR_SNAPSHOT_FILE=str(target), SIDECAR_STALE_TTL="3600")  # fmt: skip
    assert out.returncode == 0, out.stderr
    [(_, ident, loaded)] = read_snapshot(target, "t_ci").entries
    assert ident == "cus_ci"
    assert loaded.fetched_at == pytest.approx(old)  # Age stays true
    assert loaded.stale_until > time.time() + 3000
    with Stack(tmp_path, tenant="t_ci", upstream=False, SIDECAR_SNAPSHOT_FILE=str(target)) as s:
        status, source_, body = get(s.url, "/v1/customers/cus_ci/can/exports")
        assert (status, source_, body["allowed"]) == (200, "stale", True)

    out = cli("snapshot", "import", str(source), VELLUM_TENANT_ID="t_other",
              SIDECAR_SNAPSHOT_FILE=str(tmp_path / "other.json"))  # fmt: skip
    assert out.returncode == 1
    assert "foreign_tenant" in out.stderr
    assert not (tmp_path / "other.json").exists()
    out = cli("snapshot", "export", "--out", "-", VELLUM_TENANT_ID="t_ci")
    assert out.returncode == 2
    assert "SIDECAR_SNAPSHOT_FILE: required" in out.stderr


def test_the_cli_reads_and_replaces_only_regular_files(tmp_path: Path) -> None:
    """``import`` from a FIFO waited forever and from ``/dev/zero`` died of a
    ``MemoryError`` traceback; ``export --out`` over a FIFO or a device replaced it.
    Each is now one line on stderr and exit 1, and nothing is replaced."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    target = tmp_path / "snapshot.json"
    env = {"VELLUM_TENANT_ID": "t_ci", "SIDECAR_SNAPSHOT_FILE": str(target)}
    for source in (str(fifo), "/dev/zero"):
        out = cli("snapshot", "import", source, **env)
        assert out.returncode == 1, out.stderr
        assert out.stderr == "vellum-sidecar: snapshot: unreadable: not a regular file\n"
        assert not target.exists()
    now = time.time()
    entry = Entry.from_upstream(200, orjson.dumps(doc(1)), now=now, fresh_for=60, stale_for=600)
    write_file(target, *encode_lines("t_ci", [(ENTITLEMENTS, "cus_ci", entry)], now))
    out = cli("snapshot", "export", "--out", str(fifo), **env)
    assert out.returncode == 1, out.stderr
    assert out.stderr.endswith("is not a regular file (nothing written)\n")
    assert out.stderr.count("\n") == 1
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
