"""The generic bus_dma implementation's tags, maps, bounce zones and pages.

Part of :mod:`gntdma.sys._busdma_bounce` (which re-exports the public names), where
the theory of operation is told (FreeBSD x86 ``busdma_bounce.c``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from gntdma.sched import KernelPanic
from gntdma.sys._busdma_types import BusDmaMap, BusDmaTag

if TYPE_CHECKING:
    from gntdma.sys._busdma_impl import BusDmaImpl
    from gntdma.sys._kernel import Kernel

__all__ = [
    "BUS_DMA_COULD_BOUNCE",
    "BUS_DMA_MIN_ALLOC_COMP",
    "BounceMap",
    "BouncePage",
    "BounceTag",
    "BounceZone",
    "bounce_map",
    "bounce_tag",
]

#: bounce_flags of a tag.
BUS_DMA_COULD_BOUNCE: Final = 0x1
BUS_DMA_MIN_ALLOC_COMP: Final = 0x2


@dataclass(slots=True)
class BouncePage:
    vaddr: int
    busaddr: int
    offset: int = 0
    datacount: int = 0
    #: (pa, len) pieces of the client buffer this page stands for.
    src: list[tuple[int, int]] = field(default_factory=list)


@dataclass(eq=False, slots=True)
class BounceZone:
    name: str
    lowaddr: int
    alignment: int
    total_bpages: int = 0
    free_bpages: int = 0
    reserved_bpages: int = 0
    active_bpages: int = 0
    #: pages back from an unload but wired (a grant of them is still mapped)
    held_bpages: int = 0
    total_bounced: int = 0
    total_deferred: int = 0
    map_count: int = 0
    tag_refs: int = 0
    pages: deque[BouncePage] = field(default_factory=deque)  # free and reserved pages
    waiting: deque[BounceMap] = field(default_factory=deque)


class BounceTag(BusDmaTag):
    def __init__(self, kern: Kernel, impl: BusDmaImpl) -> None:
        super().__init__(kern, impl)
        self.bounce_flags = 0
        self.bounce_zone: BounceZone | None = None


class BounceMap(BusDmaMap):
    def __init__(self, dmat: BusDmaTag, flags: int) -> None:
        super().__init__(dmat, flags)
        self.bpages: list[BouncePage] = []
        self.pagesneeded = 0
        self.pagesreserved = 0
        self.whole_counted = False
        self.bounce_waiting = False
        self.dmamem_kind = ""
        self.dmamem_size = 0


def bounce_tag(dmat: BusDmaTag) -> BounceTag:
    """``dmat`` as a bounce tag (a panic if it is not one)."""
    if not isinstance(dmat, BounceTag):
        raise KernelPanic(f"bounce busdma: {dmat!r} is not a bounce tag")
    return dmat


def bounce_map(map: BusDmaMap) -> BounceMap:
    """``map`` as a bounce map (a panic if it is not one)."""
    if not isinstance(map, BounceMap):
        raise KernelPanic(f"bounce busdma: {map!r} is not a bounce map")
    return map
