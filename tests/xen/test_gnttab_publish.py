"""The order in which a grant is published (issue 9 item 10).

Xen's public header xen/include/public/grant_table.h (the comment above
``struct grant_entry_v1``: "write the frame and domid, then a write barrier
(wmb), then the flags") and FreeBSD's sys/dev/xen/grant_table/grant_table.c,
``gnttab_grant_foreign_access_ref``: ``shared[ref].frame``, ``.domid``, ``wmb()``,
then ``.flags``. The hypervisor may read the entry at any moment, so at every
scheduling point of the grant path no entry may have ``GTF_permit_access`` with a
stale domid or frame, and the state "domid and frame written, flags not yet"
must be visible at the barrier (a missing barrier would hide it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from busdma_helpers import PAGE, Loads, driver_tag, kbuf, pattern

from gntdma.abi.grant_table import GTF_permit_access
from gntdma.sched import Mutex
from gntdma.sys import (
    BUS_DMA_NOWAIT,
    M_DEVBUF,
    bus_dma_tag_destroy,
    bus_dmamap_create,
    bus_dmamap_destroy,
    bus_dmamap_load,
    bus_dmamap_unload,
)
from gntdma.toolstack.host import Guest, Host
from gntdma.xen.busdma import xen_dmamap_get_grefs


class EntryWatch:
    """At every scheduling point, check the entries expected to be (re)granted."""

    def __init__(self, g: Guest, inner: Callable[[str], None]) -> None:
        self.g = g
        self.inner = inner
        self.want: dict[int, tuple[int, int]] = {}  # ref -> (domid, frame) being granted
        self.stale: list[tuple[int, int, int, int]] = []
        self.between: set[int] = set()  # refs seen with domid+frame written, flags not yet

    def point(self, name: str) -> None:
        for ref, (domid, frame) in self.want.items():
            flags, d, f = self.g.gnttab.entry(ref)
            if flags & GTF_permit_access and (d, f) != (domid, frame):
                self.stale.append((ref, flags, d, f))
            if not flags & GTF_permit_access and (d, f) == (domid, frame):
                self.between.add(ref)
        self.inner(name)


@pytest.fixture
def watch(host: Host, monkeypatch: pytest.MonkeyPatch) -> Any:
    def make(g: Guest) -> EntryWatch:
        w = EntryWatch(g, host.sched.point)
        monkeypatch.setattr(host.sched, "point", w.point)
        return w
    return make


def test_grant_publishes_domid_and_frame_before_flags(host: Host, watch: Any) -> None:
    """gnttab_grant_foreign_access_ref on a reference last granted elsewhere."""
    g = host.create_guest("g")
    b = host.create_guest("b", memory_mb=4)
    gt = g.gnttab
    error, ref = gt.gnttab_grant_foreign_access(host.dom0.domid, 0x1234, False)
    assert error == 0
    assert gt.gnttab_end_foreign_access_ref(ref) == 1  # flags 0, domid and frame stale
    w = watch(g)
    w.want[ref] = (b.domid, 0x4321)
    gt.gnttab_grant_foreign_access_ref(ref, b.domid, 0x4321, False)
    assert w.stale == []
    assert w.between == {ref}
    assert gt.entry(ref) == (int(GTF_permit_access), b.domid, 0x4321)
    assert gt.gnttab_end_foreign_access_ref(ref) == 1
    gt.gnttab_free_grant_reference(ref)


def test_busdma_load_publishes_each_grant_in_order(host: Host, watch: Any) -> None:
    """The grants a load writes (map_complete), on refs last granted to another domain."""
    g = host.create_guest("g")
    b = host.create_guest("b", memory_mb=4)
    lock = Mutex("drv")
    tag = driver_tag(g, lock, nsegments=3, maxsize=3 * PAGE, alignment=1, backend=b.domid)
    error, m = bus_dmamap_create(tag, 0)
    assert error == 0 and m is not None
    va = kbuf(g.kernel, pattern(3 * PAGE, 1))
    gt = g.gnttab
    # Make the next three refs carry a stale grant to dom0 of other frames.
    error, head = gt.gnttab_alloc_grant_references(3)
    assert error == 0
    refs = [gt.gnttab_claim_grant_reference(head) for _ in range(3)]
    for ref in refs:
        gt.gnttab_grant_foreign_access_ref(ref, host.dom0.domid, 0x7777, False)
        assert gt.gnttab_end_foreign_access_ref(ref) == 1
    for ref in reversed(refs):
        gt.gnttab_free_grant_reference(ref)
    w = watch(g)
    frames = [g.kernel.pmap_kextract(va + i * PAGE) // PAGE for i in range(3)]
    w.want = {ref: (b.domid, frame) for ref, frame in zip(refs, frames, strict=True)}
    assert bus_dmamap_load(tag, m, va, 3 * PAGE, Loads(lock).cb, None, BUS_DMA_NOWAIT) == 0
    assert xen_dmamap_get_grefs(m) == refs
    assert w.stale == []
    assert w.between == set(refs)
    bus_dmamap_unload(tag, m)
    assert bus_dmamap_destroy(tag, m) == 0
    assert bus_dma_tag_destroy(tag) == 0
    g.kernel.free(va, M_DEVBUF)
