"""callout(9): functions run after a delay, on the kernel's softclock thread.

Theory of operation
-------------------
``callout_reset`` arms a timer with ``Scheduler.call_later``. When it fires,
the hub only appends the callout to the kernel's softclock queue and wakes the
softclock thread (a daemon kernel thread): hub callbacks never block, handlers
may. The softclock thread takes the callout's lock (``callout_init_mtx``, or
``Giant`` for ``callout_init(c, 0)``), checks the callout was not stopped or
rescheduled meanwhile (a generation number), clears ``CALLOUT_PENDING`` and runs
the handler, then drops the lock (unless ``CALLOUT_RETURNUNLOCKED``).

So, as in FreeBSD, ``callout_stop`` called with the callout's lock held
guarantees the handler will not run. Without a lock (mpsafe), a handler already
taken by the softclock thread may still run; ``callout_drain`` waits for it.

Delays are in seconds of the scheduler clock (FreeBSD counts ticks).
``callout_stop`` returns 1 if it stopped a pending callout, 0 if the handler is
running and could not be stopped, -1 if the callout was neither.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, final

from gntdma.sched import (
    KernelPanic,
    Mutex,
    current_scheduler,
    mtx_lock,
    mtx_owned,
    mtx_unlock,
    tsleep,
    wakeup,
)

if TYPE_CHECKING:
    from gntdma.sys._kernel import Kernel

__all__ = [
    "CALLOUT_ACTIVE",
    "CALLOUT_MPSAFE",
    "CALLOUT_PENDING",
    "CALLOUT_RETURNUNLOCKED",
    "Softclock",
    "callout",
    "callout_active",
    "callout_deactivate",
    "callout_drain",
    "callout_init",
    "callout_init_mtx",
    "callout_pending",
    "callout_reset",
    "callout_schedule",
    "callout_stop",
]

CALLOUT_ACTIVE: Final = 0x0002
CALLOUT_PENDING: Final = 0x0004
CALLOUT_MPSAFE: Final = 0x0008
CALLOUT_RETURNUNLOCKED: Final = 0x0010


@final
class callout:
    """A callout of kernel ``kern``; initialise it with callout_init or callout_init_mtx."""

    __slots__ = ("_cancel", "_gen", "_kern", "_running", "c_arg", "c_flags", "c_func",
                 "c_lock")

    def __init__(self, kern: Kernel) -> None:
        self._kern = kern
        self.c_func: Callable[[object], None] | None = None
        self.c_arg: object = None
        self.c_flags = 0
        self.c_lock: Mutex | None = None
        self._gen = 0
        self._running = False
        self._cancel: Callable[[], None] | None = None

    def __repr__(self) -> str:
        return f"<callout flags={self.c_flags:#x} running={self._running}>"


@final
class Softclock:
    """The softclock thread of one kernel, and the set of pending callouts."""

    def __init__(self, kern: Kernel) -> None:
        self.kern = kern
        self._due: deque[tuple[callout, int]] = deque()
        self._pending: set[callout] = set()
        self._exit = False
        self.thread = current_scheduler().spawn(
            self._loop, name=f"{kern.name}/softclock", daemon=True, domain=kern
        )

    def pending(self) -> int:
        return len(self._pending)

    def _fire(self, c: callout, gen: int) -> None:
        """In the hub: hand the callout to the softclock thread."""
        self._due.append((c, gen))
        wakeup(self)

    def _loop(self) -> None:
        while True:
            while not self._due:
                if self._exit:
                    return
                tsleep(self, "softclock")
            c, gen = self._due.popleft()
            if c._gen != gen or not c.c_flags & CALLOUT_PENDING:
                continue
            lock = c.c_lock
            if lock is not None:
                mtx_lock(lock)
                if c._gen != gen or not c.c_flags & CALLOUT_PENDING:
                    mtx_unlock(lock)
                    continue
            c.c_flags &= ~CALLOUT_PENDING
            c._cancel = None
            self._pending.discard(c)
            fn, arg = c.c_func, c.c_arg
            assert fn is not None
            c._running = True
            try:
                fn(arg)
            finally:
                c._running = False
                if lock is not None and not c.c_flags & CALLOUT_RETURNUNLOCKED:
                    mtx_unlock(lock)
                wakeup(c)

    def shutdown(self) -> None:
        for c in list(self._pending):
            _stop(c)
        self._exit = True
        wakeup(self)


def callout_init(c: callout, mpsafe: int) -> None:
    """Initialise ``c``; with ``mpsafe`` 0 its handler runs under the kernel's Giant."""
    c.c_flags = CALLOUT_MPSAFE if mpsafe != 0 else 0
    c.c_lock = None if mpsafe != 0 else c._kern.Giant


