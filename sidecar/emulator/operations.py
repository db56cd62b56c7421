"""The upstream's operations: each one's route and its handler, in one place.

The routes are the upstream's contract (the Vellum API as ``vellumcharter``
1.4.2 calls it, interface.md section 1), written here and not taken from the
sidecar's operation table: the emulator stands in for an external service, and
the tests compare the two. Each handler is registered with its method and path
(under ``/tenants/{t}``) by :func:`upstream`; its name is the operation's, named
after the SDK method that calls it (``add_add_on`` and ``remove_add_on`` share
``change_add_ons``). A handler takes the :class:`~.ledger.Ledger` and the
:class:`~.wire.Call` and returns an :class:`~.wire.Answer`, or raises
:class:`~.wire.EmulatorError` for the upstream's refusals.

A new upstream operation is one more handler here (and its test).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from . import billing
from .bodies import (
    bad_request,
    bool_query,
    json_object,
    optional_bool,
    optional_int,
    optional_str,
    positive_int,
    required_int,
    required_str,
    status_field,
    str_list,
)
from .catalog import CREDIT_TYPES, CURRENCY
from .ledger import Ledger
from .model import (
    ACCOUNT_STATUSES,
    CUSTOMER_STATUSES,
    PERIOD,
    Account,
    Customer,
    Tenant,
    credit_type,
)
from .wire import Answer, Call, EmulatorError, Json

__all__ = ["OPERATIONS", "ROUTES", "Route", "run"]

Handler = Callable[[Ledger, Call], Answer]

_MAX_IDEMPOTENCY_KEY: Final = 255


@dataclass(frozen=True, slots=True)
class Route:
    """One upstream operation: ``method`` ``/tenants/{tenant}<path>``, answered by ``handler``.

    ``{name}`` in ``path`` is one path segment, any characters (decoded).
    """

    operation: str
    method: str
    path: str
    handler: Handler


_REGISTERED: list[Route] = []


def upstream(method: str, path: str) -> Callable[[Handler], Handler]:
    """Register the decorated handler as the operation of its name, at ``method path``."""

    def register(handler: Handler) -> Handler:
        _REGISTERED.append(Route(handler.__name__, method, path, handler))
        return handler

    return register


_SUB: Final = "/accounts/{account}/customers/{customer}/subscription"


# -- entitlements and flags ------------------------------------------------------------


@upstream("GET", "/customers/{customer}/entitlements")
def get_entitlements(ledger: Ledger, call: Call) -> Answer:
    customer_id = call.params["customer"]
    doc = ledger.get_entitlements(call.tenant, customer_id)
    if doc is None:
        raise EmulatorError(
            404, "entitlements_not_found", f"customer {customer_id!r} has no entitlements"
        )
    return Answer.json(doc)


@upstream("GET", "/customers/{customer}/flags")
def flags(ledger: Ledger, call: Call) -> Answer:
    return Answer.json({"flags": ledger.flags_for(call.tenant, call.params["customer"])})


@upstream("GET", "/flags")
def global_flags(ledger: Ledger, call: Call) -> Answer:
    return Answer.json({"flags": ledger.flags_for(call.tenant)})


# -- checkouts and subscriptions -----------------------------------------------------------


def _urls(body: Mapping[str, object]) -> dict[str, str]:
    return {
        "successUrl": required_str(body, "successUrl"),
        "cancelUrl": required_str(body, "cancelUrl"),
    }


def _buyer(ledger: Ledger, call: Call, body: Json) -> tuple[Tenant, Account, Customer]:
    """A checkout's tenant, the path's account and the body's ``customerId`` (404s)."""
    state = ledger.tenant(call.tenant)
    account = state.account(call.params["account"])
    return state, account, account.customer(required_str(body, "customerId"))


