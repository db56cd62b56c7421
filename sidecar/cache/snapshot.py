"""The local snapshot (``SIDECAR_SNAPSHOT_FILE``): the in-process layer saved to a file
and loaded at start as the stale fallback, so a restarted sidecar answers the
customers it had cached even with Redis empty or away and the upstream down.

**The file** is JSON Lines, so ``jq`` and ``grep`` read it::

    {"format":"vellum-sidecar-snapshot","version":1,"tenant":"t","written_at":1.7e9,"sidecar":"0.1.0"}
    {"k":"entitlements","id":"cus_1","e":{...}}
    ...
    {"end":true,"entries":2,"crc32":1234567}

Each entry line holds the document kind, the id and ``Entry.dumps()``, the stored
form Redis holds too (the document, ``fetched_at`` and the fresh and stale
deadlines). The trailer's CRC-32 covers every byte before it: a file without
its trailer is *truncated*, one whose bytes do not match is *damaged*. It holds
the documents and nothing else of the sidecar's: no key, no secret, no URL.

**Loading** (``Snapshotter.load``, before the listeners report ready): a file
that is absent is the first start; one that is damaged, truncated, of another
tenant, of a newer format or unreadable is ignored with one warning line
(``snapshot_ignored``) and counted in ``vellum_sidecar_snapshot_loads_total``,
never a crash. Entries past their stale deadline are dropped. The others are
installed with ``answer_until = 0``: they never answer alone, so the first read
of each goes to Redis, then the upstream, and the loaded entry is served
(``X-Sidecar-Cache: stale``) only when neither can answer.

**Writing** happens every ``SIDECAR_SNAPSHOT_INTERVAL`` seconds when the
in-process layer changed (``MemoryLayer.changes``) and once more at shutdown.
The entries are encoded on the event loop in slices of about a millisecond,
with a pause as long after each, and the file is written by a thread: a temporary file
in the same directory (mode 0600), fsync, rename over the old one, fsync of the
directory, so a reader or a crash only ever sees the old file or the new one.
Why slices on the loop and not a thread or a forked child: docs/performance.md
("The local snapshot").

**Workers** (``SIDECAR_WORKERS``): each writes its own file, ``<file>.w<i>``,
and every process loads the file and all the workers' files, the newest entry
of each document winning.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import stat
import tempfile
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import orjson

from .. import __version__
from ..http.inputs import is_id
from ..metrics import Metrics
from ..redis.keys import Keys
from ..redis.url import RedisClient
from ..tasks import cancel_and_wait
from .cache import Caches
from .entry import Entry
from .kinds import KINDS, Kind

__all__ = [
    "FORMAT",
    "UNFORESEEN",
    "VERSION",
    "Reason",
    "Snapshot",
    "SnapshotError",
    "Snapshotter",
    "encode_lines",
    "file_bytes",
    "merge",
    "parse_snapshot",
    "read_file",
    "read_redis",
    "read_snapshot",
    "snapshot_sources",
    "worker_file",
    "write_file",
]

log = logging.getLogger("sidecar.snapshot")

#: The header's ``format``: what makes a file a snapshot at all.
FORMAT: Final = "vellum-sidecar-snapshot"
#: The format version written; a file with a higher one is ignored (``newer_format``).
VERSION: Final = 1

#: What a file nobody foresaw can make the parser raise beyond ``SnapshotError``: a start
#: (or the CLI) says the file is damaged and goes on, never a crash or a traceback.
UNFORESEEN: Final = (ValueError, TypeError, KeyError, RecursionError, MemoryError)

#: Why a file was ignored (the metric's ``result`` label).
Reason = Literal["damaged", "truncated", "foreign_tenant", "newer_format", "unreadable"]

#: Seconds of encoding per slice on the event loop before it yields to requests...
_SLICE_S: Final = 0.001
#: ...and the pause after each slice: the writer takes at most half the loop (and
#: half a CPU), so requests never queue behind it and the process stays one the
#: kernel's scheduler wakes promptly (docs/performance.md, "The local snapshot").
_PAUSE_S: Final = 0.001
#: Entries encoded (or parsed) between two looks at the clock.
_STEP: Final = 64
#: Entry lines parsed per step of a load, between yields to the event loop.
_LOAD_STEP: Final = 2000
_WORKER_SUFFIX: Final = re.compile(r"\.w\d+$")
#: Keys per SCAN page and per MGET of ``read_redis``.
_REDIS_BATCH: Final = 500


class SnapshotError(Exception):
    """A snapshot file that cannot be used, and why (``reason``, the metric label)."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason: Reason = reason


