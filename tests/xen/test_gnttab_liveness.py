"""Grant-table and busdma_xen liveness (issue 10 item 4, DESIGN sections 6 and 7).

FreeBSD reference: sys/dev/xen/grant_table/grant_table.c, ``do_free_callbacks``
(each queued callback is visited once and runs if ``gnttab_free_count >= cb->count``
at that moment) and ``check_free_callbacks``; ``gnttab_free_grant_reference(s)``
(``put_free_entry``), which trusts its caller (a double free corrupts the list
there; gntdma reports it instead, DESIGN section 7).
"""

from __future__ import annotations

import errno

import pytest
from busdma_helpers import (
    PAGE,
    Loads,
    driver_tag,
    hold_refs,
    kbuf,
    pattern,
    peer_map,
    peer_unmap,
    release_refs,
    settle,
)

from gntdma.abi.grant_table import GNTST_okay
from gntdma.sched import WITNESS, Mutex, mtx_lock, mtx_unlock
from gntdma.sys import (
    BUS_DMA_NOWAIT,
    M_DEVBUF,
    BusDmaMap,
    BusDmaTag,
    bus_dma_tag_destroy,
    bus_dmamap_create,
    bus_dmamap_destroy,
    bus_dmamap_load,
    bus_dmamap_unload,
)
from gntdma.toolstack.host import Guest, Host
from gntdma.xen.busdma import BUS_DMA_XEN_PREALLOC_REFS, xen_dmamap_get_grefs
from gntdma.xen.gnttab import GNTTAB_LIST_END, GnttabFreeCallback


def _free_list(g: Guest) -> list[int]:
    """The refs on the free list, walked from its head (bounded: a loop shows)."""
    gt = g.gnttab
    out, ref = [], gt.free_head
    while ref != GNTTAB_LIST_END and len(out) <= gt.free_count + 1:
        out.append(ref)
        ref = gt.next[ref]
    return out


# -- callbacks as do_free_callbacks delivers them --------------------------------------------


@pytest.mark.parametrize("delivery", ["taskqueue", "inline"])
def test_free_callback_that_takes_nothing_does_not_hold_back_the_next(delivery: str) -> None:
    """3 free, two callbacks of 2, the first takes none: the second runs too."""
    WITNESS.reset()
    host = Host(callback_delivery=delivery)
    try:
        g = host.create_guest("g", max_grant_frames=1)
        heads = hold_refs(g, leave=0)
        ran: list[str] = []
        cb1, cb2 = GnttabFreeCallback(), GnttabFreeCallback()
        g.gnttab.gnttab_request_free_callback(cb1, lambda _a: ran.append("first"), None, 2)
        g.gnttab.gnttab_request_free_callback(cb2, lambda _a: ran.append("second"), None, 2)
        error, _ = g.gnttab.gnttab_alloc_grant_references(1)
        assert error != 0  # nothing free yet
        # Give back exactly three references.
        head = heads.pop()
        gt = g.gnttab
        chain = [head]
        while gt.next[chain[-1]] != GNTTAB_LIST_END:
            chain.append(gt.next[chain[-1]])
        rest = gt.next[chain[2]]
        gt.next[chain[2]] = GNTTAB_LIST_END
        if rest != GNTTAB_LIST_END:
            heads.append(rest)
        gt.gnttab_free_grant_references(head)
        settle(host)
        assert ran == ["first", "second"]
        assert gt.statistics().callbacks_queued == 0
        release_refs(g, heads)
        settle(host)
        assert host.leaks() == []
    finally:
        host.close()
        WITNESS.reset()


# -- a waiting load is never starved forever ---------------------------------------------------


def _map(tag: BusDmaTag, flags: int = 0) -> BusDmaMap:
    error, m = bus_dmamap_create(tag, flags)
    assert error == 0 and m is not None
    return m


def test_waiting_load_is_not_starved_by_later_smaller_loads(host: Host) -> None:
    """A 4-page load waits; each reference freed is taken at once by a later one-page
    load, so four are never free together. As in FreeBSD the small loads overtake the
    big one, but only a bounded number of times: then the freed references are kept
    for it and it completes (DESIGN section 7)."""
    g = host.create_guest("g", max_grant_frames=1)
    lock = Mutex("drv")
    tag = driver_tag(g, lock, nsegments=4, maxsize=4 * PAGE, alignment=PAGE)
    data = pattern(4 * PAGE, 1)
    big_va = kbuf(g.kernel, data)
    small_va = kbuf(g.kernel, pattern(PAGE, 2))
    small = [_map(tag) for _ in range(4)]
    loads = Loads(lock)
    for m in small:
        assert bus_dmamap_load(tag, m, small_va, PAGE, loads.cb, None, BUS_DMA_NOWAIT) == 0
    heads = hold_refs(g, leave=0)
    big = _map(tag)
    big_loads = Loads(lock)
    mtx_lock(lock)
    assert bus_dmamap_load(tag, big, big_va, 4 * PAGE, big_loads.cb, None, 0) \
        == errno.EINPROGRESS
    mtx_unlock(lock)
    refused = 0
    for step in range(60):
        m = small[step % 4]
        if m.state.name == "LOADED":
            bus_dmamap_unload(tag, m)  # one reference freed...
        # ...and a later, smaller load wants it at once
        if bus_dmamap_load(tag, m, small_va, PAGE, loads.cb, None, BUS_DMA_NOWAIT) != 0:
            refused += 1
        settle(host)
        if big_loads.calls:
            break
    assert len(big_loads.calls) == 1 and big_loads.calls[0][2] == 0, (step, refused)
    assert refused > 0 and step < 4 * g.gnttab.max_overtakings
    assert len(xen_dmamap_get_grefs(big)) == 4
    for m in (*small, big):
        bus_dmamap_unload(tag, m)
        assert bus_dmamap_destroy(tag, m) == 0
    release_refs(g, heads)
    assert bus_dma_tag_destroy(tag) == 0
    g.kernel.free(big_va, M_DEVBUF)
    g.kernel.free(small_va, M_DEVBUF)


