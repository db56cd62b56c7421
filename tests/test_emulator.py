"""sidecar.emulator: upstream routes, the admin API, faults and signed pushes."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import orjson
import pypdf
import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestClient
from multidict import CIMultiDictProxy
from pytest_aiohttp import AiohttpClient, AiohttpServer
from yarl import URL

from sidecar.emulator import (
    DEFAULT_EVENT_ID_FIELDS,
    DEMO_TENANT,
    EMULATOR,
    OPERATIONS,
    UPSTREAM_ROUTES,
    Answer,
    Call,
    Emulator,
    EmulatorError,
    State,
    create_emulator_app,
)
from sidecar.http.operations import OPERATIONS as TABLE
from sidecar.signature import verify

API_KEY = "emulator-test-key"
SECRET = "whsec_emulator_test"
T = DEMO_TENANT  # the seeded tenant
WAIT = 5.0  # upper bound for anything a test awaits; never a sleep


@dataclass
class Received:
    body: bytes
    headers: CIMultiDictProxy[str]

    @property
    def event(self) -> dict[str, Any]:
        event: dict[str, Any] = orjson.loads(self.body)
        return event


@dataclass
class Receiver:
    """A webhook consumer standing in for the sidecar's /webhooks/vellum."""

    url: str = ""
    status: int = 200
    received: list[Received] = field(default_factory=list)
    hang: asyncio.Event | None = None  # when set, requests wait for it before answering

    @property
    def events(self) -> list[dict[str, Any]]:
        return [r.event for r in self.received]


@dataclass
class Reply:
    status: int
    body: Any
    headers: CIMultiDictProxy[str]


class Api:
    """Calls the emulator with every path segment quoted, the way the sidecar does."""

    def __init__(self, client: TestClient[web.Request, web.Application]) -> None:
        self.client = client
        self.root = str(client.make_url("/")).rstrip("/")

    async def call(
        self,
        method: str,
        template: str,
        *segments: str,
        key: str | None = API_KEY,
        json: Any = None,
        data: bytes | io.BytesIO | None = None,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        path = template.format(*(quote(s, safe="") for s in segments))
        # encoded=True: "." and ".." ids must reach the server verbatim, not be
        # resolved as dot segments the way URL.join would.
        url = URL(self.root + path, encoded=True)
        if params:
            url = url.with_query(params)
        sent = dict(headers or {})
        if key is not None:
            sent["x-api-key"] = key
        body: bytes | io.BytesIO | None = orjson.dumps(json) if json is not None else data
        if body is not None:
            sent.setdefault("Content-Type", "application/json")
        async with self.client.session.request(
            method, url, data=body, headers=sent, allow_redirects=False
        ) as response:
            raw = await response.read()
            parsed = orjson.loads(raw) if raw and response.content_type.endswith("json") else None
            return Reply(response.status, parsed, response.headers)

    async def entitlements(self, customer: str, tenant: str = T) -> Reply:
        return await self.call("GET", "/tenants/{}/customers/{}/entitlements", tenant, customer)

    async def admin_put(self, customer: str, doc: Any, tenant: str = T) -> Reply:
        path = "/_emulator/tenants/{}/customers/{}/entitlements"
        return await self.call("PUT", path, tenant, customer, key=None, json=doc)


@pytest.fixture
async def receiver(aiohttp_server: AiohttpServer) -> AsyncIterator[Receiver]:
    receiver = Receiver()

    async def webhook(request: web.Request) -> web.Response:
        receiver.received.append(Received(await request.read(), request.headers))
        if receiver.hang is not None:
            await receiver.hang.wait()
        return web.json_response({"ok": True}, status=receiver.status)

    app = web.Application()
    app.router.add_post("/webhooks/vellum", webhook)
    server = await aiohttp_server(app)
    receiver.url = str(server.make_url("/webhooks/vellum"))
    yield receiver
    if receiver.hang is not None:
        receiver.hang.set()  # let a deliberately hung request finish so the server can close


@pytest.fixture
def app(receiver: Receiver) -> web.Application:
    return create_emulator_app(
        api_keys=[API_KEY, "second-key"],
        webhook_url=receiver.url,
        webhook_secret=SECRET,
        seed=True,
    )


@pytest.fixture
def emulator(app: web.Application) -> Emulator:
    return app[EMULATOR]


@pytest.fixture
async def api(aiohttp_client: AiohttpClient, app: web.Application) -> Api:
    return Api(await aiohttp_client(app))


async def new_account(api: Api, account: str = "globex", tenant: str = T, **extra: Any) -> Reply:
    reply = await api.call(
        "POST", "/tenants/{}/accounts", tenant, json={"accountId": account, **extra}
    )
    assert reply.status == 201, reply.body
    return reply


async def new_customer(api: Api, account: str, customer: str, tenant: str = T) -> Reply:
    path = "/tenants/{}/accounts/{}/customers"
    reply = await api.call("POST", path, tenant, account, json={"customerId": customer})
    assert reply.status == 201, reply.body
    return reply


async def subscribe(
    api: Api, account: str, customer: str, plan: str = "pro", seats: int = 1, tenant: str = T
) -> Reply:
    return await api.call(
        "POST",
        "/tenants/{}/accounts/{}/customers/{}/subscribe",
        tenant,
        account,
        customer,
        json={"planId": plan, "planVersion": 1, "seats": seats},
    )


def error_code(reply: Reply) -> str:
    code: str = reply.body["error"]["code"]
    assert isinstance(reply.body["error"]["message"], str)
    return code


# ---------------------------------------------------------------- auth and routing


@pytest.mark.parametrize("key", [None, "", "wrong-key"])
async def test_upstream_requires_a_known_api_key(
    api: Api, emulator: Emulator, key: str | None
) -> None:
    reply = await api.call("GET", "/tenants/{}/customers/{}/entitlements", T, "cus_active", key=key)

    assert reply.status == 401
    assert error_code(reply) == "unauthorized"
    assert emulator.requests[-1].operation == "get_entitlements"
    assert emulator.requests[-1].api_key == key


async def test_every_configured_key_is_accepted(api: Api) -> None:
    path = "/tenants/{}/customers/{}/entitlements"
    assert (await api.call("GET", path, T, "cus_active")).status == 200
    assert (await api.call("GET", path, T, "cus_active", key="second-key")).status == 200


async def test_api_keys_can_be_rotated_at_runtime(api: Api, emulator: Emulator) -> None:
    emulator.api_keys = {"rotated"}

    assert (await api.entitlements("cus_active")).status == 401
    reply = await api.call(
        "GET", "/tenants/{}/customers/{}/entitlements", T, "cus_active", key="rotated"
    )
    assert reply.status == 200


async def test_unknown_path_is_json_404_after_auth(api: Api, emulator: Emulator) -> None:
    unauthenticated = await api.call("GET", "/tenants/{}/nothing-here", T, key=None)
    authenticated = await api.call("GET", "/tenants/{}/nothing-here", T)
    outside = await api.call("GET", "/v2/whatever")

    assert unauthenticated.status == 401
    assert authenticated.status == 404
    assert error_code(authenticated) == "not_found"
    assert outside.status == 404
    assert emulator.requests[-1].operation == "unknown"


async def test_wrong_method_is_json_405_with_allow(api: Api) -> None:
    reply = await api.call("GET", "/tenants/{}/accounts/{}", T, "acme")

    assert reply.status == 405
    assert error_code(reply) == "method_not_allowed"
    assert "PATCH" in reply.headers["Allow"]


async def test_admin_api_needs_no_key_and_has_a_health_check(api: Api) -> None:
    reply = await api.call("GET", "/_emulator/healthz", key=None)

    assert reply.status == 200
    assert reply.body == {"ok": True}
    assert (await api.call("GET", "/_emulator/nope", key=None)).status == 404


WEIRD_IDS = [
    "a/b",
    "a b",
    "ünïcødé-客户",
    "100%",
    "%2F",
    "a%20b",
    "..",
    ".",
    "../../etc",
    "a?b#c",
    "{x}",
    "+plus&amp;=",
]


@pytest.mark.parametrize("customer", WEIRD_IDS)
async def test_ids_round_trip_exactly(api: Api, emulator: Emulator, customer: str) -> None:
    tenant = "tenant/with slash"
    put = await api.admin_put(customer, {"modules": ["reports"]}, tenant=tenant)
    got = await api.entitlements(customer, tenant=tenant)

    assert put.status == 200
    assert put.body["entitlements"]["customerId"] == customer
    assert got.status == 200
    assert got.body["customerId"] == customer
    assert emulator.requests[-1].params == {"tenant": tenant, "customer": customer}
    assert emulator.get_entitlements(tenant, customer) is not None


async def test_weird_account_and_customer_ids_work_everywhere(api: Api) -> None:
    account, customer = "acc/1 %", "cus/ü ."
    await new_account(api, account)
    await new_customer(api, account, customer)

    sub = await subscribe(api, account, customer)
    got = await api.call(
        "GET", "/tenants/{}/accounts/{}/customers/{}/subscription", T, account, customer
    )

    assert sub.status == 201
    assert got.body["accountId"] == account
    assert got.body["customerId"] == customer


# ---------------------------------------------------------------- entitlements


@pytest.mark.parametrize(
    ("customer", "status", "access", "modules", "seats"),
    [
        ("cus_active", "active", True, ["reports", "exports"], 5),
        ("cus_trial", "trialing", True, ["reports"], 1),
        ("cus_pastdue", "past_due", True, ["reports"], 1),
        ("cus_canceled", "canceled", False, [], 1),
    ],
)
async def test_seeded_entitlements(
    api: Api, customer: str, status: str, access: bool, modules: list[str], seats: int
) -> None:
    reply = await api.entitlements(customer)

    assert reply.status == 200
    assert reply.body["customerId"] == customer
    assert reply.body["accountId"] == "acme"
    assert reply.body["status"] == status
    assert reply.body["hasAccess"] is access
    assert reply.body["modules"] == modules, "emptied when access is withheld"
    assert reply.body["config"] == {"seats": seats}
    assert reply.body["productId"] == "app"
    assert isinstance(reply.body["updatedAt"], int)


async def test_unknown_customer_is_404(api: Api) -> None:
    reply = await api.entitlements("cus_nobody")

    assert reply.status == 404
    assert error_code(reply) == "entitlements_not_found"


async def test_tenants_are_isolated(api: Api) -> None:
    assert (await api.entitlements("cus_active", tenant="other")).status == 404

    await api.admin_put("cus_active", {"status": "canceled"}, tenant="other")

    assert (await api.entitlements("cus_active", tenant="other")).body["status"] == "canceled"
    assert (await api.entitlements("cus_active")).body["status"] == "active"


async def test_extra_fields_pass_through(api: Api) -> None:
    doc = {"status": "active", "modules": ["x"], "config": {"a": 1}, "flags": {"beta": True}}

    await api.admin_put("cus_x", doc)
    reply = await api.entitlements("cus_x")

    assert reply.body["flags"] == {"beta": True}
    assert reply.body["config"] == {"a": 1}


async def test_admin_put_replaces_and_defaults(api: Api) -> None:
    await api.admin_put("cus_active", {"modules": ["api"]})

    reply = await api.entitlements("cus_active")

    # a full replacement: missing fields take defaults, the account is still known
    assert reply.body["status"] == "active"
    assert reply.body["modules"] == ["api"]
    assert reply.body["config"] == {}
    assert reply.body["accountId"] == "acme"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"[1, 2]", "invalid_body"),
        (b"", "invalid_body"),
        (b"{nope", "invalid_json"),
        (b'{"modules": "reports"}', "invalid_field"),
        (b'{"modules": [1]}', "invalid_field"),
        (b'{"config": []}', "invalid_field"),
        (b'{"status": 3}', "invalid_field"),
    ],
)
async def test_admin_put_validates(api: Api, receiver: Receiver, body: bytes, code: str) -> None:
    reply = await api.call(
        "PUT", "/_emulator/customers/{}/entitlements", "cus_active", key=None, data=body
    )

    assert reply.status == 400
    assert error_code(reply) == code
    assert receiver.received == []


