"""Fixtures for the guest kernel tests: a kernel with memory below and above 4 GiB."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from gntdma.sched import WITNESS, Scheduler, VirtualClock
from gntdma.sys import BytePhysMem, Kernel

#: 2 MiB below 4 GiB and 2 MiB above.
LOW_PAGES = 512
HIGH_PAGES = 512
HIGH_PFN = 0x100000


def make_kernel(seed: int = 1, low: int = LOW_PAGES, high: int = HIGH_PAGES,
                **kw: int) -> Kernel:
    ranges = [(0, low)]
    if high > 0:
        ranges.append((HIGH_PFN, high))
    return Kernel("guest", BytePhysMem(ranges), seed, **kw)


@pytest.fixture
def vsched() -> Iterator[Scheduler]:
    """A run-strategy scheduler on a virtual clock (timeouts jump)."""
    WITNESS.reset()
    s = Scheduler(clock=VirtualClock()).install()
    yield s
    s.shutdown()
    Scheduler.uninstall()
    WITNESS.reset()


@pytest.fixture
def kern(vsched: Scheduler) -> Iterator[Kernel]:
    k = make_kernel()
    yield k
    k.shutdown()


@pytest.fixture
def kernel_factory(vsched: Scheduler) -> Iterator[Callable[..., Kernel]]:
    """Build kernels with other memory sizes: ``kernel_factory(low=16, high=0)``."""
    made: list[Kernel] = []

    def factory(**kw: int) -> Kernel:
        k = make_kernel(**kw)
        made.append(k)
        return k

    yield factory
    for k in made:
        k.shutdown()
