"""The kernel's range of host addresses for foreign pages (gntdma.xen.foreign).

Like FreeBSD's xenmem_alloc (sys/dev/xen/bus/xenpv.c) and Linux's
xen_alloc_unpopulated_pages (drivers/xen/unpopulated-alloc.c): page-aligned
addresses of physical space with no RAM behind it, handed out and freed.
"""

from __future__ import annotations

import errno

from gntdma.abi.grant_table import (
    GNTMAP_host_map,
    GNTST_okay,
    GnttabMapGrantRef,
    GNTTABOP_map_grant_ref,
    GNTTABOP_unmap_grant_ref,
    GnttabUnmapGrantRef,
)
from gntdma.toolstack.host import Host
from gntdma.xen.foreign import FOREIGN_FIRST_PFN, ForeignPages


def test_foreign_addresses_are_page_aligned_unique_and_not_ram(host: Host) -> None:
    g = host.create_guest("g", memory_mb=8)
    fp = ForeignPages()
    addrs = []
    for _ in range(100):
        error, addr = fp.alloc()
        assert error == 0
        addrs.append(addr)
    assert len(set(addrs)) == 100
    assert all(a & 0xFFF == 0 and a >= FOREIGN_FIRST_PFN << 12 for a in addrs)
    assert not any(g.domain.memory.valid_pfn(a >> 12) for a in addrs)
    assert not any(host.dom0.domain.memory.valid_pfn(a >> 12) for a in addrs)


def test_foreign_address_freed_is_reused_and_double_free_refused() -> None:
    fp = ForeignPages(first_pfn=0x5000, nr_pages=2)
    e1, a1 = fp.alloc()
    e2, a2 = fp.alloc()
    assert (e1, e2) == (0, 0) and a1 != a2
    assert fp.alloc() == (errno.ENOMEM, 0)
    assert fp.free(a1) == 0
    assert fp.free(a1) == errno.EINVAL  # not handed out any more
    assert fp.free(a2 + 8) == errno.EINVAL  # not page-aligned
    assert fp.alloc() == (0, a1)


def test_dom0_maps_a_grant_at_an_address_of_its_range(host: Host) -> None:
    g = host.create_guest("g")
    error, ref = g.gnttab.gnttab_grant_foreign_access(0, 3, False)
    assert error == 0
    hc = host.dom0.hc
    error, addr = hc.foreign.alloc()
    assert error == 0
    _, (r,) = hc.grant_table_op(GNTTABOP_map_grant_ref,
                                [GnttabMapGrantRef(host_addr=addr, flags=GNTMAP_host_map,
                                                   ref=ref, dom=g.domid)])
    assert isinstance(r, GnttabMapGrantRef) and r.status == GNTST_okay
    _, (u,) = hc.grant_table_op(GNTTABOP_unmap_grant_ref,
                                [GnttabUnmapGrantRef(host_addr=addr, handle=r.handle)])
    assert isinstance(u, GnttabUnmapGrantRef) and u.status == GNTST_okay
    assert hc.foreign.free(addr) == 0
    assert g.gnttab.gnttab_end_foreign_access_ref(ref) == 1
    g.gnttab.gnttab_free_grant_reference(ref)
