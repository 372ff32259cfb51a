"""What one kernel holds (``Kernel.statistics``), apart so that ``_kernel`` stays small."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gntdma.sys._malloc import MallocTypeStats

__all__ = ["KernelStatistics"]


@dataclass(frozen=True, slots=True)
class KernelStatistics:
    """What one kernel holds; ``assert_no_leaks`` compares it with an idle kernel."""

    name: str
    pages_total: int
    pages_free: int
    pages_in_use: int
    kva_pages_mapped: int
    malloc: Mapping[str, MallocTypeStats]
    malloc_bytes: int
    taskqueue_pending: int
    callouts_pending: int
    dma_tags: int
    dma_maps: int
    dma_maps_loaded: int
    dma_deferred_pending: int
    bounce_pages: int
    bounce_pages_free: int
    dma_debug_reports: int
