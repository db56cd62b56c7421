"""Running the listeners: bind, mark ready, wait for SIGTERM/SIGINT, drain, exit 0."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from aiohttp import web

from . import tracing
from .app import create_app
from .appkeys import LIFECYCLE, METRICS, UPSTREAM
from .config import Settings
from .http.limits import GuardedRunner, ListenerGuard, listener_guards
from .http.ops import create_ops_app
from .http.webhooks import create_webhook_app
from .values import Listen

__all__ = ["Listener", "bind", "listening_unix_socket", "run_sidecar"]

log = logging.getLogger("sidecar.server")


@dataclass
class Listener:
    name: str
    app: web.Application
    listen: Listen
    runner: web.AppRunner | None = field(default=None, repr=False)
    #: A socket bound and listening already (a worker's, from SIDECAR_WORKERS).
    sock: socket.socket | None = field(default=None, repr=False)
    #: Bind with SO_REUSEPORT, sharing the address with sibling workers.
    reuse_port: bool = False
    #: Timeouts and the connection cap (sidecar/http/limits.py); None: aiohttp's defaults.
    guard: ListenerGuard | None = field(default=None, repr=False)


async def bind(listener: Listener, *, shutdown_timeout: float, access_log: bool) -> None:
    """Start one listener's runner and site (TCP or unix socket)."""
    kwargs: dict[str, object] = {"shutdown_timeout": shutdown_timeout, "handle_signals": False}
    if not access_log:
        kwargs["access_log"] = None
    runner = (
        GuardedRunner(listener.app, guard=listener.guard, **kwargs)
        if listener.guard is not None
        else web.AppRunner(listener.app, **kwargs)  # type: ignore[arg-type]
    )
    await runner.setup()
    listener.runner = runner
    site: web.BaseSite
    backlog = listener.guard.limits.backlog if listener.guard is not None else 128
    sock = listener.sock
    if sock is None and listener.listen.path is not None:
        sock = listening_unix_socket(listener.listen.path, backlog)
    if sock is not None:
        site = web.SockSite(runner, sock, backlog=backlog)
    elif listener.reuse_port:
        site = web.TCPSite(
            runner, listener.listen.host, listener.listen.port, reuse_port=True, backlog=backlog
        )
    else:
        site = web.TCPSite(runner, listener.listen.host, listener.listen.port, backlog=backlog)
    await site.start()


async def _drain(listeners: list[Listener], settings: Settings) -> None:
    """Answer what arrives on open connections for a short while, each with Connection: close.

    A client that picked an idle keep-alive connection just before SIGTERM gets
    its answer instead of a connection closed under its request; the drain ends
    early once every connection of these listeners has closed.
    """
    guards = [x.guard for x in listeners if x.guard is not None]
    for guard in guards:
        guard.start_drain()
    log.info("draining", extra={"fields": {"seconds": settings.shutdown_drain}})
    await asyncio.gather(*(g.wait_drained(settings.shutdown_drain) for g in guards))


def listening_unix_socket(path: str, backlog: int) -> socket.socket:
    """A unix socket listening at ``path``, mode 0660, replacing a stale socket file there.

    Only this user (and its group, e.g. the pod's shared fsGroup) may connect: the
    mode is set before the socket listens, so no connection is accepted before.
    Anything at ``path`` that is not a socket is left alone (binding then fails).
    """
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o660)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


async def run_sidecar(
    settings: Settings,
    *,
    before: list[Listener] | None = None,
    on_ready: Callable[[], Awaitable[None] | None] | None = None,
    stop: asyncio.Event | None = None,
    sockets: Mapping[str, socket.socket] | None = None,
    reuse_port: bool = False,
) -> int:
    """Serve until SIGTERM/SIGINT (or ``stop``); return the exit code.

    ``before`` listeners (the demo's emulator) start first and stop last.
    A worker of ``SIDECAR_WORKERS`` (workers.py) passes ``sockets``, listening
    sockets to serve by listener name instead of binding (its ``unix:``
    listeners), and ``reuse_port`` to bind the local API and webhook TCP
    addresses with ``SO_REUSEPORT``.
    Shutdown: ``/readyz`` turns 503; for ``SIDECAR_SHUTDOWN_DRAIN`` seconds (or
    until every connection has closed) the local and webhook listeners still
    answer, each answer with ``Connection: close``; then they stop accepting
    and finish requests in flight (up to ``SIDECAR_SHUTDOWN_GRACE``), resources
    close, then the ops listener and the ``before`` listeners stop.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    core = create_app(settings, tracing=tracing.from_env(os.environ))
    listeners = list(before or [])
    local = Listener("local", core, settings.listen)
    ops = Listener("ops", create_ops_app(core), settings.ops_listen)
    order = [*listeners, ops, local]
    if settings.webhooks_enabled:
        order.append(Listener("webhooks", create_webhook_app(core), settings.webhook_listen))
    guards = listener_guards(settings, core[METRICS])
    for listener in order:
        listener.guard = guards.get(listener.name, listener.guard)
        if listener.name in ("local", "webhooks"):
            listener.sock = (sockets or {}).get(listener.name)
            listener.reuse_port = reuse_port
    started: list[Listener] = []
    code = 0
    ready = False
    try:
        for listener in order:
            await bind(
                listener, shutdown_timeout=settings.shutdown_grace, access_log=settings.access_log
            )
            started.append(listener)
            log.info(
                "listening",
                extra={"fields": {"listener": listener.name, "at": str(listener.listen)}},
            )
        # Waiting upstream calls stay under half of the local API's cap as fitted
        # (http/limits.py), so they never fill it (upstream.py).
        upstream = core[UPSTREAM]
        local_cap = guards["local"].limits.max_connections
        upstream.max_waiting = max(1, min(upstream.max_waiting, local_cap // 2))
        core[LIFECYCLE].phase = "ready"
        ready = True
        log.info("ready")
        if on_ready is not None:
            result = on_ready()
            if result is not None:
                await result
        await stop.wait()
        log.info("stopping")
    except OSError as exc:
        log.error(
            "cannot_listen",
            extra={"fields": {"listener": order[len(started)].name, "error": str(exc)}},
        )
        code = 1
    finally:
        core[LIFECYCLE].phase = "stopping"
        if ready and settings.shutdown_drain > 0:
            await _drain([x for x in started if x.name in ("local", "webhooks")], settings)
        for listener in reversed(started):
            if listener.runner is not None:
                await listener.runner.cleanup()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
    log.info("stopped", extra={"fields": {"exit_code": code}})
    return code