# -- a prealloc map keeps nsegments references --------------------------------------------------


def _prealloc_map_with_a_pinned_ref(host: Host, g: Guest, lock: Mutex, tag: BusDmaTag,
                                    va: int) -> tuple[BusDmaMap, list[int], int]:
    m = _map(tag, BUS_DMA_XEN_PREALLOC_REFS)
    held = list(m.refs)  # type: ignore[attr-defined]
    assert bus_dmamap_load(tag, m, va, 3 * PAGE, Loads(lock).cb, None, BUS_DMA_NOWAIT) == 0
    status, handle = peer_map(host.dom0, g, held[1], writable=False)
    assert status == GNTST_okay
    return m, held, handle


def test_prealloc_map_keeps_nsegments_refs_after_a_still_mapped_unload(host: Host) -> None:
    g = host.create_guest("g", max_grant_frames=1)
    lock = Mutex("drv")
    tag = driver_tag(g, lock, nsegments=3, maxsize=3 * PAGE, alignment=1)
    va = kbuf(g.kernel, pattern(3 * PAGE, 7))
    m, held, handle = _prealloc_map_with_a_pinned_ref(host, g, lock, tag, va)
    bus_dmamap_unload(tag, m)
    g.kernel.dma_debug.reset()
    g.gnttab.reports.clear()
    refs = m.refs  # type: ignore[attr-defined]
    assert len(refs) == 3 and held[1] not in refs and refs[:2] == [held[0], held[2]]
    heads = hold_refs(g, leave=0)  # nothing free: the map needs none of the table's
    assert bus_dmamap_load(tag, m, va, 3 * PAGE, Loads(lock).cb, None, BUS_DMA_NOWAIT) == 0
    bus_dmamap_unload(tag, m)
    peer_unmap(host.dom0, handle)
    host.sched.run(until=lambda: g.gnttab.statistics().reclaim_pending == 0)
    release_refs(g, heads)
    assert bus_dmamap_destroy(tag, m) == 0
    assert bus_dma_tag_destroy(tag) == 0
    g.kernel.free(va, M_DEVBUF)


def test_prealloc_map_short_at_unload_gets_its_replacement_from_a_free_callback(
        host: Host) -> None:
    g = host.create_guest("g", max_grant_frames=1)
    lock = Mutex("drv")
    tag = driver_tag(g, lock, nsegments=3, maxsize=3 * PAGE, alignment=1)
    va = kbuf(g.kernel, pattern(3 * PAGE, 8))
    m, _, handle = _prealloc_map_with_a_pinned_ref(host, g, lock, tag, va)
    heads = hold_refs(g, leave=0)
    bus_dmamap_unload(tag, m)  # no replacement to be had now
    g.kernel.dma_debug.reset()
    g.gnttab.reports.clear()
    assert len(m.refs) == 2  # type: ignore[attr-defined]
    release_refs(g, [heads.pop()])  # one chain back: plenty for the one missing ref
    settle(host)
    assert len(m.refs) == 3  # type: ignore[attr-defined]
    assert g.gnttab.statistics().callbacks_queued == 0
    peer_unmap(host.dom0, handle)
    host.sched.run(until=lambda: g.gnttab.statistics().reclaim_pending == 0)
    release_refs(g, heads)
    assert bus_dmamap_destroy(tag, m) == 0
    assert bus_dma_tag_destroy(tag) == 0
    g.kernel.free(va, M_DEVBUF)


# -- double free ------------------------------------------------------------------------------


def test_double_free_of_a_grant_reference_is_reported_and_keeps_the_free_list(
        host: Host) -> None:
    g = host.create_guest("g")
    gt = g.gnttab
    error, head = gt.gnttab_alloc_grant_references(3)
    assert error == 0
    refs = [gt.gnttab_claim_grant_reference(head) for _ in range(3)]
    gt.gnttab_free_grant_reference(refs[0])
    free = gt.free_count
    gt.gnttab_free_grant_reference(refs[0])  # again
    assert gt.free_count == free
    assert any("double free" in r for r in gt.reports)
    walked = _free_list(g)
    assert len(walked) == len(set(walked)) == gt.free_count
    # A chain holding a reference that is already free is refused whole.
    for ref in refs[1:]:
        gt.gnttab_release_grant_reference(head, ref)
    gt.next[refs[1]] = refs[0]  # refs[2] -> refs[1] -> refs[0] (free)
    gt.gnttab_free_grant_references(head.head)
    assert gt.free_count == free
    walked = _free_list(g)
    assert len(walked) == len(set(walked)) == gt.free_count
    assert gt.statistics().double_frees == 2
    gt.next[refs[1]] = GNTTAB_LIST_END
    gt.gnttab_free_grant_references(head.head)  # the real chain goes back
    assert gt.free_count == free + 2
    gt.reports.clear()
