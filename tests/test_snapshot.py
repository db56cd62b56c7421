"""The local snapshot (``SIDECAR_SNAPSHOT_FILE``) inside one process: the file's form
and mode, loading as the stale fallback (never answering alone), every kind of bad
file ignored with one warning and a metric, the change counter, and the readiness
setting (``SIDECAR_WAIT_FOR_DATA``). The restarts of real processes (SIGTERM,
SIGKILL, Redis empty or away, the CLI) are in tests/test_warm_start.py."""

from __future__ import annotations

import logging
import os
import stat
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from aiohttp.test_utils import TestServer

from sidecar.appkeys import CACHES, SNAPSHOT
from sidecar.cache.entry import Entry
from sidecar.cache.kinds import ENTITLEMENTS, FLAGS
from sidecar.cache.snapshot import (
    FORMAT,
    VERSION,
    SnapshotError,
    Snapshotter,
    encode_lines,
    read_snapshot,
    snapshot_sources,
    worker_file,
    write_file,
)
from sidecar.emulator import Emulator

from .conftest import Sidecar, SidecarFactory, eventually
from .harness import API_KEY, WEBHOOK_SECRET, free_port

DOC = {"status": "active", "modules": ["reports"], "accountId": "acct_1", "config": {"seats": 3}}
TRIAL = {"status": "trialing", "modules": [], "config": {}}


@pytest.fixture
def seeded(emulator: Emulator, tenant: str) -> Emulator:
    emulator.set_entitlements(tenant, "cus_1", DOC)
    emulator.set_entitlements(tenant, "cus_2", TRIAL)
    emulator.set_flag(tenant, "beta", False)
    emulator.set_flag(tenant, "beta", True, customer_id="cus_1")
    return emulator


def snapshot_of(sc: Sidecar) -> Snapshotter:
    snapshotter = sc.app[SNAPSHOT]
    assert snapshotter is not None
    return snapshotter


async def read(sc: Sidecar, path: str) -> tuple[int, str | None, Any]:
    resp = await sc.client.get(path)
    return resp.status, resp.headers.get("X-Sidecar-Cache"), await resp.json()


async def fill(sc: Sidecar) -> dict[str, Any]:
    """Read every kind (and an unknown customer); the answers, by path."""
    paths = [
        "/v1/customers/cus_1/entitlements",
        "/v1/customers/cus_2/entitlements",
        "/v1/customers/nobody/entitlements",
        "/v1/customers/cus_1/flags",
        "/v1/flags",
    ]
    answers = {}
    for path in paths:
        status, source, body = await read(sc, path)
        assert (status, source) == (200, "miss"), (path, status, body)
        answers[path] = body
    return answers


def dead_upstream() -> str:
    return f"http://127.0.0.1:{free_port()}"


def sample(metrics: Any, name: str, labels: dict[str, str] | None = None) -> float:
    value = metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else float(value)


# -- the file ------------------------------------------------------------------------------


async def test_file_is_0600_names_tenant_and_format_and_holds_no_secret(
    make_sidecar: SidecarFactory, seeded: Emulator, tenant: str, tmp_path: Path
) -> None:
    path = tmp_path / "snapshot.json"
    sc = await make_sidecar(SIDECAR_SNAPSHOT_FILE=str(path))
    await fill(sc)
    assert await snapshot_of(sc).write()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    raw = path.read_bytes()
    header = orjson.loads(raw.split(b"\n", 1)[0])
    assert header["format"] == FORMAT
    assert header["version"] == VERSION
    assert header["tenant"] == tenant
    for secret in (API_KEY, WEBHOOK_SECRET):
        assert secret.encode() not in raw
    kinds = sorted(orjson.loads(line)["k"] for line in raw.splitlines()[1:-1])
    assert kinds == ["entitlements", "entitlements", "entitlements", "flags", "global_flags"]
    trailer = orjson.loads(raw.splitlines()[-1])
    assert trailer == {"end": True, "entries": 5, "crc32": zlib.crc32(raw[: raw.rindex(b"{")])}
    # No temporary file is left beside it.
    assert os.listdir(tmp_path) == ["snapshot.json"]
    assert sample(sc.metrics, "vellum_sidecar_snapshot_entries") == 5
    assert sample(sc.metrics, "vellum_sidecar_snapshot_writes_total", {"result": "ok"}) == 1


