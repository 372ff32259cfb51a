"""busdma_xen: every V5 bug and residual hazard of reference/busdma.md sections 1.4-1.10.

Each test builds the situation in which the 2018 V5 code went wrong and shows what
gntdma does instead. Hazards already covered in ``test_busdma_xen.py`` are not
repeated here:

- loading an already-loaded map: ``test_reload_of_loaded_map_is_refused`` (here:
  a map whose load is still pending, and netfront's reload of a prealloc map);
- unload of a never-loaded map: ``test_unload_of_never_loaded_map_is_a_noop``
  (here: prealloc and ``bus_dmamem_alloc`` maps as well);
- ``mem_alloc`` map without a tag: ``test_dmamem_alloc_map_loads_with_grants``
  (here: the path that needed the tag in V5, a load waiting for references);
- a chained load running short: ``test_chained_load_short_midway_keeps_earlier_refs``
  (sleepable; here: the NOWAIT mbuf chain that fails after partial loads);
- a grant still mapped at unload:
  ``test_grant_still_mapped_by_backend_at_unload_is_reported_and_reclaimed``.
"""

from __future__ import annotations

import errno
from typing import Any

import pytest
from busdma_helpers import (
    PAGE,
    Loads,
    check_map_grants,
    driver_tag,
    high_kbuf,
    hold_refs,
    kbuf,
    pattern,
    peer_map,
    peer_unmap,
    release_refs,
    settle,
    xen_impl,
)

from gntdma.abi.grant_table import GNTST_okay
from gntdma.sched import (
    MTX_DEF,
    MTX_RECURSE,
    WITNESS,
    KernelPanic,
    Mutex,
    mtx_lock,
    mtx_unlock,
)
from gntdma.sys import (
    BUS_DMA_NOWAIT,
    BUS_DMA_WAITOK,
    BUS_DMASYNC_POSTWRITE,
    BUS_DMASYNC_PREWRITE,
    BUS_SPACE_MAXADDR_32BIT,
    M_DEVBUF,
    M_PKTHDR,
    M_WAITOK,
    MJUMPAGESIZE,
    MT_DATA,
    BusDmaMap,
    BusDmaTag,
    DmaDebugKind,
    MapState,
    bus_dma_segment_t,
    bus_dma_tag_destroy,
    bus_dmamap_create,
    bus_dmamap_destroy,
    bus_dmamap_load,
    bus_dmamap_load_mbuf_sg,
    bus_dmamap_sync,
    bus_dmamap_unload,
    bus_dmamem_alloc,
    bus_dmamem_free,
    m_append,
    m_freem,
    m_getjcl,
    m_length,
)
from gntdma.toolstack.host import Guest, Host
from gntdma.xen.busdma import (
    BUS_DMA_XEN_PREALLOC_REFS,
    BUS_DMA_XEN_RO,
    xen_dmamap_get_grefs,
)


def _map(tag: BusDmaTag, flags: int = 0) -> BusDmaMap:
    error, m = bus_dmamap_create(tag, flags)
    assert error == 0 and m is not None
    return m


def _teardown(tag: BusDmaTag, *maps: BusDmaMap) -> None:
    for m in maps:
        bus_dmamap_unload(tag, m)
        assert bus_dmamap_destroy(tag, m) == 0
    assert bus_dma_tag_destroy(tag) == 0


# -- V5 bug: mem_alloc maps had no tag ---------------------------------------------------------


def test_mem_alloc_map_has_its_tag_when_its_load_waits_for_refs(host: Host) -> None:
    """V5 ``mem_alloc`` never set ``xenmap->tag``; the non-prealloc reference path
    (``xen_dmamap_alloc_refs``, then the free callback) dereferenced it."""
    g = host.create_guest("g", max_grant_frames=1)
    lock = Mutex("drv")
    tag = driver_tag(g, lock, nsegments=2, maxsize=2 * PAGE, alignment=PAGE)
    error, va, m = bus_dmamem_alloc(tag, BUS_DMA_NOWAIT)
    assert error == 0 and m is not None
    assert m.dmat is tag
    data = pattern(2 * PAGE, 3)
    g.kernel.kva_write(va, data)
    heads = hold_refs(g, leave=1)
    loads = Loads(lock)
    mtx_lock(lock)
    assert bus_dmamap_load(tag, m, va, len(data), loads.cb, None, BUS_DMA_WAITOK) \
        == errno.EINPROGRESS
    mtx_unlock(lock)
    release_refs(g, heads)
    settle(host)
    assert len(loads.calls) == 1 and loads.calls[0][2] == 0 and loads.calls[0][3]
    check_map_grants(host.dom0, g, m, data, ro=False)
    bus_dmamap_unload(tag, m)
    bus_dmamem_free(tag, va, m)
    assert bus_dma_tag_destroy(tag) == 0


