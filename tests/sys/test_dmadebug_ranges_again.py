"""DMA-API debugging: the device's ownership of a map's buffer covers the ranges of
that sync, whether the map owned equal ranges before (a buffer loaded again) or
other ones, even a list changed in place since (Linux kernel/dma/debug.c
``check_sync``/``debug_dma_sync_single_for_device`` follow the entry of each
mapping as it is now)."""

from __future__ import annotations

from gntdma.sys import PAGE_SIZE
from gntdma.sys._dmadebug import DmaDebug, DmaDebugKind


def _pages(first: int, n: int) -> list[tuple[int, int]]:
    return [((first + 3 * i) * PAGE_SIZE, PAGE_SIZE) for i in range(n)]


def _reported(d: DmaDebug, pa: int) -> bool:
    d.reset()
    d.check_cpu_access(pa, 16, False, 0x1000)
    return bool(d.reports(DmaDebugKind.CPU_ACCESS_DEVICE_OWNED))


def test_an_ownership_covers_the_ranges_of_its_own_sync() -> None:
    d = DmaDebug("k")
    ranges = _pages(100, 32)
    d.own(7, "map7", ranges, read=True, write=False)
    assert _reported(d, 103 * PAGE_SIZE)
    d.release(7, read=True, write=False)
    d.own(7, "map7", list(ranges), read=True, write=False)  # equal ranges again
    assert _reported(d, 103 * PAGE_SIZE)
    assert not _reported(d, 104 * PAGE_SIZE)
    d.release(7, read=True, write=False)
    ranges[1] = (104 * PAGE_SIZE + 512, 512)  # the same list, changed in place
    d.own(7, "map7", ranges, read=True, write=False)
    assert not _reported(d, 103 * PAGE_SIZE)
    assert _reported(d, 104 * PAGE_SIZE + 600)
    assert not _reported(d, 104 * PAGE_SIZE)
    d.release(7, read=True, write=False)
    assert d.owned() == 0 and not d.watching


def test_many_maps_owning_in_turn_each_cover_their_ranges() -> None:
    d = DmaDebug("k")
    for key in range(200):
        d.own(key, f"map{key}", _pages(1000 * key, 16), read=True, write=False)
        assert _reported(d, (1000 * key + 45) * PAGE_SIZE)
        d.release(key, read=True, write=False)
        assert not _reported(d, (1000 * key + 45) * PAGE_SIZE)
    for key in (0, 150):
        d.own(key, f"map{key}", _pages(1000 * key + 1, 16), read=True, write=False)
        assert not _reported(d, (1000 * key + 45) * PAGE_SIZE)
        assert _reported(d, (1000 * key + 46) * PAGE_SIZE)
        d.release(key, read=True, write=False)


def test_a_page_two_maps_own_stays_watched_until_both_give_it_back() -> None:
    d = DmaDebug("k")
    a = _pages(100, 16)
    d.own(1, "map1", a, read=True, write=False)
    d.own(2, "map2", a[3:5], read=True, write=False)
    d.release(1, read=True, write=False)
    assert _reported(d, 109 * PAGE_SIZE)  # a[3]: map2's still
    assert not _reported(d, 100 * PAGE_SIZE)
    d.release(2, read=True, write=False)
    assert not d.watching
    d.own(2, "map2", a[3:5], read=True, write=False)
    d.own(1, "map1", a, read=True, write=False)
    d.release(2, read=True, write=False)
    assert _reported(d, 100 * PAGE_SIZE)  # map1's, reported once in its period
    d.release(1, read=True, write=False)
    assert not d.watching and d.owned() == 0
