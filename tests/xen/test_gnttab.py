"""The guest grant-table API: free list, chains, grants, callbacks, growth."""

from __future__ import annotations

import errno

import pytest
from busdma_helpers import hc_map, hc_unmap

from gntdma.abi.grant_table import (
    GNTMAP_host_map,
    GNTMAP_readonly,
    GNTST_general_error,
    GNTST_okay,
    GTF_permit_access,
    GTF_readonly,
)
from gntdma.toolstack.host import Guest, Host
from gntdma.xen.gnttab import (
    GNTTAB_LIST_END,
    GNTTAB_REF_INVALID,
    GnttabFreeCallback,
    GrantRefHead,
)


def map_ref(host: Host, g: Guest, ref: int, readonly: bool = False) -> tuple[int, int]:
    flags = GNTMAP_host_map | (GNTMAP_readonly if readonly else 0)
    r = hc_map(host.dom0.hc, g.domid, ref, flags)
    return r.status, r.handle


def unmap(host: Host, handle: int) -> int:
    return hc_unmap(host.dom0.hc, handle)


def test_first_frame_has_504_free(host: Host) -> None:
    g = host.create_guest("g", max_grant_frames=4)
    st = g.gnttab.statistics()
    assert (st.nr_frames, st.free, st.allocated) == (1, 504, 0)


def test_grant_map_end_access_handshake(host: Host) -> None:
    g = host.create_guest("g")
    pfn = g.kernel.vm_page_alloc()
    assert pfn is not None
    g.hc.own_page(pfn)[:5] = b"bytes"
    error, ref = g.gnttab.gnttab_grant_foreign_access(0, pfn, readonly=True)
    assert error == 0
    assert g.gnttab.entry(ref) == (GTF_permit_access | GTF_readonly, 0, pfn)
    assert map_ref(host, g, ref)[0] == GNTST_general_error  # rw map of a ro grant
    status, handle = map_ref(host, g, ref, readonly=True)
    assert status == GNTST_okay
    assert bytes(host.dom0.hc.mapped_page(handle)[:5]) == b"bytes"
    assert g.gnttab.gnttab_query_foreign_access(ref) != 0
    # Ending access while dom0 maps the page fails and changes nothing.
    assert g.gnttab.gnttab_end_foreign_access_ref(ref) == 0
    assert g.gnttab.entry(ref)[0] & GTF_permit_access
    assert unmap(host, handle) == GNTST_okay
    assert g.gnttab.gnttab_end_foreign_access_ref(ref) == 1
    assert map_ref(host, g, ref, readonly=True)[0] == GNTST_general_error
    g.gnttab.gnttab_free_grant_reference(ref)
    g.kernel.vm_page_free(pfn)


def test_end_foreign_access_reclaims_after_unmap(host: Host) -> None:
    g = host.create_guest("g")
    error, ref = g.gnttab.gnttab_grant_foreign_access(0, 3, readonly=False)
    assert error == 0
    status, handle = map_ref(host, g, ref)
    assert status == GNTST_okay
    assert g.gnttab.gnttab_end_foreign_access(ref) == 0  # still mapped: deferred
    assert g.gnttab.statistics().reclaim_pending == 1
    before = g.gnttab.free_count
    assert unmap(host, handle) == GNTST_okay
    host.sched.run(until=lambda: g.gnttab.statistics().reclaim_pending == 0)
    assert g.gnttab.free_count == before + 1
    g.gnttab.reports.clear()


def test_growth_504_then_512_per_frame_to_enospc(host: Host) -> None:
    """Seed: gnttab_max_frames shrunk until a shortage; growth is whole frames."""
    g = host.create_guest("g", max_grant_frames=4)
    gt = g.gnttab
    heads = []
    error, h = gt.gnttab_alloc_grant_references(504)
    assert error == 0 and gt.nr_frames == 1 and gt.free_count == 0
    heads.append(h)
    for frames in (2, 3, 4):
        error, h = gt.gnttab_alloc_grant_references(512)
        assert error == 0 and gt.nr_frames == frames and gt.free_count == 0
        heads.append(h)
    error, h = gt.gnttab_alloc_grant_references(1)
    assert error == errno.ENOSPC and h.head == GNTTAB_LIST_END
    assert gt.nr_frames == 4
    seen: set[int] = set()
    for h in heads:
        ref = h.head
        while ref != GNTTAB_LIST_END:
            assert ref not in seen and ref >= 8
            seen.add(ref)
            ref = gt.next[ref]
    assert len(seen) == 504 + 3 * 512
    for h in heads:
        gt.gnttab_free_grant_references(h.head)
    assert gt.free_count == 4 * 512 - 8


