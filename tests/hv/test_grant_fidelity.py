"""Grant-table rules as Xen 4.17 has them (xen/common/grant_table.c, stable-4.17).

Each test names the rule and the Xen function it comes from. Host addresses
follow the translated (PVH/HVM) mapper: xen/arch/x86/hvm/grant_table.c
create_grant_p2m_mapping / replace_grant_p2m_mapping.
"""

from __future__ import annotations

import errno

import pytest
from hv_grant_helpers import copy, entry_flags, grant, map_, next_addr, setup, unmap

from gntdma.abi.grant_table import (
    GNTTAB_RESERVED_XENSTORE,
    GNTCOPY_dest_gref,
    GNTCOPY_source_gref,
    GNTMAP_device_map,
    GNTMAP_host_map,
    GNTMAP_readonly,
    GNTST_bad_dev_addr,
    GNTST_bad_domain,
    GNTST_general_error,
    GNTST_no_space,
    GNTST_okay,
    GnttabMapGrantRef,
    GNTTABOP_query_size,
    GNTTABOP_setup_table,
    GnttabQuerySize,
    GnttabSetupTable,
    GTF_permit_access,
    GTF_reading,
    GTF_sub_page,
    GTF_writing,
)
from gntdma.abi.xen import DOMID_SELF
from gntdma.hv import MAPTRACK_PER_FRAME, Domain, Hypervisor

# --- item 2: pins -----------------------------------------------------------------


def test_map_refused_when_pinned_by_another_domain(hv: Hypervisor, dom0: Domain,
                                                   guest: Domain) -> None:
    # map_grant_ref: "If already pinned, check the active domid": act->pin and
    # act->domid != ld->domain_id -> GNTST_general_error, whatever the entry says now.
    other = hv.create_domain("other", 16)
    guest.memory.page(3)[:6] = b"secret"
    setup(hv, guest)
    grant(hv, guest, 8, 0, 3, GTF_permit_access)
    r = map_(hv, dom0, guest.domid, 8)
    assert r.status == GNTST_okay
    # The granter rewrites the pinned entry for another domain and frame.
    grant(hv, guest, 8, other.domid, 4, GTF_permit_access | GTF_reading | GTF_writing)
    for flags in (GNTMAP_host_map, GNTMAP_host_map | GNTMAP_readonly):
        assert map_(hv, other, guest.domid, 8, flags).status == GNTST_general_error
    assert other.maptrack.entries == {}
    assert unmap(hv, dom0, r) == GNTST_okay
    assert entry_flags(hv, guest, 8) == GTF_permit_access
    hv.destroy_domain(other.domid)


def test_copy_refused_when_pinned_by_another_domain(hv: Hypervisor, dom0: Domain,
                                                    guest: Domain) -> None:
    # acquire_grant_for_copy: the same act->domid check as map_grant_ref.
    other = hv.create_domain("other", 16)
    guest.memory.page(3)[:6] = b"secret"
    setup(hv, guest)
    grant(hv, guest, 8, 0, 3, GTF_permit_access)
    r = map_(hv, dom0, guest.domid, 8)
    grant(hv, guest, 8, other.domid, 3, GTF_permit_access | GTF_reading | GTF_writing)
    assert copy(hv, other, (8, guest.domid, 0), (1, DOMID_SELF, 0), 6,
                GNTCOPY_source_gref) == GNTST_general_error
    assert bytes(other.memory.page(1)[:6]) == bytes(6)
    assert unmap(hv, dom0, r) == GNTST_okay
    hv.destroy_domain(other.domid)


_KINDS = {
    # kind: map flags (GNTPIN_hstw/hstr/devw/devr_inc in map_grant_ref)
    "host_write": GNTMAP_host_map,
    "host_read": GNTMAP_host_map | GNTMAP_readonly,
    "dev_write": GNTMAP_device_map,
    "dev_read": GNTMAP_device_map | GNTMAP_readonly,
}