def callout_init_mtx(c: callout, mtx: Mutex, flags: int) -> None:
    """Initialise ``c``; its handler runs with ``mtx`` held (``CALLOUT_RETURNUNLOCKED``)."""
    if flags & ~CALLOUT_RETURNUNLOCKED:
        raise KernelPanic(f"callout_init_mtx: bad flags {flags:#x}")
    c.c_flags = flags
    c.c_lock = mtx


def _stop(c: callout) -> bool:
    if not c.c_flags & CALLOUT_PENDING:
        return False
    c.c_flags &= ~CALLOUT_PENDING
    c._gen += 1
    if c._cancel is not None:
        c._cancel()
        c._cancel = None
    c._kern.softclock._pending.discard(c)
    return True


def _assert_locked(c: callout, fn: str) -> None:
    if c.c_lock is not None and c.c_lock is not c._kern.Giant and not mtx_owned(c.c_lock):
        raise KernelPanic(f"{fn}: callout lock {c.c_lock.name} not held")


def callout_reset(c: callout, seconds: float, fn: Callable[[object], None],
                  arg: object) -> int:
    """Run ``fn(arg)`` in ``seconds``; returns 1 if a pending run was cancelled, else 0."""
    _assert_locked(c, "callout_reset")
    cancelled = 1 if _stop(c) else 0
    c.c_func = fn
    c.c_arg = arg
    c.c_flags |= CALLOUT_ACTIVE | CALLOUT_PENDING
    c._gen += 1
    gen = c._gen
    sc = c._kern.softclock
    sc._pending.add(c)
    c._cancel = current_scheduler().call_later(max(0.0, seconds), lambda: sc._fire(c, gen))
    return cancelled


def callout_schedule(c: callout, seconds: float) -> int:
    """Re-arm ``c`` with its last function and argument."""
    if c.c_func is None:
        raise KernelPanic("callout_schedule: callout never reset")
    return callout_reset(c, seconds, c.c_func, c.c_arg)


def callout_stop(c: callout) -> int:
    """Stop ``c``: 1 stopped while pending, 0 running (not stopped), -1 neither."""
    _assert_locked(c, "callout_stop")
    c.c_flags &= ~CALLOUT_ACTIVE
    if _stop(c):
        return 1
    return 0 if c._running else -1


def callout_drain(c: callout) -> int:
    """Stop ``c`` and wait for a running handler to finish. Sleeps; call without c's lock."""
    if c.c_lock is not None and mtx_owned(c.c_lock):
        raise KernelPanic(f"callout_drain with callout lock {c.c_lock.name} held")
    c.c_flags &= ~CALLOUT_ACTIVE
    stopped = _stop(c)
    was_running = c._running
    while c._running:
        tsleep(c, "codrain")
    return 1 if stopped else (0 if was_running else -1)


def callout_pending(c: callout) -> bool:
    return bool(c.c_flags & CALLOUT_PENDING)


def callout_active(c: callout) -> bool:
    return bool(c.c_flags & CALLOUT_ACTIVE)


def callout_deactivate(c: callout) -> None:
    c.c_flags &= ~CALLOUT_ACTIVE
