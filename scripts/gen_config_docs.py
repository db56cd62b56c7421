"""Write the README's configuration table from the declarations in ``sidecar/config.py``.

    uv run python scripts/gen_config_docs.py            # rewrite the table in README.md
    uv run python scripts/gen_config_docs.py --check    # exit 1 when README.md is stale (CI)

The table sits between ``<!-- BEGIN GENERATED: config ... -->`` and
``<!-- END GENERATED: config -->``; everything outside the markers is left alone.
To change a row, change the variable's declaration on ``sidecar.config.Settings``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sidecar.config import SETTINGS
from sidecar.declare import Setting, Variable

ROOT = Path(__file__).resolve().parent.parent
BEGIN = "<!-- BEGIN GENERATED: config (scripts/gen_config_docs.py from sidecar/config.py) -->"
BEGIN_PREFIX = "<!-- BEGIN GENERATED: config"
END = "<!-- END GENERATED: config -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default(setting: Setting) -> str:
    if setting.required:
        return "required"
    if setting.default is None:
        return "unset"
    if setting.default == "":
        return "empty"
    return f"`{setting.default}`"


def _row(setting: Setting) -> str:
    variables: tuple[Variable, ...] = setting.variables()
    names = " / ".join(f"`{v.name}`" for v in variables)
    flags = " / ".join(f"`{v.flag}`" for v in variables)
    return f"| {names} | {flags} | {_default(setting)} | {_cell(setting.doc)} |"


def table() -> str:
    """The generated block, markers included."""
    lines = [
        BEGIN,
        "| variable | flag | default | meaning |",
        "|---|---|---|---|",
        *(_row(s) for s in SETTINGS),
        END,
    ]
    return "\n".join(lines)


def render(readme: str) -> str:
    """``readme`` with the block between the markers replaced by ``table()``."""
    lines = readme.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.startswith(BEGIN_PREFIX)]
    ends = [i for i, line in enumerate(lines) if line.rstrip("\n") == END]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise ValueError(f"expected one {BEGIN_PREFIX} ... --> line followed by one {END} line")
    return "".join(lines[: starts[0]]) + table() + "\n" + "".join(lines[ends[0] + 1 :])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md", help="the file")
    args = parser.parse_args(argv)
    current = args.readme.read_text(encoding="utf-8")
    try:
        wanted = render(current)
    except ValueError as exc:
        print(f"{args.readme}: {exc}", file=sys.stderr)
        return 1
    if args.check:
        if wanted != current:
            print(
                f"{args.readme}: the configuration table is stale; "
                "run `uv run python scripts/gen_config_docs.py`",
                file=sys.stderr,
            )
            return 1
        return 0
    if wanted != current:
        args.readme.write_text(wanted, encoding="utf-8")
        print(f"{args.readme}: configuration table rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
