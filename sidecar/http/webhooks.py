"""The push webhook receiver (``SIDECAR_WEBHOOK_LISTEN``): ``POST /webhooks/vellum``.

Order of checks, each stopping the request with nothing changed: size (413),
signature over the raw bytes and timestamp freshness (401, ``signature.verify``),
JSON shape (400), tenant (200, ignored), replay (200, duplicate). Only then is
the invalidation applied, and it is a delete, never a write of the payload.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final

import orjson
from aiohttp import web

from ..appkeys import CORE, INVALIDATOR, METRICS, REDIS, SETTINGS
from ..cache.kinds import AXES, Axis
from ..errors import PayloadTooLarge, error_body
from ..redis.conn import RedisConn, RedisDown
from ..signature import SignatureError, verify
from .middleware import json_errors
from .responses import error_response, json_response

__all__ = [
    "MAX_WEBHOOK_BODY",
    "REPLAY_WINDOW",
    "ReplayGuard",
    "axes_of",
    "create_webhook_app",
]

log = logging.getLogger("sidecar.webhooks")

MAX_WEBHOOK_BODY: Final = 1024 * 1024
#: How long an event id is remembered. Longer than the ±300 s signature window, so
#: a replay of a still-fresh signature is always caught.
REPLAY_WINDOW: Final = 600
_MAX_MEMORY_IDS: Final = 100_000


class ReplayGuard:
    """Event ids seen in the last ``REPLAY_WINDOW`` seconds.

    Redis ``SET NX EX`` makes the check shared, so a replay sent to another
    sidecar is caught too; a local LRU answers while Redis is off or down (then
    only replays to this sidecar are caught).
    """

    def __init__(self, redis: Callable[[], RedisConn | None]) -> None:
        self._redis = redis
        self._seen: OrderedDict[str, float] = OrderedDict()

    async def first_seen(self, event_id: str) -> bool:
        now = time.monotonic()
        local_dup = self._remember(event_id, now)
        redis = self._redis()
        if redis is not None:
            key = redis.keys.event(event_id)
            try:
                fresh = await redis.run(
                    "replay_check", lambda r: r.set(key, b"1", nx=True, ex=REPLAY_WINDOW)
                )
            except RedisDown:
                return not local_dup
            return bool(fresh)
        return not local_dup

    async def forget(self, event_id: str) -> None:
        """Undo ``first_seen`` for an event that could not be applied in full."""
        self._seen.pop(event_id, None)
        redis = self._redis()
        if redis is not None:
            key = redis.keys.event(event_id)
            # Best effort: if Redis is down the id was most likely never stored.
            with contextlib.suppress(RedisDown):
                await redis.run("replay_forget", lambda r: r.delete(key))

    def _remember(self, event_id: str, now: float) -> bool:
        while self._seen:
            oldest_id, seen_at = next(iter(self._seen.items()))
            if now - seen_at < REPLAY_WINDOW and len(self._seen) < _MAX_MEMORY_IDS:
                break
            del self._seen[oldest_id]
        if event_id in self._seen:
            return True
        self._seen[event_id] = now
        return False


REPLAY = web.AppKey("replay", ReplayGuard)


def _ok(**extra: Any) -> web.Response:
    return json_response({"ok": True, **extra})


def _refuse(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return json_response(error_body(code, message), status, headers)


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
        verify(request.headers.get("X-Vellum-Signature"), body, secrets, now=time.time())
    except SignatureError as exc:
        result = "stale" if exc.reason == "stale" else "bad_signature"
        metrics.webhooks.labels(result).inc()
        log.warning("webhook_refused", extra={"fields": {"reason": exc.reason}})
        return _refuse(401, "invalid_signature", f"signature check failed: {exc.reason}")
    try:
        event = orjson.loads(body)
    except orjson.JSONDecodeError:
        event = None
    event_id = event.get("id") if isinstance(event, dict) else None
    if not isinstance(event, dict) or not isinstance(event_id, str) or not event_id:
        metrics.webhooks.labels("malformed").inc()
        return _refuse(400, "malformed_event", "expected a JSON object with a string id")
    if len(event_id) > 256:
        metrics.webhooks.labels("malformed").inc()
        return _refuse(400, "malformed_event", "the event id is longer than 256 characters")
    tenant = event.get("tenantId")
    if tenant is not None and tenant != settings.tenant_id:
        metrics.webhooks.labels("ignored").inc()
        return _ok(ignored=True)
    if not await request.app[REPLAY].first_seen(event_id):
        metrics.webhooks.labels("duplicate").inc()
        return _ok(duplicate=True)
    scope, shared = await apply_event(core, event)
    if not shared:
        # Only this sidecar dropped its entries; the Redis entries and the other
        # sidecars were not reached. Answer 503 and forget the id, so Vellum's
        # retry is applied in full once Redis answers again.
        await request.app[REPLAY].forget(event_id)
        metrics.webhooks.labels("retry").inc()
        log.warning("webhook_not_shared", extra={"fields": {"event_id": event_id, "scope": scope}})
        return _refuse(
            503,
            "redis_unavailable",
            "applied to this sidecar only (Redis is down); retry later",
            {"Retry-After": "5"},
        )
    metrics.webhooks.labels("ok").inc()
    log.info(
        "webhook_applied",
        extra={"fields": {"event_id": event_id, "type": event.get("type"), "scope": scope}},
    )
    return _ok()


#: ``type`` prefixes of events about flags: they drop the flags axis only.
_FLAG_TYPES: Final = ("flags.", "flag.")
#: ``type`` prefixes of events known to concern entitlements: they drop that axis only.
_ENTITLEMENT_TYPES: Final = ("entitlements.", "entitlement.", "subscription.", "payment.")


def axes_of(event_type: Any) -> tuple[Axis, ...]:
    """Which axes an event's ``type`` drops: flag events the flags, events known to
    concern entitlements the entitlements, any other (or no) type both, since a
    drop is always safe and an event nobody listed may concern either."""
    if isinstance(event_type, str):
        if event_type.startswith(_FLAG_TYPES):
            return ("flags",)
        if event_type.startswith(_ENTITLEMENT_TYPES):
            return ("entitlements",)
    return AXES


async def apply_event(core: web.Application, event: dict[str, Any]) -> tuple[str, bool]:
    """Drop what the event names, on the axes its type concerns (``axes_of``): a
    customer, an account's customers, or everything (for flags: every customer's
    and the global flags).

    Returns the scope and whether every sidecar was reached (see ``Invalidator``).
    """
    invalidator = core[INVALIDATOR]
    axes = axes_of(event.get("type"))
    customer = event.get("customerId")
    account = event.get("accountId")
    if isinstance(customer, str) and customer:
        if isinstance(account, str) and account:
            await invalidator.link(account, customer)
        return "customer", await invalidator.customers([customer], source="webhook", axes=axes)
    if isinstance(account, str) and account:
        return await invalidator.account(account, source="webhook", axes=axes)
    return "tenant", await invalidator.tenant(source="webhook", axes=axes)


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
