"""The generic bus_dma implementation: segment building and bounce pages.

Theory of operation (FreeBSD x86 ``busdma_bounce.c``)
-----------------------------------------------------
A tag *could bounce* if its ``lowaddr`` is below the top of memory or its
alignment is above 1 (or its parent could). Such a tag gets a bounce zone
(shared by tags whose ``lowaddr``/alignment it satisfies) holding bounce pages:
pages below the zone's ``lowaddr``, from ``contigmalloc(M_BUSDMA)``. Pages are
added at ``BUS_DMA_ALLOCNOW`` tag creation (enough for ``maxsize``) and at map
creation (up to ``Kernel.bounce_max_pages`` per zone, FreeBSD's MAX_BPAGES).

A load walks its buffer chunk by chunk (a chunk ends at a page end, at
``maxsegsz`` and at a boundary line); a chunk whose start is above ``lowaddr``
(and at most ``highaddr``) or misaligned is copied through a bounce page (the
segment gets the bounce page's address, at offset 0 or, with
``BUS_DMA_KEEP_PG_OFFSET``, at the chunk's page offset). The pages a buffer
needs are counted first and reserved from the zone: with ``BUS_DMA_NOWAIT`` a
shortage is ENOMEM; otherwise the reservation is kept, the map waits in the
zone's FIFO and the load returns EINPROGRESS. Unloads return pages; each
return serves the waiting maps in order, and a map whose reservation is
complete is queued for replay: one task on the kernel's ``taskqueue_swi``
replays the queued loads in FIFO order, each between ``lockfunc(BUS_DMA_LOCK)``
and ``lockfunc(BUS_DMA_UNLOCK)`` of its tag (``busdma_swi``).

``bus_dmamap_sync`` copies: PREWRITE buffer -> bounce pages, POSTREAD bounce
pages -> buffer.

Differences from FreeBSD, on the safe side: the page count of a chunk uses the
very walk the load uses (so a count can never fall short); a bounced chunk is
cut at the boundary before the page is taken; a sleepable load counts and
reserves the pages of its whole memory descriptor before its first buffer, so a
deferral never leaves part of a load attached; each zone has its own FIFO of
waiting maps; a zone no tag uses any more gives its pages back (this keeps
leak accounting exact); unloading a waiting map cancels its deferral; pages
added to a zone (map creation) serve its waiting maps at once, not at the
zone's next unload; a sleepable load needing more pages than the zone holds
fails at once with EFBIG through its callback (FreeBSD queues it for pages that
never come; only tag and map creation add pages, never a waiting load).

A bounce page that is wired when its map is unloaded (the grant layer wires
the page behind a grant another domain still maps; DESIGN section 4) is not
returned to the zone: it is held until its wire count drops to zero, then
joins the zone's free pages and serves the waiting maps. A zone with held
pages is not freed; the last page coming back frees a zone no tag uses.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from gntdma.sched import KernelPanic
from gntdma.sys._busdma import busdma_replay_load
from gntdma.sys._busdma_bounce_types import (
    BUS_DMA_COULD_BOUNCE,
    BUS_DMA_MIN_ALLOC_COMP,
    BounceMap,
    BouncePage,
    BounceTag,
    BounceZone,
    bounce_map,
    bounce_tag,
)
from gntdma.sys._busdma_impl import (
    AddrAt,
    BusDmaImpl,
    buffer_accessors,
    buffer_pieces,
    buffer_pieces_unbounced,
    bus_dmamap_addpages,
    bus_dmamap_addseg,
    map_pieces_unbounced,
    vm_addr_bound_ok,
)
from gntdma.sys._busdma_types import (
    BUS_DMA_ALLOCNOW,
    BUS_DMA_KEEP_PG_OFFSET,
    BUS_DMA_LOCK,
    BUS_DMA_NOWAIT,
    BUS_DMA_UNLOCK,
    BUS_DMA_ZERO,
    BUS_DMASYNC_POSTREAD,
    BUS_DMASYNC_PREWRITE,
    BusDmaCallback,
    BusDmaLockFunc,
    BusDmaMap,
    BusDmaTag,
    bus_dma_segment_t,
    common_bus_dma_tag_create,
    kernel_state,
    memdesc,
    memdesc_buffers,
)
from gntdma.sys._malloc import M_BUSDMA, M_DEVBUF, M_NOWAIT, M_WAITOK, M_ZERO
from gntdma.sys._param import PAGE_MASK, PAGE_SHIFT, PAGE_SIZE, atop, howmany, ptoa, roundup2
from gntdma.sys._taskqueue import Task, taskqueue_enqueue

if TYPE_CHECKING:
    from gntdma.sys._kernel import Kernel

__all__ = [
    "BUS_DMA_COULD_BOUNCE",
    "BUS_DMA_MIN_ALLOC_COMP",
    "BounceImpl",
    "BounceMap",
    "BouncePage",
    "BounceTag",
    "BounceZone",
    "bounce_impl",
]

def bounce_impl(kern: Kernel) -> BounceImpl:
    """The kernel's instance of the generic implementation."""
    st = kernel_state(kern)
    impl = st.impls.get("bounce")
    if impl is None:
        impl = st.impls["bounce"] = BounceImpl(kern)
    assert isinstance(impl, BounceImpl)
    return impl


