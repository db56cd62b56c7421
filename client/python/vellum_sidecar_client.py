"""A tiny client for vellum-sidecar's local API: one file, standard library only.

It keeps the Vellum SDK's method names and keyword arguments, minus the API key
(the sidecar holds it), so moving an app to the sidecar is a one-line change::

    from vellum_sidecar_client import SidecarClient

    sidecar = SidecarClient()          # VELLUM_SIDECAR_URL, else http://127.0.0.1:8700
    if sidecar.can("cus_123", "reports"):
        ...
    ents = sidecar.get_entitlements("cus_123")
    ents.found, ents.status, ents.has_access(), ents.has("exports"), ents.config("seats", 1)

``AsyncSidecarClient`` has the same methods, awaitable. Both keep connections
alive between calls; ``SidecarClient`` may be shared between threads.

The fail-closed rule: ``can`` and ``check`` answer False when no answer can be
had (the sidecar is unreachable, times out, or answers 5xx), or True for every
such answer when the client was built with ``fail_open=True``. Every other
method raises :class:`SidecarUnavailable` in that case, and
:class:`SidecarApiError` for any other non-2xx answer.

Vendor this file as it is, or ``pip install vellum-sidecar-client``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar
from urllib.parse import quote, urlencode, urlsplit

__all__ = [
    "DEFAULT_URL",
    "ENV_URL",
    "AsyncSidecarClient",
    "EntitlementSet",
    "SidecarApiError",
    "SidecarClient",
    "SidecarError",
    "SidecarUnavailable",
]

__version__ = "0.1.0"

DEFAULT_URL: Final = "http://127.0.0.1:8700"
ENV_URL: Final = "VELLUM_SIDECAR_URL"

#: The sidecar's batch limit; ``check`` splits longer lists into several requests.
MAX_BATCH: Final = 1000
#: Statuses for which ``is_active()`` is true.
ACTIVE_STATUSES: Final = frozenset({"active", "trialing"})

_USER_AGENT: Final = f"vellum-sidecar-client/{__version__} (python)"
_IDEMPOTENT: Final = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
_WITH_BODY: Final = frozenset({"POST", "PUT", "PATCH"})
_MAX_IDLE: Final = 16
#: What an id may hold unquoted: ``quote(value, safe="")`` leaves these alone.
_UNRESERVED: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~"

T = TypeVar("T")


# -- errors ------------------------------------------------------------------------------


class SidecarError(Exception):
    """Base of every error this client raises."""


class SidecarUnavailable(SidecarError):
    """No answer could be had.

    The sidecar could not be reached or did not answer within the timeout
    (``status`` is None), or it answered 502, 503 or 504 because it, or the
    Vellum API behind it, could not answer (``status``, ``code`` and ``body``
    tell which). ``upstream_auth_failed`` is a :class:`SidecarApiError` instead:
    it is a configuration problem, not an outage.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.body = body


class SidecarApiError(SidecarError):
    """A non-2xx answer: from the sidecar, or from the Vellum API passed through it.

    ``status`` is the HTTP status, ``code`` the error code of a JSON
    ``{"error": {"code", "message"}}`` body (None for another shape), and
    ``body`` the parsed JSON body (or its text when it is not JSON).
    """

    def __init__(self, message: str, *, status: int, code: str | None, body: Any) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.body = body


# -- entitlements ------------------------------------------------------------------------


class EntitlementSet:
    """One customer's entitlements, as the Vellum SDK's ``EntitlementSet``.

    ``found`` is False for a customer Vellum has no record of (never an
    exception); ``data`` is the whole document, unknown fields included;
    ``cache`` is where the sidecar found it: ``hit``, ``miss`` or ``stale``.
    """

    __slots__ = ("cache", "customer_id", "data", "found", "modules", "status")

    def __init__(self, customer_id: str, data: Mapping[str, Any], cache: str | None = None) -> None:
        self.customer_id = customer_id
        self.data: dict[str, Any] = dict(data)
        self.found = data.get("found", True) is True
        status = data.get("status")
        self.status: str | None = status if isinstance(status, str) else None
        modules = data.get("modules")
        self.modules: tuple[str, ...] = tuple(
            m for m in (modules if isinstance(modules, list) else ()) if isinstance(m, str)
        )
        self.cache = cache

    def has_access(self) -> bool:
        """The upstream's word on access (its ``hasAccess``), as the SDK answers it.

        False when the document has no ``hasAccess`` (an unknown customer, or an
        upstream older than SDK 1.2). Gate features on :meth:`has`: the upstream
        empties ``modules`` when access is withheld.
        """
        return self.data.get("hasAccess") is True

    def is_active(self) -> bool:
        """True when the status is ``active`` or ``trialing`` (the status alone;
        :meth:`has_access` is the upstream's own answer)."""
        return self.status in ACTIVE_STATUSES

    def has(self, module_id: str) -> bool:
        """True when ``module_id`` is one of the customer's modules (what ``can`` answers)."""
        return module_id in self.modules

    def config(self, key: str, default: Any = None) -> Any:
        """One value of the document's ``config`` object, or ``default``."""
        config = self.data.get("config")
        return config.get(key, default) if isinstance(config, dict) else default

    def __repr__(self) -> str:
        return (
            f"EntitlementSet(customer_id={self.customer_id!r}, found={self.found!r}, "
            f"status={self.status!r}, modules={list(self.modules)!r})"
        )


# -- requests and their answers ----------------------------------------------------------


# Neither is frozen: a frozen dataclass's __init__ costs a few µs more per call.
@dataclass(slots=True)
class _Response:
    method: str
    path: str
    status: int
    headers: Mapping[str, str]  # lower-case names
    body: bytes

    def describe(self) -> str:
        return f"{self.method} {self.path} answered {self.status}"


@dataclass(slots=True)
class _Call(Generic[T]):
    """One request and how to read its answer; shared by both clients."""

    method: str
    path: str
    read: Callable[[_Response], T]
    query: Mapping[str, str] | None = None
    body: Any = None
    billing: bool = False
    idempotency_key: str | None = None
    #: Read-only although not a GET (the batch check), or a record queued under its own
    #: key (the same key is the same record): safe to send twice.
    safe: bool = False
    #: ``Prefer: respond-async``: the sidecar queues the call (``wait=False``).
    respond_async: bool = False

    @property
    def idempotent(self) -> bool:
        """May be sent again after a reused connection closed before any answer."""
        return self.safe or self.method in _IDEMPOTENT or self.idempotency_key is not None

    def target(self, prefix: str) -> str:
        query = f"?{urlencode(self.query)}" if self.query else ""
        return f"{prefix}{self.path}{query}"

    def payload(self) -> bytes | None:
        if self.body is None:
            return b"" if self.method in _WITH_BODY else None
        return json.dumps(self.body, separators=(",", ":")).encode()

    def headers(self) -> Mapping[str, str]:
        """The request's headers beyond ``Host`` and ``Content-Length``.

        The common case is the shared :data:`_HEADERS` itself, which the
        transports recognise and send as bytes encoded once per client.
        """
        if self.body is None and self.idempotency_key is None and not self.respond_async:
            return _HEADERS
        headers = dict(_HEADERS)
        if self.body is not None:
            headers["Content-Type"] = "application/json"
        if self.idempotency_key is not None:
            headers["Idempotency-Key"] = self.idempotency_key
        if self.respond_async:
            headers["Prefer"] = "respond-async"
        return headers


#: Every request's headers (besides Host); shared, never changed.
_HEADERS: Final[Mapping[str, str]] = {"Accept": "application/json", "User-Agent": _USER_AGENT}


