"""JSON responses and the error shape shared by every listener."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final

import orjson
from aiohttp import web

from .errors import SidecarError

__all__ = [
    "error_response",
    "http_error_code",
    "http_exception_response",
    "json_errors",
    "json_response",
]

_HTTP_CODES: Final = {
    400: "bad_request",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    431: "headers_too_large",
}


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    body = data if isinstance(data, bytes) else orjson.dumps(data)
    return web.Response(body=body, status=status, headers=headers, content_type="application/json")


def error_response(exc: SidecarError, headers: dict[str, str] | None = None) -> web.Response:
    return json_response(exc.body(), exc.status, headers)


def http_error_code(status: int) -> str:
    return _HTTP_CODES.get(status, "bad_request" if status < 500 else "internal_error")


def http_exception_response(exc: web.HTTPException) -> web.Response:
    """aiohttp's own errors (unknown route, wrong method, body too large) as JSON."""
    message = exc.reason if exc.status != 413 else "request body too large"
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
    return json_response(
        {"error": {"code": http_error_code(exc.status), "message": message}}, exc.status, headers
    )


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """For the ops and webhook listeners: aiohttp's 404/405/413 pages as JSON."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return http_exception_response(exc)
