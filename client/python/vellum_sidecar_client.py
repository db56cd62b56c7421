"""A tiny client for vellum-sidecar's local API: one file, standard library only.

It keeps the Vellum SDK's method names and keyword arguments, minus the API key
(the sidecar holds it), so moving an app to the sidecar is a one-line change::

    from vellum_sidecar_client import SidecarClient

    sidecar = SidecarClient()          # VELLUM_SIDECAR_URL, else http://127.0.0.1:8700
    if sidecar.can("cus_123", "reports"):
        ...
    ents = sidecar.get_entitlements("cus_123")
    ents.found, ents.status, ents.is_active(), ents.has("exports"), ents.config("seats", 1)

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
import http.client
import json
import os
import select
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
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

    def is_active(self) -> bool:
        """True when the status is ``active`` or ``trialing``."""
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


@dataclass(frozen=True, slots=True)
class _Response:
    method: str
    path: str
    status: int
    headers: Mapping[str, str]  # lower-case names
    body: bytes

    def describe(self) -> str:
        return f"{self.method} {self.path} answered {self.status}"


@dataclass(frozen=True, slots=True)
class _Call(Generic[T]):
    """One request and how to read its answer; shared by both clients."""

    method: str
    path: str
    read: Callable[[_Response], T]
    query: Mapping[str, str] | None = None
    body: Any = None
    billing: bool = False
    idempotency_key: str | None = None
    #: Read-only although not a GET (the batch check): safe to send twice.
    safe: bool = False

    @property
    def idempotent(self) -> bool:
        """May be sent again after a connection failed under it (see ``_exchange``)."""
        return self.safe or self.method in _IDEMPOTENT or self.idempotency_key is not None

    def keyed(self, idempotency_key: str | None) -> _Call[T]:
        return self if idempotency_key is None else replace(self, idempotency_key=idempotency_key)

    def target(self, prefix: str) -> str:
        query = f"?{urlencode(self.query)}" if self.query else ""
        return f"{prefix}{self.path}{query}"

    def payload(self) -> bytes | None:
        if self.body is None:
            return b"" if self.method in _WITH_BODY else None
        return json.dumps(self.body, separators=(",", ":")).encode()

    def headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": _USER_AGENT}
        if self.body is not None:
            headers["Content-Type"] = "application/json"
        if self.idempotency_key is not None:
            headers["Idempotency-Key"] = self.idempotency_key
        return headers


def _seg(name: str, value: str) -> str:
    """One URL-quoted path segment; empty or non-string ids are caller bugs."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return quote(value, safe="")


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


def _account(account_id: str) -> str:
    return f"/v1/accounts/{_seg('account_id', account_id)}"


def _customer(account_id: str, customer_id: str) -> str:
    return f"{_account(account_id)}/customers/{_seg('customer_id', customer_id)}"


def _drop_none(body: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if v is not None}