def _seg(name: str, value: str) -> str:
    """One URL-quoted path segment; empty or non-string ids are caller bugs."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    # Most ids are plain (cus_123): skip quote()'s encode and scan for them.
    return value if not value.strip(_UNRESERVED) else quote(value, safe="")


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")


def _failure(resp: _Response) -> SidecarError:
    """The exception for a non-2xx answer."""
    body = _decode(resp.body) if resp.body else None
    code = message = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        code = error.get("code") if isinstance(error.get("code"), str) else None
        message = error.get("message") if isinstance(error.get("message"), str) else None
    text = resp.describe() + (f" {code}" if code else "") + (f": {message}" if message else "")
    if resp.status in (502, 503, 504) and code != "upstream_auth_failed":
        return SidecarUnavailable(text, status=resp.status, code=code, body=body)
    return SidecarApiError(text, status=resp.status, code=code, body=body)


def _json(resp: _Response) -> Any:
    """The parsed body of a 2xx answer (None when empty); raises for any other."""
    if not 200 <= resp.status < 300:
        raise _failure(resp)
    if not resp.body:
        return None
    try:
        return json.loads(resp.body)
    except ValueError:
        raise SidecarError(f"{resp.describe()} with a body that is not JSON") from None


def _object(resp: _Response) -> dict[str, Any]:
    data = _json(resp)
    if not isinstance(data, dict):
        raise SidecarError(f"{resp.describe()} without a JSON object")
    return data


def _nothing(resp: _Response) -> None:
    _json(resp)


def _field_list(name: str) -> Callable[[_Response], list[Any]]:
    def read(resp: _Response) -> list[Any]:
        value = _object(resp).get(name)
        if not isinstance(value, list):
            raise SidecarError(f"{resp.describe()} without a {name!r} list")
        return value

    return read


def _maybe_object(resp: _Response) -> dict[str, Any] | None:
    """A 2xx JSON object, or None for an answer without a body (a 204)."""
    if resp.body:
        return _object(resp)
    _nothing(resp)
    return None


def _bytes(resp: _Response) -> bytes:
    """A 2xx body as it came (the invoice PDF): never decoded."""
    if not 200 <= resp.status < 300:
        raise _failure(resp)
    return resp.body


def _location(resp: _Response) -> str:
    """The redirect's target: the invoice PDF's hosted URL (never followed)."""
    if 300 <= resp.status < 400 and resp.headers.get("location"):
        return resp.headers["location"]
    if 200 <= resp.status < 400:
        raise SidecarError(f"{resp.describe()} without a Location")
    raise _failure(resp)


def _verdict(resp: _Response) -> Any:
    """A 2xx body for the fail-closed routes; any 5xx means no answer."""
    if resp.status >= 500:
        failure = _failure(resp)
        if isinstance(failure, SidecarApiError):  # e.g. upstream_auth_failed, internal_error
            failure = SidecarUnavailable(
                failure.message, status=failure.status, code=failure.code, body=failure.body
            )
        raise failure
    return _object(resp)


def _allowed(resp: _Response) -> bool:
    return _verdict(resp).get("allowed") is True


def _results(resp: _Response) -> list[bool | None]:
    """One verdict per check; None where the sidecar had no answer for that customer."""
    results = _verdict(resp).get("results")
    if not isinstance(results, list):
        raise SidecarError(f"{resp.describe()} without a 'results' list")
    verdicts: list[bool | None] = []
    for result in results:
        if not isinstance(result, dict):
            raise SidecarError(f"{resp.describe()} with a result that is not an object")
        if "error" in result and not result.get("fallback"):
            verdicts.append(None)
        else:
            verdicts.append(result.get("allowed") is True)
    return verdicts


def _entitlements(customer_id: str) -> Callable[[_Response], EntitlementSet]:
    def read(resp: _Response) -> EntitlementSet:
        return EntitlementSet(customer_id, _object(resp), resp.headers.get("x-sidecar-cache"))

    return read


def _flags(resp: _Response) -> dict[str, bool]:
    """A flags document's ``flags``: a new dict each call (the caller may change it)."""
    flags = _object(resp).get("flags")
    if not isinstance(flags, dict):
        raise SidecarError(f"{resp.describe()} without a 'flags' object")
    return {k: v for k, v in flags.items() if isinstance(v, bool)}


def _flag_value(resp: _Response) -> bool:
    value = _object(resp).get("value")
    if not isinstance(value, bool):
        raise SidecarError(f"{resp.describe()} without a boolean 'value'")
    return value


def _drop_none(body: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if v is not None}


def _query(values: Mapping[str, str | None]) -> dict[str, str] | None:
    """A query string's parameters without the unset ones; None when none is set."""
    return {k: v for k, v in values.items() if v is not None} or None


