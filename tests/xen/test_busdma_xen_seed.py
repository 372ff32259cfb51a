"""The 2018 log's busdma bugs (shared/seed/), each as a regression test named after it.

Already covered elsewhere, under other names (not repeated here):

- "a deferred load ... the client callback was called with no grant references"
  for a grant-shortage deferral, and "the client callback was not being called if
  the allocation of grant refs was deferred" (June 18-21):
  ``test_busdma_xen.py::test_sleepable_load_defers_on_shortage_and_completes_once``;
  here the bounce-deferred case the log describes, with the references checked
  *inside* the callback, where blkfront's ``xbd_queue_cb`` reads them.
- "memory leak and segmentation fault if unload is called before the load
  finishes" (June 26-27), grant deferral:
  ``test_busdma_xen.py::test_unload_while_deferred_load_pending_cancels_it``;
  here the bounce deferral, bounce-then-grant, and the callback already picked.
- the infinite recursion when a driver creates a tag (July 6-9):
  ``test_busdma_xen.py::test_child_of_a_xen_tag_does_not_recurse``; here a deep
  chain of Xen tags, each granting to its own backend.
- "Failed to allocate tx refs" then page faults in ``gnttab_free_grant_references``
  on a ``GNTTAB_LIST_END`` head and in ``gnttab_end_foreign_access_ref`` on
  ``GNTTAB_REF_INVALID`` (July 24-25): ``test_gnttab.py::
  test_freeing_a_list_end_head_is_a_noop`` and
  ``test_end_access_on_invalid_ref_after_failed_alloc``.
- the recursion on ``gnttab_list_lock`` in a free callback that allocates (July
  29-30): ``test_gnttab.py::test_free_callback_that_allocates_does_not_recurse``.
- the recursion on ``xbd_io_lock`` and the xbd_io/gnttab_list lock-order reversal
  (July 31, August 4-5): ``test_busdma_xen_hazards.py::
  test_deferred_completion_has_no_lock_order_reversal`` and the two
  ``test_inline_delivery_*`` tests, which reproduce them with FreeBSD's delivery.
"""

from __future__ import annotations

import errno
import struct
from typing import Any

import pytest
from busdma_helpers import (
    PAGE,
    Loads,
    check_map_grants,
    driver_tag,
    free_pages,
    high_kbuf,
    hold_refs,
    kbuf,
    page_array,
    pattern,
    peer_map,
    peer_read,
    release_refs,
    settle,
    xen_impl,
)

from gntdma.abi.grant_table import GNTST_okay, GTF_permit_access
from gntdma.sched import KernelPanic, Mutex, mtx_lock, mtx_unlock
from gntdma.sys import (
    BIO_UNMAPPED,
    BIO_WRITE,
    BUS_DMA_NOWAIT,
    BUS_DMA_WAITOK,
    BUS_DMASYNC_POSTWRITE,
    BUS_DMASYNC_PREWRITE,
    BUS_SPACE_MAXADDR,
    BUS_SPACE_MAXADDR_32BIT,
    M_DEVBUF,
    M_PKTHDR,
    M_WAITOK,
    MT_DATA,
    BusDmaMap,
    BusDmaTag,
    DmaDebugKind,
    MapState,
    bio,
    bounce_impl,
    bus_dma_segment_t,
    bus_dma_tag_create,
    bus_dma_tag_destroy,
    bus_dmamap_create,
    bus_dmamap_destroy,
    bus_dmamap_load,
    bus_dmamap_load_bio,
    bus_dmamap_load_ma,
    bus_dmamap_load_mbuf,
    bus_dmamap_load_mem,
    bus_dmamap_sync,
    bus_dmamap_unload,
    bus_dmamem_alloc,
    bus_dmamem_free,
    bus_get_dma_tag,
    busdma_debug_check_detach,
    m_append,
    m_freem,
    m_getcl,
    memdesc_vlist,
)
from gntdma.toolstack.host import Guest, Host
from gntdma.xen.busdma import (
    BUS_DMA_XEN_DOMID_SHIFT,
    BUS_DMA_XEN_PREALLOC_REFS,
    BUS_DMA_XEN_RO,
    XenDmaImpl,
    xen_dmamap_get_grefs,
    xen_get_dma_tag,
)