async def test_admin_get_and_delete(api: Api, receiver: Receiver) -> None:
    path = "/_emulator/tenants/{}/customers/{}/entitlements"
    got = await api.call("GET", path, T, "cus_trial", key=None)
    deleted = await api.call("DELETE", path, T, "cus_trial", key=None)
    again = await api.call("DELETE", path, T, "cus_trial", key=None)

    assert got.body["status"] == "trialing"
    assert deleted.body == {"deleted": True, "pushed": True}
    assert again.body == {"deleted": False, "pushed": False}
    assert (await api.entitlements("cus_trial")).status == 404
    assert (await api.call("GET", path, T, "cus_trial", key=None)).status == 404
    assert [e["customerId"] for e in receiver.events] == ["cus_trial"]


async def test_default_tenant_shorthand(aiohttp_client: AiohttpClient) -> None:
    app = create_emulator_app(api_keys=[API_KEY], seed=True, default_tenant="acme-co")
    api = Api(await aiohttp_client(app))

    put = await api.call(
        "PUT", "/_emulator/customers/{}/entitlements", "c1", key=None, json={"modules": ["m"]}
    )

    assert put.status == 200
    assert put.body["pushed"] is False  # no webhook_url configured
    assert (await api.entitlements("c1", tenant="acme-co")).body["modules"] == ["m"]
    assert (await api.entitlements("cus_active", tenant="acme-co")).status == 200
    assert (await api.entitlements("cus_active", tenant=DEMO_TENANT)).status == 404


async def test_unseeded_emulator_is_empty(aiohttp_client: AiohttpClient) -> None:
    api = Api(await aiohttp_client(create_emulator_app(api_keys=[API_KEY])))

    assert (await api.entitlements("cus_active")).status == 404


# ---------------------------------------------------------------- accounts and customers


async def test_create_account(api: Api) -> None:
    reply = await new_account(api, "globex", name="Globex", email="ap@globex.example")
    methods = await api.call("GET", "/tenants/{}/accounts/{}/payment-methods", T, "globex")

    assert reply.body["accountId"] == "globex"
    assert reply.body["name"] == "Globex"
    assert reply.body["email"] == "ap@globex.example"
    assert reply.body["status"] == "active"
    assert reply.body["billingCustomerId"] is None
    assert isinstance(reply.body["createdAt"], int)
    assert [m["isDefault"] for m in methods.body["methods"]] == [True, False]
    assert all(m["ref"].startswith("pmr_") for m in methods.body["methods"])
    assert reply.body["defaultPaymentMethodRef"] == methods.body["methods"][0]["ref"]


async def test_create_account_adopts_or_creates_a_billing_customer(api: Api) -> None:
    adopted = await new_account(api, "a1", billingCustomerId="cus_existing")
    created = await new_account(api, "a2", createBillingCustomer=True)
    bare = await new_account(api, "a3")

    assert adopted.body["billingCustomerId"] == "cus_existing"
    assert created.body["billingCustomerId"].startswith("cus_")
    # An existing account: the create is idempotent and adopts a customer it lacks.
    again = await api.call("POST", "/tenants/{}/accounts", T, json={"accountId": "a1"})
    same = await api.call(
        "POST",
        "/tenants/{}/accounts",
        T,
        json={"accountId": "a1", "billingCustomerId": "cus_existing"},
    )
    adopts = await api.call(
        "POST", "/tenants/{}/accounts", T, json={"accountId": "a3", "billingCustomerId": "cus_new"}
    )
    conflict = await api.call(
        "POST",
        "/tenants/{}/accounts",
        T,
        json={"accountId": "a1", "billingCustomerId": "cus_other"},
    )
    stale_names = await api.call(
        "POST", "/tenants/{}/accounts", T, json={"accountId": "a4", "stripeCustomerId": "cus_old"}
    )

    assert bare.body["billingCustomerId"] is None
    assert (again.status, again.body) == (200, adopted.body)
    assert (same.status, same.body) == (200, adopted.body)
    assert (adopts.status, adopts.body["billingCustomerId"]) == (200, "cus_new")
    assert (conflict.status, error_code(conflict)) == (409, "billing_customer_conflict")
    assert (await api.call("POST", "/tenants/{}/accounts", T, json={"accountId": "a1"})).body[
        "billingCustomerId"
    ] == "cus_existing", "nothing changed"
    assert stale_names.body["billingCustomerId"] is None, "0.1.0's field names are unknown fields"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"accountId": "acme", "billingCustomerId": "cus_other"}, 409, "billing_customer_conflict"),
        ({"name": "no id"}, 400, "missing_field"),
        ({"accountId": ""}, 400, "invalid_field"),
        ({"accountId": 7}, 400, "invalid_field"),
        ({"accountId": "x", "name": 1}, 400, "invalid_field"),
        ({"accountId": "x", "createBillingCustomer": "yes"}, 400, "invalid_field"),
        ({"accountId": "x", "name": None}, 400, "invalid_field"),
        (["acme"], 400, "invalid_body"),
    ],
)
async def test_create_account_errors(api: Api, body: Any, status: int, code: str) -> None:
    reply = await api.call("POST", "/tenants/{}/accounts", T, json=body)

    assert reply.status == status
    assert error_code(reply) == code


async def test_create_customer(api: Api) -> None:
    reply = await new_customer(api, "acme", "cus_new")

    assert reply.body["customerId"] == "cus_new"
    assert reply.body["accountId"] == "acme"
    # a customer has no entitlement record until it subscribes or gets a status
    assert (await api.entitlements("cus_new")).status == 404


@pytest.mark.parametrize(
    ("account", "body", "status", "code"),
    [
        ("acme", {"customerId": "cus_active"}, 409, "customer_exists"),
        ("globex", {"customerId": "cus_active"}, 409, "customer_exists"),  # unique per tenant
        ("nobody", {"customerId": "c"}, 404, "account_not_found"),
        ("acme", {"email": "x@y"}, 400, "missing_field"),
    ],
)
async def test_create_customer_errors(
    api: Api, account: str, body: Any, status: int, code: str
) -> None:
    await new_account(api, "globex")

    reply = await api.call("POST", "/tenants/{}/accounts/{}/customers", T, account, json=body)

    assert reply.status == status
    assert error_code(reply) == code


async def test_python_api_creates_accounts_and_customers(api: Api, emulator: Emulator) -> None:
    emulator.create_account("t2", "a", name="A")
    emulator.create_customer("t2", "a", "c", email="c@a.example")

    sub = await subscribe(api, "a", "c", plan="team", tenant="t2")

    assert sub.status == 201
    assert (await api.entitlements("c", tenant="t2")).body["modules"] == ["reports", "exports"]


# ---------------------------------------------------------------- billing


async def test_checkout(api: Api, emulator: Emulator) -> None:
    body = {
        "customerId": "cus_canceled",
        "planId": "pro",
        "planVersion": 2,
        "seats": 3,
        "successUrl": "https://app.example/ok",
        "cancelUrl": "https://app.example/no",
    }
    reply = await api.call("POST", "/tenants/{}/accounts/{}/checkout", T, "acme", json=body)

    assert reply.status == 201
    assert reply.body["id"].startswith("cs_test_")
    assert reply.body["url"] == f"https://checkout.example/{reply.body['id']}"
    assert (reply.body["mode"], reply.body["status"]) == ("subscription", "open")
    assert (reply.body["productId"], reply.body["planVersion"], reply.body["seats"]) == (
        "app",
        2,
        3,
    )
    assert reply.body["amountTotal"] == 3 * 5900
    assert emulator.requests[-1].body == body
    assert [c["id"] for c in emulator.checkouts(T)] == [reply.body["id"]]


@pytest.mark.parametrize(
    ("account", "change", "status", "code"),
    [
        ("acme", {"successUrl": None}, 400, "missing_field"),
        ("acme", {"planId": None}, 400, "missing_field"),
        ("acme", {"planVersion": 0}, 400, "invalid_field"),
        ("acme", {"planVersion": "2"}, 400, "invalid_field"),
        ("acme", {"planVersion": 9}, 404, "plan_version_not_found"),
        ("acme", {"planId": "gold"}, 404, "plan_not_found"),
        ("acme", {"planId": "enterprise"}, 400, "ambiguous_plan"),
        ("acme", {"productId": "data"}, 404, "plan_not_found"),
        ("acme", {"productId": "nope"}, 404, "product_not_found"),
        ("acme", {"addOnModuleIds": ["api"]}, 409, "add_on_included"),
        ("acme", {"addOnModuleIds": ["gold"]}, 400, "unknown_add_on"),
        ("acme", {"customerId": "cus_active"}, 409, "subscription_exists"),
        ("acme", {"seats": 0}, 400, "invalid_field"),
        ("acme", {"seats": True}, 400, "invalid_field"),
        ("acme", {"customerId": "cus_nobody"}, 404, "customer_not_found"),
        ("nobody", {}, 404, "account_not_found"),
    ],
)
async def test_checkout_errors(
    api: Api, account: str, change: dict[str, Any], status: int, code: str
) -> None:
    body = {
        "customerId": "cus_canceled",
        "planId": "pro",
        "planVersion": 1,
        "successUrl": "https://app.example/ok",
        "cancelUrl": "https://app.example/no",
    }
    body = {k: v for k, v in (body | change).items() if v is not None}

    reply = await api.call("POST", "/tenants/{}/accounts/{}/checkout", T, account, json=body)

    assert reply.status == status
    assert error_code(reply) == code


async def test_setup_checkout(api: Api) -> None:
    path = "/tenants/{}/accounts/{}/billing/setup-checkout"
    ok = await api.call(
        "POST", path, T, "acme", json={"successUrl": "https://a/ok", "cancelUrl": "https://a/no"}
    )
    missing = await api.call("POST", path, T, "acme", json={"successUrl": "https://a/ok"})
    unknown = await api.call(
        "POST", path, T, "nobody", json={"successUrl": "https://a/ok", "cancelUrl": "https://a/no"}
    )

    assert ok.status == 201
    assert ok.body["mode"] == "setup"
    assert ok.body["url"].startswith("https://checkout.example/cs_")
    assert missing.status == 400
    assert error_code(missing) == "missing_field"
    assert unknown.status == 404


