"""The emulated service's data and its event stream: what every rule reads and writes.

:class:`Ledger` holds every tenant's records (``model.py``), the clock, the
:class:`~.faults.Settings` and the events emitted so far. Each event is handed to
the ``on_event`` callback the ledger was built with (the emulator's push
delivery); while seeding, none is emitted. It also keeps the entitlement
documents (one per customer, whatever the key's mode), the flags and the credit
balances, the parts of a tenant that no billing rule owns.
"""

from __future__ import annotations

import contextlib
import copy
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from .bodies import bad_request, check_entitlements
from .catalog import CREDIT_TYPES
from .faults import Settings
from .model import ACCESS_STATUSES, Account, Customer, Invoice, Subscription, Tenant, credit_type
from .wire import Call, EmulatorError, Json

__all__ = ["EventCallback", "Ledger"]

#: Told of every event the service emits, in order (the emulator pushes it).
EventCallback = Callable[[Json], None]


class Ledger:
    """Every tenant's data, the clock, the settings and the events."""

    def __init__(self, clock: Callable[[], float], on_event: EventCallback | None = None) -> None:
        self.clock = clock
        self.on_event = on_event
        self.settings = Settings()
        self.tenants: dict[str, Tenant] = {}
        self.events: list[Json] = []
        """Every event emitted so far (pushed or not), oldest first."""
        self._quiet = False

    def now(self) -> int:
        return int(self.clock())

    def tenant(self, tenant: str) -> Tenant:
        return self.tenants.setdefault(tenant, Tenant())

    def path(self, call: Call) -> tuple[Tenant, Account, Customer]:
        """The tenant, account and customer a call's path names (404 for a missing one)."""
        state = self.tenant(call.tenant)
        account = state.account(call.params["account"])
        return state, account, account.customer(call.params["customer"])

    def reset(self) -> None:
        """No data, no events, today's settings."""
        self.tenants.clear()
        self.events.clear()
        self.settings = Settings()

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """No event is emitted inside (the seed is the state the service starts in)."""
        self._quiet = True
        try:
            yield
        finally:
            self._quiet = False

    # -- events

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
        event["createdAt"] = self.now()
        event |= extra
        return event

    def emit(
        self,
        tenant: str,
        event_type: str,
        customer_id: str | None,
        account_id: str | None,
        **extra: Any,
    ) -> None:
        if self._quiet:
            return
        event = self.event(
            tenant, event_type=event_type, customer_id=customer_id, account_id=account_id, **extra
        )
        self.events.append(event)
        if self.on_event is not None:
            self.on_event(event)

    def payment_event(
        self,
        tenant: str,
        account: Account,
        customer: Customer,
        sub: Subscription,
        invoice: Invoice,
        *,
        succeeded: bool = True,
    ) -> None:
        self.emit(
            tenant,
            "payment.succeeded" if succeeded else "payment.failed",
            customer.customer_id,
            account.account_id,
            seats=sub.seats,
            invoice=invoice.view(),
        )

    # -- entitlement documents

    def set_entitlements(self, tenant: str, customer_id: str, doc: Mapping[str, Any]) -> Json:
        """Replace a customer's document (defaults for missing fields), emit; the view."""
        check_entitlements(doc)
        state = self.tenant(tenant)
        stored: Json = {"customerId": customer_id, "status": "active", "modules": [], "config": {}}
        stored |= copy.deepcopy(dict(doc))
        stored["customerId"] = customer_id
        known = state.customers.get(customer_id)
        if "accountId" not in stored and known is not None:
            stored["accountId"] = known.account_id
        stored["updatedAt"] = self.now()
        state.entitlements[customer_id] = stored
        self.emit(
            tenant, "entitlements.updated", customer_id, _str_or_none(stored.get("accountId"))
        )
        return self.entitlement_view(stored)

    def delete_entitlements(self, tenant: str, customer_id: str) -> bool:
        """Drop a customer's document (GET then answers 404); emit when one existed."""
        doc = self.tenant(tenant).entitlements.pop(customer_id, None)
        if doc is None:
            return False
        self.emit(tenant, "entitlements.updated", customer_id, _str_or_none(doc.get("accountId")))
        return True

    def get_entitlements(self, tenant: str, customer_id: str) -> Json | None:
        """The document as GET answers it (a copy), or None (what GET answers 404 for)."""
        state = self.tenants.get(tenant)
        doc = None if state is None else state.entitlements.get(customer_id)
        return None if doc is None else self.entitlement_view(doc)

    def entitlement_view(self, doc: Json) -> Json:
        """``hasAccess`` decided from the status and the account's (``modules`` emptied
        when access is withheld), unless the document says so itself."""
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

    def write_doc(self, tenant: str, customer: Customer, **changes: Any) -> None:
        """Write ``changes`` into a customer's document (created if missing), emit."""
        state = self.tenant(tenant)
        doc = state.entitlements.get(customer.customer_id)
        if doc is None:
            doc = {"customerId": customer.customer_id, "accountId": customer.account_id}
            doc |= {"status": customer.status, "modules": [], "config": {}}
            account = state.accounts.get(customer.account_id)
            if account is not None and account.status != "active":
                doc["accountStatus"] = account.status
        doc.pop("hasAccess", None)  # the server decides again from the new state
        doc |= changes
        doc["updatedAt"] = self.now()
        state.entitlements[customer.customer_id] = doc
        self.emit(tenant, "entitlements.updated", customer.customer_id, customer.account_id)

    def write_subscription(self, tenant: str, customer: Customer, sub: Subscription) -> None:
        """The subscription's status, modules and seats into the customer's document."""
        customer.status = sub.status
        doc = self.tenant(tenant).entitlements.get(customer.customer_id, {})
        config = dict(doc.get("config") or {})
        config["seats"] = sub.seats
        self.write_doc(
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

    # -- flags

    def set_flag(
        self, tenant: str, name: str, value: bool, *, customer_id: str | None = None
    ) -> Json:
        """Set a tenant-global flag, or one customer's override of a defined flag.

        Emits ``flags.updated`` (naming the customer for an override). Returns the
        tenant's flags and overrides.
        """
        state = self.tenant(tenant)
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
        state = self.tenant(tenant)
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
        state = self.tenant(tenant)
        return {
            "flags": dict(state.flags),
            "overrides": {c: dict(o) for c, o in state.overrides.items() if o},
        }

    def flags_for(self, tenant: str, customer_id: str | None = None) -> dict[str, bool]:
        """The flags as the API answers them: globals, with the customer's overrides."""
        state = self.tenant(tenant)
        flags = dict(state.flags)
        if customer_id is not None:
            flags |= state.overrides.get(customer_id, {})
        return flags

    def _flag_event(self, tenant: str, customer_id: str | None) -> None:
        account = None
        if customer_id is not None:
            known = self.tenant(tenant).customers.get(customer_id)
            account = known.account_id if known is not None else None
        self.emit(tenant, "flags.updated", customer_id, account)

    # -- credits

    def set_credits(self, tenant: str, customer_id: str, credit_type_id: str, balance: int) -> Json:
        """Set a customer's balance of one credit type (no event); the balance view."""
        state = self.tenant(tenant)
        state.known_customer(customer_id)
        found = credit_type(credit_type_id)
        if isinstance(balance, bool) or not isinstance(balance, int) or balance < 0:
            bad_request("invalid_field", "balance must be a non-negative integer")
        state.balances.setdefault(customer_id, {})[found.credit_type_id] = balance
        return state.balance(customer_id, found)

    def credits_of(self, tenant: str, customer_id: str) -> dict[str, int]:
        """Every balance of a customer (0 for types it never had)."""
        balances = self.tenant(tenant).balances.get(customer_id, {})
        return {ct: balances.get(ct, 0) for ct in CREDIT_TYPES}


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None