@upstream("POST", "/accounts/{account}/checkout")
def create_checkout(ledger: Ledger, call: Call) -> Answer:
    body = json_object(call.body)
    state, account, customer = _buyer(ledger, call, body)
    urls = _urls(body)
    choice = billing.choose(body, call.mode)
    customer.refuse_second_subscription(call.mode)
    session = billing.new_session(ledger, call, "subscription", account.account_id, urls)
    session |= {
        "customerId": customer.customer_id,
        "productId": choice.product.product_id,
        "planId": choice.plan_id,
        "planVersion": choice.version.version,
        "seats": choice.seats,
        "addOnModuleIds": choice.add_ons,
        "amountTotal": choice.amount(),
    }
    state.checkouts[session["id"]] = session
    return Answer.json(billing.public(session), 201)


@upstream("POST", "/accounts/{account}/billing/setup-checkout")
def create_setup_checkout(ledger: Ledger, call: Call) -> Answer:
    body = json_object(call.body)
    state = ledger.tenant(call.tenant)
    account = state.account(call.params["account"])
    session = billing.new_session(ledger, call, "setup", account.account_id, _urls(body))
    state.checkouts[session["id"]] = session
    return Answer.json(billing.public(session), 201)


@upstream("POST", "/accounts/{account}/customers/{customer}/subscribe")
def create_subscription(ledger: Ledger, call: Call) -> Answer:
    body = json_object(call.body)
    _, account, customer = ledger.path(call)
    choice = billing.choose(body, call.mode)
    view = billing.subscribe(ledger, call.tenant, account, customer, choice, call.mode)
    return Answer.json(view, 201)


@upstream("GET", _SUB)
def get_subscription(ledger: Ledger, call: Call) -> Answer:
    _, account, customer = ledger.path(call)
    return Answer.json(customer.subscription(call.mode).view(account))


@upstream("PUT", _SUB)
def update_subscription(ledger: Ledger, call: Call) -> Answer:
    body = json_object(call.body)
    _, account, customer = ledger.path(call)
    required_str(body, "planId")
    required_int(body, "planVersion")
    sub = customer.live_subscription(call.mode)
    choice = billing.choose(body, call.mode, sub)
    return Answer.json(
        billing.change(ledger, call.tenant, account, customer, sub, choice, "update")
    )


@upstream("DELETE", _SUB)
def cancel_subscription(ledger: Ledger, call: Call) -> Answer:
    at_period_end = bool_query(call.query, "atPeriodEnd")
    _, account, customer = ledger.path(call)
    sub = customer.live_subscription(call.mode)
    if at_period_end:
        # Access lasts until the period ends (see renew), so nothing to push yet.
        sub.cancel_at_period_end = True
        return Answer.json(sub.view(account))
    sub.status, sub.canceled_at, sub.cancel_at_period_end = "canceled", ledger.now(), False
    ledger.write_subscription(call.tenant, customer, sub)
    return Answer.json(sub.view(account))


@upstream("POST", _SUB + "/preview")
def preview_change(ledger: Ledger, call: Call) -> Answer:
    body = json_object(call.body) if call.body.strip() else {}
    _, account, customer = ledger.path(call)
    sub = customer.live_subscription(call.mode)
    choice = billing.choose(body, call.mode, sub)
    proposed = copy.copy(sub)
    proposed.choose(choice)
    due = max(0, proposed.amount() - sub.amount()) if sub.status != "trialing" else 0
    return Answer.json(
        {
            "current": sub.view(account),
            "proposed": proposed.view(account),
            "amountDueNow": due,
            "currency": CURRENCY,
        }
    )


@upstream("PATCH", _SUB + "/seats")
def set_seats(ledger: Ledger, call: Call) -> Answer:
    body = json_object(call.body)
    _, account, customer = ledger.path(call)
    seats = required_int(body, "seats")
    sub = customer.live_subscription(call.mode)
    choice = billing.choose({"seats": seats}, call.mode, sub)
    return Answer.json(billing.change(ledger, call.tenant, account, customer, sub, choice, "seats"))


