"""The upstream's own SDK, ``vellumcharter`` 1.4.2 from PyPI, unmodified, against the emulator.

Every public method of ``VellumCharterClient`` and ``AsyncVellumCharterClient``
runs against a real emulator server and its answers are checked: the emulator
is right when the SDK that talks to the real service is satisfied with it. The
pushes the emulator sends are checked with the SDK's own ``verify_push_signature``.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
import pypdf
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer
from vellumcharter import (
    AsyncVellumCharterClient,
    VellumCharterApiError,
    VellumCharterAuthError,
    VellumCharterClient,
    VellumCharterSignatureError,
    verify_push_signature,
)

from sidecar.emulator import DEMO_TENANT, EMULATOR, Emulator, create_emulator_app

API_KEY = "sdk_test_key_" + "k" * 16
SECRET = "whsec_sdk_" + "s" * 20
URLS = {"success_url": "https://app.example/ok", "cancel_url": "https://app.example/no"}

SYNC_PUBLIC = {n for n, _ in inspect.getmembers(VellumCharterClient) if not n.startswith("_")}
ASYNC_PUBLIC = {n for n, _ in inspect.getmembers(AsyncVellumCharterClient) if not n.startswith("_")}


@dataclass
class Receiver:
    """Stands in for the sidecar's webhook listener; ``fail_first`` answers 503 first."""

    url: str = ""
    fail_first: int = 0
    received: list[tuple[bytes, str]] = field(default_factory=list)


@pytest.fixture
async def receiver(aiohttp_server: AiohttpServer) -> Receiver:
    receiver = Receiver()

    async def webhook(request: web.Request) -> web.Response:
        receiver.received.append(
            (await request.read(), request.headers.get("X-Vellum-Signature", ""))
        )
        if receiver.fail_first > 0:
            receiver.fail_first -= 1
            return web.json_response({"error": "try later"}, status=503)
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/webhooks/vellum", webhook)
    server = await aiohttp_server(app)
    receiver.url = str(server.make_url("/webhooks/vellum"))
    return receiver


@pytest.fixture
async def server(aiohttp_server: AiohttpServer, receiver: Receiver) -> TestServer:
    app = create_emulator_app(
        api_keys=[API_KEY], webhook_url=receiver.url, webhook_secret=SECRET, seed=True
    )
    return await aiohttp_server(app)


@pytest.fixture
def emulator(server: TestServer) -> Emulator:
    return server.app[EMULATOR]