async def test_subscribe_grants_plan_modules_bills_and_pushes(api: Api, receiver: Receiver) -> None:
    await new_account(api, "globex")
    await new_customer(api, "globex", "cus_g")

    reply = await subscribe(api, "globex", "cus_g", plan="pro", seats=4)
    ent = await api.entitlements("cus_g")
    invoices = await api.call(
        "GET", "/tenants/{}/accounts/{}/invoices", T, "globex", params={"customerId": "cus_g"}
    )
    methods = await api.call("GET", "/tenants/{}/accounts/{}/payment-methods", T, "globex")

    assert reply.status == 201
    assert reply.body["planId"] == "pro"
    assert reply.body["planVersion"] == 1
    assert reply.body["seats"] == 4
    assert reply.body["status"] == "active"
    assert reply.body["amount"] == 4 * 4900
    assert reply.body["defaultPaymentMethodRef"] == methods.body["methods"][0]["ref"]
    assert ent.body["status"] == "active" and ent.body["hasAccess"] is True
    assert ent.body["modules"] == ["reports", "exports", "api"]
    assert ent.body["config"] == {"seats": 4}
    assert (ent.body["planId"], ent.body["planVersion"]) == ("pro", 1)
    (invoice,) = invoices.body["invoices"]
    assert (invoice["total"], invoice["paid"], invoice["number"]) == (4 * 4900, True, "GLOBEX-0001")
    # the handler waited for delivery, so the pushes are already there, in order
    paid, updated = receiver.events
    assert (paid["type"], paid["seats"], paid["invoice"]) == ("payment.succeeded", 4, invoice)
    assert updated["type"] == "entitlements.updated"
    assert updated["customerId"] == paid["customerId"] == "cus_g"
    assert updated["accountId"] == "globex"


async def test_subscribe_errors(api: Api) -> None:
    path = "/tenants/{}/accounts/{}/customers/{}/subscribe"
    twice = await subscribe(api, "acme", "cus_active")
    unknown = await subscribe(api, "acme", "cus_nobody")
    no_plan = await api.call("POST", path, T, "acme", "cus_canceled", json={"planVersion": 1})
    null = await api.call(
        "POST", path, T, "acme", "cus_canceled", json={"planId": "pro", "planVersion": None}
    )
    bad_seats = await api.call(
        "POST",
        path,
        T,
        "acme",
        "cus_canceled",
        json={"planId": "pro", "planVersion": 1, "seats": "2"},
    )

    assert (twice.status, error_code(twice)) == (409, "subscription_exists")
    assert (unknown.status, error_code(unknown)) == (404, "customer_not_found")
    assert (no_plan.status, error_code(no_plan)) == (400, "missing_field")
    assert (null.status, error_code(null)) == (400, "invalid_field"), "optional, not nullable"
    assert (bad_seats.status, error_code(bad_seats)) == (400, "invalid_field")


async def test_get_subscription(api: Api, emulator: Emulator) -> None:
    path = "/tenants/{}/accounts/{}/customers/{}/subscription"
    emulator.create_customer(T, "acme", "cus_fresh")

    found = await api.call("GET", path, T, "acme", "cus_active")
    none = await api.call("GET", path, T, "acme", "cus_fresh")
    unknown_account = await api.call("GET", path, T, "nobody", "cus_active")

    assert found.status == 200
    assert found.body["planId"] == "team"
    assert found.body["seats"] == 5
    assert (none.status, error_code(none)) == (404, "subscription_not_found")
    assert (unknown_account.status, error_code(unknown_account)) == (404, "account_not_found")


async def test_cancel_at_period_end_keeps_access_and_does_not_push(
    api: Api, receiver: Receiver
) -> None:
    path = "/tenants/{}/accounts/{}/customers/{}/subscription"
    reply = await api.call("DELETE", path, T, "acme", "cus_active", params={"atPeriodEnd": "true"})

    assert reply.status == 200
    assert reply.body["cancelAtPeriodEnd"] is True
    assert reply.body["status"] == "active"
    assert (await api.entitlements("cus_active")).body["modules"] == ["reports", "exports"]
    assert receiver.received == []


async def test_cancel_now_revokes_and_pushes(api: Api, receiver: Receiver) -> None:
    path = "/tenants/{}/accounts/{}/customers/{}/subscription"
    reply = await api.call("DELETE", path, T, "acme", "cus_active")
    ent = await api.entitlements("cus_active")
    again = await api.call("DELETE", path, T, "acme", "cus_active")
    resubscribed = await subscribe(api, "acme", "cus_active", plan="starter")

    assert reply.status == 200
    assert reply.body["status"] == "canceled"
    assert reply.body["canceledAt"].endswith("Z")
    assert ent.body["status"] == "canceled"
    assert ent.body["hasAccess"] is False
    assert ent.body["modules"] == []
    assert ent.body["config"] == {"seats": 5}
    assert [e["type"] for e in receiver.events] == [
        "entitlements.updated",
        "payment.succeeded",
        "entitlements.updated",
    ]
    assert {e["customerId"] for e in receiver.events} == {"cus_active"}
    assert (again.status, error_code(again)) == (409, "subscription_canceled")
    assert resubscribed.status == 201
    assert (await api.entitlements("cus_active")).body["modules"] == ["reports"]


async def test_cancel_errors(api: Api, emulator: Emulator) -> None:
    path = "/tenants/{}/accounts/{}/customers/{}/subscription"
    emulator.create_customer(T, "acme", "cus_fresh")

    bad_query = await api.call(
        "DELETE", path, T, "acme", "cus_active", params={"atPeriodEnd": "maybe"}
    )
    none = await api.call("DELETE", path, T, "acme", "cus_fresh")

    assert (bad_query.status, error_code(bad_query)) == (400, "invalid_query")
    assert (none.status, error_code(none)) == (404, "subscription_not_found")


async def test_set_account_status_pushes_an_account_event(api: Api, receiver: Receiver) -> None:
    reply = await api.call(
        "PATCH", "/tenants/{}/accounts/{}", T, "acme", json={"status": "suspended"}
    )
    ent = await api.entitlements("cus_trial")

    assert reply.status == 200
    assert reply.body["status"] == "suspended"
    assert ent.body["accountStatus"] == "suspended"
    (event,) = receiver.events
    assert event["accountId"] == "acme"
    assert "customerId" not in event


@pytest.mark.parametrize(
    ("account", "body", "status", "code"),
    [
        ("acme", {"status": "sleeping"}, 400, "invalid_status"),
        ("acme", {}, 400, "missing_field"),
        ("acme", {"status": 1}, 400, "invalid_field"),
        ("nobody", {"status": "active"}, 404, "account_not_found"),
    ],
)
async def test_set_account_status_errors(
    api: Api, account: str, body: Any, status: int, code: str
) -> None:
    reply = await api.call("PATCH", "/tenants/{}/accounts/{}", T, account, json=body)

    assert reply.status == status
    assert error_code(reply) == code


async def test_set_customer_status_is_reflected_in_entitlements(
    api: Api, emulator: Emulator, receiver: Receiver
) -> None:
    path = "/tenants/{}/accounts/{}/customers/{}"
    emulator.create_customer(T, "acme", "cus_fresh")

    existing = await api.call("PATCH", path, T, "acme", "cus_active", json={"status": "past_due"})
    fresh = await api.call("PATCH", path, T, "acme", "cus_fresh", json={"status": "trialing"})
    invalid = await api.call("PATCH", path, T, "acme", "cus_active", json={"status": "gone"})
    unknown = await api.call("PATCH", path, T, "acme", "cus_nobody", json={"status": "active"})

    assert existing.body["status"] == "past_due"
    assert (await api.entitlements("cus_active")).body["status"] == "past_due"
    assert (await api.entitlements("cus_active")).body["modules"] == ["reports", "exports"]
    assert fresh.status == 200
    assert (await api.entitlements("cus_fresh")).body == {
        "customerId": "cus_fresh",
        "accountId": "acme",
        "status": "trialing",
        "hasAccess": True,
        "modules": [],
        "config": {},
        "updatedAt": emulator.get_entitlements(T, "cus_fresh")["updatedAt"],  # type: ignore[index]
    }
    assert (invalid.status, error_code(invalid)) == (400, "invalid_status")
    assert (unknown.status, error_code(unknown)) == (404, "customer_not_found")
    assert [e["customerId"] for e in receiver.events] == ["cus_active", "cus_fresh"]


async def test_payment_methods(api: Api) -> None:
    base = "/tenants/{}/accounts/{}/payment-methods"
    one = base + "/{}"

    listed = await api.call("GET", base, T, "acme")
    visa, mastercard = (m["ref"] for m in listed.body["methods"])
    made_default = await api.call("PATCH", one, T, "acme", mastercard)
    after = await api.call("GET", base, T, "acme")
    unknown = await api.call("PATCH", one, T, "acme", "pm_nope")
    raw = await api.call("PATCH", one, T, "acme", "pm_acme_visa")

    assert listed.body["methods"][0] == {
        "ref": visa,
        "brand": "visa",
        "last4": "4242",
        "expMonth": 12,
        "expYear": 2030,
        "name": "Acme Inc.",
        "isDefault": True,
    }
    assert made_default.body == {**listed.body["methods"][1], "isDefault": True}
    assert [m["isDefault"] for m in after.body["methods"]] == [False, True]
    assert (unknown.status, error_code(unknown)) == (404, "payment_method_not_found")
    assert (raw.status, error_code(raw)) == (404, "payment_method_not_found"), "the provider's id"
    assert (await api.call("GET", base, T, "nobody")).status == 404


async def test_refs_are_bound_to_their_account(api: Api) -> None:
    base = "/tenants/{}/accounts/{}/payment-methods"
    await new_account(api, "globex")
    theirs = (await api.call("GET", base, T, "globex")).body["methods"][0]["ref"]
    invoice = (await api.call("GET", "/tenants/{}/accounts/{}/invoices", T, "acme")).body[
        "invoices"
    ][0]["ref"]

    foreign_method = await api.call("PATCH", base + "/{}", T, "acme", theirs)
    foreign_invoice = await api.call(
        "GET", "/tenants/{}/accounts/{}/invoices/{}/pdf", T, "globex", invoice
    )
    other_tenant = await api.call(
        "GET", "/tenants/{}/accounts/{}/invoices/{}/pdf", "elsewhere", "acme", invoice
    )

    assert (foreign_method.status, error_code(foreign_method)) == (404, "payment_method_not_found")
    assert (foreign_invoice.status, error_code(foreign_invoice)) == (404, "invoice_not_found")
    assert other_tenant.status == 404


async def test_remove_payment_method(api: Api) -> None:
    base = "/tenants/{}/accounts/{}/payment-methods"
    one = base + "/{}"
    await new_account(api, "globex")
    first, second = [m["ref"] for m in (await api.call("GET", base, T, "globex")).body["methods"]]

    removed = await api.call("DELETE", one, T, "globex", first)
    again = await api.call("DELETE", one, T, "globex", first)
    remaining = await api.call("GET", base, T, "globex")

    assert removed.status == 200, "a JSON answer: the SDK parses every answer"
    assert removed.body == {"ref": first, "removed": True}
    assert (again.status, error_code(again)) == (404, "payment_method_not_found")
    # the default moves to what is left
    assert remaining.body["methods"] == [{**remaining.body["methods"][0], "ref": second}]
    assert remaining.body["methods"][0]["isDefault"] is True