@dataclass
class Snapshot:
    """A parsed snapshot file: its header and its entries, in file order."""

    tenant: str
    written_at: float
    entries: list[tuple[Kind, str, Entry]] = field(default_factory=list)
    #: Entries dropped because their stale deadline had passed.
    expired: int = 0


# -- the format ------------------------------------------------------------------------


def header_line(tenant: str, now: float) -> bytes:
    return orjson.dumps(
        {
            "format": FORMAT,
            "version": VERSION,
            "tenant": tenant,
            "written_at": now,
            "sidecar": __version__,
        },
        option=orjson.OPT_APPEND_NEWLINE,
    )


def entry_line(kind: Kind, ident: str, entry: Entry) -> bytes:
    """One entry line: the kind, the id and the entry's stored form (``Entry.dumps``)."""
    return orjson.dumps(
        {"k": kind.name, "id": ident, "e": orjson.Fragment(entry.dumps())},
        option=orjson.OPT_APPEND_NEWLINE,
    )


def _trailer_line(entries: int, crc: int) -> bytes:
    return orjson.dumps(
        {"end": True, "entries": entries, "crc32": crc}, option=orjson.OPT_APPEND_NEWLINE
    )


def encode_lines(
    tenant: str, entries: Iterable[tuple[Kind, str, Entry]], now: float
) -> tuple[list[bytes], int]:
    """The header and entry lines of a snapshot of ``entries`` (all at once: the CLI's
    way; the sidecar encodes in slices, ``Snapshotter``) and how many entries."""
    lines = [header_line(tenant, now)]
    lines += (entry_line(kind, ident, entry) for kind, ident, entry in entries)
    return lines, len(lines) - 1


def file_bytes(chunks: Iterable[bytes], entries: int) -> bytes:
    """A whole snapshot in memory (the chunks plus the trailer), for a pipe."""
    body = b"".join(chunks)
    return body + _trailer_line(entries, zlib.crc32(body))


