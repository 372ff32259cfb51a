"""The guest kernel: pages, kernel virtual memory, malloc(9), CPU and physical access.

Theory of operation
-------------------
One :class:`Kernel` per guest domain. Its memory is the domain's
pseudo-physical memory (:class:`PhysMem`); pages are handed out by
:class:`VmPhys` in a scattered order. Kernel virtual addresses start at
``KVA_BASE``; a page table maps virtual page numbers to pfns, filled by
``pmap_qenter``/``pmap_kenter``. Each ``kva_alloc`` leaves one unmapped guard
page after its range and kernel virtual space is never reused, so an overrun or
a use after free faults (``KernelPanic``) instead of reading someone else's data.

malloc(9): sizes up to ``PAGE_SIZE`` come from the slabs of ``_uma``; larger
sizes get whole pages, physically scattered, page aligned. A kernel whose
allocations are all freed holds no pages: :meth:`Kernel.assert_no_leaks`
checks it. A wired page (``vm_page_wire``) freed by its owner is not reused
until it is unwired (DESIGN section 4). Freed memory is filled with
``0xdeadc0de`` (FreeBSD INVARIANTS) unless the tunable ``vm.debug.divisor`` says
otherwise (``_tunables``). ``M_WAITOK`` sleeps until pages are freed
(``vm_wait``), except for a request no freeing can satisfy (more pages than the
domain has, or none in the asked range): it fails at once (0 or None), where
FreeBSD's ``kmem_back_domain`` retries forever (deliberate, panic-free).
``M_NOWAIT`` returns 0 on shortage, and failures can be injected
per type with :meth:`Kernel.inject_malloc_failure`.

``kva_read``/``kva_write`` are the CPU's accesses to kernel memory and are
checked by DMA-API debugging; ``phys_read``/``phys_write`` are physical
accesses (a device doing DMA, the direct map) and are not.

Rules: no scheduling point inside these functions except the ``M_WAITOK``
sleep and the wakeup that ends a free (both under ``vm_domainset_lock``, see
``_vmwait``), so each call is atomic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final, final

from gntdma.sched import (
    KernelPanic,
    Mutex,
    Scheduler,
    current_scheduler,
    random_u64,
)
from gntdma.sys._callout import Softclock
from gntdma.sys._dmadebug import BusDmaCounters, DmaDebug
from gntdma.sys._kleaks import kernel_leaks, kernel_statistics
from gntdma.sys._kstats import KernelStatistics
from gntdma.sys._malloc import (
    M_KMEM,
    M_NOWAIT,
    M_WAITOK,
    M_ZERO,
    MallocType,
    MallocTypeStats,
    TypeCounters,
)
from gntdma.sys._param import KVA_BASE, PAGE_MASK, PAGE_SHIFT, PAGE_SIZE
from gntdma.sys._physcopy import phys_copy as _phys_copy
from gntdma.sys._taskqueue import TaskQueue
from gntdma.sys._tunables import KernelTunables, junk_item
from gntdma.sys._uma import SlabAllocator
from gntdma.sys._vm import PhysMem, VmPhys
from gntdma.sys._vmwait import VmWait

__all__ = ["BUS_SPACE_MAXADDR_ANY", "Kernel", "KernelStatistics"]

#: ``high`` value meaning "no upper physical limit".
BUS_SPACE_MAXADDR_ANY: Final = (1 << 64) - 1

_JUNK: Final = bytes.fromhex("dec0adde") * (PAGE_SIZE // 4)  # 0xdeadc0de, little endian
_ZEROS: Final = bytes(PAGE_SIZE)
_KIND_SLAB: Final = 0
_KIND_PAGES: Final = 1
_KIND_CONTIG: Final = 2


@final
class Kernel:
    """One guest kernel (FreeBSD style)."""

    def __init__(self, name: str, physmem: PhysMem, seed: int | None = None,
                 *, bounce_max_pages: int = 512, tunables: KernelTunables | None = None) -> None:
        self.name = name
        self.physmem = physmem
        self.sched: Scheduler = current_scheduler()
        self.seed = seed if seed is not None else random_u64()
        self.vm = VmPhys(physmem, self.seed)
        self._ptes: dict[int, int] = {}
        #: Bumped on every change to ``_ptes``: a va -> pa translation made while it
        #: is unchanged is still valid (busdma caches its sync ranges on it).
        self.pmap_gen = 0
        self._kva_next = KVA_BASE
        self._kva_ranges: dict[int, int] = {}  # va -> npages, for kva_free
        self._allocs: dict[int, tuple[int, MallocType, int]] = {}
        self._slab = SlabAllocator(self)
        self._types: dict[MallocType, TypeCounters] = {}
        #: ``_types`` by id(type), the type kept alive (its id stays its own): no hashing.
        self._types_by_id: dict[int, tuple[MallocType, TypeCounters]] = {}
        self._inject: dict[MallocType | None, int] = {}
        self._vmwait = VmWait()
        #: FreeBSD's Giant, for callouts initialised with mpsafe=0.
        self.Giant = Mutex("Giant")
        #: Boot-time debugging switches (``_tunables``); change them with ``set_tunables``.
        self.tunables = tunables if tunables is not None else KernelTunables()
        self.dma_debug = DmaDebug(name, self.tunables.dma_debug)
        self.busdma = BusDmaCounters()
        #: Maximum bounce pages per bounce zone (FreeBSD's MAX_BPAGES).
        self.bounce_max_pages = bounce_max_pages
        #: Per-kernel bus_dma state, owned by gntdma.sys busdma code.
        self.busdma_state: Any = None
        self.taskqueue_thread = TaskQueue("taskqueue", self)
        self.taskqueue_swi = TaskQueue("swi", self)
        self.softclock = Softclock(self)
        self._down = False

    def __repr__(self) -> str:
        return f"<Kernel {self.name}>"

    def set_tunables(self, tunables: KernelTunables) -> None:
        """Set the kernel's tunables (on FreeBSD ``kenv`` and a reboot; here at once)."""
        self.tunables = tunables
        self.dma_debug.set_enabled(tunables.dma_debug)

    # -- physical pages -----------------------------------------------------------

    def vm_page_alloc(self, flags: int = M_NOWAIT, low: int = 0,
                      high: int = BUS_SPACE_MAXADDR_ANY) -> int | None:
        """One page (its pfn) with physical address in ``[low, high]``; None on shortage.

        ``M_WAITOK`` sleeps until a page is freed; ``M_ZERO`` zeroes it.
        """
        while True:
            frees = self._vmwait.frees
            pfn = self.vm.alloc(low, None if high >= BUS_SPACE_MAXADDR_ANY else high)
            if pfn is not None:
                if flags & M_ZERO:
                    self.physmem.page(pfn)[:] = _ZEROS
                return pfn
            if not flags & M_WAITOK or self.vm.npages_between(low, high) == 0:
                return None  # no page there to wait for: never sleep forever
            self._vmwait.sleep(frees)

    def vm_page_free(self, pfn: int) -> None:
        self.vm.free(pfn)
        self._vm_freed()

    def vm_page_wire(self, pfn: int) -> None:
        self.vm.wire(pfn)  # freed or not, the page is not reused until unwired

    def vm_page_unwire(self, pfn: int) -> None:
        self.vm.unwire(pfn)  # a page freed while wired becomes free now
        if self.vm.is_free(pfn):
            self._vm_freed()

    def _vm_freed(self) -> None:
        self._vmwait.freed()

    def vm_page_alloc_contig(self, npages: int, flags: int, low: int, high: int,
                             alignment: int, boundary: int) -> int | None:
        """First pfn of ``npages`` physically contiguous pages; None if none fits."""
        pfn = self.vm.alloc_contig(npages, low, high, max(alignment, PAGE_SIZE), boundary)
        if pfn is not None and flags & M_ZERO:
            for p in range(pfn, pfn + npages):
                self.physmem.page(p)[:] = _ZEROS
        return pfn

    # -- kernel virtual memory and the pmap ----------------------------------------------

    def kva_alloc(self, npages: int) -> int:
        """Reserve ``npages`` of kernel virtual space (unmapped), followed by a guard page."""
        if npages <= 0:
            raise KernelPanic(f"kva_alloc: bad npages {npages}")
        va = self._kva_next
        self._kva_next += (npages + 1) << PAGE_SHIFT
        self._kva_ranges[va] = npages
        return va

    def kva_free(self, va: int, npages: int) -> None:
        if self._kva_ranges.get(va) != npages:
            raise KernelPanic(f"kva_free: {va:#x} ({npages} pages) was not allocated")
        for vpn in range(va >> PAGE_SHIFT, (va >> PAGE_SHIFT) + npages):
            if vpn in self._ptes:
                raise KernelPanic(f"kva_free: {vpn << PAGE_SHIFT:#x} still mapped")
        del self._kva_ranges[va]

    def pmap_qenter(self, va: int, pfns: Sequence[int]) -> None:
        """Map consecutive virtual pages from ``va`` to the pages ``pfns``."""
        if va & PAGE_MASK:
            raise KernelPanic(f"pmap_qenter: unaligned va {va:#x}")
        vpn = va >> PAGE_SHIFT
        self.pmap_gen += 1
        ptes = self._ptes
        for pfn in pfns:
            ptes[vpn] = pfn
            vpn += 1

    def pmap_qremove(self, va: int, count: int) -> None:
        vpn = va >> PAGE_SHIFT
        self.pmap_gen += 1
        for i in range(count):
            self._ptes.pop(vpn + i, None)

    def pmap_kenter(self, va: int, pa: int) -> None:
        self.pmap_gen += 1
        self._ptes[va >> PAGE_SHIFT] = pa >> PAGE_SHIFT

    def pmap_kremove(self, va: int) -> None:
        self.pmap_gen += 1
        self._ptes.pop(va >> PAGE_SHIFT, None)

    def pmap_kextract(self, va: int) -> int:
        """The physical address of kernel virtual address ``va`` (a fault if unmapped)."""
        pfn = self._ptes.get(va >> PAGE_SHIFT)
        if pfn is None:
            raise KernelPanic(f"pmap_kextract: page fault, va {va:#x} not mapped")
        return (pfn << PAGE_SHIFT) | (va & PAGE_MASK)

    vtophys = pmap_kextract

    def pmap_kextract_pieces(self, va: int, n: int) -> list[tuple[int, int]]:
        """(pa, len) of each page piece of ``[va, va+n)``: ``pmap_kextract`` of each piece
        (the same fault on the first unmapped one), one dict lookup per page."""
        out = self.pmap_kextract_pieces_mapped(va, n)
        if out is None:  # a page is unmapped: fault at the first one, as piece by piece
            out = [(self.pmap_kextract(p), min(va + n - p, PAGE_SIZE - (p & PAGE_MASK)))
                   for p in [va, *range((va | PAGE_MASK) + 1, va + n, PAGE_SIZE)]]
        return out

    def pmap_kextract_pieces_mapped(self, va: int, n: int) -> list[tuple[int, int]] | None:
        """:meth:`pmap_kextract_pieces` if every page of ``[va, va+n)`` is mapped, else None
        (no fault: a caller that must fault where a page-by-page walk would walks again)."""
        if n <= 0:
            return []
        off = va & PAGE_MASK
        if off + n <= PAGE_SIZE:  # within one page
            pfn = self._ptes.get(va >> PAGE_SHIFT)
            return None if pfn is None else [((pfn << PAGE_SHIFT) | off, n)]
        if (pas := self.pmap_kextract_pieces_pages(va, n)) is None:
            return None
        out = [(pa, PAGE_SIZE) for pa in pas]  # two pages at least
        out[0] = (pas[0] | off, PAGE_SIZE - off)
        out[-1] = (pas[-1], va + n - ((va + n - 1) & ~PAGE_MASK))
        return out

    def pmap_kextract_pieces_pages(self, va: int, n: int) -> list[int] | None:
        """The address of each page of ``[va, va+n)`` (n > 0), or None if one is unmapped."""
        ptes = self._ptes
        try:
            return [ptes[vpn] << PAGE_SHIFT
                    for vpn in range(va >> PAGE_SHIFT, ((va + n - 1) >> PAGE_SHIFT) + 1)]
        except KeyError:
            return None

    def kva_mapped(self, va: int) -> bool:
        return (va >> PAGE_SHIFT) in self._ptes

    # -- CPU and physical access -------------------------------------------------------

    def _pieces(self, va: int, n: int) -> list[tuple[int, int, int]]:
        """(pfn, offset, length) pieces of ``[va, va+n)``; faults on unmapped pages."""
        out: list[tuple[int, int, int]] = []
        while n > 0:
            off = va & PAGE_MASK
            ln = min(n, PAGE_SIZE - off)
            pfn = self._ptes.get(va >> PAGE_SHIFT)
            if pfn is None:
                raise KernelPanic(f"page fault: kernel va {va:#x} not mapped")
            out.append((pfn, off, ln))
            va += ln
            n -= ln
        return out

    def kva_read(self, va: int, n: int) -> bytes:
        """The CPU reads ``n`` bytes of kernel memory at ``va``."""
        pieces = self._pieces(va, n)
        dbg = self.dma_debug
        out = []
        for pfn, off, ln in pieces:
            if dbg.watching:
                dbg.check_cpu_access((pfn << PAGE_SHIFT) | off, ln, False, va)
            out.append(bytes(self.physmem.page(pfn)[off : off + ln]))
            va += ln
        return out[0] if len(out) == 1 else b"".join(out)

    def kva_write(self, va: int, data: bytes | bytearray | memoryview) -> None:
        """The CPU writes ``data`` to kernel memory at ``va``."""
        mv = memoryview(data).cast("B")
        dbg = self.dma_debug
        pos = 0
        for pfn, off, ln in self._pieces(va, len(mv)):
            if dbg.watching:
                dbg.check_cpu_access((pfn << PAGE_SHIFT) | off, ln, True, va + pos)
            self.physmem.page(pfn)[off : off + ln] = mv[pos : pos + ln]
            pos += ln

    def kva_zero(self, va: int, n: int) -> None:
        """bzero(9)."""
        self.kva_write(va, bytes(n))

    def kva_views(self, va: int, n: int) -> list[memoryview]:
        """Writable views of ``[va, va+n)``, one per page piece (not checked by DMA debug)."""
        return [self.physmem.page(pfn)[off : off + ln] for pfn, off, ln in self._pieces(va, n)]

    def kva_view(self, va: int, n: int) -> memoryview:
        """A writable view of ``[va, va+n)``, which must lie within one page."""
        if (va & PAGE_MASK) + n > PAGE_SIZE:
            raise KernelPanic(f"kva_view: {va:#x}+{n} crosses a page; use kva_views")
        pfn = self._ptes.get(va >> PAGE_SHIFT)
        if pfn is None:
            raise KernelPanic(f"page fault: kernel va {va:#x} not mapped")
        off = va & PAGE_MASK
        return self.physmem.page(pfn)[off : off + n]

    def phys_read(self, pa: int, n: int) -> bytes:
        """Read physical memory (device side; not checked by DMA-API debugging)."""
        out = []
        while n > 0:
            off = pa & PAGE_MASK
            ln = min(n, PAGE_SIZE - off)
            out.append(bytes(self._phys_page(pa >> PAGE_SHIFT)[off : off + ln]))
            pa += ln
            n -= ln
        return b"".join(out)

    def phys_write(self, pa: int, data: bytes | bytearray | memoryview) -> None:
        """Write physical memory (device side; not checked by DMA-API debugging)."""
        mv = memoryview(data).cast("B")
        pos = 0
        while pos < len(mv):
            off = pa & PAGE_MASK
            ln = min(len(mv) - pos, PAGE_SIZE - off)
            self._phys_page(pa >> PAGE_SHIFT)[off : off + ln] = mv[pos : pos + ln]
            pa += ln
            pos += ln

    #: ``phys_write(dst[i], phys_read(src[i], lens[i]))`` for each i, in one call.
    phys_copy = _phys_copy

    def _phys_page(self, pfn: int) -> memoryview:
        if not self.vm.exists(pfn):
            raise KernelPanic(f"physical access to non-existent pfn {pfn:#x}")
        return self.physmem.page(pfn)

    # -- malloc(9) ----------------------------------------------------------------------

    def _counters(self, mtype: MallocType) -> TypeCounters:
        e = self._types_by_id.get(id(mtype))
        if e is not None:
            return e[1]
        c = self._types.get(mtype)  # an equal type met before under another object
        if c is None:
            c = self._types[mtype] = TypeCounters()
        self._types_by_id[id(mtype)] = (mtype, c)
        return c

    def inject_malloc_failure(self, mtype: MallocType | None = None, count: int = 1) -> None:
        """Make the next ``count`` M_NOWAIT allocations (of ``mtype``, or any) fail."""
        self._inject[mtype] = self._inject.get(mtype, 0) + count

    def _injected(self, mtype: MallocType, flags: int) -> bool:
        if not flags & M_NOWAIT:
            return False
        for key in (mtype, None):
            left = self._inject.get(key, 0)
            if left > 0:
                self._inject[key] = left - 1
                return True
        return False

    @staticmethod
    def _check_flags(fn: str, flags: int) -> None:
        if bool(flags & M_NOWAIT) == bool(flags & M_WAITOK):
            raise KernelPanic(f"{fn}: exactly one of M_NOWAIT and M_WAITOK (flags {flags:#x})")

    def malloc(self, size: int, mtype: MallocType, flags: int) -> int:
        """malloc(9): the va of ``size`` bytes, or 0 (M_NOWAIT only)."""
        self._check_flags("malloc", flags)
        if size < 0:
            raise KernelPanic(f"malloc: negative size {size}")
        c = self._counters(mtype)
        if self._injected(mtype, flags):
            c.failures += 1
            return 0
        while True:
            frees = self._vmwait.frees
            if size <= PAGE_SIZE:
                bucket = max(16, 1 << max(0, size - 1).bit_length())
                va = self._slab.alloc(bucket)
                kind = _KIND_SLAB
                alloc_size = bucket
            else:
                npages = (size + PAGE_MASK) >> PAGE_SHIFT
                va = self._pages_alloc(npages, 0, BUS_SPACE_MAXADDR_ANY)
                kind = _KIND_PAGES
                alloc_size = npages << PAGE_SHIFT
            if va != 0:
                break
            if flags & M_NOWAIT or (size + PAGE_MASK) >> PAGE_SHIFT > self.vm.total:
                c.failures += 1  # M_WAITOK too: more than the domain has never comes
                return 0
            self._vmwait.sleep(frees)
        self._account(va, alloc_size, mtype, kind)
        if flags & M_ZERO:
            self._fill(va, alloc_size, _ZEROS)
        return va

    def free(self, va: int, mtype: MallocType) -> None:
        """free(9); ``free(0)`` does nothing. A bad address or type panics."""
        if va == 0:
            return
        rec = self._allocs.get(va)
        if rec is None:
            raise KernelPanic(f"free: address {va:#x} not allocated (double free?)")
        size, mt, kind = rec
        if mt is not mtype and mt != mtype:
            raise KernelPanic(f"free: {va:#x} is {mt.name}, freed as {mtype.name}")
        if kind == _KIND_CONTIG:
            raise KernelPanic(f"free: {va:#x} came from contigmalloc; use contigfree")
        self._unaccount(va, size, mt)
        if kind == _KIND_SLAB:
            if junk_item(self.tunables.junk_divisor, va, size):
                self._fill(va, size, _JUNK)
            self._slab.free(va)
        else:
            npages = size >> PAGE_SHIFT
            if junk_item(self.tunables.junk_divisor, va, size):
                self._fill_pages(va, npages, _JUNK)
            self._pages_free(va, npages)
        self._vmwait.freed()

    def malloc_usable_size(self, va: int) -> int:
        rec = self._allocs.get(va)
        if rec is None:
            raise KernelPanic(f"malloc_usable_size: {va:#x} not allocated")
        return rec[0]

    def contigmalloc(self, size: int, mtype: MallocType, flags: int, low: int, high: int,
                     alignment: int, boundary: int) -> int:
        """Physically contiguous memory in ``[low, high]``; its va or 0."""
        self._check_flags("contigmalloc", flags)
        c = self._counters(mtype)
        if size <= 0:
            raise KernelPanic(f"contigmalloc: bad size {size}")
        if self._inject and self._injected(mtype, flags):
            c.failures += 1
            return 0
        npages = (size + PAGE_MASK) >> PAGE_SHIFT
        pfn = self.vm_page_alloc_contig(npages, flags, low, high, alignment, boundary)
        if pfn is None:
            c.failures += 1
            return 0
        va = self.kva_alloc(npages)
        self.pmap_qenter(va, range(pfn, pfn + npages))
        self._account(va, npages << PAGE_SHIFT, mtype, _KIND_CONTIG)
        return va

    def contigfree(self, va: int, size: int, mtype: MallocType) -> None:
        rec = self._allocs.get(va)
        if rec is None or rec[2] != _KIND_CONTIG:
            raise KernelPanic(f"contigfree: {va:#x} not from contigmalloc")
        if rec[1] is not mtype and rec[1] != mtype:
            raise KernelPanic(f"contigfree: {va:#x} is {rec[1].name}, freed as {mtype.name}")
        npages = rec[0] >> PAGE_SHIFT
        if (size + PAGE_MASK) >> PAGE_SHIFT != npages:
            raise KernelPanic(f"contigfree: {va:#x} size {size} != allocated {rec[0]}")
        self._unaccount(va, rec[0], mtype)
        if junk_item(self.tunables.junk_divisor, va, rec[0]):
            self._fill_pages(va, npages, _JUNK)
        self._pages_free(va, npages)
        self._vmwait.freed()

    def kmem_alloc_attr(self, size: int, flags: int, low: int, high: int) -> int:
        """Page-backed memory whose pages (scattered) all lie in ``[low, high]``; va or 0."""
        self._check_flags("kmem_alloc_attr", flags)
        npages = (size + PAGE_MASK) >> PAGE_SHIFT
        c = self._counters(M_KMEM)
        if self._injected(M_KMEM, flags):
            c.failures += 1
            return 0
        va = self._pages_alloc(npages, low, high)
        if va == 0:
            c.failures += 1
            return 0
        self._account(va, npages << PAGE_SHIFT, M_KMEM, _KIND_PAGES)
        if flags & M_ZERO:
            self._fill(va, npages << PAGE_SHIFT, _ZEROS)
        return va

    def kmem_alloc_contig(self, size: int, flags: int, low: int, high: int,
                          alignment: int, boundary: int) -> int:
        return self.contigmalloc(size, M_KMEM, flags, low, high, alignment, boundary)

    def kmem_free(self, va: int, size: int) -> None:
        rec = self._allocs.get(va)
        if rec is None or rec[1] != M_KMEM:
            raise KernelPanic(f"kmem_free: {va:#x} not from kmem_alloc")
        if rec[2] == _KIND_CONTIG:
            self.contigfree(va, size, M_KMEM)
        else:
            self.free(va, M_KMEM)

    def malloc_statistics(self) -> dict[str, MallocTypeStats]:
        return {t.name: c.snapshot(t.name) for t, c in self._types.items()}

    def _account(self, va: int, size: int, mtype: MallocType, kind: int) -> None:
        self._allocs[va] = (size, mtype, kind)
        c = self._counters(mtype)
        c.memuse += size
        c.inuse += 1
        c.requests += 1
        c.maxused = max(c.maxused, c.memuse)

    def _unaccount(self, va: int, size: int, mtype: MallocType) -> None:
        del self._allocs[va]
        c = self._counters(mtype)
        c.memuse -= size
        c.inuse -= 1
        c.frees += 1

    def _fill(self, va: int, size: int, pattern: bytes) -> None:
        page = self.physmem.page
        for pfn, off, ln in self._pieces(va, size):
            page(pfn)[off : off + ln] = pattern if ln == PAGE_SIZE else pattern[:ln]

    def _fill_pages(self, va: int, npages: int, pattern: bytes) -> None:
        """``_fill(va, npages << PAGE_SHIFT, pattern)`` of a page-aligned range."""
        ptes = self._ptes
        vpn = va >> PAGE_SHIFT
        pfns: list[int] = []
        for i in range(npages):
            pfn = ptes.get(vpn + i)
            if pfn is None:  # a page unmapped: the fault of _pieces, nothing written
                self._fill(va, npages << PAGE_SHIFT, pattern)
                return
            pfns.append(pfn)
        page = self.physmem.page
        for pfn in pfns:
            page(pfn)[:] = pattern

    def _pages_alloc(self, npages: int, low: int, high: int) -> int:
        pfns: list[int] = []
        for _ in range(npages):
            pfn = self.vm.alloc(low, None if high >= BUS_SPACE_MAXADDR_ANY else high)
            if pfn is None:
                for p in pfns:
                    self.vm.free(p)
                return 0
            pfns.append(pfn)
        va = self.kva_alloc(npages)
        self.pmap_qenter(va, pfns)
        return va

    def _pages_free(self, va: int, npages: int) -> None:
        ptes = self._ptes
        vpn = va >> PAGE_SHIFT
        pfns = [ptes[vpn + i] for i in range(npages)]
        # pmap_qremove, then kva_free (no page of the range is left mapped to check).
        self.pmap_gen += 1
        for i in range(npages):
            del ptes[vpn + i]
        if self._kva_ranges.get(va) != npages:
            raise KernelPanic(f"kva_free: {va:#x} ({npages} pages) was not allocated")
        del self._kva_ranges[va]
        free = self.vm.free
        for p in pfns:
            free(p)

    # -- deferred work -------------------------------------------------------------------

    def enqueue_swi(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` once on ``taskqueue_swi`` (for subsystems that want a plain call)."""
        self.taskqueue_swi.enqueue_call(fn)

    # -- statistics, leaks, shutdown -------------------------------------------------------

    def statistics(self) -> KernelStatistics:
        return kernel_statistics(self, len(self._ptes))

    def leaks(self) -> list[str]:
        """What an idle kernel should not hold: memory, pending work, bus_dma objects."""
        return kernel_leaks(self, self._types, len(self._ptes))

    def assert_no_leaks(self) -> None:
        """Raise AssertionError listing everything :meth:`leaks` finds."""
        found = self.leaks()
        if found:
            raise AssertionError(f"kernel {self.name} leaks:\n  " + "\n  ".join(found))

    def shutdown(self) -> None:
        """Stop the kernel's threads and cancel its callouts (the domain is going away)."""
        if self._down:
            return
        self._down = True
        self.softclock.shutdown()
        self.taskqueue_thread.free()
        self.taskqueue_swi.free()