class Sdk:
    """One SDK flavour behind one awaitable interface; records which methods ran."""

    def __init__(self, flavour: str, base_url: str, api_key: str = API_KEY) -> None:
        self.flavour = flavour
        self.sync = VellumCharterClient(api_key, DEMO_TENANT, base_url=base_url)
        self.aio = AsyncVellumCharterClient(api_key, DEMO_TENANT, base_url=base_url)
        self.called: set[str] = set()

    async def __call__(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        self.called.add(name)
        if self.flavour == "async":
            method = getattr(self.aio, name)
            result = method(*args, **kwargs)
            return await result if inspect.isawaitable(result) else result
        method = getattr(self.sync, name)
        if name.startswith("invalidate"):
            return method(*args, **kwargs)
        # The sync SDK blocks on urllib: off the loop that runs the emulator.
        return await asyncio.to_thread(method, *args, **kwargs)

    async def error(self, name: str, /, *args: Any, **kwargs: Any) -> VellumCharterApiError:
        with pytest.raises(VellumCharterApiError) as caught:
            await self(name, *args, **kwargs)
        return caught.value


@pytest.fixture(params=["sync", "async"])
def sdk(request: pytest.FixtureRequest, server: TestServer) -> Sdk:
    return Sdk(request.param, str(server.make_url("")).rstrip("/"))


def uid(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def code(error: VellumCharterApiError) -> str:
    parsed: str = orjson.loads(error.body)["error"]["code"]
    return parsed


# -- every public method: journeys, run by one test per flavour --------------------------


def test_both_clients_have_the_same_public_surface() -> None:
    assert SYNC_PUBLIC == ASYNC_PUBLIC
    assert len(SYNC_PUBLIC) == 35  # 33 calls over the 30 routes, and 2 local cache drops


async def entitlements_and_flags(sdk: Sdk, emulator: Emulator) -> None:
    active = await sdk("get_entitlements", "cus_active")
    assert active.found and active.status == "active"
    assert active.has_access() and active.is_active()
    assert active.has("reports") and active.has("exports") and not active.has("api")
    assert active.config("seats") == 5
    assert active.config("missing", "fallback") == "fallback"
    canceled = await sdk("get_entitlements", "cus_canceled")
    assert canceled.found and canceled.status == "canceled"
    assert not canceled.has_access(), "the server withholds access"
    assert canceled.data["modules"] == [], "and empties modules"
    pastdue = await sdk("get_entitlements", "cus_pastdue")
    assert pastdue.has_access() and pastdue.has("reports"), "past_due keeps access"
    nobody = await sdk("get_entitlements", "nobody")
    assert not nobody.found and not nobody.has_access() and not nobody.has("reports")
    assert await sdk("can", "cus_active", "reports") is True
    assert await sdk("can", "cus_trial", "exports") is False
    assert await sdk("can", "cus_canceled", "reports") is False

    # The SDK caches for 30 s; invalidate() makes it read the emulator's change.
    emulator.set_entitlements(DEMO_TENANT, "cus_trial", {"modules": ["reports", "exports"]})
    assert await sdk("can", "cus_trial", "exports") is False, "still the cached answer"
    await sdk("invalidate", "cus_trial")
    assert await sdk("can", "cus_trial", "exports") is True
    await sdk("invalidate")

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
    emulator.set_flag(DEMO_TENANT, "maintenance-banner", True)
    assert await sdk("flag", "maintenance-banner", "cus_active", default=False) is False, "cached"
    await sdk("invalidate_flags", "cus_active")
    assert await sdk("flag", "maintenance-banner", "cus_active", default=False) is True
    await sdk("invalidate_flags")
    assert (await sdk("global_flags"))["maintenance-banner"] is True, "uncached"


async def provisioning_and_subscription_changes(sdk: Sdk, emulator: Emulator) -> None:
    acct, cus = uid("acct"), uid("cus")
    account = await sdk(
        "create_account", account_id=acct, name="Globex", email="ap@globex.example",
        create_billing_customer=True,
    )  # fmt: skip
    assert (account["accountId"], account["name"], account["status"]) == (acct, "Globex", "active")
    assert account["billingCustomerId"].startswith("cus_")
    again = await sdk("create_account", account_id=acct)
    assert again["billingCustomerId"] == account["billingCustomerId"], "create is idempotent"
    conflict = await sdk.error("create_account", account_id=acct, billing_customer_id="cus_x")
    assert (conflict.status, code(conflict)) == (409, "billing_customer_conflict")
    adopted = await sdk("create_account", account_id=uid("acct"), billing_customer_id="cus_kept")
    assert adopted["billingCustomerId"] == "cus_kept"
    customer = await sdk(
        "create_customer", account_id=acct, customer_id=cus, name="Jane", email="j@x.example"
    )
    assert (customer["customerId"], customer["accountId"], customer["name"]) == (cus, acct, "Jane")
    assert not (await sdk("get_entitlements", cus)).found

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
    await sdk("invalidate", cus)  # the SDK cached the "not found" for 30 s
    ents = await sdk("get_entitlements", cus)
    assert ents.has_access() and ents.has("exports") and not ents.has("api")
    methods = await sdk("list_payment_methods", account_id=acct)
    default = next(m for m in methods if m["isDefault"])
    got = await sdk("get_subscription", account_id=acct, customer_id=cus)
    assert got["defaultPaymentMethodRef"] == default["ref"], "byte-identical to the method's ref"

    preview = await sdk(
        "preview_change", account_id=acct, customer_id=cus, seats=5, add_on_module_ids=["sso"]
    )
    assert (preview["proposed"]["seats"], preview["current"]["seats"]) == (5, 1)
    assert preview["amountDueNow"] == (5 * 3400 + 1500) - 3400
    assert await sdk("get_subscription", account_id=acct, customer_id=cus) == got, "no change"

    seated = await sdk("set_seats", account_id=acct, customer_id=cus, seats=3)
    assert seated["seats"] == 3
    added = await sdk("add_add_on", account_id=acct, customer_id=cus, module_id="sso")
    assert added["addOnModuleIds"] == ["sso"]
    await sdk("invalidate", cus)
    ents = await sdk("get_entitlements", cus)
    assert ents.has("sso") and ents.config("seats") == 3, "the add-on's module is granted"
    included = await sdk.error("add_add_on", account_id=acct, customer_id=cus, module_id="x")
    assert (included.status, code(included)) == (400, "unknown_add_on")
    removed = await sdk("remove_add_on", account_id=acct, customer_id=cus, module_id="sso")
    assert removed["addOnModuleIds"] == []
    planned = await sdk(
        "change_plan", account_id=acct, customer_id=cus, plan_id="pro", plan_version=2
    )
    assert (planned["planId"], planned["planVersion"], planned["seats"]) == ("pro", 2, 3)
    await sdk("invalidate", cus)
    assert await sdk("can", cus, "api") is True
    updated = await sdk(
        "update_subscription", account_id=acct, customer_id=cus, plan_id="team", plan_version=1,
        product_id="app", seats=4, add_on_module_ids=["api"],
    )  # fmt: skip
    assert (updated["planId"], updated["seats"], updated["addOnModuleIds"]) == ("team", 4, ["api"])
    await sdk("invalidate", cus)
    assert await sdk("can", cus, "api") is True, "team + the api add-on"

    later = await sdk("cancel_subscription", account_id=acct, customer_id=cus, at_period_end=True)
    assert later["cancelAtPeriodEnd"] is True and later["status"] == "active"
    back = await sdk("reactivate", account_id=acct, customer_id=cus)
    assert back["cancelAtPeriodEnd"] is False and back["status"] == "active"
    nothing = await sdk.error("reactivate", account_id=acct, customer_id=cus)
    assert (nothing.status, code(nothing)) == (409, "subscription_active")
    ended = await sdk("cancel_subscription", account_id=acct, customer_id=cus)
    assert ended["status"] == "canceled" and "canceledAt" in ended
    await sdk("invalidate", cus)
    gone = await sdk("get_entitlements", cus)
    assert gone.status == "canceled" and not gone.has_access() and not gone.has("api")
    revived = await sdk("reactivate", account_id=acct, customer_id=cus)
    assert revived["status"] == "active"
    await sdk("invalidate", cus)
    assert await sdk("can", cus, "api") is True

    paused = await sdk("set_customer_status", account_id=acct, customer_id=cus, status="paused")
    assert paused["status"] == "paused"
    await sdk("invalidate", cus)
    assert not (await sdk("get_entitlements", cus)).has_access()
    await sdk("set_customer_status", account_id=acct, customer_id=cus, status="active")
    suspended = await sdk("set_account_status", account_id=acct, status="suspended")
    assert suspended["status"] == "suspended"
    await sdk("invalidate", cus)
    doc = await sdk("get_entitlements", cus)
    assert doc.data["accountStatus"] == "suspended" and not doc.has_access()
    assert doc.data["modules"] == []


async def payment_methods_and_invoices(sdk: Sdk) -> None:
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
    assert isinstance(pdf, bytes) and pdf.startswith(b"%PDF-")
    text = pypdf.PdfReader(io.BytesIO(pdf), strict=True).pages[0].extract_text()
    assert invoice["number"] in text and "98.00 USD" in text
    seeded = (await sdk("list_invoices", account_id="acme"))[0]["ref"]
    for account, invoice_id in ((acct, seeded), (acct, "in_acme_0001"), ("acme", invoice["ref"])):
        missing = await sdk.error("invoice_pdf", account_id=account, invoice_id=invoice_id)
        assert (missing.status, code(missing)) == (404, "invoice_not_found")


async def credits(sdk: Sdk, emulator: Emulator) -> None:
    types = await sdk("list_credit_types")
    assert [t["creditTypeId"] for t in types] == ["api-calls", "exports"]
    packs = await sdk("list_credit_packs", credit_type_id="api-calls")
    assert [(p["packId"], p["credits"]) for p in packs] == [
        ("calls-1k", 1000),
        ("calls-10k", 10000),
    ]
    unknown = await sdk.error("list_credit_packs", credit_type_id="gold")
    assert (unknown.status, code(unknown)) == (404, "credit_type_not_found")

    credits = {
        c["creditTypeId"]: c["balance"] for c in await sdk("list_credits", customer_id="cus_active")
    }
    assert credits == {"api-calls": 5000, "exports": 20}
    balance = await sdk("get_credit_balance", customer_id="cus_active", credit_type_id="exports")
    assert (balance["balance"], balance["unit"]) == (20, "export")

    key = uid("idem")
    spent = await sdk("consume_credits", customer_id="cus_active", credit_type_id="exports",
                      amount=5, idempotency_key=key)  # fmt: skip
    assert (spent["balance"], spent["consumed"]) == (15, 5)
    replay = await sdk("consume_credits", customer_id="cus_active", credit_type_id="exports",
                       amount=5, idempotency_key=key)  # fmt: skip
    assert replay == spent, "the same key: the same answer, deducted once"
    short = await sdk.error("consume_credits", customer_id="cus_active",
                      credit_type_id="exports", amount=16, idempotency_key=uid("idem"))  # fmt: skip
    assert (short.status, code(short)) == (409, "insufficient_credits")
    after = await sdk("get_credit_balance", customer_id="cus_active", credit_type_id="exports")
    assert after["balance"] == 15, "nothing deducted"

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
    missing = await sdk.error("create_credit_checkout", account_id="acme",
                        customer_id="cus_trial", **URLS)  # fmt: skip
    assert (missing.status, code(missing)) == (400, "missing_field")
    emulator.complete_checkout(DEMO_TENANT, several["id"])
    topped = await sdk("list_credits", customer_id="cus_trial")
    assert {c["creditTypeId"]: c["balance"] for c in topped} == {"api-calls": 1100, "exports": 30}


async def test_the_sdk_refuses_a_wrong_key(server: TestServer) -> None:
    for flavour in ("sync", "async"):
        sdk = Sdk(flavour, str(server.make_url("")).rstrip("/"), api_key="wrong")
        with pytest.raises(VellumCharterAuthError):
            await sdk("get_entitlements", "cus_active")
        with pytest.raises(VellumCharterAuthError):
            await sdk("invoice_pdf", account_id="acme", invoice_id="x")
        assert await sdk("flag", "bulk-export", "cus_active", default=False) is False


async def test_every_public_method_against_the_emulator(sdk: Sdk, emulator: Emulator) -> None:
    """Each flavour drives every public method; the answers are checked on the way."""
    await entitlements_and_flags(sdk, emulator)
    await provisioning_and_subscription_changes(sdk, emulator)
    await payment_methods_and_invoices(sdk)
    await credits(sdk, emulator)
    assert sdk.called == SYNC_PUBLIC, sorted(SYNC_PUBLIC ^ sdk.called)


# -- pushes ------------------------------------------------------------------------------


async def test_the_sdk_verifies_every_push(
    sdk: Sdk, emulator: Emulator, receiver: Receiver
) -> None:
    acct, cus = uid("acct"), uid("cus")
    await sdk("create_account", account_id=acct)
    await sdk("create_customer", account_id=acct, customer_id=cus)
    await sdk("create_subscription", account_id=acct, customer_id=cus, plan_id="team", seats=2)
    emulator.set_flag(DEMO_TENANT, "bulk-export", False, customer_id=cus)
    await emulator.wait_pushes_idle()

    events = [verify_push_signature(body, header, SECRET) for body, header in receiver.received]
    assert [e["type"] for e in events] == [
        "payment.succeeded", "entitlements.updated", "flags.updated",
    ]  # fmt: skip
    paid = events[0]
    assert (paid["customerId"], paid["accountId"], paid["seats"]) == (cus, acct, 2)
    assert paid["invoice"]["amountPaid"] == 2 * 3400 and paid["invoice"]["ref"].startswith("invr_")
    assert all(e["eventId"].startswith("evt_") and e["tenantId"] == DEMO_TENANT for e in events)
    assert len({e["eventId"] for e in events}) == 3
    body, header = receiver.received[0]
    with pytest.raises(VellumCharterSignatureError):
        verify_push_signature(body, header, "whsec_another")
    with pytest.raises(VellumCharterSignatureError):
        verify_push_signature(body + b" ", header, SECRET)


async def test_a_refused_push_is_retried_three_times_back_to_back_then_dropped(
    emulator: Emulator, receiver: Receiver
) -> None:
    emulator.settings.event_id_fields = ("eventId",)  # exactly today's format
    receiver.fail_first = 2
    started = time.monotonic()
    kept = await emulator.push_event(DEMO_TENANT, customer_id="cus_active")
    receiver.fail_first = 5
    dropped = await emulator.push_event(DEMO_TENANT, customer_id="cus_trial")

    assert time.monotonic() - started < 2, "no delay between attempts"
    assert [a.status for a in kept.attempts] == [503, 503, 200] and kept.delivered
    assert [a.status for a in dropped.attempts] == [503, 503, 503] and dropped.dropped
    events = [verify_push_signature(body, header, SECRET) for body, header in receiver.received]
    assert [e["eventId"] for e in events] == [kept.event["eventId"]] * 3 + [
        dropped.event["eventId"]
    ] * 3, "stable across retries"
    assert all("id" not in e for e in events)
    assert receiver.fail_first == 2, "nothing after the third attempt"


async def test_during_rotation_the_sdk_checks_the_last_signature(
    aiohttp_server: AiohttpServer, receiver: Receiver
) -> None:
    """Two ``v1`` entries: the SDK's parser keeps the last one, so the secret signed last
    verifies and the other does not (a receiver of ours checks every entry)."""
    app = create_emulator_app(
        api_keys=[API_KEY], webhook_url=receiver.url, webhook_secret=["whsec_old", SECRET]
    )
    await aiohttp_server(app)
    push = await app[EMULATOR].push_event(DEMO_TENANT, customer_id="cus_active")

    ((body, header),) = receiver.received
    assert push.delivered and header.count("v1=") == 2
    assert verify_push_signature(body, header, SECRET)["eventId"] == push.event["eventId"]
    with pytest.raises(VellumCharterSignatureError):
        verify_push_signature(body, header, "whsec_old")