class _Calls:
    """Every operation as a :class:`_Call`: the part both clients share."""

    @staticmethod
    def can(customer_id: str, module_id: str) -> _Call[bool]:
        path = (
            f"/v1/customers/{_seg('customer_id', customer_id)}/can/{_seg('module_id', module_id)}"
        )
        return _Call("GET", path, _allowed)

    @staticmethod
    def get_entitlements(customer_id: str) -> _Call[EntitlementSet]:
        path = f"/v1/customers/{_seg('customer_id', customer_id)}/entitlements"
        return _Call("GET", path, _entitlements(customer_id))

    @staticmethod
    def check(pairs: list[tuple[str, str]]) -> _Call[list[bool | None]]:
        checks = []
        for i, pair in enumerate(pairs):
            customer_id, module_id = pair
            _seg(f"pairs[{i}] customer_id", customer_id)
            _seg(f"pairs[{i}] module_id", module_id)
            checks.append({"customerId": customer_id, "module": module_id})
        return _Call("POST", "/v1/check", _results, body={"checks": checks}, safe=True)

    @staticmethod
    def invalidate(customer_id: str | None) -> _Call[None]:
        if customer_id is None:
            return _Call("DELETE", "/v1/cache", _nothing)
        path = f"/v1/customers/{_seg('customer_id', customer_id)}/cache"
        return _Call("DELETE", path, _nothing)

    @staticmethod
    def create_checkout(
        account_id: str,
        customer_id: str,
        plan_id: str,
        plan_version: int | str,
        success_url: str,
        cancel_url: str,
        seats: int,
    ) -> _Call[dict[str, Any]]:
        body = {
            "customerId": customer_id,
            "planId": plan_id,
            "planVersion": plan_version,
            "seats": seats,
            "successUrl": success_url,
            "cancelUrl": cancel_url,
        }
        return _Call("POST", f"{_account(account_id)}/checkout", _object, body=body, billing=True)

    @staticmethod
    def create_setup_checkout(
        account_id: str, success_url: str, cancel_url: str
    ) -> _Call[dict[str, Any]]:
        body = {"successUrl": success_url, "cancelUrl": cancel_url}
        path = f"{_account(account_id)}/billing/setup-checkout"
        return _Call("POST", path, _object, body=body, billing=True)

    @staticmethod
    def create_subscription(
        account_id: str, customer_id: str, plan_id: str, plan_version: int | str, seats: int
    ) -> _Call[dict[str, Any]]:
        body = {"planId": plan_id, "planVersion": plan_version, "seats": seats}
        path = f"{_customer(account_id, customer_id)}/subscribe"
        return _Call("POST", path, _object, body=body, billing=True)

    @staticmethod
    def cancel_subscription(
        account_id: str, customer_id: str, at_period_end: bool
    ) -> _Call[dict[str, Any]]:
        path = f"{_customer(account_id, customer_id)}/subscription"
        query = {"atPeriodEnd": "true"} if at_period_end else None
        return _Call("DELETE", path, _object, query=query, billing=True)

    @staticmethod
    def get_subscription(account_id: str, customer_id: str) -> _Call[dict[str, Any]]:
        path = f"{_customer(account_id, customer_id)}/subscription"
        return _Call("GET", path, _object, billing=True)

    @staticmethod
    def create_account(
        account_id: str,
        name: str | None,
        email: str | None,
        stripe_customer_id: str | None,
        create_stripe_customer: bool,
    ) -> _Call[dict[str, Any]]:
        _seg("account_id", account_id)
        body = _drop_none(
            {
                "accountId": account_id,
                "name": name,
                "email": email,
                "stripeCustomerId": stripe_customer_id,
            }
        )
        if create_stripe_customer:
            body["createStripeCustomer"] = True
        return _Call("POST", "/v1/accounts", _object, body=body, billing=True)

    @staticmethod
    def create_customer(
        account_id: str, customer_id: str, email: str | None
    ) -> _Call[dict[str, Any]]:
        _seg("customer_id", customer_id)
        body = _drop_none({"customerId": customer_id, "email": email})
        return _Call("POST", f"{_account(account_id)}/customers", _object, body=body, billing=True)

    @staticmethod
    def set_account_status(account_id: str, status: str) -> _Call[dict[str, Any]]:
        return _Call("PATCH", _account(account_id), _object, body={"status": status}, billing=True)

    @staticmethod
    def set_customer_status(
        account_id: str, customer_id: str, status: str
    ) -> _Call[dict[str, Any]]:
        path = _customer(account_id, customer_id)
        return _Call("PATCH", path, _object, body={"status": status}, billing=True)

    @staticmethod
    def list_payment_methods(account_id: str) -> _Call[list[Any]]:
        path = f"{_account(account_id)}/payment-methods"
        return _Call("GET", path, _field_list("methods"), billing=True)

    @staticmethod
    def set_default_payment_method(account_id: str, method_id: str) -> _Call[dict[str, Any]]:
        path = f"{_account(account_id)}/payment-methods/{_seg('method_id', method_id)}"
        return _Call("PATCH", path, _object, billing=True)

    @staticmethod
    def remove_payment_method(account_id: str, method_id: str) -> _Call[None]:
        path = f"{_account(account_id)}/payment-methods/{_seg('method_id', method_id)}"
        return _Call("DELETE", path, _nothing, billing=True)

    @staticmethod
    def set_subscription_payment_method(
        account_id: str, customer_id: str, method_id: str
    ) -> _Call[dict[str, Any]]:
        _seg("method_id", method_id)
        path = f"{_customer(account_id, customer_id)}/payment-method"
        return _Call("PATCH", path, _object, body={"methodId": method_id}, billing=True)

    @staticmethod
    def list_invoices(account_id: str, customer_id: str | None) -> _Call[list[Any]]:
        path = f"{_account(account_id)}/invoices"
        query = {"customerId": customer_id} if customer_id is not None else None
        return _Call("GET", path, _field_list("invoices"), query=query, billing=True)

    @staticmethod
    def invoice_pdf_url(account_id: str, invoice_id: str) -> _Call[str]:
        path = f"{_account(account_id)}/invoices/{_seg('invoice_id', invoice_id)}/pdf"
        return _Call("GET", path, _location, billing=True)