@pytest.mark.parametrize("kind", sorted(_KINDS))
def test_129th_pin_of_one_kind_refused(hv: Hypervisor, dom0: Domain, guest: Domain,
                                       kind: str) -> None:
    # grant_table.c: GNTPIN_cntr_width 8; map_grant_ref refuses when
    # act->pin & GNTPIN_incr2oflow_mask(pin_incr), i.e. once the counter of that
    # kind has its top bit set: 128 pins of a kind, the 129th is GNTST_general_error.
    flags = _KINDS[kind]
    setup(hv, guest)
    grant(hv, guest, 8, 0, 3, GTF_permit_access)
    mapped = [map_(hv, dom0, guest.domid, 8, flags) for _ in range(128)]
    assert all(r.status == GNTST_okay for r in mapped)
    assert map_(hv, dom0, guest.domid, 8, flags).status == GNTST_general_error
    # The other kinds have counters of their own.
    others = [map_(hv, dom0, guest.domid, 8, f) for k, f in _KINDS.items() if k != kind]
    assert all(r.status == GNTST_okay for r in others)
    for r in mapped + others:
        assert unmap(hv, dom0, r, dev_bus_addr=r.dev_bus_addr) == GNTST_okay
    assert entry_flags(hv, guest, 8) == GTF_permit_access


# --- item 5: host addresses, halves, dev_bus_addr -----------------------------------


def test_unmap_at_wrong_host_addr_is_general_error_and_keeps_mapping(
        hv: Hypervisor, dom0: Domain, guest: Domain) -> None:
    # unmap_common -> replace_grant_host_mapping -> replace_grant_p2m_mapping:
    # the gfn must hold a grant mapping of this frame, else GNTST_general_error.
    setup(hv, guest)
    grant(hv, guest, 8, 0, 3, GTF_permit_access)
    r = map_(hv, dom0, guest.domid, 8)
    assert unmap(hv, dom0, r, host_addr=next_addr()) == GNTST_general_error
    assert r.handle in dom0.maptrack.entries
    assert len(hv.mapped_page(0, r.handle)) == 4096
    assert unmap(hv, dom0, r) == GNTST_okay


def test_unmap_compares_host_addr_by_gfn(hv: Hypervisor, dom0: Domain,
                                         guest: Domain) -> None:
    # replace_grant_p2m_mapping: gfn = addr >> PAGE_SHIFT; the low bits do not count.
    setup(hv, guest)
    grant(hv, guest, 8, 0, 3, GTF_permit_access)
    r = map_(hv, dom0, guest.domid, 8)
    assert unmap(hv, dom0, r, host_addr=r.host_addr | 0x123) == GNTST_okay
    assert dom0.maptrack.entries == {}


def test_unmap_with_neither_address_does_nothing(hv: Hypervisor, dom0: Domain,
                                                 guest: Domain) -> None:
    # unmap_common: a half is removed only if its address is non-zero; with
    # neither, op->done stays 0 and the status is GNTST_okay: the mapping stays.
    setup(hv, guest)
    grant(hv, guest, 8, 0, 3, GTF_permit_access)
    r = map_(hv, dom0, guest.domid, 8, GNTMAP_host_map | GNTMAP_device_map)
    assert unmap(hv, dom0, r, host_addr=0, dev_bus_addr=0) == GNTST_okay
    assert r.handle in dom0.maptrack.entries
    assert entry_flags(hv, guest, 8) == GTF_permit_access | GTF_reading | GTF_writing
    assert unmap(hv, dom0, r, dev_bus_addr=r.dev_bus_addr) == GNTST_okay


