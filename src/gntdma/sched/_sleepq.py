"""Sleep queues: condvar(9) and sleep(9) on wait channels.

Rules: every function here says whether it is a scheduling point. Sleeps
always are; signals and wakeups are scheduling points only under a preemptive
(exploration) strategy (or while ``point`` is watched), so the run strategy
pays nothing for them. Timeouts (``timo``) are in seconds; 0 means wait
forever, as FreeBSD's 0 ticks.

The interlock of a sleep is released after the sleeper is queued and retaken
after it wakes (``_sync._drop_for_sleep`` and ``_retake_after_sleep``); an
``MTX_SPIN`` interlock is only for ``msleep_spin``. Sleeping with another
non-sleepable lock held is reported by WITNESS (``sleep_check``).
"""

from __future__ import annotations

from collections import deque
from sys import _getframe
from typing import final

from gntdma.sched import _core, _trace
from gntdma.sched._core import KThread, Scheduler, current_scheduler
from gntdma.sched._errors import KernelPanic
from gntdma.sched._kthread import _BLOCKED, Held
from gntdma.sched._sync import (
    PIDLE,
    Mutex,
    _drop_for_sleep,
    _panic,
    _retake_after_sleep,
)
from gntdma.sched._witness import caller_site, site_of

__all__ = [
    "Condvar",
    "cv_broadcast",
    "cv_signal",
    "cv_timedwait",
    "cv_wait",
    "list_lock",
    "msleep",
    "msleep_spin",
    "sleep_check",
    "tsleep",
    "wakeup",
    "wakeup_one",
]


#: The trace recorder while tracing, else None (kept by ``_trace.on_switch``).
_tr: _trace.TraceRecorder | None = None


def _trace_switch(rec: _trace.TraceRecorder | None) -> None:
    global _tr
    _tr = rec


_trace.on_switch(_trace_switch)


@final
class Condvar:
    """A condition variable (condvar(9))."""

    __slots__ = ("name", "waiters")

    def __init__(self, name: str) -> None:
        self.name = name
        self.waiters: deque[KThread] = deque()


def cv_wait(cv: Condvar, m: Mutex) -> None:
    """Release ``m``, sleep until signalled, retake ``m``. Always a scheduling point."""
    cv_timedwait(cv, m, 0.0)


def cv_timedwait(cv: Condvar, m: Mutex, timo: float) -> int:
    """As cv_wait, with a timeout; returns 0 or EWOULDBLOCK. Always a scheduling point."""
    s = _core._current  # current_scheduler() without the call
    if s is None:
        s = current_scheduler()
    t = s.curthread
    if m.spin:
        # sys/kern/kern_mutex.c, unlock_spin (the lock class's lc_unlock).
        raise _panic(t, "spin locks can only use msleep_spin")
    if m.owner is not t:
        raise _panic(t, f"cv_wait on {cv.name} without holding {m.name}")
    sleep_check(s, t, cv.name, m)
    # The site of the wait and of the retake: block and _retake_after_sleep would
    # each find it from here (every frame between is in gntdma.sched).
    site = site_of(_getframe(1))
    cv.waiters.append(t)
    depth = _drop_for_sleep(m, s)
    if _tr is not None:
        _tr.sleep(t, cv.name)
    try:
        s.wait_site = site
        rv = s.block(cv, cv.name, timo)
    finally:
        if t in cv.waiters:
            cv.waiters.remove(t)
        if _tr is not None:
            _tr.woken(t)
    _retake_after_sleep(m, depth, site)
    return rv


def cv_signal(cv: Condvar) -> None:
    """Wake one waiter. A scheduling point only when preemptive."""
    s = _core._current  # current_scheduler() without the call
    if s is None:
        s = current_scheduler()
    while cv.waiters:
        w = cv.waiters.popleft()
        if w.wchan is cv and w.state is _BLOCKED:
            s.wake(w)
            break
    if s.point_active:
        hook = s.point_hook
        if hook is None:
            if s.curthread.critnest == 0:  # Scheduler._point in place
                s.yield_("cv_signal")
        else:
            hook("cv_signal")


