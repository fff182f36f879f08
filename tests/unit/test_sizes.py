"""Size limits that keep the package readable: no module over 700 lines, no class over
420, unless its docstring says why one concern needs more (then it says "one concern")."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "alsd"
MAX_MODULE_LINES = 700
MAX_CLASS_LINES = 420


def _justified(node: ast.Module | ast.ClassDef) -> bool:
    doc = ast.get_docstring(node) or ""
    return "one concern" in doc.lower()


def oversized(root: Path = PKG) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        src = path.read_text()
        tree = ast.parse(src)
        lines = len(src.splitlines())
        if lines > MAX_MODULE_LINES and not _justified(tree):
            out.append(f"{path.relative_to(root.parent)}: {lines} lines")
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_CLASS_LINES and not _justified(node):
                    out.append(f"{path.relative_to(root.parent)}: class {node.name}: {n} lines")
    return out


def test_the_check_sees_a_long_module(tmp_path: Path) -> None:
    pkg = tmp_path / "alsd"
    pkg.mkdir()
    (pkg / "long.py").write_text("x = 1\n" * (MAX_MODULE_LINES + 1))
    (pkg / "why.py").write_text('"""One concern: a reason."""\n' + "x = 1\n" * MAX_MODULE_LINES)
    assert oversized(pkg) == [f"alsd/long.py: {MAX_MODULE_LINES + 1} lines"]


def test_no_oversized_module_or_class() -> None:
    assert oversized() == []
