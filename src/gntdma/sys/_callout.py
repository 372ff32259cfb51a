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

As in FreeBSD (``sys/kern/kern_timeout.c``), the queue, the pending set and
each callout's pending and running state are protected by the softclock's
``cc_lock``, a spin mutex (``MTX_SPIN``): the hub takes it to queue a fired
callout (it is never found held, a spin holder is never preempted), the
softclock thread sleeps idle on it with ``msleep_spin`` (``PIDLE``: the
hung-task watchdog does not count it), and ``callout_drain`` sleeps on it
as ``_callout_stop_safe`` does ("codrain"), so no wakeup can be lost. The
callout's own lock is a sleep mutex, so it is taken with ``cc_lock`` dropped.

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
    MTX_SPIN,
    PIDLE,
    KernelPanic,
    Mutex,
    current_scheduler,
    msleep_spin,
    mtx_init,
    mtx_lock,
    mtx_owned,
    mtx_unlock,
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
        #: FreeBSD's cc_lock ("callout", MTX_SPIN).
        self.cc_lock = mtx_init("callout", MTX_SPIN)
        self.thread = current_scheduler().spawn(
            self._loop, name=f"{kern.name}/softclock", daemon=True, domain=kern
        )

    def pending(self) -> int:
        return len(self._pending)

    def _fire(self, c: callout, gen: int) -> None:
        """In the hub: hand the callout to the softclock thread."""
        mtx_lock(self.cc_lock)
        self._due.append((c, gen))
        wakeup(self)
        mtx_unlock(self.cc_lock)

    def _loop(self) -> None:
        cc = self.cc_lock
        mtx_lock(cc)
        while True:
            while not self._due:
                if self._exit:
                    mtx_unlock(cc)
                    return
                msleep_spin(self, cc, "softclock", 0.0, PIDLE)
            c, gen = self._due.popleft()
            if c._gen != gen or not c.c_flags & CALLOUT_PENDING:
                continue
            lock = c.c_lock
            if lock is not None:
                # A sleep mutex is never taken inside the spin section.
                mtx_unlock(cc)
                mtx_lock(lock)
                mtx_lock(cc)
                if c._gen != gen or not c.c_flags & CALLOUT_PENDING:
                    mtx_unlock(cc)
                    mtx_unlock(lock)
                    mtx_lock(cc)
                    continue
            c.c_flags &= ~CALLOUT_PENDING
            c._cancel = None
            self._pending.discard(c)
            fn, arg = c.c_func, c.c_arg
            assert fn is not None
            c._running = True
            mtx_unlock(cc)
            try:
                fn(arg)
            except BaseException as exc:
                c._running = False
                if isinstance(exc, Exception):  # a panic, not a kill (GreenletExit)
                    if lock is not None and mtx_owned(lock):
                        mtx_unlock(lock)
                    wakeup(c)
                raise
            if lock is not None and not c.c_flags & CALLOUT_RETURNUNLOCKED:
                mtx_unlock(lock)
            mtx_lock(cc)
            c._running = False
            wakeup(c)

    def shutdown(self) -> None:
        mtx_lock(self.cc_lock)
        for c in list(self._pending):
            _stop(c)
        self._exit = True
        wakeup(self)
        mtx_unlock(self.cc_lock)


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
    sc = c._kern.softclock
    mtx_lock(sc.cc_lock)
    cancelled = 1 if _stop(c) else 0
    c.c_func = fn
    c.c_arg = arg
    c.c_flags |= CALLOUT_ACTIVE | CALLOUT_PENDING
    c._gen += 1
    gen = c._gen
    sc._pending.add(c)
    c._cancel = current_scheduler().call_later(max(0.0, seconds), lambda: sc._fire(c, gen))
    mtx_unlock(sc.cc_lock)
    return cancelled


def callout_schedule(c: callout, seconds: float) -> int:
    """Re-arm ``c`` with its last function and argument."""
    if c.c_func is None:
        raise KernelPanic("callout_schedule: callout never reset")
    return callout_reset(c, seconds, c.c_func, c.c_arg)


def callout_stop(c: callout) -> int:
    """Stop ``c``: 1 stopped while pending, 0 running (not stopped), -1 neither."""
    _assert_locked(c, "callout_stop")
    cc = c._kern.softclock.cc_lock
    mtx_lock(cc)
    c.c_flags &= ~CALLOUT_ACTIVE
    rv = 1 if _stop(c) else (0 if c._running else -1)
    mtx_unlock(cc)
    return rv


def callout_drain(c: callout) -> int:
    """Stop ``c`` and wait for a running handler to finish. Sleeps; call without c's lock.

    The wait is ``_callout_stop_safe``'s: on the callout, with ``cc_lock`` as
    interlock ("codrain").
    """
    if c.c_lock is not None and mtx_owned(c.c_lock):
        raise KernelPanic(f"callout_drain with callout lock {c.c_lock.name} held")
    cc = c._kern.softclock.cc_lock
    mtx_lock(cc)
    c.c_flags &= ~CALLOUT_ACTIVE
    stopped = _stop(c)
    was_running = c._running
    while c._running:
        msleep_spin(c, cc, "codrain")
    mtx_unlock(cc)
    return 1 if stopped else (0 if was_running else -1)


def callout_pending(c: callout) -> bool:
    return bool(c.c_flags & CALLOUT_PENDING)


def callout_active(c: callout) -> bool:
    return bool(c.c_flags & CALLOUT_ACTIVE)


def callout_deactivate(c: callout) -> None:
    c.c_flags &= ~CALLOUT_ACTIVE
