"""The layering of DESIGN section 2, enforced on every module's imports.

Every import form counts: ``import a.b``, ``import a.b as c``, ``from a import
b``, relative imports with any number of dots (``from . import x``, ``from .x
import y``, ``from ..dev import x``), imports inside functions, under
``TYPE_CHECKING`` or in ``try`` blocks, and ``importlib.import_module`` /
``__import__`` with a literal name. :func:`_imports` resolves each to absolute
names; the checkers below work on those, and the tests at the end feed them
synthetic sources to show that each form of violation is caught.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

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
#: A split driver's side, from its module name: blkfront, blkfront_cmd, netback_rx...
_SIDE = re.compile(r"^(?:blk|net)(front|back)(?:_\w*)?$|^\w*(front|back)$")
_IMPORTERS = {"import_module", "__import__"}


# -- the checker ---------------------------------------------------------------------------


def _resolve_relative(package: str, level: int, module: str | None) -> str:
    parts = package.split(".") if package != "" else []
    up = level - 1
    if up > len(parts) - 1:
        return f"<beyond top level: {'.' * level}{module or ''}>"
    base = parts[:len(parts) - up]
    if module is not None:
        base.append(module)
    return ".".join(base)


def _imports(source: str, module: str, is_package: bool = False) -> list[str]:
    """Every name ``module`` imports, absolute; ``from a import b`` gives a and a.b."""
    tree = ast.parse(source, module)
    package = module if is_package else module.rpartition(".")[0]
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:
                base = _resolve_relative(package, node.level, node.module)
            names.append(base)
            names.extend(f"{base}.{a.name}" for a in node.names if a.name != "*")
        elif isinstance(node, ast.Call):
            func = node.func
            fname = (func.id if isinstance(func, ast.Name)
                     else func.attr if isinstance(func, ast.Attribute) else "")
            if fname in _IMPORTERS and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    name = arg.value
                    if name.startswith("."):
                        level = len(name) - len(name.lstrip("."))
                        name = _resolve_relative(package, level, name[level:] or None)
                    names.append(name)
    return names


def _side(leaf: str) -> str:
    """"front", "back" or "" for a module of gntdma.dev."""
    m = _SIDE.match(leaf)
    if m is None:
        return ""
    return m.group(1) or m.group(2)


def _layer_violations(module: str, names: list[str]) -> list[str]:
    stdlib = set(sys.stdlib_module_names)
    parts = module.split(".")
    layer = parts[1] if len(parts) > 1 else ""
    if layer not in ALLOWED:
        return []  # cli, errors and top-level modules may import anything
    bad: list[str] = []
    for name in names:
        top = name.split(".")[0]
        if name.startswith("<"):
            bad.append(f"{module}: {name}")
        elif top == "gntdma":
            if name in TOP_LEVEL_OK or name.startswith("gntdma.errors."):
                continue
            target = name.split(".")[1]
            if target == layer:
                continue
            if target not in ALLOWED[layer]:
                bad.append(f"{module} imports {name}")
            elif layer == "xen" and target == "hv" and module not in HV_GATEWAYS:
                bad.append(f"{module} imports {name} (only the hypercall shim may)")
            elif layer == "dev" and target == "hv":
                bad.append(f"{module} imports {name} (drivers reach Xen through gntdma.xen)")
        elif top not in stdlib and top not in THIRD_PARTY.get(layer, set()):
            if layer in ("sched", "abi", "hv", "sys", "xen"):
                bad.append(f"{module} imports third-party {name}")
    return bad


def _side_violations(module: str, names: list[str]) -> list[str]:
    """A frontend module never imports a backend module, nor the reverse (DESIGN 2)."""
    if not module.startswith("gntdma.dev."):
        return []
    mine = _side(module.split(".")[2])
    if mine == "":
        return []
    bad: list[str] = []
    for name in names:
        parts = name.split(".")
        if len(parts) < 3 or parts[:2] != ["gntdma", "dev"]:
            continue
        other = _side(parts[2])
        if other != "" and other != mine:
            bad.append(f"{module} imports {name}")
    return bad


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _tree() -> dict[str, list[str]]:
    """Every gntdma module and the names it imports."""
    out: dict[str, list[str]] = {}
    for path in sorted(PKG.rglob("*.py")):
        mod = _module_name(path)
        out[mod] = _imports(path.read_text(), mod, path.name == "__init__.py")
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle's nodes (strongly connected components of more than one node)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, set()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp: list[str] = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, set()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _module_graph(tree: dict[str, list[str]], modules: set[str]) -> dict[str, set[str]]:
    """Edges between ``modules``: a name counts for the longest module it starts with."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod in modules:
        for name in tree[mod]:
            parts = name.split(".")
            for n in range(len(parts), 0, -1):
                target = ".".join(parts[:n])
                if target in modules:
                    if target != mod:
                        graph[mod].add(target)
                    break
    return graph


