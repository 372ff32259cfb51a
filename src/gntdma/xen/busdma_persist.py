"""busdma_xen persistent maps: the pages a map keeps granted across its loads.

Theory of operation
-------------------
A Xen map created with ``BUS_DMA_XEN_PERSISTENT`` owns a pool of pages
(``contigmalloc(M_BUSDMA_XEN)``, below the tag's ``lowaddr``). A load never
hands the backend the caller's pages: it walks the buffer as the bounce layer
does (a chunk ends at a page end, at ``maxsegsz`` and at a boundary line) and
puts chunk *i* on pool page *i*, at the chunk's own page offset when that
offset satisfies the tag's alignment, else at offset 0. Segment *i* is then
pool page *i*, so the map's reference *i* (granted once, writable, when the
page first serves a load) is the segment's reference for every load: the
backend may keep it mapped between requests, as blkif's ``feature-persistent``
lets it. Pages are added as loads need them (``M_NOWAIT``: a shortage is
ENOMEM) and kept until the map is destroyed.

``bus_dmamap_sync`` copies as bounce pages do: PREWRITE from the caller's
buffer into the pool pages, POSTREAD from the pool pages back. Unload only
forgets which pieces of the caller's buffer the pages stand for: the grants
stay, the pages stay with the map.

The grants are written writable whatever the load asks (``BUS_DMA_XEN_RO``
is ignored), because a persistent grant serves reads and writes alike: Linux
xen-blkfront grants its persistent pages writable and xen-blkback maps them
without ``GNTMAP_readonly`` (``xen_blkbk_map``). The caller's own pages are
never granted, so the backend can only ever write the pool.

The references and grants belong to :mod:`gntdma.xen.busdma`; this module
keeps the pages and does the copies.

A chunk never crosses a page of the caller's buffer, so each pool page stands
for one physical piece of it: a load records, per segment, the pool address,
the caller's address and the length, and a sync copies all of them as
``Kernel.phys_copy`` does, through views instead of two page lookups per
piece: each pool page's view is taken when the page joins the pool, and the
view of a caller's page when a sync first copies it (kept up to twice the
pool's pages; all released when more would be kept, and when the pool is
freed, before its pages go back). When the caller's pieces are not all within
one memory range, ``Kernel.phys_copy`` itself copies them (with its panic on a
page that does not exist). Under a tag whose boundary and ``maxsegsz`` are both
``PAGE_SIZE`` (the root Xen tag's, which its children inherit unless they
tighten them) the chunks are exactly the buffer's page pieces, looked up in one
call, and no two segments can merge (two pool pages are never one boundary
window), so the segments are built in one pass; any other tag takes the chunk
walk of the bounce layer, one ``bus_dmamap_addseg`` per chunk. Both give the
same segments, pages and errors.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from functools import partial
from typing import Final, final

from gntdma.sched import KernelPanic
from gntdma.sys import (
    BUS_DMASYNC_POSTREAD,
    BUS_DMASYNC_PREWRITE,
    M_BUSDMA_XEN,
    M_NOWAIT,
    PAGE_MASK,
    PAGE_SHIFT,
    PAGE_SIZE,
    BusDmaTag,
    Kernel,
    bus_dma_segment_t,
    bus_dmamap_addseg,
    ma_pieces,
    vm_addr_bound_ok,
)
from gntdma.xen.gnttab import GntTab

__all__ = ["PersistentPool"]

#: (physical address, length) pieces of a caller's buffer.
Pieces = list[tuple[int, int]]
_KINDS: Final = ("vaddr", "phys", "ma")
#: A vaddr load longer than this takes its pages' addresses, not (pa, len) pairs.
_RUN: Final = 8 * PAGE_SIZE
#: A segment from its (address, length) pair without a Python-level call.
_SEG: Final = partial(tuple.__new__, bus_dma_segment_t)


def _phys_pieces(pa: int, n: int) -> Pieces:
    """The page pieces of ``[pa, pa+n)``."""
    if n <= 0:
        return []
    first = min(n, PAGE_SIZE - (pa & PAGE_MASK))
    return [(pa, first)] + [(a, min(PAGE_SIZE, pa + n - a))
                            for a in range(pa + first, pa + n, PAGE_SIZE)]


@final
class PersistentPool:
    """The pages of one persistent map and what the current load put on them."""

    __slots__ = ("bufs", "bufviews", "dsts", "kern", "lens", "pages", "pas", "views", "wsegs")

    def __init__(self, kern: Kernel) -> None:
        self.kern = kern
        #: (va, pa) of each pool page, in order; page i serves segment i of every load.
        self.pages: list[tuple[int, int]] = []
        #: The pa of each pool page (``pages[i][1]``).
        self.pas: list[int] = []
        #: A writable view of each pool page, released before the page is freed.
        self.views: list[memoryview] = []
        #: The segment of each pool page as a whole (``(pas[i], PAGE_SIZE)``): a
        #: load's pieces between its first and last are whole pages, on these.
        self.wsegs: list[bus_dma_segment_t] = []
        #: Views of the callers' pages the syncs copied (pfn -> view), as
        #: ``physmem.page`` gave them: at most :meth:`_bufviews_max`, all released
        #: when it would hold more and when the pool is freed.
        self.bufviews: dict[int, memoryview] = {}
        #: The current load, one entry per segment: the pool address its data goes to,
        #: the physical address of the caller's piece it stands for, and the length.
        self.dsts: list[int] = []
        self.bufs: list[int] = []
        self.lens: list[int] = []

    def __len__(self) -> int:
        return len(self.pages)

    @property
    def nactive(self) -> int:
        """Pool pages the current load uses (one per segment)."""
        return len(self.dsts)

    def grant(self, gt: GntTab, refs: list[int], granted: int, domid: int,
              nsegs: int) -> int:
        """Grant the pages of a load of ``nsegs`` segments that were never granted
        (``refs[i]`` grants page i; the first ``granted`` are granted already),
        writable: a persistent grant serves both directions. Returns the new count."""
        if len(self.dsts) != nsegs:
            raise KernelPanic(f"busdma_xen: {nsegs} segments on {len(self.dsts)} "
                              f"persistent pages")
        for i in range(granted, nsegs):
            gt.gnttab_grant_foreign_access_ref(refs[i], domid, self.pas[i] >> PAGE_SHIFT, False)
        return max(granted, nsegs)

    def _page(self, t: BusDmaTag, i: int) -> bool:
        """Whether pool pages up to ``i`` exist, added now if needed (False: no memory
        for one; those added before it stay)."""
        while len(self.pages) <= i:
            va = self.kern.contigmalloc(PAGE_SIZE, M_BUSDMA_XEN, M_NOWAIT, 0, t.lowaddr,
                                        PAGE_SIZE, 0)
            if va == 0:
                return False
            pa = self.kern.pmap_kextract(va)
            self.pages.append((va, pa))
            self.pas.append(pa)
            self.wsegs.append(_SEG((pa, PAGE_SIZE)))
            self.views.append(self.kern.physmem.page(pa >> PAGE_SHIFT))
        return True

    def load(self, t: BusDmaTag, kind: str, a: int, ma: Sequence[int], buflen: int,
             segs: list[bus_dma_segment_t]) -> int:
        """Add one buffer's chunks to ``segs``, each on the next pool page.

        0, EINVAL (a negative length), ENOMEM (no page for a chunk) or EFBIG (out
        of segments). The pages a failed load added stay with the map.
        """
        assert kind in _KINDS
        if buflen < 0:
            return errno.EINVAL
        if t.boundary == PAGE_SIZE and t.maxsegsz == PAGE_SIZE:
            o = a & PAGE_MASK
            if 0 < buflen <= PAGE_SIZE - o and kind == "vaddr" and len(segs) < t.nsegments:
                # _load_pages of a piece within one page with a segment left: the
                # piece is pmap_kextract's (the same fault), on the next pool page as
                # _add_run puts a first piece.
                b0 = self.kern.pmap_kextract(a)
                base = len(self.dsts)
                if base >= len(self.pages) and not self._page(t, base):
                    return errno.ENOMEM
                if buflen == PAGE_SIZE:  # a whole page: the page's own segment
                    segs.append(self.wsegs[base])
                    d0 = self.pas[base]
                else:
                    d0 = self.pas[base] + (o if o & (t.alignment - 1) == 0 else 0)
                    segs.append(_SEG((d0, buflen)))
                self.dsts.append(d0)
                self.bufs.append(b0)
                self.lens.append(buflen)
                return 0
            return self._load_pages(t, kind, a, ma, buflen, segs)
        return self._load_chunks(t, kind, a, ma, buflen, segs)

    def _load_pages(self, t: BusDmaTag, kind: str, a: int, ma: Sequence[int], buflen: int,
                    segs: list[bus_dma_segment_t]) -> int:
        """:meth:`load` under a tag whose chunks are the buffer's page pieces.

        What the chunk walk does, in one pass: the walk stops at the first chunk with
        no segment left (after adding its page), so only the pieces up to that one
        are looked up and given pages.
        """
        if buflen == 0:
            return 0
        room = t.segment_limit() - len(segs)
        o = a & PAGE_MASK
        span = min(buflen, PAGE_SIZE - o + room * PAGE_SIZE)
        if kind == "vaddr" and span > _RUN:
            pas = self.kern.pmap_kextract_pieces_pages(a, span)
            if pas is not None:  # all mapped: the pieces from their pages' addresses
                pas[0] |= o
                plens = [PAGE_SIZE] * len(pas)
                plens[0] = PAGE_SIZE - o
                plens[-1] = a + span - ((a + span - 1) & ~PAGE_MASK)
                return self._add_pieces(t, pas, plens, room, segs)
        if kind == "vaddr":  # within a page, or a fault at the first unmapped one
            pieces = self.kern.pmap_kextract_pieces(a, span)
        elif kind == "phys":
            pieces = _phys_pieces(a, span)
        else:
            pieces = ma_pieces(ma, a, span)
        base = len(self.dsts)
        error = 0
        if not self._page(t, base + len(pieces) - 1):
            error = errno.ENOMEM
            pieces = pieces[: len(self.pages) - base]
        elif len(pieces) > room:
            error = errno.EFBIG
            pieces = pieces[:room]
        if not pieces:
            return error
        if len(pieces) == 1:  # a piece on its pool page as _add_run puts the first
            b0, n0 = pieces[0]
            o = b0 & PAGE_MASK
            d0 = self.pas[base] + (o if o & (t.alignment - 1) == 0 else 0)
            segs.append(_SEG((d0, n0)))
            self.dsts.append(d0)
            self.bufs.append(b0)
            self.lens.append(n0)
            return error
        bufs, lens = zip(*pieces, strict=True)
        self._add_run(t, base, bufs, lens, segs)
        return error

    def _add_pieces(self, t: BusDmaTag, bufs: list[int], lens: list[int], room: int,
                    segs: list[bus_dma_segment_t]) -> int:
        """:meth:`_load_pages` of the pieces ``bufs``/``lens`` (two at least, whole pages
        between the ends), each on the next pool page while pages and segments last."""
        base = len(self.dsts)
        error = 0
        if not self._page(t, base + len(bufs) - 1):
            error = errno.ENOMEM
            del bufs[len(self.pages) - base :], lens[len(self.pages) - base :]
        elif len(bufs) > room:
            error = errno.EFBIG
            del bufs[room:], lens[room:]
        if bufs:
            self._add_run(t, base, bufs, lens, segs)
        return error

    def _add_run(self, t: BusDmaTag, base: int, bufs: Sequence[int], lens: Sequence[int],
                 segs: list[bus_dma_segment_t]) -> None:
        """Put pieces ``bufs``/``lens`` (one at least) on pool pages ``base`` on.

        A piece sits on its pool page at its own offset when the tag's alignment
        allows it, else at 0 (the page starts on the alignment; the piece fits).
        Only the first piece can start inside a page: the others start a page."""
        o = bufs[0] & PAGE_MASK
        d0 = self.pas[base] + (o if o & (t.alignment - 1) == 0 else 0)
        k = len(bufs)
        dsts = self.pas[base : base + k]
        dsts[0] = d0
        if lens[1:-1].count(PAGE_SIZE) == k - 2:  # whole pages between the ends
            segs.append(_SEG((d0, lens[0])))
            segs += self.wsegs[base + 1 : base + k - 1]
            segs.append(_SEG((dsts[-1], lens[-1])))
        else:
            segs.extend(map(_SEG, zip(dsts, lens, strict=True)))
        self.dsts += dsts
        self.bufs += bufs
        self.lens += lens

    def _load_chunks(self, t: BusDmaTag, kind: str, a: int, ma: Sequence[int], buflen: int,
                     segs: list[bus_dma_segment_t]) -> int:
        """:meth:`load` by the bounce layer's chunk walk (a chunk ends at a page end, at
        ``maxsegsz`` and at a boundary line), one ``bus_dmamap_addseg`` each."""
        kern = self.kern
        off = 0
        while off < buflen:
            if kind == "vaddr":
                cur = kern.pmap_kextract(a + off)
            elif kind == "phys":
                cur = a + off
            else:
                o = a + off
                cur = (ma[o >> PAGE_SHIFT] << PAGE_SHIFT) | (o & PAGE_MASK)
            sg = min(PAGE_SIZE - (cur & PAGE_MASK), buflen - off, t.maxsegsz)
            b = t.boundary
            if b != 0 and not vm_addr_bound_ok(cur, sg, b):
                sg = ((cur + b) & ~(b - 1)) - cur
            i = len(self.dsts)
            if not self._page(t, i):
                return errno.ENOMEM
            page = self.pas[i]
            pgoff = cur & PAGE_MASK
            if pgoff & (t.alignment - 1) != 0:
                pgoff = 0  # the page starts on the tag's alignment; the chunk fits from 0
            n = bus_dmamap_addseg(t, page + pgoff, sg, segs)
            if n == 0:
                break
            # Within one page of the caller's buffer: one physical piece.
            self.dsts.append(page + pgoff)
            self.bufs.append(cur)
            self.lens.append(n)
            off += n
        return errno.EFBIG if off < buflen else 0

    def sync(self, op: int) -> None:
        """PREWRITE: caller's buffer -> pool pages; POSTREAD: pool pages -> caller's buffer."""
        if op & BUS_DMASYNC_PREWRITE:
            self.copy(True)
        if op & BUS_DMASYNC_POSTREAD:
            self.copy(False)

    def copy(self, to_pool: bool) -> None:
        """``Kernel.phys_copy`` between the pool pages and the caller's pieces, the pool
        side through its views (segment i is on pool page i)."""
        bufs = self.bufs
        if not bufs:
            return
        kern = self.kern
        if len(bufs) == 1:  # one piece (a 4 KiB I/O): the loop below for it
            b = bufs[0]
            pfn = b >> PAGE_SHIFT
            n = self.lens[0]
            bv = self.bufviews.get(pfn)
            if bv is not None and n == PAGE_SIZE and b & PAGE_MASK == 0 \
                    and self.dsts[0] & PAGE_MASK == 0:
                # A whole page whose view a copy took (so it is in a memory range).
                if to_pool:
                    self.views[0][:] = bv
                else:
                    bv[:] = self.views[0]
                return
            lo = hi = pfn
        else:
            lo = min(bufs) >> PAGE_SHIFT
            hi = max(bufs) >> PAGE_SHIFT
        for first, npages in kern.vm.ranges:
            if first <= lo and hi < first + npages:
                break
        else:  # phys_copy checks each piece as phys_read and phys_write do
            if to_pool:
                kern.phys_copy(self.dsts, bufs, self.lens)
            else:
                kern.phys_copy(bufs, self.dsts, self.lens)
            return
        cached = self.bufviews
        if len(cached) + len(bufs) > 64 and len(cached) + len(bufs) > self._bufviews_max():
            self._release_bufviews()
        get = cached.get
        page = kern.physmem.page
        for view, d, b, n in zip(self.views, self.dsts, bufs, self.lens, strict=False):
            do = d & PAGE_MASK
            bo = b & PAGE_MASK
            if do + n <= PAGE_SIZE and bo + n <= PAGE_SIZE and n >= 0:
                pfn = b >> PAGE_SHIFT
                bv = get(pfn)
                if bv is None:
                    bv = cached[pfn] = page(pfn)
                if n == PAGE_SIZE:  # whole pages (both offsets 0): no slices
                    if to_pool:
                        view[:] = bv
                    else:
                        bv[:] = view
                elif to_pool:
                    view[do : do + n] = bv[bo : bo + n]
                else:
                    bv[bo : bo + n] = view[do : do + n]
            elif to_pool:  # across a page: as phys_copy copies it
                kern.phys_write(d, kern.phys_read(b, n))
            else:
                kern.phys_write(b, kern.phys_read(d, n))

    def _bufviews_max(self) -> int:
        """Callers' page views kept at most: twice the pool's pages (64 at least)."""
        return max(64, 2 * len(self.pages))

    def _release_bufviews(self) -> None:
        for v in self.bufviews.values():
            v.release()
        self.bufviews.clear()

    def unload(self) -> None:
        """The load is over: the pages stay with the map, granted."""
        self.dsts.clear()
        self.bufs.clear()
        self.lens.clear()

    def free(self) -> None:
        """Give the pages back (map destroy, after the grants were ended). A page the
        backend still maps is wired: the page allocator keeps it until it is let go."""
        self.unload()
        self._release_bufviews()
        for v in self.views:
            v.release()
        self.views.clear()
        for va, _pa in self.pages:
            self.kern.contigfree(va, PAGE_SIZE, M_BUSDMA_XEN)
        self.pages.clear()
        self.pas.clear()
        self.wsegs.clear()
