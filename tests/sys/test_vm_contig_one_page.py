"""vm_page_alloc_contig of one page with no alignment above a page and no boundary
(what every bounce page asks for) takes the lowest free page of the window, as the
general search does, and a window with none gives None."""

from __future__ import annotations

import random

import pytest

from gntdma.sys import BytePhysMem
from gntdma.sys._param import PAGE_SHIFT, PAGE_SIZE
from gntdma.sys._vm import VmPhys


@pytest.mark.parametrize("seed", range(20))
def test_one_page_contig_is_the_lowest_free_page_of_the_window(seed: int) -> None:
    rng = random.Random(seed)
    ranges = [(0, 300), (0x100000, 40)] if seed % 2 else [(0, 300)]
    vm = VmPhys(BytePhysMem(ranges), seed)
    taken: list[int] = []
    for _ in range(400):
        if taken and rng.random() < 0.4:
            vm.free(taken.pop(rng.randrange(len(taken))))
            continue
        if rng.random() < 0.3:  # an ordinary allocation, in scatter order
            pfn = vm.alloc()
            if pfn is not None:
                taken.append(pfn)
            continue
        low = rng.choice([0, 1, PAGE_SIZE, rng.randrange(0, 400 * PAGE_SIZE)])
        high = rng.choice([(1 << 32) - 1, (1 << 64) - 1, rng.randrange(0, 400 * PAGE_SIZE),
                           low - 1])
        alignment = rng.choice([0, 1, PAGE_SIZE, 2 * PAGE_SIZE - 1])
        lo = (max(low, 0) + PAGE_SIZE - 1) >> PAGE_SHIFT
        hi = min(vm.maxmem, (high + 1) >> PAGE_SHIFT)
        window = (p for f, n in ranges for p in range(max(lo, f), min(hi, f + n)))
        want = next((p for p in window if vm.is_free(p)), None)  # pages that exist only
        nfree = vm.nfree
        got = vm.alloc_contig(1, low, high, alignment, 0)
        assert got == want
        if got is not None:
            assert not vm.is_free(got) and vm.nfree == nfree - 1
            taken.append(got)
        else:
            assert vm.nfree == nfree
    for pfn in taken:
        vm.free(pfn)
    assert vm.nfree == vm.total
