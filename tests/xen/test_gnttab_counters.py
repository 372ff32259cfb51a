"""Grant-table statistics are counters kept with each operation, not table scans.

The guest's ``statistics().granted``, ``allocated`` and ``free``, and the
hypervisor's pins, mappings and entries in use, must equal what a full read of
the tables gives after any sequence of operations; and with the table grown to
64 frames (Xen's default ``max_grant_frames``, 32768 v1 entries) an
allocation, grant and end of access, and ``statistics()``, must do the same
work as with one frame. Work is counted as the Python lines executed (a trace
function), which a per-entry loop makes grow with the table and which noise
on the machine does not move.

FreeBSD's grant table keeps its free count the same way
(``sys/dev/xen/grant_table/grant_table.c``: ``gnttab_free_count`` adjusted in
``get_free_entries``/``put_free_entry``, never recounted); Xen keeps no count
of entries in use at all (``xen/common/grant_table.c`` reads an entry only
when it maps or copies it), so the hypervisor's figure is read from the frames
without per-entry work.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from gntdma.abi.grant_table import (
    GNTMAP_host_map,
    GNTMAP_readonly,
    GNTST_okay,
    GnttabMapGrantRef,
    GNTTABOP_map_grant_ref,
    GNTTABOP_unmap_grant_ref,
    GnttabUnmapGrantRef,
    GTF_type_mask,
)
from gntdma.sched import WITNESS
from gntdma.toolstack.host import Guest, Host
from gntdma.xen.gnttab import GNTTAB_LIST_END, GrantRefHead

FULL = 64


def scan_guest(g: Guest) -> tuple[int, int]:
    """(granted, free) read entry by entry from the guest's table and free marks."""
    gt = g.gnttab
    refs = range(8, len(gt.next))
    granted = sum(1 for r in refs if gt.entry(r)[0] & GTF_type_mask)
    return granted, sum(1 for r in refs if gt.is_free[r] == 1)


def scan_hv(g: Guest) -> tuple[int, int]:
    """(entries in use, entries pinned) read entry by entry from the hypervisor's table
    and its active entries. A pin is the hypervisor's (``struct active_grant_entry``):
    a granter that rewrites a pinned entry's flags clears ``GTF_reading`` and
    ``GTF_writing`` in its table but not the pin."""
    table = g.domain.gnttab
    flags = [table.read(r)[0] for r in range(table.nr_entries)]
    active = [table.active.get(r) for r in range(table.nr_entries)]
    return (sum(1 for f in flags if f & GTF_type_mask),
            sum(1 for a in active if a is not None and a.pin != 0))


