"""Write sidecar/openapi.json from the operation table and a small hand-written base.

    uv run python scripts/gen_openapi.py          # rewrite sidecar/openapi.json
    uv run python scripts/gen_openapi.py --check  # exit 1 when the committed file is stale

The ``paths`` of every operation in ``sidecar/http/operations.py`` (both surfaces)
come from the table; ``scripts/openapi_base.json`` holds what the table does not
describe: ``info`` (but its ``version``: pyproject.toml's), ``tags``,
``components`` (answer schemas with examples, shared responses and headers, and
refinements: request schemas and parameters with descriptions, bounds and
examples) and the routes outside the table (``can``, ``check``, a flag, the cache
drops, OFREP, this document). A request schema, a path or a query parameter the
base does not describe is derived from the row (its fields' kinds, required ones,
defaults); one it does describe must agree with the row. Every GET path also gets
its HEAD operation: the same statuses and headers, no body (the router answers
HEAD on every GET route).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tomllib
from pathlib import Path
from typing import Any

from sidecar.cache.kinds import KINDS
from sidecar.http.inputs import MAX_ID_LENGTH
from sidecar.http.operations import OPERATIONS, SURFACES, Answer, Field, Operation, Surface

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "scripts" / "openapi_base.json"
TARGET = ROOT / "sidecar" / "openapi.json"

Json = dict[str, Any]

_ERROR_CONTENT: Json = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}


def ref(kind: str, name: str) -> Json:
    return {"$ref": f"#/components/{kind}/{name}"}


def build(base: Json) -> Json:
    """The whole document: the base with the table's operations and the HEADs added."""
    doc = copy.deepcopy(base)
    # The one version source: pyproject.toml's [project] version.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    doc["info"] = {"title": doc["info"]["title"], "version": project["version"], **doc["info"]}
    paths: Json = doc["paths"]
    for op in OPERATIONS:
        for surface in SURFACES:
            item = paths.setdefault(SURFACES[surface] + op.path, {})
            method = op.method.lower()
            if method in item:
                raise SystemExit(f"{op.method} {SURFACES[surface]}{op.path} is described twice")
            item[method] = operation(doc, op, surface)
    for item in paths.values():
        if "get" in item and "head" not in item:
            item["head"] = head(doc, item["get"])
    return doc


def operation(doc: Json, op: Operation, surface: Surface) -> Json:
    mirror = surface == "mirror"
    params = [ref("parameters", "tenant")] if mirror else []
    params += [path_parameter(doc, name) for name in op.params]
    params += [query_parameter(doc, f) for f in op.query]
    if op.write:
        params.append(ref("parameters", "IdempotencyKey"))
    deferred = op.deferred and not mirror
    if deferred:
        params.append(ref("parameters", "Prefer"))
    out: Json = {
        "operationId": operation_id(op, surface),
        "summary": op.summary,
        "description": description(op, surface),
        "tags": ["mirror" if mirror else tag(op)],
        "parameters": params,
    }
    if op.request is not None:
        request_schema(doc, op)
        out["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": ref("schemas", op.request)}},
        }
    if op.cached:
        out["responses"] = cached_responses(doc, op, surface)
    else:
        out["responses"] = forwarded_responses(doc, op, surface)
    if deferred:
        out["tags"].append("usage")
        out["responses"] = deferred_responses(out["responses"])
    return out


def deferred_responses(responses: Json) -> Json:
    """A deferred operation's ``/v1`` answers (``Operation.deferred``): the forwarded
    ones, plus what ``Prefer: respond-async`` answers (``sidecar/http/usage.py``)."""
    out = dict(responses)
    forwarded = out["200"]["content"]["application/json"]["schema"]
    out["200"] = {
        "description": out["200"]["description"] + "; with Prefer: respond-async, once the "
        "key's record is final: that record (the same record, never a second consumption)",
        "content": {
            "application/json": {
                "schema": {"type": "object", "anyOf": [forwarded, ref("schemas", "UsageRecord")]}
            }
        },
    }
    out["202"] = {
        "description": "with Prefer: respond-async: queued, durable in Redis (or the key's "
        "record, still queued); GET Location for its outcome",
        "headers": {
            "Preference-Applied": {
                "description": "respond-async",
                "schema": {"const": "respond-async"},
            },
            "Location": {
                "description": "/v1/usage/{idempotencyKey}: the record's outcome",
                "schema": {"type": "string"},
            },
        },
        "content": {"application/json": {"schema": ref("schemas", "UsageQueued")}},
    }
    out["409"] = {
        "description": "the upstream's 409 (not enough credits: nothing deducted), passed "
        "through; with Prefer: respond-async and no Redis: async_requires_redis",
        "content": _ERROR_CONTENT,
    }
    out["422"] = {
        "description": "idempotency_key_reused: with Prefer: respond-async, the key names a "
        "record of another customer, credit type or amount; or the upstream's own 422",
        "content": _ERROR_CONTENT,
    }
    out["503"] = ref("responses", "UsageUnavailable")
    return dict(sorted(out.items()))


