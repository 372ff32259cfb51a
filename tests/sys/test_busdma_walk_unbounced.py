"""The load walk of a tag that could bounce, over a buffer that needs no bounce page.

FreeBSD's x86 ``busdma_bounce.c`` walks a buffer of a tag that could bounce
(``lowaddr`` below the top of memory or an alignment above 1) chunk by chunk:
``_bus_dmamap_count_pages`` counts the chunks ``must_bounce`` holds of, then
``_bus_dmamap_load_buffer`` takes each chunk's address again and adds it with
``_bus_dmamap_addseg``. A chunk ends at a page end, at ``maxsegsz`` and at a
boundary line. When ``maxsegsz`` is at least a page, no boundary line falls
inside a page and no page start must bounce, the chunks are the pages, the
count is 0 and the segments are those of the pages taken in one lookup: what
gntdma then does. These tests hold it to the chunk walk it replaces (the same
code with the page lookup turned off) on many tags and buffers, and check
that the lookup per chunk is gone (blkfront's tag has an alignment of 512,
as FreeBSD's ``xbd_connect`` creates it, so every block I/O takes this walk).
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from gntdma_sys_testlib import FOUR_GIB, Rec, mk_map, mk_tag

import gntdma.sys._busdma_bounce as bounce_mod
from conftest import make_kernel
from gntdma.sys import (
    BUS_DMA_NOWAIT,
    BUS_SPACE_MAXADDR,
    BUS_SPACE_UNRESTRICTED,
    M_DEVBUF,
    M_WAITOK,
    PAGE_SIZE,
    Kernel,
    bus_dmamap_load,
    bus_dmamap_load_ma,
    bus_dmamap_load_phys,
    bus_dmamap_unload,
)
from gntdma.sys._busdma_impl import buffer_pieces_unbounced

HIGH_PFN = 0x100000


def test_a_tag_that_could_bounce_loads_pages_needing_no_bounce_without_a_lookup_per_chunk(
        kern: Kernel, monkeypatch: pytest.MonkeyPatch) -> None:
    tag = mk_tag(kern, alignment=512, boundary=PAGE_SIZE, maxsegsz=PAGE_SIZE)
    map = mk_map(tag)
    va = kern.malloc(16 * PAGE_SIZE, M_DEVBUF, M_WAITOK)
    va = (va + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    want = [kern.pmap_kextract(va + i * PAGE_SIZE) for i in range(15)]
    calls: list[int] = []
    real = kern.pmap_kextract

    def counting(v: int) -> int:
        calls.append(v)
        return real(v)

    monkeypatch.setattr(kern, "pmap_kextract", counting)
    for flags in (BUS_DMA_NOWAIT, 0):  # 0: sleepable, the whole descriptor counted first
        rec = Rec()
        assert bus_dmamap_load(tag, map, va, 15 * PAGE_SIZE, rec, None, flags) == 0
        assert calls == []  # neither the count nor the walk looks a chunk up
        _arg, segs, nseg, error = rec.last
        assert error == 0 and nseg == 15
        assert [(s.ds_addr, s.ds_len) for s in segs] == [(pa, PAGE_SIZE) for pa in want]
        assert map.pagesneeded == 0 and not map.bpages  # type: ignore[attr-defined]
        bus_dmamap_unload(tag, map)
    monkeypatch.undo()
    kern.free(va, M_DEVBUF)


def _load_once(rng_seed: int, slow: bool, monkeypatch: pytest.MonkeyPatch,
               taken: list[int]) -> Any:
    """One load on a fresh kernel (the same seed: the same pages and bounce pages),
    with the page lookup on (each time it is taken counted in ``taken``), or off
    (``slow``: the chunk walk)."""
    rng = random.Random(rng_seed)
    kern = make_kernel()

    def counted(*a: Any) -> Any:
        pieces = None if slow else buffer_pieces_unbounced(*a)
        if pieces:
            taken.append(rng_seed)
        return pieces

    monkeypatch.setattr(bounce_mod, "buffer_pieces_unbounced", counted)
    try:
        alignment = rng.choice([2, 512, PAGE_SIZE, 2 * PAGE_SIZE])
        boundary = rng.choice([0, 1024, PAGE_SIZE, 2 * PAGE_SIZE, 1 << 16])
        maxsegsz = rng.choice([512, 3000, PAGE_SIZE, 3 * PAGE_SIZE, 1 << 20])
        if boundary != 0:
            maxsegsz = min(maxsegsz, boundary)
        lowaddr = rng.choice([BUS_SPACE_MAXADDR, BUS_SPACE_MAXADDR, FOUR_GIB - 1])
        nsegs = rng.choice([1, 5, 17, BUS_SPACE_UNRESTRICTED])
        tag = mk_tag(kern, alignment=alignment, boundary=boundary, lowaddr=lowaddr,
                     maxsize=16 * PAGE_SIZE, maxsegsz=maxsegsz, nsegments=nsegs)
        map = mk_map(tag)
        kind = rng.choice(["vaddr", "phys", "ma"])
        off = rng.choice([0, 0, 512, 100, rng.randrange(0, 2 * PAGE_SIZE)])
        n = rng.randrange(0, 12 * PAGE_SIZE)
        flags = rng.choice([BUS_DMA_NOWAIT, 0])
        rec = Rec()
        va = kern.malloc(16 * PAGE_SIZE, M_DEVBUF, M_WAITOK)
        if kind == "vaddr":
            rc = bus_dmamap_load(tag, map, va + off, n, rec, None, flags)
        elif kind == "phys":
            pa = rng.choice([kern.pmap_kextract(va), HIGH_PFN * PAGE_SIZE]) + off
            n = min(n, PAGE_SIZE - off % PAGE_SIZE)
            rc = bus_dmamap_load_phys(tag, map, pa, n, rec, None, flags)
        else:
            pfns = [rng.choice([kern.pmap_kextract(va + i * PAGE_SIZE) >> 12, HIGH_PFN + i])
                    if rng.random() < 0.3 else kern.pmap_kextract(va + i * PAGE_SIZE) >> 12
                    for i in range(16)]
            rc = bus_dmamap_load_ma(tag, map, pfns, min(n, 14 * PAGE_SIZE), off, rec, None,
                                    flags)
        got = (rc, [(c[1], c[2], c[3]) for c in rec.calls], map.pagesneeded,  # type: ignore[attr-defined]
               len(map.bpages), kern.busdma.bounce_pages_free)  # type: ignore[attr-defined]
        bus_dmamap_unload(tag, map)
        kern.free(va, M_DEVBUF)
        return got
    finally:
        monkeypatch.undo()
        kern.shutdown()


def test_page_lookup_walk_gives_what_the_chunk_walk_gives_on_tags_that_could_bounce(
        vsched: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    taken: list[int] = []
    bounced = 0
    for seed in range(200):
        fast = _load_once(seed, False, monkeypatch, taken)
        assert fast == _load_once(seed, True, monkeypatch, []), seed
        bounced += fast[3] > 0
    assert bounced > 20 and len(set(taken)) > 25, (bounced, len(set(taken)))