# -- V5 bug: unload of a never-loaded map -------------------------------------------------------


@pytest.mark.parametrize("kind", ["plain", "prealloc", "dmamem"])
def test_unload_of_never_loaded_map_touches_nothing(host: Host, kind: str) -> None:
    """V5 passed ``refs == NULL`` to ``gnttab_end_foreign_access_references`` (page fault)."""
    g = host.create_guest("g")
    lock = Mutex("drv")
    tag = driver_tag(g, lock, nsegments=3, maxsize=3 * PAGE)
    va = 0
    if kind == "dmamem":
        error, va, m = bus_dmamem_alloc(tag, BUS_DMA_NOWAIT)
        assert error == 0 and m is not None
    else:
        m = _map(tag, BUS_DMA_XEN_PREALLOC_REFS if kind == "prealloc" else 0)
    refs_before = list(m.refs)  # type: ignore[attr-defined]
    entries_before = [g.gnttab.entry(r) for r in refs_before]
    free_before = g.gnttab.free_count
    bus_dmamap_unload(tag, m)
    bus_dmamap_unload(tag, m)  # still never loaded: not a double unload either
    assert g.gnttab.free_count == free_before
    assert m.refs == refs_before  # type: ignore[attr-defined]
    assert [g.gnttab.entry(r) for r in refs_before] == entries_before
    assert g.kernel.dma_debug.reports() == [] and g.gnttab.reports == []
    # The map still works.
    data = pattern(PAGE + 10)
    buf = kbuf(g.kernel, data) if kind != "dmamem" else va
    if kind == "dmamem":
        g.kernel.kva_write(va, data)
    loads = Loads(lock)
    assert bus_dmamap_load(tag, m, buf, len(data), loads.cb, None, BUS_DMA_NOWAIT) == 0
    check_map_grants(host.dom0, g, m, data, ro=False)
    bus_dmamap_unload(tag, m)
    if kind == "dmamem":
        bus_dmamem_free(tag, va, m)
    else:
        assert bus_dmamap_destroy(tag, m) == 0
        g.kernel.free(buf, M_DEVBUF)
    assert bus_dma_tag_destroy(tag) == 0
    assert g.gnttab.free_count == free_before + len(refs_before)


# -- V5 bug: the bounce-deferral offset of path A ------------------------------------------------


def _bounce_guest(host: Host, bounce_pages: int, max_grant_frames: int = 64) -> Guest:
    g = host.create_guest("g", memory_mb=8, high_memory_mb=8, max_grant_frames=max_grant_frames)
    g.kernel.bounce_max_pages = bounce_pages
    return g


def _bounce_tag(g: Guest, lock: Mutex, backend: int = 0) -> BusDmaTag:
    return driver_tag(g, lock, nsegments=4, maxsize=4 * PAGE, alignment=1,
                      lowaddr=BUS_SPACE_MAXADDR_32BIT, backend=backend)