async def test_payment_method_in_use_cannot_be_removed(api: Api) -> None:
    one = "/tenants/{}/accounts/{}/payment-methods/{}"
    refs = await api.call("GET", "/tenants/{}/accounts/{}/payment-methods", T, "acme")
    visa = refs.body["methods"][0]["ref"]
    await api.call(
        "PATCH",
        "/tenants/{}/accounts/{}/customers/{}/payment-method",
        T,
        "acme",
        "cus_active",
        json={"methodId": visa},
    )
    reply = await api.call("DELETE", one, T, "acme", visa)

    assert (reply.status, error_code(reply)) == (409, "payment_method_in_use")


async def test_set_subscription_payment_method(api: Api, emulator: Emulator) -> None:
    path = "/tenants/{}/accounts/{}/customers/{}/payment-method"
    emulator.create_customer(T, "acme", "cus_fresh")
    refs = await api.call("GET", "/tenants/{}/accounts/{}/payment-methods", T, "acme")
    visa, mastercard = (m["ref"] for m in refs.body["methods"])

    before = await api.call(
        "GET", "/tenants/{}/accounts/{}/customers/{}/subscription", T, "acme", "cus_active"
    )
    ok = await api.call("PATCH", path, T, "acme", "cus_active", json={"methodId": mastercard})
    sub = await api.call(
        "GET", "/tenants/{}/accounts/{}/customers/{}/subscription", T, "acme", "cus_active"
    )
    unknown = await api.call("PATCH", path, T, "acme", "cus_active", json={"methodId": "pm_x"})
    missing = await api.call("PATCH", path, T, "acme", "cus_active", json={})
    no_sub = await api.call("PATCH", path, T, "acme", "cus_fresh", json={"methodId": visa})

    assert before.body["defaultPaymentMethodRef"] == visa, "the account's default pays"
    assert ok.status == 200
    assert ok.body["defaultPaymentMethodRef"] == mastercard
    assert sub.body["defaultPaymentMethodRef"] == mastercard
    assert (unknown.status, error_code(unknown)) == (404, "payment_method_not_found")
    assert (missing.status, error_code(missing)) == (400, "missing_field")
    assert (no_sub.status, error_code(no_sub)) == (404, "subscription_not_found")


async def test_invoices(api: Api) -> None:
    path = "/tenants/{}/accounts/{}/invoices"
    everything = await api.call("GET", path, T, "acme")
    filtered = await api.call("GET", path, T, "acme", params={"customerId": "cus_pastdue"})
    nobody = await api.call("GET", path, T, "acme", params={"customerId": "cus_nobody"})
    unknown = await api.call("GET", path, T, "nobody")

    assert [i["number"] for i in everything.body["invoices"]] == ["ACME-0001", "ACME-0002"]
    assert [(i["paid"], i["status"]) for i in everything.body["invoices"]] == [
        (True, "paid"),
        (False, "open"),
    ]
    assert [i["number"] for i in filtered.body["invoices"]] == ["ACME-0002"]
    assert set(everything.body["invoices"][0]) == {
        "ref", "number", "status", "amountDue", "amountPaid", "subtotal", "total", "tax",
        "paid", "currency", "created", "hostedInvoiceUrl",
    }  # fmt: skip
    assert nobody.body == {"invoices": []}
    assert (unknown.status, error_code(unknown)) == (404, "account_not_found")


async def test_invoice_pdf_is_the_pdf_after_an_ownership_check(api: Api) -> None:
    path = "/tenants/{}/accounts/{}/invoices/{}/pdf"
    invoice = (await api.call("GET", "/tenants/{}/accounts/{}/invoices", T, "acme")).body[
        "invoices"
    ][0]
    url = URL(api.root + path.format(T, "acme", quote(invoice["ref"], safe="")), encoded=True)
    async with api.client.session.get(url, headers={"x-api-key": API_KEY}) as response:
        status, ctype, raw = response.status, response.content_type, await response.read()
        disposition = response.headers["Content-Disposition"]
    unknown = await api.call("GET", path, T, "acme", "in_nope")
    raw_id = await api.call("GET", path, T, "acme", "in_acme_0001")

    assert (status, ctype) == (200, "application/pdf")
    assert disposition == 'inline; filename="ACME-0001.pdf"'
    text = pypdf.PdfReader(io.BytesIO(raw), strict=True).pages[0].extract_text()
    assert "Invoice ACME-0001" in text
    assert "Total: 145.00 USD" in text
    assert (unknown.status, error_code(unknown)) == (404, "invoice_not_found")
    assert (raw_id.status, error_code(raw_id)) == (404, "invoice_not_found"), "the provider's id"


async def test_invoice_pdf_redirects_like_older_upstreams_when_switched(api: Api) -> None:
    path = "/tenants/{}/accounts/{}/invoices/{}/pdf"
    ref = (await api.call("GET", "/tenants/{}/accounts/{}/invoices", T, "acme")).body["invoices"][
        0
    ]["ref"]
    switched = await api.call(
        "PATCH", "/_emulator/settings", key=None, json={"invoicePdf": "redirect"}
    )
    reply = await api.call("GET", path, T, "acme", ref)
    unknown = await api.call("GET", path, T, "acme", "in_nope")

    assert switched.body["invoicePdf"] == "redirect"
    assert reply.status == 302
    assert reply.headers["Location"].startswith("https://files.invoices.example/")
    assert reply.headers["Location"].endswith("/ACME-0001.pdf")
    assert reply.body == {"url": reply.headers["Location"]}
    assert unknown.status == 404


# ---------------------------------------------------------------- the request log


async def test_every_operation_is_logged_under_its_interface_name(
    api: Api, emulator: Emulator
) -> None:
    acct = "/tenants/{}/accounts/{}"
    sub = acct + "/customers/{}/subscription"
    urls = {"successUrl": "https://a/ok", "cancelUrl": "https://a/no"}
    checkout = {"customerId": "cus_canceled", "planId": "pro", **urls}
    credit = {"customerId": "cus_active", "creditTypeId": "exports", "packId": "exports-10"}
    invoice = emulator.answer(Call("list_invoices", T, "test", {"account": "acme"})).parsed()[
        "invoices"
    ][0]["ref"]
    methods = emulator.answer(Call("list_payment_methods", T, "test", {"account": "acme"}))
    spare = methods.parsed()["methods"][1]["ref"]
    g = ("globex", "cus_g")
    calls: list[tuple[str, str, tuple[str, ...], Any]] = [
        ("GET", "/tenants/{}/customers/{}/entitlements", ("cus_active",), None),
        ("GET", "/tenants/{}/customers/{}/flags", ("cus_active",), None),
        ("GET", "/tenants/{}/flags", (), None),
        ("POST", acct + "/checkout", ("acme",), checkout),
        ("POST", acct + "/billing/setup-checkout", ("acme",), urls),
        ("POST", "/tenants/{}/accounts", (), {"accountId": "globex"}),
        ("POST", acct + "/customers", ("globex",), {"customerId": "cus_g"}),
        ("POST", acct + "/customers/{}/subscribe", g, {"planId": "team"}),
        ("GET", sub, g, None),
        ("PUT", sub, g, {"planId": "team", "planVersion": 1, "seats": 2}),
        ("POST", sub + "/preview", g, {"seats": 3}),
        ("PATCH", sub + "/seats", g, {"seats": 3}),
        ("PATCH", sub + "/add-ons", g, {"add": ["sso"]}),
        ("PATCH", sub + "/plan", g, {"planId": "pro", "planVersion": 1}),
        ("DELETE", sub, g, None),
        ("POST", sub + "/reactivate", g, None),
        (
            "PATCH",
            acct + "/customers/{}/payment-method",
            ("acme", "cus_trial"),
            {"methodId": spare},
        ),
        ("PATCH", acct, ("acme",), {"status": "active"}),
        ("PATCH", acct + "/customers/{}", ("acme", "cus_trial"), {"status": "active"}),
        ("GET", acct + "/payment-methods", ("acme",), None),
        ("PATCH", acct + "/payment-methods/{}", ("acme", spare), None),
        ("DELETE", acct + "/payment-methods/{}", ("globex", "x"), None),
        ("GET", acct + "/invoices", ("acme",), None),
        ("GET", acct + "/invoices/{}/pdf", ("acme", invoice), None),
        ("POST", acct + "/credit-checkout", ("acme",), {**credit, **urls}),
        ("GET", "/tenants/{}/credit-types", (), None),
        ("GET", "/tenants/{}/credit-types/{}/packs", ("exports",), None),
        ("GET", "/tenants/{}/customers/{}/credits", ("cus_active",), None),
        ("GET", "/tenants/{}/customers/{}/credits/{}", ("cus_active", "exports"), None),
        (
            "POST",
            "/tenants/{}/customers/{}/credits/{}/consume",
            ("cus_active", "exports"),
            {"amount": 1, "idempotencyKey": "k1"},
        ),
    ]
    for method, template, segments, body in calls:
        reply = await api.call(method, template, T, *segments, json=body)
        assert reply.status < 400 or template.endswith("payment-methods/{}"), (template, reply.body)

    assert [r.operation for r in emulator.requests] == [
        "get_entitlements",
        "flags",
        "global_flags",
        "create_checkout",
        "create_setup_checkout",
        "create_account",
        "create_customer",
        "create_subscription",
        "get_subscription",
        "update_subscription",
        "preview_change",
        "set_seats",
        "change_add_ons",
        "change_plan",
        "cancel_subscription",
        "reactivate",
        "set_subscription_payment_method",
        "set_account_status",
        "set_customer_status",
        "list_payment_methods",
        "set_default_payment_method",
        "remove_payment_method",
        "list_invoices",
        "invoice_pdf",
        "create_credit_checkout",
        "list_credit_types",
        "list_credit_packs",
        "list_credits",
        "get_credit_balance",
        "consume_credits",
    ]
    called = {r.operation for r in emulator.requests}
    assert called == {op.name for op in TABLE if not op.newer}, "every operation of the SDK"
    assert called <= OPERATIONS


def test_the_emulators_routes_are_the_sidecars_operations() -> None:
    """Two sources, compared: the emulator's routes (the upstream's contract, written
    with their handlers) and the sidecar's operation table, operation by operation."""
    ours = {(op.name, op.method, op.path) for op in TABLE}
    theirs = set(UPSTREAM_ROUTES)
    assert theirs == ours, f"emulator only: {theirs - ours}; table only: {ours - theirs}"
    assert {name for name, _, _ in UPSTREAM_ROUTES} == OPERATIONS
    assert len(UPSTREAM_ROUTES) == len(OPERATIONS), "one route per operation"


async def test_a_recorded_request_has_everything_a_test_needs(api: Api, emulator: Emulator) -> None:
    await api.call(
        "POST",
        "/tenants/{}/accounts/{}/customers",
        T,
        "acme",
        json={"customerId": "c 1"},
        params={"trace": "yes"},
        headers={"Idempotency-Key": "idem-1"},
    )

    (record,) = emulator.requests
    assert record.operation == "create_customer"
    assert record.method == "POST"
    assert record.path == "/tenants/demo/accounts/acme/customers"
    assert record.params == {"tenant": T, "account": "acme"}
    assert record.tenant == T
    assert record.query == {"trace": "yes"}
    assert record.body == {"customerId": "c 1"}
    assert record.api_key == API_KEY
    assert record.idempotency_key == "idem-1"


