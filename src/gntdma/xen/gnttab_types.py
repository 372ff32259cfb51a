"""The guest grant-table API's structures: chain heads, free callbacks, statistics.

Part of :mod:`gntdma.xen.gnttab` (which re-exports every name here).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, final

from gntdma.abi.grant_table import GRANT_REF_INVALID

__all__ = ["GNTTAB_LIST_END", "GntTabStatistics", "GnttabFreeCallback", "GrantRefHead"]

GNTTAB_LIST_END: Final[int] = GRANT_REF_INVALID


@final
class GrantRefHead:
    """A private chain head (``grant_ref_t`` passed by pointer in C)."""

    __slots__ = ("head",)

    def __init__(self, head: int = GNTTAB_LIST_END) -> None:
        self.head = head


@final
class GnttabFreeCallback:
    """``struct gnttab_free_callback``: run ``fn(arg)`` once ``count`` refs are free."""

    __slots__ = ("arg", "count", "fn", "gen", "overtaken", "queued", "runs")

    def __init__(self) -> None:
        self.fn: Callable[[object], None] | None = None
        self.arg: object = None
        self.count = 0
        self.queued = False
        self.runs = 0
        #: Bumped by every request and cancel: a run picked before a cancel is dropped.
        self.gen = 0
        #: Allocations by others while it waited (kept across its own re-requests).
        self.overtaken = 0


@dataclass(frozen=True, slots=True)
class GntTabStatistics:
    nr_frames: int
    max_frames: int
    free: int
    allocated: int
    granted: int
    callbacks_queued: int
    callbacks_run: int
    reclaim_pending: int
    peak_allocated: int
    #: free references kept for a starving callback (nobody else may take them)
    kept: int = 0
    double_frees: int = 0
    #: references held for their holder's life (rings, prealloc maps)
    held_for_life: int = 0
