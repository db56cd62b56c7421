"""Forwarding an operation of the table to the upstream, and its answer back.

Every operation but the cached read is forwarded with the sidecar's key and
answered with the upstream's status, body and ``Location`` (a redirect is never
followed). The caller's ``x-api-key`` is never read, forwarded or logged: only
``Idempotency-Key`` is copied from the caller. The sidecar's own failures are the
exceptions: upstream 401/403 becomes 502 ``upstream_auth_failed`` (the local
caller cannot fix the sidecar's key), no answer becomes 502
``upstream_unavailable`` or 504 ``upstream_timeout``.

Ids arrive URL-decoded and are re-quoted one segment each by the upstream client,
so no id (``..``, ``a/b``, ``%2F``, ``?x``) can reach another upstream path.
``/v1`` validates bodies before calling the upstream (its own 400 codes); the
mirror leaves that to the upstream so its 400s reach the SDK unchanged.

Writes are retried only when the caller sent an ``Idempotency-Key``. A write that
may have changed a customer's entitlements drops that customer's cached
entitlements (never its flags, which no plan decides) on every sidecar (an
account status change drops the account's customers) before the answer is
returned, so the caller's next ``can`` sees the change.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson
from aiohttp import web

from ..appkeys import INVALIDATOR, UPSTREAM
from ..cache.kinds import Axis
from ..errors import (
    BadRequest,
    UpstreamAuthFailed,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from ..upstream import UpstreamResponse
from .inputs import MAX_ID_LENGTH, is_id, read_json
from .operations import Drops, Operation, Surface

__all__ = ["forward"]

# The logger's name predates the http/ package; log pipelines filter on it.
log = logging.getLogger("sidecar.proxy")

#: Flags are never derived from the plan: a billing write drops entitlements only.
_ENTITLEMENTS: Final[tuple[Axis, ...]] = ("entitlements",)

#: Response headers passed back besides ``UpstreamResponse.passed_headers()``.
_EXTRA_PASSED: Final = ("Idempotent-Replayed",)
_MAX_IDEMPOTENCY_KEY: Final = 255
#: Names of path parameters as the log and the ids in messages spell them.
_ID_FIELDS: Final = {
    "account": "accountId",
    "customer": "customerId",
    "method": "methodId",
    "invoice": "invoiceId",
}


@dataclass(slots=True)
class _Call:
    """One validated call: what is sent upstream and whom it concerns."""

    body: bytes | None
    query: Mapping[str, str] | None
    idempotency_key: str | None
    account: str | None
    customer: str | None


async def forward(
    request: web.Request, op: Operation, ids: dict[str, str], surface: Surface
) -> web.StreamResponse:
    """Call the upstream for ``op`` with the path's ``ids``; its answer, passed through."""
    call = await _prepare(request, op, ids, surface)
    headers = {"Idempotency-Key": call.idempotency_key} if call.idempotency_key else None
    # Reads are always safe to retry; a write only when the upstream can deduplicate it.
    retry = not op.write or call.idempotency_key is not None
    started = time.perf_counter()
    try:
        resp = await request.app[UPSTREAM].request(
            op.name,
            op.method,
            op.segments(ids),
            query=call.query,
            body=call.body,
            headers=headers,
            retry=retry,
        )
    except UpstreamError as exc:
        if op.write:
            # No answer: the write may have been applied, so the cache goes anyway.
            dropped = await _after_write(request.app, op, call, None)
            _log_write(op, surface, ids, call, None, exc.code, dropped, started)
        raise _proxy_error(exc, op) from None
    if op.write:
        dropped = await _after_write(request.app, op, call, resp.status)
        _log_write(op, surface, ids, call, resp.status, _outcome(resp.status), dropped, started)
    elif 200 <= resp.status < 300 and call.account and call.customer:
        await request.app[INVALIDATOR].link(call.account, call.customer)
    if resp.status in (401, 403):
        raise UpstreamAuthFailed(f"the upstream refused the sidecar's API key ({resp.status})")
    return _passthrough(resp)


