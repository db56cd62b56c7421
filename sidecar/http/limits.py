"""Listener limits: what a hostile or broken client can hold, and for how long.

aiohttp's server reads requests with no deadline of its own: a socket that sends
half a request line, or a body one byte every two seconds, keeps its connection
(and a file descriptor) for as long as it likes, and nothing caps how many such
sockets a listener holds. Every listener of the sidecar (local API, webhooks,
ops) is therefore served by :class:`GuardedRunner`, whose connections are
:class:`GuardedProtocol` instances enforcing:

- **a header deadline** (``SIDECAR_HEADER_TIMEOUT``): a request's line and
  headers must arrive within N seconds of its first byte, and a new connection
  must deliver its first request's headers within N seconds of being accepted.
  A connection cut with part of a request read gets a JSON 408 first; one that
  sent nothing is closed silently (an unsolicited 408 on a connection the
  client considers idle would be read as the answer to its next request);
- **a body deadline** (``SIDECAR_BODY_TIMEOUT``): the whole body must arrive
  within N seconds of the headers. The handler reading it gets a JSON 408 and
  the connection closes after the answer;
- **a keep-alive idle timeout** (``SIDECAR_KEEPALIVE_TIMEOUT``, aiohttp's own);
- **a cap on open connections** per listener (``SIDECAR_MAX_CONNECTIONS``,
  ``SIDECAR_WEBHOOK_MAX_CONNECTIONS``, ``SIDECAR_OPS_MAX_CONNECTIONS``). At the
  cap, the connection idle the longest (waiting for a next request, nothing of
  one read) is closed to make room, so idle sockets cannot crowd out working
  ones, and failing that the one whose request head has been dribbling in
  the longest (a second or more); when there is neither, the new socket is
  answered a JSON 503 and closed.

What the HTTP parser refuses (a request line over ``MAX_LINE_SIZE``, headers
over ``MAX_FIELD_SIZE``, malformed HTTP) is answered with the JSON error
envelope (414, 431 or 400) and logged at warning level with the listener and
the parser's error class only: never the raw line, which may carry ids.

During a shutdown drain (:meth:`ListenerGuard.start_drain`) every answer
carries ``Connection: close``, so each open connection gets the answer to the
request it sends and then closes.

Everything refused or cut is counted in
``vellum_sidecar_connections_refused_total{listener, reason}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final, Literal

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from aiohttp.web_request import BaseRequest
from prometheus_client import Counter, Gauge

from ..errors import SidecarError
from .hot import front_door

if TYPE_CHECKING:
    from ..config import Settings
    from ..metrics import Metrics

__all__ = [
    "MAX_FIELD_SIZE",
    "MAX_LINE_SIZE",
    "BodyTimeout",
    "GuardedProtocol",
    "GuardedRunner",
    "GuardedServer",
    "ListenerGuard",
    "ListenerLimits",
    "fit_to_fd_limit",
    "listener_guards",
    "raise_fd_limit",
]

log = logging.getLogger("sidecar.limits")

#: Longest request line: the documented ids are up to 512 characters, each up to
#: 4 bytes of UTF-8 and percent-encoded (12 bytes), and a mirror path carries up
#: to three of them (tenant, customer and credit type): 3 x 6,144 plus the rest.
MAX_LINE_SIZE: Final = 32 * 1024
#: Longest header line (name and value); different from MAX_LINE_SIZE so a
#: LineTooLong says which limit it hit.
MAX_FIELD_SIZE: Final = 16 * 1024
#: Descriptors kept out of the listeners' share: the Redis pool and the upstream
#: connector are added to this, the rest covers the loop, logs and listening sockets.
_FD_RESERVE: Final = 64
_UPSTREAM_CONNECTIONS: Final = 100
_MIN_CAP: Final = 4

Reason = Literal[
    "max_connections",
    "idle_evicted",
    "slow_evicted",
    "header_timeout",
    "body_timeout",
    "bad_request",
]


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    header_timeout: float = 5.0
    body_timeout: float = 10.0
    keepalive_timeout: float = 30.0
    max_connections: int = 1024

    #: The listen backlog, which is also how many sockets asyncio accepts at once.
    #: A refused socket is closed on the next loop iteration, so a flood holds up
    #: to about two batches of descriptors beyond the cap: ``fit_to_fd_limit``
    #: shrinks it when descriptors are scarce (the rest then wait in the kernel).
    backlog: int = 128


class BodyTimeout(web.HTTPRequestTimeout):
    """Raised to the handler reading a body that did not arrive in time."""


def _raw_error(status: int, reason: str, code: str, message: str) -> bytes:
    """A whole HTTP/1.1 error answer, for a connection no handler owns."""
    body = orjson.dumps(SidecarError(message, code=code).body())
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class ListenerGuard:
    """One listener's limits, its open connections, its counters and its drain state.

    The deadlines are enforced by one sweep over the open connections every
    ``sweep_interval`` seconds rather than by a timer per request: the hot
    path only stores a timestamp.
    """

    def __init__(
        self,
        name: str,
        limits: ListenerLimits,
        *,
        refused: Counter | None = None,
        open_gauge: Gauge | None = None,
    ) -> None:
        self.name = name
        self.limits = limits
        self._refused = refused
        self._open_gauge = open_gauge.labels(name) if open_gauge is not None else None
        self.connections: dict[GuardedProtocol, None] = {}
        self.draining = False
        self._drained: asyncio.Event | None = None
        self._sweeper: asyncio.Task[None] | None = None
        #: At the cap, a head still incomplete after this long may be closed for room.
        self.slow_head = min(1.0, limits.header_timeout / 2)
        #: A deadline is noticed at most this late.
        self.sweep_interval = min(max(min(limits.header_timeout, limits.body_timeout) / 5, 0.05), 1)
        self._timeout_answer = _raw_error(
            408, "Request Timeout", "request_timeout",
            f"the request's headers did not arrive within {limits.header_timeout:g} s",
        )  # fmt: skip
        self._busy_answer = _raw_error(
            503, "Service Unavailable", "too_many_connections",
            f"this listener holds its maximum of {limits.max_connections} connections",
        )  # fmt: skip

    def count(self, reason: Reason) -> None:
        if self._refused is not None:
            self._refused.labels(self.name, reason).inc()

    def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.sweep_interval)
            now = loop.time()
            for protocol in list(self.connections):
                protocol.check_deadlines(now)

    def _opened(self, protocol: GuardedProtocol) -> None:
        self.connections[protocol] = None
        if self._open_gauge is not None:
            self._open_gauge.set(len(self.connections))

    def _closed(self, protocol: GuardedProtocol) -> None:
        self.connections.pop(protocol, None)
        if self._open_gauge is not None:
            self._open_gauge.set(len(self.connections))
        if not self.connections and self._drained is not None:
            self._drained.set()

    def admit(self, now: float) -> bool:
        """Room for one more connection: below the cap, or once one is closed for it.

        At the cap the connection idle the longest goes first; failing that,
        the one whose request head has been dribbling in the longest, once it
        has taken ``slow_head`` seconds (a real client sends its head in
        milliseconds), so a slowloris must keep opening a whole cap's worth of
        sockets every ``slow_head`` seconds to keep others out.
        """
        if len(self.connections) < self.limits.max_connections:
            return True
        idle = [p for p in self.connections if p.idle]
        if idle:
            victim = min(idle, key=lambda p: p.idle_since)
            self.count("idle_evicted")
        else:
            slow = [p for p in self.connections if p.head_waiting_since(now, self.slow_head)]
            if not slow:
                return False
            victim = min(slow, key=lambda p: p.head_since or now)
            self.count("slow_evicted")
        victim.force_close()
        self._closed(victim)
        return True

    def start_drain(self) -> None:
        """From now on every answer carries ``Connection: close``."""
        self.draining = True
        self._drained = asyncio.Event()
        if not self.connections:
            self._drained.set()

    async def wait_drained(self, timeout: float) -> None:
        """Until every connection has closed, or ``timeout`` seconds."""
        if self._drained is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained.wait(), timeout)


class GuardedProtocol(RequestHandler):
    """aiohttp's request handler (one per connection) with the deadlines above."""

    __slots__ = (
        "_body_payload",
        "_body_since",
        "_cut",
        "_guard",
        "_head_since",
        "_partial",
        "_refused",
        "idle_since",
    )

    def __init__(self, manager: web.Server, *, guard: ListenerGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        #: When the head now awaited began: accept, or a next request's first byte.
        self._head_since: float | None = None
        #: When the body now awaited began (its head completed).
        self._body_since: float | None = None
        self._body_payload: StreamReader | None = None
        self._partial = False
        self._refused = False
        #: The body deadline passed: the answer closes the connection.
        self._cut = False
        self.idle_since = 0.0

    @property
    def idle(self) -> bool:
        """Waiting for a next request with nothing of one read (safe to close)."""
        waiter = self._waiter
        return (
            waiter is not None
            and not waiter.done()
            and not self._partial
            and not self._messages
            and not self._request_in_progress
            and not self._in_body()
        )

    @property
    def head_since(self) -> float | None:
        return self._head_since

    def head_waiting_since(self, now: float, at_least: float) -> bool:
        """Has a request head been awaited for ``at_least`` seconds (none being handled)?"""
        since = self._head_since
        return (
            since is not None
            and now - since >= at_least
            and not self._request_in_progress
            and not self._messages
        )

    def _in_body(self) -> bool:
        return self._body_payload is not None and not self._body_payload.is_eof()

    # -- connection ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self._guard
        if not guard.admit(self._loop.time()):
            self._refused = True
            guard.count("max_connections")
            assert isinstance(transport, asyncio.Transport)
            transport.write(guard._busy_answer)
            transport.close()
            return
        guard._opened(self)
        self.idle_since = self._head_since = self._loop.time()
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._refused:
            return
        self._guard._closed(self)
        super().connection_lost(exc)

    # -- reading -------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        # The hot path: a few attribute reads, one clock read per request, and the
        # base class called directly (no super() object per call).
        if self._refused:
            return
        body = self._body_payload
        if body is not None and body.is_eof():
            body = self._body_payload = None
        if body is None and data:
            self._partial = True
            if self._head_since is None:
                self._head_since = self._loop.time()  # the first bytes of a next request
        before = self._request_count
        _data_received(self, data)
        if self._request_count != before:
            self._head_completed(body)

    def _head_completed(self, body: StreamReader | None) -> None:
        """One or more request heads arrived; a body may follow the last."""
        messages = self._messages
        if body is not None and not body.is_eof():
            last = messages[-1][0] if messages else None
            if not isinstance(last, RawRequestMessage):
                # The parser refused what followed a head already handed to a
                # handler (a broken chunk): that handler's read fails now, with
                # a JSON 400, instead of waiting out the body deadline.
                self._guard.count("bad_request")
                self._cut = True
                self._lingering_time = 0.0
                body.set_exception(RequestPayloadError("the request body is malformed"))
        self._partial = False
        now = self._head_since or self._loop.time()
        self._head_since = None
        self.idle_since = now
        payload = messages[-1][1] if messages else None
        if payload is not None and not payload.is_eof():
            self._body_payload = payload
            self._body_since = self._loop.time()

    def check_deadlines(self, now: float) -> None:
        """Cut the connection if its head or its body is late (the guard's sweep)."""
        if self.transport is None:
            return
        limits = self._guard.limits
        if self._head_since is not None and now - self._head_since > limits.header_timeout:
            if self._request_in_progress or self._messages:
                # A pipelined request's head is late while an earlier one is still
                # being handled: its clock starts when that one is done.
                self._head_since = now
            else:
                self._header_timed_out()
        elif self._body_since is not None and now - self._body_since > limits.body_timeout:
            self._body_since = None
            if self._in_body():
                self._body_timed_out()

    def _header_timed_out(self) -> None:
        assert self.transport is not None
        self._guard.count("header_timeout")
        if self._partial:
            self.transport.write(self._guard._timeout_answer)
        self.force_close()

    def _body_timed_out(self) -> None:
        payload = self._body_payload
        assert payload is not None
        self._guard.count("body_timeout")
        # No lingering read of the rest: the connection closes after the answer.
        self._lingering_time = 0.0
        self._cut = True
        current = self._current_request
        if self._request_in_progress and current is not None and current.content is payload:
            # The handler's read raises it; the listeners' middlewares answer it as
            # JSON 408 ``request_timeout``.
            payload.set_exception(BodyTimeout())
        else:
            self.force_close()

    # -- answering -------------------------------------------------------------------

    def finish_response(
        self, request: BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> Coroutine[Any, Any, tuple[web.StreamResponse, bool]]:
        # Not a coroutine itself: no extra frame per request.
        if self._cut or self._guard.draining:
            resp.force_close()  # the answer carries Connection: close
        return _finish_response(self, request, resp, start_time)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's own error answers (parser refusals, handler crashes) as JSON."""
        if request.writer.output_size > 0:
            raise ConnectionError("the answer is partly sent; cannot send an error instead")
        if isinstance(exc, HttpProcessingError):
            status, code, text = self._refusal(exc)
            self._guard.count("bad_request")
            log.warning(
                "request_refused",
                extra={
                    "fields": {
                        "listener": self._guard.name,
                        "status": status,
                        "reason": type(exc).__name__,
                    }
                },
            )
        elif isinstance(exc, RequestPayloadError):
            status, code, text = 400, "invalid_body", "the request body is malformed"
            log.warning(
                "request_refused",
                extra={"fields": {"listener": self._guard.name, "status": 400,
                                  "reason": type(exc.__cause__ or exc).__name__}},
            )  # fmt: skip
        elif status == 504:
            code, text = "timeout", "the request took too long"
        else:
            self.log_exception("unhandled_error", exc_info=exc)
            status, code, text = 500, "internal_error", "internal error"
        resp = web.Response(
            body=orjson.dumps(SidecarError(text, code=code).body()),
            status=status,
            content_type="application/json",
        )
        resp.force_close()
        return resp

    def _refusal(self, exc: HttpProcessingError) -> tuple[int, str, str]:
        if isinstance(exc, LineTooLong):
            limit = str(exc.args[1]) if len(exc.args) > 1 else ""
            if limit == str(self.max_field_size) and limit != str(self.max_line_size):
                return 431, "headers_too_large", f"a header is longer than {limit} bytes"
            return 414, "uri_too_long", f"the request line is longer than {limit} bytes"
        if "Too many headers" in str(exc):
            return 431, "headers_too_large", f"more than {self.max_headers} headers"
        return 400, "bad_request", "the request is not valid HTTP/1.1"


_data_received = RequestHandler.data_received
_finish_response = RequestHandler.finish_response


class GuardedServer(web.Server):
    """aiohttp's connection factory, making :class:`GuardedProtocol` connections."""

    def __init__(
        self,
        handler: Callable[[BaseRequest], Awaitable[web.StreamResponse]],
        *,
        guard: ListenerGuard,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self.guard = guard

    def __call__(self) -> RequestHandler:
        return GuardedProtocol(self, guard=self.guard, loop=self._loop, **self._kwargs)


class GuardedRunner(web.AppRunner):
    """``web.AppRunner`` whose server enforces ``guard``'s limits on every connection,
    and answers the app's hot routes below its router (``http/hot.py``)."""

    def __init__(self, app: web.Application, *, guard: ListenerGuard, **kwargs: Any) -> None:
        limits = guard.limits
        kwargs.setdefault("keepalive_timeout", limits.keepalive_timeout)
        kwargs.setdefault("max_line_size", MAX_LINE_SIZE)
        kwargs.setdefault("max_field_size", MAX_FIELD_SIZE)
        super().__init__(app, **kwargs)
        self.guard = guard

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # the app's startup runs here
        self.guard.start()
        return GuardedServer(
            front_door(self.app, plain.request_handler),
            guard=self.guard,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=plain._loop,
            **plain._kwargs,
        )

    async def cleanup(self) -> None:
        await super().cleanup()
        await self.guard.stop()


# -- file descriptors ----------------------------------------------------------------


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard one (as Go does); return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def fit_to_fd_limit(
    caps: dict[str, ListenerLimits], fd_limit: int, redis_pool: int
) -> dict[str, ListenerLimits]:
    """Lower the connection caps, in proportion, until together they fit ``fd_limit``.

    Without this a flood on one listener (the webhook port is public) could use
    every descriptor, and the local API would then fail to accept, or to open a
    Redis or upstream connection. Each listener needs its cap plus two accept
    batches (``ListenerLimits.backlog``); the Redis pool and the upstream
    connector (each at most an eighth of the limit), and a fixed reserve for
    the rest of the process, come first.
    """
    reserve = (
        _FD_RESERVE + min(_UPSTREAM_CONNECTIONS, fd_limit // 8) + min(redis_pool, fd_limit // 8)
    )
    room = fd_limit - reserve

    def need(limits: dict[str, ListenerLimits]) -> int:
        return sum(x.max_connections + 2 * x.backlog for x in limits.values())

    if need(caps) <= room:
        return caps
    share = max(room, 0) / need(caps)
    while True:  # the batches' floor makes one proportional step fall a little short
        fitted = {name: _scaled(limits, share) for name, limits in caps.items()}
        if need(fitted) <= room or all(x.max_connections == _MIN_CAP for x in fitted.values()):
            break
        share *= 0.9
    log.warning(
        "connection_caps_lowered",
        extra={
            "fields": {
                "fd_limit": fd_limit,
                **{name: limits.max_connections for name, limits in fitted.items()},
            }
        },
    )
    return fitted


def _scaled(limits: ListenerLimits, share: float) -> ListenerLimits:
    cap = max(int(limits.max_connections * share), _MIN_CAP)
    return replace(limits, max_connections=cap, backlog=max(4, min(limits.backlog, cap // 8)))


def listener_guards(settings: Settings, metrics: Metrics | None) -> dict[str, ListenerGuard]:
    """A guard per listener (``local``, ``webhooks``, ``ops``) from the settings.

    Raises the process's open-files limit first, then fits the caps under it.
    """
    base = ListenerLimits(
        header_timeout=settings.header_timeout,
        body_timeout=settings.body_timeout,
        keepalive_timeout=settings.keepalive_timeout,
    )
    caps = {
        "local": replace(base, max_connections=settings.max_connections),
        "ops": replace(base, max_connections=settings.ops_max_connections),
    }
    if settings.webhooks_enabled:
        caps["webhooks"] = replace(base, max_connections=settings.webhook_max_connections)
    fitted = fit_to_fd_limit(caps, raise_fd_limit(), settings.redis_pool_size)
    return {
        name: ListenerGuard(
            name,
            limits,
            refused=metrics.connections_refused if metrics is not None else None,
            open_gauge=metrics.open_connections if metrics is not None else None,
        )
        for name, limits in fitted.items()
    }
