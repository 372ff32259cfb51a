"""netfront's shared-ring pages: one page per ring, granted to the backend for life.

Each ring is kernel memory loaded once into a one-segment map created with
``BUS_DMA_XEN_PREALLOC_REFS`` on a Xen tag naming the backend domain (as
blkfront's ring), so its grant reference is held until :func:`xn_ring_free`.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import final

from gntdma.sys import (
    BUS_DMA_NOWAIT,
    BUS_SPACE_MAXADDR,
    M_WAITOK,
    M_XENNETFRONT,
    M_ZERO,
    PAGE_MASK,
    PAGE_SIZE,
    BusDmaMap,
    BusDmaTag,
    Kernel,
    bus_dma_segment_t,
    bus_dma_tag_create,
    bus_dma_tag_destroy,
    bus_dmamap_create,
    bus_dmamap_destroy,
    bus_dmamap_load,
    bus_dmamap_unload,
)
from gntdma.xen.busdma import (
    BUS_DMA_XEN_DOMID_SHIFT,
    BUS_DMA_XEN_PREALLOC_REFS,
    xen_dmamap_get_grefs,
    xen_get_dma_tag,
)

__all__ = ["XnRing", "xn_ring_alloc", "xn_ring_free"]


@final
@dataclass(eq=False)
class XnRing:
    va: int
    dmat: BusDmaTag
    map: BusDmaMap
    ref: int

    @property
    def pages(self) -> list[memoryview]:
        return self.dmat.kern.kva_views(self.va, PAGE_SIZE)


def xn_ring_alloc(kern: Kernel, otherend_id: int, name: str) -> tuple[int, XnRing | None]:
    """A zeroed ring page granted (writable) to ``otherend_id``: (0, ring) or (errno, None)."""
    va = kern.malloc(PAGE_SIZE, M_XENNETFRONT, M_WAITOK | M_ZERO)
    error, dmat = bus_dma_tag_create(xen_get_dma_tag(kern), PAGE_SIZE, PAGE_SIZE,
                                     BUS_SPACE_MAXADDR, BUS_SPACE_MAXADDR, PAGE_SIZE, 1,
                                     PAGE_SIZE, otherend_id << BUS_DMA_XEN_DOMID_SHIFT,
                                     None, None)
    if error != 0 or dmat is None:
        kern.free(va, M_XENNETFRONT)
        return error, None
    dmat.name = name
    error, map_ = bus_dmamap_create(dmat, BUS_DMA_XEN_PREALLOC_REFS)
    if error != 0 or map_ is None:
        bus_dma_tag_destroy(dmat)
        kern.free(va, M_XENNETFRONT)
        return error, None
    map_.name = name
    got: list[int] = []

    def cb(_arg: object, segs: list[bus_dma_segment_t], nseg: int, err: int) -> None:
        got.append(err if err != 0 or (nseg == 1 and segs[0].ds_addr & PAGE_MASK == 0)
                   else errno.EFBIG)

    bus_dmamap_load(dmat, map_, va, PAGE_SIZE, cb, None, BUS_DMA_NOWAIT)
    error = got[0] if got else errno.EIO
    if error != 0:
        bus_dmamap_unload(dmat, map_)
        bus_dmamap_destroy(dmat, map_)
        bus_dma_tag_destroy(dmat)
        kern.free(va, M_XENNETFRONT)
        return error, None
    return 0, XnRing(va, dmat, map_, xen_dmamap_get_grefs(map_)[0])


def xn_ring_free(kern: Kernel, r: XnRing) -> None:
    """End the grant and free the page (the backend must no longer map it)."""
    bus_dmamap_unload(r.dmat, r.map)
    bus_dmamap_destroy(r.dmat, r.map)
    bus_dma_tag_destroy(r.dmat)
    kern.free(r.va, M_XENNETFRONT)
