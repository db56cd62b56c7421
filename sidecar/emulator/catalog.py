"""What every emulated tenant sells: products, plan versions, add-ons, credit types and packs.

Plain data. Every tenant gets the same catalog (tests create tenants freely and
subscribe at once); what differs per tenant is its accounts, customers, flags and
balances (see ``state.py``). Prices are in cents per month.

The catalog is shaped to exercise the rules of the current API:

- ``planVersion`` may be omitted: the newest version priced in the API key's mode
  is sold. ``pro`` version 3 is priced in test mode only, so a test key gets 3 and a
  live key gets 2.
- ``productId`` may be omitted unless the ``planId`` is ambiguous: ``enterprise``
  is sold by both products, so it needs one (400 otherwise).
- ``starter`` version 2 starts with a 14-day trial: its first invoice is a paid
  zero-amount invoice (``payment.succeeded`` with ``amountPaid == 0``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

__all__ = [
    "CREDIT_TYPES",
    "CURRENCY",
    "INTERVAL",
    "MODES",
    "PRODUCTS",
    "CreditPack",
    "CreditType",
    "PlanVersion",
    "Product",
]

CURRENCY: Final = "usd"
INTERVAL: Final = "month"
#: A key's Stripe mode; see ``State.mode_of``.
MODES: Final = ("test", "live")


@dataclass(frozen=True, slots=True)
class PlanVersion:
    version: int
    price: int
    """Cents per seat per month."""
    modules: tuple[str, ...]
    modes: tuple[str, ...] = MODES
    """The modes this version is priced in, so sold in."""
    trial_days: int = 0


@dataclass(frozen=True, slots=True)
class Product:
    product_id: str
    name: str
    plans: Mapping[str, Mapping[int, PlanVersion]]
    add_ons: Mapping[str, int]
    """Module id -> flat price per month; an add-on grants that one module."""

    def newest_sold(self, plan_id: str, mode: str) -> PlanVersion | None:
        versions = [v for v in self.plans[plan_id].values() if mode in v.modes]
        return max(versions, key=lambda v: v.version, default=None)


def _versions(*versions: PlanVersion) -> dict[int, PlanVersion]:
    return {v.version: v for v in versions}


PRODUCTS: Final[Mapping[str, Product]] = {
    "app": Product(
        "app",
        "Vellum App",
        plans={
            "starter": _versions(
                PlanVersion(1, 1900, ("reports",)),
                PlanVersion(2, 2400, ("reports",), trial_days=14),
            ),
            "team": _versions(
                PlanVersion(1, 2900, ("reports", "exports")),
                PlanVersion(2, 3400, ("reports", "exports")),
            ),
            "pro": _versions(
                PlanVersion(1, 4900, ("reports", "exports", "api")),
                PlanVersion(2, 5900, ("reports", "exports", "api")),
                PlanVersion(3, 6900, ("reports", "exports", "api", "ai"), modes=("test",)),
            ),
            "enterprise": _versions(
                PlanVersion(1, 9900, ("reports", "exports", "api", "sso", "audit")),
            ),
        },
        add_ons={"sso": 1500, "audit": 1000, "api": 2000, "priority-support": 5000},
    ),
    "data": Product(
        "data",
        "Vellum Data",
        plans={
            "warehouse": _versions(PlanVersion(1, 7900, ("warehouse",))),
            "enterprise": _versions(PlanVersion(1, 19900, ("warehouse", "lineage"))),
        },
        add_ons={"lineage": 3000},
    ),
}


@dataclass(frozen=True, slots=True)
class CreditPack:
    pack_id: str
    name: str
    credits: int
    price: int

    def to_json(self, credit_type_id: str) -> dict[str, object]:
        return {
            "packId": self.pack_id,
            "creditTypeId": credit_type_id,
            "name": self.name,
            "credits": self.credits,
            "price": self.price,
            "currency": CURRENCY,
        }


@dataclass(frozen=True, slots=True)
class CreditType:
    credit_type_id: str
    name: str
    unit: str
    packs: tuple[CreditPack, ...]

    def to_json(self) -> dict[str, object]:
        return {"creditTypeId": self.credit_type_id, "name": self.name, "unit": self.unit}

    def pack(self, pack_id: str) -> CreditPack | None:
        return next((p for p in self.packs if p.pack_id == pack_id), None)


CREDIT_TYPES: Final[Mapping[str, CreditType]] = {
    "api-calls": CreditType(
        "api-calls",
        "API calls",
        "call",
        (
            CreditPack("calls-1k", "1,000 calls", 1_000, 1_000),
            CreditPack("calls-10k", "10,000 calls", 10_000, 8_000),
        ),
    ),
    "exports": CreditType(
        "exports",
        "Export credits",
        "export",
        (CreditPack("exports-10", "10 exports", 10, 500),),
    ),
}
