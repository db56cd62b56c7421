"""The emulated service's billing rules: accounts, plans, subscriptions, invoices, checkouts.

Functions over a :class:`~.ledger.Ledger`, shared by the upstream operations
(``operations.py``) and the emulator's Python and admin API (``state.py``):

- ``planVersion`` and ``productId`` are optional (the newest version priced in
  the key's mode; the product resolved from the plan, 400 when ambiguous);
- one live (not ended) subscription per customer and mode: 409 on a second;
- a price increase is invoiced at once (a proration), a trial's first invoice is
  a paid zero-amount one, a renewal bills the next period or ends a pending cancel;
- a completed hosted checkout applies what it sold (a subscription, a card, credits).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from .bodies import bad_request, optional_int, optional_str, str_list
from .catalog import CURRENCY, PRODUCTS, PlanVersion, Product
from .ledger import Ledger
from .model import (
    DAY,
    PERIOD,
    Account,
    Choice,
    Customer,
    Invoice,
    PaymentMethod,
    Subscription,
    check_add_ons,
    iso,
    make_ref,
    new_id,
)
from .wire import Call, EmulatorError, Json

__all__ = [
    "bill",
    "change",
    "charge",
    "choose",
    "complete_checkout",
    "create_account",
    "create_customer",
    "invoice",
    "new_session",
    "number_prefix",
    "pause",
    "public",
    "renew",
    "resume",
    "subscribe",
]


def create_account(
    ledger: Ledger,
    tenant: str,
    account_id: str,
    name: str | None = None,
    email: str | None = None,
    billing_customer_id: str | None = None,
    create_billing_customer: bool = False,
) -> tuple[Json, bool]:
    """Create an account (two test cards on file), or answer the existing one; and
    whether it was created. An existing account adopts ``billing_customer_id`` when
    it has none; a different one is a 409 and nothing changes."""
    state = ledger.tenant(tenant)
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
                existing.billing_customer_id = new_id("cus")
        return existing.view(), False
    if billing_customer_id is None and create_billing_customer:
        billing_customer_id = new_id("cus")
    account = Account(account_id, name, email, billing_customer_id, "active", ledger.now())
    for brand, last4 in (("visa", "4242"), ("mastercard", "4444")):
        provider_id = new_id("pm")
        ref = make_ref("pmr", tenant, account_id, provider_id)
        account.methods[ref] = PaymentMethod(ref, provider_id, brand, last4, name or account_id)
    account.default_method = next(iter(account.methods))
    state.accounts[account_id] = account
    return account.view(), True


def create_customer(
    ledger: Ledger,
    tenant: str,
    account_id: str,
    customer_id: str,
    name: str | None = None,
    email: str | None = None,
) -> Json:
    """Create a customer under an account; it has no entitlements until subscribed."""
    state = ledger.tenant(tenant)
    account = state.account(account_id)
    if customer_id in state.customers:
        raise EmulatorError(409, "customer_exists", f"customer {customer_id!r} exists")
    customer = Customer(customer_id, account_id, name, email, "active", ledger.now())
    account.customers[customer_id] = customer
    state.customers[customer_id] = customer
    return customer.view()


def choose(body: Mapping[str, Any], mode: str, current: Subscription | None = None) -> Choice:
    """Resolve a body's product, plan, version, seats and add-ons.

    With ``current`` (a change to a subscription), every field may be omitted and
    keeps its current value; ``planVersion`` omitted with a new ``planId`` sells
    the newest version, as on a new subscription.
    """
    product_id = optional_str(body, "productId")
    plan_id = optional_str(body, "planId")
    if plan_id is None and current is None:
        bad_request("missing_field", "planId is required")
    version_no = optional_int(body, "planVersion")
    if plan_id is None:
        assert current is not None
        if product_id not in (None, current.product.product_id):
            bad_request("missing_field", "planId is required with a productId")
        product, plan_id = current.product, current.plan_id
        if version_no is None:
            version_no = current.version.version
    else:
        product = _product_for(plan_id, product_id)
    version = _version(product, plan_id, version_no, mode)
    seats = optional_int(body, "seats")
    if seats is None:
        seats = current.seats if current is not None else 1
    add_ons = str_list(body, "addOnModuleIds")
    if add_ons is None:
        add_ons = (
            [m for m in current.add_ons if m in product.add_ons and m not in version.modules]
            if current is not None
            else []
        )
    check_add_ons(product, version, add_ons)
    return Choice(product, plan_id, version, seats, add_ons)


def _version(product: Product, plan_id: str, version_no: int | None, mode: str) -> PlanVersion:
    """The plan version sold: the one named (priced in ``mode``), else the newest so priced."""
    if version_no is None:
        newest = product.newest_sold(plan_id, mode)
        if newest is None:
            raise EmulatorError(
                404, "plan_version_not_found", f"no version of {plan_id!r} is sold in {mode} mode"
            )
        return newest
    version = product.plans[plan_id].get(version_no)
    if version is None:
        raise EmulatorError(
            404, "plan_version_not_found", f"plan {plan_id!r} has no version {version_no}"
        )
    if mode not in version.modes:
        bad_request(
            "plan_version_not_priced", f"{plan_id!r} v{version_no} has no {mode}-mode price"
        )
    return version


def _product_for(plan_id: str, product_id: str | None) -> Product:
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


def subscribe(
    ledger: Ledger, tenant: str, account: Account, customer: Customer, choice: Choice, mode: str
) -> Json:
    """Start a subscription (a trial when the version has one); the subscription view."""
    customer.refuse_second_subscription(mode)
    trial = choice.version.trial_days
    if trial == 0 and account.default_method is None:
        raise EmulatorError(
            402, "payment_method_required", "the account has no payment method on file"
        )
    now = ledger.now()
    sub = Subscription(
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
        now + (trial * DAY if trial else PERIOD),
        trial_end=now + trial * DAY if trial else None,
    )
    customer.subscriptions[mode] = sub
    # A trial's first invoice is a genuinely paid zero-amount invoice.
    charge(ledger, tenant, account, customer, sub, zero=bool(trial))
    ledger.write_subscription(tenant, customer, sub)
    return sub.view(account)


def invoice(
    ledger: Ledger,
    tenant: str,
    account: Account,
    customer_id: str,
    lines: list[tuple[str, int]],
    *,
    paid: bool,
) -> Invoice:
    provider_id = new_id("in")
    made = Invoice(
        make_ref("invr", tenant, account.account_id, provider_id),
        provider_id,
        f"{number_prefix(account.account_id)}-{len(account.invoices) + 1:04d}",
        customer_id,
        lines,
        "paid" if paid else "open",
        ledger.now(),
        uuid.uuid4().hex[:16],
    )
    account.invoices.append(made)
    return made


def bill(
    ledger: Ledger,
    tenant: str,
    account: Account,
    customer: Customer,
    sub: Subscription,
    *,
    paid: bool,
    zero: bool = False,
    amount: int | None = None,
    label: str | None = None,
) -> Invoice:
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
    return invoice(ledger, tenant, account, customer.customer_id, lines, paid=paid)


def charge(
    ledger: Ledger,
    tenant: str,
    account: Account,
    customer: Customer,
    sub: Subscription,
    *,
    zero: bool = False,
    amount: int | None = None,
    label: str | None = None,
) -> None:
    """A paid invoice for the subscription (:func:`bill`), pushed as ``payment.succeeded``."""
    paid = bill(
        ledger, tenant, account, customer, sub, paid=True, zero=zero, amount=amount, label=label
    )
    ledger.payment_event(tenant, account, customer, sub, paid)


def change(
    ledger: Ledger,
    tenant: str,
    account: Account,
    customer: Customer,
    sub: Subscription,
    choice: Choice,
    label: str,
) -> Json:
    """Apply a change: bill a higher price at once (proration), write the document."""
    before = sub.amount()
    sub.choose(choice)
    extra = sub.amount() - before
    if extra > 0 and sub.status != "trialing":
        charge(ledger, tenant, account, customer, sub, amount=extra, label=label)
    ledger.write_subscription(tenant, customer, sub)
    return sub.view(account)


def renew(
    ledger: Ledger,
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
    account = ledger.tenant(tenant).account(account_id)
    customer = account.customer(customer_id)
    sub = customer.live_subscription(mode)
    now = ledger.now()
    if sub.cancel_at_period_end:
        sub.status, sub.canceled_at, sub.cancel_at_period_end = "canceled", now, False
        ledger.write_subscription(tenant, customer, sub)
        return sub.view(account)
    if sub.status == "paused":
        # A paused period is not billed; the last of its cycles resumes it.
        sub.period_start, sub.period_end = now, now + PERIOD
        if sub.pause_cycles is not None:
            sub.pause_cycles -= 1
            if sub.pause_cycles == 0:
                resume(ledger, tenant, customer, sub)
        return sub.view(account)
    billed = bill(ledger, tenant, account, customer, sub, paid=succeeded)
    if succeeded:
        sub.status = "active"
        sub.trial_end = None
        sub.period_start, sub.period_end = now, now + PERIOD
    else:
        sub.status = "past_due"
    ledger.payment_event(tenant, account, customer, sub, billed, succeeded=succeeded)
    ledger.write_subscription(tenant, customer, sub)
    return sub.view(account)


def pause(
    ledger: Ledger, tenant: str, customer: Customer, sub: Subscription, cycles: int | None
) -> None:
    """Withhold access and stop billing, until :func:`resume` or ``cycles`` renewals."""
    if sub.status == "paused":
        raise EmulatorError(409, "subscription_paused", "the subscription is already paused")
    if sub.status == "trialing":
        raise EmulatorError(409, "subscription_trialing", "a trial cannot be paused")
    sub.status, sub.pause_cycles = "paused", cycles
    ledger.write_subscription(tenant, customer, sub)


def resume(ledger: Ledger, tenant: str, customer: Customer, sub: Subscription) -> None:
    """A paused subscription is active again (nothing billed before its next renewal)."""
    sub.status, sub.pause_cycles = "active", None
    ledger.write_subscription(tenant, customer, sub)


def new_session(
    ledger: Ledger, call: Call, mode: str, account_id: str, urls: Mapping[str, str]
) -> Json:
    """A hosted checkout session (``mode``: subscription, setup or payment), open."""
    session_id = f"cs_{call.mode}_{uuid.uuid4().hex[:24]}"
    return {
        "id": session_id,
        "url": f"https://checkout.example/{session_id}",
        "mode": mode,
        "status": "open",
        "accountId": account_id,
        **urls,
        "currency": CURRENCY,
        "expiresAt": iso(ledger.now() + DAY),
        "livemode": call.mode,
    }


def public(session: Mapping[str, Any]) -> Json:
    """A checkout session as the API answers it (without the emulator's bookkeeping)."""
    return {k: v for k, v in session.items() if k != "livemode"}


def complete_checkout(ledger: Ledger, tenant: str, session_id: str) -> Json:
    """The customer finished a hosted checkout: apply it as the real service would.

    ``subscription``: the subscription starts (409 if one went live meanwhile);
    ``setup``: a new card is added to the account; ``payment``: the credits are
    added and the purchase invoiced (``payment.succeeded``).
    """
    state = ledger.tenant(tenant)
    session = state.checkouts.get(session_id)
    if session is None:
        raise EmulatorError(404, "checkout_not_found", f"no checkout session {session_id!r}")
    if session["status"] != "open":
        raise EmulatorError(409, "checkout_completed", "the session is already complete")
    account = state.account(session["accountId"])
    result: Json
    if session["mode"] == "subscription":
        customer = account.customer(session["customerId"])
        body = {k: session[k] for k in ("productId", "planId", "planVersion", "seats")} | {
            "addOnModuleIds": session["addOnModuleIds"]
        }
        mode = session["livemode"]
        result = subscribe(ledger, tenant, account, customer, choose(body, mode), mode)
    elif session["mode"] == "setup":
        provider_id = new_id("pm")
        ref = make_ref("pmr", tenant, account.account_id, provider_id)
        account.methods[ref] = PaymentMethod(
            ref, provider_id, "amex", "0005", account.name or account.account_id
        )
        account.default_method = account.default_method or ref
        ledger.emit(tenant, "payment_method.attached", None, account.account_id)
        result = account.methods[ref].view(account.default_method)
    else:
        result = _buy_credits(ledger, tenant, account, session)
    session["status"] = "complete"
    return result


def _buy_credits(ledger: Ledger, tenant: str, account: Account, session: Json) -> Json:
    """A paid credit checkout: the balances grow, the purchase is invoiced and pushed."""
    state = ledger.tenant(tenant)
    customer = account.customer(session["customerId"])
    balances = state.balances.setdefault(customer.customer_id, {})
    lines = []
    for item in session["items"]:
        ct = item["creditTypeId"]
        balances[ct] = balances.get(ct, 0) + item["credits"]
        lines.append((f"{item['quantity']} x {item['packId']} ({ct})", item["amount"]))
    paid = invoice(ledger, tenant, account, customer.customer_id, lines, paid=True)
    live = customer.subscriptions.get(session["livemode"])
    seats = live.seats if live is not None and live.live else None
    ledger.emit(
        tenant,
        "payment.succeeded",
        customer.customer_id,
        account.account_id,
        seats=seats,
        invoice=paid.view(),
        credits=[
            {"creditTypeId": i["creditTypeId"], "credits": i["credits"]} for i in session["items"]
        ],
    )
    return {"credits": state.credit_list(customer.customer_id)}


def number_prefix(account_id: str) -> str:
    letters = "".join(c for c in account_id.upper() if c.isascii() and c.isalnum())[:6]
    return letters or "INV"