@pytest.mark.parametrize("ro", [False, True], ids=["rw", "ro"])
def test_bounce_deferred_load_replayed_grants_the_right_refs(host: Host, ro: bool) -> None:
    """Path A: a sleepable load deferred by the *bounce* layer and replayed on
    taskqueue_swi. V5's ``xen_dmamap_callback`` set ``nrefs = nseg``, claimed into
    ``refs[nseg..2*nseg)`` and granted the uninitialised ``refs[0..nseg)``. The
    replay must grant exactly one fresh reference per segment, each to its bounce
    page, to the right domain and with the load's read-only flag."""
    backend = host.create_guest("backend", memory_mb=4)
    g = _bounce_guest(host, bounce_pages=4)
    lock = Mutex("drv")
    tag = _bounce_tag(g, lock, backend=backend.domid)
    hog, m = _map(tag), _map(tag)
    hog_va = high_kbuf(g.kernel, 3)
    va = high_kbuf(g.kernel, 2)
    data = pattern(2 * PAGE - 300, 5)
    g.kernel.kva_write(va + 300, data)
    loads = Loads(lock)
    flags = BUS_DMA_WAITOK | (BUS_DMA_XEN_RO if ro else 0)
    mtx_lock(lock)
    assert bus_dmamap_load(tag, hog, hog_va, 3 * PAGE, loads.cb, "hog", BUS_DMA_NOWAIT) == 0
    allocated = g.gnttab.statistics().allocated
    assert bus_dmamap_load(tag, m, va + 300, len(data), loads.cb, "m", flags) \
        == errno.EINPROGRESS
    mtx_unlock(lock)
    assert g.gnttab.statistics().allocated == allocated  # no reference before the replay
    settle(host)
    assert len(loads.calls) == 1  # only the hog so far
    mtx_lock(lock)
    bus_dmamap_unload(tag, hog)  # gives the bounce pages back: the replay is queued
    mtx_unlock(lock)
    settle(host)
    assert len(loads.calls) == 2
    segs, nseg, error, locked = loads.calls[1]
    assert error == 0 and locked and nseg == len(segs) == 2
    assert all(s.ds_addr + s.ds_len <= 1 << 32 for s in segs)  # bounce pages
    # Exactly one new reference per segment, nothing claimed twice or left over.
    assert g.gnttab.statistics().allocated == allocated - 3 + nseg
    bus_dmamap_sync(tag, m, BUS_DMASYNC_PREWRITE)
    check_map_grants(backend, g, m, data, ro=ro, others=(host.dom0,))
    bus_dmamap_sync(tag, m, BUS_DMASYNC_POSTWRITE)
    refs = xen_dmamap_get_grefs(m)
    bus_dmamap_unload(tag, m)
    assert all(g.gnttab.entry(r)[0] == 0 for r in refs)
    assert g.gnttab.statistics().allocated == allocated - 3
    _teardown(tag, hog, m)
    g.kernel.kmem_free(hog_va, 3 * PAGE)
    g.kernel.kmem_free(va, 2 * PAGE)


def test_bounce_deferral_then_grant_shortage_completes_once(host: Host) -> None:
    """Path A then path B: the replayed load finds the grant table short, waits for a
    free callback, and completes once, with references, under the lockfunc."""
    g = _bounce_guest(host, bounce_pages=4, max_grant_frames=1)
    lock = Mutex("drv")
    tag = _bounce_tag(g, lock)
    hog, m = _map(tag), _map(tag)
    hog_va, va = high_kbuf(g.kernel, 3), high_kbuf(g.kernel, 3)
    data = pattern(3 * PAGE, 6)
    g.kernel.kva_write(va, data)
    loads = Loads(lock)
    mtx_lock(lock)
    assert bus_dmamap_load(tag, hog, hog_va, 3 * PAGE, loads.cb, None, BUS_DMA_NOWAIT) == 0
    assert bus_dmamap_load(tag, m, va, 3 * PAGE, loads.cb, None, 0) == errno.EINPROGRESS
    mtx_unlock(lock)
    heads = hold_refs(g, leave=0)
    mtx_lock(lock)
    bus_dmamap_unload(tag, hog)  # bounce pages back, 3 refs back: 3 free
    mtx_unlock(lock)
    heads += hold_refs(g, leave=1)  # ... but only one stays free
    settle(host)
    assert len(loads.calls) == 1 and m.state is MapState.LOADING  # waiting for grants now
    assert xen_impl(g).statistics().grant_deferred == 1
    release_refs(g, heads)
    settle(host)
    assert len(loads.calls) == 2
    _, nseg, error, locked = loads.calls[1]
    assert error == 0 and nseg == 3 and locked
    bus_dmamap_sync(tag, m, BUS_DMASYNC_PREWRITE)
    check_map_grants(host.dom0, g, m, data, ro=False)
    bus_dmamap_sync(tag, m, BUS_DMASYNC_POSTWRITE)
    settle(host)
    assert len(loads.calls) == 2  # never twice
    _teardown(tag, hog, m)
    g.kernel.kmem_free(hog_va, 3 * PAGE)
    g.kernel.kmem_free(va, 3 * PAGE)


