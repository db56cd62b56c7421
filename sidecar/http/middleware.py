"""The listeners' middlewares: every error leaves as the JSON envelope.

``local_middleware`` (the local API) also runs the browser guard and records
each request's metrics; ``json_errors`` (ops, webhooks, the workers' supervisor)
only turns aiohttp's own refusals into JSON.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from ..appkeys import GUARD, METRICS
from ..errors import Forbidden, SidecarError
from .responses import error_response, http_exception_response

__all__ = ["Handler", "json_errors", "local_middleware"]

# The logger's name predates the http/ package; log pipelines filter on it.
log = logging.getLogger("sidecar.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def local_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Guard, time, count, and turn every error into the JSON shape."""
    app = request.app
    refusal = app[GUARD].refusal(request.headers.get("Host"), request.headers.get("Origin"))
    started = time.perf_counter()
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    if refusal is not None:
        response: web.StreamResponse = error_response(Forbidden(refusal))
    else:
        try:
            response = await handler(request)
        except SidecarError as exc:
            response = error_response(exc)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = http_exception_response(exc)
        except Exception:
            log.exception("unhandled_error", extra={"fields": {"route": route}})
            response = error_response(SidecarError("internal error"))
    app[METRICS].observe_request(
        route, request.method, response.status, time.perf_counter() - started
    )
    return response


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """For the ops and webhook listeners: aiohttp's 404/405/413 pages as JSON."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return http_exception_response(exc)