def _unreachable(
    call: _Call[Any], base_url: str, exc: BaseException, timeout: float
) -> SidecarUnavailable:
    if isinstance(exc, TimeoutError):
        reason = f"no answer: timed out after {timeout:g}s"
    else:
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return SidecarUnavailable(
        f"{call.method} {call.path}: cannot reach the sidecar at {base_url} ({reason})"
    )


def _closed_unanswered(exc: BaseException, answered: bool, sent: bool, call: _Call[Any]) -> bool:
    """Retry once, on a new connection, after a reused keep-alive connection failed?

    Yes when the sidecar closed it (idle timeout, shutdown drain) before any
    byte of the answer came back, and the request may be sent again: it was
    never sent whole, or it is idempotent (GET, PUT, DELETE, the batch check,
    a write with an ``Idempotency-Key``). A failure after part of the answer
    came is never retried: the request was acted upon.
    """
    return not answered and isinstance(exc, ConnectionError) and (not sent or call.idempotent)


def _pairs(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    out = []
    for pair in pairs:
        customer_id, module_id = pair
        out.append((customer_id, module_id))
    return out


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


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _dropped(sock: socket.socket | None) -> bool:
    """True when an idle keep-alive socket is closed (or has unexpected data).

    An idle connection has nothing to read; if it is readable, the server
    closed it (EOF) and reusing it would fail the next request.
    """
    if sock is None:
        return True
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            return bool(poller.poll(0))
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable)
    except (OSError, ValueError):
        return True


