"""Hypothesis state machine: the guest grant table against a simple model.

The model follows DESIGN section 7 on free callbacks: a queued callback is
overtaken once by each allocation that succeeds while it waits; the first one
(in request order) overtaken ``max_overtakings`` times is starving, and the
free references up to its count are kept for it: an allocation by anyone else
takes only the rest, and the table grows (FreeBSD sys/xen/gnttab.c,
get_free_entries: gnttab_expand when too few are free) until that rest suffices.
"""

from __future__ import annotations

import errno

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
)

from gntdma.abi.grant_table import (
    GNTMAP_host_map,
    GNTMAP_readonly,
    GNTST_general_error,
    GNTST_okay,
    GnttabMapGrantRef,
    GNTTABOP_map_grant_ref,
    GNTTABOP_unmap_grant_ref,
    GnttabUnmapGrantRef,
    GTF_permit_access,
    GTF_readonly,
)
from gntdma.sched import WITNESS
from gntdma.toolstack.host import Host
from gntdma.xen.gnttab import (
    GNTTAB_LIST_END,
    GNTTAB_MAX_OVERTAKINGS,
    GnttabFreeCallback,
    GrantRefHead,
)

MAX_FRAMES = 3
#: A lower bound than GNTTAB_MAX_OVERTAKINGS, so that runs of 40 steps often starve.
OVERTAKINGS = 2


