"""Every wire struct and constant of gntdma.abi against Debian's libxen-dev headers.

One C probe, generated from the Python layouts, is compiled with gcc. It reports
``sizeof`` and ``offsetof``/``sizeof``/signedness of every C member the Python
``FIELDS`` name, the bytes of a C object initialised with the same values as a
Python sample (so packing, signedness and padding are checked too) and the value
of every constant. The member lists of the header structs are parsed from the
preprocessed headers, so a C member missing from ``FIELDS`` fails as well.

x86_64 (native): the probe is built and run. x86_32 (the ``*32`` blkif classes,
the segment and the ring header): the probe is compiled with ``gcc -m32`` to
assembly and its data read back, since there is no 32-bit libc to link with.
"""

from __future__ import annotations

import enum
import importlib
from collections.abc import Callable, Iterator
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
    run_m32,
    run_native,
)

import gntdma.abi
from gntdma.abi._wire import WireStruct
from gntdma.abi.blkif import BLKIF_ABI_X86_32, BLKIF_ABI_X86_64, BlkifAbi, BlkifRequestSegment
from gntdma.abi.grant_table import GnttabCopyPtr
from gntdma.abi.ring import SringHeader

ABI_MODULES = ("xen", "grant_table", "event_channel", "ring", "blkif")


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
#: Classes with an x86_32 layout: the *32 ones, and those identical in both ABIs.
M32_STRUCTS = [c for c in STRUCTS if c.__name__.endswith("32")] + [BlkifRequestSegment,
                                                                    SringHeader]

#: C members deliberately absent from a class's FIELDS, with the reason.
NOT_MODELLED: dict[str, set[str]] = {
    # the slots follow the header; offsetof(ring) is checked by test_ring_geometry
    "SringHeader": {"ring"},
}

#: Classes that mirror only the start of their C type: the C expression of their size.
HEADER_ONLY: dict[str, str] = {"SringHeader": "offsetof(struct blkif_sring, ring)"}

#: Where the C initializer of a sample must name a different member than the
#: layout item (unions: a designated initializer picks the member it names).
INIT_MEMBER: dict[tuple[str, str], str] = {
    ("GnttabCopyPtr", "u"): "u.gmfn",
    ("EvtchnStatus", "u_lo"): "u.interdomain.dom",
    ("EvtchnStatus", "u_hi"): "u.interdomain.port",
    ("GnttabSetupTable", "frame_list"): "frame_list.p",  # XEN_GUEST_HANDLE: { xen_pfn_t *p; }
    ("SringHeader", "pvt"): "pvt.pvt_pad",
}
#: Casts the C initializer of a sample needs (a guest handle holds a pointer).
INIT_CAST: dict[tuple[str, str], str] = {("GnttabSetupTable", "frame_list"): "(xen_pfn_t *)"}
#: Sample values that must stay in a narrower range than their code allows.
SAMPLE_LIMIT: dict[tuple[str, str], int] = {("EvtchnStatus", "u_lo"): 0xFFFF}
#: Byte-string values that hold nested structs: (class, attribute) -> element class.
NESTED: dict[tuple[str, str], type[WireStruct]] = {
    ("GnttabCopy", "source"): GnttabCopyPtr,
    ("GnttabCopy", "dest"): GnttabCopyPtr,
    ("BlkifRequest", "seg"): BlkifRequestSegment,
    ("BlkifRequest32", "seg"): BlkifRequestSegment,
}

_SEGS_PER_PAGE = "((1 << XEN_PAGE_SHIFT) / sizeof(struct blkif_request_segment))"

