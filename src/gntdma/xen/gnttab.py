"""The guest grant-table API of FreeBSD's ``sys/xen/gnttab.h``.

Theory of operation
-------------------
Grant references live in the domain's grant table, which the hypervisor
grows frame by frame on ``GNTTABOP_setup_table``. The guest keeps a free list
threaded through a ``next`` array (FreeBSD's ``gnttab_list``); private chains
taken with :func:`gnttab_alloc_grant_references` share that array and end in
``GNTTAB_LIST_END``. References 0..7 are reserved; the first frame gives 504.

Granting writes ``domid`` and ``frame``, a write barrier, then ``flags``.
Ending access succeeds only if the grantee does not have the entry pinned
(``GTF_reading``/``GTF_writing``); otherwise it fails ("still in use").

Free callbacks. One deliberate change from FreeBSD (DESIGN section 6): with the
default ``callback_delivery="taskqueue"``, freeing references only queues a
task on ``taskqueue_swi``; the task runs every callback whose count is now
available with *no lock held*, in the order they were requested, in a thread
that is never the one that freed the references. The lock is then a plain
non-recursive mutex, and the only lock order is "driver locks before
``gnttab_list``". ``callback_delivery="inline"`` keeps FreeBSD's behaviour:
callbacks run synchronously from whatever frees references (or requests the
callback), with the recursive ``gnttab_list`` lock held.

Misuse that FreeBSD turns into a page fault (freeing a ``GNTTAB_LIST_END``
head, ending access on ``GNTTAB_REF_INVALID``, claiming from an empty chain,
requesting a queued callback twice, cancelling one that is not queued) is
handled without touching the free list and recorded in :attr:`GntTab.reports`.
"""

from __future__ import annotations

import errno
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, final

from gntdma.abi.grant_table import (
    GNTTAB_NR_RESERVED_ENTRIES,
    GRANT_ENTRY_V1,
    GRANT_ENTRY_V1_DOMID_FRAME,
    GRANT_ENTRY_V1_DOMID_OFFSET,
    GRANT_ENTRY_V1_FLAGS,
    GRANT_REF_INVALID,
    GREFS_PER_GRANT_FRAME,
    GNTST_okay,
    GNTTABOP_query_size,
    GNTTABOP_setup_table,
    GnttabQuerySize,
    GnttabSetupTable,
    GTF_permit_access,
    GTF_reading,
    GTF_readonly,
    GTF_writing,
    grant_entry_v1_slot,
)
from gntdma.abi.xen import DOMID_SELF
from gntdma.sched import (
    MTX_DEF,
    MTX_RECURSE,
    Mutex,
    current_scheduler,
    mtx_lock,
    mtx_unlock,
    wmb,
)
from gntdma.xen.hypercall import Hypercalls

__all__ = [
    "GNTTAB_LIST_END",
    "GNTTAB_REF_INVALID",
    "GntTab",
    "GntTabStatistics",
    "GnttabFreeCallback",
    "GrantRefHead",
]

GNTTAB_LIST_END: Final[int] = GRANT_REF_INVALID
GNTTAB_REF_INVALID: Final[int] = GRANT_REF_INVALID
#: Frames assumed when GNTTABOP_query_size fails (FreeBSD's fallback).
DEFAULT_MAX_NR_GRANT_FRAMES: Final = 4

_FLAGS: Final = GRANT_ENTRY_V1_FLAGS
_ENTRY: Final = GRANT_ENTRY_V1
_DOMID_FRAME: Final = GRANT_ENTRY_V1_DOMID_FRAME
# Plain ints: arithmetic on the IntFlag members builds a flag object per use.
_PERMIT_ACCESS: Final = int(GTF_permit_access)
_PERMIT_ACCESS_RO: Final = int(GTF_permit_access | GTF_readonly)
_PINNED: Final = int(GTF_reading | GTF_writing)


@final
class GrantRefHead:
    """A private chain head (``grant_ref_t`` passed by pointer in C)."""

    __slots__ = ("head",)

    def __init__(self, head: int = GNTTAB_LIST_END) -> None:
        self.head = head


@final
class GnttabFreeCallback:
    """``struct gnttab_free_callback``: run ``fn(arg)`` once ``count`` refs are free."""

    __slots__ = ("arg", "count", "fn", "gen", "queued", "runs")

    def __init__(self) -> None:
        self.fn: Callable[[object], None] | None = None
        self.arg: object = None
        self.count = 0
        self.queued = False
        self.runs = 0
        #: Bumped by every request and cancel: a run picked before a cancel is dropped.
        self.gen = 0


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