def test_host_map_at_an_address_already_mapped_refused(hv: Hypervisor, dom0: Domain,
                                                      guest: Domain) -> None:
    # create_grant_p2m_mapping -> p2m_add_page: a gfn holding a grant mapping
    # is not replaced (-EPERM) -> GNTST_general_error.
    setup(hv, guest)
    grant(hv, guest, 8, 0, 3, GTF_permit_access)
    grant(hv, guest, 9, 0, 4, GTF_permit_access)
    r = map_(hv, dom0, guest.domid, 8)
    r2 = map_(hv, dom0, guest.domid, 9, host_addr=r.host_addr)
    assert r2.status == GNTST_general_error
    assert entry_flags(hv, guest, 9) == GTF_permit_access
    assert unmap(hv, dom0, r) == GNTST_okay


@pytest.mark.parametrize("pfn", [0, 5, 63])
def test_host_map_over_own_ram_refused(hv: Hypervisor, dom0: Domain, guest: Domain,
                                       pfn: int) -> None:
    # gntdma's address rule (hv/_grantops.py): a translated mapper maps at a gfn
    # with no RAM behind it; Xen's p2m_add_page would drop the RAM page instead.
    setup(hv, guest)
    grant(hv, guest, 8, 0, 3, GTF_permit_access)
    r = map_(hv, dom0, guest.domid, 8, host_addr=pfn << 12)
    assert r.status == GNTST_general_error
    assert entry_flags(hv, guest, 8) == GTF_permit_access
    assert dom0.maptrack.entries == {}


def test_device_and_host_halves_unmap_separately(hv: Hypervisor, dom0: Domain,
                                                 guest: Domain) -> None:
    # unmap_common clears GNTMAP_host_map and GNTMAP_device_map of the maptrack
    # entry one by one; unmap_common_complete drops GNTPIN_dev* and GNTPIN_hst*
    # separately; the handle goes only when both halves are gone.
    setup(hv, guest)
    grant(hv, guest, 8, 0, 3, GTF_permit_access)
    r = map_(hv, dom0, guest.domid, 8, GNTMAP_host_map | GNTMAP_device_map)
    assert unmap(hv, dom0, r, host_addr=0, dev_bus_addr=r.dev_bus_addr) == GNTST_okay
    view = hv.mapped_page(0, r.handle)  # the host half is still mapped
    assert len(view) == 4096
    assert entry_flags(hv, guest, 8) == GTF_permit_access | GTF_reading | GTF_writing
    # The device half is gone: its address no longer names anything to remove.
    assert unmap(hv, dom0, r, host_addr=0, dev_bus_addr=r.dev_bus_addr) == GNTST_okay
    assert r.handle in dom0.maptrack.entries
    assert unmap(hv, dom0, r) == GNTST_okay
    assert dom0.maptrack.entries == {}
    assert entry_flags(hv, guest, 8) == GTF_permit_access
    # And the other way round: host half first, the device half keeps the pin.
    r = map_(hv, dom0, guest.domid, 8, GNTMAP_host_map | GNTMAP_device_map)
    assert unmap(hv, dom0, r) == GNTST_okay
    assert entry_flags(hv, guest, 8) == GTF_permit_access | GTF_reading | GTF_writing
    with pytest.raises(KeyError):
        hv.mapped_page(0, r.handle)
    assert unmap(hv, dom0, r, host_addr=0, dev_bus_addr=r.dev_bus_addr) == GNTST_okay
    assert entry_flags(hv, guest, 8) == GTF_permit_access


def test_unmap_with_wrong_dev_bus_addr_is_bad_dev_addr(hv: Hypervisor, dom0: Domain,
                                                       guest: Domain) -> None:
    # unmap_common: op->dev_bus_addr && device_map && != mfn_to_maddr -> GNTST_bad_dev_addr.
    setup(hv, guest)
    grant(hv, guest, 8, 0, 3, GTF_permit_access)
    r = map_(hv, dom0, guest.domid, 8, GNTMAP_host_map | GNTMAP_device_map)
    assert unmap(hv, dom0, r, dev_bus_addr=r.dev_bus_addr + 4096) == GNTST_bad_dev_addr
    assert unmap(hv, dom0, r, dev_bus_addr=r.dev_bus_addr) == GNTST_okay