#: Integer constants that are not macros of the headers, and the C expression
#: they must equal.
NOT_IN_HEADERS: dict[str, str] = {
    "PAGE_SHIFT": "XEN_PAGE_SHIFT",
    "PAGE_SIZE": "(1 << XEN_PAGE_SHIFT)",
    "XEN_PAGE_SIZE": "(1 << XEN_PAGE_SHIFT)",
    "PAGE_MASK": "((1 << XEN_PAGE_SHIFT) - 1)",
    "NR_RESERVED_ENTRIES": "GNTTAB_NR_RESERVED_ENTRIES",
    "GREFS_PER_GRANT_FRAME": "((1 << XEN_PAGE_SHIFT) / sizeof(grant_entry_v1_t))",
    "GRANT_REF_INVALID": "(grant_ref_t)~0U",
    "GRANT_ENTRY_V1_SIZE": "sizeof(grant_entry_v1_t)",
    "GRANT_ENTRY_V1_DOMID_OFFSET": "offsetof(grant_entry_v1_t, domid)",
    # legacy-interface only in xen.h (< 0x00040400)
    "NR_EVENT_CHANNELS": "EVTCHN_2L_NR_CHANNELS",
    "SRING_HEADER_SIZE": "offsetof(struct blkif_sring, ring)",
    "BLKIF_SEGS_PER_INDIRECT_FRAME": _SEGS_PER_PAGE,
    "BLKIF_MAX_INDIRECT_SEGMENTS": f"(BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST * {_SEGS_PER_PAGE})",
    # blkif.h states the 512-byte sector unit in prose only
    "BLKIF_SECTOR_SIZE": "512",
    "BLKIF_SECTORS_PER_PAGE": "((1 << XEN_PAGE_SHIFT) / 512)",
}

#: Header macros (by prefix) that gntdma.abi must define, per header.
REQUIRED_DEFINES: dict[str, tuple[str, ...]] = {
    "grant_table.h": ("GTF_", "GNTMAP_", "GNTST_", "GNTTABOP_", "GNTCOPY_", "GNTTAB_"),
    "event_channel.h": ("EVTCHNOP_", "EVTCHNSTAT_", "EVTCHN_2L_"),
    "xen.h": ("DOMID_",),
    "io/blkif.h": ("BLKIF_OP_", "BLKIF_RSP_", "BLKIF_MAX_", "BLKIF_DISCARD_", "VDISK_"),
    "io/protocols.h": ("XEN_IO_PROTO_ABI_",),
}
#: Header macros with a required prefix that gntdma.abi leaves out, and why.
DEFINES_LEFT_OUT = {
    "EVTCHNOP_reset_cont",  # only #ifdef __XEN__: internal to the hypervisor
    "GNTTABOP_error_msgs",  # a string table: compared by test_gnttabop_error_msgs
}
#: Enum classes whose module constants use another prefix than ``<class name>_``.
ENUM_PREFIX = {"BlkifOp": "BLKIF_OP_", "BlkifRsp": "BLKIF_RSP_"}
#: Enum classes without module constants (not header macros).
ENUM_WITHOUT_CONSTANTS = {"BlkifKey"}


def _int_constants() -> Iterator[tuple[str, int]]:
    for mod in _modules():
        for name in mod.__all__:
            obj = getattr(mod, name)
            if isinstance(obj, int) and not isinstance(obj, bool):
                yield name, obj


def _str_constants() -> Iterator[tuple[str, str]]:
    for mod in _modules():
        for name in mod.__all__:
            obj = getattr(mod, name)
            if isinstance(obj, str):
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
        v = _BASE[code] + n % 0x7F if _BASE[code] > 0 else _BASE[code] - n % 0x7F
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


def _c_int(v: int, cast: str = "") -> str:
    return f"{cast}{v}LL" if v < 0 else f"{cast}{v:#x}ULL"


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
                if isinstance(item, WireStruct):
                    out += c_initializer(item, f"{prefix}.{member}[{i}]")
                else:
                    out.append(f"{prefix}.{member}[{i}] = {_c_int(item)}")
        elif isinstance(v, bytes):
            out += [f"{prefix}.{member}[{i}] = {b}" for i, b in enumerate(v)]
        else:
            assert isinstance(v, int)
            out.append(f"{prefix}.{member} = {_c_int(v, INIT_CAST.get((cls.__name__, name), ''))}")
    return out


