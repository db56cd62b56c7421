"""The whole Vellum surface through the sidecar: /v1 routes and the drop-in mirror.

An SDK-style client (written below, speaking the upstream's paths and
``x-api-key``) is pointed at the sidecar and runs every operation against the
emulator; the emulator's request log shows what really reached the upstream.
"""

from __future__ import annotations

import functools
import io
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import quote

import aiohttp
import orjson
import pytest
import redis.asyncio as aredis
from aiohttp.test_utils import TestServer
from jsonschema import Draft202012Validator
from prometheus_client.parser import text_string_to_metric_families
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from vellum_sidecar_client import AsyncSidecarClient
from yarl import URL

from sidecar.appkeys import REDIS
from sidecar.emulator import Emulator
from sidecar.http.operations import OPERATIONS, SURFACES, Field, Operation, Surface
from sidecar.logs import JsonFormatter

from .conftest import Sidecar, SidecarFactory, eventually
from .harness import API_KEY, free_port

CALLER_KEY = "caller_own_key_" + "c" * 20
PERSONAL = "jane.doe@example.com"


# -- an SDK-style client -------------------------------------------------------------------


def segment(value: str) -> str:
    """Quote one path segment the way an SDK must (dot-segments included)."""
    quoted = quote(value, safe="")
    return quoted.replace(".", "%2E") if quoted.strip(".") == "" else quoted


class VellumError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"{status}: {body}")
        self.status = status
        self.body = body


class VellumAuthError(VellumError):
    pass


@dataclass
class EntitlementSet:
    found: bool
    doc: dict[str, Any]

    @property
    def status(self) -> Any:
        return self.doc.get("status")

    def is_active(self) -> bool:
        return self.status in ("active", "trialing")

    def has(self, module: str) -> bool:
        return module in self.doc.get("modules", [])

    def config(self, key: str, default: Any = None) -> Any:
        return self.doc.get("config", {}).get(key, default)


@dataclass
class Raw:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body) if self.body else None


#: Each SDK method (``vellumcharter`` 1.4.2's, and the names the table gives newer
#: operations) and the row it calls.
SDK_CALLS: dict[str, Operation] = {method: op for op in OPERATIONS for method in op.sdk}