# -- V5 hazard: NOWAIT failure after partial loads -------------------------------------------------


def _chain(g: Guest, data: bytes) -> Any:
    """An mbuf chain: a page-size cluster, then small mbufs (m_append)."""
    m = m_getjcl(g.kernel, M_WAITOK, MT_DATA, M_PKTHDR, MJUMPAGESIZE)
    assert m is not None
    assert m_append(m, len(data), data) == 1
    return m


def test_nowait_chain_short_midway_gives_back_every_ref(host: Host) -> None:
    """V5: a NOWAIT shortage after earlier buffers of the same load had their refs
    freed the array but did not reset ``nrefs``; the next load of the map then
    granted past the end. Here the failed load gives back every reference it took,
    and the map's next load takes exactly one per segment."""
    g = host.create_guest("g", max_grant_frames=1)
    lock = Mutex("drv")
    tag = driver_tag(g, lock, nsegments=16, maxsize=16 * PAGE, alignment=1)
    m = _map(tag)
    data = pattern(PAGE + 3 * 224, 8)  # the cluster, then 3 small mbufs: 4 buffers
    chain = _chain(g, data)
    assert m_length(chain) == len(data)
    heads = hold_refs(g, leave=2)  # the first buffers get refs, a later one runs short
    assert bus_dmamap_load_mbuf_sg(tag, m, chain, 0) == (errno.ENOMEM, [], 0)
    assert g.gnttab.free_count == 2  # the partial load's refs came back
    assert m.state is MapState.IDLE and m.refs == []  # type: ignore[attr-defined]
    assert xen_impl(g).statistics().nowait_shortages == 1
    release_refs(g, heads)
    free0 = g.gnttab.free_count
    error, segs, nsegs = bus_dmamap_load_mbuf_sg(tag, m, chain, 0)
    assert error == 0 and nsegs == len(segs) == 4
    assert g.gnttab.free_count == free0 - nsegs
    check_map_grants(host.dom0, g, m, data, ro=False)
    _teardown(tag, m)
    assert g.gnttab.free_count == free0
    m_freem(chain)


# -- V5 hazard: re-load of a loaded map ------------------------------------------------------


def test_reload_of_a_map_whose_load_is_pending_is_refused(host: Host) -> None:
    """A second load on a map whose first load waits for references is refused with
    EINVAL; the pending load is untouched and still completes, once."""
    g = host.create_guest("g", max_grant_frames=1)
    lock = Mutex("drv")
    tag = driver_tag(g, lock, nsegments=4, maxsize=4 * PAGE)
    m = _map(tag)
    data = pattern(2 * PAGE, 9)
    va = kbuf(g.kernel, data)
    heads = hold_refs(g, leave=1)
    loads = Loads(lock)
    mtx_lock(lock)
    assert bus_dmamap_load(tag, m, va, len(data), loads.cb, "first", 0) == errno.EINPROGRESS
    assert bus_dmamap_load(tag, m, va, PAGE, loads.cb, "second", 0) == errno.EINVAL
    mtx_unlock(lock)
    assert [c[2] for c in loads.calls] == [errno.EINVAL]
    assert [r.kind for r in g.kernel.dma_debug.reports()] == [DmaDebugKind.LOAD_LOADED_MAP]
    g.kernel.dma_debug.reset()
    assert m.state is MapState.LOADING
    release_refs(g, heads)
    settle(host)
    assert [c[2] for c in loads.calls] == [errno.EINVAL, 0]
    check_map_grants(host.dom0, g, m, data, ro=False)
    _teardown(tag, m)
    g.kernel.free(va, M_DEVBUF)


