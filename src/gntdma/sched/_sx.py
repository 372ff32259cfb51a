"""sx(9): shared/exclusive sleepable locks.

As FreeBSD's ``sys/kern/kern_sx.c``: any number of threads may hold an sx
shared, or one thread exclusive; a holder may sleep (``LO_SLEEPABLE``), so an
sx may be held across ``tsleep``/``msleep``/``cv_wait`` and while taking a
mutex, but taking one while holding a mutex is a WITNESS reversal ("sleepable
after non-sleepable"), and taking one inside a spin mutex's critical section
panics. New shared holders wait while a thread waits for the lock exclusive
(``__sx_can_share``), unless they already hold an sx shared, so writers are not
starved. Waiting for an sx is a wait-for edge: a cycle through sx locks is a
deadlock, reported at once.

Every blocking operation is a scheduling point; the others are points only
under a preemptive strategy.
"""

from __future__ import annotations

from collections import deque
from typing import Final, final

from gntdma.sched import _trace
from gntdma.sched._core import HeldLock, KThread, Scheduler, current_scheduler
from gntdma.sched._errors import KernelPanic
from gntdma.sched._kthread import _BLOCKED
from gntdma.sched._sync import _panic, check_order_lazy
from gntdma.sched._witness import Site, caller_site, caller_site_raw, site_str

__all__ = [
    "SA_LOCKED",
    "SA_NOTRECURSED",
    "SA_RECURSED",
    "SA_SLOCKED",
    "SA_UNLOCKED",
    "SA_XLOCKED",
    "SX_DUPOK",
    "SX_NEW",
    "SX_NOADAPTIVE",
    "SX_NOPROFILE",
    "SX_NOWITNESS",
    "SX_QUIET",
    "SX_RECURSE",
    "Sx",
    "sx_assert",
    "sx_destroy",
    "sx_downgrade",
    "sx_init",
    "sx_slock",
    "sx_sunlock",
    "sx_try_slock",
    "sx_try_upgrade",
    "sx_try_xlock",
    "sx_unlock",
    "sx_xlock",
    "sx_xlocked",
    "sx_xunlock",
]

#: The trace recorder while tracing, else None (kept by ``_trace.on_switch``).
_tr: _trace.TraceRecorder | None = None


def _trace_switch(rec: _trace.TraceRecorder | None) -> None:
    global _tr
    _tr = rec


_trace.on_switch(_trace_switch)


#: sx_init_flags(9) options (sys/sys/sx.h). SX_QUIET, SX_NOPROFILE, SX_NOADAPTIVE and
#: SX_NEW are accepted and have nothing to do here.
SX_DUPOK: Final = 0x01
SX_NOPROFILE: Final = 0x02
SX_NOWITNESS: Final = 0x04
SX_QUIET: Final = 0x08
SX_NOADAPTIVE: Final = 0x10
SX_RECURSE: Final = 0x20
SX_NEW: Final = 0x40
#: The options ``sx_init_flags`` accepts (sys/kern/kern_sx.c: its MPASS).
_SX_OPTS: Final = (SX_QUIET | SX_RECURSE | SX_NOWITNESS | SX_DUPOK | SX_NOPROFILE
                   | SX_NOADAPTIVE | SX_NEW)

#: sx_assert(9) what values (sys/sys/lock.h LA_*).
SA_UNLOCKED: Final = 0x00
SA_LOCKED: Final = 0x01
SA_SLOCKED: Final = 0x02
SA_XLOCKED: Final = 0x04
SA_RECURSED: Final = 0x08
SA_NOTRECURSED: Final = 0x10