async def test_nothing_written_while_nothing_changed(
    make_sidecar: SidecarFactory, seeded: Emulator, tmp_path: Path
) -> None:
    path = tmp_path / "snapshot.json"
    sc = await make_sidecar(SIDECAR_SNAPSHOT_FILE=str(path))
    snapshotter = snapshot_of(sc)
    assert not await snapshotter.write_if_changed()  # empty at start: nothing to write
    await read(sc, "/v1/customers/cus_1/entitlements")
    assert await snapshotter.write_if_changed()
    for _ in range(3):
        await read(sc, "/v1/customers/cus_1/entitlements")  # hits change nothing
    assert not await snapshotter.write_if_changed()
    # Nor does a drop of a customer this sidecar does not hold.
    assert (await sc.client.delete("/v1/customers/never_cached/cache")).status == 204
    assert not await snapshotter.write_if_changed()
    await read(sc, "/v1/customers/cus_2/entitlements")
    assert await snapshotter.write_if_changed()
    assert sample(sc.metrics, "vellum_sidecar_snapshot_writes_total", {"result": "ok"}) == 2


async def test_written_every_interval_when_changed(
    make_sidecar: SidecarFactory, seeded: Emulator, tenant: str, tmp_path: Path
) -> None:
    path = tmp_path / "snapshot.json"
    sc = await make_sidecar(SIDECAR_SNAPSHOT_FILE=str(path), SIDECAR_SNAPSHOT_INTERVAL="0.05")
    await read(sc, "/v1/customers/cus_1/entitlements")

    async def written() -> bool:
        return path.exists() and len(read_snapshot(path, tenant).entries) == 1

    await eventually(written, timeout=10)
    await read(sc, "/v1/customers/cus_2/entitlements")

    async def both() -> bool:
        return len(read_snapshot(path, tenant).entries) == 2

    await eventually(both, timeout=10)


# -- loading: the stale fallback ---------------------------------------------------------------


async def test_loaded_entries_are_the_stale_fallback_when_the_upstream_is_down(
    make_sidecar: SidecarFactory, seeded: Emulator, tmp_path: Path
) -> None:
    path = tmp_path / "snapshot.json"
    first = await make_sidecar(SIDECAR_SNAPSHOT_FILE=str(path))
    answers = await fill(first)
    assert await snapshot_of(first).write()
    second = await make_sidecar(SIDECAR_SNAPSHOT_FILE=str(path), VELLUM_BASE_URL=dead_upstream())
    assert snapshot_of(second).loaded == 5
    assert sample(second.metrics, "vellum_sidecar_snapshot_loads_total", {"result": "loaded"}) == 1
    for path_, body in answers.items():
        assert await read(second, path_) == (200, "stale", body), path_
    status, source, body = await read(second, "/v1/customers/cus_1/can/reports")
    assert (status, source, body["allowed"]) == (200, "stale", True)
    status, _, body = await read(second, "/v1/customers/cus_1/flags/beta")
    assert (status, body["value"]) == (200, True)
    # Nothing invented: a customer the snapshot does not hold still fails closed.
    status, _, body = await read(second, "/v1/customers/never_seen/can/reports")
    assert (status, body["allowed"]) == (503, False)


