"""Every route of the local API, registered in one place.

The sidecar's own routes (``can``, ``check``, a flag, the cache drops, OFREP and
the contract) are listed here; every operation of the table
(``http/operations.py``) is registered on both surfaces, answered from its
kind's cache (``cache``) or forwarded to the upstream. Every GET also answers HEAD.
Last comes the mirror's catch-all: any other method or path under
``/tenants/{tenant}/`` is an operation the table does not know
(``forwarding.forward_unknown``). It must stay the last route registered, so
every known operation (and every route above) matches first.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

from ..appkeys import CACHES, SETTINGS
from ..cache.kinds import GLOBAL_ID, KINDS
from ..errors import NotFound
from . import entitlements, flags, ofrep
from .forwarding import forward, forward_unknown
from .inputs import path_id
from .middleware import Handler
from .operations import OPERATIONS, SURFACES, Operation, Surface

__all__ = ["add_routes"]

#: Any one segment, even an empty one: ids may contain braces (aiohttp's default
#: ``[^{}/]+`` refuses them), and an empty id is a 400 naming it, not a bare 404.
_ID: str = "[^/]*"

_OPENAPI: bytes | None = None


def add_routes(app: web.Application) -> None:
    """Register the local API on ``app``: the routes below, then the operation table's."""
    r = app.router
    r.add_get(f"/v1/customers/{{customer:{_ID}}}/can/{{module:{_ID}}}", entitlements.can)
    r.add_post("/v1/check", entitlements.check)
    r.add_get(f"/v1/customers/{{customer:{_ID}}}/flags/{{name:{_ID}}}", flags.flag)
    r.add_delete(f"/v1/customers/{{customer:{_ID}}}/cache", entitlements.drop_customer)
    r.add_delete("/v1/cache", entitlements.drop_all)
    r.add_post(f"/ofrep/v1/evaluate/flags/{{key:{_ID}}}", ofrep.evaluate)
    r.add_post("/ofrep/v1/evaluate/flags", ofrep.evaluate_bulk)
    r.add_get(ofrep.STREAM_PATH, ofrep.events)
    r.add_get("/openapi.json", openapi)
    for op in OPERATIONS:
        for surface in SURFACES:
            route, handler = op.route(surface), _operation_handler(op, surface)
            if op.method == "GET":
                # HEAD answers like GET without the body, as aiohttp's add_get does.
                r.add_route("HEAD", route, handler)
            r.add_route(op.method, route, handler, name=f"{surface}.{op.name}")
    # Last: the catch-all must not shadow any route registered above.
    r.add_route("*", "/tenants/{tenant}/{path:.*}", forward_unknown, name="mirror.unknown")


def _operation_handler(op: Operation, surface: Surface) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        if surface == "mirror" and request.match_info["tenant"] != request.app[SETTINGS].tenant_id:
            raise NotFound("this sidecar serves another tenant", code="unknown_tenant")
        ids = {name: path_id(request, name) for name in op.params}
        if kind is not None:
            cache = request.app[CACHES].of_kind(kind)
            ident = ids["customer"] if kind.per_customer else GLOBAL_ID
            return await entitlements.read_cached(request, cache, ident, surface)
        return await forward(request, op, ids, surface)

    kind = KINDS[op.cache] if op.cache is not None else None
    return handle


async def openapi(request: web.Request) -> web.StreamResponse:
    """``sidecar/openapi.json`` as it is (written by ``scripts/gen_openapi.py``)."""
    global _OPENAPI
    if _OPENAPI is None:
        _OPENAPI = resources.files("sidecar").joinpath("openapi.json").read_bytes()
    return web.Response(body=_OPENAPI, content_type="application/json")
