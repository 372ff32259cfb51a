"""The load walk of a tag that never bounces: its pages looked up at once.

FreeBSD's x86 ``busdma_bounce.c`` (``_bus_dmamap_load_buffer``,
``_bus_dmamap_load_phys``, ``_bus_dmamap_load_ma``) walks a buffer chunk by
chunk, each chunk ending at a page end, at ``maxsegsz`` and at a boundary line
(``_bus_dmamap_addseg``), and only a tag that could bounce (``lowaddr`` below
the top of memory or an alignment above 1, ``must_bounce``) needs a look at
every chunk's address before it is added. A tag that never bounces gives the
same segments from the pages of the buffer taken in one lookup: what this file
checks, against the chunk walk itself (reference/busdma.md section 5 for the
return contract: EFBIG with the segments used up).
"""

from __future__ import annotations

import errno
import random

import pytest
from gntdma_sys_testlib import FOUR_GIB, Rec, mk_map, mk_tag

from gntdma.sched import KernelPanic
from gntdma.sys import (
    BUS_DMA_NOWAIT,
    BUS_SPACE_UNRESTRICTED,
    M_DEVBUF,
    M_WAITOK,
    PAGE_SIZE,
    BusDmaTag,
    Kernel,
    bus_dma_segment_t,
    bus_dmamap_addseg,
    bus_dmamap_load,
    bus_dmamap_load_ma,
    bus_dmamap_load_phys,
    bus_dmamap_unload,
)
from gntdma.sys._busdma_impl import buffer_accessors


def _chunk_walk(kern: Kernel, tag: BusDmaTag, kind: str, a: int, ma: list[int],
                n: int) -> tuple[int, list[bus_dma_segment_t]]:
    """The reference: chunk by chunk, one address lookup per chunk (no bouncing)."""
    addr_at, _ = buffer_accessors(kern, kind, a, ma)
    segs: list[bus_dma_segment_t] = []
    off = 0
    while off < n:
        cur = addr_at(off)
        sg = min(PAGE_SIZE - (cur & (PAGE_SIZE - 1)), n - off, tag.maxsegsz)
        b = tag.boundary
        if b != 0 and (cur ^ (cur + sg - 1)) & ~(b - 1):
            sg = ((cur + b) & ~(b - 1)) - cur
        added = bus_dmamap_addseg(tag, cur, sg, segs)
        if added == 0:
            break
        off += added
    return (errno.EFBIG if off < n else 0), segs


def test_never_bouncing_tag_looks_its_pages_up_without_a_lookup_per_chunk(
        kern: Kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    tag = mk_tag(kern, maxsegsz=PAGE_SIZE)
    map = mk_map(tag)
    va = kern.malloc(16 * PAGE_SIZE, M_DEVBUF, M_WAITOK)
    calls: list[int] = []
    real = kern.pmap_kextract

    def counting(v: int) -> int:
        calls.append(v)
        return real(v)

    monkeypatch.setattr(kern, "pmap_kextract", counting)
    rec = Rec()
    assert bus_dmamap_load(tag, map, va + 100, 15 * PAGE_SIZE, rec, None, BUS_DMA_NOWAIT) == 0
    assert calls == []  # one page-table pass for the whole buffer, no call per page
    monkeypatch.undo()
    assert rec.last[3] == 0
    assert (0, rec.last[1]) == _chunk_walk(kern, tag, "vaddr", va + 100, [], 15 * PAGE_SIZE)
    bus_dmamap_unload(tag, map)
    kern.free(va, M_DEVBUF)


def test_direct_walk_gives_the_segments_and_error_of_the_chunk_walk(kern: Kernel) -> None:
    rng = random.Random(14)
    va = kern.malloc(24 * PAGE_SIZE, M_DEVBUF, M_WAITOK)
    pfns = [kern.pmap_kextract(va + i * PAGE_SIZE) >> 12 for i in range(24)]
    pfns[5] = pfns[4] + 1  # some pages physically contiguous, so segments coalesce
    pfns[6] = pfns[5] + 1
    tested = coalesced = 0
    for _ in range(600):
        boundary = rng.choice([0, PAGE_SIZE, 2 * PAGE_SIZE, 1 << 16])
        maxsegsz = rng.choice([512, 3000, PAGE_SIZE, 3 * PAGE_SIZE, 1 << 20])
        if boundary != 0:
            maxsegsz = min(maxsegsz, boundary)
        nsegs = rng.choice([1, 2, 5, 17, BUS_SPACE_UNRESTRICTED])
        tag = mk_tag(kern, boundary=boundary, maxsegsz=maxsegsz, nsegments=nsegs)
        map = mk_map(tag)
        kind = rng.choice(["vaddr", "phys", "ma"])
        off = rng.randrange(0, 3 * PAGE_SIZE)
        n = rng.randrange(0, 20 * PAGE_SIZE - off)
        rec = Rec()
        ma: list[int] = []
        if kind == "vaddr":
            a = va + off
            rc = bus_dmamap_load(tag, map, a, n, rec, None, BUS_DMA_NOWAIT)
        elif kind == "phys":
            a = pfns[2] * PAGE_SIZE + off
            n = min(n, PAGE_SIZE * 3)
            rc = bus_dmamap_load_phys(tag, map, a, n, rec, None, BUS_DMA_NOWAIT)
        else:
            a, ma = off, pfns
            rc = bus_dmamap_load_ma(tag, map, ma, n, a, rec, None, BUS_DMA_NOWAIT)
        want_error, want_segs = _chunk_walk(kern, tag, kind, a, ma, n)
        assert rc == 0
        _arg, segs, nseg, error = rec.last
        assert error == want_error
        assert (segs, nseg) == ((want_segs, len(want_segs)) if want_error == 0 else ([], 0))
        bus_dmamap_unload(tag, map)
        tested += want_error == 0
        coalesced += any(s.ds_len > PAGE_SIZE for s in want_segs)
    assert tested > 200  # most of them load; the rest run out of segments (EFBIG)
    assert coalesced > 20  # and some segments span pages
    kern.free(va, M_DEVBUF)


def test_direct_walk_faults_at_the_first_unmapped_page(kern: Kernel) -> None:
    tag = mk_tag(kern)
    map = mk_map(tag)
    va = kern.kva_alloc(3)
    pfn = kern.vm_page_alloc()
    assert pfn is not None
    kern.pmap_kenter(va, pfn << 12)  # page 0 mapped, 1 and 2 not
    with pytest.raises(KernelPanic, match=f"page fault, va {va + PAGE_SIZE:#x} not mapped"):
        bus_dmamap_load(tag, map, va, 3 * PAGE_SIZE, Rec(), None, BUS_DMA_NOWAIT)


def test_a_tag_that_can_bounce_still_bounces(kern: Kernel) -> None:
    tag = mk_tag(kern, lowaddr=FOUR_GIB - 1)
    map = mk_map(tag)
    hi = list(range(0x100000, 0x100000 + 4))  # pages above 4 GiB
    rec = Rec()
    assert bus_dmamap_load_ma(tag, map, hi, 2 * PAGE_SIZE, 0, rec, None, BUS_DMA_NOWAIT) == 0
    assert rec.last[3] == 0 and all(s.ds_addr < FOUR_GIB for s in rec.last[1])
    bus_dmamap_unload(tag, map)
