"""The push webhook receiver (``SIDECAR_WEBHOOK_LISTEN``): ``POST /webhooks/vellum``.

Order of checks, each stopping the request with nothing changed: size (413),
signature over the raw bytes and timestamp freshness (401, ``signature.verify``),
JSON object (400), tenant (200, ignored), replay (200, duplicate). Only then is
the invalidation applied, and it is a delete, never a write of the payload.

The upstream retries a push up to three times with no delay and then drops it,
so an authentic event is never refused for what it lacks (an id, a known
``type``) nor for Redis being down: it is answered 200 and applied here at once;
the Redis part waits in the invalidator's queue until Redis answers.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson
from aiohttp import web

from ..appkeys import CORE, INVALIDATOR, METRICS, REDIS, SETTINGS, TRACING
from ..cache.invalidation import Scope
from ..cache.kinds import AXES, Axis
from ..errors import PayloadTooLarge, error_body
from ..redis.conn import RedisConn, RedisDown
from ..signature import SignatureError, verify
from ..tracing import record
from .middleware import json_errors
from .responses import error_response, json_response

__all__ = [
    "ENTITLEMENT_EVENT_FAMILIES",
    "MAX_SHARED_EVENTS",
    "MAX_WEBHOOK_BODY",
    "REPLAY_WINDOW",
    "ReplayGuard",
    "Target",
    "classify",
    "create_webhook_app",
    "event_key",
]

log = logging.getLogger("sidecar.webhooks")

MAX_WEBHOOK_BODY: Final = 1024 * 1024
#: How long an event key is remembered. Longer than the ±300 s signature window, so
#: a replay of a still-fresh signature is always caught.
REPLAY_WINDOW: Final = 600
_MAX_MEMORY_IDS: Final = 100_000
#: Event keys kept in Redis at most: the newest, in one sorted set per tenant.
MAX_SHARED_EVENTS: Final = 100_000
#: Keys first seen while Redis was down, written to Redis when it answers again.
_MAX_PENDING_IDS: Final = 10_000
#: Longer id values are hashed into the key (a Redis key stays short).
_MAX_ID_LENGTH: Final = 200

#: ``type`` families (the part before the first dot) known to concern entitlements
#: and nothing else: the entitlement document itself, and the subscription, billing
#: and status changes that the upstream reflects in it (``payment.failed`` makes a
#: subscription past due, ``checkout.completed`` starts one, an account or customer
#: status withholds access, a plan change changes its modules). A family starting
#: ``flag``/``flags`` (or ``flag_...``) concerns flags only; any other type drops both axes.
ENTITLEMENT_EVENT_FAMILIES: Final = frozenset(
    {
        "entitlement", "entitlements",
        "subscription", "subscriptions",
        "payment", "payments",
        "payment_method", "payment_methods",
        "invoice", "invoices",
        "checkout", "checkouts",
        "customer", "customers",
        "account", "accounts",
        "plan", "plans",
    }
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Target:
    """What an event drops: a scope (with its id) and the axes."""

    scope: Scope
    customer: str | None
    account: str | None
    axes: frozenset[Axis]


def classify(event: Mapping[str, Any]) -> Target:
    """The one place an event's ``type`` and ids become what it drops.

    Axes: a ``type`` whose family (before the first dot) is ``flag``/``flags``
    or starts with ``flag_``/``flags_`` drops flags; a family in
    ``ENTITLEMENT_EVENT_FAMILIES`` drops entitlements; any other type, or none,
    drops both.

    Scope: a known type naming a customer drops that customer; one naming only an
    account, that account's customers; neither, the tenant. An unknown type is
    applied conservatively, for the widest scope it names: the account when it
    names one (even next to a customer), else the customer, else the tenant.
    """
    kind = event.get("type")
    family = kind.split(".", 1)[0].strip().lower() if isinstance(kind, str) else ""
    if family in ("flag", "flags") or family.startswith(("flag_", "flags_")):
        axes: frozenset[Axis] = frozenset({"flags"})
    elif family in ENTITLEMENT_EVENT_FAMILIES:
        axes = frozenset({"entitlements"})
    else:
        axes = frozenset(AXES)
    customer = _named(event.get("customerId"))
    account = _named(event.get("accountId"))
    known = axes != frozenset(AXES)
    if customer is not None and (known or account is None):
        return Target("customer", customer, account, axes)
    if account is not None:
        return Target("account", customer, account, axes)
    return Target("tenant", None, None, axes)


def _named(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def event_key(event: Mapping[str, Any], body: bytes, timestamp: int) -> str:
    """What first-seen is decided by: ``eventId``, else ``id``, else the signed payload.

    ``eventId`` is stable across the upstream's retries. Without any id, the key
    is a SHA-256 of exactly what was signed (``<t>.<body>``): a replay of a signed
    request is caught, while two events with equal bodies sent at different times
    are both applied (applying one twice is harmless; missing one is not).
    """
    for field in ("eventId", "id"):
        value = event.get(field)
        if isinstance(value, bool) or not isinstance(value, str | int):
            continue
        text = str(value)
        if not text:
            continue
        if len(text) > _MAX_ID_LENGTH:
            text = "sha256:" + hashlib.sha256(text.encode()).hexdigest()
        return f"{field}:{text}"
    signed = str(timestamp).encode() + b"." + body
    return "sha256:" + hashlib.sha256(signed).hexdigest()


# Record event digests first seen, in the tenant's sorted set (score: when seen):
# forget the ones older than the window, add the new ones, keep only the newest
# ARGV[3], and let the set expire a window after its last write.
# KEYS: the set. ARGV: now (s), window (s), most members, then (seen at, digest)
# pairs. Returns how many of the digests were new.
_SEEN_SCRIPT: Final = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]) - tonumber(ARGV[2]))
local added = 0
for i = 4, #ARGV, 2 do
  added = added + redis.call('ZADD', KEYS[1], 'NX', ARGV[i], ARGV[i + 1])
end
local over = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[3])
if over > 0 then redis.call('ZPOPMIN', KEYS[1], over) end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return added
"""


