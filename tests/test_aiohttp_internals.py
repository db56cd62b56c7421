"""What the listeners borrow from aiohttp's private API is still there, as they use it.

``sidecar/http/limits.py`` subclasses aiohttp's ``RequestHandler`` (one per
connection) and wraps ``web.Server`` and ``web.AppRunner``: it reads and writes
their private attributes, overrides their methods and calls the originals. None
of that is aiohttp's public API, so ``pyproject.toml`` caps aiohttp below its
next minor release, and this module lists every such internal with how it is
used. When one moves, its case fails naming it, and the cap is widened only
after limits.py is adapted and this list passes on the new release.

To extend: add a row to ``BORROWED`` (an attribute, a slot, a method with the
parameters the sidecar passes or overrides) or a test below for a behaviour
(an exception's arguments, a message the sidecar matches).
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiohttp
import pytest
from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.http_parser import HttpRequestParser, RawRequestMessage
from aiohttp.http_writer import StreamWriter
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_runner import AppRunner, BaseRunner

#: Read as text, not imported: a name gone from aiohttp should fail one case below
#: with its name, not the collection of this module.
LIMITS = Path(__file__).resolve().parent.parent / "sidecar" / "http" / "limits.py"

Kind = Literal["slot", "method", "coroutine", "attribute"]


@dataclass(frozen=True)
class Borrowed:
    """One internal of aiohttp that ``sidecar/http/limits.py`` relies on."""

    owner: type
    name: str
    kind: Kind
    use: str
    """How limits.py uses it (what breaks when it moves)."""
    params: tuple[str, ...] = ()
    """For a method: the leading parameters (after ``self``) limits.py passes or
    overrides, by name and in order."""

    @property
    def id(self) -> str:
        return f"{self.owner.__name__}.{self.name}"


BORROWED: tuple[Borrowed, ...] = (
    # RequestHandler's state, read by GuardedProtocol (slots: readable on the class).
    Borrowed(RequestHandler, "_waiter", "slot", "idle: a connection waiting for a next request"),
    Borrowed(RequestHandler, "_messages", "slot", "idle, lagging, _head_completed"),
    Borrowed(RequestHandler, "_request_in_progress", "slot", "idle, lagging, check_deadlines"),
    Borrowed(RequestHandler, "_request_count", "slot", "data_received: a head completed"),
    Borrowed(RequestHandler, "_lingering_time", "slot", "cut: no lingering read after a 408"),
    Borrowed(RequestHandler, "_current_request", "slot", "the body deadline's handler"),
    Borrowed(RequestHandler, "max_line_size", "slot", "_refusal: 414 or 431"),
    Borrowed(RequestHandler, "max_field_size", "slot", "_refusal: 414 or 431"),
    Borrowed(RequestHandler, "max_headers", "slot", "_refusal: too many headers"),
    Borrowed(BaseProtocol, "_loop", "slot", "the loop's clock for the deadlines"),
    Borrowed(BaseProtocol, "transport", "slot", "writing a raw 408/503, check_deadlines"),
    Borrowed(BaseProtocol, "_reading_paused", "slot",
             "the minimum rate: the sidecar, not the client, stopped reading"),
    Borrowed(BaseProtocol, "_buffer_paused", "slot",
             "the minimum rate: the sidecar, not the client, stopped reading"),
    # RequestHandler's methods, overridden (and the originals called) by GuardedProtocol.
    Borrowed(RequestHandler, "__init__", "method", "GuardedProtocol(manager, **kwargs)",
             ("manager", "loop")),
    Borrowed(RequestHandler, "connection_made", "method", "admission at the cap", ("transport",)),
    Borrowed(RequestHandler, "connection_lost", "method", "the open connections", ("exc",)),
    Borrowed(RequestHandler, "data_received", "method", "the head and body clocks", ("data",)),
    Borrowed(RequestHandler, "finish_response", "coroutine",
             "Connection: close while draining or cut", ("request", "resp", "start_time")),
    Borrowed(RequestHandler, "handle_error", "method", "aiohttp's own errors as JSON",
             ("request", "status", "exc", "message")),
    Borrowed(RequestHandler, "force_close", "method", "cutting a late or evicted connection"),
    Borrowed(RequestHandler, "log_exception", "method", "an unhandled error's log line"),
    # web.Server: GuardedServer makes the protocols, GuardedRunner rebuilds the server.
    Borrowed(web.Server, "__init__", "method", "GuardedServer(handler, **kwargs)",
             ("handler", "request_factory", "handler_cancellation", "loop")),
    Borrowed(web.Server, "__call__", "method", "the protocol factory GuardedServer overrides"),
    Borrowed(web.Server, "_loop", "attribute", "passed to each GuardedProtocol"),
    Borrowed(web.Server, "_kwargs", "attribute", "the protocol's settings, passed on"),
    Borrowed(web.Server, "request_handler", "attribute", "the app's handler, behind front_door"),
    Borrowed(web.Server, "request_factory", "attribute", "kept in the rebuilt server"),
    Borrowed(web.Server, "handler_cancellation", "attribute", "kept in the rebuilt server"),
    Borrowed(BaseRunner, "_make_server", "coroutine", "GuardedRunner wraps the app's server"),
    Borrowed(AppRunner, "_make_server", "coroutine", "GuardedRunner's super() call"),
    # A request's connection: begin_stream moves it to the stream cap.
    Borrowed(BaseRequest, "protocol", "attribute", "begin_stream: the request's connection"),
    # A request's writer: handle_error must not answer twice.
    Borrowed(BaseRequest, "writer", "attribute", "handle_error: the answer is partly sent"),
    Borrowed(StreamWriter, "output_size", "attribute", "handle_error: the answer is partly sent"),
    # A body's stream: the body deadline.
    Borrowed(StreamReader, "is_eof", "method", "a body still arriving"),
    Borrowed(StreamReader, "set_exception", "method", "the body deadline's 408", ("exc",)),
)  # fmt: skip


def _slots(owner: type) -> set[str]:
    return {s for cls in owner.__mro__ for s in getattr(cls, "__slots__", ())}


def _server() -> web.Server:
    """A real ``web.Server`` (no socket): its instance attributes are set in ``__init__``."""

    async def handler(request: BaseRequest) -> web.StreamResponse:
        return web.Response()

    return web.Server(handler, loop=asyncio.new_event_loop())


def _instance_attributes(owner: type) -> Iterator[str]:
    if owner is web.Server:
        server = _server()
        try:
            yield from vars(server)
        finally:
            server._loop.close()
    elif owner is StreamWriter:
        yield from (n for n, _ in inspect.getmembers(StreamWriter))
    elif owner is BaseRequest:
        yield from (n for n, _ in inspect.getmembers(BaseRequest))


def problem(item: Borrowed) -> str | None:
    """Why ``item`` no longer holds, or None."""
    owner, name = item.owner, item.name
    if item.kind == "slot":
        return None if name in _slots(owner) else "no longer one of its __slots__"
    if item.kind == "attribute":
        return None if name in set(_instance_attributes(owner)) else "no such attribute"
    function: Any = inspect.getattr_static(owner, name, None)
    if function is None or not callable(function):
        return "no such method"
    if item.kind == "coroutine" and not inspect.iscoroutinefunction(function):
        return "no longer a coroutine function"
    if item.params:
        names = list(inspect.signature(function).parameters)[1:]  # after self
        if names[: len(item.params)] != list(item.params):
            return f"parameters are now {names}, limits.py uses {list(item.params)}"
    return None


@pytest.mark.parametrize("item", BORROWED, ids=lambda item: item.id)
def test_the_internal_limits_py_borrows_is_still_there(item: Borrowed) -> None:
    found = problem(item)
    assert found is None, (
        f"aiohttp {aiohttp.__version__}: {item.id} ({item.kind}, used for: {item.use}) "
        f"changed: {found}. sidecar/http/limits.py relies on it: adapt limits.py to this "
        "aiohttp, then widen the aiohttp bound in pyproject.toml"
    )


def test_the_check_fails_for_a_moved_internal() -> None:
    """The check itself can fail: a renamed slot, a missing method, other parameters."""
    assert problem(Borrowed(RequestHandler, "_no_such_slot", "slot", "-")) is not None
    assert problem(Borrowed(RequestHandler, "no_such_method", "method", "-")) is not None
    assert problem(Borrowed(web.Server, "_no_such_attribute", "attribute", "-")) is not None
    assert problem(Borrowed(RequestHandler, "force_close", "coroutine", "-")) is not None
    moved = Borrowed(RequestHandler, "handle_error", "method", "-", ("request", "exc"))
    assert "parameters are now" in (problem(moved) or "")


def test_every_name_limits_py_imports_from_aiohttp_resolves() -> None:
    """Read from limits.py itself, so a new import is checked without a new row."""
    source = LIMITS.read_text(encoding="utf-8")
    imported = [
        (node.module, alias.name)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom)
        and node.module is not None
        and node.module.startswith("aiohttp")
        for alias in node.names
    ]
    assert ("aiohttp.web_protocol", "RequestHandler") in imported, "the scan sees the imports"
    missing = [
        f"{module}.{name}"
        for module, name in imported
        if not hasattr(importlib.import_module(module), name)
    ]
    assert not missing, f"aiohttp {aiohttp.__version__} no longer has {missing} (limits.py)"


def test_line_too_long_carries_its_limit_second() -> None:
    """``_refusal`` tells a long header (431) from a long request line (414) by ``args[1]``."""
    exc = LineTooLong("GET /...", 16384, "20000")
    assert isinstance(exc, HttpProcessingError)
    assert str(exc.args[1]) == "16384", (
        f"aiohttp {aiohttp.__version__}: LineTooLong's args are {exc.args!r}; "
        "limits.py's _refusal reads the limit from args[1]"
    )


def test_too_many_headers_is_still_named_so() -> None:
    """``_refusal`` answers 431 for ``BadHttpMessage("Too many headers ...")``."""
    loop = asyncio.new_event_loop()
    try:
        parser = HttpRequestParser(None, loop, 2**16, max_headers=2)
        head = b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(5)) + b"\r\n"
        with pytest.raises(BadHttpMessage) as refused:
            parser.feed_data(head)
    finally:
        loop.close()
    assert "Too many headers" in str(refused.value), (
        f"aiohttp {aiohttp.__version__} now says {refused.value!s}; limits.py's _refusal "
        "matches 'Too many headers' to answer 431"
    )


def test_a_head_arriving_is_counted_and_queued_with_its_payload() -> None:
    """``data_received`` learns a head completed from ``_request_count``, and
    ``_head_completed`` reads ``_messages[-1]`` as ``(RawRequestMessage, payload)``.

    A real protocol, fed bytes directly (no socket): a head and part of its body.
    """
    protocol = _server()()
    try:
        before = protocol._request_count
        protocol.data_received(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nab")
        assert protocol._request_count == before + 1, "a completed head no longer counts"
        head, payload = protocol._messages[-1]
        assert isinstance(head, RawRequestMessage), f"a queued head is now {type(head)}"
        assert isinstance(payload, StreamReader), f"a queued payload is now {type(payload)}"
        assert not payload.is_eof(), "3 of the body's 5 bytes are still to come"
    finally:
        protocol._loop.close()
