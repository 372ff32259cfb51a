"""The views of several host mappings at once (``Hypervisor.mapped_pages``).

A backend that maps a request's grants in one hypercall takes the views of all
of them at once; each must be the page ``mapped_page`` gives for its handle,
read-only for a read-only map, and a handle without a host mapping (never
mapped, or its host half gone) is refused as ``mapped_page`` refuses it.
"""

from __future__ import annotations

import pytest
from hv_grant_helpers import grant, map_, setup, unmap

from gntdma.abi.grant_table import GNTMAP_host_map, GNTMAP_readonly, GNTST_okay, GTF_permit_access
from gntdma.hv import Domain, Hypervisor


def test_mapped_pages_gives_each_handle_its_page_in_order(hv: Hypervisor, dom0: Domain,
                                                          guest: Domain) -> None:
    setup(hv, guest)
    maps = []
    for i, ref in enumerate((8, 9, 10)):
        guest.memory.page(20 + i)[:1] = bytes([i + 1])
        grant(hv, guest, ref, 0, 20 + i, GTF_permit_access)
        flags = GNTMAP_host_map | (GNTMAP_readonly if ref == 9 else 0)
        maps.append(map_(hv, dom0, guest.domid, ref, flags))
    assert all(m.status == GNTST_okay for m in maps)
    handles = [m.handle for m in reversed(maps)]
    views = hv.mapped_pages(0, handles)
    assert [bytes(v[:1]) for v in views] == [b"\x03", b"\x02", b"\x01"]
    assert [v.readonly for v in views] == [False, True, False]
    assert [bytes(v) for v in views] == [bytes(hv.mapped_page(0, h)) for h in handles]
    assert unmap(hv, dom0, maps[1]) == GNTST_okay
    with pytest.raises(KeyError, match=f"no host mapping with handle {maps[1].handle}"):
        hv.mapped_pages(0, [maps[0].handle, maps[1].handle])
    for m in (maps[0], maps[2]):
        assert unmap(hv, dom0, m) == GNTST_okay
