"""Invalidation: expire entries in the shared tier, fan out to every sidecar, learn
account links, keep the epoch.

An invalidation marks entries for revalidation, never writes new data, so
duplicated or reordered messages are harmless, and it never destroys the stale
fallback (``shared.py``, invariant 1). The sidecar that issues it expires the
shared tier's entries (taking the fill lock away from fills in flight anywhere,
so they cannot store their older answer as valid), publishes one message on the
tenant's channel in the same script, and expires its own in-process entries at
once. Every other sidecar expires its in-process entries when the message
arrives.

**Axes.** Every drop names its axes (``kinds.Axis``: ``entitlements``,
``flags``; both unless narrowed) and applies to each kind of document of those
axes: a customer's drop to the per-customer kinds, a tenant-wide drop to every
kind of the axes (the global flags included). The fan-out message carries the
axes, so every sidecar drops exactly those. Watchers (``watch``) hear of every
drop applied here, issued or received, which is how the OFREP event streams
learn of changes.

**While Redis does not answer** an invalidation is applied to this process at
once and its Redis part (deletes, generation bumps, the fan-out message) is
queued, to be applied the moment Redis answers again (``RedisConn.on_reconnect``).
The queue holds targets, not a log: invalidations are idempotent, so a customer
dropped twice while Redis was away is one entry, and an account is resolved to its
customers only when Redis (which holds what every sidecar learnt) answers. It is
bounded by ``QUEUE_LIMIT`` targets; a target that does not fit collapses the queue
into one tenant-wide drop on every axis.

Redis pub/sub is at-most-once: a sidecar that was disconnected may have missed
messages, so every (re)subscribe expires the whole in-process layer.

**The epoch.** A drop acknowledged while Redis did not answer lives only in the
queue of the sidecar that took it, and dies with that process; and Redis itself
can come back older (a restart from its last snapshot, a failover to a lagging
replica, a FLUSHALL). So a sidecar that lost Redis or the fan-out stops trusting
what Redis holds (``RedisTier.distrust``: its stored entries are only the stale
fallback) until it has renewed the tenant's epoch, which expires every stored
entry for the whole fleet at once (one renewal per outage: not if another
sidecar renewed it after this one's last contact). The health check (every
``SIDECAR_CHECK_INTERVAL``) also renews it when Redis's drop sequence went
backwards, and notices a missing epoch (recreated by the check). Every sidecar
that sees the epoch change expires its in-process layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any, Final, Literal

import orjson
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterPubSub, RedisCluster

from ..metrics import Metrics
from ..redis.conn import RedisConn, RedisDown, lost_connection
from ..redis.url import REDIS_ERRORS
from ..tasks import cancel_and_wait
from .cache import Caches, DocumentCache
from .entry import Entry
from .kinds import AXES, Axis
from .shared import Check

__all__ = ["QUEUE_LIMIT", "DropWatcher", "Invalidator", "Scope"]

log = logging.getLogger("sidecar.invalidation")

Scope = Literal["customer", "account", "tenant"]
#: Invalidation targets (customers, accounts, the tenant) queued while Redis is down.
QUEUE_LIMIT: Final = 10_000

#: Health checks whose clock offsets give the baseline a check's wait is measured against.
_OFFSET_WINDOW: Final = 40
#: Customers per script when the queue is applied.
_DRAIN_BATCH: Final = 500
_MAX_LOCAL_LINKS: Final = 100_000


class _Resubscribe(ConnectionError):
    """The server ended our shard-channel subscription (slot migration, failover)."""


class _Stalled(Exception):
    """The subscribed connection did not answer a PING in time (a hung Redis)."""


_LISTEN_ERRORS: Final[tuple[type[BaseException], ...]] = (*REDIS_ERRORS, _Resubscribe, _Stalled)
_HEARTBEAT: Final = b"vellum-sidecar-heartbeat"


async def _ping(pubsub: PubSub) -> None:
    """PING down the subscribed connection(s); the PONG comes back as a message."""
    if isinstance(pubsub, ClusterPubSub):
        # Sharded subscriptions live on per-node connections (one: the tenant's shard).
        for node in list(pubsub.node_pubsub_mapping.values()):
            await node.ping(_HEARTBEAT)
    else:
        await pubsub.ping(_HEARTBEAT)


#: Told of each drop applied on this sidecar: the customers (``None``: everyone)
#: and the axes. Called synchronously; it must not block.
DropWatcher = Callable[[Sequence[str] | None, tuple[Axis, ...]], None]


class _Pending:
    """Invalidations waiting for Redis: each target with the axes it drops, coalesced."""

    __slots__ = ("accounts", "customers", "tenant")

    def __init__(self) -> None:
        self.customers: dict[str, set[Axis]] = {}
        self.accounts: dict[str, set[Axis]] = {}
        self.tenant: set[Axis] = set()

    def __len__(self) -> int:
        return len(self.customers) + len(self.accounts) + (1 if self.tenant else 0)

    def add(self, scope: Scope, target: str, axes: Collection[Axis], limit: int) -> bool:
        """Queue one target; False when it did not fit and the queue collapsed instead."""
        if scope == "tenant":
            self.tenant.update(axes)
            # A tenant-wide drop covers every customer and account on its axes.
            for table in (self.customers, self.accounts):
                for key in list(table):
                    table[key].difference_update(axes)
                    if not table[key]:
                        del table[key]
            return True
        remaining = set(axes) - self.tenant
        if not remaining:
            return True
        table = self.customers if scope == "customer" else self.accounts
        queued = table.get(target)
        if queued is not None:
            queued.update(remaining)
            return True
        if len(self) >= limit:
            self.customers.clear()
            self.accounts.clear()
            self.tenant = set(AXES)
            return False
        table[target] = remaining
        return True


class Invalidator:
    def __init__(
        self,
        caches: Caches,
        redis: RedisConn | None,
        metrics: Metrics,
        *,
        sidecar_id: str,
        link_ttl: float,
        queue_limit: int = QUEUE_LIMIT,
        heartbeat: float = 0.25,
        stall_after: float = 0.5,
    ) -> None:
        self.caches = caches
        self.tier = caches.tier
        self.redis = redis
        self.metrics = metrics
        self.sidecar_id = sidecar_id
        self.queue_limit = queue_limit
        self._link_ttl = int(link_ttl)
        # account -> customers learnt from writes, for memory-only mode and while
        # Redis is down (bounded LRU of accounts).
        # One customer (the usual case) is kept as the string itself, not a set of
        # one: ~200 bytes less per account.
        self._links: OrderedDict[str, str | set[str]] = OrderedDict()
        self._listener: asyncio.Task[None] | None = None
        self._pending = _Pending()
        self._drainer: asyncio.Task[None] | None = None
        #: Set while the fan-out subscription is confirmed: subscribed and answering
        #: heartbeats (the coherent in-process layer and readiness follow it).
        self.subscribed = asyncio.Event()
        self._heartbeat = heartbeat
        self._stall_after = stall_after
        self._watchers: list[DropWatcher] = []
        #: The epoch this sidecar last saw; the highest drop sequence number it saw;
        #: Redis's clock at its last successful check (``None`` before the first).
        self.epoch: str | None = None
        self._seen_seq = 0
        self._last_contact_ms: int | None = None
        #: The outage since the last good check lost a connection (so Redis may have
        #: restarted or failed over, and drops queued meanwhile may be gone): the
        #: recovery renews the epoch. After a timeout the recovery's check renews it
        #: only if no sidecar checked meanwhile (Redis stalled for all, not for us).
        self._lost_connection = False
        #: Redis's clock minus ours at sending, per recent check: the smallest is the
        #: baseline a check's wait in Redis is measured against.
        self._offsets: deque[int] = deque(maxlen=_OFFSET_WINDOW)
        self._renewing: asyncio.Lock = asyncio.Lock()
        if redis is not None:
            metrics.fanout_state.follow(lambda: "ok" if self.subscribed.is_set() else "down")
            redis.on_reconnect(self._redis_answers)
            redis.on_down(self._distrust)
        # A fetched document's account: learnt here, and added to the account's set
        # in Redis by the fill's own store (no round trip of its own).
        caches.entitlements.on_fetched = self._learn_from_entry
        caches.entitlements.link_ttl = self._link_ttl
        metrics.invalidations_queued.set(0)

    @property
    def queued(self) -> int:
        """Invalidation targets waiting for Redis."""
        return len(self._pending)

    def watch(self, watcher: DropWatcher) -> Callable[[], None]:
        """Call ``watcher`` on every drop applied here; returns the function that stops it."""
        self._watchers.append(watcher)
        return lambda: self._watchers.remove(watcher)

    # -- issuing -----------------------------------------------------------------

    async def customers(
        self,
        customers: Sequence[str],
        *,
        source: str,
        scope: Scope = "customer",
        axes: Collection[Axis] = AXES,
    ) -> bool:
        """Drop these customers on ``axes`` on every sidecar.

        Returns whether the shared tier and the other sidecars were reached now:
        False when Redis could not be written, in which case this sidecar dropped
        them and the rest is queued until Redis answers.
        """
        if not customers:
            return True
        axes = frozenset(axes)
        self.metrics.invalidations.labels(scope, source).inc()
        self._drop_here(customers, axes)
        try:
            await self._customers_shared(customers, axes)
        except RedisDown:
            self._enqueue("customer", customers, axes)
            return False
        return True

    async def account(
        self, account: str, *, source: str, axes: Collection[Axis] = AXES
    ) -> tuple[Scope, bool]:
        """Drop an account's known customers; everything for the tenant when none are known.

        Returns the scope applied and whether Redis was reached now (see ``customers``).
        While Redis is down, the customers this sidecar knows (everyone, when it
        knows none) are dropped here and the account is queued: it is resolved
        again, with what Redis knows, when Redis answers.
        """
        axes = frozenset(axes)
        known = self._known_members(account)
        try:
            known |= await self.tier.members(account)
        except RedisDown:
            self.metrics.invalidations.labels("account", source).inc()
            self._drop_here(sorted(known) if known else None, axes)
            self._enqueue("account", [account], axes)
            return "account", False
        if not known:
            return "tenant", await self.tenant(source=source, axes=axes)
        shared = await self.customers(sorted(known), source=source, scope="account", axes=axes)
        return "account", shared

    async def tenant(self, *, source: str, axes: Collection[Axis] = AXES) -> bool:
        """Drop everything for the tenant on ``axes`` on every sidecar (see ``customers``)."""
        axes = frozenset(axes)
        self.metrics.invalidations.labels("tenant", source).inc()
        self._drop_here(None, axes)
        try:
            await self._tenant_shared(axes)
        except RedisDown:
            self._enqueue("tenant", [""], axes)
            return False
        return True

    def _drop_here(
        self, customers: Sequence[str] | None, axes: Collection[Axis], *, precaution: bool = False
    ) -> None:
        """Expire ``customers`` (``None``: everyone) on ``axes`` in this process only
        (an explicit drop, or a ``precaution``), and tell the watchers."""
        for cache in self._caches(axes, customers):
            if precaution:
                cache.expire_local()
            else:
                cache.drop_local(customers)
        ordered = _ordered(axes)
        for watcher in list(self._watchers):
            try:
                watcher(customers, ordered)
            except Exception:
                log.exception("drop_watcher_failed")

    def _caches(
        self, axes: Collection[Axis], customers: Sequence[str] | None
    ) -> list[DocumentCache]:
        """The caches a drop applies to: a customer's drop leaves the tenant-wide kinds."""
        return [c for c in self.caches.of(axes) if customers is None or c.kind.per_customer]

    # -- the shared tier's part ------------------------------------------------------

    async def _customers_shared(self, customers: Sequence[str], axes: frozenset[Axis]) -> None:
        kinds = [c.kind for c in self._caches(axes, customers)]
        message = self._message("customer", list(customers), axes)
        self._saw_seq(await self.tier.expire_customers(kinds, customers, message))

    async def _tenant_shared(self, axes: frozenset[Axis]) -> None:
        kinds = [c.kind for c in self._caches(axes, None)]
        message = self._message("tenant", None, axes)
        self._saw_seq(await self.tier.expire_tenant(kinds, message))

    def _message(self, scope: str, customers: list[str] | None, axes: Collection[Axis]) -> bytes:
        return orjson.dumps(
            {
                "scope": scope,
                "customers": customers,
                "axes": sorted(axes),
                "origin": self.sidecar_id,
                "at": time.time(),
            }
        )

    # -- the queue (Redis down) ----------------------------------------------------

    def _enqueue(self, scope: Scope, targets: Iterable[str], axes: frozenset[Axis]) -> None:
        overflowed = False
        for target in targets:
            overflowed |= not self._pending.add(scope, target, axes, self.queue_limit)
        if overflowed:
            self.metrics.invalidations_queue_overflows.inc()
            log.warning(
                "invalidation_queue_overflow",
                extra={"fields": {"limit": self.queue_limit, "now": "tenant-wide drop"}},
            )
        self.metrics.invalidations_queued.set(len(self._pending))
        if self.redis is not None and self.redis.state == "ok":
            # Redis answers but this call failed (a burst took every connection):
            # no reconnect will come, so the drain retries on its own.
            self._kick()

    async def _redis_answers(self) -> None:
        """``RedisConn`` reconnect callback: apply the queue in the background."""
        self._kick()

    def _kick(self) -> None:
        if len(self._pending) and (self._drainer is None or self._drainer.done()):
            self._drainer = asyncio.get_running_loop().create_task(self._drain())

    async def drained(self) -> None:
        """Wait for a drain in progress (tests, shutdown)."""
        if self._drainer is not None:
            await asyncio.gather(self._drainer, return_exceptions=True)

    async def _drain(self) -> None:
        redis = self.redis
        assert redis is not None
        delay = 0.05
        while len(self._pending):
            if redis.state == "ok" and await self._apply_queue():
                delay = 0.05
                continue
            if redis.state != "ok":
                return  # the next reconnect starts the next drain
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _apply_queue(self) -> bool:
        """Apply the queued invalidations to the shared tier and fan them out.

        Each part is dropped here again once Redis has it: a read between Redis
        answering and this drain may have brought an older entry back from Redis.
        Returns False when Redis failed; what was not applied is queued again.
        """
        pending, self._pending = self._pending, _Pending()
        applied = 0
        try:
            if pending.tenant:
                axes = frozenset(pending.tenant)
                await self._tenant_shared(axes)
                self._drop_here(None, axes)
                pending.tenant = set()
                applied += 1
            for account, account_axes in list(pending.accounts.items()):
                axes = frozenset(account_axes)
                members = self._known_members(account) | await self.tier.members(account)
                if members:
                    for chunk in _chunks(sorted(members), _DRAIN_BATCH):
                        await self._customers_shared(chunk, axes)
                        self._drop_here(chunk, axes)
                else:
                    await self._tenant_shared(axes)
                    self._drop_here(None, axes)
                del pending.accounts[account]
                applied += 1
            by_axes: dict[frozenset[Axis], list[str]] = {}
            for customer, customer_axes in pending.customers.items():
                by_axes.setdefault(frozenset(customer_axes), []).append(customer)
            for axes, customers in by_axes.items():
                for chunk in _chunks(customers, _DRAIN_BATCH):
                    await self._customers_shared(chunk, axes)
                    self._drop_here(chunk, axes)
                    for c in chunk:
                        del pending.customers[c]
                    applied += len(chunk)
        except RedisDown:
            self._requeue(pending)
            return False
        finally:
            self.metrics.invalidations_queue_applied.inc(applied)
            self.metrics.invalidations_queued.set(len(self._pending))
            if applied:
                log.info("invalidation_queue_applied", extra={"fields": {"targets": applied}})
        return True

    def _requeue(self, pending: _Pending) -> None:
        overflowed = False
        if pending.tenant:
            self._pending.add("tenant", "", pending.tenant, self.queue_limit)
        for account, axes in pending.accounts.items():
            overflowed |= not self._pending.add("account", account, axes, self.queue_limit)
        for customer, axes in pending.customers.items():
            overflowed |= not self._pending.add("customer", customer, axes, self.queue_limit)
        if overflowed:
            self.metrics.invalidations_queue_overflows.inc()

    # -- account index -----------------------------------------------------------

    async def link(self, account: str, customer: str) -> None:
        """Remember that ``customer`` belongs to ``account`` (learnt from a call or a document)."""
        if not account or not customer:
            return
        if self._link_here(account, customer):
            with contextlib.suppress(RedisDown):
                await self.tier.link(account, customer, self._link_ttl)

    def _link_here(self, account: str, customer: str) -> bool:
        """Remember the link in this process; True when it was not known."""
        links = self._links
        members = links.get(account)
        if members is None:
            links[account] = customer
            while len(links) > _MAX_LOCAL_LINKS:
                links.popitem(last=False)
            return True
        links.move_to_end(account)
        if isinstance(members, str):
            if members == customer:
                return False
            links[account] = {members, customer}
            return True
        if customer in members:
            return False
        members.add(customer)
        return True

    def _known_members(self, account: str) -> set[str]:
        """The account's customers this sidecar learnt (links and cached documents)."""
        cached = self.caches.entitlements.memory.customers_of(account)
        members = self._links.get(account)
        if members is None:
            return cached
        return cached | ({members} if isinstance(members, str) else members)

    def _learn_from_entry(self, customer: str, entry: Entry) -> None:
        """``DocumentCache.on_fetched``: the fill's store already told Redis."""
        if entry.account_id is not None:
            self._link_here(entry.account_id, customer)

    # -- the epoch -----------------------------------------------------------------

    def _distrust(self, exc: BaseException) -> None:
        """Redis or the fan-out was lost (``RedisConn.on_down``, the listener): what
        Redis holds is only the fallback here until a check succeeds again."""
        self.tier.distrust()
        self._lost_connection |= lost_connection(exc)

    def _saw_seq(self, seq: int) -> None:
        if seq > self._seen_seq:
            self._seen_seq = seq

    async def check(self) -> Check | None:
        """One health check of the shared tier (``HealthMonitor``, every
        ``SIDECAR_CHECK_INTERVAL``): Redis's writability for ``/readyz``; a new epoch
        (made by this check because Redis lost it or went back in time, or renewed
        by another sidecar: the in-process layer expires); and the renewal this
        sidecar owes after an outage. ``None`` when Redis did not answer."""
        floor = self._seen_seq  # taken before the call: a drop seen later may be newer
        sent_ms = int(time.time() * 1000)
        offset = min(self._offsets) if self._offsets else None
        lost = not self.tier.trusted  # this sidecar lost Redis since its last good check
        try:
            check = await self.tier.check(floor, self._epoch_message(), sent_ms, offset, lost)
        except RedisDown:
            return None
        self._offsets.append(check.now_ms - sent_ms)
        self._checked(check)
        if not self.tier.trusted:
            await self._renew()
        else:
            self._last_contact_ms = check.now_ms
        return check

    def _checked(self, check: Check) -> None:
        """What a health check found: writability, the epoch it made, the one it saw."""
        redis = self.redis
        if redis is not None and redis.writable != check.writable:
            redis.writable = check.writable
            log.info("redis_writable" if check.writable else "redis_write_refused")
        # A missing epoch at this sidecar's first check is a new tenant, not a flush.
        if check.changed is not None and not (check.changed == "flushed" and self.epoch is None):
            self.metrics.epoch_renewals.labels(check.changed).inc()
            log.warning("epoch_renewed", extra={"fields": {"reason": check.changed}})
        self._seen_epoch(check.epoch)
        self._saw_seq(check.seq)

    def _epoch_message(self) -> bytes:
        return orjson.dumps({"scope": "epoch", "origin": self.sidecar_id, "at": time.time()})

    def _seen_epoch(self, epoch: str | None) -> None:
        """Another epoch than the one this sidecar knew: expire the in-process layer."""
        if epoch is None or epoch == self.epoch:
            return
        known, self.epoch = self.epoch, epoch
        if known is not None:
            self.metrics.epoch_changes.inc()
            self._drop_here(None, AXES, precaution=True)
            log.info("epoch_changed")

    async def _renew(self) -> None:
        """After an outage, once Redis answers: when a connection was lost, renew the
        epoch unless another sidecar did after this one's last contact; then trust
        Redis again."""
        async with self._renewing:
            if self.tier.trusted:
                return  # renewed while this call waited for the lock
            try:
                if self._lost_connection:
                    since, message = self._last_contact_ms, self._epoch_message()
                    if await self.tier.renew_epoch(since, message):
                        self.metrics.epoch_renewals.labels("outage").inc()
                        log.warning("epoch_renewed", extra={"fields": {"reason": "outage"}})
                # Lost for a timeout: a stall, if the fleet checked nothing meanwhile.
                check = await self.tier.check(self._seen_seq, self._epoch_message(), lost=True)
            except RedisDown:
                return
            self._checked(check)
            self._last_contact_ms = check.now_ms
            self._lost_connection = False
            self.tier.trusted = True

    # -- listening -----------------------------------------------------------------

    def start(self) -> None:
        if self.redis is not None and self._listener is None:
            self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def stop(self) -> None:
        self.caches.set_coherent(False)
        await cancel_and_wait([t for t in (self._listener, self._drainer) if t is not None])
        self._listener = self._drainer = None

    async def _listen(self) -> None:
        """Subscribe, apply messages; on any failure resubscribe with backoff.

        A PING goes down the subscribed connection every ``heartbeat`` seconds.
        The subscription is confirmed (``subscribed``, the in-process layer
        expired once and coherent from then on, the epoch renewed if an outage
        preceded) only when a PONG comes back, and a PONG later than
        ``stall_after`` counts as a failure: a hung Redis accepts connections and
        commands and answers nothing, which would otherwise look like a quiet channel.
        """
        assert self.redis is not None
        channel = self.redis.keys.channel
        loop = asyncio.get_running_loop()
        backoff = 0.05
        failed = False
        while True:
            client = self.redis.client
            pubsub = client.pubsub()
            try:
                if isinstance(client, RedisCluster):
                    # The shard channel's node comes from the slot map: load it,
                    # and reload it after a failure (the shard may have failed over).
                    await client.initialize()
                    if failed:
                        await client.nodes_manager.initialize()
                if isinstance(pubsub, ClusterPubSub):
                    await pubsub.ssubscribe(channel)
                else:
                    await pubsub.subscribe(channel)
                await _ping(pubsub)
                pinged_at, awaiting = loop.time(), True
                while True:
                    now = loop.time()
                    if awaiting and now - pinged_at > self._stall_after:
                        # Late by our own clock, unless our own delays left the PONG
                        # unread (a stalled event loop is not a stalled Redis).
                        if not await self._arrived_pong(pubsub):
                            raise _Stalled
                        awaiting = False
                        continue
                    if not awaiting and now - pinged_at >= self._heartbeat:
                        await _ping(pubsub)
                        pinged_at, awaiting = now, True
                    due = self._stall_after if awaiting else self._heartbeat
                    wait = min(max(pinged_at + due - now, 0.005), self._heartbeat)
                    if isinstance(pubsub, ClusterPubSub):
                        msg = await pubsub.get_sharded_message(timeout=wait)
                    else:
                        msg = await pubsub.get_message(timeout=wait)
                    kind = msg.get("type") if msg is not None else None
                    if kind in ("message", "smessage"):
                        assert msg is not None
                        self._apply(msg["data"])
                    elif kind == "pong":
                        awaiting = False
                        if not self.subscribed.is_set():
                            # Confirmed. Messages may have been missed while
                            # (re)connecting: expire what is here (kept as the
                            # fallback), then memory is coherent.
                            self._drop_here(None, AXES, precaution=True)
                            self.caches.set_coherent(True)
                            self.subscribed.set()
                            backoff = 0.05
                            failed = False
                            log.info("fanout_subscribed")
                            if not self.tier.trusted:
                                await self._renew()
                    elif kind == "sunsubscribe":
                        # The slot moved or its shard failed over: resubscribe.
                        raise _Resubscribe
            except asyncio.CancelledError:
                raise
            except _LISTEN_ERRORS as exc:
                # A message may be missed from now on: the in-process layer expires,
                # and answers alone for at most SIDECAR_MEMORY_TTL until confirmed
                # again; what Redis holds is not trusted until the epoch is renewed.
                self.caches.set_coherent(False)
                self.subscribed.clear()
                self._distrust(exc)
                failed = True
                log.warning("fanout_disconnected", extra={"fields": {"error": type(exc).__name__}})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 0.5)
            finally:
                with contextlib.suppress(*REDIS_ERRORS):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _arrived_pong(self, pubsub: PubSub) -> bool:
        """Read what has already arrived, applying messages: whether a PONG was there."""
        while True:
            if isinstance(pubsub, ClusterPubSub):
                msg = await pubsub.get_sharded_message(timeout=0)
            else:
                msg = await pubsub.get_message(timeout=0)
            kind = msg.get("type") if msg is not None else None
            if kind is None:
                return False
            if kind == "pong":
                return True
            if kind in ("message", "smessage"):
                assert msg is not None
                self._apply(msg["data"])
            elif kind == "sunsubscribe":
                raise _Resubscribe

    def _apply(self, data: Any) -> None:
        try:
            msg = orjson.loads(data)
            scope = msg["scope"]
            sent_at = float(msg.get("at", 0))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("fanout_message_malformed")
            return
        seq = msg.get("seq")
        if type(seq) is int:
            self._saw_seq(seq)
        if msg.get("origin") == self.sidecar_id:
            return  # applied locally when issued
        if scope == "epoch":
            # Another sidecar renewed the epoch: the next check reads it; expire now.
            self.metrics.epoch_changes.inc()
            self._drop_here(None, AXES, precaution=True)
            return
        named = msg.get("axes")
        # No "axes": a sidecar from before axes existed, which meant every axis.
        axes = AXES if not isinstance(named, list) else _ordered(a for a in named if a in AXES)
        customers = msg.get("customers")
        if scope == "customer" and isinstance(customers, list):
            self._drop_here([c for c in customers if isinstance(c, str)], axes)
        else:
            self._drop_here(None, axes)
        if sent_at:
            self.metrics.fanout_latency.observe(max(time.time() - sent_at, 0.0))


def _chunks(items: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _ordered(axes: Iterable[Any]) -> tuple[Axis, ...]:
    """The axes named, each once, in ``AXES`` order."""
    named = set(axes)
    return tuple(a for a in AXES if a in named)
