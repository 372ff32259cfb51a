"""Physical memory of a guest kernel and its page allocator (vm_phys).

Theory of operation
-------------------
The kernel is handed its domain's pseudo-physical memory through the small
:class:`PhysMem` protocol: the ``(first_pfn, npages)`` ranges that exist and a
writable view of any one page. The hypervisor's domain memory implements it;
:class:`BytePhysMem` is a plain implementation for tests.

:class:`VmPhys` hands pages out. A bitmap says which pages are free (so a
physically contiguous run, below some address, aligned, not crossing a
boundary, is one ``bytearray.find``); an order queue says in which order free
pages are handed out to ordinary allocations. At boot the memory is cut into
runs of 1 page (three times in four) or 2 to 4 pages, whose order is shuffled
with the kernel's seed, so that consecutive kernel virtual pages are usually
*not* physically contiguous, with some contiguous runs, and so that a guest
with memory above 4 GiB hands out low and high pages mixed. A freed page goes
to the front of the queue (the most recently freed page is reused first, as
with per-CPU page caches). Pages taken by a contiguous or address-restricted
allocation stay in the queue as stale entries that are skipped.

The scatter order comes from a SplitMix64 generator seeded by the kernel's
seed: deterministic per seed, and independent of the scheduler's randomness.

Wired pages (FreeBSD's ``vm_page_wire``/``vm_page_unwire``): a page can be
held by a wire count, which the grant layer takes for a page another domain
still maps (a grant it could not end). Freeing a wired page does not make it
free: it stays out of every free list until the last hold is dropped, and only
then joins the free pages (DESIGN section 4). Wiring a page that is already
free takes it out of circulation too. :meth:`VmPhys.on_unwired` runs a function
when a page's wire count drops to zero (the bounce zone takes its page back
that way).
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Sequence
from typing import Final, Protocol, final

from gntdma.sched import KernelPanic
from gntdma.sys._param import PAGE_MASK, PAGE_SHIFT, PAGE_SIZE

__all__ = [
    "BytePhysMem",
    "PhysMem",
    "SplitMix64",
    "VmPhys",
]

_M64: Final = (1 << 64) - 1


class PhysMem(Protocol):
    """A domain's pseudo-physical memory as the guest kernel sees it."""

    @property
    def ranges(self) -> Sequence[tuple[int, int]]:
        """The ``(first_pfn, npages)`` ranges that exist."""
        ...

    def page(self, pfn: int) -> memoryview:
        """A writable ``PAGE_SIZE``-byte view of page ``pfn``."""
        ...


@final
class BytePhysMem:
    """:class:`PhysMem` backed by one ``bytearray``, for tests.

    ``ranges`` are ``(first_pfn, npages)``; for example
    ``[(0, 256), (0x100000, 256)]`` is 1 MiB below 4 GiB and 1 MiB above.
    """

    def __init__(self, ranges: Sequence[tuple[int, int]]) -> None:
        total = 0
        self._index: list[tuple[int, int, int]] = []  # (first, npages, byte offset)
        for first, n in sorted(ranges):
            if n <= 0 or first < 0:
                raise ValueError(f"bad memory range ({first:#x}, {n})")
            if self._index and first < self._index[-1][0] + self._index[-1][1]:
                raise ValueError("memory ranges overlap")
            self._index.append((first, n, total << PAGE_SHIFT))
            total += n
        if total == 0:
            raise ValueError("no memory")
        self.ranges: Sequence[tuple[int, int]] = tuple((f, n) for f, n, _ in self._index)
        self._buf = bytearray(total << PAGE_SHIFT)
        self._view = memoryview(self._buf)

    def page(self, pfn: int) -> memoryview:
        for first, n, off in self._index:
            if first <= pfn < first + n:
                o = off + ((pfn - first) << PAGE_SHIFT)
                return self._view[o : o + PAGE_SIZE]
        raise ValueError(f"pfn {pfn:#x} does not exist")


@final
class SplitMix64:
    """A small deterministic generator (SplitMix64) for the page scatter order."""

    def __init__(self, seed: int) -> None:
        self._s = seed & _M64

    def next(self) -> int:
        self._s = (self._s + 0x9E3779B97F4A7C15) & _M64
        z = self._s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
        return z ^ (z >> 31)

    def below(self, n: int) -> int:
        return self.next() % n


