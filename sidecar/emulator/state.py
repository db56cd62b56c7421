"""The emulated Vellum API as plain Python: one object for a test or the HTTP face to hold.

No HTTP here. :class:`State` answers an upstream request given as a
:class:`~.wire.Call` with an :class:`~.wire.Answer` (``operations.py`` has the
handlers), keeps the request log and the ``Idempotency-Key`` replays, holds the
faults the HTTP face applies (``faults.py``), and offers the Python API tests
and the admin API change the service with (documents, accounts, subscriptions,
renewals, checkouts, flags, credits). Its data and events live in a
:class:`~.ledger.Ledger`; each event is handed to the ``on_event`` callback it is
built with (the emulator's push delivery, ``service.py``).

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

import copy
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, Final

from . import billing
from .faults import Faults, Hold, Settings
from .ledger import EventCallback, Ledger
from .operations import OPERATIONS, run
from .seed import seed_demo
from .wire import Answer, Call, Json, RecordedRequest, Replays

__all__ = ["DEMO_TENANT", "State"]

DEMO_TENANT: Final = "demo"


class State:
    """The emulated service: its data and rules, faults, replays and the request log.

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
        on_event: EventCallback | None = None,
    ) -> None:
        self.api_keys: set[str] = set(api_keys)
        self.default_tenant = default_tenant or DEMO_TENANT
        self.seeded = seed
        self.ledger = Ledger(clock, on_event)
        self.requests: list[RecordedRequest] = []
        self._faults = Faults(OPERATIONS)
        self._replays = Replays()
        if seed:
            self.seed_demo()

    @property
    def clock(self) -> Callable[[], float]:
        """The service's time (seconds); a test may replace it."""
        return self.ledger.clock

    @clock.setter
    def clock(self, clock: Callable[[], float]) -> None:
        self.ledger.clock = clock

    @property
    def settings(self) -> Settings:
        """Today's API or an older upstream's ways (admin ``/settings``)."""
        return self.ledger.settings

    @property
    def events(self) -> list[Json]:
        """Every event emitted so far (pushed or not), oldest first."""
        return self.ledger.events

    def mode_of(self, api_key: str | None) -> str | None:
        """The key's mode, or None when the key is not accepted (401)."""
        if api_key is None or api_key not in self.api_keys:
            return None
        return "live" if api_key.startswith("live_") or "_live_" in api_key else "test"

    # -- the upstream API

    def answer(self, call: Call) -> Answer:
        """Run one upstream operation; every refusal is an answer, never an exception."""
        return run(self.ledger, call)

    def replay(self, operation: str, path: str, key: str, raw: bytes) -> Answer | None:
        """The stored answer for a repeated ``Idempotency-Key`` (422 for another body)."""
        return self._replays.replay(operation, path, key, raw)

    def remember(self, operation: str, path: str, key: str, raw: bytes, answer: Answer) -> None:
        self._replays.remember(operation, path, key, raw, answer)

    # -- the Python API: documents, accounts, subscriptions, checkouts

    def set_entitlements(self, tenant: str, customer_id: str, doc: Mapping[str, Any]) -> Json:
        """Replace a customer's entitlement document, emit its event; the answered view.

        Missing fields take defaults (``status`` active, no modules, empty config).
        An explicit boolean ``hasAccess`` is answered as given.
        """
        return self.ledger.set_entitlements(tenant, customer_id, doc)

    def delete_entitlements(self, tenant: str, customer_id: str) -> bool:
        """Drop a customer's document (GET then answers 404); emit when one existed."""
        return self.ledger.delete_entitlements(tenant, customer_id)

    def get_entitlements(self, tenant: str, customer_id: str) -> Json | None:
        """The document as GET answers it (a copy), or None (what GET answers 404 for)."""
        return self.ledger.get_entitlements(tenant, customer_id)

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
        return billing.create_account(
            self.ledger, tenant, account_id, name, email, billing_customer_id,
            create_billing_customer,
        )[0]  # fmt: skip

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
        return billing.create_customer(self.ledger, tenant, account_id, customer_id, name, email)

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
        account = self.ledger.tenant(tenant).account(account_id)
        customer = account.customer(customer_id)
        choice = billing.choose(body, mode)
        return billing.subscribe(self.ledger, tenant, account, customer, choice, mode)

    def renew(
        self,
        tenant: str,
        account_id: str,
        customer_id: str,
        *,
        mode: str = "test",
        succeeded: bool = True,
    ) -> Json:
        """The end of the current period: bill the next one, or end a pending cancel
        (``billing.renew``)."""
        return billing.renew(
            self.ledger, tenant, account_id, customer_id, mode=mode, succeeded=succeeded
        )

    def checkouts(self, tenant: str) -> list[Json]:
        """Every checkout session of the tenant, oldest first."""
        return [copy.deepcopy(c) for c in self.ledger.tenant(tenant).checkouts.values()]

    def complete_checkout(self, tenant: str, session_id: str) -> Json:
        """The customer finished a hosted checkout: apply it as the real service would
        (``billing.complete_checkout``)."""
        return billing.complete_checkout(self.ledger, tenant, session_id)

    # -- flags and credits

    def set_flag(
        self, tenant: str, name: str, value: bool, *, customer_id: str | None = None
    ) -> Json:
        """Set a tenant-global flag, or one customer's override of a defined flag."""
        return self.ledger.set_flag(tenant, name, value, customer_id=customer_id)

    def delete_flag(self, tenant: str, name: str, *, customer_id: str | None = None) -> bool:
        """Remove a global flag (with its overrides) or one override; emit when it existed."""
        return self.ledger.delete_flag(tenant, name, customer_id=customer_id)

    def flag_state(self, tenant: str) -> Json:
        return self.ledger.flag_state(tenant)

    def flags_for(self, tenant: str, customer_id: str | None = None) -> dict[str, bool]:
        """The flags as the API answers them: globals, with the customer's overrides."""
        return self.ledger.flags_for(tenant, customer_id)

    def set_credits(self, tenant: str, customer_id: str, credit_type_id: str, balance: int) -> Json:
        """Set a customer's balance of one credit type (no event); the balance view."""
        return self.ledger.set_credits(tenant, customer_id, credit_type_id, balance)

    def credits_of(self, tenant: str, customer_id: str) -> dict[str, int]:
        """Every balance of a customer (0 for types it never had)."""
        return self.ledger.credits_of(tenant, customer_id)

    def event(
        self,
        tenant: str,
        *,
        event_type: str = "entitlements.updated",
        customer_id: str | None = None,
        account_id: str | None = None,
        **extra: Any,
    ) -> Json:
        """A new event as the service builds one (not emitted): a fresh id in each
        configured id field."""
        return self.ledger.event(
            tenant, event_type=event_type, customer_id=customer_id, account_id=account_id, **extra
        )

    # -- the request log, reset, the seed

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
        self.ledger.reset()
        self._replays.clear()
        self.requests.clear()
        self.clear_faults()
        if self.seeded:
            self.seed_demo()

    def seed_demo(self, tenant: str | None = None) -> None:
        """The demo dataset (``seed.py``) in ``tenant``, the default tenant when None."""
        seed_demo(self.ledger, tenant or self.default_tenant)

    # -- faults (``faults.py``): the HTTP face applies them to each upstream request

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
        self._faults.fail(operation, status, times, headers=headers)

    def delay(self, operation: str | None, seconds: float, times: int | None = None) -> None:
        """Wait ``seconds`` before answering matching requests (all until cleared)."""
        self._faults.delay(operation, seconds, times)

    def hold(self, operation: str | None) -> Hold:
        """Hold the answers to matching requests until ``Hold.release()``.

        The operation has already run when a request is held: its answer reflects the
        state at arrival and only its delivery waits. That is the window in which an
        invalidation races a fetch: once ``hold.arrived`` is set a test can change the
        document (which pushes), release, and check the older answer is not kept.
        """
        return self._faults.hold(operation)

    def clear_faults(self) -> None:
        """Remove every failure and delay, and release every hold."""
        self._faults.clear()

    def faults(self) -> list[Json]:
        """The active failures, delays and holds, as the admin API lists them."""
        return self._faults.listed()

    def take_delays(self, operation: str) -> list[float]:
        """The delays that apply to one request of ``operation`` (each counted once)."""
        return self._faults.take_delays(operation)

    def take_failure(self, operation: str) -> Answer | None:
        """The injected answer for one request of ``operation``, if a failure matches."""
        return self._faults.take_failure(operation)

    def holds_for(self, operation: str) -> list[Hold]:
        """The holds one answer of ``operation`` must wait for."""
        return self._faults.holds_for(operation)