@upstream("PATCH", _SUB + "/add-ons")
def change_add_ons(ledger: Ledger, call: Call) -> Answer:
    body = json_object(call.body)
    _, account, customer = ledger.path(call)
    add = str_list(body, "add") or []
    remove = str_list(body, "remove") or []
    if not add and not remove:
        bad_request("missing_field", "add or remove is required")
    sub = customer.live_subscription(call.mode)
    add_ons = [m for m in sub.add_ons if m not in remove]
    add_ons += [m for m in add if m not in add_ons]
    choice = billing.choose({"addOnModuleIds": add_ons}, call.mode, sub)
    view = billing.change(ledger, call.tenant, account, customer, sub, choice, "add-ons")
    return Answer.json(view)


@upstream("PATCH", _SUB + "/plan")
def change_plan(ledger: Ledger, call: Call) -> Answer:
    body = json_object(call.body)
    _, account, customer = ledger.path(call)
    changes = {
        "planId": required_str(body, "planId"),
        "planVersion": required_int(body, "planVersion"),
    }
    if "productId" in body:
        changes["productId"] = body["productId"]
    sub = customer.live_subscription(call.mode)
    choice = billing.choose(changes, call.mode, sub)
    return Answer.json(billing.change(ledger, call.tenant, account, customer, sub, choice, "plan"))


@upstream("POST", _SUB + "/reactivate")
def reactivate(ledger: Ledger, call: Call) -> Answer:
    _, account, customer = ledger.path(call)
    sub = customer.subscription(call.mode)
    if sub.status == "paused":
        billing.resume(ledger, call.tenant, customer, sub)
        return Answer.json(sub.view(account))
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
    now = ledger.now()
    sub.status, sub.canceled_at, sub.trial_end = "active", None, None
    sub.period_start, sub.period_end = now, now + PERIOD
    billing.charge(ledger, call.tenant, account, customer, sub)
    ledger.write_subscription(call.tenant, customer, sub)
    return Answer.json(sub.view(account))


# -- accounts and customers --------------------------------------------------------------


@upstream("POST", "/accounts")
def create_account(ledger: Ledger, call: Call) -> Answer:
    body = json_object(call.body)
    view, created = billing.create_account(
        ledger,
        call.tenant,
        required_str(body, "accountId"),
        optional_str(body, "name"),
        optional_str(body, "email"),
        optional_str(body, "billingCustomerId"),
        optional_bool(body, "createBillingCustomer"),
    )
    return Answer.json(view, 201 if created else 200)


@upstream("POST", "/accounts/{account}/customers")
def create_customer(ledger: Ledger, call: Call) -> Answer:
    body = json_object(call.body)
    customer_id = required_str(body, "customerId")
    name, email = optional_str(body, "name"), optional_str(body, "email")
    account_id = call.params["account"]
    view = billing.create_customer(ledger, call.tenant, account_id, customer_id, name, email)
    return Answer.json(view, 201)


@upstream("PATCH", "/accounts/{account}")
def set_account_status(ledger: Ledger, call: Call) -> Answer:
    status = status_field(json_object(call.body), ACCOUNT_STATUSES)
    state = ledger.tenant(call.tenant)
    account = state.account(call.params["account"])
    account.status = status
    now = ledger.now()
    for customer_id in account.customers:
        doc = state.entitlements.get(customer_id)
        if doc is not None:
            doc["accountStatus"] = status
            doc["updatedAt"] = now
    # One account-wide event without customerId: receivers fan it out themselves.
    ledger.emit(call.tenant, "entitlements.updated", None, account.account_id)
    return Answer.json(account.view())


@upstream("PATCH", "/accounts/{account}/customers/{customer}")
def set_customer_status(ledger: Ledger, call: Call) -> Answer:
    status = status_field(json_object(call.body), CUSTOMER_STATUSES)
    _, _, customer = ledger.path(call)
    customer.status = status
    ledger.write_doc(call.tenant, customer, status=status)
    return Answer.json(customer.view())


# -- payment methods and invoices ----------------------------------------------------------


@upstream("GET", "/accounts/{account}/payment-methods")
def list_payment_methods(ledger: Ledger, call: Call) -> Answer:
    account = ledger.tenant(call.tenant).account(call.params["account"])
    methods = [m.view(account.default_method) for m in account.methods.values()]
    return Answer.json({"methods": methods})


