"""Every wire struct and constant of gntdma.abi against Debian's libxen-dev headers.

One C probe, generated from the Python layouts, is compiled with gcc and run. It
reports ``sizeof`` and ``offsetof``/``sizeof`` of every C member the Python
``FIELDS`` name, the bytes of a C object initialised with the same values as a
Python sample (so packing, signedness and padding are checked too) and the value
of every constant. The member lists of the header structs are parsed from the
preprocessed headers, so a C member missing from ``FIELDS`` fails as well.
"""

from __future__ import annotations

import enum
import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from cprobe_abi import (
    XEN_INCLUDE,
    Probe,
    ProbeResult,
    header_defines,
    header_members,
    preprocess,
    run_native,
)

import gntdma.abi
from gntdma.abi._wire import WireStruct
from gntdma.abi.grant_table import GnttabCopyPtr

ABI_MODULES = ("xen", "grant_table", "event_channel")


def _modules() -> list[ModuleType]:
    return [importlib.import_module(f"gntdma.abi.{m}") for m in ABI_MODULES]


def _structs() -> list[type[WireStruct]]:
    out: list[type[WireStruct]] = []
    for mod in _modules():
        for name in mod.__all__:
            obj = getattr(mod, name)
            if isinstance(obj, type) and issubclass(obj, WireStruct):
                out.append(obj)
    return out


STRUCTS = _structs()
NATIVE_STRUCTS = [c for c in STRUCTS if not c.__name__.endswith("32")]

#: C members deliberately absent from a class's FIELDS, with the reason.
NOT_MODELLED: dict[str, set[str]] = {}

#: Where the C initializer of a sample must name a different member than the
#: layout item (unions: a designated initializer picks the member it names).
INIT_MEMBER: dict[tuple[str, str], str] = {
    ("GnttabCopyPtr", "u"): "u.gmfn",
    ("EvtchnStatus", "u_lo"): "u.interdomain.dom",
    ("EvtchnStatus", "u_hi"): "u.interdomain.port",
    ("GnttabSetupTable", "frame_list"): "frame_list.p",  # XEN_GUEST_HANDLE: { xen_pfn_t *p; }
}
#: Casts the C initializer of a sample needs (a guest handle holds a pointer).
INIT_CAST: dict[tuple[str, str], str] = {("GnttabSetupTable", "frame_list"): "(xen_pfn_t *)"}
#: Sample values that must stay in a narrower range than their code allows.
SAMPLE_LIMIT: dict[tuple[str, str], int] = {("EvtchnStatus", "u_lo"): 0xFFFF}

#: Constants that are not macros of the headers, and the C expression they must equal.
NOT_IN_HEADERS: dict[str, str] = {
    "PAGE_SHIFT": "XEN_PAGE_SHIFT",
    "PAGE_SIZE": "(1 << XEN_PAGE_SHIFT)",
    "XEN_PAGE_SIZE": "(1 << XEN_PAGE_SHIFT)",
    "PAGE_MASK": "((1 << XEN_PAGE_SHIFT) - 1)",
    "NR_RESERVED_ENTRIES": "GNTTAB_NR_RESERVED_ENTRIES",
    "GREFS_PER_GRANT_FRAME": "((1 << XEN_PAGE_SHIFT) / sizeof(grant_entry_v1_t))",
    "GRANT_REF_INVALID": "(grant_ref_t)~0U",
    # legacy-interface only in xen.h (< 0x00040400)
    "NR_EVENT_CHANNELS": "EVTCHN_2L_NR_CHANNELS",
}

#: Header macros (by prefix) that gntdma.abi must define, per header.
REQUIRED_DEFINES: dict[str, tuple[str, ...]] = {
    "grant_table.h": ("GTF_", "GNTMAP_", "GNTST_", "GNTTABOP_", "GNTCOPY_", "GNTTAB_"),
    "event_channel.h": ("EVTCHNOP_", "EVTCHNSTAT_", "EVTCHN_2L_"),
    "xen.h": ("DOMID_",),
}
#: Header macros with a required prefix that gntdma.abi leaves out, and why.
DEFINES_LEFT_OUT = {
    "EVTCHNOP_reset_cont",  # only #ifdef __XEN__: internal to the hypervisor
    "GNTTABOP_error_msgs",  # a string table: compared by test_gnttabop_error_msgs
}


def _int_constants() -> Iterator[tuple[str, int]]:
    for mod in _modules():
        for name in mod.__all__:
            obj = getattr(mod, name)
            if isinstance(obj, int) and not isinstance(obj, bool):
                yield name, obj