class GnttabMachine(RuleBasedStateMachine):
    chains = Bundle("chains")
    claimed = Bundle("claimed")
    callbacks = Bundle("callbacks")

    def __init__(self) -> None:
        super().__init__()
        WITNESS.reset()
        self.host = Host()
        self.g = self.host.create_guest("g", max_grant_frames=MAX_FRAMES)
        self.gt = self.g.gnttab
        self.gt.max_overtakings = OVERTAKINGS
        self.frames = 1
        self.chain_refs: dict[int, list[int]] = {}  # id(head) -> refs in the chain
        self.heads: dict[int, GrantRefHead] = {}
        self.owned: set[int] = set()  # claimed refs held by the test
        self.granted: dict[int, tuple[int, bool, int]] = {}  # ref -> (frame, ro, grantee)
        self.mapped: dict[int, tuple[int, int]] = {}  # ref -> (dom0 handle, host address)
        self.queued: dict[int, tuple[GnttabFreeCallback, int]] = {}  # in request order
        self.overtaken: dict[int, int] = {}  # cb id -> allocations that passed it
        self.fired: list[tuple[int, int, int]] = []  # (cb id, count, free at run)

    def teardown(self) -> None:
        try:
            for handle, addr in list(self.mapped.values()):
                assert self._unmap(handle, addr) == GNTST_okay
            for cb, _ in self.queued.values():
                self.gt.gnttab_cancel_free_callback(cb)
            for ref in list(self.owned):
                if ref in self.granted:
                    assert self.gt.gnttab_end_foreign_access_ref(ref) == 1
                self.gt.gnttab_free_grant_reference(ref)
            for head in self.heads.values():
                if head.head != GNTTAB_LIST_END:
                    self.gt.gnttab_free_grant_references(head.head)
            self.host.sched.yield_()
            assert self.host.leaks() == []
            assert WITNESS.reports == []
        finally:
            self.host.close()

    # -- model helpers ----------------------------------------------------------

    def model_free(self) -> int:
        held = sum(len(r) for r in self.chain_refs.values()) + len(self.owned)
        return self.frames * 512 - 8 - held

    def model_keep(self) -> int:
        """The count of the starving callback, if one is queued (DESIGN section 7)."""
        for cid, (_, count) in self.queued.items():
            if self.overtaken.get(cid, 0) >= OVERTAKINGS:
                return count
        return 0

    def model_kept(self) -> int:
        return min(self.model_keep(), self.model_free())

    def _unmap(self, handle: int, addr: int) -> int:
        op = GnttabUnmapGrantRef(host_addr=addr, handle=handle)
        _, (r,) = self.host.dom0.hc.grant_table_op(GNTTABOP_unmap_grant_ref, [op])
        assert isinstance(r, GnttabUnmapGrantRef)
        if r.status == GNTST_okay and addr != 0:
            assert self.host.dom0.hc.foreign.free(addr) == 0
        return r.status

    # -- rules ---------------------------------------------------------------------

    @rule(target=chains, count=st.integers(1, 700))
    def alloc(self, count: int) -> GrantRefHead:
        free = self.model_free()
        keep = self.model_keep()
        error, head = self.gt.gnttab_alloc_grant_references(count)
        if free - min(keep, free) < count:
            need = -(-(count + keep - free) // 512)
            if self.frames + need > MAX_FRAMES:
                assert error == errno.ENOSPC and head.head == GNTTAB_LIST_END
                return head
            self.frames += need
        assert error == 0
        refs = []
        ref = head.head
        while ref != GNTTAB_LIST_END:
            refs.append(ref)
            ref = self.gt.next[ref]
        assert len(refs) == count
        for cid in self.queued:
            self.overtaken[cid] = self.overtaken.get(cid, 0) + 1
        self.chain_refs[id(head)] = refs
        self.heads[id(head)] = head
        return head

    @rule(target=claimed, head=chains)
    def claim(self, head: GrantRefHead) -> int:
        refs = self.chain_refs.get(id(head), [])
        ref = self.gt.gnttab_claim_grant_reference(head)
        if not refs:
            assert ref == GNTTAB_LIST_END
            self.gt.reports.clear()
            return ref
        assert ref == refs.pop(0)
        self.owned.add(ref)
        return ref

    @rule(head=chains, ref=consumes(claimed))
    def release(self, head: GrantRefHead, ref: int) -> None:
        if ref not in self.owned or ref in self.granted or id(head) not in self.chain_refs:
            return
        self.gt.gnttab_release_grant_reference(head, ref)
        self.owned.discard(ref)
        self.chain_refs[id(head)].insert(0, ref)

    @rule(head=consumes(chains))
    def free_chain(self, head: GrantRefHead) -> None:
        if id(head) not in self.chain_refs:
            return
        self.gt.gnttab_free_grant_references(head.head)
        if head.head == GNTTAB_LIST_END:
            self.gt.reports.clear()
        del self.chain_refs[id(head)]
        del self.heads[id(head)]
        self.host.sched.yield_()

    @rule(ref=consumes(claimed))
    def free_one(self, ref: int) -> None:
        if ref not in self.owned or ref in self.granted:
            return
        self.gt.gnttab_free_grant_reference(ref)
        self.owned.discard(ref)
        self.host.sched.yield_()

    @rule(ref=claimed, frame=st.integers(0, 255), ro=st.booleans())
    def grant(self, ref: int, frame: int, ro: bool) -> None:
        if ref not in self.owned or ref in self.mapped:
            return
        self.gt.gnttab_grant_foreign_access_ref(ref, 0, frame, ro)
        self.granted[ref] = (frame, ro, 0)
        flags = GTF_permit_access | (GTF_readonly if ro else 0)
        assert self.gt.entry(ref) == (flags, 0, frame)

    @rule(ref=claimed, ro_map=st.booleans())
    def backend_map(self, ref: int, ro_map: bool) -> None:
        if ref not in self.owned or ref in self.mapped:
            return
        flags = GNTMAP_host_map | (GNTMAP_readonly if ro_map else 0)
        hc = self.host.dom0.hc
        error, addr = hc.foreign.alloc()
        assert error == 0
        op = GnttabMapGrantRef(host_addr=addr, flags=flags, ref=ref, dom=self.g.domid)
        _, (r,) = hc.grant_table_op(GNTTABOP_map_grant_ref, [op])
        assert isinstance(r, GnttabMapGrantRef)
        g = self.granted.get(ref)
        if g is None or (g[1] and not ro_map) or g[2] != 0:
            assert r.status == GNTST_general_error
            assert hc.foreign.free(addr) == 0
            return
        assert r.status == GNTST_okay
        assert r.dev_bus_addr == g[0] << 12  # map_grant_ref reports it on every map
        self.mapped[ref] = (r.handle, addr)

    @rule(ref=claimed)
    def backend_unmap(self, ref: int) -> None:
        m = self.mapped.pop(ref, None)
        if m is not None:
            assert self._unmap(*m) == GNTST_okay

    @rule(ref=claimed, wrong=st.booleans())
    def backend_unmap_at_wrong_address(self, ref: int, wrong: bool) -> None:
        # unmap_common: with host_addr 0 (and no dev_bus_addr) nothing is done
        # (GNTST_okay); at another address replace_grant_p2m_mapping fails
        # (GNTST_general_error). Either way the mapping stays.
        m = self.mapped.get(ref)
        if m is None:
            return
        addr = m[1] + (1 << 30) if wrong else 0
        assert self._unmap(m[0], addr) == (GNTST_general_error if wrong else GNTST_okay)

    @rule(ref=claimed)
    def regrant_pinned_entry_to_self_and_map(self, ref: int) -> None:
        # A hostile granter rewrites the domid of an entry dom0 has mapped, to
        # itself, and maps it: map_grant_ref refuses a pinned entry whose active
        # domid is another domain's (GNTST_general_error).
        if ref not in self.mapped or ref not in self.owned:
            return
        frame, ro, _ = self.granted[ref]
        table = self.g.domain.gnttab
        flags, _, _ = table.read(ref)
        table.write(ref, flags, self.g.domid, frame)
        self.granted[ref] = (frame, ro, self.g.domid)
        hc = self.g.hc
        error, addr = hc.foreign.alloc()
        assert error == 0
        op = GnttabMapGrantRef(host_addr=addr, flags=GNTMAP_host_map | GNTMAP_readonly,
                               ref=ref, dom=self.g.domid)
        _, (r,) = hc.grant_table_op(GNTTABOP_map_grant_ref, [op])
        assert isinstance(r, GnttabMapGrantRef) and r.status == GNTST_general_error
        assert hc.foreign.free(addr) == 0

    @rule(ref=claimed)
    def end_access(self, ref: int) -> None:
        if ref not in self.owned:
            return
        rv = self.gt.gnttab_end_foreign_access_ref(ref)
        if ref in self.mapped:
            assert rv == 0
        else:
            assert rv == 1
            self.granted.pop(ref, None)
            assert self.gt.entry(ref)[0] == 0

    @rule(target=callbacks, count=st.integers(1, 600))
    def request_callback(self, count: int) -> GnttabFreeCallback:
        cb = GnttabFreeCallback()

        def fn(_arg: object) -> None:
            self.fired.append((id(cb), count, self.gt.free_count))

        self.gt.gnttab_request_free_callback(cb, fn, None, count)
        self.queued[id(cb)] = (cb, count)
        self.overtaken[id(cb)] = 0
        self.host.sched.yield_()
        return cb

    @rule(cb=callbacks)
    def cancel_callback(self, cb: GnttabFreeCallback) -> None:
        self.gt.gnttab_cancel_free_callback(cb)
        self.queued.pop(id(cb), None)

    # -- invariants ------------------------------------------------------------------

    @invariant()
    def free_count_matches(self) -> None:
        assert self.gt.free_count == self.model_free()
        assert self.gt.kept == self.model_kept()
        assert self.gt.nr_frames == self.frames

    @invariant()
    def every_ref_is_in_exactly_one_place(self) -> None:
        free: list[int] = []
        ref = self.gt.free_head
        while ref != GNTTAB_LIST_END:
            free.append(ref)
            ref = self.gt.next[ref]
        places = free + [r for refs in self.chain_refs.values() for r in refs]
        places += list(self.owned)
        assert len(places) == len(set(places))
        assert set(places) == set(range(8, self.frames * 512))

    @invariant()
    def callbacks_fire_once_when_available(self) -> None:
        ids = [f[0] for f in self.fired]
        for cid, count, free_then in self.fired:
            assert free_then >= count
            self.queued.pop(cid, None)
        assert len(ids) == len(set(ids))


GnttabMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40,
                                           deadline=None)