async def test_loaded_entries_never_answer_alone(
    make_sidecar: SidecarFactory, seeded: Emulator, tenant: str, tmp_path: Path
) -> None:
    """A loaded entry is revalidated on its first read: the upstream's answer wins."""
    path = tmp_path / "snapshot.json"
    first = await make_sidecar(SIDECAR_SNAPSHOT_FILE=str(path))
    await fill(first)
    assert await snapshot_of(first).write()
    seeded.set_entitlements(tenant, "cus_2", DOC)  # changed while no sidecar looked
    second = await make_sidecar(SIDECAR_SNAPSHOT_FILE=str(path))
    entry = second.app[CACHES].entitlements.memory.data["cus_2"]
    assert entry.answer_until == 0.0
    status, source, body = await read(second, "/v1/customers/cus_2/can/reports")
    assert (status, source, body["allowed"]) == (200, "miss", True)
    assert await read(second, "/v1/customers/cus_2/can/reports") == (200, "hit", body)


async def test_loaded_with_redis_revalidates_through_redis_and_upstream(
    make_sidecar: SidecarFactory, seeded: Emulator, tmp_path: Path, redis_url: str
) -> None:
    """With Redis reachable (and empty) the fan-out's first confirmation expires the
    layer: the loaded entries stay as the fallback, and reads revalidate."""
    path = tmp_path / "snapshot.json"
    first = await make_sidecar(redis_url, SIDECAR_SNAPSHOT_FILE=str(path))
    answers = await fill(first)
    assert await snapshot_of(first).write()
    with redis.Redis.from_url(redis_url) as client:
        client.flushall()
    second = await make_sidecar(
        redis_url, SIDECAR_SNAPSHOT_FILE=str(path), VELLUM_BASE_URL=dead_upstream()
    )
    for path_, body in answers.items():
        assert await read(second, path_) == (200, "stale", body), path_


async def test_a_drop_is_written_and_kept_across_the_restart(
    make_sidecar: SidecarFactory, seeded: Emulator, tmp_path: Path
) -> None:
    """A drop expires an entry in place; the snapshot records it (a change, so a write),
    and after a restart the dropped entry is still only the fallback, which
    SIDECAR_STRICT_DROPS refuses to serve."""
    path = tmp_path / "snapshot.json"
    first = await make_sidecar(SIDECAR_SNAPSHOT_FILE=str(path))
    await fill(first)
    snapshotter = snapshot_of(first)
    assert await snapshotter.write_if_changed()
    assert (await first.client.delete("/v1/customers/cus_1/cache")).status == 204
    assert await snapshotter.write_if_changed()
    lenient = await make_sidecar(SIDECAR_SNAPSHOT_FILE=str(path), VELLUM_BASE_URL=dead_upstream())
    assert (await read(lenient, "/v1/customers/cus_1/entitlements"))[:2] == (200, "stale")
    strict = await make_sidecar(
        SIDECAR_SNAPSHOT_FILE=str(path),
        VELLUM_BASE_URL=dead_upstream(),
        SIDECAR_STRICT_DROPS="true",
    )
    assert (await read(strict, "/v1/customers/cus_1/entitlements"))[0] == 503
    assert (await read(strict, "/v1/customers/cus_2/entitlements"))[:2] == (200, "stale")


async def test_entries_past_their_stale_deadline_are_dropped_at_load(
    make_sidecar: SidecarFactory, seeded: Emulator, tenant: str, tmp_path: Path
) -> None:
    path = tmp_path / "snapshot.json"
    now = time.time()
    old = Entry.from_upstream(
        200, orjson.dumps(DOC), now=now - 100, fresh_for=10, stale_for=10, kind=ENTITLEMENTS
    )
    young = Entry.from_upstream(
        200, orjson.dumps(TRIAL), now=now - 100, fresh_for=10, stale_for=1000, kind=ENTITLEMENTS
    )
    lines, count = encode_lines(
        tenant, [(ENTITLEMENTS, "cus_old", old), (ENTITLEMENTS, "cus_young", young)], now
    )
    write_file(path, lines, count)
    sc = await make_sidecar(SIDECAR_SNAPSHOT_FILE=str(path), VELLUM_BASE_URL=dead_upstream())
    assert snapshot_of(sc).loaded == 1
    assert list(sc.app[CACHES].entitlements.memory.data) == ["cus_young"]
    assert (await read(sc, "/v1/customers/cus_young/entitlements"))[:2] == (200, "stale")
    assert (await read(sc, "/v1/customers/cus_old/entitlements"))[0] == 503