def cv_broadcast(cv: Condvar) -> None:
    """Wake every waiter. A scheduling point only when preemptive."""
    s = _core._current  # current_scheduler() without the call
    if s is None:
        s = current_scheduler()
    while cv.waiters:
        w = cv.waiters.popleft()
        if w.wchan is cv and w.state is _BLOCKED:
            s.wake(w)
    if s.point_active:
        hook = s.point_hook
        if hook is None:
            if s.curthread.critnest == 0:  # Scheduler._point in place
                s.yield_("cv_broadcast")
        else:
            hook("cv_broadcast")


# -- sleep(9) on wait channels ----------------------------------------------------


@final
class _Channel:
    __slots__ = ("chan", "name", "waiters")

    def __init__(self, chan: object, name: str) -> None:
        self.chan = chan
        self.name = name
        self.waiters: deque[KThread] = deque()


_channels: dict[int, _Channel] = {}
#: Channels no one sleeps on any more, kept for the next sleep on a quiet channel.
_spare: list[_Channel] = []


def msleep(chan: object, m: Mutex | None, wmesg: str, timo: float = 0.0,
           pri: int = 0) -> int:
    """Sleep on ``chan``, releasing ``m`` while asleep; 0 or EWOULDBLOCK. Always a point.

    ``m`` may not be a spin mutex (``msleep_spin``). ``pri`` may carry ``PIDLE``.
    With no interlock (``tsleep``), the sleep is a
    scheduling point before the sleeper is queued: on SMP a wakeup can come in
    between and be lost, so the explorer lets it.
    """
    s = _core._current  # current_scheduler() without the call
    if s is None:
        s = current_scheduler()
    t = s.curthread
    if m is not None:
        if m.spin:
            # sys/kern/kern_synch.c, _sleep: KASSERT "spin locks can only use msleep_spin".
            raise _panic(t, "spin locks can only use msleep_spin")
        if m.owner is not t:
            raise _panic(t, f"msleep on {wmesg} without holding {m.name}")
    sleep_check(s, t, wmesg, m)
    if m is None:
        if s.point_active:
            hook = s.point_hook
            if hook is None:
                if s.curthread.critnest == 0:  # Scheduler._point in place
                    s.yield_("tsleep")
            else:
                hook("tsleep")
    return _sleep(s, t, chan, m, wmesg, timo, pri)


def msleep_spin(chan: object, m: Mutex, wmesg: str, timo: float = 0.0, pri: int = 0) -> int:
    """msleep(9) with a spin mutex as interlock; 0 or EWOULDBLOCK. Always a point."""
    s = _core._current  # current_scheduler() without the call
    if s is None:
        s = current_scheduler()
    t = s.curthread
    if not m.spin:
        raise _panic(t, f"msleep_spin on {wmesg} with sleep mutex {m.name}")
    if m.owner is not t:
        raise _panic(t, f"msleep_spin on {wmesg} without holding {m.name}")
    sleep_check(s, t, wmesg, m)
    return _sleep(s, t, chan, m, wmesg, timo, pri)


def _sleep(s: Scheduler, t: KThread, chan: object, m: Mutex | None, wmesg: str,
           timo: float, pri: int) -> int:
    key = id(chan)
    ch = _channels.get(key)
    if ch is None or ch.chan is not chan:
        if _spare:
            ch = _spare.pop()
            ch.chan = chan
            ch.name = wmesg
        else:
            ch = _Channel(chan, wmesg)
        _channels[key] = ch
    depth = 0
    # The site of the wait and of the retake: block and _retake_after_sleep would
    # each find it from here (every frame between is in gntdma.sched).
    site = site_of(_getframe(1))
    ch.waiters.append(t)
    if m is not None:
        depth = _drop_for_sleep(m, s)
    if _tr is not None:
        _tr.sleep(t, wmesg)
    try:
        s.wait_idle = (pri & PIDLE) != 0
        s.wait_site = site
        rv = s.block(ch, wmesg, timo)
    finally:
        if t in ch.waiters:
            ch.waiters.remove(t)
        if _tr is not None:
            _tr.woken(t)
        if not ch.waiters and _channels.get(key) is ch:
            del _channels[key]
            if len(_spare) < 64:
                ch.chan = None  # nothing kept alive by a spare channel
                _spare.append(ch)
    if m is not None:
        _retake_after_sleep(m, depth, site)
    return rv