def _c_expr(name: str) -> str:
    if name in NOT_IN_HEADERS:
        return NOT_IN_HEADERS[name]
    if name.startswith("HYPERVISOR_"):
        return "__" + name
    return name


# --- sample objects ---------------------------------------------------------------

_BASE = {"B": 0x80, "b": -0x70, "H": 0x8100, "h": -0x1F0, "I": 0x81020300,
         "i": -0x1020300, "Q": 0x8102030405060700, "q": -0x102030405060700}


#: Byte-string values that hold nested structs: (class, attribute) -> element class.
NESTED: dict[tuple[str, str], type[WireStruct]] = {
    ("GnttabCopy", "source"): GnttabCopyPtr,
    ("GnttabCopy", "dest"): GnttabCopyPtr,
}


def sample(cls: type[WireStruct], seed: int = 1) -> WireStruct:
    """An instance with a distinct, sign- and width-probing value in every field.

    The values are made at the wire level and decoded by the class itself, so
    classes with nested structs or arrays get theirs the way unpack builds them.
    """
    values = [sample_value(cls, name, code, seed * 16 + k)
              for k, (name, code) in enumerate(zip(cls.LAYOUT.names, cls.LAYOUT.codes,
                                                   strict=True))]
    return cls._from_values(tuple(values))


def sample_value(cls: type[WireStruct], name: str, code: str, n: int) -> Any:
    if code in _BASE:
        v = _BASE[code] + n if _BASE[code] > 0 else _BASE[code] - n
        limit = SAMPLE_LIMIT.get((cls.__name__, name))
        return v & limit if limit is not None else v
    assert code.endswith("s"), f"{cls.__name__}.{name}: no sample rule for {code!r}"
    size = int(code[:-1])
    elem = NESTED.get((cls.__name__, name))
    if elem is None:
        return bytes((n * 7 + i) & 0xFF for i in range(size))
    assert size % elem.STRUCT.size == 0
    count = size // elem.STRUCT.size
    return b"".join(sample(elem, n * 32 + i).pack() for i in range(count))


def c_initializer(obj: WireStruct, prefix: str = "") -> list[str]:
    """Designated initializers (``.a.b = v``) that build ``obj`` in C."""
    cls = type(obj)
    out: list[str] = []
    for name, member in zip(cls.LAYOUT.names, cls.LAYOUT.members, strict=True):
        member = INIT_MEMBER.get((cls.__name__, name), member)
        assert member, f"{cls.__name__}.{name} needs an INIT_MEMBER entry"
        v = getattr(obj, name)
        if isinstance(v, WireStruct):
            out += c_initializer(v, f"{prefix}.{member}")
        elif isinstance(v, tuple):
            for i, item in enumerate(v):
                assert isinstance(item, WireStruct)
                out += c_initializer(item, f"{prefix}.{member}[{i}]")
        elif isinstance(v, bytes):
            out += [f"{prefix}.{member}[{i}] = {b}" for i, b in enumerate(v)]
        else:
            assert isinstance(v, int)
            lit = f"{v}LL" if v < 0 else f"{v:#x}ULL"
            cast = INIT_CAST.get((cls.__name__, name), "")
            out.append(f"{prefix}.{member} = {cast}{lit}")
    return out


def _int_members(cls: type[WireStruct]) -> Iterator[tuple[str, str, str]]:
    """(attribute, struct code, C member) of every plain integer value of ``cls``."""
    for name, code, member in zip(cls.LAYOUT.names, cls.LAYOUT.codes, cls.LAYOUT.members,
                                  strict=True):
        if code in _BASE and (cls.__name__, name) not in INIT_CAST:
            yield name, code, INIT_MEMBER.get((cls.__name__, name), member)


# --- the probe --------------------------------------------------------------------


@dataclass
class Native:
    result: ProbeResult
    preprocessed: str
    samples: dict[str, WireStruct]


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> Native:
    work: Path = tmp_path_factory.mktemp("cprobe")
    probe = Probe()
    samples: dict[str, WireStruct] = {}
    for cls in NATIVE_STRUCTS:
        t = cls.CTYPE
        probe.values.append((f"sizeof {cls.__name__}", f"sizeof({t})"))
        for member, _, _ in cls.FIELDS:
            probe.values.append((f"offsetof {cls.__name__} {member}",
                                 f"offsetof({t}, {member})"))
            probe.values.append((f"sizeof {cls.__name__} {member}",
                                 f"sizeof((({t} *)0)->{member})"))
        for name, _code, member in _int_members(cls):
            probe.values.append((f"signed {cls.__name__} {name}",
                                 f"((__typeof__((({t} *)0)->{member}))-1 < 0)"))
        s = sample(cls)
        samples[cls.__name__] = s
        probe.objects.append((cls.__name__, t, ", ".join(c_initializer(s))))
    for name, _ in _int_constants():
        probe.values.append((f"const {name}", _c_expr(name)))
    probe.prelude = "static const char *const error_msgs[] = GNTTABOP_error_msgs;\n"
    for i in range(len(gntdma.abi.GNTTABOP_error_msgs)):
        probe.strings.append((str(i), f"error_msgs[{i}]"))
    probe.values.append(("nr error_msgs", "sizeof error_msgs / sizeof error_msgs[0]"))
    return Native(run_native(probe, work), preprocess(work), samples)