class BounceImpl(BusDmaImpl):
    """FreeBSD's ``bus_dma_bounce_impl``; subclass it to add to the hooks."""

    name = "bounce"
    tag_class: type[BusDmaTag] = BounceTag
    map_class: type[BusDmaMap] = BounceMap

    def __init__(self, kern: Kernel) -> None:
        self.kern = kern
        self.state = kernel_state(kern)
        if self.state.swi_task is None:
            self.state.swi_task = Task(self._busdma_swi, None)

    # -- tags ----------------------------------------------------------------------------

    def tag_create(self, parent: BusDmaTag | None, kern: Kernel, alignment: int,
                   boundary: int, lowaddr: int, highaddr: int, maxsize: int, nsegments: int,
                   maxsegsz: int, flags: int, lockfunc: BusDmaLockFunc | None,
                   lockfuncarg: Any) -> tuple[int, BusDmaTag | None]:
        error, tag = common_bus_dma_tag_create(
            self, self.tag_class, parent, kern, alignment, boundary, lowaddr, highaddr,
            maxsize, nsegments, maxsegsz, flags, lockfunc, lockfuncarg)
        if error != 0 or tag is None:
            return error, None
        t = bounce_tag(tag)
        t.impl = self
        if isinstance(parent, BounceTag) and parent.bounce_flags & BUS_DMA_COULD_BOUNCE:
            t.bounce_flags |= BUS_DMA_COULD_BOUNCE
        if t.lowaddr < ptoa(kern.vm.maxmem) or t.alignment > 1:
            t.bounce_flags |= BUS_DMA_COULD_BOUNCE
        if t.bounce_flags & BUS_DMA_COULD_BOUNCE and flags & BUS_DMA_ALLOCNOW:
            error = self._zone_setup(t)
            if error != 0:
                t.ref_count = 0
                self._tag_free(t)
                if parent is not None:
                    parent.ref_count -= 1
                return error, None
        return 0, t

    def tag_destroy(self, dmat: BusDmaTag) -> int:
        t: BusDmaTag | None = dmat
        while t is not None:
            parent = t.parent
            t.ref_count -= 1
            if t.ref_count != 0:
                break
            self._tag_free(t)
            t = parent
        return 0

    def _tag_free(self, t: BusDmaTag) -> None:
        if not isinstance(t, BounceTag) or t.bounce_zone is None:
            return
        bz = t.bounce_zone
        t.bounce_zone = None
        bz.tag_refs -= 1
        self._free_zone_if_idle(bz)

    def _free_zone_if_idle(self, bz: BounceZone) -> None:
        if (bz.tag_refs == 0 and bz.active_bpages == 0 and bz.reserved_bpages == 0
                and bz.held_bpages == 0 and not bz.waiting and bz in self.state.zones):
            while bz.pages:
                bp = bz.pages.popleft()
                self.kern.contigfree(bp.vaddr, PAGE_SIZE, M_BUSDMA)
            self.state.zones.remove(bz)
        self._update_counters()

    def must_bounce(self, t: BounceTag, paddr: int) -> bool:
        if not t.bounce_flags & BUS_DMA_COULD_BOUNCE:
            return False
        return (t.lowaddr < paddr <= t.highaddr) or (paddr & (t.alignment - 1)) != 0

    # -- bounce zones and pages -------------------------------------------------------------

    def _alloc_zone(self, t: BounceTag) -> BounceZone:
        if t.bounce_zone is not None:
            return t.bounce_zone
        for z in self.state.zones:
            if isinstance(z, BounceZone) and t.alignment <= z.alignment and t.lowaddr >= z.lowaddr:
                bz = z
                break
        else:
            bz = BounceZone(f"zone{len(self.state.zones)}", t.lowaddr,
                            max(t.alignment, PAGE_SIZE))
            self.state.zones.append(bz)
        t.bounce_zone = bz
        bz.tag_refs += 1
        return bz

    def _zone_setup(self, t: BounceTag) -> int:
        bz = self._alloc_zone(t)
        want = min(atop(t.maxsize), self.kern.bounce_max_pages)
        if bz.total_bpages < want:
            pages = want - bz.total_bpages
            if self._alloc_bounce_pages(t, pages) < pages:
                return errno.ENOMEM
        t.bounce_flags |= BUS_DMA_MIN_ALLOC_COMP
        return 0

    def _alloc_bounce_pages(self, t: BounceTag, numpages: int) -> int:
        bz, count = t.bounce_zone, 0
        assert bz is not None
        while count < numpages and bz.total_bpages < self.kern.bounce_max_pages:
            va = self.kern.contigmalloc(PAGE_SIZE, M_BUSDMA, M_NOWAIT, 0, bz.lowaddr,
                                        bz.alignment, 0)
            if va == 0:
                break
            bz.pages.append(BouncePage(va, self.kern.pmap_kextract(va)))
            bz.total_bpages += 1
            bz.free_bpages += 1
            count += 1
        self._serve_waiters(bz)  # new pages may complete a waiting map's reservation
        return count

    def _update_counters(self) -> None:
        c = self.kern.busdma
        zones = self.state.zones
        c.bounce_zones = len(zones)
        if len(zones) == 1:  # the usual case: no sums to build
            c.bounce_pages, c.bounce_pages_free = zones[0].total_bpages, zones[0].free_bpages
            return
        c.bounce_pages = sum(z.total_bpages for z in zones)
        c.bounce_pages_free = sum(z.free_bpages for z in zones)

    def _reserve(self, bz: BounceZone, m: BounceMap, commit: bool) -> int:
        """Reserve what ``m`` still needs; returns how many pages are still missing."""
        pages = min(bz.free_bpages, m.pagesneeded - m.pagesreserved)
        if not commit and m.pagesneeded > m.pagesreserved + pages:
            return m.pagesneeded - (m.pagesreserved + pages)
        bz.free_bpages -= pages
        bz.reserved_bpages += pages
        m.pagesreserved += pages
        return m.pagesneeded - m.pagesreserved

    def _reserve_pages(self, t: BounceTag, m: BounceMap, flags: int) -> int:
        bz = t.bounce_zone
        assert bz is not None
        try:
            if flags & BUS_DMA_NOWAIT:
                if self._reserve(bz, m, False) != 0:
                    return errno.ENOMEM
            elif m.pagesneeded > bz.total_bpages:
                return errno.EFBIG  # the zone never holds that many: the wait would not end
            elif self._reserve(bz, m, True) != 0:
                if not m.bounce_waiting:
                    bz.waiting.append(m)
                    m.bounce_waiting = True
                return errno.EINPROGRESS
            return 0
        finally:
            self._update_counters()

    def _add_bounce_page(self, t: BounceTag, m: BounceMap, addr: int,
                         src: list[tuple[int, int]], size: int) -> int:
        bz = t.bounce_zone
        assert bz is not None
        if m.pagesneeded == 0 or m.pagesreserved == 0:
            raise KernelPanic("add_bounce_page: map doesn't need any pages")
        if not bz.pages:
            raise KernelPanic("add_bounce_page: free page list is empty")
        m.pagesneeded -= 1
        m.pagesreserved -= 1
        bp = bz.pages.popleft()
        bz.reserved_bpages -= 1
        bz.active_bpages += 1
        bp.offset = addr & PAGE_MASK if t.flags & BUS_DMA_KEEP_PG_OFFSET else 0
        bp.src = src
        bp.datacount = size
        m.bpages.append(bp)
        return bp.busaddr + bp.offset

    def _free_bounce_pages(self, t: BounceTag, m: BounceMap) -> None:
        bz = t.bounce_zone
        if bz is None:
            return
        if not m.bpages and m.pagesreserved == 0 and not m.bounce_waiting and not bz.waiting:
            # Nothing to give back and no map waiting: what the walk below leaves
            # (no page count changes, so the counters stand as they are).
            m.pagesneeded = 0
            m.whole_counted = False
            callbacks = self.state.callbacks
            if callbacks and m in callbacks:
                callbacks.remove(m)
            return
        for bp in m.bpages:
            bp.src = []
            bp.datacount = 0
            bp.offset = 0
            bz.active_bpages -= 1
            pfn = bp.busaddr >> PAGE_SHIFT
            if self.kern.vm.is_wired(pfn):
                bz.held_bpages += 1
                self.kern.vm.on_unwired(pfn, partial(self._unhold_bounce_page, bz, bp))
            else:
                bz.pages.appendleft(bp)
                bz.free_bpages += 1
        m.bpages.clear()
        if m.pagesreserved != 0:
            bz.free_bpages += m.pagesreserved
            bz.reserved_bpages -= m.pagesreserved
            m.pagesreserved = 0
        m.pagesneeded = 0
        m.whole_counted = False
        if m.bounce_waiting:
            bz.waiting.remove(m)
            m.bounce_waiting = False
        if m in self.state.callbacks:
            self.state.callbacks.remove(m)
        self._serve_waiters(bz)

    def _unhold_bounce_page(self, bz: BounceZone, bp: BouncePage) -> None:
        """A held bounce page is no longer wired: back to its zone."""
        bz.held_bpages -= 1
        bz.pages.appendleft(bp)
        bz.free_bpages += 1
        if bz.tag_refs == 0:
            self._free_zone_if_idle(bz)
        else:
            self._serve_waiters(bz)

    def _serve_waiters(self, bz: BounceZone) -> None:
        ready = False
        while bz.waiting:
            m = bz.waiting[0]
            if self._reserve(bz, m, True) != 0:
                break
            bz.waiting.popleft()
            m.bounce_waiting = False
            self.state.callbacks.append(m)
            bz.total_deferred += 1
            ready = True
        self._update_counters()
        if ready:
            assert self.state.swi_task is not None
            taskqueue_enqueue(self.kern.taskqueue_swi, self.state.swi_task)

    def _busdma_swi(self, _arg: object, _pending: int) -> None:
        """On taskqueue_swi: replay the ready deferred loads, FIFO, under each lockfunc."""
        while self.state.callbacks:
            m = self.state.callbacks.popleft()
            t = m.dmat
            gen = m.load_gen
            t.lockfunc(t.lockfuncarg, BUS_DMA_LOCK)
            try:
                if m.load_gen == gen and not m.destroyed:
                    busdma_replay_load(t, m)
            finally:
                t.lockfunc(t.lockfuncarg, BUS_DMA_UNLOCK)

    # -- maps ------------------------------------------------------------------------------

    def map_create(self, dmat: BusDmaTag, flags: int) -> tuple[int, BusDmaMap | None]:
        t = bounce_tag(dmat)
        m = bounce_map(self.map_class(dmat, flags))
        if t.bounce_flags & BUS_DMA_COULD_BOUNCE:
            bz = self._alloc_zone(t)
            maxp = self.kern.bounce_max_pages
            if t.alignment <= 1:
                maxp = min(maxp, self.kern.vm.maxmem - atop(t.lowaddr))
            if (not t.bounce_flags & BUS_DMA_MIN_ALLOC_COMP
                    or (bz.map_count > 0 and bz.total_bpages < maxp)):
                pages = min(max(atop(t.maxsize), 1), maxp - bz.total_bpages)
                error = 0
                if pages > 0 and self._alloc_bounce_pages(t, pages) < pages:
                    error = errno.ENOMEM
                if not t.bounce_flags & BUS_DMA_MIN_ALLOC_COMP:
                    if error != 0:
                        return error, None
                    t.bounce_flags |= BUS_DMA_MIN_ALLOC_COMP
            bz.map_count += 1
        return 0, m

    def map_destroy(self, dmat: BusDmaTag, map: BusDmaMap) -> int:
        t, m = bounce_tag(dmat), bounce_map(map)
        if m.bpages or m.pagesreserved != 0:
            return errno.EBUSY
        if t.bounce_zone is not None:
            t.bounce_zone.map_count -= 1
        return 0

    def mem_alloc(self, dmat: BusDmaTag, flags: int) -> tuple[int, int, BusDmaMap | None]:
        t = bounce_tag(dmat)
        k = self.kern
        mflags = M_NOWAIT if flags & BUS_DMA_NOWAIT else M_WAITOK
        if flags & BUS_DMA_ZERO:
            mflags |= M_ZERO
        size = t.maxsize
        if size <= PAGE_SIZE and t.alignment <= PAGE_SIZE and t.lowaddr >= ptoa(k.vm.maxmem):
            va = k.malloc(max(size, t.alignment), M_DEVBUF, mflags)
            kind = "malloc"
        elif (t.nsegments < 0 or t.nsegments >= howmany(size, min(t.maxsegsz, PAGE_SIZE))) \
                and t.alignment <= PAGE_SIZE and t.boundary % PAGE_SIZE == 0:
            va = k.kmem_alloc_attr(size, mflags, 0, t.lowaddr)
            kind = "kmem"
        else:
            va = k.kmem_alloc_contig(size, mflags, 0, t.lowaddr, t.alignment, t.boundary)
            kind = "contig"
        if va == 0:
            return errno.ENOMEM, 0, None
        m = bounce_map(self.map_class(dmat, flags))
        m.dmamem_kind = kind
        m.dmamem_size = size
        return 0, va, m

    def mem_free(self, dmat: BusDmaTag, vaddr: int, map: BusDmaMap) -> None:
        m = bounce_map(map)
        if m.dmamem_kind == "malloc":
            self.kern.free(vaddr, M_DEVBUF)
        else:
            self.kern.kmem_free(vaddr, m.dmamem_size)

    # -- loads ----------------------------------------------------------------------------

    def _chunk(self, t: BounceTag, cur: int, rem: int, bounce: bool) -> int:
        max_sg = min(rem, t.maxsegsz)
        sg = PAGE_SIZE - (cur & PAGE_MASK)
        b = t.boundary
        if bounce and not t.flags & BUS_DMA_KEEP_PG_OFFSET:
            sg = min(roundup2(sg, t.alignment), max_sg)
            if b != 0:
                sg = min(sg, b)  # the bounce page starts on a page, hence on a line
            return sg
        sg = min(sg, max_sg)
        if b != 0 and not vm_addr_bound_ok(cur, sg, b):
            sg = ((cur + b) & ~(b - 1)) - cur
        return sg

    def _count(self, t: BounceTag, addr_at: AddrAt, buflen: int) -> int:
        off = 0
        n = 0
        while off < buflen:
            cur = addr_at(off)
            mb = self.must_bounce(t, cur)
            n += 1 if mb else 0
            off += self._chunk(t, cur, buflen - off, mb)
        return n

    def _count_memdesc(self, t: BounceTag, m: BounceMap, mem: memdesc) -> int:
        n = 0
        for kind, a, ln, ma in memdesc_buffers(mem):
            if map_pieces_unbounced(self.kern, t, m, kind, a, ma, ln,
                                    buffer_pieces_unbounced) is None:
                n += self._count(t, buffer_accessors(self.kern, kind, a, ma)[0], ln)
        return n

    def _load(self, dmat: BusDmaTag, map: BusDmaMap, kind: str, a: int, ma: Sequence[int],
              buflen: int, flags: int, segs: list[bus_dma_segment_t]) -> int:
        if not isinstance(dmat, BounceTag):
            raise KernelPanic(f"bounce busdma: {dmat!r} is not a bounce tag")
        if not isinstance(map, BounceMap):
            raise KernelPanic(f"bounce busdma: {map!r} is not a bounce map")
        t, m = dmat, map
        if buflen < 0:
            return errno.EINVAL
        # bus_dmamem_alloc memory satisfies the tag: FreeBSD loads it with the
        # "nobounce" map, so it is never bounced.
        if not t.bounce_flags & BUS_DMA_COULD_BOUNCE or m.dmamem:  # pages looked up at once
            added = bus_dmamap_addpages(t, buffer_pieces(self.kern, kind, a, ma, buflen), segs)
            return errno.EFBIG if added < buflen else 0
        pages = map_pieces_unbounced(self.kern, t, m, kind, a, ma, buflen,  # None: may bounce
                                     buffer_pieces_unbounced)
        if not m.whole_counted and m.pagesneeded == 0 and pages is None:  # else the count is 0
            m.pagesneeded = self._count(t, buffer_accessors(self.kern, kind, a, ma)[0], buflen)
        if m.pagesneeded > m.pagesreserved:
            if t.bounce_zone is None:
                self._alloc_zone(t)
            error = self._reserve_pages(t, m, flags)
            if error != 0:
                return error
        if pages is not None:  # the walk's chunks are the pages
            return errno.EFBIG if bus_dmamap_addpages(t, pages, segs) < buflen else 0
        addr_at, pieces_at = buffer_accessors(self.kern, kind, a, ma)
        off = 0
        while off < buflen:
            cur = addr_at(off)
            mb = self.must_bounce(t, cur)
            sg = self._chunk(t, cur, buflen - off, mb)
            addr = self._add_bounce_page(t, m, cur, pieces_at(off, sg), sg) if mb else cur
            n = bus_dmamap_addseg(t, addr, sg, segs)
            if n == 0:
                break
            if mb and n < sg:
                bp = m.bpages[-1]
                bp.datacount = n
                bp.src = pieces_at(off, n)
            off += n
        return errno.EFBIG if off < buflen else 0

    def load_buffer(self, dmat: BusDmaTag, map: BusDmaMap, buf: int, buflen: int, flags: int,
                    segs: list[bus_dma_segment_t]) -> int:
        return self._load(dmat, map, "vaddr", buf, (), buflen, flags, segs)

    def load_phys(self, dmat: BusDmaTag, map: BusDmaMap, paddr: int, buflen: int, flags: int,
                  segs: list[bus_dma_segment_t]) -> int:
        return self._load(dmat, map, "phys", paddr, (), buflen, flags, segs)

    def load_ma(self, dmat: BusDmaTag, map: BusDmaMap, ma: Sequence[int], tlen: int,
                ma_offs: int, flags: int, segs: list[bus_dma_segment_t]) -> int:
        return self._load(dmat, map, "ma", ma_offs, ma, tlen, flags, segs)

    def map_waitok(self, dmat: BusDmaTag, map: BusDmaMap, mem: memdesc,
                   callback: BusDmaCallback, callback_arg: Any) -> None:
        # BusDmaImpl.map_waitok: the load to replay
        map.mem = mem
        map.callback = callback
        map.callback_arg = callback_arg
        if not isinstance(dmat, BounceTag):
            raise KernelPanic(f"bounce busdma: {dmat!r} is not a bounce tag")
        if not isinstance(map, BounceMap):
            raise KernelPanic(f"bounce busdma: {map!r} is not a bounce map")
        t, m = dmat, map
        if (t.bounce_flags & BUS_DMA_COULD_BOUNCE and not m.dmamem and not m.bpages
                and m.pagesneeded == 0 and m.pagesreserved == 0):
            m.pagesneeded = self._count_memdesc(t, m, mem)
            m.whole_counted = True

    def map_unload(self, dmat: BusDmaTag, map: BusDmaMap) -> None:
        if not isinstance(dmat, BounceTag):
            raise KernelPanic(f"bounce busdma: {dmat!r} is not a bounce tag")
        if not isinstance(map, BounceMap):
            raise KernelPanic(f"bounce busdma: {map!r} is not a bounce map")
        self._free_bounce_pages(dmat, map)

    def map_sync(self, dmat: BusDmaTag, map: BusDmaMap, op: int) -> None:
        t, m = bounce_tag(dmat), bounce_map(map)
        if not m.bpages:
            return
        kern = self.kern
        bz = t.bounce_zone
        assert bz is not None
        if op & BUS_DMASYNC_PREWRITE:
            for bp in m.bpages:
                data = b"".join(kern.phys_read(pa, n) for pa, n in bp.src)
                kern.phys_write(bp.busaddr + bp.offset, data[: bp.datacount])
            bz.total_bounced += 1
            kern.busdma.total_bounced += 1
        if op & BUS_DMASYNC_POSTREAD:
            for bp in m.bpages:
                data = kern.phys_read(bp.busaddr + bp.offset, bp.datacount)
                pos = 0
                for pa, n in bp.src:
                    kern.phys_write(pa, data[pos : pos + n])
                    pos += n
            bz.total_bounced += 1
            kern.busdma.total_bounced += 1

    def zones(self) -> list[BounceZone]:
        return [z for z in self.state.zones if isinstance(z, BounceZone)]
