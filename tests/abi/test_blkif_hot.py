"""blkif's hot-path packing gives the bytes of the wire classes, in both ABIs.

The flat-value functions of :mod:`gntdma.abi.blkif_hot` must be byte for byte
what :class:`gntdma.abi.blkif.BlkifAbi` packs and unpacks through the wire
classes (whose layouts test_c_layout.py checks against the Xen headers).
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gntdma.abi.blkif import (
    BLKIF_ABI_X86_32,
    BLKIF_ABI_X86_64,
    BLKIF_OP_INDIRECT,
    BlkifAbi,
    BlkifRequest,
    BlkifRequestIndirect,
    BlkifRequestSegment,
    BlkifResponse,
    blkif_indirect_pages,
)
from gntdma.abi.blkif_hot import (
    blkif_pack_indirect,
    blkif_pack_response,
    blkif_pack_rw,
    blkif_pack_segs,
    blkif_unpack_indirect,
    blkif_unpack_response,
    blkif_unpack_rw,
    blkif_unpack_segs,
)

ABIS = [BLKIF_ABI_X86_64, BLKIF_ABI_X86_32]
u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, (1 << 64) - 1)
segs_st = st.lists(st.tuples(u32, u8, u8), max_size=11)


@pytest.mark.parametrize("abi", ABIS, ids=lambda a: a.protocol)
@given(op=u8, nr=u8, handle=u16, id_=u64, sector=u64, segs=segs_st)
def test_rw_slot_is_the_wire_class_bytes(abi: BlkifAbi, op: int, nr: int, handle: int,
                                         id_: int, sector: int,
                                         segs: list[tuple[int, int, int]]) -> None:
    flat = [v for s in segs for v in s]
    raw = blkif_pack_rw(abi, op, nr, handle, id_, sector, flat)
    req = BlkifRequest(operation=op, nr_segments=nr, handle=handle, id=id_,
                       sector_number=sector, seg=tuple(BlkifRequestSegment(*s) for s in segs))
    assert raw == abi.pack_request(req)
    # unpacking: the segments the count covers (of those written, the rest zeros)
    o, n, h, i, sec, got = blkif_unpack_rw(abi, raw)
    assert (o, n, h, i, sec) == (op, nr, handle, id_, sector)
    padded = list(segs) + [(0, 0, 0)] * (11 - len(segs))
    assert got == padded[:min(nr, 11)]
    if op not in (5, 6):  # discard and indirect slots decode by their own layouts
        back = abi.unpack_request(raw)
        assert isinstance(back, BlkifRequest)
        assert [(s.gref, s.first_sect, s.last_sect) for s in back.seg] == got


@pytest.mark.parametrize("abi", ABIS, ids=lambda a: a.protocol)
@given(iop=u8, nr=u16, id_=u64, sector=u64, handle=u16,
       grefs=st.lists(u32, max_size=8))
def test_indirect_slot_is_the_wire_class_bytes(abi: BlkifAbi, iop: int, nr: int, id_: int,
                                               sector: int, handle: int,
                                               grefs: list[int]) -> None:
    raw = blkif_pack_indirect(abi, iop, nr, id_, sector, handle, grefs)
    req = BlkifRequestIndirect(indirect_op=iop, nr_segments=nr, id=id_, sector_number=sector,
                               handle=handle, indirect_grefs=tuple(grefs))
    assert raw == abi.pack_request(req)
    got = blkif_unpack_indirect(abi, raw)
    back = abi.unpack_request(raw)
    assert isinstance(back, BlkifRequestIndirect)
    assert got == (BLKIF_OP_INDIRECT, iop, nr, id_, sector, handle, back.indirect_grefs)
    assert len(got[6]) == min(8, blkif_indirect_pages(nr))


@given(segs=st.lists(st.tuples(u32, u8, u8), max_size=600))
def test_segment_entries_are_the_wire_class_bytes(segs: list[tuple[int, int, int]]) -> None:
    raw = blkif_pack_segs([v for s in segs for v in s])
    assert raw == b"".join(BlkifRequestSegment(*s).pack() for s in segs)
    assert blkif_unpack_segs(raw) == segs


@pytest.mark.parametrize("abi", ABIS, ids=lambda a: a.protocol)
@given(id_=u64, op=u8, status=st.integers(-0x8000, 0x7FFF))
def test_response_slot_is_the_wire_class_bytes(abi: BlkifAbi, id_: int, op: int,
                                               status: int) -> None:
    raw = blkif_pack_response(abi, id_, op, status)
    assert raw == abi.pack_response(BlkifResponse(id=id_, operation=op, status=status))
    assert blkif_unpack_response(abi, raw) == (id_, op, status)


@pytest.mark.parametrize("abi", ABIS, ids=lambda a: a.protocol)
def test_values_that_do_not_fit_are_value_errors(abi: BlkifAbi) -> None:
    with pytest.raises(ValueError):
        blkif_pack_rw(abi, 0, 12, 0, 0, 0, [1, 0, 7] * 12)
    with pytest.raises(ValueError):
        blkif_pack_rw(abi, 0, 1, 0, 0, 0, [1 << 32, 0, 7])
    with pytest.raises(ValueError):
        blkif_pack_indirect(abi, 0, 9 * 512, 0, 0, 0, list(range(9)))
    with pytest.raises(ValueError):
        blkif_pack_segs([1, 256, 0])
    with pytest.raises(ValueError):
        blkif_pack_response(abi, 0, 0, 0x8000)


@pytest.mark.parametrize("abi", ABIS, ids=lambda a: a.protocol)
@given(op=u8, nr=u8, id_=u64, sector=u64, segs=segs_st, pad=st.integers(0, 64))
def test_rw_unpack_is_the_same_from_bytes_bytearray_and_views(
        abi: BlkifAbi, op: int, nr: int, id_: int, sector: int,
        segs: list[tuple[int, int, int]], pad: int) -> None:
    # a copied-out slot (bytes) unpacks as the shared page's bytes do, at any offset,
    # and a buffer shorter than a slot is refused either way
    flat = [v for s in segs for v in s]
    raw = bytes(pad) + blkif_pack_rw(abi, op, nr, 7, id_, sector, flat) + bytes(3)
    want = blkif_unpack_rw(abi, bytearray(raw), pad)
    assert blkif_unpack_rw(abi, raw, pad) == want
    assert blkif_unpack_rw(abi, memoryview(raw), pad) == want
    short = raw[:pad + abi.request.STRUCT.size - 1]
    for buf in (short, bytearray(short)):
        with pytest.raises(struct.error):
            blkif_unpack_rw(abi, buf, pad)