@upstream("PATCH", "/accounts/{account}/payment-methods/{method}")
def set_default_payment_method(ledger: Ledger, call: Call) -> Answer:
    account = ledger.tenant(call.tenant).account(call.params["account"])
    method = account.method(call.params["method"])
    account.default_method = method.ref
    return Answer.json(method.view(account.default_method))


@upstream("DELETE", "/accounts/{account}/payment-methods/{method}")
def remove_payment_method(ledger: Ledger, call: Call) -> Answer:
    account = ledger.tenant(call.tenant).account(call.params["account"])
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


@upstream("PATCH", "/accounts/{account}/customers/{customer}/payment-method")
def set_subscription_payment_method(ledger: Ledger, call: Call) -> Answer:
    body = json_object(call.body)
    ref = required_str(body, "methodId")
    _, account, customer = ledger.path(call)
    sub = customer.subscription(call.mode)
    sub.method_ref = account.method(ref).ref
    return Answer.json(sub.view(account))


@upstream("GET", "/accounts/{account}/invoices")
def list_invoices(ledger: Ledger, call: Call) -> Answer:
    account = ledger.tenant(call.tenant).account(call.params["account"])
    customer_id = call.query.get("customerId")
    invoices = [
        i.view() for i in account.invoices if customer_id is None or i.customer_id == customer_id
    ]
    return Answer.json({"invoices": invoices})


@upstream("GET", "/accounts/{account}/invoices/{invoice}/pdf")
def invoice_pdf(ledger: Ledger, call: Call) -> Answer:
    account = ledger.tenant(call.tenant).account(call.params["account"])
    invoice = account.invoice(call.params["invoice"])
    if ledger.settings.invoice_pdf == "redirect":
        url = f"https://files.invoices.example/{invoice.hosted_token}/{invoice.number}.pdf"
        return Answer.json({"url": url}, 302, {"Location": url})
    disposition = f'inline; filename="{invoice.number}.pdf"'
    return Answer(
        200, invoice.pdf(account), "application/pdf", {"Content-Disposition": disposition}
    )


# -- credits -----------------------------------------------------------------------------


@upstream("POST", "/accounts/{account}/credit-checkout")
def create_credit_checkout(ledger: Ledger, call: Call) -> Answer:
    body = json_object(call.body)
    state, account, customer = _buyer(ledger, call, body)
    urls = _urls(body)
    raw_items = body.get("items")
    if raw_items is None:
        raw_items = [body]
    elif not isinstance(raw_items, list) or not raw_items:
        bad_request("invalid_field", "items must be a non-empty list")
    items = [_credit_item(raw, n, raw is body) for n, raw in enumerate(raw_items)]
    session = billing.new_session(ledger, call, "payment", account.account_id, urls)
    session |= {
        "customerId": customer.customer_id,
        "items": items,
        "amountTotal": sum(i["amount"] for i in items),
    }
    state.checkouts[session["id"]] = session
    return Answer.json(billing.public(session), 201)


def _credit_item(raw: object, n: int, top_level: bool) -> Json:
    """One pack bought: ``{creditTypeId, packId, quantity?}`` (the body itself for one)."""
    where = "" if top_level else f"items[{n}]."
    if not isinstance(raw, dict):
        bad_request("invalid_field", f"items[{n}] must be an object")
    ct_id = raw.get("creditTypeId")
    pack_id = raw.get("packId")
    if not isinstance(ct_id, str) or not ct_id:
        bad_request("missing_field", f"{where}creditTypeId is required")
    if not isinstance(pack_id, str) or not pack_id:
        bad_request("missing_field", f"{where}packId is required")
    quantity = raw.get("quantity", 1)
    if not positive_int(quantity):
        bad_request("invalid_field", f"{where}quantity must be a positive integer")
    pack = credit_type(ct_id).pack(pack_id)
    if pack is None:
        raise EmulatorError(404, "pack_not_found", f"credit type {ct_id!r} has no pack {pack_id!r}")
    return {
        "creditTypeId": ct_id,
        "packId": pack_id,
        "quantity": quantity,
        "credits": pack.credits * quantity,
        "amount": pack.price * quantity,
    }


