"""Write the clients' operation tables and billing methods from the sidecar's one table.

Each Vellum operation's method, ``/v1`` path, ids, body and cache effect are
facts of the sidecar's table (``sidecar/http/operations.py``); so are the SDK
method that calls it and its keywords (the row's fields, in the SDK's order,
with their defaults). From them this script writes, between ``GENERATED``
markers:

- the Python client's ``_OPERATIONS`` and the JS client's ``OPERATIONS``, the
  call tables every method builds its request from;
- a method per operation, named as the SDK names it: ``async def`` in the
  Python asyncio client (``scripts/unasync_client.py`` then writes the blocking
  copy, and this script runs it), a method of the JS ``SidecarClient``, and its
  declaration with an argument interface in the ``.d.ts``.

A method written by hand in a client (outside the markers) is left to it: the
cached reads (``get_entitlements``, ``flags``, ...), and those whose body is not
one keyword per field (``add_add_on``/``remove_add_on`` share one operation;
``create_credit_checkout`` sends ``items`` or one pack). Every other SDK method
of a row is generated; a new row gets its methods with no hand edit.

    uv run python scripts/gen_clients.py          # rewrite both clients
    uv run python scripts/gen_clients.py --check  # exit 1 when one is stale (CI)
"""

from __future__ import annotations

import json
import re
import sys
import textwrap
from collections.abc import Sequence
from typing import Final

import unasync_client
from regions import ROOT, region, replace_region, ruff_format, run

from sidecar.http.operations import OPERATIONS, SURFACES, Field, Operation, id_field

PYTHON: Final = ROOT / "client" / "python" / "vellum_sidecar_client.py"
JS: Final = ROOT / "client" / "js" / "vellum-sidecar-client.js"
DTS: Final = ROOT / "client" / "js" / "vellum-sidecar-client.d.ts"
BEGIN: Final = "# BEGIN GENERATED operation table"
END: Final = "# END GENERATED operation table"
JS_BEGIN: Final = "// BEGIN GENERATED operation table"
JS_END: Final = "// END GENERATED operation table"
METHODS: Final = ("# BEGIN GENERATED billing methods", "# END GENERATED billing methods")
JS_METHODS: Final = ("// BEGIN GENERATED billing methods", "// END GENERATED billing methods")
DTS_ARGS: Final = ("// BEGIN GENERATED argument types", "// END GENERATED argument types")
_JS_WIDTH: Final = 100
_PY_WIDTH: Final = 100

_PY_TYPES: Final = {
    "id": "str",
    "string": "str",
    "integer": "int",
    "boolean": "bool",
    "strings": "list[str]",
    "objects": "list[dict[str, Any]]",
}
_TS_TYPES: Final = {
    "id": "string",
    "string": "string",
    "integer": "number",
    "boolean": "boolean",
    "strings": "string[]",
    "objects": "JsonObject[]",
}


def _path(op: Operation) -> str:
    return SURFACES["v1"] + op.path