def _int_members(cls: type[WireStruct]) -> Iterator[tuple[str, str, str]]:
    """(attribute, struct code, C member) of every plain integer value of ``cls``."""
    for name, code, member in zip(cls.LAYOUT.names, cls.LAYOUT.codes, cls.LAYOUT.members,
                                  strict=True):
        if code in _BASE and (cls.__name__, name) not in INIT_CAST:
            yield name, code, INIT_MEMBER.get((cls.__name__, name), member)


# --- the probes -------------------------------------------------------------------


@dataclass
class Result:
    result: ProbeResult
    preprocessed: str
    samples: dict[str, WireStruct]


def _struct_probe(classes: list[type[WireStruct]], probe: Probe) -> dict[str, WireStruct]:
    samples: dict[str, WireStruct] = {}
    for cls in classes:
        t = cls.CTYPE
        probe.values.append((f"sizeof {cls.__name__}",
                             HEADER_ONLY.get(cls.__name__, f"sizeof({t})")))
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
    probe.values.append(("sizeof entry", "sizeof(union blkif_sring_entry)"))
    probe.values.append(("offsetof ring", "offsetof(struct blkif_sring, ring)"))
    for pages in (1, 2, 4, 8, 16):
        probe.values.append((f"ring size {pages}", f"__CONST_RING_SIZE(blkif, {pages * 4096})"))
    return samples


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> Result:
    work: Path = tmp_path_factory.mktemp("cprobe64")
    probe = Probe()
    samples = _struct_probe(NATIVE_STRUCTS, probe)
    for name, _ in _int_constants():
        probe.values.append((f"const {name}", _c_expr(name)))
    for name, _ in _str_constants():
        probe.strings.append((f"const {name}", name))
    probe.prelude = "static const char *const error_msgs[] = GNTTABOP_error_msgs;\n"
    for i in range(len(gntdma.abi.GNTTABOP_error_msgs)):
        probe.strings.append((str(i), f"error_msgs[{i}]"))
    probe.values.append(("nr error_msgs", "sizeof error_msgs / sizeof error_msgs[0]"))
    return Result(run_native(probe, work), preprocess(work), samples)


@pytest.fixture(scope="module")
def m32(tmp_path_factory: pytest.TempPathFactory) -> Result:
    work: Path = tmp_path_factory.mktemp("cprobe32")
    probe = Probe()
    samples = _struct_probe(M32_STRUCTS, probe)
    return Result(run_m32(probe, work), preprocess(work, m32=True), samples)


ABIS: dict[str, tuple[list[type[WireStruct]], BlkifAbi]] = {
    "x86_64": (NATIVE_STRUCTS, BLKIF_ABI_X86_64),
    "x86_32": (M32_STRUCTS, BLKIF_ABI_X86_32),
}
CASES = [(abi, cls) for abi, (classes, _) in ABIS.items() for cls in classes]
IDS = [f"{abi}-{cls.__name__}" for abi, cls in CASES]


@pytest.fixture
def probe_for(native: Result, m32: Result) -> Callable[[str], Result]:
    return {"x86_64": native, "x86_32": m32}.__getitem__


@pytest.mark.parametrize(("abi", "cls"), CASES, ids=IDS)
def test_size_and_every_offset(probe_for: Callable[[str], Result], abi: str,
                               cls: type[WireStruct]) -> None:
    v = probe_for(abi).result.values
    got: dict[str, Any] = {"sizeof": v[f"sizeof {cls.__name__}"]}
    want: dict[str, Any] = {"sizeof": cls.STRUCT.size}
    for member, offset, size in cls.FIELDS:
        got[member] = (v[f"offsetof {cls.__name__} {member}"], v[f"sizeof {cls.__name__} {member}"])
        want[member] = (offset, size)
    assert got == want


@pytest.mark.parametrize(("abi", "cls"), CASES, ids=IDS)
def test_signedness_of_every_integer(probe_for: Callable[[str], Result], abi: str,
                                     cls: type[WireStruct]) -> None:
    v = probe_for(abi).result.values
    got = {name: bool(v[f"signed {cls.__name__} {name}"]) for name, _, _ in _int_members(cls)}
    want = {name: code.islower() for name, code, _ in _int_members(cls)}
    assert got == want