# -- the tree ------------------------------------------------------------------------------


def test_layers_import_only_downwards() -> None:
    bad: list[str] = []
    for mod, names in _tree().items():
        bad.extend(_layer_violations(mod, names))
    assert bad == []


def test_dev_frontends_and_backends_do_not_import_each_other() -> None:
    bad: list[str] = []
    for mod, names in _tree().items():
        bad.extend(_side_violations(mod, names))
    assert bad == []


def test_every_split_driver_module_has_a_side() -> None:
    leaves = [p.stem for p in sorted((PKG / "dev").glob("*.py"))]
    drivers = [leaf for leaf in leaves
               if re.match(r"(blk|net)(front|back)", leaf) is not None]
    assert "blkfront_cmd" in drivers and "blkback_req" in drivers
    assert {leaf: _side(leaf) for leaf in drivers} == {
        leaf: "front" if "front" in leaf else "back" for leaf in drivers}


def test_blkfront_modules_have_no_import_cycle() -> None:
    tree = _tree()
    blkfront = {m for m in tree if m.startswith("gntdma.dev.blkfront")}
    assert len(blkfront) >= 6
    assert _cycles(_module_graph(tree, blkfront)) == []


def test_dev_modules_have_no_import_cycle() -> None:
    tree = _tree()
    dev = {m for m in tree if m.startswith("gntdma.dev.")}
    assert _cycles(_module_graph(tree, dev)) == []


# -- the checker catches every form ------------------------------------------------------

#: (importing module, source): each imports a backend module from a frontend one.
FRONT_IMPORTS_BACK = [
    ("gntdma.dev.blkfront_cmd", "import gntdma.dev.blkback\n"),
    ("gntdma.dev.blkfront_cmd", "import gntdma.dev.blkback_io as io\n"),
    ("gntdma.dev.blkfront_req", "from gntdma.dev.blkback import Blkback\n"),
    ("gntdma.dev.blkfront_req", "from gntdma.dev import blkback_req\n"),
    ("gntdma.dev.blkfront_softc", "from . import blkback\n"),
    ("gntdma.dev.blkfront_softc", "from .blkback_req import BlkbackReq\n"),
    ("gntdma.dev.blkfront_io", "from ..dev.blkback import Blkback\n"),
    ("gntdma.dev.blkfront_io", "from ..dev import netback\n"),
    ("gntdma.dev.netfront", "from .. import dev\nfrom ..dev import blkback\n"),
    ("gntdma.dev.blkfront_xenbus",
     "def f() -> None:\n    from gntdma.dev.blkback_xenbus import xbb_attach\n"),
    ("gntdma.dev.blkfront",
     "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
     "    from gntdma.dev.blkback import Blkback\n"),
    ("gntdma.dev.blkfront",
     "try:\n    import gntdma.dev.netback_rx\nexcept ImportError:\n    pass\n"),
    ("gntdma.dev.blkfront",
     "import importlib\nm = importlib.import_module('gntdma.dev.blkback')\n"),
    ("gntdma.dev.blkfront", "m = __import__('gntdma.dev.blkback_io')\n"),
    ("gntdma.dev.blkfront",
     "class C:\n    def m(self) -> None:\n        import gntdma.dev.blkback\n"),
]


