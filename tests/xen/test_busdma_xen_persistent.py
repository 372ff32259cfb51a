"""busdma_xen persistent maps (``BUS_DMA_XEN_PERSISTENT``, DESIGN section 7).

The rule comes from blkif's persistent grants: Linux xen-blkfront
(drivers/block/xen-blkfront.c, ``fill_grant_buffer``/``get_grant``: with
``feature_persistent`` each grant has a page of its own, granted once with
``readonly`` 0, and data is copied in before a write and out after a read,
``blkif_completion``) and xen-blkback (drivers/block/xen-blkback/blkback.c,
``xen_blkbk_map``: a persistent grant is mapped without ``GNTMAP_readonly`` and
kept mapped; ``free_persistent_gnts`` unmaps them at disconnect). The grant
table rules at destroy are those of the still-mapped hazard (DESIGN section 4;
Linux drivers/xen/grant-table.c ``gnttab_end_foreign_access``: a page still
mapped is kept, not freed, until the mapper lets go).
"""

from __future__ import annotations

import errno

from busdma_helpers import (
    PAGE,
    Loads,
    driver_tag,
    hold_refs,
    pattern,
    peer_map,
    peer_unmap,
    release_refs,
    settle,
    xen_impl,
)
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from gntdma.abi.grant_table import GNTST_okay, GTF_permit_access, GTF_reading, GTF_writing
from gntdma.sched import WITNESS, Mutex, mtx_lock, mtx_unlock
from gntdma.sys import (
    BUS_DMA_NOWAIT,
    BUS_DMA_WAITOK,
    BUS_DMASYNC_POSTREAD,
    BUS_DMASYNC_POSTWRITE,
    BUS_DMASYNC_PREREAD,
    BUS_DMASYNC_PREWRITE,
    M_DEVBUF,
    M_WAITOK,
    BusDmaMap,
    BusDmaTag,
    DmaDebugKind,
    MapState,
    bus_dma_tag_destroy,
    bus_dmamap_create,
    bus_dmamap_destroy,
    bus_dmamap_load,
    bus_dmamap_sync,
    bus_dmamap_unload,
)
from gntdma.toolstack.host import Guest, Host
from gntdma.xen.busdma import (
    BUS_DMA_XEN_PERSISTENT,
    BUS_DMA_XEN_PREALLOC_REFS,
    BUS_DMA_XEN_RO,
    xen_dmamap_get_grefs,
)


def _entry(g: Guest, ref: int) -> tuple[int, int, int]:
    """The grant entry without the in-use bits the hypervisor sets while it is mapped."""
    flags, domid, frame = g.gnttab.entry(ref)
    return flags & ~(GTF_reading | GTF_writing), domid, frame


def _pmap(tag: BusDmaTag) -> BusDmaMap:
    error, m = bus_dmamap_create(tag, BUS_DMA_XEN_PERSISTENT)
    assert error == 0 and m is not None
    return m


def _load(tag: BusDmaTag, m: BusDmaMap, va: int, n: int, lock: Mutex, flags: int = 0) -> int:
    return bus_dmamap_load(tag, m, va, n, Loads(lock).cb, None, BUS_DMA_NOWAIT | flags)


def _kbuf(g: Guest, data: bytes, offset: int = 0) -> int:
    va = g.kernel.malloc(len(data) + offset, M_DEVBUF, M_WAITOK)
    g.kernel.kva_write(va + offset, data)
    return va + offset


def _backend_view(peer: Guest, g: Guest, ref: int) -> tuple[int, memoryview]:
    """``peer`` maps ``ref`` writable and keeps it: (handle, the page)."""
    status, handle = peer_map(peer, g, ref, writable=True)
    assert status == GNTST_okay, status
    return handle, peer.hc.mapped_page(handle)


