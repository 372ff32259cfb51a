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
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
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
    BouncePage,
    BusDmaTag,
    Kernel,
    bus_dma_segment_t,
    bus_dmamap_addseg,
    vm_addr_bound_ok,
)
from gntdma.xen.gnttab import GntTab

__all__ = ["PersistentPool"]

#: (physical address, length) pieces of a caller's buffer.
Pieces = list[tuple[int, int]]
_KINDS: Final = ("vaddr", "phys", "ma")


def _accessors(kern: Kernel, kind: str, a: int, ma: Sequence[int]
               ) -> tuple[Callable[[int], int], Callable[[int, int], Pieces]]:
    """The physical address at an offset of one buffer, and the pieces of a range of it."""
    if kind == "phys":
        return (lambda off: a + off), (lambda off, n: [(a + off, n)])

    def addr(off: int) -> int:
        if kind == "vaddr":
            return kern.pmap_kextract(a + off)
        o = a + off
        return (ma[o >> PAGE_SHIFT] << PAGE_SHIFT) | (o & PAGE_MASK)

    def pieces(off: int, n: int) -> Pieces:
        out: Pieces = []
        while n > 0:
            ln = min(n, PAGE_SIZE - ((a + off) & PAGE_MASK))
            out.append((addr(off), ln))
            off += ln
            n -= ln
        return out

    return addr, pieces


@final
class PersistentPool:
    """The pages of one persistent map and what the current load put on them."""

    __slots__ = ("active", "kern", "pages")

    def __init__(self, kern: Kernel) -> None:
        self.kern = kern
        #: (va, pa) of each pool page, in order; page i serves segment i of every load.
        self.pages: list[tuple[int, int]] = []
        #: The current load's pages, one per segment (pieces of the caller's buffer).
        self.active: list[BouncePage] = []

    def __len__(self) -> int:
        return len(self.pages)

    def grant(self, gt: GntTab, refs: list[int], granted: int, domid: int,
              nsegs: int) -> int:
        """Grant the pages of a load of ``nsegs`` segments that were never granted
        (``refs[i]`` grants page i; the first ``granted`` are granted already),
        writable: a persistent grant serves both directions. Returns the new count."""
        if len(self.active) != nsegs:
            raise KernelPanic(f"busdma_xen: {nsegs} segments on {len(self.active)} "
                              f"persistent pages")
        for i in range(granted, nsegs):
            gt.gnttab_grant_foreign_access_ref(refs[i], domid, self.pages[i][1] >> PAGE_SHIFT,
                                               False)
        return max(granted, nsegs)

    def _page(self, t: BusDmaTag, i: int) -> bool:
        """Whether pool page ``i`` exists, added now if needed (False: no memory)."""
        while len(self.pages) <= i:
            va = self.kern.contigmalloc(PAGE_SIZE, M_BUSDMA_XEN, M_NOWAIT, 0, t.lowaddr,
                                        PAGE_SIZE, 0)
            if va == 0:
                return False
            self.pages.append((va, self.kern.pmap_kextract(va)))
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
        addr_at, pieces_at = _accessors(self.kern, kind, a, ma)
        off = 0
        while off < buflen:
            cur = addr_at(off)
            sg = min(PAGE_SIZE - (cur & PAGE_MASK), buflen - off, t.maxsegsz)
            b = t.boundary
            if b != 0 and not vm_addr_bound_ok(cur, sg, b):
                sg = ((cur + b) & ~(b - 1)) - cur
            i = len(self.active)
            if not self._page(t, i):
                return errno.ENOMEM
            va, page = self.pages[i]
            pgoff = cur & PAGE_MASK
            if pgoff & (t.alignment - 1) != 0:
                pgoff = 0  # the page starts on the tag's alignment; the chunk fits from 0
            n = bus_dmamap_addseg(t, page + pgoff, sg, segs)
            if n == 0:
                break
            self.active.append(BouncePage(va, page, pgoff, n, pieces_at(off, n)))
            off += n
        return errno.EFBIG if off < buflen else 0

    def sync(self, op: int) -> None:
        """PREWRITE: caller's buffer -> pool pages; POSTREAD: pool pages -> caller's buffer."""
        kern = self.kern
        if op & BUS_DMASYNC_PREWRITE:
            for bp in self.active:
                if len(bp.src) == 1:
                    kern.phys_write(bp.busaddr + bp.offset, kern.phys_read(*bp.src[0]))
                else:
                    kern.phys_write(bp.busaddr + bp.offset,
                                    b"".join(kern.phys_read(pa, n) for pa, n in bp.src))
        if op & BUS_DMASYNC_POSTREAD:
            for bp in self.active:
                data = kern.phys_read(bp.busaddr + bp.offset, bp.datacount)
                pos = 0
                for pa, n in bp.src:
                    kern.phys_write(pa, data[pos : pos + n])
                    pos += n

    def unload(self) -> None:
        """The load is over: the pages stay with the map, granted."""
        self.active.clear()

    def free(self) -> None:
        """Give the pages back (map destroy, after the grants were ended). A page the
        backend still maps is wired: the page allocator keeps it until it is let go."""
        self.active.clear()
        for va, _pa in self.pages:
            self.kern.contigfree(va, PAGE_SIZE, M_BUSDMA_XEN)
        self.pages.clear()