async def test_count_filters_by_operation_and_tenant(api: Api, emulator: Emulator) -> None:
    await api.entitlements("cus_active")
    await api.entitlements("cus_trial")
    await api.entitlements("cus_active", tenant="other")
    await api.call("GET", "/tenants/{}/accounts/{}/invoices", T, "acme")

    assert emulator.count() == 4
    assert emulator.count("get_entitlements") == 3
    assert emulator.count("get_entitlements", T) == 2
    assert emulator.count("get_entitlements", tenant="other") == 1
    assert emulator.count("invoice_pdf") == 0


async def test_admin_request_log(api: Api) -> None:
    await api.entitlements("cus_active")
    await api.call("GET", "/tenants/{}/accounts/{}/invoices", T, "acme")

    everything = await api.call("GET", "/_emulator/requests", key=None)
    filtered = await api.call(
        "GET", "/_emulator/requests", key=None, params={"operation": "list_invoices"}
    )
    cleared = await api.call("DELETE", "/_emulator/requests", key=None)
    after = await api.call("GET", "/_emulator/requests", key=None)

    assert [r["operation"] for r in everything.body["requests"]] == [
        "get_entitlements",
        "list_invoices",
    ]
    (entry,) = filtered.body["requests"]
    assert entry["params"] == {"tenant": T, "account": "acme"}
    assert entry["apiKey"] == API_KEY
    assert cleared.status == 204
    assert after.body == {"requests": []}


async def test_idempotency_key_replays_the_first_answer(api: Api, emulator: Emulator) -> None:
    headers = {"Idempotency-Key": "k-1"}
    path = "/tenants/{}/accounts/{}/customers"
    first = await api.call("POST", path, T, "acme", json={"customerId": "c1"}, headers=headers)
    second = await api.call("POST", path, T, "acme", json={"customerId": "c1"}, headers=headers)
    other_body = await api.call("POST", path, T, "acme", json={"customerId": "c2"}, headers=headers)
    no_key = await api.call("POST", path, T, "acme", json={"customerId": "c1"})

    assert first.status == second.status == 201
    assert second.body == first.body
    assert second.headers["Content-Type"] == "application/json"
    assert second.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert (other_body.status, error_code(other_body)) == (422, "idempotency_key_reused")
    assert (no_key.status, error_code(no_key)) == (409, "customer_exists")
    assert emulator.count("create_customer") == 4


# ---------------------------------------------------------------- faults


async def test_fail_answers_the_status_for_n_requests(api: Api, emulator: Emulator) -> None:
    emulator.fail("get_entitlements", 503, times=2)

    replies = [await api.entitlements("cus_active") for _ in range(3)]
    other = await api.call("GET", "/tenants/{}/accounts/{}/invoices", T, "acme")

    assert [r.status for r in replies] == [503, 503, 200]
    assert error_code(replies[0]) == "injected_fault"
    assert other.status == 200
    assert emulator.faults() == []


async def test_fail_until_cleared_and_for_every_operation(api: Api, emulator: Emulator) -> None:
    emulator.fail(None, 500, times=None)

    statuses = [(await api.entitlements("cus_active")).status for _ in range(3)]
    invoices = await api.call("GET", "/tenants/{}/accounts/{}/invoices", T, "acme")
    emulator.clear_faults()

    assert statuses == [500, 500, 500]
    assert invoices.status == 500
    assert (await api.entitlements("cus_active")).status == 200


async def test_fail_comes_after_authentication(api: Api, emulator: Emulator) -> None:
    emulator.fail("get_entitlements", 503, times=1)

    unauthenticated = await api.call(
        "GET", "/tenants/{}/customers/{}/entitlements", T, "cus_active", key="wrong"
    )
    authenticated = await api.entitlements("cus_active")

    assert unauthenticated.status == 401
    assert authenticated.status == 503


@pytest.mark.parametrize(
    ("status", "code"), [(401, "unauthorized"), (403, "forbidden"), (429, "rate_limited")]
)
async def test_fail_codes_and_headers(api: Api, emulator: Emulator, status: int, code: str) -> None:
    emulator.fail("create_account", status, headers={"Retry-After": "7"})

    reply = await api.call("POST", "/tenants/{}/accounts", T, json={"accountId": "x"})

    assert reply.status == status
    assert error_code(reply) == code
    assert reply.headers["Retry-After"] == "7"
    assert (await api.call("GET", "/_emulator/faults", key=None)).body == {"faults": []}


def test_fault_arguments_are_validated(emulator: Emulator) -> None:
    with pytest.raises(ValueError, match="unknown operation"):
        emulator.fail("get_entitlement", 503)
    with pytest.raises(ValueError, match="status"):
        emulator.fail(None, 200)
    with pytest.raises(ValueError, match="times"):
        emulator.fail(None, 503, times=0)
    with pytest.raises(ValueError, match="seconds"):
        emulator.delay(None, -1)
    with pytest.raises(ValueError, match="unknown operation"):
        emulator.hold("nope")


async def test_delay_slows_matching_requests(api: Api, emulator: Emulator) -> None:
    emulator.delay("get_entitlements", 0.2, times=1)

    started = time.monotonic()
    slow = await api.entitlements("cus_active")
    slow_elapsed = time.monotonic() - started
    started = time.monotonic()
    fast = await api.entitlements("cus_active")
    fast_elapsed = time.monotonic() - started

    assert slow.status == fast.status == 200
    assert slow_elapsed >= 0.2
    assert fast_elapsed < 0.2


async def test_hold_delivers_the_answer_computed_before_a_change(
    api: Api, emulator: Emulator, receiver: Receiver
) -> None:
    hold = emulator.hold("get_entitlements")
    fetch = asyncio.create_task(api.entitlements("cus_active"))
    await asyncio.wait_for(hold.arrived.wait(), WAIT)

    # while the answer is held: other operations pass, the document changes and is pushed
    invoices = await api.call("GET", "/tenants/{}/accounts/{}/invoices", T, "acme")
    changed = await api.admin_put("cus_active", {"status": "canceled", "modules": []})
    assert not fetch.done()
    hold.release()
    reply = await asyncio.wait_for(fetch, WAIT)

    assert hold.held == 1
    assert invoices.status == 200
    assert changed.body["pushed"] is True
    assert receiver.events[-1]["customerId"] == "cus_active"
    # the held request answers the state from before the change: the race to survive
    assert reply.body["status"] == "active"
    assert (await api.entitlements("cus_active")).body["status"] == "canceled"
    assert hold.held == 1  # released holds catch nothing more


async def test_held_mutation_has_already_happened(api: Api, emulator: Emulator) -> None:
    hold = emulator.hold("create_account")
    create = asyncio.create_task(
        api.call("POST", "/tenants/{}/accounts", T, json={"accountId": "globex"})
    )
    await asyncio.wait_for(hold.arrived.wait(), WAIT)

    listed = await api.call("GET", "/tenants/{}/accounts/{}/payment-methods", T, "globex")
    hold.release()

    assert listed.status == 200
    assert (await asyncio.wait_for(create, WAIT)).status == 201


async def test_hold_catches_concurrent_requests_and_clear_faults_releases(
    api: Api, emulator: Emulator
) -> None:
    hold = emulator.hold(None)
    fetches = [asyncio.create_task(api.entitlements(c)) for c in ("cus_active", "cus_trial")]
    await asyncio.wait_for(hold.arrived.wait(), WAIT)
    deadline = time.monotonic() + WAIT
    while hold.held < 2:
        assert time.monotonic() < deadline, "the second request was never held"
        await asyncio.sleep(0.01)

    assert emulator.faults() == [{"operation": None, "hold": True, "held": 2}]
    emulator.clear_faults()
    replies = await asyncio.wait_for(asyncio.gather(*fetches), WAIT)

    assert hold.released
    assert [r.status for r in replies] == [200, 200]


async def test_admin_faults_api(api: Api) -> None:
    added = await api.call(
        "POST",
        "/_emulator/faults",
        key=None,
        json={"operation": "get_entitlements", "status": 502, "times": 1},
    )
    listed = await api.call("GET", "/_emulator/faults", key=None)
    failed = await api.entitlements("cus_active")
    recovered = await api.entitlements("cus_active")

    assert added.status == 201
    assert listed.body == {"faults": [{"operation": "get_entitlements", "status": 502, "times": 1}]}
    assert failed.status == 502
    assert recovered.status == 200


async def test_admin_faults_delay_and_clear(api: Api) -> None:
    added = await api.call(
        "POST", "/_emulator/faults", key=None, json={"delay": 0.05, "status": 500}
    )
    cleared = await api.call("DELETE", "/_emulator/faults", key=None)
    listed = await api.call("GET", "/_emulator/faults", key=None)

    assert [f.get("delay") for f in added.body["faults"]] == [None, 0.05]
    assert cleared.status == 204
    assert listed.body == {"faults": []}
    assert (await api.entitlements("cus_active")).status == 200


async def test_admin_faults_hold_until_cleared(api: Api) -> None:
    added = await api.call(
        "POST", "/_emulator/faults", key=None, json={"operation": "list_invoices", "hold": True}
    )
    held = asyncio.create_task(api.call("GET", "/tenants/{}/accounts/{}/invoices", T, "acme"))
    deadline = time.monotonic() + WAIT
    while (await api.call("GET", "/_emulator/faults", key=None)).body["faults"][0]["held"] < 1:
        assert time.monotonic() < deadline, "the request was never held"
        await asyncio.sleep(0.01)
    passing = await api.entitlements("cus_active")
    assert not held.done()
    cleared = await api.call("DELETE", "/_emulator/faults", key=None)

    assert added.body == {"faults": [{"operation": "list_invoices", "hold": True, "held": 0}]}
    assert passing.status == 200
    assert cleared.status == 204
    assert (await asyncio.wait_for(held, WAIT)).status == 200


@pytest.mark.parametrize(
    "body",
    [
        {"operation": "get_entitlements"},
        {"hold": "yes"},
        {"operation": "nope", "status": 500},
        {"status": 200},
        {"status": "500"},
        {"status": 500, "times": 0},
        {"delay": -1},
        {"delay": "1"},
    ],
)
async def test_admin_faults_validation(api: Api, body: dict[str, Any]) -> None:
    reply = await api.call("POST", "/_emulator/faults", key=None, json=body)

    assert reply.status == 400
    assert error_code(reply) in {"missing_field", "invalid_field"}
    assert (await api.call("GET", "/_emulator/faults", key=None)).body == {"faults": []}


# ---------------------------------------------------------------- pushes