def test_netfront_rebuild_reload_of_prealloc_map_is_refused(host: Host) -> None:
    """netfront's ``xn_rebuild_rx_bufs`` reloaded still-loaded 1-segment prealloc maps:
    in V5 nrefs went to 2 (KASSERT, or ``map_complete`` read ``refs[1]`` past the end)."""
    g = host.create_guest("g")
    lock = Mutex("drv")
    tag = driver_tag(g, lock, nsegments=1, maxsize=PAGE, alignment=1)
    m = _map(tag, BUS_DMA_XEN_PREALLOC_REFS)
    (ref,) = m.refs  # type: ignore[attr-defined]
    data = pattern(1000, 10)
    va = kbuf(g.kernel, data)
    loads = Loads(lock)
    assert bus_dmamap_load(tag, m, va, len(data), loads.cb, None, BUS_DMA_NOWAIT) == 0
    free = g.gnttab.free_count
    for _ in range(3):
        assert bus_dmamap_load(tag, m, va, len(data), loads.cb, None, BUS_DMA_NOWAIT) \
            == errno.EINVAL
    assert m.refs == [ref] and xen_dmamap_get_grefs(m) == [ref]  # type: ignore[attr-defined]
    assert g.gnttab.free_count == free
    check_map_grants(host.dom0, g, m, data, ro=False)
    assert len(g.kernel.dma_debug.reports(DmaDebugKind.LOAD_LOADED_MAP)) == 3
    g.kernel.dma_debug.reset()
    _teardown(tag, m)
    g.kernel.free(va, M_DEVBUF)


# -- V5 hazard: path B overwrote refs of earlier partial loads -------------------------------


def test_grant_deferred_completion_keeps_refs_already_held(host: Host) -> None:
    """V5 path B claimed ``refs[0..nrefs)`` from scratch and so overwrote (leaked) the
    references a map already held. A prealloc map that lost one reference (the backend
    still mapped it at unload) while the table was exhausted (so no replacement could
    be taken then) must wait for the one it lacks and keep the others."""
    g = host.create_guest("g", max_grant_frames=1)
    lock = Mutex("drv")
    tag = driver_tag(g, lock, nsegments=3, maxsize=3 * PAGE, alignment=1)
    m = _map(tag, BUS_DMA_XEN_PREALLOC_REFS)
    held = list(m.refs)  # type: ignore[attr-defined]
    data = pattern(3 * PAGE, 11)
    va = kbuf(g.kernel, data)
    loads = Loads(lock)
    assert bus_dmamap_load(tag, m, va, len(data), loads.cb, None, BUS_DMA_NOWAIT) == 0
    status, handle = peer_map(host.dom0, g, held[1], writable=False)
    assert status == GNTST_okay
    heads = hold_refs(g, leave=0)
    bus_dmamap_unload(tag, m)  # held[1] is still mapped: it leaves the map for reclaim
    assert [r.kind for r in g.kernel.dma_debug.reports()] == \
        [DmaDebugKind.STILL_MAPPED_AT_UNLOAD]
    g.kernel.dma_debug.reset()
    g.gnttab.reports.clear()
    assert m.refs == [held[0], held[2]]  # type: ignore[attr-defined]
    mtx_lock(lock)
    assert bus_dmamap_load(tag, m, va, len(data), loads.cb, None, 0) == errno.EINPROGRESS
    mtx_unlock(lock)
    release_refs(g, [heads.pop()])  # one chain back: plenty for the one missing ref
    settle(host)
    assert len(loads.calls) == 2 and loads.calls[1][2] == 0
    refs = xen_dmamap_get_grefs(m)
    assert refs[:2] == [held[0], held[2]] and refs[2] not in held
    check_map_grants(host.dom0, g, m, data, ro=False)
    peer_unmap(host.dom0, handle)
    host.sched.run(until=lambda: g.gnttab.statistics().reclaim_pending == 0)
    release_refs(g, heads)
    _teardown(tag, m)
    g.kernel.free(va, M_DEVBUF)
    assert g.gnttab.statistics().allocated == 0


# -- V5 hazard: lock order gnttab_list -> driver lock ----------------------------------------------


class _Rec:
    """Client callback recording (arg, error, thread, driver lock held)."""

    def __init__(self, host: Host, lock: Mutex) -> None:
        self.host, self.lock = host, lock
        self.calls: list[tuple[Any, int, str, bool]] = []

    def __call__(self, arg: Any, segs: list[bus_dma_segment_t], nseg: int, error: int) -> None:
        t = self.host.sched.curthread
        self.calls.append((arg, error, t.name, self.lock.owner is t))


