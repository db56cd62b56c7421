"""Every route of the local API, registered in one place.

The sidecar's own routes (``can``, ``check``, a flag, the cache drops, OFREP, a
usage record's outcome and the contract) are listed here, the hot ones (``HOT``)
first: the front door (``http/hot.py``) answers their plain requests below the
router; every operation of the table (``http/operations.py``) is registered on
both surfaces, answered from its kind's cache (``cache``) or forwarded to the
upstream (on ``/v1``, a ``deferred`` one with ``Prefer: respond-async`` is queued
instead: ``http/usage.py``). Every GET also answers HEAD.
Last comes the mirror's catch-all: any other method or path under
``/tenants/{tenant}/`` is an operation the table does not know
(``forwarding.forward_unknown``). It must stay the last route registered, so
every known operation (and every route above) matches first.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

from ..appkeys import CACHES
from ..cache.kinds import GLOBAL_ID, KINDS
from . import entitlements, flags, ofrep, usage
from .forwarding import check_tenant, forward, forward_unknown
from .hot import HOT_ROUTES, HotRoute
from .inputs import path_id
from .middleware import UNMATCHED, Handler, guarded, guarded_hot, unmatched
from .operations import OPERATIONS, SURFACES, Operation, Surface

__all__ = ["add_routes"]

#: Any one segment, even an empty one: ids may contain braces (aiohttp's default
#: ``[^{}/]+`` refuses them), and an empty id is a 400 naming it, not a bare 404.
_ID: str = "[^/]*"

_OPENAPI: bytes | None = None

#: The hot routes (``http/hot.py``): registered first, and answered by the front door.
HOT: tuple[HotRoute, ...] = (
    HotRoute("GET", "/v1/customers/{customer}/can/{module}", entitlements.can,
             entitlements.can_route),
    HotRoute("GET", "/v1/customers/{customer}/flags/{name}", flags.flag, flags.flag_route),
    HotRoute("POST", "/ofrep/v1/evaluate/flags/{key}", ofrep.evaluate_key, ofrep.evaluate),
)  # fmt: skip


def add_routes(app: web.Application) -> None:
    """Register the local API on ``app``: the routes below, then the operation table's,
    each handler ``guarded``; last the catch-all answering every other path."""
    r = app.router

    def add(method: str, path: str, handler: Handler, name: str | None = None) -> str:
        """Register ``handler``, guarded; return the route's label (canonical path)."""
        resource = r.add_resource(path, name=name)
        wrapped = guarded(app, resource.canonical, handler)
        if method == "GET":
            # HEAD answers like GET without the body, as aiohttp's add_get does.
            resource.add_route("HEAD", wrapped)
        resource.add_route(method, wrapped)
        return resource.canonical

    # The hot routes: on the router, and for the front door under the same label.
    app[HOT_ROUTES] = tuple(
        (route, guarded_hot(app, add(route.method, route.pattern, route.routed), route))
        for route in HOT
    )
    add("POST", "/v1/check", entitlements.check)
    add("DELETE", f"/v1/customers/{{customer:{_ID}}}/cache", entitlements.drop_customer)
    add("DELETE", "/v1/cache", entitlements.drop_all)
    add("POST", "/ofrep/v1/evaluate/flags", ofrep.evaluate_bulk)
    add("GET", ofrep.STREAM_PATH, ofrep.events)
    add("GET", f"/v1/usage/{{idempotencyKey:{_ID}}}", usage.outcome)
    add("GET", "/openapi.json", openapi)
    for op in OPERATIONS:
        for surface in SURFACES:
            add(op.method, op.route(surface), _operation_handler(op, surface),
                name=f"{surface}.{op.name}")  # fmt: skip
    # The mirror's catch-all must not shadow any route registered above.
    add("*", "/tenants/{tenant}/{path:.*}", forward_unknown, name="mirror.unknown")
    # Last of all: every path no route serves (404, or 405 with Allow), in JSON.
    resource = r.add_resource("/{path:.*}", name=UNMATCHED)
    resource.add_route("*", guarded(app, UNMATCHED, unmatched))


def _operation_handler(op: Operation, surface: Surface) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        if surface == "mirror":
            check_tenant(request)
        ids = {name: path_id(request, name) for name in op.params}
        if deferred and usage.prefers_async(request):
            return await usage.consume_async(request, ids)
        if kind is not None:
            cache = request.app[CACHES].of_kind(kind)
            ident = ids["customer"] if kind.per_customer else GLOBAL_ID
            return await entitlements.read_cached(request, cache, ident, surface)
        return await forward(request, op, ids, surface)

    kind = KINDS[op.cache] if op.cache is not None else None
    deferred = op.deferred and surface == "v1"
    return handle


async def openapi(request: web.Request) -> web.StreamResponse:
    """``sidecar/openapi.json`` as it is (written by ``scripts/gen_openapi.py``)."""
    global _OPENAPI
    if _OPENAPI is None:
        _OPENAPI = resources.files("sidecar").joinpath("openapi.json").read_bytes()
    return web.Response(body=_OPENAPI, content_type="application/json")