def _map(tag: BusDmaTag, flags: int = 0) -> BusDmaMap:
    error, m = bus_dmamap_create(tag, flags)
    assert error == 0 and m is not None
    return m


def _locked(lock: Mutex, fn: Any, *args: Any) -> Any:
    mtx_lock(lock)
    try:
        return fn(*args)
    finally:
        mtx_unlock(lock)


class _DriverCb:
    """A driver's load callback that, like xbd_queue_cb, reads the references there."""

    def __init__(self, g: Guest, map_: BusDmaMap, lock: Mutex) -> None:
        self.g, self.map, self.lock = g, map_, lock
        self.calls: list[tuple[int, int, list[int], bool]] = []

    def __call__(self, arg: Any, segs: list[bus_dma_segment_t], nseg: int, error: int) -> None:
        refs = xen_dmamap_get_grefs(self.map)
        granted = all(
            self.g.gnttab.entry(r)[0] & GTF_permit_access
            and self.g.gnttab.entry(r)[2] == s.ds_addr >> 12
            for r, s in zip(refs, segs, strict=False))
        self.calls.append((nseg, error, refs, granted and self.lock.owner is not None))


# -- June 25: the unreachable branch after EINPROGRESS ---------------------------------------


def test_unreachable_branch_after_einprogress(host: Host) -> None:
    """June 25: ``if (error == EINPROGRESS) return (error); else return (error);`` made
    the code after the parent's load unreachable: a load whose parent load *succeeded*
    returned before allocating and granting references. All three outcomes of the
    parent's load, on one map: success goes on to grant, EINPROGRESS (bounce pages
    short) returns with nothing taken, an error (EFBIG) returns with nothing kept."""
    g = host.create_guest("g", memory_mb=8, high_memory_mb=8)
    g.kernel.bounce_max_pages = 2
    lock = Mutex("drv")
    tag = driver_tag(g, lock, nsegments=2, maxsize=4 * PAGE, alignment=1,
                     lowaddr=BUS_SPACE_MAXADDR_32BIT)
    hog, m = _map(tag), _map(tag)
    impl: XenDmaImpl = xen_impl(g)
    gt = g.gnttab
    tries = [kbuf(g.kernel, pattern(PAGE, 1))]
    while g.kernel.pmap_kextract(tries[-1]) >= 1 << 32:
        tries.append(kbuf(g.kernel, pattern(PAGE, 1)))
    low = tries[-1]
    high = high_kbuf(g.kernel, 2)
    g.kernel.kva_write(high, pattern(2 * PAGE, 2))
    loads = Loads(lock)
    # The parent's load succeeds (a low page, nothing to bounce): references granted.
    assert _locked(lock, bus_dmamap_load, tag, m, low, PAGE, loads.cb, None, 0) == 0
    assert loads.calls[-1][2] == 0
    (ref,) = check_map_grants(host.dom0, g, m, pattern(PAGE, 1), ro=False)
    _locked(lock, bus_dmamap_unload, tag, m)
    assert gt.entry(ref)[0] == 0 and gt.statistics().allocated == 0
    # The parent's load returns EINPROGRESS: no reference taken, nothing granted.
    assert _locked(lock, bus_dmamap_load, tag, hog, high, PAGE, loads.cb, None,
                   BUS_DMA_NOWAIT) == 0
    taken = gt.statistics().allocated
    assert _locked(lock, bus_dmamap_load, tag, m, high + PAGE, 2 * PAGE - PAGE, loads.cb,
                   None, BUS_DMA_NOWAIT) == 0  # one bounce page left: fits
    _locked(lock, bus_dmamap_unload, tag, m)
    assert _locked(lock, bus_dmamap_load, tag, m, high, 2 * PAGE, loads.cb, None, 0) \
        == errno.EINPROGRESS
    assert gt.statistics().allocated == taken and gt.statistics().granted == taken
    assert impl.statistics().grant_deferred == 0 and m.state is MapState.LOADING
    _locked(lock, bus_dmamap_unload, tag, hog)
    settle(host)
    assert loads.calls[-1][2] == 0 and m.state is MapState.LOADED
    bus_dmamap_sync(tag, m, BUS_DMASYNC_PREWRITE)
    check_map_grants(host.dom0, g, m, pattern(2 * PAGE, 2), ro=False)
    bus_dmamap_sync(tag, m, BUS_DMASYNC_POSTWRITE)
    _locked(lock, bus_dmamap_unload, tag, m)
    # The parent's load fails (3 pages, 2 segments allowed): EFBIG, nothing kept.
    ncalls = len(loads.calls)
    va = kbuf(g.kernel, pattern(3 * PAGE, 3))
    assert _locked(lock, bus_dmamap_load, tag, m, va, 3 * PAGE, loads.cb, None, 0) == 0
    assert len(loads.calls) == ncalls + 1 and loads.calls[-1][1:3] == (0, errno.EFBIG)
    assert m.state is MapState.IDLE and xen_dmamap_get_grefs(m) == []
    assert gt.statistics().allocated == 0 and gt.statistics().granted == 0
    assert bounce_impl(g.kernel).zones()[0].active_bpages == 0
    for b in (hog, m):
        assert bus_dmamap_destroy(tag, b) == 0
    assert bus_dma_tag_destroy(tag) == 0
    g.kernel.kmem_free(high, 2 * PAGE)
    g.kernel.free(va, M_DEVBUF)
    for t in tries:
        g.kernel.free(t, M_DEVBUF)