test_gnttab_state_machine = GnttabMachine.TestCase


def test_alloc_grows_past_the_references_kept_for_a_starving_callback() -> None:
    # FreeBSD sys/xen/gnttab.c, get_free_entries: an allocation that finds too few
    # free references grows the table (gnttab_expand) and fails only if it cannot.
    # With the references kept for a starving callback (DESIGN section 7) the
    # growth must leave ``count`` free beside the whole count it waits for: while
    # fewer than that are free, every free one is kept.
    host = Host()
    try:
        gt = host.create_guest("g", max_grant_frames=MAX_FRAMES).gnttab
        ran: list[int] = []
        cb = GnttabFreeCallback()
        gt.gnttab_request_free_callback(cb, lambda _arg: ran.append(gt.free_count), None, 585)
        heads = []
        for _ in range(GNTTAB_MAX_OVERTAKINGS):
            error, head = gt.gnttab_alloc_grant_references(1)
            assert error == 0
            heads.append(head)
        assert gt.kept == 512 - 8 - GNTTAB_MAX_OVERTAKINGS  # every free one
        error, head = gt.gnttab_alloc_grant_references(425)
        assert error == 0 and head.head != GNTTAB_LIST_END
        heads.append(head)
        assert gt.nr_frames == 3  # 425 + 585 - 496 more: two frames
        assert gt.kept == 585
        host.sched.yield_()
        assert len(ran) == 1 and ran[0] >= 585
        for h in heads:
            gt.gnttab_free_grant_references(h.head)
        host.sched.yield_()
        assert host.leaks() == []
    finally:
        host.close()


