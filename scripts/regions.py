"""Generated regions of committed files, shared by the generators in ``scripts/``.

A region is the lines strictly between a BEGIN and an END marker line; a generator
rewrites only those, so the rest of the file stays hand-written. ``run`` writes the
files, or with ``--check`` (what CI runs) only reports the stale ones and fails.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

__all__ = ["ROOT", "find_region", "region", "replace_region", "ruff_format", "run"]

ROOT = Path(__file__).resolve().parent.parent


def _marker_line(lines: list[str], marker: str, start: int, path: str) -> int:
    found = [i for i, line in enumerate(lines) if i >= start and line.strip().startswith(marker)]
    if len(found) != 1:
        raise SystemExit(f"{path}: expected one line starting {marker!r}, found {len(found)}")
    return found[0]


def find_region(text: str, begin: str, end: str, path: str = "<text>") -> tuple[int, int]:
    """Line indexes of the first and one past the last line between the markers."""
    lines = text.splitlines(keepends=True)
    first = _marker_line(lines, begin, 0, path) + 1
    return first, _marker_line(lines, end, first, path)


def replace_region(text: str, begin: str, end: str, body: str, path: str = "<text>") -> str:
    """``text`` with the lines between the ``begin`` and ``end`` marker lines set to ``body``."""
    first, last = find_region(text, begin, end, path)
    lines = text.splitlines(keepends=True)
    if body and not body.endswith("\n"):
        body += "\n"
    return "".join(lines[:first]) + body + "".join(lines[last:])


def region(text: str, begin: str, end: str, path: str = "<text>") -> str:
    """The lines between the ``begin`` and ``end`` marker lines."""
    first, last = find_region(text, begin, end, path)
    return "".join(text.splitlines(keepends=True)[first:last])


def ruff_format(text: str, path: Path) -> str:
    """``text`` as ``ruff format`` writes it for ``path`` (the project's settings apply)."""
    done = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--stdin-filename", str(path), "-"],
        input=text,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"ruff format failed on the generated {path}:\n{done.stderr}")
    return done.stdout


def run(description: str, render: Mapping[Path, Callable[[str], str]]) -> int:
    """The command line: write each file as ``render`` makes it from the committed text."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 when a file is stale"
    )
    args = parser.parse_args()
    stale = []
    for path, make in render.items():
        current = path.read_text()
        wanted = make(current)
        if wanted == current:
            continue
        stale.append(path)
        if not args.check:
            path.write_text(wanted)
    name = Path(sys.argv[0]).name
    for path in stale:
        verb = "is stale" if args.check else "rewritten"
        print(f"{path.relative_to(ROOT)}: {verb}", file=sys.stderr if args.check else sys.stdout)
    if args.check and stale:
        print(f"run `uv run python scripts/{name}` and commit the result", file=sys.stderr)
        return 1
    return 0
