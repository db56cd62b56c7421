"""The local API: cached reads, batch checks, cache drops; billing and the mirror in proxy.py.

Handlers are thin: parse and validate input, call the cache or the invalidator,
build the response. One middleware does the browser guard, metrics and the
mapping of domain errors to JSON.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, Final

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from .cache import Entry, Lookup
from .errors import BadRequest, SidecarError, UpstreamError, UpstreamUnavailable
from .keys import CACHE, GUARD, INVALIDATOR, METRICS, SETTINGS
from .responses import error_response, http_exception_response, json_response

__all__ = [
    "MAX_BATCH",
    "MAX_ID_LENGTH",
    "add_routes",
    "cached_response",
    "local_middleware",
    "path_id",
    "read_json",
]

log = logging.getLogger("sidecar.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

MAX_BATCH: Final = 1000
MAX_ID_LENGTH: Final = 512
CACHE_HEADER: Final = "X-Sidecar-Cache"


# -- middleware -------------------------------------------------------------------


@web.middleware
async def local_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Guard, time, count, and turn every error into the JSON shape."""
    app = request.app
    headers = request.headers
    refusal = app[GUARD].refusal(
        headers.get("Host"),
        headers.get("Origin"),
        headers.get("Sec-Fetch-Site"),
        headers.get("Referer"),
    )
    started = time.perf_counter()
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    if refusal is not None:
        response: web.StreamResponse = json_response(
            {"error": {"code": "forbidden", "message": refusal}}, 403
        )
    else:
        try:
            response = await handler(request)
        except SidecarError as exc:
            response = error_response(exc)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = http_exception_response(exc)
        except RequestPayloadError:
            response = json_response(
                {"error": {"code": "invalid_body", "message": "the request body is malformed"}},
                400,
            )
        except Exception:
            log.exception("unhandled_error", extra={"fields": {"route": route}})
            response = json_response(
                {"error": {"code": "internal_error", "message": "internal error"}}, 500
            )
    app[METRICS].observe_request(
        route, request.method, response.status, time.perf_counter() - started
    )
    return response


# -- input ----------------------------------------------------------------------------


def path_id(request: web.Request, name: str) -> str:
    value = request.match_info[name]
    if not value:
        raise BadRequest(f"{name} must not be empty", code="invalid_id")
    if len(value) > MAX_ID_LENGTH:
        raise BadRequest(f"{name} is longer than {MAX_ID_LENGTH} characters", code="invalid_id")
    return value


async def read_json(request: web.Request) -> Any:
    """The request body as JSON; 400 for anything that is not (invalid UTF-8 included)."""
    raw = await request.read()
    if not raw:
        raise BadRequest("a JSON body is required", code="invalid_json")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("the body is not valid JSON", code="invalid_json") from None


def _is_id(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH


# -- reads --------------------------------------------------------------------------


def cached_response(body: bytes, lookup: Lookup, status: int = 200) -> web.Response:
    age = int(time.time() - lookup.entry.fetched_at)
    # One headers dict (Content-Type included) is the cheapest way into a Response.
    return web.Response(
        body=body,
        status=status,
        headers={
            "Content-Type": "application/json",
            CACHE_HEADER: lookup.source,
            "Age": str(age) if age > 0 else "0",
        },
    )


async def can(request: web.Request) -> web.StreamResponse:
    """Fails closed: with no answer to be had, 503 and ``allowed: false``.

    Modules named in ``SIDECAR_FAIL_OPEN_MODULES`` answer 200 ``allowed: true``
    with ``fallback: true`` instead, so callers can tell the answer was a policy.
    """
    customer = path_id(request, "customer")
    module = path_id(request, "module")
    cache = request.app[CACHE]
    lookup = cache.hit(customer)
    if lookup is None:
        try:
            lookup = await cache.get(customer)
        except UpstreamError as exc:
            if module in request.app[SETTINGS].fail_open_modules:
                return json_response(_fallback(customer, module))
            raise UpstreamUnavailable(
                exc.message,
                code=exc.code,
                allowed=False,
                customerId=customer,
                module=module,
                status=None,
            ) from None
    entry = lookup.entry
    body = orjson.dumps(
        {
            "allowed": entry.has(module),
            "customerId": customer,
            "module": module,
            "status": entry.status,
        }
    )
    return cached_response(body, lookup)


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
        if not _is_id(customer) or not _is_id(module):
            raise BadRequest(
                f"checks[{i}] needs a non-empty customerId and module (strings, "
                f"at most {MAX_ID_LENGTH} characters)",
                code="invalid_body",
            )
        assert isinstance(customer, str)
        assert isinstance(module, str)
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
            results.append({"customerId": customer, "module": module, "allowed": entry.has(module)})
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
    customer = path_id(request, "customer")
    return _dropped(await request.app[INVALIDATOR].customers([customer], source="api"))


async def drop_all(request: web.Request) -> web.StreamResponse:
    return _dropped(await request.app[INVALIDATOR].tenant(source="api"))


def _dropped(shared: bool) -> web.Response:
    """204 once every sidecar was reached; 503 when only this one could be (Redis down)."""
    if shared:
        return web.Response(status=204)
    return json_response(
        {
            "error": {
                "code": "redis_unavailable",
                "message": "dropped on this sidecar only: Redis is down, other sidecars "
                "keep their in-process entries for up to SIDECAR_MEMORY_TTL",
            }
        },
        503,
    )


# -- contract -------------------------------------------------------------------------


_OPENAPI: bytes | None = None


async def openapi(request: web.Request) -> web.StreamResponse:
    global _OPENAPI
    if _OPENAPI is None:
        _OPENAPI = resources.files("sidecar").joinpath("openapi.json").read_bytes()
    return web.Response(body=_OPENAPI, content_type="application/json")


def add_routes(app: web.Application) -> None:
    r = app.router
    # "[^/]*" rather than aiohttp's default "[^{}/]+": ids may contain braces, and an
    # empty id is a 400 naming it rather than a bare 404 (as in proxy.py's table).
    r.add_get("/v1/customers/{customer:[^/]*}/can/{module:[^/]*}", can)
    r.add_post("/v1/check", check)
    r.add_delete("/v1/customers/{customer:[^/]*}/cache", drop_customer)
    r.add_delete("/v1/cache", drop_all)
    r.add_get("/openapi.json", openapi)
    # The entitlement read and every billing operation, on /v1 and the /tenants
    # mirror, come from proxy.py's one table. Imported here because proxy.py
    # builds on this module's input helpers.
    from .proxy import add_proxy_routes

    add_proxy_routes(app)