async def test_admin_change_delivers_a_push_that_verifies(
    api: Api, emulator: Emulator, receiver: Receiver
) -> None:
    reply = await api.admin_put("cus_trial", {"status": "active", "modules": ["reports", "api"]})

    assert reply.status == 200
    assert reply.body["pushed"] is True
    assert reply.body["entitlements"]["modules"] == ["reports", "api"]
    (received,) = receiver.received
    assert received.headers["Content-Type"] == "application/json"
    timestamp = verify(
        received.headers.get("X-Vellum-Signature"), received.body, [SECRET], now=time.time()
    )
    assert abs(timestamp - time.time()) < 60
    event = received.event
    assert event["eventId"].startswith("evt_")
    assert len(event["eventId"]) == len("evt_") + 32
    assert "id" not in event, "today's format"
    assert event["type"] == "entitlements.updated"
    assert event["tenantId"] == T
    assert event["customerId"] == "cus_trial"
    assert event["accountId"] == "acme"
    assert isinstance(event["createdAt"], int)
    (push,) = emulator.pushes
    assert push.delivered
    assert push.status == 200
    assert push.event == event
    assert orjson.loads(push.response_body) == {"ok": True}


async def test_push_without_account_has_no_account_id(api: Api, receiver: Receiver) -> None:
    await api.admin_put("cus_loose", {"modules": []})

    assert receiver.events[0]["customerId"] == "cus_loose"
    assert "accountId" not in receiver.events[0]


async def test_rotation_signs_with_every_secret(
    aiohttp_client: AiohttpClient, receiver: Receiver
) -> None:
    app = create_emulator_app(
        api_keys=[API_KEY], webhook_url=receiver.url, webhook_secret=["new", "old"]
    )
    api = Api(await aiohttp_client(app))

    await api.admin_put("c", {})

    (received,) = receiver.received
    header = received.headers["X-Vellum-Signature"]
    assert header.count("v1=") == 2
    assert verify(header, received.body, ["new"], now=time.time())
    assert verify(header, received.body, ["old"], now=time.time())


async def test_unsigned_when_no_secret(aiohttp_client: AiohttpClient, receiver: Receiver) -> None:
    app = create_emulator_app(api_keys=[API_KEY], webhook_url=receiver.url)
    api = Api(await aiohttp_client(app))

    reply = await api.admin_put("c", {})

    assert reply.body["pushed"] is True
    assert "X-Vellum-Signature" not in receiver.received[0].headers


async def test_rejected_push_is_reported(api: Api, emulator: Emulator, receiver: Receiver) -> None:
    receiver.status = 401

    reply = await api.admin_put("cus_trial", {})

    assert reply.body["pushed"] is False
    assert emulator.pushes[-1].status == 401
    assert not emulator.pushes[-1].delivered


async def test_unreachable_receiver_is_reported_not_raised(
    aiohttp_client: AiohttpClient, unused_tcp_port: int
) -> None:
    url = f"http://127.0.0.1:{unused_tcp_port}/webhooks/vellum"
    app = create_emulator_app(api_keys=[API_KEY], webhook_url=url, webhook_secret=SECRET)
    api = Api(await aiohttp_client(app))

    reply = await api.admin_put("c", {"modules": ["m"]})

    assert reply.status == 200
    assert reply.body["pushed"] is False
    push = app[EMULATOR].pushes[-1]
    assert push.status is None
    assert push.error is not None
    assert "Connect" in push.error


async def test_hung_receiver_times_out(aiohttp_client: AiohttpClient, receiver: Receiver) -> None:
    receiver.hang = asyncio.Event()
    app = create_emulator_app(
        api_keys=[API_KEY], webhook_url=receiver.url, webhook_secret=SECRET, push_timeout=0.2
    )
    api = Api(await aiohttp_client(app))

    started = time.monotonic()
    reply = await api.admin_put("c", {})

    assert reply.body["pushed"] is False
    assert time.monotonic() - started < WAIT
    assert app[EMULATOR].pushes[-1].error is not None
    assert "Timeout" in app[EMULATOR].pushes[-1].error  # type: ignore[operator]


async def test_python_api_pushes_in_the_background(
    api: Api, emulator: Emulator, receiver: Receiver
) -> None:
    stored = emulator.set_entitlements(T, "cus_trial", {"status": "active", "modules": ["x"]})
    await emulator.wait_pushes_idle()

    assert stored["modules"] == ["x"]
    assert (await api.entitlements("cus_trial")).body["modules"] == ["x"]
    assert receiver.events[-1]["customerId"] == "cus_trial"

    assert emulator.delete_entitlements(T, "cus_trial") is True
    assert emulator.delete_entitlements(T, "cus_trial") is False
    await emulator.wait_pushes_idle()

    assert [e["customerId"] for e in receiver.events] == ["cus_trial", "cus_trial"]
    assert emulator.get_entitlements(T, "cus_trial") is None


async def test_webhook_target_can_be_set_after_start(
    aiohttp_client: AiohttpClient, receiver: Receiver
) -> None:
    app = create_emulator_app(api_keys=[API_KEY])
    api = Api(await aiohttp_client(app))
    emulator = app[EMULATOR]

    before = await api.admin_put("c", {})
    emulator.webhook_url, emulator.webhook_secret = receiver.url, SECRET
    after = await api.admin_put("c", {})

    assert before.body["pushed"] is False
    assert emulator.pushes[0].error == "no webhook_url configured"
    assert after.body["pushed"] is True
    assert len(receiver.received) == 1


async def test_push_event_redeliver_and_stale_timestamp(
    api: Api, emulator: Emulator, receiver: Receiver
) -> None:
    first = await emulator.push_event("t9", account_id="acc-1", event_type="account.updated")
    duplicate = await emulator.deliver(first.event)
    an_hour_ago = int(time.time()) - 3600
    stale = await emulator.deliver(first.event, timestamp=an_hour_ago)

    assert first.delivered and duplicate.delivered and stale.delivered
    assert receiver.events[0] == receiver.events[1] == first.event
    assert first.event["type"] == "account.updated"
    assert first.event["tenantId"] == "t9"
    assert "customerId" not in first.event
    stale_header = receiver.received[2].headers["X-Vellum-Signature"]
    assert stale_header.startswith(f"t={an_hour_ago},")


async def test_admin_push_route(api: Api, receiver: Receiver) -> None:
    tenant_wide = await api.call("POST", "/_emulator/tenants/{}/push", "t7", key=None)
    account = await api.call("POST", "/_emulator/push", key=None, json={"accountId": "acme"})
    bad = await api.call("POST", "/_emulator/push", key=None, json={"customerId": 5})

    assert tenant_wide.body["pushed"] is True
    assert receiver.events[0]["tenantId"] == "t7"
    assert "customerId" not in receiver.events[0]
    assert "accountId" not in receiver.events[0]
    assert account.body["event"] == receiver.events[1]
    assert receiver.events[1]["tenantId"] == DEMO_TENANT
    assert receiver.events[1]["accountId"] == "acme"
    assert bad.status == 400
    assert len(receiver.received) == 2


async def test_admin_pushes_listing(api: Api) -> None:
    await api.admin_put("cus_trial", {})

    listed = await api.call("GET", "/_emulator/pushes", key=None)

    (push,) = listed.body["pushes"]
    assert push["delivered"] is True
    assert push["status"] == 200
    assert push["event"]["customerId"] == "cus_trial"


def test_without_a_running_loop_pushes_are_recorded_as_failed() -> None:
    emulator = Emulator(api_keys=[API_KEY], webhook_url="http://127.0.0.1:9/x", seed=True)
    emulator.clock = lambda: 1_700_000_000.0

    emulator.set_entitlements(T, "cus_trial", {"modules": []})

    (push,) = emulator.pushes
    assert push.error == "no running event loop"
    assert emulator.get_entitlements(T, "cus_trial") == {
        "customerId": "cus_trial",
        "status": "active",
        "hasAccess": True,
        "modules": [],
        "config": {},
        "accountId": "acme",
        "updatedAt": 1_700_000_000,
    }
    assert push.event["createdAt"] == 1_700_000_000


async def test_deliver_before_the_app_runs_is_recorded(receiver: Receiver) -> None:
    emulator = Emulator(api_keys=[API_KEY], webhook_url=receiver.url)

    push = await emulator.push_event("t", customer_id="c")

    assert push.error == "the emulator app is not running"
    assert receiver.received == []


# ---------------------------------------------------------------- reset


async def test_reset_restores_the_seed_and_clears_everything(api: Api, emulator: Emulator) -> None:
    await new_account(api, "globex")
    await api.admin_put("cus_active", {"status": "canceled"})
    emulator.fail(None, 500, times=None)

    reply = await api.call("POST", "/_emulator/reset", key=None)

    assert reply.status == 204
    assert emulator.requests == []
    assert emulator.pushes == []
    assert emulator.faults() == []
    assert (await api.entitlements("cus_active")).body["status"] == "active"
    again = await api.call("POST", "/tenants/{}/accounts", T, json={"accountId": "globex"})
    assert again.status == 201


async def test_python_reset_and_clear_requests(api: Api, emulator: Emulator) -> None:
    await api.entitlements("cus_active")
    emulator.clear_requests()
    assert emulator.count() == 0

    await api.admin_put("cus_new", {})
    emulator.reset()

    assert emulator.get_entitlements(T, "cus_new") is None
    assert emulator.get_entitlements(T, "cus_active") is not None


# ---------------------------------------------------------------- edges


async def test_oversized_body_is_logged_and_answered_as_json_413(
    api: Api, emulator: Emulator
) -> None:
    # a stream, as aiohttp warns about (and the suite errors on) huge raw bytes bodies
    big = io.BytesIO(b'{"accountId": "' + b"x" * (2 * 1024 * 1024) + b'"}')

    reply = await api.call("POST", "/tenants/{}/accounts", T, data=big)

    assert reply.status == 413
    assert error_code(reply) == "payload_too_large"
    assert emulator.requests[-1].operation == "create_account"
    assert emulator.requests[-1].body is None


async def test_empty_secret_sends_unsigned_rather_than_failing(
    aiohttp_client: AiohttpClient, receiver: Receiver
) -> None:
    app = create_emulator_app(api_keys=[API_KEY], webhook_url=receiver.url, webhook_secret="")
    api = Api(await aiohttp_client(app))

    reply = await api.admin_put("c", {})

    assert reply.body["pushed"] is True
    assert "X-Vellum-Signature" not in receiver.received[0].headers


async def test_documents_are_copied_in_and_out(api: Api, emulator: Emulator) -> None:
    doc: dict[str, Any] = {"modules": ["reports"], "config": {"seats": 1}}
    emulator.set_entitlements(T, "cus_copy", doc)
    doc["modules"].append("mutated")
    emulator.get_entitlements(T, "cus_copy")["config"]["seats"] = 99  # type: ignore[index]
    await emulator.wait_pushes_idle()

    reply = await api.entitlements("cus_copy")

    assert reply.body["modules"] == ["reports"]
    assert reply.body["config"] == {"seats": 1}


async def test_shutdown_releases_held_requests(aiohttp_server: AiohttpServer) -> None:
    app = create_emulator_app(api_keys=[API_KEY], seed=True)
    server = await aiohttp_server(app)
    hold = app[EMULATOR].hold("get_entitlements")
    url = server.make_url(f"/tenants/{T}/customers/cus_active/entitlements")

    async with ClientSession() as session:

        async def fetch() -> int:
            async with session.get(url, headers={"x-api-key": API_KEY}) as response:
                await response.read()
                return response.status

        task = asyncio.create_task(fetch())
        await asyncio.wait_for(hold.arrived.wait(), WAIT)
        await asyncio.wait_for(server.close(), WAIT)
        status = await asyncio.wait_for(task, WAIT)

    assert hold.released
    assert status == 200


