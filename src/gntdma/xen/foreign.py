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

    def free(self, host_addr: int) -> int:
        """Give back an address from :meth:`alloc`: 0, or EINVAL if it was not handed out."""
        pfn = host_addr >> PAGE_SHIFT
        if host_addr & ((1 << PAGE_SHIFT) - 1) != 0 or pfn not in self.in_use:
            return errno.EINVAL
        self.in_use.discard(pfn)
        self._free.append(pfn)
        return 0