async def _prepare(
    request: web.Request, op: Operation, ids: Mapping[str, str], surface: Surface
) -> _Call:
    """What to send, and whom it concerns.

    ``/v1`` validates what the sidecar can before spending an upstream call (400
    with the sidecar's own codes). The mirror promises the upstream's exact
    answers, so there the upstream judges the body and its 400 is passed through.
    Either way the body is forwarded as received: unknown fields pass untouched.
    """
    strict = surface == "v1"
    body: bytes | None = None
    data: Any = None
    if op.body:
        if strict:
            data = await read_json(request)
            _check_body(op, data)
        body = await request.read() or None
        if not strict and body is not None:
            with contextlib.suppress(orjson.JSONDecodeError):
                data = orjson.loads(body)
    key = request.headers.get("Idempotency-Key") if op.write else None
    if strict:
        _check_query(op, request)
        if key is not None and not 0 < len(key) <= _MAX_IDEMPOTENCY_KEY:
            raise BadRequest(
                f"Idempotency-Key must be 1 to {_MAX_IDEMPOTENCY_KEY} characters",
                code="invalid_idempotency_key",
            )
    # Whom the call concerns: the path's ids, else the body's (create_customer,
    # create_checkout, create_account name theirs in the body).
    named = data if isinstance(data, dict) else {}
    return _Call(
        body=body,
        query=request.query if request.query else None,
        idempotency_key=key or None,
        account=ids.get("account") or _named_id(named, "accountId"),
        customer=ids.get("customer") or _named_id(named, "customerId"),
    )


def _named_id(data: Mapping[str, Any], name: str) -> str | None:
    value = data.get(name)
    return value if is_id(value) else None


def _check_body(op: Operation, data: Any) -> None:
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object", code="invalid_body")
    for name in op.required:
        value = data.get(name)
        if not isinstance(value, str) or not value:
            raise BadRequest(f"{name} must be a non-empty string", code="invalid_body")
        if name.endswith("Id") and len(value) > MAX_ID_LENGTH:
            raise BadRequest(
                f"{name} is longer than {MAX_ID_LENGTH} characters", code="invalid_body"
            )


def _check_query(op: Operation, request: web.Request) -> None:
    for name in op.query_ids:
        if any(not v or len(v) > MAX_ID_LENGTH for v in request.query.getall(name, [])):
            raise BadRequest(
                f"{name} must be 1 to {MAX_ID_LENGTH} characters", code="invalid_query"
            )


async def _after_write(
    app: web.Application, op: Operation, call: _Call, status: int | None
) -> Drops | None:
    """Learn the account link and drop the caches the write may have changed.

    A 4xx means the upstream refused the write, so nothing changed. Anything else
    (success, a 5xx, no answer at all) may have changed the customer, and dropping
    a cache entry is always safe.
    """
    if status is not None and 400 <= status < 500:
        return None
    invalidator = app[INVALIDATOR]
    if status is not None and 200 <= status < 300 and call.account and call.customer:
        await invalidator.link(call.account, call.customer)
    if op.drops == "customer" and call.customer:
        await invalidator.customers([call.customer], source="write", axes=_ENTITLEMENTS)
        return "customer"
    if op.drops == "account" and call.account:
        await invalidator.account(call.account, source="write", axes=_ENTITLEMENTS)
        return "account"
    return None


def _proxy_error(exc: UpstreamError, op: Operation) -> UpstreamError:
    """No answer from the upstream on a proxied route: 502, or 504 for a timeout.

    503 is kept for the cached read ("nothing usable cached"); here the sidecar is
    a gateway, and a write's message says its outcome is unknown.
    """
    message = exc.message + (". The write may or may not have been applied." if op.write else "")
    if isinstance(exc, UpstreamTimeout):
        return UpstreamTimeout(message)
    if isinstance(exc, UpstreamUnavailable):
        return UpstreamError(message, code="upstream_unavailable")
    return exc


def _passthrough(resp: UpstreamResponse) -> web.Response:
    headers = resp.passed_headers()
    for name in _EXTRA_PASSED:
        if name in resp.headers:
            headers[name] = resp.headers[name]
    return web.Response(status=resp.status, body=resp.body, headers=headers)


def _outcome(status: int) -> str:
    if status in (401, 403):
        return "upstream_auth_failed"
    if status < 400:
        return "ok"
    return "rejected" if status < 500 else "upstream_error"


def _log_write(
    op: Operation,
    surface: Surface,
    ids: Mapping[str, str],
    call: _Call,
    status: int | None,
    outcome: str,
    dropped: Drops | None,
    started: float,
) -> None:
    """One line per write: operation, ids and outcome; never a body, a header or a key."""
    fields: dict[str, Any] = {
        "operation": op.name,
        "surface": surface,
        "accountId": call.account,
        "customerId": call.customer,
        **{_ID_FIELDS[name]: value for name, value in ids.items()},
        "status": status,
        "outcome": outcome,
        "idempotent": call.idempotency_key is not None,
        "dropped": dropped,
        "duration_ms": round((time.perf_counter() - started) * 1000, 1),
    }
    level = logging.INFO if outcome in ("ok", "rejected") else logging.WARNING
    log.log(level, "billing_write", extra={"fields": fields})
