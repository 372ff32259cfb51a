"""Granting and ending access for the references of a whole load at once.

busdma_xen grants one reference per segment when a load completes and ends
them all at unload. ``GntTab.gnttab_grant_foreign_access_refs`` and
``gnttab_end_foreign_access_refs`` do that in one call, and must leave the
table exactly as FreeBSD's one-at-a-time calls do (``sys/xen/gnttab.c``):
``gnttab_grant_foreign_access_ref`` writes ``domid`` and ``frame``, a write
barrier (``wmb()``), then ``flags``; ``gnttab_end_foreign_access_ref`` clears
the flags with a compare-and-swap that fails while the grantee has the entry
pinned (``GTF_reading``/``GTF_writing``), leaving it as it was.
"""

from __future__ import annotations

import pytest
from busdma_helpers import hc_map, hc_unmap

import gntdma.xen.gnttab_types as gnttab_types
from gntdma.abi.grant_table import (
    GNTMAP_host_map,
    GNTST_okay,
    GTF_permit_access,
    GTF_readonly,
)
from gntdma.toolstack.host import Host


def test_granting_many_refs_writes_what_one_grant_at_a_time_writes(host: Host) -> None:
    g = host.create_guest("g", max_grant_frames=4)
    gt = g.gnttab
    error, head = gt.gnttab_alloc_grant_references(40)
    assert error == 0
    refs = [gt.gnttab_claim_grant_reference(head) for _ in range(40)]
    frames = [100 + 3 * i for i in range(20)]
    for readonly in (False, True):
        batch, single = (refs[:20], refs[20:]) if not readonly else (refs[20:], refs[:20])
        before = gt.statistics().granted
        gt.gnttab_grant_foreign_access_refs(batch, 0, frames, readonly)
        assert gt.statistics().granted == before + 20
        for ref, frame in zip(single, frames, strict=True):
            gt.gnttab_grant_foreign_access_ref(ref, 0, frame, readonly)
        flags = GTF_permit_access | (GTF_readonly if readonly else 0)
        assert [gt.entry(r) for r in batch] == [gt.entry(r) for r in single] == \
            [(flags, 0, f) for f in frames]
        assert gt.gnttab_end_foreign_access_refs(refs) == []
        assert gt.statistics().granted == 0
    for ref in refs:
        gt.gnttab_free_grant_reference(ref)


def test_granting_many_refs_keeps_a_write_barrier_between_each_entry_and_its_flags(
        host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    g = host.create_guest("g")
    gt = g.gnttab
    error, head = gt.gnttab_alloc_grant_references(8)
    assert error == 0
    refs = [gt.gnttab_claim_grant_reference(head) for _ in range(8)]
    seen: list[tuple[int, int, int]] = []
    real = gnttab_types.wmb

    def barrier() -> None:  # at each barrier: the next entry has domid and frame, no flags
        n = len(seen)
        seen.append(gt.entry(refs[n]))
        assert all(gt.entry(r)[0] == GTF_permit_access for r in refs[:n])
        real()

    monkeypatch.setattr(gnttab_types, "wmb", barrier)
    gt.gnttab_grant_foreign_access_refs(refs, 0, list(range(200, 208)), False)
    monkeypatch.undo()
    assert seen == [(0, 0, 200 + i) for i in range(8)]
    assert gt.gnttab_end_foreign_access_refs(refs) == []
    for ref in refs:
        gt.gnttab_free_grant_reference(ref)


def test_ending_many_refs_gives_back_the_pinned_ones_and_leaves_them_granted(
        host: Host) -> None:
    g = host.create_guest("g")
    gt = g.gnttab
    error, head = gt.gnttab_alloc_grant_references(6)
    assert error == 0
    refs = [gt.gnttab_claim_grant_reference(head) for _ in range(6)]
    pfns = [g.kernel.vm_page_alloc() for _ in refs]
    assert all(p is not None for p in pfns)
    gt.gnttab_grant_foreign_access_refs(refs, 0, [p for p in pfns if p is not None], False)
    mapped = [hc_map(host.dom0.hc, g.domid, refs[i], GNTMAP_host_map) for i in (1, 4)]
    assert all(r.status == GNTST_okay for r in mapped)
    assert gt.gnttab_end_foreign_access_refs(refs) == [refs[1], refs[4]]
    assert [gt.entry(r)[0] & GTF_permit_access != 0 for r in refs] == \
        [False, True, False, False, True, False]
    assert gt.statistics().granted == 2
    for r in mapped:
        assert hc_unmap(host.dom0.hc, r.handle) == GNTST_okay
    assert gt.gnttab_end_foreign_access_refs(refs) == []
    assert gt.statistics().granted == 0
    for ref in refs:
        gt.gnttab_free_grant_reference(ref)
    for p in pfns:
        if p is not None:
            g.kernel.vm_page_free(p)


def test_an_invalid_ref_among_many_is_reported_as_one_at_a_time_reports_it(
        host: Host) -> None:
    g = host.create_guest("g")
    gt = g.gnttab
    error, head = gt.gnttab_alloc_grant_references(2)
    assert error == 0
    a, b = gt.gnttab_claim_grant_reference(head), gt.gnttab_claim_grant_reference(head)
    bad = 3  # a reserved entry
    gt.gnttab_grant_foreign_access_refs([a, bad, b], 0, [7, 8, 9], False)
    assert gt.reports[-1] == f"gnttab_grant_foreign_access_ref: invalid ref {bad:#x}"
    assert (gt.entry(a)[2], gt.entry(b)[2]) == (7, 9)
    assert gt.gnttab_end_foreign_access_refs([a, bad, b]) == [bad]  # 0 for it, as one call
    assert gt.reports[-1] == f"gnttab_end_foreign_access_ref: invalid ref {bad:#x}"
    gt.gnttab_free_grant_reference(a)
    gt.gnttab_free_grant_reference(b)
