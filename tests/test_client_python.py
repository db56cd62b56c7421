"""The Python client (``client/python``), both flavours, against a live sidecar.

Every method runs against ``python -m sidecar serve`` in front of the emulator
(``harness.Stack``); what reached the emulator is checked too, so the bodies and
queries are the SDK's. The fail-closed rule is checked with the sidecar
stopped, with its upstream down, and with a sidecar that never answers.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import vellum_sidecar_client as vsc
from vellum_sidecar_client import (
    AsyncSidecarClient,
    EntitlementSet,
    SidecarApiError,
    SidecarClient,
    SidecarError,
    SidecarUnavailable,
)
from vellumcharter import VellumCharterClient

from sidecar.http.operations import OPERATIONS

from .harness import Stack, free_port

#: vellumcharter 1.4.2's methods, every public one, with the SDK's own names and
#: keywords (the flags ones included). ``check``, ``invoice_pdf_url`` (upstreams
#: before SDK 1.2) and ``usage`` (a queued record's outcome) are this client's own.
SDK_METHODS: dict[str, inspect.Signature] = {
    name: inspect.signature(method)
    for name, method in inspect.getmembers(VellumCharterClient, inspect.isfunction)
    if not name.startswith("_")
}
OWN_METHODS = {"check", "invoice_pdf_url", "usage"}
#: The operations the upstream added after the SDK: the clients name them as the table does.
NEWER_METHODS = {method for op in OPERATIONS if op.newer for method in op.sdk}
FLAG_METHODS = {"flags", "flag", "global_flags", "invalidate_flags"}
#: The methods that take ``wait`` (an operation the sidecar can queue: ``deferred``).
DEFERRED_WAIT = {(method, "wait") for op in OPERATIONS if op.deferred for method in op.sdk}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # With Redis: consume_credits(..., wait=False) queues there.
    with Stack(tmp_path_factory.mktemp("live"), redis=True) as live:
        yield live


@pytest.fixture(scope="module")
def upstream_down(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A sidecar whose upstream never answers: nothing it has not cached can be had."""
    with Stack(
        tmp_path_factory.mktemp("down"),
        upstream=False,
        SIDECAR_UPSTREAM_TIMEOUT="1",
        SIDECAR_FAIL_OPEN_MODULES="status_page",
    ) as live:
        yield live


Call = Callable[..., Awaitable[Any]]
Connect = Callable[..., Call]


@pytest.fixture(params=["sync", "async"])
async def connect(request: pytest.FixtureRequest) -> AsyncIterator[Connect]:
    """``connect(url, ...)`` -> ``await call("method", ...)``, for each flavour of client.

    The blocking ``SidecarClient`` runs in a thread (the event loop stays free),
    ``AsyncSidecarClient`` on the loop; both are closed after the test.
    """
    sync_clients: list[SidecarClient] = []
    async_clients: list[AsyncSidecarClient] = []

    def make(*args: Any, **kwargs: Any) -> Call:
        if request.param == "sync":
            client = SidecarClient(*args, **kwargs)
            sync_clients.append(client)

            async def sync_call(method: str, /, *a: Any, **kw: Any) -> Any:
                return await asyncio.to_thread(getattr(client, method), *a, **kw)

            return sync_call
        aclient = AsyncSidecarClient(*args, **kwargs)
        async_clients.append(aclient)

        async def async_call(method: str, /, *a: Any, **kw: Any) -> Any:
            return await getattr(aclient, method)(*a, **kw)

        return async_call

    yield make
    for client in sync_clients:
        client.close()
    for aclient in async_clients:
        await aclient.aclose()


@pytest.fixture
def call(connect: Connect, stack: Stack) -> Call:
    return connect(stack.url)