# -- June 18-21: a deferred load completing without grant references -------------------------


@pytest.mark.parametrize("deferral", ["none", "bounce", "grant", "bounce_then_grant"])
def test_deferred_load_completes_with_grant_refs(host: Host, deferral: str) -> None:
    """June 18: "If the load is called with BUS_DMA_WAITOK and the load is deferred,
    the grant references were not getting allocated ... the client callback was called
    with no grant references allocated". Whatever deferred the load, its callback runs
    once, under the lockfunc, and the references are there and granted *inside* it."""
    g = host.create_guest("g", memory_mb=8, high_memory_mb=8, max_grant_frames=1)
    g.kernel.bounce_max_pages = 3
    lock = Mutex("xbd_io")
    tag = driver_tag(g, lock, nsegments=3, maxsize=3 * PAGE, alignment=1,
                     lowaddr=BUS_SPACE_MAXADDR_32BIT)
    hog, m = _map(tag), _map(tag)
    hog_va, va = high_kbuf(g.kernel, 2), high_kbuf(g.kernel, 3)
    data = pattern(3 * PAGE - 100, 4)
    g.kernel.kva_write(va + 100, data)
    cb = _DriverCb(g, m, lock)
    heads: list[int] = []
    if deferral in ("bounce", "bounce_then_grant"):
        assert _locked(lock, bus_dmamap_load, tag, hog, hog_va, 2 * PAGE, Loads(lock).cb,
                       None, BUS_DMA_NOWAIT) == 0
    if deferral == "grant":
        heads = hold_refs(g, leave=1)
    rv = _locked(lock, bus_dmamap_load, tag, m, va + 100, len(data), cb, None,
                 BUS_DMA_WAITOK | BUS_DMA_XEN_RO)
    assert rv == (0 if deferral == "none" else errno.EINPROGRESS)
    if deferral == "bounce_then_grant":
        heads = hold_refs(g, leave=0)
        _locked(lock, bus_dmamap_unload, tag, hog)  # bounce pages and 2 refs back
        settle(host)
        assert cb.calls == [] and xen_impl(g).statistics().grant_deferred == 1
    elif deferral == "bounce":
        _locked(lock, bus_dmamap_unload, tag, hog)
    release_refs(g, heads)
    settle(host)
    ((nseg, error, refs, ok),) = cb.calls
    assert error == 0 and nseg == 3 and len(refs) == 3 and ok
    bus_dmamap_sync(tag, m, BUS_DMASYNC_PREWRITE)
    assert check_map_grants(host.dom0, g, m, data, ro=True) == refs
    bus_dmamap_sync(tag, m, BUS_DMASYNC_POSTWRITE)
    for b in (hog, m):
        _locked(lock, bus_dmamap_unload, tag, b)
        assert bus_dmamap_destroy(tag, b) == 0
    assert bus_dma_tag_destroy(tag) == 0
    g.kernel.kmem_free(hog_va, 2 * PAGE)
    g.kernel.kmem_free(va, 3 * PAGE)