@pytest.mark.parametrize("cls", NATIVE_STRUCTS, ids=lambda c: c.__name__)
def test_size_and_every_offset(native: Native, cls: type[WireStruct]) -> None:
    v = native.result.values
    got = {"sizeof": v[f"sizeof {cls.__name__}"]}
    want = {"sizeof": cls.STRUCT.size}
    for member, offset, size in cls.FIELDS:
        got[member] = (v[f"offsetof {cls.__name__} {member}"], v[f"sizeof {cls.__name__} {member}"])
        want[member] = (offset, size)
    assert got == want


@pytest.mark.parametrize("cls", NATIVE_STRUCTS, ids=lambda c: c.__name__)
def test_signedness_of_every_integer(native: Native, cls: type[WireStruct]) -> None:
    v = native.result.values
    got = {name: bool(v[f"signed {cls.__name__} {name}"]) for name, _, _ in _int_members(cls)}
    want = {name: code.islower() for name, code, _ in _int_members(cls)}
    assert got == want


@pytest.mark.parametrize("cls", NATIVE_STRUCTS, ids=lambda c: c.__name__)
def test_fields_name_every_c_member(native: Native, cls: type[WireStruct]) -> None:
    in_header = header_members(native.preprocessed, cls.CTYPE)
    ours = {m for m, _, _ in cls.FIELDS}
    assert len(ours) == len(cls.FIELDS), "a member is listed twice"
    assert ours == in_header - NOT_MODELLED.get(cls.__name__, set())


@pytest.mark.parametrize("cls", NATIVE_STRUCTS, ids=lambda c: c.__name__)
def test_packed_bytes_equal_c_object(native: Native, cls: type[WireStruct]) -> None:
    s = native.samples[cls.__name__]
    c_bytes = native.result.objects[cls.__name__]
    assert s.pack().hex() == c_bytes.hex()
    assert type(s).unpack(c_bytes) == s


def test_every_constant_equals_the_header(native: Native) -> None:
    v = native.result.values
    got = {name: v[f"const {name}"] for name, _ in _int_constants()}
    want = {name: int(value) for name, value in _int_constants()}
    assert got == want
    assert len(want) > 90  # the probe really covered the constants


def test_every_header_constant_is_defined() -> None:
    ours = {name for mod in _modules() for name in mod.__all__}
    missing = []
    for header, prefixes in REQUIRED_DEFINES.items():
        for name in sorted(header_defines(XEN_INCLUDE / header, prefixes) - DEFINES_LEFT_OUT):
            if name not in ours:
                missing.append(f"{header}: {name}")
    assert missing == []


def test_enum_members_are_the_module_constants() -> None:
    seen = 0
    for mod in _modules():
        for name in mod.__all__:
            cls = getattr(mod, name)
            if not (isinstance(cls, type) and issubclass(cls, enum.Enum)):
                continue
            for member_name, member in cls.__members__.items():
                assert getattr(mod, f"{name}_{member_name}") is member
                seen += 1
    assert seen >= 60


def test_gnttabop_error_msgs(native: Native) -> None:
    msgs = gntdma.abi.GNTTABOP_error_msgs
    assert native.result.values["nr error_msgs"] == len(msgs)
    assert tuple(native.result.strings[str(i)] for i in range(len(msgs))) == msgs


def test_the_probe_covers_every_struct() -> None:
    names = {c.__name__ for c in STRUCTS}
    assert {"GrantEntryV1", "GnttabMapGrantRef", "GnttabUnmapGrantRef", "GnttabSetupTable",
            "GnttabQuerySize", "GnttabCopyPtr", "GnttabCopy", "EvtchnAllocUnbound",
            "EvtchnBindInterdomain", "EvtchnSend", "EvtchnClose", "EvtchnUnmask",
            "EvtchnStatus"} <= names
