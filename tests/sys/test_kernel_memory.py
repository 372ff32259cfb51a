"""Pages, kernel virtual memory, malloc(9) accounting and CPU/physical access."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from gntdma.sched import KernelPanic, Scheduler, VirtualClock
from gntdma.sys import (
    M_BUSDMA,
    M_DEVBUF,
    M_NOWAIT,
    M_TEMP,
    M_WAITOK,
    M_ZERO,
    PAGE_SIZE,
    BytePhysMem,
    Kernel,
    MallocType,
)

HIGH = 0x100000


def test_kva_is_physically_scattered_and_kextract_is_right(kern: Kernel) -> None:
    npages = 64
    va = kern.malloc(npages * PAGE_SIZE, M_DEVBUF, M_WAITOK)
    pas = [kern.pmap_kextract(va + i * PAGE_SIZE) for i in range(npages)]
    assert all(pa % PAGE_SIZE == 0 for pa in pas)
    contiguous = sum(1 for a, b in itertools.pairwise(pas) if b == a + PAGE_SIZE)
    assert 0 < contiguous < npages // 2, "mostly scattered, with some contiguous runs"
    assert any(pa >= HIGH * PAGE_SIZE for pa in pas) and any(pa < 1 << 32 for pa in pas)
    # kextract keeps the page offset, and CPU writes land where it says
    pattern = bytes(range(256)) * (npages * PAGE_SIZE // 256)
    kern.kva_write(va, pattern)
    for i, pa in enumerate(pas):
        assert kern.pmap_kextract(va + i * PAGE_SIZE + 123) == pa + 123
        assert kern.phys_read(pa, PAGE_SIZE) == pattern[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
    assert kern.kva_read(va + 4000, 200) == pattern[4000:4200]
    kern.free(va, M_DEVBUF)
    kern.assert_no_leaks()


def test_scatter_order_depends_on_seed(kernel_factory: Callable[..., Kernel]) -> None:
    a, b, c = kernel_factory(seed=1), kernel_factory(seed=1), kernel_factory(seed=2)
    seq = [[k.vm_page_alloc() for _ in range(16)] for k in (a, b, c)]
    assert seq[0] == seq[1] != seq[2]


def test_small_allocations_are_bucketed_and_never_cross_a_page(kern: Kernel) -> None:
    vas = []
    for size in (1, 16, 17, 100, 256, 1000, 2048, 3000, 4096):
        va = kern.malloc(size, M_TEMP, M_WAITOK)
        bucket = kern.malloc_usable_size(va)
        assert bucket >= size and bucket & (bucket - 1) == 0
        assert va % bucket == 0
        assert (va % PAGE_SIZE) + bucket <= PAGE_SIZE
        vas.append(va)
    st_ = kern.malloc_statistics()["temp"]
    assert st_.inuse == 9 and st_.memuse == sum(kern.malloc_usable_size(v) for v in vas)
    for va in vas:
        kern.free(va, M_TEMP)
    assert kern.malloc_statistics()["temp"].memuse == 0
    kern.assert_no_leaks()


def test_malloc_zero_and_free_junk(kern: Kernel) -> None:
    va = kern.malloc(64, M_DEVBUF, M_WAITOK)
    kern.kva_write(va, b"\xff" * 64)
    kern.free(va, M_DEVBUF)
    va2 = kern.malloc(5000, M_DEVBUF, M_WAITOK | M_ZERO)
    assert kern.kva_read(va2, 5000) == bytes(5000)
    kern.free(va2, M_DEVBUF)
    va3 = kern.malloc(64, M_DEVBUF, M_WAITOK)  # same slab slot, junk filled
    assert kern.kva_read(va3, 4) == bytes.fromhex("dec0adde")
    kern.free(va3, M_DEVBUF)


def test_bad_frees_panic(kern: Kernel) -> None:
    va = kern.malloc(32, M_DEVBUF, M_WAITOK)
    with pytest.raises(KernelPanic, match="freed as temp"):
        kern.free(va, M_TEMP)
    kern.free(va, M_DEVBUF)
    with pytest.raises(KernelPanic, match="double free"):
        kern.free(va, M_DEVBUF)
    kern.free(0, M_DEVBUF)  # free(NULL)
    with pytest.raises(KernelPanic, match="M_NOWAIT and M_WAITOK"):
        kern.malloc(8, M_DEVBUF, 0)


def test_guard_page_and_use_after_free_fault(kern: Kernel) -> None:
    va = kern.malloc(2 * PAGE_SIZE, M_DEVBUF, M_WAITOK)
    with pytest.raises(KernelPanic, match="not mapped"):
        kern.kva_read(va + 2 * PAGE_SIZE - 1, 2)
    kern.free(va, M_DEVBUF)
    with pytest.raises(KernelPanic, match="not mapped"):
        kern.kva_read(va, 1)
    with pytest.raises(KernelPanic, match="page fault"):
        kern.pmap_kextract(va)


def test_contigmalloc_honours_range_alignment_boundary(kern: Kernel) -> None:
    va = kern.contigmalloc(3 * PAGE_SIZE, M_DEVBUF, M_NOWAIT, 0, (1 << 32) - 1,
                           4 * PAGE_SIZE, 16 * PAGE_SIZE)
    assert va != 0
    pa0 = kern.pmap_kextract(va)
    assert pa0 % (4 * PAGE_SIZE) == 0 and pa0 + 3 * PAGE_SIZE <= 1 << 32
    assert pa0 // (16 * PAGE_SIZE) == (pa0 + 3 * PAGE_SIZE - 1) // (16 * PAGE_SIZE)
    for i in range(3):
        assert kern.pmap_kextract(va + i * PAGE_SIZE) == pa0 + i * PAGE_SIZE
    high = kern.contigmalloc(PAGE_SIZE, M_DEVBUF, M_NOWAIT, HIGH * PAGE_SIZE,
                             (1 << 64) - 1, PAGE_SIZE, 0)
    assert kern.pmap_kextract(high) >= HIGH * PAGE_SIZE
    assert kern.contigmalloc(PAGE_SIZE * 4, M_DEVBUF, M_NOWAIT, 0, (1 << 64) - 1,
                             PAGE_SIZE, 2 * PAGE_SIZE) == 0  # cannot fit under boundary
    with pytest.raises(KernelPanic, match="contigfree"):
        kern.free(va, M_DEVBUF)
    kern.contigfree(va, 3 * PAGE_SIZE, M_DEVBUF)
    kern.contigfree(high, PAGE_SIZE, M_DEVBUF)
    assert kern.malloc_statistics()["devbuf"].failures == 1
    kern.assert_no_leaks()


def test_low_memory_allocations(kern: Kernel) -> None:
    pfns = [kern.vm_page_alloc(M_NOWAIT, 0, (1 << 32) - 1) for _ in range(10)]
    assert all(p is not None and p < HIGH for p in pfns)
    va = kern.kmem_alloc_attr(5 * PAGE_SIZE, M_WAITOK, HIGH * PAGE_SIZE, (1 << 64) - 1)
    assert all(kern.pmap_kextract(va + i * PAGE_SIZE) >= HIGH * PAGE_SIZE for i in range(5))
    kern.kmem_free(va, 5 * PAGE_SIZE)
    for p in pfns:
        assert p is not None
        kern.vm_page_free(p)
    with pytest.raises(KernelPanic, match="already free"):
        kern.vm_page_free(pfns[0] if pfns[0] is not None else 0)
    kern.assert_no_leaks()


def test_injected_failures_and_nowait_shortage(kernel_factory: Callable[..., Kernel]) -> None:
    k = kernel_factory(low=4, high=0)
    k.inject_malloc_failure(M_BUSDMA)
    assert k.malloc(10, M_DEVBUF, M_NOWAIT) != 0  # other types unaffected
    assert k.malloc(10, M_BUSDMA, M_NOWAIT) == 0
    assert k.malloc(3 * PAGE_SIZE, M_TEMP, M_NOWAIT) != 0
    assert k.malloc(2 * PAGE_SIZE, M_TEMP, M_NOWAIT) == 0  # out of pages
    stats = k.malloc_statistics()
    assert stats["busdma"].failures == 1 and stats["temp"].failures == 1


def test_waitok_sleeps_until_memory_is_freed(vsched: Scheduler,
                                             kernel_factory: Callable[..., Kernel]) -> None:
    k = kernel_factory(low=4, high=0)
    hog = k.malloc(4 * PAGE_SIZE, M_DEVBUF, M_WAITOK)
    got: list[int] = []
    t = vsched.spawn(lambda: got.append(k.malloc(PAGE_SIZE, M_TEMP, M_WAITOK)), name="waiter")
    vsched.run(until=lambda: t.wmesg == "vmwait")
    assert got == []
    k.free(hog, M_DEVBUF)
    vsched.run()
    assert len(got) == 1 and got[0] != 0
    k.free(got[0], M_TEMP)
    k.assert_no_leaks()


def test_kva_view_and_views(kern: Kernel) -> None:
    va = kern.malloc(3 * PAGE_SIZE, M_DEVBUF, M_WAITOK | M_ZERO)
    kern.kva_view(va + 10, 5)[:] = b"hello"
    assert kern.kva_read(va + 10, 5) == b"hello"
    with pytest.raises(KernelPanic, match="crosses a page"):
        kern.kva_view(va + PAGE_SIZE - 2, 4)
    views = kern.kva_views(va + PAGE_SIZE - 2, PAGE_SIZE + 4)
    assert [len(v) for v in views] == [2, PAGE_SIZE, 2]
    kern.free(va, M_DEVBUF)


def test_statistics_and_leak_report(kern: Kernel) -> None:
    va = kern.malloc(100, M_DEVBUF, M_WAITOK)
    s = kern.statistics()
    assert s.malloc_bytes == 128 and s.pages_in_use == 1 and s.kva_pages_mapped == 1
    with pytest.raises(AssertionError, match="devbuf: 128 bytes"):
        kern.assert_no_leaks()
    kern.free(va, M_DEVBUF)
    assert kern.statistics().pages_in_use == 0


def test_byte_physmem_rejects_bad_ranges() -> None:
    with pytest.raises(ValueError, match="overlap"):
        BytePhysMem([(0, 4), (2, 4)])
    mem = BytePhysMem([(0, 1), (HIGH, 1)])
    assert len(mem.page(HIGH)) == PAGE_SIZE
    with pytest.raises(ValueError):
        mem.page(5)


_TYPES = [M_DEVBUF, M_TEMP, M_BUSDMA]


class MallocMachine(RuleBasedStateMachine):
    """malloc/free against a model: accounting, no overlap, contents preserved."""

    allocs = Bundle("allocs")

    def __init__(self) -> None:
        super().__init__()
        self.sched = Scheduler(clock=VirtualClock()).install()
        self.kern = Kernel("model", BytePhysMem([(0, 64), (HIGH, 64)]), seed=7)
        self.model: dict[int, tuple[int, MallocType, bytes]] = {}
        self.counter = 0

    @rule(target=allocs, size=st.one_of(st.integers(0, 4096), st.integers(4097, 5 * 4096)),
          mtype=st.sampled_from(_TYPES), zero=st.booleans())
    def alloc(self, size: int, mtype: MallocType, zero: bool) -> int:
        va = self.kern.malloc(size, mtype, M_NOWAIT | (M_ZERO if zero else 0))
        if va == 0:
            return 0
        if zero:
            assert self.kern.kva_read(va, size) == bytes(size)
        self.counter += 1
        fill = bytes([self.counter & 0xFF]) * size
        self.kern.kva_write(va, fill)
        self.model[va] = (size, mtype, fill)
        return va

    @rule(va=consumes(allocs))
    def release(self, va: int) -> None:
        if va == 0:
            return
        size, mtype, fill = self.model.pop(va)
        assert self.kern.kva_read(va, size) == fill
        self.kern.free(va, mtype)

    @invariant()
    def accounting_matches(self) -> None:
        stats = self.kern.malloc_statistics()
        for mt in _TYPES:
            mine = [(va, s) for va, (s, t, _) in self.model.items() if t == mt]
            got = stats.get(mt.name)
            inuse = got.inuse if got is not None else 0
            memuse = got.memuse if got is not None else 0
            assert inuse == len(mine)
            assert memuse == sum(self.kern.malloc_usable_size(va) for va, _ in mine)
            for va, s in mine:
                assert self.kern.malloc_usable_size(va) >= s

    @invariant()
    def no_overlap(self) -> None:
        spans = sorted((va, va + max(1, self.kern.malloc_usable_size(va))) for va in self.model)
        for (_, e), (s, _) in itertools.pairwise(spans):
            assert e <= s

    def teardown(self) -> None:
        for va, (_, mtype, _) in list(self.model.items()):
            self.kern.free(va, mtype)
        self.kern.assert_no_leaks()
        self.kern.shutdown()
        self.sched.shutdown()
        Scheduler.uninstall()


TestMallocMachine = MallocMachine.TestCase
TestMallocMachine.settings = settings(max_examples=40, stateful_step_count=40, deadline=None)
