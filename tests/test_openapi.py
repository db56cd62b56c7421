"""The OpenAPI document: valid 3.1, served as the file, complete, and true of live answers.

``sidecar/openapi.json`` is written by ``scripts/gen_openapi.py`` from the operation
table and ``scripts/openapi_base.json``; the server serves that file. This test
checks the committed file is what the generator writes, validates it
(openapi-spec-validator), compares its operations (HEAD included) with the routes
the app registers, and checks every answer of a live sidecar, for every operation
and the usual error statuses, against the schema the document gives for that
status (jsonschema, the 2020-12 dialect OpenAPI 3.1 uses). Failures list every
mismatch at once, each naming the request and the rule.
"""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_spec
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from sidecar.app import create_app
from sidecar.config import Settings
from sidecar.http.operations import OPERATIONS, SURFACES

from .harness import Stack, sidecar_env, wait_until

METHODS = ("get", "put", "post", "delete", "patch", "head", "options")
SPEC_URI = "urn:vellum-sidecar:openapi"
GENERATOR = Path(__file__).resolve().parent.parent / "scripts" / "gen_openapi.py"


def load_spec() -> dict[str, Any]:
    raw = resources.files("sidecar").joinpath("openapi.json").read_bytes()
    spec: dict[str, Any] = json.loads(raw)
    return spec


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return load_spec()


def operations(spec: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield method.upper(), path, operation


# -- the document ----------------------------------------------------------------------


def generate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(GENERATOR), *args], capture_output=True, text=True, timeout=60
    )


def test_committed_document_is_what_the_generator_writes() -> None:
    result = generate("--check")
    assert result.returncode == 0, result.stderr


def test_generator_check_fails_on_a_stale_document(tmp_path: Path) -> None:
    stale = tmp_path / "openapi.json"
    spec = load_spec()
    del spec["paths"]["/v1/accounts"]
    stale.write_text(json.dumps(spec, indent=2) + "\n")
    result = generate("--check", "--output", str(stale))
    assert result.returncode == 1
    assert "is stale" in result.stderr and "scripts/gen_openapi.py" in result.stderr
    written = generate("--output", str(stale))
    assert written.returncode == 0, written.stderr
    assert stale.read_bytes() == resources.files("sidecar").joinpath("openapi.json").read_bytes()


def test_document_is_valid_openapi_3_1(spec: dict[str, Any]) -> None:
    assert spec["openapi"].startswith("3.1"), spec["openapi"]
    validate_spec(spec)  # raises with the offending pointer


def test_operation_ids_are_unique_and_path_parameters_declared(spec: dict[str, Any]) -> None:
    problems: list[str] = []
    seen: dict[str, str] = {}
    for method, path, op in operations(spec):
        op_id = op.get("operationId")
        if op_id is None:
            problems.append(f"{method} {path}: no operationId")
        elif op_id in seen:
            problems.append(f"{method} {path}: operationId {op_id!r} also on {seen[op_id]}")
        else:
            seen[op_id] = f"{method} {path}"
        params = op.get("parameters", []) + spec["paths"][path].get("parameters", [])
        declared = {
            resolve(spec, p).get("name") for p in params if resolve(spec, p)["in"] == "path"
        }
        for name in re.findall(r"\{(\w+)\}", path):
            if name not in declared:
                problems.append(f"{method} {path}: path parameter {name!r} is not declared")
    assert not problems, "\n".join(problems)


def escape(part: str) -> str:
    """One JSON-pointer token."""
    return part.replace("~", "~0").replace("/", "~1")


