"""The guest grant-table API's structures: chain heads, free callbacks, statistics, entries.

Part of :mod:`gntdma.xen.gnttab` (which re-exports every name here).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, MutableSequence, Sequence
from dataclasses import dataclass
from typing import Final, final

from gntdma.abi.grant_table import (
    GRANT_ENTRY_V1,
    GRANT_ENTRY_V1_DOMID_OFFSET,
    GRANT_ENTRY_V1_SIZE,
    GRANT_REF_INVALID,
    GREFS_PER_GRANT_FRAME,
    GrantEntryV1,
    GTF_reading,
    GTF_type_mask,
    GTF_writing,
    grant_entry_v1_slot,
)
from gntdma.sched import wmb

__all__ = [
    "GNTTAB_LIST_END",
    "GntTabStatistics",
    "GnttabFreeCallback",
    "GrantEntries",
    "GrantRefHead",
    "any_set",
    "chain_link",
    "chain_refs",
    "set_each",
]

GNTTAB_LIST_END: Final[int] = GRANT_REF_INVALID


def chain_refs(nxt: Sequence[int], head: int, count: int) -> list[int]:
    """The first ``count`` refs of the chain at ``head`` threaded through ``nxt``, in order."""
    refs = [head]
    append = refs.append
    ref = head
    for _ in range(count - 1):
        ref = nxt[ref]
        append(ref)
    return refs


def chain_link(nxt: MutableSequence[int], refs: Sequence[int]) -> None:
    """Thread ``refs`` as releasing each in order onto an empty chain does: ``refs[-1]``
    first, each ref's next the one before it, ``refs[0]`` last (``GNTTAB_LIST_END``)."""
    prev = GNTTAB_LIST_END
    for ref in refs:
        nxt[ref] = prev
        prev = ref


def set_each(seq: MutableSequence[int], indices: Sequence[int], value: int) -> None:
    """``seq[i] = value`` for each of ``indices``, in order."""
    for i in indices:
        seq[i] = value


def any_set(seq: Sequence[int], indices: Sequence[int]) -> bool:
    """Whether ``seq[i]`` is not 0 for one of ``indices``."""
    for i in indices:
        if seq[i] != 0:
            return True
    return False


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


# The grant and end-access paths write entries through ``memoryview.cast`` views
# of each table frame, one item per field, at indices from the layout of
# ``struct grant_entry_v1`` (gntdma.abi.grant_table): u16 items for ``flags`` and
# ``domid``, u32 items for ``frame``. The casts are in the machine's byte order,
# which must be the little-endian one of the x86_64 layout.
assert sys.byteorder == "little", "the grant entry views assume x86_64 byte order"
assert [f[0] for f in GrantEntryV1.FIELDS] == ["flags", "domid", "frame"]
_FLAGS_AT: Final = GrantEntryV1.FIELDS[0][1] // 2
_DOMID_AT: Final = GRANT_ENTRY_V1_DOMID_OFFSET // 2
_FRAME_AT: Final = GrantEntryV1.FIELDS[2][1] // 4
_U16_PER_ENTRY: Final = GRANT_ENTRY_V1_SIZE // 2
_U32_PER_ENTRY: Final = GRANT_ENTRY_V1_SIZE // 4
_REF_SHIFT: Final = GREFS_PER_GRANT_FRAME.bit_length() - 1
_REF_MASK: Final = GREFS_PER_GRANT_FRAME - 1
assert 1 << _REF_SHIFT == GREFS_PER_GRANT_FRAME
_TYPE_MASK: Final = int(GTF_type_mask)
_PINNED: Final = int(GTF_reading | GTF_writing)


