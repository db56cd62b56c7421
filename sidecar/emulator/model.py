"""The emulated service's records: tenants, accounts, customers, subscriptions, invoices.

Plain dataclasses with their views (the JSON the API answers) and their lookups
(a missing record is the upstream's 404). Payment methods and invoices are
addressed by opaque, account-bound refs (:func:`make_ref`); the rules that change
these records live in ``billing.py`` and ``ledger.py``.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

from .bodies import bad_request
from .catalog import CREDIT_TYPES, CURRENCY, INTERVAL, CreditType, PlanVersion, Product
from .pdf import render_pdf
from .wire import EmulatorError, Json

__all__ = [
    "ACCESS_STATUSES",
    "ACCOUNT_STATUSES",
    "CUSTOMER_STATUSES",
    "DAY",
    "PERIOD",
    "Account",
    "Choice",
    "Customer",
    "Invoice",
    "PaymentMethod",
    "Subscription",
    "Tenant",
    "amount",
    "check_add_ons",
    "credit_type",
    "iso",
    "make_ref",
    "new_id",
]

ACCOUNT_STATUSES: Final[frozenset[str]] = frozenset({"active", "suspended", "closed"})
CUSTOMER_STATUSES: Final[frozenset[str]] = frozenset(
    {"active", "trialing", "past_due", "canceled", "paused", "suspended"}
)
#: Statuses that grant access (``hasAccess``), while the account is active too.
ACCESS_STATUSES: Final[frozenset[str]] = frozenset({"active", "trialing", "past_due"})

PERIOD: Final = 30 * 24 * 3600
DAY: Final = 24 * 3600


def iso(ts: int) -> str:
    """An ISO 8601 UTC timestamp, as the billing views carry them."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def make_ref(kind: str, tenant: str, account_id: str, provider_id: str) -> str:
    """An opaque handle bound to one account: the same object never has the same ref
    in two accounts, and the provider's id cannot be read back from it."""
    digest = hashlib.sha256(f"{kind}\0{tenant}\0{account_id}\0{provider_id}".encode())
    return f"{kind}_{digest.hexdigest()[:24]}"


@dataclass(slots=True)
class PaymentMethod:
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
class Invoice:
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

    def pdf(self, account: Account) -> bytes:
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
class Subscription:
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
    pause_cycles: int | None = None
    """While paused: the periods left before it resumes; None: until reactivated."""

    @property
    def live(self) -> bool:
        return self.status != "canceled"

    def modules(self) -> list[str]:
        return list(dict.fromkeys([*self.version.modules, *self.add_ons]))

    def amount(self) -> int:
        return amount(self.product, self.version, self.seats, self.add_ons)

    def choose(self, choice: Choice) -> None:
        """Take the product, plan, version, seats and add-ons of ``choice``."""
        self.product, self.plan_id, self.version = choice.product, choice.plan_id, choice.version
        self.seats, self.add_ons = choice.seats, choice.add_ons

    def view(self, account: Account) -> Json:
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
        if self.status == "paused" and self.pause_cycles is not None:
            view["resumesAfterCycles"] = self.pause_cycles
        method = self.method_ref or account.default_method
        if method is not None:
            view["defaultPaymentMethodRef"] = method
        return view


def amount(product: Product, version: PlanVersion, seats: int, add_ons: Iterable[str]) -> int:
    """What a plan version costs a period, with ``seats`` and ``add_ons``."""
    return version.price * seats + sum(product.add_ons[m] for m in add_ons)


@dataclass(slots=True)
class Customer:
    customer_id: str
    account_id: str
    name: str | None
    email: str | None
    status: str
    created: int
    subscriptions: dict[str, Subscription] = field(default_factory=dict)
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

    def subscription(self, mode: str) -> Subscription:
        """The latest subscription in ``mode`` (404 when there never was one)."""
        sub = self.subscriptions.get(mode)
        if sub is None:
            raise EmulatorError(
                404, "subscription_not_found", f"customer {self.customer_id!r} has no subscription"
            )
        return sub

    def live_subscription(self, mode: str) -> Subscription:
        """The subscription in ``mode``, which must not have ended (409)."""
        sub = self.subscription(mode)
        if not sub.live:
            raise EmulatorError(409, "subscription_canceled", "the subscription has ended")
        return sub

    def refuse_second_subscription(self, mode: str) -> None:
        """One live subscription per customer and mode: 409 on a second."""
        current = self.subscriptions.get(mode)
        if current is not None and current.live:
            raise EmulatorError(
                409,
                "subscription_exists",
                f"customer {self.customer_id!r} already has a {mode}-mode subscription;"
                " change that one instead",
            )