def request_schema(doc: Json, op: Operation) -> None:
    """``components/schemas/<op.request>``: the base's, which must agree with the row, or
    derived from the row's fields when the base has none."""
    assert op.request is not None
    schemas = doc["components"]["schemas"]
    if op.request in schemas:
        check_fields(doc, op)
        return
    derived: Json = {
        "type": "object",
        "properties": {f.name: field_schema(f) for f in op.fields},
        "additionalProperties": True,
    }
    if op.required:
        derived["required"] = list(op.required)
    if len(op.required) < len(op.fields):
        derived["description"] = "An optional field is omitted, never null."
    schemas[op.request] = derived


def field_schema(f: Field) -> Json:
    """A field's JSON schema from its kind (what ``/v1`` checks) and its SDK default."""
    kinds: dict[str, Json] = {
        "id": {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH},
        "string": {"type": "string", "minLength": 1},
        "integer": {"type": "integer"},
        "boolean": {"type": "boolean"},
        "strings": {"type": "array", "items": {"type": "string", "minLength": 1}},
        "objects": {"type": "array", "items": {"type": "object"}},
    }
    out = kinds[f.kind]
    if f.default is not None:
        out["default"] = f.default
    return out


def check_fields(doc: Json, op: Operation) -> None:
    """The row's checked fields agree with its request schema (names, required, types)."""
    request = doc["components"]["schemas"][op.request]
    properties = request.get("properties", {})
    where = f"{op.name}: {BASE.name} components/schemas/{op.request}"
    if set(op.required) != set(request.get("required", [])):
        raise SystemExit(f"{where}: required {request.get('required')} but the row {op.required}")
    for f in op.fields:
        prop = properties.get(f.name)
        if prop is None:
            raise SystemExit(f"{where}: no property {f.name}")
        types = prop.get("type")
        types = set(types) if isinstance(types, list) else {types}
        if field_schema(f)["type"] not in types:
            raise SystemExit(f"{where}: {f.name} is {prop.get('type')}, the row says {f.kind}")


def tag(op: Operation) -> str:
    """A cached read's tag is its kind's axis (entitlements, flags); the rest is billing."""
    return KINDS[op.cache].axis if op.cache is not None else "billing"


def operation_id(op: Operation, surface: Surface) -> str:
    """``get_entitlements``: ``getEntitlements`` on /v1, ``mirrorGetEntitlements`` on the mirror."""
    first, *rest = op.name.split("_")
    camel = first + "".join(word.capitalize() for word in rest)
    return camel if surface == "v1" else "mirror" + camel[0].upper() + camel[1:]


def description(op: Operation, surface: Surface) -> str:
    sdk = ", ".join(f"`{m}`" for m in op.sdk)
    if op.newer:
        sdk = f"newer than vellumcharter 1.4.2; the clients' {sdk}"
    parts = [f"Upstream operation `{op.name}`: {op.method} /tenants/{{t}}{op.path} ({sdk})."]
    if surface == "mirror":
        parts.append("The drop-in mirror: the caller's x-api-key is ignored, never forwarded.")
    if op.cached:
        parts.append(
            "Answered from the cache: memory, then Redis, then one upstream call shared by "
            "every concurrent caller; while the upstream cannot answer, an entry past its "
            "fresh window is served marked stale."
        )
    else:
        parts.append(
            "The upstream's status, body bytes and Content-Type (and Location, "
            "Content-Disposition, Idempotent-Replayed) are returned as they are."
        )
    if op.deferred and surface == "v1":
        parts.append(
            "With Prefer: respond-async it is queued instead: 202 once the record is durable "
            "in Redis, delivered by any sidecar of the fleet (retried while the upstream is "
            "down, in order per customer and credit type, applied once: the upstream "
            "deduplicates on idempotencyKey); GET /v1/usage/{idempotencyKey} tells its "
            "outcome. The mirror ignores the preference."
        )
    if op.retry_safe:
        parts.append(
            "Safe to retry without an Idempotency-Key (it changes nothing, or the upstream "
            "deduplicates it by its body), so the sidecar retries it like a read."
        )
    if op.drops == "customer":
        parts.append(
            "On success (or an unknown outcome) drops the customer's cached entitlements "
            "on every sidecar."
        )
    elif op.drops == "account":
        parts.append(
            "On success (or an unknown outcome) drops the account's known customers' cached "
            "entitlements on every sidecar (the tenant's when none are known)."
        )
    return " ".join(parts)


def success(doc: Json, answer: Answer, *, cached: bool, where: str) -> tuple[str, Json]:
    out: Json = {"description": answer.description}
    if answer.schema is not None:
        schema(doc, answer.schema, where)
        out["content"] = {"application/json": {"schema": ref("schemas", answer.schema)}}
    elif answer.media_type is not None:
        out["content"] = {answer.media_type: {}}  # any bytes, passed on as they are
    if cached:
        out["headers"] = {name: ref("headers", name) for name in ("X-Sidecar-Cache", "Age")}
    if 300 <= answer.status < 400:
        location = {"description": "where the upstream redirects", "schema": {"type": "string"}}
        out["headers"] = {"Location": location}
    return str(answer.status), out


