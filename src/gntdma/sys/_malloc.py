"""malloc(9) types, flags and per-type statistics.

A :class:`MallocType` is a name (``MALLOC_DEFINE``); it is global and
hashable. Statistics are kept per kernel, per type, by :class:`Kernel`: bytes
in use (the size of the bucket or of the pages that hold the allocations, as
FreeBSD's ``memuse``), allocations in use, total requests, frees and failures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, final

__all__ = [
    "M_BUSDMA",
    "M_BUSDMA_XEN",
    "M_DEVBUF",
    "M_GNTTAB",
    "M_KMEM",
    "M_MBUF",
    "M_MBUF_CLUSTER",
    "M_MBUF_JUMBO9",
    "M_MBUF_JUMBO16",
    "M_MBUF_JUMBOP",
    "M_NODUMP",
    "M_NOWAIT",
    "M_TEMP",
    "M_WAITOK",
    "M_XENBLOCKFRONT",
    "M_XENNETFRONT",
    "M_XENSTORE",
    "M_ZERO",
    "MallocType",
    "MallocTypeStats",
    "TypeCounters",
]

#: malloc(9) flags (``sys/malloc.h``).
M_NOWAIT: Final = 0x0001
M_WAITOK: Final = 0x0002
M_ZERO: Final = 0x0100
M_NODUMP: Final = 0x0800


@final
@dataclass(frozen=True, slots=True)
class MallocType:
    """A malloc type (``MALLOC_DEFINE(M_FOO, "foo", "description")``)."""

    name: str
    desc: str = ""

    def __repr__(self) -> str:
        return f"M[{self.name}]"


M_DEVBUF: Final = MallocType("devbuf", "device driver memory")
M_TEMP: Final = MallocType("temp", "misc temporary data buffers")
M_BUSDMA: Final = MallocType("busdma", "busdma metadata and bounce pages")
M_BUSDMA_XEN: Final = MallocType("busdma_xen", "Xen grant-table busdma")
M_MBUF: Final = MallocType("mbuf", "mbufs")
M_MBUF_CLUSTER: Final = MallocType("mbuf_cluster", "2 KiB mbuf clusters")
M_MBUF_JUMBOP: Final = MallocType("mbuf_jumbo_page", "page-size jumbo clusters")
M_MBUF_JUMBO9: Final = MallocType("mbuf_jumbo_9k", "9 KiB jumbo clusters")
M_MBUF_JUMBO16: Final = MallocType("mbuf_jumbo_16k", "16 KiB jumbo clusters")
M_KMEM: Final = MallocType("kmem", "kmem_alloc_attr/kmem_alloc_contig pages")
M_GNTTAB: Final = MallocType("gnttab", "grant table")
M_XENSTORE: Final = MallocType("xenstore", "xenstore client")
M_XENBLOCKFRONT: Final = MallocType("xbd", "Xen block front driver data")
M_XENNETFRONT: Final = MallocType("netfront", "Xen network front driver data")


@dataclass(frozen=True, slots=True)
class MallocTypeStats:
    """``vmstat -m`` for one type in one kernel."""

    name: str
    memuse: int  #: bytes in use
    inuse: int  #: allocations in use
    requests: int  #: successful allocations ever
    frees: int
    failures: int  #: M_NOWAIT allocations that returned 0
    maxused: int  #: high-water mark of memuse


@dataclass(slots=True)
class TypeCounters:
    """Per-type counters a kernel keeps (what :class:`MallocTypeStats` snapshots)."""

    memuse: int = 0
    inuse: int = 0
    requests: int = 0
    frees: int = 0
    failures: int = 0
    maxused: int = 0

    def snapshot(self, name: str) -> MallocTypeStats:
        return MallocTypeStats(name, self.memuse, self.inuse, self.requests, self.frees,
                               self.failures, self.maxused)