def _lor_setup(host: Host, lock: Mutex) -> tuple[Guest, BusDmaTag, BusDmaMap, BusDmaMap,
                                                  int, _Rec, list[int]]:
    """Map A loaded; map B waiting for the references an unload of A gives back."""
    g = host.create_guest("g", max_grant_frames=1)
    tag = driver_tag(g, lock, nsegments=2, maxsize=2 * PAGE)
    a, b = _map(tag), _map(tag)
    va = kbuf(g.kernel, pattern(2 * PAGE, 12))
    rec = _Rec(host, lock)
    heads: list[int] = []

    def load_both() -> None:
        mtx_lock(lock)
        assert bus_dmamap_load(tag, a, va, 2 * PAGE, rec, "a", 0) == 0
        mtx_unlock(lock)
        heads.extend(hold_refs(g, leave=0))
        mtx_lock(lock)
        assert bus_dmamap_load(tag, b, va, 2 * PAGE, rec, "b", 0) == errno.EINPROGRESS
        mtx_unlock(lock)

    host.sched.call(load_both, name="driver")
    return g, tag, a, b, va, rec, heads


def _locked(lock: Mutex, fn: Any, *args: Any) -> Any:
    mtx_lock(lock)
    try:
        return fn(*args)
    finally:
        mtx_unlock(lock)


def test_deferred_completion_has_no_lock_order_reversal(host: Host) -> None:
    """Default delivery: the driver unloads A holding its lock (xbd_io -> gnttab_list);
    B's completion runs on taskqueue_swi with no grant-table lock held and takes the
    driver lock itself: no recursion panic, no reversal (the seed's two failures),
    whether the references come back from the driver's unload or from another thread."""
    lock = Mutex("xbd_io")
    g, tag, a, b, va, rec, heads = _lor_setup(host, lock)
    host.sched.call(_locked, lock, bus_dmamap_unload, tag, a, name="driver")
    settle(host)
    assert rec.calls == [("a", 0, "driver", True), ("b", 0, "g/swi", True)]
    # Again, the references now freed by a thread that holds no driver lock.
    host.sched.call(_locked, lock, bus_dmamap_unload, tag, b, name="driver")
    heads += hold_refs(g, leave=0)
    host.sched.call(_locked, lock, lambda: rec.calls.append(
        ("b2", bus_dmamap_load(tag, b, va, 2 * PAGE, rec, "b2", 0), "", False)),
        name="driver")
    assert rec.calls[-1] == ("b2", errno.EINPROGRESS, "", False)
    host.sched.call(g.gnttab.gnttab_free_grant_references, heads.pop(), name="other")
    settle(host)
    assert rec.calls[-1] == ("b2", 0, "g/swi", True)
    assert WITNESS.reports == []
    _locked(lock, bus_dmamap_unload, tag, b)
    release_refs(g, heads)
    _teardown(tag, a, b)
    g.kernel.free(va, M_DEVBUF)


def _inline_host() -> Host:
    WITNESS.reset()
    return Host(callback_delivery="inline")


def test_inline_delivery_reproduces_the_seed_recursion_panic() -> None:
    """FreeBSD delivery (``callback_delivery="inline"``), seed 2018-07-31: "if one map
    is waiting for grant references, and another map calls unload ... the callback
    will be called with xbd_io_lock held ... a recursion on the non-recursive lock
    causing a panic". The free callback runs inside the unload, in the thread that
    holds the driver lock, and the tag's lockfunc recurses on it."""
    host = _inline_host()
    try:
        lock = Mutex("xbd_io", MTX_DEF)
        _, tag, a, _, _, rec, _ = _lor_setup(host, lock)
        with pytest.raises(KernelPanic, match="recursing on non-recursive mutex xbd_io"):
            host.sched.call(_locked, lock, bus_dmamap_unload, tag, a, name="driver")
        (panic,) = WITNESS.panics()
        assert panic.thread == "driver" and "xbd_io" in panic.message
        assert WITNESS.reversals() == []
        assert [c[0] for c in rec.calls] == ["a"]  # B never completed
    finally:
        host.close()
        WITNESS.reset()


