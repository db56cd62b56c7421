"""OFREP, the OpenFeature Remote Evaluation Protocol: the stock OpenFeature SDK and
OFREP provider (Python ``openfeature-sdk`` + ``openfeature-provider-ofrep``, and
from node ``@openfeature/server-sdk`` + ``@openfeature/ofrep-provider``) against
live sidecars, the answers' shapes per the spec, the bulk ETag across sidecars and
the SSE event stream."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from openfeature import api
from openfeature.contrib.provider.ofrep import OFREPProvider
from openfeature.evaluation_context import EvaluationContext
from openfeature.exception import ErrorCode
from openfeature.flag_evaluation import Reason

from sidecar.emulator import Emulator
from sidecar.signature import sign

from .conftest import Sidecar, SidecarFactory, eventually
from .harness import WEBHOOK_SECRET, Stack, free_port

ROOT = Path(__file__).resolve().parent.parent
JS_TESTS = ROOT / "tests" / "ofrep_js"

DOC = {"status": "active", "modules": ["reports", "exports"], "config": {}}
GLOBALS = {"beta": False, "dark-mode": True}


@pytest.fixture
def flagged(emulator: Emulator, tenant: str) -> Emulator:
    """Two global flags, cus_1 overriding beta and holding two modules."""
    for name, value in GLOBALS.items():
        emulator.set_flag(tenant, name, value)
    emulator.set_flag(tenant, "beta", True, customer_id="cus_1")
    emulator.set_entitlements(tenant, "cus_1", DOC)
    return emulator


def base_url(sc: Sidecar) -> str:
    return str(sc.client.make_url("")).rstrip("/")


async def evaluate(sc: Sidecar, key: str, body: Any, raw: bytes | None = None) -> Any:
    data = raw if raw is not None else orjson.dumps(body)
    return await sc.client.post(f"/ofrep/v1/evaluate/flags/{key}", data=data)


def context(customer: str | None) -> dict[str, Any]:
    return {"context": {"targetingKey": customer, "email": "x@example.com"}}


# -- the stock Python provider ------------------------------------------------------------


@pytest.fixture
def of_domain() -> Iterator[str]:
    """An OpenFeature domain of this test's own (the SDK's providers are global)."""
    yield "vsc-" + uuid.uuid4().hex
    api.clear_providers()


async def test_the_python_openfeature_provider(
    make_sidecar: SidecarFactory, flagged: Emulator, tenant: str, of_domain: str
) -> None:
    sc = await make_sidecar(None)
    api.set_provider_and_wait(OFREPProvider(base_url(sc), timeout=5), domain=of_domain)
    client = api.get_client(of_domain)
    cus_1 = EvaluationContext(targeting_key="cus_1", attributes={"plan": "pro"})

    def drive() -> dict[str, Any]:  # requests blocks: a thread, the servers on this loop
        return {
            "override": client.get_boolean_details("beta", False, cus_1),
            "global": client.get_boolean_details("dark-mode", False, cus_1),
            "module": client.get_boolean_details("module:reports", False, cus_1),
            "no_module": client.get_boolean_details("module:billing", True, cus_1),
            "unknown": client.get_boolean_details("nope", True, cus_1),
            "no_key": client.get_boolean_details("beta", False, EvaluationContext()),
            "wrong_type": client.get_string_details("beta", "x", cus_1),
        }

    got = await asyncio.to_thread(drive)
    override, glob = got["override"], got["global"]
    assert (override.value, override.reason, override.variant) == (
        True,
        Reason.TARGETING_MATCH,
        "on",
    )
    assert (glob.value, glob.reason, glob.variant) == (True, Reason.STATIC, "on")
    assert override.error_code is None and glob.error_code is None
    module, no_module = got["module"], got["no_module"]
    assert (module.value, module.reason, module.variant) == (
        True,
        Reason.TARGETING_MATCH,
        "allowed",
    )
    assert (no_module.value, no_module.variant) == (False, "denied")
    unknown = got["unknown"]
    assert (unknown.value, unknown.error_code) == (True, ErrorCode.FLAG_NOT_FOUND)
    assert unknown.error_message == "Flag 'nope' was not found"
    no_key = got["no_key"]
    assert (no_key.value, no_key.error_code) == (False, ErrorCode.TARGETING_KEY_MISSING)
    assert (got["wrong_type"].value, got["wrong_type"].error_code) == ("x", ErrorCode.TYPE_MISMATCH)
    assert flagged.count("flags", tenant) == 1, "every flag from one cached document"
    assert flagged.count("get_entitlements", tenant) == 1


async def test_the_python_provider_gets_its_default_when_nothing_can_answer(
    make_sidecar: SidecarFactory, of_domain: str
) -> None:
    sc = await make_sidecar(
        None, VELLUM_BASE_URL=f"http://127.0.0.1:{free_port()}", SIDECAR_UPSTREAM_TIMEOUT="0.5"
    )
    api.set_provider_and_wait(OFREPProvider(base_url(sc), timeout=5), domain=of_domain)
    client = api.get_client(of_domain)
    cus_1 = EvaluationContext(targeting_key="cus_1")
    flag, module = await asyncio.to_thread(
        lambda: (
            client.get_boolean_details("beta", True, cus_1),
            client.get_boolean_details("module:reports", False, cus_1),
        )
    )
    assert (flag.value, flag.error_code, flag.reason) == (True, ErrorCode.GENERAL, Reason.ERROR)
    assert (module.value, module.error_code) == (False, ErrorCode.GENERAL)


# -- the answers, as the spec shapes them -------------------------------------------------


async def test_single_evaluation_answers(
    make_sidecar: SidecarFactory, flagged: Emulator, tenant: str
) -> None:
    sc = await make_sidecar(None)
    ok = await evaluate(sc, "beta", context("cus_1"))
    assert (ok.status, ok.headers["Content-Type"]) == (200, "application/json")
    assert await ok.json() == {
        "key": "beta",
        "value": True,
        "reason": "TARGETING_MATCH",
        "variant": "on",
    }
    assert ok.headers["X-Sidecar-Cache"] == "miss"
    other = await evaluate(sc, "beta", context("cus_2"))
    assert await other.json() == {
        "key": "beta",
        "value": False,
        "reason": "STATIC",
        "variant": "off",
    }
    unknown_customer = await evaluate(sc, "module:reports", context("nobody"))
    assert await unknown_customer.json() == {
        "key": "module:reports",
        "value": False,
        "reason": "STATIC",
        "variant": "denied",
    }
    cases: list[tuple[str, bytes | None, Any, int, str]] = [
        ("nope", None, context("cus_1"), 404, "FLAG_NOT_FOUND"),
        ("module:", None, context("cus_1"), 404, "FLAG_NOT_FOUND"),
        ("beta", b"{not json", None, 400, "PARSE_ERROR"),
        ("beta", b"[1]", None, 400, "PARSE_ERROR"),
        ("beta", b"", None, 400, "TARGETING_KEY_MISSING"),
        ("beta", None, {}, 400, "TARGETING_KEY_MISSING"),
        ("beta", None, {"context": {}}, 400, "TARGETING_KEY_MISSING"),
        ("beta", None, context(""), 400, "TARGETING_KEY_MISSING"),
        ("beta", None, {"context": "cus_1"}, 400, "INVALID_CONTEXT"),
        ("beta", None, {"context": {"targetingKey": 7}}, 400, "INVALID_CONTEXT"),
        ("beta", None, context("c" * 513), 400, "INVALID_CONTEXT"),
    ]
    for key, raw, body, status, code in cases:
        resp = await evaluate(sc, key, body, raw)
        assert resp.status == status, (key, raw, body)
        assert resp.headers["Content-Type"] == "application/json"
        got = await resp.json()
        assert got["key"] == key and got["errorCode"] == code, (key, raw, body, got)
        assert isinstance(got["errorDetails"], str) and got["errorDetails"]
        assert "error" not in got, "never the local API's envelope"


async def test_an_outage_with_nothing_cached_is_a_general_error(
    make_sidecar: SidecarFactory,
) -> None:
    sc = await make_sidecar(
        None, VELLUM_BASE_URL=f"http://127.0.0.1:{free_port()}", SIDECAR_UPSTREAM_TIMEOUT="0.5"
    )
    for key in ("beta", "module:reports"):
        resp = await evaluate(sc, key, context("cus_1"))
        assert (resp.status, resp.headers["Content-Type"]) == (500, "application/json")
        body = await resp.json()
        assert (body["key"], body["errorCode"]) == (key, "GENERAL")
        assert "Retry-After" not in resp.headers
    bulk = await sc.client.post("/ofrep/v1/evaluate/flags", json=context("cus_1"))
    assert bulk.status == 500
    assert (await bulk.json())["errorCode"] == "GENERAL"


async def test_stale_documents_still_evaluate(
    make_sidecar: SidecarFactory, flagged: Emulator, redis_url: str
) -> None:
    sc = await make_sidecar(redis_url, SIDECAR_FLAGS_TTL="0.2", SIDECAR_MEMORY_TTL="0")
    assert (await evaluate(sc, "beta", context("cus_1"))).status == 200
    flagged.fail(None, 503, times=None)
    deadline = time.monotonic() + 5
    while True:
        resp = await evaluate(sc, "beta", context("cus_1"))
        if resp.headers["X-Sidecar-Cache"] == "stale":
            break
        assert time.monotonic() < deadline, "never served stale"
        await asyncio.sleep(0.05)
    assert resp.status == 200
    assert (await resp.json())["value"] is True
    flagged.clear_faults()


# -- bulk -----------------------------------------------------------------------------------


async def bulk(sc: Sidecar, customer: str, etag: str | None = None) -> aiohttp.ClientResponse:
    headers = {"If-None-Match": etag} if etag is not None else {}
    resp: aiohttp.ClientResponse = await sc.client.post(
        "/ofrep/v1/evaluate/flags", json=context(customer), headers=headers
    )
    return resp


async def test_bulk_etag_and_304_across_two_sidecars(
    make_sidecar: SidecarFactory, flagged: Emulator, tenant: str, redis_url: str
) -> None:
    a = await make_sidecar(redis_url)
    b = await make_sidecar(redis_url)
    first = await bulk(a, "cus_1")
    assert (first.status, first.headers["Content-Type"]) == (200, "application/json")
    etag = first.headers["ETag"]
    assert re.fullmatch(r'"[0-9a-f]{32}"', etag)
    body = await first.json()
    assert body["flags"] == [
        {"key": "beta", "value": True, "reason": "TARGETING_MATCH", "variant": "on"},
        {"key": "dark-mode", "value": True, "reason": "STATIC", "variant": "on"},
        {"key": "module:exports", "value": True, "reason": "TARGETING_MATCH", "variant": "allowed"},
        {"key": "module:reports", "value": True, "reason": "TARGETING_MATCH", "variant": "allowed"},
    ]
    assert body["eventStreams"] == [
        {"type": "sse", "endpoint": {"requestUri": "/ofrep/v1/events?targetingKey=cus_1"}}
    ]
    # The other sidecar computes the same ETag from the documents in the shared Redis.
    same = await bulk(b, "cus_1", etag)
    assert (same.status, same.headers["ETag"]) == (304, etag)
    assert same.headers["Content-Type"] == "application/json"
    assert await same.read() == b""
    assert (await bulk(b, "cus_1", f'W/{etag}, "other"')).status == 304
    assert (await bulk(b, "cus_1", '"other"')).status == 200
    assert (await bulk(b, "cus_2")).headers["ETag"] != etag, "the customer is covered"
    # A refetch of unchanged documents keeps the ETag.
    assert (await a.client.delete("/v1/customers/cus_1/cache")).status == 204
    assert (await bulk(a, "cus_1", etag)).status == 304

    # A change (flags or entitlements) gives a new one, on both sidecars: on the one that
    # dropped at once, on the other once the fan-out message arrived (milliseconds).
    async def changed_on(sc: Sidecar, tag: str) -> aiohttp.ClientResponse:
        answers: list[aiohttp.ClientResponse] = []

        async def new_etag_there() -> bool:
            answers.append(await bulk(sc, "cus_1", tag))
            return answers[-1].status == 200

        await eventually(new_etag_there, timeout=5)
        return answers[-1]

    flagged.set_flag(tenant, "dark-mode", False, customer_id="cus_1")
    assert (await b.client.delete("/v1/customers/cus_1/cache?axis=flags")).status == 204
    changed = await changed_on(a, etag)
    new_etag = changed.headers["ETag"]
    assert new_etag != etag
    assert (await bulk(b, "cus_1", new_etag)).status == 304
    flagged.set_entitlements(tenant, "cus_1", {**DOC, "modules": ["reports"]})
    assert (await a.client.delete("/v1/customers/cus_1/cache?axis=entitlements")).status == 204
    again = await changed_on(b, new_etag)
    assert [f["key"] for f in (await again.json())["flags"]] == [
        "beta",
        "dark-mode",
        "module:reports",
    ]


async def test_bulk_etag_covers_the_tenant(
    make_sidecar: SidecarFactory, emulator: Emulator, tenant: str
) -> None:
    other_tenant = tenant + "-b"
    for t in (tenant, other_tenant):
        emulator.set_flag(t, "beta", True)
    here = await make_sidecar(None)
    there = await make_sidecar(None, VELLUM_TENANT_ID=other_tenant)
    a, b = await bulk(here, "cus_1"), await bulk(there, "cus_1")
    assert (await a.json())["flags"] == (await b.json())["flags"]
    assert a.headers["ETag"] != b.headers["ETag"]


async def test_bulk_refusals(make_sidecar: SidecarFactory, flagged: Emulator) -> None:
    sc = await make_sidecar(None)
    for raw, code in [
        (b"nope", "PARSE_ERROR"),
        (b"{}", "TARGETING_KEY_MISSING"),
        (b'{"context": []}', "INVALID_CONTEXT"),
    ]:
        resp = await sc.client.post("/ofrep/v1/evaluate/flags", data=raw)
        assert (resp.status, resp.headers["Content-Type"]) == (400, "application/json")
        body = await resp.json()
        assert body["errorCode"] == code and body["errorDetails"] and "key" not in body
    # The query metadata an SSE-triggered refetch adds is accepted.
    resp = await sc.client.post(
        "/ofrep/v1/evaluate/flags?flagConfigEtag=%22x%22&flagConfigLastModified=1771622898",
        json=context("cus_1"),
    )
    assert resp.status == 200


# -- the event stream ------------------------------------------------------------------------


class EventStream:
    """A plain SSE reader over aiohttp (what an OFREP provider's EventSource does)."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp

    async def next_event(self, timeout: float = 5.0) -> dict[str, str]:
        """The next event with data (comments and ``retry:`` lines skipped)."""
        fields: dict[str, str] = {}
        async with asyncio.timeout(timeout):
            while True:
                line = (await self.resp.content.readline()).decode()
                assert line, "the stream ended"
                line = line.rstrip("\n")
                if not line:
                    if "data" in fields:
                        return fields
                    fields = {}
                elif not line.startswith(":"):
                    name, _, value = line.partition(":")
                    fields[name] = value.removeprefix(" ")


class Streams:
    """Opens the event streams a bulk answer advertises; closes them all at the end."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session
        self.opened: list[aiohttp.ClientResponse] = []

    async def open(self, sc: Sidecar, customer: str, **headers: str) -> EventStream:
        bulk_resp = await bulk(sc, customer)
        [advertised] = (await bulk_resp.json())["eventStreams"]
        url = base_url(sc) + advertised["endpoint"]["requestUri"]
        resp = await self.session.get(url, headers=headers)
        self.opened.append(resp)
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        return EventStream(resp)


@pytest.fixture
async def streams() -> AsyncIterator[Streams]:
    async with aiohttp.ClientSession() as session:
        opened = Streams(session)
        yield opened
        for resp in opened.opened:
            resp.close()


async def test_sse_refetch_after_a_push_anywhere_in_the_fleet(
    make_sidecar: SidecarFactory,
    flagged: Emulator,
    tenant: str,
    redis_url: str,
    streams: Streams,
) -> None:
    streaming = await make_sidecar(redis_url)
    receiver = await make_sidecar(redis_url)
    mine = await streams.open(streaming, "cus_1")
    theirs = await streams.open(streaming, "cus_2")
    # A flag push for cus_1, received by the other sidecar: cus_1's stream hears it.
    event_id = "evt_" + uuid.uuid4().hex
    payload = orjson.dumps(
        {
            "eventId": event_id,
            "id": event_id,
            "type": "flags.updated",
            "tenantId": tenant,
            "customerId": "cus_1",
        }
    )
    assert receiver.webhooks is not None
    pushed = await receiver.webhooks.post(
        "/webhooks/vellum",
        data=payload,
        headers={"X-Vellum-Signature": sign(WEBHOOK_SECRET, payload, int(time.time()))},
    )
    assert pushed.status == 200
    got = await mine.next_event()
    assert got["event"] == "message"
    assert json.loads(got["data"]) == {"type": "refetchEvaluation"}
    assert got["id"]
    # An entitlement drop concerns OFREP too (module: keys); a tenant-wide drop
    # reaches every stream.
    assert (
        await receiver.client.delete("/v1/customers/cus_1/cache?axis=entitlements")
    ).status == 204
    assert json.loads((await mine.next_event())["data"])["type"] == "refetchEvaluation"
    assert (await receiver.client.delete("/v1/cache?axis=flags")).status == 204
    for stream in (theirs, mine):
        assert json.loads((await stream.next_event())["data"])["type"] == "refetchEvaluation"
    # cus_2's stream heard only the tenant-wide drop: nothing else is queued for it.
    with pytest.raises(TimeoutError):
        await theirs.next_event(timeout=0.3)


async def test_sse_reconnect_with_last_event_id_refetches_at_once(
    make_sidecar: SidecarFactory, flagged: Emulator, streams: Streams
) -> None:
    sc = await make_sidecar(None)
    stream = await streams.open(sc, "cus_1", **{"Last-Event-ID": "41"})
    assert json.loads((await stream.next_event())["data"])["type"] == "refetchEvaluation"
    async with streams.session.get(base_url(sc) + "/ofrep/v1/events") as bad:
        assert (bad.status, (await bad.json())["errorCode"]) == (400, "TARGETING_KEY_MISSING")


async def test_open_streams_end_on_shutdown(
    make_sidecar: SidecarFactory, flagged: Emulator, streams: Streams
) -> None:
    sc = await make_sidecar(None)
    stream = await streams.open(sc, "cus_1")
    await sc.client.close()  # the app shuts down: on_shutdown ends every stream
    async with asyncio.timeout(5):
        while await stream.resp.content.readline():
            pass


# -- the stock JavaScript provider, from node ----------------------------------------------


@pytest.fixture(scope="module")
def js_stacks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Stack]]:
    started: dict[str, Stack] = {}
    try:
        for name, stack in {
            "main": Stack(tmp_path_factory.mktemp("ofrep-js")),
            "down": Stack(
                tmp_path_factory.mktemp("ofrep-js-down"),
                upstream=False,
                SIDECAR_UPSTREAM_TIMEOUT="1",
            ),
        }.items():
            started[name] = stack
            stack.start()
        yield started
    finally:
        for stack in started.values():
            stack.close()


def test_the_js_openfeature_provider(js_stacks: dict[str, Stack]) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: the OFREP JS tests need Node 18+")
    if not (JS_TESTS / "node_modules" / "@openfeature" / "ofrep-provider").is_dir():
        # The pinned providers (package-lock.json), installed once on a fresh checkout.
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("npm is not installed: the OFREP JS tests install the stock providers")
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=JS_TESTS,
            check=True,
            timeout=600,
        )
    files = sorted(str(p.relative_to(JS_TESTS)) for p in JS_TESTS.glob("*.test.js"))
    assert files
    main = js_stacks["main"]
    env = {
        **os.environ,
        "VSC_URL": main.url,
        "VSC_EMULATOR_URL": main.emulator_url,
        "VSC_TENANT": main.tenant,
        "VSC_UPSTREAM_DOWN_URL": js_stacks["down"].url,
    }
    result = subprocess.run(
        [node, "--test", "--test-reporter=spec", *files],
        cwd=JS_TESTS,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"node --test failed:\n{output}\n{main.logs()}"
    passed = re.search(r"\bpass (\d+)", output)
    assert re.search(r"\bfail 0\b", output) and passed, output
    assert int(passed.group(1)) >= 6, f"node ran too few tests:\n{output}"
