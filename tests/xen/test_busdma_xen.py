"""busdma_xen: grants per segment, deferral on shortage, the safe behaviours by name."""

from __future__ import annotations

import errno

from busdma_helpers import PAGE, Loads, backend_read, driver_tag, kbuf

from gntdma.abi.grant_table import GNTST_general_error, GNTST_okay, GTF_permit_access
from gntdma.sched import Mutex, mtx_lock, mtx_unlock
from gntdma.sys import (
    BUS_DMA_NOWAIT,
    BUS_DMA_WAITOK,
    BUS_DMASYNC_PREWRITE,
    BUS_SPACE_MAXADDR,
    BUS_SPACE_MAXADDR_32BIT,
    DmaDebugKind,
    bus_dma_segment_t,
    bus_dma_tag_create,
    bus_dma_tag_destroy,
    bus_dmamap_create,
    bus_dmamap_destroy,
    bus_dmamap_load,
    bus_dmamap_load_mem,
    bus_dmamap_sync,
    bus_dmamap_unload,
    bus_dmamem_alloc,
    bus_dmamem_free,
    memdesc_vlist,
)
from gntdma.toolstack.host import Guest, Host
from gntdma.xen.busdma import (
    BUS_DMA_XEN_PREALLOC_REFS,
    BUS_DMA_XEN_RO,
    XenDmaImpl,
    xen_dmamap_get_grefs,
    xen_get_dma_tag,
)


def impl(g: Guest) -> XenDmaImpl:
    from gntdma.sys import kernel_state

    i = kernel_state(g.kernel).impls["xen"]
    assert isinstance(i, XenDmaImpl)
    return i


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 31 + seed) & 0xFF for i in range(n))


def check_backend_sees(host: Host, g: Guest, map_: object, data: bytes, ro: bool) -> None:
    segs = map_.dm_segs  # type: ignore[attr-defined]
    refs = xen_dmamap_get_grefs(map_)  # type: ignore[arg-type]
    assert len(refs) == len(segs) and len(set(refs)) == len(refs)
    got = b""
    for ref, seg in zip(refs, segs, strict=True):
        flags, domid, frame = g.gnttab.entry(ref)
        assert flags & GTF_permit_access and domid == 0 and frame == seg.ds_addr >> 12
        status, chunk = backend_read(host, g, ref, seg, writable=not ro)
        assert status == GNTST_okay
        got += chunk
        if ro:
            assert backend_read(host, g, ref, seg, writable=True)[0] == GNTST_general_error
    assert got == data


def test_load_grants_each_segment_to_the_backend(host: Host) -> None:
    g = host.create_guest("g")
    lock = Mutex("drv")
    tag = driver_tag(g, lock)
    data = pattern(3 * PAGE + 700)
    va = kbuf(g.kernel, data, offset=512)
    error, m = bus_dmamap_create(tag, 0)
    assert error == 0 and m is not None
    loads = Loads(lock)
    mtx_lock(lock)
    assert bus_dmamap_load(tag, m, va, len(data), loads.cb, None, BUS_DMA_WAITOK) == 0
    mtx_unlock(lock)
    assert len(loads.calls) == 1 and loads.calls[0][2] == 0
    segs = loads.calls[0][0]
    assert all((s.ds_addr & 4095) + s.ds_len <= PAGE for s in segs)  # never cross a page
    check_backend_sees(host, g, m, data, ro=False)
    bus_dmamap_unload(tag, m)
    assert xen_dmamap_get_grefs(m) == []
    assert bus_dmamap_destroy(tag, m) == 0
    assert bus_dma_tag_destroy(tag) == 0
    g.kernel.free(va - 512, __import__("gntdma.sys", fromlist=["M_DEVBUF"]).M_DEVBUF)


def _free(g: Guest, va: int) -> None:
    from gntdma.sys import M_DEVBUF

    g.kernel.free(va, M_DEVBUF)


