"""gnttab_free_grant_references walks a private chain once.

FreeBSD ``sys/xen/gnttab.c`` ``gnttab_free_grant_references``: it walks the chain
to its tail (counting), then under ``gnttab_list_lock`` splices the whole chain
onto the head of the free list and checks the free callbacks. gntdma checks each
ref of the chain on the walk (an already free ref or a chain longer than the
table, i.e. a loop, is a reported double free and changes nothing). The walk now
keeps the chain's refs and marks them free in one pass (one slice for
consecutive refs); this test holds it to the two-walk version, written out here,
on random chains: consecutive, shuffled, with a free ref inside, looping.
"""

from __future__ import annotations

import random

from gntdma.toolstack.host import Host
from gntdma.xen.gnttab import GNTTAB_LIST_END, GntTab, GrantRefHead
from gntdma.xen.gnttab_types import chain_refs


def _two_walks(gt: GntTab, head: int) -> None:
    """The walk-twice version (d8ab5de), valid head assumed."""
    count, tail = 1, head
    limit = len(gt.next)
    while True:
        if gt.is_free[tail] == 1 or count > limit:
            gt._double_free("gnttab_free_grant_references", tail)
            return
        if gt.next[tail] == GNTTAB_LIST_END:
            break
        tail = gt.next[tail]
        count += 1
    ref = head
    while ref != GNTTAB_LIST_END:
        gt.is_free[ref] = 1
        ref = gt.next[ref]
    gt.next[tail] = gt.free_head
    gt.free_head = head
    gt.free_count += count
    gt._check_free_callbacks()


def _state(gt: GntTab) -> tuple[object, ...]:
    return (list(gt.next), bytes(gt.is_free), gt.free_head, gt.free_count, gt.double_frees,
            list(gt.reports))


def _chain(gt: GntTab, rng: random.Random, n: int) -> int:
    """A private chain of ``n`` refs: as allocated, or released in a shuffled order."""
    err, h = gt.gnttab_alloc_grant_references(n)
    assert err == 0
    if rng.random() < 0.5:
        return h.head
    refs = [gt.gnttab_claim_grant_reference(h) for _ in range(n)]
    rng.shuffle(refs)
    h2 = GrantRefHead()
    for ref in refs:
        gt.gnttab_release_grant_reference(h2, ref)
    return h2.head


def test_free_grant_references_walks_once_as_the_two_walks_did() -> None:
    host = Host()  # its tables end with lost refs on purpose: no leak check
    try:
        _compare(host)
    finally:
        host.close()


def _compare(host: Host) -> None:
    rng = random.Random(1412)
    a = host.create_guest("a", max_grant_frames=2).gnttab
    b = host.create_guest("b", max_grant_frames=2).gnttab
    held: list[int] = []
    kinds = {"free": 0, "loop": 0, "ok": 0}
    for step in range(600):
        if held and rng.random() < 0.5:
            head = held.pop(rng.randrange(len(held)))
            kind = rng.choice(["ok", "ok", "ok", "free", "loop"])
            if kind == "free" and head != GNTTAB_LIST_END and a.next[head] != GNTTAB_LIST_END:
                ref = a.next[head]  # a ref inside the chain already free
                for gt in (a, b):
                    gt.is_free[ref] = 1
            elif kind == "loop" and head != GNTTAB_LIST_END:
                ref = head
                while a.next[ref] != GNTTAB_LIST_END:
                    ref = a.next[ref]
                for gt in (a, b):
                    gt.next[ref] = head  # the tail points back at the head
            else:
                kind = "ok"
            kinds[kind] += 1
            _two_walks(a, head)
            b.gnttab_free_grant_references(head)
        else:
            n = rng.choice([1, 2, 3, rng.randint(1, 60)])
            if n > a.free_count:
                continue
            rs = rng.getstate()
            head = _chain(a, rng, n)
            rng.setstate(rs)
            assert _chain(b, rng, n) == head
            held.append(head)
        assert _state(b) == _state(a), step
    assert min(kinds.values()) > 5


def test_alloc_takes_a_run_of_consecutive_refs_as_the_walk_does() -> None:
    """gnttab_alloc_grant_references (FreeBSD get_free_entries: the first ``count``
    refs of the free list, the list's head after them) takes a chain that runs
    head, head + 1, ... by one comparison and one slice; against the walk
    (chain_refs, each ref marked allocated) on free lists made consecutive,
    shuffled and partly consecutive by random frees."""
    host = Host()
    try:
        rng = random.Random(1414)
        gt = host.create_guest("a", max_grant_frames=2).gnttab
        held: list[int] = []
        for step in range(400):
            if held and rng.random() < 0.45:
                gt.gnttab_free_grant_references(held.pop(rng.randrange(len(held))))
                continue
            n = rng.choice([1, 15, 16, 17, rng.randint(1, 300)])
            if n > gt.free_count:
                continue
            head, nxt = gt.free_head, list(gt.next)
            want = chain_refs(nxt, head, n)
            err, h = gt.gnttab_alloc_grant_references(n)
            assert err == 0
            got: list[int] = []
            ref = h.head
            while ref != GNTTAB_LIST_END:
                got.append(ref)
                ref = gt.next[ref]
            assert got == want, step
            assert all(gt.is_free[r] == 0 for r in got)
            assert gt.free_head == (nxt[want[-1]] if n < len(nxt) else gt.free_head)
            held.append(h.head)
        for h0 in held:
            gt.gnttab_free_grant_references(h0)
    finally:
        host.close()