@dataclass(slots=True)
class Account:
    account_id: str
    name: str | None
    email: str | None
    billing_customer_id: str | None
    status: str
    created: int
    customers: dict[str, Customer] = field(default_factory=dict)
    methods: dict[str, PaymentMethod] = field(default_factory=dict)
    default_method: str | None = None
    invoices: list[Invoice] = field(default_factory=list)

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

    def customer(self, customer_id: str) -> Customer:
        customer = self.customers.get(customer_id)
        if customer is None:
            raise EmulatorError(
                404,
                "customer_not_found",
                f"no customer {customer_id!r} in account {self.account_id!r}",
            )
        return customer

    def method(self, ref: str) -> PaymentMethod:
        method = self.methods.get(ref)
        if method is None:
            raise EmulatorError(404, "payment_method_not_found", f"no payment method {ref!r}")
        return method

    def invoice(self, ref: str) -> Invoice:
        """The ownership check: only this account's refs, never a provider id."""
        invoice = next((i for i in self.invoices if i.ref == ref), None)
        if invoice is None:
            raise EmulatorError(404, "invoice_not_found", f"no invoice {ref!r}")
        return invoice


@dataclass(slots=True)
class Tenant:
    """One tenant's data; customer ids are unique per tenant (entitlements are
    addressed without the account)."""

    accounts: dict[str, Account] = field(default_factory=dict)
    customers: dict[str, Customer] = field(default_factory=dict)
    entitlements: dict[str, Json] = field(default_factory=dict)
    checkouts: dict[str, Json] = field(default_factory=dict)
    flags: dict[str, bool] = field(default_factory=dict)
    overrides: dict[str, dict[str, bool]] = field(default_factory=dict)
    balances: dict[str, dict[str, int]] = field(default_factory=dict)
    consumed: dict[tuple[str, str, str], tuple[int, Json]] = field(default_factory=dict)

    def account(self, account_id: str) -> Account:
        account = self.accounts.get(account_id)
        if account is None:
            raise EmulatorError(404, "account_not_found", f"no account {account_id!r}")
        return account

    def known_customer(self, customer_id: str) -> Customer:
        """A customer of any account of the tenant."""
        customer = self.customers.get(customer_id)
        if customer is None:
            raise EmulatorError(404, "customer_not_found", f"no customer {customer_id!r}")
        return customer

    def credit_list(self, customer_id: str) -> list[Json]:
        """Every credit type with the customer's balance (0 where it has none)."""
        balances = self.balances.get(customer_id, {})
        return [
            {**ct.to_json(), "balance": balances.get(ct_id, 0)}
            for ct_id, ct in CREDIT_TYPES.items()
        ]

    def balance(self, customer_id: str, credit_type: CreditType) -> Json:
        balance = self.balances.get(customer_id, {}).get(credit_type.credit_type_id, 0)
        return {
            "customerId": customer_id,
            "creditTypeId": credit_type.credit_type_id,
            "unit": credit_type.unit,
            "balance": balance,
        }


@dataclass(frozen=True, slots=True)
class Choice:
    """A resolved plan: what a checkout, a subscription or a change sells."""

    product: Product
    plan_id: str
    version: PlanVersion
    seats: int
    add_ons: list[str]

    def amount(self) -> int:
        return amount(self.product, self.version, self.seats, self.add_ons)


def credit_type(credit_type_id: str) -> CreditType:
    found = CREDIT_TYPES.get(credit_type_id)
    if found is None:
        raise EmulatorError(404, "credit_type_not_found", f"no credit type {credit_type_id!r}")
    return found


def check_add_ons(product: Product, version: PlanVersion, add_ons: Iterable[str]) -> None:
    for module in add_ons:
        if module not in product.add_ons:
            bad_request("unknown_add_on", f"{product.product_id!r} has no add-on {module!r}")
        if module in version.modules:
            raise EmulatorError(409, "add_on_included", f"the plan already includes {module!r}")