def test_dev_bus_addr_reported_on_every_map(hv: Hypervisor, dom0: Domain,
                                            guest: Domain) -> None:
    # map_grant_ref: op->dev_bus_addr = mfn_to_maddr(mfn) on every success.
    setup(hv, guest)
    grant(hv, guest, 8, 0, 7, GTF_permit_access)
    r = map_(hv, dom0, guest.domid, 8, GNTMAP_host_map | GNTMAP_readonly)
    assert r.status == GNTST_okay and r.dev_bus_addr == 7 << 12
    assert unmap(hv, dom0, r) == GNTST_okay


# --- item 6: the remaining differences --------------------------------------------


def test_new_domain_starts_with_one_grant_frame(hv: Hypervisor, guest: Domain) -> None:
    # grant_table_init -> gnttab_grow_table(d, 0) grows to INITIAL_NR_GRANT_FRAMES (1, x86).
    op = GnttabQuerySize(dom=DOMID_SELF)
    rc, (q,) = hv.grant_table_op(guest.domid, GNTTABOP_query_size, [op])
    assert rc == 0 and isinstance(q, GnttabQuerySize)
    assert (q.status, q.nr_frames, q.max_nr_frames) == (GNTST_okay, 1, 4)
    grant(hv, guest, 8, 0, 3, GTF_permit_access)  # usable with no setup_table


@pytest.mark.parametrize("count", [0, 2])
def test_setup_table_and_query_size_take_exactly_one_op(hv: Hypervisor, guest: Domain,
                                                        count: int) -> None:
    # gnttab_setup_table / gnttab_query_size: if ( count != 1 ) return -EINVAL.
    setup_ops = [GnttabSetupTable(dom=DOMID_SELF, nr_frames=2)] * count
    assert hv.grant_table_op(guest.domid, GNTTABOP_setup_table, setup_ops) == (-errno.EINVAL, [])
    query_ops = [GnttabQuerySize(dom=DOMID_SELF)] * count
    assert hv.grant_table_op(guest.domid, GNTTABOP_query_size, query_ops) == (-errno.EINVAL, [])
    assert guest.gnttab.nr_frames == 1


def test_sub_page_v1_entry_cannot_be_mapped(hv: Hypervisor, dom0: Domain,
                                            guest: Domain) -> None:
    # _set_status_v1: for a map (mapflag) the mask includes GTF_sub_page, so
    # (flags & mask) != GTF_permit_access -> GNTST_general_error. A copy uses
    # GTF_type_mask alone and goes through.
    guest.memory.page(3)[:2] = b"ok"
    setup(hv, guest)
    grant(hv, guest, 8, 0, 3, GTF_permit_access | GTF_sub_page)
    assert map_(hv, dom0, guest.domid, 8).status == GNTST_general_error
    assert entry_flags(hv, guest, 8) == GTF_permit_access | GTF_sub_page
    assert copy(hv, dom0, (8, guest.domid, 0), (1, DOMID_SELF, 0), 2,
                GNTCOPY_source_gref) == GNTST_okay
    assert bytes(dom0.memory.page(1)[:2]) == b"ok"


def _fill_maptrack(hv: Hypervisor, dom0: Domain, guest: Domain) -> list[GnttabMapGrantRef]:
    setup(hv, dom0)
    for ref in range(8, 8 + MAPTRACK_PER_FRAME):
        grant(hv, dom0, ref, guest.domid, 1, GTF_permit_access)
    mapped = []
    for ref in range(8, 8 + MAPTRACK_PER_FRAME - 1):
        r = map_(hv, guest, 0, ref, GNTMAP_host_map | GNTMAP_readonly)
        assert r.status == GNTST_okay
        mapped.append(r)
    return mapped


