"""Addresses for foreign pages: where a guest kernel puts the grants it maps.

A translated domain maps a grant at a guest-physical address of its own choice
(``host_addr``, a gfn in its physmap; see :mod:`gntdma.hv._grantops`), and that
address must have no RAM behind it. Kernels keep a range of the physical
address space for it: FreeBSD's ``xenmem_alloc`` (``sys/dev/xen/bus/xenpv.c``)
hands out page-aligned pieces of unused physical space above RAM, Linux's
``xen_alloc_unpopulated_pages`` (``drivers/xen/unpopulated-alloc.c``, behind
``gnttab_alloc_pages``) takes them from an iomem resource it reserves. gntdma's
kernels take them from :data:`FOREIGN_FIRST_PFN`, above every domain's RAM
(``gntdma.hv.DomainMemory``: low pages from 0, high ones from 4 GiB).

:class:`ForeignPages` is that allocator: ``alloc`` returns ``(error, host_addr)``
(``ENOMEM`` when the range is used up), ``free`` gives an address back
(``EINVAL`` for one not handed out). A freed address is reused first.
"""

from __future__ import annotations

import errno
from typing import Final, final

from gntdma.abi.xen import PAGE_SHIFT

__all__ = ["FOREIGN_FIRST_PFN", "FOREIGN_NR_PAGES", "ForeignPages"]

#: First gfn of the range for foreign pages (64 GiB).
FOREIGN_FIRST_PFN: Final = 0x1000000
#: Pages in the range: as many as a default maptrack table has handles (1024 * 256).
FOREIGN_NR_PAGES: Final = 0x40000
_PAGE_MASK: Final = (1 << PAGE_SHIFT) - 1
#: pfn -> its address, address -> its pfn, as C calls for map().
_pfn_addr: Final = PAGE_SHIFT.__rlshift__
_addr_pfn: Final = PAGE_SHIFT.__rrshift__


@final
class ForeignPages:
    """Page-aligned host addresses for foreign mappings, from one range of gfns."""

    __slots__ = ("_free", "_next", "first_pfn", "in_use", "nr_pages")

    def __init__(self, first_pfn: int = FOREIGN_FIRST_PFN,
                 nr_pages: int = FOREIGN_NR_PAGES) -> None:
        self.first_pfn = first_pfn
        self.nr_pages = nr_pages
        self.in_use: set[int] = set()
        self._free: list[int] = []
        self._next = first_pfn

    def alloc(self) -> tuple[int, int]:
        """One page's address: (0, host_addr), or (ENOMEM, 0)."""
        if self._free:
            pfn = self._free.pop()
        elif self._next < self.first_pfn + self.nr_pages:
            pfn = self._next
            self._next += 1
        else:
            return errno.ENOMEM, 0
        self.in_use.add(pfn)
        return 0, pfn << PAGE_SHIFT

    def alloc_many(self, n: int) -> tuple[int, list[int]]:
        """``n`` addresses, those ``n`` calls of :meth:`alloc` would give, in order:
        (0, addresses), or (ENOMEM, []) with none taken if the range has fewer left."""
        free = self._free
        fresh = max(0, n - len(free))
        if self._next + fresh > self.first_pfn + self.nr_pages:
            return errno.ENOMEM, []
        cut = len(free) - min(n, len(free))  # alloc pops the most recently freed first
        pfns = free[cut:][::-1]
        del free[cut:]
        pfns.extend(range(self._next, self._next + fresh))
        self._next += fresh
        self.in_use.update(pfns)
        return 0, list(map(_pfn_addr, pfns))

    def free_many(self, addrs: list[int]) -> int:
        """:meth:`free` of each address, in order: 0, or EINVAL if one was not handed out
        (the others are freed)."""
        in_use, free = self.in_use, self._free
        pfns = list(map(_addr_pfn, addrs))
        if (not any(map(_PAGE_MASK.__and__, addrs)) and len(set(pfns)) == len(pfns)
                and in_use.issuperset(pfns)):  # each handed out once: all go back
            in_use.difference_update(pfns)
            free.extend(pfns)
            return 0
        error = 0
        for host_addr in addrs:
            pfn = host_addr >> PAGE_SHIFT
            if host_addr & _PAGE_MASK != 0 or pfn not in in_use:
                error = errno.EINVAL
                continue
            in_use.discard(pfn)
            free.append(pfn)
        return error

    def free(self, host_addr: int) -> int:
        """Give back an address from :meth:`alloc`: 0, or EINVAL if it was not handed out."""
        pfn = host_addr >> PAGE_SHIFT
        if host_addr & ((1 << PAGE_SHIFT) - 1) != 0 or pfn not in self.in_use:
            return errno.EINVAL
        self.in_use.discard(pfn)
        self._free.append(pfn)
        return 0
