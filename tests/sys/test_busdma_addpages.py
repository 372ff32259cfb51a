"""Segments of a buffer's pages made at once: the rules of the chunk-by-chunk walk.

FreeBSD's x86 ``busdma_bounce.c`` (``_bus_dmamap_load_buffer`` and
``_bus_dmamap_addseg``) adds a buffer that needs no bounce page chunk by chunk:
a chunk ends at a page end, at ``maxsegsz`` and at a boundary line, and it
coalesces into the last segment when it is contiguous with it, the merged
length is at most ``maxsegsz`` and the merged segment stays within one
boundary window, else it starts a new segment while ``nsegments`` last.
``bus_dmamap_addpages`` makes the segments of a buffer's pages at once on a
tag whose boundary is one page (blkfront's, and every Xen tag's); these tests
hold it to ``bus_dmamap_addpieces``, the same rules applied piece by piece.
"""

from __future__ import annotations

import random

from gntdma_sys_testlib import mk_tag

from gntdma.sys import BUS_SPACE_UNRESTRICTED, PAGE_SIZE, Kernel, bus_dma_segment_t, ma_pieces
from gntdma.sys._busdma_impl import bus_dmamap_addpages, bus_dmamap_addpieces


def _pages(rng: random.Random) -> tuple[list[int], int, int]:
    """Page frames with runs of contiguous ones, an offset into the first, a length."""
    pfns: list[int] = []
    while len(pfns) < rng.randint(1, 12):
        start = rng.randint(1, 40)
        pfns.extend(range(start, start + rng.randint(1, 4)))
    off = rng.choice([0, 512, rng.randrange(PAGE_SIZE)])
    room = len(pfns) * PAGE_SIZE - off
    return pfns, off, rng.choice([room, rng.randint(1, room)])


def test_addpages_makes_the_segments_the_piece_by_piece_rules_make(kern: Kernel) -> None:
    rng = random.Random(14)
    tags = [mk_tag(kern, alignment=512, boundary=PAGE_SIZE, maxsegsz=PAGE_SIZE, nsegments=n)
            for n in (BUS_SPACE_UNRESTRICTED, 1, 3, 8)]
    tags.append(mk_tag(kern, boundary=PAGE_SIZE))  # maxsegsz above a page: still one page
    tags.append(mk_tag(kern, boundary=2 * PAGE_SIZE, maxsegsz=3 * PAGE_SIZE))
    tags.append(mk_tag(kern, maxsegsz=PAGE_SIZE // 2, nsegments=20))
    merged = fallback = 0
    for i in range(3000):
        tag = tags[i % len(tags)]
        pfns, off, n = _pages(rng)
        pieces = ma_pieces(pfns, off, n)
        before: list[bus_dma_segment_t] = []
        if rng.random() < 0.5:  # a buffer before this one, perhaps ending where it starts
            pa = pieces[0][0]
            ln = rng.randint(1, PAGE_SIZE)
            before = [bus_dma_segment_t(pa - ln if rng.random() < 0.7 else pa + 7 * PAGE_SIZE,
                                        ln)]
        want = list(before)
        want_n = bus_dmamap_addpieces(tag, pieces, want)
        got = list(before)
        got_n = bus_dmamap_addpages(tag, pieces, got)
        assert (got_n, got) == (want_n, want), (i, pieces, before)
        assert all(type(s) is bus_dma_segment_t for s in got)
        merged += len(want) < len(before) + len(pieces)
        fallback += want_n < n
    assert merged > 100 and fallback > 100, (merged, fallback)
