"""Where a blocked thread waits: the line of its own call, whichever primitive blocks.

FreeBSD keeps where a thread went to sleep for the debugger and the deadlock
reports (``td_wmesg`` and the lock's ``lo_file``/``lo_line``, sys/kern/kern_synch.c
``_sleep``, sys/kern/kern_mutex.c ``__mtx_lock_sleep``). Here ``KThread.wait_site``
is the ``file:line`` of the first frame outside ``gntdma.sched``: a contended
``mtx_lock`` and a sleep hand the site they found to ``block`` rather than
``block`` walking the frames again, and the text must stay the caller's line.
"""

from __future__ import annotations

from gntdma.sched import (
    MTX_SPIN,
    Condvar,
    KThread,
    Mutex,
    Scheduler,
    ThreadState,
    cv_timedwait,
    cv_wait,
    msleep,
    msleep_spin,
    mtx_lock,
    mtx_unlock,
    tsleep,
    wakeup,
)


def _line(marker: str) -> int:
    with open(__file__) as f:
        for n, line in enumerate(f, 1):
            if marker in line and "_line(" not in line:
                return n
    raise AssertionError(marker)


def _blocked(sched: Scheduler, threads: list[KThread]) -> None:
    sched.run(until=lambda: all(t.state is ThreadState.BLOCKED for t in threads))


def test_a_blocked_thread_waits_at_the_line_of_its_own_call(sched: Scheduler) -> None:
    m, m2, sp = Mutex("ws_m"), Mutex("ws_m2"), Mutex("ws_spin", MTX_SPIN)
    cv, cv2 = Condvar("ws_cv"), Condvar("ws_cv2")
    chan = object()

    def holder() -> None:
        mtx_lock(m)
        tsleep(chan, "ws_tsleep")  # TSLEEP-SITE
        mtx_unlock(m)

    def contender() -> None:
        mtx_lock(m)  # MTX-SITE
        mtx_unlock(m)

    def sleeper() -> None:
        mtx_lock(m2)
        msleep(chan, m2, "ws_msleep")  # MSLEEP-SITE
        mtx_unlock(m2)

    def cv_waiter() -> None:
        mtx_lock(m2)
        cv_wait(cv, m2)  # CV-SITE
        mtx_unlock(m2)

    def cv_timed() -> None:
        mtx_lock(m2)
        cv_timedwait(cv2, m2, 60.0)  # CVTIMED-SITE
        mtx_unlock(m2)

    def spinner() -> None:
        mtx_lock(sp)
        msleep_spin(chan, sp, "ws_spin")  # SPIN-SITE
        mtx_unlock(sp)

    fns = [holder, contender, sleeper, cv_waiter, cv_timed, spinner]
    markers = ["TSLEEP", "MTX", "MSLEEP", "CV", "CVTIMED", "SPIN"]
    threads = [sched.spawn(fn, name=fn.__name__) for fn in fns]
    _blocked(sched, threads)
    for t, marker in zip(threads, markers, strict=True):
        assert t.wait_site == f"{__file__}:{_line(f'# {marker}-SITE')}", t.name
    wakeup(chan)
    _blocked(sched, threads[3:5])  # the condvar waiters sleep on
    for t in threads[3:5]:
        sched.wake(t)
    sched.run()
    assert all(t.state is ThreadState.DONE and t.exc is None for t in threads)


def test_a_wait_after_a_lock_wait_finds_its_own_line(sched: Scheduler) -> None:
    """The site a contended lock hands to block serves that wait only."""
    m = Mutex("ws_direct")
    chan, chan2 = object(), object()

    def holder() -> None:
        mtx_lock(m)
        tsleep(chan, "ws_hold")
        mtx_unlock(m)

    def waiter() -> None:
        mtx_lock(m)  # FIRST-WAIT-SITE
        mtx_unlock(m)
        sched.block(chan2, "ws_direct")  # DIRECT-SITE

    h, w = sched.spawn(holder), sched.spawn(waiter)
    _blocked(sched, [h, w])
    assert w.wait_site == f"{__file__}:{_line('# FIRST-WAIT-SITE')}"
    wakeup(chan)
    sched.run(until=lambda: w.wchan is chan2)
    assert w.wait_site == f"{__file__}:{_line('# DIRECT-SITE')}"
    sched.wake(w)
    sched.run()
    assert w.state is ThreadState.DONE and w.exc is None