async def test_a_snapshot_larger_than_the_layer_keeps_its_last_entries(
    make_sidecar: SidecarFactory, seeded: Emulator, tenant: str, tmp_path: Path
) -> None:
    path = tmp_path / "snapshot.json"
    now = time.time()
    entries = [
        (ENTITLEMENTS, f"cus_{n}", Entry.from_upstream(200, orjson.dumps(DOC), now=now,
                                                       fresh_for=60, stale_for=600))
        for n in range(3)
    ]  # fmt: skip
    write_file(path, *encode_lines(tenant, entries, now))
    sc = await make_sidecar(SIDECAR_SNAPSHOT_FILE=str(path), SIDECAR_MEMORY_MAX_ENTRIES="2")
    assert snapshot_of(sc).loaded == 2
    assert list(sc.app[CACHES].entitlements.memory.data) == ["cus_1", "cus_2"]
    assert sample(sc.metrics, "vellum_sidecar_snapshot_loaded_entries") == 2


async def test_account_push_drops_only_the_loaded_customers_of_the_account(
    make_sidecar: SidecarFactory, seeded: Emulator, tenant: str, tmp_path: Path
) -> None:
    """Loading teaches the account index, so an account's push after a restart drops
    that account's customers, not the whole tenant."""
    path = tmp_path / "snapshot.json"
    first = await make_sidecar(SIDECAR_SNAPSHOT_FILE=str(path))
    await fill(first)
    assert await snapshot_of(first).write()
    second = await make_sidecar(SIDECAR_SNAPSHOT_FILE=str(path))
    scope, _ = await second.invalidator.account("acct_1", source="api")
    assert scope == "account"


# -- bad files -----------------------------------------------------------------------------


def good_file(path: Path, tenant: str) -> bytes:
    now = time.time()
    entry = Entry.from_upstream(200, orjson.dumps(DOC), now=now, fresh_for=60, stale_for=600)
    lines, count = encode_lines(tenant, [(ENTITLEMENTS, "cus_1", entry)], now)
    write_file(path, lines, count)
    return path.read_bytes()


def _header(raw: bytes, **changes: Any) -> bytes:
    """``raw`` with its header changed and the checksum made right again."""
    header, rest = raw.split(b"\n", 1)
    body = orjson.dumps({**orjson.loads(header), **changes}) + b"\n" + rest[: rest.rindex(b"{")]
    return body + orjson.dumps({"end": True, "entries": 1, "crc32": zlib.crc32(body)}) + b"\n"


def _entry(raw: bytes, *, entries: object = 1, **changes: Any) -> bytes:
    """``raw`` with its one entry's stored form changed (and the trailer's count set
    to ``entries``), the checksum made right again: what a foreign or buggy writer
    could leave, which the checksum alone does not catch."""
    header, line, _trailer = raw.rstrip(b"\n").split(b"\n")
    stored = orjson.loads(line)
    stored["e"] = {**stored["e"], **changes}
    body = header + b"\n" + orjson.dumps(stored) + b"\n"
    return body + orjson.dumps({"end": True, "entries": entries, "crc32": zlib.crc32(body)}) + b"\n"