def uid(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


# -- the surface ---------------------------------------------------------------------


@pytest.mark.parametrize("cls", [SidecarClient, AsyncSidecarClient])
def test_every_sdk_method_with_its_keyword_arguments(
    cls: type[SidecarClient] | type[AsyncSidecarClient],
) -> None:
    """Each SDK method's parameters, in order, kind and default; ours may add optional
    keywords after them (``idempotency_key``; ``wait=True`` where the sidecar can queue
    the call instead)."""
    assert len(SDK_METHODS) == 35
    assert set(SDK_METHODS) >= FLAG_METHODS
    for name, sdk in SDK_METHODS.items():
        method = getattr(cls, name, None)
        assert method is not None, f"{cls.__name__}.{name} is missing"
        assert inspect.iscoroutinefunction(method) == (cls is AsyncSidecarClient), name
        ours = list(inspect.signature(method).parameters.values())[1:]
        theirs = list(sdk.parameters.values())[1:]
        assert [(p.name, p.kind, p.default) for p in ours[: len(theirs)]] == [
            (p.name, p.kind, p.default) for p in theirs
        ], f"{name}: {ours}"
        for extra in ours[len(theirs) :]:
            assert extra.kind is inspect.Parameter.KEYWORD_ONLY, f"{name}({extra.name})"
            default = True if (name, extra.name) in DEFERRED_WAIT else None
            assert extra.default is default, f"{name}({extra.name})"
    public = {n for n in dir(cls) if not n.startswith("_")} - {"close", "aclose"}
    attributes = {"base_url", "timeout", "billing_timeout", "fail_open"}
    assert public - attributes == set(SDK_METHODS) | OWN_METHODS | NEWER_METHODS
    # flag's default has no default of its own and is keyword-only, as the SDK's.
    flag_default = inspect.signature(cls.flag).parameters["default"]
    assert flag_default.kind is inspect.Parameter.KEYWORD_ONLY
    assert flag_default.default is inspect.Parameter.empty
    assert inspect.signature(cls.invalidate_flags).parameters["customer_id"].default is None
    ctor = inspect.signature(cls).parameters
    assert list(ctor)[:3] == ["base_url", "timeout", "fail_open"]
    assert (ctor["base_url"].default, ctor["timeout"].default, ctor["fail_open"].default) == (
        None,
        1.0,
        False,
    )


def test_async_client_mirrors_the_blocking_one() -> None:
    public = {n for n in dir(SidecarClient) if not n.startswith("_")} - {"close"}
    assert public == {n for n in dir(AsyncSidecarClient) if not n.startswith("_")} - {"aclose"}
    for name in public:
        sync, async_ = getattr(SidecarClient, name), getattr(AsyncSidecarClient, name)
        assert inspect.signature(sync).parameters == inspect.signature(async_).parameters, name


def test_stdlib_only_single_module_with_py_typed() -> None:
    folder = Path(vsc.__file__).parent
    assert (folder / "py.typed").is_file()
    source = Path(vsc.__file__).read_text()
    imported = {
        line.split()[1].split(".")[0]
        for line in source.splitlines()
        if line.startswith(("import ", "from ")) and not line.startswith("from __future__")
    }
    assert imported <= {
        "asyncio", "contextlib", "http", "json", "os", "select", "socket", "ssl", "threading",
        "collections", "dataclasses", "typing", "urllib",
    }, imported  # fmt: skip


# -- generated code ----------------------------------------------------------------


@pytest.fixture
def scripts(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], Any]:
    """Import a generator of ``scripts/`` by name (they import their sibling ``regions``)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "scripts"))
    return importlib.import_module


def test_blocking_api_is_generated_from_the_async_one(scripts: Callable[[str], Any]) -> None:
    unasync = scripts("unasync_client")
    source = Path(vsc.__file__).read_text()
    assert unasync.render(source) == source, "stale: run scripts/unasync_client.py"

    edited = source.replace(
        '        call = _op("list_invoices", _field_list("invoices"), account_id, query=query)\n'
        "        return await self._run(call)\n",
        '        return await self._run(_op("list_invoices", _field_list("invoices"), '
        "account_id, query=query))\n",
    )
    assert edited != source
    regenerated = unasync.render(edited)
    assert (
        '        return self._run(_op("list_invoices", _field_list("invoices"), account_id, '
        "query=query))\n" in regenerated
    ), "the edit reached the blocking copy, unasynced and formatted"
    assert 'call = _op("list_invoices"' not in regenerated
    # The first copy in the file is SidecarClient's: an edit by hand is undone.
    hand_edited = source.replace("the ``Location`` of the redirect", "edited by hand", 1)
    assert hand_edited != source and unasync.render(hand_edited) == source
    with pytest.raises(SystemExit, match="asyncio"):
        unasync.render(source.replace("await self._run(call)", "await asyncio.sleep(0)", 1))


def test_call_tables_are_generated_from_the_operation_table(
    scripts: Callable[[str], Any],
) -> None:
    gen = scripts("gen_clients")
    python, js = gen.PYTHON.read_text(), gen.JS.read_text()
    assert gen.render_python(python) == python, "stale: run scripts/gen_clients.py"
    assert gen.render_js(js) == js, "stale: run scripts/gen_clients.py"
    assert [op.name for op in OPERATIONS] == list(vsc._OPERATIONS)
    for op in OPERATIONS:
        route = vsc._OPERATIONS[op.name]
        assert (route.method, route.path, route.params) == (op.method, f"/v1{op.path}", op.params)
        assert (route.body, route.cached) == (op.body, op.cached)
        assert f"  {op.name}: {{" in js and f'"/v1{op.path}"' in js, op.name
    stale = python.replace('"/v1/accounts/{account}/invoices", ', '"/v1/invoices", ')
    assert stale != python and gen.render_python(stale) == python
    stale_js = js.replace('path: "/v1/accounts/{account}/invoices" ', 'path: "/v1/invoices" ')
    assert stale_js != js and gen.render_js(stale_js) == js


def test_a_call_that_does_not_match_its_operation_is_refused() -> None:
    with pytest.raises(TypeError, match="get_subscription takes the ids"):
        vsc._op("get_subscription", vsc._object, "acme")
    with pytest.raises(TypeError, match="a body: True"):
        vsc._op("set_account_status", vsc._object, "acme")
    call = vsc._op("invoice_pdf", vsc._location, "a/b", "in 1")
    assert (call.method, call.path, call.billing) == (
        "GET",
        "/v1/accounts/a%2Fb/invoices/in%201/pdf",
        True,
    )
    assert vsc._op("get_entitlements", vsc._object, "c").billing is False


def test_base_url_from_argument_then_environment_then_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("VELLUM_SIDECAR_URL", raising=False)
    assert SidecarClient().base_url == "http://127.0.0.1:8700"
    monkeypatch.setenv("VELLUM_SIDECAR_URL", "http://localhost:9999/")
    assert SidecarClient().base_url == "http://localhost:9999"
    assert AsyncSidecarClient().base_url == "http://localhost:9999"
    assert SidecarClient("unix:/run/sidecar.sock").base_url == "unix:/run/sidecar.sock"
    assert SidecarClient("unix:///run/sidecar.sock").base_url == "unix:/run/sidecar.sock"
    assert SidecarClient("http://[::1]:8700").base_url == "http://[::1]:8700"
    for bad in ("ftp://x", "127.0.0.1:8700", "unix:"):
        with pytest.raises(ValueError, match=r"expected|socket path"):
            SidecarClient(bad)


def test_entitlement_set_follows_the_sdk() -> None:
    doc = {"found": True, "status": "trialing", "modules": ["a", 3], "config": {"seats": 2}}
    ents = EntitlementSet("c", doc, "hit")
    assert (ents.found, ents.status, ents.is_active(), ents.modules) == (
        True,
        "trialing",
        True,
        ("a",),
    )
    assert ents.has("a") and not ents.has("b")
    assert (ents.config("seats"), ents.config("x"), ents.config("x", 7)) == (2, None, 7)
    gone = EntitlementSet("c", {"found": False, "status": None, "modules": [], "config": {}})
    assert (gone.found, gone.status, gone.is_active(), gone.has("a")) == (False, None, False, False)
    assert not EntitlementSet("c", {"status": "past_due"}).is_active()
    # has_access() is the upstream's hasAccess, as the SDK's: absent (an older upstream,
    # an unknown customer) is False, whatever the status says.
    assert not ents.has_access() and not gone.has_access()
    assert EntitlementSet("c", {"status": "past_due", "hasAccess": True}).has_access()
    assert not EntitlementSet("c", {"status": "active", "hasAccess": False}).has_access()


# -- entitlements, live ----------------------------------------------------------------


async def test_entitlement_methods(call: Call, stack: Stack) -> None:
    customer = uid("cus")
    stack.set_entitlements(
        customer,
        {"status": "trialing", "modules": ["reports", "exports"], "config": {"seats": 3}},
    )
    assert await call("can", customer, "exports") is True
    assert await call("can", customer, "billing") is False

    ents = await call("get_entitlements", customer)
    assert isinstance(ents, EntitlementSet)
    assert (ents.found, ents.status, ents.is_active(), ents.cache) == (
        True,
        "trialing",
        True,
        "hit",
    )
    assert ents.has("exports") and not ents.has("billing")
    assert ents.config("seats") == 3 and ents.config("missing", "dflt") == "dflt"
    assert ents.data["customerId"] == customer, "the whole document, unknown fields too"

    nobody = await call("get_entitlements", uid("nobody"))
    assert (nobody.found, nobody.status, nobody.is_active(), nobody.modules) == (
        False,
        None,
        False,
        (),
    )

    pairs = [(customer, "reports"), ("cus_active", "exports"), ("cus_trial", "exports")]
    assert await call("check", pairs) == [True, True, False]
    assert await call("check", []) == []
    big = [(customer, "reports" if i % 2 else "nope") for i in range(2500)]
    assert await call("check", big) == [bool(i % 2) for i in range(2500)], "split in batches"

    assert (await call("get_entitlements", customer)).cache == "hit"
    assert await call("invalidate", customer) is None
    assert (await call("get_entitlements", customer)).cache == "miss"
    assert (await call("get_entitlements", "cus_active")).cache == "hit"
    await call("invalidate")
    assert (await call("get_entitlements", "cus_active")).cache == "miss"


# -- flags, live -------------------------------------------------------------------------


async def test_flag_methods(call: Call, stack: Stack) -> None:
    customer, name = uid("cus"), uid("flag")
    tenant = f"/tenants/{stack.tenant}"
    stack.admin("PUT", f"{tenant}/flags/{name}", {"value": False})
    stack.admin("PUT", f"{tenant}/customers/{customer}/flags/{name}", {"value": True})
    mine = await call("flags", customer)
    assert mine[name] is True and mine["bulk-export"] is True, "overrides over the globals"
    mine[name] = False  # a copy: the next call is not changed by it
    assert (await call("flags", customer))[name] is True
    assert (await call("global_flags"))[name] is False
    assert await call("flag", name, customer, default=False) is True
    assert await call("flag", name, uid("other"), default=True) is False
    assert await call("flag", uid("undefined"), customer, default=True) is True
    assert await call("flag", uid("undefined"), customer, default=False) is False
    with pytest.raises(ValueError, match="flag_id"):
        await call("flag", "", customer, default=True)

    fetches = len(stack.upstream_requests("flags"))
    assert await call("invalidate", customer) is None  # entitlements only, as the SDK's
    await call("flags", customer)
    assert len(stack.upstream_requests("flags")) == fetches
    assert await call("invalidate_flags", customer) is None
    await call("flags", customer)
    assert len(stack.upstream_requests("flags")) == fetches + 1
    globals_fetched = len(stack.upstream_requests("global_flags"))
    await call("invalidate_flags")  # every customer's, and the globals
    await call("flags", customer)
    await call("global_flags")
    assert len(stack.upstream_requests("flags")) == fetches + 2
    assert len(stack.upstream_requests("global_flags")) == globals_fetched + 1


async def test_ids_are_quoted_one_segment_each(call: Call, stack: Stack) -> None:
    odd = "cus;ä b?c#d%2F.."
    stack.set_entitlements(odd, {"status": "active", "modules": ["x?y"], "config": {}})
    assert await call("can", odd, "x?y") is True
    assert (await call("get_entitlements", odd)).data["customerId"] == odd
    # An id the sidecar refuses on every surface (a / once decoded) is its JSON 400.
    with pytest.raises(SidecarApiError) as refused:
        await call("can", "cus/1", "x?y")
    assert (refused.value.status, refused.value.code) == (400, "invalid_id")


async def test_empty_ids_are_refused_before_any_request(call: Call) -> None:
    with pytest.raises(ValueError, match="customer_id must be a non-empty string"):
        await call("can", "", "reports")
    with pytest.raises(ValueError, match="account_id"):
        await call("get_subscription", account_id="", customer_id="c")
    with pytest.raises(ValueError, match="pairs\\[1\\] module_id"):
        await call("check", [("a", "b"), ("a", "")])


# -- billing, live -------------------------------------------------------------------


async def test_every_billing_method(call: Call, stack: Stack) -> None:
    account, customer = uid("acct"), uid("cus")
    created = await call("create_account", account_id=account, name="Acme", email="b@acme.example")
    assert (created["accountId"], created["name"], created["status"]) == (account, "Acme", "active")
    assert stack.upstream_requests("create_account")[-1]["body"] == {
        "accountId": account,
        "name": "Acme",
        "email": "b@acme.example",
    }
    created = await call("create_customer", account_id=account, customer_id=customer)
    assert created["customerId"] == customer
    assert (await call("get_entitlements", customer)).found is False

    session = await call(
        "create_checkout",
        account_id=account,
        customer_id=customer,
        plan_id="pro",
        plan_version=2,
        success_url="https://app.example/ok",
        cancel_url="https://app.example/cancel",
    )
    assert session["mode"] == "subscription" and session["url"].startswith("https://")
    assert stack.upstream_requests("create_checkout")[-1]["body"] == {
        "customerId": customer,
        "planId": "pro",
        "planVersion": 2,
        "seats": 1,
        "successUrl": "https://app.example/ok",
        "cancelUrl": "https://app.example/cancel",
    }
    setup = await call(
        "create_setup_checkout",
        account_id=account,
        success_url="https://app.example/ok",
        cancel_url="https://app.example/cancel",
    )
    assert setup["mode"] == "setup"

    assert await call("can", customer, "api") is False
    sub = await call(
        "create_subscription", account_id=account, customer_id=customer, plan_id="pro",
        plan_version=1, seats=3, idempotency_key=uid("idem"),
    )  # fmt: skip
    assert (sub["planId"], sub["seats"], sub["status"]) == ("pro", 3, "active")
    sent = stack.upstream_requests("create_subscription")[-1]
    assert sent["body"] == {"planId": "pro", "planVersion": 1, "seats": 3}
    assert sent["idempotencyKey"] is not None
    assert await call("can", customer, "api") is True, "the write dropped the customer's cache"
    assert await call("get_subscription", account_id=account, customer_id=customer) == sub

    methods = await call("list_payment_methods", account_id=account)
    assert len(methods) == 2 and {m["isDefault"] for m in methods} == {True, False}
    spare = next(m["ref"] for m in methods if not m["isDefault"])
    default = await call("set_default_payment_method", account_id=account, method_id=spare)
    assert default == {**default, "ref": spare, "isDefault": True}
    paying = await call(
        "set_subscription_payment_method", account_id=account, customer_id=customer,
        method_id=spare,
    )  # fmt: skip
    assert paying["defaultPaymentMethodRef"] == spare
    unused = next(m["ref"] for m in methods if m["ref"] != spare)
    removed = await call("remove_payment_method", account_id=account, method_id=unused)
    assert removed == {"ref": unused, "removed": True}
    assert [m["ref"] for m in await call("list_payment_methods", account_id=account)] == [spare]

    invoices = await call("list_invoices", account_id=account)
    assert len(invoices) == 1
    assert await call("list_invoices", account_id=account, customer_id=customer) == invoices
    assert await call("list_invoices", account_id=account, customer_id="someone_else") == []
    assert stack.upstream_requests("list_invoices")[-1]["query"] == {"customerId": "someone_else"}
    pdf = await call("invoice_pdf", account_id=account, invoice_id=invoices[0]["ref"])
    assert isinstance(pdf, bytes) and pdf.startswith(b"%PDF-"), "the bytes, not text"
    assert invoices[0]["number"].encode() in pdf
    # invoice_pdf_url: an upstream from before SDK 1.2 redirects (invoice_pdf then raises).
    stack.admin("PATCH", "/settings", {"invoicePdf": "redirect"})
    try:
        url = await call("invoice_pdf_url", account_id=account, invoice_id=invoices[0]["ref"])
        with pytest.raises(SidecarApiError) as redirected:
            await call("invoice_pdf", account_id=account, invoice_id=invoices[0]["ref"])
        assert redirected.value.status == 302
    finally:
        stack.admin("PATCH", "/settings", {"invoicePdf": "bytes"})
    assert url.startswith("https://") and url.endswith(f"/{invoices[0]['number']}.pdf")

    status = await call(
        "set_customer_status", account_id=account, customer_id=customer, status="past_due"
    )
    assert status["status"] == "past_due"
    assert (await call("get_entitlements", customer)).status == "past_due"
    later = await call(
        "cancel_subscription", account_id=account, customer_id=customer, at_period_end=True
    )
    assert later["cancelAtPeriodEnd"] is True and later["status"] != "canceled"
    assert stack.upstream_requests("cancel_subscription")[-1]["query"] == {"atPeriodEnd": "true"}
    now = await call("cancel_subscription", account_id=account, customer_id=customer)
    assert now["status"] == "canceled"
    assert stack.upstream_requests("cancel_subscription")[-1]["query"] == {}
    assert await call("can", customer, "api") is False
    closed = await call("set_account_status", account_id=account, status="suspended")
    assert closed["status"] == "suspended"


async def test_subscription_changes(call: Call, stack: Stack) -> None:
    account, customer = uid("acct"), uid("cus")
    created = await call("create_account", account_id=account, billing_customer_id="cus_billing_1")
    assert created["billingCustomerId"] == "cus_billing_1"
    assert stack.upstream_requests("create_account")[-1]["body"] == {
        "accountId": account,
        "billingCustomerId": "cus_billing_1",
    }
    again = await call("create_account", account_id=account)
    assert again["accountId"] == account, "an existing account is answered, not refused"
    with pytest.raises(SidecarApiError) as conflict:
        await call("create_account", account_id=account, billing_customer_id="cus_other")
    assert (conflict.value.status, conflict.value.code) == (409, "billing_customer_conflict")
    await call("create_customer", account_id=account, customer_id=customer, name="Jane")
    assert stack.upstream_requests("create_customer")[-1]["body"] == {
        "customerId": customer,
        "name": "Jane",
    }
    sub = await call("create_subscription", account_id=account, customer_id=customer,
                     plan_id="team")  # fmt: skip
    assert (sub["planId"], sub["planVersion"], sub["seats"]) == ("team", 2, 1), "the newest"
    assert stack.upstream_requests("create_subscription")[-1]["body"] == {
        "planId": "team",
        "seats": 1,
    }, "an optional field is omitted, never null"
    ents = await call("get_entitlements", customer)
    assert ents.has_access() and ents.has("exports") and not ents.has("sso")

    preview = await call(
        "preview_change", account_id=account, customer_id=customer, seats=4,
        add_on_module_ids=["sso"],
    )  # fmt: skip
    assert (preview["current"]["seats"], preview["proposed"]["seats"]) == (1, 4)
    assert stack.upstream_requests("preview_change")[-1]["body"] == {
        "seats": 4,
        "addOnModuleIds": ["sso"],
    }
    seated = await call("set_seats", account_id=account, customer_id=customer, seats=3)
    assert seated["seats"] == 3
    assert (await call("get_entitlements", customer)).config("seats") == 3, "dropped at once"
    await call("add_add_on", account_id=account, customer_id=customer, module_id="sso")
    assert stack.upstream_requests("change_add_ons")[-1]["body"] == {"add": ["sso"]}
    assert await call("can", customer, "sso") is True
    await call("remove_add_on", account_id=account, customer_id=customer, module_id="sso")
    assert stack.upstream_requests("change_add_ons")[-1]["body"] == {"remove": ["sso"]}
    assert await call("can", customer, "sso") is False
    planned = await call(
        "change_plan", account_id=account, customer_id=customer, plan_id="pro", plan_version=1
    )
    assert (planned["planId"], planned["planVersion"]) == ("pro", 1)
    assert await call("can", customer, "api") is True
    updated = await call(
        "update_subscription", account_id=account, customer_id=customer, plan_id="team",
        plan_version=1, seats=2, add_on_module_ids=["audit"],
    )  # fmt: skip
    assert (updated["planId"], updated["seats"], updated["addOnModuleIds"]) == (
        "team", 2, ["audit"],
    )  # fmt: skip
    assert (
        await call("can", customer, "audit") is True and await call("can", customer, "api") is False
    )
    await call("cancel_subscription", account_id=account, customer_id=customer)
    assert await call("can", customer, "audit") is False
    revived = await call("reactivate", account_id=account, customer_id=customer)
    assert revived["status"] == "active"
    assert stack.upstream_requests("reactivate")[-1]["body"] is None, "no body"
    assert await call("can", customer, "audit") is True
    with pytest.raises(SidecarApiError) as refused:
        await call("set_seats", account_id=account, customer_id=customer, seats="3")
    assert (refused.value.status, refused.value.code) == (400, "invalid_body"), "checked first"


async def test_credits(call: Call, stack: Stack) -> None:
    types = await call("list_credit_types")
    assert [t["creditTypeId"] for t in types] == ["api-calls", "exports"]
    packs = await call("list_credit_packs", credit_type_id="exports")
    assert [(p["packId"], p["credits"]) for p in packs] == [("exports-10", 10)]
    customer = uid("cus")
    await call("create_customer", account_id="acme", customer_id=customer)
    path = f"/tenants/{stack.tenant}/customers/{customer}/credits/exports"
    stack.admin("PUT", path, {"balance": 12})
    balances = await call("list_credits", customer_id=customer)
    assert {c["creditTypeId"]: c["balance"] for c in balances} == {"api-calls": 0, "exports": 12}
    key = uid("use")
    spent = await call("consume_credits", customer_id=customer, credit_type_id="exports",
                       amount=5, idempotency_key=key)  # fmt: skip
    assert (spent["balance"], spent["consumed"]) == (7, 5)
    assert stack.upstream_requests("consume_credits")[-1]["body"] == {
        "amount": 5,
        "idempotencyKey": key,
    }
    again = await call("consume_credits", customer_id=customer, credit_type_id="exports",
                       amount=5, idempotency_key=key)  # fmt: skip
    assert again == spent, "deducted once"
    with pytest.raises(SidecarApiError) as short:
        await call("consume_credits", customer_id=customer, credit_type_id="exports",
                   amount=8, idempotency_key=uid("use"))  # fmt: skip
    assert (short.value.status, short.value.code) == (409, "insufficient_credits")
    stack.admin("PUT", path, {"balance": 40})
    balance = await call("get_credit_balance", customer_id=customer, credit_type_id="exports")
    assert balance["balance"] == 40, "balances are never cached"
    one = await call(
        "create_credit_checkout", account_id="acme", customer_id=customer,
        success_url="https://app.example/ok", cancel_url="https://app.example/no",
        credit_type_id="exports", pack_id="exports-10", quantity=2,
    )  # fmt: skip
    assert (one["mode"], one["amountTotal"]) == ("payment", 1000)
    several = await call(
        "create_credit_checkout", account_id="acme", customer_id=customer,
        success_url="https://app.example/ok", cancel_url="https://app.example/no",
        items=[{"creditTypeId": "api-calls", "packId": "calls-1k"}],
    )  # fmt: skip
    assert [i["credits"] for i in several["items"]] == [1000]
    assert stack.upstream_requests("create_credit_checkout")[-1]["body"] == {
        "customerId": customer,
        "successUrl": "https://app.example/ok",
        "cancelUrl": "https://app.example/no",
        "items": [{"creditTypeId": "api-calls", "packId": "calls-1k"}],
    }


async def test_consume_credits_queued_with_wait_false(call: Call, stack: Stack) -> None:
    customer = uid("cus")
    await call("create_customer", account_id="acme", customer_id=customer)
    stack.admin("PUT", f"/tenants/{stack.tenant}/customers/{customer}/credits/exports",
                {"balance": 12})  # fmt: skip
    key = uid("use")
    kwargs = {"customer_id": customer, "credit_type_id": "exports", "amount": 5,
              "idempotency_key": key, "wait": False}  # fmt: skip
    assert await call("consume_credits", **kwargs) == {"queued": True, "idempotencyKey": key}
    deadline = time.monotonic() + 15
    while (record := await call("usage", key))["state"] == "queued":
        assert time.monotonic() < deadline, record
        await asyncio.sleep(0.05)
    assert record["state"] == "delivered" and record["answer"]["balance"] == 7
    assert stack.upstream_requests("consume_credits")[-1]["body"] == {
        "amount": 5,
        "idempotencyKey": key,
    }
    again = await call("consume_credits", **kwargs)
    assert again["queued"] is False and again["state"] == "delivered", "the same record"
    short = await call("consume_credits", **{**kwargs, "amount": 8, "idempotency_key": uid("use")})
    assert short["queued"] is True
    with pytest.raises(SidecarApiError) as reused:
        await call("consume_credits", **{**kwargs, "amount": 6})
    assert (reused.value.status, reused.value.code) == (422, "idempotency_key_reused")
    with pytest.raises(SidecarApiError) as unknown:
        await call("usage", uid("nobody"))
    assert (unknown.value.status, unknown.value.code) == (404, "usage_not_found")
    with pytest.raises(ValueError, match="idempotency_key"):
        await call("usage", "")
    with pytest.raises(TypeError, match="cannot be queued"):
        vsc._op("get_credit_balance", vsc._object, customer, "exports", wait=False)


async def test_upstream_errors_carry_status_code_and_body(call: Call) -> None:
    with pytest.raises(SidecarApiError) as missing:
        await call("get_subscription", account_id="acme", customer_id=uid("ghost"))
    assert missing.value.status == 404
    assert missing.value.code == "customer_not_found"
    assert missing.value.body["error"]["code"] == "customer_not_found"
    assert "404" in str(missing.value)

    with pytest.raises(SidecarApiError) as taken:
        await call("create_customer", account_id="acme", customer_id="cus_trial")
    assert (taken.value.status, taken.value.code) == (409, "customer_exists")

    with pytest.raises(SidecarApiError) as bad:
        await call("set_customer_status", account_id="acme", customer_id="cus_trial", status="x")
    assert (bad.value.status, bad.value.code) == (400, "invalid_status")

    with pytest.raises(SidecarApiError) as gone:
        await call("invoice_pdf_url", account_id="acme", invoice_id="in_nope")
    assert gone.value.status == 404
    assert isinstance(gone.value, SidecarError)


# -- fail closed -----------------------------------------------------------------------


def blackhole() -> socket.socket:
    """A listening socket that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    return server