@functools.lru_cache(maxsize=32)
def _scatter_order(ranges: tuple[tuple[int, int], ...], seed: int) -> tuple[int, ...]:
    """The boot scatter order of ``ranges`` for ``seed`` (a pure function of both).

    Memoized: the explorer builds the same host, with the same seeds, for every
    schedule, and drawing the order page by page was a quarter of its time.
    """
    rng = SplitMix64(seed)
    runs: list[tuple[int, int]] = []
    for first, n in ranges:
        pfn = first
        end = first + n
        while pfn < end:
            ln = 1 if rng.below(4) != 0 else 2 + rng.below(3)
            ln = min(ln, end - pfn)
            runs.append((pfn, ln))
            pfn += ln
    for i in range(len(runs) - 1, 0, -1):  # Fisher-Yates
        j = rng.below(i + 1)
        runs[i], runs[j] = runs[j], runs[i]
    order: list[int] = []
    for pfn, ln in runs:
        order.extend(range(pfn, pfn + ln))
    return tuple(order)


@functools.lru_cache(maxsize=32)
def _present_map(ranges: tuple[tuple[int, int], ...]) -> bytes:
    """One byte per pfn below the highest: 1 where ``ranges`` has a page, else 0
    (a pure function of ``ranges``, memoized like :func:`_scatter_order`)."""
    out = bytearray(max(f + n for f, n in ranges))
    for first, n in ranges:
        out[first : first + n] = b"\x01" * n
    return bytes(out)