@pytest.mark.parametrize(("module", "source"), FRONT_IMPORTS_BACK)
def test_the_checker_catches_a_frontend_importing_a_backend(module: str, source: str) -> None:
    assert _side_violations(module, _imports(source, module)) != []


@pytest.mark.parametrize(("module", "source"), FRONT_IMPORTS_BACK)
def test_the_checker_catches_a_backend_importing_a_frontend(module: str, source: str) -> None:
    # The same forms, the other way round.
    swap = {"front": "back", "back": "front"}

    def flip(text: str) -> str:
        return re.sub(r"(blk|net)(front|back)", lambda m: m.group(1) + swap[m.group(2)], text)

    back = flip(module)
    assert _side(back.rsplit(".", 1)[-1]) == "back"
    assert _side_violations(back, _imports(flip(source), back)) != []


def test_the_checker_passes_shared_and_same_side_imports() -> None:
    src = ("from . import blkfront_cmd\nfrom .blkfront_softc import xbd_command\n"
           "import gntdma.abi.blkif\nfrom gntdma.xen import xenbus\n")
    assert _side_violations("gntdma.dev.blkfront", _imports(src, "gntdma.dev.blkfront")) == []
    assert _layer_violations("gntdma.dev.blkfront", _imports(src, "gntdma.dev.blkfront")) == []


LAYER_BREAKS = [
    ("gntdma.sys._vm", "import gntdma.xen.gnttab\n"),
    ("gntdma.sys._vm", "from gntdma.xen import gnttab\n"),
    ("gntdma.sys._vm", "from gntdma import xen\n"),
    ("gntdma.sys._vm", "from ..xen import gnttab\n"),
    ("gntdma.sys._vm", "from ..xen.gnttab import GntTab\n"),
    ("gntdma.sys", "from .. import toolstack\n"),  # a package's __init__
    ("gntdma.sys._vm", "def f() -> None:\n    from gntdma.host import image\n"),
    ("gntdma.sys._vm",
     "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from gntdma.dev import blkback\n"),
    ("gntdma.dev.blkback_io", "from gntdma.hv import Hypervisor\n"),
    ("gntdma.xen.gnttab", "from ..hv import _gnttab\n"),
    ("gntdma.abi.blkif", "import importlib\nimportlib.import_module('gntdma.sched')\n"),
    ("gntdma.abi.blkif", "from .... import x\n"),  # beyond the top level
]


@pytest.mark.parametrize(("module", "source"), LAYER_BREAKS)
def test_the_checker_catches_an_upward_import(module: str, source: str) -> None:
    is_package = module == "gntdma.sys"
    assert _layer_violations(module, _imports(source, module, is_package)) != []


def test_relative_imports_resolve_against_the_package() -> None:
    assert _imports("from . import a\nfrom .b import c\nfrom ..x import y\n",
                    "gntdma.dev.blkfront") == [
        "gntdma.dev", "gntdma.dev.a", "gntdma.dev.b", "gntdma.dev.b.c",
        "gntdma.x", "gntdma.x.y"]
    assert _imports("from . import a\n", "gntdma.dev", is_package=True) == [
        "gntdma.dev", "gntdma.dev.a"]


def test_the_cycle_finder_sees_a_cycle() -> None:
    tree = {"p.a": ["p.b.X"], "p.b": ["p.c"], "p.c": ["p.a"], "p.d": ["p.a"]}
    assert _cycles(_module_graph(tree, set(tree))) == [["p.a", "p.b", "p.c"]]