def test_maptrack_frame_holds_255_handles(hv: Hypervisor, dom0: Domain,
                                          guest: Domain) -> None:
    # MAPTRACK_PER_PAGE = PAGE_SIZE / sizeof(struct grant_mapping) = 256, and
    # _get_maptrack_handle always leaves one entry in a vCPU's free list (the
    # tail sentinel); with one vCPU and max_maptrack_frames=1, 255 handles.
    mapped = _fill_maptrack(hv, dom0, guest)
    last = 8 + MAPTRACK_PER_FRAME - 1
    assert map_(hv, guest, 0, last, GNTMAP_host_map | GNTMAP_readonly).status == GNTST_no_space
    assert unmap(hv, guest, mapped.pop()) == GNTST_okay
    again = map_(hv, guest, 0, last, GNTMAP_host_map | GNTMAP_readonly)
    assert again.status == GNTST_okay
    for r in [*mapped, again]:
        assert unmap(hv, guest, r) == GNTST_okay


def test_full_maptrack_is_no_space_before_the_ref_is_checked(hv: Hypervisor, dom0: Domain,
                                                             guest: Domain) -> None:
    # map_grant_ref takes the maptrack handle (get_maptrack_handle) before the
    # bounds check of the ref and the pin checks; the domain is looked up first.
    mapped = _fill_maptrack(hv, dom0, guest)
    assert map_(hv, guest, 0, 100000).status == GNTST_no_space  # ref past the table
    assert map_(hv, guest, 0, 600).status == GNTST_no_space  # not granted
    assert map_(hv, guest, 77, 8).status == GNTST_bad_domain
    for r in mapped:
        assert unmap(hv, guest, r) == GNTST_okay


def test_copy_checks_the_grant_before_the_bounds(hv: Hypervisor, dom0: Domain,
                                                 guest: Domain) -> None:
    # gnttab_copy_one claims both buffers (gnttab_copy_claim_buf ->
    # acquire_grant_for_copy) before gnttab_copy_buf checks offset + len.
    setup(hv, guest)
    grant(hv, guest, 8, 5, 3, GTF_permit_access)  # granted to another domain
    grant(hv, guest, 9, 0, 3, GTF_permit_access)
    assert copy(hv, dom0, (8, guest.domid, 4000), (1, DOMID_SELF, 0), 200,
                GNTCOPY_source_gref) == GNTST_general_error
    assert copy(hv, dom0, (1, DOMID_SELF, 0), (9, guest.domid, 4000), 200,
                GNTCOPY_dest_gref) != GNTST_general_error  # a valid grant: the bounds
    assert entry_flags(hv, guest, 9) == GTF_permit_access


# --- item 11: seeding reserved entries ----------------------------------------------


def test_toolstack_seeds_reserved_entries_with_a_privileged_op(hv: Hypervisor, dom0: Domain,
                                                                guest: Domain) -> None:
    # tools/libs/guest/xg_dom_boot.c xc_dom_gnttab_seed: the privileged toolstack
    # writes the console and xenstore entries of a new domain's table.
    ref = GNTTAB_RESERVED_XENSTORE
    assert hv.gnttab_seed(0, guest.domid, ref, 0, 9, GTF_permit_access) == 0
    assert guest.gnttab.read(ref) == (GTF_permit_access, 0, 9)
    assert hv.gnttab_seed(guest.domid, guest.domid, ref, 0, 9, 0) == -errno.EPERM
    assert hv.gnttab_seed(0, guest.domid, 8, 0, 9, GTF_permit_access) == -errno.EINVAL
    assert hv.gnttab_seed(0, 77, ref, 0, 9, GTF_permit_access) == -errno.ESRCH
    r = map_(hv, dom0, guest.domid, ref)
    assert r.status == GNTST_okay
    assert unmap(hv, dom0, r) == GNTST_okay
    assert hv.gnttab_seed(0, guest.domid, ref, 0, 0, 0) == 0
    assert guest.gnttab.read(ref) == (0, 0, 0)
