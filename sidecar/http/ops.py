"""Health, readiness and metrics for operators (``SIDECAR_OPS_LISTEN``)."""

from __future__ import annotations

from aiohttp import web

from ..appkeys import CORE, HEALTH, LIFECYCLE, METRICS, SETTINGS
from ..metrics import CONTENT_TYPE_LATEST
from .guard import HostGuard, guard_middleware
from .middleware import json_errors
from .responses import json_response

__all__ = ["create_ops_app"]


async def healthz(request: web.Request) -> web.StreamResponse:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.StreamResponse:
    """200 once the sidecar answers, 503 while starting or stopping (draining included)
    and, with ``SIDECAR_WAIT_FOR_DATA``, while it has nothing to answer with yet
    (``"status": "waiting"``, see ``HealthMonitor.has_data``).

    Redis down, the fan-out down, an upstream outage or a refused key do not
    make the sidecar unready: it still answers from memory, Redis, stale
    entries, fail-open modules or with a clear fail-closed error, and taking it
    out of service would only turn those answers into connection errors. The
    body names each dependency's state, from active checks (sidecar/health.py).
    """
    core = request.app[CORE]
    phase = core[LIFECYCLE].phase
    health = core.get(HEALTH)
    if health is None:  # the core app has not started (or has stopped)
        core[METRICS].observe_readiness(False)
        return json_response({"status": phase, "redis": "down", "upstream": "down"}, 503)
    status: str = phase
    if phase == "ready" and core[SETTINGS].wait_for_data and not health.has_data():
        status = "waiting"  # SIDECAR_WAIT_FOR_DATA: nothing to answer with yet
    body: dict[str, object] = {"status": status, **health.states()}
    core[METRICS].observe_readiness(status == "ready")
    return json_response(body, 200 if status == "ready" else 503)


async def metrics(request: web.Request) -> web.StreamResponse:
    core = request.app[CORE]
    body = core[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_ops_app(core: web.Application) -> web.Application:
    guard = HostGuard(core[SETTINGS].ops_allowed_hosts, ip_literals=True)
    app = web.Application(middlewares=[json_errors, guard_middleware(guard)])
    app[CORE] = core
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
