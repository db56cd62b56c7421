"""Building responses: JSON bodies, the error envelope for every listener, cached reads."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Final, TypeVar

import orjson
from aiohttp import web
from aiohttp.web_request import BaseRequest
from multidict import CIMultiDict, istr

from ..cache.entry import Lookup
from ..errors import (
    BadRequest,
    Forbidden,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    SidecarError,
    error_body,
)

__all__ = [
    "CACHE_HEADER",
    "cached_response",
    "closing_after_unreadable_body",
    "error_response",
    "http_error_code",
    "http_exception_response",
    "json_response",
    "source_response",
]

CACHE_HEADER: Final = "X-Sidecar-Cache"

#: aiohttp's own refusals that have a class in the error tree take that path.
_HTTP_ERRORS: Final[Mapping[int, type[SidecarError]]] = {
    400: BadRequest,
    403: Forbidden,
    404: NotFound,
    405: MethodNotAllowed,
    413: PayloadTooLarge,
}
#: The codes of the rarer refusals the HTTP layer makes.
_HTTP_CODES: Final = {
    408: "request_timeout",
    414: "uri_too_long",
    415: "unsupported_media_type",
    431: "headers_too_large",
}


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    body = data if isinstance(data, bytes) else orjson.dumps(data)
    return web.Response(body=body, status=status, headers=headers, content_type="application/json")


_R = TypeVar("_R", bound=web.StreamResponse)


def closing_after_unreadable_body(request: BaseRequest, response: _R) -> _R:
    """``response`` to a request whose body cannot be read to its end (it does not
    decode): the body counts as ended and the connection closes after the answer.
    Otherwise aiohttp reads on after the answer to drain the body, hits the same
    error and logs it as an unhandled exception."""
    request.content.feed_eof()
    response.force_close()
    return response


def error_response(exc: SidecarError, headers: dict[str, str] | None = None) -> web.Response:
    """A domain error as its status and JSON envelope (``SidecarError.body``), with
    ``Retry-After`` when the error names one."""
    if exc.retry_after is not None:
        headers = {**(headers or {}), "Retry-After": str(exc.retry_after)}
    return json_response(exc.body(), exc.status, headers)


def http_error_code(status: int) -> str:
    """The envelope's ``code`` for a refusal of the HTTP layer with this status."""
    cls = _HTTP_ERRORS.get(status)
    if cls is not None:
        return cls.code
    return _HTTP_CODES.get(status, "bad_request" if status < 500 else "internal_error")


def http_exception_response(exc: web.HTTPException) -> web.Response:
    """aiohttp's own errors (unknown route, wrong method, body too large) as JSON."""
    message = exc.reason if exc.status != 413 else "request body too large"
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
    cls = _HTTP_ERRORS.get(exc.status)
    if cls is not None:
        return error_response(cls(message), headers)
    return json_response(error_body(http_error_code(exc.status), message), exc.status, headers)


def cached_response(body: bytes, lookup: Lookup, status: int = 200) -> web.Response:
    """A cached read: ``X-Sidecar-Cache`` says where it came from, ``Age`` how old it is."""
    return source_response(body, lookup.source, lookup.entry.fetched_at, status)


def source_response(body: bytes, source: str, fetched_at: float, status: int = 200) -> web.Response:
    """``cached_response`` from its parts (the hot path has no ``Lookup`` to build)."""
    age = int(time.time() - fetched_at)
    if age < 0:
        age = 0
    key = (source, age)
    headers = _CACHED_HEADERS.get(key)
    if headers is None:
        headers = CIMultiDict(
            ((_CONTENT_TYPE, "application/json"), (_CACHE_HEADER, source), (_AGE, str(age)))
        )
        if len(_CACHED_HEADERS) < _MAX_CACHED_HEADERS:
            _CACHED_HEADERS[key] = headers
    # A ready multidict is the cheapest way into a Response, which copies it (and
    # adds its own headers to the copy when sent).
    return web.Response(body=body, status=status, headers=headers)


_CONTENT_TYPE: Final = istr("Content-Type")
_CACHE_HEADER: Final = istr(CACHE_HEADER)
_AGE: Final = istr("Age")
#: A cached read's headers by (source, age in seconds), built once each.
_CACHED_HEADERS: dict[tuple[str, int], CIMultiDict[str]] = {}
_MAX_CACHED_HEADERS: Final = 4096
