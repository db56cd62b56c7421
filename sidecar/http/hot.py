"""The hottest reads, answered below aiohttp's Application layer (the front door).

``GET /v1/customers/{c}/can/{m}``, ``GET /v1/customers/{c}/flags/{name}`` and
``POST /ofrep/v1/evaluate/flags/{key}`` are what tiny clients and OpenFeature's
OFREP providers call on every request they serve. aiohttp's Application layer
(the router walking its resource index and matching patterns, the match info it
builds and freezes, ``Application._handle``) costs about as much as everything
the sidecar does for such a read, so these are matched first by a precompiled
pattern over the raw request target and handed to their handlers directly,
inside the same guard, metrics and JSON errors (``guarded_hot``) as every routed
request. The measured effect is in docs/performance.md.

Only the plain shape is answered here: the route's method, ids of characters
that need no decoding (no ``%``, no query string, no ``.``/``..`` segment, at
most ``MAX_ID_LENGTH`` characters), and for a route with a body no ``Expect``
header (the router answers ``100 Continue``). Such an id always passes the id
rule (``inputs.id_problem``: its characters hold no ``/``, ``\\`` or control
character), so the front door skips that check; anything else reaches the router,
which applies it. Everything else (HEAD,
percent-encoded or empty ids, ``?default=``, the other routes) goes to the router
as before, and each hot route is registered there too (``http/routes.py``), so
both ways give the same answer, headers and metrics label. The local app has no
middleware and no ``on_response_prepare`` signal; ``front_door`` refuses an app
that has either, since this path would skip them.

Every server of the local app (``GuardedRunner``, in production and in the
tests) puts the front door in front of the app.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final

from aiohttp import web
from aiohttp.web_request import BaseRequest
from multidict import istr

from .inputs import DOT_SEGMENTS, MAX_ID_LENGTH
from .responses import http_exception_response

__all__ = ["HOT_ROUTES", "HotHandler", "HotRoute", "front_door"]

#: A hot route's handler: the app, the request (a body to read) and the ids, validated.
HotHandler = Callable[..., Awaitable[web.StreamResponse]]
#: ``HotHandler`` inside the guard (``middleware.guarded_hot``): the request and the ids.
GuardedHot = Callable[..., Awaitable[web.StreamResponse]]
#: What a server calls with each request (the app's ``_handle``, the front door).
ServerHandler = Callable[[BaseRequest], Awaitable[web.StreamResponse]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Matcher = Callable[[str], "re.Match[str] | None"]

#: The router's pattern for an id: any one segment (``http/routes.py``).
_ID: Final = "[^/]*"
#: Characters of an id that reach the handler as they are (RFC 3986 unreserved and
#: sub-delims, ``:`` and ``@``): no ``%`` to decode, no ``?`` or ``#``.
_PLAIN: Final = rf"[A-Za-z0-9\-._~!$&'()*+,;=:@]{{1,{MAX_ID_LENGTH}}}"
#: Segments the URL parser removes or folds: never an id (``inputs.DOT_SEGMENTS``).
_DOTS: Final = DOT_SEGMENTS
#: A path parameter: ``{name}``, one whole segment.
_PARAM: Final = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True, slots=True)
class HotRoute:
    """``method path``, answered by ``handler`` (``path``: ``{param}`` placeholders,
    each one whole segment).

    ``routed`` is the same read as the router's handler (``request`` only): it
    takes the ids from the match info and whatever the front door does not
    serve (a query string), then calls ``handler``.
    """

    method: str
    path: str
    handler: HotHandler
    routed: Handler

    @property
    def pattern(self) -> str:
        """The router's pattern: each parameter any one segment."""
        return _PARAM.sub(lambda m: f"{{{m[1]}:{_ID}}}", self.path)

    @property
    def plain(self) -> re.Pattern[str]:
        """The front door's pattern: each parameter one plain id, captured."""
        literals = _PARAM.split(self.path)[::2]
        return re.compile(f"({_PLAIN})".join(re.escape(part) for part in literals))

    @property
    def has_body(self) -> bool:
        return self.method not in ("GET", "HEAD")


#: The local app's hot routes, each with its guarded handler (set by ``add_routes``).
HOT_ROUTES: Final = web.AppKey("hot_routes", tuple[tuple[HotRoute, GuardedHot], ...])

_EXPECT: Final = istr("Expect")


def front_door(app: web.Application, routed: ServerHandler) -> ServerHandler:
    """``routed`` (the app's own handler) with the hot routes answered before it.

    An app without hot routes (the ops and webhook listeners) gets ``routed`` back.
    """
    hot: Sequence[tuple[HotRoute, GuardedHot]] | None = app.get(HOT_ROUTES)
    if not hot:
        return routed
    if app.middlewares or app.on_response_prepare:
        raise RuntimeError("the front door would skip this app's middlewares and signals")
    by_method: dict[str, list[tuple[Matcher, GuardedHot, bool]]] = {}
    for route, handle in hot:
        entry = (route.plain.fullmatch, handle, route.has_body)
        by_method.setdefault(route.method, []).append(entry)

    async def front(request: BaseRequest) -> web.StreamResponse:
        routes = by_method.get(request.method)
        if routes is not None:
            path = request.raw_path
            for match, handle, has_body in routes:
                found = match(path)
                if found is not None:
                    ids = found.groups()
                    if _DOTS.isdisjoint(ids) and not (has_body and _EXPECT in request.headers):
                        return await handle(request, *ids)
                    break
        try:
            return await routed(request)
        except web.HTTPException as exc:
            # What no route can match (a CONNECT's authority form, OPTIONS *) is
            # refused by the router itself, outside every guarded handler.
            if exc.status < 400:
                raise
            return http_exception_response(exc)

    return front