#: A good file's bytes and its tenant -> a bad file.
BAD_FILES: dict[str, Callable[[bytes, str], bytes]] = {
    "damaged": lambda raw, _t: raw.replace(b"reports", b"rep0rts"),
    "not_a_snapshot": lambda _raw, _t: b'{"hello": "world"}\n{"end": true}\n',
    "garbage": lambda _raw, _t: os.urandom(4096),
    "truncated": lambda raw, _t: raw[: len(raw) // 2],
    "truncated_at_a_line": lambda raw, _t: raw[: raw.rindex(b"{")],
    "empty": lambda _raw, _t: b"",
    "foreign_tenant": lambda raw, _t: _header(raw, tenant="someone_else"),
    "newer_format": lambda raw, _t: _header(raw, version=VERSION + 1),
    # Once loaded, an entry fetched at "nan" made every read of its customer a 500.
    "instant_not_a_number": lambda raw, _t: _entry(raw, f="nan"),
    "instant_infinite": lambda raw, _t: _entry(raw, fu="inf", su="1e999"),
    "not_found_body_not_json": lambda raw, _t: _entry(raw, d=None, nf="not json {"),
    "entry_count_not_a_number": lambda raw, _t: _entry(raw, entries=True),
}
REASONS = {
    "instant_not_a_number": "damaged",
    "instant_infinite": "damaged",
    "not_found_body_not_json": "damaged",
    "entry_count_not_a_number": "damaged",
    "not_a_snapshot": "damaged",
    "garbage": "damaged",
    "truncated_at_a_line": "truncated",
    "empty": "truncated",
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
async def test_bad_file_ignored_with_one_warning_and_a_metric(
    make_sidecar: SidecarFactory,
    seeded: Emulator,
    tenant: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    case: str,
) -> None:
    path = tmp_path / "snapshot.json"
    path.write_bytes(BAD_FILES[case](good_file(path, tenant), tenant))
    reason = REASONS.get(case, case)
    with pytest.raises(SnapshotError) as raised:
        read_snapshot(path, tenant)
    assert raised.value.reason == reason
    caplog.set_level(logging.INFO, logger="sidecar.snapshot")
    sc = await make_sidecar(SIDECAR_SNAPSHOT_FILE=str(path))
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in warnings] == ["snapshot_ignored"]
    assert warnings[0].fields["reason"] == reason  # type: ignore[attr-defined]
    assert sample(sc.metrics, "vellum_sidecar_snapshot_loads_total", {"result": reason}) == 1
    assert snapshot_of(sc).loaded == 0
    assert len(sc.app[CACHES].entitlements.memory) == 0
    # The sidecar works as if there were no file, and replaces it at its next write.
    assert (await read(sc, "/v1/customers/cus_1/entitlements"))[:2] == (200, "miss")
    assert await snapshot_of(sc).write_if_changed()
    assert [e[1] for e in read_snapshot(path, tenant).entries] == ["cus_1"]


#: Paths that are not a readable regular file -> how to make one at ``path``.
NOT_FILES: dict[str, Callable[[Path], None]] = {
    "symlink_loop": lambda path: path.symlink_to(path.name),
    # A FIFO with no writer held the start (and SIGTERM) forever; a device that never
    # ends was read until memory ran out.
    "fifo": lambda path: os.mkfifo(path),
    "endless_device": lambda path: path.symlink_to("/dev/zero"),
}


@pytest.mark.parametrize("case", sorted(NOT_FILES))
async def test_unreadable_path_ignored_with_one_warning(
    make_sidecar: SidecarFactory,
    seeded: Emulator,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    case: str,
) -> None:
    """A path that cannot be read, or is not a regular file (a file of another user is
    tests/test_warm_start.py's, in a process of its own uid), is ``unreadable``."""
    path = tmp_path / "snapshot.json"
    NOT_FILES[case](path)
    with pytest.raises(SnapshotError) as raised:
        read_snapshot(path, "t")
    assert raised.value.reason == "unreadable"
    caplog.set_level(logging.INFO, logger="sidecar.snapshot")
    sc = await make_sidecar(SIDECAR_SNAPSHOT_FILE=str(path))
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in warnings] == ["snapshot_ignored"]
    assert sample(sc.metrics, "vellum_sidecar_snapshot_loads_total", {"result": "unreadable"}) == 1
    assert (await read(sc, "/v1/customers/cus_1/entitlements"))[:2] == (200, "miss")