async def test_fail_closed_with_the_sidecar_stopped(
    connect: Connect, tmp_path_factory: pytest.TempPathFactory
) -> None:
    live = Stack(tmp_path_factory.mktemp("stopped")).start()
    try:
        # 5 s: the restarted sidecar's first answer is a cold upstream fetch, which
        # can pass the 1 s default on a loaded machine; "sidecar down" fails fast anyway.
        closed, opened = connect(live.url, 5), connect(live.url, 5, True)
        assert await closed("can", "cus_active", "reports") is True  # keeps a connection
        live.stop_sidecar()
        assert await closed("can", "cus_active", "reports") is False
        assert await closed("check", [("cus_active", "reports")] * 2) == [False, False]
        assert await opened("can", "cus_trial", "exports") is True
        assert await opened("check", [("cus_trial", "exports")]) == [True]
        with pytest.raises(SidecarUnavailable) as down:
            await closed("get_entitlements", "cus_active")
        assert down.value.status is None and "cannot reach the sidecar" in str(down.value)
        with pytest.raises(SidecarUnavailable):
            await closed("invalidate")
        assert await closed("flag", "beta", "cus_active", default=True) is True
        with pytest.raises(SidecarUnavailable):
            await closed("global_flags")
        with pytest.raises(SidecarUnavailable):
            await closed("create_customer", account_id="acme", customer_id=uid("cus"))

        live.start_sidecar()
        assert await closed("can", "cus_active", "reports") is True, "reconnects by itself"
    finally:
        live.close()


