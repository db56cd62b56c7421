"""The demo dataset (``vellum-sidecar demo``, the seeded tenant of the tests; docs/emulator.md).

Account ``acme`` with two cards and two invoices; one customer per interesting
status (``cus_active``, ``cus_trial``, ``cus_pastdue``, ``cus_canceled``); a few
flags with overrides; credit balances. Written without events: it is the state
the service starts in.
"""

from __future__ import annotations

import hashlib
from typing import Final

from .billing import number_prefix
from .catalog import PRODUCTS
from .ledger import Ledger
from .model import DAY, PERIOD, Account, Customer, Invoice, PaymentMethod, Subscription, make_ref

__all__ = ["seed_demo"]

#: (customer, status, plan, version, seats) of the demo account's customers.
_CUSTOMERS: Final = (
    ("cus_active", "active", "team", 1, 5),
    ("cus_trial", "trialing", "starter", 2, 1),
    ("cus_pastdue", "past_due", "starter", 1, 1),
    ("cus_canceled", "canceled", "starter", 1, 1),
)


def seed_demo(ledger: Ledger, tenant: str) -> None:
    """Load the demo dataset into ``tenant`` (no event is emitted)."""
    with ledger.quiet():
        _seed(ledger, tenant)


def _seed(ledger: Ledger, tenant: str) -> None:
    state = ledger.tenant(tenant)
    now = ledger.now()
    acme = Account("acme", "Acme Inc.", "billing@acme.example", "cus_stripe_acme", "active", now)
    for provider_id, brand, last4 in (
        ("pm_acme_visa", "visa", "4242"),
        ("pm_acme_mastercard", "mastercard", "4444"),
    ):
        ref = make_ref("pmr", tenant, "acme", provider_id)
        acme.methods[ref] = PaymentMethod(ref, provider_id, brand, last4, "Acme Inc.")
    acme.default_method = next(iter(acme.methods))
    state.accounts["acme"] = acme
    app = PRODUCTS["app"]
    for customer_id, status, plan_id, version, seats in _CUSTOMERS:
        customer = Customer(customer_id, "acme", None, f"{customer_id}@acme.example", status, now)
        acme.customers[customer_id] = customer
        state.customers[customer_id] = customer
        sub = Subscription(
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
            now + PERIOD,
            canceled_at=now if status == "canceled" else None,
            trial_end=now + 14 * DAY if status == "trialing" else None,
        )
        customer.subscriptions["test"] = sub
        ledger.write_subscription(tenant, customer, sub)
    for provider_id, customer_id, lines, status in (
        ("in_acme_0001", "cus_active", [("5 x team v1", 5 * 2900)], "paid"),
        ("in_acme_0002", "cus_pastdue", [("1 x starter v1", 1900)], "open"),
    ):
        acme.invoices.append(
            Invoice(
                make_ref("invr", tenant, "acme", provider_id),
                provider_id,
                f"{number_prefix('acme')}-{len(acme.invoices) + 1:04d}",
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
