"""Metered usage on the local API: ``consume_credits`` queued, and its outcome.

``POST /v1/customers/{c}/credits/{ct}/consume`` with ``Prefer: respond-async``
(RFC 7240) is answered 202 once the record is durable in Redis, never before; the
fleet delivers it (``sidecar/usage``). Without the preference the call is
forwarded synchronously as before (``forwarding.forward``); the mirror ignores the
preference (RFC 7240 lets a server do so): an SDK pointed at it gets the
upstream's own answer.

Answers: 202 ``{"queued": true, "idempotencyKey"}`` with ``Preference-Applied:
respond-async`` and ``Location: /v1/usage/{key}`` (a new record, or its key sent
again while still queued); 200 with the outcome once the key's record is final
(the same record: never a second consumption); 400 for a body the upstream would
refuse (a missing ``idempotencyKey`` included); 409 ``async_requires_redis``
without Redis; 422 ``idempotency_key_reused`` when the key names another record;
503 with ``Retry-After`` when nothing was queued (``usage_unavailable``: Redis did
not answer or refused the write; ``usage_queue_full``).
"""

from __future__ import annotations

import re
from typing import Any, Final
from urllib.parse import quote

from aiohttp import web

from ..appkeys import USAGE
from ..errors import BadRequest, Conflict, NotFound, Unavailable, Unprocessable
from ..redis.conn import RedisDown
from ..usage import Record, UsageQueue
from ..usage.records import MAX_AMOUNT, MAX_KEY_LENGTH
from .inputs import read_json
from .responses import json_response

__all__ = ["consume_async", "outcome", "prefers_async"]

#: RFC 7240's preference for an asynchronous answer.
RESPOND_ASYNC: Final = "respond-async"
#: What an idempotency key may be: it names a record in a URL path too.
_KEY: Final = re.compile(rf"(?!\.\.?\Z)[^/\\\x00-\x1f\x7f-\x9f]{{1,{MAX_KEY_LENGTH}}}\Z").match
_KEY_RULE: Final = (
    f"1 to {MAX_KEY_LENGTH} characters, not . or .., without / \\ or control characters"
)


def prefers_async(request: web.Request) -> bool:
    """Whether a ``Prefer`` header (RFC 7240: it may repeat, and list preferences, each
    ``name[=value][; params]``, names case-insensitive) asks for ``respond-async``."""
    for header in request.headers.getall("Prefer", ()):
        for preference in header.split(","):
            name = preference.split(";", 1)[0].split("=", 1)[0].strip().lower()
            if name == RESPOND_ASYNC:
                return True
    return False


def _queue(request: web.Request) -> UsageQueue:
    usage = request.app[USAGE]
    if usage is None:
        raise Conflict(
            "usage is queued in Redis, and this sidecar has none (SIDECAR_REDIS_URL is "
            "unset): send the call without Prefer: respond-async to consume synchronously",
            code="async_requires_redis",
        )
    return usage


def _key(value: Any, where: str) -> str:
    if value is None:
        raise BadRequest(f"{where} is required", code="invalid_body")
    if not isinstance(value, str) or _KEY(value) is None:
        raise BadRequest(f"{where} must be {_KEY_RULE}", code="invalid_idempotency_key")
    return value


def _record(data: Any, ids: dict[str, str]) -> Record:
    """The body as the upstream would take it: ``amount`` a positive integer and
    ``idempotencyKey`` present (400 otherwise: a record is refused now, not later)."""
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object", code="invalid_body")
    amount = data.get("amount")
    if amount is None:
        raise BadRequest("amount is required", code="invalid_body")
    if isinstance(amount, bool) or not isinstance(amount, int) or not 0 < amount <= MAX_AMOUNT:
        raise BadRequest(
            f"amount must be a positive integer (at most {MAX_AMOUNT})", code="invalid_body"
        )
    key = _key(data.get("idempotencyKey"), "idempotencyKey")
    return Record(key, ids["customer"], ids["credit_type"], amount)


async def consume_async(request: web.Request, ids: dict[str, str]) -> web.StreamResponse:
    """``consume_credits`` queued for the fleet to deliver (see the module docstring)."""
    record = _record(await read_json(request), ids)
    usage = _queue(request)
    try:
        accepted = await usage.accept(record)
    except RedisDown:
        raise Unavailable(
            "the usage queue (Redis) did not answer: the record may not be queued; send it "
            "again with the same idempotencyKey",
            code="usage_unavailable",
        ) from None
    if accepted.result == "conflict":
        raise Unprocessable(
            "idempotencyKey already names a record for another customer, credit type or amount",
            code="idempotency_key_reused",
        )
    if accepted.result == "full":
        raise Unavailable(
            "the usage queue is full (SIDECAR_USAGE_MAX_QUEUED records not yet delivered): "
            "nothing was queued",
            code="usage_queue_full",
            retry_after=5,
        )
    if accepted.result == "refused":
        raise Unavailable(
            "Redis refused the write (out of memory): nothing was queued",
            code="usage_unavailable",
        )
    if accepted.state == "queued":
        headers = {
            "Preference-Applied": RESPOND_ASYNC,
            "Location": "/v1/usage/" + quote(record.key, safe=""),
        }
        return json_response({"queued": True, "idempotencyKey": record.key}, 202, headers)
    try:
        body = await usage.outcome(record.key)
    except RedisDown:
        body = None
    if body is None:
        body = {"idempotencyKey": record.key, "state": accepted.state}
    return json_response({**body, "queued": False})


async def outcome(request: web.Request) -> web.StreamResponse:
    """``GET /v1/usage/{idempotencyKey}``: the record's state and, once final, the
    upstream's answer (``usage.records.outcome_body``)."""
    key = _key(request.match_info["idempotencyKey"], "idempotencyKey")
    usage = _queue(request)
    try:
        body = await usage.outcome(key)
    except RedisDown:
        raise Unavailable(
            "the usage queue (Redis) did not answer", code="usage_unavailable"
        ) from None
    if body is None:
        raise NotFound(
            "no usage record has this idempotencyKey (never queued, or its outcome was kept "
            "for SIDECAR_USAGE_OUTCOME_TTL and is gone)",
            code="usage_not_found",
        )
    return json_response(body)