async def test_fail_closed_when_the_sidecar_answers_503(
    connect: Connect, upstream_down: Stack
) -> None:
    closed = connect(upstream_down.url, timeout=10)
    opened = connect(upstream_down.url, 10, True)
    customer = uid("cus")
    assert await closed("can", customer, "reports") is False
    assert await opened("can", customer, "reports") is True
    assert await closed("check", [(customer, "a"), (customer, "b")]) == [False, False]
    assert await opened("check", [(customer, "a")]) == [True]
    with pytest.raises(SidecarUnavailable) as unavailable:
        await closed("get_entitlements", customer)
    assert (unavailable.value.status, unavailable.value.code) == (503, "upstream_unavailable")
    with pytest.raises(SidecarUnavailable) as gateway:
        await closed("list_invoices", account_id="acme")
    assert gateway.value.status in (502, 504)
    assert await closed("flag", "beta", customer, default=True) is True
    assert await closed("flag", "beta", customer, default=False) is False
    with pytest.raises(SidecarUnavailable):
        await closed("flags", customer)


async def test_the_sidecars_fail_open_modules_answer_true_for_a_fail_closed_client(
    connect: Connect, upstream_down: Stack
) -> None:
    closed = connect(upstream_down.url, timeout=10)
    customer = uid("cus")
    assert await closed("can", customer, "status_page") is True, "SIDECAR_FAIL_OPEN_MODULES"
    assert await closed("check", [(customer, "status_page"), (customer, "reports")]) == [
        True,
        False,
    ]


