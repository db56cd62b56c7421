"""Write the operation table of ``docs/api.md`` from the sidecar's one table, ``OPERATIONS``.

Each row of ``sidecar/http/operations.py`` becomes one line: the operation, the
SDK methods that call it, its method and path on both surfaces, its success
answers, what ``/v1`` checks before calling the upstream, whether it is retried,
and what a write drops. The table sits between the ``GENERATED: operations``
markers; everything else in the page is hand-written.

    uv run python scripts/gen_api_docs.py          # rewrite the table
    uv run python scripts/gen_api_docs.py --check  # exit 1 when it is stale (CI)
"""

from __future__ import annotations

import sys
from typing import Final

from regions import ROOT, replace_region, run

from sidecar.cache.kinds import KINDS
from sidecar.http.operations import OPERATIONS, Answer, Field, Operation

DOC: Final = ROOT / "docs" / "api.md"
BEGIN: Final = "<!-- BEGIN GENERATED: operations"
END: Final = "<!-- END GENERATED: operations -->"

_KINDS: Final = {
    "id": "",
    "string": "",
    "integer": " (integer)",
    "boolean": " (boolean)",
    "strings": " (list of strings)",
    "objects": " (list of objects)",
}
_SHORT: Final = {
    "account": "a",
    "customer": "c",
    "method": "m",
    "invoice": "i",
    "credit_type": "ct",
}


def _path(op: Operation) -> str:
    """The path with short placeholders (``{a}``, ``{c}``), as the rest of the page writes them."""
    path = op.path
    for name, short in _SHORT.items():
        path = path.replace("{" + name + "}", "{" + short + "}")
    return path


def _answer(answer: Answer) -> str:
    if answer.media_type is not None:
        return f"{answer.status} `{answer.media_type}`"
    if 300 <= answer.status < 400:
        return f"{answer.status} + `Location` (older upstreams)"
    return str(answer.status)


def _field(f: Field) -> str:
    return f"`{f.name}`{'*' if f.required else ''}{_KINDS[f.kind]}"


def _checks(op: Operation) -> str:
    parts = [_field(f) for f in op.fields]
    parts += [f"`?{name}` (an id)" for name in op.query_ids]
    if op.body and not op.fields:
        parts.append("a JSON object")
    return ", ".join(parts) if parts else ""


def _retried(op: Operation) -> str:
    if not op.write:
        return "yes"
    if op.retry_safe:
        return "yes (safe to retry)"
    return "with an `Idempotency-Key`"


def _drops(op: Operation) -> str:
    if op.cache is not None:
        return f"(answered from the {KINDS[op.cache].axis} cache)"
    if not op.write:
        return "(read; never cached)"
    if op.drops == "customer":
        return "customer `{c}`" if "customer" in op.params else "the body's `customerId`"
    if op.drops == "account":
        return "the known customers of account `{a}` (the tenant's when none are known)"
    return "nothing"


def table() -> str:
    """The markdown table, one line per operation, in the table's order."""
    lines = [
        "",
        "| operation | SDK methods | method and path (`/v1` or `/tenants/{t}`, then) | "
        "success | `/v1` checks (`*` required) | retried | a write drops (entitlements) |",
        "|---|---|---|---|---|---|---|",
    ]
    for op in OPERATIONS:
        sdk = ", ".join(f"`{m}`" for m in op.sdk)
        if op.newer:
            sdk = f"(newer than 1.4.2; the clients' {sdk})"
        answers = ", ".join(_answer(a) for a in op.answers)
        if op.deferred:
            answers += "; 202 on `/v1` with `Prefer: respond-async` ([queued](#metered-usage))"
        query = "".join(f" (`?{q.name}=`)" for q in op.query)
        lines.append(
            f"| `{op.name}` | {sdk} | {op.method} `{_path(op)}`{query} | {answers} | "
            f"{_checks(op)} | {_retried(op)} | {_drops(op)} |"
        )
    return "\n".join([*lines, ""]) + "\n"


def render_doc(text: str) -> str:
    """``docs/api.md`` with the table between its markers."""
    return replace_region(text, BEGIN, END, table(), DOC.name)


if __name__ == "__main__":
    sys.exit(run(__doc__.splitlines()[0], {DOC: render_doc}))