class _Pool:
    """Idle keep-alive connections; each request holds one connection alone."""

    def __init__(self, target: _Target, timeout: float) -> None:
        self._target = target
        self._timeout = timeout
        self._lock = threading.Lock()
        self._idle: list[http.client.HTTPConnection] = []
        self._pid = os.getpid()

    def _new(self) -> http.client.HTTPConnection:
        t = self._target
        if t.socket_path is not None:
            return _UnixConnection(t.socket_path, self._timeout)
        if t.scheme == "https":
            return http.client.HTTPSConnection(
                t.host, t.port, timeout=self._timeout, context=ssl.create_default_context()
            )
        return http.client.HTTPConnection(t.host, t.port, timeout=self._timeout)

    def _forked(self) -> bool:
        # A forked child (gunicorn, multiprocessing) must not share its parent's sockets.
        if os.getpid() != self._pid:
            self._idle.clear()
            self._pid = os.getpid()
            return True
        return False

    def get(self) -> tuple[http.client.HTTPConnection, bool]:
        """A connection and whether it was reused."""
        with self._lock:
            self._forked()
            while self._idle:
                conn = self._idle.pop()
                if not _dropped(conn.sock):
                    return conn, True
                conn.close()
        return self._new(), False

    def put(self, conn: http.client.HTTPConnection) -> None:
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
        self._pool = _Pool(self._target, timeout)

    def __repr__(self) -> str:
        return f"SidecarClient({self.base_url!r}, fail_open={self.fail_open!r})"

    def close(self) -> None:
        """Close the idle connections (the client stays usable)."""
        self._pool.close()

    def __enter__(self) -> SidecarClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, call: _Call[T]) -> T:
        return call.read(self._exchange(call))

    def _write(self, idempotency_key: str | None, call: _Call[T]) -> T:
        return self._run(call.keyed(idempotency_key))

    def _exchange(self, call: _Call[Any]) -> _Response:
        timeout = self.billing_timeout if call.billing else self.timeout
        target = call.target(self._target.prefix)
        payload = call.payload()
        headers = call.headers()
        for attempt in (1, 2):
            conn, reused = self._pool.get()
            conn.timeout = timeout
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            sent = answered = False
            try:
                conn.request(call.method, target, body=payload, headers=headers)
                sent = True
                resp = conn.getresponse()
                answered = True
                body = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                if reused and attempt == 1 and _closed_unanswered(exc, answered, sent, call):
                    continue
                raise _unreachable(call, self.base_url, exc, timeout) from exc
            if resp.will_close:
                conn.close()
            else:
                self._pool.put(conn)
            headers_in = {k.lower(): v for k, v in resp.getheaders()}
            return _Response(call.method, call.path, resp.status, headers_in, body)
        raise AssertionError("unreachable")  # pragma: no cover

    # -- entitlements

    def can(self, customer_id: str, module_id: str) -> bool:
        """May the customer use the module? Never raises for an outage (fail closed).

        False when no answer can be had, unless the client is ``fail_open``.
        A caller's mistake (an empty id, a refused request) still raises.
        """
        try:
            return self._run(_Calls.can(customer_id, module_id))
        except SidecarUnavailable:
            return self.fail_open

    def get_entitlements(self, customer_id: str) -> EntitlementSet:
        """The customer's entitlements; ``found`` is False for an unknown customer."""
        return self._run(_Calls.get_entitlements(customer_id))

    def check(self, pairs: Iterable[tuple[str, str]]) -> list[bool]:
        """``can`` for many ``(customer_id, module_id)`` pairs at once, in order."""
        items = _pairs(pairs)
        verdicts: list[bool] = []
        for start in range(0, len(items), MAX_BATCH):
            chunk = items[start : start + MAX_BATCH]
            try:
                answers = self._run(_Calls.check(chunk))
            except SidecarUnavailable:
                answers = [None] * len(chunk)
            verdicts += [self.fail_open if a is None else a for a in answers]
        return verdicts

    def invalidate(self, customer_id: str | None = None) -> None:
        """Drop one customer's cached entitlements, or everyone's, on every sidecar."""
        self._run(_Calls.invalidate(customer_id))

    # -- billing

    def create_checkout(
        self,
        *,
        account_id: str,
        customer_id: str,
        plan_id: str,
        plan_version: int | str,
        success_url: str,
        cancel_url: str,
        seats: int = 1,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        return self._write(
            idempotency_key,
            _Calls.create_checkout(
                account_id, customer_id, plan_id, plan_version, success_url, cancel_url, seats
            ),
        )

    def create_setup_checkout(
        self,
        *,
        account_id: str,
        success_url: str,
        cancel_url: str,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        return self._write(
            idempotency_key, _Calls.create_setup_checkout(account_id, success_url, cancel_url)
        )

    def create_subscription(
        self,
        *,
        account_id: str,
        customer_id: str,
        plan_id: str,
        plan_version: int | str,
        seats: int = 1,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        return self._write(
            idempotency_key,
            _Calls.create_subscription(account_id, customer_id, plan_id, plan_version, seats),
        )

    def cancel_subscription(
        self,
        *,
        account_id: str,
        customer_id: str,
        at_period_end: bool = False,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        return self._write(
            idempotency_key, _Calls.cancel_subscription(account_id, customer_id, at_period_end)
        )

    def get_subscription(self, *, account_id: str, customer_id: str) -> dict[str, Any]:
        return self._run(_Calls.get_subscription(account_id, customer_id))

    def create_account(
        self,
        *,
        account_id: str,
        name: str | None = None,
        email: str | None = None,
        stripe_customer_id: str | None = None,
        create_stripe_customer: bool = False,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        return self._write(
            idempotency_key,
            _Calls.create_account(
                account_id, name, email, stripe_customer_id, create_stripe_customer
            ),
        )

    def create_customer(
        self,
        *,
        account_id: str,
        customer_id: str,
        email: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        return self._write(idempotency_key, _Calls.create_customer(account_id, customer_id, email))

    def set_account_status(
        self, *, account_id: str, status: str, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        return self._write(idempotency_key, _Calls.set_account_status(account_id, status))

    def set_customer_status(
        self, *, account_id: str, customer_id: str, status: str, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        return self._write(
            idempotency_key, _Calls.set_customer_status(account_id, customer_id, status)
        )

    def list_payment_methods(self, *, account_id: str) -> list[Any]:
        return self._run(_Calls.list_payment_methods(account_id))

    def set_default_payment_method(
        self, *, account_id: str, method_id: str, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        return self._write(
            idempotency_key, _Calls.set_default_payment_method(account_id, method_id)
        )

    def remove_payment_method(
        self, *, account_id: str, method_id: str, idempotency_key: str | None = None
    ) -> None:
        self._write(idempotency_key, _Calls.remove_payment_method(account_id, method_id))

    def set_subscription_payment_method(
        self,
        *,
        account_id: str,
        customer_id: str,
        method_id: str,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        return self._write(
            idempotency_key,
            _Calls.set_subscription_payment_method(account_id, customer_id, method_id),
        )

    def list_invoices(self, *, account_id: str, customer_id: str | None = None) -> list[Any]:
        return self._run(_Calls.list_invoices(account_id, customer_id))

    def invoice_pdf_url(self, *, account_id: str, invoice_id: str) -> str:
        """The hosted PDF's URL: the ``Location`` of the sidecar's redirect, not followed."""
        return self._run(_Calls.invoice_pdf_url(account_id, invoice_id))


# -- the asyncio client ------------------------------------------------------------------


class _ProtocolError(Exception):
    """The bytes that came back are not an HTTP/1.1 response we can read."""


class _NoAnswer(ConnectionError):
    """The connection closed (or was reset) before any byte of the answer arrived."""


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
    first = True
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise _ProtocolError("response headers too large") from None
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            if first and not getattr(exc, "partial", b""):
                raise _NoAnswer("the connection closed before any byte of the answer") from exc
            raise
        first = False
        lines = head.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        status_text = rest.partition(" ")[0]
        if not version.startswith("HTTP/1.") or not status_text.isdigit():
            raise _ProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        status = int(status_text)
        if 100 <= status < 200:
            continue  # an interim answer; the real one follows
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        break
    keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
    if method == "HEAD" or status in (204, 304):
        return status, headers, b"", keep
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts = []
        while True:
            size_line = await reader.readuntil(b"\r\n")
            try:
                size = int(size_line.split(b";")[0].strip(), 16)
            except ValueError:
                raise _ProtocolError("bad chunk size") from None
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailers
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        return status, headers, b"".join(parts), keep
    if "content-length" in headers:
        try:
            length = int(headers["content-length"])
        except ValueError:
            raise _ProtocolError("bad Content-Length") from None
        return status, headers, await reader.readexactly(length), keep
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
            context = ssl.create_default_context()
            port = t.port or 443
            reader, writer = await asyncio.open_connection(t.host, port, ssl=context)
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

    def _encode(self, call: _Call[Any]) -> bytes:
        payload = call.payload()
        lines = [f"{call.method} {call.target(self._target.prefix)} HTTP/1.1"]
        lines.append(f"Host: {self._target.host_header}")
        lines += [f"{name}: {value}" for name, value in call.headers().items()]
        if payload is not None:
            lines.append(f"Content-Length: {len(payload)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (payload or b"")

    async def _run(self, call: _Call[T]) -> T:
        return call.read(await self._exchange(call))

    async def _write(self, idempotency_key: str | None, call: _Call[T]) -> T:
        return await self._run(call.keyed(idempotency_key))

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
                answered = sent and not isinstance(exc, _NoAnswer)
                if reused and attempt == 1 and _closed_unanswered(exc, answered, sent, call):
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

    # -- entitlements

    async def can(self, customer_id: str, module_id: str) -> bool:
        """May the customer use the module? Never raises for an outage (fail closed)."""
        try:
            return await self._run(_Calls.can(customer_id, module_id))
        except SidecarUnavailable:
            return self.fail_open

    async def get_entitlements(self, customer_id: str) -> EntitlementSet:
        """The customer's entitlements; ``found`` is False for an unknown customer."""
        return await self._run(_Calls.get_entitlements(customer_id))

    async def check(self, pairs: Iterable[tuple[str, str]]) -> list[bool]:
        """``can`` for many ``(customer_id, module_id)`` pairs at once, in order."""
        items = _pairs(pairs)
        verdicts: list[bool] = []
        for start in range(0, len(items), MAX_BATCH):
            chunk = items[start : start + MAX_BATCH]
            try:
                answers = await self._run(_Calls.check(chunk))
            except SidecarUnavailable:
                answers = [None] * len(chunk)
            verdicts += [self.fail_open if a is None else a for a in answers]
        return verdicts

    async def invalidate(self, customer_id: str | None = None) -> None:
        """Drop one customer's cached entitlements, or everyone's, on every sidecar."""
        await self._run(_Calls.invalidate(customer_id))

    # -- billing

    async def create_checkout(
        self,
        *,
        account_id: str,
        customer_id: str,
        plan_id: str,
        plan_version: int | str,
        success_url: str,
        cancel_url: str,
        seats: int = 1,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        return await self._write(
            idempotency_key,
            _Calls.create_checkout(
                account_id, customer_id, plan_id, plan_version, success_url, cancel_url, seats
            ),
        )

    async def create_setup_checkout(
        self,
        *,
        account_id: str,
        success_url: str,
        cancel_url: str,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        return await self._write(
            idempotency_key, _Calls.create_setup_checkout(account_id, success_url, cancel_url)
        )

    async def create_subscription(
        self,
        *,
        account_id: str,
        customer_id: str,
        plan_id: str,
        plan_version: int | str,
        seats: int = 1,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        return await self._write(
            idempotency_key,
            _Calls.create_subscription(account_id, customer_id, plan_id, plan_version, seats),
        )

    async def cancel_subscription(
        self,
        *,
        account_id: str,
        customer_id: str,
        at_period_end: bool = False,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        return await self._write(
            idempotency_key, _Calls.cancel_subscription(account_id, customer_id, at_period_end)
        )

    async def get_subscription(self, *, account_id: str, customer_id: str) -> dict[str, Any]:
        return await self._run(_Calls.get_subscription(account_id, customer_id))

    async def create_account(
        self,
        *,
        account_id: str,
        name: str | None = None,
        email: str | None = None,
        stripe_customer_id: str | None = None,
        create_stripe_customer: bool = False,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        return await self._write(
            idempotency_key,
            _Calls.create_account(
                account_id, name, email, stripe_customer_id, create_stripe_customer
            ),
        )

    async def create_customer(
        self,
        *,
        account_id: str,
        customer_id: str,
        email: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        return await self._write(
            idempotency_key, _Calls.create_customer(account_id, customer_id, email)
        )

    async def set_account_status(
        self, *, account_id: str, status: str, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        return await self._write(idempotency_key, _Calls.set_account_status(account_id, status))

    async def set_customer_status(
        self, *, account_id: str, customer_id: str, status: str, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        return await self._write(
            idempotency_key, _Calls.set_customer_status(account_id, customer_id, status)
        )

    async def list_payment_methods(self, *, account_id: str) -> list[Any]:
        return await self._run(_Calls.list_payment_methods(account_id))

    async def set_default_payment_method(
        self, *, account_id: str, method_id: str, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        return await self._write(
            idempotency_key, _Calls.set_default_payment_method(account_id, method_id)
        )

    async def remove_payment_method(
        self, *, account_id: str, method_id: str, idempotency_key: str | None = None
    ) -> None:
        await self._write(idempotency_key, _Calls.remove_payment_method(account_id, method_id))

    async def set_subscription_payment_method(
        self,
        *,
        account_id: str,
        customer_id: str,
        method_id: str,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        return await self._write(
            idempotency_key,
            _Calls.set_subscription_payment_method(account_id, customer_id, method_id),
        )

    async def list_invoices(self, *, account_id: str, customer_id: str | None = None) -> list[Any]:
        return await self._run(_Calls.list_invoices(account_id, customer_id))

    async def invoice_pdf_url(self, *, account_id: str, invoice_id: str) -> str:
        """The hosted PDF's URL: the ``Location`` of the sidecar's redirect, not followed."""
        return await self._run(_Calls.invoice_pdf_url(account_id, invoice_id))