def resolve(spec: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """Follow a local ``$ref`` (``#/components/...``)."""
    while "$ref" in node:
        target: Any = spec
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        node = target
    return node


def served_routes() -> set[tuple[str, str]]:
    """(METHOD, /path/{param}) for every route the local API app registers, HEAD included."""
    settings = Settings.from_env(sidecar_env("t_routes", "http://127.0.0.1:1"))
    app = create_app(settings)
    routes = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        if path is None or route.method == "*":
            continue
        routes.add((route.method, re.sub(r"\{(\w+):[^}]*\}", r"{\1}", path)))
    return routes


def test_every_route_is_documented_and_every_documented_route_served(
    spec: dict[str, Any],
) -> None:
    documented = {(method, path) for method, path, _ in operations(spec)}
    served = served_routes()
    missing = sorted(served - documented)
    phantom = sorted(documented - served)
    report = [f"served but not in openapi.json: {m} {p}" for m, p in missing]
    report += [f"in openapi.json but not served: {m} {p}" for m, p in phantom]
    assert not report, "\n".join(report)


# -- live answers --------------------------------------------------------------------


@dataclass(frozen=True)
class Exchange:
    method: str
    path: str
    status: int
    headers: dict[str, str]
    body: bytes

    def __str__(self) -> str:
        return f"{self.method} {self.path} -> {self.status}"


class Recorder:
    """Sends raw requests (no redirect following) and keeps every answer."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.port is not None
        self.host, self.port = parts.hostname, parts.port
        self.exchanges: list[Exchange] = []

    def __call__(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        expect: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=15)
        try:
            payload = body if isinstance(body, bytes) else None
            if body is not None and payload is None:
                payload = json.dumps(body).encode()
            sent = {"Content-Type": "application/json"} if payload is not None else {}
            conn.request(method, path, body=payload, headers={**sent, **(headers or {})})
            resp = conn.getresponse()
            exchange = Exchange(
                method, path, resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
            )
        finally:
            conn.close()
        self.exchanges.append(exchange)
        if expect is not None:
            assert exchange.status == expect, f"{exchange}: {exchange.body[:300]!r}"
        is_json = exchange.headers.get("content-type", "").startswith("application/json")
        return json.loads(exchange.body) if exchange.body and is_json else None


def drive_every_operation(send: Recorder, prefix: str, tenant: str) -> None:
    """Every operation once or more on one surface (``/v1`` or ``/tenants/{t}``)."""
    acct, cus = f"acct_{uuid.uuid4().hex[:8]}", f"cus_{uuid.uuid4().hex[:8]}"
    a = f"{prefix}/accounts/{acct}"
    c = f"{a}/customers/{cus}"
    urls = {"successUrl": "https://app.example/ok", "cancelUrl": "https://app.example/no"}

    send(
        "POST",
        f"{prefix}/accounts",
        {"accountId": acct, "name": "N", "billingCustomerId": "cus_b"},
        expect=201,
    )
    send("POST", f"{prefix}/accounts", {"accountId": acct}, expect=200)
    send(
        "POST", f"{prefix}/accounts", {"accountId": acct, "billingCustomerId": "cus_c"}, expect=409
    )
    send("POST", f"{prefix}/accounts", {"name": "no id"}, expect=400)
    send("POST", f"{prefix}/accounts", b"{not json", expect=400)
    send("POST", f"{a}/customers", {"customerId": cus}, expect=201)
    send("POST", f"{prefix}/accounts/nope/customers", {"customerId": "x"}, expect=404)
    checkout = {"customerId": cus, "planId": "pro", "planVersion": 1, "seats": 2, **urls}
    send("POST", f"{a}/checkout", checkout, expect=201)
    send("POST", f"{a}/checkout", {"customerId": cus}, expect=400)
    send("POST", f"{a}/billing/setup-checkout", urls, expect=201)
    send("GET", f"{c}/subscription", expect=404)
    send("POST", f"{c}/subscribe", {"planId": "team", "planVersion": 1}, expect=201)
    send("POST", f"{c}/subscribe", {"planId": "team", "planVersion": 1}, expect=409)
    send("GET", f"{c}/subscription", expect=200)
    s = f"{c}/subscription"
    send("PUT", s, {"planId": "team", "planVersion": 2, "seats": 2}, expect=200)
    send("PUT", s, {"planId": "team"}, expect=400)
    send("POST", f"{s}/preview", {"seats": 4, "addOnModuleIds": ["sso"]}, expect=200)
    send("POST", f"{s}/preview", {"seats": "4"}, expect=400)
    send("PATCH", f"{s}/seats", {"seats": 3}, expect=200)
    send("PATCH", f"{s}/add-ons", {"add": ["sso"]}, expect=200)
    send("PATCH", f"{s}/add-ons", {"add": ["nope"]}, expect=400)
    send("PATCH", f"{s}/add-ons", {"remove": ["sso"]}, expect=200)
    send("PATCH", f"{s}/plan", {"planId": "pro", "planVersion": 1}, expect=200)
    send("POST", f"{s}/reactivate", expect=409)
    methods = send("GET", f"{a}/payment-methods", expect=200)["methods"]
    spare = next(m["ref"] for m in methods if not m["isDefault"])
    other = next(m["ref"] for m in methods if m["ref"] != spare)
    send("PATCH", f"{a}/payment-methods/{spare}", expect=200)
    send("PATCH", f"{a}/payment-methods/pm_nope", expect=404)
    send("PATCH", f"{c}/payment-method", {"methodId": spare}, expect=200)
    send("DELETE", f"{a}/payment-methods/{other}", expect=200)
    invoices = send("GET", f"{a}/invoices", expect=200)["invoices"]
    send("GET", f"{a}/invoices?customerId={cus}", expect=200)
    send("GET", f"{a}/invoices/{invoices[0]['ref']}/pdf", expect=200)
    send("GET", f"{a}/invoices/in_nope/pdf", expect=404)
    send("PATCH", c, {"status": "past_due"}, expect=200)
    send("PATCH", c, {"status": "bogus"}, expect=400)
    send("DELETE", f"{c}/subscription?atPeriodEnd=true", expect=200)
    send("DELETE", f"{c}/subscription", expect=200)
    send("POST", f"{s}/reactivate", expect=200)
    # Credits and flags (the demo tenant's cus_active has credits).
    send("GET", f"{prefix}/credit-types", expect=200)
    send("GET", f"{prefix}/credit-types/exports/packs", expect=200)
    send("GET", f"{prefix}/credit-types/gold/packs", expect=404)
    send("GET", f"{prefix}/customers/cus_active/credits", expect=200)
    send("GET", f"{prefix}/customers/cus_active/credits/exports", expect=200)
    consume = f"{prefix}/customers/cus_active/credits/exports/consume"
    send("POST", consume, {"amount": 1, "idempotencyKey": uuid.uuid4().hex}, expect=200)
    send("POST", consume, {"amount": 10**6, "idempotencyKey": uuid.uuid4().hex}, expect=409)
    send("POST", consume, {"amount": 1}, expect=400)
    credit = {"customerId": cus, "creditTypeId": "exports", "packId": "exports-10", **urls}
    send("POST", f"{a}/credit-checkout", credit, expect=201)
    send("POST", f"{a}/credit-checkout", {**credit, "quantity": "2"}, expect=400)
    send("GET", f"{prefix}/flags", expect=200)
    send("GET", f"{prefix}/customers/{cus}/flags", expect=200)
    send("PATCH", a, {"status": "suspended"}, expect=200)
    ents = f"{prefix}/customers/{{}}/entitlements"
    send("GET", ents.format("cus_active"), expect=200)
    send("GET", ents.format(quote("odd?id ä", safe="")), expect=200 if prefix == "/v1" else 404)
    send("GET", ents.format("x" * 600), expect=400)
    send("GET", ents.format(quote("../x", safe="")), expect=400)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # With Redis: metered usage (Prefer: respond-async) queues there.
    with Stack(tmp_path_factory.mktemp("openapi"), redis=True) as live:
        yield live


@pytest.fixture(scope="module")
def upstream_down(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(
        tmp_path_factory.mktemp("openapi-down"), upstream=False, SIDECAR_UPSTREAM_TIMEOUT="1"
    ) as live:
        yield live


def record_live_answers(stack: Stack, upstream_down: Stack) -> list[Exchange]:
    send = Recorder(stack.url)
    t = stack.tenant
    # The entitlement API.
    send("GET", "/v1/customers/cus_active/entitlements", expect=200)
    send("GET", "/v1/customers/cus_active/entitlements", expect=200)
    send("GET", "/v1/customers/nobody/entitlements", expect=200)
    send("GET", "/v1/customers/cus_active/can/reports", expect=200)
    send("GET", "/v1/customers/cus_trial/can/exports", expect=200)
    send("GET", f"/v1/customers/{'x' * 600}/can/reports", expect=400)
    checks = {"checks": [{"customerId": "cus_active", "module": "reports"}]}
    send("POST", "/v1/check", checks, expect=200)
    send("POST", "/v1/check", {"checks": "nope"}, expect=400)
    too_many = [{"customerId": "c", "module": "m"}] * 1001
    send("POST", "/v1/check", {"checks": too_many}, expect=400)
    send("POST", "/v1/check", b"[" * (2 << 20), expect=413)
    send("DELETE", "/v1/customers/cus_active/cache", expect=204)
    send("DELETE", "/v1/cache", expect=204)
    send("GET", "/v1/customers/cus_active/can/reports", headers={"Origin": "https://x"}, expect=403)
    send("GET", "/openapi.json", expect=200)
    # Flags (the seeded tenant: cus_active overrides new-dashboard) and OFREP.
    send("GET", "/v1/customers/cus_active/flags", expect=200)
    send("GET", "/v1/flags", expect=200)
    send("GET", "/v1/customers/cus_active/flags/new-dashboard", expect=200)
    send("GET", "/v1/customers/cus_active/flags/nope?default=true", expect=200)
    send("GET", "/v1/customers/cus_active/flags/nope", expect=404)
    send("GET", "/v1/customers/cus_active/flags/nope?default=maybe", expect=400)
    send("GET", f"/tenants/{t}/customers/cus_active/flags", expect=200)
    send("GET", f"/tenants/{t}/flags", expect=200)
    send("DELETE", "/v1/customers/cus_active/cache?axis=flags", expect=204)
    send("DELETE", "/v1/cache?axis=entitlements", expect=204)
    send("DELETE", "/v1/cache?axis=bogus", expect=400)
    ofrep = {"context": {"targetingKey": "cus_active"}}
    send("POST", "/ofrep/v1/evaluate/flags/new-dashboard", ofrep, expect=200)
    send("POST", "/ofrep/v1/evaluate/flags/module:reports", ofrep, expect=200)
    send("POST", "/ofrep/v1/evaluate/flags/nope", ofrep, expect=404)
    send("POST", "/ofrep/v1/evaluate/flags/new-dashboard", {"context": {}}, expect=400)
    send("POST", "/ofrep/v1/evaluate/flags/new-dashboard", b"[" * (2 << 20), expect=413)
    send("POST", "/ofrep/v1/evaluate/flags", ofrep, expect=200)
    etag = {"If-None-Match": send.exchanges[-1].headers["etag"]}
    send("POST", "/ofrep/v1/evaluate/flags", ofrep, headers=etag, expect=304)
    send("POST", "/ofrep/v1/evaluate/flags", b"nope", expect=400)
    send("POST", "/ofrep/v1/evaluate/flags", b"[" * (2 << 20), expect=413)
    send("GET", "/ofrep/v1/events", expect=400)  # a 200 is a stream: tests/test_ofrep.py
    send("HEAD", "/ofrep/v1/events?targetingKey=cus_active", expect=200)
    # The drop-in mirror's entitlement read.
    send("GET", f"/tenants/{t}/customers/cus_active/entitlements", expect=200)
    send("GET", f"/tenants/{t}/customers/nobody/entitlements", expect=404)
    send("GET", "/tenants/someone_else/customers/cus_active/entitlements", expect=404)
    # Billing on both surfaces.
    drive_every_operation(send, "/v1", t)
    drive_every_operation(send, f"/tenants/{t}", t)
    send("GET", "/tenants/someone_else/accounts/acme/invoices", expect=404)
    # Metered usage: queued, its outcome, the same key again, refusals.
    prefer = {"Prefer": "respond-async"}
    consume = "/v1/customers/cus_active/credits/exports/consume"
    key = "use_" + uuid.uuid4().hex
    send("POST", consume, {"amount": 1, "idempotencyKey": key}, headers=prefer, expect=202)
    send("POST", consume, {"amount": 1, "idempotencyKey": key}, headers=prefer)  # 202 or 200
    wait_until(
        lambda: send("GET", f"/v1/usage/{key}", expect=200)["state"] == "delivered",
        timeout=15, interval=0.05, what="the record delivered",
    )  # fmt: skip
    send("POST", consume, {"amount": 1, "idempotencyKey": key}, headers=prefer, expect=200)
    send("POST", consume, {"amount": 2, "idempotencyKey": key}, headers=prefer, expect=422)
    send("POST", consume, {"amount": 1}, headers=prefer, expect=400)
    send("GET", "/v1/usage/nobody-sent-this", expect=404)
    send("GET", "/v1/usage/a%2Fb", expect=400)
    # An upstream that cannot answer.
    down = Recorder(upstream_down.url)
    down("GET", "/v1/customers/cus_x/entitlements", expect=503)
    down("GET", "/v1/customers/cus_x/can/reports", expect=503)
    down("POST", "/v1/check", checks, expect=200)
    down("GET", "/v1/customers/cus_x/flags", expect=503)
    down("GET", "/v1/flags", expect=503)
    down("GET", "/v1/customers/cus_x/flags/new-dashboard", expect=503)
    down("GET", "/v1/customers/cus_x/flags/new-dashboard?default=false", expect=200)
    down("POST", "/ofrep/v1/evaluate/flags/new-dashboard", ofrep, expect=500)
    down("POST", "/ofrep/v1/evaluate/flags", ofrep, expect=500)
    down("GET", "/v1/accounts/acme/invoices")
    down("POST", "/v1/accounts", {"accountId": "a1"})
    # Memory only (no Redis): nothing can be queued.
    usage = {"amount": 1, "idempotencyKey": "k1"}
    down("POST", "/v1/customers/cus_x/credits/exports/consume", usage,
         headers={"Prefer": "respond-async"}, expect=409)  # fmt: skip
    down("GET", "/v1/usage/k1", expect=409)
    # HEAD on every path read with GET: the same status and headers, no body.
    for recorder in (send, down):
        for path in dict.fromkeys(e.path for e in list(recorder.exchanges) if e.method == "GET"):
            recorder("HEAD", path)
    return send.exchanges + down.exchanges


def match_operation(
    spec: dict[str, Any], method: str, raw_path: str
) -> tuple[str, dict[str, Any]] | None:
    path = raw_path.partition("?")[0]
    candidates = []
    for template, item in spec["paths"].items():
        pattern = "^" + re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path) and method.lower() in item:
            candidates.append((template.count("{"), template, item[method.lower()]))
    if not candidates:
        return None
    _, template, operation = min(candidates, key=lambda c: c[0])
    return template, operation


def check_exchange(spec: dict[str, Any], registry: Registry[Any], exchange: Exchange) -> list[str]:
    """Everything about one live answer that the document does not describe."""
    found = match_operation(spec, exchange.method, exchange.path)
    if found is None:
        return [f"{exchange}: no operation in openapi.json matches"]
    template, operation = found
    responses = operation.get("responses", {})
    status = str(exchange.status)
    key = next((k for k in (status, f"{status[0]}XX", "default") if k in responses), None)
    where = f"{exchange} ({exchange.method} {template})"
    if key is None:
        return [f"{where}: status {status} is not documented (documented: {sorted(responses)})"]
    response = resolve(spec, responses[key])
    problems = []
    for name, header in response.get("headers", {}).items():
        header = resolve(spec, header)
        value = exchange.headers.get(name.lower())
        if value is None:
            # The document marks none `required`, but each one it names (X-Sidecar-Cache
            # and Age on cached reads, Location on the redirect) is a promise: check it.
            problems.append(f"{where}: documented header {name} is missing")
            continue
        schema = header.get("schema", {})
        typed: Any = int(value) if schema.get("type") == "integer" and value.isdigit() else value
        for error in Draft202012Validator(schema).iter_errors(typed):
            problems.append(f"{where}: header {name}={value!r}: {error.message}")
    content = response.get("content")
    ctype = exchange.headers.get("content-type", "").split(";")[0].strip()
    if not exchange.body:
        return problems
    if not content:
        if 300 <= exchange.status < 400:
            # A redirect's body is the upstream's courtesy note: clients follow Location
            # (checked above), so an undescribed redirect body is not a contract breach.
            return problems
        return [*problems, f"{where}: a {ctype or 'untyped'} body, but no content is documented"]
    media = content.get(ctype)
    if media is None:
        return [*problems, f"{where}: content type {ctype!r} not documented ({sorted(content)})"]
    if "schema" not in media:
        return problems
    if "$ref" in responses[key]:  # a shared response in components (already escaped)
        base = responses[key]["$ref"].removeprefix("#/")
    else:
        base = "/".join(
            escape(p) for p in ("paths", template, exchange.method.lower(), "responses", key)
        )
    pointer = f"{base}/content/{escape(ctype)}/schema"
    validator = Draft202012Validator({"$ref": f"{SPEC_URI}#/{pointer}"}, registry=registry)
    body = json.loads(exchange.body)
    for error in validator.iter_errors(body):
        at = "/".join(str(p) for p in error.absolute_path) or "(root)"
        problems.append(f"{where}: body at {at}: {error.message[:200]}")
    return problems


def test_every_live_answer_matches_the_document(
    spec: dict[str, Any], stack: Stack, upstream_down: Stack
) -> None:
    registry: Registry[Any] = Registry().with_resource(
        SPEC_URI, Resource.from_contents(spec, default_specification=DRAFT202012)
    )
    exchanges = record_live_answers(stack, upstream_down)
    problems = [p for exchange in exchanges for p in check_exchange(spec, registry, exchange)]
    assert not problems, f"{len(problems)} answers differ from openapi.json:\n" + "\n".join(
        problems
    )
    documented = {(m, p) for m, p, _ in operations(spec)}
    exercised = {
        (e.method, found[0])
        for e in exchanges
        if (found := match_operation(spec, e.method, e.path)) is not None
    }
    # An operation the upstream added after the SDK (newer=True) comes with its own test,
    # which drives it on both surfaces and checks its answers against this document.
    newer = {(op.method, SURFACES[s] + op.path) for op in OPERATIONS if op.newer for s in SURFACES}
    missing = documented - newer - exercised
    assert not missing, f"not exercised live: {sorted(missing)}"


def test_served_document_is_the_file(stack: Stack, spec: dict[str, Any]) -> None:
    send = Recorder(stack.url)
    assert send("GET", "/openapi.json", expect=200) == spec
    assert send.exchanges[0].headers["content-type"].startswith("application/json")
