"""The OpenFeature Remote Evaluation Protocol (OFREP), so any OpenFeature SDK with its
stock OFREP provider reads Vellum flags and entitlements through the sidecar.

- ``POST /ofrep/v1/evaluate/flags/{key}``: one flag, for server-side providers;
- ``POST /ofrep/v1/evaluate/flags``: every flag of a customer (bulk), with an
  ``ETag`` (``If-None-Match`` gives 304) and an SSE ``eventStreams`` entry;
- ``GET /ofrep/v1/events?targetingKey=<customer>``: that stream, which sends
  ``refetchEvaluation`` whenever the customer's flags or entitlements are
  dropped anywhere in the fleet (the invalidation listener tells ``Streams``).

``context.targetingKey`` is the customer id. A key is a Vellum flag (a customer's
flags document); ``module:<id>`` is the entitlement check for module ``<id>``
(``can``). Answers follow the spec (open-feature/protocol ``service/openapi.yaml``):
200 carries ``key``, ``value``, ``reason`` and ``variant``; 400 and 404 carry
``key``, ``errorCode`` and ``errorDetails`` (bulk refusals have no ``key``);
every body is JSON with ``Content-Type: application/json``, and these shapes never
go through the local API's error envelope. With nothing cached and no answer from
the upstream the evaluation cannot be made: 500 ``GENERAL`` (the spec's status for
that), which every provider turns into the caller's default. The sidecar's
``SIDECAR_FAIL_OPEN_MODULES`` does not apply here: the caller's default is the
policy.

Reasons (the spec's enum): a flag whose value differs from the tenant-global value
is ``TARGETING_MATCH`` (the customer has an override), one equal to it ``STATIC``,
``UNKNOWN`` when the global flags cannot be read; a module is ``TARGETING_MATCH``
(variant ``allowed`` or ``denied``) for a customer the upstream knows and
``STATIC`` ``false`` for one it does not. Flag variants are ``on`` and ``off``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Sequence
from typing import Any, Final
from urllib.parse import quote

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from aiohttp.web_request import BaseRequest

from ..appkeys import CACHES, OFREP_STREAMS, SETTINGS
from ..cache.cache import Caches, DocumentCache
from ..cache.entry import Lookup, Source
from ..cache.kinds import GLOBAL_ID
from ..errors import UpstreamError
from .inputs import MAX_ID_LENGTH, id_problem, valid_id
from .limits import begin_stream
from .responses import CACHE_HEADER, closing_after_unreadable_body, source_response

__all__ = [
    "MODULE_PREFIX",
    "STREAM_PATH",
    "evaluate",
    "evaluate_bulk",
    "evaluate_key",
    "events",
    "stream_uri",
]

log = logging.getLogger("sidecar.ofrep")

#: A key with this prefix is the entitlement check of the module after it.
MODULE_PREFIX: Final = "module:"
#: The SSE stream the bulk answer advertises (relative: the provider adds its origin).
STREAM_PATH: Final = "/ofrep/v1/events"
#: Seconds between keep-alive comments on an idle stream (proxies close silent ones).
KEEPALIVE: Final = 15.0

_JSON: Final = "application/json"
_SOURCE_RANK: Final[dict[Source, int]] = {"hit": 0, "miss": 1, "stale": 2}


class _Refused(Exception):
    """An evaluation the spec answers with an error shape (never the local envelope)."""

    def __init__(
        self, status: int, code: str, details: str, *, unreadable: BaseRequest | None = None
    ) -> None:
        super().__init__(details)
        self.status = status
        self.code = code
        self.details = details
        self.unreadable = unreadable  # a request whose body cannot be read to its end


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(data, option=orjson.OPT_SORT_KEYS),
        status=status,
        headers={"Content-Type": _JSON, **(headers or {})},
    )


def _refusal(exc: _Refused, key: str | None) -> web.Response:
    body: dict[str, Any] = {"errorCode": exc.code, "errorDetails": exc.details}
    if key is not None:
        body["key"] = key
    response = _json(body, exc.status)
    if exc.unreadable is not None:
        return closing_after_unreadable_body(exc.unreadable, response)
    return response


# -- the request ---------------------------------------------------------------------------


async def _body(request: BaseRequest) -> bytes:
    """The request's body. An evaluation's small body arrives with its head, whole
    before the handler runs: then it is taken as it is, without ``read()``'s two
    awaits and two copies (the same size limit applies)."""
    content = request.content
    if not content.is_eof():
        return await request.read()
    raw = content.read_nowait()
    limit = request.client_max_size
    if limit and len(raw) > limit:
        raise web.HTTPRequestEntityTooLarge(limit, len(raw))
    return raw


async def _customer(request: BaseRequest) -> str:
    """The body's ``context.targetingKey``: the customer every flag is evaluated for."""
    try:
        raw = await _body(request)
    except RequestPayloadError:
        details = "the body does not decode (its Content-Encoding)"
        raise _Refused(400, "PARSE_ERROR", details, unreadable=request) from None
    try:
        data = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        raise _Refused(400, "PARSE_ERROR", "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise _Refused(400, "PARSE_ERROR", 'the body must be a JSON object {"context": {...}}')
    context = data.get("context")
    if context is None:
        raise _Refused(400, "TARGETING_KEY_MISSING", "the request has no context.targetingKey")
    if not isinstance(context, dict):
        raise _Refused(400, "INVALID_CONTEXT", "context must be a JSON object")
    return _targeting_key(context.get("targetingKey"))


def _targeting_key(value: Any) -> str:
    if value is None or value == "":
        raise _Refused(
            400,
            "TARGETING_KEY_MISSING",
            "context.targetingKey (the customer id) is required",
        )
    if not isinstance(value, str):
        raise _Refused(400, "INVALID_CONTEXT", "context.targetingKey must be a string")
    if not valid_id(value):
        # The customer id: the id rule of every surface (``inputs.id_problem``).
        raise _Refused(400, "INVALID_CONTEXT", f"context.targetingKey {id_problem(value)}")
    return value


async def _lookup(cache: DocumentCache, ident: str) -> Lookup:
    found = cache.hit(ident)
    if found is not None:
        return found
    try:
        return await cache.get(ident)
    except UpstreamError as exc:
        raise _Refused(
            500, "GENERAL", f"no answer from the upstream and nothing cached: {exc.message}"
        ) from None


async def _globals(caches: Caches) -> Lookup | None:
    """The tenant's global flags, for the reasons; ``None`` when they cannot be read."""
    try:
        return await _lookup(caches.global_flags, GLOBAL_ID)
    except _Refused:
        return None


# -- evaluation ----------------------------------------------------------------------------


def _flag_result(key: str, value: bool, globals_: Lookup | None) -> dict[str, Any]:
    if globals_ is None:
        reason = "UNKNOWN"
    elif globals_.entry.flag(key) == value:
        reason = "STATIC"
    else:
        reason = "TARGETING_MATCH"
    return {"key": key, "value": value, "reason": reason, "variant": "on" if value else "off"}


def _module_result(key: str, lookup: Lookup) -> dict[str, Any]:
    entry = lookup.entry
    if not entry.found:
        return {"key": key, "value": False, "reason": "STATIC", "variant": "denied"}
    allowed = entry.has(key[len(MODULE_PREFIX) :])
    variant = "allowed" if allowed else "denied"
    return {"key": key, "value": allowed, "reason": "TARGETING_MATCH", "variant": variant}


def _not_found(key: str) -> _Refused:
    return _Refused(404, "FLAG_NOT_FOUND", f"Flag '{key}' was not found")


def _least_fresh(lookups: Sequence[Lookup]) -> tuple[Source, float]:
    """An answer built from several documents: the least fresh source, the oldest fetch."""
    first = lookups[0]
    source, fetched_at = first.source, first.entry.fetched_at
    for lookup in lookups[1:]:
        if _SOURCE_RANK[lookup.source] > _SOURCE_RANK[source]:
            source = lookup.source
        fetched_at = min(fetched_at, lookup.entry.fetched_at)
    return source, fetched_at


def _cache_headers(lookups: Sequence[Lookup]) -> dict[str, str]:
    """The cached-read headers (``X-Sidecar-Cache``, ``Age``) of ``_least_fresh``."""
    source, fetched_at = _least_fresh(lookups)
    return {CACHE_HEADER: source, "Age": str(max(int(time.time() - fetched_at), 0))}


def _marked(result: dict[str, Any], lookup: Lookup) -> dict[str, Any]:
    """OpenFeature's ``STALE`` reason for a value read from a document served stale
    (the upstream could not answer: docs/operations.md, "Drops and staleness")."""
    if lookup.source == "stale":
        result["reason"] = "STALE"
    return result


def _evaluation(result: dict[str, Any], lookups: Sequence[Lookup]) -> web.Response:
    """One evaluation's 200, with the cached-read headers of the documents it used (the
    first one gave the value)."""
    _marked(result, lookups[0])
    body = orjson.dumps(result, option=orjson.OPT_SORT_KEYS)
    return source_response(body, *_least_fresh(lookups))


async def evaluate_key(app: web.Application, request: BaseRequest, key: str) -> web.StreamResponse:
    """``POST /ofrep/v1/evaluate/flags/{key}``: one flag for ``context.targetingKey``.

    A hot route (``http/hot.py``): the front door calls it with the key it matched,
    the router through ``evaluate``.
    """
    try:
        customer = await _customer(request)
        if not 0 < len(key) <= MAX_ID_LENGTH:
            raise _not_found(key)
        caches = app[CACHES]
        if key.startswith(MODULE_PREFIX):
            if len(key) == len(MODULE_PREFIX):
                raise _not_found(key)
            lookup = await _lookup(caches.entitlements, customer)
            return _evaluation(_module_result(key, lookup), (lookup,))
        lookup = await _lookup(caches.flags, customer)
        value = lookup.entry.flag(key)
        if value is None:
            raise _not_found(key)
        globals_ = await _globals(caches)
        used = (lookup,) if globals_ is None else (lookup, globals_)
        return _evaluation(_flag_result(key, value, globals_), used)
    except _Refused as exc:
        return _refusal(exc, key)


async def evaluate(request: web.Request) -> web.StreamResponse:
    """``evaluate_key`` for what the router serves: the key as the match info decoded
    it, first held to the id rule (the front door only takes keys that pass it)."""
    key = request.match_info["key"]
    if 0 < len(key) <= MAX_ID_LENGTH and not valid_id(key):
        return _refusal(_Refused(400, "GENERAL", f"the flag key {id_problem(key)}"), key)
    return await evaluate_key(request.app, request, key)


async def evaluate_bulk(request: web.Request) -> web.StreamResponse:
    """``POST /ofrep/v1/evaluate/flags``: every flag of ``context.targetingKey``, sorted
    by key: the customer's Vellum flags and ``module:<id>`` for each module it has.

    The ``ETag`` is a hash of the tenant, the customer and the evaluations, so every
    sidecar holding the same documents (they come from the shared Redis) gives the
    same one, and a refetch of unchanged documents keeps it. The flag-config query
    parameters an SSE-triggered refetch adds are accepted and not needed: the
    stream only fires after the documents were dropped, so the next read is new.
    """
    try:
        customer = await _customer(request)
        caches = request.app[CACHES]
        flags = await _lookup(caches.flags, customer)
        entitlements = await _lookup(caches.entitlements, customer)
    except _Refused as exc:
        return _refusal(exc, None)
    globals_ = await _globals(caches)
    results: list[dict[str, Any]] = []
    doc_flags = flags.entry.doc.get("flags") if flags.entry.doc is not None else None
    if isinstance(doc_flags, dict):
        for name, value in doc_flags.items():
            if isinstance(value, bool):
                results.append(_marked(_flag_result(name, value, globals_), flags))
    doc = entitlements.entry.doc
    modules = doc.get("modules") if doc is not None else None
    if isinstance(modules, list):
        for module in dict.fromkeys(m for m in modules if isinstance(m, str) and m):
            results.append(
                _marked(_module_result(MODULE_PREFIX + module, entitlements), entitlements)
            )
    results.sort(key=lambda r: str(r["key"]))
    evaluations = orjson.dumps(results, option=orjson.OPT_SORT_KEYS)
    tenant = request.app[SETTINGS].tenant_id
    digest = hashlib.blake2b(digest_size=16)
    for part in (tenant.encode(), customer.encode(), evaluations):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    etag = f'"{digest.hexdigest()}"'
    used = [flags, entitlements] + ([globals_] if globals_ is not None else [])
    headers = {"ETag": etag, **_cache_headers(used)}
    if _matches(request.headers.get("If-None-Match"), etag):
        return web.Response(status=304, headers={"Content-Type": _JSON, **headers})
    stream = {"type": "sse", "endpoint": {"requestUri": stream_uri(customer)}}
    return _json({"flags": results, "eventStreams": [stream]}, headers=headers)


def stream_uri(customer: str) -> str:
    """The customer's event stream, relative to the provider's OFREP base URL origin."""
    return f"{STREAM_PATH}?targetingKey={quote(customer, safe='')}"


def _matches(if_none_match: str | None, etag: str) -> bool:
    """``If-None-Match`` against our ETag (weak comparison, as RFC 9110 asks for it)."""
    if not if_none_match:
        return False
    for candidate in if_none_match.split(","):
        tag = candidate.strip()
        if tag == "*" or tag.removeprefix("W/") == etag:
            return True
    return False


# -- the event stream ----------------------------------------------------------------------


_REFETCH: Final = orjson.dumps({"type": "refetchEvaluation"})


async def events(request: web.Request) -> web.StreamResponse:
    """``GET /ofrep/v1/events?targetingKey=<customer>``: Server-Sent Events, one
    ``refetchEvaluation`` message per change of the customer's documents.

    Missed events are not replayed: a client that reconnects with ``Last-Event-ID``
    gets one ``refetchEvaluation`` at once instead (and the spec has providers
    re-fetch after every reconnect anyway).
    """
    given = request.query.getall("targetingKey", [])
    try:
        if len(given) > 1:
            raise _Refused(400, "INVALID_CONTEXT", "targetingKey must be given once")
        customer = _targeting_key(given[0] if given else None)
    except _Refused as exc:
        return _refusal(exc, None)
    streams = request.app[OFREP_STREAMS]
    if streams.closing:
        return _json({"errorCode": "GENERAL", "errorDetails": "the sidecar is stopping"}, 503)
    headers = {
        "Content-Type": "text/event-stream",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
    }
    if request.method == "HEAD":
        # As every GET route: the headers, no body (here: no stream).
        return web.Response(headers=headers)
    full = begin_stream(request)
    if full is not None:
        # Streams have their own cap (SIDECAR_MAX_STREAMS), apart from the
        # connection cap, so they never shut out requests (http/limits.py).
        details = f"this sidecar holds its maximum of {full} event streams"
        return _json({"errorCode": "GENERAL", "errorDetails": details}, 503)
    response = web.StreamResponse(headers=headers)
    # The connection was counted as a stream from here on: it closes with it.
    response.force_close()
    with streams.subscribe(customer) as sub:
        await response.prepare(request)
        # A comment first, so the client sees the stream open at once.
        await response.write(b": vellum-sidecar ofrep events\nretry: 1000\n\n")
        if "Last-Event-ID" in request.headers:
            sub.pending = True
        try:
            while not sub.closing:
                if sub.pending:
                    sub.pending = False
                    frame = b"id: %s\nevent: message\ndata: %s\n\n" % (
                        streams.next_id().encode(),
                        _REFETCH,
                    )
                    await response.write(frame)
                    continue
                sub.wake.clear()
                try:
                    await asyncio.wait_for(sub.wake.wait(), KEEPALIVE)
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")
        except (ConnectionResetError, ConnectionError):
            # The client went away; nothing to answer.
            log.debug("ofrep_stream_closed_by_client")
    return response
