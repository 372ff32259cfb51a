"""DMA-API debugging reports."""

from __future__ import annotations

from typing import Any

from gntdma_sys_testlib import Rec, mk_map, mk_tag

from gntdma.sys import (
    BUS_DMA_NOWAIT,
    BUS_DMASYNC_POSTREAD,
    BUS_DMASYNC_POSTWRITE,
    BUS_DMASYNC_PREREAD,
    BUS_DMASYNC_PREWRITE,
    BUS_SPACE_MAXADDR_32BIT,
    M_DEVBUF,
    M_WAITOK,
    PAGE_SIZE,
    BusDmaMap,
    BusDmaTag,
    DmaDebugKind,
    Kernel,
    bus_dmamap_load,
    bus_dmamap_sync,
    bus_dmamap_unload,
    busdma_debug_check_detach,
)

K = DmaDebugKind


def _loaded(kern: Kernel, size: int = 3 * PAGE_SIZE,
            **tagkw: Any) -> tuple[BusDmaTag, BusDmaMap, int]:
    tag = mk_tag(kern, **tagkw)
    map = mk_map(tag)
    va = kern.malloc(size + 64, M_DEVBUF, M_WAITOK)
    assert bus_dmamap_load(tag, map, va + 32, size, Rec(), None, BUS_DMA_NOWAIT) == 0
    return tag, map, va + 32


def kinds(kern: Kernel) -> list[DmaDebugKind]:
    return [r.kind for r in kern.dma_debug.reports()]


def test_double_unload_is_reported_never_loaded_is_not(kern: Kernel) -> None:
    tag = mk_tag(kern)
    fresh = mk_map(tag)
    bus_dmamap_unload(tag, fresh)
    assert kinds(kern) == []
    _, map, _ = _loaded(kern)
    bus_dmamap_unload(map.dmat, map)
    bus_dmamap_unload(map.dmat, map)
    assert kinds(kern) == [K.DOUBLE_UNLOAD]
    rep = kern.dma_debug.reports()[0]
    assert "test_busdma_debug.py" in rep.site and rep.kernel == "guest"
    assert "double unload" in rep.format()
    kern.dma_debug.reset()
    assert kinds(kern) == []


def test_cpu_read_after_preread_is_reported_until_postread(kern: Kernel) -> None:
    tag, map, va = _loaded(kern)
    kern.kva_read(va, 10)  # loaded but not synced: the CPU still owns it
    bus_dmamap_sync(tag, map, BUS_DMASYNC_PREREAD)
    kern.kva_read(va - 32, 32)  # just before the buffer: fine
    assert kinds(kern) == []
    kern.kva_read(va + PAGE_SIZE, 10)
    kern.kva_write(va + 2 * PAGE_SIZE, b"x")  # reported once per ownership period
    assert kinds(kern) == [K.CPU_ACCESS_DEVICE_OWNED]
    assert "PREREAD" in kern.dma_debug.reports()[0].message
    bus_dmamap_sync(tag, map, BUS_DMASYNC_POSTREAD)
    kern.kva_read(va, 3 * PAGE_SIZE)
    assert len(kinds(kern)) == 1
    bus_dmamap_unload(tag, map)


def test_cpu_write_after_prewrite_is_reported_read_is_not(kern: Kernel) -> None:
    tag, map, va = _loaded(kern, lowaddr=BUS_SPACE_MAXADDR_32BIT)
    bus_dmamap_sync(tag, map, BUS_DMASYNC_PREWRITE)
    kern.kva_read(va, 100)
    assert kinds(kern) == []
    kern.kva_write(va + 5, b"late")
    assert kinds(kern) == [K.CPU_ACCESS_DEVICE_OWNED]
    bus_dmamap_sync(tag, map, BUS_DMASYNC_POSTWRITE)
    kern.kva_write(va + 5, b"fine")
    assert len(kinds(kern)) == 1
    bus_dmamap_unload(tag, map)


def test_unload_gives_the_buffer_back(kern: Kernel) -> None:
    tag, map, va = _loaded(kern)
    bus_dmamap_sync(tag, map, BUS_DMASYNC_PREREAD | BUS_DMASYNC_PREWRITE)
    bus_dmamap_unload(tag, map)
    kern.kva_write(va, b"ok")
    assert kinds(kern) == [] and kern.dma_debug.owned() == 0


def test_sync_misuse(kern: Kernel) -> None:
    tag, map, _ = _loaded(kern)
    bus_dmamap_sync(tag, map, BUS_DMASYNC_PREREAD | BUS_DMASYNC_POSTREAD)
    assert kinds(kern) == [K.SYNC_BAD_OP]
    bus_dmamap_unload(tag, map)
    bus_dmamap_sync(tag, map, BUS_DMASYNC_POSTREAD)
    assert kinds(kern) == [K.SYNC_BAD_OP, K.SYNC_UNLOADED]


def test_loaded_maps_at_detach(kern: Kernel) -> None:
    tag, map, _ = _loaded(kern)
    child = mk_tag(kern, tag)
    cmap = mk_map(child)
    va = kern.malloc(64, M_DEVBUF, M_WAITOK)
    bus_dmamap_load(child, cmap, va, 64, Rec(), None, BUS_DMA_NOWAIT)
    other, omap, _ = _loaded(kern)
    assert busdma_debug_check_detach(tag) == 2  # the tag's map and its child tag's
    assert kinds(kern) == [K.LOADED_AT_DETACH] * 2
    assert busdma_debug_check_detach(kern) == 3
    for t, m in ((tag, map), (child, cmap), (other, omap)):
        bus_dmamap_unload(t, m)
    assert busdma_debug_check_detach(kern) == 0


def test_debugging_can_be_disabled(kern: Kernel) -> None:
    kern.dma_debug.enabled = False
    _, map, _ = _loaded(kern)
    bus_dmamap_unload(map.dmat, map)
    bus_dmamap_unload(map.dmat, map)
    assert kinds(kern) == []
