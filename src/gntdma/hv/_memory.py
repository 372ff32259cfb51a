"""Pseudo-physical memory of a domain: one anonymous mmap, 4 KiB pages.

A domain's page frame numbers start at 0. A domain may have a second range
starting at 4 GiB (pfn 0x100000), as on a PC with a hole below 4 GiB, so that
guest code which must keep DMA below 32 bits (bounce buffering) meets real
high pages. Views handed out here are of the domain's *own* memory; another
domain reaches a page only through a grant map or copy in the hypervisor.

A new domain's memory is all zeros. The mapping of a destroyed domain is kept
for the next domain of the same size (the explorer builds the same host for
every schedule, and a fresh mapping costs a page fault for each page the domain
touches and its unmapping): the pages the old domain was handed views of are
zeroed first, and a mapping of which a page view is still alive is never
reused (it is left to the garbage collector, as before).
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Sequence
from typing import Final, final

from gntdma.abi.xen import PAGE_SHIFT, PAGE_SIZE

__all__ = ["HIGHMEM_START_PFN", "DomainMemory"]

#: First pfn of the range above 4 GiB.
HIGHMEM_START_PFN: Final = 0x100000

_ZERO_PAGE: Final = bytes(PAGE_SIZE)
#: Mappings kept per size, and in all (bytes of address space), for reuse.
_POOL_PER_SIZE: Final = 4
_POOL_MAX_BYTES: Final = 256 << 20
#: A mapping whose domain was handed more pages than this is unmapped, not zeroed.
_POOL_MAX_DIRTY: Final = 1024


class _MapPool:
    """Zeroed anonymous mappings of destroyed domains, by size."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._maps: dict[int, list[mmap.mmap]] = {}
        self._bytes = 0

    def take(self, size: int) -> mmap.mmap:
        with self._lock:
            maps = self._maps.get(size)
            if maps:
                self._bytes -= size
                return maps.pop()
        return mmap.mmap(-1, size)

    def give(self, size: int, m: mmap.mmap) -> bool:
        """Keep ``m`` (all zeros) for a later domain; False if the pool is full."""
        with self._lock:
            maps = self._maps.setdefault(size, [])
            if len(maps) >= _POOL_PER_SIZE or self._bytes + size > _POOL_MAX_BYTES:
                return False
            maps.append(m)
            self._bytes += size
            return True


_POOL: Final = _MapPool()


@final
class DomainMemory:
    """The pseudo-physical memory of one domain."""

    def __init__(self, low_pages: int, high_pages: int = 0) -> None:
        if low_pages <= 0 or high_pages < 0:
            raise ValueError("a domain needs at least one page of low memory")
        self.low_pages = low_pages
        self.high_pages = high_pages
        self.nr_pages = low_pages + high_pages
        self._size = self.nr_pages << PAGE_SHIFT
        self._map = _POOL.take(self._size)
        self._view = memoryview(self._map)
        #: Byte offsets of the pages views were handed out of (zeroed before reuse).
        self._dirty: set[int] = set()
        self._closed = False
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
        self._dirty.add(off)
        return self._view[off : off + PAGE_SIZE]

    def close(self) -> None:
        """Release the memory; with views still exported (a wedged host torn down
        after a deadlock) it is left to the garbage collector instead. A mapping
        with no view left goes, zeroed, to the next domain of its size."""
        if self._closed:
            return
        m = self._map
        try:
            self._view.release()
            m.resize(self._size)  # same size: BufferError while a page view is alive
        except BufferError:
            return
        except (OSError, SystemError, ValueError):  # no resize here: unmap
            self._closed = True
            m.close()
            return
        self._closed = True
        dirty = self._dirty
        if len(dirty) <= _POOL_MAX_DIRTY:
            for off in dirty:
                m[off : off + PAGE_SIZE] = _ZERO_PAGE
            if _POOL.give(self._size, m):
                return
        m.close()
