"""Delivering queued records to the upstream: leases, lanes, backoff (``Deliverer``).

Every sidecar with Redis runs one ``Deliverer``. A lease round every second (at
most a fifth of a lease; ``UsageStore.lease_round``) renews the partitions it
holds, lets go of what exceeds its fair share and takes free ones; a partition
taken is first claimed (``UsageStore.claim``: every pending entry, from a killed
holder too) and its claimed history read back before new entries.

Within a partition, records are grouped into **lanes**, one per (customer, credit
type): a lane sends its records one at a time, in stream order, each only once the
previous one has a final answer; lanes run concurrently (at most
``MAX_SENDING`` upstream calls per sidecar). So order holds per (customer, credit
type) and one customer's retries never hold up another's.

A record is retried until the upstream answers it finally (``records.verdict``):
per record with exponential backoff and full jitter up to
``SIDECAR_USAGE_RETRY_MAX``, honouring ``Retry-After``. When the upstream as a whole
fails (no answer, 429, 502-504, 401/403), the ``Pacer`` pauses every lane of the
sidecar; after the pause one probe goes alone, and the others follow its answer.

Fencing: a holder sends only while its lease has at least the upstream timeout
plus a second to run, so by the time another sidecar can take the partition, every
call this one made has been answered or given up. Its ``finish`` is refused once
the lease is gone, and the new holder sends the record again: the upstream answers
a repeated key with the first answer (``Idempotent-Replayed``), never a second
deduction. What this cannot cover: a process paused (SIGSTOP, a VM freeze) between
that check and its request reaching the upstream; docs/operations.md says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from ..errors import UpstreamError
from ..http.operations import OPERATIONS
from ..metrics import Metrics
from ..redis.conn import RedisDown
from ..tasks import cancel_and_wait
from ..upstream import VellumClient
from .records import MAX_ANSWER_BYTES, PARTITIONS, retry_after_seconds, verdict
from .store import Entry, UsageStore

__all__ = ["MAX_SENDING", "WINDOW", "Deliverer", "Pacer"]

log = logging.getLogger("sidecar.usage")

#: Upstream calls one sidecar has under way at once, over all its partitions.
MAX_SENDING: Final = 32
#: Entries of one partition read but not finished, at most.
WINDOW: Final = 256
#: The first backoff step (seconds); it doubles per failure up to the retry maximum.
BASE_DELAY: Final = 0.25
#: How often a holder looks for entries other sidecars accepted: soon after the last
#: ones, then less often while none come (its own accepts wake it at once).
POLL: Final = 0.2
IDLE_POLL: Final = 1.0
#: How often each sidecar reads the fleet's queue for its metrics (seconds).
STATS_EVERY: Final = 5.0

_CONSUME: Final = next(op for op in OPERATIONS if op.name == "consume_credits")


def backoff(attempt: int, cap: float, retry_after: float | None = None) -> float:
    """Seconds before attempt ``attempt + 1``: full jitter over ``BASE_DELAY * 2**(attempt
    - 1)`` (at most ``cap``), and never less than ``retry_after``."""
    ceiling = min(cap, BASE_DELAY * 2 ** min(attempt - 1, 30))
    delay = random.uniform(ceiling / 2, ceiling)
    return max(delay, retry_after) if retry_after is not None else delay


class Pacer:
    """The pace of one sidecar's deliveries while the upstream as a whole fails.

    Closed (no failure): every lane sends. After an upstream-wide failure every lane
    waits out a pause (backoff, or ``Retry-After`` if longer); then one lane probes
    alone and the rest wait for its answer: any answer that is not upstream-wide
    closes the pacer, another failure pauses again for longer.
    """

    def __init__(self, cap: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.cap = cap
        self.failures = 0
        self._clock = clock
        self._until = 0.0
        self._probing = False
        self._changed = asyncio.Event()

    @property
    def paused(self) -> bool:
        return self.failures > 0

    async def turn(self) -> None:
        """Wait until this caller may send (it then owes ``answered``, ``failed`` or
        ``abandoned``)."""
        while True:
            now = self._clock()
            if now < self._until:
                await asyncio.sleep(self._until - now)
                continue
            if not self.failures:
                return
            if not self._probing:
                self._probing = True
                return
            changed = self._changed
            await changed.wait()

    def answered(self) -> None:
        """The upstream answered (not an upstream-wide failure): everyone may send."""
        if not self.failures and not self._probing:
            return
        if self.failures:
            log.info("usage_delivery_resumed", extra={"fields": {"failures": self.failures}})
        self.failures = 0
        self._until = 0.0
        self._notify()

    def failed(self, retry_after: float | None) -> float:
        """An upstream-wide failure: pause everyone; returns the pause (seconds)."""
        self.failures += 1
        pause = backoff(self.failures, self.cap, retry_after)
        self._until = max(self._until, self._clock() + pause)
        if self.failures == 1:
            log.warning("usage_delivery_paused", extra={"fields": {"pause_s": round(pause, 3)}})
        self._notify()
        return pause

    def abandoned(self) -> None:
        """A send given up without an answer (cancelled): another may probe."""
        self._notify()

    def _notify(self) -> None:
        self._probing = False
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()


@dataclass(eq=False)
class Partition:
    """One held partition: what is read and not finished, by lane."""

    index: int
    valid_until: float
    """Loop time until which the lease is known to be held."""
    cursor: str = "0-0"
    """Where reading resumes: an id while reading the claimed history, then ``>``."""
    claimed: bool = False
    held: int = 0
    """Entries read and not finished (in lanes)."""
    behind: bool = False
    """Redis held more pending entries than ``held`` at the last lease round."""
    reading: bool = False
    """A read of this partition is under way (its entries not yet in ``lanes``)."""
    reads: int = 0
    """Reads begun (``_resync`` sees whether one began while it counted)."""
    lanes: dict[tuple[str, str], deque[Entry]] = field(default_factory=dict)
    tasks: dict[tuple[str, str], asyncio.Task[None]] = field(default_factory=dict)
    claim_task: asyncio.Task[None] | None = None
    renewed: asyncio.Event = field(default_factory=asyncio.Event)

    def renew(self, valid_until: float) -> None:
        self.valid_until = valid_until
        renewed, self.renewed = self.renewed, asyncio.Event()
        renewed.set()


class Deliverer:
    """One sidecar's share of the fleet's deliveries (see the module docstring)."""

    def __init__(
        self,
        store: UsageStore,
        upstream: VellumClient,
        metrics: Metrics,
        *,
        holder: str,
        lease: float,
        upstream_timeout: float,
        retry_max: float,
    ) -> None:
        self.store = store
        self.upstream = upstream
        self.metrics = metrics
        self.holder = holder
        self.lease = lease
        self._lease_ms = int(lease * 1000)
        #: A round a second (at most a fifth of the lease): a sidecar that lets go
        #: (SIGTERM) or dies is replaced within a second of its leases ending.
        self._round_every = min(lease / 5, 1.0)
        self._last_stats = -STATS_EVERY
        self._timeout = upstream_timeout
        #: A send needs this much of its lease left (its timeout, and a second).
        self._margin = upstream_timeout + 1.0
        self.retry_max = retry_max
        self.pacer = Pacer(retry_max)
        self.partitions: dict[int, Partition] = {}
        self._first = zlib.crc32(holder.encode()) % PARTITIONS
        self._sending = asyncio.Semaphore(MAX_SENDING)
        self._claims = asyncio.Semaphore(1)
        self._wake = asyncio.Event()
        self._poll = POLL
        self._tasks: list[asyncio.Task[None]] = []
        metrics.usage_partitions.set_function(lambda: len(self.partitions))

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._rounds()), loop.create_task(self._reader())]

    async def stop(self) -> None:
        """Stop delivering and let go of every lease, so another sidecar takes over now
        rather than when the leases end. Calls under way are abandoned: their records
        stay pending and are sent again by the next holder (same key, applied once)."""
        await cancel_and_wait(self._tasks)
        for index in list(self.partitions):
            await self._stop(index)
        with contextlib.suppress(RedisDown, TimeoutError):
            async with asyncio.timeout(1.0):
                await self.store.release(self.holder)

    def wake(self, partition: int) -> None:
        """A record was just queued in ``partition``: read it now if it is ours."""
        if partition in self.partitions:
            self._wake.set()

    # -- leases -------------------------------------------------------------------------

    async def _rounds(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await self._round(started)
            except Exception:  # a bug must not end deliveries for good: log, go on
                log.exception("usage_round_failed")
            await asyncio.sleep(max(self._round_every - (loop.time() - started), 0.05))

    async def _round(self, started: float) -> None:
        """One lease round: renew, shed, take (``UsageStore.lease_round``); stop what was
        lost, start what was taken; resync; every ``STATS_EVERY``, the queue's metrics."""
        loop = asyncio.get_running_loop()
        try:
            found = await self.store.lease_round(self.holder, self._lease_ms, self._first)
        except RedisDown:
            # Nothing renewed: a lease that may have ended elsewhere ends here too.
            for index, held in list(self.partitions.items()):
                if loop.time() >= held.valid_until:
                    await self._stop(index)
        else:
            valid = started + self.lease
            for index in list(self.partitions):
                if index not in found.kept:
                    await self._stop(index)  # lost, or lost and taken again: claim anew
            for index in found.kept | found.taken:
                part = self.partitions.get(index)
                if part is None:
                    self._start(index, valid)
                else:
                    part.renew(valid)
            await self._resync()
        if loop.time() - self._last_stats >= STATS_EVERY:
            self._last_stats = loop.time()
            with contextlib.suppress(RedisDown):
                await self._stats()

    async def _stats(self) -> None:
        """The fleet's queue for the metrics: records waiting, the oldest one's age."""
        stats = await self.store.stats()
        self.metrics.usage_queued.set(stats.queued)
        oldest = 0.0 if stats.oldest_ms is None else (stats.now_ms - stats.oldest_ms) / 1000
        self.metrics.usage_oldest.set(max(oldest, 0.0))

    async def _resync(self) -> None:
        """Claim a partition again when Redis holds more pending entries for it than this
        sidecar has in memory, twice in a row: Redis went back in time (restored from an
        older snapshot, a lagging replica promoted) and entries this sidecar finished, or
        never read, are pending again. A partition with a read under way while the count
        is taken is not judged (the read's entries are pending in Redis and not yet here)."""
        quiet = [p for p in self.partitions.values() if p.claimed and not p.reading]
        if not quiet:
            return
        reads = {p.index: p.reads for p in quiet}
        try:
            pending = await self.store.pending([p.index for p in quiet])
        except RedisDown:
            return
        for part in quiet:
            if part.reading or part.reads != reads[part.index]:
                continue  # a read began meanwhile: judge it next round
            behind = pending[part.index] > part.held
            if behind and part.behind and self.partitions.get(part.index) is part:
                log.warning(
                    "usage_partition_resync",
                    extra={"fields": {"partition": part.index, "pending": pending[part.index],
                                      "held": part.held}},
                )  # fmt: skip
                valid = part.valid_until
                await self._stop(part.index)
                self._start(part.index, valid)
            else:
                part.behind = behind

    def _start(self, index: int, valid_until: float) -> None:
        part = Partition(index, valid_until)
        self.partitions[index] = part
        part.claim_task = asyncio.get_running_loop().create_task(self._claim(part))

    async def _stop(self, index: int) -> None:
        part = self.partitions.pop(index, None)
        if part is None:
            return
        tasks = [*part.tasks.values(), *([part.claim_task] if part.claim_task else [])]
        await cancel_and_wait(tasks)

    async def _claim(self, part: Partition) -> None:
        """Take over the partition's pending entries before reading (invariant 2)."""
        attempt = 0
        while True:
            try:
                # One claim at a time: taking all 16 partitions at start must not open 16
                # Redis connections at once (TLS handshakes timed the cache's reads out).
                async with self._claims:
                    claimed = await self.store.claim(part.index, self.holder, self._lease_ms)
                break
            except RedisDown:
                pass
            except Exception:
                log.exception("usage_claim_failed")
            attempt += 1
            await asyncio.sleep(backoff(attempt, 1.0))
        if claimed:
            log.info(
                "usage_partition_claimed",
                extra={"fields": {"partition": part.index, "pending": claimed}},
            )
        part.claimed = True
        self._wake.set()

    # -- reading ------------------------------------------------------------------------

    async def _reader(self) -> None:
        while True:
            try:
                await self._read_once()
            except Exception:  # a bug must not end deliveries for good: log, go on
                log.exception("usage_read_failed")
                await self._sleep(POLL)

    async def _read_once(self) -> None:
        """One read of every claimed partition with room, into the lanes; a sleep when
        nothing came."""
        parts = [p for p in self.partitions.values() if p.claimed and p.held < WINDOW]
        if not parts:
            await self._sleep(POLL)
            return
        wanted = [(p.index, p.cursor, WINDOW - p.held) for p in parts]
        for reading in parts:
            reading.reading = True
            reading.reads += 1
        try:
            entries = await self.store.read(self.holder, wanted)
        except RedisDown:
            await self._sleep(POLL)
            return
        finally:
            for reading in parts:
                reading.reading = False
        got = {p.index: 0 for p in parts}
        for entry in entries:
            part = self.partitions.get(entry.partition)
            if part is None or part not in parts:
                continue  # stopped (or stopped and started again) meanwhile
            got[entry.partition] += 1
            if part.cursor != ">":
                part.cursor = entry.id
            self._add(part, entry)
        for part in parts:
            if part.cursor != ">" and not got[part.index]:
                part.cursor = ">"  # the claimed history is read: now new entries
        if entries:
            self._poll = POLL
        elif all(p.cursor == ">" for p in parts):
            await self._sleep(self._poll)
            self._poll = min(self._poll * 2, IDLE_POLL)

    async def _sleep(self, seconds: float) -> None:
        """Up to ``seconds``, or until woken; the wake is consumed (an event left set would
        return at once, and the reader would spin without ever yielding the loop)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        self._wake.clear()

    def _add(self, part: Partition, entry: Entry) -> None:
        record = entry.record
        lane = (record.customer, record.credit_type) if record is not None else ("", "")
        queue = part.lanes.get(lane)
        if queue is None:
            queue = part.lanes[lane] = deque()
            part.tasks[lane] = asyncio.get_running_loop().create_task(self._lane(part, lane, queue))
        queue.append(entry)
        part.held += 1

    # -- delivering ---------------------------------------------------------------------

    async def _lane(self, part: Partition, lane: tuple[str, str], queue: deque[Entry]) -> None:
        """One (customer, credit type)'s records, one at a time, in stream order."""
        try:
            while queue:
                try:
                    delivered = await self._deliver(part, queue[0])
                except Exception:  # unforeseen: the same record again, later (order kept)
                    log.exception("usage_lane_failed")
                    await asyncio.sleep(self.retry_max)
                    continue
                if not delivered:
                    # The lease is gone: nothing more is sent from this partition
                    # until the next round stops it.
                    part.valid_until = 0.0
                    await asyncio.Event().wait()
                queue.popleft()
                part.held -= 1
                self._wake.set()
        finally:
            if part.lanes.get(lane) is queue:
                del part.lanes[lane]
                part.tasks.pop(lane, None)

    async def _until_safe(self, part: Partition) -> None:
        """Wait until the lease outlasts a send by the margin (fencing, see above)."""
        loop = asyncio.get_running_loop()
        while loop.time() > part.valid_until - self._margin:
            renewed = part.renewed
            await renewed.wait()

    async def _deliver(self, part: Partition, entry: Entry) -> bool:
        """Send until a final answer, then finish; False when the lease was lost."""
        record = entry.record
        state, status, answer, replayed = "rejected", 0, b"", False
        attempt = 0
        while record is not None:
            await self._until_safe(part)
            resp = None
            error = ""
            async with self._sending:
                await self.pacer.turn()
                try:
                    resp = await self.upstream.send_once(
                        _CONSUME.name,
                        _CONSUME.method,
                        _CONSUME.segments(
                            {"customer": record.customer, "credit_type": record.credit_type}
                        ),
                        body=record.body(),
                        timeout=self._timeout,
                    )
                except UpstreamError as exc:
                    error = exc.code
                except Exception:  # unforeseen: counted as no answer, retried
                    log.exception("usage_send_failed")
                    error = "internal_error"
                except BaseException:
                    self.pacer.abandoned()  # cancelled: no answer, someone else may probe
                    raise
            status = resp.status if resp is not None else 0
            judged = verdict(resp.status if resp is not None else None)
            retry_after = None
            if resp is not None:
                retry_after = retry_after_seconds(resp.headers.get("Retry-After"), time.time())
            if judged.upstream_wide:
                self.pacer.failed(retry_after)
            else:
                self.pacer.answered()
            if judged.final:
                state = judged.state
                if resp is not None and len(resp.body) <= MAX_ANSWER_BYTES:
                    answer = resp.body
                replayed = resp is not None and resp.headers.get("Idempotent-Replayed") == "true"
                break
            attempt += 1
            self.metrics.usage_retries.labels(judged.reason).inc()
            with contextlib.suppress(RedisDown):
                await self.store.note_attempt(entry, error or str(status))
            await asyncio.sleep(backoff(attempt, self.retry_max, retry_after))
        return await self._finish(part, entry, state, status, answer, replayed)

    async def _finish(
        self, part: Partition, entry: Entry, state: str, status: int, answer: bytes,
        replayed: bool,
    ) -> bool:  # fmt: skip
        attempt = 0
        while True:
            try:
                done = await self.store.finish(self.holder, entry, state, status, answer, replayed)
                break
            except RedisDown:
                pass  # until Redis answers, or the lease ends (the round cancels this)
            except Exception:
                log.exception("usage_finish_failed")
            attempt += 1
            await asyncio.sleep(backoff(attempt, 1.0))
        if not done:
            log.info(
                "usage_lease_lost",
                extra={"fields": {"partition": part.index, "entry": entry.id}},
            )
            return False
        record = entry.record
        if record is None:
            return True
        self.metrics.usage_records.labels(state).inc()
        fields = {
            "idempotencyKey": record.key,
            "customerId": record.customer,
            "creditTypeId": record.credit_type,
            "amount": record.amount,
            "status": status,
            "replayed": replayed,
        }
        level = logging.DEBUG if state == "delivered" else logging.INFO
        log.log(level, "usage_" + state, extra={"fields": fields})
        return True
