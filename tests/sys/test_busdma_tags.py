"""Tags: argument checks, inheritance, reference counts, destroy; maps and dmamem."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

import pytest
from gntdma_sys_testlib import FOUR_GIB, Rec, mk_map, mk_tag

from gntdma.sched import KernelPanic
from gntdma.sys import (
    BUS_DMA_NOWAIT,
    BUS_DMA_ZERO,
    BUS_SPACE_MAXADDR,
    BUS_SPACE_MAXADDR_24BIT,
    BUS_SPACE_MAXADDR_32BIT,
    M_DEVBUF,
    M_WAITOK,
    PAGE_SIZE,
    BounceImpl,
    BounceMap,
    DmaDebugKind,
    Kernel,
    bus_dma_tag_create,
    bus_dma_tag_destroy,
    bus_dmamap_destroy,
    bus_dmamap_load,
    bus_dmamap_unload,
    bus_dmamem_alloc,
    bus_dmamem_free,
    bus_get_dma_tag,
    dflt_lock,
)


@pytest.mark.parametrize(("alignment", "boundary", "maxsegsz"), [
    (0, 0, 4096),  # alignment 0
    (3, 0, 4096),  # alignment not a power of two
    (1, 3000, 4096),  # boundary not a power of two
    (1, 0, 0),  # maxsegsz 0
])
def test_tag_create_einval(kern: Kernel, alignment: int, boundary: int, maxsegsz: int) -> None:
    error, tag = bus_dma_tag_create(kern, alignment, boundary, BUS_SPACE_MAXADDR,
                                    BUS_SPACE_MAXADDR, 65536, 1, maxsegsz, 0, None, None)
    assert (error, tag) == (errno.EINVAL, None)
    assert kern.statistics().dma_tags == 0


def test_boundary_clamps_maxsegsz_and_addresses_are_rounded(kern: Kernel) -> None:
    error, tag = bus_dma_tag_create(kern, 1, 8192, 0x12345678, 0x20000000, 1 << 20, 4, 65536,
                                    0, None, None)  # no parent tag
    assert error == 0 and tag is not None
    assert tag.maxsegsz == 8192 and tag.parent is None
    assert tag.lowaddr == 0x12345FFF and tag.highaddr == 0x20000FFF
    assert tag.lockfunc is dflt_lock
    assert isinstance(tag.impl, BounceImpl)


def test_inheritance_only_tightens(kern: Kernel) -> None:
    parent = mk_tag(kern, boundary=1 << 16, lowaddr=BUS_SPACE_MAXADDR_32BIT,
                    highaddr=BUS_SPACE_MAXADDR_32BIT)
    looser = mk_tag(kern, parent, lowaddr=BUS_SPACE_MAXADDR)
    assert looser.lowaddr == BUS_SPACE_MAXADDR_32BIT  # min
    assert looser.highaddr == BUS_SPACE_MAXADDR  # max
    assert looser.boundary == 1 << 16  # inherited when 0
    tighter = mk_tag(kern, parent, lowaddr=BUS_SPACE_MAXADDR_24BIT, boundary=4096)
    assert tighter.lowaddr == BUS_SPACE_MAXADDR_24BIT and tighter.boundary == 4096
    wider = mk_tag(kern, parent, boundary=1 << 20, maxsegsz=1 << 20)
    assert wider.boundary == 1 << 16 and wider.maxsegsz == 1 << 16
    assert wider.impl is parent.impl
    assert parent.ref_count == 4
    for t in (looser, tighter, wider, parent):
        assert bus_dma_tag_destroy(t) == 0
    kern.assert_no_leaks()


def test_tag_reference_counting(kern: Kernel) -> None:
    parent = mk_tag(kern, lowaddr=BUS_SPACE_MAXADDR_32BIT)
    child = mk_tag(kern, parent, maxsize=4096)
    assert parent.ref_count == 2 and kern.statistics().dma_tags == 2
    assert bus_dma_tag_destroy(parent) == 0  # drops our reference; the child keeps it alive
    assert parent.ref_count == 1 and kern.statistics().dma_tags == 2
    assert bus_dma_tag_destroy(child) == 0  # frees the child, then the parent
    assert parent.ref_count == 0 and kern.statistics().dma_tags == 0
    with pytest.raises(KernelPanic, match="already destroyed"):
        bus_dma_tag_destroy(child)
    root = bus_get_dma_tag(kern)
    assert bus_dma_tag_destroy(root) == errno.EBUSY and root.ref_count >= 1


def test_tag_destroy_with_maps_is_ebusy(kern: Kernel) -> None:
    tag = mk_tag(kern)
    map = mk_map(tag)
    assert bus_dma_tag_destroy(tag) == errno.EBUSY
    assert [r.kind for r in kern.dma_debug.reports()] == [DmaDebugKind.TAG_DESTROY_BUSY]
    assert bus_dmamap_destroy(tag, map) == 0
    assert bus_dma_tag_destroy(tag) == 0
    with pytest.raises(KernelPanic, match="destroyed"):
        bus_dmamap_destroy(tag, map)


def test_map_destroy_while_loaded_is_ebusy(kern: Kernel) -> None:
    tag = mk_tag(kern)
    map = mk_map(tag)
    va = kern.malloc(100, M_DEVBUF, M_WAITOK)
    bus_dmamap_load(tag, map, va, 100, Rec(), None, BUS_DMA_NOWAIT)
    assert bus_dmamap_destroy(tag, map) == errno.EBUSY
    assert kern.dma_debug.reports()[-1].kind is DmaDebugKind.DESTROY_LOADED_MAP
    bus_dmamap_unload(tag, map)
    assert bus_dmamap_destroy(tag, map) == 0
    bus_dma_tag_destroy(tag)
    kern.free(va, M_DEVBUF)


def test_map_of_another_tag_panics(kern: Kernel) -> None:
    a, b = mk_tag(kern), mk_tag(kern)
    map = mk_map(a)
    with pytest.raises(KernelPanic, match="does not belong"):
        bus_dmamap_unload(b, map)


@pytest.mark.parametrize(("params", "kind"), [
    (dict(maxsize=256, alignment=256), "malloc"),
    (dict(maxsize=5 * PAGE_SIZE, lowaddr=BUS_SPACE_MAXADDR_32BIT), "kmem"),
    (dict(maxsize=3 * PAGE_SIZE, nsegments=1, lowaddr=BUS_SPACE_MAXADDR_32BIT,
          alignment=2 * PAGE_SIZE), "contig"),
])
def test_dmamem_alloc_satisfies_the_tag(kern: Kernel, params: dict[str, Any],
                                        kind: str) -> None:
    tag = mk_tag(kern, **params)
    error, va, map = bus_dmamem_alloc(tag, BUS_DMA_NOWAIT | BUS_DMA_ZERO)
    assert error == 0 and map is not None
    assert isinstance(map, BounceMap) and map.dmamem_kind == kind
    assert kern.kva_read(va, tag.maxsize) == bytes(tag.maxsize)
    cb = Rec()
    assert bus_dmamap_load(tag, map, va, tag.maxsize, cb, None, BUS_DMA_NOWAIT) == 0
    segs = cb.last[1]
    assert cb.last[3] == 0 and len(segs) <= (tag.nsegments if tag.nsegments > 0 else 99)
    assert all(s.ds_addr + s.ds_len <= tag.lowaddr + 1 for s in segs)
    assert segs[0].ds_addr % tag.alignment == 0
    assert kern.busdma.total_bounced == 0 and all(
        s.ds_addr == kern.pmap_kextract(va + sum(x.ds_len for x in segs[:i]))
        for i, s in enumerate(segs))
    assert bus_dma_tag_destroy(tag) == errno.EBUSY  # the dmamem map counts
    bus_dmamem_free(tag, va, map)  # loaded: reported, unloaded, freed
    assert kern.dma_debug.reports(DmaDebugKind.DESTROY_LOADED_MAP)
    assert bus_dma_tag_destroy(tag) == 0
    kern.assert_no_leaks()


def test_32bit_tag_over_low_only_memory_does_not_bounce(
        kernel_factory: Callable[..., Kernel]) -> None:
    kern = kernel_factory(high=0)
    tag = mk_tag(kern, lowaddr=BUS_SPACE_MAXADDR_32BIT)
    mk_map(tag)
    assert kern.busdma.bounce_zones == 0
    assert tag.lowaddr < FOUR_GIB
