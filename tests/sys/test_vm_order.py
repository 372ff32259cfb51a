"""vm_phys's order queue: freed pages first (most recent first), then the boot order."""

from __future__ import annotations

import random
from collections import deque

from gntdma.sys import BytePhysMem, _vm
from gntdma.sys._param import PAGE_SHIFT


class _QueueModel:
    """The allocator's unrestricted order as one queue: boot order, frees in front."""

    def __init__(self, boot: tuple[int, ...]) -> None:
        self.q = deque(boot)
        self.free = set(boot)

    def alloc(self) -> int | None:
        while self.q:
            pfn = self.q.popleft()
            if pfn in self.free:
                self.free.discard(pfn)
                return pfn
        return None

    def take(self, pfn: int) -> None:
        self.free.discard(pfn)

    def release(self, pfn: int) -> None:
        self.free.add(pfn)
        self.q.appendleft(pfn)


def test_unrestricted_allocations_follow_one_queue_with_frees_in_front() -> None:
    ranges = [(0, 48), (0x100, 24)]
    for seed in range(40):
        rng = random.Random(seed)
        vm = _vm.VmPhys(BytePhysMem(ranges), seed)
        model = _QueueModel(_vm._scatter_order(vm.ranges, seed))
        held: list[int] = []
        for _ in range(400):
            r = rng.random()
            if r < 0.5:
                got = vm.alloc()
                assert got == model.alloc()
                if got is not None:
                    held.append(got)
            elif r < 0.6:
                # a restricted allocation takes the lowest free page of its window
                got = vm.alloc(0, (40 << PAGE_SHIFT) - 1)
                if got is not None:
                    model.take(got)
                    held.append(got)
            elif held:
                pfn = held.pop(rng.randrange(len(held)))
                vm.free(pfn)
                model.release(pfn)
            assert [p for p in vm._order if vm.is_free(p)] == [
                p for p in model.q if p in model.free]
        assert vm.nfree == len(model.free)
