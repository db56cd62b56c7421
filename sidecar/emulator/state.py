"""The emulated Vellum API as plain Python: its state, its rules, its answers.

No HTTP here. An upstream request arrives as a :class:`Call` (operation name,
tenant, the API key's mode, decoded path ids, query, raw body) and leaves as an
:class:`Answer` (status, body bytes, content type, headers), so every rule of the
API is testable without a server, and ``app.py`` only translates. Faults (fail,
delay, hold) are data the HTTP face applies; events are dicts appended to
:attr:`State.events` and handed to :meth:`State._on_event`, which the HTTP face
overrides to deliver them as signed pushes.

What it models (the API as ``vellumcharter`` 1.4.2 calls it):

- entitlement documents carry ``hasAccess``; ``modules`` is emptied when access is
  withheld (status not active/trialing/past_due, or the account not active);
- payment methods and invoices are addressed by opaque, account-bound ``ref``s;
  a raw billing-provider id, or another account's ref, answers 404;
- ``invoice_pdf`` answers the PDF bytes after the ownership check (or, with the
  ``invoicePdf: redirect`` setting, the 302 + ``Location`` of older upstreams);
- ``planVersion`` and ``productId`` are optional (newest version priced in the
  key's mode; the product resolved from the plan, 400 when ambiguous), and an
  optional field sent as null is a 400;
- one live (not ended) subscription per customer and mode: 409 on a second;
- subscription changes (update, seats, add-ons, plan, reactivate, cancel) are
  written into the entitlement document; ``preview_change`` changes nothing;
- credit types, packs, balances; ``consume`` is all-or-nothing (409 when short,
  nothing deducted) and idempotent on its ``idempotencyKey``;
- flags: tenant globals plus per-customer overrides;
- events carry ``eventId`` (stable across a push's retries); ``payment.*`` events
  carry ``seats`` and an ``invoice`` block.

The emulator keeps one entitlement document per customer: a change made with a
test-mode key or a live-mode key writes the same document.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, NoReturn

import orjson

from .catalog import CREDIT_TYPES, CURRENCY, INTERVAL, PRODUCTS, CreditType, PlanVersion, Product
from .pdf import render_pdf

__all__ = [
    "ACCESS_STATUSES",
    "ACCOUNT_STATUSES",
    "CUSTOMER_STATUSES",
    "DEFAULT_EVENT_ID_FIELDS",
    "DEMO_TENANT",
    "OPERATIONS",
    "Answer",
    "Call",
    "EmulatorError",
    "Hold",
    "RecordedRequest",
    "Settings",
    "State",
]

Json = dict[str, Any]

DEMO_TENANT: Final = "demo"

#: Every upstream operation, named after the SDK method that calls it. One route
#: serves both ``add_add_on`` and ``remove_add_on``: ``change_add_ons``.
OPERATIONS: Final[frozenset[str]] = frozenset(
    {
        "get_entitlements",
        "flags",
        "global_flags",
        "create_checkout",
        "create_setup_checkout",
        "create_subscription",
        "get_subscription",
        "update_subscription",
        "cancel_subscription",
        "preview_change",
        "set_seats",
        "change_add_ons",
        "change_plan",
        "reactivate",
        "create_account",
        "create_customer",
        "set_account_status",
        "set_customer_status",
        "list_payment_methods",
        "set_default_payment_method",
        "remove_payment_method",
        "set_subscription_payment_method",
        "list_invoices",
        "invoice_pdf",
        "create_credit_checkout",
        "list_credit_types",
        "list_credit_packs",
        "list_credits",
        "get_credit_balance",
        "consume_credits",
    }
)

ACCOUNT_STATUSES: Final[frozenset[str]] = frozenset({"active", "suspended", "closed"})
CUSTOMER_STATUSES: Final[frozenset[str]] = frozenset(
    {"active", "trialing", "past_due", "canceled", "paused", "suspended"}
)
#: Statuses that grant access (``hasAccess``), while the account is active too.
ACCESS_STATUSES: Final[frozenset[str]] = frozenset({"active", "trialing", "past_due"})

#: The id fields an event carries: ``eventId`` only, as today's API sends them. The
#: ``eventIdFields`` setting changes it at run time (``["id"]``: an older upstream).
DEFAULT_EVENT_ID_FIELDS: Final[tuple[str, ...]] = ("eventId",)
_EVENT_ID_FIELDS: Final = frozenset({"eventId", "id"})

_PERIOD: Final = 30 * 24 * 3600
_DAY: Final = 24 * 3600
_MAX_IDEMPOTENCY_KEY: Final = 255

_ERROR_CODES: Final[Mapping[int, str]] = {
    400: "bad_request",
    401: "unauthorized",
    402: "payment_required",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    422: "unprocessable",
    429: "rate_limited",
}


# --------------------------------------------------------------------------- answers


@dataclass(frozen=True, slots=True)
class Answer:
    """One HTTP answer as data: what the HTTP face sends back."""

    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def json(
        cls, payload: Any, status: int = 200, headers: Mapping[str, str] | None = None
    ) -> Answer:
        return cls(status, orjson.dumps(payload), "application/json", dict(headers or {}))

    @classmethod
    def error(
        cls, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> Answer:
        return cls.json({"error": {"code": code, "message": message}}, status, headers)

    @classmethod
    def empty(cls, status: int = 204) -> Answer:
        return cls(status)

    def parsed(self) -> Any:
        """The body as JSON (None when empty): for tests and logs."""
        return orjson.loads(self.body) if self.body else None


class EmulatorError(Exception):
    """An upstream-style error, answered as ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def answer(self) -> Answer:
        return Answer.error(self.status, self.code, self.message)


def error_code(status: int) -> str:
    """The ``code`` an injected failure of ``status`` carries."""
    return _ERROR_CODES.get(status, "injected_fault")


