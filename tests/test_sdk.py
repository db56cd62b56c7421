"""The upstream's own SDK, ``vellumcharter`` 1.4.2 from PyPI, unmodified, through the sidecar.

Every public method of ``VellumCharterClient`` and ``AsyncVellumCharterClient``
runs with its ``base_url`` pointed at the sidecar's drop-in mirror, in front of the
emulator, and its answers are checked. The SDK carries the app's own key, which
the emulator would refuse: every request the emulator saw carried the sidecar's
key instead. The SDK's own caches are off (TTL 0), so every read reaches the
sidecar and the emulator's request counts show which reads (entitlements,
flags) the sidecar answered from its cache. Writes need no ``invalidate()``: the
sidecar drops what a write changed before answering. (``tests/test_emulator_sdk.py``
drives the same SDK against the emulator directly.)
"""

from __future__ import annotations

import asyncio
import inspect
import io
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pypdf
import pytest
from aiohttp.test_utils import TestServer
from vellumcharter import (
    AsyncVellumCharterClient,
    VellumCharterApiError,
    VellumCharterClient,
)

from sidecar.emulator import Emulator, create_emulator_app
from sidecar.http.operations import OPERATIONS

from .conftest import API_KEY, Sidecar, SidecarFactory, eventually

CALLER_KEY = "sk_app_own_key_" + "a" * 20
URLS = {"success_url": "https://app.example/ok", "cancel_url": "https://app.example/no"}

SYNC_PUBLIC = {n for n, _ in inspect.getmembers(VellumCharterClient) if not n.startswith("_")}
ASYNC_PUBLIC = {n for n, _ in inspect.getmembers(AsyncVellumCharterClient) if not n.startswith("_")}
#: The methods that only touch the SDK's own in-memory cache.
LOCAL = {"invalidate", "invalidate_flags"}


@pytest.fixture
async def emulator_server(
    aiohttp_server: Callable[..., Awaitable[TestServer]], tenant: str
) -> TestServer:
    """The emulator with the demo data in this test's tenant; only the sidecar's key works."""
    app = create_emulator_app(api_keys=[API_KEY], default_tenant=tenant, seed=True)
    return await aiohttp_server(app)


class Sdk:
    """One SDK flavour behind one awaitable interface; records which methods ran."""

    def __init__(self, flavour: str, base_url: str, tenant: str) -> None:
        self.flavour = flavour
        options: dict[str, Any] = {"base_url": base_url, "cache_ttl_ms": 0, "flag_cache_ttl_ms": 0}
        self.sync = VellumCharterClient(CALLER_KEY, tenant, **options)
        self.aio = AsyncVellumCharterClient(CALLER_KEY, tenant, **options)
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


@pytest.fixture(params=["sync", "async"])
async def sdk_and_sidecar(
    request: pytest.FixtureRequest, make_sidecar: SidecarFactory, redis_url: str, tenant: str
) -> tuple[Sdk, Sidecar]:
    sc = await make_sidecar(redis_url)
    base = str(sc.client.make_url("")).rstrip("/")
    return Sdk(request.param, base, tenant), sc