async def test_fail_closed_when_the_sidecar_never_answers(connect: Connect) -> None:
    with blackhole() as server:
        silent = connect(f"http://127.0.0.1:{server.getsockname()[1]}", timeout=0.3)
        started = time.monotonic()
        assert await silent("can", "cus_active", "reports") is False
        assert time.monotonic() - started < 3
        with pytest.raises(SidecarUnavailable, match="timed out"):
            await silent("get_entitlements", "cus_active")


def test_nothing_listening_fails_closed_fast() -> None:
    client = SidecarClient(f"http://127.0.0.1:{free_port()}")
    assert client.can("c", "m") is False
    assert SidecarClient(client.base_url, fail_open=True).can("c", "m") is True
    with pytest.raises(SidecarUnavailable, match="ConnectionRefusedError"):
        client.list_payment_methods(account_id="acme")


# -- connections -----------------------------------------------------------------------


def test_keeps_one_connection_alive_across_calls(stack: Stack) -> None:
    with SidecarClient(stack.url) as client:
        ports = set()
        for _ in range(20):
            assert client.can("cus_active", "reports") is True
            idle = client._pool._idle
            assert len(idle) == 1
            assert idle[0].sock is not None
            ports.add(idle[0].sock.getsockname()[1])
        assert len(ports) == 1, "every call reused the same connection"


