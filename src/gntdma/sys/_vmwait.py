"""vm_wait: sleeping until the page allocator gets pages back.

As FreeBSD's ``vm_wait_doms`` (``sys/vm/vm_page.c``), the check that nothing
came back and the sleep happen under ``vm_domainset_lock``, the sleep's
interlock, and the free side wakes the sleepers under the same lock, so a page
freed between a failed allocation and its sleep is never missed: either the
sleeper sees the free count moved and tries again, or it is already queued
when the wakeup comes.
"""

from __future__ import annotations

from typing import final

from gntdma.sched import msleep, mtx_init, mtx_lock, mtx_unlock, wakeup

__all__ = ["VmWait"]


@final
class VmWait:
    """The ``vmwait`` sleep of one kernel."""

    __slots__ = ("frees", "lock", "waiters")

    def __init__(self) -> None:
        #: Pages given back so far (read before an allocation, checked before sleeping).
        self.frees = 0
        self.waiters = 0
        #: FreeBSD's vm_domainset_lock (MTX_DEF).
        self.lock = mtx_init("vm domainset lock")

    def freed(self) -> None:
        """A page came back: wake the sleepers. A scheduling point only if some sleep."""
        self.frees += 1
        if self.waiters > 0:
            mtx_lock(self.lock)
            wakeup(self)
            mtx_unlock(self.lock)

    def sleep(self, frees: int) -> None:
        """Sleep until a page comes back, unless one did since ``frees`` was read."""
        m = self.lock
        mtx_lock(m)
        if self.frees != frees:
            mtx_unlock(m)
            return
        self.waiters += 1
        try:
            msleep(self, m, "vmwait")
        finally:
            self.waiters -= 1
        mtx_unlock(m)
