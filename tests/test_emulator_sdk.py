"""The upstream's own SDK, ``vellumcharter`` 1.4.2 from PyPI, unmodified, against the emulator.

Every public method of ``VellumCharterClient`` and ``AsyncVellumCharterClient``
runs against a real emulator server and its answers are checked: the emulator
is right when the SDK that talks to the real service is satisfied with it (the
journeys are ``tests/sdk_journeys.py``'s, which ``tests/test_sdk.py`` also runs
through the sidecar). The pushes the emulator sends are checked with the SDK's
own ``verify_push_signature``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer
from vellumcharter import (
    VellumCharterAuthError,
    VellumCharterSignatureError,
    verify_push_signature,
)

from sidecar.emulator import DEMO_TENANT, EMULATOR, Emulator, create_emulator_app

from .sdk_journeys import ASYNC_PUBLIC, SYNC_PUBLIC, Sdk, Target, every_public_method

API_KEY = "sdk_test_key_" + "k" * 16
SECRET = "whsec_sdk_" + "s" * 20


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


@pytest.fixture(params=["sync", "async"])
def sdk(request: pytest.FixtureRequest, server: TestServer) -> Sdk:
    return Sdk(request.param, str(server.make_url("")).rstrip("/"), DEMO_TENANT, API_KEY)


def uid(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


# -- every public method: the journeys of tests/sdk_journeys.py, once per flavour ----------


def test_both_clients_have_the_same_public_surface() -> None:
    assert SYNC_PUBLIC == ASYNC_PUBLIC
    assert len(SYNC_PUBLIC) == 35  # 33 calls over the 30 routes, and 2 local cache drops


async def test_the_sdk_refuses_a_wrong_key(server: TestServer) -> None:
    for flavour in ("sync", "async"):
        sdk = Sdk(flavour, str(server.make_url("")).rstrip("/"), DEMO_TENANT, "wrong")
        with pytest.raises(VellumCharterAuthError):
            await sdk("get_entitlements", "cus_active")
        with pytest.raises(VellumCharterAuthError):
            await sdk("invoice_pdf", account_id="acme", invoice_id="x")
        assert await sdk("flag", "bulk-export", "cus_active", default=False) is False


async def test_every_public_method_against_the_emulator(sdk: Sdk, emulator: Emulator) -> None:
    """Each flavour drives every public method; the answers are checked on the way."""
    await every_public_method(Target(sdk, emulator, DEMO_TENANT))


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
