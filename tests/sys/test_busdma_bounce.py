"""Bounce pages: 32-bit DMA over memory above 4 GiB, alignment, deferral and replay."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

import pytest
from gntdma_sys_testlib import (
    FOUR_GIB,
    Rec,
    check_segments,
    device_read,
    device_write,
    mk_map,
    mk_tag,
)

from gntdma.sched import KernelPanic, Mutex, Scheduler, mtx_owned
from gntdma.sys import (
    BIO_READ,
    BIO_UNMAPPED,
    BUS_DMA_ALLOCNOW,
    BUS_DMA_KEEP_PG_OFFSET,
    BUS_DMA_LOCK,
    BUS_DMA_NOWAIT,
    BUS_DMA_UNLOCK,
    BUS_DMA_WAITOK,
    BUS_DMASYNC_POSTREAD,
    BUS_DMASYNC_POSTWRITE,
    BUS_DMASYNC_PREREAD,
    BUS_DMASYNC_PREWRITE,
    BUS_SPACE_MAXADDR_32BIT,
    M_DEVBUF,
    M_WAITOK,
    PAGE_SIZE,
    BusDmaTag,
    Kernel,
    bio,
    bounce_impl,
    bus_dma_tag_destroy,
    bus_dmamap_destroy,
    bus_dmamap_load,
    bus_dmamap_load_bio,
    bus_dmamap_sync,
    bus_dmamap_unload,
    busdma_lock_mutex,
    taskqueue_drain_all,
)

HIGH_PA = 0x100000 * PAGE_SIZE


def _high_buffer(kern: Kernel, npages: int) -> int:
    """A kernel buffer whose pages are all above 4 GiB."""
    va = kern.kmem_alloc_attr(npages * PAGE_SIZE, M_WAITOK, HIGH_PA, (1 << 64) - 1)
    assert va != 0
    return va


def test_bounce_roundtrip_32bit_tag_over_high_memory(kern: Kernel) -> None:
    tag = mk_tag(kern, lowaddr=BUS_SPACE_MAXADDR_32BIT, maxsize=64 * 1024, nsegments=32,
                 maxsegsz=PAGE_SIZE)
    map = mk_map(tag)
    va = kern.malloc(9 * PAGE_SIZE, M_DEVBUF, M_WAITOK)  # scattered over low and high pages
    pas = [kern.pmap_kextract(va + i * PAGE_SIZE) for i in range(9)]
    assert any(pa >= FOUR_GIB for pa in pas) and any(pa < FOUR_GIB for pa in pas)
    data = bytes((i * 31 + 7) & 0xFF for i in range(8 * PAGE_SIZE + 1000))
    kern.kva_write(va + 300, data)
    cb = Rec()
    assert bus_dmamap_load(tag, map, va + 300, len(data), cb, None, BUS_DMA_NOWAIT) == 0
    segs = cb.last[1]
    assert cb.last[3] == 0
    check_segments(tag, segs, len(data))
    assert all(s.ds_addr + s.ds_len <= FOUR_GIB for s in segs)
    bus_dmamap_sync(tag, map, BUS_DMASYNC_PREWRITE)
    assert device_read(kern, segs) == data  # the device sees the buffer through bounce pages
    bus_dmamap_sync(tag, map, BUS_DMASYNC_POSTWRITE)
    # now a read: the device fills the segments
    bus_dmamap_sync(tag, map, BUS_DMASYNC_PREREAD)
    incoming = bytes(reversed(data))
    device_write(kern, segs, incoming)
    high = next(i for i, pa in enumerate(pas) if pa >= FOUR_GIB and i > 0)
    assert kern.phys_read(pas[high], 64) != incoming[high * PAGE_SIZE - 300:][:64]
    bus_dmamap_sync(tag, map, BUS_DMASYNC_POSTREAD)
    assert kern.kva_read(va + 300, len(incoming)) == incoming
    assert kern.kva_read(va, 300) != incoming[:300]  # nothing written outside the buffer
    assert kern.busdma.total_bounced == 2
    bus_dmamap_unload(tag, map)
    assert bus_dmamap_destroy(tag, map) == 0
    assert bus_dma_tag_destroy(tag) == 0
    kern.free(va, M_DEVBUF)
    kern.assert_no_leaks()  # the zone gave its pages back with its last tag


def test_unmapped_bio_bounces(kern: Kernel) -> None:
    tag = mk_tag(kern, lowaddr=BUS_SPACE_MAXADDR_32BIT, maxsize=16 * PAGE_SIZE, nsegments=16)
    map = mk_map(tag)
    pfns = []
    for _ in range(3):
        pfn = kern.vm_page_alloc(0, HIGH_PA)
        assert pfn is not None
        pfns.append(pfn)
    bp = bio(bio_cmd=BIO_READ, bio_flags=BIO_UNMAPPED, bio_ma=pfns, bio_ma_offset=512,
             bio_ma_n=3, bio_bcount=2 * PAGE_SIZE)
    cb = Rec()
    assert bus_dmamap_load_bio(tag, map, bp, cb, None, BUS_DMA_NOWAIT) == 0
    segs = cb.last[1]
    check_segments(tag, segs, 2 * PAGE_SIZE)
    bus_dmamap_sync(tag, map, BUS_DMASYNC_PREREAD)
    payload = bytes(range(256)) * 32
    device_write(kern, segs, payload)
    bus_dmamap_sync(tag, map, BUS_DMASYNC_POSTREAD)
    got = (kern.phys_read((pfns[0] << 12) + 512, PAGE_SIZE - 512)
           + kern.phys_read(pfns[1] << 12, PAGE_SIZE) + kern.phys_read(pfns[2] << 12, 512))
    assert got == payload
    bus_dmamap_unload(tag, map)
    for p in pfns:
        kern.vm_page_free(p)


@pytest.mark.parametrize("keep_offset", [False, True])
def test_misaligned_buffer_bounces_for_alignment(kern: Kernel, keep_offset: bool) -> None:
    tag = mk_tag(kern, alignment=512, maxsize=2 * PAGE_SIZE,
                 flags=BUS_DMA_KEEP_PG_OFFSET if keep_offset else 0)
    map = mk_map(tag)
    va = kern.malloc(2 * PAGE_SIZE, M_DEVBUF, M_WAITOK)
    kern.kva_write(va, bytes(range(200)) * 40)
    cb = Rec()
    assert bus_dmamap_load(tag, map, va + 3, 1000, cb, None, BUS_DMA_NOWAIT) == 0
    segs = cb.last[1]
    if keep_offset:
        assert [s.ds_addr % PAGE_SIZE for s in segs] == [3]
    else:
        check_segments(tag, segs, 1000)
        assert segs[0].ds_addr % PAGE_SIZE == 0
    bus_dmamap_sync(tag, map, BUS_DMASYNC_PREWRITE)
    assert device_read(kern, segs) == (bytes(range(200)) * 40)[3:1003]
    bus_dmamap_unload(tag, map)
    # an aligned buffer is not bounced
    assert bus_dmamap_load(tag, map, va + 512, 1000, cb, None, BUS_DMA_NOWAIT) == 0
    assert cb.last[1][0].ds_addr == kern.pmap_kextract(va + 512)
    bus_dmamap_unload(tag, map)
    kern.free(va, M_DEVBUF)


class LockLog:
    """A lockfunc wrapping busdma_lock_mutex that logs its calls."""

    def __init__(self) -> None:
        self.mtx = Mutex("drv_io")
        self.log: list[str] = []

    def __call__(self, arg: Any, op: int) -> None:
        self.log.append({BUS_DMA_LOCK: "lock", BUS_DMA_UNLOCK: "unlock"}[op])
        busdma_lock_mutex(arg, op)


def _small_pool_tag(kern: Kernel, lockfunc: Callable[[Any, int], None] | None,
                    arg: Any) -> BusDmaTag:
    return mk_tag(kern, lowaddr=BUS_SPACE_MAXADDR_32BIT, maxsize=4 * PAGE_SIZE, nsegments=8,
                  maxsegsz=PAGE_SIZE, flags=BUS_DMA_ALLOCNOW, lockfunc=lockfunc,
                  lockfuncarg=arg)


def test_deferral_replays_in_fifo_order_under_lockfunc(
        vsched: Scheduler, kernel_factory: Callable[..., Kernel]) -> None:
    kern = kernel_factory(bounce_max_pages=4)
    ll = LockLog()
    tag = _small_pool_tag(kern, ll, ll.mtx)
    assert kern.busdma.bounce_pages == 4
    maps = [mk_map(tag) for _ in range(4)]
    bufs = [_high_buffer(kern, 4) for _ in range(4)]
    order: list[str] = []

    def cb(name: str, segs: list[Any], nseg: int, error: int) -> None:
        order.append(name)
        ll.log.append(f"cb {name} err={error} nseg={nseg}")
        assert error == 0 and nseg == 4
        if name != "a":  # a deferred callback: on taskqueue_swi, under the lockfunc
            assert mtx_owned(ll.mtx) and vsched.curthread.name.endswith("/swi")
        check_segments(tag, segs, 4 * PAGE_SIZE)

    assert bus_dmamap_load(tag, maps[0], bufs[0], 4 * PAGE_SIZE, cb, "a", BUS_DMA_WAITOK) == 0
    assert order == ["a"]  # ran before bus_dmamap_load returned
    ll.log.clear()
    assert bus_dmamap_load(tag, maps[1], bufs[1], 4 * PAGE_SIZE, cb, "b", 0) == errno.EINPROGRESS
    assert bus_dmamap_load(tag, maps[2], bufs[2], 4 * PAGE_SIZE, cb, "c", 0) == errno.EINPROGRESS
    nowait = Rec()
    assert bus_dmamap_load(tag, maps[3], bufs[3], PAGE_SIZE, nowait, "d",
                           BUS_DMA_NOWAIT) == errno.ENOMEM
    assert nowait.calls == [("d", [], 0, errno.ENOMEM)]
    st = kern.statistics()
    assert st.dma_deferred_pending == 2 and kern.busdma.deferred_total == 2
    assert order == ["a"]
    bus_dmamap_unload(tag, maps[0])  # frees 4 pages: b's reservation completes
    taskqueue_drain_all(kern.taskqueue_swi)
    assert order == ["a", "b"]
    assert ll.log == ["lock", "cb b err=0 nseg=4", "unlock"]
    bus_dmamap_unload(tag, maps[1])
    taskqueue_drain_all(kern.taskqueue_swi)
    assert order == ["a", "b", "c"]
    assert kern.statistics().dma_deferred_pending == 0
    bus_dmamap_unload(tag, maps[2])
    for m in maps:
        assert bus_dmamap_destroy(tag, m) == 0
    assert bus_dma_tag_destroy(tag) == 0
    for va in bufs:
        kern.kmem_free(va, 4 * PAGE_SIZE)
    kern.assert_no_leaks()


def test_deferred_load_data_is_bounced(vsched: Scheduler,
                                       kernel_factory: Callable[..., Kernel]) -> None:
    kern = kernel_factory(bounce_max_pages=2)
    ll = LockLog()
    tag = _small_pool_tag(kern, ll, ll.mtx)
    m1, m2 = mk_map(tag), mk_map(tag)
    b1, b2 = _high_buffer(kern, 2), _high_buffer(kern, 2)
    kern.kva_write(b2, b"\x5a" * 2 * PAGE_SIZE)
    done: list[list[Any]] = []
    assert bus_dmamap_load(tag, m1, b1, 2 * PAGE_SIZE, Rec(), None, 0) == 0
    assert bus_dmamap_load(tag, m2, b2, 2 * PAGE_SIZE,
                           lambda a, s, n, e: done.append(s), None, 0) == errno.EINPROGRESS
    bus_dmamap_unload(tag, m1)
    taskqueue_drain_all(kern.taskqueue_swi)
    bus_dmamap_sync(tag, m2, BUS_DMASYNC_PREWRITE)
    assert device_read(kern, done[0]) == b"\x5a" * 2 * PAGE_SIZE
    bus_dmamap_unload(tag, m2)


def test_unload_cancels_a_deferred_load(vsched: Scheduler,
                                        kernel_factory: Callable[..., Kernel]) -> None:
    kern = kernel_factory(bounce_max_pages=2)
    ll = LockLog()
    tag = _small_pool_tag(kern, ll, ll.mtx)
    m1, m2 = mk_map(tag), mk_map(tag)
    b1, b2 = _high_buffer(kern, 2), _high_buffer(kern, 2)
    cb = Rec()
    assert bus_dmamap_load(tag, m1, b1, 2 * PAGE_SIZE, cb, 1, 0) == 0
    # within the zone's 2 pages (a larger load would fail at once: test_no_endless_wait)
    assert bus_dmamap_load(tag, m2, b2, 2 * PAGE_SIZE, cb, 2, 0) == errno.EINPROGRESS
    bus_dmamap_unload(tag, m2)  # cancel
    assert kern.statistics().dma_deferred_pending == 0
    bus_dmamap_unload(tag, m1)
    taskqueue_drain_all(kern.taskqueue_swi)
    assert [c[0] for c in cb.calls] == [1]
    zone = bounce_impl(kern).zones()[0]
    assert (zone.free_bpages, zone.reserved_bpages, zone.active_bpages) == (2, 0, 0)
    assert ll.log == []
    assert kern.dma_debug.reports() == []


def test_default_lockfunc_panics_on_deferral(vsched: Scheduler,
                                             kernel_factory: Callable[..., Kernel]) -> None:
    kern = kernel_factory(bounce_max_pages=1)
    tag = _small_pool_tag(kern, None, None)
    m1, m2 = mk_map(tag), mk_map(tag)
    b1, b2 = _high_buffer(kern, 1), _high_buffer(kern, 1)
    assert bus_dmamap_load(tag, m1, b1, PAGE_SIZE, Rec(), None, 0) == 0
    assert bus_dmamap_load(tag, m2, b2, PAGE_SIZE, Rec(), None, 0) == errno.EINPROGRESS
    bus_dmamap_unload(tag, m1)
    with pytest.raises(KernelPanic, match="dflt_lock"):
        taskqueue_drain_all(kern.taskqueue_swi)


def test_allocnow_and_map_create_fill_the_zone(kernel_factory: Callable[..., Kernel]) -> None:
    kern = kernel_factory(bounce_max_pages=10)
    tag = mk_tag(kern, lowaddr=BUS_SPACE_MAXADDR_32BIT, maxsize=3 * PAGE_SIZE,
                 flags=BUS_DMA_ALLOCNOW)
    assert kern.busdma.bounce_pages == 3
    maps = [mk_map(tag) for _ in range(4)]  # the first map adds nothing, later ones 3 each
    assert kern.busdma.bounce_pages == 10
    zone = bounce_impl(kern).zones()[0]
    assert zone.lowaddr == BUS_SPACE_MAXADDR_32BIT and zone.map_count == 4
    for bp in zone.pages:
        assert bp.busaddr < FOUR_GIB
    for m in maps:
        bus_dmamap_destroy(tag, m)
    bus_dma_tag_destroy(tag)
    assert kern.busdma.bounce_pages == 0
    kern.assert_no_leaks()


def test_tag_without_restrictions_never_bounces(kern: Kernel) -> None:
    tag = mk_tag(kern)
    map = mk_map(tag)
    va = _high_buffer(kern, 2)
    cb = Rec()
    bus_dmamap_load(tag, map, va, 2 * PAGE_SIZE, cb, None, BUS_DMA_NOWAIT)
    assert [s.ds_addr >= FOUR_GIB for s in cb.last[1]] == [True] * len(cb.last[1])
    assert kern.busdma.bounce_zones == 0
    bus_dmamap_unload(tag, map)
