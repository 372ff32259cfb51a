"""Grant-table structs and constants: golden bytes, round trips, messages."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gntdma.abi import grant_table as gt
from gntdma.abi._wire import WireStruct
from gntdma.abi.grant_table import (
    GNTST,
    GTF,
    GNTCOPY_dest_gref,
    GNTMAP_host_map,
    GNTMAP_readonly,
    GNTST_bad_copy_arg,
    GNTST_okay,
    GnttabCopy,
    GnttabCopyPtr,
    GnttabDumpTable,
    GnttabMapGrantRef,
    GnttabQuerySize,
    GnttabSetupTable,
    GnttabTransfer,
    GnttabUnmapGrantRef,
    GrantEntryV1,
    GTF_permit_access,
    GTF_readonly,
    gntst_message,
)
from gntdma.abi.xen import DOMID_SELF

GOLDEN: list[tuple[WireStruct, str]] = [
    (GrantEntryV1(flags=GTF_permit_access | GTF_readonly, domid=0x0102, frame=0x0A0B0C0D),
     "0500 0201 0d0c0b0a"),
    (GnttabMapGrantRef(host_addr=0x1122334455667788, flags=GNTMAP_host_map | GNTMAP_readonly,
                       ref=0x12345678, dom=7, status=-3, handle=0xDEADBEEF, dev_bus_addr=0x1000),
     "8877665544332211 06000000 78563412 0700 fdff efbeadde 0010000000000000"),
    (GnttabUnmapGrantRef(host_addr=0x1000, dev_bus_addr=0x2000, handle=5, status=-4),
     "0010000000000000 0020000000000000 05000000 fcff 0000"),
    (GnttabSetupTable(dom=DOMID_SELF, nr_frames=4, status=-1, frame_list=0xFFFF888000001000),
     "f07f 0000 04000000 ffff 000000000000 00100000 8088ffff"),
    (GnttabQuerySize(dom=DOMID_SELF, nr_frames=2, max_nr_frames=64, status=0),
     "f07f 0000 02000000 40000000 0000 0000"),
    (GnttabDumpTable(dom=1, status=-2), "0100 feff"),
    (GnttabTransfer(mfn=0x1234, domid=2, ref=9, status=-11),
     "3412000000000000 0200 0000 09000000 f5ff 000000000000"),
    (GnttabCopyPtr(u=0x12345, domid=DOMID_SELF, offset=0x100),
     "4523010000000000 f07f 0001 00000000"),
    (GnttabCopy(source=GnttabCopyPtr(u=0x12345, domid=DOMID_SELF, offset=0x100),
                dest=GnttabCopyPtr(u=42, domid=3, offset=8),
                len=0x200, flags=GNTCOPY_dest_gref, status=GNTST_bad_copy_arg),
     "4523010000000000 f07f 0001 00000000"
     "2a00000000000000 0300 0800 00000000"
     "0002 0200 f6ff 0000"),
]


@pytest.mark.parametrize(("obj", "hexbytes"), GOLDEN, ids=lambda x: type(x).__name__)
def test_golden_bytes(obj: WireStruct, hexbytes: str) -> None:
    raw = bytes.fromhex(hexbytes.replace(" ", ""))
    assert obj.pack() == raw
    assert len(raw) == type(obj).STRUCT.size
    assert type(obj).unpack(raw) == obj


def test_every_grant_struct_has_a_golden_test() -> None:
    covered = {type(o) for o, _ in GOLDEN}
    structs = {getattr(gt, n) for n in gt.__all__
               if isinstance(getattr(gt, n), type) and issubclass(getattr(gt, n), WireStruct)}
    assert structs == covered


def test_sizes() -> None:
    assert {c.__name__: c.STRUCT.size for c in {type(o) for o, _ in GOLDEN}} == {
        "GrantEntryV1": 8, "GnttabMapGrantRef": 32, "GnttabUnmapGrantRef": 24,
        "GnttabSetupTable": 24, "GnttabQuerySize": 16, "GnttabDumpTable": 4,
        "GnttabTransfer": 24, "GnttabCopyPtr": 16, "GnttabCopy": 40}


def _value_mask(cls: type[WireStruct]) -> bytes:
    """The bytes a round trip keeps: all-ones survives except in padding."""
    return cls.unpack(b"\xff" * cls.STRUCT.size).pack()


@pytest.mark.parametrize("cls", sorted({type(o) for o, _ in GOLDEN}, key=lambda c: c.__name__),
                         ids=lambda c: c.__name__)
@given(data=st.data())
def test_any_bytes_round_trip_except_padding(cls: type[WireStruct], data: st.DataObject) -> None:
    raw = data.draw(st.binary(min_size=cls.STRUCT.size, max_size=cls.STRUCT.size))
    obj = cls.unpack(raw)
    mask = _value_mask(cls)
    assert obj.pack() == bytes(a & b for a, b in zip(raw, mask, strict=True))
    assert cls.unpack(obj.pack()) == obj


def test_padding_is_really_padding() -> None:
    # the mask of the round trip is exactly the complement of the C padding
    assert _value_mask(GnttabSetupTable).hex() == "ffff0000ffffffffffff000000000000" + "ff" * 8
    assert _value_mask(GnttabCopy).hex() == ("ff" * 12 + "00" * 4) * 2 + "ffffffffffff0000"


def test_pack_into_and_unpack_from_at_an_offset() -> None:
    m = GnttabMapGrantRef(flags=GNTMAP_host_map, ref=9, dom=1)
    buf = bytearray(b"\xaa" * 100)
    m.pack_into(buf, 40)
    assert buf[:40] == b"\xaa" * 40 and buf[72:] == b"\xaa" * 28
    assert GnttabMapGrantRef.unpack_from(buf, 40) == m
    assert GnttabMapGrantRef.unpack_from(memoryview(buf), 40) == m


def test_out_of_range_values_raise_value_error() -> None:
    with pytest.raises(ValueError, match="GrantEntryV1"):
        GrantEntryV1(flags=0x10000).pack()
    with pytest.raises(ValueError, match="GnttabMapGrantRef"):
        GnttabMapGrantRef(status=-0x8001).pack()
    with pytest.raises(ValueError):
        GnttabQuerySize(nr_frames=-1).pack_into(bytearray(16))
    with pytest.raises(ValueError):
        GnttabCopy(source=GnttabCopyPtr(offset=0x10000)).pack()


def test_short_buffers_raise_value_error() -> None:
    with pytest.raises(ValueError, match="GrantEntryV1"):
        GrantEntryV1.unpack(b"\0" * 7)
    with pytest.raises(ValueError):
        GrantEntryV1.unpack(b"\0" * 9)
    with pytest.raises(ValueError):
        GnttabCopy.unpack_from(b"\0" * 40, 1)


def test_structs_are_frozen_and_replace_works() -> None:
    m = GnttabMapGrantRef(ref=3)
    with pytest.raises(AttributeError):
        m.ref = 4  # type: ignore[misc]
    assert replace(m, status=GNTST_okay, handle=7).handle == 7
    assert not hasattr(m, "__dict__")


def test_copy_ptr_union_views() -> None:
    p = GnttabCopyPtr.unpack(bytes.fromhex("78563412 f0debc9a 0300 0400 00000000".replace(" ", "")))
    assert p.ref == 0x12345678
    assert p.gmfn == p.u == 0x9ABCDEF012345678
    assert (p.domid, p.offset) == (3, 4)


def test_gntst_messages() -> None:
    assert gntst_message(GNTST.okay) == "okay"
    assert gntst_message(GNTST.general_error) == "undefined error"
    assert gntst_message(GNTST.bad_gntref) == "invalid grant reference"
    assert gntst_message(GNTST.no_device_space) == "no spare translation slot in the I/O MMU"
    assert gntst_message(GNTST.bad_copy_arg) == "copy arguments cross page boundary"
    assert gntst_message(GNTST.eagain) == "operation not done; try again"
    assert gntst_message(GNTST.no_space) == "out of space"
    assert [gntst_message(s) for s in GNTST] == list(gt.GNTTABOP_error_msgs)
    assert gntst_message(1) == "unknown grant status 1"
    assert gntst_message(-14) == "unknown grant status -14"


def test_flags_compose_and_alias() -> None:
    f = GTF.permit_access | GTF.readonly | GTF.reading
    assert f == 0x0D and (f & GTF.type_mask) == GTF.permit_access
    assert GTF.transfer_committed == GTF.readonly and GTF.transfer_completed == GTF.reading
    assert GTF.type_mask == GTF.transitive == 3
    assert gt.GRANT_REF_INVALID == 0xFFFFFFFF
    assert gt.GREFS_PER_GRANT_FRAME == 512
    assert gt.NR_RESERVED_ENTRIES == gt.GNTTAB_NR_RESERVED_ENTRIES == 8
    assert (gt.GNTTAB_RESERVED_CONSOLE, gt.GNTTAB_RESERVED_XENSTORE) == (0, 1)
    assert (gt.GNTCOPY_source_gref, gt.GNTCOPY_dest_gref) == (1, 2)


def test_grant_entry_layout_defined_once_in_abi() -> None:
    """The entry views the hypervisor and the guest use are GrantEntryV1's layout.

    Xen: xen/common/grant_table.c shared_entry_v1(): entry e lives in frame
    e / SHGNT_PER_PAGE_V1 at index e % SHGNT_PER_PAGE_V1.
    """
    buf = bytearray(16)
    GrantEntryV1(flags=5, domid=0x0102, frame=0x0A0B0C0D).pack_into(buf, 8)
    assert gt.GRANT_ENTRY_V1.unpack_from(buf, 8) == (5, 0x0102, 0x0A0B0C0D)
    assert gt.GRANT_ENTRY_V1_FLAGS.unpack_from(buf, 8) == (5,)
    assert gt.GRANT_ENTRY_V1_DOMID_FRAME.unpack_from(
        buf, 8 + gt.GRANT_ENTRY_V1_DOMID_OFFSET) == (0x0102, 0x0A0B0C0D)
    assert gt.GRANT_ENTRY_V1_SIZE == 8
    assert gt.grant_entry_v1_slot(0) == (0, 0)
    assert gt.grant_entry_v1_slot(511) == (0, 511 * 8)
    assert gt.grant_entry_v1_slot(512) == (1, 0)
    assert gt.grant_entry_v1_slot(1027) == (2, 3 * 8)
