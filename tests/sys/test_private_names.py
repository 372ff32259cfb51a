"""No module of the guest kernel (``gntdma.sys``, ``gntdma.xen``) reaches into another
module's private names (issue 9 item 11): a ``_name`` read on anything but ``self``
or ``cls`` must be defined in the same module, and no ``_Name`` is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import gntdma

SRC = Path(gntdma.__file__).parent
#: Private names of the standard library used on purpose.
ALLOWED = {("sys", "_getframe")}


def _defined_private_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)  # __slots__ entries
    return {n for n in names if n.startswith("_")}


def _foreign_private_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    own = _defined_private_names(tree)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            attr = node.attr
            if not attr.startswith("_") or attr.startswith("__") or attr in own:
                continue
            base = node.value.id if isinstance(node.value, ast.Name) else ""
            if base in ("self", "cls") or (base, attr) in ALLOWED:
                continue
            out.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.ImportFrom):
            out.extend(f"{path.name}:{node.lineno}: imports {a.name} from {node.module}"
                       for a in node.names if a.name.startswith("_"))
    return out


def test_no_module_reaches_into_another_modules_private_names() -> None:
    found: list[str] = []
    for pkg in ("sys", "xen"):
        for path in sorted((SRC / pkg).glob("*.py")):
            found.extend(_foreign_private_uses(path))
    assert found == []