# -- June 26-27: unload before the deferred load completes ------------------------------------


@pytest.mark.parametrize("deferral", ["bounce", "bounce_then_grant", "grant_picked"])
def test_unload_before_deferred_load_completes(host: Host, deferral: str) -> None:
    """June 26: "Memory leak and segmentation fault if unload is called before the
    load finishes". Unloading while the load waits (for bounce pages; for references
    after its bounce replay; or after the grant-table task already picked its callback,
    which waits for the driver lock) cancels it: no callback ever, nothing held."""
    g = host.create_guest("g", memory_mb=8, high_memory_mb=8, max_grant_frames=1)
    g.kernel.bounce_max_pages = 3
    lock = Mutex("xbd_io")
    tag = driver_tag(g, lock, nsegments=3, maxsize=3 * PAGE, alignment=1,
                     lowaddr=BUS_SPACE_MAXADDR_32BIT)
    hog, m = _map(tag), _map(tag)
    hog_va, va = high_kbuf(g.kernel, 2), high_kbuf(g.kernel, 3)
    hog_loads, loads = Loads(lock), Loads(lock)
    heads: list[int] = []
    if deferral != "grant_picked":
        assert _locked(lock, bus_dmamap_load, tag, hog, hog_va, 2 * PAGE, hog_loads.cb,
                       None, BUS_DMA_NOWAIT) == 0
    else:
        heads = hold_refs(g, leave=0)
    assert _locked(lock, bus_dmamap_load, tag, m, va, 3 * PAGE, loads.cb, None, 0) \
        == errno.EINPROGRESS
    if deferral == "bounce_then_grant":
        heads = hold_refs(g, leave=0)
        _locked(lock, bus_dmamap_unload, tag, hog)  # replayed: now waits for references
        settle(host)
        assert xen_impl(g).statistics().grant_deferred == 1
        _locked(lock, bus_dmamap_unload, tag, m)
        assert g.gnttab.statistics().callbacks_queued == 0  # its free callback is gone
    elif deferral == "bounce":
        _locked(lock, bus_dmamap_unload, tag, m)
        _locked(lock, bus_dmamap_unload, tag, hog)
    else:
        mtx_lock(lock)
        release_refs(g, heads)  # the grant-table task picks m's callback ...
        settle(host)  # ... which now waits for xbd_io
        bus_dmamap_unload(tag, m)
        mtx_unlock(lock)
    release_refs(g, heads)
    settle(host)
    assert loads.calls == [] and m.state is MapState.IDLE
    st = g.kernel.statistics()
    assert st.dma_deferred_pending == 0 and st.dma_maps_loaded == 0
    assert g.gnttab.statistics().allocated == 0 and g.gnttab.statistics().callbacks_queued == 0
    zone = bounce_impl(g.kernel).zones()[0]
    assert zone.free_bpages == zone.total_bpages and not zone.waiting
    assert g.kernel.dma_debug.reports() == []
    # The map is as good as new.
    g.kernel.kva_write(va, pattern(3 * PAGE, 5))
    assert _locked(lock, bus_dmamap_load, tag, m, va, 3 * PAGE, loads.cb, None, 0) == 0
    assert [c[2] for c in loads.calls] == [0]
    bus_dmamap_sync(tag, m, BUS_DMASYNC_PREWRITE)
    check_map_grants(host.dom0, g, m, pattern(3 * PAGE, 5), ro=False)
    for b in (hog, m):
        _locked(lock, bus_dmamap_unload, tag, b)
        assert bus_dmamap_destroy(tag, b) == 0
    assert bus_dma_tag_destroy(tag) == 0
    g.kernel.kmem_free(hog_va, 2 * PAGE)
    g.kernel.kmem_free(va, 3 * PAGE)