@pytest.mark.parametrize(("abi", "cls"), CASES, ids=IDS)
def test_fields_name_every_c_member(probe_for: Callable[[str], Result], abi: str,
                                    cls: type[WireStruct]) -> None:
    in_header = header_members(probe_for(abi).preprocessed, cls.CTYPE)
    ours = {m for m, _, _ in cls.FIELDS}
    assert len(ours) == len(cls.FIELDS), "a member is listed twice"
    assert ours == in_header - NOT_MODELLED.get(cls.__name__, set())


@pytest.mark.parametrize(("abi", "cls"), CASES, ids=IDS)
def test_packed_bytes_equal_c_object(probe_for: Callable[[str], Result], abi: str,
                                     cls: type[WireStruct]) -> None:
    r = probe_for(abi)
    s = r.samples[cls.__name__]
    c_bytes = r.result.objects[cls.__name__]
    if cls.__name__ in HEADER_ONLY:  # the C object has slots after the header: all zero
        assert c_bytes[cls.STRUCT.size:] == bytes(len(c_bytes) - cls.STRUCT.size)
        c_bytes = c_bytes[:cls.STRUCT.size]
    assert s.pack().hex() == c_bytes.hex()
    assert type(s).unpack(c_bytes) == s


@pytest.mark.parametrize("abi", ABIS)
def test_ring_geometry(probe_for: Callable[[str], Result], abi: str) -> None:
    v = probe_for(abi).result.values
    blk = ABIS[abi][1]
    assert v["sizeof entry"] == blk.entry_size
    assert v["offsetof ring"] == SringHeader.STRUCT.size
    assert {p: v[f"ring size {p}"] for p in (1, 2, 4, 8, 16)} == {
        p: blk.ring_size(p) for p in (1, 2, 4, 8, 16)}


def test_every_constant_equals_the_header(native: Result) -> None:
    v = native.result.values
    got = {name: v[f"const {name}"] for name, _ in _int_constants()}
    want = {name: int(value) for name, value in _int_constants()}
    assert got == want
    assert len(want) > 110  # the probe really covered the constants


def test_every_string_constant_equals_the_header(native: Result) -> None:
    s = native.result.strings
    got = {name: s[f"const {name}"] for name, _ in _str_constants()}
    assert got == dict(_str_constants())
    assert got["XEN_IO_PROTO_ABI_NATIVE"] == "x86_64-abi"


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
            if name in ENUM_WITHOUT_CONSTANTS:
                continue
            prefix = ENUM_PREFIX.get(name, f"{name}_")
            for member_name, member in cls.__members__.items():
                assert getattr(mod, f"{prefix}{member_name}") is member
                seen += 1
    assert seen >= 75


def test_gnttabop_error_msgs(native: Result) -> None:
    msgs = gntdma.abi.GNTTABOP_error_msgs
    assert native.result.values["nr error_msgs"] == len(msgs)
    assert tuple(native.result.strings[str(i)] for i in range(len(msgs))) == msgs


def test_the_probe_covers_every_struct() -> None:
    names = {c.__name__ for c in STRUCTS}
    assert {"GrantEntryV1", "GnttabMapGrantRef", "GnttabUnmapGrantRef", "GnttabSetupTable",
            "GnttabQuerySize", "GnttabCopyPtr", "GnttabCopy", "EvtchnAllocUnbound",
            "EvtchnBindInterdomain", "EvtchnSend", "EvtchnClose", "EvtchnUnmask",
            "EvtchnStatus", "SringHeader", "BlkifRequestSegment", "BlkifRequest",
            "BlkifRequest32", "BlkifRequestDiscard", "BlkifRequestDiscard32",
            "BlkifRequestIndirect", "BlkifRequestIndirect32", "BlkifResponse",
            "BlkifResponse32"} <= names
    assert len(M32_STRUCTS) == 6
