"""The bus_dma part of ``gntdma run``: a load deferred on a full grant table.

A driver thread of the guest loads a buffer through a Xen tag while the grant
table is full: the load returns EINPROGRESS. Another thread frees references;
the grant-table free callback completes the load on taskqueue_swi under the
driver's lock, and the backend (dom0) maps each reference and reads the bytes.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from gntdma.abi.grant_table import (
    GNTMAP_host_map,
    GNTMAP_readonly,
    GNTST_okay,
    GnttabMapGrantRef,
    GNTTABOP_map_grant_ref,
    GNTTABOP_unmap_grant_ref,
    GnttabUnmapGrantRef,
)
from gntdma.abi.xen import PAGE_MASK, PAGE_SIZE
from gntdma.sched import Mutex, mtx_lock, mtx_unlock
from gntdma.sys import (
    BUS_DMA_WAITOK,
    BUS_DMASYNC_POSTWRITE,
    BUS_DMASYNC_PREWRITE,
    BUS_SPACE_MAXADDR,
    M_DEVBUF,
    M_WAITOK,
    bus_dma_segment_t,
    bus_dma_tag_create,
    bus_dma_tag_destroy,
    bus_dmamap_create,
    bus_dmamap_destroy,
    bus_dmamap_load,
    bus_dmamap_sync,
    bus_dmamap_unload,
    busdma_lock_mutex,
)
from gntdma.toolstack.host import Guest, Host
from gntdma.toolstack.report import Report
from gntdma.xen.busdma import (
    BUS_DMA_XEN_DOMID_SHIFT,
    BUS_DMA_XEN_RO,
    xen_dmamap_get_grefs,
    xen_get_dma_tag,
)
from gntdma.xen.gnttab import GrantRefHead

__all__ = ["run_deferred_load_demo"]

NPAGES = 8


def run_deferred_load_demo(host: Host, guest: Guest, report: Report,
                           log: Callable[[str], None] = print) -> None:
    """Run the deferred-load checks; record them in ``report``."""
    k, gt = guest.kernel, guest.gnttab
    lock = Mutex("xbd_io")
    error, tag = bus_dma_tag_create(
        xen_get_dma_tag(k), 512, PAGE_SIZE, BUS_SPACE_MAXADDR, BUS_SPACE_MAXADDR,
        NPAGES * PAGE_SIZE, NPAGES, PAGE_SIZE, 0 << BUS_DMA_XEN_DOMID_SHIFT,
        busdma_lock_mutex, lock)
    assert error == 0 and tag is not None
    error, dmamap = bus_dmamap_create(tag, 0)
    assert error == 0 and dmamap is not None
    data = bytes((i * 7 + 3) & 0xFF for i in range(NPAGES * PAGE_SIZE - 1000))
    buf = k.malloc(len(data), M_DEVBUF, M_WAITOK)
    k.kva_write(buf, data)

    # Fill the grant table: every reference it can ever have is taken.
    held: list[GrantRefHead] = []
    while True:
        err, head = gt.gnttab_alloc_grant_references(64)
        if err != 0:
            break
        held.append(head)
    if gt.free_count > 0:
        err, head = gt.gnttab_alloc_grant_references(gt.free_count)
        if err == 0:
            held.append(head)
    full = gt.free_count == 0 and gt.nr_frames == gt.max_frames

    segs_seen: list[tuple[list[bus_dma_segment_t], int, str, bool]] = []
    rv: list[int] = []

    def callback(_arg: object, segs: list[bus_dma_segment_t], nseg: int, err: int) -> None:
        segs_seen.append((segs, err, host.sched.curthread.name, lock.owner is not None))

    def driver() -> None:
        mtx_lock(lock)
        rv.append(bus_dmamap_load(tag, dmamap, buf, len(data), callback, None,
                                  BUS_DMA_WAITOK | BUS_DMA_XEN_RO))
        mtx_unlock(lock)

    def completions() -> None:
        # An I/O completion elsewhere gives references back.
        gt.gnttab_free_grant_references(held.pop().head)

    host.sched.call(driver, name=f"{guest.name}/driver")
    deferred_first = rv == [errno.EINPROGRESS] and segs_seen == []
    host.sched.call(completions, name=f"{guest.name}/intr")
    host.sched.run(until=lambda: bool(segs_seen))
    completed = len(segs_seen) == 1 and segs_seen[0][1] == 0
    report.check(
        "a sleepable load defers on a full grant table",
        full and deferred_first,
        f"table full at {gt.nr_frames} frames; bus_dmamap_load returned "
        f"{errno.errorcode.get(rv[0], rv[0]) if rv else '-'}",
    )
    where = segs_seen[0][2] if segs_seen else "-"
    report.check(
        "the deferred load completes once after references are freed",
        completed and where.endswith("/swi") and segs_seen[0][3],
        f"callback ran once on {where} with the driver lock held",
    )

    # The backend maps each reference and reads the granted bytes.
    seen = b""
    refs = xen_dmamap_get_grefs(dmamap)
    mtx_lock(lock)
    bus_dmamap_sync(tag, dmamap, BUS_DMASYNC_PREWRITE)
    mtx_unlock(lock)
    ok_maps = 0
    hc = host.dom0.hc
    for ref, seg in zip(refs, dmamap.dm_segs, strict=True):
        error, addr = hc.foreign.alloc()
        assert error == 0
        op = GnttabMapGrantRef(host_addr=addr, flags=GNTMAP_host_map | GNTMAP_readonly,
                               ref=ref, dom=guest.domid)
        _, (r,) = hc.grant_table_op(GNTTABOP_map_grant_ref, [op])
        assert isinstance(r, GnttabMapGrantRef)
        if r.status != GNTST_okay:
            hc.foreign.free(addr)
            continue
        ok_maps += 1
        off = seg.ds_addr & PAGE_MASK
        seen += bytes(hc.mapped_page(r.handle)[off : off + seg.ds_len])
        hc.grant_table_op(GNTTABOP_unmap_grant_ref,
                          [GnttabUnmapGrantRef(host_addr=addr, handle=r.handle)])
        hc.foreign.free(addr)
    report.check("the backend reads the granted bytes", seen == data and ok_maps == len(refs),
                 f"{len(refs)} grant refs, {len(seen)} bytes, "
                 f"{'equal' if seen == data else 'DIFFERENT'}")
    mtx_lock(lock)
    bus_dmamap_sync(tag, dmamap, BUS_DMASYNC_POSTWRITE)
    bus_dmamap_unload(tag, dmamap)
    mtx_unlock(lock)
    for head in held:
        gt.gnttab_free_grant_references(head.head)
    bus_dmamap_destroy(tag, dmamap)
    bus_dma_tag_destroy(tag)
    k.free(buf, M_DEVBUF)
    log(f"deferred load: {len(refs)} segments granted after the table was full")
