"""The hottest reads, answered below aiohttp's Application layer (the front door).

``GET /v1/customers/{c}/can/{m}`` and ``GET /v1/customers/{c}/flags/{name}`` are
what tiny clients call on every request they serve. aiohttp's Application layer
(the router walking its resource index and matching patterns, the match info it
builds and freezes, ``Application._handle``) costs about as much as everything
the sidecar does for such a read, so these two are matched first by one
precompiled pattern over the raw request target and handed to their handlers
directly, inside the same guard, metrics and JSON errors (``guarded_hot``) as
every routed request. The measured effect is in docs/performance.md.

Only the plain shape is answered here: GET, two ids of characters that need no
decoding (no ``%``, no query string, no ``.``/``..`` segment, at most
``MAX_ID_LENGTH`` characters). Everything else (HEAD, percent-encoded or empty
ids, ``?default=``, the other routes) goes to the router as before, and each hot
route is registered there too (``http/routes.py``), so both ways give the same
answer, headers and metrics label. The local app has no middleware and no
``on_response_prepare`` signal; ``front_door`` refuses an app that has either,
since this path would skip them.

Every server of the local app (``GuardedRunner``, in production and in the
tests) puts the front door in front of the app.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Final

from aiohttp import web
from aiohttp.web_request import BaseRequest

from .inputs import MAX_ID_LENGTH

__all__ = ["HOT_ROUTES", "HotHandler", "HotRoute", "front_door"]

#: A hot route's handler: the app and the two ids, already validated.
HotHandler = Callable[[web.Application, str, str], Awaitable[web.StreamResponse]]
#: ``HotHandler`` inside the guard (``middleware.guarded_hot``): the request first.
GuardedHot = Callable[[BaseRequest, str, str], Awaitable[web.StreamResponse]]
#: What a server calls with each request (the app's ``_handle``, the front door).
ServerHandler = Callable[[BaseRequest], Awaitable[web.StreamResponse]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: The router's pattern for an id: any one segment (``http/routes.py``).
_ID: Final = "[^/]*"
#: Characters of an id that reach the handler as they are (RFC 3986 unreserved and
#: sub-delims, ``:`` and ``@``): no ``%`` to decode, no ``?`` or ``#``.
_PLAIN: Final = rf"[A-Za-z0-9\-._~!$&'()*+,;=:@]{{1,{MAX_ID_LENGTH}}}"
#: Segments the URL parser removes or folds (RFC 3986 dot segments).
_DOTS: Final = frozenset({".", ".."})


@dataclass(frozen=True, slots=True)
class HotRoute:
    """``GET /v1/customers/{first}/{verb}/{second}``, answered by ``handler``.

    ``routed`` is the same read as the router's handler (``request`` only): it
    takes the ids from the match info and whatever the front door does not
    serve (a query string), then calls ``handler``.
    """

    verb: str
    params: tuple[str, str]
    handler: HotHandler
    routed: Handler

    @property
    def path(self) -> str:
        """The router's pattern."""
        first, second = self.params
        return f"/v1/customers/{{{first}:{_ID}}}/{self.verb}/{{{second}:{_ID}}}"


#: The local app's hot routes by verb, each already guarded (set by ``add_routes``).
HOT_ROUTES: Final = web.AppKey("hot_routes", dict[str, GuardedHot])


def front_door(app: web.Application, routed: ServerHandler) -> ServerHandler:
    """``routed`` (the app's own handler) with the hot routes answered before it.

    An app without hot routes (the ops and webhook listeners) gets ``routed`` back.
    """
    hot: Mapping[str, GuardedHot] | None = app.get(HOT_ROUTES)
    if not hot:
        return routed
    if app.middlewares or app.on_response_prepare:
        raise RuntimeError("the front door would skip this app's middlewares and signals")
    verbs = "|".join(re.escape(v) for v in hot)
    match = re.compile(f"/v1/customers/({_PLAIN})/({verbs})/({_PLAIN})").fullmatch

    async def front(request: BaseRequest) -> web.StreamResponse:
        if request.method == "GET":
            found = match(request.raw_path)
            if found is not None:
                first, verb, second = found.groups()
                if first not in _DOTS and second not in _DOTS:
                    return await hot[verb](request, first, second)
        return await routed(request)

    return front
