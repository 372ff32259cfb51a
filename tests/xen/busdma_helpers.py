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
from gntdma.xen.hypercall import Hypercalls

PAGE = 4096

#: (mapping domain, handle) -> the host address its map was given.
_HOST_ADDRS: dict[tuple[int, int], int] = {}


def hc_map(hc: Hypercalls, dom: int, ref: int, flags: int) -> GnttabMapGrantRef:
    """Map ``dom``'s ``ref`` at a host address from the mapper's foreign-page range."""
    error, addr = hc.foreign.alloc()
    assert error == 0
    _, (r,) = hc.grant_table_op(GNTTABOP_map_grant_ref,
                                [GnttabMapGrantRef(host_addr=addr, flags=flags, ref=ref,
                                                   dom=dom)])
    assert isinstance(r, GnttabMapGrantRef)
    if r.status == GNTST_okay:
        _HOST_ADDRS[hc.domid, r.handle] = addr
    else:
        hc.foreign.free(addr)
    return r


def hc_unmap(hc: Hypercalls, handle: int) -> int:
    """Unmap ``handle`` at the address :func:`hc_map` gave it, and free the address."""
    addr = _HOST_ADDRS.get((hc.domid, handle), 0)
    _, (u,) = hc.grant_table_op(GNTTABOP_unmap_grant_ref,
                                [GnttabUnmapGrantRef(host_addr=addr, handle=handle)])
    assert isinstance(u, GnttabUnmapGrantRef)
    if u.status == GNTST_okay:
        del _HOST_ADDRS[hc.domid, handle]
        hc.foreign.free(addr)
    return u.status


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
    r = hc_map(host.dom0.hc, g.domid, ref, flags)
    if r.status != GNTST_okay:
        return r.status, b""
    view = host.dom0.hc.mapped_page(r.handle)
    off = seg.ds_addr & (PAGE - 1)
    data = bytes(view[off : off + seg.ds_len])
    assert hc_unmap(host.dom0.hc, r.handle) == GNTST_okay
    return r.status, data


# -- additions for the state machine, seed and hazard tests ---------------------------------

FOUR_GIB = 1 << 32


def xen_impl(g: Guest) -> Any:
    """The guest kernel's busdma_xen implementation (a ``XenDmaImpl``)."""
    from gntdma.sys import kernel_state
    from gntdma.xen.busdma import XenDmaImpl

    i = kernel_state(g.kernel).impls["xen"]
    assert isinstance(i, XenDmaImpl)
    return i


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 31 + seed * 7 + (i >> 8)) & 0xFF for i in range(n))


def peer_map(peer: Guest, g: Guest, ref: int, writable: bool) -> tuple[int, int]:
    """``peer`` maps ``g``'s grant ``ref`` and keeps it: (GNTST status, handle)."""
    flags = GNTMAP_host_map | (0 if writable else GNTMAP_readonly)
    r = hc_map(peer.hc, g.domid, ref, flags)
    return r.status, r.handle


def peer_unmap(peer: Guest, handle: int) -> None:
    assert hc_unmap(peer.hc, handle) == GNTST_okay


def peer_read(peer: Guest, g: Guest, ref: int, seg: bus_dma_segment_t,
              writable: bool = False) -> tuple[int, bytes]:
    """Like :func:`backend_read`, with any domain as the backend."""
    status, handle = peer_map(peer, g, ref, writable)
    if status != GNTST_okay:
        return status, b""
    view = peer.hc.mapped_page(handle)
    off = seg.ds_addr & (PAGE - 1)
    data = bytes(view[off : off + seg.ds_len])
    peer_unmap(peer, handle)
    return status, data


