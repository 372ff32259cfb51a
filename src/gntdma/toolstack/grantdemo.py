"""The grant-table part of ``gntdma run``: a guest grants, dom0 maps and copies.

Every claim is a check: the bytes dom0 sees are the guest's, a read-only
grant cannot be written, the table runs into ENOSPC and a free callback fires
when references come back, ending access fails while dom0 maps the page, and
nothing is left at the end.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from gntdma.abi.grant_table import (
    GNTCOPY_dest_gref,
    GNTCOPY_source_gref,
    GNTMAP_host_map,
    GNTMAP_readonly,
    GNTST_general_error,
    GNTST_okay,
    GnttabCopy,
    GnttabCopyPtr,
    GnttabMapGrantRef,
    GNTTABOP_copy,
    GNTTABOP_map_grant_ref,
    GNTTABOP_unmap_grant_ref,
    GnttabUnmapGrantRef,
)
from gntdma.abi.xen import DOMID_SELF, PAGE_SIZE
from gntdma.sched import random_u64
from gntdma.toolstack.host import Guest, Host
from gntdma.toolstack.report import Report
from gntdma.xen.gnttab import GnttabFreeCallback

__all__ = ["run_grant_demo"]


def _pattern(pfn: int, seed: int) -> bytes:
    """A page of bytes that names its frame, so a misplaced page shows."""
    head = f"pfn {pfn:#x} seed {seed} ".encode()
    body = bytes((pfn * 131 + i * 7 + seed) & 0xFF for i in range(PAGE_SIZE - len(head)))
    return head + body


def _map(host: Host, g: Guest, ref: int, readonly: bool) -> GnttabMapGrantRef:
    """Map ``ref`` in dom0 at a host address from dom0's foreign-page range."""
    hc = host.dom0.hc
    error, addr = hc.foreign.alloc()
    assert error == 0
    flags = GNTMAP_host_map | (GNTMAP_readonly if readonly else 0)
    _, res = hc.grant_table_op(GNTTABOP_map_grant_ref,
                               [GnttabMapGrantRef(host_addr=addr, flags=flags, ref=ref,
                                                  dom=g.domid)])
    r = res[0]
    assert isinstance(r, GnttabMapGrantRef)
    if r.status != GNTST_okay:
        hc.foreign.free(addr)
    return r


def _unmap(host: Host, mapped: GnttabMapGrantRef) -> int:
    """Unmap what :func:`_map` mapped, at its address, and free the address."""
    hc = host.dom0.hc
    _, res = hc.grant_table_op(GNTTABOP_unmap_grant_ref,
                               [GnttabUnmapGrantRef(host_addr=mapped.host_addr,
                                                    handle=mapped.handle)])
    r = res[0]
    assert isinstance(r, GnttabUnmapGrantRef)
    if r.status == GNTST_okay:
        hc.foreign.free(mapped.host_addr)
    return r.status


