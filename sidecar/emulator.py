"""The built-in Vellum emulator: the upstream API in memory, an admin API, signed pushes.

It stands in for the hosted Vellum API in tests, ``vellum-sidecar demo`` and compose.
Upstream routes live under ``/tenants/{t}/...`` and need an ``x-api-key``; the admin
API lives under ``/_emulator/`` and needs none. Tests in the same process can use the
:class:`Emulator` object directly: ``app[EMULATOR]``.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NoReturn
from urllib.parse import quote

import aiohttp
import orjson
from aiohttp import web

from sidecar.signature import sign, sign_many

__all__ = [
    "ACCOUNT_STATUSES",
    "CUSTOMER_STATUSES",
    "DEMO_TENANT",
    "EMULATOR",
    "OPERATIONS",
    "Emulator",
    "EmulatorError",
    "Hold",
    "Push",
    "RecordedRequest",
    "create_emulator_app",
    "plan_modules",
]

log = logging.getLogger(__name__)

DEMO_TENANT: Final = "demo"

OPERATIONS: Final[frozenset[str]] = frozenset(
    {
        "get_entitlements",
        "create_checkout",
        "create_setup_checkout",
        "create_subscription",
        "cancel_subscription",
        "get_subscription",
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
    }
)

ACCOUNT_STATUSES: Final[frozenset[str]] = frozenset({"active", "suspended", "closed"})
CUSTOMER_STATUSES: Final[frozenset[str]] = frozenset(
    {"active", "trialing", "past_due", "canceled", "paused", "suspended"}
)

_PLAN_MODULES: Final[Mapping[str, tuple[str, ...]]] = {
    "pro": ("reports", "exports", "api"),
    "team": ("reports", "exports"),
}
_PLAN_PRICES: Final[Mapping[str, int]] = {"pro": 4900, "team": 2900}  # cents per seat
_DEFAULT_PRICE: Final = 1900

_ERROR_CODES: Final[Mapping[int, str]] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    429: "rate_limited",
}

Json = dict[str, Any]


def plan_modules(plan_id: str) -> list[str]:
    """The modules a subscription to ``plan_id`` grants in the emulator."""
    return list(_PLAN_MODULES.get(plan_id, ("reports",)))


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


class EmulatorError(Exception):
    """An upstream-style error answered as ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    return _json({"error": {"code": code, "message": message}}, status=status, headers=headers)


def _json(
    payload: Any, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(payload),
        status=status,
        content_type="application/json",
        headers=headers,
    )


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
    """Decoded path parameters: ``tenant``, ``account``, ``customer``, ``method``, ``invoice``."""
    query: Mapping[str, str]
    body: Any
    """The parsed JSON body, or None when there was none or it was not JSON."""
    api_key: str | None
    idempotency_key: str | None

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
        }


@dataclass(slots=True)
class Push:
    """One webhook delivery attempt (or the reason none was made)."""

    event: Json
    url: str | None = None
    signature: str | None = None
    status: int | None = None
    """The receiver's HTTP status; None when nothing was received."""
    response_body: bytes = b""
    error: str | None = None

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    def to_json(self) -> Json:
        return {
            "event": self.event,
            "url": self.url,
            "status": self.status,
            "delivered": self.delivered,
            "error": self.error,
        }


class Hold:
    """Holds the answers to matching requests until :meth:`release`; see :meth:`Emulator.hold`."""

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

    async def _hold(self) -> None:
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


@dataclass(slots=True)
class _Stored:
    """A response kept for Idempotency-Key replays."""

    request_body: bytes
    status: int
    body: bytes
    headers: Mapping[str, str]


# --------------------------------------------------------------------------- state


@dataclass(slots=True)
class _Customer:
    customer_id: str
    account_id: str
    email: str | None
    status: str
    created_at: int
    subscription: Json | None = None

    def to_json(self) -> Json:
        return {
            "customerId": self.customer_id,
            "accountId": self.account_id,
            "email": self.email,
            "status": self.status,
            "createdAt": self.created_at,
        }


@dataclass(slots=True)
class _Account:
    account_id: str
    name: str | None
    email: str | None
    stripe_customer_id: str | None
    status: str
    created_at: int
    customers: dict[str, _Customer] = field(default_factory=dict)
    methods: dict[str, Json] = field(default_factory=dict)
    default_method: str | None = None
    invoices: list[Json] = field(default_factory=list)

    def to_json(self) -> Json:
        return {
            "accountId": self.account_id,
            "name": self.name,
            "email": self.email,
            "stripeCustomerId": self.stripe_customer_id,
            "status": self.status,
            "defaultPaymentMethodId": self.default_method,
            "createdAt": self.created_at,
        }

    def method_json(self, method_id: str) -> Json:
        return {**self.methods[method_id], "isDefault": method_id == self.default_method}


@dataclass(slots=True)
class _Tenant:
    accounts: dict[str, _Account] = field(default_factory=dict)
    # Customer ids are unique per tenant: entitlements are addressed without the account.
    customers: dict[str, _Customer] = field(default_factory=dict)
    entitlements: dict[str, Json] = field(default_factory=dict)
    checkouts: dict[str, Json] = field(default_factory=dict)


# --------------------------------------------------------------------------- emulator