@final
class GntTab:
    """The grant table of one guest kernel."""

    def __init__(
        self,
        hc: Hypercalls,
        enqueue_swi: Callable[[Callable[[], None]], None],
        callback_delivery: str = "taskqueue",
    ) -> None:
        if callback_delivery not in ("taskqueue", "inline"):
            raise ValueError(f"callback_delivery must be 'taskqueue' or 'inline', "
                             f"not {callback_delivery!r}")
        self.hc = hc
        self.delivery = callback_delivery
        self._enqueue_swi = enqueue_swi
        flags = MTX_DEF | MTX_RECURSE if callback_delivery == "inline" else MTX_DEF
        self.lock = Mutex("gnttab_list", flags)
        self.next: list[int] = []
        self.free_head = GNTTAB_LIST_END
        self.free_count = 0
        self.callbacks: list[GnttabFreeCallback] = []
        self.callbacks_run = 0
        self._task_queued = False
        self.reclaim: list[int] = []
        self.reports: list[str] = []
        self._frames: list[memoryview] = []
        self.peak_allocated = 0
        rc, res = hc.grant_table_op(GNTTABOP_query_size, [GnttabQuerySize(dom=DOMID_SELF)])
        q = res[0] if rc == 0 else None
        if isinstance(q, GnttabQuerySize) and q.status == GNTST_okay:
            self.max_frames = q.max_nr_frames
        else:
            self.max_frames = DEFAULT_MAX_NR_GRANT_FRAMES
        if self._grow_to(1) != 0:
            raise OSError(errno.ENOMEM, "gnttab: cannot set up the first grant frame")
        # The first frame's non-reserved entries form the initial free list.
        self.free_count -= GNTTAB_NR_RESERVED_ENTRIES

    # -- frames and the free list ------------------------------------------------

    @property
    def nr_frames(self) -> int:
        return len(self._frames)

    def _grow_to(self, nr_frames: int) -> int:
        """setup_table up to ``nr_frames`` and thread the new refs onto the free list."""
        if nr_frames > self.max_frames:
            return errno.ENOSPC
        op = GnttabSetupTable(dom=DOMID_SELF, nr_frames=nr_frames)
        rc, res = self.hc.grant_table_op(GNTTABOP_setup_table, [op])
        r = res[0] if rc == 0 else None
        if not isinstance(r, GnttabSetupTable) or r.status != GNTST_okay:
            return errno.ENOSPC
        old = len(self.next)
        self._frames = self.hc.grant_frames()
        new = len(self._frames) * GREFS_PER_GRANT_FRAME
        first = max(old, GNTTAB_NR_RESERVED_ENTRIES)
        self.next.extend([GNTTAB_LIST_END] * (new - old))
        for ref in range(first, new - 1):
            self.next[ref] = ref + 1
        self.next[new - 1] = self.free_head
        self.free_head = first
        self.free_count += new - old
        return 0

    def _expand(self, more: int) -> int:
        frames = -(-more // GREFS_PER_GRANT_FRAME)
        return self._grow_to(self.nr_frames + frames)

    def _get_free_entries(self, count: int) -> tuple[int, int]:
        """Detach ``count`` refs as a chain; (error, head). Lock held."""
        if count <= 0:
            return errno.EINVAL, GNTTAB_LIST_END
        if self.free_count < count:
            error = self._expand(count - self.free_count)
            if error != 0:
                return error, GNTTAB_LIST_END
            self._check_free_callbacks()
            if self.free_count < count:  # an inline callback took them: re-check
                return errno.ENOSPC, GNTTAB_LIST_END
        head = ref = self.free_head
        for _ in range(count - 1):
            ref = self.next[ref]
        self.free_head = self.next[ref]
        self.next[ref] = GNTTAB_LIST_END
        self.free_count -= count
        self._note_peak()
        return 0, head

    def _note_peak(self) -> None:
        usable = self.nr_frames * GREFS_PER_GRANT_FRAME - GNTTAB_NR_RESERVED_ENTRIES
        self.peak_allocated = max(self.peak_allocated, usable - self.free_count)

    def _valid_ref(self, ref: int) -> bool:
        return GNTTAB_NR_RESERVED_ENTRIES <= ref < len(self.next)

    # -- allocation -------------------------------------------------------------

    def gnttab_alloc_grant_references(self, count: int) -> tuple[int, GrantRefHead]:
        """Take ``count`` refs as a private chain: (0, head), ENOSPC or EINVAL."""
        mtx_lock(self.lock)
        try:
            error, head = self._get_free_entries(count)
        finally:
            mtx_unlock(self.lock)
        return error, GrantRefHead(head)

    def gnttab_claim_grant_reference(self, head: GrantRefHead) -> int:
        """Pop one ref from a private chain; GNTTAB_LIST_END when it is empty."""
        ref = head.head
        if ref == GNTTAB_LIST_END:
            self.reports.append("gnttab_claim_grant_reference: claim from an empty chain")
            return GNTTAB_LIST_END
        head.head = self.next[ref]
        self.next[ref] = GNTTAB_LIST_END
        return ref

    def gnttab_release_grant_reference(self, head: GrantRefHead, ref: int) -> None:
        """Push ``ref`` back onto a private chain."""
        if not self._valid_ref(ref):
            self.reports.append(f"gnttab_release_grant_reference: invalid ref {ref:#x}")
            return
        self.next[ref] = head.head
        head.head = ref

    @staticmethod
    def gnttab_empty_grant_references(head: GrantRefHead) -> bool:
        return head.head == GNTTAB_LIST_END

    def gnttab_free_grant_references(self, head: int) -> None:
        """Give a whole private chain back to the free list."""
        if head == GNTTAB_LIST_END:
            self.reports.append("gnttab_free_grant_references: LIST_END head (no-op)")
            return
        if not self._valid_ref(head):
            self.reports.append(f"gnttab_free_grant_references: invalid head {head:#x}")
            return
        count, tail = 1, head
        while self.next[tail] != GNTTAB_LIST_END:
            tail = self.next[tail]
            count += 1
        mtx_lock(self.lock)
        self.next[tail] = self.free_head
        self.free_head = head
        self.free_count += count
        self._check_free_callbacks()
        mtx_unlock(self.lock)

    def gnttab_free_grant_reference(self, ref: int) -> None:
        """Give one ref back to the free list."""
        if not self._valid_ref(ref):
            self.reports.append(f"gnttab_free_grant_reference: invalid ref {ref:#x}")
            return
        mtx_lock(self.lock)
        self.next[ref] = self.free_head
        self.free_head = ref
        self.free_count += 1
        self._check_free_callbacks()
        mtx_unlock(self.lock)

    # -- granting ----------------------------------------------------------------

    def _entry_off(self, ref: int) -> tuple[memoryview, int]:
        f, off = grant_entry_v1_slot(ref)
        return self._frames[f], off

    def gnttab_grant_foreign_access_ref(self, ref: int, domid: int, frame: int,
                                        readonly: bool) -> None:
        """Write the grant: domid and frame, a write barrier, then flags."""
        if not self._valid_ref(ref):
            self.reports.append(f"gnttab_grant_foreign_access_ref: invalid ref {ref:#x}")
            return
        page, off = self._entry_off(ref)
        _DOMID_FRAME.pack_into(page, off + GRANT_ENTRY_V1_DOMID_OFFSET, domid, frame)
        wmb()
        _FLAGS.pack_into(page, off, _PERMIT_ACCESS_RO if readonly else _PERMIT_ACCESS)

    def gnttab_grant_foreign_access(self, domid: int, frame: int,
                                    readonly: bool) -> tuple[int, int]:
        """Allocate one ref and grant it: (error, ref)."""
        error, head = self.gnttab_alloc_grant_references(1)
        if error != 0:
            return error, GNTTAB_REF_INVALID
        ref = head.head
        self.next[ref] = GNTTAB_LIST_END
        self.gnttab_grant_foreign_access_ref(ref, domid, frame, readonly)
        return 0, ref

    def gnttab_query_foreign_access(self, ref: int) -> int:
        """The GTF_reading|GTF_writing bits of ``ref`` (0 when not pinned)."""
        if not self._valid_ref(ref):
            return 0
        page, off = self._entry_off(ref)
        return int(_FLAGS.unpack_from(page, off)[0]) & _PINNED

    def gnttab_end_foreign_access_ref(self, ref: int) -> int:
        """Revoke the grant: 1 on success, 0 while the grantee still has it pinned.

        The read of the flags and the write of 0 happen with no scheduling point
        between them, which is the compare-and-swap of the C code.
        """
        if not self._valid_ref(ref):
            self.reports.append(f"gnttab_end_foreign_access_ref: invalid ref {ref:#x}")
            return 0
        page, off = self._entry_off(ref)
        flags = int(_FLAGS.unpack_from(page, off)[0])
        if flags & _PINNED:
            return 0
        _FLAGS.pack_into(page, off, 0)
        return 1

    def gnttab_end_foreign_access(self, ref: int) -> int:
        """End access and free ``ref``; if still in use, free it once the grantee lets go.

        Returns 1 if freed now, 0 if deferred (FreeBSD leaks it instead).
        """
        if self.gnttab_end_foreign_access_ref(ref) == 1:
            self.gnttab_free_grant_reference(ref)
            return 1
        if self._valid_ref(ref):
            self.reports.append(f"gnttab_end_foreign_access: g.e. {ref} still in use, "
                                "reclaim deferred")
            self.reclaim.append(ref)
            current_scheduler().call_later(0.001, self._schedule_reclaim)
        return 0

    def gnttab_end_foreign_access_references(self, refs: list[int]) -> int:
        """End and free each ref; those still in use are reclaimed later.

        Returns the number freed now. (FreeBSD's version cuts the free list when
        refs[0] is still in use; this one chains only the refs that ended.)
        """
        done: list[int] = []
        for ref in refs:
            if self.gnttab_end_foreign_access_ref(ref) == 1:
                done.append(ref)
            elif self._valid_ref(ref):
                self.reclaim.append(ref)
        if len(done) < len(refs) and self.reclaim:
            current_scheduler().call_later(0.001, self._schedule_reclaim)
        if not done:
            return 0
        for a, b in itertools.pairwise(done):
            self.next[a] = b
        self.next[done[-1]] = GNTTAB_LIST_END
        self.gnttab_free_grant_references(done[0])
        return len(done)

    def _schedule_reclaim(self) -> None:
        self._enqueue_swi(self._reclaim_task)

    def _reclaim_task(self) -> None:
        still: list[int] = []
        freed: list[int] = []
        for ref in self.reclaim:
            if self.gnttab_end_foreign_access_ref(ref) == 1:
                freed.append(ref)
            else:
                still.append(ref)
        self.reclaim = still
        for ref in freed:
            self.gnttab_free_grant_reference(ref)
        if still:
            current_scheduler().call_later(0.01, self._schedule_reclaim)

    # -- free callbacks -------------------------------------------------------------

    def gnttab_request_free_callback(self, cb: GnttabFreeCallback,
                                     fn: Callable[[object], None], arg: object,
                                     count: int) -> None:
        """Run ``fn(arg)`` once ``count`` references are free.

        A callback that is already queued is left as it is (and reported).
        """
        mtx_lock(self.lock)
        if cb.queued:
            self.reports.append("gnttab_request_free_callback: callback already queued")
            mtx_unlock(self.lock)
            return
        cb.fn, cb.arg, cb.count, cb.queued = fn, arg, count, True
        cb.gen += 1
        self.callbacks.append(cb)
        self._check_free_callbacks()
        mtx_unlock(self.lock)

    def gnttab_cancel_free_callback(self, cb: GnttabFreeCallback) -> None:
        """Unqueue ``cb``; a callback that is not queued is left alone."""
        mtx_lock(self.lock)
        if cb.queued:
            self.callbacks.remove(cb)
            cb.queued = False
        cb.gen += 1  # a run already picked by the task is dropped too
        mtx_unlock(self.lock)

    def _check_free_callbacks(self) -> None:
        """Lock held. Inline: run ready callbacks now; taskqueue: queue the task."""
        if not self.callbacks:
            return
        if self.delivery == "inline":
            for cb in list(self.callbacks):
                if cb.queued and self.free_count >= cb.count:
                    self.callbacks.remove(cb)
                    cb.queued = False
                    self._run_callback(cb)
            return
        if self._task_queued:
            return
        if any(self.free_count >= cb.count for cb in self.callbacks):
            self._task_queued = True
            self._enqueue_swi(self._callback_task)

    def _run_callback(self, cb: GnttabFreeCallback) -> None:
        cb.runs += 1
        self.callbacks_run += 1
        fn = cb.fn
        assert fn is not None
        fn(cb.arg)

    def _callback_task(self) -> None:
        """On taskqueue_swi: run every callback whose count is free, no lock held."""
        mtx_lock(self.lock)
        self._task_queued = False
        ready: list[tuple[GnttabFreeCallback, int]] = []
        avail = self.free_count
        for cb in list(self.callbacks):
            if avail >= cb.count:
                self.callbacks.remove(cb)
                cb.queued = False
                avail -= cb.count
                ready.append((cb, cb.gen))
        mtx_unlock(self.lock)
        skipped = False
        for cb, gen in ready:
            if cb.gen == gen:  # not cancelled or re-requested meanwhile
                self._run_callback(cb)
            else:
                skipped = True
        if skipped:  # the references set aside for it may serve a callback left waiting
            mtx_lock(self.lock)
            self._check_free_callbacks()
            mtx_unlock(self.lock)

    # -- inspection -------------------------------------------------------------------

    def entry(self, ref: int) -> tuple[int, int, int]:
        """(flags, domid, frame) of ``ref`` as written in the table."""
        page, off = self._entry_off(ref)
        flags, domid, frame = _ENTRY.unpack_from(page, off)
        return int(flags), int(domid), int(frame)

    def statistics(self) -> GntTabStatistics:
        usable = self.nr_frames * GREFS_PER_GRANT_FRAME - GNTTAB_NR_RESERVED_ENTRIES
        granted = 0
        for ref in range(GNTTAB_NR_RESERVED_ENTRIES, len(self.next)):
            if self.entry(ref)[0] & 3:
                granted += 1
        return GntTabStatistics(
            self.nr_frames,
            self.max_frames,
            self.free_count,
            usable - self.free_count,
            granted,
            len(self.callbacks),
            self.callbacks_run,
            len(self.reclaim),
            self.peak_allocated,
        )