@dataclass(frozen=True, slots=True)
class Call:
    """One authenticated upstream request, as the state sees it."""

    operation: str
    tenant: str
    mode: str
    """The API key's mode: ``test`` or ``live``."""
    params: Mapping[str, str] = field(default_factory=dict)
    """Decoded path ids: ``account``, ``customer``, ``method``, ``invoice``, ``credit_type``."""
    query: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One upstream (non-admin) request as the emulator saw it."""

    operation: str
    """One of :data:`OPERATIONS`, or ``"unknown"`` when no route matched."""
    method: str
    path: str
    """The raw path as sent, still percent-encoded, without the query."""
    params: Mapping[str, str]
    """Decoded path parameters: ``tenant``, ``account``, ``customer``, ``method``, ..."""
    query: Mapping[str, str]
    body: Any
    """The parsed JSON body, or None when there was none or it was not JSON."""
    api_key: str | None
    idempotency_key: str | None
    traceparent: str | None = None
    """W3C Trace Context headers as received (the caller's trace, carried by the sidecar)."""
    tracestate: str | None = None

    @property
    def tenant(self) -> str | None:
        return self.params.get("tenant")

    def to_json(self) -> Json:
        return {
            "operation": self.operation,
            "method": self.method,
            "path": self.path,
            "params": dict(self.params),
            "query": dict(self.query),
            "body": self.body,
            "apiKey": self.api_key,
            "idempotencyKey": self.idempotency_key,
            "traceparent": self.traceparent,
            "tracestate": self.tracestate,
        }


# --------------------------------------------------------------------------- faults


class Hold:
    """Holds the answers to matching requests until :meth:`release`; see :meth:`State.hold`."""

    def __init__(self, operation: str | None) -> None:
        self.operation = operation
        self.arrived = asyncio.Event()  # set as soon as one request is being held
        self.held = 0  # how many requests have been held so far
        self._released = asyncio.Event()

    @property
    def released(self) -> bool:
        return self._released.is_set()

    def release(self) -> None:
        """Let every held request go on; later requests are no longer held."""
        self._released.set()

    async def wait(self) -> None:
        """Hold one request (called by the HTTP face)."""
        self.held += 1
        self.arrived.set()
        await self._released.wait()


@dataclass(slots=True)
class _Failure:
    operation: str | None
    status: int
    remaining: int | None
    headers: Mapping[str, str]

    def to_json(self) -> Json:
        return {"operation": self.operation, "status": self.status, "times": self.remaining}


@dataclass(slots=True)
class _Delay:
    operation: str | None
    seconds: float
    remaining: int | None

    def to_json(self) -> Json:
        return {"operation": self.operation, "delay": self.seconds, "times": self.remaining}


def _matches(fault_operation: str | None, operation: str) -> bool:
    return fault_operation is None or fault_operation == operation


def _consume(remaining: int | None) -> int | None:
    return None if remaining is None else remaining - 1


def _check_operation(operation: str | None) -> None:
    if operation is not None and operation not in OPERATIONS:
        raise ValueError(f"unknown operation {operation!r}")


@dataclass(slots=True)
class _Stored:
    """An answer kept for ``Idempotency-Key`` replays."""

    request_body: bytes
    answer: Answer


# --------------------------------------------------------------------------- settings


@dataclass(slots=True)
class Settings:
    """Switches between today's API and what older upstreams did; admin ``/settings``."""

    invoice_pdf: str = "bytes"
    """``bytes``: 200 ``application/pdf``; ``redirect``: 302 + ``Location`` (before SDK 1.2)."""
    event_id_fields: tuple[str, ...] = DEFAULT_EVENT_ID_FIELDS
    """The id fields events carry: ``eventId`` today, ``id`` on older upstreams."""
    has_access: bool = True
    """False: entitlement documents as older upstreams sent them (no ``hasAccess``,
    ``modules`` as stored)."""
    push_attempts: int = 3
    """Delivery attempts per push, back to back, before it is dropped."""

    def to_json(self) -> Json:
        return {
            "invoicePdf": self.invoice_pdf,
            "eventIdFields": list(self.event_id_fields),
            "hasAccess": self.has_access,
            "pushAttempts": self.push_attempts,
        }

    def update(self, changes: Mapping[str, Any]) -> None:
        """Apply the admin API's camelCase changes, all or nothing (400 on any bad one)."""
        known = {"invoicePdf", "eventIdFields", "hasAccess", "pushAttempts"}
        unknown = sorted(set(changes) - known)
        if unknown:
            bad_request("invalid_field", f"unknown settings: {', '.join(unknown)}")
        pdf = changes.get("invoicePdf", self.invoice_pdf)
        if pdf not in ("bytes", "redirect"):
            bad_request("invalid_field", "invoicePdf must be bytes or redirect")
        ids = changes.get("eventIdFields", list(self.event_id_fields))
        if (
            not isinstance(ids, list)
            or not set(ids) <= _EVENT_ID_FIELDS
            or len(set(ids)) != len(ids)
        ):
            bad_request("invalid_field", "eventIdFields must be a list of eventId and/or id")
        has_access = changes.get("hasAccess", self.has_access)
        if not isinstance(has_access, bool):
            bad_request("invalid_field", "hasAccess must be a boolean")
        attempts = changes.get("pushAttempts", self.push_attempts)
        if isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= 10:
            bad_request("invalid_field", "pushAttempts must be an integer from 1 to 10")
        self.invoice_pdf = pdf
        self.event_id_fields = tuple(ids)
        self.has_access = has_access
        self.push_attempts = attempts


# --------------------------------------------------------------------------- domain


def iso(ts: int) -> str:
    """An ISO 8601 UTC timestamp, as the billing views carry them."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def make_ref(kind: str, tenant: str, account_id: str, provider_id: str) -> str:
    """An opaque handle bound to one account: the same object never has the same ref
    in two accounts, and the provider's id cannot be read back from it."""
    digest = hashlib.sha256(f"{kind}\0{tenant}\0{account_id}\0{provider_id}".encode())
    return f"{kind}_{digest.hexdigest()[:24]}"


@dataclass(slots=True)
class _PaymentMethod:
    ref: str
    provider_id: str
    brand: str
    last4: str
    name: str
    exp_month: int = 12
    exp_year: int = 2030

    def view(self, default_ref: str | None) -> Json:
        return {
            "ref": self.ref,
            "brand": self.brand,
            "last4": self.last4,
            "expMonth": self.exp_month,
            "expYear": self.exp_year,
            "name": self.name,
            "isDefault": self.ref == default_ref,
        }


@dataclass(slots=True)
class _Invoice:
    ref: str
    provider_id: str
    number: str
    customer_id: str
    lines: list[tuple[str, int]]
    status: str
    created: int
    hosted_token: str
    tax: int = 0

    @property
    def subtotal(self) -> int:
        return sum(amount for _, amount in self.lines)

    @property
    def total(self) -> int:
        return self.subtotal + self.tax

    @property
    def paid(self) -> bool:
        return self.status == "paid"

    def view(self) -> Json:
        return {
            "ref": self.ref,
            "number": self.number,
            "status": self.status,
            "amountDue": self.total,
            "amountPaid": self.total if self.paid else 0,
            "subtotal": self.subtotal,
            "total": self.total,
            "tax": self.tax,
            "paid": self.paid,
            "currency": CURRENCY,
            "created": iso(self.created),
            "hostedInvoiceUrl": f"https://pay.invoices.example/{self.hosted_token}",
        }

    def pdf(self, account: _Account) -> bytes:
        def money(cents: int) -> str:
            return f"{cents / 100:,.2f} {CURRENCY.upper()}"

        lines = [
            f"Billed to: {account.name or account.account_id}",
            f"Customer: {self.customer_id}",
            f"Date: {iso(self.created)}",
            f"Status: {self.status}",
            "",
            *(f"{text}: {money(amount)}" for text, amount in self.lines),
            "",
            f"Subtotal: {money(self.subtotal)}",
            f"Tax: {money(self.tax)}",
            f"Total: {money(self.total)}",
            f"Amount paid: {money(self.total if self.paid else 0)}",
        ]
        return render_pdf(f"Invoice {self.number}", lines)


@dataclass(slots=True)
class _Subscription:
    account_id: str
    customer_id: str
    mode: str
    product: Product
    plan_id: str
    version: PlanVersion
    seats: int
    add_ons: list[str]
    status: str
    created: int
    period_start: int
    period_end: int
    cancel_at_period_end: bool = False
    canceled_at: int | None = None
    trial_end: int | None = None
    method_ref: str | None = None
    """The subscription's own payment method; None: the account's default pays."""

    @property
    def live(self) -> bool:
        return self.status != "canceled"

    def modules(self) -> list[str]:
        return list(dict.fromkeys([*self.version.modules, *self.add_ons]))

    def amount(self) -> int:
        return _amount(self.product, self.version, self.seats, self.add_ons)

    def view(self, account: _Account) -> Json:
        view: Json = {
            "accountId": self.account_id,
            "customerId": self.customer_id,
            "mode": self.mode,
            "productId": self.product.product_id,
            "planId": self.plan_id,
            "planVersion": self.version.version,
            "status": self.status,
            "cancelAtPeriodEnd": self.cancel_at_period_end,
            "seats": self.seats,
            "addOnModuleIds": list(self.add_ons),
            "modules": self.modules(),
            "amount": self.amount(),
            "currency": CURRENCY,
            "interval": INTERVAL,
            "createdAt": iso(self.created),
            "currentPeriodStart": iso(self.period_start),
            "currentPeriodEnd": iso(self.period_end),
        }
        if self.trial_end is not None:
            view["trialEnd"] = iso(self.trial_end)
        if self.canceled_at is not None:
            view["canceledAt"] = iso(self.canceled_at)
        method = self.method_ref or account.default_method
        if method is not None:
            view["defaultPaymentMethodRef"] = method
        return view


def _amount(product: Product, version: PlanVersion, seats: int, add_ons: Iterable[str]) -> int:
    return version.price * seats + sum(product.add_ons[m] for m in add_ons)


@dataclass(slots=True)
class _Customer:
    customer_id: str
    account_id: str
    name: str | None
    email: str | None
    status: str
    created: int
    subscriptions: dict[str, _Subscription] = field(default_factory=dict)
    """The latest subscription per mode (live or ended)."""

    def view(self) -> Json:
        return {
            "customerId": self.customer_id,
            "accountId": self.account_id,
            "name": self.name,
            "email": self.email,
            "status": self.status,
            "createdAt": self.created,
        }


@dataclass(slots=True)
class _Account:
    account_id: str
    name: str | None
    email: str | None
    billing_customer_id: str | None
    status: str
    created: int
    customers: dict[str, _Customer] = field(default_factory=dict)
    methods: dict[str, _PaymentMethod] = field(default_factory=dict)
    default_method: str | None = None
    invoices: list[_Invoice] = field(default_factory=list)

    def view(self) -> Json:
        view: Json = {
            "accountId": self.account_id,
            "name": self.name,
            "email": self.email,
            "billingCustomerId": self.billing_customer_id,
            "status": self.status,
            "createdAt": self.created,
        }
        if self.default_method is not None:
            view["defaultPaymentMethodRef"] = self.default_method
        return view

    def method(self, ref: str) -> _PaymentMethod:
        method = self.methods.get(ref)
        if method is None:
            raise EmulatorError(404, "payment_method_not_found", f"no payment method {ref!r}")
        return method


@dataclass(slots=True)
class _Tenant:
    accounts: dict[str, _Account] = field(default_factory=dict)
    # Customer ids are unique per tenant: entitlements are addressed without the account.
    customers: dict[str, _Customer] = field(default_factory=dict)
    entitlements: dict[str, Json] = field(default_factory=dict)
    checkouts: dict[str, Json] = field(default_factory=dict)
    flags: dict[str, bool] = field(default_factory=dict)
    overrides: dict[str, dict[str, bool]] = field(default_factory=dict)
    balances: dict[str, dict[str, int]] = field(default_factory=dict)
    consumed: dict[tuple[str, str, str], tuple[int, Json]] = field(default_factory=dict)


# --------------------------------------------------------------------------- validation


def bad_request(code: str, message: str) -> NoReturn:
    raise EmulatorError(400, code, message)


def json_object(raw: bytes) -> Json:
    if not raw.strip():
        bad_request("invalid_body", "a JSON object body is required")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        bad_request("invalid_json", "the body is not valid JSON")
    if not isinstance(body, dict):
        bad_request("invalid_body", "the body must be a JSON object")
    return body


def _req_str(body: Mapping[str, Any], name: str) -> str:
    value = body.get(name)
    if value is None:
        bad_request("missing_field", f"{name} is required")
    if not isinstance(value, str) or not value:
        bad_request("invalid_field", f"{name} must be a non-empty string")
    return value


def _not_null(body: Mapping[str, Any], name: str) -> Any:
    value = body.get(name)
    if name in body and value is None:
        bad_request("invalid_field", f"{name} is optional: omit it rather than sending null")
    return value


def optional_str(body: Mapping[str, Any], name: str) -> str | None:
    value = _not_null(body, name)
    if value is not None and (not isinstance(value, str) or not value):
        bad_request("invalid_field", f"{name} must be a non-empty string")
    return value


def _opt_bool(body: Mapping[str, Any], name: str) -> bool:
    value = _not_null(body, name)
    if value is None:
        return False
    if not isinstance(value, bool):
        bad_request("invalid_field", f"{name} must be a boolean")
    return value


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _opt_int(body: Mapping[str, Any], name: str) -> int | None:
    value = _not_null(body, name)
    if value is None:
        return None
    if not _positive_int(value):
        bad_request("invalid_field", f"{name} must be a positive integer")
    return int(value)


def _req_int(body: Mapping[str, Any], name: str) -> int:
    if body.get(name) is None:
        bad_request("missing_field", f"{name} is required")
    value = _opt_int(body, name)
    assert value is not None
    return value


def _str_list(body: Mapping[str, Any], name: str) -> list[str] | None:
    value = _not_null(body, name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        bad_request("invalid_field", f"{name} must be a list of non-empty strings")
    return list(dict.fromkeys(value))


def _status(body: Mapping[str, Any], allowed: frozenset[str]) -> str:
    status = _req_str(body, "status")
    if status not in allowed:
        bad_request("invalid_status", f"status must be one of {', '.join(sorted(allowed))}")
    return status


def _bool_query(query: Mapping[str, str], name: str) -> bool:
    value = query.get(name, "false").lower()
    if value in ("true", "1"):
        return True
    if value in ("false", "0", ""):
        return False
    bad_request("invalid_query", f"{name} must be true or false")


def check_entitlements(doc: Mapping[str, Any]) -> None:
    """The admin API's checks on a document it is given to store."""
    if "status" in doc and not isinstance(doc["status"], str):
        bad_request("invalid_field", "status must be a string")
    modules = doc.get("modules", [])
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        bad_request("invalid_field", "modules must be a list of strings")
    if not isinstance(doc.get("config", {}), dict):
        bad_request("invalid_field", "config must be an object")
    if "accountId" in doc and not isinstance(doc["accountId"], str):
        bad_request("invalid_field", "accountId must be a string")
    if "hasAccess" in doc and not isinstance(doc["hasAccess"], bool):
        bad_request("invalid_field", "hasAccess must be a boolean")


@dataclass(frozen=True, slots=True)
class _Choice:
    """A resolved plan: what a checkout, a subscription or a change sells."""

    product: Product
    plan_id: str
    version: PlanVersion
    seats: int
    add_ons: list[str]


# --------------------------------------------------------------------------- the state


class State:
    """Every tenant's data, the rules of the API, faults, settings and the request log.

    ``api_keys`` is a plain set (tests rotate it at run time). A key's mode is
    ``live`` when it starts with ``live_`` or contains ``_live_``, else ``test``.
    """

    def __init__(
        self,
        *,
        api_keys: Collection[str],
        seed: bool = False,
        default_tenant: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.api_keys: set[str] = set(api_keys)
        self.default_tenant = default_tenant or DEMO_TENANT
        self.clock = clock
        self.seeded = seed
        self.settings = Settings()
        self.requests: list[RecordedRequest] = []
        self.events: list[Json] = []
        """Every event emitted so far (pushed or not), oldest first."""
        self._tenants: dict[str, _Tenant] = {}
        self._failures: list[_Failure] = []
        self._delays: list[_Delay] = []
        self._holds: list[Hold] = []
        self._idempotency: dict[tuple[str, str, str], _Stored] = {}
        self._quiet = False
        if seed:
            self.seed_demo()

    # ------------------------------------------------------------------ auth

    def mode_of(self, api_key: str | None) -> str | None:
        """The key's mode, or None when the key is not accepted (401)."""
        if api_key is None or api_key not in self.api_keys:
            return None
        return "live" if api_key.startswith("live_") or "_live_" in api_key else "test"

    # ------------------------------------------------------------------ the upstream API

    def answer(self, call: Call) -> Answer:
        """Run one upstream operation; every refusal is an answer, never an exception."""
        if call.operation not in OPERATIONS:
            raise ValueError(f"unknown operation {call.operation!r}")
        handler: Callable[[Call], Answer] = getattr(self, f"_op_{call.operation}")
        try:
            return handler(call)
        except EmulatorError as exc:
            return exc.answer()

    def replay(self, operation: str, path: str, key: str, raw: bytes) -> Answer | None:
        """The stored answer for a repeated ``Idempotency-Key`` (422 for another body)."""
        stored = self._idempotency.get((operation, path, key))
        if stored is None:
            return None
        if stored.request_body != raw:
            return Answer.error(422, "idempotency_key_reused", "the key was used with another body")
        answer = stored.answer
        return Answer(
            answer.status,
            answer.body,
            answer.content_type,
            {**answer.headers, "Idempotent-Replayed": "true"},
        )

    def remember(self, operation: str, path: str, key: str, raw: bytes, answer: Answer) -> None:
        if answer.status < 500:
            self._idempotency[(operation, path, key)] = _Stored(raw, answer)

    # ------------------------------------------------------------------ python API: data

    def set_entitlements(self, tenant: str, customer_id: str, doc: Mapping[str, Any]) -> Json:
        """Replace a customer's entitlement document, emit its event; the answered view.

        Missing fields take defaults (``status`` active, no modules, empty config).
        An explicit boolean ``hasAccess`` is answered as given.
        """
        check_entitlements(doc)
        state = self._tenant(tenant)
        stored: Json = {"customerId": customer_id, "status": "active", "modules": [], "config": {}}
        stored |= copy.deepcopy(dict(doc))
        stored["customerId"] = customer_id
        known = state.customers.get(customer_id)
        if "accountId" not in stored and known is not None:
            stored["accountId"] = known.account_id
        stored["updatedAt"] = self._now()
        state.entitlements[customer_id] = stored
        self._emit(
            tenant, "entitlements.updated", customer_id, _str_or_none(stored.get("accountId"))
        )
        return self._entitlement_view(stored)

    def delete_entitlements(self, tenant: str, customer_id: str) -> bool:
        """Drop a customer's document (GET then answers 404); emit when one existed."""
        doc = self._tenant(tenant).entitlements.pop(customer_id, None)
        if doc is None:
            return False
        self._emit(tenant, "entitlements.updated", customer_id, _str_or_none(doc.get("accountId")))
        return True

    def get_entitlements(self, tenant: str, customer_id: str) -> Json | None:
        """The document as GET answers it (a copy), or None (what GET answers 404 for)."""
        state = self._tenants.get(tenant)
        doc = None if state is None else state.entitlements.get(customer_id)
        return None if doc is None else self._entitlement_view(doc)

    def create_account(
        self,
        tenant: str,
        account_id: str,
        *,
        name: str | None = None,
        email: str | None = None,
        billing_customer_id: str | None = None,
        create_billing_customer: bool = False,
    ) -> Json:
        """Create an account (two test cards on file), or return the existing one.

        An existing account adopts ``billing_customer_id`` when it has none; a
        different one is a 409 and nothing changes.
        """
        return self._create_account(
            tenant, account_id, name, email, billing_customer_id, create_billing_customer
        )[0]

    def create_customer(
        self,
        tenant: str,
        account_id: str,
        customer_id: str,
        *,
        name: str | None = None,
        email: str | None = None,
    ) -> Json:
        """Create a customer under an account; it has no entitlements until subscribed."""
        state = self._tenant(tenant)
        account = self._account(state, account_id)
        if customer_id in state.customers:
            raise EmulatorError(409, "customer_exists", f"customer {customer_id!r} exists")
        customer = _Customer(customer_id, account_id, name, email, "active", self._now())
        account.customers[customer_id] = customer
        state.customers[customer_id] = customer
        return customer.view()

    def subscribe(
        self,
        tenant: str,
        account_id: str,
        customer_id: str,
        plan_id: str,
        *,
        plan_version: int | None = None,
        product_id: str | None = None,
        seats: int = 1,
        add_ons: Iterable[str] = (),
        mode: str = "test",
    ) -> Json:
        """``create_subscription`` without HTTP; the subscription view."""
        body: Json = {"planId": plan_id, "seats": seats, "addOnModuleIds": list(add_ons)}
        if plan_version is not None:
            body["planVersion"] = plan_version
        if product_id is not None:
            body["productId"] = product_id
        state = self._tenant(tenant)
        account = self._account(state, account_id)
        customer = self._customer(account, customer_id)
        return self._subscribe(tenant, account, customer, self._choose(body, mode), mode)

    def renew(
        self,
        tenant: str,
        account_id: str,
        customer_id: str,
        *,
        mode: str = "test",
        succeeded: bool = True,
    ) -> Json:
        """The end of the current period: bill the next one, or end a pending cancel.

        A successful payment starts the next period (a trial becomes active) and
        emits ``payment.succeeded``; a failed one leaves the invoice open, makes the
        subscription ``past_due`` and emits ``payment.failed``. A subscription set to
        cancel at the period's end ends instead (``canceled``, access withdrawn).
        """
        state = self._tenant(tenant)
        account = self._account(state, account_id)
        customer = self._customer(account, customer_id)
        sub = self._live_subscription(customer, mode)
        now = self._now()
        if sub.cancel_at_period_end:
            sub.status, sub.canceled_at, sub.cancel_at_period_end = "canceled", now, False
            self._write_subscription(tenant, account, customer, sub)
            return sub.view(account)
        invoice = self._bill(tenant, account, customer, sub, paid=succeeded)
        if succeeded:
            sub.status = "active"
            sub.trial_end = None
            sub.period_start, sub.period_end = now, now + _PERIOD
        else:
            sub.status = "past_due"
        self._payment_event(tenant, account, customer, sub, invoice, succeeded=succeeded)
        self._write_subscription(tenant, account, customer, sub)
        return sub.view(account)

    def checkouts(self, tenant: str) -> list[Json]:
        """Every checkout session of the tenant, oldest first."""
        return [copy.deepcopy(c) for c in self._tenant(tenant).checkouts.values()]

    def complete_checkout(self, tenant: str, session_id: str) -> Json:
        """The customer finished a hosted checkout: apply it as the real service would.

        ``subscription``: the subscription starts (409 if one went live meanwhile);
        ``setup``: a new card is added to the account; ``payment``: the credits are
        added and the purchase invoiced (``payment.succeeded``).
        """
        state = self._tenant(tenant)
        session = state.checkouts.get(session_id)
        if session is None:
            raise EmulatorError(404, "checkout_not_found", f"no checkout session {session_id!r}")
        if session["status"] != "open":
            raise EmulatorError(409, "checkout_completed", "the session is already complete")
        account = self._account(state, session["accountId"])
        result: Json
        if session["mode"] == "subscription":
            customer = self._customer(account, session["customerId"])
            body = {k: session[k] for k in ("productId", "planId", "planVersion", "seats")} | {
                "addOnModuleIds": session["addOnModuleIds"]
            }
            result = self._subscribe(
                tenant,
                account,
                customer,
                self._choose(body, session["livemode"]),
                session["livemode"],
            )
        elif session["mode"] == "setup":
            provider_id = _new_id("pm")
            ref = make_ref("pmr", tenant, account.account_id, provider_id)
            account.methods[ref] = _PaymentMethod(
                ref, provider_id, "amex", "0005", account.name or account.account_id
            )
            account.default_method = account.default_method or ref
            self._emit(tenant, "payment_method.attached", None, account.account_id)
            result = account.methods[ref].view(account.default_method)
        else:
            customer = self._customer(account, session["customerId"])
            balances = state.balances.setdefault(customer.customer_id, {})
            lines = []
            for item in session["items"]:
                ct = item["creditTypeId"]
                balances[ct] = balances.get(ct, 0) + item["credits"]
                lines.append((f"{item['quantity']} x {item['packId']} ({ct})", item["amount"]))
            invoice = self._invoice(tenant, account, customer.customer_id, lines, paid=True)
            live = customer.subscriptions.get(session["livemode"])
            seats = live.seats if live is not None and live.live else None
            self._emit(
                tenant,
                "payment.succeeded",
                customer.customer_id,
                account.account_id,
                seats=seats,
                invoice=invoice.view(),
                credits=[
                    {"creditTypeId": i["creditTypeId"], "credits": i["credits"]}
                    for i in session["items"]
                ],
            )
            result = {"credits": self._credit_list(state, customer.customer_id)}
        session["status"] = "complete"
        return result

    # flags

    def set_flag(
        self, tenant: str, name: str, value: bool, *, customer_id: str | None = None
    ) -> Json:
        """Set a tenant-global flag, or one customer's override of a defined flag.

        Emits ``flags.updated`` (naming the customer for an override). Returns the
        tenant's flags and overrides.
        """
        state = self._tenant(tenant)
        if customer_id is None:
            state.flags[name] = value
        else:
            if name not in state.flags:
                raise EmulatorError(404, "flag_not_found", f"no flag {name!r}")
            state.overrides.setdefault(customer_id, {})[name] = value
        self._flag_event(tenant, customer_id)
        return self.flag_state(tenant)

    def delete_flag(self, tenant: str, name: str, *, customer_id: str | None = None) -> bool:
        """Remove a global flag (with its overrides) or one override; emit when it existed."""
        state = self._tenant(tenant)
        if customer_id is None:
            if state.flags.pop(name, None) is None:
                return False
            for overrides in state.overrides.values():
                overrides.pop(name, None)
        else:
            overrides = state.overrides.get(customer_id, {})
            if overrides.pop(name, None) is None:
                return False
        self._flag_event(tenant, customer_id)
        return True

    def flag_state(self, tenant: str) -> Json:
        state = self._tenant(tenant)
        return {
            "flags": dict(state.flags),
            "overrides": {c: dict(o) for c, o in state.overrides.items() if o},
        }

    def flags_for(self, tenant: str, customer_id: str | None = None) -> dict[str, bool]:
        """The flags as the API answers them: globals, with the customer's overrides."""
        state = self._tenant(tenant)
        flags = dict(state.flags)
        if customer_id is not None:
            flags |= state.overrides.get(customer_id, {})
        return flags

    # credits

    def set_credits(self, tenant: str, customer_id: str, credit_type_id: str, balance: int) -> Json:
        """Set a customer's balance of one credit type (no event); the balance view."""
        state = self._tenant(tenant)
        if customer_id not in state.customers:
            raise EmulatorError(404, "customer_not_found", f"no customer {customer_id!r}")
        credit_type = _credit_type(credit_type_id)
        if isinstance(balance, bool) or not isinstance(balance, int) or balance < 0:
            bad_request("invalid_field", "balance must be a non-negative integer")
        state.balances.setdefault(customer_id, {})[credit_type.credit_type_id] = balance
        return self._balance(state, customer_id, credit_type)

    def credits_of(self, tenant: str, customer_id: str) -> dict[str, int]:
        """Every balance of a customer (0 for types it never had)."""
        balances = self._tenant(tenant).balances.get(customer_id, {})
        return {ct: balances.get(ct, 0) for ct in CREDIT_TYPES}

    # the request log

    def count(self, operation: str | None = None, tenant: str | None = None) -> int:
        """How many upstream requests for ``operation`` (all when None) were seen."""
        return sum(
            1
            for r in self.requests
            if (operation is None or r.operation == operation)
            and (tenant is None or r.tenant == tenant)
        )

    def clear_requests(self) -> None:
        self.requests.clear()

    def reset(self) -> None:
        """Back to the initial state: data (re-seeded if seeded), settings, log, faults."""
        self._tenants.clear()
        self._idempotency.clear()
        self.requests.clear()
        self.events.clear()
        self.settings = Settings()
        self.clear_faults()
        if self.seeded:
            self.seed_demo()

    # ------------------------------------------------------------------ faults

    def fail(
        self,
        operation: str | None,
        status: int = 503,
        times: int | None = 1,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Answer ``status`` with a JSON error for the next ``times`` matching requests.

        ``operation=None`` matches every upstream request; ``times=None`` lasts until
        :meth:`clear_faults`. Delays, then failures, apply after authentication and
        before the operation runs; holds apply after it.
        """
        _check_operation(operation)
        if not 400 <= status <= 599:
            raise ValueError("status must be an HTTP error status (400-599)")
        if times is not None and times < 1:
            raise ValueError("times must be positive or None")
        self._failures.append(_Failure(operation, status, times, dict(headers or {})))

    def delay(self, operation: str | None, seconds: float, times: int | None = None) -> None:
        """Wait ``seconds`` before answering matching requests (all until cleared)."""
        _check_operation(operation)
        if seconds < 0:
            raise ValueError("seconds must not be negative")
        if times is not None and times < 1:
            raise ValueError("times must be positive or None")
        self._delays.append(_Delay(operation, seconds, times))

    def hold(self, operation: str | None) -> Hold:
        """Hold the answers to matching requests until ``Hold.release()``.

        The operation has already run when a request is held: its answer reflects the
        state at arrival and only its delivery waits. That is the window in which an
        invalidation races a fetch: once ``hold.arrived`` is set a test can change the
        document (which pushes), release, and check the older answer is not kept.
        """
        _check_operation(operation)
        hold = Hold(operation)
        self._holds.append(hold)
        return hold

    def clear_faults(self) -> None:
        """Remove every failure and delay, and release every hold."""
        self._failures.clear()
        self._delays.clear()
        for hold in self._holds:
            hold.release()
        self._holds.clear()

    def faults(self) -> list[Json]:
        """The active failures, delays and holds, as the admin API lists them."""
        holds = [
            {"operation": h.operation, "hold": True, "held": h.held}
            for h in self._holds
            if not h.released
        ]
        return [
            *(f.to_json() for f in self._failures),
            *(d.to_json() for d in self._delays),
            *holds,
        ]

    def take_delays(self, operation: str) -> list[float]:
        """The delays that apply to one request of ``operation`` (each counted once)."""
        seconds = []
        for delay in list(self._delays):
            if _matches(delay.operation, operation):
                delay.remaining = _consume(delay.remaining)
                if delay.remaining == 0:
                    self._delays.remove(delay)
                seconds.append(delay.seconds)
        return seconds

    def take_failure(self, operation: str) -> Answer | None:
        """The injected answer for one request of ``operation``, if a failure matches."""
        for failure in self._failures:
            if _matches(failure.operation, operation):
                failure.remaining = _consume(failure.remaining)
                if failure.remaining == 0:
                    self._failures.remove(failure)
                message = f"injected {failure.status} for {operation}"
                return Answer.error(
                    failure.status, error_code(failure.status), message, failure.headers
                )
        return None

    def holds_for(self, operation: str) -> list[Hold]:
        """The holds one answer of ``operation`` must wait for."""
        self._holds = [h for h in self._holds if not h.released]
        return [h for h in self._holds if _matches(h.operation, operation)]

    # ------------------------------------------------------------------ seed

    def seed_demo(self, tenant: str | None = None) -> None:
        """The demo dataset: account ``acme``, one customer per interesting status,
        a few flags with overrides, and credit balances."""
        tenant = tenant or self.default_tenant
        self._quiet = True
        try:
            self._seed(tenant)
        finally:
            self._quiet = False

    def _seed(self, tenant: str) -> None:
        state = self._tenant(tenant)
        now = self._now()
        acme = _Account(
            "acme", "Acme Inc.", "billing@acme.example", "cus_stripe_acme", "active", now
        )
        for provider_id, brand, last4 in (
            ("pm_acme_visa", "visa", "4242"),
            ("pm_acme_mastercard", "mastercard", "4444"),
        ):
            ref = make_ref("pmr", tenant, "acme", provider_id)
            acme.methods[ref] = _PaymentMethod(ref, provider_id, brand, last4, "Acme Inc.")
        acme.default_method = next(iter(acme.methods))
        state.accounts["acme"] = acme
        rows: list[tuple[str, str, str, int, int]] = [
            ("cus_active", "active", "team", 1, 5),
            ("cus_trial", "trialing", "starter", 2, 1),
            ("cus_pastdue", "past_due", "starter", 1, 1),
            ("cus_canceled", "canceled", "starter", 1, 1),
        ]
        app = PRODUCTS["app"]
        for customer_id, status, plan_id, version, seats in rows:
            customer = _Customer(
                customer_id, "acme", None, f"{customer_id}@acme.example", status, now
            )
            acme.customers[customer_id] = customer
            state.customers[customer_id] = customer
            sub = _Subscription(
                "acme",
                customer_id,
                "test",
                app,
                plan_id,
                app.plans[plan_id][version],
                seats,
                [],
                status,
                now,
                now,
                now + _PERIOD,
                canceled_at=now if status == "canceled" else None,
                trial_end=now + 14 * _DAY if status == "trialing" else None,
            )
            customer.subscriptions["test"] = sub
            self._write_subscription(tenant, acme, customer, sub)
        for provider_id, customer_id, lines, status in (
            ("in_acme_0001", "cus_active", [("5 x team v1", 5 * 2900)], "paid"),
            ("in_acme_0002", "cus_pastdue", [("1 x starter v1", 1900)], "open"),
        ):
            acme.invoices.append(
                _Invoice(
                    make_ref("invr", tenant, "acme", provider_id),
                    provider_id,
                    f"ACME-{len(acme.invoices) + 1:04d}",
                    customer_id,
                    lines,
                    status,
                    now,
                    hashlib.sha256(provider_id.encode()).hexdigest()[:16],
                )
            )
        state.flags |= {"new-dashboard": False, "bulk-export": True, "maintenance-banner": False}
        state.overrides |= {
            "cus_active": {"new-dashboard": True},
            "cus_trial": {"bulk-export": False},
        }
        state.balances |= {
            "cus_active": {"api-calls": 5000, "exports": 20},
            "cus_trial": {"api-calls": 100},
        }

    # ------------------------------------------------------------------ internals

    def _now(self) -> int:
        return int(self.clock())

    def _tenant(self, tenant: str) -> _Tenant:
        return self._tenants.setdefault(tenant, _Tenant())

    def _account(self, state: _Tenant, account_id: str) -> _Account:
        account = state.accounts.get(account_id)
        if account is None:
            raise EmulatorError(404, "account_not_found", f"no account {account_id!r}")
        return account

    def _customer(self, account: _Account, customer_id: str) -> _Customer:
        customer = account.customers.get(customer_id)
        if customer is None:
            raise EmulatorError(
                404,
                "customer_not_found",
                f"no customer {customer_id!r} in account {account.account_id!r}",
            )
        return customer

    def _known_customer(self, state: _Tenant, customer_id: str) -> _Customer:
        customer = state.customers.get(customer_id)
        if customer is None:
            raise EmulatorError(404, "customer_not_found", f"no customer {customer_id!r}")
        return customer

    def _subscription(self, customer: _Customer, mode: str) -> _Subscription:
        sub = customer.subscriptions.get(mode)
        if sub is None:
            raise EmulatorError(
                404,
                "subscription_not_found",
                f"customer {customer.customer_id!r} has no subscription",
            )
        return sub

    def _live_subscription(self, customer: _Customer, mode: str) -> _Subscription:
        sub = self._subscription(customer, mode)
        if not sub.live:
            raise EmulatorError(409, "subscription_canceled", "the subscription has ended")
        return sub

    def _path(self, call: Call) -> tuple[_Tenant, _Account, _Customer]:
        state = self._tenant(call.tenant)
        account = self._account(state, call.params["account"])
        return state, account, self._customer(account, call.params["customer"])

    # events

    def _emit(
        self,
        tenant: str,
        event_type: str,
        customer_id: str | None,
        account_id: str | None,
        **extra: Any,
    ) -> None:
        if self._quiet:
            return
        self.events.append(
            self.event(
                tenant,
                event_type=event_type,
                customer_id=customer_id,
                account_id=account_id,
                **extra,
            )
        )
        self._on_event(self.events[-1])

    def event(
        self,
        tenant: str,
        *,
        event_type: str = "entitlements.updated",
        customer_id: str | None = None,
        account_id: str | None = None,
        **extra: Any,
    ) -> Json:
        """A new event as the service builds one: a fresh id in each configured id field."""
        event_id = f"evt_{uuid.uuid4().hex}"
        event: Json = {name: event_id for name in self.settings.event_id_fields}
        event |= {"type": event_type, "tenantId": tenant}
        if customer_id is not None:
            event["customerId"] = customer_id
        if account_id is not None:
            event["accountId"] = account_id
        event["createdAt"] = self._now()
        event |= extra
        return event

    def _on_event(self, event: Json) -> None:
        """Called for every emitted event; the HTTP face delivers it."""

    def _flag_event(self, tenant: str, customer_id: str | None) -> None:
        account = None
        if customer_id is not None:
            known = self._tenant(tenant).customers.get(customer_id)
            account = known.account_id if known is not None else None
        self._emit(tenant, "flags.updated", customer_id, account)

    def _payment_event(
        self,
        tenant: str,
        account: _Account,
        customer: _Customer,
        sub: _Subscription,
        invoice: _Invoice,
        *,
        succeeded: bool = True,
    ) -> None:
        self._emit(
            tenant,
            "payment.succeeded" if succeeded else "payment.failed",
            customer.customer_id,
            account.account_id,
            seats=sub.seats,
            invoice=invoice.view(),
        )

    # entitlements

    def _entitlement_view(self, doc: Json) -> Json:
        view = copy.deepcopy(doc)
        if not self.settings.has_access:
            view.pop("hasAccess", None)
            return view
        explicit = doc.get("hasAccess")
        access = (
            explicit
            if isinstance(explicit, bool)
            else doc.get("status") in ACCESS_STATUSES
            and doc.get("accountStatus", "active") == "active"
        )
        view["hasAccess"] = access
        if not access:
            view["modules"] = []
        return view

    def _write_doc(self, tenant: str, customer: _Customer, **changes: Any) -> None:
        """Write ``changes`` into a customer's document (created if missing), emit."""
        state = self._tenant(tenant)
        doc = state.entitlements.get(customer.customer_id)
        if doc is None:
            doc = {"customerId": customer.customer_id, "accountId": customer.account_id}
            doc |= {"status": customer.status, "modules": [], "config": {}}
            account = state.accounts.get(customer.account_id)
            if account is not None and account.status != "active":
                doc["accountStatus"] = account.status
        doc.pop("hasAccess", None)  # the server decides again from the new state
        doc |= changes
        doc["updatedAt"] = self._now()
        state.entitlements[customer.customer_id] = doc
        self._emit(tenant, "entitlements.updated", customer.customer_id, customer.account_id)

    def _write_subscription(
        self, tenant: str, account: _Account, customer: _Customer, sub: _Subscription
    ) -> None:
        customer.status = sub.status
        doc = self._tenant(tenant).entitlements.get(customer.customer_id, {})
        config = dict(doc.get("config") or {})
        config["seats"] = sub.seats
        self._write_doc(
            tenant,
            customer,
            status=sub.status,
            modules=sub.modules(),
            config=config,
            productId=sub.product.product_id,
            planId=sub.plan_id,
            planVersion=sub.version.version,
            addOnModuleIds=list(sub.add_ons),
        )

    # billing

    def _create_account(
        self,
        tenant: str,
        account_id: str,
        name: str | None,
        email: str | None,
        billing_customer_id: str | None,
        create_billing_customer: bool,
    ) -> tuple[Json, bool]:
        state = self._tenant(tenant)
        existing = state.accounts.get(account_id)
        if existing is not None:
            stored = existing.billing_customer_id
            if billing_customer_id is not None and stored not in (None, billing_customer_id):
                raise EmulatorError(
                    409,
                    "billing_customer_conflict",
                    f"account {account_id!r} already has another billing customer",
                )
            if stored is None:
                if billing_customer_id is not None:
                    existing.billing_customer_id = billing_customer_id
                elif create_billing_customer:
                    existing.billing_customer_id = _new_id("cus")
            return existing.view(), False
        if billing_customer_id is None and create_billing_customer:
            billing_customer_id = _new_id("cus")
        account = _Account(account_id, name, email, billing_customer_id, "active", self._now())
        for brand, last4 in (("visa", "4242"), ("mastercard", "4444")):
            provider_id = _new_id("pm")
            ref = make_ref("pmr", tenant, account_id, provider_id)
            account.methods[ref] = _PaymentMethod(
                ref, provider_id, brand, last4, name or account_id
            )
        account.default_method = next(iter(account.methods))
        state.accounts[account_id] = account
        return account.view(), True

    def _choose(
        self, body: Mapping[str, Any], mode: str, current: _Subscription | None = None
    ) -> _Choice:
        """Resolve a body's product, plan, version, seats and add-ons.

        With ``current`` (a change to a subscription), every field may be omitted and
        keeps its current value; ``planVersion`` omitted with a new ``planId`` sells
        the newest version, as on a new subscription.
        """
        product_id = optional_str(body, "productId")
        plan_id = optional_str(body, "planId")
        if plan_id is None and current is None:
            bad_request("missing_field", "planId is required")
        version_no = _opt_int(body, "planVersion")
        if plan_id is None:
            assert current is not None
            if product_id not in (None, current.product.product_id):
                bad_request("missing_field", "planId is required with a productId")
            product, plan_id = current.product, current.plan_id
            if version_no is None:
                version_no = current.version.version
        else:
            product = self._product_for(plan_id, product_id)
        versions = product.plans[plan_id]
        version: PlanVersion | None
        if version_no is None:
            version = product.newest_sold(plan_id, mode)
            if version is None:
                raise EmulatorError(
                    404,
                    "plan_version_not_found",
                    f"no version of {plan_id!r} is sold in {mode} mode",
                )
        else:
            version = versions.get(version_no)
            if version is None:
                raise EmulatorError(
                    404, "plan_version_not_found", f"plan {plan_id!r} has no version {version_no}"
                )
            if mode not in version.modes:
                bad_request(
                    "plan_version_not_priced", f"{plan_id!r} v{version_no} has no {mode}-mode price"
                )
        seats = _opt_int(body, "seats")
        if seats is None:
            seats = current.seats if current is not None else 1
        add_ons = _str_list(body, "addOnModuleIds")
        if add_ons is None:
            add_ons = (
                [m for m in current.add_ons if m in product.add_ons and m not in version.modules]
                if current is not None
                else []
            )
        _check_add_ons(product, version, add_ons)
        return _Choice(product, plan_id, version, seats, add_ons)

    def _product_for(self, plan_id: str, product_id: str | None) -> Product:
        if product_id is not None:
            product = PRODUCTS.get(product_id)
            if product is None:
                raise EmulatorError(404, "product_not_found", f"no product {product_id!r}")
            if plan_id not in product.plans:
                raise EmulatorError(
                    404, "plan_not_found", f"product {product_id!r} has no plan {plan_id!r}"
                )
            return product
        products = [p for p in PRODUCTS.values() if plan_id in p.plans]
        if not products:
            raise EmulatorError(404, "plan_not_found", f"no plan {plan_id!r}")
        if len(products) > 1:
            names = ", ".join(p.product_id for p in products)
            bad_request("ambiguous_plan", f"plan {plan_id!r} is sold by {names}: send productId")
        return products[0]

    def _refuse_second_subscription(self, customer: _Customer, mode: str) -> None:
        current = customer.subscriptions.get(mode)
        if current is not None and current.live:
            raise EmulatorError(
                409,
                "subscription_exists",
                f"customer {customer.customer_id!r} already has a {mode}-mode subscription;"
                " change that one instead",
            )

    def _subscribe(
        self, tenant: str, account: _Account, customer: _Customer, choice: _Choice, mode: str
    ) -> Json:
        self._refuse_second_subscription(customer, mode)
        trial = choice.version.trial_days
        if trial == 0 and account.default_method is None:
            raise EmulatorError(
                402, "payment_method_required", "the account has no payment method on file"
            )
        now = self._now()
        sub = _Subscription(
            account.account_id,
            customer.customer_id,
            mode,
            choice.product,
            choice.plan_id,
            choice.version,
            choice.seats,
            choice.add_ons,
            "trialing" if trial else "active",
            now,
            now,
            now + (trial * _DAY if trial else _PERIOD),
            trial_end=now + trial * _DAY if trial else None,
        )
        customer.subscriptions[mode] = sub
        # A trial's first invoice is a genuinely paid zero-amount invoice.
        invoice = self._bill(tenant, account, customer, sub, paid=True, zero=bool(trial))
        self._payment_event(tenant, account, customer, sub, invoice)
        self._write_subscription(tenant, account, customer, sub)
        return sub.view(account)

    def _invoice(
        self,
        tenant: str,
        account: _Account,
        customer_id: str,
        lines: list[tuple[str, int]],
        *,
        paid: bool,
    ) -> _Invoice:
        provider_id = _new_id("in")
        invoice = _Invoice(
            make_ref("invr", tenant, account.account_id, provider_id),
            provider_id,
            f"{_number_prefix(account.account_id)}-{len(account.invoices) + 1:04d}",
            customer_id,
            lines,
            "paid" if paid else "open",
            self._now(),
            uuid.uuid4().hex[:16],
        )
        account.invoices.append(invoice)
        return invoice

    def _bill(
        self,
        tenant: str,
        account: _Account,
        customer: _Customer,
        sub: _Subscription,
        *,
        paid: bool,
        zero: bool = False,
        amount: int | None = None,
        label: str | None = None,
    ) -> _Invoice:
        """An invoice for the subscription's period (or ``amount``, a proration)."""
        if amount is None:
            lines = [
                (
                    f"{sub.seats} x {sub.plan_id} v{sub.version.version}",
                    0 if zero else sub.version.price * sub.seats,
                )
            ]
            lines += [(f"add-on {m}", 0 if zero else sub.product.add_ons[m]) for m in sub.add_ons]
        else:
            lines = [(label or "proration", amount)]
        return self._invoice(tenant, account, customer.customer_id, lines, paid=paid)

    def _change(
        self,
        tenant: str,
        account: _Account,
        customer: _Customer,
        sub: _Subscription,
        choice: _Choice,
        label: str,
    ) -> Json:
        """Apply a change: bill a higher price at once (proration), write the document."""
        before = sub.amount()
        sub.product, sub.plan_id, sub.version = choice.product, choice.plan_id, choice.version
        sub.seats, sub.add_ons = choice.seats, choice.add_ons
        extra = sub.amount() - before
        if extra > 0 and sub.status != "trialing":
            invoice = self._bill(
                tenant, account, customer, sub, paid=True, amount=extra, label=label
            )
            self._payment_event(tenant, account, customer, sub, invoice)
        self._write_subscription(tenant, account, customer, sub)
        return sub.view(account)

    def _credit_list(self, state: _Tenant, customer_id: str) -> list[Json]:
        return [
            {**ct.to_json(), "balance": state.balances.get(customer_id, {}).get(ct_id, 0)}
            for ct_id, ct in CREDIT_TYPES.items()
        ]

    def _balance(self, state: _Tenant, customer_id: str, credit_type: CreditType) -> Json:
        balance = state.balances.get(customer_id, {}).get(credit_type.credit_type_id, 0)
        return {
            "customerId": customer_id,
            "creditTypeId": credit_type.credit_type_id,
            "unit": credit_type.unit,
            "balance": balance,
        }

    # ------------------------------------------------------------------ operations

    def _op_get_entitlements(self, call: Call) -> Answer:
        customer_id = call.params["customer"]
        doc = self.get_entitlements(call.tenant, customer_id)
        if doc is None:
            raise EmulatorError(
                404, "entitlements_not_found", f"customer {customer_id!r} has no entitlements"
            )
        return Answer.json(doc)

    def _op_flags(self, call: Call) -> Answer:
        return Answer.json({"flags": self.flags_for(call.tenant, call.params["customer"])})

    def _op_global_flags(self, call: Call) -> Answer:
        return Answer.json({"flags": self.flags_for(call.tenant)})

    def _op_create_checkout(self, call: Call) -> Answer:
        body = json_object(call.body)
        state = self._tenant(call.tenant)
        account = self._account(state, call.params["account"])
        customer = self._customer(account, _req_str(body, "customerId"))
        urls = {
            "successUrl": _req_str(body, "successUrl"),
            "cancelUrl": _req_str(body, "cancelUrl"),
        }
        choice = self._choose(body, call.mode)
        self._refuse_second_subscription(customer, call.mode)
        session = self._new_session(call, "subscription", account.account_id, urls)
        session |= {
            "customerId": customer.customer_id,
            "productId": choice.product.product_id,
            "planId": choice.plan_id,
            "planVersion": choice.version.version,
            "seats": choice.seats,
            "addOnModuleIds": choice.add_ons,
            "amountTotal": _amount(choice.product, choice.version, choice.seats, choice.add_ons),
        }
        state.checkouts[session["id"]] = session
        return Answer.json(_public(session), 201)

    def _new_session(self, call: Call, mode: str, account_id: str, urls: Mapping[str, str]) -> Json:
        session_id = f"cs_{call.mode}_{uuid.uuid4().hex[:24]}"
        return {
            "id": session_id,
            "url": f"https://checkout.example/{session_id}",
            "mode": mode,
            "status": "open",
            "accountId": account_id,
            **urls,
            "currency": CURRENCY,
            "expiresAt": iso(self._now() + _DAY),
            "livemode": call.mode,
        }

    def _op_create_setup_checkout(self, call: Call) -> Answer:
        body = json_object(call.body)
        state = self._tenant(call.tenant)
        account = self._account(state, call.params["account"])
        urls = {
            "successUrl": _req_str(body, "successUrl"),
            "cancelUrl": _req_str(body, "cancelUrl"),
        }
        session = self._new_session(call, "setup", account.account_id, urls)
        state.checkouts[session["id"]] = session
        return Answer.json(_public(session), 201)

    def _op_create_credit_checkout(self, call: Call) -> Answer:
        body = json_object(call.body)
        state = self._tenant(call.tenant)
        account = self._account(state, call.params["account"])
        customer = self._customer(account, _req_str(body, "customerId"))
        urls = {
            "successUrl": _req_str(body, "successUrl"),
            "cancelUrl": _req_str(body, "cancelUrl"),
        }
        raw_items = body.get("items")
        if raw_items is None:
            raw_items = [body]
        elif not isinstance(raw_items, list) or not raw_items:
            bad_request("invalid_field", "items must be a non-empty list")
        items = []
        for n, raw in enumerate(raw_items):
            where = "" if raw is body else f"items[{n}]."
            if not isinstance(raw, dict):
                bad_request("invalid_field", f"items[{n}] must be an object")
            ct_id = raw.get("creditTypeId")
            pack_id = raw.get("packId")
            if not isinstance(ct_id, str) or not ct_id:
                bad_request("missing_field", f"{where}creditTypeId is required")
            if not isinstance(pack_id, str) or not pack_id:
                bad_request("missing_field", f"{where}packId is required")
            quantity = raw.get("quantity", 1)
            if not _positive_int(quantity):
                bad_request("invalid_field", f"{where}quantity must be a positive integer")
            credit_type = _credit_type(ct_id)
            pack = credit_type.pack(pack_id)
            if pack is None:
                raise EmulatorError(
                    404, "pack_not_found", f"credit type {ct_id!r} has no pack {pack_id!r}"
                )
            items.append(
                {
                    "creditTypeId": ct_id,
                    "packId": pack_id,
                    "quantity": quantity,
                    "credits": pack.credits * quantity,
                    "amount": pack.price * quantity,
                }
            )
        session = self._new_session(call, "payment", account.account_id, urls)
        session |= {
            "customerId": customer.customer_id,
            "items": items,
            "amountTotal": sum(i["amount"] for i in items),
        }
        state.checkouts[session["id"]] = session
        return Answer.json(_public(session), 201)

    def _op_create_subscription(self, call: Call) -> Answer:
        body = json_object(call.body)
        _, account, customer = self._path(call)
        choice = self._choose(body, call.mode)
        return Answer.json(self._subscribe(call.tenant, account, customer, choice, call.mode), 201)

    def _op_get_subscription(self, call: Call) -> Answer:
        _, account, customer = self._path(call)
        return Answer.json(self._subscription(customer, call.mode).view(account))

    def _op_update_subscription(self, call: Call) -> Answer:
        body = json_object(call.body)
        _, account, customer = self._path(call)
        _req_str(body, "planId")
        _req_int(body, "planVersion")
        sub = self._live_subscription(customer, call.mode)
        choice = self._choose(body, call.mode, sub)
        return Answer.json(self._change(call.tenant, account, customer, sub, choice, "update"))

    def _op_preview_change(self, call: Call) -> Answer:
        body = json_object(call.body) if call.body.strip() else {}
        _, account, customer = self._path(call)
        sub = self._live_subscription(customer, call.mode)
        choice = self._choose(body, call.mode, sub)
        proposed = copy.copy(sub)
        proposed.product, proposed.plan_id, proposed.version = (
            choice.product,
            choice.plan_id,
            choice.version,
        )
        proposed.seats, proposed.add_ons = choice.seats, choice.add_ons
        due = max(0, proposed.amount() - sub.amount()) if sub.status != "trialing" else 0
        return Answer.json(
            {
                "current": sub.view(account),
                "proposed": proposed.view(account),
                "amountDueNow": due,
                "currency": CURRENCY,
            }
        )

    def _op_set_seats(self, call: Call) -> Answer:
        body = json_object(call.body)
        _, account, customer = self._path(call)
        seats = _req_int(body, "seats")
        sub = self._live_subscription(customer, call.mode)
        choice = self._choose({"seats": seats}, call.mode, sub)
        return Answer.json(self._change(call.tenant, account, customer, sub, choice, "seats"))

    def _op_change_add_ons(self, call: Call) -> Answer:
        body = json_object(call.body)
        _, account, customer = self._path(call)
        add = _str_list(body, "add") or []
        remove = _str_list(body, "remove") or []
        if not add and not remove:
            bad_request("missing_field", "add or remove is required")
        sub = self._live_subscription(customer, call.mode)
        add_ons = [m for m in sub.add_ons if m not in remove]
        add_ons += [m for m in add if m not in add_ons]
        choice = self._choose({"addOnModuleIds": add_ons}, call.mode, sub)
        return Answer.json(self._change(call.tenant, account, customer, sub, choice, "add-ons"))

    def _op_change_plan(self, call: Call) -> Answer:
        body = json_object(call.body)
        _, account, customer = self._path(call)
        changes = {
            "planId": _req_str(body, "planId"),
            "planVersion": _req_int(body, "planVersion"),
        }
        if "productId" in body:
            changes["productId"] = body["productId"]
        sub = self._live_subscription(customer, call.mode)
        choice = self._choose(changes, call.mode, sub)
        return Answer.json(self._change(call.tenant, account, customer, sub, choice, "plan"))

    def _op_reactivate(self, call: Call) -> Answer:
        _, account, customer = self._path(call)
        sub = self._subscription(customer, call.mode)
        if sub.live and not sub.cancel_at_period_end:
            raise EmulatorError(
                409, "subscription_active", "the subscription is active: nothing to reactivate"
            )
        if sub.live:
            # A pending cancel is withdrawn: nothing is billed, access never stopped.
            sub.cancel_at_period_end = False
            return Answer.json(sub.view(account))
        if account.default_method is None and sub.method_ref is None:
            raise EmulatorError(
                402, "payment_method_required", "the account has no payment method on file"
            )
        now = self._now()
        sub.status, sub.canceled_at, sub.trial_end = "active", None, None
        sub.period_start, sub.period_end = now, now + _PERIOD
        invoice = self._bill(call.tenant, account, customer, sub, paid=True)
        self._payment_event(call.tenant, account, customer, sub, invoice)
        self._write_subscription(call.tenant, account, customer, sub)
        return Answer.json(sub.view(account))

    def _op_cancel_subscription(self, call: Call) -> Answer:
        at_period_end = _bool_query(call.query, "atPeriodEnd")
        _, account, customer = self._path(call)
        sub = self._live_subscription(customer, call.mode)
        if at_period_end:
            # Access lasts until the period ends (see renew), so nothing to push yet.
            sub.cancel_at_period_end = True
            return Answer.json(sub.view(account))
        sub.status, sub.canceled_at, sub.cancel_at_period_end = "canceled", self._now(), False
        self._write_subscription(call.tenant, account, customer, sub)
        return Answer.json(sub.view(account))

    def _op_create_account(self, call: Call) -> Answer:
        body = json_object(call.body)
        view, created = self._create_account(
            call.tenant,
            _req_str(body, "accountId"),
            optional_str(body, "name"),
            optional_str(body, "email"),
            optional_str(body, "billingCustomerId"),
            _opt_bool(body, "createBillingCustomer"),
        )
        return Answer.json(view, 201 if created else 200)

    def _op_create_customer(self, call: Call) -> Answer:
        body = json_object(call.body)
        customer_id = _req_str(body, "customerId")
        name, email = optional_str(body, "name"), optional_str(body, "email")
        view = self.create_customer(
            call.tenant, call.params["account"], customer_id, name=name, email=email
        )
        return Answer.json(view, 201)

    def _op_set_account_status(self, call: Call) -> Answer:
        status = _status(json_object(call.body), ACCOUNT_STATUSES)
        state = self._tenant(call.tenant)
        account = self._account(state, call.params["account"])
        account.status = status
        now = self._now()
        for customer_id in account.customers:
            doc = state.entitlements.get(customer_id)
            if doc is not None:
                doc["accountStatus"] = status
                doc["updatedAt"] = now
        # One account-wide event without customerId: receivers fan it out themselves.
        self._emit(call.tenant, "entitlements.updated", None, account.account_id)
        return Answer.json(account.view())

    def _op_set_customer_status(self, call: Call) -> Answer:
        status = _status(json_object(call.body), CUSTOMER_STATUSES)
        _, _, customer = self._path(call)
        customer.status = status
        self._write_doc(call.tenant, customer, status=status)
        return Answer.json(customer.view())

    def _op_list_payment_methods(self, call: Call) -> Answer:
        account = self._account(self._tenant(call.tenant), call.params["account"])
        methods = [m.view(account.default_method) for m in account.methods.values()]
        return Answer.json({"methods": methods})

    def _op_set_default_payment_method(self, call: Call) -> Answer:
        account = self._account(self._tenant(call.tenant), call.params["account"])
        method = account.method(call.params["method"])
        account.default_method = method.ref
        return Answer.json(method.view(account.default_method))

    def _op_remove_payment_method(self, call: Call) -> Answer:
        account = self._account(self._tenant(call.tenant), call.params["account"])
        method = account.method(call.params["method"])
        for customer in account.customers.values():
            for sub in customer.subscriptions.values():
                if sub.live and sub.method_ref == method.ref:
                    raise EmulatorError(
                        409,
                        "payment_method_in_use",
                        f"it pays {customer.customer_id!r}'s subscription",
                    )
        del account.methods[method.ref]
        if account.default_method == method.ref:
            account.default_method = next(iter(account.methods), None)
        return Answer.json({"ref": method.ref, "removed": True})

    def _op_set_subscription_payment_method(self, call: Call) -> Answer:
        body = json_object(call.body)
        ref = _req_str(body, "methodId")
        _, account, customer = self._path(call)
        sub = self._subscription(customer, call.mode)
        sub.method_ref = account.method(ref).ref
        return Answer.json(sub.view(account))

    def _op_list_invoices(self, call: Call) -> Answer:
        account = self._account(self._tenant(call.tenant), call.params["account"])
        customer_id = call.query.get("customerId")
        invoices = [
            i.view()
            for i in account.invoices
            if customer_id is None or i.customer_id == customer_id
        ]
        return Answer.json({"invoices": invoices})

    def _op_invoice_pdf(self, call: Call) -> Answer:
        account = self._account(self._tenant(call.tenant), call.params["account"])
        ref = call.params["invoice"]
        # The ownership check: only this account's refs; never a provider id.
        invoice = next((i for i in account.invoices if i.ref == ref), None)
        if invoice is None:
            raise EmulatorError(404, "invoice_not_found", f"no invoice {ref!r}")
        if self.settings.invoice_pdf == "redirect":
            url = f"https://files.invoices.example/{invoice.hosted_token}/{invoice.number}.pdf"
            return Answer.json({"url": url}, 302, {"Location": url})
        disposition = f'inline; filename="{invoice.number}.pdf"'
        return Answer(
            200, invoice.pdf(account), "application/pdf", {"Content-Disposition": disposition}
        )

    def _op_list_credit_types(self, call: Call) -> Answer:
        return Answer.json({"creditTypes": [ct.to_json() for ct in CREDIT_TYPES.values()]})

    def _op_list_credit_packs(self, call: Call) -> Answer:
        credit_type = _credit_type(call.params["credit_type"])
        return Answer.json(
            {"packs": [p.to_json(credit_type.credit_type_id) for p in credit_type.packs]}
        )

    def _op_list_credits(self, call: Call) -> Answer:
        state = self._tenant(call.tenant)
        customer = self._known_customer(state, call.params["customer"])
        return Answer.json({"credits": self._credit_list(state, customer.customer_id)})

    def _op_get_credit_balance(self, call: Call) -> Answer:
        state = self._tenant(call.tenant)
        customer = self._known_customer(state, call.params["customer"])
        credit_type = _credit_type(call.params["credit_type"])
        return Answer.json(self._balance(state, customer.customer_id, credit_type))

    def _op_consume_credits(self, call: Call) -> Answer:
        body = json_object(call.body)
        state = self._tenant(call.tenant)
        customer = self._known_customer(state, call.params["customer"])
        credit_type = _credit_type(call.params["credit_type"])
        amount = _req_int(body, "amount")
        key = _req_str(body, "idempotencyKey")
        if len(key) > _MAX_IDEMPOTENCY_KEY:
            bad_request("invalid_field", f"idempotencyKey is longer than {_MAX_IDEMPOTENCY_KEY}")
        slot = (customer.customer_id, credit_type.credit_type_id, key)
        done = state.consumed.get(slot)
        if done is not None:
            if done[0] != amount:
                return Answer.error(
                    422, "idempotency_key_reused", "the key was used with another amount"
                )
            return Answer.json(done[1], headers={"Idempotent-Replayed": "true"})
        balances = state.balances.setdefault(customer.customer_id, {})
        balance = balances.get(credit_type.credit_type_id, 0)
        if balance < amount:
            # All or nothing, and not remembered: the same key may succeed after a top-up.
            raise EmulatorError(
                409,
                "insufficient_credits",
                f"balance {balance} is less than {amount}: nothing was deducted",
            )
        balances[credit_type.credit_type_id] = balance - amount
        result = {
            **self._balance(state, customer.customer_id, credit_type),
            "consumed": amount,
            "idempotencyKey": key,
        }
        state.consumed[slot] = (amount, result)
        return Answer.json(result)


def _credit_type(credit_type_id: str) -> CreditType:
    credit_type = CREDIT_TYPES.get(credit_type_id)
    if credit_type is None:
        raise EmulatorError(404, "credit_type_not_found", f"no credit type {credit_type_id!r}")
    return credit_type


def _check_add_ons(product: Product, version: PlanVersion, add_ons: Iterable[str]) -> None:
    for module in add_ons:
        if module not in product.add_ons:
            bad_request("unknown_add_on", f"{product.product_id!r} has no add-on {module!r}")
        if module in version.modules:
            raise EmulatorError(409, "add_on_included", f"the plan already includes {module!r}")


def _public(session: Mapping[str, Any]) -> Json:
    """A checkout session as the API answers it (without the emulator's bookkeeping)."""
    return {k: v for k, v in session.items() if k != "livemode"}


def _number_prefix(account_id: str) -> str:
    letters = "".join(c for c in account_id.upper() if c.isascii() and c.isalnum())[:6]
    return letters or "INV"


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None