def test_persistent_map_keeps_its_grants_across_loads(host: Host) -> None:
    """Refs and grants of a persistent map are written once and stay across unload and
    the next loads: a second load of the same shape writes no grant and takes no ref."""
    g = host.create_guest("g", memory_mb=8)
    be = host.create_guest("be", memory_mb=4)
    lock = Mutex("drv")
    tag = driver_tag(g, lock, backend=be.domid)
    m = _pmap(tag)
    gt = g.gnttab
    allocated0 = gt.statistics().allocated
    for i in range(4):
        data = pattern(3 * PAGE, i)
        va = _kbuf(g, data)
        assert _load(tag, m, va, len(data), lock) == 0
        refs = xen_dmamap_get_grefs(m)
        if i == 0:
            first = refs
            writes = gt.statistics().granted
        assert refs == first  # the same refs, in the same order
        assert gt.statistics().allocated == allocated0 + 3
        assert gt.statistics().granted == writes
        for ref, seg in zip(refs, m.dm_segs, strict=True):
            # Writable, to the backend, at the map's own page (not the caller's).
            assert gt.entry(ref) == (GTF_permit_access, be.domid, seg.ds_addr // PAGE)
            assert seg.ds_addr // PAGE != g.kernel.pmap_kextract(va) // PAGE
        bus_dmamap_sync(tag, m, BUS_DMASYNC_PREWRITE)
        got = b""
        for ref, seg in zip(refs, m.dm_segs, strict=True):
            handle, view = _backend_view(be, g, ref)
            off = seg.ds_addr % PAGE
            got += bytes(view[off : off + seg.ds_len])
            peer_unmap(be, handle)
        assert got == data
        bus_dmamap_sync(tag, m, BUS_DMASYNC_POSTWRITE)
        bus_dmamap_unload(tag, m)
        # Unload ends no access: the grants are still there.
        assert all(gt.entry(r)[0] == GTF_permit_access for r in first)
        g.kernel.free(va, M_DEVBUF)
    assert xen_impl(g).statistics().persistent_pages == 3
    assert bus_dmamap_destroy(tag, m) == 0
    assert all(gt.entry(r)[0] == 0 for r in first)
    assert gt.statistics().allocated == allocated0
    assert xen_impl(g).statistics().persistent_pages == 0
    assert bus_dma_tag_destroy(tag) == 0


def test_persistent_map_copies_both_directions(host: Host) -> None:
    """PREWRITE copies the caller's data into the granted pages, POSTREAD copies what
    the backend wrote there back into the caller's buffer (at any page offset)."""
    g = host.create_guest("g", memory_mb=8)
    be = host.create_guest("be", memory_mb=4)
    lock = Mutex("drv")
    tag = driver_tag(g, lock, backend=be.domid)
    m = _pmap(tag)
    n = 2 * PAGE + 1024
    va = _kbuf(g, bytes(n), offset=512)
    assert _load(tag, m, va, n, lock) == 0
    bus_dmamap_sync(tag, m, BUS_DMASYNC_PREREAD)
    answer = pattern(n, 9)
    pos = 0
    handles = []
    for ref, seg in zip(xen_dmamap_get_grefs(m), m.dm_segs, strict=True):
        handle, view = _backend_view(be, g, ref)
        off = seg.ds_addr % PAGE
        view[off : off + seg.ds_len] = answer[pos : pos + seg.ds_len]
        pos += seg.ds_len
        handles.append(handle)
    bus_dmamap_sync(tag, m, BUS_DMASYNC_POSTREAD)
    assert g.kernel.kva_read(va, n) == answer
    bus_dmamap_unload(tag, m)
    # The backend keeps its mappings across the unload: nothing to report.
    assert g.kernel.dma_debug.reports() == []
    for h in handles:
        peer_unmap(be, h)
    assert bus_dmamap_destroy(tag, m) == 0
    g.kernel.free(va - 512, M_DEVBUF)
    bus_dma_tag_destroy(tag)


def test_persistent_grants_are_writable_even_for_a_read_only_load(host: Host) -> None:
    """Linux xen-blkback ``xen_blkbk_map`` maps a persistent grant without
    GNTMAP_readonly whatever the request: the grant must be writable; only the map's
    own page is exposed, never the caller's buffer."""
    g = host.create_guest("g", memory_mb=8)
    be = host.create_guest("be", memory_mb=4)
    lock = Mutex("drv")
    tag = driver_tag(g, lock, backend=be.domid)
    m = _pmap(tag)
    data = pattern(PAGE, 3)
    va = _kbuf(g, data)
    assert _load(tag, m, va, PAGE, lock, BUS_DMA_XEN_RO) == 0
    bus_dmamap_sync(tag, m, BUS_DMASYNC_PREWRITE)
    (ref,) = xen_dmamap_get_grefs(m)
    handle, view = _backend_view(be, g, ref)
    view[:4] = b"evil"
    assert g.kernel.kva_read(va, PAGE) == data  # the caller's page is untouched
    peer_unmap(be, handle)
    bus_dmamap_sync(tag, m, BUS_DMASYNC_POSTWRITE)
    bus_dmamap_unload(tag, m)
    assert bus_dmamap_destroy(tag, m) == 0
    g.kernel.free(va, M_DEVBUF)
    bus_dma_tag_destroy(tag)


def test_persistent_refs_count_as_held_for_life(host: Host) -> None:
    """The refs of a persistent map never come back while it exists: the grant table
    counts them as held for life (a load never waits for them), until destroy."""
    g = host.create_guest("g", memory_mb=8)
    lock = Mutex("drv")
    tag = driver_tag(g, lock)
    gt = g.gnttab
    before = gt.gnttab_ever_available()
    m = _pmap(tag)
    assert gt.gnttab_ever_available() == before  # pages and refs come with loads
    va = _kbuf(g, pattern(4 * PAGE))
    assert _load(tag, m, va, 4 * PAGE, lock) == 0
    bus_dmamap_unload(tag, m)
    assert gt.gnttab_ever_available() == before - 4
    assert gt.statistics().held_for_life == 4
    assert _load(tag, m, va, 2 * PAGE, lock) == 0  # a smaller load keeps all four
    bus_dmamap_unload(tag, m)
    assert gt.statistics().held_for_life == 4
    assert bus_dmamap_destroy(tag, m) == 0
    assert gt.gnttab_ever_available() == before
    g.kernel.free(va, M_DEVBUF)
    bus_dma_tag_destroy(tag)


def test_persistent_and_prealloc_together_is_einval(host: Host) -> None:
    g = host.create_guest("g", memory_mb=8)
    tag = driver_tag(g, Mutex("drv"))
    error, m = bus_dmamap_create(tag, BUS_DMA_XEN_PERSISTENT | BUS_DMA_XEN_PREALLOC_REFS)
    assert error == errno.EINVAL and m is None
    bus_dma_tag_destroy(tag)


def test_persistent_page_still_mapped_at_destroy_is_reported_kept_and_reclaimed(
        host: Host) -> None:
    """A hostile backend keeps a persistent grant mapped when the map is destroyed: the
    destroy reports it, the reference is not freed and the page is not reused until
    the backend unmaps; then both come back."""
    g = host.create_guest("g", memory_mb=8)
    be = host.create_guest("be", memory_mb=4)
    lock = Mutex("drv")
    tag = driver_tag(g, lock, backend=be.domid)
    m = _pmap(tag)
    va = _kbuf(g, pattern(2 * PAGE, 4))
    assert _load(tag, m, va, 2 * PAGE, lock) == 0
    bus_dmamap_sync(tag, m, BUS_DMASYNC_PREWRITE)
    refs = xen_dmamap_get_grefs(m)
    pfn = m.dm_segs[1].ds_addr // PAGE
    handle, view = _backend_view(be, g, refs[1])
    bus_dmamap_sync(tag, m, BUS_DMASYNC_POSTWRITE)
    bus_dmamap_unload(tag, m)
    assert g.kernel.dma_debug.reports() == []
    assert bus_dmamap_destroy(tag, m) == 0
    assert [r.kind for r in g.kernel.dma_debug.reports()] == \
        [DmaDebugKind.STILL_MAPPED_AT_UNLOAD]
    g.kernel.dma_debug.reset()
    g.gnttab.reports.clear()
    gt = g.gnttab
    assert gt.statistics().reclaim_pending == 1
    assert gt.entry(refs[0])[0] == 0
    # The page was given back by the destroy, but it is out of circulation: wired,
    # not free, so no allocation can get it while the backend maps it.
    assert g.kernel.vm.is_wired(pfn) and not g.kernel.vm.is_free(pfn)
    view[:5] = b"still"  # the backend can still write it: nobody else sees it
    peer_unmap(be, handle)
    host.sched.run(until=lambda: gt.statistics().reclaim_pending == 0)
    assert not g.kernel.vm.is_wired(pfn) and g.kernel.vm.is_free(pfn)
    assert gt.statistics().held_for_life == 0
    g.kernel.free(va, M_DEVBUF)
    bus_dma_tag_destroy(tag)


# -- a state machine ------------------------------------------------------------------------


class PersistentMapMachine(RuleBasedStateMachine):
    """Persistent maps under random loads (NOWAIT or sleepable, references short or
    not), syncs, unloads, backend mappings, destroys.

    Invariants: a map's refs are always the same, in order (a ref once taken stays
    with the map until destroy, and counts as held for life); each grants its
    segment's frame writable to the backend; data goes both ways exactly; a load
    fails (NOWAIT: ENOMEM) or waits (sleepable: EINPROGRESS) only while references
    are short, and a waiting one completes once, under the driver lock, when they
    come back; after teardown nothing leaks (``host.leaks()``), nothing is reported
    but the expected still-mapped destroys.
    """

    def __init__(self) -> None:
        super().__init__()
        WITNESS.reset()
        self.host = Host()
        self.lock = Mutex("drv")
        self.maps: list[BusDmaMap] = []
        self.refs: dict[int, list[int]] = {}  # id(map) -> its refs so far
        self.loaded: dict[int, tuple[int, int, bytes]] = {}  # id(map) -> (va, n, data)
        #: id(map) -> (allocation, buffer, length, data, write, callbacks) of a waiting load
        self.pending: dict[int, tuple[int, int, int, bytes, bool, Loads]] = {}
        self.pins: list[tuple[int, int]] = []  # (ref, backend handle) kept mapped
        self.held: list[int] = []  # chains of references the test holds (a shortage)
        self.expected_reports = 0

    @initialize(nmaps=st.integers(1, 3))
    def setup(self, nmaps: int) -> None:
        self.g = self.host.create_guest("g", memory_mb=8, max_grant_frames=1)
        self.be = self.host.create_guest("be", memory_mb=4)
        self.tag = driver_tag(self.g, self.lock, nsegments=5, maxsize=4 * PAGE,
                              backend=self.be.domid)
        for _ in range(nmaps):
            self.maps.append(_pmap(self.tag))

    def _m(self, i: int) -> BusDmaMap:
        return self.maps[i % len(self.maps)]

    def _check(self, m: BusDmaMap, va: int, n: int, data: bytes, write: bool) -> None:
        """The loaded map's refs and grants, and the data both ways."""
        refs = xen_dmamap_get_grefs(m)
        known = self.refs.setdefault(id(m), [])
        assert refs[: len(known)] == known[: len(refs)]  # the same refs, in order
        if len(refs) > len(known):
            known.extend(refs[len(known):])
        for ref, seg in zip(refs, m.dm_segs, strict=True):
            assert _entry(self.g, ref) == (GTF_permit_access, self.be.domid,
                                          seg.ds_addr // PAGE)
        if write:
            bus_dmamap_sync(self.tag, m, BUS_DMASYNC_PREWRITE)
            got = b""
            for ref, seg in zip(refs, m.dm_segs, strict=True):
                h, view = _backend_view(self.be, self.g, ref)
                o = seg.ds_addr % PAGE
                got += bytes(view[o : o + seg.ds_len])
                peer_unmap(self.be, h)
            assert got == data
            bus_dmamap_sync(self.tag, m, BUS_DMASYNC_POSTWRITE)
        else:
            bus_dmamap_sync(self.tag, m, BUS_DMASYNC_PREREAD)
            pos = 0
            for ref, seg in zip(refs, m.dm_segs, strict=True):
                h, view = _backend_view(self.be, self.g, ref)
                o = seg.ds_addr % PAGE
                view[o : o + seg.ds_len] = data[pos : pos + seg.ds_len]
                pos += seg.ds_len
                peer_unmap(self.be, h)
            bus_dmamap_sync(self.tag, m, BUS_DMASYNC_POSTREAD)
            assert self.g.kernel.kva_read(va, n) == data

    @rule(i=st.integers(0, 2), off=st.sampled_from([0, 512, 1024, 4095]),
          n=st.integers(1, 3 * PAGE), seed=st.integers(0, 99), write=st.booleans(),
          nowait=st.booleans())
    def load(self, i: int, off: int, n: int, seed: int, write: bool, nowait: bool) -> None:
        m = self._m(i)
        if id(m) in self.loaded or id(m) in self.pending:
            return
        data = pattern(n, seed)
        va = _kbuf(self.g, data if write else bytes(n), off)
        loads = Loads(self.lock)
        mtx_lock(self.lock)
        rv = bus_dmamap_load(self.tag, m, va, n, loads.cb, None,
                             BUS_DMA_NOWAIT if nowait else BUS_DMA_WAITOK)
        mtx_unlock(self.lock)
        if rv == errno.ENOMEM:  # NOWAIT, references short: nothing kept but the map's own
            assert nowait and self.held and m.state is MapState.IDLE
            event("persistent load: ENOMEM")
            self.g.kernel.free(va - off, M_DEVBUF)
            return
        if rv == errno.EINPROGRESS:
            assert not nowait and self.held and loads.calls == []
            event("persistent load: deferred")
            self.pending[id(m)] = (va - off, va, n, data, write, loads)
            return
        assert rv == 0 and [c[2] for c in loads.calls] == [0] and loads.calls[0][3]
        self._check(m, va, n, data, write)
        self.loaded[id(m)] = (va - off, n, data)

    @rule(leave=st.integers(0, 4))
    def shortage(self, leave: int) -> None:
        if not self.held:
            self.held = hold_refs(self.g, leave)

    def _completed(self) -> None:
        """Waiting loads whose references came back (any free: ours, or a reclaim)."""
        settle(self.host)  # the free callbacks run on taskqueue_swi
        for key, (alloc, va, n, data, write, loads) in list(self.pending.items()):
            if not loads.calls:
                continue
            m = next(x for x in self.maps if id(x) == key)
            assert len(loads.calls) == 1 and loads.calls[0][2] == 0 and loads.calls[0][3]
            assert m.state is MapState.LOADED
            del self.pending[key]
            self._check(m, va, n, data, write)
            self.loaded[key] = (alloc, n, data)

    @rule()
    def plenty(self) -> None:
        release_refs(self.g, self.held)
        self._completed()
        assert self.pending == {}  # nothing waits while references are there

    @rule(i=st.integers(0, 2))
    def unload(self, i: int) -> None:
        m = self._m(i)
        self._completed()
        got = self.loaded.pop(id(m), None)
        if got is not None:
            bus_dmamap_unload(self.tag, m)
            self.g.kernel.free(got[0], M_DEVBUF)
        waiting = self.pending.pop(id(m), None)
        if waiting is not None:  # cancels the wait: the callback never runs
            mtx_lock(self.lock)
            bus_dmamap_unload(self.tag, m)
            mtx_unlock(self.lock)
            assert waiting[5].calls == [] and m.state is MapState.IDLE
            self.g.kernel.free(waiting[0], M_DEVBUF)
        # Unload ends nothing: every ref the map took is still granted.
        for ref in self.refs.get(id(m), []):
            assert _entry(self.g, ref)[0] == GTF_permit_access

    @rule(i=st.integers(0, 2), k=st.integers(0, 3))
    def backend_keeps(self, i: int, k: int) -> None:
        refs = self.refs.get(id(self._m(i)), [])
        if k < len(refs) and all(r != refs[k] for r, _ in self.pins):
            status, h = peer_map(self.be, self.g, refs[k], writable=True)
            assert status == GNTST_okay
            self.pins.append((refs[k], h))

    @rule()
    def backend_lets_go(self) -> None:
        for _, h in self.pins:
            peer_unmap(self.be, h)
        self.pins.clear()
        self.host.sched.run(until=lambda: self.g.gnttab.statistics().reclaim_pending == 0)
        self._completed()

    @precondition(lambda self: len(self.maps) > 0)
    @rule(i=st.integers(0, 2))
    def destroy_and_recreate(self, i: int) -> None:
        m = self._m(i)
        self.unload(i)
        refs = self.refs.pop(id(m), [])
        assert bus_dmamap_destroy(self.tag, m) == 0
        pinned = [r for r, _ in self.pins if r in refs]
        if pinned:
            self.expected_reports += 1
        for ref in refs:
            if ref not in pinned:
                assert self.g.gnttab.entry(ref)[0] == 0
        self.maps[self.maps.index(m)] = _pmap(self.tag)

    @invariant()
    def accounting(self) -> None:
        if not self.maps:
            return
        held = sum(len(r) for r in self.refs.values())
        assert self.g.gnttab.statistics().held_for_life == held
        reports = self.g.kernel.dma_debug.reports()
        assert len(reports) == self.expected_reports
        assert all(r.kind is DmaDebugKind.STILL_MAPPED_AT_UNLOAD for r in reports)

    def teardown(self) -> None:
        try:
            if self.maps:
                release_refs(self.g, self.held)
                self.backend_lets_go()
                for i in range(len(self.maps)):
                    self.unload(i)
                    assert bus_dmamap_destroy(self.tag, self.maps[i]) == 0
                assert bus_dma_tag_destroy(self.tag) == 0
                self.host.sched.run(
                    until=lambda: self.g.gnttab.statistics().reclaim_pending == 0)
                assert self.g.gnttab.statistics().held_for_life == 0
                settle(self.host)  # queued free callbacks and swi tasks run
                assert self.host.leaks() == []
                assert WITNESS.reports == []
        finally:
            self.host.close()
            WITNESS.reset()


TestPersistentMapMachine = PersistentMapMachine.TestCase
TestPersistentMapMachine.settings = settings(max_examples=40, stateful_step_count=25,
                                             deadline=None)
