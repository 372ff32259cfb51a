"""The mapping of a destroyed domain's memory reused for the next domain of its size."""

from __future__ import annotations

from gntdma.abi.xen import PAGE_SIZE
from gntdma.hv import DomainMemory
from gntdma.hv._memory import HIGHMEM_START_PFN


def _scribble(mem: DomainMemory, pfns: list[int]) -> None:
    for pfn in pfns:
        view = mem.page(pfn)
        view[:] = bytes([pfn & 0xFF | 1]) * PAGE_SIZE
        view.release()


def _all_zero(mem: DomainMemory, pfns: list[int]) -> bool:
    out = True
    for pfn in pfns:
        view = mem.page(pfn)
        out = out and view.tobytes() == bytes(PAGE_SIZE)
        view.release()
    return out


def test_new_memory_after_a_destroyed_one_of_the_same_size_is_all_zeros() -> None:
    pfns = [0, 1, 7, 63, HIGHMEM_START_PFN, HIGHMEM_START_PFN + 15]
    for _ in range(6):  # past the pool's depth: reused and fresh mappings alike
        mem = DomainMemory(64, 16)
        assert _all_zero(mem, pfns)
        _scribble(mem, pfns)
        mem.close()
    mem = DomainMemory(64, 16)
    # every page, not only the ones written: nothing of an earlier domain shows
    for pfn in [*range(64), *range(HIGHMEM_START_PFN, HIGHMEM_START_PFN + 16)]:
        view = mem.page(pfn)
        assert view.tobytes() == bytes(PAGE_SIZE), hex(pfn)
        view.release()
    mem.close()


def test_memory_with_a_live_page_view_is_not_reused() -> None:
    mem = DomainMemory(32)
    kept = mem.page(5)
    kept[:4] = b"keep"
    mem.close()  # a view is alive: left to the garbage collector
    others = [DomainMemory(32) for _ in range(6)]
    for other in others:
        _scribble(other, [5])
    assert kept[:4].tobytes() == b"keep"  # no later domain writes through it
    kept.release()
    mem.close()  # now it may go
    for other in others:
        other.close()
    fresh = DomainMemory(32)
    assert _all_zero(fresh, list(range(32)))
    fresh.close()


def test_closing_memory_twice_gives_its_mapping_away_once() -> None:
    mem = DomainMemory(16)
    _scribble(mem, [3])
    mem.close()
    mem.close()
    a, b = DomainMemory(16), DomainMemory(16)
    assert a._map is not b._map
    _scribble(a, [3])
    assert _all_zero(b, [3])
    a.close()
    b.close()
