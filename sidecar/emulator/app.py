"""The emulator's HTTP face: the upstream routes, the request pipeline, the app factory.

Upstream routes live under ``/tenants/{t}/...`` and need an ``x-api-key``; they
are the operations' own (``operations.ROUTES``: the upstream's contract, not the
sidecar's operation table, because the emulator stands in for an external
service). Each request goes through one pipeline: log it, authenticate it, apply
delays and injected failures, replay an ``Idempotency-Key``, run the operation
in :class:`State` (which answers data), deliver the pushes it caused, apply
holds, send the answer. The admin API (``admin.py``) lives under ``/_emulator/``
and needs no key. Tests in the same process use the :class:`Emulator` object
directly: ``app[EMULATOR]``.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any, Final

import aiohttp
import orjson
from aiohttp import web

from .admin import ADMIN_ROUTES
from .operations import OPERATIONS, ROUTES
from .service import EMULATOR, Emulator, to_response
from .wire import Answer, Call, EmulatorError, RecordedRequest, error_code

__all__ = ["UPSTREAM_ROUTES", "create_emulator_app"]

log = logging.getLogger("sidecar.emulator")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


#: (operation, method, path under ``/tenants/{tenant}``) of every upstream operation, in
#: the order of the SDK's table (``operations.ROUTES``).
UPSTREAM_ROUTES: Final[Sequence[tuple[str, str, str]]] = tuple(
    (route.operation, route.method, route.path) for route in ROUTES
)

_PARAM = re.compile(r"\{([a-z_]+)\}")


def route_path(template: str) -> str:
    """Let ``{name}`` match any segment.

    aiohttp matches against the path with everything but ``%2F`` and ``%25``
    decoded, and its default ``[^{}/]+`` would refuse ids containing braces.
    ``[^/]+`` takes any id; match_info then holds it fully decoded.
    """
    return _PARAM.sub(r"{\1:[^/]+}", template)


async def _answer(request: web.Request) -> Answer:
    """Run the route's operation and deliver the pushes it caused."""
    em = request.app[EMULATOR]
    params = dict(request.match_info)
    tenant = params.pop("tenant")
    call = Call(
        operation=request.match_info.route.name or "",
        tenant=tenant,
        mode=em.mode_of(request.headers.get("x-api-key")) or "test",
        params=params,
        query=dict(request.query),
        body=await request.read(),
    )
    answer: Answer = (await em.run(lambda: em.answer(call)))[0]
    return answer


async def _upstream(request: web.Request) -> web.StreamResponse:
    """The handler of every upstream route; the pipeline around it is :func:`_middleware`."""
    return to_response(await _answer(request))


def _error(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    return to_response(Answer.error(status, code, message, headers))


async def _as_response(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except EmulatorError as exc:
        return to_response(exc.answer())
    except web.HTTPException as exc:  # the router's 404 and 405
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        message = f"{exc.reason}: {request.method} {request.raw_path.partition('?')[0]}"
        return _error(exc.status, error_code(exc.status), message, headers)


@web.middleware
async def _middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Upstream requests: log, authenticate, delay/fail, replay or run, then hold."""
    if request.raw_path.startswith("/_emulator/"):
        return await _as_response(request, handler)

    em = request.app[EMULATOR]
    name = request.match_info.route.name
    operation = name if name in OPERATIONS else "unknown"
    try:
        record = await _record(em, request, operation)
    except web.HTTPRequestEntityTooLarge as exc:
        return _error(413, "payload_too_large", exc.text or "request body too large")
    if em.mode_of(record.api_key) is None:
        return _error(401, "unauthorized", "missing or invalid x-api-key")
    for seconds in em.take_delays(operation):
        await asyncio.sleep(seconds)
    if (injected := em.take_failure(operation)) is not None:
        return to_response(injected)

    if operation == "unknown":
        return await _as_response(request, handler)  # the router's JSON 404 or 405
    key = record.idempotency_key if request.method not in ("GET", "HEAD") else None
    raw = await request.read()
    replayed = None if key is None else em.replay(operation, record.path, key, raw)
    if replayed is not None:
        return to_response(replayed)
    answer = await _answer(request)
    if key is not None:
        em.remember(operation, record.path, key, raw, answer)
    for hold in em.holds_for(operation):
        await hold.wait()
    return to_response(answer)


async def _record(em: Emulator, request: web.Request, operation: str) -> RecordedRequest:
    """Log the request; a body over the size limit is logged as None, then re-raised."""
    too_large: web.HTTPRequestEntityTooLarge | None = None
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raw, too_large = b"", exc
    body: Any = None
    if raw:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
    record = RecordedRequest(
        operation=operation,
        method=request.method,
        path=request.raw_path.partition("?")[0],
        params=dict(request.match_info),
        query=dict(request.query),
        body=body,
        api_key=request.headers.get("x-api-key"),
        idempotency_key=request.headers.get("Idempotency-Key"),
        traceparent=request.headers.get("traceparent"),
        tracestate=request.headers.get("tracestate"),
    )
    em.requests.append(record)
    if too_large is not None:
        raise too_large
    return record


async def _push_session(app: web.Application) -> AsyncIterator[None]:
    emulator = app[EMULATOR]
    async with aiohttp.ClientSession() as session:
        emulator._session = session
        try:
            yield
        finally:
            emulator.clear_faults()
            await emulator.wait_pushes_idle()
            emulator._session = None


async def _release_holds(app: web.Application) -> None:
    # Held requests would otherwise keep a graceful shutdown waiting.
    app[EMULATOR].clear_faults()


def create_emulator_app(
    *,
    api_keys: Collection[str],
    webhook_url: str | None = None,
    webhook_secret: str | Sequence[str] | None = None,
    seed: bool = False,
    default_tenant: str | None = None,
    push_timeout: float = 5.0,
) -> web.Application:
    """Build the emulator app; its :class:`Emulator` is ``app[EMULATOR]``.

    ``seed`` loads :meth:`Emulator.seed_demo` into ``default_tenant`` (``"demo"``
    when None), which is also the tenant of the ``/_emulator/customers/...`` and
    ``/_emulator/push`` shorthands. Pushes go to ``webhook_url``, signed with
    ``webhook_secret`` (unsigned when None), and each attempt waits ``push_timeout``
    at most.
    """
    app = web.Application(middlewares=[_middleware])
    app[EMULATOR] = Emulator(
        api_keys=api_keys,
        webhook_url=webhook_url,
        webhook_secret=webhook_secret,
        seed=seed,
        default_tenant=default_tenant,
        push_timeout=push_timeout,
    )
    for route in ROUTES:
        path = route_path(f"/tenants/{{tenant}}{route.path}")
        app.router.add_route(route.method, path, _upstream, name=route.operation)
    for method, path, handler in ADMIN_ROUTES:
        app.router.add_route(method, route_path(path), handler)
    app.cleanup_ctx.append(_push_session)
    app.on_shutdown.append(_release_holds)
    return app
