"""The shared tier's reads coalesced (``RedisReads``): every entry read issued in one
loop iteration, of any kind, goes to Redis as one ``MGET``, over connections borrowed
from the pool for good."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Final

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection

from ..redis.conn import RedisConn, RedisDown
from ..redis.keys import Keys
from ..redis.url import RedisClient
from ..tasks import cancel_and_wait
from .entry import Entry
from .kinds import Kind

__all__ = ["Judge", "RedisReads"]

#: Keys per MGET; a larger batch is split (each part its own round trip, at once).
_MGET_BATCH: Final = 256
#: Connections borrowed from the pool for the coalesced reads.
_READERS: Final = 4

#: A stored value, its kind, the kind's tenant generation and the epoch read with it
#: (``None`` when missing) -> the entry, expired unless valid (``shared.judge``).
Judge = Callable[[Any, Kind, str | None, str | None], Entry | None]


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else None


class RedisReads:
    """Entry reads coalesced: every ``get`` issued in one loop iteration, of any kind,
    goes to Redis as one ``MGET`` (the tenant's keys share one hash slot, so this
    holds on a cluster too), together with the epoch and the tenant generations of
    the kinds read, so each value is judged (``judge``) against the state it was
    read with.

    The first ``get`` of an iteration schedules the flush with ``call_soon``, which
    runs after every task already ready in that iteration, so the reads of all the
    requests parsed together travel in one round trip.

    The round trips go over up to ``_READERS`` connections borrowed from the pool
    for good (one server or Sentinel; a cluster keeps its own routing): redis-py's
    pool spends more per command on taking, checking and returning a connection
    than the read itself costs (docs/performance.md). A borrowed connection
    carries one read at a time; when every one is busy, the read takes the pool
    path. A failed read closes every idle borrowed connection, since they share
    the failure's cause (a restarted Redis leaves them all stale), and each
    reconnects on its next use, so ``RedisConn``'s one retry meets a fresh one.
    """

    def __init__(self, redis: RedisConn, keys: Keys, pool_size: int, judge: Judge) -> None:
        self.redis = redis
        self.keys = keys
        self._judge = judge
        self._pending: dict[str, tuple[Kind, list[asyncio.Future[Any]]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        client = self.redis.client
        self._pool: ConnectionPool | None = (
            client.connection_pool if isinstance(client, Redis) else None
        )
        #: At most a quarter of the pool, so scripts and the fan-out keep theirs.
        self._max_readers = min(_READERS, pool_size // 4)
        self._readers: list[AbstractConnection] = []
        self._idle: list[AbstractConnection] = []
        self._borrowing = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def borrowed(self) -> int:
        """Connections borrowed from the pool so far (at most ``_READERS``)."""
        return len(self._readers)

    def get(self, kind: Kind, key: str) -> asyncio.Future[Any]:
        """A future for the judged entry at ``key`` (or ``None``); ``RedisDown`` on failure."""
        loop = self._loop
        if loop is None:
            # Kept: on Python 3.11 each get_running_loop() is a getpid() system call.
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        waiting = self._pending.get(key)
        if waiting is not None:
            waiting[1].append(future)
            return future
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending[key] = (kind, [future])
        return future

    def _flush(self) -> None:
        pending, self._pending = self._pending, {}
        loop = self._loop
        assert loop is not None  # get() scheduled this call on it
        keys = list(pending)
        for start in range(0, len(keys), _MGET_BATCH):
            part = {k: pending[k] for k in keys[start : start + _MGET_BATCH]}
            task = loop.create_task(self._read(part))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _read(self, part: dict[str, tuple[Kind, list[asyncio.Future[Any]]]]) -> None:
        kinds = list({kind.key: kind for kind, _ in part.values()}.values())
        keys = [*part, self.keys.epoch, *(self.keys.kind(k.key).tenant_gen for k in kinds)]
        # The operation label counts entries read (one, or a coalesced batch).
        operation = "get" if len(part) == 1 else "mget"
        try:
            values = await self.redis.run(operation, lambda r: self._mget(r, keys))
        except RedisDown as exc:
            for _, futures in part.values():
                for f in futures:
                    if not f.done():
                        f.set_exception(RedisDown(*exc.args))
            return
        n = len(part)
        # Decoded once per batch, not per value.
        epoch = _text(values[n])
        tgens = {kind.key: _text(values[n + 1 + i]) for i, kind in enumerate(kinds)}
        judge = self._judge
        for (kind, futures), raw in zip(part.values(), values, strict=False):
            entry = judge(raw, kind, tgens[kind.key], epoch) if raw is not None else None
            for f in futures:
                if not f.done():
                    f.set_result(entry)

    async def _mget(self, client: RedisClient, keys: list[str]) -> list[Any]:
        """The values of ``keys``, over an idle borrowed connection when there is one."""
        conn = await self._reader()
        if conn is None:
            return list(await client.mget(keys))
        try:
            if not conn.is_connected:
                # Through connect() (as the pool does), which a Sentinel connection
                # overrides to ask for the current master's address first.
                await conn.connect()  # type: ignore[no-untyped-call]
            await conn.send_command("MGET", *keys)
            values = list(await conn.read_response())
        except BaseException:
            # redis-py closed this connection on its way out; the idle ones go too
            # (without waiting for their sockets to close: nothing here may hang).
            for other in list(self._idle):
                await other.disconnect(nowait=True)
            raise
        finally:
            self._idle.append(conn)
        return values

    async def _reader(self) -> AbstractConnection | None:
        """An idle borrowed connection (borrowing one more while below the limit)."""
        if self._idle:
            return self._idle.pop()
        if self._pool is None or self._borrowing + len(self._readers) >= self._max_readers:
            return None
        self._borrowing += 1  # counted across the await: another read may ask meanwhile
        try:
            conn: AbstractConnection = await self._pool.get_connection()  # type: ignore[no-untyped-call]
        finally:
            self._borrowing -= 1
        self._readers.append(conn)
        return conn

    async def close(self) -> None:
        await cancel_and_wait(self._tasks)
        # Closed, not handed back: the pool is closing too (the app's cleanup closes
        # the client next), and taking its locks here could wait on a command stuck
        # in it. Its close skips a connection already closed.
        for conn in self._readers:
            await conn.disconnect(nowait=True)
        self._readers.clear()
        self._idle.clear()