def cached_responses(doc: Json, op: Operation, surface: Surface) -> Json:
    answer = op.local_answer if surface == "v1" and op.local_answer is not None else op.answer
    status, body = success(doc, answer, cached=True, where=op.name)
    out: Json = {status: body, "400": ref("responses", "InvalidId")}
    out["403"] = ref("responses", "BrowserGuard")
    if surface == "mirror":
        out["404"] = {
            "description": "unknown (as the upstream answers it), or another tenant",
            "content": _ERROR_CONTENT,
        }
    elif op.cache is not None and KINDS[op.cache].missing_status == 404:
        out["404"] = {
            "description": "not_found: the upstream has no such document (its 404)",
            "content": _ERROR_CONTENT,
            "headers": body["headers"],
        }
    out["502"] = ref("responses", "UpstreamAuthFailed")
    out["503"] = ref("responses", "NothingCached")
    return out


def forwarded_responses(doc: Json, op: Operation, surface: Surface) -> Json:
    successes = dict(success(doc, a, cached=False, where=op.name) for a in op.answers)
    not_found = (
        "another tenant (unknown_tenant, no upstream call), or the upstream's 404 passed through"
        if surface == "mirror"
        else "the upstream's 404 (unknown account, customer, ...), passed through"
    )
    out: Json = {
        **dict(sorted(successes.items())),
        "400": ref("responses", "InvalidInput"),
        "403": ref("responses", "BrowserGuard"),
        "404": {"description": not_found, "content": _ERROR_CONTENT},
        "4XX": ref("responses", "UpstreamRefusal"),
    }
    if op.body:
        out["413"] = ref("responses", "PayloadTooLarge")
    out["502"] = ref("responses", "BadGateway")
    out["504"] = ref("responses", "GatewayTimeout")
    return out


def head(doc: Json, get: Json) -> Json:
    """The HEAD twin of a GET: its statuses and headers, never a body."""
    out: Json = {
        "operationId": "head" + get["operationId"][0].upper() + get["operationId"][1:],
        "summary": get["summary"],
        "description": "As GET, without the body.",
    }
    for key in ("tags", "parameters"):
        if key in get:
            out[key] = get[key]
    responses: Json = {}
    for status, response in get["responses"].items():
        resolved = resolve(doc, response)
        bodiless: Json = {"description": resolved["description"]}
        if "headers" in resolved:
            bodiless["headers"] = resolved["headers"]
        responses[status] = bodiless
    out["responses"] = responses
    return out


def path_parameter(doc: Json, name: str) -> Json:
    """The ``components/parameters`` entry of the path id ``name`` (derived when the base
    has none: any one segment, 1 to ``MAX_ID_LENGTH`` characters)."""
    parameters = doc["components"]["parameters"]
    if name not in parameters:
        parameters[name] = {
            "name": name,
            "in": "path",
            "required": True,
            "description": f"{name.replace('_', ' ')} id, URL-encoded; re-quoted as one "
            "upstream path segment",
            "schema": field_schema(Field(name, "id")),
        }
    return ref("parameters", name)


def query_parameter(doc: Json, f: Field) -> Json:
    """The ``components/parameters`` entry of the query parameter ``f`` (derived from its
    kind when the base has none)."""
    parameters = doc["components"]["parameters"]
    for key, param in parameters.items():
        if param.get("in") == "query" and param.get("name") == f.name:
            return ref("parameters", key)
    key = f.name if f.name not in parameters else f"{f.name}Query"
    parameters[key] = {"name": f.name, "in": "query", "required": False,
                       "schema": field_schema(f)}  # fmt: skip
    return ref("parameters", key)


def schema(doc: Json, name: str, where: str) -> None:
    if name not in doc["components"]["schemas"]:
        raise SystemExit(f"{where}: no components/schemas/{name} in {BASE.name}")


def resolve(doc: Json, node: Json) -> Json:
    while "$ref" in node:
        target: Any = doc
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def render(doc: Json) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the file differs from what would be written"
    )
    parser.add_argument("--output", type=Path, default=TARGET, help="default: sidecar/openapi.json")
    args = parser.parse_args(argv)
    text = render(build(json.loads(BASE.read_text(encoding="utf-8"))))
    target: Path = args.output
    if args.check:
        current = target.read_text(encoding="utf-8") if target.exists() else ""
        if current != text:
            print(
                f"{target} is stale: it is generated from sidecar/http/operations.py and "
                f"{BASE.relative_to(ROOT)}; run `uv run python scripts/gen_openapi.py` "
                "and commit the result",
                file=sys.stderr,
            )
            return 1
        print(f"{target.name} is up to date")
        return 0
    target.write_text(text, encoding="utf-8")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