@final
class Sx:
    """An sx lock. ``owner`` holds it exclusive; ``sharers`` counts shared holds."""

    __slots__ = ("cls", "destroyed", "flags", "name", "owner", "recurse", "sharers",
                 "swaiters", "xwaiters")

    def __init__(self, name: str, flags: int = 0) -> None:
        if flags & ~_SX_OPTS:  # kern_sx.c, sx_init_flags: MPASS, a KASSERT
            raise KernelPanic(
                f"Assertion (opts & ~(SX_QUIET | SX_RECURSE | SX_NOWITNESS | SX_DUPOK | "
                f"SX_NOPROFILE | SX_NOADAPTIVE | SX_NEW)) == 0 failed at {caller_site()} "
                f"(sx_init_flags options {flags:#x})")
        self.name = name
        self.cls = name
        self.flags = flags
        self.owner: KThread | None = None
        self.recurse = 0
        self.sharers: dict[KThread, int] = {}
        self.xwaiters: deque[KThread] = deque()
        self.swaiters: deque[KThread] = deque()
        #: sx_destroy'd (kern_sx.c's SX_LOCK_DESTROYED lock word).
        self.destroyed = False

    def __repr__(self) -> str:
        owner = self.owner.name if self.owner is not None else None
        return f"<Sx {self.name} owner={owner} sharers={len(self.sharers)}>"


def sx_init(name: str, flags: int = 0) -> Sx:
    """Create an sx lock (sx_init_flags(9)). Never a scheduling point."""
    return Sx(name, flags)


def sx_destroy(sx: Sx) -> None:
    """Destroy an sx; it must be unlocked. Never a scheduling point."""
    if sx.owner is not None or sx.sharers:
        raise KernelPanic(f"sx lock {sx.name} still held")
    if sx.destroyed:  # subr_lock.c, lock_destroy: KASSERT(lock_initialized(lock))
        raise KernelPanic(f"sx lock {sx.name} is not initialized (destroyed already)")
    sx.destroyed = True


def _enter(s: Scheduler, t: KThread, sx: Sx, site: Site, op: str) -> None:
    if t.critnest > 0:
        raise _panic(t, "acquiring blockable sleep lock with spinlock or critical "
                        f"section held (sx) {sx.name} @ {site_str(site)}")
    if not sx.flags & SX_NOWITNESS and t.held:
        check_order_lazy(s, t, sx.cls, site[0], site[1], False, True,
                         bool(sx.flags & SX_DUPOK))
    if s.point_active:
        s.point(op)


def _recursed(t: KThread, sx: Sx, site: Site) -> KernelPanic:
    return _panic(t, f"recursed on non-recursive lock (sx) {sx.name} @ {site_str(site)}")


def _holds_shared(t: KThread) -> bool:
    return any(h.shared for h in t.held)


def _hold(t: KThread, sx: Sx, site: Site, shared: bool) -> None:
    t.held.append(HeldLock(sx, sx.cls, site, bool(sx.flags & SX_DUPOK), True, False, shared,
                           not sx.flags & SX_NOWITNESS))
    if _tr is not None:
        _tr.lock_acquired(t, sx, shared)


def _drop_held(t: KThread, sx: Sx) -> None:
    for i in range(len(t.held) - 1, -1, -1):
        if t.held[i].lock is sx:
            del t.held[i]
            if _tr is not None:
                _tr.lock_released(t, sx)
            return


def sx_xlock(sx: Sx) -> None:
    """Take ``sx`` exclusive, sleeping while anyone holds it. Always a scheduling point."""
    s = current_scheduler()
    t = s.curthread
    site = caller_site_raw()
    if sx.destroyed:  # kern_sx.c: KASSERT(sx->sx_lock != SX_LOCK_DESTROYED)
        raise _panic(t, f"sx_xlock() of destroyed sx {sx.name} @ {site_str(site)}")
    if sx.owner is t:
        if not sx.flags & SX_RECURSE:
            raise _recursed(t, sx, site)
        sx.recurse += 1
        return
    if t in sx.sharers:
        # kern_sx.c: upgrading by sx_xlock would wait for itself forever.
        raise _panic(t, f"sx_xlock of {sx.name} @ {site_str(site)} while share locked")
    _enter(s, t, sx, site, "sx_xlock")
    while sx.owner is not None or sx.sharers:
        if _tr is not None:
            _tr.lock_wait(t, sx)
        sx.xwaiters.append(t)
        s.wait_onlock = True
        s.block(sx, "sx_xlock", 0.0)
    sx.owner = t
    _hold(t, sx, site, False)


