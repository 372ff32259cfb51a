"""The hypervisor side of grant tables: v1 entries, active pins, maptrack.

Rules (``xen/common/grant_table.c``, v1):
- A domain's grant table is a list of frames owned by the hypervisor and
  writable by the domain; each holds 512 ``grant_entry_v1`` (8 bytes). The
  domain writes ``domid`` and ``frame``, then ``flags`` last; the hypervisor
  reads them at map or copy time, and writes ``GTF_reading``/``GTF_writing``
  while the entry is pinned.
- An entry is pinned by each mapping and for the duration of each copy. Pin
  counts live in a private active entry; the flag bits clear with the last pin.
- Every mapping gets a handle in the *mapping* domain's maptrack table, limited
  by ``max_maptrack_frames`` (256 handles a frame, as ``struct grant_mapping`` is
  16 bytes).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final, final

from gntdma.abi.grant_table import (
    GREFS_PER_GRANT_FRAME,
    GTF_permit_access,
    GTF_reading,
    GTF_readonly,
    GTF_type_mask,
    GTF_writing,
)
from gntdma.abi.xen import PAGE_SIZE

__all__ = ["MAPTRACK_PER_FRAME", "ActiveEntry", "GrantTable", "Mapping", "Maptrack"]

MAPTRACK_PER_FRAME: Final = PAGE_SIZE // 16

_HDR: Final = struct.Struct("<HH")
_ENT: Final = struct.Struct("<HHI")
_FLAGS: Final = struct.Struct("<H")

# Plain ints: arithmetic on the IntFlag members builds a new flag object per
# operation, which the map/unmap path does several times a page.
_TYPE_MASK: Final = int(GTF_type_mask)
_PERMIT_ACCESS: Final = int(GTF_permit_access)
_READONLY: Final = int(GTF_readonly)
_READING: Final = int(GTF_reading)
_WRITING: Final = int(GTF_writing)


@dataclass(slots=True)
class ActiveEntry:
    """Pins on one grant entry (Xen's ``struct active_grant_entry``)."""

    readers: int = 0
    writers: int = 0
    frame: int = 0
    domid: int = 0


@final
class GrantTable:
    """One domain's v1 grant table."""

    def __init__(self, max_frames: int) -> None:
        if max_frames < 1:
            raise ValueError("max_grant_frames must be at least 1")
        self.max_frames = max_frames
        self.frames: list[memoryview] = []
        self._buffers: list[bytearray] = []
        self.active: dict[int, ActiveEntry] = {}

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
        f, i = divmod(ref, GREFS_PER_GRANT_FRAME)
        flags, domid, frame = _ENT.unpack_from(self.frames[f], i * 8)
        return flags, domid, frame

    def _set_flags(self, ref: int, flags: int) -> None:
        f, i = divmod(ref, GREFS_PER_GRANT_FRAME)
        _FLAGS.pack_into(self.frames[f], i * 8, flags)

    def pin(self, ref: int, caller: int, write: bool) -> tuple[int, int]:
        """Pin ``ref`` for ``caller``; returns (GNTST status, frame).

        Status is 0, or ``GNTST_general_error`` (-1) for an entry that is not a
        valid permit_access grant to ``caller`` or is read-only for a write.
        """
        f, i = divmod(ref, GREFS_PER_GRANT_FRAME)
        page, off = self.frames[f], i * 8
        flags, domid, frame = _ENT.unpack_from(page, off)
        if (flags & _TYPE_MASK) != _PERMIT_ACCESS or domid != caller:
            return -1, 0
        if write and flags & _READONLY:
            return -1, 0
        act = self.active.get(ref)
        if act is None:
            act = ActiveEntry(frame=frame, domid=domid)
            self.active[ref] = act
        elif act.frame != frame or act.domid != domid:
            # The guest rewrote a pinned entry: Xen keeps the pinned frame.
            frame = act.frame
        if write:
            act.writers += 1
        else:
            act.readers += 1
        new = flags | _READING | (_WRITING if write else 0)
        _FLAGS.pack_into(page, off, new)
        return 0, frame

    def unpin(self, ref: int, write: bool) -> None:
        act = self.active[ref]
        if write:
            act.writers -= 1
        else:
            act.readers -= 1
        assert act.readers >= 0 and act.writers >= 0
        f, i = divmod(ref, GREFS_PER_GRANT_FRAME)
        page, off = self.frames[f], i * 8
        (flags,) = _FLAGS.unpack_from(page, off)
        if act.writers == 0:
            flags &= ~_WRITING
        if act.readers == 0 and act.writers == 0:
            flags &= ~_READING
            del self.active[ref]
        _FLAGS.pack_into(page, off, flags)

    def entries_in_use(self) -> int:
        """Entries whose type is not GTF_invalid (reserved entries included)."""
        n = 0
        for f in self.frames:
            for i in range(GREFS_PER_GRANT_FRAME):
                if _HDR.unpack_from(f, i * 8)[0] & _TYPE_MASK:
                    n += 1
        return n

    def release(self) -> None:
        for v in self.frames:
            v.release()
        self.frames.clear()
        self._buffers.clear()


@dataclass(slots=True)
class Mapping:
    """One maptrack entry: a page of ``granter`` mapped by the table's domain."""

    granter: int
    ref: int
    frame: int
    readonly: bool
    host_addr: int
    dev_bus_addr: int
    view: memoryview


@final
class Maptrack:
    """The maptrack table of a mapping domain."""

    def __init__(self, max_frames: int) -> None:
        self.limit = max_frames * MAPTRACK_PER_FRAME
        self.entries: dict[int, Mapping] = {}
        self._free: list[int] = []
        self._next = 0
        self.peak = 0

    def get(self) -> int | None:
        """A free handle, or None when the table is full."""
        if self._free:
            return self._free.pop()
        if self._next >= self.limit:
            return None
        h = self._next
        self._next += 1
        return h

    def put(self, handle: int) -> None:
        self._free.append(handle)

    def add(self, handle: int, m: Mapping) -> None:
        self.entries[handle] = m
        self.peak = max(self.peak, len(self.entries))
