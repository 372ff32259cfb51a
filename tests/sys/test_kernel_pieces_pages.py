"""``pmap_kextract_pieces`` and its page list: the pieces are ``pmap_kextract`` of each
page piece, in order, with the same fault on the first unmapped page.

FreeBSD amd64 ``pmap.c``: ``pmap_kextract`` translates one address by the kernel
page table; ``_bus_dmamap_load_buffer`` (x86 ``busdma_bounce.c``) calls it for
each page piece of a buffer, so an unmapped page faults at the first one.
"""

from __future__ import annotations

import random

import pytest

from gntdma.sched import KernelPanic
from gntdma.sys import M_DEVBUF, M_WAITOK, PAGE_MASK, PAGE_SIZE, Kernel


def _walk(kern: Kernel, va: int, n: int) -> list[tuple[int, int]]:
    out = []
    end = va + n
    while va < end:
        ln = min(end - va, PAGE_SIZE - (va & PAGE_MASK))
        out.append((kern.pmap_kextract(va), ln))
        va += ln
    return out


def test_pieces_are_pmap_kextract_of_each_page_piece(kern: Kernel) -> None:
    rng = random.Random(14)
    buf = kern.malloc(12 * PAGE_SIZE, M_DEVBUF, M_WAITOK)
    for _ in range(300):
        va = buf + rng.randrange(0, 4 * PAGE_SIZE)
        n = rng.choice([0, 1, 511, PAGE_SIZE - 1, PAGE_SIZE, PAGE_SIZE + 1,
                        rng.randrange(1, 8 * PAGE_SIZE)])
        assert kern.pmap_kextract_pieces(va, n) == _walk(kern, va, n)
        mapped = kern.pmap_kextract_pieces_mapped(va, n)
        assert mapped == _walk(kern, va, n)
        if n > 0:
            pages = kern.pmap_kextract_pieces_pages(va, n)
            assert pages == [pa & ~PAGE_MASK for pa, _ in _walk(kern, va, n)]


def test_pieces_fault_at_the_first_unmapped_page(kern: Kernel) -> None:
    buf = kern.malloc(8 * PAGE_SIZE, M_DEVBUF, M_WAITOK)
    va = (buf + PAGE_SIZE - 1) & ~PAGE_MASK
    hole = va + 3 * PAGE_SIZE
    pa = kern.pmap_kextract(hole)
    kern.pmap_kremove(hole)
    try:
        with pytest.raises(KernelPanic) as walk:
            _walk(kern, va + 100, 5 * PAGE_SIZE)
        with pytest.raises(KernelPanic) as got:
            kern.pmap_kextract_pieces(va + 100, 5 * PAGE_SIZE)
        assert str(got.value) == str(walk.value)
        assert kern.pmap_kextract_pieces_mapped(va + 100, 5 * PAGE_SIZE) is None
        assert kern.pmap_kextract_pieces_pages(va + 100, 5 * PAGE_SIZE) is None
    finally:
        kern.pmap_kenter(hole, pa)