def _pairs(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The pairs as a list, every id checked before any request is sent."""
    out = []
    for i, pair in enumerate(pairs):
        customer_id, module_id = pair
        _seg(f"pairs[{i}] customer_id", customer_id)
        _seg(f"pairs[{i}] module_id", module_id)
        out.append((customer_id, module_id))
    return out


# -- the Vellum operations ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Route:
    """One Vellum operation on the sidecar's ``/v1`` surface: a row of the sidecar's table."""

    method: str
    path: str
    """Each ``{name}`` is one id segment; the methods' keyword for it is ``<name>_id``."""
    params: tuple[str, ...] = ()
    body: bool = False
    """Takes a JSON object body."""
    cached: bool = False
    """Answered from the sidecar's cache (``timeout``), not the Vellum API (``billing_timeout``)."""
    deferred: bool = False
    """The sidecar queues it instead on ``Prefer: respond-async`` (``wait=False``)."""


# BEGIN GENERATED operation table: scripts/gen_clients.py writes it from the sidecar's own
_OPERATIONS: Final[Mapping[str, _Route]] = {
    "get_entitlements": _Route(
        "GET", "/v1/customers/{customer}/entitlements", ("customer",), cached=True
    ),
    "flags": _Route("GET", "/v1/customers/{customer}/flags", ("customer",), cached=True),
    "global_flags": _Route("GET", "/v1/flags", (), cached=True),
    "create_checkout": _Route("POST", "/v1/accounts/{account}/checkout", ("account",), body=True),
    "create_setup_checkout": _Route(
        "POST", "/v1/accounts/{account}/billing/setup-checkout", ("account",), body=True
    ),
    "create_subscription": _Route(
        "POST",
        "/v1/accounts/{account}/customers/{customer}/subscribe",
        ("account", "customer"),
        body=True,
    ),
    "get_subscription": _Route(
        "GET", "/v1/accounts/{account}/customers/{customer}/subscription", ("account", "customer")
    ),
    "update_subscription": _Route(
        "PUT",
        "/v1/accounts/{account}/customers/{customer}/subscription",
        ("account", "customer"),
        body=True,
    ),
    "cancel_subscription": _Route(
        "DELETE",
        "/v1/accounts/{account}/customers/{customer}/subscription",
        ("account", "customer"),
    ),
    "preview_change": _Route(
        "POST",
        "/v1/accounts/{account}/customers/{customer}/subscription/preview",
        ("account", "customer"),
        body=True,
    ),
    "set_seats": _Route(
        "PATCH",
        "/v1/accounts/{account}/customers/{customer}/subscription/seats",
        ("account", "customer"),
        body=True,
    ),
    "change_add_ons": _Route(
        "PATCH",
        "/v1/accounts/{account}/customers/{customer}/subscription/add-ons",
        ("account", "customer"),
        body=True,
    ),
    "change_plan": _Route(
        "PATCH",
        "/v1/accounts/{account}/customers/{customer}/subscription/plan",
        ("account", "customer"),
        body=True,
    ),
    "reactivate": _Route(
        "POST",
        "/v1/accounts/{account}/customers/{customer}/subscription/reactivate",
        ("account", "customer"),
    ),
    "create_account": _Route("POST", "/v1/accounts", (), body=True),
    "create_customer": _Route("POST", "/v1/accounts/{account}/customers", ("account",), body=True),
    "set_account_status": _Route("PATCH", "/v1/accounts/{account}", ("account",), body=True),
    "set_customer_status": _Route(
        "PATCH", "/v1/accounts/{account}/customers/{customer}", ("account", "customer"), body=True
    ),
    "list_payment_methods": _Route("GET", "/v1/accounts/{account}/payment-methods", ("account",)),
    "set_default_payment_method": _Route(
        "PATCH", "/v1/accounts/{account}/payment-methods/{method}", ("account", "method")
    ),
    "remove_payment_method": _Route(
        "DELETE", "/v1/accounts/{account}/payment-methods/{method}", ("account", "method")
    ),
    "set_subscription_payment_method": _Route(
        "PATCH",
        "/v1/accounts/{account}/customers/{customer}/payment-method",
        ("account", "customer"),
        body=True,
    ),
    "list_invoices": _Route("GET", "/v1/accounts/{account}/invoices", ("account",)),
    "invoice_pdf": _Route(
        "GET", "/v1/accounts/{account}/invoices/{invoice}/pdf", ("account", "invoice")
    ),
    "create_credit_checkout": _Route(
        "POST", "/v1/accounts/{account}/credit-checkout", ("account",), body=True
    ),
    "list_credit_types": _Route("GET", "/v1/credit-types", ()),
    "list_credit_packs": _Route("GET", "/v1/credit-types/{credit_type}/packs", ("credit_type",)),
    "list_credits": _Route("GET", "/v1/customers/{customer}/credits", ("customer",)),
    "get_credit_balance": _Route(
        "GET", "/v1/customers/{customer}/credits/{credit_type}", ("customer", "credit_type")
    ),
    "consume_credits": _Route(
        "POST",
        "/v1/customers/{customer}/credits/{credit_type}/consume",
        ("customer", "credit_type"),
        body=True,
        deferred=True,
    ),
    "pause_subscription": _Route(
        "POST",
        "/v1/accounts/{account}/customers/{customer}/subscription/pause",
        ("account", "customer"),
        body=True,
    ),
}
# END GENERATED operation table


def _op(
    name: str,
    read: Callable[[_Response], T],
    *ids: str,
    body: Any = None,
    query: Mapping[str, str] | None = None,
    key: str | None = None,
    wait: bool = True,
) -> _Call[T]:
    """The call for one operation of :data:`_OPERATIONS`; ``ids`` in the path's order.

    ``key`` is the caller's ``Idempotency-Key``; ``wait=False`` asks the sidecar to
    queue a deferred operation (``Prefer: respond-async``).
    """
    route = _OPERATIONS[name]
    if len(ids) != len(route.params) or (body is not None) != route.body:
        raise TypeError(f"{name} takes the ids {route.params} and a body: {route.body}")
    if not wait and not route.deferred:
        raise TypeError(f"{name} cannot be queued (wait=False)")
    quoted = {p: _seg(f"{p}_id", i) for p, i in zip(route.params, ids, strict=True)}
    path = route.path.format_map(quoted)
    if not wait:
        # The record is named by its key: sending it again is the same record.
        return _Call(route.method, path, read, query, body, True, key, safe=True,
                     respond_async=True)  # fmt: skip
    return _Call(route.method, path, read, query, body, not route.cached, key)


def _unreachable(
    call: _Call[Any], base_url: str, exc: BaseException, timeout: float
) -> SidecarUnavailable:
    if isinstance(exc, TimeoutError):
        reason = f"no answer: timed out after {timeout:g}s"
    elif isinstance(exc, _ProtocolError | _Disconnected):
        reason = str(exc)
    else:
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return SidecarUnavailable(
        f"{call.method} {call.path}: cannot reach the sidecar at {base_url} ({reason})"
    )


# -- HTTP/1.1 on the wire, shared by both transports ---------------------------------------


class _ProtocolError(Exception):
    """The bytes that came back are not an HTTP/1.1 response we can read."""


class _Disconnected(ConnectionError):
    """The connection closed before any byte of the answer arrived."""


#: The longest response head read (status line and headers), as asyncio's stream limit.
_MAX_HEAD: Final = 65536
#: Bytes asked of each ``recv``: a whole small answer at once, big ones in few calls.
_RECV: Final = 65536
#: Body framings besides a Content-Length (:func:`_framing`).
_CHUNKED: Final = -1
_UNTIL_CLOSE: Final = -2


class _Encoder:
    """Writes the requests for one base URL; the parts every request shares are
    encoded once, so the common request (no body, no extra header) is two joins."""

    __slots__ = ("_common", "_host", "_prefix")

    def __init__(self, target: _Target) -> None:
        self._prefix = target.prefix
        self._host = f"Host: {target.host_header}\r\n"
        common = "".join(f"{name}: {value}\r\n" for name, value in _HEADERS.items())
        self._common = f"{self._host}{common}\r\n".encode("latin-1")

    def __call__(self, call: _Call[Any]) -> bytes:
        start = f"{call.method} {call.target(self._prefix)} HTTP/1.1\r\n".encode("latin-1")
        headers = call.headers()
        payload = call.payload()
        if headers is _HEADERS and payload is None:
            return start + self._common
        lines = [self._host]
        for name, value in headers.items():
            if "\r" in value or "\n" in value:
                raise ValueError(f"the {name} header must not contain line breaks: {value!r}")
            lines.append(f"{name}: {value}\r\n")
        if payload is not None:
            lines.append(f"Content-Length: {len(payload)}\r\n")
        lines.append("\r\n")
        return start + "".join(lines).encode("latin-1") + (payload or b"")


def _parse_head(head: bytes) -> tuple[int, dict[str, str], bool]:
    """Status, lower-cased headers, and whether the connection may be kept, from a
    response head without its blank line."""
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    status_text = rest[:3]
    if not version.startswith("HTTP/1.") or len(status_text) != 3 or not status_text.isdigit():
        raise _ProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
    return int(status_text), headers, keep


def _framing(method: str, status: int, headers: Mapping[str, str]) -> int:
    """The body's length in bytes, or :data:`_CHUNKED`, or :data:`_UNTIL_CLOSE`."""
    if method == "HEAD" or status in (204, 304):
        return 0
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return _CHUNKED
    length = headers.get("content-length")
    if length is None:
        return _UNTIL_CLOSE
    if not length.isdigit():
        raise _ProtocolError(f"bad Content-Length: {length[:40]!r}")
    return int(length)


def _chunk_size(line: bytes) -> int:
    try:
        return int(line.split(b";", 1)[0].strip(), 16)
    except ValueError:
        raise _ProtocolError("bad chunk size") from None


# -- where the sidecar is ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Target:
    """The parsed base URL: ``http(s)://host[:port][/prefix]`` or ``unix:/path.sock``."""

    scheme: str
    host: str
    port: int | None
    socket_path: str | None
    prefix: str

    @classmethod
    def parse(cls, base_url: str | None) -> _Target:
        url = (base_url or os.environ.get(ENV_URL) or DEFAULT_URL).strip()
        if url.startswith("unix:"):
            path = url[len("unix:") :]
            if path.startswith("//"):  # unix:///run/sidecar.sock
                path = path[2:]
            if not path:
                raise ValueError(f"a unix: URL needs a socket path, got {url!r}")
            # The browser guard wants a loopback Host; over a socket it is only a name.
            return cls("unix", "localhost", None, path, "")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"expected http://host:port, https://host:port or unix:/path.sock, got {url!r}"
            )
        return cls(parts.scheme, parts.hostname, parts.port, None, parts.path.rstrip("/"))

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port is None else f"{host}:{self.port}"

    def __str__(self) -> str:
        if self.socket_path is not None:
            return f"unix:{self.socket_path}"
        return f"{self.scheme}://{self.host_header}{self.prefix}"


# -- the blocking client -----------------------------------------------------------------


class _Reader:
    """Buffered reads from a blocking socket, for the rarer shapes of answer
    (chunked, until close, or longer than the first ``recv``)."""

    __slots__ = ("buffer", "sock")

    def __init__(self, sock: socket.socket, data: bytes) -> None:
        self.sock = sock
        self.buffer = bytearray(data)

    def _fill(self) -> None:
        more = self.sock.recv(_RECV)
        if not more:
            raise _ProtocolError("the connection closed in the middle of the answer")
        self.buffer += more

    def line(self) -> bytes:
        while (end := self.buffer.find(b"\r\n")) < 0:
            if len(self.buffer) > _MAX_HEAD:
                raise _ProtocolError("a line of the answer is too long")
            self._fill()
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 2]
        return line

    def exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._fill()
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    def until_close(self) -> bytes:
        chunks = [bytes(self.buffer)]
        while more := self.sock.recv(_RECV):
            chunks.append(more)
        self.buffer.clear()
        return b"".join(chunks)