class CountersMachine(RuleBasedStateMachine):
    """Random grant-table work in a guest, dom0 mapping some of it; after every
    step the counters must equal a full read of the tables."""

    def __init__(self) -> None:
        super().__init__()
        WITNESS.reset()
        self.host = Host()
        self.g = self.host.create_guest("g", max_grant_frames=3)
        self.gt = self.g.gnttab
        self.heads: list[GrantRefHead] = []
        self.owned: list[int] = []  # claimed refs the test holds
        self.mapped: dict[int, tuple[int, int]] = {}  # ref -> (dom0 handle, host address)
        self.ended_in_use: list[int] = []  # given to gnttab_end_foreign_access while mapped

    def teardown(self) -> None:
        try:
            for handle, addr in list(self.mapped.values()):
                self._unmap(handle, addr)
            for ref in self.owned:
                self.gt.gnttab_end_foreign_access_ref(ref)
                self.gt.gnttab_free_grant_reference(ref)
            for head in self.heads:
                if head.head != GNTTAB_LIST_END:
                    self.gt.gnttab_free_grant_references(head.head)
            self.host.sched.run(until=lambda: not self.gt.reclaim)
            assert self.host.leaks() == []
            assert WITNESS.reports == []
        finally:
            self.host.close()
            WITNESS.reset()

    def _unmap(self, handle: int, addr: int) -> None:
        op = GnttabUnmapGrantRef(host_addr=addr, handle=handle)
        _, (r,) = self.host.dom0.hc.grant_table_op(GNTTABOP_unmap_grant_ref, [op])
        assert isinstance(r, GnttabUnmapGrantRef) and r.status == GNTST_okay
        assert self.host.dom0.hc.foreign.free(addr) == 0

    @rule(count=st.integers(1, 700))
    def alloc(self, count: int) -> None:
        error, head = self.gt.gnttab_alloc_grant_references(count)
        if error == 0:
            self.heads.append(head)

    @rule(i=st.integers(0, 50))
    def claim(self, i: int) -> None:
        live = [h for h in self.heads if h.head != GNTTAB_LIST_END]
        if live:
            self.owned.append(self.gt.gnttab_claim_grant_reference(live[i % len(live)]))

    @rule(i=st.integers(0, 50))
    def free_chain(self, i: int) -> None:
        if self.heads:
            head = self.heads.pop(i % len(self.heads))
            if head.head != GNTTAB_LIST_END:
                self.gt.gnttab_free_grant_references(head.head)

    @rule(i=st.integers(0, 500), frame=st.integers(0, 255), ro=st.booleans())
    def grant(self, i: int, frame: int, ro: bool) -> None:
        if self.owned:  # a grant over a grant still in place too
            self.gt.gnttab_grant_foreign_access_ref(self.owned[i % len(self.owned)], 0, frame,
                                                    ro)

    @rule(i=st.integers(0, 500))
    def end_access(self, i: int) -> None:
        if self.owned:
            self.gt.gnttab_end_foreign_access_ref(self.owned[i % len(self.owned)])

    @rule(i=st.integers(0, 500))
    def end_and_free(self, i: int) -> None:
        # gnttab_end_foreign_access: freed now, or reclaimed once dom0 lets go.
        if self.owned:
            ref = self.owned.pop(i % len(self.owned))
            if self.gt.gnttab_end_foreign_access(ref) == 0:
                self.ended_in_use.append(ref)

    @rule(i=st.integers(0, 500), ro=st.booleans())
    def backend_map(self, i: int, ro: bool) -> None:
        if not self.owned:
            return
        ref = self.owned[i % len(self.owned)]
        hc = self.host.dom0.hc
        error, addr = hc.foreign.alloc()
        assert error == 0
        op = GnttabMapGrantRef(host_addr=addr, flags=GNTMAP_host_map | (GNTMAP_readonly if ro
                                                                        else 0),
                               ref=ref, dom=self.g.domid)
        _, (r,) = hc.grant_table_op(GNTTABOP_map_grant_ref, [op])
        assert isinstance(r, GnttabMapGrantRef)
        if r.status == GNTST_okay and ref not in self.mapped:
            self.mapped[ref] = (r.handle, addr)
            return
        if r.status == GNTST_okay:
            self._unmap(r.handle, addr)
        else:
            assert hc.foreign.free(addr) == 0

    @rule(i=st.integers(0, 500))
    def backend_unmap(self, i: int) -> None:
        if self.mapped:
            ref = list(self.mapped)[i % len(self.mapped)]
            self._unmap(*self.mapped.pop(ref))
            self.host.sched.yield_()

    @invariant()
    def statistics_equal_a_full_scan(self) -> None:
        st_ = self.gt.statistics()
        granted, free = scan_guest(self.g)
        assert (st_.granted, st_.free) == (granted, free)
        assert st_.allocated == self.gt.nr_frames * 512 - 8 - free
        ds = self.g.domain.statistics()
        assert (ds.grant_entries_in_use, ds.grants_pinned) == scan_hv(self.g)


def test_statistics_counters_equal_a_full_scan_after_random_operations() -> None:
    run_state_machine_as_test(CountersMachine, settings=settings(
        max_examples=40, stateful_step_count=40, deadline=None))