# -- June 20-21: memory leaks -----------------------------------------------------------------


def _busdma_cycle(host: Host, g: Guest, lock: Mutex, cycle: int) -> None:
    """Tags, maps of every kind, loads of every kind (immediate, deferred, failed,
    cancelled), then unload, destroy."""
    k = g.kernel
    tag = driver_tag(g, lock, nsegments=8, maxsize=6 * PAGE, alignment=512,
                     lowaddr=BUS_SPACE_MAXADDR_32BIT)
    plain, pre, spare = _map(tag), _map(tag, BUS_DMA_XEN_PREALLOC_REFS), _map(tag)
    error, dva, dmem = bus_dmamem_alloc(tag, BUS_DMA_NOWAIT)
    assert error == 0 and dmem is not None
    loads = Loads(lock)
    # A failed load (EFBIG), while the bounce zone is all free.
    smalls = [kbuf(k, pattern(100, i)) for i in range(9)]  # 9 segments, 8 allowed
    vlist = memdesc_vlist([bus_dma_segment_t(b, 100) for b in smalls])
    assert _locked(lock, bus_dmamap_load_mem, tag, spare, vlist, loads.cb, None, 0) == 0
    assert loads.calls[-1][2] == errno.EFBIG
    data = pattern(3 * PAGE + 77, cycle)
    va = kbuf(k, data, offset=100)
    assert _locked(lock, bus_dmamap_load, tag, plain, va, len(data), loads.cb, None, 0) == 0
    mb = m_getcl(k, M_WAITOK, MT_DATA, M_PKTHDR)
    assert mb is not None and m_append(mb, 3000, pattern(3000, cycle)) == 1
    got: list[int] = []
    assert bus_dmamap_load_mbuf(tag, pre, mb, lambda a, s, n, sz, e: got.append(e), None,
                                BUS_DMA_NOWAIT | BUS_DMA_XEN_RO) == 0
    pfns = page_array(k, pattern(2 * PAGE, cycle), 300)
    bp = bio(bio_cmd=BIO_WRITE, bio_flags=BIO_UNMAPPED, bio_bcount=2 * PAGE, bio_ma=pfns,
             bio_ma_offset=300, bio_ma_n=len(pfns))
    assert _locked(lock, bus_dmamap_load_bio, tag, dmem, bp, loads.cb, None,
                   BUS_DMA_NOWAIT) == 0
    _locked(lock, bus_dmamap_unload, tag, dmem)
    k.kva_write(dva, pattern(6 * PAGE, cycle))
    assert _locked(lock, bus_dmamap_load, tag, dmem, dva, 6 * PAGE, loads.cb, None, 0) == 0
    # Deferred for references, then cancelled.
    heads = hold_refs(g, leave=0)
    assert _locked(lock, bus_dmamap_load_ma, tag, spare, pfns, 2 * PAGE, 300, loads.cb,
                   None, 0) == errno.EINPROGRESS
    _locked(lock, bus_dmamap_unload, tag, spare)
    release_refs(g, heads)
    settle(host)
    assert [c[2] for c in loads.calls][:3] == [errno.EFBIG, 0, 0] and got == [0]
    for m in (plain, pre):
        _locked(lock, bus_dmamap_unload, tag, m)
    for m in (plain, pre, spare):  # spare: unloaded already (its load was cancelled)
        assert bus_dmamap_destroy(tag, m) == 0
    _locked(lock, bus_dmamap_unload, tag, dmem)
    bus_dmamem_free(tag, dva, dmem)
    assert bus_dma_tag_destroy(tag) == 0
    m_freem(mb)
    free_pages(k, pfns)
    k.free(va - 100, M_DEVBUF)
    for b in smalls:
        k.free(b, M_DEVBUF)