async def test_failed_writes_counted_logged_once_and_serving_goes_on(
    make_sidecar: SidecarFactory,
    seeded: Emulator,
    tenant: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A write that fails (here: the temporary file's name is too long for the file
    system) is counted every time, logged once per run of failures, and the sidecar
    serves on; the first write that works again is logged too."""
    path = tmp_path / ("s" * 250)
    caplog.set_level(logging.INFO, logger="sidecar.snapshot")
    sc = await make_sidecar(SIDECAR_SNAPSHOT_FILE=str(path))
    await read(sc, "/v1/customers/cus_1/entitlements")
    snapshotter = snapshot_of(sc)
    assert not await snapshotter.write_if_changed()
    assert not await snapshotter.write_if_changed()
    assert sample(sc.metrics, "vellum_sidecar_snapshot_writes_total", {"result": "error"}) == 2
    failed = [r for r in caplog.records if r.getMessage() == "snapshot_write_failed"]
    assert len(failed) == 1
    assert (await read(sc, "/v1/customers/cus_1/entitlements"))[:2] == (200, "hit")
    snapshotter.path = tmp_path / "snapshot.json"  # the volume is back (a shorter name)
    assert await snapshotter.write_if_changed()
    assert [r.getMessage() for r in caplog.records][-1] == "snapshot_write_recovered"
    assert [e[1] for e in read_snapshot(snapshotter.path, tenant).entries] == ["cus_1"]


async def test_absent_file_is_the_first_start(
    make_sidecar: SidecarFactory, seeded: Emulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.snapshot")
    sc = await make_sidecar(SIDECAR_SNAPSHOT_FILE=str(tmp_path / "snapshot.json"))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert sample(sc.metrics, "vellum_sidecar_snapshot_loads_total", {"result": "absent"}) == 1


def test_a_write_replaces_only_a_regular_file_and_follows_a_link(tmp_path: Path) -> None:
    """Renaming over a FIFO, a device or a directory would replace it: refused, nothing
    written. A symbolic link is followed: its target is written, the link stays."""
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    (tmp_path / "dir.json").mkdir()
    for path in (fifo, tmp_path / "dir.json"):
        with pytest.raises(OSError, match="not a regular file"):
            good_file(path, "t")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert (tmp_path / "dir.json").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.json", "fifo.json"]
    link = tmp_path / "link.json"
    link.symlink_to("real.json")
    good_file(link, "t")
    assert link.is_symlink()
    assert [e[1] for e in read_snapshot(tmp_path / "real.json", "t").entries] == ["cus_1"]


def test_a_crashed_writes_temporary_file_is_ignored(tmp_path: Path) -> None:
    """A write killed before its rename leaves a temporary file; the snapshot is the
    previous one, whole."""
    path = tmp_path / "snapshot.json"
    good_file(path, "t")
    (tmp_path / ".snapshot.json.abc.tmp").write_bytes(b'{"format": "vellum-sidecar-snapshot"')
    assert [e[1] for e in read_snapshot(path, "t").entries] == ["cus_1"]
    assert snapshot_sources(path) == [path]


# -- the merge of workers' files ------------------------------------------------------------


async def test_every_workers_file_is_loaded_newest_entry_winning(
    make_sidecar: SidecarFactory, seeded: Emulator, tenant: str, tmp_path: Path
) -> None:
    path = tmp_path / "snapshot.json"
    now = time.time()

    def entry(doc: dict[str, Any], age: float) -> Entry:
        return Entry.from_upstream(200, orjson.dumps(doc), now=now - age, fresh_for=1,
                                   stale_for=3600)  # fmt: skip

    files = {
        worker_file(path, 0): [(ENTITLEMENTS, "cus_1", entry(TRIAL, 50)),
                               (ENTITLEMENTS, "cus_0", entry(DOC, 50))],
        worker_file(path, 1): [(ENTITLEMENTS, "cus_1", entry(DOC, 10)),
                               (FLAGS, "cus_1", Entry.from_upstream(
                                   200, b'{"flags":{"beta":true}}', now=now, fresh_for=1,
                                   stale_for=60, kind=FLAGS))],
    }  # fmt: skip
    for file, entries in files.items():
        lines, count = encode_lines(tenant, entries, now)
        write_file(file, lines, count)
    assert snapshot_sources(worker_file(path, 1)) == [path, *files]
    sc = await make_sidecar(SIDECAR_SNAPSHOT_FILE=str(path), VELLUM_BASE_URL=dead_upstream())
    assert snapshot_of(sc).loaded == 3
    status, source, body = await read(sc, "/v1/customers/cus_1/can/reports")
    assert (status, source, body["allowed"]) == (200, "stale", True)  # the newer one
    assert (await read(sc, "/v1/customers/cus_0/can/reports"))[:2] == (200, "stale")
    assert len(sc.app[CACHES].flags.memory) == 1


# -- readiness: SIDECAR_WAIT_FOR_DATA ----------------------------------------------------------


async def readyz(sc: Sidecar) -> tuple[int, dict[str, Any]]:
    resp = await sc.ops.get("/readyz")
    return resp.status, await resp.json()


async def test_default_readiness_does_not_wait_for_data(make_sidecar: SidecarFactory) -> None:
    sc = await make_sidecar(VELLUM_BASE_URL=dead_upstream())
    assert await readyz(sc) == (200, {"status": "ready", "redis": "disabled", "upstream": "ok"})


async def test_wait_for_data_until_the_upstream_answers(
    make_sidecar: SidecarFactory, seeded: Emulator, emulator_server: TestServer
) -> None:
    """Nothing loaded and no Redis: 503 ``waiting`` while the upstream cannot answer;
    its first answer (a background check: no traffic needed) makes the sidecar ready,
    for good (latched: the upstream going away later does not flip it back)."""
    down = await make_sidecar(
        SIDECAR_WAIT_FOR_DATA="true",
        VELLUM_BASE_URL=dead_upstream(),
        SIDECAR_UPSTREAM_TIMEOUT="0.5",
    )
    status, body = await readyz(down)
    assert (status, body["status"]) == (503, "waiting")
    sc = await make_sidecar(SIDECAR_WAIT_FOR_DATA="true", SIDECAR_UPSTREAM_TIMEOUT="0.5")
    await eventually(lambda: _status_is(sc, 200), timeout=10)
    await emulator_server.close()
    await read(sc, "/v1/customers/cus_1/entitlements")  # the upstream fails now
    status, body = await readyz(sc)
    assert (status, body["status"]) == (200, "ready")
    assert (await readyz(down))[0] == 503


async def _status_is(sc: Sidecar, status: int) -> bool:
    return (await readyz(sc))[0] == status


async def test_wait_for_data_satisfied_by_a_loaded_snapshot(
    make_sidecar: SidecarFactory, seeded: Emulator, tmp_path: Path
) -> None:
    path = tmp_path / "snapshot.json"
    first = await make_sidecar(SIDECAR_SNAPSHOT_FILE=str(path))
    await fill(first)
    assert await snapshot_of(first).write()
    sc = await make_sidecar(
        SIDECAR_SNAPSHOT_FILE=str(path),
        SIDECAR_WAIT_FOR_DATA="true",
        VELLUM_BASE_URL=dead_upstream(),
    )
    status, body = await readyz(sc)
    assert (status, body["status"]) == (200, "ready")


async def test_wait_for_data_satisfied_by_redis(
    make_sidecar: SidecarFactory, redis_url: str
) -> None:
    sc = await make_sidecar(
        redis_url, SIDECAR_WAIT_FOR_DATA="true", VELLUM_BASE_URL=dead_upstream()
    )
    status, body = await readyz(sc)
    assert (status, body["status"]) == (200, "ready")