def lines_run(fn: Callable[[], Any]) -> int:
    """The Python lines ``fn()`` executes (every frame it calls included)."""
    n = 0

    def tracer(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal n
        if event == "line":
            n += 1
        return tracer

    old = sys.gettrace()
    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(old)
    return n


def nearly_full_guest(host: Host, frames: int) -> tuple[Guest, list[int], int]:
    """A guest whose ``frames`` frames are all allocated and granted but 16 refs."""
    g = host.create_guest(f"g{frames}", max_grant_frames=frames)
    gt = g.gnttab
    pfn = g.kernel.vm_page_alloc()
    assert pfn is not None
    error, head = gt.gnttab_alloc_grant_references(frames * 512 - 8 - 16)
    assert error == 0 and gt.nr_frames == frames
    refs = []
    while head.head != GNTTAB_LIST_END:
        ref = gt.gnttab_claim_grant_reference(head)
        gt.gnttab_grant_foreign_access_ref(ref, 0, pfn, False)
        refs.append(ref)
    return g, refs, pfn


def release(g: Guest, refs: list[int], pfn: int) -> None:
    for ref in refs:
        assert g.gnttab.gnttab_end_foreign_access_ref(ref) == 1
        g.gnttab.gnttab_free_grant_reference(ref)
    g.kernel.vm_page_free(pfn)


def test_grant_cycle_and_statistics_do_the_same_work_at_1_and_64_frames(host: Host) -> None:
    work: dict[int, tuple[int, int]] = {}
    for frames in (1, FULL):
        g, refs, pfn = nearly_full_guest(host, frames)
        gt = g.gnttab

        def cycle(gt: Any = gt, pfn: int = pfn) -> None:
            error, head = gt.gnttab_alloc_grant_references(1)
            assert error == 0
            ref = gt.gnttab_claim_grant_reference(head)
            gt.gnttab_grant_foreign_access_ref(ref, 0, pfn, True)
            assert gt.gnttab_end_foreign_access_ref(ref) == 1
            gt.gnttab_free_grant_reference(ref)

        host.sched.yield_()  # nothing else left to run inside the measured calls
        work[frames] = (min(lines_run(cycle) for _ in range(5)),
                        min(lines_run(gt.statistics) for _ in range(5)))
        assert gt.statistics().granted == len(refs)
        release(g, refs, pfn)
        host.destroy_guest(g)
    assert work[FULL] == work[1], work


def test_backend_maps_a_batch_through_the_array_form_of_the_hypercall(host: Host) -> None:
    # HYPERVISOR_grant_table_op(GNTTABOP_map_grant_ref, uop, count) with uop an
    # array of struct gnttab_map_grant_ref in the caller's memory, written back
    # in place (xen/common/grant_table.c, gnttab_map_grant_ref); a frontend's
    # grants mapped by dom0 that way pin the entries as the struct form does.
    g = host.create_guest("g")
    pfns = [g.kernel.vm_page_alloc() for _ in range(3)]
    refs = []
    for i, pfn in enumerate(pfns):
        assert pfn is not None
        g.hc.own_page(pfn)[:1] = bytes([i + 1])
        error, ref = g.gnttab.gnttab_grant_foreign_access(0, pfn, readonly=True)
        assert error == 0
        refs.append(ref)
    hc = host.dom0.hc
    pinned = g.domain.statistics().grants_pinned  # the xenstore ring's
    m, u = GnttabMapGrantRef.STRUCT, GnttabUnmapGrantRef.STRUCT
    addrs = [hc.foreign.alloc()[1] for _ in refs]
    flags = int(GNTMAP_host_map | GNTMAP_readonly)
    buf = bytearray(b"".join(m.pack(a, flags, r, g.domid, 0, 0, 0)
                             for a, r in zip(addrs, refs, strict=True)))
    assert hc.grant_table_op_raw(GNTTABOP_map_grant_ref, buf, len(refs)) == 0
    results = [m.unpack_from(buf, i * m.size) for i in range(len(refs))]
    assert [r[4] for r in results] == [GNTST_okay] * 3
    assert [bytes(hc.mapped_page(r[5])[:1]) for r in results] == [b"\x01", b"\x02", b"\x03"]
    assert [g.gnttab.gnttab_end_foreign_access_ref(r) for r in refs] == [0, 0, 0]
    assert g.domain.statistics().grants_pinned == pinned + 3
    ubuf = bytearray(b"".join(u.pack(a, 0, r[5], 0) for a, r in zip(addrs, results,
                                                                    strict=True)))
    assert hc.grant_table_op_raw(GNTTABOP_unmap_grant_ref, ubuf, len(refs)) == 0
    assert [u.unpack_from(ubuf, i * u.size)[3] for i in range(3)] == [GNTST_okay] * 3
    for a in addrs:
        assert hc.foreign.free(a) == 0
    for ref, pfn in zip(refs, pfns, strict=True):
        assert g.gnttab.gnttab_end_foreign_access_ref(ref) == 1
        g.gnttab.gnttab_free_grant_reference(ref)
        assert pfn is not None
        g.kernel.vm_page_free(pfn)
