"""busdma_xen isolation: memory behind a still-mapped grant stays out of circulation,
and a child tag cannot silently grant to another domain than its parent's backend.

DESIGN section 4: memory behind a grant that is still mapped (a bounce page, a ring
page, a page of the caller's own buffer freed after unload) is not reused by the
guest's allocators until the grant entry shows the mapper has let go. The
reference is Linux's ``gnttab_end_foreign_access(ref, page)``
(drivers/xen/grant-table.c, ``gnttab_add_deferred``: the page is kept, not freed,
until ``_gnttab_end_foreign_access_ref`` succeeds; the XSA-396 fix), and FreeBSD's
``vm_page_wire``/``vm_page_unwire`` (sys/vm/vm_page.c) for holding a page.
"""

from __future__ import annotations

import errno

from busdma_helpers import (
    FOUR_GIB,
    PAGE,
    Loads,
    check_map_grants,
    driver_tag,
    high_kbuf,
    pattern,
    peer_map,
    peer_unmap,
    xen_impl,
)

from gntdma.abi.grant_table import GNTST_okay
from gntdma.sched import Mutex
from gntdma.sys import (
    BUS_DMA_NOWAIT,
    BUS_DMASYNC_PREWRITE,
    BUS_SPACE_MAXADDR,
    BUS_SPACE_MAXADDR_32BIT,
    M_DEVBUF,
    M_NOWAIT,
    M_WAITOK,
    BusDmaMap,
    BusDmaTag,
    DmaDebugKind,
    bus_dma_tag_create,
    bus_dma_tag_destroy,
    bus_dmamap_create,
    bus_dmamap_destroy,
    bus_dmamap_load,
    bus_dmamap_sync,
    bus_dmamap_unload,
    bus_dmamem_alloc,
    bus_dmamem_free,
)
from gntdma.toolstack.host import Guest, Host
from gntdma.xen.busdma import (
    BUS_DMA_XEN_DOMID_SHIFT,
    xen_dmamap_get_grefs,
    xen_get_dma_tag,
)


def _map(tag: BusDmaTag) -> BusDmaMap:
    error, m = bus_dmamap_create(tag, 0)
    assert error == 0 and m is not None
    return m


def _load(tag: BusDmaTag, m: BusDmaMap, va: int, n: int, lock: Mutex) -> int:
    """A NOWAIT load that must succeed; the page frame of its first segment."""
    assert bus_dmamap_load(tag, m, va, n, Loads(lock).cb, None, BUS_DMA_NOWAIT) == 0
    bus_dmamap_sync(tag, m, BUS_DMASYNC_PREWRITE)
    return int(m.dm_segs[0].ds_addr) // PAGE


def _unload_while_mapped(host: Host, g: Guest, peer: Guest, tag: BusDmaTag,
                         m: BusDmaMap) -> tuple[int, int]:
    """``peer`` maps the map's first grant and keeps it; the map is unloaded.
    Returns (ref, handle)."""
    ref = xen_dmamap_get_grefs(m)[0]
    status, handle = peer_map(peer, g, ref, writable=True)
    assert status == GNTST_okay
    bus_dmamap_unload(tag, m)
    assert [r.kind for r in g.kernel.dma_debug.reports()] == \
        [DmaDebugKind.STILL_MAPPED_AT_UNLOAD]
    g.kernel.dma_debug.reset()
    g.gnttab.reports.clear()
    return ref, handle


def _let_go(host: Host, g: Guest, peer: Guest, handle: int) -> None:
    peer_unmap(peer, handle)
    host.sched.run(until=lambda: g.gnttab.statistics().reclaim_pending == 0)


