"""Helpers for busdma_xen tests: a driver-like tag, buffers, and dom0 checking grants."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gntdma.abi.grant_table import (
    GNTMAP_host_map,
    GNTMAP_readonly,
    GNTST_okay,
    GnttabMapGrantRef,
    GNTTABOP_map_grant_ref,
    GNTTABOP_unmap_grant_ref,
    GnttabUnmapGrantRef,
)
from gntdma.sched import Mutex
from gntdma.sys import (
    BUS_SPACE_MAXADDR,
    BusDmaTag,
    Kernel,
    bus_dma_segment_t,
    bus_dma_tag_create,
    busdma_lock_mutex,
)
from gntdma.toolstack.host import Guest, Host
from gntdma.xen.busdma import BUS_DMA_XEN_DOMID_SHIFT, xen_get_dma_tag

PAGE = 4096


@dataclass
class Loads:
    """Records client callbacks: (segs, nseg, error, lock held?)."""

    lock: Mutex
    calls: list[tuple[list[bus_dma_segment_t], int, int, bool]] = field(default_factory=list)

    def cb(self, arg: Any, segs: list[bus_dma_segment_t], nseg: int, error: int) -> None:
        self.calls.append((segs, nseg, error, self.lock.owner is not None))


def driver_tag(g: Guest, lock: Mutex, *, nsegments: int = 11, maxsize: int = 11 * PAGE,
               alignment: int = 512, lowaddr: int = BUS_SPACE_MAXADDR,
               backend: int = 0) -> BusDmaTag:
    error, tag = bus_dma_tag_create(
        xen_get_dma_tag(g.kernel), alignment, PAGE, lowaddr, BUS_SPACE_MAXADDR, maxsize,
        nsegments, PAGE, backend << BUS_DMA_XEN_DOMID_SHIFT, busdma_lock_mutex, lock)
    assert error == 0 and tag is not None
    return tag


def kbuf(k: Kernel, data: bytes, offset: int = 0) -> int:
    """Kernel memory holding ``data`` at ``offset`` into a fresh (scattered) allocation."""
    from gntdma.sys import M_DEVBUF, M_WAITOK

    va = k.malloc(len(data) + offset, M_DEVBUF, M_WAITOK)
    k.kva_write(va + offset, data)
    return va + offset


def backend_read(host: Host, g: Guest, ref: int, seg: bus_dma_segment_t,
                 writable: bool = False) -> tuple[int, bytes]:
    """dom0 maps ``ref`` and reads the segment's bytes; (GNTST status, bytes)."""
    flags = GNTMAP_host_map | (0 if writable else GNTMAP_readonly)
    _, (r,) = host.dom0.hc.grant_table_op(GNTTABOP_map_grant_ref,
                                          [GnttabMapGrantRef(flags=flags, ref=ref, dom=g.domid)])
    assert isinstance(r, GnttabMapGrantRef)
    if r.status != GNTST_okay:
        return r.status, b""
    view = host.dom0.hc.mapped_page(r.handle)
    off = seg.ds_addr & (PAGE - 1)
    data = bytes(view[off : off + seg.ds_len])
    _, (u,) = host.dom0.hc.grant_table_op(GNTTABOP_unmap_grant_ref,
                                          [GnttabUnmapGrantRef(handle=r.handle)])
    assert isinstance(u, GnttabUnmapGrantRef) and u.status == GNTST_okay
    return r.status, data
