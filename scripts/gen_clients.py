"""Write the clients' operation tables from the sidecar's one table, ``OPERATIONS``.

Each Vellum operation's method, ``/v1`` path, ids, body and cache effect are
facts of the sidecar's table; the Python client (``_OPERATIONS``) and the JS
client (``OPERATIONS``) get a copy between their ``GENERATED operation table``
markers, and their hand-written methods build every call from it. The sidecar's
own routes (``can``, ``check``, the cache drops) are not Vellum operations and
stay written in the clients.

    uv run python scripts/gen_clients.py          # rewrite both tables
    uv run python scripts/gen_clients.py --check  # exit 1 when one is stale (CI)
"""

from __future__ import annotations

import json
import sys
from typing import Final

from regions import ROOT, replace_region, ruff_format, run

from sidecar.http.operations import OPERATIONS, SURFACES, Operation

PYTHON: Final = ROOT / "client" / "python" / "vellum_sidecar_client.py"
JS: Final = ROOT / "client" / "js" / "vellum-sidecar-client.js"
BEGIN: Final = "# BEGIN GENERATED operation table"
END: Final = "# END GENERATED operation table"
JS_BEGIN: Final = "// BEGIN GENERATED operation table"
JS_END: Final = "// END GENERATED operation table"
_JS_WIDTH: Final = 100


def _path(op: Operation) -> str:
    return SURFACES["v1"] + op.path


def python_table() -> str:
    """``_OPERATIONS``: name -> ``_Route(method, path, params, body=, cached=)``."""
    lines = ["_OPERATIONS: Final[Mapping[str, _Route]] = {"]
    for op in OPERATIONS:
        params = ", ".join(json.dumps(p) for p in op.params) + ("," if len(op.params) == 1 else "")
        args = [json.dumps(op.method), json.dumps(_path(op)), f"({params})"]
        args += ["body=True"] * op.body + ["cached=True"] * op.cached
        lines.append(f"    {json.dumps(op.name)}: _Route({', '.join(args)}),")
    return "\n".join([*lines, "}"]) + "\n"


def js_table() -> str:
    """``OPERATIONS``: name -> ``{method, path, body?, cached?}`` (ids are the path's ``{}``)."""
    lines = ["const OPERATIONS = Object.freeze({"]
    for op in OPERATIONS:
        fields = [f"method: {json.dumps(op.method)}", f"path: {json.dumps(_path(op))}"]
        fields += ["body: true"] * op.body + ["cached: true"] * op.cached
        line = f"  {op.name}: {{ {', '.join(fields)} }},"
        if len(line) > _JS_WIDTH:
            line = f"  {op.name}: {{\n    {', '.join(fields)},\n  }},"
        lines.append(line)
    return "\n".join([*lines, "});"]) + "\n"


def render_python(text: str) -> str:
    return ruff_format(replace_region(text, BEGIN, END, python_table(), PYTHON.name), PYTHON)


def render_js(text: str) -> str:
    return replace_region(text, JS_BEGIN, JS_END, js_table(), JS.name)


if __name__ == "__main__":
    sys.exit(run(__doc__.splitlines()[0], {PYTHON: render_python, JS: render_js}))
