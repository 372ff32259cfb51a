"""A persistent load of a kernel virtual buffer within one page (``PersistentPool.load``).

Under a tag whose boundary and ``maxsegsz`` are ``PAGE_SIZE`` such a buffer is one
piece (FreeBSD sys/x86/x86/busdma_bounce.c ``_bus_dmamap_load_buffer``: a chunk ends
at a page end), so ``load`` puts it on the next pool page itself; it must do what
the page walk (``_load_pages``) does: the same segment, piece, pages added and
error, with segments already used, any alignment and segment limit, a page
shortage (ENOMEM) and an unmapped page (the same fault).
"""

from __future__ import annotations

import errno
import random

import pytest
from busdma_helpers import PAGE

from gntdma.sched import KernelPanic, Mutex
from gntdma.sys import (
    BUS_SPACE_MAXADDR,
    M_BUSDMA_XEN,
    M_DEVBUF,
    M_WAITOK,
    BusDmaTag,
    bus_dma_segment_t,
    bus_dma_tag_create,
    bus_dma_tag_destroy,
    busdma_lock_mutex,
)
from gntdma.toolstack.host import Guest, Host
from gntdma.xen.busdma import xen_get_dma_tag
from gntdma.xen.busdma_persist import PersistentPool

_Outcome = tuple[int, list[tuple[int, int, int]], list[int], list[int], int]


def _tag(g: Guest, lock: Mutex, alignment: int, nsegments: int) -> BusDmaTag:
    error, tag = bus_dma_tag_create(
        xen_get_dma_tag(g.kernel), alignment, PAGE, BUS_SPACE_MAXADDR, BUS_SPACE_MAXADDR,
        64 * PAGE, nsegments, PAGE, 0, busdma_lock_mutex, lock)
    assert error == 0 and tag is not None
    return tag


def _outcome(pool: PersistentPool, segs: list[bus_dma_segment_t], error: int) -> _Outcome:
    """Each segment as (pool page index, offset, length), the pieces, the pages, the error."""
    index = {pa >> 12: i for i, (_va, pa) in enumerate(pool.pages)}
    shape = [(index[s.ds_addr >> 12], s.ds_addr & (PAGE - 1), s.ds_len) for s in segs]
    assert [s.ds_addr for s in segs] == pool.dsts and [s.ds_len for s in segs] == pool.lens
    return error, shape, list(pool.bufs), list(pool.lens), len(pool.pages)


def test_a_buffer_within_one_page_is_loaded_as_the_page_walk_loads_it(host: Host) -> None:
    g = host.create_guest("g", memory_mb=16)
    lock = Mutex("drv")
    k = g.kernel
    rng = random.Random(20261204)
    tags = {(al, ns): _tag(g, lock, al, ns)
            for al in (1, 512, 2048, PAGE, 2 * PAGE) for ns in (1, 2, 8, -1)}
    va = k.malloc(4 * PAGE, M_DEVBUF, M_WAITOK)
    seen: set[int] = set()
    for _case in range(300):
        tag = tags[rng.choice(list(tags))]
        off = rng.choice([0, 1, 512, 1000, 2048, PAGE - 512, PAGE - 1])
        n = rng.randint(0, PAGE - off)
        a = va + rng.randrange(4) * PAGE + off
        used = rng.randint(0, 2)  # segments of earlier buffers of a chained load
        preload = rng.randint(0, 3)
        short = rng.random() < 0.2
        got: list[_Outcome] = []
        for how in ("load", "_load_pages"):
            p = PersistentPool(k)
            assert p._page(tag, preload - 1)
            segs: list[bus_dma_segment_t] = []
            for _ in range(used):
                assert p.load(tag, "vaddr", va + 3 * PAGE, (), PAGE, segs) in (0, errno.EFBIG)
            if short:
                k.inject_malloc_failure(M_BUSDMA_XEN, 1)
            error = getattr(p, how)(tag, "vaddr", a, (), n, segs)
            k._inject.clear()
            got.append(_outcome(p, segs, error))
            p.free()
        assert got[0] == got[1], (tag.alignment, tag.nsegments, off, n, used, preload, short)
        seen.add(got[0][0])
    assert {0, errno.ENOMEM, errno.EFBIG} <= seen  # fits, out of pages, out of segments
    k.free(va, M_DEVBUF)
    for tag in tags.values():
        assert bus_dma_tag_destroy(tag) == 0


def test_a_buffer_within_an_unmapped_page_faults_as_the_page_walk_does(host: Host) -> None:
    g = host.create_guest("g", memory_mb=16)
    k = g.kernel
    tag = _tag(g, Mutex("drv"), 512, 8)
    va = k.malloc(PAGE, M_DEVBUF, M_WAITOK)
    k.free(va, M_DEVBUF)  # (a malloc'd page is unmapped when freed)
    texts = []
    for how in ("load", "_load_pages"):
        p = PersistentPool(k)
        with pytest.raises(KernelPanic) as e:
            getattr(p, how)(tag, "vaddr", va + 512, (), 1024, [])
        texts.append(str(e.value))
        assert p.dsts == [] and len(p) == 0
        p.free()
    assert texts[0] == texts[1] and "page fault" in texts[0]
    assert bus_dma_tag_destroy(tag) == 0