def test_inline_delivery_with_recursive_driver_lock_reports_the_seed_reversal() -> None:
    """Seed 2018-07-31, the next attempt: "Make xbd_io_lock recursive. It works, but I
    get a lock order reversal warning ... One thread holds xbd_io_lock and it tries to
    allocate grant refs ... gnttab_list_lock is held by another thread that is
    currently freeing some grant references ... the thread holding gnttab_list_lock
    will try to acquire xbd_io_lock, causing a deadlock". With inline delivery the
    same-thread case works, and a free in another thread runs the callback under
    gnttab_list: WITNESS reports gnttab_list -> xbd_io against xbd_io -> gnttab_list."""
    host = _inline_host()
    try:
        lock = Mutex("xbd_io", MTX_DEF | MTX_RECURSE)
        g, tag, a, b, va, rec, heads = _lor_setup(host, lock)
        host.sched.call(_locked, lock, bus_dmamap_unload, tag, a, name="driver")
        # "It works": B completed inside the unload, in the driver's thread.
        assert rec.calls == [("a", 0, "driver", True), ("b", 0, "driver", True)]
        assert WITNESS.reports == []
        host.sched.call(_locked, lock, bus_dmamap_unload, tag, b, name="driver")
        heads += hold_refs(g, leave=0)
        host.sched.call(_locked, lock, lambda: rec.calls.append(
            ("b2", bus_dmamap_load(tag, b, va, 2 * PAGE, rec, "b2", 0), "", False)),
            name="driver")
        assert rec.calls[-1] == ("b2", errno.EINPROGRESS, "", False)
        host.sched.call(g.gnttab.gnttab_free_grant_references, heads.pop(), name="other")
        assert rec.calls[-1] == ("b2", 0, "other", True)  # under gnttab_list, in "other"
        assert WITNESS.panics() == []
        (lor,) = WITNESS.reversals()
        assert (lor.first, lor.second, lor.thread) == ("gnttab_list", "xbd_io", "other")
        _locked(lock, bus_dmamap_unload, tag, b)
        release_refs(g, heads)
        _teardown(tag, a, b)
        g.kernel.free(va, M_DEVBUF)
        assert host.leaks() == []
    finally:
        host.close()
        WITNESS.reset()


# -- found while writing these tests ----------------------------------------------------------


def test_deferred_load_completes_when_the_table_can_grow_to_fit_it(host: Host) -> None:
    """A sleepable load needing more references than one frame holds defers while the
    test holds most of the table; once they are back, the table can grow to fit the
    load. It used to wait for ``need`` *free* references, which a table that only grows
    on allocation never has: the load waited forever."""
    g = host.create_guest("g", max_grant_frames=2)
    lock = Mutex("drv")
    n = 600
    tag = driver_tag(g, lock, nsegments=n, maxsize=n * PAGE, alignment=1)
    m = _map(tag)
    va = g.kernel.malloc(n * PAGE, M_DEVBUF, M_WAITOK)
    error, head = g.gnttab.gnttab_alloc_grant_references(450)
    assert error == 0
    loads = Loads(lock)
    mtx_lock(lock)
    assert bus_dmamap_load(tag, m, va, n * PAGE, loads.cb, None, 0) == errno.EINPROGRESS
    mtx_unlock(lock)
    g.gnttab.gnttab_free_grant_references(head.head)
    settle(host)
    assert len(loads.calls) == 1 and loads.calls[0][2] == 0 and loads.calls[0][1] == n
    assert g.gnttab.nr_frames == 2 and len(xen_dmamap_get_grefs(m)) == n
    _teardown(tag, m)
    g.kernel.free(va, M_DEVBUF)