class VellumSdk:
    """vellumcharter 1.4.2's methods as the SDK builds them (tests/test_sdk.py drives
    the SDK itself); ``root`` is ``/tenants/{t}`` upstream, or ``/v1``.

    Derived from the operation table: a row's SDK method takes its path ids
    (``account_id``, ...) and its fields (``plan_version``, ...) as keywords, with the
    SDK's defaults; it sends the fields that are set (a boolean only when true),
    and answers the body, the list the row names (``list_field``) or, for a body
    that is not JSON, its bytes. Written by hand: the reads the SDK answers its own
    way (entitlements, flags), the two methods sharing one operation (add-ons) and
    ``invoice_pdf_url`` (SDKs before 1.2).
    """

    def __init__(
        self, session: aiohttp.ClientSession, base_url: str, root: str, api_key: str | None
    ) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.root = root
        self.api_key = api_key

    async def raw(
        self,
        method: str,
        *segments: str,
        body: Any = None,
        query: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Raw:
        path = self.root + "".join("/" + segment(s) for s in segments)
        url = URL(self.base_url + path, encoded=True)
        if query:
            url = url.with_query(query)
        send = dict(headers or {})
        if self.api_key is not None:
            send["x-api-key"] = self.api_key
        data = None
        if body is not None:
            data = orjson.dumps(body)
            send["Content-Type"] = "application/json"
        async with self.session.request(
            method, url, data=data, headers=send, allow_redirects=False
        ) as resp:
            return Raw(resp.status, dict(resp.headers), await resp.read())

    async def _call(self, method: str, *segments: str, **kw: Any) -> Any:
        resp = await self.raw(method, *segments, **kw)
        if resp.status in (401, 403):
            raise VellumAuthError(resp.status, resp.json())
        if not 200 <= resp.status < 300:
            raise VellumError(resp.status, resp.json())
        return resp.json()

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        op = SDK_CALLS.get(name)
        if op is None or op.cached or len(op.sdk) > 1:
            raise AttributeError(f"the SDK has no method {name!r} derived from the table")
        return functools.partial(self._operation, op)

    async def _operation(self, op: Operation, **kwargs: Any) -> Any:
        segments = op.segments({p: kwargs.pop(f"{p}_id") for p in op.params})

        def sent(fields: tuple[Field, ...]) -> dict[str, Any]:
            missing = [f.arg for f in fields if f.required and f.arg not in kwargs]
            if missing:
                raise TypeError(f"{op.sdk[0]}() needs the keywords {missing}")
            values = {f.name: kwargs.pop(f.arg, f.default) for f in fields}
            return {k: v for k, v in values.items() if v is not None and v is not False}

        body = sent(op.fields) if op.body else None
        query = {k: "true" if v is True else v for k, v in sent(op.query).items()}
        if kwargs:
            raise TypeError(f"{op.sdk[0]}() got unexpected keywords {sorted(kwargs)}")
        if op.answer.media_type is not None:
            resp = await self.raw(op.method, *segments, body=body, query=query or None)
            if not 200 <= resp.status < 300:
                raise VellumError(resp.status, resp.json())
            return resp.body
        answer = await self._call(op.method, *segments, body=body, query=query or None)
        return list(answer[op.answer.list_field]) if op.answer.list_field else answer

    async def get_entitlements(self, customer_id: str) -> EntitlementSet:
        resp = await self.raw("GET", "customers", customer_id, "entitlements")
        if resp.status == 404:
            return EntitlementSet(False, {})
        if resp.status != 200:
            raise VellumError(resp.status, resp.json())
        doc = resp.json()
        # The /v1 surface answers an unknown customer 200 with found: false.
        return EntitlementSet(doc.pop("found", True), doc)

    async def can(self, customer_id: str, module_id: str) -> bool:
        return (await self.get_entitlements(customer_id)).has(module_id)

    async def flags(self, customer_id: str) -> dict[str, bool]:
        flags: dict[str, bool] = (await self._call("GET", "customers", customer_id, "flags"))[
            "flags"
        ]
        return flags

    async def global_flags(self) -> dict[str, bool]:
        flags: dict[str, bool] = (await self._call("GET", "flags"))["flags"]
        return flags

    async def _add_ons(self, account_id: str, customer_id: str, body: Any) -> Any:
        segments = ("accounts", account_id, "customers", customer_id, "subscription", "add-ons")
        return await self._call("PATCH", *segments, body=body)

    async def add_add_on(self, *, account_id: str, customer_id: str, module_id: str) -> Any:
        return await self._add_ons(account_id, customer_id, {"add": [module_id]})

    async def remove_add_on(self, *, account_id: str, customer_id: str, module_id: str) -> Any:
        return await self._add_ons(account_id, customer_id, {"remove": [module_id]})

    async def invoice_pdf_url(self, *, account_id: str, invoice_id: str) -> str:
        """What SDKs before 1.2 did: the 3xx's ``Location`` (older upstreams)."""
        resp = await self.raw("GET", "accounts", account_id, "invoices", invoice_id, "pdf")
        if not 300 <= resp.status < 400:
            raise VellumError(resp.status, resp.json())
        return resp.headers["Location"]


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
def mode(request: pytest.FixtureRequest, redis_url: str) -> str | None:
    return None if request.param == "memory" else redis_url


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def base_url(sc: Sidecar) -> str:
    return str(sc.client.make_url("")).rstrip("/")


def sdk_for(session: aiohttp.ClientSession, sc: Sidecar, surface: str, tenant: str) -> VellumSdk:
    """The mirror gets the caller's own (wrong) key, as an unchanged SDK would send it."""
    if surface == "mirror":
        return VellumSdk(session, base_url(sc), f"/tenants/{segment(tenant)}", CALLER_KEY)
    return VellumSdk(session, base_url(sc), "/v1", None)


def upstream_sdk(
    session: aiohttp.ClientSession, emulator_server: TestServer, tenant: str
) -> VellumSdk:
    base = str(emulator_server.make_url("")).rstrip("/")
    return VellumSdk(session, base, f"/tenants/{segment(tenant)}", API_KEY)


async def can(sc: Sidecar, customer: str, module: str) -> bool:
    resp = await sc.client.get(f"/v1/customers/{segment(customer)}/can/{segment(module)}")
    assert resp.status == 200
    return bool((await resp.json())["allowed"])


async def cache_source(sc: Sidecar, customer: str) -> str:
    resp = await sc.client.get(f"/v1/customers/{segment(customer)}/entitlements")
    assert resp.status == 200
    return resp.headers["X-Sidecar-Cache"]


def uid(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def assert_upstream_saw_only_the_sidecar(emulator: Emulator, tenant: str) -> None:
    assert emulator.requests, "the upstream saw nothing"
    for r in emulator.requests:
        assert r.api_key == API_KEY, f"{r.operation} carried {r.api_key!r}"
        assert r.tenant == tenant
        assert r.path.startswith(f"/tenants/{segment(tenant)}/")
        assert r.operation != "unknown", r.path


# -- every operation, through both surfaces -------------------------------------------------


@pytest.mark.parametrize("surface", ["mirror", "v1"])
async def test_sdk_runs_every_operation_through_the_sidecar(
    make_sidecar: SidecarFactory,
    emulator: Emulator,
    emulator_server: TestServer,
    tenant: str,
    session: aiohttp.ClientSession,
    surface: str,
    mode: str | None,
) -> None:
    sc = await make_sidecar(mode)
    sdk = sdk_for(session, sc, surface, tenant)
    acct, adopted, cust = uid("acc"), uid("acc"), uid("cus")

    account = await sdk.create_account(
        account_id=acct, name="Acme", email=PERSONAL, create_billing_customer=True
    )
    assert account["accountId"] == acct
    assert account["billingCustomerId"].startswith("cus_"), "a billing customer was created"
    other = await sdk.create_account(account_id=adopted, billing_customer_id="cus_existing")
    assert other["billingCustomerId"] == "cus_existing", "the billing customer was adopted"
    customer = await sdk.create_customer(account_id=acct, customer_id=cust, email=PERSONAL)
    assert (customer["customerId"], customer["accountId"]) == (cust, acct)

    # No subscription yet: "not found", and cached as such.
    assert not (await sdk.get_entitlements(cust)).found
    assert not await can(sc, cust, "api")
    assert await cache_source(sc, cust) == "hit"

    checkout = await sdk.create_checkout(
        account_id=acct,
        customer_id=cust,
        plan_id="pro",
        plan_version=1,
        success_url="https://app.example/ok",
        cancel_url="https://app.example/no",
        seats=2,
    )
    assert checkout["url"].startswith("https://checkout.example/")
    assert (checkout["planId"], checkout["seats"], checkout["mode"]) == ("pro", 2, "subscription")
    setup = await sdk.create_setup_checkout(
        account_id=acct, success_url="https://app.example/ok", cancel_url="https://app.example/no"
    )
    assert setup["mode"] == "setup"

    sub = await sdk.create_subscription(
        account_id=acct, customer_id=cust, plan_id="pro", plan_version=1, seats=3
    )
    assert sub["status"] == "active"
    # The write dropped the cached "not found": the very next check sees the plan.
    assert await can(sc, cust, "api")
    ents = await sdk.get_entitlements(cust)
    assert ents.found and ents.is_active() and ents.has("exports")
    assert ents.doc["hasAccess"] is True
    assert ents.config("seats") == 3
    assert await sdk.get_subscription(account_id=acct, customer_id=cust) == sub

    methods = await sdk.list_payment_methods(account_id=acct)
    assert len(methods) == 2
    default = next(m for m in methods if m["isDefault"])
    spare = next(m for m in methods if not m["isDefault"])
    assert sub["defaultPaymentMethodRef"] == default["ref"]
    assert (await sdk.set_default_payment_method(account_id=acct, method_id=spare["ref"]))[
        "isDefault"
    ] is True
    moved = await sdk.set_subscription_payment_method(
        account_id=acct, customer_id=cust, method_id=spare["ref"]
    )
    assert moved["defaultPaymentMethodRef"] == spare["ref"]
    removed = await sdk.remove_payment_method(account_id=acct, method_id=default["ref"])
    assert removed == {"ref": default["ref"], "removed": True}
    assert [m["ref"] for m in await sdk.list_payment_methods(account_id=acct)] == [spare["ref"]]

    invoices = await sdk.list_invoices(account_id=acct)
    assert len(invoices) == 1 and invoices[0]["total"] == 3 * 4900
    assert await sdk.list_invoices(account_id=acct, customer_id=cust) == invoices
    assert await sdk.list_invoices(account_id=acct, customer_id="someone-else") == []
    pdf = await sdk.invoice_pdf(account_id=acct, invoice_id=invoices[0]["ref"])
    assert pdf.startswith(b"%PDF-") and invoices[0]["number"].encode() in pdf, "a PDF stays a PDF"

    # The subscription changes: each one drops the customer, so the next check sees it.
    await cache_source(sc, cust)
    preview = await sdk.preview_change(
        account_id=acct, customer_id=cust, seats=5, add_on_module_ids=["sso"]
    )
    assert (preview["current"]["seats"], preview["proposed"]["seats"]) == (3, 5)
    assert await cache_source(sc, cust) == "hit", "a preview changes nothing, drops nothing"
    assert (await sdk.set_seats(account_id=acct, customer_id=cust, seats=4))["seats"] == 4
    assert (await sdk.get_entitlements(cust)).config("seats") == 4
    assert not await can(sc, cust, "sso")
    added = await sdk.add_add_on(account_id=acct, customer_id=cust, module_id="sso")
    assert added["addOnModuleIds"] == ["sso"]
    assert await can(sc, cust, "sso")
    await sdk.remove_add_on(account_id=acct, customer_id=cust, module_id="sso")
    assert not await can(sc, cust, "sso")
    planned = await sdk.change_plan(
        account_id=acct, customer_id=cust, plan_id="team", plan_version=1
    )
    assert (planned["planId"], planned["planVersion"]) == ("team", 1)
    assert not await can(sc, cust, "api"), "team has no api"
    updated = await sdk.update_subscription(
        account_id=acct, customer_id=cust, plan_id="pro", plan_version=2, seats=3,
        add_on_module_ids=["sso"],
    )  # fmt: skip
    assert (updated["planId"], updated["seats"], updated["addOnModuleIds"]) == ("pro", 3, ["sso"])
    assert await can(sc, cust, "api") and await can(sc, cust, "sso")

    status = await sdk.set_customer_status(account_id=acct, customer_id=cust, status="past_due")
    assert status["status"] == "past_due"
    assert (await sdk.get_entitlements(cust)).status == "past_due"

    later = await sdk.cancel_subscription(account_id=acct, customer_id=cust, at_period_end=True)
    assert later["cancelAtPeriodEnd"] is True and later["status"] == "active"
    assert await can(sc, cust, "api"), "cancelling at the period's end keeps access"
    now = await sdk.cancel_subscription(account_id=acct, customer_id=cust)
    assert now["status"] == "canceled"
    assert not await can(sc, cust, "api")
    revived = await sdk.reactivate(account_id=acct, customer_id=cust)
    assert revived["status"] == "active"
    assert await can(sc, cust, "api"), "reactivate dropped the canceled document"

    # Credits: forwarded, never cached (balances change out of band). Flags: cached.
    types = await sdk.list_credit_types()
    assert [t["creditTypeId"] for t in types] == ["api-calls", "exports"]
    packs = await sdk.list_credit_packs(credit_type_id="exports")
    assert [p["packId"] for p in packs] == ["exports-10"]
    emulator.set_credits(tenant, cust, "exports", 10)
    balance = await sdk.get_credit_balance(customer_id=cust, credit_type_id="exports")
    assert balance["balance"] == 10
    spent = await sdk.consume_credits(
        customer_id=cust, credit_type_id="exports", amount=4, idempotency_key="use-1"
    )
    assert (spent["balance"], spent["consumed"]) == (6, 4)
    again = await sdk.consume_credits(
        customer_id=cust, credit_type_id="exports", amount=4, idempotency_key="use-1"
    )
    assert again == spent, "the same idempotencyKey: deducted once"
    emulator.set_credits(tenant, cust, "exports", 2)
    credits = {c["creditTypeId"]: c["balance"] for c in await sdk.list_credits(customer_id=cust)}
    assert credits == {"api-calls": 0, "exports": 2}, "a balance read is never cached"
    with pytest.raises(VellumError) as short:
        await sdk.consume_credits(
            customer_id=cust, credit_type_id="exports", amount=3, idempotency_key="use-2"
        )
    assert (short.value.status, short.value.body["error"]["code"]) == (409, "insufficient_credits")
    bought = await sdk.create_credit_checkout(
        account_id=acct, customer_id=cust, credit_type_id="exports", pack_id="exports-10",
        quantity=2, success_url="https://app.example/ok", cancel_url="https://app.example/no",
    )  # fmt: skip
    assert (bought["mode"], bought["amountTotal"]) == ("payment", 1000)
    emulator.set_flag(tenant, "beta", True)
    assert await sdk.global_flags() == {"beta": True}
    emulator.set_flag(tenant, "beta", False, customer_id=cust)
    assert await sdk.flags(cust) == {"beta": False}, "the first read fetches the override"
    fetched = (emulator.count("flags"), emulator.count("global_flags"))
    emulator.set_flag(tenant, "beta", True, customer_id=cust)
    emulator.set_flag(tenant, "beta", False)
    assert await sdk.flags(cust) == {"beta": False}, "flags are cached: the change is not seen"
    assert await sdk.global_flags() == {"beta": True}, "and neither is the global one"
    assert (emulator.count("flags"), emulator.count("global_flags")) == fetched
    # A billing write drops entitlements only: the flags stay cached.
    await sdk.set_seats(account_id=acct, customer_id=cust, seats=3)
    assert await sdk.flags(cust) == {"beta": False}
    assert (await sc.client.delete(f"/v1/customers/{cust}/cache?axis=flags")).status == 204
    assert await sdk.flags(cust) == {"beta": True}, "seen once the customer's flags are dropped"
    assert emulator.count("flags") == fetched[0] + 1
    assert await sdk.global_flags() == {"beta": True}, "the global flags are the tenant's"
    assert (await sc.client.delete("/v1/cache?axis=flags")).status == 204
    assert await sdk.global_flags() == {"beta": False}

    suspended = await sdk.set_account_status(account_id=acct, status="suspended")
    assert suspended["status"] == "suspended"
    assert (await sdk.get_entitlements(cust)).doc["accountStatus"] == "suspended"

    # The flag reads, answered from the flags caches.
    assert await sdk.flags(cust) == emulator.flags_for(tenant, cust)
    assert await sdk.global_flags() == emulator.flags_for(tenant)

    # Every operation the SDK calls (one newer than the SDK has its own test, below).
    assert {r.operation for r in emulator.requests} == {
        op.name for op in OPERATIONS if not op.newer
    }
    assert_upstream_saw_only_the_sidecar(emulator, tenant)
    # Every write went out exactly once (no retries without an Idempotency-Key).
    assert emulator.count("create_subscription") == 1
    assert emulator.count("cancel_subscription") == 2
    assert emulator.count("consume_credits") == 3


async def test_mirror_answers_exactly_like_the_upstream(
    make_sidecar: SidecarFactory,
    emulator: Emulator,
    emulator_server: TestServer,
    tenant: str,
    session: aiohttp.ClientSession,
) -> None:
    """Byte for byte: status, body, Location, for found, missing and refused requests."""
    emulator.create_account(tenant, "acc", billing_customer_id="cus_billing")
    emulator.create_customer(tenant, "acc", "cus")
    emulator.set_entitlements(tenant, "cus", {"status": "active", "modules": ["reports"]})
    sc = await make_sidecar(None)
    mirror = sdk_for(session, sc, "mirror", tenant)
    direct = upstream_sdk(session, emulator_server, tenant)
    calls: list[tuple[str, tuple[str, ...], Any]] = [
        ("GET", ("customers", "cus", "entitlements"), None),
        ("GET", ("customers", "ghost", "entitlements"), None),
        ("GET", ("accounts", "acc", "payment-methods"), None),
        ("GET", ("accounts", "ghost", "payment-methods"), None),
        ("GET", ("accounts", "acc", "customers", "cus", "subscription"), None),
        ("GET", ("accounts", "acc", "invoices"), None),
        ("PATCH", ("accounts", "acc", "customers", "cus"), {"status": "bogus"}),
        ("POST", ("accounts",), {"accountId": "acc"}),
        ("POST", ("accounts",), {"accountId": "acc", "billingCustomerId": "cus_other"}),
        ("POST", ("accounts", "acc", "checkout"), {"customerId": "cus", "planId": "pro"}),
    ]
    for method, segments, body in calls:
        theirs = await direct.raw(method, *segments, body=body)
        ours = await mirror.raw(method, *segments, body=body)
        assert (ours.status, ours.body) == (theirs.status, theirs.body), segments
        assert ours.headers["Content-Type"] == theirs.headers["Content-Type"]
    statuses = {(await mirror.raw(m, *s, body=b)).status for m, s, b in calls}
    assert {200, 404, 400, 409} <= statuses
    await direct.create_subscription(
        account_id="acc", customer_id="cus", plan_id="team", plan_version=1
    )
    invoice = (await direct.list_invoices(account_id="acc"))[0]["ref"]
    theirs = await direct.raw("GET", "accounts", "acc", "invoices", invoice, "pdf")
    ours = await mirror.raw("GET", "accounts", "acc", "invoices", invoice, "pdf")
    assert ours.status == theirs.status == 200
    assert ours.headers["Content-Type"] == theirs.headers["Content-Type"] == "application/pdf"
    assert ours.body == theirs.body and ours.body.startswith(b"%PDF-"), "a PDF stays a PDF"
    emulator.settings.invoice_pdf = "redirect"  # an upstream from before SDK 1.2
    theirs = await direct.raw("GET", "accounts", "acc", "invoices", invoice, "pdf")
    ours = await mirror.raw("GET", "accounts", "acc", "invoices", invoice, "pdf")
    assert ours.status == theirs.status == 302, "the redirect is passed on, never followed"
    assert ours.headers["Location"] == theirs.headers["Location"]
    assert ours.body == theirs.body


async def test_v1_answers_the_upstreams_status_and_body(
    make_sidecar: SidecarFactory,
    emulator: Emulator,
    emulator_server: TestServer,
    tenant: str,
    session: aiohttp.ClientSession,
) -> None:
    emulator.create_account(tenant, "acc")
    sc = await make_sidecar(None)
    v1 = sdk_for(session, sc, "v1", tenant)
    direct = upstream_sdk(session, emulator_server, tenant)
    calls: list[tuple[str, tuple[str, ...], Any]] = [
        ("GET", ("accounts", "ghost", "invoices"), None),
        ("POST", ("accounts",), {"accountId": "acc"}),
        ("PATCH", ("accounts", "acc"), {"status": "bogus"}),
        ("POST", ("accounts", "acc", "customers"), {"customerId": "c1", "extra": [1, {"x": 2}]}),
        ("DELETE", ("accounts", "acc", "payment-methods", "pm_ghost"), None),
    ]
    for method, segments, body in calls:
        ours = await v1.raw(method, *segments, body=body)
        if segments[-1] == "customers":  # a create: the second one conflicts
            body = {**body, "customerId": "c2"}
        theirs = await direct.raw(method, *segments, body=body)
        assert ours.status == theirs.status, segments
        if ours.status != 201:
            assert ours.body == theirs.body, segments
    created = await v1.raw("POST", "accounts", "acc", "customers", body={"customerId": "c1"})
    assert created.status == 409
    assert created.json()["error"]["code"] == "customer_exists"


# -- cache drops and account links ----------------------------------------------------------


async def test_a_write_drops_the_customer_on_every_sidecar(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str, redis_url: str
) -> None:
    emulator.create_account(tenant, "acc")
    emulator.create_customer(tenant, "acc", "cus")
    emulator.set_entitlements(tenant, "other", {"status": "active", "modules": ["api"]})
    a = await make_sidecar(redis_url)
    b = await make_sidecar(redis_url)
    for sc in (a, b):
        assert not await can(sc, "cus", "api")
        assert await can(sc, "other", "api")
    resp = await a.client.post(
        "/v1/accounts/acc/customers/cus/subscribe", json={"planId": "pro", "planVersion": 1}
    )
    assert resp.status == 201
    # Read-your-write on the sidecar that made it; the fan-out reaches the other.
    assert await can(a, "cus", "api")

    async def b_sees_it() -> bool:
        return await can(b, "cus", "api")

    await eventually(b_sees_it, timeout=5)
    assert await cache_source(b, "other") == "hit", "only the written customer was dropped"
    assert emulator.webhook_url is None, "no push webhook helped"
    text = a.metrics.render().decode()
    assert 'vellum_sidecar_invalidations_total{scope="customer",source="write"} 1.0' in text


async def test_pause_subscription_an_operation_newer_than_the_sdk(
    make_sidecar: SidecarFactory,
    emulator: Emulator,
    tenant: str,
    redis_url: str,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Added upstream after vellumcharter 1.4.2, and to the sidecar as one row of the table,
    its emulator handler and this test: served on both surfaces with the row's checks
    and answers openapi.json describes, dropped on every sidecar, logged by its ids,
    called by the Python client's generated method and the SDK stand-in derived from
    the row."""
    caplog.set_level(logging.INFO, logger="sidecar.proxy")
    emulator.create_account(tenant, "acc")
    emulator.create_customer(tenant, "acc", "cus")
    emulator.subscribe(tenant, "acc", "cus", "pro", plan_version=1)
    a, b = await make_sidecar(redis_url), await make_sidecar(redis_url)
    assert await can(a, "cus", "api") and await can(b, "cus", "api")

    async with AsyncSidecarClient(base_url(a)) as client:
        paused = await client.pause_subscription(
            account_id="acc", customer_id="cus", cycles=2, idempotency_key="pause-1"
        )
    assert (paused["status"], paused["resumesAfterCycles"]) == ("paused", 2)
    assert not await can(a, "cus", "api"), "read-your-write: access withheld at once"
    document = await (await a.client.get("/openapi.json")).json()
    resolver = Registry().with_resource(
        "openapi.json", Resource.from_contents(document, default_specification=DRAFT202012)
    )

    def conforms(surface: str, status: int, body: Any) -> None:
        """``body`` is what openapi.json says POST .../pause answers with ``status``."""
        path = SURFACES[surface] + "/accounts/{account}/customers/{customer}/subscription/pause"  # type: ignore[index]
        responses = document["paths"][path]["post"]["responses"]
        answer = responses.get(str(status)) or responses[f"{str(status)[0]}XX"]
        while "$ref" in answer:
            answer = document["components"]["responses"][answer["$ref"].rpartition("/")[2]]
        schema = answer["content"]["application/json"]["schema"]["$ref"]
        validator = Draft202012Validator({"$ref": f"openapi.json{schema}"}, registry=resolver)
        errors = [e.message for e in validator.iter_errors(body)]
        assert not errors, (surface, status, errors[:3])

    conforms("v1", 200, paused)

    async def b_sees_it() -> bool:
        return not await can(b, "cus", "api")

    await eventually(b_sees_it, timeout=5)
    (sent,) = [r for r in emulator.requests if r.operation == "pause_subscription"]
    assert (sent.body, sent.idempotency_key, sent.api_key) == ({"cycles": 2}, "pause-1", API_KEY)
    (line,) = [r.fields for r in caplog.records if r.getMessage() == "billing_write"]  # type: ignore[attr-defined]
    assert (line["operation"], line["accountId"], line["customerId"]) == (
        "pause_subscription", "acc", "cus",
    )  # fmt: skip
    assert (line["dropped"], line["idempotent"], line["outcome"]) == ("customer", True, "ok")

    # /v1 checks the row's field before calling the upstream; the mirror leaves it to
    # the upstream, whose own refusal (already paused) comes back as it is.
    resp = await a.client.post(
        "/v1/accounts/acc/customers/cus/subscription/pause", json={"cycles": "2"}
    )
    assert (resp.status, (await resp.json())["error"]["code"]) == (400, "invalid_body")
    mirror = sdk_for(session, a, "mirror", tenant)
    with pytest.raises(VellumError) as again:
        await mirror.pause_subscription(account_id="acc", customer_id="cus")
    assert (again.value.status, again.value.body["error"]["code"]) == (409, "subscription_paused")
    assert emulator.count("pause_subscription") == 2
    conforms("mirror", 409, again.value.body)

    # Resumed by reactivate (dropped again), or by the renewal that ends its cycles.
    assert (await mirror.reactivate(account_id="acc", customer_id="cus"))["status"] == "active"
    assert await can(a, "cus", "api")
    conforms(
        "mirror",
        200,
        await mirror.pause_subscription(account_id="acc", customer_id="cus", cycles=1),
    )
    invoices = len(await mirror.list_invoices(account_id="acc"))
    assert emulator.renew(tenant, "acc", "cus")["status"] == "active", "its one cycle is over"
    assert len(await mirror.list_invoices(account_id="acc")) == invoices, "a paused period is free"
    assert emulator.get_entitlements(tenant, "cus")["hasAccess"] is True  # type: ignore[index]


@pytest.mark.parametrize("surface", ["mirror", "v1"])
async def test_each_customer_write_drops_the_customer(
    make_sidecar: SidecarFactory,
    emulator: Emulator,
    tenant: str,
    session: aiohttp.ClientSession,
    surface: str,
) -> None:
    emulator.create_account(tenant, "acc")
    for c in ("cus", "bystander"):
        emulator.create_customer(tenant, "acc", c)
        emulator.set_entitlements(tenant, c, {"status": "active", "modules": ["api"]})
    sc = await make_sidecar(None)
    sdk = sdk_for(session, sc, surface, tenant)
    await sdk.create_subscription(
        account_id="acc", customer_id="cus", plan_id="team", plan_version=1
    )
    pm = (await sdk.list_payment_methods(account_id="acc"))[1]["ref"]
    writes: list[Callable[[], Awaitable[Any]]] = [
        lambda: sdk.set_customer_status(account_id="acc", customer_id="cus", status="paused"),
        lambda: sdk.set_subscription_payment_method(
            account_id="acc", customer_id="cus", method_id=pm
        ),
        lambda: sdk.cancel_subscription(account_id="acc", customer_id="cus", at_period_end=True),
        lambda: sdk.cancel_subscription(account_id="acc", customer_id="cus"),
        lambda: sdk.create_subscription(
            account_id="acc", customer_id="cus", plan_id="pro", plan_version=2
        ),
    ]
    await cache_source(sc, "bystander")
    for write in writes:
        await cache_source(sc, "cus")
        assert await cache_source(sc, "cus") == "hit"
        await write()
        assert await cache_source(sc, "cus") == "miss"
    assert await cache_source(sc, "bystander") == "hit"
    assert await can(sc, "cus", "api"), "pro grants api again after resubscribing"


async def test_account_status_drops_the_accounts_customers_only(
    make_sidecar: SidecarFactory,
    emulator: Emulator,
    tenant: str,
    session: aiohttp.ClientSession,
) -> None:
    sc = await make_sidecar(None)
    v1 = sdk_for(session, sc, "v1", tenant)
    await v1.create_account(account_id="acc")
    emulator.create_account(tenant, "elsewhere")
    for account, customer in (("acc", "c1"), ("acc", "c2"), ("elsewhere", "c3")):
        if account == "acc":  # learnt from a write through the sidecar
            await v1.create_customer(account_id=account, customer_id=customer)
        else:
            emulator.create_customer(tenant, account, customer)
        emulator.set_entitlements(tenant, customer, {"status": "active", "modules": ["api"]})
        await cache_source(sc, customer)
    await v1.set_account_status(account_id="acc", status="suspended")
    for customer in ("c1", "c2"):
        resp = await sc.client.get(f"/v1/customers/{customer}/entitlements")
        assert resp.headers["X-Sidecar-Cache"] == "miss"
        assert (await resp.json())["accountStatus"] == "suspended"
    assert await cache_source(sc, "c3") == "hit", "another account's customer kept"


async def test_account_links_are_recorded_in_redis(
    make_sidecar: SidecarFactory,
    emulator: Emulator,
    tenant: str,
    session: aiohttp.ClientSession,
    redis_url: str,
) -> None:
    emulator.create_account(tenant, "acc")
    emulator.create_customer(tenant, "acc", "seen_by_read")
    emulator.create_customer(tenant, "acc", "failed_write")
    sc = await make_sidecar(redis_url)
    mirror = sdk_for(session, sc, "mirror", tenant)
    await mirror.create_customer(account_id="acc", customer_id="created")
    checkout = {
        "customerId": "seen_by_read",
        "planId": "pro",
        "planVersion": 1,
        "successUrl": "https://a.example",
        "cancelUrl": "https://a.example",
    }
    assert (await mirror.raw("POST", "accounts", "acc", "checkout", body=checkout)).status == 201
    with pytest.raises(VellumError) as refused:  # no such customer: 404, nothing learnt
        await mirror.get_subscription(account_id="acc", customer_id="nobody")
    assert refused.value.status == 404
    with pytest.raises(VellumError) as rejected:  # a refused write teaches nothing either
        await mirror.set_customer_status(account_id="acc", customer_id="failed_write", status="?")
    assert rejected.value.status == 400
    conn = sc.app[REDIS]
    assert conn is not None
    client = aredis.Redis.from_url(redis_url)
    try:
        # bytes (no decode_responses); redis-py types the members bytes | str either way
        members = cast("set[bytes]", await client.smembers(conn.keys.account("acc")))
        ttl = await client.ttl(conn.keys.account("acc"))
    finally:
        await client.aclose()
    assert {m.decode() for m in members} == {"created", "seen_by_read"}
    assert ttl > 0, "links expire"


# -- retries and idempotency ------------------------------------------------------------------


async def test_writes_are_not_retried_without_an_idempotency_key(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    emulator.create_account(tenant, "acc")
    sc = await make_sidecar(None)
    emulator.fail("create_customer", 503, times=1)
    resp = await sc.client.post("/v1/accounts/acc/customers", json={"customerId": "c1"})
    assert resp.status == 503, "the upstream's answer, as it is"
    assert (await resp.json())["error"]["code"] == "injected_fault"
    assert emulator.count("create_customer") == 1
    # The mirror behaves the same.
    emulator.fail("create_customer", 503, times=1)
    resp = await sc.client.post(
        f"/tenants/{tenant}/accounts/acc/customers", json={"customerId": "c1"}
    )
    assert resp.status == 503
    assert emulator.count("create_customer") == 2


@pytest.mark.parametrize("surface", ["mirror", "v1"])
async def test_writes_with_an_idempotency_key_are_retried_and_the_key_forwarded(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str, surface: Surface
) -> None:
    emulator.create_account(tenant, "acc")
    sc = await make_sidecar(None)
    path = SURFACES[surface].format(tenant=tenant) + "/accounts/acc/customers"
    headers = {"Idempotency-Key": "idem-1"}
    emulator.fail("create_customer", 503, times=1)
    first = await sc.client.post(path, json={"customerId": "c1"}, headers=headers)
    assert first.status == 201
    assert emulator.count("create_customer") == 2, "retried once after the 503"
    again = await sc.client.post(path, json={"customerId": "c1"}, headers=headers)
    assert again.status == 201, "the upstream replayed the stored answer"
    assert again.headers["Idempotent-Replayed"] == "true"
    assert await again.json() == await first.json()
    keys = [r.idempotency_key for r in emulator.requests if r.operation == "create_customer"]
    assert keys == ["idem-1"] * 3


async def test_reads_are_retried(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    emulator.create_account(tenant, "acc")
    sc = await make_sidecar(None)
    emulator.fail("list_payment_methods", 503, times=2)
    resp = await sc.client.get("/v1/accounts/acc/payment-methods")
    assert resp.status == 200
    assert len((await resp.json())["methods"]) == 2
    assert emulator.count("list_payment_methods") == 3


async def test_an_unknown_write_outcome_still_drops_the_customer(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    emulator.create_account(tenant, "acc")
    emulator.create_customer(tenant, "acc", "cus")
    emulator.set_entitlements(tenant, "cus", {"status": "active", "modules": ["api"]})
    sc = await make_sidecar(None)
    await cache_source(sc, "cus")
    emulator.fail("set_customer_status", 500, times=1)
    resp = await sc.client.patch("/v1/accounts/acc/customers/cus", json={"status": "paused"})
    assert resp.status == 500
    assert await cache_source(sc, "cus") == "miss", "a 5xx may have applied: dropped"
    emulator.fail("set_customer_status", 409, times=1)
    resp = await sc.client.patch("/v1/accounts/acc/customers/cus", json={"status": "paused"})
    assert resp.status == 409
    assert await cache_source(sc, "cus") == "hit", "a 4xx changed nothing: kept"


# -- the sidecar's own failures -----------------------------------------------------------------


@pytest.mark.parametrize("surface", ["mirror", "v1"])
async def test_upstream_auth_failure_is_502(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str, surface: Surface
) -> None:
    emulator.create_account(tenant, "acc")
    prefix = SURFACES[surface].format(tenant=tenant)
    wrong = await make_sidecar(None, VELLUM_API_KEY="revoked_" + "r" * 24)
    for method, path, body in [
        ("POST", "/accounts", {"accountId": "new"}),
        ("GET", "/accounts/acc/invoices", None),
    ]:
        resp = await wrong.client.request(method, prefix + path, json=body)
        assert resp.status == 502
        assert (await resp.json())["error"]["code"] == "upstream_auth_failed"
    sc = await make_sidecar(None)
    emulator.fail("list_payment_methods", 403, times=1)
    resp = await sc.client.get(prefix + "/accounts/acc/payment-methods")
    assert resp.status == 502
    assert (await resp.json())["error"]["code"] == "upstream_auth_failed"


@pytest.mark.parametrize("surface", ["mirror", "v1"])
async def test_unreachable_upstream_is_502(
    make_sidecar: SidecarFactory, tenant: str, surface: Surface
) -> None:
    sc = await make_sidecar(
        None, VELLUM_BASE_URL=f"http://127.0.0.1:{free_port()}", SIDECAR_UPSTREAM_TIMEOUT="0.5"
    )
    prefix = SURFACES[surface].format(tenant=tenant)
    write = await sc.client.post(prefix + "/accounts", json={"accountId": "a"})
    assert write.status == 502
    error = (await write.json())["error"]
    assert error["code"] == "upstream_unavailable"
    assert "may or may not have been applied" in error["message"]
    read = await sc.client.get(prefix + "/accounts/a/invoices")
    assert read.status == 502
    assert (await read.json())["error"]["code"] == "upstream_unavailable"


async def test_a_write_that_times_out_is_504_and_drops_the_customer(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    emulator.create_account(tenant, "acc")
    emulator.create_customer(tenant, "acc", "cus")
    emulator.set_entitlements(tenant, "cus", {"status": "active", "modules": ["api"]})
    sc = await make_sidecar(None, SIDECAR_UPSTREAM_TIMEOUT="0.3")
    assert await can(sc, "cus", "api")
    hold = emulator.hold("set_customer_status")
    resp = await sc.client.patch("/v1/accounts/acc/customers/cus", json={"status": "canceled"})
    assert resp.status == 504
    error = (await resp.json())["error"]
    assert error["code"] == "upstream_timeout"
    assert "may or may not have been applied" in error["message"]
    assert emulator.count("set_customer_status") == 1, "a write without a key: one attempt"
    hold.release()  # ... and the upstream did apply it after all

    async def applied() -> bool:
        return (emulator.get_entitlements(tenant, "cus") or {}).get("status") == "canceled"

    await eventually(applied)
    resp = await sc.client.get("/v1/customers/cus/entitlements")
    assert resp.headers["X-Sidecar-Cache"] == "miss"
    assert (await resp.json())["status"] == "canceled"


# -- input validation ---------------------------------------------------------------------------

LONG = "x" * 513
CHECKOUT = {
    "customerId": "c",
    "planId": "pro",
    "planVersion": 1,
    "successUrl": "https://a.example",
    "cancelUrl": "https://a.example",
}


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "code"),
    [
        ("POST", "/accounts", b"", {}, "invalid_json"),
        ("POST", "/accounts", b"{not json", {}, "invalid_json"),
        ("POST", "/accounts", b"\xff\xfe", {}, "invalid_json"),
        ("POST", "/accounts", b"[1]", {}, "invalid_body"),
        ("POST", "/accounts", b'"acc"', {}, "invalid_body"),
        ("POST", "/accounts", b'{"name": "x"}', {}, "invalid_body"),
        ("POST", "/accounts", b'{"accountId": ""}', {}, "invalid_body"),
        ("POST", "/accounts", b'{"accountId": 5}', {}, "invalid_body"),
        ("POST", "/accounts", orjson.dumps({"accountId": LONG}), {}, "invalid_body"),
        ("PATCH", "/accounts/a", b'{"status": null}', {}, "invalid_body"),
        ("POST", "/accounts/a/checkout", b'{"customerId": "c"}', {}, "invalid_body"),
        (
            "POST",
            "/accounts/a/checkout",
            orjson.dumps({**CHECKOUT, "customerId": ""}),
            {},
            "invalid_body",
        ),
        ("POST", "/accounts/a/billing/setup-checkout", b"{}", {}, "invalid_body"),
        ("POST", "/accounts/a/customers/c/subscribe", b'{"seats": 1}', {}, "invalid_body"),
        (
            "PATCH",
            "/accounts/a/customers/c/payment-method",
            b'{"methodId": 1}',
            {},
            "invalid_body",
        ),
        ("POST", "/accounts/a/customers", b'{"email": "x@y.example"}', {}, "invalid_body"),
        ("PATCH", "/accounts//customers/c", b'{"status": "active"}', {}, "invalid_id"),
        ("GET", "/accounts/a/customers//subscription", None, {}, "invalid_id"),
        ("GET", f"/accounts/{LONG}/invoices", None, {}, "invalid_id"),
        ("DELETE", "/accounts/a/payment-methods/", None, {}, "invalid_id"),
        ("GET", "/customers//entitlements", None, {}, "invalid_id"),
        ("GET", "/accounts/a/invoices?customerId=", None, {}, "invalid_query"),
        # Today's operations: the SDK's types (integers, lists) are checked too.
        (
            "PATCH",
            "/accounts/a/customers/c/subscription/seats",
            b'{"seats": "3"}',
            {},
            "invalid_body",
        ),
        (
            "PATCH",
            "/accounts/a/customers/c/subscription/seats",
            b'{"seats": true}',
            {},
            "invalid_body",
        ),
        ("PATCH", "/accounts/a/customers/c/subscription/seats", b"{}", {}, "invalid_body"),
        ("PUT", "/accounts/a/customers/c/subscription", b'{"planId": "pro"}', {}, "invalid_body"),
        (
            "PUT",
            "/accounts/a/customers/c/subscription",
            b'{"planId": "pro", "planVersion": 1.5}',
            {},
            "invalid_body",
        ),
        ("POST", "/accounts/a/customers/c/subscription/preview", b"[]", {}, "invalid_body"),
        (
            "POST",
            "/accounts/a/customers/c/subscription/preview",
            b'{"addOnModuleIds": "sso"}',
            {},
            "invalid_body",
        ),
        (
            "PATCH",
            "/accounts/a/customers/c/subscription/add-ons",
            b'{"add": [1]}',
            {},
            "invalid_body",
        ),
        (
            "PATCH",
            "/accounts/a/customers/c/subscription/plan",
            b'{"planId": "pro"}',
            {},
            "invalid_body",
        ),
        (
            "POST",
            "/accounts/a/customers/c/subscribe",
            b'{"planId": "pro", "seats": "2"}',
            {},
            "invalid_body",
        ),
        (
            "POST",
            "/accounts",
            b'{"accountId": "a", "createBillingCustomer": "yes"}',
            {},
            "invalid_body",
        ),
        ("POST", "/accounts/a/credit-checkout", b'{"customerId": "c"}', {}, "invalid_body"),
        (
            "POST",
            "/accounts/a/credit-checkout",
            orjson.dumps({"customerId": "c", "successUrl": "u", "cancelUrl": "u", "items": {}}),
            {},
            "invalid_body",
        ),
        ("POST", "/customers/c/credits/exports/consume", b'{"amount": 1}', {}, "invalid_body"),
        (
            "POST",
            "/customers/c/credits/exports/consume",
            b'{"amount": "1", "idempotencyKey": "k"}',
            {},
            "invalid_body",
        ),
        ("GET", "/customers//credits", None, {}, "invalid_id"),
        ("GET", "/credit-types//packs", None, {}, "invalid_id"),
        (
            "POST",
            "/accounts",
            b'{"accountId": "a"}',
            {"Idempotency-Key": ""},
            "invalid_idempotency_key",
        ),
        (
            "POST",
            "/accounts",
            b'{"accountId": "a"}',
            {"Idempotency-Key": "k" * 256},
            "invalid_idempotency_key",
        ),
    ],
)
async def test_v1_refuses_bad_input_before_calling_upstream(
    make_sidecar: SidecarFactory,
    emulator: Emulator,
    method: str,
    path: str,
    body: bytes | None,
    headers: dict[str, str],
    code: str,
) -> None:
    sc = await make_sidecar(None)
    resp = await sc.client.request(method, "/v1" + path, data=body, headers=headers)
    assert resp.status == 400
    assert resp.content_type == "application/json"
    assert (await resp.json())["error"]["code"] == code
    assert emulator.count() == 0


async def test_v1_leaves_an_optional_null_to_the_upstream(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    """The SDK sends ``creditTypeId: null`` when given neither a pack nor items."""
    emulator.create_account(tenant, "acc")
    emulator.create_customer(tenant, "acc", "cus")
    sc = await make_sidecar(None)
    body = {"customerId": "cus", "successUrl": "https://a.example", "cancelUrl": "https://a.example",
            "creditTypeId": None, "packId": None, "quantity": 1}  # fmt: skip
    resp = await sc.client.post("/v1/accounts/acc/credit-checkout", json=body)
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "missing_field", "the upstream's own code"
    assert emulator.count("create_credit_checkout") == 1


async def test_the_mirror_lets_the_upstream_judge_bodies(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    """Exact answers: the upstream's own 400 codes, not the sidecar's."""
    sc = await make_sidecar(None)
    cases = [(b"", "invalid_body"), (b"{not json", "invalid_json"), (b"[1]", "invalid_body"),
             (b'{"name": "x"}', "missing_field")]  # fmt: skip
    for body, code in cases:
        resp = await sc.client.post(f"/tenants/{tenant}/accounts", data=body)
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == code
    assert emulator.count("create_account") == len(cases)
    # An empty id would change the upstream path's shape: refused by the sidecar.
    resp = await sc.client.get(f"/tenants/{tenant}/accounts//invoices")
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "invalid_id"
    assert emulator.count("list_invoices") == 0


@pytest.mark.parametrize("surface", ["mirror", "v1"])
async def test_bodies_over_a_mebibyte_are_413(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str, surface: Surface
) -> None:
    sc = await make_sidecar(None)
    big = orjson.dumps({"accountId": "a", "name": "n" * (1024 * 1024)})
    path = SURFACES[surface].format(tenant=tenant) + "/accounts"
    resp = await sc.client.post(path, data=io.BytesIO(big))
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "payload_too_large"
    assert emulator.count() == 0


def concrete(op: Operation, surface: str, tenant: str, ids: str = "x") -> str:
    path = SURFACES[surface] + op.path  # type: ignore[index]
    return path.format(tenant=tenant, **{p: ids for p in op.params})


@pytest.mark.parametrize(
    ("tenant_in_path", "status", "code"),
    [
        ("someone-else", 404, "unknown_tenant"),
        ("T", 404, "unknown_tenant"),
        ("..", 400, "invalid_id"),
        ("%2E%2E", 400, "invalid_id"),
        ("a%2Fb", 400, "invalid_id"),
        ("a%5Cb", 400, "invalid_id"),
    ],
)
async def test_the_mirror_serves_only_its_own_tenant(
    make_sidecar: SidecarFactory,
    emulator: Emulator,
    tenant: str,
    tenant_in_path: str,
    status: int,
    code: str,
) -> None:
    sc = await make_sidecar(None)
    base = base_url(sc)
    async with aiohttp.ClientSession() as s:
        for op in OPERATIONS:
            url = URL(base + concrete(op, "mirror", tenant_in_path), encoded=True)
            async with s.request(
                op.method, url, json={"accountId": "a"}, headers={"x-api-key": API_KEY}
            ) as resp:
                assert resp.status == status, op.name
                assert (await resp.json())["error"]["code"] == code
    assert emulator.count() == 0


async def test_unknown_upstream_paths_are_not_proxied_when_forwarding_is_off(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    """SIDECAR_FORWARD_UNKNOWN=false: only the table's operations reach the upstream
    (tests/test_unknown_operations.py has the default, forwarding on)."""
    sc = await make_sidecar(None, SIDECAR_FORWARD_UNKNOWN="false")
    for method, path, status, code in [
        ("GET", f"/tenants/{tenant}/accounts/a/secrets", 404, "unknown_operation"),
        ("PUT", f"/tenants/{tenant}/accounts/a", 405, "method_not_allowed"),
        ("GET", "/v1/accounts/a/invoices/i", 404, "not_found"),
        ("POST", f"/tenants/{tenant}/_emulator/reset", 404, "unknown_operation"),
        ("GET", "/tenants/someone-else/accounts/a/secrets", 404, "unknown_tenant"),
    ]:
        resp = await sc.client.request(method, path)
        assert resp.status in (404, 405), path
        assert resp.status == status, path
        assert resp.content_type == "application/json"
        assert (await resp.json())["error"]["code"] == code, path
        if status == 405:
            assert resp.headers["Allow"] == "PATCH"
    assert emulator.count() == 0


# -- hostile ids ----------------------------------------------------------------------------------

#: Ids the sidecar takes (the id rule: no /, \\, control character, . or ..) whose
#: characters still mean something in a URL.
HOSTILE = [
    "...",
    "..a",
    "%2F",
    "%2e%2e",
    "..%2F..%2F_emulator%2Freset",
    "?x=1",
    "a?b#c",
    "#",
    "%",
    "{x}",
    "ü;ñ 雪 ☃",
    "y" * 512,
]
#: Ids refused on every surface (400 ``invalid_id``, nothing sent): decoded, they
#: could leave their segment through a proxy that normalises paths.
REFUSED_IDS = [
    "..",
    ".",
    "../..",
    "a/b",
    "../../../_emulator/reset",
    "\\..\\..",
    "ü/ñ",
    "\t\n",
    "a\x00b",
    "a\x7fb",
    "a\x85b",
    "y" * 513,
]


@pytest.mark.parametrize("surface", ["mirror", "v1"])
async def test_hostile_ids_stay_one_segment_inside_the_tenant(
    make_sidecar: SidecarFactory,
    emulator: Emulator,
    tenant: str,
    session: aiohttp.ClientSession,
    surface: str,
) -> None:
    sc = await make_sidecar(None)
    sdk = sdk_for(session, sc, surface, tenant)
    emulator.create_account(tenant, "canary")
    for i, hostile in enumerate(HOSTILE):
        customer = f"{hostile}{i}" if len(hostile) < 512 else hostile[:-1] + str(i % 10)
        made = await sdk.create_account(account_id=hostile)
        assert made["accountId"] == hostile
        cust = await sdk.create_customer(account_id=hostile, customer_id=customer)
        assert (cust["accountId"], cust["customerId"]) == (hostile, customer)
        with pytest.raises(VellumError) as missing:
            await sdk.get_subscription(account_id=hostile, customer_id=customer)
        assert missing.value.body["error"]["code"] == "subscription_not_found", hostile
        status = await sdk.set_customer_status(
            account_id=hostile, customer_id=customer, status="paused"
        )
        assert status["customerId"] == customer
        assert len(await sdk.list_payment_methods(account_id=hostile)) == 2
        with pytest.raises(VellumError) as no_method:
            await sdk.remove_payment_method(account_id=hostile, method_id=hostile)
        assert no_method.value.body["error"]["code"] == "payment_method_not_found"
        with pytest.raises(VellumError) as no_invoice:
            await sdk.invoice_pdf_url(account_id=hostile, invoice_id=hostile)
        assert no_invoice.value.body["error"]["code"] == "invoice_not_found"
        assert not (await sdk.get_entitlements(hostile)).found
    assert_upstream_saw_only_the_sidecar(emulator, tenant)
    shapes = {op.name: ("/tenants/{tenant}" + op.path).split("/") for op in OPERATIONS}
    for r in emulator.requests:
        # Same number of segments as the operation's template, constants in place:
        # every id stayed exactly one segment.
        shape, parts = shapes[r.operation], r.path.split("/")
        assert len(parts) == len(shape), r.path
        for want, got in zip(shape, parts, strict=True):
            assert want.startswith("{") or want == got, r.path
        if r.operation not in ("create_account", "get_entitlements"):
            assert r.params["account"] in HOSTILE, r.params
    assert emulator.count("unknown") == 0
    assert emulator.count("create_account") == len(HOSTILE)
    # Nothing reached the admin API: the emulator still has its state.
    assert emulator.create_customer(tenant, "canary", "still-here")["accountId"] == "canary"


@pytest.mark.parametrize("surface", ["mirror", "v1"])
async def test_ids_that_could_leave_their_segment_are_refused_before_any_work(
    make_sidecar: SidecarFactory,
    emulator: Emulator,
    tenant: str,
    session: aiohttp.ClientSession,
    surface: str,
) -> None:
    """The id rule on every operation of the table, for every path id."""
    sc = await make_sidecar(None)
    base = base_url(sc) + SURFACES[surface].format(tenant=tenant)  # type: ignore[index]
    for bad in REFUSED_IDS:
        for op in OPERATIONS:
            for name in op.params:
                ids = {p: quote(bad if p == name else "ok", safe="") for p in op.params}
                url = URL(base + op.path.format(**ids), encoded=True)
                async with session.request(op.method, url, json={"x": 1}) as resp:
                    assert resp.status == 400, (op.name, name, bad)
                    error = (await resp.json())["error"]
                    assert error["code"] == "invalid_id", (op.name, name, bad)
                    assert error["message"].startswith(name), error
    assert emulator.count() == 0


@pytest.mark.parametrize(
    ("raw", "account"),
    [
        ("/accounts/../payment-methods", None),
        ("/accounts/%2E%2E/payment-methods", None),
        ("/accounts/%2e%2e/payment-methods", None),
        ("/accounts/./payment-methods", None),
        ("/accounts/..%2F..%2F_emulator/payment-methods", None),
        ("/accounts/a%2Fb/payment-methods", None),
        ("/accounts/a%5Cb/payment-methods", None),
        ("/accounts/a%0Ab/payment-methods", None),
        ("/accounts/%252F/payment-methods", "%2F"),
        ("/accounts/...%2E/payment-methods", "...."),
        ("/accounts/x%3Fy%3D1%23z/payment-methods", "x?y=1#z"),
        ("/accounts/%C3%BC/payment-methods", "ü"),
    ],
)
@pytest.mark.parametrize("surface", ["mirror", "v1"])
async def test_raw_paths_cannot_climb_out_of_the_tenant(
    make_sidecar: SidecarFactory,
    emulator: Emulator,
    tenant: str,
    session: aiohttp.ClientSession,
    surface: Surface,
    raw: str,
    account: str | None,
) -> None:
    """Paths as an attacker would send them, unnormalised, straight to the socket:
    refused (``account`` None) or sent with the id as exactly one segment."""
    sc = await make_sidecar(None)
    url = URL(base_url(sc) + SURFACES[surface].format(tenant=tenant) + raw, encoded=True)
    async with session.get(url, headers={"x-api-key": CALLER_KEY}) as resp:
        if account is None:
            assert resp.status == 400
            assert (await resp.json())["error"]["code"] == "invalid_id"
            assert emulator.requests == []
            return
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "account_not_found"
    (seen,) = emulator.requests
    assert seen.operation == "list_payment_methods"
    assert seen.params == {"tenant": tenant, "account": account}
    assert seen.path == f"/tenants/{tenant}/accounts/{segment(account)}/payment-methods"
    assert seen.api_key == API_KEY


# -- logs, metrics, contract ----------------------------------------------------------------


async def test_one_log_line_per_write_with_ids_and_outcome_and_no_secrets(
    make_sidecar: SidecarFactory,
    emulator: Emulator,
    tenant: str,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    sc = await make_sidecar(None)
    mirror = sdk_for(session, sc, "mirror", tenant)
    await mirror.create_account(account_id="acc", name="Jane Doe", email=PERSONAL)
    await mirror.create_customer(account_id="acc", customer_id="cus", email=PERSONAL)
    await mirror.list_payment_methods(account_id="acc")
    with pytest.raises(VellumError):
        await mirror.set_customer_status(account_id="acc", customer_id="cus", status="bogus")
    emulator.fail("set_account_status", 500, times=1)
    with pytest.raises(VellumError):
        await mirror.set_account_status(account_id="acc", status="closed")

    writes = [r for r in caplog.records if r.name == "sidecar.proxy"]
    fields = [r.fields for r in writes]  # type: ignore[attr-defined]
    assert [(f["operation"], f["status"], f["outcome"]) for f in fields] == [
        ("create_account", 201, "ok"),
        ("create_customer", 201, "ok"),
        ("set_customer_status", 400, "rejected"),
        ("set_account_status", 500, "upstream_error"),
    ]
    assert all(r.getMessage() == "billing_write" for r in writes)
    assert fields[1]["accountId"] == "acc" and fields[1]["customerId"] == "cus"
    assert fields[1]["dropped"] == "customer" and fields[1]["surface"] == "mirror"
    assert fields[2]["dropped"] is None
    assert writes[3].levelno == logging.WARNING
    formatted = "\n".join(JsonFormatter().format(r) for r in caplog.records)
    for secret in (CALLER_KEY, API_KEY, PERSONAL, "Jane Doe"):
        assert secret not in formatted


async def test_metrics_per_operation(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    emulator.create_account(tenant, "acc")
    sc = await make_sidecar(None)
    for prefix in ("/v1", f"/tenants/{tenant}"):
        resp = await sc.client.get(prefix + "/accounts/acc/invoices")
        assert resp.status == 200
    assert (await sc.client.get("/v1/accounts/nope/invoices")).status == 404
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(sc.metrics.render().decode())
        for s in family.samples
    }

    def sample(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    upstream = "vellum_sidecar_upstream_requests_total"
    assert sample(upstream, operation="list_invoices", status="200") == 2
    assert sample(upstream, operation="list_invoices", status="404") == 1
    latency = "vellum_sidecar_upstream_request_duration_seconds_count"
    assert sample(latency, operation="list_invoices") == 3
    local = "vellum_sidecar_requests_total"
    assert sample(local, route="/v1/accounts/{account}/invoices", method="GET", status="200") == 1
    assert sample(local, route="/v1/accounts/{account}/invoices", method="GET", status="404") == 1
    mirrored = "/tenants/{tenant}/accounts/{account}/invoices"
    assert sample(local, route=mirrored, method="GET", status="200") == 1


async def test_openapi_describes_every_operation_on_both_surfaces(
    make_sidecar: SidecarFactory,
) -> None:
    sc = await make_sidecar(None)
    doc = await (await sc.client.get("/openapi.json")).json()

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            target: Any = doc
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            node = target
        return node

    operation_ids = set()
    for op in OPERATIONS:
        for surface in SURFACES:
            path = SURFACES[surface] + op.path
            entry = doc["paths"][path][op.method.lower()]
            operation_ids.add(entry["operationId"])
            params = {resolve(p)["name"] for p in entry.get("parameters", [])}
            assert set(op.params) | ({"tenant"} if surface == "mirror" else set()) <= params
            if op.write:
                assert "Idempotency-Key" in params
            if op.body:
                schema = resolve(entry["requestBody"]["content"]["application/json"]["schema"])
                assert set(op.required) <= set(schema.get("required", [])), op.name
            else:
                assert "requestBody" not in entry, op.name
            responses = entry["responses"]
            success = [s for s in responses if s[0] in "23"]
            assert success, op.name
            for status in success:
                content = resolve(responses[status]).get("content")
                if content and "application/json" in content:
                    assert resolve(content["application/json"]["schema"])["type"] == "object"
                elif content:  # a body that is not JSON (the invoice PDF): any bytes
                    assert list(content) == ["application/pdf"], op.name
            if not op.cached:
                for status in ("400", "502", "504"):
                    assert resolve(responses[status])["content"], (op.name, status)
    assert len(operation_ids) == 2 * len(OPERATIONS), "operationIds are unique"