def _digest(key: str) -> bytes:
    """An event key as 16 bytes: every member of the shared set has the same size."""
    return hashlib.blake2b(key.encode(), digest_size=16).digest()


class ReplayGuard:
    """Event keys seen in the last ``REPLAY_WINDOW`` seconds.

    Redis makes the check shared, so a replay sent to another sidecar is caught
    too: one sorted set per tenant holds a 16-byte digest of each key, scored by
    when it was first seen, trimmed to the window and to the newest
    ``max_shared`` on every write, and expiring a window after the last one. So a
    flood of authentic events (a bulk change upstream) costs Redis one key and
    at most ``max_shared`` small members, never a key per event. Past the bound
    the oldest digests go first: a replay of one of them within its signature's
    300 s would be applied again, which is harmless (an invalidation applied
    twice revalidates twice), and the upstream's own retries come within
    seconds, among the newest.

    A bounded local memory answers first, and alone while Redis is off or down.
    Keys first seen while Redis was down are written to Redis when it answers
    again (``RedisConn.on_reconnect``), so a retry that then reaches another
    sidecar is a duplicate there too.
    """

    def __init__(
        self, redis: Callable[[], RedisConn | None], *, max_shared: int = MAX_SHARED_EVENTS
    ) -> None:
        self._redis = redis
        self.max_shared = max_shared
        self._seen: OrderedDict[str, float] = OrderedDict()
        #: Keys first seen while Redis was down, with the wall time they were seen.
        self._unshared: OrderedDict[str, float] = OrderedDict()
        self._watching: RedisConn | None = None

    async def first_seen(self, key: str) -> bool:
        if self._remember(key, time.monotonic()):
            return False
        redis = self._redis()
        if redis is None:
            return True
        now = time.time()
        try:
            added = await self._record(redis, now, [(now, key)])
        except RedisDown:
            self._unshared[key] = now
            while len(self._unshared) > _MAX_PENDING_IDS:
                self._unshared.popitem(last=False)
            if self._watching is not redis:
                # Resolved here, not at start-up: the core app may start after this one.
                redis.on_reconnect(self.share)
                self._watching = redis
            return True
        if self._unshared:
            await self.share()
        return added == 1

    async def share(self) -> None:
        """Write the keys first seen while Redis was down, each scored by when it was seen."""
        redis = self._redis()
        if redis is None or not self._unshared:
            return
        now = time.time()
        for key in [k for k, t in self._unshared.items() if now - t >= REPLAY_WINDOW]:
            del self._unshared[key]
        items = [(t, k) for k, t in self._unshared.items()]
        if items:
            try:
                await self._record(redis, now, items)
            except RedisDown:
                return
        for _, key in items:  # those first seen meanwhile wait for the next call
            self._unshared.pop(key, None)

    async def _record(self, redis: RedisConn, now: float, items: list[tuple[float, str]]) -> int:
        """Run ``_SEEN_SCRIPT`` for ``(seen at, key)`` pairs; how many were new."""
        args: list[Any] = [now, REPLAY_WINDOW, self.max_shared]
        for seen_at, key in items:
            args += [seen_at, _digest(key)]
        name = redis.keys.events
        added = await redis.run(
            "replay_check" if len(items) == 1 else "replay_share",
            lambda r: r.eval(_SEEN_SCRIPT, 1, name, *args),
        )
        return int(added)

    def _remember(self, key: str, now: float) -> bool:
        """Whether ``key`` was seen here within the window; remembers it either way."""
        while self._seen:
            oldest, seen_at = next(iter(self._seen.items()))
            if now - seen_at < REPLAY_WINDOW and len(self._seen) < _MAX_MEMORY_IDS:
                break
            del self._seen[oldest]
        if key in self._seen:
            return True
        self._seen[key] = now
        return False


