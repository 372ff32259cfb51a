"""Reference lists while a grant-table free callback waits, and lists of one reference.

FreeBSD ``sys/xen/gnttab.c``: ``get_free_entries`` (under ``gnttab_list_lock``) cuts
the references from the head of the free list, and a waiting free callback
(``gnttab_request_free_callback``) is checked by ``put_free_entry`` /
``do_free_callbacks`` whenever references come back. gntdma keeps a starving
callback's count back from other allocations and counts each allocation that
overtakes a waiting callback. ``gnttab_alloc_grant_reference_list`` takes the
references in place when no callback waits; these tests hold it, with callbacks
waiting and with one-reference lists (valid, already free, reserved, past the
end), to what ``gnttab_alloc_grant_references`` with a claim per reference and
the release/free chain calls leave: the table, the free list order, the
callbacks' overtakings and the reports.
"""

from __future__ import annotations

import random

from test_gnttab_ref_lists import _alloc_one_by_one, _free_one_by_one

from gntdma.toolstack.host import Host
from gntdma.xen.gnttab import GntTab, GnttabFreeCallback


def _state(gt: GntTab) -> tuple[object, ...]:
    return (list(gt.next), bytes(gt.is_free), gt.free_head, gt.free_count, gt.double_frees,
            list(gt.reports), gt.peak_allocated, gt.nr_frames,
            [(cb.count, cb.overtaken, cb.queued) for cb in gt.callbacks])


def test_reference_lists_leave_the_table_as_the_chain_calls_do_while_a_callback_waits(
        host: Host) -> None:
    rng = random.Random(1406)
    one = host.create_guest("one", max_grant_frames=2).gnttab
    many = host.create_guest("many", max_grant_frames=2).gnttab
    ran: dict[str, int] = {"one": 0, "many": 0}
    cbs = {"one": GnttabFreeCallback(), "many": GnttabFreeCallback()}
    held: list[list[int]] = []
    waited = 0
    for step in range(1200):
        if step % 150 == 0:  # a callback waiting for more than is free now
            more = rng.randint(1, 40)
            for name, gt in (("one", one), ("many", many)):
                if not cbs[name].queued:
                    gt.gnttab_request_free_callback(
                        cbs[name], lambda arg: ran.__setitem__(str(arg), ran[str(arg)] + 1),
                        name, gt.free_count + more)
        waited += one.callbacks != []
        if held and rng.random() < 0.45:
            refs = held.pop(rng.randrange(len(held)))
            _free_one_by_one(one, refs)
            many.gnttab_free_grant_reference_list(refs)
        else:
            n = rng.choice([1, 1, 2, 11, rng.randint(1, 120)])
            want = _alloc_one_by_one(one, n)
            got = many.gnttab_alloc_grant_reference_list(n)
            assert got == want, step
            if want[0] == 0:
                held.append(want[1])
        assert _state(many) == _state(one), step
    assert waited > 300
    assert any(cb.overtaken > 0 for cb in cbs.values()) or ran["one"] > 0
    for refs in held:
        _free_one_by_one(one, refs)
        many.gnttab_free_grant_reference_list(refs)
    for name, gt in (("one", one), ("many", many)):
        if cbs[name].queued:
            gt.gnttab_cancel_free_callback(cbs[name])
    assert _state(many) == _state(one)


def test_a_list_of_one_reference_is_freed_and_reported_as_the_chain_calls_do(
        host: Host) -> None:
    one = host.create_guest("one", max_grant_frames=1).gnttab
    many = host.create_guest("many", max_grant_frames=1).gnttab
    error, refs = _alloc_one_by_one(one, 3)
    assert (error, refs) == many.gnttab_alloc_grant_reference_list(3)
    link = -1
    for i, bad in enumerate(([refs[0]], [refs[0]], [3], [1 << 20], [refs[1]], [refs[2]])):
        # freed; already free (a double free); reserved; past the end; freed; freed
        if i == 1:
            link = one.next[refs[0]]
        _free_one_by_one(one, bad)
        many.gnttab_free_grant_reference_list(bad)
        assert _state(many) == _state(one), bad
        if i == 1:
            # The release of the already free ref rewrote its link on the free list
            # in both: put back (as the other double-free test does) for the teardown.
            for gt in (one, many):
                gt.next[refs[0]] = link
    assert one.double_frees == 1
    assert [r.split(":")[0] for r in one.reports] == [
        "gnttab_free_grant_references", "gnttab_free_grant_reference",
        "gnttab_free_grant_reference"]