def test_memory_leaks_accounting_back_to_zero(host: Host) -> None:
    """June 20-21: "Fixed some memory leaks". After each create/load/unload/destroy
    cycle every malloc type the busdma code uses (bounce pages in M_BUSDMA, and
    M_BUSDMA_XEN if it is used at all), every page, every grant reference and every
    bus_dma object is back to zero; nothing grows from cycle to cycle."""
    g = host.create_guest("g", memory_mb=8, high_memory_mb=8, max_grant_frames=1)
    lock = Mutex("drv")
    k = g.kernel
    seen_busdma = False
    for cycle in range(3):
        _busdma_cycle(host, g, lock, cycle)
        stats = k.malloc_statistics()
        for name, s in stats.items():
            assert (s.memuse, s.inuse) == (0, 0), (cycle, name, s)
            assert s.requests == s.frees, (cycle, name, s)
        seen_busdma = seen_busdma or stats["busdma"].maxused > 0
        if "busdma_xen" in stats:
            assert stats["busdma_xen"].memuse == 0
        st = k.statistics()
        assert (st.pages_in_use, st.kva_pages_mapped, st.malloc_bytes) == (0, 0, 0)
        assert (st.dma_tags, st.dma_maps, st.dma_maps_loaded, st.dma_deferred_pending) \
            == (0, 0, 0, 0)
        assert (st.bounce_pages, st.taskqueue_pending) == (0, 0)
        gs = g.gnttab.statistics()
        assert (gs.allocated, gs.granted, gs.callbacks_queued, gs.reclaim_pending) \
            == (0, 0, 0, 0)
        assert xen_impl(g).statistics().refs_held == 0 and xen_impl(g).maps == {}
        assert [r.kind for r in k.dma_debug.reports()] == []
    assert seen_busdma  # the cycle did use bounce pages, and gave them all back


# -- July 6-9: the infinite recursion when a driver creates a child tag ------------------------


def test_child_tag_of_xen_tag_no_infinite_recursion(host: Host) -> None:
    """July 6: ``xen_bus_dma_tag_create`` called ``bus_dma_tag_create(parent, ...)``,
    which dispatched to the parent's (Xen) tag_create again, forever. A deep chain of
    Xen tags, each created by a driver from the one above, naming the backend domid
    or (zero bits) inheriting it: each is a Xen tag with the root's page boundary, and
    grants go to that domid (a child may not name another backend: DESIGN section 7,
    ``test_child_tag_naming_another_backend_is_einval``). The root is built once,
    whoever asks (V5 built and leaked one per call)."""
    backends = [host.create_guest(f"backend{i}", memory_mb=4) for i in range(3)]
    g = host.create_guest("g")
    root = xen_get_dma_tag(g.kernel)
    assert all(xen_get_dma_tag(g.kernel) is root for _ in range(3))
    tags: list[BusDmaTag] = []
    parent: BusDmaTag = root
    peer = backends[1]
    for depth in range(40):
        bits = peer.domid << BUS_DMA_XEN_DOMID_SHIFT if depth % 3 != 1 else 0
        error, tag = bus_dma_tag_create(parent, 1, 0, BUS_SPACE_MAXADDR, BUS_SPACE_MAXADDR,
                                        2 * PAGE, 2, PAGE, bits, None, None)
        assert error == 0 and tag is not None
        assert tag.impl is root.impl and tag.boundary == PAGE and tag.maxsegsz == PAGE
        assert tag.domid == peer.domid  # type: ignore[attr-defined]
        tags.append(tag)
        parent = tag
    for depth in (0, 1, 39):
        tag = tags[depth]
        others = tuple(b for b in (*backends, host.dom0) if b is not peer)
        m = _map(tag)
        data = pattern(PAGE + 500, depth)
        va = kbuf(g.kernel, data, offset=3000)
        assert bus_dmamap_load(tag, m, va, len(data), Loads(Mutex("x")).cb, None,
                               BUS_DMA_NOWAIT) == 0
        check_map_grants(peer, g, m, data, ro=False, others=others)
        bus_dmamap_unload(tag, m)
        assert bus_dmamap_destroy(tag, m) == 0
        g.kernel.free(va - 3000, M_DEVBUF)
    # A Xen tag over a machine tag needs the bootstrap flag: refused, not recursed.
    error, bad = bus_dma_tag_create(bus_get_dma_tag(g.kernel), 1, 0, BUS_SPACE_MAXADDR,
                                    BUS_SPACE_MAXADDR, PAGE, 1, PAGE, 0, None, None,
                                    impl=root.impl)
    assert error == errno.EINVAL and bad is None
    for tag in reversed(tags):
        assert bus_dma_tag_destroy(tag) == 0
    assert g.kernel.statistics().dma_tags == 0