class Emulator:
    """All emulator state, multi-tenant, plus the hooks tests drive it with.

    ``api_keys``, ``webhook_url``, ``webhook_secret`` and ``push_timeout`` are plain
    attributes: a test may point pushes at a receiver that starts after the emulator.
    ``webhook_secret`` may be a list, in which case pushes carry one ``v1`` per secret.
    """

    def __init__(
        self,
        *,
        api_keys: Collection[str],
        webhook_url: str | None = None,
        webhook_secret: str | Sequence[str] | None = None,
        seed: bool = False,
        default_tenant: str | None = None,
        push_timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.api_keys: set[str] = set(api_keys)
        self.webhook_url = webhook_url
        self.webhook_secret = webhook_secret
        self.default_tenant = default_tenant or DEMO_TENANT
        self.push_timeout = push_timeout
        self.clock = clock
        self.seeded = seed
        self.requests: list[RecordedRequest] = []
        self.pushes: list[Push] = []
        self._tenants: dict[str, _Tenant] = {}
        self._failures: list[_Failure] = []
        self._delays: list[_Delay] = []
        self._holds: list[Hold] = []
        self._idempotency: dict[tuple[str, str, str], _Stored] = {}
        self._outbox: list[Json] = []
        self._tasks: set[asyncio.Task[Push]] = set()
        self._session: aiohttp.ClientSession | None = None
        if seed:
            self.seed_demo()

    # ------------------------------------------------------------------ python API

    def set_entitlements(self, tenant: str, customer_id: str, doc: Mapping[str, Any]) -> Json:
        """Replace a customer's entitlement document, push, and return the stored doc.

        The push is sent in the background; ``await wait_pushes_idle()`` to know it
        was delivered (the admin HTTP route waits for it before answering).
        """
        stored = self._put_entitlements(tenant, customer_id, doc)
        self._dispatch()
        return stored

    def delete_entitlements(self, tenant: str, customer_id: str) -> bool:
        """Drop a customer's document (GET then answers 404); push when one existed."""
        deleted = self._drop_entitlements(tenant, customer_id)
        self._dispatch()
        return deleted

    def get_entitlements(self, tenant: str, customer_id: str) -> Json | None:
        """A copy of the stored document, or None (what GET answers 404 for)."""
        state = self._tenants.get(tenant)
        doc = None if state is None else state.entitlements.get(customer_id)
        return None if doc is None else copy.deepcopy(doc)

    def create_account(
        self,
        tenant: str,
        account_id: str,
        *,
        name: str | None = None,
        email: str | None = None,
        stripe_customer_id: str | None = None,
        create_stripe_customer: bool = False,
    ) -> Json:
        """Create an account with two cards on file, as ``POST /accounts`` does."""
        state = self._tenant(tenant)
        if account_id in state.accounts:
            raise EmulatorError(409, "account_exists", f"account {account_id!r} exists")
        if stripe_customer_id is None and create_stripe_customer:
            stripe_customer_id = _new_id("cus")
        account = _Account(
            account_id=account_id,
            name=name,
            email=email,
            stripe_customer_id=stripe_customer_id,
            status="active",
            created_at=self._now(),
        )
        visa, mastercard = _new_id("pm"), _new_id("pm")
        account.methods[visa] = _card(visa, "visa", "4242")
        account.methods[mastercard] = _card(mastercard, "mastercard", "4444")
        account.default_method = visa
        state.accounts[account_id] = account
        return account.to_json()

    def create_customer(
        self, tenant: str, account_id: str, customer_id: str, *, email: str | None = None
    ) -> Json:
        """Create a customer under an account; it has no entitlements until subscribed."""
        state = self._tenant(tenant)
        account = self._account(state, account_id)
        if customer_id in state.customers:
            raise EmulatorError(409, "customer_exists", f"customer {customer_id!r} exists")
        customer = _Customer(customer_id, account_id, email, "active", self._now())
        account.customers[customer_id] = customer
        state.customers[customer_id] = customer
        return customer.to_json()

    async def push_event(
        self,
        tenant: str,
        *,
        customer_id: str | None = None,
        account_id: str | None = None,
        event_type: str = "entitlements.updated",
    ) -> Push:
        """Build an event like the emulator's own and deliver it now."""
        return await self.deliver(self._event(tenant, customer_id, account_id, event_type))

    async def deliver(self, event: Mapping[str, Any], *, timestamp: int | None = None) -> Push:
        """Sign and POST ``event`` as-is to ``webhook_url``; record and return the attempt.

        Re-delivering a recorded ``push.event`` sends a duplicate id; ``timestamp``
        signs with another time (a stale push). Never raises for delivery failures.
        """
        body = orjson.dumps(event)
        push = Push(event=dict(event), url=self.webhook_url)
        try:
            if self.webhook_url is None:
                push.error = "no webhook_url configured"
                return push
            if self._session is None:
                push.error = "the emulator app is not running"
                return push
            ts = int(self.clock()) if timestamp is None else timestamp
            headers = {"Content-Type": "application/json"}
            secret = self.webhook_secret
            secrets = [secret] if isinstance(secret, str) else list(secret or ())
            secrets = [s for s in secrets if s]  # empty means unsigned, never a weak HMAC
            if len(secrets) == 1:
                push.signature = sign(secrets[0], body, ts)
            elif secrets:
                push.signature = sign_many(secrets, body, ts)
            if push.signature is not None:
                headers["X-Vellum-Signature"] = push.signature
            timeout = aiohttp.ClientTimeout(total=self.push_timeout)
            async with self._session.post(
                self.webhook_url, data=body, headers=headers, timeout=timeout
            ) as response:
                push.status = response.status
                push.response_body = await response.read()
            if not push.delivered:
                log.warning("push %s answered %s", event.get("id"), push.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            push.error = f"{type(exc).__name__}: {exc}"
            log.warning("push %s to %s failed: %s", event.get("id"), self.webhook_url, push.error)
        finally:
            self.pushes.append(push)
        return push

    async def wait_pushes_idle(self) -> None:
        """Wait until every push scheduled so far has been delivered or has failed."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

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
        """Back to the initial state: data (re-seeded if seeded), log, pushes, faults."""
        self._tenants.clear()
        self._idempotency.clear()
        self._outbox.clear()
        self.requests.clear()
        self.pushes.clear()
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
        before the handler; holds apply after it.
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

        The handler has already run when a request is held: its answer reflects the
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

    # ------------------------------------------------------------------ seed

    def seed_demo(self, tenant: str | None = None) -> None:
        """The demo dataset: account ``acme`` and one customer per interesting status."""
        tenant = tenant or self.default_tenant
        state = self._tenant(tenant)
        now = self._now()
        acme = _Account(
            account_id="acme",
            name="Acme Inc.",
            email="billing@acme.example",
            stripe_customer_id="cus_stripe_acme",
            status="active",
            created_at=now,
        )
        acme.methods["pm_acme_visa"] = _card("pm_acme_visa", "visa", "4242")
        acme.methods["pm_acme_mastercard"] = _card("pm_acme_mastercard", "mastercard", "4444")
        acme.default_method = "pm_acme_visa"
        state.accounts["acme"] = acme
        rows: list[tuple[str, str, str, list[str], Json, int]] = [
            ("cus_active", "active", "team", ["reports", "exports"], {"seats": 5}, 5),
            ("cus_trial", "trialing", "starter", ["reports"], {}, 1),
            ("cus_pastdue", "past_due", "starter", ["reports"], {}, 1),
            ("cus_canceled", "canceled", "starter", [], {}, 1),
        ]
        for customer_id, status, plan, modules, config, seats in rows:
            customer = _Customer(customer_id, "acme", f"{customer_id}@acme.example", status, now)
            customer.subscription = {
                "id": f"sub_{customer_id.removeprefix('cus_')}",
                "accountId": "acme",
                "customerId": customer_id,
                "planId": plan,
                "planVersion": 1,
                "seats": seats,
                "status": status,
                "paymentMethodId": "pm_acme_visa",
                "cancelAtPeriodEnd": False,
                "createdAt": now,
            }
            acme.customers[customer_id] = customer
            state.customers[customer_id] = customer
            state.entitlements[customer_id] = {
                "customerId": customer_id,
                "accountId": "acme",
                "status": status,
                "modules": modules,
                "config": config,
                "updatedAt": now,
            }
        acme.invoices += [
            _invoice("in_acme_0001", "acme", "cus_active", "sub_active", 5 * 2900, "paid", now),
            _invoice("in_acme_0002", "acme", "cus_pastdue", "sub_pastdue", 1900, "open", now),
        ]

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

    def _event(
        self,
        tenant: str,
        customer_id: str | None,
        account_id: str | None,
        event_type: str = "entitlements.updated",
    ) -> Json:
        event: Json = {"id": f"evt_{uuid.uuid4().hex}", "type": event_type, "tenantId": tenant}
        if customer_id is not None:
            event["customerId"] = customer_id
        if account_id is not None:
            event["accountId"] = account_id
        event["createdAt"] = self._now()
        return event

    def _emit(self, tenant: str, customer_id: str | None, account_id: str | None) -> None:
        self._outbox.append(self._event(tenant, customer_id, account_id))

    def _dispatch(self) -> list[asyncio.Task[Push]]:
        """Start delivering the outbox; the caller may await the returned tasks.

        Mutations are synchronous and append to the outbox, so a handler that calls
        one and then dispatches gets exactly its own events: nothing else runs between.
        """
        events, self._outbox = self._outbox, []
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.pushes += [
                Push(e, self.webhook_url, error="no running event loop") for e in events
            ]
            return []
        tasks = [loop.create_task(self.deliver(event)) for event in events]
        for task in tasks:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return tasks

    async def _flush(self) -> bool:
        """Deliver the outbox and wait; True when there was something and all arrived."""
        pushes = await asyncio.gather(*self._dispatch())
        return bool(pushes) and all(p.delivered for p in pushes)

    def _put_entitlements(self, tenant: str, customer_id: str, doc: Mapping[str, Any]) -> Json:
        _check_entitlements(doc)
        state = self._tenant(tenant)
        stored: Json = {"customerId": customer_id, "status": "active", "modules": [], "config": {}}
        stored |= copy.deepcopy(dict(doc))
        stored["customerId"] = customer_id
        known = state.customers.get(customer_id)
        if "accountId" not in stored and known is not None:
            stored["accountId"] = known.account_id
        stored["updatedAt"] = self._now()
        state.entitlements[customer_id] = stored
        self._emit(tenant, customer_id, _str_or_none(stored.get("accountId")))
        return copy.deepcopy(stored)

    def _drop_entitlements(self, tenant: str, customer_id: str) -> bool:
        doc = self._tenant(tenant).entitlements.pop(customer_id, None)
        if doc is None:
            return False
        self._emit(tenant, customer_id, _str_or_none(doc.get("accountId")))
        return True

    def _update_entitlements(self, tenant: str, customer: _Customer, **changes: Any) -> None:
        state = self._tenant(tenant)
        doc = state.entitlements.get(customer.customer_id)
        if doc is None:
            doc = {"customerId": customer.customer_id, "accountId": customer.account_id}
            doc |= {"status": customer.status, "modules": [], "config": {}}
        doc |= changes
        doc["updatedAt"] = self._now()
        state.entitlements[customer.customer_id] = doc
        self._emit(tenant, customer.customer_id, customer.account_id)

    # Upstream operations, called by the route handlers below.

    def _checkout(self, tenant: str, account_id: str, body: Json) -> Json:
        account = self._account(self._tenant(tenant), account_id)
        customer_id = _req_str(body, "customerId")
        self._customer(account, customer_id)
        session: Json = {
            "id": _new_id("cs"),
            "mode": "subscription",
            "accountId": account_id,
            "customerId": customer_id,
            "planId": _req_str(body, "planId"),
            "planVersion": _plan_version(body),
            "seats": _seats(body),
            "successUrl": _req_str(body, "successUrl"),
            "cancelUrl": _req_str(body, "cancelUrl"),
        }
        session["url"] = f"https://checkout.example/{session['id']}"
        self._tenant(tenant).checkouts[session["id"]] = session
        return session

    def _setup_checkout(self, tenant: str, account_id: str, body: Json) -> Json:
        self._account(self._tenant(tenant), account_id)
        session: Json = {
            "id": _new_id("cs"),
            "mode": "setup",
            "accountId": account_id,
            "successUrl": _req_str(body, "successUrl"),
            "cancelUrl": _req_str(body, "cancelUrl"),
        }
        session["url"] = f"https://checkout.example/{session['id']}"
        self._tenant(tenant).checkouts[session["id"]] = session
        return session

    def _subscribe(self, tenant: str, account_id: str, customer_id: str, body: Json) -> Json:
        account = self._account(self._tenant(tenant), account_id)
        customer = self._customer(account, customer_id)
        plan_id = _req_str(body, "planId")
        plan_version = _plan_version(body)
        seats = _seats(body)
        current = customer.subscription
        if current is not None and current["status"] != "canceled":
            raise EmulatorError(
                409, "subscription_exists", f"customer {customer_id!r} is already subscribed"
            )
        now = self._now()
        subscription: Json = {
            "id": _new_id("sub"),
            "accountId": account_id,
            "customerId": customer_id,
            "planId": plan_id,
            "planVersion": plan_version,
            "seats": seats,
            "status": "active",
            "paymentMethodId": account.default_method,
            "cancelAtPeriodEnd": False,
            "createdAt": now,
        }
        customer.subscription = subscription
        customer.status = "active"
        price = _PLAN_PRICES.get(plan_id, _DEFAULT_PRICE) * seats
        account.invoices.append(
            _invoice(_new_id("in"), account_id, customer_id, subscription["id"], price, "paid", now)
        )
        config = dict(self._tenant(tenant).entitlements.get(customer_id, {}).get("config", {}))
        config["seats"] = seats
        self._update_entitlements(
            tenant, customer, status="active", modules=plan_modules(plan_id), config=config
        )
        return dict(subscription)

    def _subscription(self, tenant: str, account_id: str, customer_id: str) -> Json:
        customer = self._customer(self._account(self._tenant(tenant), account_id), customer_id)
        if customer.subscription is None:
            raise EmulatorError(
                404, "subscription_not_found", f"customer {customer_id!r} has no subscription"
            )
        return customer.subscription

    def _cancel(self, tenant: str, account_id: str, customer_id: str, at_period_end: bool) -> Json:
        subscription = self._subscription(tenant, account_id, customer_id)
        if subscription["status"] == "canceled":
            raise EmulatorError(409, "subscription_canceled", "the subscription is canceled")
        if at_period_end:
            # Nothing changes until the period ends, so there is nothing to push.
            subscription["cancelAtPeriodEnd"] = True
            return dict(subscription)
        subscription["status"] = "canceled"
        subscription["canceledAt"] = self._now()
        customer = self._tenant(tenant).accounts[account_id].customers[customer_id]
        customer.status = "canceled"
        self._update_entitlements(tenant, customer, status="canceled", modules=[])
        return dict(subscription)

    def _set_account_status(self, tenant: str, account_id: str, status: str) -> Json:
        state = self._tenant(tenant)
        account = self._account(state, account_id)
        account.status = status
        now = self._now()
        for customer_id in account.customers:
            doc = state.entitlements.get(customer_id)
            if doc is not None:
                doc["accountStatus"] = status
                doc["updatedAt"] = now
        # One account-wide event without customerId: receivers fan it out themselves.
        self._emit(tenant, None, account_id)
        return account.to_json()

    def _set_customer_status(
        self, tenant: str, account_id: str, customer_id: str, status: str
    ) -> Json:
        customer = self._customer(self._account(self._tenant(tenant), account_id), customer_id)
        customer.status = status
        self._update_entitlements(tenant, customer, status=status)
        return customer.to_json()

    def _set_default_method(self, tenant: str, account_id: str, method_id: str) -> Json:
        account = self._account(self._tenant(tenant), account_id)
        _method(account, method_id)
        account.default_method = method_id
        return account.method_json(method_id)

    def _remove_method(self, tenant: str, account_id: str, method_id: str) -> None:
        account = self._account(self._tenant(tenant), account_id)
        _method(account, method_id)
        for customer in account.customers.values():
            sub = customer.subscription
            if (
                sub is not None
                and sub["status"] != "canceled"
                and sub["paymentMethodId"] == method_id
            ):
                raise EmulatorError(
                    409, "payment_method_in_use", f"{method_id!r} pays subscription {sub['id']!r}"
                )
        del account.methods[method_id]
        if account.default_method == method_id:
            account.default_method = next(iter(account.methods), None)

    def _set_subscription_method(
        self, tenant: str, account_id: str, customer_id: str, method_id: str
    ) -> Json:
        subscription = self._subscription(tenant, account_id, customer_id)
        _method(self._tenant(tenant).accounts[account_id], method_id)
        subscription["paymentMethodId"] = method_id
        return dict(subscription)

    def _invoice(self, tenant: str, account_id: str, invoice_id: str) -> Json:
        account = self._account(self._tenant(tenant), account_id)
        for invoice in account.invoices:
            if invoice["id"] == invoice_id:
                return invoice
        raise EmulatorError(404, "invoice_not_found", f"no invoice {invoice_id!r}")

    # ------------------------------------------------------------------ middleware helpers

    async def _record(self, request: web.Request, operation: str) -> RecordedRequest:
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
        )
        self.requests.append(record)
        if too_large is not None:
            raise too_large
        return record

    async def _apply_holds(self, operation: str) -> None:
        for hold in list(self._holds):
            if hold.released:
                self._holds.remove(hold)
            elif _matches(hold.operation, operation):
                await hold._hold()

    async def _apply_faults(self, operation: str) -> web.Response | None:
        for delay in list(self._delays):
            if _matches(delay.operation, operation):
                delay.remaining = _consume(delay.remaining)
                if delay.remaining == 0:
                    self._delays.remove(delay)
                await asyncio.sleep(delay.seconds)
        for failure in self._failures:
            if _matches(failure.operation, operation):
                failure.remaining = _consume(failure.remaining)
                if failure.remaining == 0:
                    self._failures.remove(failure)
                code = _ERROR_CODES.get(failure.status, "injected_fault")
                message = f"injected {failure.status} for {operation}"
                return _error_response(failure.status, code, message, failure.headers)
        return None


EMULATOR: Final = web.AppKey("emulator", Emulator)


def _check_operation(operation: str | None) -> None:
    if operation is not None and operation not in OPERATIONS:
        raise ValueError(f"unknown operation {operation!r}")


def _card(method_id: str, brand: str, last4: str) -> Json:
    return {
        "id": method_id,
        "type": "card",
        "brand": brand,
        "last4": last4,
        "expMonth": 12,
        "expYear": 2030,
    }


def _invoice(
    invoice_id: str,
    account_id: str,
    customer_id: str,
    subscription_id: str,
    amount: int,
    status: str,
    created_at: int,
) -> Json:
    return {
        "id": invoice_id,
        "accountId": account_id,
        "customerId": customer_id,
        "subscriptionId": subscription_id,
        "amountDue": amount,
        "currency": "usd",
        "status": status,
        "createdAt": created_at,
    }


def _method(account: _Account, method_id: str) -> Json:
    method = account.methods.get(method_id)
    if method is None:
        raise EmulatorError(404, "payment_method_not_found", f"no payment method {method_id!r}")
    return method


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


# --------------------------------------------------------------------------- validation


def _bad(code: str, message: str) -> NoReturn:
    raise EmulatorError(400, code, message)


def _req_str(body: Mapping[str, Any], name: str) -> str:
    value = body.get(name)
    if value is None:
        _bad("missing_field", f"{name} is required")
    if not isinstance(value, str) or not value:
        _bad("invalid_field", f"{name} must be a non-empty string")
    return value


def _opt_str(body: Mapping[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        _bad("invalid_field", f"{name} must be a string")
    return value


def _opt_bool(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        _bad("invalid_field", f"{name} must be a boolean")
    return value


def _seats(body: Mapping[str, Any]) -> int:
    seats = body.get("seats", 1)
    if isinstance(seats, bool) or not isinstance(seats, int) or seats < 1:
        _bad("invalid_field", "seats must be a positive integer")
    return seats


def _plan_version(body: Mapping[str, Any]) -> int | str:
    version = body.get("planVersion")
    if version is None:
        _bad("missing_field", "planVersion is required")
    valid_int = isinstance(version, int) and not isinstance(version, bool) and version >= 1
    if not valid_int and not (isinstance(version, str) and version):
        _bad("invalid_field", "planVersion must be a positive integer or a non-empty string")
    return version  # type: ignore[no-any-return]


def _status(body: Mapping[str, Any], allowed: frozenset[str]) -> str:
    status = _req_str(body, "status")
    if status not in allowed:
        _bad("invalid_status", f"status must be one of {', '.join(sorted(allowed))}")
    return status


def _check_entitlements(doc: Mapping[str, Any]) -> None:
    if "status" in doc and not isinstance(doc["status"], str):
        _bad("invalid_field", "status must be a string")
    modules = doc.get("modules", [])
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        _bad("invalid_field", "modules must be a list of strings")
    if not isinstance(doc.get("config", {}), dict):
        _bad("invalid_field", "config must be an object")
    if "accountId" in doc and not isinstance(doc["accountId"], str):
        _bad("invalid_field", "accountId must be a string")


async def _json_object(request: web.Request) -> Json:
    raw = await request.read()
    if not raw.strip():
        _bad("invalid_body", "a JSON object body is required")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        _bad("invalid_json", "the body is not valid JSON")
    if not isinstance(body, dict):
        _bad("invalid_body", "the body must be a JSON object")
    return body


def _bool_query(request: web.Request, name: str) -> bool:
    value = request.query.get(name, "false").lower()
    if value in ("true", "1"):
        return True
    if value in ("false", "0", ""):
        return False
    _bad("invalid_query", f"{name} must be true or false")


# --------------------------------------------------------------------------- upstream handlers

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _em(request: web.Request) -> Emulator:
    return request.app[EMULATOR]


def _path(request: web.Request, name: str) -> str:
    return request.match_info[name]


async def _get_entitlements(request: web.Request) -> web.Response:
    tenant, customer_id = _path(request, "tenant"), _path(request, "customer")
    doc = _em(request).get_entitlements(tenant, customer_id)
    if doc is None:
        raise EmulatorError(
            404, "entitlements_not_found", f"customer {customer_id!r} has no entitlements"
        )
    return _json(doc)


async def _create_checkout(request: web.Request) -> web.Response:
    body = await _json_object(request)
    session = _em(request)._checkout(_path(request, "tenant"), _path(request, "account"), body)
    return _json(session, status=201)


async def _create_setup_checkout(request: web.Request) -> web.Response:
    body = await _json_object(request)
    em = _em(request)
    session = em._setup_checkout(_path(request, "tenant"), _path(request, "account"), body)
    return _json(session, status=201)


async def _create_subscription(request: web.Request) -> web.Response:
    body = await _json_object(request)
    em = _em(request)
    subscription = em._subscribe(
        _path(request, "tenant"), _path(request, "account"), _path(request, "customer"), body
    )
    await em._flush()
    return _json(subscription, status=201)


async def _cancel_subscription(request: web.Request) -> web.Response:
    at_period_end = _bool_query(request, "atPeriodEnd")
    em = _em(request)
    subscription = em._cancel(
        _path(request, "tenant"),
        _path(request, "account"),
        _path(request, "customer"),
        at_period_end,
    )
    await em._flush()
    return _json(subscription)


async def _get_subscription(request: web.Request) -> web.Response:
    subscription = _em(request)._subscription(
        _path(request, "tenant"), _path(request, "account"), _path(request, "customer")
    )
    return _json(subscription)


async def _create_account(request: web.Request) -> web.Response:
    body = await _json_object(request)
    account = _em(request).create_account(
        _path(request, "tenant"),
        _req_str(body, "accountId"),
        name=_opt_str(body, "name"),
        email=_opt_str(body, "email"),
        stripe_customer_id=_opt_str(body, "stripeCustomerId"),
        create_stripe_customer=_opt_bool(body, "createStripeCustomer"),
    )
    return _json(account, status=201)


async def _create_customer(request: web.Request) -> web.Response:
    body = await _json_object(request)
    customer = _em(request).create_customer(
        _path(request, "tenant"),
        _path(request, "account"),
        _req_str(body, "customerId"),
        email=_opt_str(body, "email"),
    )
    return _json(customer, status=201)


async def _set_account_status(request: web.Request) -> web.Response:
    status = _status(await _json_object(request), ACCOUNT_STATUSES)
    em = _em(request)
    account = em._set_account_status(_path(request, "tenant"), _path(request, "account"), status)
    await em._flush()
    return _json(account)


async def _set_customer_status(request: web.Request) -> web.Response:
    status = _status(await _json_object(request), CUSTOMER_STATUSES)
    em = _em(request)
    customer = em._set_customer_status(
        _path(request, "tenant"), _path(request, "account"), _path(request, "customer"), status
    )
    await em._flush()
    return _json(customer)


async def _list_payment_methods(request: web.Request) -> web.Response:
    em = _em(request)
    account = em._account(em._tenant(_path(request, "tenant")), _path(request, "account"))
    return _json({"methods": [account.method_json(m) for m in account.methods]})


async def _set_default_payment_method(request: web.Request) -> web.Response:
    method = _em(request)._set_default_method(
        _path(request, "tenant"), _path(request, "account"), _path(request, "method")
    )
    return _json(method)


async def _remove_payment_method(request: web.Request) -> web.Response:
    _em(request)._remove_method(
        _path(request, "tenant"), _path(request, "account"), _path(request, "method")
    )
    return web.Response(status=204)


async def _set_subscription_payment_method(request: web.Request) -> web.Response:
    method_id = _req_str(await _json_object(request), "methodId")
    subscription = _em(request)._set_subscription_method(
        _path(request, "tenant"), _path(request, "account"), _path(request, "customer"), method_id
    )
    return _json(subscription)


async def _list_invoices(request: web.Request) -> web.Response:
    em = _em(request)
    account = em._account(em._tenant(_path(request, "tenant")), _path(request, "account"))
    customer_id = request.query.get("customerId")
    invoices = [
        i for i in account.invoices if customer_id is None or i["customerId"] == customer_id
    ]
    return _json({"invoices": invoices})


async def _invoice_pdf(request: web.Request) -> web.Response:
    invoice = _em(request)._invoice(
        _path(request, "tenant"), _path(request, "account"), _path(request, "invoice")
    )
    url = f"https://invoices.example/{quote(invoice['id'], safe='')}.pdf"
    return _json({"url": url}, status=302, headers={"Location": url})


# (operation, method, path) — the interface's table, in its order.
_UPSTREAM_ROUTES: Final[Sequence[tuple[str, str, str, Handler]]] = [
    ("get_entitlements", "GET", "/customers/{customer}/entitlements", _get_entitlements),
    ("create_checkout", "POST", "/accounts/{account}/checkout", _create_checkout),
    (
        "create_setup_checkout",
        "POST",
        "/accounts/{account}/billing/setup-checkout",
        _create_setup_checkout,
    ),
    (
        "create_subscription",
        "POST",
        "/accounts/{account}/customers/{customer}/subscribe",
        _create_subscription,
    ),
    (
        "cancel_subscription",
        "DELETE",
        "/accounts/{account}/customers/{customer}/subscription",
        _cancel_subscription,
    ),
    (
        "get_subscription",
        "GET",
        "/accounts/{account}/customers/{customer}/subscription",
        _get_subscription,
    ),
    ("create_account", "POST", "/accounts", _create_account),
    ("create_customer", "POST", "/accounts/{account}/customers", _create_customer),
    ("set_account_status", "PATCH", "/accounts/{account}", _set_account_status),
    (
        "set_customer_status",
        "PATCH",
        "/accounts/{account}/customers/{customer}",
        _set_customer_status,
    ),
    (
        "list_payment_methods",
        "GET",
        "/accounts/{account}/payment-methods",
        _list_payment_methods,
    ),
    (
        "set_default_payment_method",
        "PATCH",
        "/accounts/{account}/payment-methods/{method}",
        _set_default_payment_method,
    ),
    (
        "remove_payment_method",
        "DELETE",
        "/accounts/{account}/payment-methods/{method}",
        _remove_payment_method,
    ),
    (
        "set_subscription_payment_method",
        "PATCH",
        "/accounts/{account}/customers/{customer}/payment-method",
        _set_subscription_payment_method,
    ),
    ("list_invoices", "GET", "/accounts/{account}/invoices", _list_invoices),
    ("invoice_pdf", "GET", "/accounts/{account}/invoices/{invoice}/pdf", _invoice_pdf),
]


_PARAM = re.compile(r"\{([a-z]+)\}")


def _route(template: str) -> str:
    """Let ``{name}`` match any segment.

    aiohttp matches against the path with everything but ``%2F`` and ``%25``
    decoded, and its default ``[^{}/]+`` would refuse ids containing braces.
    ``[^/]+`` takes any id; match_info then holds it fully decoded.
    """
    return _PARAM.sub(r"{\1:[^/]+}", template)


# --------------------------------------------------------------------------- admin handlers


def _admin_tenant(request: web.Request) -> str:
    return request.match_info.get("tenant") or _em(request).default_tenant


async def _admin_healthz(request: web.Request) -> web.Response:
    return _json({"ok": True})


async def _admin_get_entitlements(request: web.Request) -> web.Response:
    customer_id = _path(request, "customer")
    doc = _em(request).get_entitlements(_admin_tenant(request), customer_id)
    if doc is None:
        raise EmulatorError(
            404, "entitlements_not_found", f"customer {customer_id!r} has no entitlements"
        )
    return _json(doc)


async def _admin_put_entitlements(request: web.Request) -> web.Response:
    body = await _json_object(request)
    em = _em(request)
    doc = em._put_entitlements(_admin_tenant(request), _path(request, "customer"), body)
    pushed = await em._flush()
    return _json({"entitlements": doc, "pushed": pushed})


async def _admin_delete_entitlements(request: web.Request) -> web.Response:
    em = _em(request)
    deleted = em._drop_entitlements(_admin_tenant(request), _path(request, "customer"))
    pushed = await em._flush()
    return _json({"deleted": deleted, "pushed": pushed})


async def _admin_push(request: web.Request) -> web.Response:
    raw = await request.read()
    body = await _json_object(request) if raw.strip() else {}
    push = await _em(request).push_event(
        _admin_tenant(request),
        customer_id=_opt_str(body, "customerId"),
        account_id=_opt_str(body, "accountId"),
        event_type=_opt_str(body, "type") or "entitlements.updated",
    )
    return _json({"event": push.event, "pushed": push.delivered, "status": push.status})


async def _admin_requests(request: web.Request) -> web.Response:
    operation = request.query.get("operation")
    tenant = request.query.get("tenant")
    records = [
        r.to_json()
        for r in _em(request).requests
        if (operation is None or r.operation == operation)
        and (tenant is None or r.tenant == tenant)
    ]
    return _json({"requests": records})


async def _admin_clear_requests(request: web.Request) -> web.Response:
    _em(request).clear_requests()
    return web.Response(status=204)


async def _admin_pushes(request: web.Request) -> web.Response:
    return _json({"pushes": [p.to_json() for p in _em(request).pushes]})


async def _admin_reset(request: web.Request) -> web.Response:
    _em(request).reset()
    return web.Response(status=204)


async def _admin_get_faults(request: web.Request) -> web.Response:
    return _json({"faults": _em(request).faults()})


async def _admin_add_fault(request: web.Request) -> web.Response:
    body = await _json_object(request)
    operation = _opt_str(body, "operation")
    if operation is not None and operation not in OPERATIONS:
        _bad("invalid_field", f"unknown operation {operation!r}")
    times = body.get("times")
    if times is not None and (isinstance(times, bool) or not isinstance(times, int) or times < 1):
        _bad("invalid_field", "times must be a positive integer or null")
    status, seconds = body.get("status"), body.get("delay")
    if status is None and seconds is None:
        _bad("missing_field", "status or delay is required")
    if status is not None and (
        isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599
    ):
        _bad("invalid_field", "status must be an HTTP error status (400-599)")
    if seconds is not None and (
        isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0
    ):
        _bad("invalid_field", "delay must be a non-negative number of seconds")
    em = _em(request)
    if seconds is not None:
        em.delay(operation, float(seconds), times)
    if status is not None:
        em.fail(operation, status, times)
    return _json({"faults": em.faults()}, status=201)


async def _admin_clear_faults(request: web.Request) -> web.Response:
    _em(request).clear_faults()
    return web.Response(status=204)


_ADMIN_ROUTES: Final[Sequence[tuple[str, str, Handler]]] = [
    ("GET", "/_emulator/healthz", _admin_healthz),
    ("GET", "/_emulator/requests", _admin_requests),
    ("DELETE", "/_emulator/requests", _admin_clear_requests),
    ("GET", "/_emulator/pushes", _admin_pushes),
    ("POST", "/_emulator/reset", _admin_reset),
    ("GET", "/_emulator/faults", _admin_get_faults),
    ("POST", "/_emulator/faults", _admin_add_fault),
    ("DELETE", "/_emulator/faults", _admin_clear_faults),
    *(
        (method, f"{prefix}/customers/{{customer}}/entitlements", handler)
        for prefix in ("/_emulator/tenants/{tenant}", "/_emulator")
        for method, handler in (
            ("GET", _admin_get_entitlements),
            ("PUT", _admin_put_entitlements),
            ("DELETE", _admin_delete_entitlements),
        )
    ),
    ("POST", "/_emulator/tenants/{tenant}/push", _admin_push),
    ("POST", "/_emulator/push", _admin_push),
]


# --------------------------------------------------------------------------- app


async def _as_response(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except EmulatorError as exc:
        return _error_response(exc.status, exc.code, exc.message)
    except web.HTTPException as exc:  # the router's 404 and 405
        code = _ERROR_CODES.get(exc.status, "http_error")
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        message = f"{exc.reason}: {request.method} {request.raw_path.partition('?')[0]}"
        return _error_response(exc.status, code, message, headers)


@web.middleware
async def _middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Upstream requests: log, authenticate, delay/fail, replay or run, then hold."""
    if request.raw_path.startswith("/_emulator/"):
        return await _as_response(request, handler)

    em = request.app[EMULATOR]
    name = request.match_info.route.name
    operation = name if name in OPERATIONS else "unknown"
    try:
        record = await em._record(request, operation)
    except web.HTTPRequestEntityTooLarge as exc:
        return _error_response(413, "payload_too_large", exc.text or "request body too large")
    if record.api_key is None or record.api_key not in em.api_keys:
        return _error_response(401, "unauthorized", "missing or invalid x-api-key")
    if (injected := await em._apply_faults(operation)) is not None:
        return injected

    key = None
    if record.idempotency_key is not None and request.method not in ("GET", "HEAD"):
        key = (operation, record.path, record.idempotency_key)
        raw = await request.read()
        stored = em._idempotency.get(key)
        if stored is not None:
            if stored.request_body != raw:
                return _error_response(
                    422, "idempotency_key_reused", "the key was used with another body"
                )
            headers = {**stored.headers, "Idempotent-Replayed": "true"}
            return web.Response(body=stored.body, status=stored.status, headers=headers)

    response = await _as_response(request, handler)
    if key is not None and response.status < 500 and isinstance(response, web.Response):
        body = response.body if isinstance(response.body, bytes) else b""
        kept = {k: v for k, v in response.headers.items() if k in ("Content-Type", "Location")}
        em._idempotency[key] = _Stored(await request.read(), response.status, body, kept)
    await em._apply_holds(operation)
    return response


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
    ``webhook_secret`` (unsigned when None), and each waits ``push_timeout`` at most.
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
    for operation, method, path, handler in _UPSTREAM_ROUTES:
        app.router.add_route(method, _route(f"/tenants/{{tenant}}{path}"), handler, name=operation)
    for method, path, handler in _ADMIN_ROUTES:
        app.router.add_route(method, _route(path), handler)
    app.cleanup_ctx.append(_push_session)
    app.on_shutdown.append(_release_holds)
    return app
