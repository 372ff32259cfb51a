"""The hypervisor side of grant tables: v1 entries, active pins, maptrack.

Rules (Xen 4.17 ``xen/common/grant_table.c``, v1):
- A domain's grant table is a list of frames owned by the hypervisor and
  writable by the domain; each holds 512 ``grant_entry_v1`` (8 bytes, layout in
  :mod:`gntdma.abi.grant_table`). A new domain has one frame
  (``grant_table_init`` grows to ``INITIAL_NR_GRANT_FRAMES``, 1 on x86). The
  domain writes ``domid`` and ``frame``, then ``flags`` last; the hypervisor
  reads them at map or copy time, and writes ``GTF_reading``/``GTF_writing``
  while the entry is pinned.
- Pins live in an active entry (``struct active_grant_entry``): ``pin`` packs
  four 8-bit counters (``GNTPIN_hstw/hstr/devw/devr``), with the domain and
  frame the first pin took. While pinned, the guest's entry is not read again
  except to add the first write pin; a second domain cannot pin it, and a pin
  that would set the top bit of its counter (the 129th of one kind) is refused
  (``map_grant_ref`` / ``acquire_grant_for_copy``: ``GNTPIN_incr2oflow_mask``).
- Every mapping gets a handle in the *mapping* domain's maptrack table:
  ``MAPTRACK_PER_PAGE`` = 4096 / sizeof(struct grant_mapping) = 256 a frame, up
  to ``max_maptrack_frames``; one entry of the free list always stays behind as
  its tail sentinel (``_get_maptrack_handle``), one per vCPU, and our domains
  have one vCPU, so ``256 * max_maptrack_frames - 1`` handles can be live.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, final

from gntdma.abi.grant_table import (
    GRANT_ENTRY_V1,
    GRANT_ENTRY_V1_FLAGS,
    GREFS_PER_GRANT_FRAME,
    GTF_permit_access,
    GTF_reading,
    GTF_readonly,
    GTF_sub_page,
    GTF_type_mask,
    GTF_writing,
    grant_entry_v1_slot,
)
from gntdma.abi.xen import PAGE_SIZE

__all__ = [
    "GNTPIN_devr_inc",
    "GNTPIN_devw_inc",
    "GNTPIN_hstr_inc",
    "GNTPIN_hstw_inc",
    "INITIAL_NR_GRANT_FRAMES",
    "MAPTRACK_PER_FRAME",
    "ActiveEntry",
    "GrantTable",
    "Mapping",
    "Maptrack",
]

#: ``MAPTRACK_PER_PAGE``: PAGE_SIZE / sizeof(struct grant_mapping) (16 bytes).
MAPTRACK_PER_FRAME: Final = PAGE_SIZE // 16
#: Frames a new domain's grant table has (x86 ``INITIAL_NR_GRANT_FRAMES``).
INITIAL_NR_GRANT_FRAMES: Final = 1

# The pin counters of an active entry (grant_table.c ``GNTPIN_*``): 8 bits each.
_GNTPIN_cntr_width: Final = 8
GNTPIN_hstw_inc: Final = 1 << 0
GNTPIN_hstr_inc: Final = 1 << 8
GNTPIN_devw_inc: Final = 1 << 16
GNTPIN_devr_inc: Final = 1 << 24
_GNTPIN_cntr_mask: Final = (1 << _GNTPIN_cntr_width) - 1
_WRITE_PINS: Final = _GNTPIN_cntr_mask * (GNTPIN_hstw_inc | GNTPIN_devw_inc)

_ENT: Final = GRANT_ENTRY_V1
_FLAGS: Final = GRANT_ENTRY_V1_FLAGS

# Plain ints: arithmetic on the IntFlag members builds a new flag object per
# operation, which the map/unmap path does several times a page.
_TYPE_MASK: Final = int(GTF_type_mask)
_MAP_TYPE_MASK: Final = int(GTF_type_mask | GTF_sub_page)
_PERMIT_ACCESS: Final = int(GTF_permit_access)
_READONLY: Final = int(GTF_readonly)
_READING: Final = int(GTF_reading)
_WRITING: Final = int(GTF_writing)

_OKAY: Final = 0
_GENERAL_ERROR: Final = -1
_BAD_PAGE: Final = -9


def gntpin_oflow(pin: int, incr: int) -> bool:
    """``act->pin & GNTPIN_incr2oflow_mask(incr)``: adding ``incr`` risks overflow."""
    return pin & (incr << (_GNTPIN_cntr_width - 1)) != 0


@dataclass(slots=True)
class ActiveEntry:
    """Pins on one grant entry (Xen's ``struct active_grant_entry``)."""

    pin: int = 0
    frame: int = 0
    domid: int = 0


@final
class GrantTable:
    """One domain's v1 grant table."""

    def __init__(self, max_frames: int) -> None:
        if max_frames < INITIAL_NR_GRANT_FRAMES:
            raise ValueError("max_grant_frames must be at least 1")
        self.max_frames = max_frames
        self.frames: list[memoryview] = []
        self._buffers: list[bytearray] = []
        self.active: dict[int, ActiveEntry] = {}
        self.grow(INITIAL_NR_GRANT_FRAMES)

    @property
    def nr_frames(self) -> int:
        return len(self.frames)

    @property
    def nr_entries(self) -> int:
        return len(self.frames) * GREFS_PER_GRANT_FRAME

    def grow(self, nr_frames: int) -> bool:
        """Grow to ``nr_frames`` frames; False if that is over the maximum."""
        if nr_frames > self.max_frames:
            return False
        while len(self.frames) < nr_frames:
            buf = bytearray(PAGE_SIZE)
            self._buffers.append(buf)
            self.frames.append(memoryview(buf))
        return True

    def read(self, ref: int) -> tuple[int, int, int]:
        """(flags, domid, frame) of entry ``ref``, as the hypervisor sees it now."""
        f, off = grant_entry_v1_slot(ref)
        flags, domid, frame = _ENT.unpack_from(self.frames[f], off)
        return flags, domid, frame

    def write(self, ref: int, flags: int, domid: int, frame: int) -> None:
        """Write entry ``ref`` as a granting guest does: domid and frame, then flags."""
        f, off = grant_entry_v1_slot(ref)
        _ENT.pack_into(self.frames[f], off, 0, domid, frame)
        _FLAGS.pack_into(self.frames[f], off, flags)

    def pin(self, ref: int, caller: int, incr: int, readonly: bool, mapflag: bool,
            valid_frame: Callable[[int], bool]) -> tuple[int, int]:
        """Pin ``ref`` for ``caller`` by ``incr`` (``GNTPIN_*_inc``): (GNTST, frame).

        Xen's ``map_grant_ref`` / ``acquire_grant_for_copy`` with
        ``_set_status_v1`` and ``get_paged_frame``: a pinned entry may only be
        pinned again by the same domain and below the counter's top bit
        (``GNTST_general_error``); an unpinned one must be a ``permit_access``
        grant to ``caller`` (``GTF_sub_page`` clear for a map) and, for a write
        pin, not read-only (``GNTST_general_error``); a first pin of a frame the
        granter does not have is ``GNTST_bad_page``, leaving the flags as they were.
        """
        f, off = grant_entry_v1_slot(ref)
        page = self.frames[f]
        act = self.active.get(ref)
        if act is not None:
            if act.domid != caller or gntpin_oflow(act.pin, incr):
                return _GENERAL_ERROR, 0
            if not readonly and act.pin & _WRITE_PINS == 0:
                (flags,) = _FLAGS.unpack_from(page, off)
                if flags & _READONLY:
                    return _GENERAL_ERROR, 0
                _FLAGS.pack_into(page, off, flags | _READING | _WRITING)
            act.pin += incr
            return _OKAY, act.frame
        flags, domid, frame = _ENT.unpack_from(page, off)
        mask = _MAP_TYPE_MASK if mapflag else _TYPE_MASK
        if (flags & mask) != _PERMIT_ACCESS or domid != caller:
            return _GENERAL_ERROR, 0
        if not readonly and flags & _READONLY:
            return _GENERAL_ERROR, 0
        if not valid_frame(frame):
            return _BAD_PAGE, 0
        self.active[ref] = ActiveEntry(incr, frame, domid)
        _FLAGS.pack_into(page, off, flags | _READING | (0 if readonly else _WRITING))
        return _OKAY, frame

    def unpin(self, ref: int, decr: int, readonly: bool) -> None:
        """Drop a pin; ``reduce_status_for_pin`` clears the flags it no longer needs."""
        act = self.active[ref]
        assert act.pin & (decr * _GNTPIN_cntr_mask) != 0, "unpin of a kind not pinned"
        act.pin -= decr
        clear = _READING if act.pin == 0 else 0
        if not readonly and act.pin & _WRITE_PINS == 0:
            clear |= _WRITING
        if act.pin == 0:
            del self.active[ref]
        if clear != 0:
            f, off = grant_entry_v1_slot(ref)
            page = self.frames[f]
            (flags,) = _FLAGS.unpack_from(page, off)
            _FLAGS.pack_into(page, off, flags & ~clear)

    def entries_in_use(self) -> int:
        """Entries whose type is not GTF_invalid (reserved entries included)."""
        n = 0
        for f in self.frames:
            for i in range(GREFS_PER_GRANT_FRAME):
                if _FLAGS.unpack_from(f, i * 8)[0] & _TYPE_MASK:
                    n += 1
        return n

    def release(self) -> None:
        for v in self.frames:
            v.release()
        self.frames.clear()
        self._buffers.clear()


@dataclass(slots=True)
class Mapping:
    """One maptrack entry: a page of ``granter`` mapped by the table's domain.

    ``flags`` are the ``GNTMAP_*`` halves still mapped (host and/or device, and
    readonly); the host half is at ``host_addr`` in the mapper's physmap, and
    ``view`` is the mapper's direct view of it (None once the host half is gone).
    """

    granter: int
    ref: int
    frame: int
    flags: int
    host_addr: int
    dev_bus_addr: int
    view: memoryview | None


@final
class Maptrack:
    """The maptrack table of a mapping domain (one vCPU).

    Handles come as from Xen's per-vCPU free list: a new frame's first entry is
    handed out and the rest go to the head of the list, a freed handle goes to
    the tail, and the last entry of the list is never handed out.
    """

    def __init__(self, max_frames: int) -> None:
        self.max_frames = max_frames
        #: Handles in ``max_frames`` frames (what ``maptrack_limit`` can grow to).
        self.limit = max_frames * MAPTRACK_PER_FRAME
        #: ``maptrack_limit``: handles of the frames allocated so far.
        self.allocated = 0
        self.entries: dict[int, Mapping] = {}
        self._free: deque[int] = deque()
        self.peak = 0

    @property
    def capacity(self) -> int:
        """How many handles can be live at once."""
        return max(0, self.max_frames * MAPTRACK_PER_FRAME - 1)

    def get(self) -> int | None:
        """A free handle, or None when the table is full (``get_maptrack_handle``)."""
        if len(self._free) > 1:
            return self._free.popleft()
        if self.allocated >= self.limit:
            return None
        h = self.allocated
        self._free.extendleft(reversed(range(h + 1, h + MAPTRACK_PER_FRAME)))
        self.allocated += MAPTRACK_PER_FRAME
        return h

    def put(self, handle: int) -> None:
        """``put_maptrack_handle``: back to the tail of the free list."""
        self._free.append(handle)

    def add(self, handle: int, m: Mapping) -> None:
        self.entries[handle] = m
        self.peak = max(self.peak, len(self.entries))
