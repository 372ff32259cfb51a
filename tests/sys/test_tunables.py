"""Kernel tunables: DMA-API debugging and junk fill on free, each on and off.

The names are the kernels' own: Linux's ``dma_debug=off`` boot parameter
(kernel/dma/debug.c, dma_debug_cmdline) for DMA-API debugging, kept as
``hw.busdma.dma_debug`` beside FreeBSD's bus_dma settings; FreeBSD's loader
tunable ``vm.debug.divisor`` (sys/vm/uma_core.c, dbg_divisor and
uma_dbg_kskip) for trashing freed items: 1 every item, 0 none, N the items
whose index N divides.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from gntdma_sys_testlib import Rec, mk_map, mk_tag

from gntdma.sched import Scheduler
from gntdma.sys import (
    BUS_DMA_NOWAIT,
    BUS_DMASYNC_POSTREAD,
    BUS_DMASYNC_PREREAD,
    BUS_DMASYNC_PREWRITE,
    M_DEVBUF,
    M_WAITOK,
    PAGE_SIZE,
    TUNABLE_DMA_DEBUG,
    TUNABLE_JUNK_DIVISOR,
    BytePhysMem,
    DmaDebugKind,
    Kernel,
    KernelTunables,
    bus_dma_tag_destroy,
    bus_dmamap_destroy,
    bus_dmamap_load,
    bus_dmamap_sync,
    bus_dmamap_unload,
    busdma_debug_check_detach,
)

JUNK = bytes.fromhex("dec0adde")
K = DmaDebugKind


@pytest.fixture
def make(vsched: Scheduler) -> Iterator[Callable[..., Kernel]]:
    made: list[Kernel] = []

    def factory(tunables: KernelTunables | None = None) -> Kernel:
        k = Kernel("guest", BytePhysMem([(0, 512)]), 1, tunables=tunables)
        made.append(k)
        return k

    yield factory
    for k in made:
        k.shutdown()


def _freed_contents(kern: Kernel, size: int) -> bytes:
    """What a freed allocation of ``size`` holds, read back through a new one at the
    same place (the slab hands the slot out again; a page allocation is read by pfn)."""
    va = kern.malloc(size, M_DEVBUF, M_WAITOK)
    kern.kva_write(va, b"\x5a" * size)
    pa = kern.pmap_kextract(va)
    kern.free(va, M_DEVBUF)
    return kern.phys_read(pa, 4)


def test_tunables_default_on_with_the_kernels_names(make: Callable[..., Kernel]) -> None:
    kern = make()
    assert kern.tunables == KernelTunables(dma_debug=True, junk_divisor=1)
    assert kern.tunables.sysctls() == {TUNABLE_DMA_DEBUG: 1, TUNABLE_JUNK_DIVISOR: 1}
    assert (TUNABLE_DMA_DEBUG, TUNABLE_JUNK_DIVISOR) == ("hw.busdma.dma_debug",
                                                         "vm.debug.divisor")
    assert kern.tunables.describe() == "dma-debug on, junk fill on"
    assert kern.dma_debug.enabled


def test_junk_fill_on_fills_freed_memory(make: Callable[..., Kernel]) -> None:
    kern = make(KernelTunables(junk_divisor=1))
    assert _freed_contents(kern, 64) == JUNK
    assert _freed_contents(kern, 3 * PAGE_SIZE) == JUNK


def test_junk_fill_off_leaves_freed_memory_as_it_was(make: Callable[..., Kernel]) -> None:
    kern = make(KernelTunables(junk_divisor=0))
    assert kern.tunables.describe() == "dma-debug on, junk fill off"
    assert _freed_contents(kern, 64) == b"\x5a" * 4
    assert _freed_contents(kern, 3 * PAGE_SIZE) == b"\x5a" * 4
    va = kern.contigmalloc(PAGE_SIZE, M_DEVBUF, M_WAITOK, 0, (1 << 32) - 1, PAGE_SIZE, 0)
    kern.kva_write(va, b"\x5a" * 8)
    pa = kern.pmap_kextract(va)
    kern.contigfree(va, PAGE_SIZE, M_DEVBUF)
    assert kern.phys_read(pa, 4) == b"\x5a" * 4


def test_junk_divisor_trashes_the_items_whose_index_it_divides(make: Callable[..., Kernel]) -> None:
    kern = make(KernelTunables(junk_divisor=4))
    assert kern.tunables.describe() == "dma-debug on, junk fill 1 in 4"
    vas = [kern.malloc(64, M_DEVBUF, M_WAITOK) for _ in range(32)]
    for va in vas:
        kern.kva_write(va, b"\x5a" * 64)
    pas = [kern.pmap_kextract(va) for va in vas]
    for va in vas:
        kern.free(va, M_DEVBUF)
    junked = [kern.phys_read(pa, 4) == JUNK for pa in pas]
    # uma_dbg_kskip: item index = page * items per page + slot; junked iff divisible.
    expected = [((va >> 12) * (PAGE_SIZE // 64) + (va & (PAGE_SIZE - 1)) // 64) % 4 == 0
                for va in vas]
    assert junked == expected
    assert 0 < sum(junked) < len(junked)
    with pytest.raises(ValueError):
        KernelTunables(junk_divisor=-1)


def _misuse_every_kind(kern: Kernel) -> None:
    """One of each DMA-API misuse the checker knows, on one kernel."""
    tag = mk_tag(kern)
    map = mk_map(tag)
    va = kern.malloc(2 * PAGE_SIZE, M_DEVBUF, M_WAITOK)
    assert bus_dmamap_load(tag, map, va, 2 * PAGE_SIZE, Rec(), None, BUS_DMA_NOWAIT) == 0
    bus_dmamap_load(tag, map, va, 16, Rec(), None, BUS_DMA_NOWAIT)  # loaded map
    assert bus_dmamap_destroy(tag, map) != 0  # destroy of a loaded map
    assert bus_dma_tag_destroy(tag) != 0  # tag with live maps
    bus_dmamap_sync(tag, map, BUS_DMASYNC_PREREAD | BUS_DMASYNC_PREWRITE)
    bus_dmamap_sync(tag, map, 0)  # a bad op
    kern.kva_read(va + PAGE_SIZE, 8)  # CPU access to a device-owned buffer
    busdma_debug_check_detach(kern)  # loaded at detach
    bus_dmamap_unload(tag, map)
    bus_dmamap_unload(tag, map)  # double unload
    bus_dmamap_sync(tag, map, BUS_DMASYNC_POSTREAD)  # sync of an unloaded map
    kern.free(va, M_DEVBUF)
    assert bus_dmamap_destroy(tag, map) == 0
    assert bus_dma_tag_destroy(tag) == 0


def test_dma_debug_on_catches_every_misuse(make: Callable[..., Kernel]) -> None:
    kern = make(KernelTunables(dma_debug=True))
    _misuse_every_kind(kern)
    assert {r.kind for r in kern.dma_debug.reports()} == {
        K.LOAD_LOADED_MAP, K.DESTROY_LOADED_MAP, K.TAG_DESTROY_BUSY, K.SYNC_BAD_OP,
        K.CPU_ACCESS_DEVICE_OWNED, K.LOADED_AT_DETACH, K.DOUBLE_UNLOAD, K.SYNC_UNLOADED}


def test_dma_debug_off_tracks_no_buffer_and_reports_nothing(make: Callable[..., Kernel]) -> None:
    kern = make(KernelTunables(dma_debug=False))
    assert kern.tunables.describe() == "dma-debug off, junk fill on"
    tag = mk_tag(kern)
    map = mk_map(tag)
    va = kern.malloc(PAGE_SIZE, M_DEVBUF, M_WAITOK)
    assert bus_dmamap_load(tag, map, va, PAGE_SIZE, Rec(), None, BUS_DMA_NOWAIT) == 0
    bus_dmamap_sync(tag, map, BUS_DMASYNC_PREREAD)
    assert kern.dma_debug.owned() == 0 and not kern.dma_debug.watching  # no bookkeeping
    bus_dmamap_unload(tag, map)
    kern.free(va, M_DEVBUF)
    bus_dmamap_destroy(tag, map)
    bus_dma_tag_destroy(tag)
    _misuse_every_kind(kern)  # the same calls behave the same, unreported
    assert kern.dma_debug.reports() == []
    kern.assert_no_leaks()


def test_dma_debug_turned_off_forgets_the_buffers_it_tracked(make: Callable[..., Kernel]) -> None:
    kern = make()
    tag = mk_tag(kern)
    map = mk_map(tag)
    va = kern.malloc(PAGE_SIZE, M_DEVBUF, M_WAITOK)
    assert bus_dmamap_load(tag, map, va, PAGE_SIZE, Rec(), None, BUS_DMA_NOWAIT) == 0
    bus_dmamap_sync(tag, map, BUS_DMASYNC_PREREAD)
    assert kern.dma_debug.owned() == 1
    kern.set_tunables(KernelTunables(dma_debug=False, junk_divisor=0))
    assert kern.tunables.describe() == "dma-debug off, junk fill off"
    assert kern.dma_debug.owned() == 0 and not kern.dma_debug.watching
    kern.kva_read(va, 8)
    assert kern.dma_debug.reports() == []
    kern.set_tunables(KernelTunables())
    bus_dmamap_sync(tag, map, BUS_DMASYNC_POSTREAD)
    bus_dmamap_sync(tag, map, BUS_DMASYNC_PREREAD)
    kern.kva_read(va, 8)
    assert [r.kind for r in kern.dma_debug.reports()] == [K.CPU_ACCESS_DEVICE_OWNED]
    bus_dmamap_unload(tag, map)
    kern.free(va, M_DEVBUF)
    bus_dmamap_destroy(tag, map)
    bus_dma_tag_destroy(tag)
