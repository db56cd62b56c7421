"""The upstream's SDK, ``vellumcharter`` 1.4.2 from PyPI, driven through every public method.

One scenario, run two ways: against the emulator directly
(``tests/test_emulator_sdk.py``: is the emulator what the SDK expects of the real
service?) and through the sidecar's drop-in mirror in front of it
(``tests/test_sdk.py``: does the SDK work unchanged through the sidecar?). A
:class:`Target` says which; the few checks that only make sense one way (the
sidecar's cache headers, the SDK's own cache) are marked so.

Directly, the SDK keeps its own caches (30 s), so a read after a change calls
``invalidate()`` first (:meth:`Target.fresh`). Through the sidecar, the SDK's
caches are off and nothing is invalidated: the sidecar drops what a write changed
before answering, and the very next read must see it.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
import pypdf
import pytest
from vellumcharter import AsyncVellumCharterClient, VellumCharterApiError, VellumCharterClient

from sidecar.emulator import Emulator

from .conftest import Sidecar

URLS = {"success_url": "https://app.example/ok", "cancel_url": "https://app.example/no"}
SYNC_PUBLIC = {n for n, _ in inspect.getmembers(VellumCharterClient) if not n.startswith("_")}
ASYNC_PUBLIC = {n for n, _ in inspect.getmembers(AsyncVellumCharterClient) if not n.startswith("_")}
#: The methods that only touch the SDK's own in-memory cache.
LOCAL = {"invalidate", "invalidate_flags"}


class Sdk:
    """One SDK flavour (``sync`` or ``async``) behind one awaitable interface; records
    which methods ran. ``cached=False`` turns the SDK's own caches off (TTL 0)."""

    def __init__(
        self, flavour: str, base_url: str, tenant: str, api_key: str, *, cached: bool = True
    ) -> None:
        self.flavour = flavour
        options: dict[str, Any] = {"base_url": base_url}
        if not cached:
            options |= {"cache_ttl_ms": 0, "flag_cache_ttl_ms": 0}
        self.sync = VellumCharterClient(api_key, tenant, **options)
        self.aio = AsyncVellumCharterClient(api_key, tenant, **options)
        self.called: set[str] = set()

    async def __call__(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        self.called.add(name)
        if self.flavour == "async":
            result = getattr(self.aio, name)(*args, **kwargs)
            return await result if inspect.isawaitable(result) else result
        method = getattr(self.sync, name)
        if name in LOCAL:
            return method(*args, **kwargs)
        # The sync SDK blocks on urllib: off the loop that runs the sidecar and emulator.
        return await asyncio.to_thread(method, *args, **kwargs)

    async def error(self, name: str, /, *args: Any, **kwargs: Any) -> VellumCharterApiError:
        with pytest.raises(VellumCharterApiError) as caught:
            await self(name, *args, **kwargs)
        return caught.value


@dataclass
class Target:
    """Where the SDK points: the emulator (``sidecar`` None) or a sidecar in front of it."""

    sdk: Sdk
    emulator: Emulator
    tenant: str
    sidecar: Sidecar | None = None

    async def fresh(self, customer: str) -> None:
        """Before reading a customer a write changed: directly, drop the SDK's cached
        copy; through the sidecar nothing (the sidecar dropped it itself)."""
        if self.sidecar is None:
            await self.sdk("invalidate", customer)

    async def cache_header(self, customer: str) -> str:
        """Where the sidecar finds the customer now (``X-Sidecar-Cache`` of its /v1 read)."""
        assert self.sidecar is not None
        resp = await self.sidecar.client.get(f"/v1/customers/{customer}/entitlements")
        assert resp.status == 200
        return resp.headers["X-Sidecar-Cache"]


def uid(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def code(error: VellumCharterApiError) -> str:
    parsed: str = orjson.loads(error.body)["error"]["code"]
    return parsed


async def every_public_method(t: Target) -> None:
    """The four journeys; together they call every public method of the SDK."""
    await entitlements_and_flags(t)
    await provisioning_and_subscription_changes(t)
    await payment_methods_and_invoices(t)
    await credits(t)
    assert t.sdk.called == SYNC_PUBLIC, sorted(SYNC_PUBLIC ^ t.sdk.called)


async def entitlements_and_flags(t: Target) -> None:
    sdk, emulator, sc = t.sdk, t.emulator, t.sidecar
    reads = emulator.count("get_entitlements")
    active = await sdk("get_entitlements", "cus_active")
    assert active.found and active.status == "active"
    assert active.has_access() and active.is_active()
    assert active.has("reports") and active.has("exports") and not active.has("api")
    assert active.config("seats") == 5 and active.config("missing", "x") == "x"
    for _ in range(3):
        assert await sdk("can", "cus_active", "reports") is True
        assert await sdk("can", "cus_active", "api") is False
    assert emulator.count("get_entitlements") == reads + 1, "one upstream read, then a cache"
    if sc is not None:
        assert await t.cache_header("cus_active") == "hit"

    canceled = await sdk("get_entitlements", "cus_canceled")
    assert canceled.found and canceled.status == "canceled"
    assert not canceled.has_access(), "the server withholds access"
    assert canceled.data["modules"] == [], "and empties modules"
    pastdue = await sdk("get_entitlements", "cus_pastdue")
    assert pastdue.has_access() and pastdue.has("reports"), "past_due keeps access"
    nobody = await sdk("get_entitlements", "nobody")
    assert not nobody.found and not nobody.has_access() and not nobody.has("reports")
    reads = emulator.count("get_entitlements")
    assert not (await sdk("get_entitlements", "nobody")).found
    assert emulator.count("get_entitlements") == reads, "the 404 is cached too"
    assert await sdk("can", "cus_canceled", "reports") is False

    # A change nobody told the cache about (no push here): the cached answer stands
    # until something drops it. The SDK's invalidate() drops the SDK's own copy only.
    assert await sdk("can", "cus_trial", "exports") is False
    doc = {"status": "trialing", "modules": ["reports", "exports"]}
    emulator.set_entitlements(t.tenant, "cus_trial", doc)
    assert await sdk("can", "cus_trial", "exports") is False, "the cached answer"
    await sdk("invalidate", "cus_trial")
    if sc is not None:
        await sdk("invalidate")
        assert await sdk("can", "cus_trial", "exports") is False, "the sidecar's cached answer"
        assert (await sc.client.delete("/v1/customers/cus_trial/cache")).status == 204
    assert await sdk("can", "cus_trial", "exports") is True
    await sdk("invalidate")

    # Flags: the upstream's documents, cached like entitlements (one read per customer).
    flag_reads = emulator.count("flags")
    assert await sdk("flags", "cus_active") == {
        "new-dashboard": True,  # the customer's override
        "bulk-export": True,
        "maintenance-banner": False,
    }
    assert (await sdk("flags", "cus_trial"))["bulk-export"] is False
    assert await sdk("global_flags") == {
        "new-dashboard": False,
        "bulk-export": True,
        "maintenance-banner": False,
    }
    assert await sdk("flag", "new-dashboard", "cus_active", default=False) is True
    assert await sdk("flag", "new-dashboard", "cus_trial", default=True) is False
    assert await sdk("flag", "undefined", "cus_active", default=True) is True
    assert emulator.count("flags") == flag_reads + 2, "one upstream read per customer"
    emulator.set_flag(t.tenant, "maintenance-banner", True)
    assert await sdk("flag", "maintenance-banner", "cus_active", default=False) is False, "cached"
    await sdk("invalidate_flags", "cus_active")
    if sc is None:
        assert await sdk("flag", "maintenance-banner", "cus_active", default=False) is True
        await sdk("invalidate_flags")
        assert (await sdk("global_flags"))["maintenance-banner"] is True, "the SDK's is uncached"
        return
    await sdk("invalidate_flags")
    assert (await sdk("global_flags"))["maintenance-banner"] is False, "the sidecar's cache"
    assert (await sc.client.delete("/v1/cache?axis=flags")).status == 204
    assert await sdk("flag", "maintenance-banner", "cus_active", default=False) is True
    assert (await sdk("global_flags"))["maintenance-banner"] is True


async def provisioning_and_subscription_changes(t: Target) -> None:
    sdk, emulator, sc = t.sdk, t.emulator, t.sidecar
    acct, cus = uid("acct"), uid("cus")
    account = await sdk(
        "create_account", account_id=acct, name="Globex", email="ap@globex.example",
        create_billing_customer=True,
    )  # fmt: skip
    assert (account["accountId"], account["name"], account["status"]) == (acct, "Globex", "active")
    assert account["billingCustomerId"].startswith("cus_")
    again = await sdk("create_account", account_id=acct)
    assert again["billingCustomerId"] == account["billingCustomerId"], "the existing account"
    conflict = await sdk.error("create_account", account_id=acct, billing_customer_id="cus_x")
    assert (conflict.status, code(conflict)) == (409, "billing_customer_conflict")
    adopted = await sdk("create_account", account_id=uid("acct"), billing_customer_id="cus_kept")
    assert adopted["billingCustomerId"] == "cus_kept"
    customer = await sdk(
        "create_customer", account_id=acct, customer_id=cus, name="Jane", email="j@x.example"
    )
    assert (customer["customerId"], customer["accountId"], customer["name"]) == (cus, acct, "Jane")
    assert not (await sdk("get_entitlements", cus)).found
    if sc is not None:
        assert await t.cache_header(cus) == "hit", "the sidecar cached the 404"

    # planVersion omitted: the newest version priced in the key's (test) mode is sold.
    checkout = await sdk(
        "create_checkout", account_id=acct, customer_id=cus, plan_id="pro", seats=2, **URLS
    )
    assert checkout["url"].startswith("https://checkout.example/")
    assert (checkout["productId"], checkout["planVersion"], checkout["seats"]) == ("app", 3, 2)
    ambiguous = await sdk.error(
        "create_checkout", account_id=acct, customer_id=cus, plan_id="enterprise", **URLS
    )
    assert (ambiguous.status, code(ambiguous)) == (400, "ambiguous_plan")
    explicit = await sdk(
        "create_checkout", account_id=acct, customer_id=cus, plan_id="enterprise",
        product_id="data", plan_version=1, **URLS,
    )  # fmt: skip
    assert explicit["productId"] == "data" and explicit["planId"] == "enterprise"
    setup = await sdk("create_setup_checkout", account_id=acct, **URLS)
    assert setup["mode"] == "setup" and setup["url"].startswith("https://checkout.example/")

    # Through the sidecar, every write below drops the customer before answering:
    # the very next read sees it, with no invalidate() and no push.
    sub = await sdk("create_subscription", account_id=acct, customer_id=cus, plan_id="team")
    assert (sub["status"], sub["planId"], sub["planVersion"], sub["seats"]) == (
        "active", "team", 2, 1,
    )  # fmt: skip
    assert (sub["currency"], sub["interval"], sub["amount"]) == ("usd", "month", 3400)
    assert sub["currentPeriodEnd"] > sub["currentPeriodStart"]
    assert sub["currentPeriodStart"].endswith("Z")
    second = await sdk.error("create_subscription", account_id=acct, customer_id=cus, plan_id="pro")
    assert (second.status, code(second)) == (409, "subscription_exists")
    live = await sdk.error(
        "create_checkout", account_id=acct, customer_id=cus, plan_id="pro", **URLS
    )
    assert (live.status, code(live)) == (409, "subscription_exists")
    await t.fresh(cus)  # directly, the SDK cached the "not found" for 30 s
    ents = await sdk("get_entitlements", cus)
    assert ents.found and ents.has_access() and ents.has("exports") and not ents.has("api")
    if sc is not None:
        assert await t.cache_header(cus) == "hit"
    methods = await sdk("list_payment_methods", account_id=acct)
    default = next(m for m in methods if m["isDefault"])
    got = await sdk("get_subscription", account_id=acct, customer_id=cus)
    assert got["defaultPaymentMethodRef"] == default["ref"], "byte-identical to the method's ref"

    reads = emulator.count("get_entitlements")
    preview = await sdk(
        "preview_change", account_id=acct, customer_id=cus, seats=5, add_on_module_ids=["sso"]
    )
    assert (preview["proposed"]["seats"], preview["current"]["seats"]) == (5, 1)
    assert preview["amountDueNow"] == (5 * 3400 + 1500) - 3400
    assert await sdk("get_subscription", account_id=acct, customer_id=cus) == got, "no change"
    assert await sdk("can", cus, "sso") is False
    assert emulator.count("get_entitlements") == reads, "a preview drops nothing"

    assert (await sdk("set_seats", account_id=acct, customer_id=cus, seats=3))["seats"] == 3
    await t.fresh(cus)
    assert (await sdk("get_entitlements", cus)).config("seats") == 3
    added = await sdk("add_add_on", account_id=acct, customer_id=cus, module_id="sso")
    assert added["addOnModuleIds"] == ["sso"]
    await t.fresh(cus)
    assert await sdk("can", cus, "sso") is True, "the add-on's module is granted"
    unknown = await sdk.error("add_add_on", account_id=acct, customer_id=cus, module_id="x")
    assert (unknown.status, code(unknown)) == (400, "unknown_add_on")
    removed = await sdk("remove_add_on", account_id=acct, customer_id=cus, module_id="sso")
    assert removed["addOnModuleIds"] == []
    await t.fresh(cus)
    assert await sdk("can", cus, "sso") is False
    planned = await sdk(
        "change_plan", account_id=acct, customer_id=cus, plan_id="pro", plan_version=2
    )
    assert (planned["planId"], planned["planVersion"], planned["seats"]) == ("pro", 2, 3)
    await t.fresh(cus)
    assert await sdk("can", cus, "api") is True
    updated = await sdk(
        "update_subscription", account_id=acct, customer_id=cus, plan_id="team", plan_version=1,
        product_id="app", seats=4, add_on_module_ids=["api"],
    )  # fmt: skip
    assert (updated["planId"], updated["seats"], updated["addOnModuleIds"]) == ("team", 4, ["api"])
    await t.fresh(cus)
    ents = await sdk("get_entitlements", cus)
    assert ents.has("api") and ents.config("seats") == 4, "team + the api add-on"

    later = await sdk("cancel_subscription", account_id=acct, customer_id=cus, at_period_end=True)
    assert later["cancelAtPeriodEnd"] is True and later["status"] == "active"
    await t.fresh(cus)
    assert await sdk("can", cus, "api") is True, "access lasts until the period ends"
    back = await sdk("reactivate", account_id=acct, customer_id=cus)
    assert back["cancelAtPeriodEnd"] is False and back["status"] == "active"
    nothing = await sdk.error("reactivate", account_id=acct, customer_id=cus)
    assert (nothing.status, code(nothing)) == (409, "subscription_active")
    ended = await sdk("cancel_subscription", account_id=acct, customer_id=cus)
    assert ended["status"] == "canceled" and "canceledAt" in ended
    await t.fresh(cus)
    gone = await sdk("get_entitlements", cus)
    assert gone.status == "canceled" and not gone.has_access() and not gone.has("api")
    assert (await sdk("reactivate", account_id=acct, customer_id=cus))["status"] == "active"
    await t.fresh(cus)
    assert await sdk("can", cus, "api") is True

    paused = await sdk("set_customer_status", account_id=acct, customer_id=cus, status="paused")
    assert paused["status"] == "paused"
    await t.fresh(cus)
    assert not (await sdk("get_entitlements", cus)).has_access()
    await sdk("set_customer_status", account_id=acct, customer_id=cus, status="active")
    await t.fresh(cus)
    assert await sdk("can", cus, "api") is True
    suspended = await sdk("set_account_status", account_id=acct, status="suspended")
    assert suspended["status"] == "suspended"
    await t.fresh(cus)
    doc = await sdk("get_entitlements", cus)
    assert doc.data["accountStatus"] == "suspended" and not doc.has_access()
    assert doc.data["modules"] == [], "the account's customers were dropped"


async def payment_methods_and_invoices(t: Target) -> None:
    sdk, emulator = t.sdk, t.emulator
    acct, other, cus = uid("acct"), uid("acct"), uid("cus")
    await sdk("create_account", account_id=acct, name="Initech")
    await sdk("create_account", account_id=other)
    await sdk("create_customer", account_id=acct, customer_id=cus)
    await sdk("create_subscription", account_id=acct, customer_id=cus, plan_id="pro",
              plan_version=1, seats=2)  # fmt: skip
    methods = await sdk("list_payment_methods", account_id=acct)
    assert [set(m) for m in methods] == [
        {"ref", "brand", "last4", "expMonth", "expYear", "name", "isDefault"}
    ] * 2
    assert [m["isDefault"] for m in methods] == [True, False]
    assert methods[0]["name"] == "Initech"
    spare = methods[1]["ref"]
    made = await sdk("set_default_payment_method", account_id=acct, method_id=spare)
    assert (made["ref"], made["isDefault"]) == (spare, True)
    paying = await sdk(
        "set_subscription_payment_method", account_id=acct, customer_id=cus, method_id=spare
    )
    assert paying["defaultPaymentMethodRef"] == spare, "answers the subscription view"
    in_use = await sdk.error("remove_payment_method", account_id=acct, method_id=spare)
    assert (in_use.status, code(in_use)) == (409, "payment_method_in_use")
    removed = await sdk("remove_payment_method", account_id=acct, method_id=methods[0]["ref"])
    assert removed == {"ref": methods[0]["ref"], "removed": True}
    assert [m["ref"] for m in await sdk("list_payment_methods", account_id=acct)] == [spare]
    foreign = (await sdk("list_payment_methods", account_id=other))[0]["ref"]
    for method_id in (foreign, "pm_acme_visa", "card_1"):
        for name in ("set_default_payment_method", "remove_payment_method"):
            missing = await sdk.error(name, account_id=acct, method_id=method_id)
            assert (missing.status, code(missing)) == (404, "payment_method_not_found")
        missing = await sdk.error(
            "set_subscription_payment_method", account_id=acct, customer_id=cus,
            method_id=method_id,
        )  # fmt: skip
        assert missing.status == 404

    invoices = await sdk("list_invoices", account_id=acct)
    assert len(invoices) == 1
    invoice = invoices[0]
    assert set(invoice) == {
        "ref", "number", "status", "amountDue", "amountPaid", "subtotal", "total", "tax",
        "paid", "currency", "created", "hostedInvoiceUrl",
    }  # fmt: skip
    assert (invoice["total"], invoice["amountPaid"], invoice["paid"]) == (2 * 4900, 9800, True)
    assert await sdk("list_invoices", account_id=acct, customer_id=cus) == invoices
    assert await sdk("list_invoices", account_id=acct, customer_id="someone-else") == []
    pdf = await sdk("invoice_pdf", account_id=acct, invoice_id=invoice["ref"])
    assert isinstance(pdf, bytes) and pdf.startswith(b"%PDF-"), "a PDF stays a PDF"
    text = pypdf.PdfReader(io.BytesIO(pdf), strict=True).pages[0].extract_text()
    assert invoice["number"] in text and "98.00 USD" in text
    seeded = (await sdk("list_invoices", account_id="acme"))[0]["ref"]
    for account, invoice_id in ((acct, seeded), (acct, "in_acme_0001"), ("acme", invoice["ref"])):
        missing = await sdk.error("invoice_pdf", account_id=account, invoice_id=invoice_id)
        assert (missing.status, code(missing)) == (404, "invoice_not_found")
    # An upstream from before SDK 1.2 redirects: the redirect is never followed (the
    # sidecar passes it on), and 1.4.2, which wants bytes, says so.
    emulator.settings.invoice_pdf = "redirect"
    try:
        redirected = await sdk.error("invoice_pdf", account_id=acct, invoice_id=invoice["ref"])
    finally:
        emulator.settings.invoice_pdf = "bytes"
    assert redirected.status == 302
    assert orjson.loads(redirected.body)["url"].startswith("https://files.invoices.example/")


async def credits(t: Target) -> None:
    sdk, emulator = t.sdk, t.emulator
    types = await sdk("list_credit_types")
    assert [ct["creditTypeId"] for ct in types] == ["api-calls", "exports"]
    packs = await sdk("list_credit_packs", credit_type_id="api-calls")
    assert [(p["packId"], p["credits"]) for p in packs] == [
        ("calls-1k", 1000),
        ("calls-10k", 10000),
    ]
    unknown = await sdk.error("list_credit_packs", credit_type_id="gold")
    assert (unknown.status, code(unknown)) == (404, "credit_type_not_found")

    balances = await sdk("list_credits", customer_id="cus_active")
    assert {c["creditTypeId"]: c["balance"] for c in balances} == {"api-calls": 5000, "exports": 20}
    balance = await sdk("get_credit_balance", customer_id="cus_active", credit_type_id="exports")
    assert (balance["balance"], balance["unit"]) == (20, "export")

    key = uid("idem")
    spent = await sdk("consume_credits", customer_id="cus_active", credit_type_id="exports",
                      amount=5, idempotency_key=key)  # fmt: skip
    assert (spent["balance"], spent["consumed"]) == (15, 5)
    replay = await sdk("consume_credits", customer_id="cus_active", credit_type_id="exports",
                       amount=5, idempotency_key=key)  # fmt: skip
    assert replay == spent, "the same key: the same answer, deducted once"
    short = await sdk.error("consume_credits", customer_id="cus_active", credit_type_id="exports",
                            amount=16, idempotency_key=uid("idem"))  # fmt: skip
    assert (short.status, code(short)) == (409, "insufficient_credits")
    after = await sdk("get_credit_balance", customer_id="cus_active", credit_type_id="exports")
    assert after["balance"] == 15, "nothing deducted"
    # Balances change out of band: a balance read is never a cached one.
    emulator.set_credits(t.tenant, "cus_active", "exports", 7)
    after = await sdk("get_credit_balance", customer_id="cus_active", credit_type_id="exports")
    assert after["balance"] == 7

    single = await sdk(
        "create_credit_checkout", account_id="acme", customer_id="cus_trial",
        credit_type_id="exports", pack_id="exports-10", quantity=2, **URLS,
    )  # fmt: skip
    assert (single["mode"], single["amountTotal"]) == ("payment", 1000)
    several = await sdk(
        "create_credit_checkout", account_id="acme", customer_id="cus_trial", **URLS,
        items=[{"creditTypeId": "api-calls", "packId": "calls-1k"},
               {"creditTypeId": "exports", "packId": "exports-10", "quantity": 3}],
    )  # fmt: skip
    assert [i["credits"] for i in several["items"]] == [1000, 30]
    none_chosen = await sdk.error(
        "create_credit_checkout", account_id="acme", customer_id="cus_trial", **URLS
    )
    assert (none_chosen.status, code(none_chosen)) == (400, "missing_field")
    emulator.complete_checkout(t.tenant, several["id"])
    topped = await sdk("list_credits", customer_id="cus_trial")
    assert {c["creditTypeId"]: c["balance"] for c in topped} == {"api-calls": 1100, "exports": 30}
