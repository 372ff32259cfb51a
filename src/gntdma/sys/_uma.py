"""malloc(9)'s small buckets: one-page slabs of power-of-two items (a tiny UMA).

Theory of operation
-------------------
Sizes up to ``PAGE_SIZE`` come from power-of-two buckets (16 bytes to 4 KiB),
carved from one-page slabs shared by all malloc types; an item is aligned to
its bucket size and never crosses a page. A bucket keeps its slabs that have
free items in a ``partial`` list and allocates from the last one. A slab whose
items are all free gives its page back.

A slab whose page is wired (another domain still maps a grant of it, DESIGN
section 4) hands out no item until the page is unwired: new data would land in
a page the other domain can still read and write. Such a slab is parked in
``held`` and goes back to its bucket's partial list when its page is unwired.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, final

from gntdma.sys._param import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from gntdma.sys._kernel import Kernel

__all__ = ["Slab", "SlabAllocator"]


@dataclass(slots=True)
class Slab:
    va: int
    pfn: int
    size: int
    nitems: int
    free: list[int]


@final
class SlabAllocator:
    """The bucket zones of one kernel."""

    def __init__(self, kern: Kernel) -> None:
        self.kern = kern
        self.partial: dict[int, list[Slab]] = {}  # bucket size -> slabs with free items
        self.slabs: dict[int, Slab] = {}  # vpn -> slab
        self.held: dict[int, Slab] = {}  # pfn -> slab parked while its page is wired

    def alloc(self, bucket: int) -> int:
        """An item of ``bucket`` bytes (its va), or 0 when no page is free."""
        k = self.kern
        partial = self.partial.setdefault(bucket, [])
        while partial and k.vm.is_wired(partial[-1].pfn):
            self._park(partial.pop())
        if not partial:
            pfn = k.vm.alloc()
            if pfn is None:
                return 0
            va = k.kva_alloc(1)
            k.pmap_qenter(va, [pfn])
            n = PAGE_SIZE // bucket
            slab = Slab(va, pfn, bucket, n, [va + i * bucket for i in range(n - 1, -1, -1)])
            self.slabs[va >> PAGE_SHIFT] = slab
            partial.append(slab)
        slab = partial[-1]
        item = slab.free.pop()
        if not slab.free:
            partial.pop()
        return item

    def free(self, va: int) -> None:
        k = self.kern
        slab = self.slabs[va >> PAGE_SHIFT]
        was_full = not slab.free
        slab.free.append(va)
        partial = self.partial[slab.size]
        parked = slab.pfn in self.held
        if len(slab.free) == slab.nitems:
            if parked:
                del self.held[slab.pfn]
            elif not was_full:
                partial.remove(slab)
            del self.slabs[va >> PAGE_SHIFT]
            k.pmap_qremove(slab.va, 1)
            k.kva_free(slab.va, 1)
            k.vm.free(slab.pfn)  # a wired page stays out of circulation until unwired
        elif was_full and not parked:
            if k.vm.is_wired(slab.pfn):
                self._park(slab)
            else:
                partial.append(slab)

    def _park(self, slab: Slab) -> None:
        self.held[slab.pfn] = slab
        self.kern.vm.on_unwired(slab.pfn, lambda: self._unpark(slab))

    def _unpark(self, slab: Slab) -> None:
        if self.held.get(slab.pfn) is slab:
            del self.held[slab.pfn]
            self.partial.setdefault(slab.size, []).append(slab)