def test_freeing_a_list_end_head_is_a_noop(host: Host) -> None:
    """Seed: xn_setup_txqs freed a gref_head left at GNTTAB_LIST_END -> page fault."""
    g = host.create_guest("g", max_grant_frames=1)
    error, head = g.gnttab.gnttab_alloc_grant_references(600)
    assert error == errno.ENOSPC and head.head == GNTTAB_LIST_END
    before = g.gnttab.free_count
    g.gnttab.gnttab_free_grant_references(head.head)
    assert g.gnttab.free_count == before == 504
    assert "LIST_END head" in g.gnttab.reports[-1]
    g.gnttab.reports.clear()


def test_end_access_on_invalid_ref_after_failed_alloc(host: Host) -> None:
    """Seed: xn_disconnect_txq ended access on GNTTAB_REF_INVALID -> page fault."""
    g = host.create_guest("g", max_grant_frames=1)
    error, _head = g.gnttab.gnttab_alloc_grant_references(505)
    assert error == errno.ENOSPC
    assert g.gnttab.gnttab_end_foreign_access_ref(GNTTAB_REF_INVALID) == 0
    assert g.gnttab.gnttab_end_foreign_access(GNTTAB_REF_INVALID) == 0
    assert g.gnttab.free_count == 504 and g.gnttab.statistics().reclaim_pending == 0
    assert len(g.gnttab.reports) == 2
    g.gnttab.reports.clear()


def test_claim_from_empty_chain_and_double_request(host: Host) -> None:
    g = host.create_guest("g")
    gt = g.gnttab
    assert gt.gnttab_claim_grant_reference(GrantRefHead()) == GNTTAB_LIST_END
    cb = GnttabFreeCallback()
    calls: list[object] = []
    error, head = gt.gnttab_alloc_grant_references(504)
    assert error == 0
    gt.max_frames = 1  # no growth: the callback must wait
    gt.gnttab_request_free_callback(cb, calls.append, "a", 2)
    gt.gnttab_request_free_callback(cb, calls.append, "b", 2)  # already queued
    gt.gnttab_cancel_free_callback(GnttabFreeCallback())  # not queued: no-op
    host.sched.yield_()
    assert calls == []
    gt.gnttab_free_grant_references(head.head)
    host.sched.yield_()
    assert calls == ["a"] and cb.runs == 1
    assert len(gt.reports) == 2
    gt.reports.clear()


@pytest.mark.parametrize("delivery", ["taskqueue", "inline"])
def test_free_callback_that_allocates_does_not_recurse(delivery: str) -> None:
    """Seed: a free callback allocating refs recursed on gnttab_list_lock -> panic.

    With taskqueue delivery the callback runs on taskqueue_swi with no lock held;
    with FreeBSD's inline delivery the lock is MTX_RECURSE (the seed's fix).
    """
    from gntdma.sched import WITNESS

    WITNESS.reset()
    host = Host(callback_delivery=delivery)
    try:
        g = host.create_guest("g", max_grant_frames=1)
        gt = g.gnttab
        error, head = gt.gnttab_alloc_grant_references(504)
        assert error == 0
        got: list[tuple[int, int]] = []
        freer: list[str] = []

        def cb_fn(_arg: object) -> None:
            freer.append(host.sched.curthread.name)
            err, h = gt.gnttab_alloc_grant_references(4)
            got.append((err, h.head))

        cb = GnttabFreeCallback()
        gt.gnttab_request_free_callback(cb, cb_fn, None, 4)

        def free_some() -> None:
            for _ in range(4):
                ref = gt.gnttab_claim_grant_reference(head)
                gt.gnttab_free_grant_reference(ref)

        host.sched.call(free_some, name="freer")
        host.sched.yield_()
        assert len(got) == 1 and got[0][0] == 0
        if delivery == "taskqueue":
            assert freer == ["g/swi"]  # never the freeing thread
        else:
            assert freer == ["freer"]
        gt.gnttab_free_grant_references(got[0][1])
        gt.gnttab_free_grant_references(head.head)
        assert WITNESS.panics() == []
        assert host.leaks() == []
    finally:
        host.close()
        WITNESS.reset()
