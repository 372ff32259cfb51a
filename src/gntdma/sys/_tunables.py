"""Kernel tunables: the debugging a guest kernel does, chosen when it boots.

Two switches, each named as the kernel it comes from names it:

``hw.busdma.dma_debug`` (:attr:`KernelTunables.dma_debug`)
    DMA-API debugging (:mod:`gntdma.sys._dmadebug`), Linux's
    ``CONFIG_DMA_API_DEBUG`` with its ``dma_debug=off`` boot parameter
    (``kernel/dma/debug.c``, ``dma_debug_cmdline``). FreeBSD has no such
    checker; the name sits with its other bus_dma settings (``hw.busdma``,
    ``sys/x86/x86/busdma_bounce.c``). Off, no map's buffer is tracked (no
    per-page ownership at sync, no CPU access check) and nothing is reported.
``vm.debug.divisor`` (:attr:`KernelTunables.junk_divisor`)
    Filling freed memory with ``0xdeadc0de`` (FreeBSD ``INVARIANTS``). FreeBSD
    (``sys/vm/uma_core.c``: the loader tunable ``vm.debug.divisor``, "Debug &
    thrash every this item in memory allocator", read by ``uma_dbg_kskip``)
    trashes every item whose index is a multiple of the divisor: 1 every item
    (the default), 0 none, N one item in N, always the same items.

Both are on by default: in tests, in the explorer and in ``gntdma run``. A
config turns them off per guest (``dma_debug = 0``, ``junk_fill = 0``), the
command line for every guest of a run (``--no-dma-debug``, ``--no-junk``); a
benchmark passes :class:`KernelTunables` to ``Kernel`` or calls
``Kernel.set_tunables`` and reads back ``Kernel.tunables.describe()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, final

from gntdma.sys._param import PAGE_MASK, PAGE_SHIFT

__all__ = ["TUNABLE_DMA_DEBUG", "TUNABLE_JUNK_DIVISOR", "KernelTunables", "junk_item"]

TUNABLE_DMA_DEBUG: Final = "hw.busdma.dma_debug"
TUNABLE_JUNK_DIVISOR: Final = "vm.debug.divisor"


@final
@dataclass(frozen=True, slots=True)
class KernelTunables:
    """The boot-time settings of one kernel (``kenv``/loader tunables)."""

    dma_debug: bool = True
    #: 1: junk every freed item; 0: none; N: the items whose index N divides.
    junk_divisor: int = 1

    def __post_init__(self) -> None:
        if self.junk_divisor < 0:
            raise ValueError(f"{TUNABLE_JUNK_DIVISOR} must be at least 0, "
                             f"not {self.junk_divisor}")

    @property
    def junk(self) -> bool:
        """Whether freed memory is filled with junk at all."""
        return self.junk_divisor != 0

    def sysctls(self) -> dict[str, int]:
        """The settings by their kernel names (what ``sysctl`` would print)."""
        return {TUNABLE_DMA_DEBUG: int(self.dma_debug),
                TUNABLE_JUNK_DIVISOR: self.junk_divisor}

    def describe(self) -> str:
        """One line for progress output and reports: ``dma-debug on, junk fill on``."""
        junk = ("on" if self.junk_divisor == 1
                else "off" if self.junk_divisor == 0 else f"1 in {self.junk_divisor}")
        return f"dma-debug {'on' if self.dma_debug else 'off'}, junk fill {junk}"


def junk_item(divisor: int, va: int, size: int) -> bool:
    """Whether the freed item of ``size`` bytes at ``va`` is filled with junk.

    sys/vm/uma_core.c, uma_dbg_kskip: the item's index (its page times the
    items a page holds, plus its place in the page) must be a multiple of the
    divisor; 0 skips every item, 1 none.
    """
    if divisor == 1:
        return True
    if divisor == 0:
        return False
    idx = va >> PAGE_SHIFT
    if size < PAGE_MASK + 1:
        per_page = (PAGE_MASK + 1) // size
        idx = idx * per_page + (va & PAGE_MASK) // size
    return idx % divisor == 0