def test_cancelling_a_starving_callback_hands_its_kept_references_to_the_waiters() -> None:
    # FreeBSD sys/xen/gnttab.c, gnttab_cancel_free_callback only unlinks the
    # callback, and check_free_callbacks/do_free_callbacks run on each free.
    # With the references kept for a starving callback (DESIGN section 7), the
    # cancel itself releases free references: a waiter they now satisfy must be
    # delivered then, not at some later free that may never come.
    host = Host()
    try:
        gt = host.create_guest("g", max_grant_frames=1).gnttab
        error, held = gt.gnttab_alloc_grant_references(gt.free_count - GNTTAB_MAX_OVERTAKINGS)
        assert error == 0
        big, small = GnttabFreeCallback(), GnttabFreeCallback()
        ran: list[str] = []
        gt.gnttab_request_free_callback(big, lambda _arg: ran.append("big"), None,
                                        GNTTAB_MAX_OVERTAKINGS + 1)
        refs = []
        for _ in range(GNTTAB_MAX_OVERTAKINGS):  # each overtakes the big one
            error, head = gt.gnttab_alloc_grant_references(1)
            assert error == 0
            refs.append(head.head)
        gt.gnttab_free_grant_references(refs.pop())
        host.sched.yield_()
        assert gt.free_count == 1 and gt.kept == 1  # kept for the starving one
        error, _ = gt.gnttab_alloc_grant_references(1)
        assert error == errno.ENOSPC
        gt.gnttab_request_free_callback(small, lambda _arg: ran.append("small"), None, 1)
        host.sched.yield_()
        assert ran == []
        gt.gnttab_cancel_free_callback(big)
        assert gt.kept == 0
        host.sched.yield_()
        assert ran == ["small"]
        for ref in refs:
            gt.gnttab_free_grant_references(ref)
        gt.gnttab_free_grant_references(held.head)
        host.sched.yield_()
        assert host.leaks() == [] and gt.reports == []
    finally:
        host.close()
