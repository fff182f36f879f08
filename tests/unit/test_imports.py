"""The package's import graph: no cycle inside alsd/, and the layering of the packages.

Every import is counted, also those inside functions and under ``TYPE_CHECKING``: a lazy
import hides a cycle from the interpreter, not from a reader.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "alsd"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """module -> the alsd modules it imports (``from pkg import mod`` counts as pkg.mod)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                    for a in node.names
                ]
            for t in targets:
                if t in modules and t != name:
                    edges.add(t)
        graph[name] = edges
    return graph


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return [*stack[stack.index(m) :], m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_graph_sees_lazy_imports() -> None:
    graph = import_graph()
    # cli imports the daemon inside main() only.
    assert "alsd.app.daemon" in graph["alsd.cli"]
    # wiring imports the layer manager inside open_parts() and under TYPE_CHECKING.
    assert "alsd.layers.manager" in graph["alsd.app.wiring"]


def test_no_import_cycle_in_alsd() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


# What each sub-package may import from alsd (besides itself and the leaf modules
# errors, config, counters). developer-notes/interfaces.md explains the layering.
ALLOWED = {
    "oci": set(),
    "storage": set(),
    "registry": {"oci"},
    "fetch": {"oci"},
    "layers": {"oci", "fetch"},
    "fs": {"oci"},
    "app": {"oci", "storage", "registry", "fetch", "layers", "fs"},
    "tools": {"oci", "registry", "app"},
}
LEAVES = {"alsd.errors", "alsd.config", "alsd.counters"}


def test_packages_import_only_the_layers_below() -> None:
    bad = []
    for mod, edges in import_graph().items():
        parts = mod.split(".")
        if len(parts) < 3:
            continue
        pkg = parts[1]
        for target in edges:
            tparts = target.split(".")
            if target in LEAVES or tparts[1] == pkg:
                continue
            if tparts[1] not in ALLOWED.get(pkg, set()):
                bad.append(f"{mod} -> {target}")
    assert not bad, "imports across the layering:\n" + "\n".join(sorted(bad))