@upstream("GET", "/credit-types")
def list_credit_types(ledger: Ledger, call: Call) -> Answer:
    return Answer.json({"creditTypes": [ct.to_json() for ct in CREDIT_TYPES.values()]})


@upstream("GET", "/credit-types/{credit_type}/packs")
def list_credit_packs(ledger: Ledger, call: Call) -> Answer:
    found = credit_type(call.params["credit_type"])
    return Answer.json({"packs": [p.to_json(found.credit_type_id) for p in found.packs]})


@upstream("GET", "/customers/{customer}/credits")
def list_credits(ledger: Ledger, call: Call) -> Answer:
    state = ledger.tenant(call.tenant)
    customer = state.known_customer(call.params["customer"])
    return Answer.json({"credits": state.credit_list(customer.customer_id)})


@upstream("GET", "/customers/{customer}/credits/{credit_type}")
def get_credit_balance(ledger: Ledger, call: Call) -> Answer:
    state = ledger.tenant(call.tenant)
    customer = state.known_customer(call.params["customer"])
    found = credit_type(call.params["credit_type"])
    return Answer.json(state.balance(customer.customer_id, found))


@upstream("POST", "/customers/{customer}/credits/{credit_type}/consume")
def consume_credits(ledger: Ledger, call: Call) -> Answer:
    body = json_object(call.body)
    state = ledger.tenant(call.tenant)
    customer = state.known_customer(call.params["customer"])
    found = credit_type(call.params["credit_type"])
    amount = required_int(body, "amount")
    key = required_str(body, "idempotencyKey")
    if len(key) > _MAX_IDEMPOTENCY_KEY:
        bad_request("invalid_field", f"idempotencyKey is longer than {_MAX_IDEMPOTENCY_KEY}")
    slot = (customer.customer_id, found.credit_type_id, key)
    done = state.consumed.get(slot)
    if done is not None:
        if done[0] != amount:
            return Answer.error(
                422, "idempotency_key_reused", "the key was used with another amount"
            )
        return Answer.json(done[1], headers={"Idempotent-Replayed": "true"})
    balances = state.balances.setdefault(customer.customer_id, {})
    balance = balances.get(found.credit_type_id, 0)
    if balance < amount:
        # All or nothing, and not remembered: the same key may succeed after a top-up.
        raise EmulatorError(
            409,
            "insufficient_credits",
            f"balance {balance} is less than {amount}: nothing was deducted",
        )
    balances[found.credit_type_id] = balance - amount
    result = {
        **state.balance(customer.customer_id, found),
        "consumed": amount,
        "idempotencyKey": key,
    }
    state.consumed[slot] = (amount, result)
    return Answer.json(result)


# -- added upstream after vellumcharter 1.4.2 ---------------------------------------------


@upstream("POST", _SUB + "/pause")
def pause_subscription(ledger: Ledger, call: Call) -> Answer:
    """Added after vellumcharter 1.4.2: paused until reactivated, or for ``cycles`` periods."""
    body = json_object(call.body) if call.body.strip() else {}
    _, account, customer = ledger.path(call)
    cycles = optional_int(body, "cycles")
    sub = customer.live_subscription(call.mode)
    billing.pause(ledger, call.tenant, customer, sub, cycles)
    return Answer.json(sub.view(account))


#: Every upstream operation, in the order of the SDK's table (interface.md section 1), then
#: those the upstream added since.
ROUTES: Final[tuple[Route, ...]] = tuple(_REGISTERED)
#: Every operation's name (what the request log, faults and holds name).
OPERATIONS: Final[frozenset[str]] = frozenset(r.operation for r in ROUTES)
_BY_NAME: Final[Mapping[str, Route]] = {r.operation: r for r in ROUTES}


def run(ledger: Ledger, call: Call) -> Answer:
    """Run one upstream operation; every refusal is an answer, never an exception."""
    route = _BY_NAME.get(call.operation)
    if route is None:
        raise ValueError(f"unknown operation {call.operation!r}")
    try:
        return route.handler(ledger, call)
    except EmulatorError as exc:
        return exc.answer()