REPLAY = web.AppKey("replay", ReplayGuard)


def _ok(**extra: Any) -> web.Response:
    return json_response({"ok": True, **extra})


def _refuse(status: int, code: str, message: str) -> web.Response:
    return json_response(error_body(code, message), status)


def _too_large() -> web.Response:
    return error_response(PayloadTooLarge("webhook bodies are limited to 1 MiB"))


async def receive(request: web.Request) -> web.StreamResponse:
    core = request.app[CORE]
    metrics = core[METRICS]
    settings = core[SETTINGS]
    if request.content_length is not None and request.content_length > MAX_WEBHOOK_BODY:
        metrics.webhooks.labels("too_large").inc()
        return _too_large()
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        metrics.webhooks.labels("too_large").inc()
        return _too_large()
    secrets = [s.reveal() for s in settings.webhook_secrets]
    try:
        timestamp = verify(
            request.headers.get("X-Vellum-Signature"), body, secrets, now=time.time()
        )
    except SignatureError as exc:
        result = "stale" if exc.reason == "stale" else "bad_signature"
        metrics.webhooks.labels(result).inc()
        log.warning("webhook_refused", extra={"fields": {"reason": exc.reason}})
        return _refuse(401, "invalid_signature", f"signature check failed: {exc.reason}")
    try:
        event = orjson.loads(body)
    except orjson.JSONDecodeError:
        event = None
    if not isinstance(event, dict):
        metrics.webhooks.labels("malformed").inc()
        return _refuse(400, "malformed_event", "expected a JSON object")
    tenant = event.get("tenantId")
    if tenant is not None and tenant != settings.tenant_id:
        metrics.webhooks.labels("ignored").inc()
        return _ok(ignored=True)
    key = event_key(event, body, timestamp)
    kind = event.get("type")
    # Shielded: once the key is recorded here the event must be applied (and
    # counted), even if the sender hangs up meanwhile; its immediate retry is
    # then a duplicate.
    with core[TRACING].server("POST /webhooks/vellum", request.headers):
        applying = _apply_once(core, request.app[REPLAY], key, classify(event), kind)
        reply = await asyncio.shield(applying)
    return _ok(**reply)


async def _apply_once(
    core: web.Application, replay: ReplayGuard, key: str, target: Target, kind: Any
) -> dict[str, bool]:
    """Apply a first-seen event; what the 200 answer adds to ``{"ok": true}``."""
    metrics = core[METRICS]
    if not await replay.first_seen(key):
        metrics.webhooks.labels("duplicate").inc()
        return {"duplicate": True}
    attributes = {"vellum_sidecar.push.scope": target.scope, "vellum_sidecar.push.event": key}
    with core[TRACING].span("vellum_sidecar.push.apply", attributes) as span:
        scope, shared = await apply_event(core, target)
        record(
            span,
            **{"vellum_sidecar.push.applied_scope": scope, "vellum_sidecar.push.shared": shared},
        )
    fields = {
        "eventKey": key,
        "type": kind if isinstance(kind, str) else None,
        "scope": scope,
        "axes": sorted(target.axes),
    }
    if not shared:
        # Applied here; Redis and the other sidecars get it once Redis answers.
        metrics.webhooks.labels("queued").inc()
        log.warning("webhook_queued", extra={"fields": fields})
        return {"queued": True}
    metrics.webhooks.labels("ok").inc()
    log.info("webhook_applied", extra={"fields": fields})
    return {}


async def apply_event(core: web.Application, target: Target) -> tuple[Scope, bool]:
    """Drop what the event names (see ``classify``).

    Returns the scope applied and whether Redis (so every sidecar) was reached now.
    """
    invalidator = core[INVALIDATOR]
    if target.scope == "customer" and target.customer is not None:
        if target.account is not None:
            await invalidator.link(target.account, target.customer)
        shared = await invalidator.customers([target.customer], source="webhook", axes=target.axes)
        return "customer", shared
    if target.scope == "account" and target.account is not None:
        if target.customer is not None:
            await invalidator.link(target.account, target.customer)
        return await invalidator.account(target.account, source="webhook", axes=target.axes)
    return "tenant", await invalidator.tenant(source="webhook", axes=target.axes)


def create_webhook_app(core: web.Application) -> web.Application:
    """The receiver app; ``core`` is the app from ``create_app`` (already started or not)."""
    app = web.Application(middlewares=[json_errors], client_max_size=MAX_WEBHOOK_BODY)
    app[CORE] = core

    async def replay_ctx(app: web.Application) -> Any:
        # Resolved per call: the core app may start after this one.
        app[REPLAY] = ReplayGuard(lambda: core.get(REDIS))
        yield

    app.cleanup_ctx.append(replay_ctx)
    app.router.add_post("/webhooks/vellum", receive)
    return app
