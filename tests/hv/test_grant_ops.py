"""Grant map, unmap and copy: every check Xen makes, and the GNTST_* for each."""

from __future__ import annotations

import pytest
from hv_grant_helpers import copy, entry_flags, grant, map_, setup, unmap

from gntdma.abi.grant_table import (
    GNTCOPY_dest_gref,
    GNTCOPY_source_gref,
    GNTMAP_device_map,
    GNTMAP_host_map,
    GNTMAP_readonly,
    GNTST_bad_copy_arg,
    GNTST_bad_domain,
    GNTST_bad_gntref,
    GNTST_bad_handle,
    GNTST_bad_page,
    GNTST_general_error,
    GNTST_no_space,
    GNTST_okay,
    GNTST_permission_denied,
    GNTTABOP_map_grant_ref,
    GNTTABOP_query_size,
    GnttabQuerySize,
    GTF_permit_access,
    GTF_reading,
    GTF_readonly,
    GTF_writing,
)
from gntdma.abi.xen import DOMID_SELF
from gntdma.hv import MAPTRACK_PER_FRAME, Domain, Hypervisor


def test_setup_and_query_size(hv: Hypervisor, guest: Domain) -> None:
    assert setup(hv, guest, 2) == GNTST_okay
    assert setup(hv, guest, 5) == GNTST_general_error  # over max_grant_frames=4
    op = GnttabQuerySize(dom=DOMID_SELF, nr_frames=0, max_nr_frames=0, status=0)
    rc, (q,) = hv.grant_table_op(guest.domid, GNTTABOP_query_size, [op])
    assert rc == 0 and isinstance(q, GnttabQuerySize)
    assert (q.nr_frames, q.max_nr_frames, q.status) == (2, 4, GNTST_okay)
    op = GnttabQuerySize(dom=0, nr_frames=0, max_nr_frames=0, status=0)
    _, (q,) = hv.grant_table_op(guest.domid, GNTTABOP_query_size, [op])
    assert isinstance(q, GnttabQuerySize) and q.status == GNTST_permission_denied


def test_map_sets_pin_flags_and_gives_one_page(hv: Hypervisor, dom0: Domain,
                                              guest: Domain) -> None:
    setup(hv, guest)
    guest.memory.page(5)[:4] = b"data"
    grant(hv, guest, 8, 0, 5, GTF_permit_access)
    r = map_(hv, dom0, guest.domid, 8)
    assert r.status == GNTST_okay
    assert entry_flags(hv, guest, 8) == GTF_permit_access | GTF_reading | GTF_writing
    view = hv.mapped_page(0, r.handle)
    assert len(view) == 4096 and bytes(view[:4]) == b"data"
    view[4:8] = b"back"
    assert bytes(guest.memory.page(5)[4:8]) == b"back"
    ro = map_(hv, dom0, guest.domid, 8, GNTMAP_host_map | GNTMAP_readonly)
    assert ro.status == GNTST_okay
    assert hv.mapped_page(0, ro.handle).readonly
    assert unmap(hv, dom0, r) == GNTST_okay
    assert entry_flags(hv, guest, 8) == GTF_permit_access | GTF_reading
    assert _released(view)
    assert unmap(hv, dom0, ro) == GNTST_okay
    assert entry_flags(hv, guest, 8) == GTF_permit_access
    assert unmap(hv, dom0, ro) == GNTST_bad_handle


def _released(v: memoryview) -> bool:
    try:
        len(v)
    except ValueError:
        return True
    return False


def test_device_map_returns_bus_address(hv: Hypervisor, dom0: Domain, guest: Domain) -> None:
    setup(hv, guest)
    grant(hv, guest, 9, 0, 7, GTF_permit_access)
    r = map_(hv, dom0, guest.domid, 9, GNTMAP_host_map | GNTMAP_device_map)
    assert r.status == GNTST_okay and r.dev_bus_addr == 7 << 12
    assert unmap(hv, dom0, r, dev_bus_addr=r.dev_bus_addr) == GNTST_okay


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong_domid", GNTST_general_error),
        ("ungranted", GNTST_general_error),
        ("ro_grant_rw_map", GNTST_general_error),
        ("ref_past_table", GNTST_bad_gntref),
        ("no_map_flags", GNTST_bad_gntref),
        ("bad_domain", GNTST_bad_domain),
        ("bad_frame", GNTST_bad_page),
    ],
)
def test_map_permission_matrix(hv: Hypervisor, dom0: Domain, guest: Domain, case: str,
                               expected: int) -> None:
    setup(hv, guest)
    grant(hv, guest, 10, 0, 3, GTF_permit_access)
    grant(hv, guest, 11, 0, 3, GTF_permit_access | GTF_readonly)
    grant(hv, guest, 12, 5, 3, GTF_permit_access)
    grant(hv, guest, 13, 0, 0xFFFFF, GTF_permit_access)
    before = bytes(hv.grant_frames(guest.domid)[0])
    args = {
        "wrong_domid": (guest.domid, 12, GNTMAP_host_map),
        "ungranted": (guest.domid, 20, GNTMAP_host_map),
        "ro_grant_rw_map": (guest.domid, 11, GNTMAP_host_map),
        "ref_past_table": (guest.domid, 512, GNTMAP_host_map),
        "no_map_flags": (guest.domid, 10, GNTMAP_readonly),
        "bad_domain": (77, 10, GNTMAP_host_map),
        "bad_frame": (guest.domid, 13, GNTMAP_host_map),
    }[case]
    r = map_(hv, dom0, args[0], args[1], args[2])
    assert r.status == expected
    assert bytes(hv.grant_frames(guest.domid)[0]) == before  # nothing changed
    assert dom0.maptrack.entries == {}


