"""DMA-API debugging (like Linux ``CONFIG_DMA_API_DEBUG``), one per kernel.

Rules: findings are *reports*, collected like WITNESS reports, never raised;
a test reads :meth:`DmaDebug.reports` and calls :meth:`DmaDebug.reset`. It is
on by default (``enabled``; the kernel tunable ``hw.busdma.dma_debug``,
see ``_tunables``). What is reported (:class:`DmaDebugKind`):

- ``DOUBLE_UNLOAD``: unload of a map whose last operation was already an
  unload (unloading a never-loaded map is allowed, as in FreeBSD).
- ``LOAD_LOADED_MAP``: a load on a map that is loaded or has a deferred load
  pending; the load is refused with ``EINVAL``.
- ``DESTROY_LOADED_MAP``: ``bus_dmamap_destroy`` of a loaded map (``EBUSY``).
- ``TAG_DESTROY_BUSY``: ``bus_dma_tag_destroy`` of a tag with live maps (``EBUSY``).
- ``CPU_ACCESS_DEVICE_OWNED``: ``kva_read``/``kva_write`` of a buffer the device
  owns: after ``PREREAD`` and before ``POSTREAD`` any access; after ``PREWRITE``
  and before ``POSTWRITE`` a write (the CPU may read what it gave the device).
  Ownership is tracked per map, on the physical ranges of the client buffer,
  from the PRE sync to the matching POST sync or the unload. Reported once per
  ownership period and map. ``phys_read``/``phys_write`` are device-side (the
  model of DMA) and are not checked.
- ``SYNC_UNLOADED``: ``bus_dmamap_sync`` of a map that is not loaded.
- ``SYNC_BAD_OP``: a sync op that mixes PRE and POST flags, or is 0.
- ``LOADED_AT_DETACH``: ``busdma_debug_check_detach`` found a map still loaded.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from itertools import repeat
from types import FrameType
from typing import Final, final

from gntdma.sys._param import PAGE_SHIFT

__all__ = ["BusDmaCounters", "DmaDebug", "DmaDebugKind", "DmaDebugReport"]

_SKIP_DIRS: Final = (
    os.path.dirname(os.path.abspath(__file__)),
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sched"),
)


def kernel_caller_site() -> str:
    """file:line of the first frame outside ``gntdma.sys`` and ``gntdma.sched``."""
    f: FrameType | None = sys._getframe(1)
    while f is not None:
        if os.path.dirname(f.f_code.co_filename) not in _SKIP_DIRS:
            return f"{f.f_code.co_filename}:{f.f_lineno}"
        f = f.f_back
    return "?:0"


class DmaDebugKind(Enum):
    DOUBLE_UNLOAD = "double_unload"
    LOAD_LOADED_MAP = "load_loaded_map"
    DESTROY_LOADED_MAP = "destroy_loaded_map"
    TAG_DESTROY_BUSY = "tag_destroy_busy"
    CPU_ACCESS_DEVICE_OWNED = "cpu_access_device_owned"
    SYNC_UNLOADED = "sync_unloaded"
    SYNC_BAD_OP = "sync_bad_op"
    LOADED_AT_DETACH = "loaded_at_detach"
    #: the device (a backend domain) still had the buffer mapped when it was unloaded
    STILL_MAPPED_AT_UNLOAD = "still_mapped_at_unload"


@dataclass(frozen=True, slots=True)
class DmaDebugReport:
    kind: DmaDebugKind
    kernel: str
    message: str
    site: str
    tag: str = ""
    map: str = ""

    def format(self) -> str:
        return f"dma-debug [{self.kernel}] {self.kind.value}: {self.message} at {self.site}"


@dataclass(slots=True)
class BusDmaCounters:
    """bus_dma object counts of one kernel, kept by the bus_dma code."""

    tags: int = 0  #: live tags, root tag excluded
    maps: int = 0
    maps_loaded: int = 0
    deferred_pending: int = 0  #: loads that returned EINPROGRESS and have not completed
    deferred_total: int = 0
    bounce_pages: int = 0
    bounce_pages_free: int = 0
    bounce_zones: int = 0
    total_bounced: int = 0


class _Own:
    """The device's ownership of one map's client buffer."""

    __slots__ = ("desc", "key", "pfns", "ranges", "read", "reported", "write")

    def __init__(self, key: int, desc: str | Callable[[], str], ranges: list[tuple[int, int]],
                 pfns: list[int]) -> None:
        self.key = key
        #: The map's description, or the function that gives it (called for a report).
        self.desc = desc
        self.ranges = ranges  # [start, end) physical
        self.read = False
        self.write = False
        self.reported = False
        #: The pages of ``ranges``, each once.
        self.pfns = pfns


#: Up to this many pages, a map's pages are indexed one by one (cheaper than at once).
_FEW: Final = 8
#: Maps whose last ranges, spans and pages are kept (all forgotten when more would be).
_MEMO_MAX: Final = 64


def _pfns(ranges: list[tuple[int, int]]) -> list[int]:
    """The pages of ``[start, end)`` ranges, each once, in order."""
    if len(ranges) == 1:
        start, end = ranges[0]
        first, last = start >> PAGE_SHIFT, (end - 1) >> PAGE_SHIFT
        return [first] if first == last else list(range(first, last + 1))
    firsts = [start >> PAGE_SHIFT for start, _ in ranges]
    if firsts == [(end - 1) >> PAGE_SHIFT for _, end in ranges]:  # each within a page
        return list(dict.fromkeys(firsts))
    return list(dict.fromkeys(pfn for start, end in ranges
                              for pfn in range(start >> PAGE_SHIFT,
                                               ((end - 1) >> PAGE_SHIFT) + 1)))


@final
class DmaDebug:
    """The DMA-API debug state of one kernel."""

    def __init__(self, kernel_name: str, enabled: bool = True) -> None:
        self.kernel_name = kernel_name
        #: The ``hw.busdma.dma_debug`` tunable (``Kernel.set_tunables`` sets it).
        self.enabled = enabled
        self._reports: list[DmaDebugReport] = []
        self._owners: dict[int, _Own] = {}
        #: The maps (keys) owning each page, in the order they came.
        self._by_pfn: dict[int, tuple[int, ...]] = {}
        #: Per map key, the (pa, len) ranges of its last ownership of more than
        #: ``_FEW`` ranges, with their spans and pages (at most ``_MEMO_MAX`` keys).
        self._memo: dict[int, tuple[list[tuple[int, int]], list[tuple[int, int]],
                                    list[int]]] = {}

    # -- reports -------------------------------------------------------------------

    def report(self, kind: DmaDebugKind, message: str, *, tag: str = "", map: str = "") -> None:
        if not self.enabled:
            return
        self._reports.append(
            DmaDebugReport(kind, self.kernel_name, message, kernel_caller_site(), tag, map)
        )

    def reports(self, kind: DmaDebugKind | None = None) -> list[DmaDebugReport]:
        return [r for r in self._reports if kind is None or r.kind is kind]

    def reset(self) -> None:
        self._reports.clear()

    def set_enabled(self, enabled: bool) -> None:
        """Turn debugging on or off; off forgets every tracked buffer (nothing is
        watched, so the CPU access check costs nothing), reports already made stay."""
        self.enabled = enabled
        if not enabled:
            self._owners.clear()
            self._by_pfn.clear()
            self._memo.clear()

    # -- device ownership of buffers --------------------------------------------------

    def own(self, key: int, desc: str | Callable[[], str], ranges: Sequence[tuple[int, int]],
            read: bool, write: bool) -> None:
        """The device owns ``ranges`` ((pa, len) pairs) of map ``key`` after a PRE sync.

        ``desc`` names the map in reports: a string, or a function giving it, called
        only for a report."""
        if not self.enabled:
            return
        rec = self._owners.get(key)
        if rec is None:
            if len(ranges) == 1:  # one piece (an I/O within a page)
                pa, ln = ranges[0]
                spans = [(pa, pa + ln)] if ln > 0 else []
                first, last = pa >> PAGE_SHIFT, (pa + ln - 1) >> PAGE_SHIFT
                # _pfns of the one span, within a page
                pfns = [first] if ln > 0 and first == last else _pfns(spans)
            elif len(ranges) > _FEW:
                spans, pfns = self._spans_pfns(key, ranges)
            else:
                spans = [(pa, pa + ln) for pa, ln in ranges if ln > 0]
                pfns = _pfns(spans)
            rec = _Own(key, desc, spans, pfns)
            by_pfn = self._by_pfn
            if len(rec.pfns) > _FEW and by_pfn.keys().isdisjoint(rec.pfns):  # none shared
                by_pfn.update(zip(rec.pfns, repeat((key,))))
            else:
                for pfn in rec.pfns:
                    by_pfn[pfn] = (*by_pfn.get(pfn, ()), key)
            self._owners[key] = rec
        rec.read = rec.read or read
        rec.write = rec.write or write

    def _spans_pfns(self, key: int, ranges: Sequence[tuple[int, int]]
                    ) -> tuple[list[tuple[int, int]], list[int]]:
        """The spans of the non-empty ``ranges`` and their pages (:func:`_pfns`), as
        map ``key``'s last ownership had them when its ranges are equal (a buffer
        loaded again); neither list is changed once made."""
        memo = self._memo.get(key)
        if memo is not None and memo[0] == ranges:
            return memo[1], memo[2]
        spans = [(pa, pa + ln) for pa, ln in ranges if ln > 0]
        pfns = _pfns(spans)
        if len(self._memo) >= _MEMO_MAX:
            self._memo.clear()
        self._memo[key] = (list(ranges), spans, pfns)
        return spans, pfns

    def release(self, key: int, read: bool, write: bool) -> None:
        """A POST sync gives the buffer back for the directions it names."""
        rec = self._owners.get(key)
        if rec is None:
            return
        if read:
            rec.read = False
        if write:
            rec.write = False
        if not rec.read and not rec.write:
            self.drop(key)

    def drop(self, key: int) -> None:
        """Forget map ``key`` entirely (unload)."""
        rec = self._owners.pop(key, None)
        if rec is None:
            return
        by_pfn = self._by_pfn
        alone = (key,)
        if len(rec.pfns) <= _FEW:
            for pfn in rec.pfns:
                ks = by_pfn.pop(pfn, alone)
                if ks != alone:
                    by_pfn[pfn] = tuple(k for k in ks if k != key)
            return
        keys = list(map(by_pfn.pop, rec.pfns, repeat(alone)))
        if keys.count(alone) == len(keys):  # no page shared with another map
            return
        for pfn, ks in zip(rec.pfns, keys, strict=True):
            if ks != alone:
                by_pfn[pfn] = tuple(k for k in ks if k != key)

    @property
    def watching(self) -> bool:
        """Whether any device-owned range exists (the CPU access check has work to do)."""
        return bool(self._by_pfn)

    def owned(self) -> int:
        """How many maps currently have device-owned ranges."""
        return len(self._owners)

    def check_cpu_access(self, pa: int, n: int, write: bool, va: int) -> None:
        if not self._by_pfn or n <= 0:
            return
        end = pa + n
        for pfn in range(pa >> PAGE_SHIFT, ((end - 1) >> PAGE_SHIFT) + 1):
            keys = self._by_pfn.get(pfn)
            if not keys:
                continue
            for key in keys:
                rec = self._owners[key]
                if rec.reported or not (rec.read or (rec.write and write)):
                    continue
                if any(s < end and pa < e for s, e in rec.ranges):
                    rec.reported = True
                    desc = rec.desc if isinstance(rec.desc, str) else rec.desc()
                    what = "write to" if write else "read of"
                    owner = "PREREAD" if rec.read else "PREWRITE"
                    self.report(
                        DmaDebugKind.CPU_ACCESS_DEVICE_OWNED,
                        f"CPU {what} va {va:#x} (pa {pa:#x}, {n} bytes) owned by the device "
                        f"after {owner} sync without the POST sync: {desc}",
                        map=desc,
                    )