def check_map_grants(peer: Guest, g: Guest, map_: Any, data: bytes, ro: bool,
                     others: tuple[Guest, ...] = ()) -> list[int]:
    """Each ref of ``map_`` grants its segment's frame to ``peer`` with the right flag,
    ``peer`` reads exactly ``data`` through them (and cannot map a read-only one
    writable), and no domain of ``others`` can map them. Returns the refs."""
    from gntdma.abi.grant_table import GTF_permit_access, GTF_readonly
    from gntdma.xen.busdma import xen_dmamap_get_grefs

    segs = list(map_.dm_segs)
    refs = xen_dmamap_get_grefs(map_)
    assert len(refs) == len(segs) and len(set(refs)) == len(refs), (refs, segs)
    got = []
    for ref, seg in zip(refs, segs, strict=True):
        assert (seg.ds_addr & (PAGE - 1)) + seg.ds_len <= PAGE, seg  # never crosses a page
        want = GTF_permit_access | (GTF_readonly if ro else 0)
        assert g.gnttab.entry(ref) == (want, peer.domid, seg.ds_addr >> 12), (ref, seg)
        status, chunk = peer_read(peer, g, ref, seg, writable=not ro)
        assert status == GNTST_okay, (ref, status)
        got.append(chunk)
        if ro:
            assert peer_map(peer, g, ref, writable=True)[0] != GNTST_okay
        for other in others:
            assert peer_map(other, g, ref, writable=False)[0] != GNTST_okay
    assert b"".join(got) == data
    return refs


def hold_refs(g: Guest, leave: int) -> list[int]:
    """Take every reference the table can ever have but ``leave``; the chain heads."""
    gt = g.gnttab
    heads: list[int] = []
    while True:
        error, h = gt.gnttab_alloc_grant_references(64)
        if error != 0:
            break
        heads.append(h.head)
    if gt.free_count > leave:
        error, h = gt.gnttab_alloc_grant_references(gt.free_count - leave)
        assert error == 0
        heads.append(h.head)
    assert gt.free_count == leave
    return heads


def release_refs(g: Guest, heads: list[int]) -> None:
    for h in heads:
        g.gnttab.gnttab_free_grant_references(h)
    heads.clear()


def high_kbuf(k: Kernel, npages: int) -> int:
    """Kernel memory of ``npages`` pages, every one above 4 GiB (free with ``kmem_free``)."""
    from gntdma.sys import BUS_SPACE_MAXADDR_ANY, M_WAITOK

    va = k.kmem_alloc_attr(npages * PAGE, M_WAITOK, FOUR_GIB, BUS_SPACE_MAXADDR_ANY)
    assert va != 0
    assert all(k.pmap_kextract(va + i * PAGE) >= FOUR_GIB for i in range(npages))
    return va


def settle(host: Host) -> None:
    """Let every runnable kernel thread (taskqueue_swi: deferred loads) run."""
    for _ in range(4):
        host.sched.yield_()


def page_array(k: Kernel, data: bytes, offset: int = 0, *, high: bool | None = None) -> list[int]:
    """Physical pages (pfns, no kernel mapping) holding ``data`` from ``offset`` into the
    first: an unmapped bio's ``bio_ma``. ``high``: all above 4 GiB (True), all below
    (False), or wherever the allocator puts them (None). Free with ``free_pages``."""
    from gntdma.sys import BUS_SPACE_MAXADDR_ANY, M_WAITOK

    n = (offset + len(data) + PAGE - 1) // PAGE
    low, top = ((FOUR_GIB, BUS_SPACE_MAXADDR_ANY) if high
                else (0, FOUR_GIB - 1) if high is False else (0, BUS_SPACE_MAXADDR_ANY))
    pfns = []
    for _ in range(n):
        pfn = k.vm_page_alloc(M_WAITOK, low, top)
        assert pfn is not None
        pfns.append(pfn)
    pos, off = 0, offset
    for pfn in pfns:
        ln = min(len(data) - pos, PAGE - off)
        k.phys_write((pfn << 12) + off, data[pos : pos + ln])
        pos += ln
        off = 0
    return pfns


def free_pages(k: Kernel, pfns: list[int]) -> None:
    for pfn in pfns:
        k.vm_page_free(pfn)
