"""xbd_mksegs: the flat ``gref, first_sect, last_sect`` triples of a request's
segments (FreeBSD sys/dev/xen/blkfront/blkfront.c ``xbd_mksegarray``: first_sect
is the segment's 512-byte offset in its page, last_sect the last sector it covers;
the data tag keeps a segment 512-aligned and within one page, as asserted there).

A request of whole pages takes a path of slices; these tests check it gives what
the per-segment walk gives, and that any segment that is not a whole page still
goes through the walk's checks.
"""

from __future__ import annotations

import pytest

from gntdma.dev.blkfront_cmd import xbd_mksegarray, xbd_mksegs
from gntdma.sched import KernelPanic
from gntdma.sys import PAGE_SIZE, bus_dma_segment_t


def _walk(segs: list[bus_dma_segment_t], refs: list[int]) -> list[int]:
    out: list[int] = []
    for s, r in zip(segs, refs, strict=False):
        first = (s.ds_addr % PAGE_SIZE) // 512
        out += [r, first, first + s.ds_len // 512 - 1]
    return out


def test_whole_page_segments_are_sectors_0_to_7_of_their_refs() -> None:
    segs = [bus_dma_segment_t(0x10000 + 0x3000 * i, PAGE_SIZE) for i in range(256)]
    refs = list(range(1000, 1300))
    assert xbd_mksegs(segs, 256, refs) == _walk(segs, refs[:256])
    assert xbd_mksegs(segs, 3, refs) == [1000, 0, 7, 1001, 0, 7, 1002, 0, 7]
    assert [s.last_sect for s in xbd_mksegarray(segs, 4, refs)] == [7, 7, 7, 7]


def test_mixed_segments_give_the_walks_triples() -> None:
    segs = [bus_dma_segment_t(0x10200, PAGE_SIZE - 512)]
    segs += [bus_dma_segment_t(0x20000 + PAGE_SIZE * i, PAGE_SIZE) for i in range(5)]
    segs += [bus_dma_segment_t(0x40000, 1024)]
    refs = [0, 5, 6, 7, 8, 9, 10]  # ref 0 is a value
    assert xbd_mksegs(segs, len(segs), refs) == _walk(segs, refs)


def test_a_page_long_segment_off_a_page_start_crosses_a_page() -> None:
    segs = [bus_dma_segment_t(PAGE_SIZE * i, PAGE_SIZE) for i in range(4)]
    segs[2] = bus_dma_segment_t(PAGE_SIZE * 2 + 512, PAGE_SIZE)
    with pytest.raises(KernelPanic, match=r"segment 2 .* crosses a page"):
        xbd_mksegs(segs, 4, [1, 2, 3, 4])


def test_fewer_refs_than_segments_panics() -> None:
    segs = [bus_dma_segment_t(PAGE_SIZE * i, PAGE_SIZE) for i in range(4)]
    with pytest.raises(KernelPanic, match="4 segments but 3 grant refs"):
        xbd_mksegs(segs, 4, [1, 2, 3])


def test_one_segment_gives_the_walks_triple_or_its_panic() -> None:
    """A one-segment request (a 4 KiB I/O) at every sector offset and length within
    its page gives the walk's triple; a segment the walk refuses (not sector aligned,
    empty, crossing its page) panics with the walk's message."""
    for first in range(8):
        for n in range(1, 9 - first):
            seg = bus_dma_segment_t(0x7000 + first * 512, n * 512)
            assert xbd_mksegs([seg], 1, [0, 9]) == _walk([seg], [0]) == [0, first, first + n - 1]
    bad = [(0x7000 + 100, 512, "not sector aligned"), (0x7000, 100, "not sector aligned"),
           (0x7000, 0, "not sector aligned"), (0x7000 + 512, PAGE_SIZE, "crosses a page"),
           (0x7000 + 3584, 1024, "crosses a page")]
    for addr, ln, what in bad:
        with pytest.raises(KernelPanic, match=rf"segment 0 .* {what}"):
            xbd_mksegs([bus_dma_segment_t(addr, ln)], 1, [4])
