"""Forwarding an operation to the upstream, and its answer back.

Every operation of the table but the cached read is forwarded with the
sidecar's key and answered with the upstream's status, body bytes and the
headers that matter (``Content-Type``, ``Content-Disposition``, ``Location``,
``Retry-After``, ``Allow``, ``Idempotent-Replayed``): a PDF stays a PDF and a redirect is
passed on, never followed. The caller's ``x-api-key`` is never read, forwarded
or logged: only ``Idempotency-Key`` is copied from the caller. The sidecar's own
failures are the exceptions: upstream 401/403 becomes 502
``upstream_auth_failed`` (the local caller cannot fix the sidecar's key), no
answer becomes 502 ``upstream_unavailable`` or 504 ``upstream_timeout``.

Ids arrive URL-decoded, pass the id rule of every surface (``inputs.id_problem``:
no ``/``, ``\\``, control character, ``.`` or ``..``; 400 ``invalid_id``) and are
re-quoted one segment each by the upstream client, so no id (``a?b``, ``%2F``
encoded twice, ``#x``) can reach another upstream path, even through an egress
proxy that decodes and normalises paths.
``/v1`` validates bodies before calling the upstream (its own 400 codes); the
mirror leaves that to the upstream so its 400s reach the SDK unchanged.

Writes are retried only when the caller sent an ``Idempotency-Key`` or the row
says the write is safe to retry (``consume_credits`` carries its own key in the
body; ``preview_change`` changes nothing). A write that may have changed a
customer's entitlements drops that customer's cached entitlements (never its
flags, which no plan decides) on every sidecar (an account status change drops
the account's customers) before the answer is returned, so the caller's next
``can`` sees the change.

:func:`forward_unknown` forwards a mirror path the table does not know, with
the same path safety (see ``docs/api.md``, "Unknown operations"), and only with
the methods of ``FORWARDED_METHODS``. What such a write changes is unknown, so it
drops both axes (entitlements and flags).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote

import orjson
from aiohttp import web

from ..appkeys import INVALIDATOR, METRICS, SETTINGS, UPSTREAM
from ..cache.kinds import AXES, Axis
from ..errors import (
    BadRequest,
    NotFound,
    UpstreamAuthFailed,
    UpstreamError,
    UpstreamOverloaded,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from ..upstream import UpstreamResponse, requote_segment
from .inputs import ID_RULE, check_id, is_id, read_json
from .operations import OPERATIONS, Drops, FieldKind, Operation, Surface, id_field, path_shape

__all__ = ["FORWARDED_METHODS", "check_tenant", "forward", "forward_unknown"]

# The logger's name predates the http/ package; log pipelines filter on it.
log = logging.getLogger("sidecar.proxy")

#: Flags are never derived from the plan: a billing write drops entitlements only.
_ENTITLEMENTS: Final[tuple[Axis, ...]] = ("entitlements",)
_MAX_IDEMPOTENCY_KEY: Final = 255
#: Request headers an unknown operation takes from the caller (never x-api-key,
#: Authorization or cookies).
_UNKNOWN_REQUEST_HEADERS: Final = ("Content-Type", "Accept", "Idempotency-Key")
_SAFE_METHODS: Final = frozenset({"GET", "HEAD"})
#: The methods an unknown operation is forwarded with. Any other (``TRACE``,
#: ``CONNECT``, ``OPTIONS``, an invented one) is a 405 and never sent: an upstream
#: or a proxy that echoes a ``TRACE`` would hand the caller the sidecar's key.
FORWARDED_METHODS: Final = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


#: Each field kind: its check, and what the 400 says a value must be.
_KINDS: Final[Mapping[FieldKind, tuple[Callable[[Any], bool], str]]] = {
    "id": (is_id, f"an id ({ID_RULE})"),
    "string": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "integer": (_is_integer, "an integer"),
    "boolean": (lambda v: isinstance(v, bool), "true or false"),
    "strings": (
        lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v),
        "a list of strings",
    ),
    "objects": (
        lambda v: isinstance(v, list) and all(isinstance(i, dict) for i in v),
        "a list of objects",
    ),
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
    log_as = None
    if op.write:
        log_as = (
            "billing_write",
            {
                "operation": op.name,
                "surface": surface,
                "accountId": call.account,
                "customerId": call.customer,
                **{id_field(name): value for name, value in ids.items()},
                "idempotent": call.idempotency_key is not None or op.retry_safe,
            },
        )
    return await _send(
        request,
        call,
        operation=op.name,
        method=op.method,
        segments=op.segments(ids),
        headers=headers,
        # Reads are always safe to retry; a write when the upstream can deduplicate it.
        retry=not op.write or op.retry_safe or call.idempotency_key is not None,
        write=op.write,
        drops=op.drops,
        axes=_ENTITLEMENTS,
        log_as=log_as,
    )


async def forward_unknown(request: web.Request) -> web.StreamResponse:
    """A mirror path the table does not know: forwarded as it is, unless turned off.

    Same path safety as the table's operations: each segment of the raw path is
    decoded and re-quoted as exactly one upstream segment under the configured
    tenant, and only ``Content-Type``, ``Accept`` and ``Idempotency-Key`` are
    taken from the caller. The body's bytes go as they came. A GET (or HEAD) is
    retried like any read, anything else is sent once. A write naming a customer
    (``.../customers/{c}/...``) drops that customer on every sidecar, one naming
    only an account drops the account's customers, as the table's writes do, but
    on both axes: an operation the sidecar does not know may change flags too.
    """
    app = request.app
    settings = app[SETTINGS]
    check_tenant(request)
    raw = request.rel_url.raw_parts[3:]  # after "/", "tenants", the tenant
    segments = [unquote(part, errors="replace") for part in raw]
    if segments == [""]:
        raise NotFound("no operation: the path ends at the tenant", code="unknown_operation")
    for segment in segments:
        check_id(segment, "a path segment")
    method = request.method
    if not settings.forward_unknown:
        allowed = _table_methods(segments)
        if allowed:
            raise web.HTTPMethodNotAllowed(method, allowed)
        raise NotFound(
            f"{method} {path_shape(segments)} is not an operation this sidecar knows, and "
            "forwarding unknown operations is off (SIDECAR_FORWARD_UNKNOWN=false)",
            code="unknown_operation",
        )
    if method not in FORWARDED_METHODS:
        raise web.HTTPMethodNotAllowed(method, FORWARDED_METHODS)

    write = method not in _SAFE_METHODS
    body = await request.read() or None
    headers = {h: request.headers[h] for h in _UNKNOWN_REQUEST_HEADERS if h in request.headers}
    if body is None:
        headers.pop("Content-Type", None)
    call = _Call(
        body=body,
        query=request.query or None,
        idempotency_key=headers.get("Idempotency-Key"),
        account=_id_after(segments, "accounts"),
        customer=_id_after(segments, "customers"),
    )
    drops: Drops | None = "customer" if call.customer else "account" if call.account else None
    shape = path_shape(segments)
    app[METRICS].count_unknown(method, shape)
    answer = await _send(
        request,
        call,
        operation="unknown",
        method=method,
        segments=[requote_segment(part) for part in raw],
        headers=headers,
        retry=not write,
        quoted=True,
        write=write,
        drops=drops,
        axes=AXES,
        log_as=("forwarded_unknown", {"operation": "unknown", "method": method, "shape": shape}),
    )
    if answer.status == 405 and "Allow" not in answer.headers:
        # RFC 9110 has every 405 name the methods; for an upstream that did not,
        # the table's (empty when it knows none: "no method").
        answer.headers["Allow"] = ", ".join(_table_methods(segments))
    return answer


def _table_methods(segments: Sequence[str]) -> list[str]:
    """The methods of the table's operations with this path's shape (HEAD with GET)."""
    methods = {op.method for op in OPERATIONS if op.matches(segments)}
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


def check_tenant(request: web.Request) -> None:
    """The mirror's ``{tenant}``: an id (else 400 ``invalid_id``) and the configured
    tenant (else 404 ``unknown_tenant``)."""
    tenant = check_id(request.match_info["tenant"], "tenant")
    if tenant != request.app[SETTINGS].tenant_id:
        raise NotFound("this sidecar serves another tenant", code="unknown_tenant")


async def _send(
    request: web.Request,
    call: _Call,
    *,
    operation: str,
    method: str,
    segments: list[str],
    headers: Mapping[str, str] | None,
    retry: bool,
    write: bool,
    drops: Drops | None,
    axes: Sequence[Axis],
    log_as: tuple[str, dict[str, Any]] | None,
    quoted: bool = False,
) -> web.Response:
    """The upstream call of ``forward`` and ``forward_unknown``, and its answer.

    A write drops what it may have changed (``axes`` of whom ``drops`` names)
    before the answer is returned, even when no answer came; a successful read
    naming an account and a customer teaches the invalidator their link.
    ``log_as`` is the event and the fields of the one line logged (:func:`_log`).
    The upstream's answer is passed through, but for the sidecar's own failures:
    no answer (502/504) and its key refused (502 ``upstream_auth_failed``).
    """
    app = request.app
    started = time.perf_counter()
    try:
        resp = await app[UPSTREAM].request(
            operation,
            method,
            segments,
            query=call.query,
            body=call.body,
            headers=headers,
            retry=retry,
            quoted=quoted,
        )
    except UpstreamError as exc:
        # No answer: a write may have been applied, so the cache goes anyway
        # (unless it was never sent: too many calls were waiting).
        sent = not isinstance(exc, UpstreamOverloaded)
        dropped = await _after_write(app, drops, call, None, axes) if write and sent else None
        if log_as is not None:
            _log(*log_as, None, exc.code, dropped, started)
        raise _proxy_error(exc, write) from None
    dropped = None
    if write:
        dropped = await _after_write(app, drops, call, resp.status, axes)
    elif 200 <= resp.status < 300 and call.account and call.customer:
        await app[INVALIDATOR].link(call.account, call.customer)
    if log_as is not None:
        _log(*log_as, resp.status, _outcome(resp.status), dropped, started)
    if resp.status in (401, 403):
        raise UpstreamAuthFailed(f"the upstream refused the sidecar's API key ({resp.status})")
    return _passthrough(resp)


def _id_after(segments: Sequence[str], collection: str) -> str | None:
    """The id that follows the first ``collection`` segment (``customers/{c}``);
    ``None`` when there is none (a collection path such as ``.../accounts``)."""
    try:
        at = segments.index(collection) + 1
    except ValueError:
        return None
    if at >= len(segments):
        return None
    return segments[at]


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
    """The row's fields: required ones present, and every one present of its kind.

    A JSON ``null`` counts as absent: an optional field sent as null is left for
    the upstream to judge, as the SDK sends ``creditTypeId: null`` when given none.
    """
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object", code="invalid_body")
    for f in op.fields:
        value = data.get(f.name)
        if value is None:
            if f.required:
                raise BadRequest(f"{f.name} is required", code="invalid_body")
            continue
        check, expected = _KINDS[f.kind]
        if not check(value):
            raise BadRequest(f"{f.name} must be {expected}", code="invalid_body")


def _check_query(op: Operation, request: web.Request) -> None:
    for name in op.query_ids:
        if not all(is_id(v) for v in request.query.getall(name, [])):
            raise BadRequest(f"{name} must be an id ({ID_RULE})", code="invalid_query")


async def _after_write(
    app: web.Application,
    drops: Drops | None,
    call: _Call,
    status: int | None,
    axes: Sequence[Axis] = _ENTITLEMENTS,
) -> Drops | None:
    """Learn the account link and drop the caches (``axes``) the write may have changed.

    A 4xx means the upstream refused the write, so nothing changed. Anything else
    (success, a 5xx, no answer at all) may have changed the customer, and dropping
    a cache entry is always safe.
    """
    if status is not None and 400 <= status < 500:
        return None
    invalidator = app[INVALIDATOR]
    if status is not None and 200 <= status < 300 and call.account and call.customer:
        await invalidator.link(call.account, call.customer)
    if drops == "customer" and call.customer:
        await invalidator.customers([call.customer], source="write", axes=axes)
        return "customer"
    if drops == "account" and call.account:
        await invalidator.account(call.account, source="write", axes=axes)
        return "account"
    return None


def _proxy_error(exc: UpstreamError, write: bool) -> UpstreamError:
    """No answer from the upstream on a proxied route: 502, or 504 for a timeout.

    503 is kept for the cached read ("nothing usable cached") and for a call never
    sent because too many were waiting (503 ``upstream_overloaded``, ``Retry-After``:
    nothing was applied); here the sidecar is a gateway, and a write's message says
    its outcome is unknown.
    """
    if isinstance(exc, UpstreamOverloaded):
        return exc
    message = exc.message + (". The write may or may not have been applied." if write else "")
    if isinstance(exc, UpstreamTimeout):
        return UpstreamTimeout(message)
    if isinstance(exc, UpstreamUnavailable):
        return UpstreamError(message, code="upstream_unavailable")
    return exc


def _passthrough(resp: UpstreamResponse) -> web.Response:
    """The upstream's status, body bytes and the headers that matter, unchanged."""
    return web.Response(status=resp.status, body=resp.body, headers=resp.passed_headers())


def _outcome(status: int) -> str:
    if status in (401, 403):
        return "upstream_auth_failed"
    if status < 400:
        return "ok"
    return "rejected" if status < 500 else "upstream_error"


def _log(
    event: str,
    fields: dict[str, Any],
    status: int | None,
    outcome: str,
    dropped: Drops | None,
    started: float,
) -> None:
    """One line per forwarded write (``billing_write``) or unknown operation
    (``forwarded_unknown``): ``fields`` names it by its ids or its shape; never a
    body, a header or a key."""
    fields |= {
        "status": status,
        "outcome": outcome,
        "dropped": dropped,
        "duration_ms": round((time.perf_counter() - started) * 1000, 1),
    }
    level = logging.INFO if outcome in ("ok", "rejected") else logging.WARNING
    log.log(level, event, extra={"fields": fields})
