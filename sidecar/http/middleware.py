"""Around every handler: every error leaves as the JSON envelope.

The local API has no aiohttp middleware: aiohttp's middleware machinery costs
more than the sidecar's own work on a memory hit (docs/performance.md). Instead
``guarded`` wraps each of its handlers when the routes are registered
(``http/routes.py``), and ``guarded_hot`` each hot route's handler for the
front door (``http/hot.py``): the browser guard, the request's metrics and the
JSON errors run inline, one coroutine frame, and ``unmatched`` (a last catch-all
route, wrapped alike) answers the paths and methods no route serves with the
JSON 404 and 405 (``Allow`` included) aiohttp's router would have raised.

``json_errors`` (ops, webhooks, the workers' supervisor) is a middleware: it
only turns aiohttp's own refusals into JSON, off the hot path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from aiohttp.web_request import BaseRequest

from ..appkeys import GUARD, METRICS, TRACING
from ..errors import BadRequest, Forbidden, SidecarError
from .hot import GuardedHot, HotRoute
from .responses import closing_after_unreadable_body, error_response, http_exception_response

__all__ = ["UNMATCHED", "Handler", "guarded", "guarded_hot", "json_errors", "unmatched"]

# The logger's name predates the http/ package; log pipelines filter on it.
log = logging.getLogger("sidecar.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


#: The metrics' route label of requests no route serves.
UNMATCHED: Final = "unmatched"


def guarded(app: web.Application, route: str, handler: Handler) -> Handler:
    """``handler`` with the guard, timing, metrics and the JSON errors around it, for
    the route labelled ``route`` (its canonical path)."""
    refuse = app[GUARD].refusal
    observe = app[METRICS].observe_request
    clock = time.perf_counter

    async def guarded_handler(request: web.Request) -> web.StreamResponse:
        refusal = refuse(request.headers)
        started = clock()
        if refusal is None:
            try:
                response = await handler(request)
            except Exception as exc:
                response = _failure(exc, route, request)
        else:
            response = error_response(Forbidden(refusal))
        observe(route, request.method, response.status, clock() - started)
        return response

    guarded_handler.__name__ = guarded_handler.__qualname__ = getattr(
        handler, "__name__", "handler"
    )
    return app[TRACING].wrap(route, None, guarded_handler)


def guarded_hot(app: web.Application, label: str, route: HotRoute) -> GuardedHot:
    """``guarded`` for a hot route's handler (``http/hot.py``), which the front door
    calls with the ids it matched instead of a routed request."""
    refuse = app[GUARD].refusal
    observe = app[METRICS].observe_request
    clock = time.perf_counter
    handler, method = route.handler, route.method

    async def guarded_handler(request: BaseRequest, *ids: str) -> web.StreamResponse:
        refusal = refuse(request.headers)
        started = clock()
        if refusal is None:
            try:
                response = await handler(app, request, *ids)
            except Exception as exc:
                response = _failure(exc, label, request)
        else:
            response = error_response(Forbidden(refusal))
        observe(label, method, response.status, clock() - started)
        return response

    return app[TRACING].wrap(label, method, guarded_handler)


def _failure(exc: Exception, route: str, request: BaseRequest) -> web.StreamResponse:
    """The JSON answer to what a handler raised (called inside its ``except``)."""
    if isinstance(exc, SidecarError):
        return error_response(exc)
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc  # a redirect is an answer, not an error
        return http_exception_response(exc)
    if isinstance(exc, RequestPayloadError):
        malformed = BadRequest("the request body is malformed", code="invalid_body")
        return closing_after_unreadable_body(request, error_response(malformed))
    log.exception("unhandled_error", extra={"fields": {"route": route}})
    return error_response(SidecarError("internal error"))


async def unmatched(request: web.Request) -> web.StreamResponse:
    """The last route's handler: 405 with ``Allow`` when a route serves the path with
    other methods, else 404 (raised, so ``guarded`` answers them as JSON)."""
    own = request.match_info.route.resource
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not own:
            _, methods = await resource.resolve(request)
            allowed |= methods
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """For the ops and webhook listeners: aiohttp's 404/405/413 pages as JSON."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return http_exception_response(exc)