# -- July 18: the &cm_indirectionrefs copy ------------------------------------------------------


def test_wrong_indirection_refs_copied(host: Host) -> None:
    """July 18: ``memcpy(ring_req->indirect_grefs, &cm->cm_indirectionrefs, ...)`` copied
    the pointer's bytes, not the references, after ``cm_indirectionrefs`` became a
    pointer to ``xen_dmamap_get_grefs(cm_indirectionmap)``; ~35% of the I/O failed
    with EIO. The references a driver hands over must be those of the map it loaded:
    a data map and an indirection map (blkfront's two maps per command), loaded one
    after the other, each grant their own frames; the indirection page, listing the
    data refs, leads the backend to exactly the data."""
    g = host.create_guest("g")
    lock = Mutex("xbd_io")
    data_tag = driver_tag(g, lock, nsegments=4, maxsize=4 * PAGE, alignment=512)
    ind_tag = driver_tag(g, lock, nsegments=1, maxsize=PAGE, alignment=PAGE)
    data_map = _map(data_tag)
    error, ind_va, ind_map = bus_dmamem_alloc(ind_tag, BUS_DMA_NOWAIT)
    assert error == 0 and ind_map is not None
    data = pattern(3 * PAGE + 512, 21)
    va = kbuf(g.kernel, data, offset=1024)
    loads = Loads(lock)
    # xbd_connect: the indirection page is loaded first (NOWAIT|RO), at attach.
    g.kernel.kva_write(ind_va, bytes(PAGE))
    assert bus_dmamap_load(ind_tag, ind_map, ind_va, PAGE, loads.cb, None,
                           BUS_DMA_NOWAIT | BUS_DMA_XEN_RO) == 0
    ind_refs = xen_dmamap_get_grefs(ind_map)
    # xbd_queue_cb: the data load's callback reads its refs and fills the page.
    assert _locked(lock, bus_dmamap_load, data_tag, data_map, va, len(data), loads.cb, None,
                   BUS_DMA_XEN_RO) == 0
    data_refs = xen_dmamap_get_grefs(data_map)
    assert len(data_refs) == 4 and not set(data_refs) & set(ind_refs)
    assert xen_dmamap_get_grefs(data_map) is not xen_dmamap_get_grefs(data_map)  # copies
    xen_dmamap_get_grefs(data_map).clear()
    assert xen_dmamap_get_grefs(data_map) == data_refs  # the map's own list is untouched
    entries = [(r, s.ds_addr & (PAGE - 1), s.ds_len) for r, s in
               zip(data_refs, data_map.dm_segs, strict=True)]
    g.kernel.kva_write(ind_va, b"".join(struct.pack("<IHH", *e) for e in entries))
    bus_dmamap_sync(ind_tag, ind_map, BUS_DMASYNC_PREWRITE)
    bus_dmamap_sync(data_tag, data_map, BUS_DMASYNC_PREWRITE)
    check_map_grants(host.dom0, g, data_map, data, ro=True)
    # The ring request carries ind_refs; blkback follows them to the data.
    seen = b""
    (ind_ref,) = ind_refs
    status, page = peer_read(host.dom0, g, ind_ref, ind_map.dm_segs[0])
    assert status == GNTST_okay
    for i in range(len(entries)):
        ref, off, ln = struct.unpack_from("<IHH", page, 8 * i)
        status, chunk = peer_read(host.dom0, g, ref,
                                  bus_dma_segment_t((g.gnttab.entry(ref)[2] << 12) | off, ln))
        assert status == GNTST_okay
        seen += chunk
    assert seen == data
    # The bug's copy: the data map's refs where the indirection refs belong.
    status, wrong = peer_read(host.dom0, g, data_refs[0], ind_map.dm_segs[0])
    assert status == GNTST_okay and wrong != page
    # After unload, stale copies of the refs lead nowhere.
    for t, m in ((data_tag, data_map), (ind_tag, ind_map)):
        bus_dmamap_sync(t, m, BUS_DMASYNC_POSTWRITE)
        _locked(lock, bus_dmamap_unload, t, m)
    for r in data_refs + ind_refs:
        assert peer_map(host.dom0, g, r, writable=False)[0] != GNTST_okay
    assert bus_dmamap_destroy(data_tag, data_map) == 0
    bus_dmamem_free(ind_tag, ind_va, ind_map)
    assert bus_dma_tag_destroy(data_tag) == 0 and bus_dma_tag_destroy(ind_tag) == 0
    g.kernel.free(va - 1024, M_DEVBUF)