def run_grant_demo(host: Host, guest: Guest, report: Report, npages: int = 32,
                   log: Callable[[str], None] = print) -> None:
    """Run the grant-table checks between ``guest`` and dom0, recording each."""
    gt = guest.gnttab
    seed = random_u64() & 0xFFFF
    pfns: list[int] = []
    for _ in range(npages):
        pfn = guest.kernel.vm_page_alloc()
        assert pfn is not None
        guest.hc.own_page(pfn)[:] = _pattern(pfn, seed)
        pfns.append(pfn)
    refs: list[int] = []
    for i, pfn in enumerate(pfns):
        error, ref = gt.gnttab_grant_foreign_access(0, pfn, readonly=i % 2 == 1)
        if error != 0:
            report.check("grant pages to dom0", False, f"error {error}")
            return
        refs.append(ref)
    report.check("grant pages to dom0", True, f"{npages} pages, odd ones read-only")

    # dom0 maps the first half and checks every byte.
    half = npages // 2
    handles: list[GnttabMapGrantRef] = []
    bad = 0
    for i in range(half):
        r = _map(host, guest, refs[i], readonly=True)
        if r.status != GNTST_okay:
            bad += 1
            continue
        handles.append(r)
        if bytes(host.dom0.hc.mapped_page(r.handle)) != _pattern(pfns[i], seed):
            bad += 1
    report.check("dom0 maps and reads every byte", bad == 0,
                 f"{half} pages mapped, {bad} wrong")

    # dom0 copies the second half into its own pages.
    bad = 0
    dst = host.dom0.kernel.vm_page_alloc()
    assert dst is not None
    for i in range(half, npages):
        op = GnttabCopy(source=GnttabCopyPtr(u=refs[i], domid=guest.domid, offset=0),
                        dest=GnttabCopyPtr(u=dst, domid=DOMID_SELF, offset=0),
                        len=PAGE_SIZE, flags=GNTCOPY_source_gref)
        _, (c,) = host.dom0.hc.grant_table_op(GNTTABOP_copy, [op])
        assert isinstance(c, GnttabCopy)
        if c.status != GNTST_okay or bytes(host.dom0.hc.own_page(dst)) != _pattern(pfns[i],
                                                                                   seed):
            bad += 1
    report.check("dom0 grant-copies and reads every byte", bad == 0,
                 f"{npages - half} pages copied, {bad} wrong")

    # A read-only grant refuses writes: a writable map, a copy into it, a view write.
    ro = refs[1]
    rw_map = _map(host, guest, ro, readonly=False)
    op = GnttabCopy(source=GnttabCopyPtr(u=dst, domid=DOMID_SELF, offset=0),
                    dest=GnttabCopyPtr(u=ro, domid=guest.domid, offset=0),
                    len=16, flags=GNTCOPY_dest_gref)
    _, (cp,) = host.dom0.hc.grant_table_op(GNTTABOP_copy, [op])
    assert isinstance(cp, GnttabCopy)
    view_refused = False
    r = _map(host, guest, ro, readonly=True)
    try:
        host.dom0.hc.mapped_page(r.handle)[0:1] = b"X"
    except TypeError:
        view_refused = True
    _unmap(host, r)
    report.check(
        "writes through a read-only grant are refused",
        rw_map.status == GNTST_general_error and cp.status == GNTST_general_error
        and view_refused and bytes(guest.hc.own_page(pfns[1])) == _pattern(pfns[1], seed),
        f"map rw: {rw_map.status}, copy in: {cp.status}, write to view refused",
    )

    # Ending access while dom0 still maps the page fails, and succeeds after unmap.
    busy = gt.gnttab_end_foreign_access_ref(refs[0])
    st = _unmap(host, handles[0])
    after = gt.gnttab_end_foreign_access_ref(refs[0])
    report.check("end access fails while mapped, succeeds after unmap",
                 busy == 0 and st == GNTST_okay and after == 1,
                 f"while mapped: {busy}, after unmap: {after}")
    gt.gnttab_free_grant_reference(refs[0])
    for h in handles[1:]:
        _unmap(host, h)
    for ref in refs[1:]:
        if gt.gnttab_end_foreign_access_ref(ref) == 1:
            gt.gnttab_free_grant_reference(ref)

    # Run the table into ENOSPC; a free callback fires when references return.
    held = []
    while True:
        error, head = gt.gnttab_alloc_grant_references(256)
        if error != 0:
            break
        held.append(head)
    frames = gt.nr_frames
    if gt.free_count > 0:  # take the rest of the last frame too
        rest_error, head = gt.gnttab_alloc_grant_references(gt.free_count)
        if rest_error == 0:
            held.append(head)
    fired: list[str] = []
    cb = GnttabFreeCallback()
    gt.gnttab_request_free_callback(cb, lambda _a: fired.append(host.sched.curthread.name),
                                    None, 128)
    host.sched.yield_()
    before = list(fired)
    gt.gnttab_free_grant_references(held.pop().head)
    host.sched.run(until=lambda: bool(fired))
    report.check(
        "table runs into ENOSPC; free callback fires when refs return",
        error == errno.ENOSPC and frames == gt.max_frames and gt.free_count >= 128
        and before == [] and len(fired) == 1,
        f"ENOSPC at {frames} frames ({gt.statistics().peak_allocated} refs), "
        f"callback ran once on {fired[0] if fired else '-'}",
    )
    for head in held:
        gt.gnttab_free_grant_references(head.head)
    for pfn in pfns:
        guest.kernel.vm_page_free(pfn)
    host.dom0.kernel.vm_page_free(dst)
    log(f"grant demo: {npages} pages, {gt.nr_frames} grant frames, "
        f"peak {gt.statistics().peak_allocated} references")