def test_ro_load_grants_read_only(host: Host) -> None:
    g = host.create_guest("g")
    lock = Mutex("drv")
    tag = driver_tag(g, lock)
    data = pattern(2 * PAGE)
    va = kbuf(g.kernel, data)
    _, m = bus_dmamap_create(tag, 0)
    assert m is not None
    loads = Loads(lock)
    assert bus_dmamap_load(tag, m, va, len(data), loads.cb, None, BUS_DMA_XEN_RO) == 0
    check_backend_sees(host, g, m, data, ro=True)
    bus_dmamap_unload(tag, m)
    bus_dmamap_destroy(tag, m)
    bus_dma_tag_destroy(tag)
    _free(g, va)


def _fill_table(g: Guest, leave: int) -> list[int]:
    """Allocate every reference the table can ever have but ``leave``."""
    gt = g.gnttab
    heads = []
    while True:
        error, h = gt.gnttab_alloc_grant_references(64)
        if error != 0:
            break
        heads.append(h.head)
    error, h = gt.gnttab_alloc_grant_references(gt.free_count - leave) if gt.free_count > leave \
        else (1, None)
    if error == 0 and h is not None:
        heads.append(h.head)
    assert gt.free_count == leave
    return heads


def test_sleepable_load_defers_on_shortage_and_completes_once(host: Host) -> None:
    """Seed: 'a deferred load that completed with no grant references'."""
    g = host.create_guest("g", max_grant_frames=1)
    lock = Mutex("drv")
    tag = driver_tag(g, lock)
    data = pattern(4 * PAGE)
    va = kbuf(g.kernel, data)
    _, m = bus_dmamap_create(tag, 0)
    assert m is not None
    heads = _fill_table(g, leave=2)
    loads = Loads(lock)
    mtx_lock(lock)
    assert bus_dmamap_load(tag, m, va, len(data), loads.cb, None, BUS_DMA_WAITOK) \
        == errno.EINPROGRESS
    mtx_unlock(lock)
    host.sched.yield_()
    assert loads.calls == [] and impl(g).statistics().grant_deferred == 1
    g.gnttab.gnttab_free_grant_references(heads.pop())
    host.sched.run(until=lambda: bool(loads.calls))
    host.sched.yield_()
    assert len(loads.calls) == 1
    segs, nseg, error, locked = loads.calls[0]
    assert error == 0 and nseg == len(segs) >= 4 and locked  # under the lockfunc
    assert len(xen_dmamap_get_grefs(m)) == nseg  # completed WITH references
    check_backend_sees(host, g, m, data, ro=False)
    bus_dmamap_unload(tag, m)
    for h in heads:
        g.gnttab.gnttab_free_grant_references(h)
    bus_dmamap_destroy(tag, m)
    bus_dma_tag_destroy(tag)
    _free(g, va)


def test_nowait_load_fails_with_enomem_and_keeps_nothing(host: Host) -> None:
    g = host.create_guest("g", max_grant_frames=1)
    lock = Mutex("drv")
    tag = driver_tag(g, lock)
    data = pattern(4 * PAGE)
    va = kbuf(g.kernel, data)
    _, m = bus_dmamap_create(tag, 0)
    assert m is not None
    heads = _fill_table(g, leave=2)
    loads = Loads(lock)
    assert bus_dmamap_load(tag, m, va, len(data), loads.cb, None, BUS_DMA_NOWAIT) == errno.ENOMEM
    assert loads.calls[0][2] == errno.ENOMEM and g.gnttab.free_count == 2
    for h in heads:
        g.gnttab.gnttab_free_grant_references(h)
    # The map is still usable.
    assert bus_dmamap_load(tag, m, va, len(data), loads.cb, None, BUS_DMA_NOWAIT) == 0
    bus_dmamap_unload(tag, m)
    bus_dmamap_destroy(tag, m)
    bus_dma_tag_destroy(tag)
    _free(g, va)