def test_load_larger_than_the_whole_table_fails_instead_of_waiting_forever(host: Host) -> None:
    """A sleepable load needing more references than the table can ever hold would
    wait for a free callback that can never run. It fails instead: the callback gets
    ENOSPC (the grant table's error for a table at its maximum) and the load returns
    0, as for EFBIG; nothing is kept and the map stays usable."""
    g = host.create_guest("g", max_grant_frames=1)
    lock = Mutex("drv")
    n = 505  # one frame holds 504
    tag = driver_tag(g, lock, nsegments=n, maxsize=n * PAGE, alignment=1)
    m = _map(tag)
    va = g.kernel.malloc(n * PAGE, M_DEVBUF, M_WAITOK)
    loads = Loads(lock)
    mtx_lock(lock)
    assert bus_dmamap_load(tag, m, va, n * PAGE, loads.cb, None, 0) == 0
    mtx_unlock(lock)
    assert [c[2] for c in loads.calls] == [errno.ENOSPC]
    assert m.state is MapState.IDLE and g.gnttab.statistics().allocated == 0
    assert g.gnttab.statistics().callbacks_queued == 0
    mtx_lock(lock)
    assert bus_dmamap_load(tag, m, va, 504 * PAGE, loads.cb, None, 0) == 0
    mtx_unlock(lock)
    assert [c[2] for c in loads.calls] == [errno.ENOSPC, 0]
    _teardown(tag, m)
    g.kernel.free(va, M_DEVBUF)


def test_cancelled_callback_does_not_starve_the_next_waiting_load(host: Host) -> None:
    """Three loads wait for 2 references each; 4 come back, so the grant-table task
    picks A and B. While A's completion waits for the driver lock, the driver unloads
    B (cancelling it). A completes and 2 references are still free: C must get them.
    The cancelled pick used to keep C waiting until some unrelated free."""
    g = host.create_guest("g", max_grant_frames=1)
    lock = Mutex("drv")
    tag = driver_tag(g, lock, nsegments=2, maxsize=2 * PAGE)
    maps = [_map(tag) for _ in range(3)]
    va = kbuf(g.kernel, pattern(2 * PAGE, 13))
    heads = hold_refs(g, leave=0)
    loads = Loads(lock)
    mtx_lock(lock)
    for m in maps:
        assert bus_dmamap_load(tag, m, va, 2 * PAGE, loads.cb, None, 0) == errno.EINPROGRESS
    release_refs(g, heads)
    heads = hold_refs(g, leave=4)
    settle(host)  # the task picked A and B; A's completion waits for the lock
    assert loads.calls == []
    bus_dmamap_unload(tag, maps[1])
    mtx_unlock(lock)
    settle(host)
    assert [m.state for m in maps] == [MapState.LOADED, MapState.IDLE, MapState.LOADED]
    assert len(loads.calls) == 2 and g.gnttab.free_count == 0
    release_refs(g, heads)
    _teardown(tag, *maps)
    g.kernel.free(va, M_DEVBUF)


def test_bounce_pages_added_by_a_new_map_serve_a_waiting_load(host: Host) -> None:
    """A load waits for bounce pages while another map of the zone holds them (a ring
    that stays loaded, say). Creating a map adds pages to the zone: the waiting load
    must get them. They used to sit free until some unload in that zone."""
    g = _bounce_guest(host, bounce_pages=4)
    lock = Mutex("drv")
    tag = _bounce_tag(g, lock)
    ring = _map(tag)  # the first map fills the zone with atop(maxsize) = 4 pages
    va = high_kbuf(g.kernel, 4)
    loads = Loads(lock)
    assert _locked(lock, bus_dmamap_load, tag, ring, va, 3 * PAGE, loads.cb, None, 0) == 0
    m = _map(tag)  # the zone is at bounce_max_pages: nothing added
    assert _locked(lock, bus_dmamap_load, tag, m, va + 3 * PAGE, PAGE - 1, loads.cb, None,
                   0) == 0
    _locked(lock, bus_dmamap_unload, tag, m)
    assert _locked(lock, bus_dmamap_load, tag, m, va, 2 * PAGE, loads.cb, None, 0) \
        == errno.EINPROGRESS
    g.kernel.bounce_max_pages = 8
    extra = _map(tag)  # adds pages to the zone
    settle(host)
    assert [c[2] for c in loads.calls] == [0, 0, 0] and m.state is MapState.LOADED
    g.kernel.kva_write(va, pattern(2 * PAGE, 14))
    bus_dmamap_sync(tag, m, BUS_DMASYNC_PREWRITE)
    check_map_grants(host.dom0, g, m, pattern(2 * PAGE, 14), ro=False)
    _teardown(tag, ring, m, extra)
    g.kernel.kmem_free(va, 4 * PAGE)
