"""The public surface of gntdma.abi and the wire-struct pattern's own checks."""

from __future__ import annotations

import importlib
import pkgutil
import struct
from dataclasses import dataclass
from typing import ClassVar

import pytest

import gntdma.abi
from gntdma.abi._wire import Field, Layout, WireStruct, layout, wire
from gntdma.abi.xen import (
    DOMID_FIRST_RESERVED,
    DOMID_SELF,
    PAGE_MASK,
    PAGE_SHIFT,
    PAGE_SIZE,
    DomId,
    EvtchnPort,
    GrantHandle,
    GrantRef,
)


def _public_modules() -> list[str]:
    return [m.name for m in pkgutil.iter_modules(gntdma.abi.__path__) if not m.name.startswith("_")]


@pytest.mark.parametrize("name", _public_modules())
def test_every_module_has_all_and_the_package_reexports_it(name: str) -> None:
    mod = importlib.import_module(f"gntdma.abi.{name}")
    assert len(mod.__all__) == len(set(mod.__all__))
    for n in mod.__all__:
        assert getattr(gntdma.abi, n) is getattr(mod, n), n
        assert n in gntdma.abi.__all__


def test_package_all_is_exactly_the_union() -> None:
    union = set()
    for name in _public_modules():
        union |= set(importlib.import_module(f"gntdma.abi.{name}").__all__)
    assert set(gntdma.abi.__all__) == union
    assert len(gntdma.abi.__all__) == len(union)


def test_page_and_domid_constants() -> None:
    assert (PAGE_SIZE, PAGE_SHIFT, PAGE_MASK) == (4096, 12, 4095)
    assert DOMID_SELF == DOMID_FIRST_RESERVED == 0x7FF0
    # NewTypes are ints at run time
    assert DomId(3) + GrantRef(4) + EvtchnPort(5) + GrantHandle(6) == 18


def test_wire_rejects_a_wrong_size() -> None:
    with pytest.raises(AssertionError, match="header says 6"):

        @wire(size=6)
        @dataclass(frozen=True, slots=True)
        class Bad(WireStruct):
            CTYPE: ClassVar[str] = "struct bad"
            LAYOUT: ClassVar[Layout] = layout(("a", "H"), ("b", "H"))
            STRUCT: ClassVar[struct.Struct] = LAYOUT.struct
            FIELDS: ClassVar[tuple[Field, ...]] = LAYOUT.fields
            a: int = 0
            b: int = 0


def test_wire_rejects_attributes_out_of_layout_order() -> None:
    with pytest.raises(AssertionError, match="attributes"):

        @wire(size=4)
        @dataclass(frozen=True, slots=True)
        class Swapped(WireStruct):
            CTYPE: ClassVar[str] = "struct swapped"
            LAYOUT: ClassVar[Layout] = layout(("a", "H"), ("b", "H"))
            STRUCT: ClassVar[struct.Struct] = LAYOUT.struct
            FIELDS: ClassVar[tuple[Field, ...]] = LAYOUT.fields
            b: int = 0
            a: int = 0


def test_layout_offsets_and_named_padding() -> None:
    lay = layout(("a", "B"), ("", "3x"), ("b", "I"), ("__pad", "4x"), ("", "Q", "c"),
                 extra=(("u.c", 12, 8),))
    assert lay.struct.format == "<B3xI4xQ"
    assert lay.names == ("a", "b", "c")
    assert lay.codes == ("B", "I", "Q")
    assert lay.members == ("a", "b", "")
    assert lay.fields == (("a", 0, 1), ("b", 4, 4), ("__pad", 8, 4), ("u.c", 12, 8))
    with pytest.raises(AssertionError):
        layout(("", "I"))  # a value needs an attribute name