def test_unload_while_deferred_load_pending_cancels_it(host: Host) -> None:
    """Seed: 'memory leak and segmentation fault if unload is called before the load finishes'."""
    g = host.create_guest("g", max_grant_frames=1)
    lock = Mutex("drv")
    tag = driver_tag(g, lock)
    va = kbuf(g.kernel, pattern(3 * PAGE))
    _, m = bus_dmamap_create(tag, 0)
    assert m is not None
    heads = _fill_table(g, leave=1)
    loads = Loads(lock)
    mtx_lock(lock)
    assert bus_dmamap_load(tag, m, va, 3 * PAGE, loads.cb, None, 0) == errno.EINPROGRESS
    bus_dmamap_unload(tag, m)
    mtx_unlock(lock)
    assert g.gnttab.statistics().callbacks_queued == 0
    for h in heads:
        g.gnttab.gnttab_free_grant_references(h)
    host.sched.yield_()
    assert loads.calls == []  # the cancelled load never calls back
    assert impl(g).statistics().grant_deferred_cancelled == 1
    bus_dmamap_destroy(tag, m)
    bus_dma_tag_destroy(tag)
    _free(g, va)


def test_unload_of_never_loaded_map_is_a_noop(host: Host) -> None:
    g = host.create_guest("g")
    tag = driver_tag(g, Mutex("drv"))
    _, m = bus_dmamap_create(tag, 0)
    assert m is not None
    bus_dmamap_unload(tag, m)
    assert g.kernel.dma_debug.reports() == []
    bus_dmamap_destroy(tag, m)
    bus_dma_tag_destroy(tag)


def test_reload_of_loaded_map_is_refused(host: Host) -> None:
    g = host.create_guest("g")
    lock = Mutex("drv")
    tag = driver_tag(g, lock)
    va = kbuf(g.kernel, pattern(PAGE))
    _, m = bus_dmamap_create(tag, 0)
    assert m is not None
    loads = Loads(lock)
    assert bus_dmamap_load(tag, m, va, PAGE, loads.cb, None, 0) == 0
    refs = xen_dmamap_get_grefs(m)
    assert bus_dmamap_load(tag, m, va, PAGE, loads.cb, None, 0) == errno.EINVAL
    assert xen_dmamap_get_grefs(m) == refs  # the first load is intact
    assert [r.kind for r in g.kernel.dma_debug.reports()] == [DmaDebugKind.LOAD_LOADED_MAP]
    g.kernel.dma_debug.reset()
    bus_dmamap_unload(tag, m)
    bus_dmamap_destroy(tag, m)
    bus_dma_tag_destroy(tag)
    _free(g, va)


def test_grant_still_mapped_by_backend_at_unload_is_reported_and_reclaimed(host: Host) -> None:
    from busdma_helpers import hc_map, hc_unmap

    from gntdma.abi.grant_table import GNTMAP_host_map

    g = host.create_guest("g")
    lock = Mutex("drv")
    tag = driver_tag(g, lock)
    va = kbuf(g.kernel, pattern(PAGE))
    _, m = bus_dmamap_create(tag, 0)
    assert m is not None
    loads = Loads(lock)
    assert bus_dmamap_load(tag, m, va, PAGE, loads.cb, None, 0) == 0
    (ref,) = xen_dmamap_get_grefs(m)
    r = hc_map(host.dom0.hc, g.domid, ref, GNTMAP_host_map)
    assert r.status == GNTST_okay
    free_before = g.gnttab.free_count
    bus_dmamap_unload(tag, m)
    kinds = [rep.kind for rep in g.kernel.dma_debug.reports()]
    assert kinds == [DmaDebugKind.STILL_MAPPED_AT_UNLOAD]
    assert g.gnttab.free_count == free_before  # kept out of the free list
    # A new load cannot get that reference while it is mapped.
    assert bus_dmamap_load(tag, m, va, PAGE, loads.cb, None, 0) == 0
    assert xen_dmamap_get_grefs(m) != [ref]
    bus_dmamap_unload(tag, m)
    assert hc_unmap(host.dom0.hc, r.handle) == GNTST_okay
    host.sched.run(until=lambda: g.gnttab.statistics().reclaim_pending == 0)
    assert g.gnttab.free_count == free_before + 1
    g.kernel.dma_debug.reset()
    g.gnttab.reports.clear()
    bus_dmamap_destroy(tag, m)
    bus_dma_tag_destroy(tag)
    _free(g, va)


