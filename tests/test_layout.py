"""The package's shape: every module of sidecar/ imports, and none of them imports in a circle.

The import graph is read from the source with ``ast``, so it holds every import
the code can make: top-level ones, those under ``if TYPE_CHECKING:`` and those
inside functions (a lazy import hides a circle from Python, not from a reader).
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import sidecar

ROOT = Path(sidecar.__file__).parent


def modules_of(root: Path, package: str) -> dict[str, Path]:
    """Every module of the package under ``root``: dotted name -> source file."""
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, modules: Mapping[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()

    def known(dotted: str) -> str | None:
        """The longest prefix of ``dotted`` that is one of the package's modules."""
        parts = dotted.split(".")
        while parts and ".".join(parts) not in modules:
            parts.pop()
        return ".".join(parts) or None

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                base = ".".join(anchor[: len(anchor) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            # ``from pkg import mod`` imports the module pkg.mod; ``from mod import f``, mod.
            candidates = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for candidate in candidates:
            target = known(candidate)
            if target is not None and target != name:
                targets.add(target)
    return targets


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    modules = modules_of(root, package)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), as sorted lists."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group: list[str] = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def describe(group: list[str], graph: Mapping[str, set[str]]) -> Iterator[str]:
    members = set(group)
    for name in group:
        for target in sorted(graph[name] & members):
            yield f"  {name} -> {target}"


def test_sidecar_modules_import_without_cycles() -> None:
    graph = import_graph(ROOT, "sidecar")
    # The scan sees the package's real edges (a guard against a scan that finds nothing).
    assert "sidecar.http.routes" in graph["sidecar.app"]
    assert "sidecar.redis.url" in graph["sidecar.config"]
    found = cycles(graph)
    report = [f"circle {i + 1}:\n" + "\n".join(describe(g, graph)) for i, g in enumerate(found)]
    assert not found, "import circles among sidecar's modules:\n" + "\n".join(report)


def test_every_sidecar_module_imports() -> None:
    for name in modules_of(ROOT, "sidecar"):
        importlib.import_module(name)


def test_the_scan_sees_type_checking_and_function_level_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .sub.b import B\n"
    )
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import a\n")
    (pkg / "sub" / "c.py").write_text("import pkg.sub.d\n")
    (pkg / "sub" / "d.py").write_text("from pkg.sub import c\nfrom . import e\n")
    (pkg / "sub" / "e.py").write_text("import os\nfrom pkg import elsewhere\n")
    graph = import_graph(pkg, "pkg")
    assert graph["pkg.a"] == {"pkg.sub.b"}
    assert graph["pkg.sub.b"] == {"pkg.a"}
    assert graph["pkg.sub.d"] == {"pkg.sub.c", "pkg.sub.e"}
    assert graph["pkg.sub.e"] == {"pkg"}
    assert cycles(graph) == [["pkg.a", "pkg.sub.b"], ["pkg.sub.c", "pkg.sub.d"]]


#: The longest a module of sidecar/ may grow before it is split by concern (issue 25).
MAX_MODULE_LINES = 800


def test_no_sidecar_module_is_over_800_lines() -> None:
    sizes = {
        name: len(path.read_text(encoding="utf-8").splitlines())
        for name, path in modules_of(ROOT, "sidecar").items()
    }
    assert sizes["sidecar.config"] > 100, "the scan reads the modules"
    over = {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not over, f"split these by concern (at most {MAX_MODULE_LINES} lines): {over}"
