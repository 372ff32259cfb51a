"""No sleepable request waits for bounce pages or memory that can never come.

FreeBSD guarantees progress for bounce pages only as far as map creation goes:
``bounce_bus_dmamap_create`` (``sys/x86/x86/busdma_bounce.c``) adds
``atop(maxsize)`` pages to the zone for a tag's first map (ENOMEM if it cannot)
and more for later maps up to ``MAX_BPAGES``; pages are added nowhere else (no
load allocates). ``_bus_dmamap_reserve_pages`` (``sys/kern/subr_busdma_bounce.c``)
queues a sleepable load that finds too few free pages on the zone's waiting
list whatever it needs, so a load needing more pages than the zone holds waits
forever there. gntdma fails such a load at once, as a load error is delivered
by ``bus_dmamap_load`` (``sys/kern/subr_bus_dma.c``): the callback gets EFBIG
with no segment, and the load returns 0 (bus_dma(9): EFBIG, the mapping cannot
be achieved within the tag's constraints). A deliberate difference.

For memory, FreeBSD's ``malloc(M_WAITOK)`` of a large size goes through
``kmem_malloc_domainset``/``kmem_back_domain`` (``sys/vm/vm_kern.c``), which
retries ``vm_page_alloc_domain_after`` with ``VM_ALLOC_WAITFAIL`` until it gets
every page: a request larger than the domain's memory sleeps forever.
gntdma returns 0 at once for a request that no amount of freeing can satisfy,
a deliberate, panic-free difference (malloc(9) says M_WAITOK never returns
NULL; here it does only for the impossible).
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from gntdma_sys_testlib import Rec, mk_map, mk_tag

from gntdma.sched import Scheduler
from gntdma.sys import (
    BUS_DMA_WAITOK,
    BUS_SPACE_MAXADDR_32BIT,
    M_DEVBUF,
    M_TEMP,
    M_WAITOK,
    PAGE_SIZE,
    Kernel,
    bounce_impl,
    bus_dma_tag_destroy,
    bus_dmamap_destroy,
    bus_dmamap_load,
    bus_dmamap_unload,
    taskqueue_drain_all,
)

HIGH_PA = 0x100000 * PAGE_SIZE


def _high_buffer(kern: Kernel, npages: int) -> int:
    va = kern.kmem_alloc_attr(npages * PAGE_SIZE, M_WAITOK, HIGH_PA, (1 << 64) - 1)
    assert va != 0
    return va


def test_sleepable_load_needing_more_bounce_pages_than_the_zone_holds_fails_at_once(
        vsched: Scheduler, kernel_factory: Callable[..., Kernel]) -> None:
    # A zone capped at 2 pages (MAX_BPAGES) and a tag whose maxsize is 4 pages:
    # map creation adds what it may (bounce_bus_dmamap_create), 2 pages.
    kern = kernel_factory(bounce_max_pages=2)
    tag = mk_tag(kern, lowaddr=BUS_SPACE_MAXADDR_32BIT, maxsize=4 * PAGE_SIZE, nsegments=8,
                 maxsegsz=PAGE_SIZE)
    m = mk_map(tag)
    zone = bounce_impl(kern).zones()[0]
    assert zone.total_bpages == 2
    buf = _high_buffer(kern, 4)
    cb = Rec()
    assert bus_dmamap_load(tag, m, buf, 4 * PAGE_SIZE, cb, "big", BUS_DMA_WAITOK) == 0
    assert cb.calls == [("big", [], 0, errno.EFBIG)]  # through the callback, at once
    assert kern.statistics().dma_deferred_pending == 0
    assert (zone.free_bpages, zone.reserved_bpages, zone.active_bpages) == (2, 0, 0)
    assert list(zone.waiting) == []
    # The zone still serves what fits, and the map is usable again.
    assert bus_dmamap_load(tag, m, buf, 2 * PAGE_SIZE, cb, "fits", BUS_DMA_WAITOK) == 0
    assert cb.last[0] == "fits" and cb.last[3] == 0 and cb.last[2] == 2
    bus_dmamap_unload(tag, m)
    taskqueue_drain_all(kern.taskqueue_swi)
    assert bus_dmamap_destroy(tag, m) == 0
    assert bus_dma_tag_destroy(tag) == 0
    kern.kmem_free(buf, 4 * PAGE_SIZE)
    kern.assert_no_leaks()


def test_sleepable_load_within_the_zone_still_waits_for_pages_in_use(
        vsched: Scheduler, kernel_factory: Callable[..., Kernel]) -> None:
    # The pages another map holds come back at its unload: that wait ends
    # (free_bounce_pages serves the waiting list), so the load defers as on FreeBSD.
    kern = kernel_factory(bounce_max_pages=2)
    tag = mk_tag(kern, lowaddr=BUS_SPACE_MAXADDR_32BIT, maxsize=4 * PAGE_SIZE, nsegments=8,
                 maxsegsz=PAGE_SIZE, lockfunc=lambda _a, _op: None)
    m1, m2 = mk_map(tag), mk_map(tag)
    b1, b2 = _high_buffer(kern, 2), _high_buffer(kern, 2)
    cb = Rec()
    assert bus_dmamap_load(tag, m1, b1, 2 * PAGE_SIZE, cb, 1, BUS_DMA_WAITOK) == 0
    assert bus_dmamap_load(tag, m2, b2, 2 * PAGE_SIZE, cb, 2, BUS_DMA_WAITOK) == \
        errno.EINPROGRESS
    bus_dmamap_unload(tag, m1)
    taskqueue_drain_all(kern.taskqueue_swi)
    assert [(c[0], c[3]) for c in cb.calls] == [(1, 0), (2, 0)]
    bus_dmamap_unload(tag, m2)
    for m in (m1, m2):
        assert bus_dmamap_destroy(tag, m) == 0
    assert bus_dma_tag_destroy(tag) == 0
    for va in (b1, b2):
        kern.kmem_free(va, 2 * PAGE_SIZE)
    kern.assert_no_leaks()


def test_waitok_malloc_larger_than_the_domain_memory_fails_at_once(
        vsched: Scheduler, kernel_factory: Callable[..., Kernel]) -> None:
    k = kernel_factory(low=8, high=0)
    got: list[int] = []

    def waiter() -> None:
        got.append(k.malloc(9 * PAGE_SIZE, M_TEMP, M_WAITOK))

    t = vsched.spawn(waiter, name="waiter")
    vsched.run(until=lambda: t.exc is not None or got != [] or t.wmesg == "vmwait")
    assert t.wmesg != "vmwait", "malloc(M_WAITOK) sleeps for memory the domain never has"
    assert t.exc is None
    assert got == [0]
    assert k.malloc_statistics()["temp"].failures == 1
    # What can be satisfied still sleeps until it is (M_WAITOK is unchanged).
    hog = k.malloc(8 * PAGE_SIZE, M_DEVBUF, M_WAITOK)
    assert hog != 0
    t2 = vsched.spawn(lambda: got.append(k.malloc(PAGE_SIZE, M_TEMP, M_WAITOK)), name="w2")
    vsched.run(until=lambda: t2.wmesg == "vmwait")
    k.free(hog, M_DEVBUF)
    vsched.run()
    assert len(got) == 2 and got[1] != 0
    k.free(got[1], M_TEMP)
    k.assert_no_leaks()


def test_waitok_page_allocation_outside_the_domain_memory_fails_at_once(
        vsched: Scheduler, kernel_factory: Callable[..., Kernel]) -> None:
    # No page of this domain lies above 4 GiB: waiting for one would never end.
    k = kernel_factory(low=8, high=0)
    got: list[int | None] = []
    t = vsched.spawn(lambda: got.append(k.vm_page_alloc(M_WAITOK, HIGH_PA)), name="waiter")
    vsched.run(until=lambda: t.exc is not None or got != [] or t.wmesg == "vmwait")
    assert t.wmesg != "vmwait", "vm_page_alloc(M_WAITOK) sleeps for a page that does not exist"
    assert t.exc is None and got == [None]
    k.assert_no_leaks()
