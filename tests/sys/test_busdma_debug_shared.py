"""DMA-API debugging: pages that several maps own (Linux ``dma-debug`` checks every
mapping that covers the address; ``kernel/dma/debug.c``, ``check_for_illegal_area`` and
the per-entry ownership of ``debug_dma_sync_single_for_cpu``)."""

from __future__ import annotations

from gntdma.sys import PAGE_SIZE
from gntdma.sys._dmadebug import DmaDebug, DmaDebugKind


def _maps(d: DmaDebug) -> list[str]:
    return [r.map for r in d.reports(DmaDebugKind.CPU_ACCESS_DEVICE_OWNED)]


def test_a_page_owned_by_two_maps_stays_watched_until_both_give_it_back() -> None:
    for npages in (2, 40):  # a few pages, and more than are indexed one by one
        d = DmaDebug("k")
        a = [((100 + 2 * i) * PAGE_SIZE, PAGE_SIZE) for i in range(npages)]
        b = [(a[-1][0] + 512, 1024), (500 * PAGE_SIZE, PAGE_SIZE)]  # shares a's last page
        d.own(1, "map a", a, read=True, write=False)
        d.own(2, lambda: "map b", b, read=True, write=False)
        d.check_cpu_access(a[-1][0] + 600, 8, write=False, va=0x1000)
        assert sorted(_maps(d)) == ["map a", "map b"]
        d.reset()
        d.release(1, read=True, write=False)  # a gives its pages back
        assert d.owned() == 1 and d.watching
        d.check_cpu_access(a[0][0], 8, write=False, va=0x2000)  # a's alone: not watched
        d.drop(2)
        assert d.owned() == 0 and not d.watching
        d.own(2, "map b", b, read=True, write=False)
        d.check_cpu_access(a[-1][0] + 600, 8, write=False, va=0x3000)
        d.check_cpu_access(a[-1][0], 8, write=False, va=0x3000)  # b's page, not b's bytes
        assert _maps(d) == ["map b"]
        d.drop(2)
        assert not d.watching