def sleep_check(s: Scheduler, t: KThread, wmesg: str, interlock: object | None) -> None:
    """WITNESS_WARN of a sleep: non-sleepable locks held other than ``interlock``.

    sys/kern/kern_synch.c, _sleep: ``WITNESS_WARN(WARN_GIANTOK | WARN_SLEEPOK,
    lock, "Sleeping on \"%s\"", wmesg)``; sys/kern/subr_witness.c, witness_warn
    and witness_list_lock word it. A spin mutex held makes it a panic (a switch
    in a critical section); a sleep mutex, a report.
    """
    for h in t.held:  # usually none, or only the interlock (a mutex is its own lock)
        if h is not interlock and not h.sleepable and h.lock is not interlock:
            break
    else:
        return
    # A sleep mutex without WITNESS is not on WITNESS's list (witness_lock returns at
    # once for it); a spin mutex is a critical section whatever WITNESS knows.
    bad = [h for h in t.held if h.lock is not interlock and not h.sleepable
           and (h.witness or h.spin)]
    if not bad:
        return
    text = (f'Sleeping on "{wmesg}" with the following non-sleepable locks held:'
            + "".join("\n" + list_lock(h) for h in bad))
    if any(h.spin for h in bad):
        text += "\nmi_switch: switch in a critical section"
        s.witness.record_panic(t.name, text, caller_site())
        raise KernelPanic(text)
    s.witness.record_sleep(t.name, text, caller_site())


def list_lock(h: Held) -> str:
    """One line of WITNESS's lock list (witness_list_lock), without the address."""
    lock = h.lock
    name = getattr(lock, "name", h.cls)
    cls = "spin mutex" if h.spin else ("sx" if h.sleepable else "sleep mutex")
    mode = "shared" if h.shared else "exclusive"
    typ = f" ({h.cls})" if h.cls != name else ""
    r = getattr(lock, "recurse", 0)
    return f"{mode} {cls} {name}{typ} r = {r} locked @ {h.site}"


def tsleep(chan: object, wmesg: str, timo: float = 0.0, pri: int = 0) -> int:
    """Sleep on ``chan`` with no interlock. Always a scheduling point."""
    return msleep(chan, None, wmesg, timo, pri)


def wakeup(chan: object) -> None:
    """Wake every thread sleeping on ``chan``. A scheduling point only when preemptive."""
    s = _core._current  # current_scheduler() without the call
    if s is None:
        s = current_scheduler()
    ch = _channels.get(id(chan))
    if ch is not None and ch.chan is chan:
        waiters = ch.waiters
        for w in waiters:  # wake() leaves the deque as it is
            s.wake(w)
        waiters.clear()
    if s.point_active:
        hook = s.point_hook
        if hook is None:
            if s.curthread.critnest == 0:  # Scheduler._point in place
                s.yield_("wakeup")
        else:
            hook("wakeup")


def wakeup_one(chan: object) -> None:
    """Wake the first thread sleeping on ``chan``. A point only when preemptive."""
    s = _core._current  # current_scheduler() without the call
    if s is None:
        s = current_scheduler()
    ch = _channels.get(id(chan))
    if ch is not None and ch.chan is chan and ch.waiters:
        s.wake(ch.waiters.popleft())
    if s.point_active:
        hook = s.point_hook
        if hook is None:
            if s.curthread.critnest == 0:  # Scheduler._point in place
                s.yield_("wakeup_one")
        else:
            hook("wakeup_one")
