"""``Kernel.phys_copy``: many physical-to-physical copies in one call.

It must do exactly what ``phys_write(dst, phys_read(src, n))`` does for each
piece in order: the same bytes, the same panic on a page that does not exist
(after the pieces before it were copied), whatever the pieces (within a page,
across pages, in the memory above 4 GiB, in both ranges at once).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gntdma.sched import KernelPanic, Scheduler, VirtualClock
from gntdma.sys import PAGE_SIZE, BytePhysMem, Kernel

#: 2 MiB below 4 GiB and 2 MiB above, with a hole between.
LOW_PAGES = 512
HIGH_PAGES = 512
HIGH_PFN = 0x100000


def make_kernel(seed: int = 1) -> Kernel:
    return Kernel("guest", BytePhysMem([(0, LOW_PAGES), (HIGH_PFN, HIGH_PAGES)]), seed)

#: pfns the tests copy between: the low range and the high range.
_PFNS = st.one_of(st.integers(0, LOW_PAGES - 2), st.integers(HIGH_PFN, HIGH_PFN + HIGH_PAGES - 2))
_PIECE = st.tuples(_PFNS, st.integers(0, PAGE_SIZE - 1), _PFNS, st.integers(0, PAGE_SIZE - 1),
                   st.integers(0, 2 * PAGE_SIZE))


def _filled(seed: int) -> Kernel:
    """A kernel whose every page holds bytes of its own (the same for the same seed)."""
    k = make_kernel(seed=seed)
    for first, n in k.vm.ranges:
        for pfn in range(first, first + n):
            k.physmem.page(pfn)[:] = bytes([(pfn * 7 + i) & 0xFF for i in range(256)]) * 16
    return k


def _memory(k: Kernel) -> bytes:
    return b"".join(bytes(k.physmem.page(p)) for f, n in k.vm.ranges for p in range(f, f + n))


@pytest.fixture
def sched() -> Iterator[Scheduler]:
    s = Scheduler(clock=VirtualClock()).install()
    yield s
    s.shutdown()
    Scheduler.uninstall()


@settings(max_examples=60, deadline=None)
@given(pieces=st.lists(_PIECE, max_size=12),
       low_only=st.booleans())
def test_phys_copy_does_what_phys_read_and_phys_write_do_for_each_piece(
        pieces: list[tuple[int, int, int, int, int]], low_only: bool) -> None:
    """Within a page or across pages, overlapping or not, one range or two: the memory
    afterwards is what the piece-by-piece copies leave."""
    s = Scheduler(clock=VirtualClock()).install()
    try:
        if low_only:
            pieces = [(d % (LOW_PAGES - 1), do, sp % (LOW_PAGES - 1), so, n)
                      for d, do, sp, so, n in pieces]
        dst = [d * PAGE_SIZE + do for d, do, _s, _so, _n in pieces]
        src = [sp * PAGE_SIZE + so for _d, _do, sp, so, _n in pieces]
        lens = [n for *_x, n in pieces]
        a, b = _filled(3), _filled(3)
        # A piece may run off the end of a range into the hole: then the same panic.
        got = want = None
        try:
            a.phys_copy(dst, src, lens)
        except KernelPanic as e:
            got = str(e)
        try:
            for d, sa, n in zip(dst, src, lens, strict=True):
                b.phys_write(d, b.phys_read(sa, n))
        except KernelPanic as e:
            want = str(e)
        assert got == want
        assert _memory(a) == _memory(b)
    finally:
        s.shutdown()
        Scheduler.uninstall()


@pytest.mark.parametrize("bad", ["src", "dst"])
def test_phys_copy_panics_at_a_missing_page_after_copying_the_pieces_before(
        sched: Scheduler, bad: str) -> None:
    """The third piece names a pfn in the hole between the ranges: the first two are
    copied, then the same panic as phys_read / phys_write (``_phys_page``)."""
    a, b = _filled(5), _filled(5)
    hole = (LOW_PAGES + 10) * PAGE_SIZE
    dst = [3 * PAGE_SIZE, HIGH_PFN * PAGE_SIZE + 100, hole if bad == "dst" else 9 * PAGE_SIZE,
           11 * PAGE_SIZE]
    src = [7 * PAGE_SIZE + 8, 20 * PAGE_SIZE, hole if bad == "src" else 21 * PAGE_SIZE,
           22 * PAGE_SIZE]
    lens = [PAGE_SIZE - 8, 300, 10, 10]
    with pytest.raises(KernelPanic) as got:
        a.phys_copy(dst, src, lens)
    with pytest.raises(KernelPanic) as want:
        for d, s, n in zip(dst, src, lens, strict=True):
            b.phys_write(d, b.phys_read(s, n))
    assert str(got.value) == str(want.value)
    assert _memory(a) == _memory(b)


def test_phys_copy_of_nothing_and_of_unequal_lists(sched: Scheduler) -> None:
    k = make_kernel()
    k.phys_copy([], [], [])
    with pytest.raises(ValueError):
        k.phys_copy([0], [PAGE_SIZE], [])