def test_one_client_shared_by_threads(stack: Stack) -> None:
    customers = ["cus_active", "cus_trial", "cus_pastdue", "cus_canceled"]
    expected = {"cus_active": True, "cus_trial": True, "cus_pastdue": True, "cus_canceled": False}
    errors: list[BaseException] = []
    with SidecarClient(stack.url) as client:

        def worker(n: int) -> None:
            try:
                for i in range(40):
                    customer = customers[(n + i) % 4]
                    assert client.can(customer, "reports") is expected[customer]
                    assert client.get_entitlements(customer).customer_id == customer
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors[0]
        assert 1 <= len(client._pool._idle) <= 8


async def test_async_client_reuses_its_connection(stack: Stack) -> None:
    async with AsyncSidecarClient(stack.url) as client:
        results = await asyncio.gather(*(client.can("cus_active", "reports") for _ in range(10)))
        assert results == [True] * 10
        opened = len(client._idle)
        assert 1 <= opened <= 10
        for _ in range(10):
            assert await client.can("cus_trial", "exports") is False
        assert len(client._idle) == opened, "sequential calls opened no new connection"


# -- unix socket -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def unix_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # A short path: unix socket paths are limited to about 100 bytes.
    folder = Path(tempfile.mkdtemp(prefix="vsc-"))
    try:
        with Stack(tmp_path_factory.mktemp("unix"), listen=f"unix:{folder}/sidecar.sock") as live:
            yield live
    finally:
        for leftover in folder.iterdir():
            leftover.unlink()
        folder.rmdir()