def test_bounce_page_still_mapped_by_a_backend_is_not_reused(host: Host) -> None:
    """The bounce page behind a still-mapped grant does not serve the next load, for the
    same backend nor for another one, until the backend unmaps it."""
    g = host.create_guest("g", memory_mb=8, high_memory_mb=8)
    b1 = host.create_guest("b1", memory_mb=4)
    b2 = host.create_guest("b2", memory_mb=4)
    lock = Mutex("drv")
    tag1 = driver_tag(g, lock, lowaddr=BUS_SPACE_MAXADDR_32BIT, backend=b1.domid)
    tag2 = driver_tag(g, lock, lowaddr=BUS_SPACE_MAXADDR_32BIT, backend=b2.domid)
    secret = pattern(PAGE, 5)
    va = high_kbuf(g.kernel, 1)
    g.kernel.kva_write(va, secret)
    m1, m2 = _map(tag1), _map(tag2)
    held = _load(tag1, m1, va, PAGE, lock)
    assert held * PAGE < FOUR_GIB  # a bounce page
    _, handle = _unload_while_mapped(host, g, b1, tag1, m1)
    other = high_kbuf(g.kernel, 1)
    g.kernel.kva_write(other, pattern(PAGE, 6))
    for tag, m, peer in ((tag1, m1, b1), (tag2, m2, b2), (tag1, m1, b1)):
        assert _load(tag, m, other, PAGE, lock) != held
        check_map_grants(peer, g, m, pattern(PAGE, 6), ro=False)
        bus_dmamap_unload(tag, m)
    (zone,) = xen_impl(g).zones()
    assert zone.held_bpages == 1
    _let_go(host, g, b1, handle)
    assert zone.held_bpages == 0
    assert _load(tag2, m2, other, PAGE, lock) == held  # back in the zone, reused first
    bus_dmamap_unload(tag2, m2)
    for tag, m in ((tag1, m1), (tag2, m2)):
        assert bus_dmamap_destroy(tag, m) == 0
        assert bus_dma_tag_destroy(tag) == 0
    g.kernel.kmem_free(va, PAGE)
    g.kernel.kmem_free(other, PAGE)


def _all_free_pages(g: Guest) -> list[int]:
    pfns = []
    while True:
        pfn = g.kernel.vm_page_alloc(M_NOWAIT)
        if pfn is None:
            return pfns
        pfns.append(pfn)


def test_caller_buffer_freed_after_unload_while_mapped_is_not_reused(host: Host) -> None:
    """A page of the caller's own buffer, freed after an unload that found its grant
    still mapped, is not handed out by the page allocator until the backend lets go."""
    g = host.create_guest("g", memory_mb=4)
    lock = Mutex("drv")
    tag = driver_tag(g, lock)
    va = g.kernel.malloc(2 * PAGE, M_DEVBUF, M_WAITOK)  # whole pages
    g.kernel.kva_write(va, pattern(2 * PAGE, 1))
    m = _map(tag)
    held = _load(tag, m, va, 2 * PAGE, lock)
    _, handle = _unload_while_mapped(host, g, host.dom0, tag, m)
    g.kernel.free(va, M_DEVBUF)
    assert not g.kernel.vm.is_free(held)
    pfns = _all_free_pages(g)  # the most recently freed page would come first
    assert held not in pfns
    for pfn in pfns:
        g.kernel.vm_page_free(pfn)
    _let_go(host, g, host.dom0, handle)
    assert g.kernel.vm.is_free(held)
    assert bus_dmamap_destroy(tag, m) == 0
    assert bus_dma_tag_destroy(tag) == 0