class _Connection:
    """One keep-alive HTTP/1.1 connection of the blocking client, used by one call at a time.

    ``sock`` is None until the first exchange connects. ``sent`` and ``answered``
    tell, after a failure, whether the whole request went out and whether any
    byte of the answer came back (what decides a retry on a new connection).
    """

    __slots__ = ("_connect", "_poller", "answered", "sent", "sock", "timeout")

    def __init__(self, connect: Callable[[float], socket.socket]) -> None:
        self._connect = connect
        self._poller: select.poll | None = None
        self.sock: socket.socket | None = None
        self.timeout = 0.0
        self.sent = self.answered = False

    def dropped(self) -> bool:
        """True when the idle connection is closed (or has unexpected data).

        An idle connection has nothing to read; if it is readable, the server
        closed it (EOF) and reusing it would fail the next request.
        """
        if self.sock is None:
            return True
        try:
            if self._poller is not None:
                return bool(self._poller.poll(0))
            readable, _, _ = select.select([self.sock], [], [], 0)
            return bool(readable)
        except (OSError, ValueError):
            return True

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def exchange(
        self, request: bytes, method: str, timeout: float
    ) -> tuple[int, dict[str, str], bytes, bool]:
        """Send the request; its answer's status, lower-cased headers, body, and whether
        the connection may be kept. Socket errors and timeouts propagate."""
        self.sent = self.answered = False
        sock = self.sock
        if sock is None:
            sock = self.sock = self._connect(timeout)
            self.timeout = timeout
            if hasattr(select, "poll"):
                self._poller = select.poll()
                self._poller.register(sock, select.POLLIN)
        elif timeout != self.timeout:  # settimeout is a system call: only on a change
            sock.settimeout(timeout)
            self.timeout = timeout
        sock.sendall(request)
        self.sent = True
        data = sock.recv(_RECV)
        if not data:
            raise _Disconnected("the sidecar closed the connection without answering")
        self.answered = True
        while True:
            end = data.find(b"\r\n\r\n")
            while end < 0:
                if len(data) > _MAX_HEAD:
                    raise _ProtocolError("response headers too large")
                more = sock.recv(_RECV)
                if not more:
                    raise _ProtocolError("the connection closed in the middle of the answer")
                data += more
                end = data.find(b"\r\n\r\n")
            status, headers, keep = _parse_head(data[:end])
            data = data[end + 4 :]
            if status >= 200:
                break
            if not data:  # an interim 1xx answer; the real one follows
                data = sock.recv(_RECV)
                if not data:
                    raise _ProtocolError("the connection closed in the middle of the answer")
        size = _framing(method, status, headers)
        if size == len(data):  # the usual: the whole answer came in the first recv
            return status, headers, data, keep
        if size >= 0 and len(data) > size:
            return status, headers, data[:size], False  # more than asked for: never reuse
        reader = _Reader(sock, data)
        if size >= 0:
            body = reader.exactly(size)
        elif size == _CHUNKED:
            parts = []
            while (chunk := _chunk_size(reader.line())) > 0:
                parts.append(reader.exactly(chunk))
                if reader.exactly(2) != b"\r\n":
                    raise _ProtocolError("a chunk does not end where its size says")
            while reader.line():
                pass  # trailers, up to the blank line
            body = b"".join(parts)
        else:
            return status, headers, reader.until_close(), False
        return status, headers, body, keep and not reader.buffer