@final
class VmPhys:
    """The physical page allocator of one kernel."""

    def __init__(self, physmem: PhysMem, seed: int) -> None:
        self.physmem = physmem
        ranges = [(int(f), int(n)) for f, n in physmem.ranges]
        self.ranges: tuple[tuple[int, int], ...] = tuple(ranges)
        #: One past the highest pfn (FreeBSD's Maxmem).
        self.maxmem = max(f + n for f, n in ranges)
        self.total = sum(n for _, n in ranges)
        #: 1 for each pfn that exists (immutable, shared by kernels of the same layout).
        self._present = _present_map(self.ranges)
        self.free_map = bytearray(self._present)
        self.nfree = self.total
        # The order queue: the pages freed since boot, most recent last (taken
        # first), in front of the boot order (shared, immutable) from _boot_next on.
        self._boot: tuple[int, ...] = _scatter_order(self.ranges, seed)
        self._boot_next = 0
        self._freed: list[int] = []
        #: pfn -> wire count (only wired pages appear).
        self.wired: dict[int, int] = {}
        #: Wired pages that were freed (or free when wired): free once unwired.
        self.free_deferred: set[int] = set()
        self._unwired_waiters: dict[int, list[Callable[[], None]]] = {}

    @property
    def _order(self) -> deque[int]:
        """The order queue as it stands, front first (the next page to try)."""
        q = deque(reversed(self._freed))
        q.extend(self._boot[self._boot_next :])
        return q

    def exists(self, pfn: int) -> bool:
        return 0 <= pfn < self.maxmem and self._present[pfn] == 1

    def npages_between(self, low: int, high: int | None = None) -> int:
        """How many pages of this memory, free or not, lie in ``[low, high]`` (bytes):
        an allocation of more than that can never be satisfied, however long it waits."""
        lo = (max(low, 0) + PAGE_MASK) >> PAGE_SHIFT
        hi = self.maxmem if high is None else min(self.maxmem, (high + 1) >> PAGE_SHIFT)
        return sum(max(0, min(f + n, hi) - max(f, lo)) for f, n in self.ranges)

    def is_free(self, pfn: int) -> bool:
        return 0 <= pfn < self.maxmem and self.free_map[pfn] == 1

    def alloc(self, low: int = 0, high: int | None = None) -> int | None:
        """One page whose physical address lies in ``[low, high]``; None if none is free.

        Unrestricted allocations follow the scatter order; restricted ones take
        the lowest free page in the window.
        """
        if low <= 0 and (high is None or (high >> PAGE_SHIFT) >= self.maxmem - 1):
            fm = self.free_map
            freed = self._freed
            while freed:
                pfn = freed.pop()
                if fm[pfn] == 1:
                    self._take(pfn, 1)
                    return pfn
            boot = self._boot
            i = self._boot_next
            end = len(boot)
            while i < end:
                pfn = boot[i]
                i += 1
                if fm[pfn] == 1:
                    self._boot_next = i
                    self._take(pfn, 1)
                    return pfn
            self._boot_next = i
            return None
        lo = (low + PAGE_MASK) >> PAGE_SHIFT
        hi = self.maxmem if high is None else min(self.maxmem, ((high + 1) >> PAGE_SHIFT))
        if lo >= hi:
            return None
        pfn = self.free_map.find(1, lo, hi)
        if pfn < 0:
            return None
        self._take(pfn, 1)
        return pfn

    def alloc_contig(
        self, npages: int, low: int, high: int, alignment: int, boundary: int
    ) -> int | None:
        """First pfn of ``npages`` free contiguous pages in ``[low, high]``, aligned to
        ``alignment`` bytes and not crossing a ``boundary``-byte line (0: none)."""
        if npages <= 0:
            raise KernelPanic(f"vm_page_alloc_contig: bad npages {npages}")
        size = npages << PAGE_SHIFT
        if boundary != 0 and size > boundary:
            return None
        apages = max(1, alignment >> PAGE_SHIFT)
        lo = (max(low, 0) + PAGE_MASK) >> PAGE_SHIFT
        hi = min(self.maxmem, (high + 1) >> PAGE_SHIFT)
        if npages == 1 and apages == 1 and boundary == 0:
            # One page, no alignment or boundary to meet (a bounce page): the
            # lowest free page of the window, as the search below finds it.
            pos = self.free_map.find(1, lo, hi) if lo < hi else -1
            if pos < 0:
                return None
            self.free_map[pos] = 0
            self.nfree -= 1
            return pos
        pattern = b"\x01" * npages
        start = -(-lo // apages) * apages
        while start + npages <= hi:
            pos = self.free_map.find(pattern, start, hi)
            if pos < 0:
                return None
            cand = -(-pos // apages) * apages
            if cand != pos:
                start = cand
                continue
            pa = pos << PAGE_SHIFT
            if boundary != 0 and ((pa ^ (pa + size - 1)) & ~(boundary - 1)) != 0:
                nxt = ((pa + boundary) & ~(boundary - 1)) >> PAGE_SHIFT
                start = -(-nxt // apages) * apages
                continue
            self._take(pos, npages)
            return pos
        return None

    def _take(self, pfn: int, n: int) -> None:
        self.free_map[pfn : pfn + n] = bytes(n)
        self.nfree -= n

    def free(self, pfn: int) -> None:
        """Give a page back; a wired page is kept out of circulation until unwired."""
        if not (0 <= pfn < self.maxmem) or self._present[pfn] != 1:
            raise KernelPanic(f"vm_page_free: pfn {pfn:#x} does not exist")
        if self.free_map[pfn] == 1 or pfn in self.free_deferred:
            raise KernelPanic(f"vm_page_free: pfn {pfn:#x} is already free")
        if pfn in self.wired:
            self.free_deferred.add(pfn)
            return
        self._release(pfn)

    def _release(self, pfn: int) -> None:
        self.free_map[pfn] = 1
        self.nfree += 1
        self._freed.append(pfn)

    # -- wiring ----------------------------------------------------------------------

    def wire(self, pfn: int) -> None:
        """``vm_page_wire``: one more hold on ``pfn``; a free page leaves circulation."""
        if not (0 <= pfn < self.maxmem) or self._present[pfn] != 1:
            raise KernelPanic(f"vm_page_wire: pfn {pfn:#x} does not exist")
        count = self.wired.get(pfn, 0)
        if count == 0 and self.free_map[pfn] == 1:
            self._take(pfn, 1)
            self.free_deferred.add(pfn)
        self.wired[pfn] = count + 1

    def unwire(self, pfn: int) -> None:
        """``vm_page_unwire``: drop one hold; at zero a freed page becomes free."""
        count = self.wired.get(pfn, 0)
        if count <= 0:
            raise KernelPanic(f"vm_page_unwire: pfn {pfn:#x} is not wired")
        if count > 1:
            self.wired[pfn] = count - 1
            return
        del self.wired[pfn]
        if pfn in self.free_deferred:
            self.free_deferred.discard(pfn)
            self._release(pfn)
        for fn in self._unwired_waiters.pop(pfn, []):
            fn()

    def is_wired(self, pfn: int) -> bool:
        return pfn in self.wired

    def on_unwired(self, pfn: int, fn: Callable[[], None]) -> None:
        """Run ``fn()`` when ``pfn``'s wire count drops to zero (now if not wired)."""
        if pfn not in self.wired:
            fn()
            return
        self._unwired_waiters.setdefault(pfn, []).append(fn)
