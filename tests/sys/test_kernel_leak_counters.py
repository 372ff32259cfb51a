"""Kernel.leaks reads the kernel's counters instead of building its statistics: it must
list exactly what the statistics show held, in the same words and order, after any
sequence of allocations and frees; and the memory paths taken without helper calls
(contigmalloc and contigfree, free of whole pages, the type counters found by the
type's identity) keep their accounting, junk fill and panics."""

from __future__ import annotations

import random

import pytest

from gntdma.sched import KernelPanic, Scheduler
from gntdma.sys import (
    M_BUSDMA,
    M_DEVBUF,
    M_NOWAIT,
    M_TEMP,
    M_WAITOK,
    Kernel,
    KernelStatistics,
    MallocType,
)
from gntdma.sys._param import PAGE_SIZE

_JUNK_PAGE = bytes.fromhex("dec0adde") * (PAGE_SIZE // 4)
_BELOW_4G = (1 << 32) - 1


def _leaks_from_statistics(st: KernelStatistics) -> list[str]:
    """Kernel.leaks as it was written before 3 December 2026: from statistics()."""
    out = [f"malloc type {n}: {s.memuse} bytes in {s.inuse} allocations"
           for n, s in sorted(st.malloc.items()) if s.memuse != 0 or s.inuse != 0]
    if st.pages_in_use != 0:
        out.append(f"{st.pages_in_use} physical pages in use")
    if st.kva_pages_mapped != 0:
        out.append(f"{st.kva_pages_mapped} kernel virtual pages mapped")
    if st.taskqueue_pending != 0:
        out.append(f"{st.taskqueue_pending} tasks pending")
    if st.callouts_pending != 0:
        out.append(f"{st.callouts_pending} callouts pending")
    if st.dma_tags != 0:
        out.append(f"{st.dma_tags} bus_dma tags alive")
    if st.dma_maps != 0:
        out.append(f"{st.dma_maps} bus_dma maps alive ({st.dma_maps_loaded} loaded)")
    if st.dma_deferred_pending != 0:
        out.append(f"{st.dma_deferred_pending} deferred bus_dma loads pending")
    return out


@pytest.mark.parametrize("seed", range(12))
def test_leaks_are_what_the_statistics_show_after_random_operations(
        kern: Kernel, seed: int) -> None:
    rng = random.Random(seed)
    # An equal type under another object, and another type of the same name.
    types = [M_DEVBUF, M_TEMP, M_BUSDMA, MallocType(M_DEVBUF.name, M_DEVBUF.desc),
             MallocType("temp", "another description")]
    live: list[tuple[str, int, int, MallocType]] = []
    pages: list[int] = []
    for _ in range(200):
        op = rng.randrange(7)
        mt = rng.choice(types)
        if op == 0:
            size = rng.choice([1, 16, 100, 600, PAGE_SIZE, PAGE_SIZE + 1, 3 * PAGE_SIZE - 512])
            va = kern.malloc(size, mt, M_WAITOK)
            live.append(("malloc", va, size, mt))
        elif op == 1:
            size = rng.choice([PAGE_SIZE, 2 * PAGE_SIZE, 3 * PAGE_SIZE])
            va = kern.contigmalloc(size, mt, M_NOWAIT, 0, _BELOW_4G, PAGE_SIZE, 0)
            if va != 0:
                live.append(("contig", va, size, mt))
        elif op == 2:
            pfn = kern.vm_page_alloc()
            if pfn is not None:
                pages.append(pfn)
        elif op == 3 and pages:
            kern.vm_page_free(pages.pop(rng.randrange(len(pages))))
        elif live:
            kind, va, size, mt = live.pop(rng.randrange(len(live)))
            if kind == "malloc":
                kern.free(va, mt)
            else:
                kern.contigfree(va, size, mt)
        assert kern.leaks() == _leaks_from_statistics(kern.statistics())
    for kind, va, size, mt in live:
        if kind == "malloc":
            kern.free(va, mt)
        else:
            kern.contigfree(va, size, mt)
    for pfn in pages:
        kern.vm_page_free(pfn)
    assert kern.leaks() == [] == _leaks_from_statistics(kern.statistics())


def test_a_planted_leak_of_each_kind_is_listed(kern: Kernel, vsched: Scheduler) -> None:
    va = kern.malloc(100, M_DEVBUF, M_WAITOK)
    cva = kern.contigmalloc(2 * PAGE_SIZE, M_BUSDMA, M_NOWAIT, 0, _BELOW_4G, PAGE_SIZE, 0)
    pfn = kern.vm_page_alloc()
    assert pfn is not None
    kva = kern.kva_alloc(1)
    kern.pmap_kenter(kva, pfn << 12)
    kern.enqueue_swi(lambda: None)
    assert kern.leaks() == [
        "malloc type busdma: 8192 bytes in 1 allocations",
        "malloc type devbuf: 128 bytes in 1 allocations",
        "4 physical pages in use",  # the slab page, two contiguous pages, the page
        "4 kernel virtual pages mapped",
        "1 tasks pending",
    ]
    vsched.run(until=lambda: kern.statistics().taskqueue_pending == 0)
    kern.pmap_kremove(kva)
    kern.kva_free(kva, 1)
    kern.vm_page_free(pfn)
    kern.contigfree(cva, 2 * PAGE_SIZE, M_BUSDMA)
    kern.free(va, M_DEVBUF)
    assert kern.leaks() == []


def test_an_equal_type_under_another_object_shares_the_counters(kern: Kernel) -> None:
    twin = MallocType(M_DEVBUF.name, M_DEVBUF.desc)
    va = kern.malloc(2 * PAGE_SIZE, M_DEVBUF, M_WAITOK)
    cva = kern.contigmalloc(PAGE_SIZE, twin, M_NOWAIT, 0, _BELOW_4G, PAGE_SIZE, 0)
    st = kern.malloc_statistics()["devbuf"]
    assert (st.memuse, st.inuse, st.requests) == (3 * PAGE_SIZE, 2, 2)
    kern.free(va, twin)  # freed as an equal type: allowed, as before
    kern.contigfree(cva, PAGE_SIZE, M_DEVBUF)
    st = kern.malloc_statistics()["devbuf"]
    assert (st.memuse, st.inuse, st.frees, st.maxused) == (0, 0, 2, 3 * PAGE_SIZE)
    assert kern.leaks() == []


def test_whole_pages_freed_are_junk_filled_and_a_wrong_type_still_panics(
        kern: Kernel) -> None:
    va = kern.malloc(2 * PAGE_SIZE, M_DEVBUF, M_WAITOK)
    cva = kern.contigmalloc(2 * PAGE_SIZE, M_BUSDMA, M_NOWAIT, 0, _BELOW_4G, PAGE_SIZE, 0)
    pas = [kern.vtophys(va), kern.vtophys(va + PAGE_SIZE), kern.vtophys(cva),
           kern.vtophys(cva + PAGE_SIZE)]
    with pytest.raises(KernelPanic, match="is devbuf, freed as temp"):
        kern.free(va, M_TEMP)
    with pytest.raises(KernelPanic, match="is busdma, freed as devbuf"):
        kern.contigfree(cva, 2 * PAGE_SIZE, M_DEVBUF)
    kern.free(va, M_DEVBUF)
    kern.contigfree(cva, 2 * PAGE_SIZE, M_BUSDMA)
    for pa in pas:
        assert kern.phys_read(pa, PAGE_SIZE) == _JUNK_PAGE
    with pytest.raises(KernelPanic, match="page fault"):
        kern.kva_read(va, 1)
    with pytest.raises(KernelPanic, match="not allocated"):
        kern.free(va, M_DEVBUF)
    assert kern.leaks() == []
