"""The local API's cached reads: any kind's read, ``can``, batch checks, cache drops.

Handlers are thin: parse and validate input, call the cache or the invalidator,
build the response. Errors are raised as ``SidecarError``; the middleware turns
them into the JSON envelope.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_request import BaseRequest

from ..appkeys import CACHE, INVALIDATOR, METRICS, SETTINGS
from ..cache.cache import DocumentCache
from ..cache.entry import Entry, Lookup, Source
from ..cache.kinds import AXES, Axis
from ..errors import BadRequest, UpstreamError, UpstreamUnavailable
from .inputs import ID_RULE, MAX_BATCH, is_id, path_id, read_json
from .operations import Surface
from .responses import cached_response, json_response, source_response

__all__ = ["can", "can_route", "check", "drop_all", "drop_customer", "read_cached"]


async def read_cached(
    request: web.Request, cache: DocumentCache, ident: str, surface: Surface
) -> web.StreamResponse:
    """A cached read of any kind. ``/v1`` answers the kind's local body (an entitlement
    document adds ``found``, and an unknown customer is a 200 ``found: false``; flags
    are the upstream's document, a 404 ``not_found`` when it has none); the mirror
    answers exactly as the upstream would (its 404 stays a 404)."""
    lookup = await cache.get(ident)
    entry = lookup.entry
    if surface == "v1":
        return cached_response(entry.body(), lookup, entry.local_status)
    return cached_response(entry.upstream_body(), lookup, 200 if entry.found else 404)


async def can(
    app: web.Application, request: BaseRequest, customer: str, module: str
) -> web.StreamResponse:
    """Fails closed: with no answer to be had, 503 and ``allowed: false``.

    Modules named in ``SIDECAR_FAIL_OPEN_MODULES`` answer 200 ``allowed: true``
    with ``fallback: true`` instead, so callers can tell the answer was a policy.
    A hot route (``http/hot.py``): the front door calls it with the ids it
    matched, the router through ``can_route`` (``request`` is not read).
    """
    cache = app[CACHE]
    entry = cache.hit_entry(customer)
    source: Source = "hit"
    if entry is None:
        try:
            lookup = await cache.get_missed(customer)
        except UpstreamError as exc:
            if module in app[SETTINGS].fail_open_modules:
                return json_response(_fallback(customer, module))
            raise UpstreamUnavailable(
                exc.message,
                code=exc.code,
                retry_after=exc.retry_after,
                allowed=False,
                customerId=customer,
                module=module,
                status=None,
            ) from None
        entry, source = lookup.entry, lookup.source
        if source == "stale":
            return source_response(_stale_answer(entry, customer, module), source, entry.fetched_at)
    body = orjson.dumps(
        {
            "allowed": module in entry.modules,
            "customerId": customer,
            "module": module,
            "status": entry.status,
        }
    )
    return source_response(body, source, entry.fetched_at)


def _stale_answer(entry: Entry, customer: str, module: str) -> bytes:
    """``can``'s body from a document served stale (the upstream could not answer)."""
    return orjson.dumps(
        {
            "allowed": module in entry.modules,
            "customerId": customer,
            "module": module,
            "status": entry.status,
            "stale": True,
        }
    )


async def can_route(request: web.Request) -> web.StreamResponse:
    """``can`` for what the router serves: the ids as the match info decoded them."""
    customer, module = path_id(request, "customer"), path_id(request, "module")
    return await can(request.app, request, customer, module)


def _fallback(customer: str, module: str) -> dict[str, Any]:
    return {
        "allowed": True,
        "fallback": True,
        "customerId": customer,
        "module": module,
        "status": None,
    }


async def check(request: web.Request) -> web.StreamResponse:
    """Batch of up to 1,000 checks; at most one fetch per distinct customer, in order."""
    data = await read_json(request)
    checks = data.get("checks") if isinstance(data, dict) else None
    if not isinstance(checks, list):
        raise BadRequest(
            'expected {"checks": [{"customerId", "module"}, ...]}', code="invalid_body"
        )
    if len(checks) > MAX_BATCH:
        raise BadRequest(f"at most {MAX_BATCH} checks per request", code="batch_too_large")
    pairs: list[tuple[str, str]] = []
    for i, item in enumerate(checks):
        if not isinstance(item, dict):
            raise BadRequest(f"checks[{i}] must be an object", code="invalid_body")
        customer, module = item.get("customerId"), item.get("module")
        if not is_id(customer) or not is_id(module):
            raise BadRequest(
                f"checks[{i}] needs a customerId and a module, each an id ({ID_RULE})",
                code="invalid_body",
            )
        pairs.append((customer, module))
    # Memory hits are answered here, synchronously; only the rest pay for
    # get_many's one coroutine per customer (a batch of hits: ~2x faster).
    cache = request.app[CACHE]
    lookups: dict[str, Any] = {}
    missing: list[str] = []
    for customer, _ in pairs:
        if customer not in lookups:
            found = cache.hit(customer)
            if found is None:
                missing.append(customer)
            lookups[customer] = found
    if missing:
        # Answered within the read deadline, whatever the batch: customers not
        # fetched by then say "error": "timeout" (their fills carry on).
        deadline = request.app[SETTINGS].upstream_timeout
        lookups.update(await cache.get_many(missing, deadline=deadline))
    fail_open = request.app[SETTINGS].fail_open_modules
    results: list[dict[str, Any]] = []
    timeouts = 0
    for customer, module in pairs:
        found = lookups[customer]
        if isinstance(found, Lookup):
            entry: Entry = found.entry
            result = {"customerId": customer, "module": module, "allowed": entry.has(module)}
            if found.source == "stale":
                result["stale"] = True
            results.append(result)
        else:
            allowed = module in fail_open
            result = {"customerId": customer, "module": module, "allowed": allowed}
            if allowed:
                result["fallback"] = True
            result["error"] = found.code
            results.append(result)
            if found.code == "timeout":
                timeouts += 1
    if timeouts:
        request.app[METRICS].check_timeouts.inc(timeouts)
    return json_response({"results": results})


# -- cache drops -------------------------------------------------------------------------


async def drop_customer(request: web.Request) -> web.StreamResponse:
    """Drop one customer's cached documents (both axes, or the one ``?axis=`` names)."""
    customer = path_id(request, "customer")
    axes = _axes(request)
    return _dropped(await request.app[INVALIDATOR].customers([customer], source="api", axes=axes))


async def drop_all(request: web.Request) -> web.StreamResponse:
    """Drop everything cached for the tenant (both axes, or the one ``?axis=`` names)."""
    axes = _axes(request)
    return _dropped(await request.app[INVALIDATOR].tenant(source="api", axes=axes))


def _axes(request: web.Request) -> tuple[Axis, ...]:
    """``?axis=entitlements|flags`` narrows a drop; without it both axes go."""
    named = request.query.getall("axis", [])
    if not named:
        return AXES
    axis = next((a for a in AXES if a == named[0]), None) if len(named) == 1 else None
    if axis is None:
        raise BadRequest(f"axis must be one of {', '.join(AXES)}, once", code="invalid_query")
    return (axis,)


def _dropped(shared: bool) -> web.Response:
    """204 once Redis (so every sidecar) has it; 200 ``queued`` while Redis is down.

    Queued: dropped on this sidecar already, and on Redis and every other sidecar
    the moment Redis answers again (``Invalidator``), so the caller has nothing to
    retry.
    """
    if shared:
        return web.Response(status=204)
    return json_response({"ok": True, "queued": True})
