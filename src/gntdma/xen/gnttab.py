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

Callbacks are delivered as FreeBSD's ``do_free_callbacks`` delivers them:
each queued callback is visited once per delivery, in order, and runs if the
free references satisfy its count *at that moment* (so a callback that takes
nothing does not hold back the next). A later, smaller request may be served
before an earlier, larger one, but not forever: a callback that has waited
through ``max_overtakings`` allocations by others is *starving*, and the
references freed from then on are kept for it (nobody else may take the
``count`` it waits for) until it has run (DESIGN section 7).

A grant still mapped when it is ended (``gnttab_end_foreign_access``) goes to
the reclaim list, polled from ``taskqueue_swi``; the caller may pass a function
that releases the memory behind the grant (busdma unwires the page), run
once the grantee has let go and the reference is free again.

Misuse that FreeBSD turns into a page fault (freeing a ``GNTTAB_LIST_END``
head, ending access on ``GNTTAB_REF_INVALID``, claiming from an empty chain,
requesting a queued callback twice, cancelling one that is not queued,
freeing a reference that is already free) is handled without touching the free
list and recorded in :attr:`GntTab.reports`.
"""

from __future__ import annotations

import errno
import itertools
from collections.abc import Callable, Sequence
from typing import Final, final

from gntdma.abi.grant_table import (
    GNTTAB_NR_RESERVED_ENTRIES,
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
)
from gntdma.abi.xen import DOMID_SELF
from gntdma.sched import (
    MTX_DEF,
    MTX_RECURSE,
    Mutex,
    current_scheduler,
    curthread,
    mtx_lock,
    mtx_unlock,
)
from gntdma.xen.gnttab_callbacks import GntTabFreeCallbacks
from gntdma.xen.gnttab_types import (
    GNTTAB_LIST_END,
    GnttabFreeCallback,
    GntTabStatistics,
    GrantEntries,
    GrantRefHead,
    any_set,
    chain_link,
    chain_refs,
    set_each,
)
from gntdma.xen.hypercall import Hypercalls

__all__ = [
    "GNTTAB_LIST_END",
    "GNTTAB_MAX_OVERTAKINGS",
    "GNTTAB_REF_INVALID",
    "GntTab",
    "GntTabStatistics",
    "GnttabFreeCallback",
    "GrantEntries",
    "GrantRefHead",
]

GNTTAB_REF_INVALID: Final[int] = GRANT_REF_INVALID
#: Frames assumed when GNTTABOP_query_size fails (FreeBSD's fallback).
DEFAULT_MAX_NR_GRANT_FRAMES: Final = 4
#: Allocations by others a waiting free callback lets pass before refs are kept for it.
GNTTAB_MAX_OVERTAKINGS: Final = 8

# Plain ints: arithmetic on the IntFlag members builds a flag object per use.
_PERMIT_ACCESS: Final = int(GTF_permit_access)
_PERMIT_ACCESS_RO: Final = int(GTF_permit_access | GTF_readonly)
_PINNED: Final = int(GTF_reading | GTF_writing)


@final
class GntTab(GntTabFreeCallbacks):
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
        flags = _LIST_LOCK_RECURSE if callback_delivery == "inline" else MTX_DEF
        self.lock = Mutex("gnttab_list", flags)
        self.next: list[int] = []
        #: 1 for each ref on the free list (detects a double free).
        self.is_free = bytearray()
        self.free_head = GNTTAB_LIST_END
        self.free_count = 0
        self.callbacks: list[GnttabFreeCallback] = []
        self.callbacks_run = 0
        self._task_queued = False
        self.reclaim: list[int] = []
        self._reclaim_release: dict[int, Callable[[], None]] = {}
        self.max_overtakings = GNTTAB_MAX_OVERTAKINGS
        #: The starving callback being run, and the thread running it.
        self._reserved_for: GnttabFreeCallback | None = None
        self._reserve_thread: object = None
        self._running: GnttabFreeCallback | None = None
        self.double_frees = 0
        self.reports: list[str] = []
        #: The table's frames and entries, with the count of entries granted.
        self._entries = GrantEntries()
        self.peak_allocated = 0
        #: References allocated for a holder's whole life (rings, prealloc maps):
        #: a waiting allocation may not count on them coming back (DESIGN section 7).
        self.held_for_life = 0
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
        return len(self._entries.frames)

    @property
    def capacity(self) -> int:
        """References the table can ever hold: every frame it may grow to, less reserved."""
        return self.max_frames * GREFS_PER_GRANT_FRAME - GNTTAB_NR_RESERVED_ENTRIES

    def gnttab_ever_available(self) -> int:
        """References a waiting allocation can ever get: the capacity less those held
        for life (they never come back while their holder lives)."""
        return self.capacity - self.held_for_life

    def gnttab_hold_for_life(self, count: int) -> None:
        """Count ``count`` allocated references as held for their holder's life
        (negative when the holder gives them back)."""
        self.held_for_life = max(0, self.held_for_life + count)

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
        self._entries.attach(self.hc.grant_frames())
        new = len(self._entries.frames) * GREFS_PER_GRANT_FRAME
        first = max(old, GNTTAB_NR_RESERVED_ENTRIES)
        # The new entries: each ref free and linked to the next, the last to the old
        # head; reserved ones not (memoized: the same for every table of this size).
        links, free = _new_refs(old, new, first)
        self.next.extend(links)
        self.is_free.extend(free)
        self.next[new - 1] = self.free_head
        self.free_head = first
        self.free_count += new - old
        return 0

    def _expand(self, more: int) -> int:
        frames = -(-more // GREFS_PER_GRANT_FRAME)
        return self._grow_to(self.nr_frames + frames)

    def _get_free_entries(self, count: int) -> tuple[int, list[int]]:
        """Detach ``count`` refs as a chain; (error, its refs in order). Lock held."""
        if count <= 0:
            return errno.EINVAL, []
        keep = self._keep_count()
        avail = self.free_count - min(keep, self.free_count)
        if avail < count:
            # Grow until ``count`` are free beside all a starving callback waits
            # for: while fewer than its count are free, every free one is kept.
            error = self._expand(count + keep - self.free_count)
            if error != 0:
                return error, []
            self._check_free_callbacks()
            if self.free_count - self._kept() < count:  # an inline callback took them
                return errno.ENOSPC, []
        refs = chain_refs(self.next, self.free_head, count)
        set_each(self.is_free, refs, 0)
        self.free_head = self.next[refs[-1]]
        self.next[refs[-1]] = GNTTAB_LIST_END
        self.free_count -= count
        self._note_peak()
        if self._reserved_for is None or curthread() is not self._reserve_thread:
            for cb in self.callbacks:  # each waiting callback was overtaken once more
                cb.overtaken += 1
        return 0, refs

    def _note_peak(self) -> None:
        used = (len(self._entries.frames) * GREFS_PER_GRANT_FRAME - GNTTAB_NR_RESERVED_ENTRIES
                - self.free_count)
        if used > self.peak_allocated:
            self.peak_allocated = used

    def ref_is_valid(self, ref: int) -> bool:
        """Whether ``ref`` is a reference of the table (not reserved, not past its end)."""
        return GNTTAB_NR_RESERVED_ENTRIES <= ref < len(self.next)

    def _double_free(self, fn: str, ref: int) -> None:
        self.double_frees += 1
        self.reports.append(f"{fn}: double free of ref {ref:#x} (left as it was)")

    # -- allocation -------------------------------------------------------------

    def gnttab_alloc_grant_references(self, count: int) -> tuple[int, GrantRefHead]:
        """Take ``count`` refs as a private chain: (0, head), ENOSPC or EINVAL."""
        error, refs = self._alloc(count)
        return error, GrantRefHead(refs[0] if error == 0 else GNTTAB_LIST_END)

    def gnttab_alloc_grant_reference_list(self, count: int) -> tuple[int, list[int]]:
        """:meth:`gnttab_alloc_grant_references` and a claim of every ref, in one call:
        (0, the refs in the order the claims give them), or (error, [])."""
        error, refs = self._alloc(count)
        if error == 0:
            set_each(self.next, refs, GNTTAB_LIST_END)
        return error, refs

    def _alloc(self, count: int) -> tuple[int, list[int]]:
        mtx_lock(self.lock)
        try:
            return _get_free_entries_now(self, count)
        finally:
            mtx_unlock(self.lock)

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
        if not self.ref_is_valid(ref):
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
        if not self.ref_is_valid(head):
            self.reports.append(f"gnttab_free_grant_references: invalid head {head:#x}")
            return
        nxt, is_free, limit = self.next, self.is_free, len(self.next)
        count, tail, refs = 1, head, [head]  # the chain's refs, walked once
        while is_free[tail] != 1 and count <= limit:  # not free, not a chain that loops
            tail = nxt[tail]
            if tail == GNTTAB_LIST_END:
                break
            refs.append(tail)
            count += 1
        else:
            self._double_free("gnttab_free_grant_references", tail)
            return
        mtx_lock(self.lock)
        if refs[-1] == head + count - 1 and refs == list(range(head, head + count)):
            is_free[head : head + count] = b"\x01" * count  # consecutive refs: one slice
        else:
            set_each(is_free, refs, 1)
        nxt[refs[-1]] = self.free_head
        self.free_head = head
        self.free_count += count
        self._check_free_callbacks()
        mtx_unlock(self.lock)

    def gnttab_free_grant_reference_list(self, refs: list[int]) -> None:
        """:meth:`gnttab_release_grant_reference` of each ref, in order, onto a new chain,
        then :meth:`gnttab_free_grant_references` of it, in one call: the free list ends
        as freeing the refs one by one leaves it. A list with an invalid or a repeated
        ref is freed one ref at a time (a repeated ref would make the chain a loop and
        lose the refs after it), with their reports; one with a ref already free takes
        the chain calls, and their reports."""
        if not refs:
            return
        nxt, is_free = self.next, self.is_free
        kind = _free_list_kind(refs, nxt, is_free)  # which of the three ways below
        if kind == _FREE_EACH:  # an invalid or a repeated ref
            for ref in refs:
                self.gnttab_free_grant_reference(ref)
            return
        if kind == _FREE_CHAIN_CALLS:  # a ref already free
            head = GrantRefHead()
            for ref in refs:
                self.gnttab_release_grant_reference(head, ref)
            self.gnttab_free_grant_references(head.head)
            return
        chain_link(nxt, refs)
        mtx_lock(self.lock)
        set_each(is_free, refs, 1)
        nxt[refs[0]] = self.free_head
        self.free_head = refs[-1]
        self.free_count += len(refs)
        self._check_free_callbacks()
        mtx_unlock(self.lock)

    def gnttab_free_grant_reference(self, ref: int) -> None:
        """Give one ref back to the free list."""
        if not self.ref_is_valid(ref):
            self.reports.append(f"gnttab_free_grant_reference: invalid ref {ref:#x}")
            return
        if self.is_free[ref] == 1:
            self._double_free("gnttab_free_grant_reference", ref)
            return
        mtx_lock(self.lock)
        self.is_free[ref] = 1
        self.next[ref] = self.free_head
        self.free_head = ref
        self.free_count += 1
        self._check_free_callbacks()
        mtx_unlock(self.lock)

    # -- granting ----------------------------------------------------------------

    def gnttab_grant_foreign_access_ref(self, ref: int, domid: int, frame: int,
                                        readonly: bool) -> None:
        """Write the grant: domid and frame, a write barrier, then flags."""
        if not self.ref_is_valid(ref):
            self.reports.append(f"gnttab_grant_foreign_access_ref: invalid ref {ref:#x}")
            return
        self._entries.grant(ref, domid, frame, _PERMIT_ACCESS_RO if readonly else _PERMIT_ACCESS)

    def gnttab_grant_foreign_access_refs(self, refs: Sequence[int], domid: int,
                                         frames: Sequence[int], readonly: bool) -> None:
        """:meth:`gnttab_grant_foreign_access_ref` of each ref to its frame, in order."""
        if refs and (min(refs) < GNTTAB_NR_RESERVED_ENTRIES or max(refs) >= len(self.next)):
            for ref, frame in zip(refs, frames, strict=True):
                self.gnttab_grant_foreign_access_ref(ref, domid, frame, readonly)
            return
        self._entries.grant_many(refs, domid, frames,
                                 _PERMIT_ACCESS_RO if readonly else _PERMIT_ACCESS)

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
        if not self.ref_is_valid(ref):
            return 0
        return self._entries.flags(ref) & _PINNED

    def gnttab_end_foreign_access_ref(self, ref: int) -> int:
        """Revoke the grant: 1 on success, 0 while the grantee still has it pinned.

        The read of the flags and the write of 0 happen with no scheduling point
        between them, which is the compare-and-swap of the C code.
        """
        if not self.ref_is_valid(ref):
            self.reports.append(f"gnttab_end_foreign_access_ref: invalid ref {ref:#x}")
            return 0
        return self._entries.end(ref)

    def gnttab_end_foreign_access_refs(self, refs: Sequence[int]) -> list[int]:
        """:meth:`gnttab_end_foreign_access_ref` of each ref, in order: those it gave 0."""
        if refs and (min(refs) < GNTTAB_NR_RESERVED_ENTRIES or max(refs) >= len(self.next)):
            return [ref for ref in refs if self.gnttab_end_foreign_access_ref(ref) == 0]
        return self._entries.end_many(refs)

    def gnttab_end_foreign_access(self, ref: int,
                                  release: Callable[[], None] | None = None) -> int:
        """End access and free ``ref``; if still in use, free it once the grantee lets go.

        ``release()`` gives back the memory behind the grant (Linux's
        ``gnttab_end_foreign_access(ref, page)``): run now if access ended, else once
        the grantee has let go. Returns 1 if freed now, 0 if deferred (FreeBSD leaks
        the ref instead).
        """
        if self.gnttab_end_foreign_access_ref(ref) == 1:
            self.gnttab_free_grant_reference(ref)
            if release is not None:
                release()
            return 1
        if self.ref_is_valid(ref):
            self.reports.append(f"gnttab_end_foreign_access: g.e. {ref} still in use, "
                                "reclaim deferred")
            self.reclaim.append(ref)
            if release is not None:
                self._reclaim_release[ref] = release
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
            elif self.ref_is_valid(ref):
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
            release = self._reclaim_release.pop(ref, None)
            if release is not None:
                release()
        if still:
            current_scheduler().call_later(0.01, self._schedule_reclaim)

    # -- inspection -------------------------------------------------------------------

    def entry(self, ref: int) -> tuple[int, int, int]:
        """(flags, domid, frame) of ``ref`` as written in the table."""
        return self._entries.entry(ref)

    def statistics(self) -> GntTabStatistics:
        usable = self.nr_frames * GREFS_PER_GRANT_FRAME - GNTTAB_NR_RESERVED_ENTRIES
        return GntTabStatistics(
            self.nr_frames, self.max_frames, self.free_count, usable - self.free_count,
            self._entries.granted, len(self.callbacks), self.callbacks_run, len(self.reclaim),
            self.peak_allocated, self._kept_for_others(), self.double_frees,
            self.held_for_life)

    def _kept_for_others(self) -> int:
        w = self._starving()
        return 0 if w is None else min(w.count, self.free_count)

    @property
    def kept(self) -> int:
        """Free references kept for a starving callback: no one else can take them."""
        return self._kept_for_others()

# At the end of the module so that the lines above, which WITNESS reports and
# saved replay files quote as sites, keep their numbers.
#: The inline delivery's list lock flags, combined once.
_LIST_LOCK_RECURSE: Final = MTX_DEF | MTX_RECURSE
#: (old, new) -> what _grow_to appends: the next links and the free bits of refs
#: old..new-1 (the last ref's link is set to the free list's head after).
_NEW_REFS: dict[tuple[int, int], tuple[tuple[int, ...], bytes]] = {}


def _new_refs(old: int, new: int, first: int) -> tuple[tuple[int, ...], bytes]:
    """The entries ``old..new-1`` of ``next`` and ``is_free`` for a table growing from
    ``old`` to ``new`` refs, of which ``first`` on are usable: those before
    ``first`` (reserved) neither free nor linked, each usable one free and linked
    to the next (the last to ``GNTTAB_LIST_END``, for the caller to set)."""
    got = _NEW_REFS.get((old, new))
    if got is None:
        links = [GNTTAB_LIST_END] * (new - old)
        links[first - old : new - 1 - old] = range(first + 1, new)
        free = bytes(first - old) + b"\x01" * (new - first)
        got = (tuple(links), free)
        if len(_NEW_REFS) < 256 and new - old <= 4 * GREFS_PER_GRANT_FRAME:  # bounded
            _NEW_REFS[(old, new)] = got
    return got


# The allocation and free fast paths, here for the same reason.
#: How gnttab_free_grant_reference_list frees a list: on one chain, one ref at a time
#: (an invalid or a repeated ref), or with the chain calls (a ref already free).
_FREE_CHAIN: Final = 0
_FREE_EACH: Final = 1
_FREE_CHAIN_CALLS: Final = 2


def _free_list_kind(refs: list[int], nxt: list[int], is_free: bytearray) -> int:
    """How :meth:`GntTab.gnttab_free_grant_reference_list` frees ``refs`` (not empty)."""
    if len(refs) == 1:  # the checks below for one ref, without the set, min and max
        ref = refs[0]
        if not GNTTAB_NR_RESERVED_ENTRIES <= ref < len(nxt):
            return _FREE_EACH
        return _FREE_CHAIN_CALLS if is_free[ref] != 0 else _FREE_CHAIN
    if (len(set(refs)) != len(refs) or min(refs) < GNTTAB_NR_RESERVED_ENTRIES
            or max(refs) >= len(nxt)):
        return _FREE_EACH
    return _FREE_CHAIN_CALLS if any_set(is_free, refs) else _FREE_CHAIN


def _get_free_entries_now(gt: GntTab, count: int) -> tuple[int, list[int]]:
    """:meth:`GntTab._get_free_entries` (lock held), its steps in place when no
    callback waits (none to keep references for, none overtaken) and ``count``
    references are free (no growth): the first ``count`` of the free chain, each
    marked allocated, the chain's new head after them."""
    if count <= 0 or gt.callbacks or gt._reserved_for is not None or gt.free_count < count:
        return gt._get_free_entries(count)
    nxt, is_free, head = gt.next, gt.is_free, gt.free_head
    if count >= _RUN_MIN and nxt[head : head + count - 1] == list(range(head + 1, head + count)):
        refs = list(range(head, head + count))  # the chain runs head, head + 1, ...
        is_free[head : head + count] = bytes(count)
    else:
        refs = [head] if count == 1 else chain_refs(nxt, head, count)
        for ref in refs:
            is_free[ref] = 0
    last = refs[-1]
    gt.free_head = nxt[last]
    nxt[last] = GNTTAB_LIST_END
    gt.free_count -= count
    used = (len(gt._entries.frames) * GREFS_PER_GRANT_FRAME - GNTTAB_NR_RESERVED_ENTRIES
            - gt.free_count)  # _note_peak
    if used > gt.peak_allocated:
        gt.peak_allocated = used
    return 0, refs


#: The allocations :func:`_get_free_entries_now` first tries as a run of consecutive
#: refs (one comparison of the chain's links, one slice): a fresh table's free list
#: is one, and smaller allocations cost less walked.
_RUN_MIN: Final = 16