def test_chained_load_short_midway_keeps_earlier_refs(host: Host) -> None:
    """V5 hazard: a chain (several buffers) running short in the middle leaked refs."""
    g = host.create_guest("g", max_grant_frames=1)
    lock = Mutex("drv")
    tag = driver_tag(g, lock)
    bufs = [pattern(PAGE, s) for s in range(3)]
    vas = [kbuf(g.kernel, b) for b in bufs]
    vlist = [bus_dma_segment_t(va, PAGE) for va in vas]
    _, m = bus_dmamap_create(tag, 0)
    assert m is not None
    heads = _fill_table(g, leave=2)
    loads = Loads(lock)
    mtx_lock(lock)
    rv = bus_dmamap_load_mem(tag, m, memdesc_vlist(vlist), loads.cb, None, BUS_DMA_WAITOK)
    mtx_unlock(lock)
    assert rv == errno.EINPROGRESS
    assert g.gnttab.free_count == 2  # nothing taken mid-way, nothing leaked
    g.gnttab.gnttab_free_grant_references(heads.pop())
    host.sched.run(until=lambda: bool(loads.calls))
    assert loads.calls[0][2] == 0
    check_backend_sees(host, g, m, b"".join(bufs), ro=False)
    bus_dmamap_unload(tag, m)
    for h in heads:
        g.gnttab.gnttab_free_grant_references(h)
    bus_dmamap_destroy(tag, m)
    bus_dma_tag_destroy(tag)
    for va in vas:
        _free(g, va)


def test_prealloc_refs_are_held_for_the_map_life(host: Host) -> None:
    g = host.create_guest("g")
    lock = Mutex("drv")
    tag = driver_tag(g, lock, nsegments=4, maxsize=4 * PAGE)
    free0 = g.gnttab.free_count
    error, m = bus_dmamap_create(tag, BUS_DMA_XEN_PREALLOC_REFS)
    assert error == 0 and m is not None
    assert g.gnttab.free_count == free0 - 4
    va = kbuf(g.kernel, pattern(2 * PAGE))
    loads = Loads(lock)
    for _ in range(3):
        assert bus_dmamap_load(tag, m, va, 2 * PAGE, loads.cb, None, BUS_DMA_NOWAIT) == 0
        refs = xen_dmamap_get_grefs(m)
        assert refs == m.refs[:2]  # type: ignore[attr-defined]
        check_backend_sees(host, g, m, pattern(2 * PAGE), ro=False)
        bus_dmamap_unload(tag, m)
        assert g.gnttab.free_count == free0 - 4
        assert all(g.gnttab.entry(r)[0] == 0 for r in refs)  # access ended
    assert bus_dmamap_destroy(tag, m) == 0
    assert g.gnttab.free_count == free0
    bus_dma_tag_destroy(tag)
    _free(g, va)


def test_child_of_a_xen_tag_does_not_recurse(host: Host) -> None:
    """Seed: xen_bus_dma_tag_create recursed forever when a driver created a child tag."""
    g = host.create_guest("g")
    parent = driver_tag(g, Mutex("drv"), backend=0)
    error, child = bus_dma_tag_create(parent, 1, 0, BUS_SPACE_MAXADDR, BUS_SPACE_MAXADDR,
                                      PAGE, 1, PAGE, 0, None, None)
    assert error == 0 and child is not None
    assert child.boundary == PAGE and child.impl is parent.impl
    error, grandchild = bus_dma_tag_create(child, 1, 0, BUS_SPACE_MAXADDR, BUS_SPACE_MAXADDR,
                                           PAGE, 1, PAGE, 0, None, None)
    assert error == 0 and grandchild is not None
    assert bus_dma_tag_destroy(grandchild) == 0
    assert bus_dma_tag_destroy(child) == 0
    assert bus_dma_tag_destroy(parent) == 0


