"""Grant table set-up as the host builds it for every guest: GNTTABOP_setup_table and
GNTTABOP_query_size answer what ``dataclasses.replace`` of the op gave, and the guest's
free list after set-up and after each growth is the one threading the new refs one by
one gives (the memoized links and free bits of a growth are those)."""

from __future__ import annotations

from dataclasses import replace

from gntdma.abi.grant_table import (
    GNTTAB_NR_RESERVED_ENTRIES,
    GREFS_PER_GRANT_FRAME,
    GNTST_general_error,
    GNTST_okay,
    GNTTABOP_query_size,
    GNTTABOP_setup_table,
    GnttabQuerySize,
    GnttabSetupTable,
)
from gntdma.abi.xen import DOMID_SELF
from gntdma.hv import Domain, Hypervisor
from gntdma.xen import gnttab as gnttab_mod
from gntdma.xen.gnttab import GNTTAB_LIST_END, GntTab
from gntdma.xen.hypercall import Hypercalls


def test_setup_table_and_query_size_answer_the_op_with_its_status(
        hv: Hypervisor, guest: Domain) -> None:
    op = GnttabSetupTable(dom=DOMID_SELF, nr_frames=2, frame_list=0x1234)
    rc, (r,) = hv.grant_table_op(guest.domid, GNTTABOP_setup_table, [op])
    assert rc == 0 and r == replace(op, status=GNTST_okay) and type(r) is GnttabSetupTable
    too_many = GnttabSetupTable(dom=DOMID_SELF, nr_frames=5)
    rc, (r,) = hv.grant_table_op(guest.domid, GNTTABOP_setup_table, [too_many])
    assert rc == 0 and r == replace(too_many, status=GNTST_general_error)
    q = GnttabQuerySize(dom=DOMID_SELF, nr_frames=77, max_nr_frames=88, status=-3)
    rc, (r,) = hv.grant_table_op(guest.domid, GNTTABOP_query_size, [q])
    assert rc == 0 and type(r) is GnttabQuerySize
    assert r == replace(q, nr_frames=2, max_nr_frames=4, status=GNTST_okay)


def _threaded(frames: int, grown_from: list[int]) -> tuple[list[int], bytearray, int]:
    """The free list of a table grown frame by frame, each new ref threaded in turn
    (the loop _grow_to ran before 3 December 2026): (next, is_free, head)."""
    nxt: list[int] = []
    is_free = bytearray()
    head = GNTTAB_LIST_END
    for new_frames in [*grown_from, frames]:
        old, new = len(nxt), new_frames * GREFS_PER_GRANT_FRAME
        first = max(old, GNTTAB_NR_RESERVED_ENTRIES)
        nxt.extend([GNTTAB_LIST_END] * (new - old))
        is_free.extend(bytes(new - old))
        for ref in range(first, new):
            is_free[ref] = 1
        for ref in range(first, new - 1):
            nxt[ref] = ref + 1
        nxt[new - 1] = head
        head = first
    return nxt, is_free, head


def test_the_free_list_after_set_up_and_growth_is_the_refs_threaded_one_by_one(
        hv: Hypervisor) -> None:
    for i in range(2):  # the second table takes the memoized links of the first
        d = hv.create_domain(f"guest{i}", 64, max_grant_frames=4)
        gt = GntTab(Hypercalls(hv, d.domid), lambda fn: None)
        nxt, is_free, head = _threaded(1, [])
        assert (gt.next, gt.is_free, gt.free_head) == (nxt, is_free, head)
        assert gt.free_count == GREFS_PER_GRANT_FRAME - GNTTAB_NR_RESERVED_ENTRIES
        assert gt._expand(GREFS_PER_GRANT_FRAME + 1) == 0  # two frames more: 1 -> 3
        nxt, is_free, head = _threaded(3, [1])
        assert (gt.next, gt.is_free, gt.free_head) == (nxt, is_free, head)
        assert gt.free_count == 3 * GREFS_PER_GRANT_FRAME - GNTTAB_NR_RESERVED_ENTRIES
        hv.destroy_domain(d.domid)


def test_a_table_grown_after_refs_were_taken_keeps_them_off_the_free_list(
        hv: Hypervisor, guest: Domain) -> None:
    gt = GntTab(Hypercalls(hv, guest.domid), lambda fn: None)
    err, head = gt.gnttab_alloc_grant_references(GREFS_PER_GRANT_FRAME
                                                 - GNTTAB_NR_RESERVED_ENTRIES)
    assert err == 0 and gt.free_count == 0
    err, more = gt.gnttab_alloc_grant_references(3)  # grows the table by one frame
    assert err == 0 and gt.nr_frames == 2
    assert more.head == GREFS_PER_GRANT_FRAME
    assert gt.free_count == GREFS_PER_GRANT_FRAME - 3
    assert all(gt.is_free[r] == 0 for r in range(GREFS_PER_GRANT_FRAME + 3))
    assert all(gt.is_free[r] == 1 for r in range(GREFS_PER_GRANT_FRAME + 3,
                                                 2 * GREFS_PER_GRANT_FRAME))
    gt.gnttab_free_grant_references(head.head)
    gt.gnttab_free_grant_references(more.head)
    assert gt.free_count == 2 * GREFS_PER_GRANT_FRAME - GNTTAB_NR_RESERVED_ENTRIES
    assert gt.double_frees == 0


def test_a_large_growth_is_threaded_right_and_not_kept(hv: Hypervisor) -> None:
    d = hv.create_domain("big", 64, max_grant_frames=16)
    gt = GntTab(Hypercalls(hv, d.domid), lambda fn: None)
    assert gt._expand(8 * GREFS_PER_GRANT_FRAME) == 0  # 1 -> 9 frames at once
    nxt, is_free, head = _threaded(9, [1])
    assert (gt.next, gt.is_free, gt.free_head) == (nxt, is_free, head)
    assert (GREFS_PER_GRANT_FRAME, 9 * GREFS_PER_GRANT_FRAME) not in gnttab_mod._NEW_REFS
    hv.destroy_domain(d.domid)
