"""Allocating and freeing the references of a whole load at once.

FreeBSD's ``sys/xen/gnttab.c`` takes references with ``gnttab_alloc_grant_references``
(a private chain cut from the head of the free list, ``get_free_entries``) and one
``gnttab_claim_grant_reference`` per reference; busdma_xen gives them back with
``gnttab_release_grant_reference`` of each onto a chain and one
``gnttab_free_grant_references`` (``put_free_entry`` of the chain, the free
callbacks checked once). ``GntTab.gnttab_alloc_grant_reference_list`` and
``gnttab_free_grant_reference_list`` do each in one call, and must leave the
table, the free list order and the reports exactly as those calls do, misuse
included (an invalid, repeated or already free reference).
"""

from __future__ import annotations

import random

import pytest

from gntdma.abi.grant_table import GTF_permit_access
from gntdma.sched import RandomStrategy, current_scheduler
from gntdma.toolstack.host import Host
from gntdma.xen.gnttab import GntTab, GrantRefHead


def _state(gt: GntTab) -> tuple[object, ...]:
    return (list(gt.next), bytes(gt.is_free), gt.free_head, gt.free_count, gt.double_frees,
            list(gt.reports), gt.peak_allocated, gt.nr_frames)


def _alloc_one_by_one(gt: GntTab, n: int) -> tuple[int, list[int]]:
    error, head = gt.gnttab_alloc_grant_references(n)
    if error != 0:
        return error, []
    return 0, [gt.gnttab_claim_grant_reference(head) for _ in range(n)]


def _free_one_by_one(gt: GntTab, refs: list[int]) -> None:
    """What busdma_xen did with a load's refs before the list call: a chain, or, when
    a ref is invalid or repeated (the chain would loop), one free per ref; nothing for
    no refs."""
    if not refs:
        return
    if len(set(refs)) != len(refs) or not all(gt.ref_is_valid(r) for r in refs):
        for ref in refs:
            gt.gnttab_free_grant_reference(ref)
        return
    head = GrantRefHead()
    for ref in refs:
        gt.gnttab_release_grant_reference(head, ref)
    gt.gnttab_free_grant_references(head.head)


def test_reference_lists_leave_the_table_as_alloc_claim_release_and_free_leave_it(
        host: Host) -> None:
    rng = random.Random(14)
    one = host.create_guest("one", max_grant_frames=3).gnttab
    many = host.create_guest("many", max_grant_frames=3).gnttab
    held: list[list[int]] = []
    leaked: list[int] = []
    misuse = 0
    for step in range(1500):
        if held and rng.random() < 0.45:
            refs = held.pop(rng.randrange(len(held)))
            bad = rng.random()
            if bad < 0.05:
                refs = [*refs, refs[0]]  # repeated: every ref freed, one double free
            elif bad < 0.1:
                refs = [*refs, rng.choice([3, 1 << 20])]  # reserved, past the end
            misuse += bad < 0.1
            _free_one_by_one(one, refs)
            many.gnttab_free_grant_reference_list(refs)
        else:
            n = rng.choice([1, 2, 11, 256, rng.randint(0, 600)])
            want = _alloc_one_by_one(one, n)
            got = many.gnttab_alloc_grant_reference_list(n)
            assert got == want, step
            if want[0] == 0:
                held.append(want[1])
        assert _state(many) == _state(one), step
    many.gnttab_free_grant_reference_list([])
    _free_one_by_one(one, [])
    assert _state(many) == _state(one)
    assert misuse > 20 and one.double_frees > 0 and one.reports
    # A ref already free among them: the same double-free report, nothing freed (the
    # release of the free ref rewrites its link on the free list in both: put back).
    refs = held.pop()
    _free_one_by_one(one, refs[-1:])
    many.gnttab_free_grant_reference_list(refs[-1:])
    link = one.next[refs[-1]]
    _free_one_by_one(one, refs)
    many.gnttab_free_grant_reference_list(refs)
    assert _state(many) == _state(one)
    assert one.reports[-1].startswith("gnttab_free_grant_references: double free")
    leaked.extend(refs[:-1])
    for gt in (one, many):
        gt.next[refs[-1]] = link
        for ref in leaked:
            gt.gnttab_free_grant_reference(ref)
    for refs in held:
        _free_one_by_one(one, refs)
        many.gnttab_free_grant_reference_list(refs)
    assert _state(many) == _state(one)


def test_granting_many_refs_is_a_scheduling_point_at_each_barrier_under_preemption(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    """``gnttab_grant_foreign_access_ref`` has its ``wmb()`` between the frame and the
    flags of each entry (FreeBSD ``sys/xen/gnttab.c``): under a preemptive strategy
    another domain may run there, for every entry of a load."""
    g = host.create_guest("g")
    gt = g.gnttab
    error, refs = gt.gnttab_alloc_grant_reference_list(6)
    assert error == 0
    sched = current_scheduler()
    yields: list[str] = []
    real = sched.yield_

    def yield_(point: str) -> None:  # where a preemptive strategy may switch threads
        yields.append(point)
        real(point)

    monkeypatch.setattr(sched, "yield_", yield_)
    saved = sched.strategy
    for strategy, barriers in ((saved, 0), (RandomStrategy(7), 6)):
        sched.strategy = strategy
        try:
            yields.clear()
            gt.gnttab_grant_foreign_access_refs(refs, 0, list(range(300, 306)), False)
        finally:
            sched.strategy = saved
        assert yields.count("wmb") == barriers
        assert [gt.entry(r) for r in refs] == [(GTF_permit_access, 0, 300 + i) for i in range(6)]
        assert gt.gnttab_end_foreign_access_refs(refs) == []
    gt.gnttab_free_grant_reference_list(refs)


def test_a_repeated_ref_in_a_list_is_one_double_free_and_the_others_are_freed(
        host: Host) -> None:
    """DESIGN 7: a double free of a reference is reported, never corrupting the free
    list. Released onto one chain a repeated ref would loop it (FreeBSD's
    ``gnttab_release_grant_reference`` links it again) and lose every ref after it."""
    gt = host.create_guest("g", max_grant_frames=1).gnttab
    free0 = gt.free_count
    error, refs = gt.gnttab_alloc_grant_reference_list(20)
    assert error == 0
    gt.gnttab_free_grant_reference_list([*refs[:10], refs[3], *refs[10:]])
    assert gt.free_count == free0
    assert gt.double_frees == 1
    assert gt.reports[-1].startswith("gnttab_free_grant_reference: double free")