@final
class GrantEntries:
    """The guest's grant-table frames, its v1 entries read and written in place.

    ``granted`` counts the entries whose type is not ``GTF_invalid``: only the
    guest changes an entry's type (the hypervisor sets and clears
    ``GTF_reading``/``GTF_writing`` only, the toolstack writes reserved entries
    only), and the guest does it here, so the count is kept with each grant and
    end of access instead of by reading the table. Reserved entries are never
    granted here and are not counted.
    """

    __slots__ = ("_u16", "_u32", "frames", "granted")

    def __init__(self) -> None:
        self.frames: list[memoryview] = []
        #: Each frame as u16 items (``flags``, ``domid``) and as u32 items (``frame``).
        self._u16: list[memoryview] = []
        self._u32: list[memoryview] = []
        self.granted = 0

    def attach(self, frames: list[memoryview]) -> None:
        """Take the table's frames after it grew (the first ones are the same)."""
        self.frames = frames
        for page in frames[len(self._u16):]:
            self._u16.append(page.cast("H"))
            self._u32.append(page.cast("I"))

    def grant(self, ref: int, domid: int, frame: int, flags: int) -> None:
        """Publish a grant: ``domid`` and ``frame``, a write barrier, then ``flags``."""
        f = ref >> _REF_SHIFT
        i = ref & _REF_MASK
        u16 = self._u16[f]
        at = i * _U16_PER_ENTRY
        u16[at + _DOMID_AT] = domid
        self._u32[f][i * _U32_PER_ENTRY + _FRAME_AT] = frame
        wmb()
        # The old type is read where the flags are written: no scheduling point between.
        if u16[at + _FLAGS_AT] & _TYPE_MASK == 0:
            self.granted += 1
        u16[at + _FLAGS_AT] = flags

    def grant_many(self, refs: Sequence[int], domid: int, frames: Sequence[int],
                   flags: int) -> None:
        """:meth:`grant` of each ref to its frame, in order (a write barrier in each)."""
        u16s, u32s = self._u16, self._u32
        for ref, frame in zip(refs, frames, strict=True):
            f = ref >> _REF_SHIFT
            i = ref & _REF_MASK
            u16 = u16s[f]
            at = i * _U16_PER_ENTRY
            u16[at + _DOMID_AT] = domid
            u32s[f][i * _U32_PER_ENTRY + _FRAME_AT] = frame
            wmb()
            if u16[at + _FLAGS_AT] & _TYPE_MASK == 0:
                self.granted += 1
            u16[at + _FLAGS_AT] = flags

    def end_many(self, refs: Sequence[int]) -> list[int]:
        """:meth:`end` of each ref, in order: the refs still pinned (nothing written)."""
        u16s = self._u16
        busy: list[int] = []
        for ref in refs:
            u16 = u16s[ref >> _REF_SHIFT]
            at = (ref & _REF_MASK) * _U16_PER_ENTRY + _FLAGS_AT
            flags = u16[at]
            if flags & _PINNED:
                busy.append(ref)
                continue
            if flags & _TYPE_MASK != 0:
                self.granted -= 1
            u16[at] = 0
        return busy

    def end(self, ref: int) -> int:
        """Revoke the grant: 1, or 0 (nothing written) while the grantee has it pinned.

        The read of the flags and the write of 0 happen with no scheduling point
        between them, which is the compare-and-swap of the C code.
        """
        u16 = self._u16[ref >> _REF_SHIFT]
        at = (ref & _REF_MASK) * _U16_PER_ENTRY + _FLAGS_AT
        flags = u16[at]
        if flags & _PINNED:
            return 0
        if flags & _TYPE_MASK != 0:
            self.granted -= 1
        u16[at] = 0
        return 1

    def flags(self, ref: int) -> int:
        """The ``flags`` of entry ``ref`` now."""
        return int(self._u16[ref >> _REF_SHIFT][(ref & _REF_MASK) * _U16_PER_ENTRY + _FLAGS_AT])

    def entry(self, ref: int) -> tuple[int, int, int]:
        """(flags, domid, frame) of entry ``ref`` as written in the table."""
        f, off = grant_entry_v1_slot(ref)
        flags, domid, frame = GRANT_ENTRY_V1.unpack_from(self.frames[f], off)
        return int(flags), int(domid), int(frame)