def test_caller_slab_item_freed_after_unload_while_mapped_is_not_reused(host: Host) -> None:
    """A sub-page buffer (a malloc bucket item) freed after such an unload: no new
    allocation lands in that page while the backend can still read and write it."""
    g = host.create_guest("g", memory_mb=4)
    lock = Mutex("drv")
    tag = driver_tag(g, lock)
    va = g.kernel.malloc(512, M_DEVBUF, M_WAITOK)
    keep = g.kernel.malloc(512, M_DEVBUF, M_WAITOK)  # the slab stays alive
    g.kernel.kva_write(va, pattern(512, 2))
    m = _map(tag)
    held = _load(tag, m, va, 512, lock)
    _, handle = _unload_while_mapped(host, g, host.dom0, tag, m)
    g.kernel.free(va, M_DEVBUF)
    fresh = [g.kernel.malloc(512, M_DEVBUF, M_WAITOK) for _ in range(16)]
    assert all(g.kernel.pmap_kextract(x) // PAGE != held for x in fresh)
    _let_go(host, g, host.dom0, handle)
    again = g.kernel.malloc(512, M_DEVBUF, M_WAITOK)  # the slab serves again
    assert g.kernel.pmap_kextract(again) // PAGE == held
    for x in (*fresh, keep, again):
        g.kernel.free(x, M_DEVBUF)
    assert bus_dmamap_destroy(tag, m) == 0
    assert bus_dma_tag_destroy(tag) == 0


def test_dmamem_ring_page_freed_while_mapped_is_not_reused(host: Host) -> None:
    """A ``bus_dmamem_alloc`` ring page unloaded and freed while the backend maps it."""
    g = host.create_guest("g", memory_mb=4)
    lock = Mutex("drv")
    tag = driver_tag(g, lock, nsegments=1, maxsize=PAGE, alignment=PAGE)
    error, va, m = bus_dmamem_alloc(tag, BUS_DMA_NOWAIT)
    assert error == 0 and m is not None
    g.kernel.kva_write(va, pattern(PAGE, 3))
    held = _load(tag, m, va, PAGE, lock)
    _, handle = _unload_while_mapped(host, g, host.dom0, tag, m)
    bus_dmamem_free(tag, va, m)
    assert not g.kernel.vm.is_free(held)
    pfns = _all_free_pages(g)
    assert held not in pfns
    for pfn in pfns:
        g.kernel.vm_page_free(pfn)
    _let_go(host, g, host.dom0, handle)
    assert g.kernel.vm.is_free(held)
    assert bus_dma_tag_destroy(tag) == 0


# -- item 3: a child tag's backend domid (DESIGN section 7) ---------------------------------


def _child(parent: BusDmaTag, domid_bits: int) -> tuple[int, BusDmaTag | None]:
    return bus_dma_tag_create(parent, 1, 0, BUS_SPACE_MAXADDR, BUS_SPACE_MAXADDR, PAGE, 1,
                              PAGE, domid_bits << BUS_DMA_XEN_DOMID_SHIFT, None, None)


def test_child_of_backend_tag_with_zero_domid_bits_inherits_the_domid(host: Host) -> None:
    g = host.create_guest("g")
    b = host.create_guest("b", memory_mb=4)
    parent = driver_tag(g, Mutex("drv"), backend=b.domid)
    error, child = _child(parent, 0)
    assert error == 0 and child is not None
    assert child.domid == b.domid  # type: ignore[attr-defined]
    m = _map(child)
    va = g.kernel.malloc(PAGE, M_DEVBUF, M_WAITOK)
    g.kernel.kva_write(va, pattern(PAGE, 4))
    _load(child, m, va, PAGE, Mutex("x"))
    check_map_grants(b, g, m, pattern(PAGE, 4), ro=False, others=(host.dom0,))
    bus_dmamap_unload(child, m)
    assert bus_dmamap_destroy(child, m) == 0
    g.kernel.free(va, M_DEVBUF)
    assert bus_dma_tag_destroy(child) == 0
    assert bus_dma_tag_destroy(parent) == 0


def test_child_tag_naming_another_backend_is_einval(host: Host) -> None:
    g = host.create_guest("g")
    b = host.create_guest("b", memory_mb=4)
    parent = driver_tag(g, Mutex("drv"), backend=b.domid)
    assert _child(parent, b.domid + 1) == (errno.EINVAL, None)
    error, same = _child(parent, b.domid)  # naming the same backend is fine
    assert error == 0 and same is not None
    assert bus_dma_tag_destroy(same) == 0
    assert bus_dma_tag_destroy(parent) == 0


def test_only_a_child_of_the_root_with_zero_domid_bits_means_dom0(host: Host) -> None:
    """Zero bits under the root: dom0, a backend domid like any other; so its child
    inherits dom0 and may not name another domain."""
    g = host.create_guest("g")
    b = host.create_guest("b", memory_mb=4)
    error, dom0_tag = _child(xen_get_dma_tag(g.kernel), 0)
    assert error == 0 and dom0_tag is not None
    assert dom0_tag.domid == 0  # type: ignore[attr-defined]
    error, inherits = _child(dom0_tag, 0)
    assert error == 0 and inherits is not None
    assert inherits.domid == 0  # type: ignore[attr-defined]
    assert _child(dom0_tag, b.domid) == (errno.EINVAL, None)
    assert bus_dma_tag_destroy(inherits) == 0
    assert bus_dma_tag_destroy(dom0_tag) == 0
