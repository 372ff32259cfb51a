"""blkif: golden bytes in both ABIs, ABI translation, arrays, keys and constants.

The layouts themselves are compared with the headers (x86_64 and x86_32) by
test_c_layout.py; these tests pin the bytes and the Python-side behaviour.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gntdma.abi._wire import WireStruct
from gntdma.abi.blkif import (
    BLKIF_ABI_X86_32,
    BLKIF_ABI_X86_64,
    BLKIF_DISCARD_SECURE,
    BLKIF_MAX_INDIRECT_SEGMENTS,
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_SECTOR_SIZE,
    BLKIF_SECTORS_PER_PAGE,
    BLKIF_SEGS_PER_INDIRECT_FRAME,
    VDISK,
    BlkifAbi,
    BlkifKey,
    BlkifOp,
    BlkifRequest,
    BlkifRequest32,
    BlkifRequestDiscard,
    BlkifRequestDiscard32,
    BlkifRequestIndirect,
    BlkifRequestIndirect32,
    BlkifRequestSegment,
    BlkifResponse,
    BlkifResponse32,
    BlkifRsp,
    blkif_abi,
    blkif_indirect_pages,
    blkif_queue_key,
    blkif_ring_ref_key,
)

SEGS = (BlkifRequestSegment(gref=8, first_sect=0, last_sect=7),
        BlkifRequestSegment(gref=0x12345678, first_sect=1, last_sect=3))
SEG_BYTES = "08000000 00 07 0000 78563412 01 03 0000" + " 0000000000000000" * 9
ID = "0807060504030201"
SECTOR = "0010000000000000"

GOLDEN: list[tuple[WireStruct, str]] = [
    (SEGS[1], "78563412 01 03 0000"),
    (BlkifRequest(operation=BlkifOp.WRITE, nr_segments=2, handle=0xCA00,
                  id=0x0102030405060708, sector_number=0x1000, seg=SEGS),
     f"01 02 00ca 00000000 {ID} {SECTOR} {SEG_BYTES}"),
    (BlkifRequest32(operation=BlkifOp.WRITE, nr_segments=2, handle=0xCA00,
                    id=0x0102030405060708, sector_number=0x1000, seg=SEGS),
     f"01 02 00ca {ID} {SECTOR} {SEG_BYTES}"),
    (BlkifRequestDiscard(flag=BLKIF_DISCARD_SECURE, handle=0xCA00, id=0x0102030405060708,
                         sector_number=0x1000, nr_sectors=0x800),
     f"05 01 00ca 00000000 {ID} {SECTOR} 0008000000000000"),
    (BlkifRequestDiscard32(flag=0, handle=0xCA00, id=0x0102030405060708,
                           sector_number=0x1000, nr_sectors=0x800),
     f"05 00 00ca {ID} {SECTOR} 0008000000000000"),
    (BlkifRequestIndirect(indirect_op=BlkifOp.READ, nr_segments=513, id=0x0102030405060708,
                          sector_number=0x1000, handle=0xCA00, indirect_grefs=(100, 101)),
     f"06 00 0102 00000000 {ID} {SECTOR} 00ca 0000 64000000 65000000"
     + " 00000000" * 6 + " 00000000"),
    (BlkifRequestIndirect32(indirect_op=BlkifOp.WRITE, nr_segments=512, id=0x0102030405060708,
                            sector_number=0x1000, handle=0xCA00, indirect_grefs=(100,)),
     f"06 01 0002 {ID} {SECTOR} 00ca 0000 64000000" + " 00000000" * 7 + " 0000000000000000"),
    (BlkifResponse(id=0x0102030405060708, operation=BlkifOp.FLUSH_DISKCACHE,
                   status=BlkifRsp.EOPNOTSUPP),
     f"{ID} 03 00 feff 00000000"),
    (BlkifResponse32(id=0x0102030405060708, operation=BlkifOp.READ, status=BlkifRsp.ERROR),
     f"{ID} 00 00 ffff"),
]


@pytest.mark.parametrize(("obj", "hexbytes"), GOLDEN, ids=lambda x: type(x).__name__)
def test_golden_bytes(obj: WireStruct, hexbytes: str) -> None:
    raw = bytes.fromhex(hexbytes.replace(" ", ""))
    assert obj.pack().hex() == raw.hex()
    assert type(obj).unpack(raw) == obj


def test_sizes_and_x86_32_offsets_of_xen_abi_md() -> None:
    sizes = {c.__name__: c.STRUCT.size for c in {type(o) for o, _ in GOLDEN}}
    assert sizes == {"BlkifRequestSegment": 8, "BlkifRequest": 112, "BlkifRequest32": 108,
                     "BlkifRequestDiscard": 32, "BlkifRequestDiscard32": 28,
                     "BlkifRequestIndirect": 64, "BlkifRequestIndirect32": 64,
                     "BlkifResponse": 16, "BlkifResponse32": 12}
    # the offsets xen-abi.md 4.1 gives for x86_32 (also measured by test_c_layout's -m32 probe)
    f32 = {c.__name__: {m: o for m, o, _ in c.FIELDS}
           for c in (BlkifRequest32, BlkifRequestIndirect32, BlkifResponse32)}
    assert (f32["BlkifRequest32"]["id"], f32["BlkifRequest32"]["sector_number"],
            f32["BlkifRequest32"]["seg"]) == (4, 12, 20)
    assert (f32["BlkifRequestIndirect32"]["id"], f32["BlkifRequestIndirect32"]["handle"],
            f32["BlkifRequestIndirect32"]["indirect_grefs"]) == (4, 20, 24)
    assert (f32["BlkifResponse32"]["operation"], f32["BlkifResponse32"]["status"]) == (8, 10)


def test_arrays_follow_the_request_counts() -> None:
    raw = bytearray(BlkifRequest(nr_segments=11, seg=tuple(
        BlkifRequestSegment(gref=i) for i in range(11))).pack())
    raw[1] = 200  # a hostile nr_segments: the value is kept for the backend to refuse
    r = BlkifRequest.unpack(bytes(raw))
    assert r.nr_segments == 200 and [s.gref for s in r.seg] == list(range(11))
    raw[1] = 0  # a flush: no segments
    assert BlkifRequest.unpack(bytes(raw)).seg == ()
    ind = BlkifRequestIndirect(nr_segments=4096, indirect_grefs=tuple(range(1, 9))).pack()

    def grefs(nr: int) -> tuple[int, ...]:
        b = bytearray(ind)
        b[2:4] = nr.to_bytes(2, "little")
        return BlkifRequestIndirect.unpack(bytes(b)).indirect_grefs

    assert grefs(0) == ()
    assert grefs(1) == grefs(512) == (1,)
    assert grefs(513) == (1, 2)
    assert grefs(4096) == grefs(0xFFFF) == tuple(range(1, 9))


def test_too_many_array_entries_raise() -> None:
    with pytest.raises(ValueError, match="12 segments"):
        BlkifRequest(seg=(BlkifRequestSegment(),) * 12).pack()
    with pytest.raises(ValueError, match="9 indirect pages"):
        BlkifRequestIndirect32(indirect_grefs=(1,) * 9).pack()
    with pytest.raises(ValueError):
        BlkifRequestIndirect(indirect_grefs=(-1,)).pack()
    with pytest.raises(ValueError):
        BlkifRequest(seg=(BlkifRequestSegment(first_sect=256),)).pack()


@pytest.mark.parametrize("abi", [BLKIF_ABI_X86_64, BLKIF_ABI_X86_32], ids=lambda a: a.protocol)
def test_abi_translates_every_request_kind(abi: BlkifAbi) -> None:
    reqs = [
        BlkifRequest(operation=BlkifOp.READ, nr_segments=2, handle=5, id=7, sector_number=9,
                     seg=SEGS),
        BlkifRequest(operation=BLKIF_OP_FLUSH_DISKCACHE, id=8),
        BlkifRequest(operation=0x99, nr_segments=1, id=9, seg=SEGS[:1]),  # unknown op
        BlkifRequestDiscard(flag=1, handle=5, id=10, sector_number=11, nr_sectors=12),
        BlkifRequestIndirect(indirect_op=BlkifOp.WRITE, nr_segments=1024, id=13,
                             sector_number=14, handle=5, indirect_grefs=(20, 21)),
    ]
    slot = bytearray(b"\xee" * 200)
    for req in reqs:
        raw = abi.pack_request(req)
        assert len(raw) <= abi.entry_size
        slot[40:40 + len(raw)] = raw
        back = abi.unpack_request(bytes(slot), 40)
        assert back == req and type(back) is type(req)
    rsp = BlkifResponse(id=2**64 - 1, operation=BlkifOp.INDIRECT, status=BlkifRsp.ERROR)
    raw = abi.pack_response(rsp)
    assert len(raw) == abi.response.STRUCT.size
    assert abi.unpack_response(raw) == rsp


def test_x86_32_wire_differs_but_means_the_same() -> None:
    req = BlkifRequest(operation=BlkifOp.WRITE, nr_segments=2, id=3, sector_number=4, seg=SEGS)
    raw32 = BLKIF_ABI_X86_32.pack_request(req)
    assert raw32 == BlkifRequest32(operation=1, nr_segments=2, id=3, sector_number=4,
                                   seg=SEGS).pack()
    assert raw32 != BLKIF_ABI_X86_64.pack_request(req)[:108]
    assert BLKIF_ABI_X86_32.unpack_request(raw32) == req


@given(st.binary(min_size=112, max_size=112))
def test_unpack_request_never_fails_on_content(raw: bytes) -> None:
    for abi in (BLKIF_ABI_X86_64, BLKIF_ABI_X86_32):
        req = abi.unpack_request(raw)
        assert abi.unpack_request(abi.pack_request(req)) == req


def test_protocol_selection() -> None:
    assert blkif_abi(None) is blkif_abi("") is blkif_abi("x86_64-abi") is BLKIF_ABI_X86_64
    assert blkif_abi("x86_32-abi") is BLKIF_ABI_X86_32
    assert blkif_abi("arm-abi") is None and blkif_abi("x86_64-abi\0") is None
    assert (BLKIF_ABI_X86_64.entry_size, BLKIF_ABI_X86_32.entry_size) == (112, 108)
    assert [BLKIF_ABI_X86_32.ring_size(p) for p in (1, 2, 4, 8, 16)] == [32, 64, 128, 256, 512]


def test_constants_and_keys() -> None:
    assert BLKIF_MAX_SEGMENTS_PER_REQUEST == 11
    assert BLKIF_SEGS_PER_INDIRECT_FRAME == 512 and BLKIF_MAX_INDIRECT_SEGMENTS == 4096
    assert (BLKIF_SECTOR_SIZE, BLKIF_SECTORS_PER_PAGE) == (512, 8)
    assert [blkif_indirect_pages(n) for n in (0, 1, 512, 513, 4096)] == [0, 1, 1, 2, 8]
    assert [int(o) for o in BlkifOp] == list(range(7))
    assert [int(s) for s in BlkifRsp] == [0, -1, -2]
    assert VDISK.READONLY | VDISK.CDROM == 5
    assert BlkifKey.RING_REF == "ring-ref" and f"{BlkifKey.EVENT_CHANNEL}" == "event-channel"
    assert blkif_ring_ref_key(0) == "ring-ref0" and blkif_ring_ref_key(15) == "ring-ref15"
    assert blkif_queue_key(1) == "queue-1"
    assert BlkifKey.FEATURE_MAX_INDIRECT_SEGMENTS == "feature-max-indirect-segments"
    assert BlkifKey.MAX_RING_PAGE_ORDER == "max-ring-page-order"
    assert BlkifKey.FEATURE_FLUSH_CACHE == "feature-flush-cache"
    values = [k.value for k in BlkifKey]
    assert len(values) == len(set(values))
    assert all(v == v.lower() and " " not in v and "/" not in v for v in values)
