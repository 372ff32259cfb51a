"""Pseudo-physical memory of a domain: one anonymous mmap, 4 KiB pages.

A domain's page frame numbers start at 0. A domain may have a second range
starting at 4 GiB (pfn 0x100000), as on a PC with a hole below 4 GiB, so that
guest code which must keep DMA below 32 bits (bounce buffering) meets real
high pages. Views handed out here are of the domain's *own* memory; another
domain reaches a page only through a grant map or copy in the hypervisor.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from typing import Final, final

from gntdma.abi.xen import PAGE_SHIFT, PAGE_SIZE

__all__ = ["HIGHMEM_START_PFN", "DomainMemory"]

#: First pfn of the range above 4 GiB.
HIGHMEM_START_PFN: Final = 0x100000


@final
class DomainMemory:
    """The pseudo-physical memory of one domain."""

    def __init__(self, low_pages: int, high_pages: int = 0) -> None:
        if low_pages <= 0 or high_pages < 0:
            raise ValueError("a domain needs at least one page of low memory")
        self.low_pages = low_pages
        self.high_pages = high_pages
        self.nr_pages = low_pages + high_pages
        self._map = mmap.mmap(-1, self.nr_pages << PAGE_SHIFT)
        self._view = memoryview(self._map)
        r: list[tuple[int, int]] = [(0, low_pages)]
        if high_pages > 0:
            r.append((HIGHMEM_START_PFN, high_pages))
        self.ranges: Sequence[tuple[int, int]] = tuple(r)

    def valid_pfn(self, pfn: int) -> bool:
        if 0 <= pfn < self.low_pages:
            return True
        return HIGHMEM_START_PFN <= pfn < HIGHMEM_START_PFN + self.high_pages

    def _offset(self, pfn: int) -> int:
        if 0 <= pfn < self.low_pages:
            return pfn << PAGE_SHIFT
        if HIGHMEM_START_PFN <= pfn < HIGHMEM_START_PFN + self.high_pages:
            return (self.low_pages + pfn - HIGHMEM_START_PFN) << PAGE_SHIFT
        raise ValueError(f"pfn {pfn:#x} is not in this domain's memory")

    def page(self, pfn: int) -> memoryview:
        """A writable view of one of the domain's own pages."""
        if 0 <= pfn < self.low_pages:  # the common case, without the call
            off = pfn << PAGE_SHIFT
        else:
            off = self._offset(pfn)
        return self._view[off : off + PAGE_SIZE]

    def close(self) -> None:
        """Release the memory; with views still exported (a wedged host torn down
        after a deadlock) it is left to the garbage collector instead."""
        try:
            self._view.release()
            self._map.close()
        except BufferError:
            pass
