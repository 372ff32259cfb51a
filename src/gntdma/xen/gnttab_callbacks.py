"""The free callbacks of the guest grant table (part of :class:`gntdma.xen.gnttab.GntTab`).

How they are delivered, and how a starving callback gets the references it
waits for, is told in :mod:`gntdma.xen.gnttab`.
"""

from __future__ import annotations

from collections.abc import Callable

from gntdma.sched import Mutex, curthread, mtx_lock, mtx_unlock
from gntdma.xen.gnttab_types import GnttabFreeCallback

__all__ = ["GntTabFreeCallbacks"]


class GntTabFreeCallbacks:
    """The free-callback methods of :class:`~gntdma.xen.gnttab.GntTab`, which sets up
    the state they share with the free list."""

    lock: Mutex
    delivery: str
    free_count: int
    max_overtakings: int
    reports: list[str]
    callbacks: list[GnttabFreeCallback]
    callbacks_run: int
    _task_queued: bool
    _enqueue_swi: Callable[[Callable[[], None]], None]
    _reserved_for: GnttabFreeCallback | None
    _reserve_thread: object
    _running: GnttabFreeCallback | None

    def gnttab_request_free_callback(self, cb: GnttabFreeCallback,
                                     fn: Callable[[object], None], arg: object,
                                     count: int) -> None:
        """Run ``fn(arg)`` once ``count`` references are free.

        A callback that is already queued is left as it is (and reported). A
        callback re-requested from its own run keeps the overtakings it waited through.
        """
        mtx_lock(self.lock)
        if cb.queued:
            self.reports.append("gnttab_request_free_callback: callback already queued")
            mtx_unlock(self.lock)
            return
        cb.fn, cb.arg, cb.count, cb.queued = fn, arg, count, True
        cb.gen += 1
        if cb is not self._running:
            cb.overtaken = 0
        self.callbacks.append(cb)
        self._check_free_callbacks()
        mtx_unlock(self.lock)

    def gnttab_cancel_free_callback(self, cb: GnttabFreeCallback) -> None:
        """Unqueue ``cb``; a callback that is not queued is left alone. Cancelling the
        starving callback releases the references kept for it to the other waiters."""
        mtx_lock(self.lock)
        starving = self._starving() is cb
        if cb.queued:
            self.callbacks.remove(cb)
            cb.queued = False
        cb.gen += 1  # a run already picked by the task is dropped too
        cb.overtaken = 0
        if starving:
            self._check_free_callbacks()
        mtx_unlock(self.lock)

    def _starving(self) -> GnttabFreeCallback | None:
        """The callback the free references are kept for, if any (lock held)."""
        if self._reserved_for is not None:
            return self._reserved_for
        for cb in self.callbacks:
            if cb.overtaken >= self.max_overtakings:
                return cb
        return None

    def _keep_count(self) -> int:
        """The count a starving callback waits for, unless the current thread runs it."""
        w = self._starving()
        if w is None or (w is self._reserved_for and curthread() is self._reserve_thread):
            return 0
        return w.count

    def _kept(self) -> int:
        """Free references an allocation by the current thread may not take."""
        return min(self._keep_count(), self.free_count)

    def _avail_for(self, cb: GnttabFreeCallback) -> int:
        w = self._starving()
        if w is None or w is cb:
            return self.free_count
        return self.free_count - min(w.count, self.free_count)

    def _check_free_callbacks(self) -> None:
        """Lock held. Inline: run ready callbacks now; taskqueue: queue the task."""
        if not self.callbacks:
            return
        if self.delivery == "inline":
            # FreeBSD's do_free_callbacks: each one once, against the count at that moment.
            for cb in list(self.callbacks):
                if cb.queued and self._avail_for(cb) >= cb.count:
                    self.callbacks.remove(cb)
                    cb.queued = False
                    self._run_callback(cb)
            return
        if self._task_queued:
            return
        if any(self._avail_for(cb) >= cb.count for cb in self.callbacks):
            self._task_queued = True
            self._enqueue_swi(self._callback_task)

    def _run_callback(self, cb: GnttabFreeCallback) -> None:
        """Run ``cb`` (dequeued); a starving one may use the references kept for it."""
        saved = self._reserved_for, self._reserve_thread, self._running
        starving = cb.overtaken >= self.max_overtakings
        if starving:
            self._reserved_for, self._reserve_thread = cb, curthread()
        self._running = cb
        cb.runs += 1
        self.callbacks_run += 1
        fn = cb.fn
        assert fn is not None
        try:
            fn(cb.arg)
        finally:
            self._reserved_for, self._reserve_thread, self._running = saved
            if starving:  # what was kept for it may now serve the others
                self._check_free_callbacks_locked()

    def _check_free_callbacks_locked(self) -> None:
        mtx_lock(self.lock)
        self._check_free_callbacks()
        mtx_unlock(self.lock)

    def _callback_task(self) -> None:
        """On taskqueue_swi: visit each queued callback once, as do_free_callbacks does,
        running it (no lock held) if the free references satisfy its count now."""
        mtx_lock(self.lock)
        self._task_queued = False
        visit = [(cb, cb.gen) for cb in self.callbacks]
        mtx_unlock(self.lock)
        for cb, gen in visit:
            mtx_lock(self.lock)
            ready = cb.queued and cb.gen == gen and self._avail_for(cb) >= cb.count
            if ready:
                self.callbacks.remove(cb)
                cb.queued = False
            mtx_unlock(self.lock)
            if ready:
                self._run_callback(cb)