# ---------------------------------------------------------------- the state, without HTTP


def test_state_answers_data_without_a_server() -> None:
    state = State(api_keys=["k", "live_k"], seed=True)

    found = state.answer(Call("get_entitlements", T, "test", {"customer": "cus_active"}))
    missing = state.answer(Call("get_entitlements", T, "test", {"customer": "ghost"}))
    bad = state.answer(Call("create_account", T, "test", body=b"{nope"))

    assert (found.status, found.content_type) == (200, "application/json")
    assert found.parsed()["modules"] == ["reports", "exports"]
    assert (missing.status, missing.parsed()["error"]["code"]) == (404, "entitlements_not_found")
    assert (bad.status, bad.parsed()["error"]["code"]) == (400, "invalid_json")
    assert (state.mode_of("k"), state.mode_of("live_k"), state.mode_of("x")) == (
        "test",
        "live",
        None,
    )
    with pytest.raises(ValueError, match="unknown operation"):
        state.answer(Call("nope", T, "test"))


def test_the_state_hands_every_event_to_the_callback_it_was_given() -> None:
    """The push delivery is passed in (``on_event``), not inherited: a plain State with
    a list's append sees exactly the events it emits, in order, and none for the seed."""
    seen: list[dict[str, Any]] = []
    state = State(api_keys=["k"], seed=True, on_event=seen.append)
    assert seen == [] and state.events == [], "the seed is where the service starts"

    state.set_entitlements(T, "cus_trial", {"modules": ["reports"]})
    state.set_flag(T, "beta", True)
    state.answer(
        Call("set_account_status", T, "test", {"account": "acme"}, body=b'{"status":"suspended"}')
    )

    assert seen == state.events
    assert [(e["type"], e.get("customerId"), e.get("accountId")) for e in seen] == [
        ("entitlements.updated", "cus_trial", "acme"),
        ("flags.updated", None, None),
        ("entitlements.updated", None, "acme"),
    ]
    assert State(api_keys=["k"]).ledger.on_event is None, "no callback: events are only kept"


def test_faults_are_data_too() -> None:
    state = State(api_keys=["k"])
    state.fail("list_invoices", 503, times=1, headers={"Retry-After": "1"})
    state.delay(None, 0.5, times=2)

    assert state.take_delays("list_invoices") == [0.5]
    assert state.take_delays("flags") == [0.5]
    assert state.take_delays("flags") == []
    failure = state.take_failure("list_invoices")
    assert failure is not None
    assert (failure.status, failure.headers["Retry-After"]) == (503, "1")
    assert failure.parsed()["error"]["code"] == "injected_fault"
    assert state.take_failure("list_invoices") is None


def test_the_newest_version_priced_in_the_keys_mode_is_sold() -> None:
    state = State(api_keys=["k"], seed=True)
    body = orjson.dumps({"planId": "pro"})
    path = {"account": "acme", "customer": "cus_canceled"}

    test = state.answer(Call("create_subscription", T, "test", path, body=body))
    live = state.answer(Call("create_subscription", T, "live", path, body=body))
    again = state.answer(Call("create_subscription", T, "live", path, body=body))
    v3 = orjson.dumps({"planId": "pro", "planVersion": 3})
    unpriced = state.answer(
        Call("create_subscription", T, "live", {**path, "customer": "cus_pastdue"}, body=v3)
    )

    assert test.status == live.status == 201, "one live subscription per mode"
    assert (test.parsed()["planVersion"], test.parsed()["mode"]) == (3, "test")
    assert (live.parsed()["planVersion"], live.parsed()["mode"]) == (2, "live")
    assert (again.status, again.parsed()["error"]["code"]) == (409, "subscription_exists")
    assert (unpriced.status, unpriced.parsed()["error"]["code"]) == (
        400,
        "plan_version_not_priced",
    )


def test_a_trial_starts_with_a_paid_zero_invoice() -> None:
    state = State(api_keys=["k"], seed=True)
    state.create_customer(T, "acme", "c1")

    sub = state.subscribe(T, "acme", "c1", "starter")

    assert (sub["status"], sub["planVersion"], sub["amount"]) == ("trialing", 2, 2400)
    assert "trialEnd" in sub
    paid, updated = state.events
    assert paid["type"] == "payment.succeeded"
    assert (paid["invoice"]["amountPaid"], paid["invoice"]["paid"], paid["seats"]) == (0, True, 1)
    assert updated["type"] == "entitlements.updated"
    assert state.get_entitlements(T, "c1")["hasAccess"] is True  # type: ignore[index]


def test_renewals_bill_fail_and_end_pending_cancels() -> None:
    state = State(api_keys=["k"], seed=True)

    renewed = state.renew(T, "acme", "cus_trial")
    failed = state.renew(T, "acme", "cus_active", succeeded=False)
    state.answer(
        Call(
            "cancel_subscription",
            T,
            "test",
            {"account": "acme", "customer": "cus_pastdue"},
            {"atPeriodEnd": "true"},
        )
    )
    ended = state.renew(T, "acme", "cus_pastdue")

    assert renewed["status"] == "active" and "trialEnd" not in renewed
    assert failed["status"] == "past_due"
    assert ended["status"] == "canceled" and ended["cancelAtPeriodEnd"] is False
    assert [(e["type"], e.get("customerId")) for e in state.events] == [
        ("payment.succeeded", "cus_trial"),
        ("entitlements.updated", "cus_trial"),
        ("payment.failed", "cus_active"),
        ("entitlements.updated", "cus_active"),
        ("entitlements.updated", "cus_pastdue"),
    ]
    failed_invoice = state.events[2]["invoice"]
    assert (failed_invoice["status"], failed_invoice["amountPaid"]) == ("open", 0)
    assert state.events[2]["seats"] == 5
    assert state.get_entitlements(T, "cus_pastdue")["modules"] == []  # type: ignore[index]
    with pytest.raises(EmulatorError) as gone:
        state.renew(T, "acme", "cus_canceled")
    assert gone.value.code == "subscription_canceled"


def test_preview_changes_nothing() -> None:
    state = State(api_keys=["k"], seed=True)
    path = {"account": "acme", "customer": "cus_active"}
    before = state.answer(Call("get_subscription", T, "test", path)).parsed()
    doc = state.get_entitlements(T, "cus_active")

    preview = state.answer(
        Call(
            "preview_change",
            T,
            "test",
            path,
            body=orjson.dumps({"planId": "pro", "planVersion": 1, "addOnModuleIds": ["sso"]}),
        )
    ).parsed()
    empty = state.answer(Call("preview_change", T, "test", path)).parsed()

    assert preview["current"] == before
    assert (preview["proposed"]["planId"], preview["proposed"]["addOnModuleIds"]) == (
        "pro",
        ["sso"],
    )
    assert preview["amountDueNow"] == (5 * 4900 + 1500) - 5 * 2900
    assert empty["proposed"] == empty["current"] and empty["amountDueNow"] == 0
    assert state.answer(Call("get_subscription", T, "test", path)).parsed() == before
    assert state.get_entitlements(T, "cus_active") == doc
    assert state.events == []


def test_subscription_changes_are_written_into_the_document() -> None:
    state = State(api_keys=["k"], seed=True)
    path = {"account": "acme", "customer": "cus_active"}

    def run(operation: str, body: Any = None) -> Answer:
        raw = b"" if body is None else orjson.dumps(body)
        return state.answer(Call(operation, T, "test", path, body=raw))

    def doc() -> dict[str, Any]:
        got = state.get_entitlements(T, "cus_active")
        assert got is not None
        return got

    assert run("change_add_ons", {"add": ["sso", "api"]}).status == 200
    assert doc()["modules"] == ["reports", "exports", "sso", "api"]
    assert run("change_add_ons", {"remove": ["api"]}).parsed()["addOnModuleIds"] == ["sso"]
    assert run("set_seats", {"seats": 7}).status == 200
    assert doc()["config"] == {"seats": 7}
    planned = run("change_plan", {"planId": "enterprise", "planVersion": 1, "productId": "app"})
    assert planned.parsed()["addOnModuleIds"] == [], "an add-on the plan includes is dropped"
    assert doc()["planId"] == "enterprise" and "sso" in doc()["modules"]
    assert run("update_subscription", {"planId": "team", "planVersion": 2}).status == 200
    assert (doc()["planVersion"], doc()["modules"], doc()["config"]) == (
        2,
        ["reports", "exports"],
        {"seats": 7},
    )
    errors = {
        "change_add_ons": run("change_add_ons", {}),
        "set_seats": run("set_seats", {"seats": 0}),
        "change_plan": run("change_plan", {"planId": "team"}),
        "update_subscription": run("update_subscription", {"planVersion": 1}),
    }
    assert {k: (a.status, a.parsed()["error"]["code"]) for k, a in errors.items()} == {
        "change_add_ons": (400, "missing_field"),
        "set_seats": (400, "invalid_field"),
        "change_plan": (400, "missing_field"),
        "update_subscription": (400, "missing_field"),
    }
    # Upgrades are billed at once (a proration invoice and its payment event).
    paid = [e for e in state.events if e["type"] == "payment.succeeded"]
    assert [e["invoice"]["total"] for e in paid] == [
        1500 + 2000,
        2 * 2900,
        7 * 9900 - (7 * 2900 + 1500),
    ]
    assert all(e["seats"] in (5, 7) for e in paid)


# ---------------------------------------------------------------- credits


def test_consume_is_all_or_nothing_and_idempotent_on_its_key() -> None:
    state = State(api_keys=["k"], seed=True)
    path = {"customer": "cus_active", "credit_type": "exports"}

    def consume(amount: int, key: str) -> Answer:
        body = orjson.dumps({"amount": amount, "idempotencyKey": key})
        return state.answer(Call("consume_credits", T, "test", path, body=body))

    first = consume(15, "a")
    replay = consume(15, "a")
    other = consume(16, "a")
    short = consume(6, "b")
    state.set_credits(T, "cus_active", "exports", 100)
    after_top_up = consume(6, "b")

    assert (first.status, first.parsed()["balance"]) == (200, 5)
    assert (replay.status, replay.body, replay.headers["Idempotent-Replayed"]) == (
        200,
        first.body,
        "true",
    )
    assert (other.status, other.parsed()["error"]["code"]) == (422, "idempotency_key_reused")
    assert (short.status, short.parsed()["error"]["code"]) == (409, "insufficient_credits")
    assert after_top_up.parsed()["balance"] == 94, "a refused key is not remembered"
    assert state.credits_of(T, "cus_active") == {"api-calls": 5000, "exports": 94}
    for body, code in [
        ({"amount": 0, "idempotencyKey": "c"}, "invalid_field"),
        ({"amount": 1}, "missing_field"),
        ({"idempotencyKey": "c"}, "missing_field"),
        ({"amount": 1, "idempotencyKey": "x" * 256}, "invalid_field"),
    ]:
        answer = state.answer(Call("consume_credits", T, "test", path, body=orjson.dumps(body)))
        assert (answer.status, answer.parsed()["error"]["code"]) == (400, code), body
    unknown = state.answer(
        Call("consume_credits", T, "test", {**path, "customer": "ghost"}, body=first.body)
    )
    assert unknown.status == 404


