"""How many ring requests a bio takes: a request is as many pages as it has segments.

Linux xen-blkfront (``drivers/block/xen-blkfront.c``, ``blkif_set_queue_limits``)
lets a request carry ``max_hw_sectors = segments * XEN_PAGE_SIZE / 512`` bytes in
at most ``segments`` segments of one aligned page each: a page-aligned 1 MiB
bio on a backend that allows 256 indirect segments is one ring request.
FreeBSD's ``XBD_SEGS_TO_SIZE`` (``(segs - 1) * PAGE_SIZE``, ``block.h``) keeps one
page back so that any alignment fits, which split every such bio 255 + 1.
Here a bio is split by the pages it touches, so an aligned one uses every
segment and an unaligned one still fits.
"""

from __future__ import annotations

from test_blkfront_lib import PAGE, SECT, Rig, make_rig, stamp, teardown

from gntdma.abi.blkif import BLKIF_OP_INDIRECT, BLKIF_OP_WRITE
from gntdma.sys import BIO_READ, BIO_UNMAPPED, BIO_WRITE, M_TEMP, M_WAITOK, bio, biowait
from gntdma.toolstack.host import Host

MiB = 1 << 20


def _io(rig: Rig, cmd: int, offset: int, va: int, length: int) -> int:
    bp = bio(bio_cmd=cmd, bio_offset=offset, bio_bcount=length, bio_data=va)
    rig.sc.xbd_strategy(bp)
    return biowait(bp)


def test_page_aligned_1mib_bio_is_one_ring_request_when_the_backend_allows_256_segments(
        host: Host) -> None:
    rig = make_rig(host, max_indirect_segments=256)
    sc, kern = rig.sc, rig.g.kernel
    assert sc.statistics().max_request_segments == 256
    va = kern.malloc(MiB, M_TEMP, M_WAITOK)
    assert va % PAGE == 0
    data = stamp(0, MiB, 7)
    kern.kva_write(va, data)
    before = sc.statistics().requests
    assert _io(rig, BIO_WRITE, 0, va, MiB) == 0
    assert sc.statistics().requests - before == 1
    assert rig.be.log == [(BLKIF_OP_INDIRECT, 0, 256)]
    assert bytes(rig.be.disk[:MiB]) == data
    kern.kva_zero(va, MiB)
    assert _io(rig, BIO_READ, 0, va, MiB) == 0
    assert sc.statistics().requests - before == 2
    assert kern.kva_read(va, MiB) == data
    kern.free(va, M_TEMP)
    teardown(rig)


def test_unaligned_bio_is_split_where_a_request_would_touch_one_page_more(host: Host) -> None:
    """Starting 512 bytes into a page, 1 MiB touches 257 pages: two requests, each within
    256 segments, the first as long as 256 pages allow."""
    rig = make_rig(host, max_indirect_segments=256)
    kern = rig.g.kernel
    va = kern.malloc(MiB + PAGE, M_TEMP, M_WAITOK)
    data = stamp(SECT, MiB, 9)
    kern.kva_write(va + SECT, data)
    assert _io(rig, BIO_WRITE, SECT, va + SECT, MiB) == 0
    first = (256 * PAGE - SECT) // SECT
    assert rig.be.log == [(BLKIF_OP_INDIRECT, 1, 256), (BLKIF_OP_WRITE, 1 + first, 1)]
    assert bytes(rig.be.disk[SECT:SECT + MiB]) == data
    kern.kva_zero(va, MiB + PAGE)
    assert _io(rig, BIO_READ, SECT, va + SECT, MiB) == 0
    assert kern.kva_read(va + SECT, MiB) == data
    assert rig.be.errors == []
    kern.free(va, M_TEMP)
    teardown(rig)


def test_unmapped_page_aligned_bio_is_one_ring_request(host: Host) -> None:
    """The same rule for an unmapped bio (a page array, ``bio_ma_offset`` 0)."""
    rig = make_rig(host, max_indirect_segments=256)
    sc, kern = rig.sc, rig.g.kernel
    va = kern.malloc(MiB, M_TEMP, M_WAITOK)
    data = stamp(0, MiB, 11)
    kern.kva_write(va, data)
    pfns = [kern.pmap_kextract(va + i * PAGE) // PAGE for i in range(MiB // PAGE)]
    bp = bio(bio_cmd=BIO_WRITE, bio_flags=BIO_UNMAPPED, bio_offset=2 * MiB, bio_bcount=MiB,
             bio_ma=pfns, bio_ma_offset=0, bio_ma_n=len(pfns))
    sc.xbd_strategy(bp)
    assert biowait(bp) == 0
    assert rig.be.log == [(BLKIF_OP_INDIRECT, 2 * MiB // SECT, 256)]
    assert bytes(rig.be.disk[2 * MiB:3 * MiB]) == data
    kern.free(va, M_TEMP)
    teardown(rig)


def test_bio_larger_than_one_request_is_split_into_full_requests(host: Host) -> None:
    """3 MiB page-aligned: three requests of 256 segments (not 255, 255, 255, 3)."""
    rig = make_rig(host, max_indirect_segments=256)
    sc, kern = rig.sc, rig.g.kernel
    va = kern.malloc(3 * MiB, M_TEMP, M_WAITOK)
    data = stamp(0, 3 * MiB, 13)
    kern.kva_write(va, data)
    assert _io(rig, BIO_WRITE, 0, va, 3 * MiB) == 0
    assert [n for _op, _s, n in rig.be.log] == [256, 256, 256]
    assert bytes(rig.be.disk[:3 * MiB]) == data
    assert sc.statistics().errors == 0
    kern.free(va, M_TEMP)
    teardown(rig)
