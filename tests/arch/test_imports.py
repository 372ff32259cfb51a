"""The layering of DESIGN section 2, enforced on every module's imports."""

from __future__ import annotations

import ast
from pathlib import Path

import gntdma

PKG = Path(gntdma.__file__).parent

#: package -> the gntdma packages it may import (besides itself and gntdma.errors).
ALLOWED: dict[str, set[str]] = {
    "sched": set(),
    "abi": set(),
    "hv": {"sched", "abi"},
    "xenstored": {"sched", "abi", "hv"},
    "sys": {"sched"},
    "xen": {"sched", "abi", "hv", "sys"},
    "dev": {"sched", "abi", "hv", "sys", "xen"},
    "host": {"sched", "abi", "hv", "sys", "xen", "dev"},
    "toolstack": {"sched", "abi", "hv", "sys", "xen", "dev", "host", "xenstored"},
}
#: Modules of gntdma.xen that may reach the hypervisor (the hypercall shim only).
HV_GATEWAYS = {"gntdma.xen.hypercall"}
THIRD_PARTY = {"sched": {"greenlet"}}
TOP_LEVEL_OK = {"gntdma", "gntdma.errors"}


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            names.append(node.module)
    return names


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def test_layers_import_only_downwards() -> None:
    import sys

    stdlib = set(sys.stdlib_module_names)
    bad: list[str] = []
    for path in sorted(PKG.rglob("*.py")):
        mod = _module_name(path)
        parts = mod.split(".")
        layer = parts[1] if len(parts) > 1 else ""
        if layer not in ALLOWED:
            continue  # cli, errors and top-level modules may import anything
        for name in _imports(path):
            top = name.split(".")[0]
            if top == "gntdma":
                if name in TOP_LEVEL_OK:
                    continue
                target = name.split(".")[1]
                if target == layer:
                    continue
                if target not in ALLOWED[layer]:
                    bad.append(f"{mod} imports {name}")
                elif layer == "xen" and target == "hv" and mod not in HV_GATEWAYS:
                    bad.append(f"{mod} imports {name} (only the hypercall shim may)")
                elif layer == "dev" and target == "hv":
                    bad.append(f"{mod} imports {name} (drivers reach Xen through gntdma.xen)")
            elif top not in stdlib and top not in THIRD_PARTY.get(layer, set()):
                if layer in ("sched", "abi", "hv", "sys", "xen"):
                    bad.append(f"{mod} imports third-party {name}")
    assert bad == []


def test_dev_frontends_and_backends_do_not_import_each_other() -> None:
    bad: list[str] = []
    for path in sorted((PKG / "dev").rglob("*.py")):
        mod = _module_name(path)
        leaf = mod.rsplit(".", 1)[-1]
        for name in _imports(path):
            other = name.rsplit(".", 1)[-1]
            if leaf.endswith("front") and other.endswith("back"):
                bad.append(f"{mod} imports {name}")
            if leaf.endswith("back") and other.endswith("front"):
                bad.append(f"{mod} imports {name}")
    assert bad == []


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    p = tmp_path / "m.py"
    p.write_text("from gntdma.toolstack import x\nimport gntdma.hv\n")
    assert _imports(p) == ["gntdma.toolstack", "gntdma.hv"]
