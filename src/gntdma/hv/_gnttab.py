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
_unpack_flags: Final = _FLAGS.unpack_from
_pack_flags: Final = _FLAGS.pack_into
_unpack_entry: Final = _ENT.unpack_from

# Entry ``ref`` is at frame ``ref >> _REF_SHIFT``, byte ``(ref & _REF_MASK) << _ENT_SHIFT``
# (``grant_entry_v1_slot``, without its divmod and tuple on the map path).
_REF_SHIFT: Final = GREFS_PER_GRANT_FRAME.bit_length() - 1
_REF_MASK: Final = GREFS_PER_GRANT_FRAME - 1
_ENT_SHIFT: Final = _ENT.size.bit_length() - 1
assert 1 << _REF_SHIFT == GREFS_PER_GRANT_FRAME and 1 << _ENT_SHIFT == _ENT.size

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

#: The low byte of an entry's flags holds the type bits (little-endian u16 at
#: offset 0): deleting every byte value whose type bits are 0 from the frame's
#: column of low bytes leaves one byte per entry in use.
_FLAGS_LOW_BYTE: Final = _ENT.size
_TYPE_INVALID_BYTES: Final = bytes(b for b in range(256) if b & _TYPE_MASK == 0)


def gntpin_oflow(pin: int, incr: int) -> bool:
    """``act->pin & GNTPIN_incr2oflow_mask(incr)``: adding ``incr`` risks overflow."""
    return pin & (incr << (_GNTPIN_cntr_width - 1)) != 0


@dataclass(slots=True)
class ActiveEntry:
    """Pins on one grant entry (Xen's ``struct active_grant_entry``).

    Xen keeps one per grant entry for the table's life; here an entry is in
    :attr:`GrantTable.active` while pinned, and the object of an entry whose
    last pin went is kept in :attr:`GrantTable.spare` for the next first pin
    (filled in anew, not built).
    """

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
        #: Active entry objects no entry uses now, for the next first pin.
        self.spare: list[ActiveEntry] = []
        #: ``nr_grant_entries``: kept with the frames, read by every map and copy.
        self.nr_entries = 0
        self.grow(INITIAL_NR_GRANT_FRAMES)

    @property
    def nr_frames(self) -> int:
        return len(self.frames)

    def grow(self, nr_frames: int) -> bool:
        """Grow to ``nr_frames`` frames; False if that is over the maximum."""
        if nr_frames > self.max_frames:
            return False
        while len(self.frames) < nr_frames:
            buf = bytearray(PAGE_SIZE)
            self._buffers.append(buf)
            self.frames.append(memoryview(buf))
        self.nr_entries = len(self.frames) * GREFS_PER_GRANT_FRAME
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
        The caller has checked ``ref < nr_entries``.
        """
        page = self.frames[ref >> _REF_SHIFT]
        off = (ref & _REF_MASK) << _ENT_SHIFT
        act = self.active.get(ref)
        if act is not None:
            pin = act.pin
            if act.domid != caller or pin & (incr << (_GNTPIN_cntr_width - 1)) != 0:
                return _GENERAL_ERROR, 0
            if not readonly and pin & _WRITE_PINS == 0:
                (flags,) = _unpack_flags(page, off)
                if flags & _READONLY:
                    return _GENERAL_ERROR, 0
                _pack_flags(page, off, flags | _READING | _WRITING)
            act.pin = pin + incr
            return _OKAY, act.frame
        flags, domid, frame = _unpack_entry(page, off)
        if (flags & (_MAP_TYPE_MASK if mapflag else _TYPE_MASK)) != _PERMIT_ACCESS \
                or domid != caller:
            return _GENERAL_ERROR, 0
        if not readonly and flags & _READONLY:
            return _GENERAL_ERROR, 0
        if not valid_frame(frame):
            return _BAD_PAGE, 0
        spare = self.spare
        if spare:
            act = spare.pop()
            act.pin = incr
            act.frame = frame
            act.domid = domid
        else:
            act = ActiveEntry(incr, frame, domid)
        self.active[ref] = act
        _pack_flags(page, off, flags | (_READING if readonly else _READING | _WRITING))
        return _OKAY, frame

    def unpin(self, ref: int, decr: int, readonly: bool) -> None:
        """Drop a pin; ``reduce_status_for_pin`` clears the flags it no longer needs."""
        act = self.active[ref]
        pin = act.pin
        assert pin & (decr * _GNTPIN_cntr_mask) != 0, "unpin of a kind not pinned"
        pin -= decr
        if pin == 0:
            del self.active[ref]
            self.spare.append(act)
            clear = _READING if readonly else _READING | _WRITING
        else:
            act.pin = pin
            if readonly or pin & _WRITE_PINS != 0:
                return
            clear = _WRITING
        page = self.frames[ref >> _REF_SHIFT]
        off = (ref & _REF_MASK) << _ENT_SHIFT
        (flags,) = _unpack_flags(page, off)
        _pack_flags(page, off, flags & ~clear)

    def entries_in_use(self) -> int:
        """Entries whose type is not GTF_invalid (reserved entries included).

        The domain writes its entries with plain stores the hypervisor does not
        see, so this is read from the frames, with no per-entry Python work: per
        frame, one strided copy of its flags' low bytes and one ``translate``
        (about 1 us a frame). The leak checks do not use it: pins and mappings
        are counters.
        """
        n = 0
        for buf in self._buffers:
            n += len(buf[0::_FLAGS_LOW_BYTE].translate(None, _TYPE_INVALID_BYTES))
        return n

    def release(self) -> None:
        for v in self.frames:
            v.release()
        self.frames.clear()
        self._buffers.clear()
        self.nr_entries = 0


@dataclass(slots=True)
class Mapping:
    """One maptrack entry: a page of ``granter`` mapped by the table's domain.

    ``flags`` are the ``GNTMAP_*`` halves still mapped (host and/or device, and
    readonly); the host half is at ``host_addr`` in the mapper's physmap, and
    ``view`` is the mapper's direct view of it (None once the host half is gone).
    Xen's maptrack is an array of them; here a live one is in
    :attr:`Maptrack.entries`, and the object of a handle put back is kept in
    :attr:`Maptrack.spare` for a later map (filled in anew, not built).
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
        #: The free list (the map path pops its head inline while it has two or more).
        self.free: deque[int] = deque()
        #: Mapping objects no handle uses now, for the next maps.
        self.spare: list[Mapping] = []
        self.peak = 0

    @property
    def capacity(self) -> int:
        """How many handles can be live at once."""
        return max(0, self.max_frames * MAPTRACK_PER_FRAME - 1)

    def get(self) -> int | None:
        """A free handle, or None when the table is full (``get_maptrack_handle``)."""
        if len(self.free) > 1:
            return self.free.popleft()
        if self.allocated >= self.limit:
            return None
        h = self.allocated
        self.free.extendleft(reversed(range(h + 1, h + MAPTRACK_PER_FRAME)))
        self.allocated += MAPTRACK_PER_FRAME
        return h

    def put(self, handle: int) -> None:
        """``put_maptrack_handle``: back to the tail of the free list."""
        self.free.append(handle)

    def add(self, handle: int, m: Mapping) -> None:
        entries = self.entries
        entries[handle] = m
        if len(entries) > self.peak:
            self.peak = len(entries)