def _camel(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(word.capitalize() for word in rest)


# -- which methods, and what they read ---------------------------------------------------


def generated(op: Operation, hand_written: set[str]) -> list[str]:
    """The SDK methods of ``op`` to generate: those not written by hand."""
    missing = [m for m in op.sdk if m not in hand_written]
    if len(op.sdk) > 1 and missing:
        raise SystemExit(
            f"{op.name} is called by several SDK methods ({', '.join(op.sdk)}): each builds "
            f"its own body, so write {', '.join(missing)} by hand in both clients"
        )
    if missing and op.cached:
        raise SystemExit(f"{op.name} is answered from a cache: write {missing[0]} by hand")
    return missing


def _reader(op: Operation) -> tuple[str, str, str]:
    """(Python reader, Python return type, TypeScript return type) of ``op``'s answer."""
    answer = op.answer
    if answer.media_type is not None:
        return "_bytes", "bytes", "Uint8Array"
    if answer.list_field is not None:
        return f"_field_list({json.dumps(answer.list_field)})", "list[Any]", "JsonObject[]"
    if any(a.schema is None and a.media_type is None for a in op.also if a.status == 204):
        return "_maybe_object", "dict[str, Any] | None", "JsonObject | null"
    return "_object", "dict[str, Any]", "JsonObject"


def _keyed(op: Operation) -> bool:
    """Takes the caller's ``Idempotency-Key`` (a write that cannot be retried without one)."""
    return op.write and not op.retry_safe


def _ordered(op: Operation) -> tuple[list[Field], list[Field]]:
    """The body fields: required ones, then optional ones, each in the row's order."""
    required = [f for f in op.fields if f.required]
    return required, [f for f in op.fields if not f.required]


def _check_names(op: Operation) -> None:
    names = [id_field(p) for p in op.params] + [f.name for f in (*op.fields, *op.query)]
    if _keyed(op):
        names.append("idempotencyKey")
    if len(names) != len(set(names)):
        raise SystemExit(f"{op.name}: two of its arguments share a name ({names})")


# -- Python ------------------------------------------------------------------------------


def python_table() -> str:
    """``_OPERATIONS``: name -> ``_Route(method, path, params, body=, cached=)``."""
    lines = ["_OPERATIONS: Final[Mapping[str, _Route]] = {"]
    for op in OPERATIONS:
        params = ", ".join(json.dumps(p) for p in op.params) + ("," if len(op.params) == 1 else "")
        args = [json.dumps(op.method), json.dumps(_path(op)), f"({params})"]
        args += ["body=True"] * op.body + ["cached=True"] * op.cached
        args += ["deferred=True"] * op.deferred
        lines.append(f"    {json.dumps(op.name)}: _Route({', '.join(args)}),")
    return "\n".join([*lines, "}"]) + "\n"


#: What a deferred operation's method says of ``wait`` (``Operation.deferred``).
_PY_DEFERRED: Final = (
    " ``wait=False``: queued by the sidecar instead (``Prefer: respond-async``) and "
    "delivered by it later, even through an outage: the 202 ``{queued, idempotencyKey}``, "
    "or the outcome once the key's record is final; ``usage(key)`` reads it."
)
_JS_DEFERRED: Final = (
    " `wait: false`: queued by the sidecar instead (`Prefer: respond-async`) and "
    "delivered by it later, even through an outage: the 202 `{queued, idempotencyKey}`, "
    "or the outcome once the key's record is final; `usage(key)` reads it."
)


def _py_default(f: Field) -> str:
    if f.default is None:
        return f"{_PY_TYPES[f.kind]} | None = None"
    return f"{_PY_TYPES[f.kind]} = {f.default!r}"


def _py_value(f: Field, *, query: bool = False) -> str:
    if f.kind == "boolean" and f.default is False:
        return f'"true" if {f.arg} else None' if query else f"{f.arg} or None"
    return f.arg


def python_method(op: Operation, method: str) -> str:
    _check_names(op)
    required, optional = _ordered(op)
    args = [f"{p}_id: str" for p in op.params]
    args += [f"{f.arg}: {_PY_TYPES[f.kind]}" for f in required]
    args += [f"{f.arg}: {_py_default(f)}" for f in (*optional, *op.query)]
    if _keyed(op):
        args.append("idempotency_key: str | None = None")
    if op.deferred:
        args.append("wait: bool = True")
    args = ["self", "*", *args] if args else ["self"]
    reader, returns, _ = _reader(op)
    summary = op.summary + "." + (_PY_DEFERRED if op.deferred else "")
    doc = textwrap.wrap(f'"""{summary}"""', _PY_WIDTH - 8, break_on_hyphens=False)
    lines = [f"async def {method}({', '.join(args)}) -> {returns}:"]
    lines += [f"    {line}" for line in doc]
    lines += [f'    _seg("{f.arg}", {f.arg})' for f in required if f.kind == "id"]
    call = [json.dumps(op.name), reader, *(f"{p}_id" for p in op.params)]
    if op.body:
        entries = ", ".join(f"{json.dumps(f.name)}: {_py_value(f)}" for f in op.fields)
        lines.append(f"    body = _drop_none({{{entries}}})")
        call.append("body=body")
    if op.query:
        entries = ", ".join(f"{json.dumps(f.name)}: {_py_value(f, query=True)}" for f in op.query)
        lines.append(f"    query = _query({{{entries}}})")
        call.append("query=query")
    if _keyed(op):
        call.append("key=idempotency_key")
    if op.deferred:
        call.append("wait=wait")
    lines += [f"    call = _op({', '.join(call)})", "    return await self._run(call)"]
    return "\n".join("    " + line for line in lines)


def _py_hand_written(api: str) -> set[str]:
    first, last = (api.index(marker) for marker in METHODS)
    outside = api[:first] + api[last:]
    return set(re.findall(r"^    async def (\w+)\(", outside, re.MULTILINE))


def python_methods(api: str) -> str:
    hand = _py_hand_written(api)
    methods = [python_method(op, m) for op in OPERATIONS for m in generated(op, hand)]
    return "\n\n".join(methods) + "\n"


def render_python(text: str) -> str:
    text = replace_region(text, BEGIN, END, python_table(), PYTHON.name)
    api = region(text, *unasync_client.SOURCE, path=PYTHON.name)
    new_api = replace_region(api, *METHODS, python_methods(api), PYTHON.name)
    text = replace_region(text, *unasync_client.SOURCE, new_api, PYTHON.name)
    return unasync_client.render(ruff_format(text, PYTHON))


# -- JavaScript and its declarations ------------------------------------------------------


def js_table() -> str:
    """``OPERATIONS``: name -> ``{method, path, body?, cached?}`` (ids are the path's ``{}``)."""
    lines = ["const OPERATIONS = Object.freeze({"]
    for op in OPERATIONS:
        fields = [f"method: {json.dumps(op.method)}", f"path: {json.dumps(_path(op))}"]
        fields += ["body: true"] * op.body + ["cached: true"] * op.cached
        fields += ["deferred: true"] * op.deferred
        lines.append(_wrapped(f"  {op.name}: {{ ", ", ".join(fields), " },", "  "))
    return "\n".join([*lines, "});"]) + "\n"


def _wrapped(head: str, items: str, tail: str, indent: str) -> str:
    """``head items tail`` on one line, or the items on lines of their own when too long
    (as many a line as fit in ``_JS_WIDTH``)."""
    line = head + items + tail
    if len(line) <= _JS_WIDTH:
        return line
    lines, current = [], ""
    for item in items.split(", "):
        candidate = f"{current} {item}," if current else f"{indent}  {item},"
        if current and len(candidate) > _JS_WIDTH:
            lines.append(current)
            candidate = f"{indent}  {item},"
        current = candidate
    return "\n".join([head.rstrip(), *lines, current, indent + tail.strip()])


def _js_value(f: Field, *, query: bool = False) -> str:
    if f.kind == "boolean" and f.default is False:
        truthy = '"true"' if query else "true"
        return f"{f.name}: {f.name} ? {truthy} : undefined"
    return f.name


def js_method(op: Operation, method: str) -> str:
    required, optional = _ordered(op)
    names = [id_field(p) for p in op.params] + [f.name for f in required]
    names += [
        f.name if f.default is None else f"{f.name} = {json.dumps(f.default)}"
        for f in (*optional, *op.query)
    ]
    if _keyed(op):
        names.append("idempotencyKey")
    if op.deferred:
        names.append("wait = true")
    reader, _, _ = _reader(op)
    reader = (
        re.sub(r"^_", "", reader)
        .replace("field_list", "fieldList")
        .replace("maybe_object", "maybeObject")
    )
    signature = f"  async {_camel(method)}("
    lines = [
        *_js_doc(op.summary + ("." + _JS_DEFERRED if op.deferred else ""), "  "),
        _wrapped(signature + "{ ", ", ".join(names), " }) {", "  ") if names else signature + ") {",
    ]
    lines += [f'    seg("{f.name}", {f.name});' for f in required if f.kind == "id"]
    ids = ", ".join(f"{p}: {id_field(p)}" for p in op.params)
    options = []
    if op.body:
        entries = ", ".join(_js_value(f) for f in op.fields)
        lines.append(_wrapped("    const body = dropUndefined({ ", entries, " });", "    "))
        options.append("body")
    if op.query:
        entries = ", ".join(_js_value(f, query=True) for f in op.query)
        lines.append(_wrapped("    const query = queryOf({ ", entries, " });", "    "))
        options.append("query")
    if _keyed(op):
        options.append("idempotencyKey")
    if op.deferred:
        options.append("wait")
    if ids:
        lines.append(f"    const ids = {{ {ids} }};")
    extra = f", {{ {', '.join(options)} }}" if options else ""
    lines.append(f"    const call = op({json.dumps(op.name)}, {'ids' if ids else '{}'}{extra});")
    lines += [f"    return this.#run(call, {reader});", "  }"]
    return "\n".join(lines)


def _js_doc(summary: str, indent: str) -> list[str]:
    """``/** summary. */``, on several lines when it does not fit on one."""
    text = summary if summary.endswith(".") else summary + "."
    line = f"{indent}/** {text} */"
    if len(line) <= _JS_WIDTH:
        return [line]
    width = _JS_WIDTH - len(indent) - 3
    wrapped = textwrap.wrap(text, width, break_on_hyphens=False)
    return [f"{indent}/**", *(f"{indent} * {part}" for part in wrapped), f"{indent} */"]


def _js_hand_written(text: str) -> set[str]:
    first, last = (text.index(marker) for marker in JS_METHODS)
    outside = text[:first] + text[last:]
    return set(re.findall(r"^  async (\w+)\(", outside, re.MULTILINE))


def _js_generated(text: str) -> list[tuple[Operation, str]]:
    hand = {snake for snake in _snake_all(_js_hand_written(text))}
    return [(op, m) for op in OPERATIONS for m in generated(op, hand)]


def _snake_all(names: set[str]) -> set[str]:
    return {re.sub(r"(?<!^)(?=[A-Z])", "_", n).lower() for n in names}


def render_js(text: str) -> str:
    text = replace_region(text, JS_BEGIN, JS_END, js_table(), JS.name)
    methods = "\n\n".join(js_method(op, m) for op, m in _js_generated(text)) + "\n"
    return replace_region(text, *JS_METHODS, methods, JS.name)


def _pascal(name: str) -> str:
    return "".join(word.capitalize() for word in name.split("_"))


def dts_args(pairs: Sequence[tuple[Operation, str]]) -> str:
    """An argument interface per generated method that takes any argument."""
    blocks = []
    for op, method in pairs:
        required, optional = _ordered(op)
        members = [f"  {id_field(p)}: string;" for p in op.params]
        members += [f"  {f.name}: {_TS_TYPES[f.kind]};" for f in required]
        members += [
            f"  {f.name}?: {_TS_TYPES[f.kind]}{' | null' if f.default is None else ''};"
            for f in (*optional, *op.query)
        ]
        if op.deferred:
            members.append("  wait?: boolean;")
        if not members:
            continue
        parent = " extends WriteOptions" if _keyed(op) else ""
        blocks.append(
            f"export interface {_pascal(method)}Args{parent} {{\n" + "\n".join(members) + "\n}"
        )
    return "\n\n".join(blocks) + "\n"


def dts_methods(pairs: Sequence[tuple[Operation, str]]) -> str:
    lines = []
    for op, method in pairs:
        _, _, returns = _reader(op)
        takes = bool(op.params or op.fields or op.query or _keyed(op))
        args = f"args: {_pascal(method)}Args" if takes else ""
        doc = _js_doc(op.summary + ("." + _JS_DEFERRED if op.deferred else ""), "  ")
        lines += [*doc, f"  {_camel(method)}({args}): Promise<{returns}>;"]
    return "\n".join(lines) + "\n"


def render_dts(text: str) -> str:
    pairs = _js_generated(JS.read_text())
    text = replace_region(text, *DTS_ARGS, dts_args(pairs), DTS.name)
    return replace_region(text, *JS_METHODS, dts_methods(pairs), DTS.name)


if __name__ == "__main__":
    sys.exit(run(__doc__.splitlines()[0], {PYTHON: render_python, JS: render_js, DTS: render_dts}))