# -- July 26-28: the double free when a disk is removed on a running system ---------------------


def test_disk_removed_double_free(host: Host) -> None:
    """July 26: "a double free which happens when a disk is removed on a running
    system". A detach with I/O in flight (one map loaded, one waiting for references,
    a prealloc map loaded): done in the wrong order it is refused and reported, never a
    double free; done in the right order every reference is freed exactly once."""
    g = host.create_guest("g", max_grant_frames=1)
    lock = Mutex("xbd_io")
    tag = driver_tag(g, lock, nsegments=2, maxsize=2 * PAGE)
    loaded, waiting, pre = _map(tag), _map(tag), _map(tag, BUS_DMA_XEN_PREALLOC_REFS)
    va = kbuf(g.kernel, pattern(2 * PAGE, 31))
    loads = Loads(lock)
    for m in (loaded, pre):
        assert _locked(lock, bus_dmamap_load, tag, m, va, 2 * PAGE, loads.cb, None, 0) == 0
    heads = hold_refs(g, leave=0)
    assert _locked(lock, bus_dmamap_load, tag, waiting, va, 2 * PAGE, loads.cb, None, 0) \
        == errno.EINPROGRESS
    gt = g.gnttab
    free0 = gt.free_count
    dbg = g.kernel.dma_debug
    # Detach in the wrong order: refused and reported, nothing freed.
    assert busdma_debug_check_detach(tag) == 3
    assert bus_dma_tag_destroy(tag) == errno.EBUSY
    for m in (loaded, waiting, pre):
        assert bus_dmamap_destroy(tag, m) == errno.EBUSY
    assert [r.kind for r in dbg.reports()] == [DmaDebugKind.LOADED_AT_DETACH] * 3 + [
        DmaDebugKind.TAG_DESTROY_BUSY] + [DmaDebugKind.DESTROY_LOADED_MAP] * 3
    dbg.reset()
    assert gt.free_count == free0 and xen_dmamap_get_grefs(loaded) != []
    # The right order; unloading twice frees nothing twice.
    for m in (loaded, waiting, pre):
        _locked(lock, bus_dmamap_unload, tag, m)
    assert gt.free_count == free0 + 2  # only the loaded map's per-load refs
    for m in (loaded, waiting, pre):
        _locked(lock, bus_dmamap_unload, tag, m)
    assert [r.kind for r in dbg.reports()] == [DmaDebugKind.DOUBLE_UNLOAD] * 3
    dbg.reset()
    assert gt.free_count == free0 + 2
    for m in (loaded, waiting, pre):
        assert bus_dmamap_destroy(tag, m) == 0
    assert gt.free_count == free0 + 4  # the prealloc map's refs, once
    with pytest.raises(KernelPanic, match="destroyed"):
        bus_dmamap_destroy(tag, pre)
    with pytest.raises(KernelPanic, match="destroyed"):
        bus_dmamap_unload(tag, loaded)
    assert gt.free_count == free0 + 4
    assert bus_dma_tag_destroy(tag) == 0
    release_refs(g, heads)
    settle(host)
    assert [c[2] for c in loads.calls] == [0, 0]  # the waiting load never called back
    assert gt.statistics().allocated == 0 and gt.free_count == 504
    assert gt.reports == []
    g.kernel.free(va, M_DEVBUF)