def sx_slock(sx: Sx) -> None:
    """Take ``sx`` shared, sleeping while it is held exclusive. Always a scheduling point."""
    s = current_scheduler()
    t = s.curthread
    site = caller_site_raw()
    if sx.destroyed:  # kern_sx.c: KASSERT(sx->sx_lock != SX_LOCK_DESTROYED)
        raise _panic(t, f"sx_slock() of destroyed sx {sx.name} @ {site_str(site)}")
    if sx.owner is t:
        raise _panic(t, f"sx_slock of {sx.name} @ {site_str(site)} while exclusively locked")
    if t in sx.sharers:
        if not sx.flags & SX_RECURSE:
            raise _recursed(t, sx, site)
        sx.sharers[t] += 1
        return
    _enter(s, t, sx, site, "sx_slock")
    while sx.owner is not None or (sx.xwaiters and not _holds_shared(t)):
        if _tr is not None:
            _tr.lock_wait(t, sx)
        sx.swaiters.append(t)
        s.wait_onlock = True
        s.block(sx, "sx_slock", 0.0)
    sx.sharers[t] = 1
    _hold(t, sx, site, True)


def sx_try_xlock(sx: Sx) -> int:
    """Take ``sx`` exclusive if free: 1, else 0. Never blocks; a point when preemptive."""
    s = current_scheduler()
    t = s.curthread
    site = caller_site_raw()
    if sx.destroyed:  # kern_sx.c: KASSERT(sx->sx_lock != SX_LOCK_DESTROYED)
        raise _panic(t, f"sx_try_xlock() of destroyed sx {sx.name} @ {site_str(site)}")
    if s.point_active:
        s.point("sx_try_xlock")
    if sx.owner is t:
        if not sx.flags & SX_RECURSE:
            return 0
        sx.recurse += 1
        return 1
    if sx.owner is not None or sx.sharers:
        return 0
    sx.owner = t
    _hold(t, sx, site, False)
    return 1


def sx_try_slock(sx: Sx) -> int:
    """Take ``sx`` shared if it is not held exclusive: 1, else 0. Never blocks."""
    s = current_scheduler()
    t = s.curthread
    site = caller_site_raw()
    if sx.destroyed:  # kern_sx.c: KASSERT(sx->sx_lock != SX_LOCK_DESTROYED)
        raise _panic(t, f"sx_try_slock() of destroyed sx {sx.name} @ {site_str(site)}")
    if s.point_active:
        s.point("sx_try_slock")
    if sx.owner is not None:
        return 0
    if t in sx.sharers:
        sx.sharers[t] += 1
        return 1
    sx.sharers[t] = 1
    _hold(t, sx, site, True)
    return 1


def _wake_next(s: Scheduler, sx: Sx) -> None:
    """The lock is free: wake one exclusive waiter, else every shared waiter."""
    while sx.xwaiters:
        w = sx.xwaiters.popleft()
        if w.wchan is sx and w.state is _BLOCKED:
            s.wake(w)
            return
    _wake_sharers(s, sx)


def _wake_sharers(s: Scheduler, sx: Sx) -> None:
    while sx.swaiters:
        w = sx.swaiters.popleft()
        if w.wchan is sx and w.state is _BLOCKED:
            s.wake(w)


def sx_xunlock(sx: Sx) -> None:
    """Release an exclusive hold. A scheduling point only when preemptive."""
    s = current_scheduler()
    t = s.curthread
    if sx.owner is not t:
        raise _panic(t, f"Lock {sx.name} not exclusively locked @ {caller_site()}")
    if sx.recurse > 0:
        sx.recurse -= 1
    else:
        sx.owner = None
        _drop_held(t, sx)
        _wake_next(s, sx)
    if s.point_active:
        s.point("sx_xunlock")


