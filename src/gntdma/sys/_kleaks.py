"""A kernel's statistics and leak list (``Kernel.statistics``, ``Kernel.leaks``),
apart so that ``_kernel`` stays small.

:func:`kernel_leaks` reads the counters the kernel keeps (per malloc type, pages
free, kernel virtual pages mapped, queued tasks, pending callouts, bus_dma
objects) directly: it lists what :func:`kernel_statistics` would show held, in
the same words and order, without building the statistics.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from gntdma.sys._kstats import KernelStatistics
from gntdma.sys._malloc import MallocType, TypeCounters

if TYPE_CHECKING:
    from gntdma.sys._kernel import Kernel

__all__ = ["kernel_leaks", "kernel_statistics"]


def kernel_statistics(k: Kernel, kva_pages_mapped: int) -> KernelStatistics:
    """``k.statistics()``; ``kva_pages_mapped`` is its page table's size."""
    mstats = k.malloc_statistics()
    b = k.busdma
    return KernelStatistics(
        name=k.name,
        pages_total=k.vm.total,
        pages_free=k.vm.nfree,
        pages_in_use=k.vm.total - k.vm.nfree,
        kva_pages_mapped=kva_pages_mapped,
        malloc=mstats,
        malloc_bytes=sum(s.memuse for s in mstats.values()),
        taskqueue_pending=k.taskqueue_thread.pending() + k.taskqueue_swi.pending(),
        callouts_pending=k.softclock.pending(),
        dma_tags=b.tags,
        dma_maps=b.maps,
        dma_maps_loaded=b.maps_loaded,
        dma_deferred_pending=b.deferred_pending,
        bounce_pages=b.bounce_pages,
        bounce_pages_free=b.bounce_pages_free,
        dma_debug_reports=len(k.dma_debug.reports()),
    )


def kernel_leaks(k: Kernel, types: Mapping[MallocType, TypeCounters],
                 kva_pages_mapped: int) -> list[str]:
    """What an idle kernel should not hold: memory, pending work, bus_dma objects
    (``types`` are its counters per malloc type, ``kva_pages_mapped`` its page
    table's size)."""
    # By name, a later type of the same name in place of the earlier, as in
    # malloc_statistics; sorted by name.
    named: dict[str, TypeCounters] = {t.name: c for t, c in types.items()}
    out = [f"malloc type {n}: {named[n].memuse} bytes in {named[n].inuse} allocations"
           for n in sorted(named) if named[n].memuse != 0 or named[n].inuse != 0]
    in_use = k.vm.total - k.vm.nfree
    if in_use != 0:
        out.append(f"{in_use} physical pages in use")
    if kva_pages_mapped != 0:
        out.append(f"{kva_pages_mapped} kernel virtual pages mapped")
    tasks = k.taskqueue_thread.pending() + k.taskqueue_swi.pending()
    if tasks != 0:
        out.append(f"{tasks} tasks pending")
    callouts = k.softclock.pending()
    if callouts != 0:
        out.append(f"{callouts} callouts pending")
    b = k.busdma
    if b.tags != 0:
        out.append(f"{b.tags} bus_dma tags alive")
    if b.maps != 0:
        out.append(f"{b.maps} bus_dma maps alive ({b.maps_loaded} loaded)")
    if b.deferred_pending != 0:
        out.append(f"{b.deferred_pending} deferred bus_dma loads pending")
    return out