def uid(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def code(error: VellumCharterApiError) -> str:
    parsed: str = orjson.loads(error.body)["error"]["code"]
    return parsed


async def cache_header(sc: Sidecar, customer: str) -> str:
    """Where the sidecar finds the customer now (``X-Sidecar-Cache`` of its /v1 read)."""
    resp = await sc.client.get(f"/v1/customers/{customer}/entitlements")
    assert resp.status == 200
    return resp.headers["X-Sidecar-Cache"]


# -- the journeys: together they call every public method ----------------------------------


async def entitlements_and_flags(sdk: Sdk, sc: Sidecar, emulator: Emulator, tenant: str) -> None:
    reads = emulator.count("get_entitlements")
    active = await sdk("get_entitlements", "cus_active")
    assert active.found and active.status == "active"
    assert active.has_access() and active.is_active()
    assert active.has("reports") and active.has("exports") and not active.has("api")
    assert active.config("seats") == 5 and active.config("missing", "x") == "x"
    for _ in range(3):
        assert await sdk("can", "cus_active", "reports") is True
        assert await sdk("can", "cus_active", "api") is False
    assert emulator.count("get_entitlements") == reads + 1, "one upstream read, then the cache"
    assert await cache_header(sc, "cus_active") == "hit"

    canceled = await sdk("get_entitlements", "cus_canceled")
    assert canceled.found and canceled.status == "canceled"
    assert not canceled.has_access() and canceled.data["modules"] == []
    pastdue = await sdk("get_entitlements", "cus_pastdue")
    assert pastdue.has_access() and pastdue.has("reports"), "past_due keeps access"
    nobody = await sdk("get_entitlements", "nobody")
    assert not nobody.found and not nobody.has_access() and not nobody.has("reports")
    reads = emulator.count("get_entitlements")
    assert not (await sdk("get_entitlements", "nobody")).found
    assert emulator.count("get_entitlements") == reads, "the 404 is cached too"

    # A change the sidecar is not told about (no push here): its cached answer stands
    # until something drops it; the SDK's invalidate() only touches the SDK's cache.
    assert await sdk("can", "cus_trial", "exports") is False
    emulator.set_entitlements(tenant, "cus_trial", {"status": "trialing", "modules": ["exports"]})
    assert await sdk("can", "cus_trial", "exports") is False, "the sidecar's cached answer"
    await sdk("invalidate", "cus_trial")
    await sdk("invalidate")
    assert await sdk("can", "cus_trial", "exports") is False
    assert (await sc.client.delete("/v1/customers/cus_trial/cache")).status == 204
    assert await sdk("can", "cus_trial", "exports") is True

    # Flags: the upstream's documents, each cached by the sidecar like entitlements.
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
    # As for entitlements: a change nobody told the sidecar about waits for a drop.
    emulator.set_flag(tenant, "maintenance-banner", True)
    assert await sdk("flag", "maintenance-banner", "cus_active", default=False) is False
    await sdk("invalidate_flags", "cus_active")
    await sdk("invalidate_flags")
    assert (await sdk("global_flags"))["maintenance-banner"] is False, "the sidecar's cache"
    assert (await sc.client.delete("/v1/cache?axis=flags")).status == 204
    assert await sdk("flag", "maintenance-banner", "cus_active", default=False) is True
    assert (await sdk("global_flags"))["maintenance-banner"] is True


async def provisioning_and_subscription_changes(sdk: Sdk, sc: Sidecar, emulator: Emulator) -> None:
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
    customer = await sdk(
        "create_customer", account_id=acct, customer_id=cus, name="Jane", email="j@x.example"
    )
    assert (customer["customerId"], customer["accountId"], customer["name"]) == (cus, acct, "Jane")
    assert not (await sdk("get_entitlements", cus)).found
    assert await cache_header(sc, cus) == "hit", "the sidecar cached the 404"

    checkout = await sdk(
        "create_checkout", account_id=acct, customer_id=cus, plan_id="pro", seats=2, **URLS
    )
    assert checkout["url"].startswith("https://checkout.example/")
    assert (checkout["productId"], checkout["planVersion"], checkout["seats"]) == ("app", 3, 2)
    ambiguous = await sdk.error(
        "create_checkout", account_id=acct, customer_id=cus, plan_id="enterprise", **URLS
    )
    assert (ambiguous.status, code(ambiguous)) == (400, "ambiguous_plan")
    setup = await sdk("create_setup_checkout", account_id=acct, **URLS)
    assert setup["mode"] == "setup"

    # Every write below drops the customer on the sidecar before answering: the very
    # next read sees it, with no invalidate() and no push.
    sub = await sdk("create_subscription", account_id=acct, customer_id=cus, plan_id="team")
    assert (sub["status"], sub["planId"], sub["planVersion"], sub["seats"]) == (
        "active", "team", 2, 1,
    )  # fmt: skip
    assert sub["currentPeriodStart"].endswith("Z")
    second = await sdk.error("create_subscription", account_id=acct, customer_id=cus, plan_id="pro")
    assert (second.status, code(second)) == (409, "subscription_exists")
    ents = await sdk("get_entitlements", cus)
    assert ents.found and ents.has_access() and ents.has("exports") and not ents.has("api")
    assert await cache_header(sc, cus) == "hit"
    got = await sdk("get_subscription", account_id=acct, customer_id=cus)
    methods = await sdk("list_payment_methods", account_id=acct)
    assert got["defaultPaymentMethodRef"] == next(m["ref"] for m in methods if m["isDefault"])

    reads = emulator.count("get_entitlements")
    preview = await sdk(
        "preview_change", account_id=acct, customer_id=cus, seats=5, add_on_module_ids=["sso"]
    )
    assert (preview["proposed"]["seats"], preview["current"]["seats"]) == (5, 1)
    assert preview["amountDueNow"] == (5 * 3400 + 1500) - 3400
    assert not await sdk("can", cus, "sso")
    assert emulator.count("get_entitlements") == reads, "a preview drops nothing"

    assert (await sdk("set_seats", account_id=acct, customer_id=cus, seats=3))["seats"] == 3
    assert (await sdk("get_entitlements", cus)).config("seats") == 3
    added = await sdk("add_add_on", account_id=acct, customer_id=cus, module_id="sso")
    assert added["addOnModuleIds"] == ["sso"]
    assert await sdk("can", cus, "sso") is True
    unknown = await sdk.error("add_add_on", account_id=acct, customer_id=cus, module_id="x")
    assert (unknown.status, code(unknown)) == (400, "unknown_add_on")
    removed = await sdk("remove_add_on", account_id=acct, customer_id=cus, module_id="sso")
    assert removed["addOnModuleIds"] == []
    assert await sdk("can", cus, "sso") is False
    planned = await sdk(
        "change_plan", account_id=acct, customer_id=cus, plan_id="pro", plan_version=2
    )
    assert (planned["planId"], planned["planVersion"], planned["seats"]) == ("pro", 2, 3)
    assert await sdk("can", cus, "api") is True
    updated = await sdk(
        "update_subscription", account_id=acct, customer_id=cus, plan_id="team", plan_version=1,
        product_id="app", seats=4, add_on_module_ids=["api"],
    )  # fmt: skip
    assert (updated["planId"], updated["seats"], updated["addOnModuleIds"]) == ("team", 4, ["api"])
    ents = await sdk("get_entitlements", cus)
    assert ents.has("api") and ents.config("seats") == 4, "team + the api add-on"

    later = await sdk("cancel_subscription", account_id=acct, customer_id=cus, at_period_end=True)
    assert later["cancelAtPeriodEnd"] is True and later["status"] == "active"
    assert await sdk("can", cus, "api") is True, "access lasts until the period ends"
    back = await sdk("reactivate", account_id=acct, customer_id=cus)
    assert back["cancelAtPeriodEnd"] is False
    nothing = await sdk.error("reactivate", account_id=acct, customer_id=cus)
    assert (nothing.status, code(nothing)) == (409, "subscription_active")
    ended = await sdk("cancel_subscription", account_id=acct, customer_id=cus)
    assert ended["status"] == "canceled" and "canceledAt" in ended
    gone = await sdk("get_entitlements", cus)
    assert gone.status == "canceled" and not gone.has_access() and not gone.has("api")
    assert (await sdk("reactivate", account_id=acct, customer_id=cus))["status"] == "active"
    assert await sdk("can", cus, "api") is True

    paused = await sdk("set_customer_status", account_id=acct, customer_id=cus, status="paused")
    assert paused["status"] == "paused"
    assert not (await sdk("get_entitlements", cus)).has_access()
    await sdk("set_customer_status", account_id=acct, customer_id=cus, status="active")
    assert await sdk("can", cus, "api") is True
    suspended = await sdk("set_account_status", account_id=acct, status="suspended")
    assert suspended["status"] == "suspended"
    doc = await sdk("get_entitlements", cus)
    assert doc.data["accountStatus"] == "suspended" and not doc.has_access()
    assert doc.data["modules"] == [], "the account's customers were dropped"


async def payment_methods_and_invoices(sdk: Sdk, emulator: Emulator) -> None:
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
    spare = methods[1]["ref"]
    made = await sdk("set_default_payment_method", account_id=acct, method_id=spare)
    assert (made["ref"], made["isDefault"]) == (spare, True)
    paying = await sdk(
        "set_subscription_payment_method", account_id=acct, customer_id=cus, method_id=spare
    )
    assert paying["defaultPaymentMethodRef"] == spare
    in_use = await sdk.error("remove_payment_method", account_id=acct, method_id=spare)
    assert (in_use.status, code(in_use)) == (409, "payment_method_in_use")
    removed = await sdk("remove_payment_method", account_id=acct, method_id=methods[0]["ref"])
    assert removed == {"ref": methods[0]["ref"], "removed": True}
    foreign = (await sdk("list_payment_methods", account_id=other))[0]["ref"]
    for method_id in (foreign, "pm_acme_visa"):
        missing = await sdk.error(
            "set_default_payment_method", account_id=acct, method_id=method_id
        )
        assert (missing.status, code(missing)) == (404, "payment_method_not_found")

    invoices = await sdk("list_invoices", account_id=acct)
    assert len(invoices) == 1
    invoice = invoices[0]
    assert (invoice["total"], invoice["amountPaid"], invoice["paid"]) == (2 * 4900, 9800, True)
    assert await sdk("list_invoices", account_id=acct, customer_id=cus) == invoices
    assert await sdk("list_invoices", account_id=acct, customer_id="someone-else") == []
    pdf = await sdk("invoice_pdf", account_id=acct, invoice_id=invoice["ref"])
    assert isinstance(pdf, bytes) and pdf.startswith(b"%PDF-"), "a PDF stays a PDF"
    text = pypdf.PdfReader(io.BytesIO(pdf), strict=True).pages[0].extract_text()
    assert invoice["number"] in text and "98.00 USD" in text
    missing_pdf = await sdk.error("invoice_pdf", account_id=acct, invoice_id="in_acme_0001")
    assert (missing_pdf.status, code(missing_pdf)) == (404, "invoice_not_found")
    # An upstream from before SDK 1.2 redirects: the sidecar passes the 302 on, never
    # follows it, and 1.4.2 (which wants bytes) says so.
    emulator.settings.invoice_pdf = "redirect"
    try:
        redirected = await sdk.error("invoice_pdf", account_id=acct, invoice_id=invoice["ref"])
    finally:
        emulator.settings.invoice_pdf = "bytes"
    assert redirected.status == 302
    assert orjson.loads(redirected.body)["url"].startswith("https://files.invoices.example/")


async def credits(sdk: Sdk, emulator: Emulator, tenant: str) -> None:
    types = await sdk("list_credit_types")
    assert [t["creditTypeId"] for t in types] == ["api-calls", "exports"]
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
    # Balances change out of band: a read through the sidecar is never a cached one.
    emulator.set_credits(tenant, "cus_active", "exports", 7)
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
    emulator.complete_checkout(tenant, several["id"])
    topped = await sdk("list_credits", customer_id="cus_trial")
    assert {c["creditTypeId"]: c["balance"] for c in topped} == {"api-calls": 1100, "exports": 30}


# -- the tests -------------------------------------------------------------------------------


def test_the_table_serves_every_method_of_the_sdk() -> None:
    assert SYNC_PUBLIC == ASYNC_PUBLIC
    served = {method for op in OPERATIONS for method in op.sdk}
    assert served == SYNC_PUBLIC - LOCAL, sorted(served ^ (SYNC_PUBLIC - LOCAL))


async def test_every_public_method_through_the_mirror(
    sdk_and_sidecar: tuple[Sdk, Sidecar], emulator: Emulator, tenant: str
) -> None:
    sdk, sc = sdk_and_sidecar
    await entitlements_and_flags(sdk, sc, emulator, tenant)
    await provisioning_and_subscription_changes(sdk, sc, emulator)
    await payment_methods_and_invoices(sdk, emulator)
    await credits(sdk, emulator, tenant)
    assert sdk.called == SYNC_PUBLIC, sorted(SYNC_PUBLIC ^ sdk.called)

    assert emulator.requests, "the upstream saw nothing"
    assert {r.api_key for r in emulator.requests} == {API_KEY}, "only the sidecar's key"
    assert all(r.tenant == tenant for r in emulator.requests)
    assert emulator.count("unknown") == 0, "every call was an operation of the table"
    served = {r.operation for r in emulator.requests}
    assert served == {op.name for op in OPERATIONS}


async def test_a_write_through_one_sidecar_reaches_the_sdk_on_another(
    make_sidecar: SidecarFactory, emulator: Emulator, redis_url: str, tenant: str
) -> None:
    """Two sidecars share a Redis; an SDK on each. A subscription change made through
    one is seen through the other without a push (the write's drop fans out)."""
    a, b = await make_sidecar(redis_url), await make_sidecar(redis_url)
    on_a = Sdk("async", str(a.client.make_url("")).rstrip("/"), tenant)
    on_b = Sdk("sync", str(b.client.make_url("")).rstrip("/"), tenant)
    assert await on_b("can", "cus_active", "sso") is False
    assert await cache_header(b, "cus_active") == "hit"
    await on_a("add_add_on", account_id="acme", customer_id="cus_active", module_id="sso")
    assert await on_a("can", "cus_active", "sso") is True

    async def b_sees_it() -> bool:
        return bool(await on_b("can", "cus_active", "sso"))

    await eventually(b_sees_it, timeout=5)
    assert emulator.webhook_url is None, "no push helped"