def sx_sunlock(sx: Sx) -> None:
    """Release a shared hold. A scheduling point only when preemptive."""
    s = current_scheduler()
    t = s.curthread
    n = sx.sharers.get(t)
    if n is None:
        raise _panic(t, f"Lock {sx.name} not share locked @ {caller_site()}")
    if n > 1:
        sx.sharers[t] = n - 1
    else:
        del sx.sharers[t]
        _drop_held(t, sx)
        if not sx.sharers:
            _wake_next(s, sx)
    if s.point_active:
        s.point("sx_sunlock")


def sx_unlock(sx: Sx) -> None:
    """Release whichever hold the current thread has (sx_unlock(9))."""
    if sx.owner is current_scheduler().curthread:
        sx_xunlock(sx)
    else:
        sx_sunlock(sx)


def sx_try_upgrade(sx: Sx) -> int:
    """Turn the current thread's only shared hold into exclusive: 1, else 0. Never blocks."""
    s = current_scheduler()
    t = s.curthread
    if sx.sharers.get(t) is None:
        raise _panic(t, f"Lock {sx.name} not share locked @ {caller_site()}")
    if len(sx.sharers) != 1 or sx.sharers[t] != 1:
        return 0
    del sx.sharers[t]
    sx.owner = t
    for h in t.held:
        if h.lock is sx and isinstance(h, HeldLock):  # an sx's hold is a HeldLock
            h.shared = False
    return 1


def sx_downgrade(sx: Sx) -> None:
    """Turn the current thread's exclusive hold into shared; wakes shared waiters."""
    s = current_scheduler()
    t = s.curthread
    if sx.owner is not t or sx.recurse > 0:
        raise _panic(t, f"Lock {sx.name} not exclusively locked or recursed @ {caller_site()}")
    sx.owner = None
    sx.sharers[t] = 1
    for h in t.held:
        if h.lock is sx and isinstance(h, HeldLock):  # an sx's hold is a HeldLock
            h.shared = True
    _wake_sharers(s, sx)
    if s.point_active:
        s.point("sx_downgrade")


def sx_xlocked(sx: Sx) -> bool:
    """Whether the current thread holds ``sx`` exclusive. Never a scheduling point."""
    return sx.owner is current_scheduler().curthread


def sx_assert(sx: Sx, what: int) -> None:
    """KASSERT on the current thread's hold of ``sx`` (kern_sx.c, _sx_assert)."""
    t = current_scheduler().curthread
    x = sx.owner is t
    sh = t in sx.sharers
    where = caller_site()
    if what in (SA_LOCKED, SA_LOCKED | SA_NOTRECURSED, SA_SLOCKED,
                SA_SLOCKED | SA_NOTRECURSED, SA_LOCKED | SA_RECURSED,
                SA_SLOCKED | SA_RECURSED):
        if what & SA_SLOCKED and x:
            raise _panic(t, f"Lock {sx.name} exclusively locked @ {where}")
        if not (sh or (x and not what & SA_SLOCKED)):
            kind = "share " if what & SA_SLOCKED else ""
            raise _panic(t, f"Lock {sx.name} not {kind}locked @ {where}")
        n = sx.recurse if x else sx.sharers.get(t, 0) - 1
        if what & SA_RECURSED and n == 0:
            raise _panic(t, f"Lock {sx.name} not recursed @ {where}")
        if what & SA_NOTRECURSED and n > 0:
            raise _panic(t, f"Lock {sx.name} recursed @ {where}")
    elif what & SA_XLOCKED:
        if not x:
            raise _panic(t, f"Lock {sx.name} not exclusively locked @ {where}")
        if what & SA_RECURSED and sx.recurse == 0:
            raise _panic(t, f"Lock {sx.name} not recursed @ {where}")
        if what & SA_NOTRECURSED and sx.recurse > 0:
            raise _panic(t, f"Lock {sx.name} recursed @ {where}")
    elif what == SA_UNLOCKED:
        if x or sh:
            raise _panic(t, f"Lock {sx.name} locked @ {where}")
    else:
        raise KernelPanic(f"sx_assert: bad what {what:#x}")
