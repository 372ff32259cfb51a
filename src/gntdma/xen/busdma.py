"""busdma_xen: the Xen grant-table bus_dma(9) handlers.

Theory of operation
-------------------
A Xen tag is a bounce tag whose implementation adds grant references: every
segment of a load gets one grant reference of the guest's grant table,
granting the segment's frame to the backend domain, read-only when the load
asks for ``BUS_DMA_XEN_RO``. Drivers keep ``ds_addr`` as the bus (physical)
address and find the references with :func:`xen_dmamap_get_grefs`, one per
segment, in order. A segment never crosses a page: the root Xen tag has
``boundary`` and ``maxsegsz`` of PAGE_SIZE, which every child inherits.

``xen_get_dma_tag(kern)`` builds the root; a driver creates its tag as a
child, with the backend's domid in the flags (``domid << 16``). The root has
no backend domid (``XenDmaTag.domid`` is None): only a child of the root
with zero domid bits means dom0. A child of a tag that has a backend domid
inherits it when its own bits are zero, and may not name another (EINVAL).
Loads on the root itself grant to dom0. References are
allocated per load by default; ``BUS_DMA_XEN_PREALLOC_REFS`` at map create
holds ``nsegments`` references for the map's life, which loads re-grant.

When the references run short:
- a ``BUS_DMA_NOWAIT`` load fails with ENOMEM (the bus_dma contract for a
  resource shortage without sleeping) and keeps nothing;
- a sleepable load builds all its segments first, then returns EINPROGRESS
  and waits for a grant-table free callback for the references it still needs
  (less what the table can still grow by). The callback takes the tag's
  lockfunc, allocates, writes the grants and runs the client callback once. If
  the references are gone again by then, it registers itself again;
- a sleepable load needing more references than can ever be free fails with
  ENOSPC (through the callback, like EFBIG) instead of waiting forever: the
  table's capacity less the references held for life (a prealloc map's, and
  so a ring's, count as held while the map exists: ``GntTab.held_for_life``).
  A load already waiting when more is held for life fails the same way from
  its callback.

Grants are written when a load completes (``map_complete``); unload ends
access and frees the references. Where the 2018 design was unsafe this one is
safe: unloading a map whose load is still waiting for references cancels the
callback and frees what it held; unloading a never-loaded map does nothing;
loading a loaded map is refused with EINVAL (and reported by DMA-API
debugging); a grant the backend still maps at unload is reported, kept out of
the free list and reclaimed by the grant table when the backend lets go,
and the page behind it is wired (``vm_page_wire``) until then, so that
neither the bounce zone nor the page allocator hands it out again (DESIGN
section 4); a prealloc map gets a replacement reference at once (or from a
free callback when none is free), so it keeps ``nsegments``; a
chained load (mbuf chain, uio) allocates its references when all its
segments are known, so it never runs short mid-way.

``BUS_DMA_XEN_PERSISTENT`` at map create: persistent grants (DESIGN 7; see
:mod:`gntdma.xen.busdma_persist`). Its references are held for the map's life
(``held_for_life``); unload ends nothing; destroy ends every grant, with the
still-mapped rules above.

One deliberate difference from the 2018 root tag: its alignment is 1, not
PAGE_SIZE, because the bounce implementation bounces every address that is
not aligned to the tag, which would bounce every sub-page buffer.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, final

from gntdma.abi.grant_table import GREFS_PER_GRANT_FRAME
from gntdma.abi.xen import PAGE_SHIFT, PAGE_SIZE
from gntdma.sched import KernelPanic, trace
from gntdma.sys import (
    BUS_DMA_BUS1,
    BUS_DMA_BUS2,
    BUS_DMA_BUS3,
    BUS_DMA_LOCK,
    BUS_DMA_NOWAIT,
    BUS_DMA_UNLOCK,
    BUS_DMASYNC_POSTREAD,
    BUS_DMASYNC_PREWRITE,
    BUS_SPACE_MAXADDR,
    BUS_SPACE_MAXSIZE,
    BUS_SPACE_UNRESTRICTED,
    MEMDESC_BIO,
    BounceImpl,
    BounceMap,
    BounceTag,
    BusDmaCallback,
    BusDmaLockFunc,
    BusDmaMap,
    BusDmaTag,
    DmaDebugKind,
    Kernel,
    MapState,
    bus_dma_segment_t,
    bus_dmamap_complete_deferred,
    kernel_state,
    memdesc,
    memdesc_length,
)
from gntdma.xen.busdma_persist import PersistentPool
from gntdma.xen.gnttab import GntTab, GnttabFreeCallback

__all__ = [
    "BUSDMA_XEN_TAG_INIT",
    "BUS_DMA_XEN_DOMID_SHIFT",
    "BUS_DMA_XEN_GNTTAB_FLAGS_SHIFT",
    "BUS_DMA_XEN_PERSISTENT",
    "BUS_DMA_XEN_PREALLOC_REFS",
    "BUS_DMA_XEN_RO",
    "XenBusDmaStatistics",
    "XenDmaImpl",
    "XenDmaMap",
    "XenDmaTag",
    "xen_busdma_attach",
    "xen_dmamap_get_grefs",
    "xen_get_dma_tag",
]

#: The backend domid goes in bits 16..31 of the tag-create flags.
BUS_DMA_XEN_DOMID_SHIFT: Final = 16
#: Grant flags go in bits 16.. of the load flags.
BUS_DMA_XEN_GNTTAB_FLAGS_SHIFT: Final = 16
#: Load flag: grant the segments read-only (the device only reads them).
BUS_DMA_XEN_RO: Final = 1 << BUS_DMA_XEN_GNTTAB_FLAGS_SHIFT
#: Map-create flag: hold ``nsegments`` references for the map's whole life.
BUS_DMA_XEN_PREALLOC_REFS: Final = BUS_DMA_BUS2
#: Map-create flag: keep the map's pages granted across loads (persistent grants).
BUS_DMA_XEN_PERSISTENT: Final = BUS_DMA_BUS3
_PAGE_MASK: Final = PAGE_SIZE - 1
_LOADED: Final = MapState.LOADED
#: Private tag-create flag: the parent is a machine tag, not a Xen tag.
BUSDMA_XEN_TAG_INIT: Final = BUS_DMA_BUS1


class XenDmaTag(BounceTag):
    def __init__(self, kern: Kernel, impl: Any) -> None:
        super().__init__(kern, impl)
        #: The backend domain the loads grant to; None for a root Xen tag.
        self.domid: int | None = None


class XenDmaMap(BounceMap):
    def __init__(self, dmat: BusDmaTag, flags: int) -> None:
        super().__init__(dmat, flags)
        #: References of the current load, one per segment (prealloc: held for life).
        self.refs: list[int] = []
        self.prealloc = False
        #: How many of ``refs`` hold a grant written by map_complete.
        self.granted = 0
        self.readonly = False
        self.gnttab_cb = GnttabFreeCallback()
        self.grant_wait = False
        self.pending_segs: list[bus_dma_segment_t] | None = None
        self.pass_gen = -1
        self.pass_bytes = 0
        #: A prealloc map waits (free callback) for replacements of still-mapped refs.
        self.topup_wait = False
        #: A persistent map's pages (None for any other map); refs[i] grants page i.
        self.pool: PersistentPool | None = None
        #: References this map counts in ``GntTab.held_for_life`` (persistent maps).
        self.held = 0


@dataclass(frozen=True, slots=True)
class XenBusDmaStatistics:
    loads: int
    grant_deferred: int
    grant_deferred_completed: int
    grant_deferred_cancelled: int
    nowait_shortages: int
    refs_held: int
    still_mapped_at_unload: int
    #: Pages of persistent maps (each granted once, kept across loads).
    persistent_pages: int = 0
    #: Loads of persistent maps (each wrote no grant beyond its pages' first use).
    persistent_loads: int = 0


def _xtag(dmat: BusDmaTag) -> XenDmaTag:
    if not isinstance(dmat, XenDmaTag):
        raise KernelPanic(f"busdma_xen: {dmat!r} is not a Xen tag")
    return dmat


def _xmap(map: BusDmaMap) -> XenDmaMap:
    if not isinstance(map, XenDmaMap):
        raise KernelPanic(f"busdma_xen: {map!r} is not a Xen map")
    return map


@final
class XenDmaImpl(BounceImpl):
    """The Xen grant-table implementation of bus_dma (``busdma_xen.c``)."""

    name = "xen"
    tag_class = XenDmaTag
    map_class = XenDmaMap

    def __init__(self, kern: Kernel, gnttab: GntTab) -> None:
        super().__init__(kern)
        self.gnttab = gnttab
        self.loads = 0
        self.grant_deferred = 0
        self.grant_deferred_completed = 0
        self.grant_deferred_cancelled = 0
        self.nowait_shortages = 0
        self.still_mapped_at_unload = 0
        self.persistent_loads = 0
        self.maps: dict[int, XenDmaMap] = {}

    def statistics(self) -> XenBusDmaStatistics:
        return XenBusDmaStatistics(
            self.loads, self.grant_deferred, self.grant_deferred_completed,
            self.grant_deferred_cancelled, self.nowait_shortages,
            sum(len(m.refs) for m in self.maps.values()), self.still_mapped_at_unload,
            sum(len(m.pool) for m in self.maps.values() if m.pool is not None),
            self.persistent_loads)

    # -- tags ----------------------------------------------------------------------------

    def tag_create(self, parent: BusDmaTag | None, kern: Kernel, alignment: int,
                   boundary: int, lowaddr: int, highaddr: int, maxsize: int, nsegments: int,
                   maxsegsz: int, flags: int, lockfunc: BusDmaLockFunc | None,
                   lockfuncarg: Any) -> tuple[int, BusDmaTag | None]:
        if maxsegsz > PAGE_SIZE:
            return errno.EINVAL, None  # one grant covers one page
        bits = (flags >> BUS_DMA_XEN_DOMID_SHIFT) & 0xFFFF
        flags &= 0xFFFF
        domid: int | None = None if bits == 0 else bits  # a root Xen tag
        if isinstance(parent, XenDmaTag):
            if parent.domid is None:
                domid = bits  # a child of the root: zero bits mean dom0
            elif bits == 0:
                domid = parent.domid  # inherited
            elif bits != parent.domid:
                return errno.EINVAL, None  # a child may not change the backend
        elif parent is not None:
            if not flags & BUSDMA_XEN_TAG_INIT:
                return errno.EINVAL, None
            parent = None if parent.is_root else parent
        flags &= ~BUSDMA_XEN_TAG_INIT
        error, tag = super().tag_create(parent, kern, alignment, boundary, lowaddr, highaddr,
                                        maxsize, nsegments, maxsegsz, flags, lockfunc,
                                        lockfuncarg)
        if error != 0 or tag is None:
            return error, None
        _xtag(tag).domid = domid
        return 0, tag

    # -- maps ------------------------------------------------------------------------------

    def map_create(self, dmat: BusDmaTag, flags: int) -> tuple[int, BusDmaMap | None]:
        prealloc = bool(flags & BUS_DMA_XEN_PREALLOC_REFS)
        persistent = bool(flags & BUS_DMA_XEN_PERSISTENT)
        if (prealloc and dmat.nsegments < 0) or (prealloc and persistent):
            return errno.EINVAL, None
        error, map = super().map_create(
            dmat, flags & ~(BUS_DMA_XEN_PREALLOC_REFS | BUS_DMA_XEN_PERSISTENT))
        if error != 0 or map is None:
            return error, None
        m = _xmap(map)
        if persistent:
            m.pool = PersistentPool(self.kern)
        if prealloc:
            error, head = self.gnttab.gnttab_alloc_grant_references(dmat.nsegments)
            if error != 0:
                super().map_destroy(dmat, m)
                return error, None
            m.refs = [self.gnttab.gnttab_claim_grant_reference(head)
                      for _ in range(dmat.nsegments)]
            m.prealloc = True
            self.gnttab.gnttab_hold_for_life(dmat.nsegments)
        self.maps[id(m)] = m
        return 0, m

    def map_destroy(self, dmat: BusDmaTag, map: BusDmaMap) -> int:
        m = _xmap(map)
        error = super().map_destroy(dmat, m)
        if error != 0:
            return error
        self._release_refs(m)
        self.maps.pop(id(m), None)
        return 0

    def mem_alloc(self, dmat: BusDmaTag, flags: int) -> tuple[int, int, BusDmaMap | None]:
        error, va, map = super().mem_alloc(dmat, flags)
        if error == 0 and map is not None:
            self.maps[id(map)] = _xmap(map)
        return error, va, map

    def mem_free(self, dmat: BusDmaTag, vaddr: int, map: BusDmaMap) -> None:
        m = _xmap(map)
        self._release_refs(m)
        self.maps.pop(id(m), None)
        super().mem_free(dmat, vaddr, m)

    # -- loads ------------------------------------------------------------------------------

    def load_buffer(self, dmat: BusDmaTag, map: BusDmaMap, buf: int, buflen: int, flags: int,
                    segs: list[bus_dma_segment_t]) -> int:
        if not isinstance(map, XenDmaMap):
            raise KernelPanic(f"busdma_xen: {map!r} is not a Xen map")
        pool = map.pool
        if pool is None:  # BounceImpl.load_buffer is this _load
            error = self._load(dmat, map, "vaddr", buf, (), buflen, flags & 0xFFFF, segs)
        else:  # _pload
            if map.pass_gen != map.load_gen:  # a new pass: the pages serve it from page 0
                if pool.dsts:
                    pool.unload()
                self.persistent_loads += 1
            error = pool.load(dmat, "vaddr", buf, (), buflen, segs)
        return self._after(dmat, map, buflen, flags, segs, error)

    def load_phys(self, dmat: BusDmaTag, map: BusDmaMap, paddr: int, buflen: int, flags: int,
                  segs: list[bus_dma_segment_t]) -> int:
        m = _xmap(map)
        error = (self._pload(dmat, m, "phys", paddr, (), buflen, segs) if m.pool
                 is not None else super().load_phys(dmat, m, paddr, buflen, flags & 0xFFFF, segs))
        return self._after(dmat, m, buflen, flags, segs, error)

    def load_ma(self, dmat: BusDmaTag, map: BusDmaMap, ma: Any, tlen: int, ma_offs: int,
                flags: int, segs: list[bus_dma_segment_t]) -> int:
        m = _xmap(map)
        error = (self._pload(dmat, m, "ma", ma_offs, ma, tlen, segs) if m.pool
                 is not None else
                 super().load_ma(dmat, m, ma, tlen, ma_offs, flags & 0xFFFF, segs))
        return self._after(dmat, m, tlen, flags, segs, error)

    def _pload(self, dmat: BusDmaTag, m: XenDmaMap, kind: str, a: int, ma: Any,
               buflen: int, segs: list[bus_dma_segment_t]) -> int:
        """One buffer of a persistent map's load: its chunks go on the map's own pages."""
        pool = m.pool
        assert pool is not None
        if m.pass_gen != m.load_gen:  # a new pass: the pages serve it from page 0
            if pool.dsts:  # (an unload leaves them empty)
                pool.unload()
            self.persistent_loads += 1
        return pool.load(dmat, kind, a, ma, buflen, segs)

    def map_waitok(self, dmat: BusDmaTag, map: BusDmaMap, mem: memdesc,
                   callback: BusDmaCallback, callback_arg: Any) -> None:
        if isinstance(map, XenDmaMap) and map.pool is not None:
            # The load to replay; a persistent map's loads go on its own pages, never on
            # bounce pages, so it has none to count or reserve.
            map.mem = mem
            map.callback = callback
            map.callback_arg = callback_arg
            return
        super().map_waitok(dmat, map, mem, callback, callback_arg)

    def map_sync(self, dmat: BusDmaTag, map: BusDmaMap, op: int) -> None:
        if not isinstance(map, XenDmaMap):
            raise KernelPanic(f"busdma_xen: {map!r} is not a Xen map")
        pool = map.pool
        if pool is not None:  # PersistentPool.sync: the pool's only copies
            if op & BUS_DMASYNC_PREWRITE:
                pool.copy(True)
            if op & BUS_DMASYNC_POSTREAD:
                pool.copy(False)
            return
        if map.bpages:  # BounceImpl.map_sync does nothing for a map without bounce pages
            super().map_sync(dmat, map, op)

    def _after(self, dmat: BusDmaTag, m: XenDmaMap, buflen: int, flags: int,
               segs: list[bus_dma_segment_t], error: int) -> int:
        """After the bounce layer added one buffer's segments (on ``m``, a Xen map as the
        load hook that calls this checked): references."""
        if m.pass_gen != m.load_gen:  # a new pass over the load (first, or a replay)
            m.pass_gen = m.load_gen
            m.pass_bytes = 0
            self.loads += 1
        m.readonly = bool(flags & BUS_DMA_XEN_RO)
        if error != 0:
            return error
        m.pass_bytes += buflen
        if flags & BUS_DMA_NOWAIT:
            # No sleeping: references for what is there now, or ENOMEM.
            if self._take_refs(m, len(segs)) != 0:
                self.nowait_shortages += 1
                return errno.ENOMEM
            return 0
        mem = m.mem
        if mem is None:
            total = m.pass_bytes
        elif mem.md_type == MEMDESC_BIO and mem.md_bio is not None:  # its one buffer's length
            total = mem.md_bio.bio_bcount
        else:
            total = memdesc_length(mem)
        if m.pass_bytes < total:
            return 0  # more buffers to come: allocate once every segment is known
        if len(segs) <= len(m.refs) or self._take_refs(m, len(segs)) == 0:
            return 0
        if self._never_served(m, len(segs)):
            return errno.ENOSPC  # more than can ever be free: waiting would never end
        gt = self.gnttab
        self._cancel_topup(m)  # the load's wait covers the map's missing refs
        m.grant_wait = True
        m.pending_segs = segs
        self.grant_deferred += 1
        if trace.active is not None:
            trace.active.load_deferred(m, len(segs))
        gt.gnttab_request_free_callback(m.gnttab_cb, self._grant_callback, m,
                                        self._wait_count(len(segs) - len(m.refs)))
        return errno.EINPROGRESS

    def _never_served(self, m: XenDmaMap, nsegs: int) -> bool:
        """Whether a load of ``nsegs`` segments on ``m`` can never get its references:
        more than the table can ever hold beside those held for life (rings and
        prealloc maps, this map's own excepted), which never come back."""
        own = len(m.refs) if m.prealloc or m.pool is not None else 0
        return nsegs > self.gnttab.gnttab_ever_available() + own

    def _wait_count(self, need: int) -> int:
        """Free references to wait for before ``need`` can be allocated.

        The table grows on allocation only, so the frames it may still add need not be
        freed first: waiting for ``need`` free references would never end for a load
        larger than the current frames (the allocation in the callback grows the table).
        """
        gt = self.gnttab
        growable = max(0, gt.max_frames - gt.nr_frames) * GREFS_PER_GRANT_FRAME
        return max(1, need - growable)

    def _take_refs(self, m: XenDmaMap, nsegs: int) -> int:
        need = nsegs - len(m.refs)
        if need <= 0:
            return 0
        error, refs = self.gnttab.gnttab_alloc_grant_reference_list(need)
        if error != 0:
            return error
        m.refs.extend(refs)
        if m.pool is not None:  # kept for the map's life
            m.held += need
            self.gnttab.gnttab_hold_for_life(need)
        return 0

    def _grant_callback(self, arg: object) -> None:
        """Grant free callback of a deferred load: finish it under the lockfunc.
        For a prealloc map with no load waiting: its replacement references."""
        m = arg
        assert isinstance(m, XenDmaMap)
        dmat = m.dmat
        dmat.lockfunc(dmat.lockfuncarg, BUS_DMA_LOCK)
        try:
            if m.topup_wait:
                m.topup_wait = False
                if not m.destroyed:
                    self._replace_prealloc(m)
                return
            segs = m.pending_segs
            if (not m.grant_wait or segs is None or m.state is not MapState.LOADING
                    or not m.deferred):
                return  # unloaded (or completed) meanwhile
            if self._take_refs(m, len(segs)) != 0:
                if self._never_served(m, len(segs)):  # more is held for life now
                    m.grant_wait = False
                    m.pending_segs = None
                    if trace.active is not None:
                        trace.active.load_done(m, errno.ENOSPC)
                    bus_dmamap_complete_deferred(dmat, m, segs, errno.ENOSPC, locked=True)
                    return
                need = self._wait_count(len(segs) - len(m.refs))
                self.gnttab.gnttab_request_free_callback(m.gnttab_cb, self._grant_callback,
                                                         m, need)
                return
            m.grant_wait = False
            m.pending_segs = None
            segs = self.map_complete(dmat, m, segs, len(segs), 0)
            self.grant_deferred_completed += 1
            if trace.active is not None:
                trace.active.load_done(m, 0)
            bus_dmamap_complete_deferred(dmat, m, segs, 0, locked=True)
        finally:
            dmat.lockfunc(dmat.lockfuncarg, BUS_DMA_UNLOCK)

    def map_complete(self, dmat: BusDmaTag, map: BusDmaMap, segs: list[bus_dma_segment_t],
                     nsegs: int, error: int) -> list[bus_dma_segment_t]:
        # The bounce layer's map_complete is BusDmaImpl's: the segments as they are.
        if error != 0:
            return segs
        if not isinstance(dmat, XenDmaTag):
            raise KernelPanic(f"busdma_xen: {dmat!r} is not a Xen tag")
        if not isinstance(map, XenDmaMap):
            raise KernelPanic(f"busdma_xen: {map!r} is not a Xen map")
        t, m = dmat, map
        domid = 0 if t.domid is None else t.domid  # the root tag grants to dom0
        if len(m.refs) < len(segs):
            raise KernelPanic(f"busdma_xen: {len(segs)} segments but {len(m.refs)} refs")
        pool = m.pool
        if pool is not None:  # only pages never granted before (writable)
            if m.granted < len(segs) or len(pool.dsts) != len(segs):  # else nothing to grant
                m.granted = pool.grant(self.gnttab, m.refs, m.granted, domid, len(segs))
            return segs
        frames = [addr >> PAGE_SHIFT for addr, n in segs if (addr & _PAGE_MASK) + n <= PAGE_SIZE]
        if len(frames) != len(segs):
            raise KernelPanic(f"busdma_xen: a segment of {m.desc()} crosses a page")
        self.gnttab.gnttab_grant_foreign_access_refs(m.refs[: len(segs)], domid, frames,
                                                     m.readonly)
        m.granted = len(segs)
        return segs

    # -- unload ------------------------------------------------------------------------------

    def map_unload(self, dmat: BusDmaTag, map: BusDmaMap) -> None:
        if not isinstance(map, XenDmaMap):
            raise KernelPanic(f"busdma_xen: {map!r} is not a Xen map")
        m = map
        if m.grant_wait:
            self.gnttab.gnttab_cancel_free_callback(m.gnttab_cb)
            m.grant_wait = False
            m.pending_segs = None
            self.grant_deferred_cancelled += 1
            if trace.active is not None:
                trace.active.load_done(m, 0, cancelled=True)
        if m.pool is not None:  # the grants and the pages stay with the map
            m.pool.unload()
            m.pass_gen = -1
            if m.bpages or m.pagesreserved != 0 or m.bounce_waiting:  # (never on its pages)
                super().map_unload(dmat, m)
            return
        self._end_grants(dmat, m)
        if not m.prealloc:
            self._free_refs(m.refs)
            m.refs = []
        m.pass_gen = -1
        super().map_unload(dmat, m)

    def _end_grants(self, dmat: BusDmaTag, m: XenDmaMap, replace: bool = True) -> None:
        """End access to every granted ref; those the backend still maps go to reclaim,
        with the page behind each wired until the backend lets go (DESIGN section 4).
        A prealloc map gets replacements (``replace``)."""
        gt = self.gnttab
        if m.granted == 0:
            return  # nothing to end
        busy = gt.gnttab_end_foreign_access_refs(m.refs[: m.granted])
        m.granted = 0
        if not busy:
            return
        self.still_mapped_at_unload += len(busy)
        self.kern.dma_debug.report(
            DmaDebugKind.STILL_MAPPED_AT_UNLOAD,
            f"unload of {m.desc()}: grant refs {busy} still mapped by domain "
            f"{_xtag(dmat).domid}; reclaimed when the backend unmaps them",
            tag=dmat.desc(), map=m.desc())
        kern = self.kern
        for ref in busy:
            m.refs.remove(ref)
            pfn = gt.entry(ref)[2]  # the frame the grant points at
            kern.vm_page_wire(pfn)
            gt.gnttab_end_foreign_access(ref, self._unwirer(pfn))
        if m.prealloc and replace:
            self._replace_prealloc(m)

    def _unwirer(self, pfn: int) -> Callable[[], None]:
        return lambda: self.kern.vm_page_unwire(pfn)

    def _replace_prealloc(self, m: XenDmaMap) -> None:
        """Give a prealloc map back its ``nsegments`` refs: now, or from a free callback."""
        need = m.dmat.nsegments - len(m.refs)
        if need <= 0 or m.grant_wait or m.topup_wait:
            return
        if self._take_refs(m, m.dmat.nsegments) == 0:
            return
        m.topup_wait = True
        self.gnttab.gnttab_request_free_callback(m.gnttab_cb, self._grant_callback, m,
                                                 self._wait_count(need))

    def _cancel_topup(self, m: XenDmaMap) -> None:
        if m.topup_wait:
            self.gnttab.gnttab_cancel_free_callback(m.gnttab_cb)
            m.topup_wait = False

    def _free_refs(self, refs: list[int]) -> None:
        """Give the map's refs back as one private chain (one gnttab lock round).

        Released in order onto the chain, the free list ends up as freeing them one by
        one would leave it. Should a ref be invalid or repeated, the list call frees
        them one at a time itself, so that the per-ref reports stay as they were.
        """
        if not refs:
            return
        self.gnttab.gnttab_free_grant_reference_list(refs)

    def _release_refs(self, m: XenDmaMap) -> None:
        self._cancel_topup(m)
        if m.prealloc:
            m.prealloc = False
            self.gnttab.gnttab_hold_for_life(-m.dmat.nsegments)
        if m.held != 0:
            self.gnttab.gnttab_hold_for_life(-m.held)
            m.held = 0
        self._end_grants(m.dmat, m, replace=False)
        self._free_refs(m.refs)
        m.refs = []
        if m.pool is not None:  # pages still mapped are wired: kept until let go
            m.pool.free()


def xen_busdma_attach(kern: Kernel, gnttab: GntTab) -> XenDmaImpl:
    """Install the Xen implementation in ``kern`` (done once at boot)."""
    st = kernel_state(kern)
    impl = st.impls.get("xen")
    if impl is None:
        impl = st.impls["xen"] = XenDmaImpl(kern, gnttab)
    assert isinstance(impl, XenDmaImpl)
    return impl


def xen_get_dma_tag(kern: Kernel) -> BusDmaTag:
    """The root Xen tag of ``kern``: boundary and maxsegsz PAGE_SIZE, no other limit.

    Built once per kernel and kept (the 2018 code built a new one per call and
    never freed it).
    """
    st = kernel_state(kern)
    impl = st.impls.get("xen")
    if not isinstance(impl, XenDmaImpl):
        raise KernelPanic("xen_get_dma_tag: busdma_xen is not attached to this kernel")
    root = st.impls.get("xen_root")
    if isinstance(root, XenDmaTag):
        return root
    error, tag = impl.tag_create(None, kern, 1, PAGE_SIZE, BUS_SPACE_MAXADDR,
                                 BUS_SPACE_MAXADDR, BUS_SPACE_MAXSIZE, BUS_SPACE_UNRESTRICTED,
                                 PAGE_SIZE, 0, None, None)
    if error != 0 or tag is None:
        raise KernelPanic(f"xen_get_dma_tag: cannot create the root Xen tag: {error}")
    tag.is_root = True
    tag.name = "xen-root"
    st.impls["xen_root"] = tag
    return tag


def xen_dmamap_get_grefs(map: BusDmaMap) -> list[int]:
    """The grant references of a loaded map, one per segment, in segment order."""
    if not isinstance(map, XenDmaMap):
        raise KernelPanic(f"busdma_xen: {map!r} is not a Xen map")
    if map.state is not _LOADED:
        return []
    return map.refs[: len(map.dm_segs)]