def test_bad_tag_parameters(host: Host) -> None:
    g = host.create_guest("g")
    root = xen_get_dma_tag(g.kernel)
    cases = [
        (512, PAGE, 2 * PAGE),  # maxsegsz above PAGE_SIZE on a Xen tag
        (3, PAGE, PAGE),  # alignment not a power of two
        (1, 3000, PAGE),  # boundary not a power of two
        (1, PAGE, 0),  # maxsegsz 0
    ]
    for alignment, boundary, maxsegsz in cases:
        error, tag = bus_dma_tag_create(root, alignment, boundary, BUS_SPACE_MAXADDR,
                                        BUS_SPACE_MAXADDR, PAGE, 1, maxsegsz, 0, None, None)
        assert error == errno.EINVAL and tag is None, (alignment, boundary, maxsegsz)


def test_too_big_and_too_many_segments_leave_the_map_usable(host: Host) -> None:
    g = host.create_guest("g")
    lock = Mutex("drv")
    tag = driver_tag(g, lock, nsegments=2, maxsize=4 * PAGE)
    va = kbuf(g.kernel, pattern(8 * PAGE))
    _, m = bus_dmamap_create(tag, 0)
    assert m is not None
    loads = Loads(lock)
    free0 = g.gnttab.free_count
    assert bus_dmamap_load(tag, m, va, 5 * PAGE, loads.cb, None, 0) == errno.EINVAL
    assert loads.calls[-1][2] == errno.EINVAL
    assert bus_dmamap_load(tag, m, va, 3 * PAGE, loads.cb, None, 0) == 0
    assert loads.calls[-1][2] == errno.EFBIG and g.gnttab.free_count == free0
    assert bus_dmamap_load(tag, m, va, 2 * PAGE, loads.cb, None, 0) == 0
    assert loads.calls[-1][2] == 0
    bus_dmamap_unload(tag, m)
    bus_dmamap_destroy(tag, m)
    bus_dma_tag_destroy(tag)
    _free(g, va)


def test_dmamem_alloc_map_loads_with_grants(host: Host) -> None:
    """V5 bug: a bus_dmamem_alloc map had no tag, and its load dereferenced NULL."""
    g = host.create_guest("g")
    lock = Mutex("drv")
    tag = driver_tag(g, lock, nsegments=1, maxsize=PAGE, alignment=PAGE)
    error, va, m = bus_dmamem_alloc(tag, BUS_DMA_NOWAIT)
    assert error == 0 and m is not None
    g.kernel.kva_write(va, pattern(PAGE))
    loads = Loads(lock)
    assert bus_dmamap_load(tag, m, va, PAGE, loads.cb, None, BUS_DMA_NOWAIT) == 0
    check_backend_sees(host, g, m, pattern(PAGE), ro=False)
    bus_dmamap_unload(tag, m)
    bus_dmamem_free(tag, va, m)
    bus_dma_tag_destroy(tag)


def test_bounced_segments_grant_the_bounce_pages(host: Host) -> None:
    g = host.create_guest("g", memory_mb=8, high_memory_mb=8)
    lock = Mutex("drv")
    tag = driver_tag(g, lock, lowaddr=BUS_SPACE_MAXADDR_32BIT)
    # Find kernel memory above 4 GiB: allocate until a page is high.
    from gntdma.sys import M_DEVBUF, M_WAITOK

    vas = []
    va = 0
    for _ in range(4096):
        va = g.kernel.malloc(PAGE, M_DEVBUF, M_WAITOK)
        vas.append(va)
        if g.kernel.pmap_kextract(va) >= 1 << 32:
            break
    assert g.kernel.pmap_kextract(va) >= 1 << 32
    g.kernel.kva_write(va, pattern(PAGE, 9))
    _, m = bus_dmamap_create(tag, 0)
    assert m is not None
    loads = Loads(lock)
    assert bus_dmamap_load(tag, m, va, PAGE, loads.cb, None, BUS_DMA_NOWAIT) == 0
    seg = m.dm_segs[0]
    assert seg.ds_addr < 1 << 32  # a bounce page
    bus_dmamap_sync(tag, m, BUS_DMASYNC_PREWRITE)
    check_backend_sees(host, g, m, pattern(PAGE, 9), ro=False)
    bus_dmamap_unload(tag, m)
    bus_dmamap_destroy(tag, m)
    bus_dma_tag_destroy(tag)
    for v in vas:
        g.kernel.free(v, M_DEVBUF)