async def test_checkouts_complete_like_the_hosted_page(api: Api, receiver: Receiver) -> None:
    urls = {"successUrl": "https://a/ok", "cancelUrl": "https://a/no"}
    acct = "/tenants/{}/accounts/{}"
    subscription = await api.call(
        "POST",
        acct + "/checkout",
        T,
        "acme",
        json={"customerId": "cus_canceled", "planId": "team", **urls},
    )
    setup = await api.call("POST", acct + "/billing/setup-checkout", T, "acme", json=urls)
    credits = await api.call(
        "POST",
        acct + "/credit-checkout",
        T,
        "acme",
        json={
            "customerId": "cus_trial",
            "creditTypeId": "api-calls",
            "packId": "calls-10k",
            **urls,
        },
    )
    listed = await api.call("GET", "/_emulator/checkouts", key=None)

    done = {}
    for reply in (subscription, setup, credits):
        path = "/_emulator/checkouts/{}/complete"
        done[reply.body["mode"]] = await api.call("POST", path, reply.body["id"], key=None)
    twice = await api.call("POST", "/_emulator/checkouts/{}/complete", setup.body["id"], key=None)
    nothing = await api.call("POST", "/_emulator/checkouts/{}/complete", "cs_nope", key=None)

    assert [c["status"] for c in listed.body["checkouts"]] == ["open"] * 3
    assert done["subscription"].body["result"]["status"] == "active"
    assert done["subscription"].body["pushed"] is True
    assert (await api.entitlements("cus_canceled")).body["hasAccess"] is True
    assert done["setup"].body["result"]["brand"] == "amex"
    methods = await api.call("GET", acct + "/payment-methods", T, "acme")
    assert len(methods.body["methods"]) == 3
    balances = {c["creditTypeId"]: c["balance"] for c in done["payment"].body["result"]["credits"]}
    assert balances["api-calls"] == 10_100
    assert [e["type"] for e in receiver.events] == [
        "payment.succeeded",
        "entitlements.updated",
        "payment_method.attached",
        "payment.succeeded",
    ]
    assert receiver.events[-1]["invoice"]["total"] == 8000
    assert receiver.events[-1]["seats"] == 1, "cus_trial's subscription"
    assert (twice.status, error_code(twice)) == (409, "checkout_completed")
    assert nothing.status == 404


async def test_admin_credits(api: Api) -> None:
    path = "/_emulator/customers/{}/credits"
    put = await api.call("PUT", path + "/{}", "cus_trial", "exports", key=None, json={"balance": 7})
    got = await api.call("GET", path, "cus_trial", key=None)
    bad = await api.call(
        "PUT", path + "/{}", "cus_trial", "exports", key=None, json={"balance": -1}
    )
    ghost = await api.call("PUT", path + "/{}", "ghost", "exports", key=None, json={"balance": 1})
    unknown = await api.call(
        "PUT", path + "/{}", "cus_trial", "gold", key=None, json={"balance": 1}
    )
    upstream = await api.call(
        "GET", "/tenants/{}/customers/{}/credits/{}", T, "cus_trial", "exports"
    )

    assert put.body == {
        "customerId": "cus_trial",
        "creditTypeId": "exports",
        "unit": "export",
        "balance": 7,
    }
    assert got.body == {"credits": {"api-calls": 100, "exports": 7}}
    assert upstream.body == put.body
    assert (bad.status, ghost.status, unknown.status) == (400, 404, 404)


# ---------------------------------------------------------------- flags


async def test_flags_globals_and_overrides(api: Api, receiver: Receiver) -> None:
    customer = "/tenants/{}/customers/{}/flags"
    globals_before = await api.call("GET", "/tenants/{}/flags", T)
    active = await api.call("GET", customer, T, "cus_active")
    stranger = await api.call("GET", customer, T, "not-a-billing-customer")

    assert globals_before.body == {
        "flags": {"new-dashboard": False, "bulk-export": True, "maintenance-banner": False}
    }
    assert active.body["flags"]["new-dashboard"] is True
    assert stranger.body == globals_before.body, "globals for anyone"
    assert (await api.call("GET", "/tenants/{}/flags", "other")).body == {"flags": {}}


async def test_admin_flags_change_and_push(api: Api, receiver: Receiver) -> None:
    put_global = await api.call(
        "PUT", "/_emulator/flags/{}", "beta", key=None, json={"value": True}
    )
    put_override = await api.call(
        "PUT",
        "/_emulator/customers/{}/flags/{}",
        "cus_trial",
        "beta",
        key=None,
        json={"value": False},
    )
    undefined = await api.call(
        "PUT",
        "/_emulator/customers/{}/flags/{}",
        "cus_trial",
        "nope",
        key=None,
        json={"value": True},
    )
    not_bool = await api.call("PUT", "/_emulator/flags/{}", "beta", key=None, json={"value": "on"})
    trial = await api.call("GET", "/tenants/{}/customers/{}/flags", T, "cus_trial")
    dropped_override = await api.call(
        "DELETE", "/_emulator/customers/{}/flags/{}", "cus_trial", "beta", key=None
    )
    dropped = await api.call("DELETE", "/_emulator/flags/{}", "beta", key=None)
    again = await api.call("DELETE", "/_emulator/flags/{}", "beta", key=None)
    listed = await api.call("GET", "/_emulator/flags", key=None)

    assert put_global.body["flags"]["beta"] is True and put_global.body["pushed"] is True
    assert put_override.body["overrides"]["cus_trial"] == {"bulk-export": False, "beta": False}
    assert (undefined.status, error_code(undefined)) == (404, "flag_not_found")
    assert not_bool.status == 400
    assert trial.body["flags"]["beta"] is False
    assert dropped_override.body == dropped.body == {"deleted": True, "pushed": True}
    assert again.body == {"deleted": False, "pushed": False}
    assert "beta" not in listed.body["flags"]
    assert [(e["type"], e.get("customerId"), e.get("accountId")) for e in receiver.events] == [
        ("flags.updated", None, None),
        ("flags.updated", "cus_trial", "acme"),
        ("flags.updated", "cus_trial", "acme"),
        ("flags.updated", None, None),
    ]


# ---------------------------------------------------------------- settings and event format


async def test_settings(api: Api) -> None:
    defaults = await api.call("GET", "/_emulator/settings", key=None)
    changed = await api.call(
        "PATCH",
        "/_emulator/settings",
        key=None,
        json={"eventIdFields": ["id"], "hasAccess": False, "pushAttempts": 1},
    )
    bad = [
        await api.call("PATCH", "/_emulator/settings", key=None, json=body)
        for body in (
            {"invoicePdf": "fax"},
            {"eventIdFields": ["uuid"]},
            {"eventIdFields": "eventId"},
            {"hasAccess": 1},
            {"pushAttempts": 0},
            {"colour": "red"},
        )
    ]
    legacy = await api.entitlements("cus_canceled")
    reset = await api.call("POST", "/_emulator/reset", key=None)
    after = await api.call("GET", "/_emulator/settings", key=None)

    assert defaults.body == {
        "invoicePdf": "bytes",
        "eventIdFields": list(DEFAULT_EVENT_ID_FIELDS),
        "hasAccess": True,
        "pushAttempts": 3,
    }
    assert changed.body == {
        "invoicePdf": "bytes",
        "eventIdFields": ["id"],
        "hasAccess": False,
        "pushAttempts": 1,
    }
    assert {(r.status, error_code(r)) for r in bad} == {(400, "invalid_field")}
    assert "hasAccess" not in legacy.body, "an older upstream's document"
    assert legacy.body["modules"] == ["reports"], "as stored"
    assert reset.status == 204
    assert after.body == defaults.body


async def test_event_id_fields(api: Api, emulator: Emulator, receiver: Receiver) -> None:
    await api.admin_put("cus_trial", {})
    emulator.settings.event_id_fields = ("eventId", "id")
    await api.admin_put("cus_trial", {})
    emulator.settings.event_id_fields = ("id",)
    await api.admin_put("cus_trial", {})

    current, both, older = receiver.events
    assert both["eventId"] == both["id"]
    assert "id" not in current and current["eventId"].startswith("evt_")
    assert "eventId" not in older and older["id"].startswith("evt_")
    assert DEFAULT_EVENT_ID_FIELDS == ("eventId",)


async def test_pushes_are_retried_back_to_back_then_dropped(
    api: Api, emulator: Emulator, receiver: Receiver
) -> None:
    receiver.status = 503
    reply = await api.admin_put("cus_trial", {})
    emulator.settings.push_attempts = 1
    once = await api.admin_put("cus_trial", {})
    listed = await api.call("GET", "/_emulator/pushes", key=None)

    assert reply.body["pushed"] is False and once.body["pushed"] is False
    assert [len(p.attempts) for p in emulator.pushes] == [3, 1]
    assert emulator.pushes[0].dropped
    ids = [e["eventId"] for e in receiver.events]
    assert ids[:3] == [ids[0]] * 3 and ids[3] != ids[0]
    signatures = {p.signature for p in emulator.pushes}
    assert all(
        s is not None and verify(s, r.body, [SECRET], now=time.time())
        for s, r in zip(
            [a.signature for p in emulator.pushes for a in p.attempts],
            receiver.received,
            strict=True,
        )
    )
    assert len(signatures) == 2
    assert listed.body["pushes"][0]["attempts"] == 3
    assert listed.body["pushes"][0]["statuses"] == [503, 503, 503]


async def test_pushes_arrive_in_the_order_of_the_changes(
    api: Api, emulator: Emulator, receiver: Receiver
) -> None:
    for n in range(10):
        emulator.set_entitlements(T, f"c{n}", {})
    await emulator.wait_pushes_idle()

    assert [e["customerId"] for e in receiver.events] == [f"c{n}" for n in range(10)]


async def test_admin_events_and_renew(api: Api, receiver: Receiver) -> None:
    renewed = await api.call(
        "POST", "/_emulator/accounts/{}/customers/{}/renew", "acme", "cus_active", key=None
    )
    failed = await api.call(
        "POST",
        "/_emulator/tenants/{}/accounts/{}/customers/{}/renew",
        T,
        "acme",
        "cus_trial",
        key=None,
        json={"outcome": "failed"},
    )
    bad = await api.call(
        "POST",
        "/_emulator/accounts/{}/customers/{}/renew",
        "acme",
        "cus_active",
        key=None,
        json={"outcome": "maybe"},
    )
    events = await api.call("GET", "/_emulator/events", key=None)

    assert renewed.body["subscription"]["status"] == "active" and renewed.body["pushed"] is True
    assert failed.body["subscription"]["status"] == "past_due"
    assert bad.status == 400
    assert [e["type"] for e in events.body["events"]] == [
        "payment.succeeded",
        "entitlements.updated",
        "payment.failed",
        "entitlements.updated",
    ]
    assert events.body["events"] == receiver.events
