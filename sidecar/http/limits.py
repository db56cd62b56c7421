"""Listener limits: what a hostile or broken client can hold, and for how long.

aiohttp's server reads requests with no deadline of its own, and nothing caps how
many sockets a listener holds. Every listener (local API, webhooks, ops) is
therefore served by :class:`GuardedRunner`, whose connections are
:class:`GuardedProtocol` instances enforcing (docs/operations.md, "Listener
limits", says what a caller sees):

- **a header deadline** (``SIDECAR_HEADER_TIMEOUT``), from a request's first byte
  (from accept for a new connection): cut with a JSON 408 when part of a request
  was read, silently when nothing was (an unsolicited 408 would be read as the
  answer to the client's next request);
- **a body deadline** (``SIDECAR_BODY_TIMEOUT``; on the webhook listener the
  shorter ``SIDECAR_WEBHOOK_BODY_TIMEOUT``), from the end of the head: the
  handler reading the body gets a JSON 408, then the connection closes;
- **a minimum transfer rate** (``SIDECAR_MIN_RATE``, ``mod_reqtimeout``'s
  ``MinRate``): a head from its first byte, a body from the end of its head,
  must average that rate once their first ``grace`` is over (``too_slow``);
  time the sidecar itself stopped reading (flow control) does not count;
- **a keep-alive idle timeout** (``SIDECAR_KEEPALIVE_TIMEOUT``, aiohttp's own);
- **a connection cap** per listener: at the cap a newcomer is let in by
  closing the connection making the least progress (the head or body most
  behind the minimum rate, else the one idle the longest), and answered a JSON
  503 only when every connection holds a request already read;
- **a stream cap** (``SIDECAR_MAX_STREAMS``): a request that becomes a
  long-lived stream moves its connection out of the connection cap
  (:func:`begin_stream`), so streams never shut out requests.

What the HTTP parser refuses is answered with the JSON error envelope (414, 431
or 400) and logged with the listener and the parser's error class only, never
the raw line (it may carry ids). During a shutdown drain every answer carries
``Connection: close``. Everything refused or cut is counted in
``vellum_sidecar_connections_refused_total{listener, reason}``.

The hot path (``data_received``) adds, once per request, a clock read and two
stores; bytes are counted only for a chunk that leaves a head or body
incomplete. Deadlines and rates are checked by one sweep per listener, and a
victim is looked for only at the cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final, Literal, get_args

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
    "REASONS",
    "BodyTimeout",
    "GuardedProtocol",
    "GuardedRunner",
    "GuardedServer",
    "ListenerGuard",
    "ListenerLimits",
    "begin_stream",
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
    "max_streams",
    "idle_evicted",
    "slow_evicted",
    "too_slow",
    "header_timeout",
    "body_timeout",
    "bad_request",
]
#: Every reason, each exported from the start (at 0) for every listener.
REASONS: Final[tuple[Reason, ...]] = get_args(Reason)


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    header_timeout: float = 5.0
    body_timeout: float = 10.0
    keepalive_timeout: float = 30.0
    max_connections: int = 1024
    #: Open event streams, held apart from ``max_connections`` (0: none allowed).
    max_streams: int = 0
    #: Bytes a second a head (from its first byte) or a body (from the end of its
    #: head) must average once its first ``grace`` is over; 0: no minimum.
    min_rate: float = 500.0

    #: The listen backlog, which is also how many sockets asyncio accepts at once.
    #: A refused socket is closed on the next loop iteration, so a flood holds up
    #: to about two batches of descriptors beyond the cap: ``fit_to_fd_limit``
    #: shrinks it when descriptors are scarce (the rest then wait in the kernel).
    backlog: int = 128


class BodyTimeout(web.HTTPRequestTimeout):
    """Raised to the handler reading a body that did not arrive in time (or fast enough)."""


def _raw_error(status: int, reason: str, code: str, message: str) -> bytes:
    """A whole HTTP/1.1 error answer, for a connection no handler owns."""
    body = orjson.dumps(SidecarError(message, code=code).body())
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class ListenerGuard:
    """One listener's limits, its open connections and streams, its counters and its
    drain state.

    The deadlines are enforced by one sweep over the open connections every
    ``sweep_interval`` seconds rather than by a timer per request: the hot
    path only stores a timestamp and counts bytes.
    """

    def __init__(
        self,
        name: str,
        limits: ListenerLimits,
        *,
        refused: Counter | None = None,
        open_gauge: Gauge | None = None,
        streams_gauge: Gauge | None = None,
    ) -> None:
        self.name = name
        self.limits = limits
        self._refused = refused
        if refused is not None:
            for reason in REASONS:
                refused.labels(name, reason)
        self._open_gauge = open_gauge.labels(name) if open_gauge is not None else None
        self._streams_gauge = streams_gauge
        self.connections: dict[GuardedProtocol, None] = {}
        #: Connections carrying an event stream: outside ``connections`` and its cap.
        self.streams: dict[GuardedProtocol, None] = {}
        self.draining = False
        self._drained: asyncio.Event | None = None
        self._sweeper: asyncio.Task[None] | None = None
        #: A head's or body's first seconds, before the minimum rate applies to it
        #: (mod_reqtimeout's initial timeout); at the cap, a head still incomplete
        #: after this long may be closed for room whatever its rate.
        self.grace = min(1.0, limits.header_timeout / 2)
        #: At the cap, a new connection that has sent nothing is not closed for room
        #: before this age: a client just accepted (or whose bytes wait to be read
        #: behind a busy loop) has not had the time to send.
        self.evict_after = min(0.25, self.grace / 2)
        #: A deadline or a rate is noticed at most this late.
        self.sweep_interval = min(max(min(limits.header_timeout, limits.body_timeout) / 5, 0.05), 1)
        self._timeout_answer = _raw_error(
            408, "Request Timeout", "request_timeout",
            f"the request's headers did not arrive within {limits.header_timeout:g} s",
        )  # fmt: skip
        self._slow_answer = _raw_error(
            408, "Request Timeout", "request_timeout",
            f"the request's headers arrived slower than {limits.min_rate:g} bytes/s",
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
        if self.streams.pop(protocol, 0) is None and self._streams_gauge is not None:
            self._streams_gauge.set(len(self.streams))
        if self._open_gauge is not None:
            self._open_gauge.set(len(self.connections))
        if not self.connections and self._drained is not None:
            self._drained.set()

    def _to_stream(self, protocol: GuardedProtocol) -> bool:
        """Move ``protocol`` from the connection cap to the stream cap, room permitting."""
        if protocol in self.streams:
            return True
        if len(self.streams) >= self.limits.max_streams:
            self.count("max_streams")
            return False
        self.streams[protocol] = None
        if self._streams_gauge is not None:
            self._streams_gauge.set(len(self.streams))
        self.connections.pop(protocol, None)
        if self._open_gauge is not None:
            self._open_gauge.set(len(self.connections))
        if not self.connections and self._drained is not None:
            self._drained.set()
        return True

    def admit(self, now: float) -> bool:
        """Room for one more connection: below the cap, or once one is closed for it.

        At the cap the connection whose head or body is the most behind the
        minimum rate goes first (``GuardedProtocol.lagging``), so slow peers must
        keep sending at that rate on every one of a cap's connections to keep a
        normal client out, however fast they reconnect; failing that, the one idle
        the longest (a kept-alive connection whose client sent its requests whole:
        closed only when no slow one is left, since its client may be about to
        reuse it). One pass over the connections, only at the cap.
        """
        if len(self.connections) < self.limits.max_connections:
            return True
        idle: GuardedProtocol | None = None
        slow: GuardedProtocol | None = None
        most = 0.0
        for p in self.connections:
            if p.idle:
                if idle is None or p.idle_since < idle.idle_since:
                    idle = p
            else:
                behind = p.lagging(now)
                if behind is not None and (slow is None or behind > most):
                    slow, most = p, behind
        reason: Reason
        if slow is not None:
            victim, reason = slow, "slow_evicted"
        elif idle is not None:
            victim, reason = idle, "idle_evicted"
        else:
            return False
        self.count(reason)
        victim.evict()
        self._closed(victim)
        return True

    def start_drain(self) -> None:
        """From now on every answer carries ``Connection: close``."""
        self.draining = True
        self._drained = asyncio.Event()
        if not self.connections:
            self._drained.set()

    async def wait_drained(self, timeout: float) -> None:
        """Until every connection (streams aside) has closed, or ``timeout`` seconds."""
        if self._drained is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained.wait(), timeout)


class GuardedProtocol(RequestHandler):
    """aiohttp's request handler (one per connection) with the limits above."""

    __slots__ = (
        "_body_payload",
        "_body_since",
        "_cut",
        "_guard",
        "_head_since",
        "_partial",
        "_rate_since",
        "_received",
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
        #: Where the minimum rate is measured from (a head's first byte, a body's
        #: start); ``None``: no head or body under way.
        self._rate_since: float | None = None
        #: Bytes of that head or body received since, counted by the chunks that
        #: left it incomplete (the chunk completing it ends the measure anyway).
        self._received = 0
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

    def lagging(self, now: float) -> float | None:
        """How far behind (seconds) the head or body now arriving is, when this
        connection may be closed to make room (``ListenerGuard.admit``: the most
        behind goes first); ``None`` when it may not: idle (handled first), a
        request read and being handled, a new connection that has not had the time
        to send (nothing read yet, younger than ``evict_after``), keeping to the
        minimum rate, or held back by the sidecar itself (reading paused).

        Behind: the phase's age less the time its bytes buy at the minimum rate,
        so among slow peers the oldest and slowest goes first, and a client that
        sent its request at once is never behind any of them. A head still
        incomplete after ``grace`` is behind whatever its rate.
        """
        if self._reading_paused or self._buffer_paused:
            return None
        guard = self._guard
        head = self._head_since
        since = self._rate_since
        received = self._received
        slow_head = -1.0  # a body: no head rule
        if head is not None and not self._request_in_progress and not self._messages:
            if since is None:  # a new connection that has sent nothing yet
                if now - head < guard.evict_after:
                    return None
                since, received = head, 0
            slow_head = now - head - guard.grace
        elif self._body_since is None or not self._in_body() or since is None:
            return None
        min_rate = guard.limits.min_rate
        behind = now - since - received / min_rate if min_rate > 0 else 0.0
        if behind > 0 or slow_head >= 0:
            return max(behind, slow_head)
        return None

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

    def begin_stream(self) -> bool:
        """This connection now carries a long-lived stream: it leaves the connection
        cap for the stream cap (``False``: that cap is full, nothing moved)."""
        return self._guard._to_stream(self)

    def evict(self) -> None:
        """Close for room at the cap: no answer (the peer was too slow to want one)."""
        payload = self._body_payload
        if payload is not None and not payload.is_eof():
            # A handler reading it ends with the 408 it cannot send any more,
            # instead of a connection error logged as a crash.
            payload.set_exception(BodyTimeout())
        self.force_close()

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
                # The first bytes of a next request.
                self._head_since = self._rate_since = self._loop.time()
                self._received = 0
            elif self._rate_since is None:
                # A new connection's first bytes.
                self._rate_since = self._loop.time()
                self._received = 0
        before = self._request_count
        _data_received(self, data)
        if self._request_count != before:
            self._head_completed(body)
        else:
            self._received += len(data)  # a head or body still incomplete

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
        self._head_since = self._rate_since = None
        self.idle_since = now
        payload = messages[-1][1] if messages else None
        if payload is not None and not payload.is_eof():
            self._body_payload = payload
            self._body_since = self._rate_since = self._loop.time()
            self._received = 0

    def check_deadlines(self, now: float) -> None:
        """Cut the connection if its head or its body is late or too slow (the sweep)."""
        if self.transport is None:
            return
        limits = self._guard.limits
        head_since = self._head_since
        if head_since is not None:
            busy = self._request_in_progress or self._messages
            if now - head_since > limits.header_timeout:
                if busy:
                    # A pipelined request's head is late while an earlier one is still
                    # being handled: its clock starts when that one is done.
                    self._head_since = now
                    if self._rate_since is not None:
                        self._rate_since, self._received = now, 0
                else:
                    self._header_timed_out("header_timeout")
            elif not busy and self._too_slow(now):
                self._header_timed_out("too_slow")
        elif self._body_since is not None:
            if now - self._body_since > limits.body_timeout:
                self._body_since = None
                if self._in_body():
                    self._body_timed_out("body_timeout")
            elif self._in_body() and self._too_slow(now):
                self._body_since = None
                self._body_timed_out("too_slow")

    def _too_slow(self, now: float) -> bool:
        """Below the minimum rate since ``_rate_since``, once ``grace`` is over."""
        since = self._rate_since
        if since is None:
            return False
        if self._reading_paused or self._buffer_paused:
            # The sidecar stopped reading (flow control), not the client: the
            # measure starts again once it reads.
            self._rate_since, self._received = now, 0
            return False
        guard = self._guard
        min_rate = guard.limits.min_rate
        return min_rate > 0 and self._received < min_rate * (now - since - guard.grace)

    def _header_timed_out(self, reason: Reason) -> None:
        assert self.transport is not None
        guard = self._guard
        guard.count(reason)
        if self._partial:
            slow = reason == "too_slow"
            self.transport.write(guard._slow_answer if slow else guard._timeout_answer)
        self.force_close()

    def _body_timed_out(self, reason: Reason) -> None:
        payload = self._body_payload
        assert payload is not None
        guard = self._guard
        guard.count(reason)
        # No lingering read of the rest: the connection closes after the answer.
        self._lingering_time = 0.0
        self._cut = True
        current = self._current_request
        if self._request_in_progress and current is not None and current.content is payload:
            # The handler's read raises it; the listeners' middlewares answer it as
            # JSON 408 ``request_timeout``.
            limits = guard.limits
            message = (
                f"the request body arrived slower than {limits.min_rate:g} bytes/s"
                if reason == "too_slow"
                else f"the request body did not arrive within {limits.body_timeout:g} s"
            )
            payload.set_exception(BodyTimeout(reason=message))
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
        elif isinstance(exc, ConnectionError):
            # The client went away while its body was being read (or was cut by a
            # limit): nobody is left to answer, and nothing failed here.
            log.debug("client_gone", extra={"fields": {"listener": self._guard.name}})
            status, code, text = 400, "client_gone", "the connection was lost"
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


def begin_stream(request: BaseRequest) -> int | None:
    """Count ``request``'s connection as an event stream from now on, outside its
    listener's connection cap: ``None`` when done (or the listener has no guard),
    else the stream cap found full (answer 503)."""
    protocol = request.protocol
    if isinstance(protocol, GuardedProtocol) and not protocol.begin_stream():
        return protocol._guard.limits.max_streams
    return None


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
    Redis or upstream connection. Each listener needs its connection and stream
    caps plus two accept batches (``ListenerLimits.backlog``); the Redis pool
    and the upstream connector (each at most an eighth of the limit), and a
    fixed reserve for the rest of the process, come first.
    """
    reserve = (
        _FD_RESERVE + min(_UPSTREAM_CONNECTIONS, fd_limit // 8) + min(redis_pool, fd_limit // 8)
    )
    room = fd_limit - reserve

    def need(limits: dict[str, ListenerLimits]) -> int:
        return sum(x.max_connections + x.max_streams + 2 * x.backlog for x in limits.values())

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
                "streams": sum(limits.max_streams for limits in fitted.values()),
            }
        },
    )
    return fitted


def _scaled(limits: ListenerLimits, share: float) -> ListenerLimits:
    cap = max(int(limits.max_connections * share), _MIN_CAP)
    streams = max(int(limits.max_streams * share), _MIN_CAP) if limits.max_streams else 0
    return replace(
        limits,
        max_connections=cap,
        max_streams=streams,
        backlog=max(4, min(limits.backlog, cap // 8)),
    )


def listener_guards(settings: Settings, metrics: Metrics | None) -> dict[str, ListenerGuard]:
    """A guard per listener (``local``, ``webhooks``, ``ops``) from the settings.

    Raises the process's open-files limit first, then fits the caps under it.
    """
    base = ListenerLimits(
        header_timeout=settings.header_timeout,
        body_timeout=settings.body_timeout,
        keepalive_timeout=settings.keepalive_timeout,
        min_rate=settings.min_rate,
    )
    caps = {
        "local": replace(
            base, max_connections=settings.max_connections, max_streams=settings.max_streams
        ),
        "ops": replace(base, max_connections=settings.ops_max_connections),
    }
    if settings.webhooks_enabled:
        caps["webhooks"] = replace(
            base,
            max_connections=settings.webhook_max_connections,
            body_timeout=settings.webhook_body_timeout,
        )
    fitted = fit_to_fd_limit(caps, raise_fd_limit(), settings.redis_pool_size)
    guards: dict[str, ListenerGuard] = {}
    for name, limits in fitted.items():
        if metrics is None:
            guards[name] = ListenerGuard(name, limits)
            continue
        guards[name] = ListenerGuard(
            name,
            limits,
            refused=metrics.connections_refused,
            open_gauge=metrics.open_connections,
            streams_gauge=metrics.open_streams if limits.max_streams else None,
        )
        metrics.connection_limit.labels(name).set(limits.max_connections)
        if limits.max_streams:
            metrics.stream_limit.set(limits.max_streams)
    return guards