def test_ro_grant_maps_read_only(hv: Hypervisor, dom0: Domain, guest: Domain) -> None:
    setup(hv, guest)
    grant(hv, guest, 11, 0, 3, GTF_permit_access | GTF_readonly)
    r = map_(hv, dom0, guest.domid, 11, GNTMAP_host_map | GNTMAP_readonly)
    assert r.status == GNTST_okay
    view = hv.mapped_page(0, r.handle)
    with pytest.raises(TypeError):
        view[0:1] = b"x"
    assert unmap(hv, dom0, r) == GNTST_okay


def test_maptrack_exhaustion(hv: Hypervisor, dom0: Domain, guest: Domain) -> None:
    setup(hv, dom0)
    n = MAPTRACK_PER_FRAME - 1  # the guest has max_maptrack_frames=1; one is the sentinel
    for ref in range(8, 8 + n + 1):
        grant(hv, dom0, ref, guest.domid, 1, GTF_permit_access)
    mapped = []
    for ref in range(8, 8 + n):
        r = map_(hv, guest, 0, ref, GNTMAP_host_map | GNTMAP_readonly)
        assert r.status == GNTST_okay
        mapped.append(r)
    r = map_(hv, guest, 0, 8 + n, GNTMAP_host_map | GNTMAP_readonly)
    assert r.status == GNTST_no_space
    for r in mapped:
        assert unmap(hv, guest, r) == GNTST_okay
    assert entry_flags(hv, dom0, 8) == GTF_permit_access


def test_copy_rules(hv: Hypervisor, dom0: Domain, guest: Domain) -> None:
    setup(hv, guest)
    guest.memory.page(4)[100:105] = b"hello"
    grant(hv, guest, 8, 0, 4, GTF_permit_access | GTF_readonly)
    grant(hv, guest, 9, 0, 6, GTF_permit_access)
    # gref -> own frame
    assert copy(hv, dom0, (8, guest.domid, 100), (2, DOMID_SELF, 0), 5,
                GNTCOPY_source_gref) == GNTST_okay
    assert bytes(dom0.memory.page(2)[:5]) == b"hello"
    # own frame -> gref
    assert copy(hv, dom0, (2, DOMID_SELF, 0), (9, guest.domid, 10), 5,
                GNTCOPY_dest_gref) == GNTST_okay
    assert bytes(guest.memory.page(6)[10:15]) == b"hello"
    # a non-gref side must be DOMID_SELF
    assert copy(hv, dom0, (4, guest.domid, 0), (2, DOMID_SELF, 0), 5,
                0) == GNTST_permission_denied
    # offset + len past the page
    assert copy(hv, dom0, (8, guest.domid, 4094), (2, DOMID_SELF, 0), 5,
                GNTCOPY_source_gref) == GNTST_bad_copy_arg
    # write into a read-only grant
    assert copy(hv, dom0, (2, DOMID_SELF, 0), (8, guest.domid, 0), 5,
                GNTCOPY_dest_gref) == GNTST_general_error
    # bad ref, bad domain, wrong grantee
    assert copy(hv, dom0, (600, guest.domid, 0), (2, DOMID_SELF, 0), 5,
                GNTCOPY_source_gref) == GNTST_bad_gntref
    assert copy(hv, dom0, (8, 99, 0), (2, DOMID_SELF, 0), 5,
                GNTCOPY_source_gref) == GNTST_bad_domain
    assert copy(hv, guest, (8, guest.domid, 0), (2, DOMID_SELF, 0), 5,
                GNTCOPY_source_gref) == GNTST_general_error
    assert entry_flags(hv, guest, 8) == GTF_permit_access | GTF_readonly  # pins released
    assert entry_flags(hv, guest, 9) == GTF_permit_access


def test_unknown_op_and_wrong_struct(hv: Hypervisor, dom0: Domain) -> None:
    rc, res = hv.grant_table_op(0, 99, [])
    assert rc < 0 and res == []
    op = GnttabQuerySize(dom=DOMID_SELF, nr_frames=0, max_nr_frames=0, status=0)
    rc, _ = hv.grant_table_op(0, GNTTABOP_map_grant_ref, [op])
    assert rc < 0