async def test_unix_socket_url(unix_stack: Stack) -> None:
    assert unix_stack.url.startswith("unix:/")
    with SidecarClient(unix_stack.url) as client:
        assert await asyncio.to_thread(client.can, "cus_active", "reports") is True
        ents = await asyncio.to_thread(client.get_entitlements, "cus_active")
        assert ents.status == "active"
        invoices = await asyncio.to_thread(client.list_invoices, account_id="acme")
        assert {i["number"] for i in invoices} >= {"ACME-0001", "ACME-0002"}
    unix_stack.admin("PATCH", "/settings", {"invoicePdf": "redirect"})  # invoice_pdf_url's kind
    async with AsyncSidecarClient(unix_stack.url) as aclient:
        assert await aclient.can("cus_trial", "exports") is False
        assert (await aclient.get_entitlements("cus_trial")).status == "trialing"
        url = await aclient.invoice_pdf_url(account_id="acme", invoice_id=invoices[0]["ref"])
        assert url.endswith(f"/{invoices[0]['number']}.pdf")


def test_environment_url_reaches_the_live_sidecar(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VELLUM_SIDECAR_URL", stack.url)
    with SidecarClient() as client:
        assert client.can("cus_active", "exports") is True
    assert os.environ["VELLUM_SIDECAR_URL"] == stack.url