class _Pool:
    """Idle keep-alive connections; each request holds one connection alone."""

    def __init__(self, target: _Target) -> None:
        self._target = target
        self._lock = threading.Lock()
        self._idle: list[_Connection] = []
        self._pid = os.getpid()
        self._tls: ssl.SSLContext | None = None

    def _connect(self, timeout: float) -> socket.socket:
        t = self._target
        if t.socket_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(t.socket_path)
            except BaseException:
                sock.close()
                raise
            return sock
        port = t.port or (443 if t.scheme == "https" else 80)
        sock = socket.create_connection((t.host, port), timeout)
        try:
            # Each request goes out in one send; never hold it back for an ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if t.scheme == "https":
                if self._tls is None:
                    self._tls = ssl.create_default_context()
                sock = self._tls.wrap_socket(sock, server_hostname=t.host)
        except BaseException:
            sock.close()
            raise
        return sock

    def _forked(self) -> bool:
        # A forked child (gunicorn, multiprocessing) must not share its parent's sockets.
        if os.getpid() != self._pid:
            self._idle.clear()
            self._pid = os.getpid()
            return True
        return False

    def get(self) -> tuple[_Connection, bool]:
        """A connection and whether it was reused (a new one connects on first use)."""
        with self._lock:
            self._forked()
            while self._idle:
                conn = self._idle.pop()
                if not conn.dropped():
                    return conn, True
                conn.close()
        return _Connection(self._connect), False

    def put(self, conn: _Connection) -> None:
        with self._lock:
            if not self._forked() and len(self._idle) < _MAX_IDLE:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class SidecarClient:
    """The blocking client; thread-safe, one instance per process is enough.

    ``base_url``: the argument, else ``VELLUM_SIDECAR_URL``, else
    ``http://127.0.0.1:8700``; ``unix:/path.sock`` for a unix socket.
    ``timeout``: seconds for each socket operation of an entitlement call
    (``can``, ``check``, ``get_entitlements``, ``invalidate``), which the
    sidecar answers from its cache. ``billing_timeout``: the same for billing
    calls, which wait for the Vellum API (the sidecar allows it
    ``SIDECAR_UPSTREAM_TIMEOUT``, 5 s by default). ``fail_open``: what ``can``
    and ``check`` answer when no answer can be had (False: fail closed).
    """

    def __init__(
        self,
        base_url: str | None = None,
        timeout: float = 1.0,
        fail_open: bool = False,
        *,
        billing_timeout: float = 10.0,
    ) -> None:
        self._target = _Target.parse(base_url)
        self.base_url = str(self._target)
        self.timeout = timeout
        self.billing_timeout = billing_timeout
        self.fail_open = fail_open
        self._pool = _Pool(self._target)
        self._encode = _Encoder(self._target)

    def __repr__(self) -> str:
        return f"SidecarClient({self.base_url!r}, fail_open={self.fail_open!r})"

    def close(self) -> None:
        """Close the idle connections (the client stays usable)."""
        self._pool.close()

    def __enter__(self) -> SidecarClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _exchange(self, call: _Call[Any]) -> _Response:
        timeout = self.billing_timeout if call.billing else self.timeout
        request = self._encode(call)
        for attempt in (1, 2):
            conn, reused = self._pool.get()
            try:
                status, headers, body, keep = conn.exchange(request, call.method, timeout)
            except (OSError, _ProtocolError) as exc:
                conn.close()
                # A kept-alive connection the sidecar closed meanwhile fails before any
                # byte of the answer: try once more on a new one, unless the request
                # may have been acted upon.
                stale = isinstance(exc, ConnectionError) and not conn.answered
                retry = stale and (not conn.sent or call.idempotent)
                if reused and attempt == 1 and retry:
                    continue
                raise _unreachable(call, self.base_url, exc, timeout) from exc
            if keep:
                self._pool.put(conn)
            else:
                conn.close()
            return _Response(call.method, call.path, status, headers, body)
        raise AssertionError("unreachable")  # pragma: no cover

    # BEGIN GENERATED blocking API: scripts/unasync_client.py writes it from AsyncSidecarClient's

    def _run(self, call: _Call[T]) -> T:
        return call.read(self._exchange(call))

    # -- entitlements

    def can(self, customer_id: str, module_id: str) -> bool:
        """May the customer use the module? Never raises for an outage (fail closed).

        False when no answer can be had, unless the client is ``fail_open``.
        A caller's mistake (an empty id, a refused request) still raises.
        """
        customer, module = _seg("customer_id", customer_id), _seg("module_id", module_id)
        try:
            return self._run(_Call("GET", f"/v1/customers/{customer}/can/{module}", _allowed))
        except SidecarUnavailable:
            return self.fail_open

    def get_entitlements(self, customer_id: str) -> EntitlementSet:
        """The customer's entitlements; ``found`` is False for an unknown customer."""
        return self._run(_op("get_entitlements", _entitlements(customer_id), customer_id))

    def check(self, pairs: Iterable[tuple[str, str]]) -> list[bool]:
        """``can`` for many ``(customer_id, module_id)`` pairs at once, in order."""
        items = _pairs(pairs)
        verdicts: list[bool] = []
        for start in range(0, len(items), MAX_BATCH):
            chunk = [{"customerId": c, "module": m} for c, m in items[start : start + MAX_BATCH]]
            try:
                answers = self._run(
                    _Call("POST", "/v1/check", _results, body={"checks": chunk}, safe=True)
                )
            except SidecarUnavailable:
                answers = [None] * len(chunk)
            verdicts += [self.fail_open if a is None else a for a in answers]
        return verdicts

    def invalidate(self, customer_id: str | None = None) -> None:
        """Drop one customer's cached entitlements, or everyone's, on every sidecar.

        Flags are left alone (``invalidate_flags``), as the Vellum SDK does.
        """
        self._drop(customer_id, "entitlements")

    def _drop(self, customer_id: str | None, axis: str) -> None:
        if customer_id is None:
            path = "/v1/cache"
        else:
            path = f"/v1/customers/{_seg('customer_id', customer_id)}/cache"
        self._run(_Call("DELETE", path, _nothing, query={"axis": axis}))

    # -- flags: a separate axis (a flag says a feature is on, never that it was paid for)

    def flags(self, customer_id: str) -> dict[str, bool]:
        """Every flag for the customer: the global values with its overrides applied."""
        return self._run(_op("flags", _flags, customer_id))

    def flag(self, flag_id: str, customer_id: str, *, default: bool) -> bool:
        """One flag, with the answer for when there is none.

        ``default`` is returned for a flag the upstream does not define and when no
        answer can be had (the sidecar or the upstream down): like the Vellum SDK,
        this never raises for an outage. A caller's mistake (an empty id) raises.
        """
        path = f"/v1/customers/{_seg('customer_id', customer_id)}/flags/{_seg('flag_id', flag_id)}"
        query = {"default": "true" if default else "false"}
        try:
            return self._run(_Call("GET", path, _flag_value, query=query))
        except SidecarUnavailable:
            return default

    def global_flags(self) -> dict[str, bool]:
        """The tenant-global flag values, no customer applied (a job with no user at hand)."""
        return self._run(_op("global_flags", _flags))

    def invalidate_flags(self, customer_id: str | None = None) -> None:
        """Drop one customer's cached flags, or every customer's and the global flags, on
        every sidecar. Entitlements are left alone."""
        self._drop(customer_id, "flags")

    # -- billing: a method per operation of the table, generated (scripts/gen_clients.py)

    # BEGIN GENERATED billing methods
    def create_checkout(
        self,
        *,
        account_id: str,
        customer_id: str,
        plan_id: str,
        success_url: str,
        cancel_url: str,
        plan_version: int | None = None,
        product_id: str | None = None,
        seats: int = 1,
        add_on_module_ids: list[str] | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Start a hosted subscription checkout."""
        _seg("customer_id", customer_id)
        _seg("plan_id", plan_id)
        body = _drop_none(
            {
                "customerId": customer_id,
                "planId": plan_id,
                "planVersion": plan_version,
                "productId": product_id,
                "seats": seats,
                "addOnModuleIds": add_on_module_ids,
                "successUrl": success_url,
                "cancelUrl": cancel_url,
            }
        )
        call = _op("create_checkout", _object, account_id, body=body, key=idempotency_key)
        return self._run(call)

    def create_setup_checkout(
        self,
        *,
        account_id: str,
        success_url: str,
        cancel_url: str,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Start a checkout session that adds a payment method."""
        body = _drop_none({"successUrl": success_url, "cancelUrl": cancel_url})
        call = _op("create_setup_checkout", _object, account_id, body=body, key=idempotency_key)
        return self._run(call)

    def create_subscription(
        self,
        *,
        account_id: str,
        customer_id: str,
        plan_id: str,
        plan_version: int | None = None,
        product_id: str | None = None,
        seats: int = 1,
        add_on_module_ids: list[str] | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Subscribe a customer to a plan (no hosted page; the account's card pays)."""
        _seg("plan_id", plan_id)
        body = _drop_none(
            {
                "planId": plan_id,
                "planVersion": plan_version,
                "productId": product_id,
                "seats": seats,
                "addOnModuleIds": add_on_module_ids,
            }
        )
        call = _op(
            "create_subscription", _object, account_id, customer_id, body=body, key=idempotency_key
        )
        return self._run(call)

    def get_subscription(self, *, account_id: str, customer_id: str) -> dict[str, Any]:
        """A customer's subscription."""
        call = _op("get_subscription", _object, account_id, customer_id)
        return self._run(call)

    def update_subscription(
        self,
        *,
        account_id: str,
        customer_id: str,
        plan_id: str,
        plan_version: int,
        product_id: str | None = None,
        seats: int | None = None,
        add_on_module_ids: list[str] | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Change a subscription's plan, seats and add-ons at once."""
        _seg("plan_id", plan_id)
        body = _drop_none(
            {
                "planId": plan_id,
                "planVersion": plan_version,
                "productId": product_id,
                "seats": seats,
                "addOnModuleIds": add_on_module_ids,
            }
        )
        call = _op(
            "update_subscription", _object, account_id, customer_id, body=body, key=idempotency_key
        )
        return self._run(call)

    def cancel_subscription(
        self,
        *,
        account_id: str,
        customer_id: str,
        at_period_end: bool = False,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Cancel a customer's subscription (atPeriodEnd=true to cancel at the period's end)."""
        query = _query({"atPeriodEnd": "true" if at_period_end else None})
        call = _op(
            "cancel_subscription",
            _object,
            account_id,
            customer_id,
            query=query,
            key=idempotency_key,
        )
        return self._run(call)

    def preview_change(
        self,
        *,
        account_id: str,
        customer_id: str,
        product_id: str | None = None,
        plan_id: str | None = None,
        plan_version: int | None = None,
        seats: int | None = None,
        add_on_module_ids: list[str] | None = None,
    ) -> dict[str, Any]:
        """What a change would cost, changing nothing."""
        body = _drop_none(
            {
                "productId": product_id,
                "planId": plan_id,
                "planVersion": plan_version,
                "seats": seats,
                "addOnModuleIds": add_on_module_ids,
            }
        )
        call = _op("preview_change", _object, account_id, customer_id, body=body)
        return self._run(call)

    def set_seats(
        self, *, account_id: str, customer_id: str, seats: int, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Set a subscription's seats."""
        body = _drop_none({"seats": seats})
        call = _op("set_seats", _object, account_id, customer_id, body=body, key=idempotency_key)
        return self._run(call)

    def change_plan(
        self,
        *,
        account_id: str,
        customer_id: str,
        plan_id: str,
        plan_version: int,
        product_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Move a subscription to another plan or plan version."""
        _seg("plan_id", plan_id)
        body = _drop_none({"productId": product_id, "planId": plan_id, "planVersion": plan_version})
        call = _op("change_plan", _object, account_id, customer_id, body=body, key=idempotency_key)
        return self._run(call)

    def reactivate(
        self, *, account_id: str, customer_id: str, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Withdraw a pending cancel, or restart an ended subscription."""
        call = _op("reactivate", _object, account_id, customer_id, key=idempotency_key)
        return self._run(call)

    def create_account(
        self,
        *,
        account_id: str,
        name: str | None = None,
        email: str | None = None,
        billing_customer_id: str | None = None,
        create_billing_customer: bool = False,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Create an account (or answer the existing one), with its billing customer."""
        _seg("account_id", account_id)
        body = _drop_none(
            {
                "accountId": account_id,
                "name": name,
                "email": email,
                "billingCustomerId": billing_customer_id,
                "createBillingCustomer": create_billing_customer or None,
            }
        )
        call = _op("create_account", _object, body=body, key=idempotency_key)
        return self._run(call)

    def create_customer(
        self,
        *,
        account_id: str,
        customer_id: str,
        name: str | None = None,
        email: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Create a customer under an account."""
        _seg("customer_id", customer_id)
        body = _drop_none({"customerId": customer_id, "name": name, "email": email})
        call = _op("create_customer", _object, account_id, body=body, key=idempotency_key)
        return self._run(call)

    def set_account_status(
        self, *, account_id: str, status: str, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Set an account's status."""
        body = _drop_none({"status": status})
        call = _op("set_account_status", _object, account_id, body=body, key=idempotency_key)
        return self._run(call)

    def set_customer_status(
        self, *, account_id: str, customer_id: str, status: str, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Set a customer's status."""
        body = _drop_none({"status": status})
        call = _op(
            "set_customer_status", _object, account_id, customer_id, body=body, key=idempotency_key
        )
        return self._run(call)

    def list_payment_methods(self, *, account_id: str) -> list[Any]:
        """An account's saved cards."""
        call = _op("list_payment_methods", _field_list("methods"), account_id)
        return self._run(call)

    def set_default_payment_method(
        self, *, account_id: str, method_id: str, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Make a payment method (its ref) the account's default."""
        call = _op(
            "set_default_payment_method", _object, account_id, method_id, key=idempotency_key
        )
        return self._run(call)

    def remove_payment_method(
        self, *, account_id: str, method_id: str, idempotency_key: str | None = None
    ) -> dict[str, Any] | None:
        """Remove a payment method (its ref) from an account."""
        call = _op(
            "remove_payment_method", _maybe_object, account_id, method_id, key=idempotency_key
        )
        return self._run(call)

    def set_subscription_payment_method(
        self,
        *,
        account_id: str,
        customer_id: str,
        method_id: str,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Set the payment method (its ref) that pays a customer's subscription."""
        _seg("method_id", method_id)
        body = _drop_none({"methodId": method_id})
        call = _op(
            "set_subscription_payment_method",
            _object,
            account_id,
            customer_id,
            body=body,
            key=idempotency_key,
        )
        return self._run(call)

    def list_invoices(self, *, account_id: str, customer_id: str | None = None) -> list[Any]:
        """An account's invoices (customerId to filter)."""
        query = _query({"customerId": customer_id})
        call = _op("list_invoices", _field_list("invoices"), account_id, query=query)
        return self._run(call)

    def invoice_pdf(self, *, account_id: str, invoice_id: str) -> bytes:
        """An invoice's PDF (its ref), after the upstream's ownership check."""
        call = _op("invoice_pdf", _bytes, account_id, invoice_id)
        return self._run(call)

    def list_credit_types(self) -> list[Any]:
        """The tenant's credit types."""
        call = _op("list_credit_types", _field_list("creditTypes"))
        return self._run(call)

    def list_credit_packs(self, *, credit_type_id: str) -> list[Any]:
        """The packs for sale within a credit type."""
        call = _op("list_credit_packs", _field_list("packs"), credit_type_id)
        return self._run(call)

    def list_credits(self, *, customer_id: str) -> list[Any]:
        """A customer's credit balances (uncached: balances change out of band)."""
        call = _op("list_credits", _field_list("credits"), customer_id)
        return self._run(call)

    def get_credit_balance(self, *, customer_id: str, credit_type_id: str) -> dict[str, Any]:
        """A customer's balance of one credit type (uncached)."""
        call = _op("get_credit_balance", _object, customer_id, credit_type_id)
        return self._run(call)

    def consume_credits(
        self,
        *,
        customer_id: str,
        credit_type_id: str,
        amount: int,
        idempotency_key: str,
        wait: bool = True,
    ) -> dict[str, Any]:
        """Spend credits: all or nothing, idempotent on the body's idempotencyKey. ``wait=False``:
        queued by the sidecar instead (``Prefer: respond-async``) and delivered by it later, even
        through an outage: the 202 ``{queued, idempotencyKey}``, or the outcome once the key's
        record is final; ``usage(key)`` reads it."""
        body = _drop_none({"amount": amount, "idempotencyKey": idempotency_key})
        call = _op("consume_credits", _object, customer_id, credit_type_id, body=body, wait=wait)
        return self._run(call)

    def pause_subscription(
        self,
        *,
        account_id: str,
        customer_id: str,
        cycles: int | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Pause a subscription: no access and no bill until reactivate resumes it, or until cycles
        periods have passed."""
        body = _drop_none({"cycles": cycles})
        call = _op(
            "pause_subscription", _object, account_id, customer_id, body=body, key=idempotency_key
        )
        return self._run(call)

    # END GENERATED billing methods

    # -- billing written by hand: several SDK methods on one operation, or a body that
    # is not one keyword per field (one pack or several), or an older upstream's answer

    def add_add_on(
        self,
        *,
        account_id: str,
        customer_id: str,
        module_id: str,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        body, ids = {"add": [module_id]}, (account_id, customer_id)
        call = _op("change_add_ons", _object, *ids, body=body, key=idempotency_key)
        return self._run(call)

    def remove_add_on(
        self,
        *,
        account_id: str,
        customer_id: str,
        module_id: str,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        body, ids = {"remove": [module_id]}, (account_id, customer_id)
        call = _op("change_add_ons", _object, *ids, body=body, key=idempotency_key)
        return self._run(call)

    def invoice_pdf_url(self, *, account_id: str, invoice_id: str) -> str:
        """Upstreams before SDK 1.2: the ``Location`` of the redirect, not followed."""
        return self._run(_op("invoice_pdf", _location, account_id, invoice_id))

    def usage(self, idempotency_key: str) -> dict[str, Any]:
        """A queued usage record (``consume_credits(..., wait=False)``) by its key:
        ``{"state": "queued" | "delivered" | "insufficient" | "rejected", ...}``. Raises
        ``SidecarApiError`` (404 ``usage_not_found``) for a key no record has."""
        path = f"/v1/usage/{_seg('idempotency_key', idempotency_key)}"
        return self._run(_Call("GET", path, _object, billing=True))

    def create_credit_checkout(
        self,
        *,
        account_id: str,
        customer_id: str,
        success_url: str,
        cancel_url: str,
        credit_type_id: str | None = None,
        pack_id: str | None = None,
        quantity: int = 1,
        items: list[dict[str, Any]] | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """A hosted checkout buying one pack (``credit_type_id``, ``pack_id``, ``quantity``)
        or several (``items``: ``{"creditTypeId", "packId", "quantity"?}``)."""
        body: dict[str, Any] = {
            "customerId": customer_id,
            "successUrl": success_url,
            "cancelUrl": cancel_url,
        }
        if items is not None:
            body["items"] = items
        else:
            body |= _drop_none(
                {"creditTypeId": credit_type_id, "packId": pack_id, "quantity": quantity}
            )
        call = _op("create_credit_checkout", _object, account_id, body=body, key=idempotency_key)
        return self._run(call)

    # END GENERATED blocking API


# -- the asyncio client ------------------------------------------------------------------


@dataclass(slots=True)
class _Stream:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def usable(self) -> bool:
        return not self.writer.is_closing() and not self.reader.at_eof()

    def close(self) -> None:
        self.writer.close()


async def _read_response(
    reader: asyncio.StreamReader, method: str
) -> tuple[int, dict[str, str], bytes, bool]:
    """Status, lower-cased headers, body, and whether the connection may be kept."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise _ProtocolError("the connection closed in the middle of the answer") from None
        raise _Disconnected("the sidecar closed the connection without answering") from None
    except asyncio.LimitOverrunError:
        raise _ProtocolError("response headers too large") from None
    try:
        return await _read_rest(reader, method, head)
    except asyncio.IncompleteReadError:
        raise _ProtocolError("the connection closed in the middle of the answer") from None
    except asyncio.LimitOverrunError:
        raise _ProtocolError("a line of the answer is too long") from None


async def _read_rest(
    reader: asyncio.StreamReader, method: str, head: bytes
) -> tuple[int, dict[str, str], bytes, bool]:
    while True:
        status, headers, keep = _parse_head(head[:-4])
        if status >= 200:
            break
        head = await reader.readuntil(b"\r\n\r\n")  # an interim 1xx; the real answer follows
    size = _framing(method, status, headers)
    if size >= 0:
        return status, headers, await reader.readexactly(size), keep
    if size == _CHUNKED:
        parts = []
        while (chunk := _chunk_size(await reader.readuntil(b"\r\n"))) > 0:
            parts.append(await reader.readexactly(chunk))
            if await reader.readexactly(2) != b"\r\n":
                raise _ProtocolError("a chunk does not end where its size says")
        while await reader.readuntil(b"\r\n") != b"\r\n":
            pass  # trailers
        return status, headers, b"".join(parts), keep
    return status, headers, await reader.read(), False  # the body ends with the connection


class AsyncSidecarClient:
    """The asyncio client: :class:`SidecarClient`'s methods, awaitable.

    Pure ``asyncio`` streams, no threads. Use it from one event loop (idle
    connections belong to the loop that opened them); ``async with`` or
    ``await client.aclose()`` closes them.
    """

    def __init__(
        self,
        base_url: str | None = None,
        timeout: float = 1.0,
        fail_open: bool = False,
        *,
        billing_timeout: float = 10.0,
    ) -> None:
        self._target = _Target.parse(base_url)
        self.base_url = str(self._target)
        self.timeout = timeout
        self.billing_timeout = billing_timeout
        self.fail_open = fail_open
        self._idle: list[_Stream] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._encode = _Encoder(self._target)
        self._tls: ssl.SSLContext | None = None

    def __repr__(self) -> str:
        return f"AsyncSidecarClient({self.base_url!r}, fail_open={self.fail_open!r})"

    async def aclose(self) -> None:
        """Close the idle connections (the client stays usable)."""
        idle, self._idle = self._idle, []
        for stream in idle:
            stream.close()
        for stream in idle:
            with contextlib.suppress(OSError):
                await stream.writer.wait_closed()

    async def __aenter__(self) -> AsyncSidecarClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _connect(self) -> _Stream:
        t = self._target
        if t.socket_path is not None:
            reader, writer = await asyncio.open_unix_connection(t.socket_path)
        elif t.scheme == "https":
            if self._tls is None:
                self._tls = ssl.create_default_context()
            port = t.port or 443
            reader, writer = await asyncio.open_connection(t.host, port, ssl=self._tls)
        else:
            reader, writer = await asyncio.open_connection(t.host, t.port or 80)
        return _Stream(reader, writer)

    async def _get(self) -> tuple[_Stream, bool]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._idle = []  # connections of another (likely closed) loop
            self._loop = loop
        while self._idle:
            stream = self._idle.pop()
            if stream.usable():
                return stream, True
            stream.close()
        return await self._connect(), False

    async def _exchange(self, call: _Call[Any]) -> _Response:
        timeout = self.billing_timeout if call.billing else self.timeout
        request = self._encode(call)
        for attempt in (1, 2):
            stream: _Stream | None = None
            reused = sent = done = False
            try:
                async with asyncio.timeout(timeout):
                    stream, reused = await self._get()
                    stream.writer.write(request)
                    await stream.writer.drain()
                    sent = True
                    status, headers, body, keep = await _read_response(stream.reader, call.method)
                done = True
            except (OSError, EOFError, TimeoutError, _ProtocolError) as exc:
                # A kept-alive connection the sidecar closed meanwhile fails before any
                # byte of the answer: try once more on a new one, unless the request
                # may have been acted upon.
                stale = isinstance(exc, ConnectionError)
                if reused and attempt == 1 and stale and (not sent or call.idempotent):
                    continue
                raise _unreachable(call, self.base_url, exc, timeout) from exc
            finally:
                # Anything but a whole answer (an error, a timeout, a cancellation)
                # leaves the connection in an unknown state: never reuse it.
                if stream is not None and (not done or not keep):
                    stream.close()
            if keep and stream is not None and len(self._idle) < _MAX_IDLE:
                self._idle.append(stream)
            elif stream is not None and keep:
                stream.close()
            return _Response(call.method, call.path, status, headers, body)
        raise AssertionError("unreachable")  # pragma: no cover

    # BEGIN the API, written once: scripts/unasync_client.py copies it into SidecarClient

    async def _run(self, call: _Call[T]) -> T:
        return call.read(await self._exchange(call))

    # -- entitlements

    async def can(self, customer_id: str, module_id: str) -> bool:
        """May the customer use the module? Never raises for an outage (fail closed).

        False when no answer can be had, unless the client is ``fail_open``.
        A caller's mistake (an empty id, a refused request) still raises.
        """
        customer, module = _seg("customer_id", customer_id), _seg("module_id", module_id)
        try:
            return await self._run(_Call("GET", f"/v1/customers/{customer}/can/{module}", _allowed))
        except SidecarUnavailable:
            return self.fail_open

    async def get_entitlements(self, customer_id: str) -> EntitlementSet:
        """The customer's entitlements; ``found`` is False for an unknown customer."""
        return await self._run(_op("get_entitlements", _entitlements(customer_id), customer_id))

    async def check(self, pairs: Iterable[tuple[str, str]]) -> list[bool]:
        """``can`` for many ``(customer_id, module_id)`` pairs at once, in order."""
        items = _pairs(pairs)
        verdicts: list[bool] = []
        for start in range(0, len(items), MAX_BATCH):
            chunk = [{"customerId": c, "module": m} for c, m in items[start : start + MAX_BATCH]]
            try:
                answers = await self._run(
                    _Call("POST", "/v1/check", _results, body={"checks": chunk}, safe=True)
                )
            except SidecarUnavailable:
                answers = [None] * len(chunk)
            verdicts += [self.fail_open if a is None else a for a in answers]
        return verdicts

    async def invalidate(self, customer_id: str | None = None) -> None:
        """Drop one customer's cached entitlements, or everyone's, on every sidecar.

        Flags are left alone (``invalidate_flags``), as the Vellum SDK does.
        """
        await self._drop(customer_id, "entitlements")

    async def _drop(self, customer_id: str | None, axis: str) -> None:
        if customer_id is None:
            path = "/v1/cache"
        else:
            path = f"/v1/customers/{_seg('customer_id', customer_id)}/cache"
        await self._run(_Call("DELETE", path, _nothing, query={"axis": axis}))

    # -- flags: a separate axis (a flag says a feature is on, never that it was paid for)

    async def flags(self, customer_id: str) -> dict[str, bool]:
        """Every flag for the customer: the global values with its overrides applied."""
        return await self._run(_op("flags", _flags, customer_id))

    async def flag(self, flag_id: str, customer_id: str, *, default: bool) -> bool:
        """One flag, with the answer for when there is none.

        ``default`` is returned for a flag the upstream does not define and when no
        answer can be had (the sidecar or the upstream down): like the Vellum SDK,
        this never raises for an outage. A caller's mistake (an empty id) raises.
        """
        path = f"/v1/customers/{_seg('customer_id', customer_id)}/flags/{_seg('flag_id', flag_id)}"
        query = {"default": "true" if default else "false"}
        try:
            return await self._run(_Call("GET", path, _flag_value, query=query))
        except SidecarUnavailable:
            return default

    async def global_flags(self) -> dict[str, bool]:
        """The tenant-global flag values, no customer applied (a job with no user at hand)."""
        return await self._run(_op("global_flags", _flags))

    async def invalidate_flags(self, customer_id: str | None = None) -> None:
        """Drop one customer's cached flags, or every customer's and the global flags, on
        every sidecar. Entitlements are left alone."""
        await self._drop(customer_id, "flags")

    # -- billing: a method per operation of the table, generated (scripts/gen_clients.py)

    # BEGIN GENERATED billing methods
    async def create_checkout(
        self,
        *,
        account_id: str,
        customer_id: str,
        plan_id: str,
        success_url: str,
        cancel_url: str,
        plan_version: int | None = None,
        product_id: str | None = None,
        seats: int = 1,
        add_on_module_ids: list[str] | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Start a hosted subscription checkout."""
        _seg("customer_id", customer_id)
        _seg("plan_id", plan_id)
        body = _drop_none(
            {
                "customerId": customer_id,
                "planId": plan_id,
                "planVersion": plan_version,
                "productId": product_id,
                "seats": seats,
                "addOnModuleIds": add_on_module_ids,
                "successUrl": success_url,
                "cancelUrl": cancel_url,
            }
        )
        call = _op("create_checkout", _object, account_id, body=body, key=idempotency_key)
        return await self._run(call)

    async def create_setup_checkout(
        self,
        *,
        account_id: str,
        success_url: str,
        cancel_url: str,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Start a checkout session that adds a payment method."""
        body = _drop_none({"successUrl": success_url, "cancelUrl": cancel_url})
        call = _op("create_setup_checkout", _object, account_id, body=body, key=idempotency_key)
        return await self._run(call)

    async def create_subscription(
        self,
        *,
        account_id: str,
        customer_id: str,
        plan_id: str,
        plan_version: int | None = None,
        product_id: str | None = None,
        seats: int = 1,
        add_on_module_ids: list[str] | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Subscribe a customer to a plan (no hosted page; the account's card pays)."""
        _seg("plan_id", plan_id)
        body = _drop_none(
            {
                "planId": plan_id,
                "planVersion": plan_version,
                "productId": product_id,
                "seats": seats,
                "addOnModuleIds": add_on_module_ids,
            }
        )
        call = _op(
            "create_subscription", _object, account_id, customer_id, body=body, key=idempotency_key
        )
        return await self._run(call)

    async def get_subscription(self, *, account_id: str, customer_id: str) -> dict[str, Any]:
        """A customer's subscription."""
        call = _op("get_subscription", _object, account_id, customer_id)
        return await self._run(call)

    async def update_subscription(
        self,
        *,
        account_id: str,
        customer_id: str,
        plan_id: str,
        plan_version: int,
        product_id: str | None = None,
        seats: int | None = None,
        add_on_module_ids: list[str] | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Change a subscription's plan, seats and add-ons at once."""
        _seg("plan_id", plan_id)
        body = _drop_none(
            {
                "planId": plan_id,
                "planVersion": plan_version,
                "productId": product_id,
                "seats": seats,
                "addOnModuleIds": add_on_module_ids,
            }
        )
        call = _op(
            "update_subscription", _object, account_id, customer_id, body=body, key=idempotency_key
        )
        return await self._run(call)

    async def cancel_subscription(
        self,
        *,
        account_id: str,
        customer_id: str,
        at_period_end: bool = False,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Cancel a customer's subscription (atPeriodEnd=true to cancel at the period's end)."""
        query = _query({"atPeriodEnd": "true" if at_period_end else None})
        call = _op(
            "cancel_subscription",
            _object,
            account_id,
            customer_id,
            query=query,
            key=idempotency_key,
        )
        return await self._run(call)

    async def preview_change(
        self,
        *,
        account_id: str,
        customer_id: str,
        product_id: str | None = None,
        plan_id: str | None = None,
        plan_version: int | None = None,
        seats: int | None = None,
        add_on_module_ids: list[str] | None = None,
    ) -> dict[str, Any]:
        """What a change would cost, changing nothing."""
        body = _drop_none(
            {
                "productId": product_id,
                "planId": plan_id,
                "planVersion": plan_version,
                "seats": seats,
                "addOnModuleIds": add_on_module_ids,
            }
        )
        call = _op("preview_change", _object, account_id, customer_id, body=body)
        return await self._run(call)

    async def set_seats(
        self, *, account_id: str, customer_id: str, seats: int, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Set a subscription's seats."""
        body = _drop_none({"seats": seats})
        call = _op("set_seats", _object, account_id, customer_id, body=body, key=idempotency_key)
        return await self._run(call)

    async def change_plan(
        self,
        *,
        account_id: str,
        customer_id: str,
        plan_id: str,
        plan_version: int,
        product_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Move a subscription to another plan or plan version."""
        _seg("plan_id", plan_id)
        body = _drop_none({"productId": product_id, "planId": plan_id, "planVersion": plan_version})
        call = _op("change_plan", _object, account_id, customer_id, body=body, key=idempotency_key)
        return await self._run(call)

    async def reactivate(
        self, *, account_id: str, customer_id: str, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Withdraw a pending cancel, or restart an ended subscription."""
        call = _op("reactivate", _object, account_id, customer_id, key=idempotency_key)
        return await self._run(call)

    async def create_account(
        self,
        *,
        account_id: str,
        name: str | None = None,
        email: str | None = None,
        billing_customer_id: str | None = None,
        create_billing_customer: bool = False,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Create an account (or answer the existing one), with its billing customer."""
        _seg("account_id", account_id)
        body = _drop_none(
            {
                "accountId": account_id,
                "name": name,
                "email": email,
                "billingCustomerId": billing_customer_id,
                "createBillingCustomer": create_billing_customer or None,
            }
        )
        call = _op("create_account", _object, body=body, key=idempotency_key)
        return await self._run(call)

    async def create_customer(
        self,
        *,
        account_id: str,
        customer_id: str,
        name: str | None = None,
        email: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Create a customer under an account."""
        _seg("customer_id", customer_id)
        body = _drop_none({"customerId": customer_id, "name": name, "email": email})
        call = _op("create_customer", _object, account_id, body=body, key=idempotency_key)
        return await self._run(call)

    async def set_account_status(
        self, *, account_id: str, status: str, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Set an account's status."""
        body = _drop_none({"status": status})
        call = _op("set_account_status", _object, account_id, body=body, key=idempotency_key)
        return await self._run(call)

    async def set_customer_status(
        self, *, account_id: str, customer_id: str, status: str, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Set a customer's status."""
        body = _drop_none({"status": status})
        call = _op(
            "set_customer_status", _object, account_id, customer_id, body=body, key=idempotency_key
        )
        return await self._run(call)

    async def list_payment_methods(self, *, account_id: str) -> list[Any]:
        """An account's saved cards."""
        call = _op("list_payment_methods", _field_list("methods"), account_id)
        return await self._run(call)

    async def set_default_payment_method(
        self, *, account_id: str, method_id: str, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Make a payment method (its ref) the account's default."""
        call = _op(
            "set_default_payment_method", _object, account_id, method_id, key=idempotency_key
        )
        return await self._run(call)

    async def remove_payment_method(
        self, *, account_id: str, method_id: str, idempotency_key: str | None = None
    ) -> dict[str, Any] | None:
        """Remove a payment method (its ref) from an account."""
        call = _op(
            "remove_payment_method", _maybe_object, account_id, method_id, key=idempotency_key
        )
        return await self._run(call)

    async def set_subscription_payment_method(
        self,
        *,
        account_id: str,
        customer_id: str,
        method_id: str,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Set the payment method (its ref) that pays a customer's subscription."""
        _seg("method_id", method_id)
        body = _drop_none({"methodId": method_id})
        call = _op(
            "set_subscription_payment_method",
            _object,
            account_id,
            customer_id,
            body=body,
            key=idempotency_key,
        )
        return await self._run(call)

    async def list_invoices(self, *, account_id: str, customer_id: str | None = None) -> list[Any]:
        """An account's invoices (customerId to filter)."""
        query = _query({"customerId": customer_id})
        call = _op("list_invoices", _field_list("invoices"), account_id, query=query)
        return await self._run(call)

    async def invoice_pdf(self, *, account_id: str, invoice_id: str) -> bytes:
        """An invoice's PDF (its ref), after the upstream's ownership check."""
        call = _op("invoice_pdf", _bytes, account_id, invoice_id)
        return await self._run(call)

    async def list_credit_types(self) -> list[Any]:
        """The tenant's credit types."""
        call = _op("list_credit_types", _field_list("creditTypes"))
        return await self._run(call)

    async def list_credit_packs(self, *, credit_type_id: str) -> list[Any]:
        """The packs for sale within a credit type."""
        call = _op("list_credit_packs", _field_list("packs"), credit_type_id)
        return await self._run(call)

    async def list_credits(self, *, customer_id: str) -> list[Any]:
        """A customer's credit balances (uncached: balances change out of band)."""
        call = _op("list_credits", _field_list("credits"), customer_id)
        return await self._run(call)

    async def get_credit_balance(self, *, customer_id: str, credit_type_id: str) -> dict[str, Any]:
        """A customer's balance of one credit type (uncached)."""
        call = _op("get_credit_balance", _object, customer_id, credit_type_id)
        return await self._run(call)

    async def consume_credits(
        self,
        *,
        customer_id: str,
        credit_type_id: str,
        amount: int,
        idempotency_key: str,
        wait: bool = True,
    ) -> dict[str, Any]:
        """Spend credits: all or nothing, idempotent on the body's idempotencyKey. ``wait=False``:
        queued by the sidecar instead (``Prefer: respond-async``) and delivered by it later, even
        through an outage: the 202 ``{queued, idempotencyKey}``, or the outcome once the key's
        record is final; ``usage(key)`` reads it."""
        body = _drop_none({"amount": amount, "idempotencyKey": idempotency_key})
        call = _op("consume_credits", _object, customer_id, credit_type_id, body=body, wait=wait)
        return await self._run(call)

    async def pause_subscription(
        self,
        *,
        account_id: str,
        customer_id: str,
        cycles: int | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Pause a subscription: no access and no bill until reactivate resumes it, or until cycles
        periods have passed."""
        body = _drop_none({"cycles": cycles})
        call = _op(
            "pause_subscription", _object, account_id, customer_id, body=body, key=idempotency_key
        )
        return await self._run(call)

    # END GENERATED billing methods

    # -- billing written by hand: several SDK methods on one operation, or a body that
    # is not one keyword per field (one pack or several), or an older upstream's answer

    async def add_add_on(
        self,
        *,
        account_id: str,
        customer_id: str,
        module_id: str,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        body, ids = {"add": [module_id]}, (account_id, customer_id)
        call = _op("change_add_ons", _object, *ids, body=body, key=idempotency_key)
        return await self._run(call)

    async def remove_add_on(
        self,
        *,
        account_id: str,
        customer_id: str,
        module_id: str,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        body, ids = {"remove": [module_id]}, (account_id, customer_id)
        call = _op("change_add_ons", _object, *ids, body=body, key=idempotency_key)
        return await self._run(call)

    async def invoice_pdf_url(self, *, account_id: str, invoice_id: str) -> str:
        """Upstreams before SDK 1.2: the ``Location`` of the redirect, not followed."""
        return await self._run(_op("invoice_pdf", _location, account_id, invoice_id))

    async def usage(self, idempotency_key: str) -> dict[str, Any]:
        """A queued usage record (``consume_credits(..., wait=False)``) by its key:
        ``{"state": "queued" | "delivered" | "insufficient" | "rejected", ...}``. Raises
        ``SidecarApiError`` (404 ``usage_not_found``) for a key no record has."""
        path = f"/v1/usage/{_seg('idempotency_key', idempotency_key)}"
        return await self._run(_Call("GET", path, _object, billing=True))

    async def create_credit_checkout(
        self,
        *,
        account_id: str,
        customer_id: str,
        success_url: str,
        cancel_url: str,
        credit_type_id: str | None = None,
        pack_id: str | None = None,
        quantity: int = 1,
        items: list[dict[str, Any]] | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """A hosted checkout buying one pack (``credit_type_id``, ``pack_id``, ``quantity``)
        or several (``items``: ``{"creditTypeId", "packId", "quantity"?}``)."""
        body: dict[str, Any] = {
            "customerId": customer_id,
            "successUrl": success_url,
            "cancelUrl": cancel_url,
        }
        if items is not None:
            body["items"] = items
        else:
            body |= _drop_none(
                {"creditTypeId": credit_type_id, "packId": pack_id, "quantity": quantity}
            )
        call = _op("create_credit_checkout", _object, account_id, body=body, key=idempotency_key)
        return await self._run(call)

    # END the API
