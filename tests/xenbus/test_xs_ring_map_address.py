"""xenstored maps a guest's store page at a host address of its own, as on Xen.

Rule (``xen/common/grant_table.c`` of Xen 4.17, ``map_grant_ref`` and
``unmap_common``; C xenstored maps through libxengnttab, which gives the
kernel an address of the process): a ``GNTMAP_host_map`` names the host
address the mapper chose, page-aligned and not 0; the hypervisor records it
in the maptrack entry, and the unmap names the same address and handle.
"""

from __future__ import annotations

from gntdma.toolstack.host import Host
from gntdma.xenstored._ring import MAP_ADDRESSES, XENSTORED_MAP_BASE, MapAddresses


def test_xenstored_maps_a_store_page_at_a_page_aligned_address_of_its_own(host: Host) -> None:
    g = host.create_guest("g", memory_mb=4)
    ring = host.xenstore.rings[g.domid]
    assert ring.handle is not None
    addr = ring.host_addr
    assert addr != 0 and addr % 4096 == 0 and addr >= XENSTORED_MAP_BASE
    assert addr in MAP_ADDRESSES.in_use
    mapping = host.hv.domains[0].maptrack.entries[ring.handle]
    assert mapping.host_addr == addr  # what the hypervisor recorded
    other = host.create_guest("h", memory_mb=4)
    assert host.xenstore.rings[other.domid].host_addr != addr


def test_xenstored_unmaps_the_store_page_at_the_address_it_mapped(host: Host) -> None:
    g = host.create_guest("g", memory_mb=4)
    ring = host.xenstore.rings[g.domid]
    addr, handle = ring.host_addr, ring.handle
    assert handle is not None
    host.destroy_guest(g)
    assert handle not in host.hv.domains[0].maptrack.entries  # the unmap succeeded
    assert addr not in MAP_ADDRESSES.in_use  # and the address is free again


def test_map_addresses_are_reused_only_after_they_are_freed() -> None:
    a = MapAddresses(base=0x10000, pages=2)
    first, second = a.alloc(), a.alloc()
    assert (first, second) == (0x10000, 0x11000)
    a.free(first)
    assert a.alloc() == first