def write_file(path: Path, chunks: Iterable[bytes], entries: int) -> int:
    """Write a snapshot atomically: a temporary file beside ``path`` (mode 0600), the
    chunks (the header and entry lines) and the trailer, fsync, rename over ``path``,
    fsync the directory. Returns the file's size. Blocking: the sidecar calls it in a
    thread.

    A symbolic link is followed (its target is replaced, the link stays); anything at
    ``path`` that is not a regular file (a device, a FIFO, a directory) is refused
    with ``OSError`` and nothing is written: renaming over it would replace it."""
    path = Path(os.path.realpath(path))  # a link loop stays itself: os.stat says ELOOP
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, f"{path} is not a regular file (nothing written)")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)  # mkstemp's mode already, whatever the umask: said again
        crc = size = 0
        with open(fd, "wb", closefd=True) as f:
            for chunk in chunks:
                crc = zlib.crc32(chunk, crc)  # releases the GIL for long chunks
                f.write(chunk)
                size += len(chunk)
            trailer = _trailer_line(entries, crc)
            f.write(trailer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return size + len(trailer)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (a crash right after it keeps the new file)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Parser:
    """Checks a snapshot's bytes and builds its entries, in steps (``steps``) so the
    sidecar's start-up load can yield to the event loop between them."""

    def __init__(self, raw: bytes, tenant: str | None, now: float) -> None:
        self.raw = raw
        self.tenant = tenant
        self.now = now
        self.result: Snapshot | None = None

    def steps(self) -> Iterator[None]:
        raw = self.raw
        if not raw:
            raise SnapshotError("truncated", "the file is empty")
        first_end = raw.find(b"\n")
        if first_end < 0:
            raise SnapshotError("truncated", "the file ends inside its header")
        header = _json_object(raw[:first_end])
        if header is None or header.get("format") != FORMAT:
            raise SnapshotError("damaged", "not a vellum-sidecar snapshot (no valid header)")
        version = header.get("version")
        if type(version) is not int or version < 1:
            raise SnapshotError("damaged", "the header's version is not a positive integer")
        if version > VERSION:
            raise SnapshotError(
                "newer_format",
                f"format version {version}, written by a newer sidecar (this one reads "
                f"up to {VERSION})",
            )
        if not raw.endswith(b"\n"):
            raise SnapshotError("truncated", "the file ends inside a line (no trailer)")
        body_end = raw.rfind(b"\n", 0, len(raw) - 1) + 1
        trailer = _json_object(raw[body_end:])
        if trailer is None or trailer.get("end") is not True or body_end <= first_end:
            raise SnapshotError("truncated", "the trailer is missing")
        if zlib.crc32(memoryview(raw)[:body_end]) != trailer.get("crc32"):
            raise SnapshotError("damaged", "the checksum does not match the contents")
        tenant = header.get("tenant")
        if not isinstance(tenant, str):
            raise SnapshotError("damaged", "the header names no tenant")
        if self.tenant is not None and tenant != self.tenant:
            raise SnapshotError("foreign_tenant", "written for another tenant")
        written_at: Any = header.get("written_at")
        snapshot = Snapshot(tenant, float(written_at) if _is_number(written_at) else 0.0)
        lines = raw[first_end + 1 : body_end].splitlines()
        count = trailer.get("entries")
        if type(count) is not int or count != len(lines):
            raise SnapshotError("damaged", "the trailer's entry count does not match")
        for start in range(0, len(lines), _LOAD_STEP):
            for number, line in enumerate(lines[start : start + _LOAD_STEP], start + 2):
                self._entry(snapshot, number, line)
            yield
        self.result = snapshot

    def _entry(self, snapshot: Snapshot, number: int, line: bytes) -> None:
        item = _json_object(line)
        if item is None:
            raise SnapshotError("damaged", f"line {number} is not a JSON object")
        name: Any = item.get("k")
        kind = KINDS.get(name) if isinstance(name, str) else None
        ident = item.get("id")
        if kind is None or not is_id(ident):
            raise SnapshotError("damaged", f"line {number} names no known kind and id")
        stored: Any = item.get("e")
        entry = Entry.from_stored(stored, kind)[0]
        if entry is None:
            raise SnapshotError("damaged", f"line {number} holds no stored entry")
        doc = stored["d"]  # from_stored checked: the document (a dict) or None
        if doc is not None and kind.check(doc) is not None:
            raise SnapshotError("damaged", f"line {number} is not a {kind.name} document")
        if not entry.is_servable_stale(self.now):
            snapshot.expired += 1
            return
        snapshot.entries.append((kind, ident, entry))


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def read_snapshot(path: Path, tenant: str | None, now: float | None = None) -> Snapshot:
    """Read and check a snapshot file (``tenant`` ``None``: of any tenant).

    Raises ``SnapshotError`` for a file that cannot be used, ``FileNotFoundError``
    when there is none.
    """
    return parse_snapshot(read_file(path), tenant, now)


def parse_snapshot(raw: bytes, tenant: str | None, now: float | None = None) -> Snapshot:
    """``read_snapshot`` of bytes already read (``now`` decides what has expired)."""
    parser = _Parser(raw, tenant, time.time() if now is None else now)
    for _ in parser.steps():
        pass
    assert parser.result is not None
    return parser.result


def read_file(path: Path) -> bytes:
    """A snapshot file's bytes (``FileNotFoundError`` when there is none). Only a
    regular file is read: a FIFO would hold the read (and the start) forever, a
    device like ``/dev/zero`` never ends. Opened without blocking, so the check is
    made on what was opened."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise SnapshotError("unreadable", exc.strerror or type(exc).__name__) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SnapshotError("unreadable", "not a regular file")
        with open(fd, "rb", closefd=False) as f:
            return f.read()
    except OSError as exc:
        raise SnapshotError("unreadable", exc.strerror or type(exc).__name__) from None
    finally:
        os.close(fd)


# -- where the files are ---------------------------------------------------------------


def worker_file(path: Path, index: int) -> Path:
    """A worker's own file (``SIDECAR_WORKERS``): ``<file>.w<index>``."""
    return path.with_name(f"{path.name}.w{index}")


def snapshot_sources(path: Path) -> list[Path]:
    """Every file a start loads: the file itself and each worker's (of ``path``'s base)."""
    base = path.with_name(_WORKER_SUFFIX.sub("", path.name))
    found = [base]
    with contextlib.suppress(OSError):
        siblings = (
            p
            for p in base.parent.iterdir()
            if p.name.startswith(base.name + ".w") and _WORKER_SUFFIX.search(p.name)
        )
        found += sorted(siblings, key=lambda p: p.name)
    return found


def merge(snapshots: Sequence[Snapshot]) -> list[tuple[Kind, str, Entry]]:
    """The entries of several snapshots, one per document: the latest fetched wins."""
    merged: dict[tuple[str, str], tuple[Kind, str, Entry]] = {}
    for snapshot in snapshots:
        for item in snapshot.entries:
            kind, ident, entry = item
            key = (kind.name, ident)
            held = merged.get(key)
            if held is None or entry.fetched_at > held[2].fetched_at:
                merged[key] = item
    return list(merged.values())


async def read_redis(client: RedisClient, tenant: str, now: float | None = None) -> Snapshot:
    """The tenant's entries as Redis holds them (every kind), for ``snapshot export
    --from-redis``; entries past their stale deadline and unreadable values are left
    out. Read-only: SCAN and MGET."""
    now = time.time() if now is None else now
    keys = Keys(tenant)
    snapshot = Snapshot(tenant, now)
    for kind in KINDS.values():
        names = keys.kind(kind.key)
        prefix = names.entry("").encode()
        found: list[bytes] = []
        # On a cluster scan_iter walks every primary; the tenant's keys share one slot.
        async for key in client.scan_iter(match=names.entry_pattern, count=_REDIS_BATCH):
            found.append(key)
        for start in range(0, len(found), _REDIS_BATCH):
            batch = found[start : start + _REDIS_BATCH]
            values = await client.mget(batch)
            for key, raw in zip(batch, values, strict=True):
                ident = key[len(prefix) :].decode("utf-8", "replace")
                entry = Entry.loads(raw, kind) if isinstance(raw, bytes) else None
                if entry is None or not is_id(ident):
                    continue
                if entry.is_servable_stale(now):
                    snapshot.entries.append((kind, ident, entry))
                else:
                    snapshot.expired += 1
    return snapshot


# -- the sidecar's side ----------------------------------------------------------------


class Snapshotter:
    """Loads the snapshot at start and writes it every interval and at shutdown."""

    def __init__(
        self,
        path: Path,
        *,
        tenant: str,
        interval: float,
        caches: Caches,
        metrics: Metrics,
    ) -> None:
        self.path = path
        self.tenant = tenant
        self.interval = interval
        self.caches = caches
        self.metrics = metrics
        #: Entries installed by the start-up load.
        self.loaded = 0
        self._written_changes: int | None = None
        self._task: asyncio.Task[None] | None = None
        #: The file write in its thread, awaited before another may start.
        self._io: asyncio.Future[int] | None = None
        self._failing = False

    # -- loading ---------------------------------------------------------------------

    async def load(self) -> int:
        """Install the snapshot's entries as the stale fallback; returns how many.

        Never raises for a bad file: it is ignored with one warning line each.
        """
        started = time.perf_counter()
        now = time.time()
        snapshots: list[Snapshot] = []
        expired = absent = 0
        sources = snapshot_sources(self.path)
        for source in sources:
            try:
                snapshot = await self._load_one(source, now)
            except FileNotFoundError:
                absent += 1
                continue
            if snapshot is not None:
                snapshots.append(snapshot)
                expired += snapshot.expired
        if absent == len(sources):
            self.metrics.snapshot_loads.labels("absent").inc()  # the first start
        installed = self._install(merge(snapshots))
        self.loaded = installed
        self._written_changes = self._changes()
        seconds = time.perf_counter() - started
        self.metrics.snapshot_loaded_entries.set(installed)
        self.metrics.snapshot_load_seconds.set(seconds)
        if snapshots:
            log.info(
                "snapshot_loaded",
                extra={
                    "fields": {
                        "files": len(snapshots),
                        "entries": installed,
                        "expired": expired,
                        "seconds": round(seconds, 3),
                    }
                },
            )
        return installed

    async def _load_one(self, path: Path, now: float) -> Snapshot | None:
        """One file's snapshot; ``None`` when it is ignored (``FileNotFoundError``
        when there is none)."""
        try:
            raw = await asyncio.get_running_loop().run_in_executor(None, read_file, path)
            parser = _Parser(raw, self.tenant, now)
            for _ in parser.steps():
                await asyncio.sleep(0)  # the ops listener keeps answering meanwhile
        except SnapshotError as exc:
            self._ignored(path, exc.reason, str(exc))
            return None
        except UNFORESEEN as exc:
            # Whatever a file we did not foresee makes the parser raise: still never a
            # crash at start.
            self._ignored(path, "damaged", f"unreadable contents ({type(exc).__name__})")
            return None
        self.metrics.snapshot_loads.labels("loaded").inc()
        return parser.result

    def _ignored(self, path: Path, reason: Reason, detail: str) -> None:
        self.metrics.snapshot_loads.labels(reason).inc()
        log.warning(
            "snapshot_ignored",
            extra={"fields": {"path": str(path), "reason": reason, "detail": detail}},
        )

    def _install(self, entries: list[tuple[Kind, str, Entry]]) -> int:
        """Put the entries in the in-process layer; how many it holds afterwards (its
        bound may have evicted the first ones of a snapshot larger than it)."""
        for kind, ident, entry in entries:
            cache = self.caches.of_kind(kind)
            memory = cache.memory
            if ident in memory.data or memory.max_entries <= 0:
                continue
            # Never answers alone: the next read revalidates (Redis, then the upstream)
            # and this entry is the stale fallback.
            memory.put(ident, entry, 0.0)
            if cache.on_fetched is not None and entry.account_id is not None:
                cache.on_fetched(ident, entry)  # the account index learns its links
        return sum(len(c.memory) for c in self.caches.all)

    # -- writing ---------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop the periodic writes, then write once more if anything changed."""
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None
        await self._wait_io()
        await self.write_if_changed()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.write_if_changed()
            except Exception:
                # A bug must not end the snapshots for the process's life: counted,
                # logged, tried again next interval.
                self.metrics.snapshot_writes.labels("error").inc()
                log.exception("snapshot_write_crashed")

    def _changes(self) -> int:
        return sum(c.memory.changes for c in self.caches.all)

    async def write_if_changed(self) -> bool:
        """Write the snapshot unless nothing changed since the last one; True if written."""
        changes = self._changes()
        if changes == self._written_changes:
            return False
        if await self.write():
            self._written_changes = changes
            return True
        return False

    async def write(self) -> bool:
        """Encode every servable entry (in slices on the loop) and write the file in a
        thread; False when the write failed (logged once per run of failures)."""
        started = time.perf_counter()
        now = time.time()
        chunks = [header_line(self.tenant, now)]
        entries = 0
        for cache in self.caches.all:
            entries += await self._encode(cache.kind, cache.memory.data, now, chunks)
        await self._wait_io()
        loop = asyncio.get_running_loop()
        self._io = loop.run_in_executor(None, write_file, self.path, chunks, entries)
        try:
            # Shielded: a cancelled writer (shutdown) leaves the thread to finish, and
            # stop() waits for it before the last write.
            size = await asyncio.shield(self._io)
        except OSError as exc:
            self.metrics.snapshot_writes.labels("error").inc()
            if not self._failing:
                self._failing = True
                log.warning(
                    "snapshot_write_failed",
                    extra={"fields": {"path": str(self.path), "error": _describe(exc)}},
                )
            return False
        seconds = time.perf_counter() - started
        m = self.metrics
        m.snapshot_writes.labels("ok").inc()
        m.snapshot_write_seconds.observe(seconds)
        m.snapshot_entries.set(entries)
        m.snapshot_bytes.set(size)
        m.snapshot_last_write.set(time.time())
        if self._failing:
            self._failing = False
            log.info("snapshot_write_recovered", extra={"fields": {"path": str(self.path)}})
        log.debug(
            "snapshot_written",
            extra={"fields": {"entries": entries, "bytes": size, "seconds": round(seconds, 3)}},
        )
        return True

    async def _encode(
        self, kind: Kind, data: dict[str, Entry], now: float, chunks: list[bytes]
    ) -> int:
        """Append ``kind``'s servable entries to ``chunks``, pausing ``_PAUSE_S`` after
        every ``_SLICE_S`` of work: requests wait at most about a slice behind it."""
        # The ids as they are now: the dict's own key list, a C copy (~1 ms per
        # 100,000). Entries are read one by one afterwards, each whole: one that went
        # meanwhile is skipped, one replaced is written as it is by then.
        idents = list(dict.keys(data))
        written = 0
        lines: list[bytes] = []
        clock = time.perf_counter
        deadline = clock() + _SLICE_S
        for start in range(0, len(idents), _STEP):
            for ident in idents[start : start + _STEP]:
                entry = data.get(ident)
                if entry is not None and now < entry.stale_until:
                    lines.append(entry_line(kind, ident, entry))
            if clock() >= deadline:
                written += len(lines)
                chunks.append(b"".join(lines))
                lines = []
                await asyncio.sleep(_PAUSE_S)
                deadline = clock() + _SLICE_S
        written += len(lines)
        if lines:
            chunks.append(b"".join(lines))
        return written

    async def _wait_io(self) -> None:
        if self._io is not None and not self._io.done():
            await asyncio.wait([self._io])
        if self._io is not None and self._io.done() and not self._io.cancelled():
            self._io.exception()  # retrieved: reported by the write that started it
        self._io = None


def _describe(exc: OSError) -> str:
    return f"{type(exc).__name__}: {exc.strerror or exc}"
