"""Ending threads: an exception out of the scheduler loop while thread0 waits, and
``Scheduler.kill`` (a crashed domain's threads never run again)."""

from __future__ import annotations

import errno

import pytest

from gntdma.sched import (
    Condvar,
    Mutex,
    Scheduler,
    ThreadState,
    cv_wait,
    mtx_lock,
    tsleep,
    wakeup,
)


class _Boom(Exception):
    pass


def test_an_exception_out_of_the_loop_ends_thread0s_wait(sched: Scheduler) -> None:
    """A hub timer that raises (the stall watchdog) while thread0 sleeps ends thread0's
    wait: afterwards thread0 runs and can sleep again, as after a normal wakeup."""
    chan = object()

    def boom() -> None:
        raise _Boom

    sched.call_later(0.01, boom)
    with pytest.raises(_Boom):
        tsleep(chan, "wait", 5.0)
    assert sched.thread0.state is ThreadState.RUNNING
    assert tsleep(chan, "again", 0.01) == errno.EWOULDBLOCK  # no "blocks while blocked"


def test_kill_ends_a_sleeping_thread_for_good(sched: Scheduler) -> None:
    """A killed thread unwinds where it sleeps (its cleanup runs), leaves no waiter on
    the channel or the condvar, and a later wakeup does not bring it back."""
    chan = object()
    m = Mutex("m")
    cv = Condvar("cv")
    unwound: list[str] = []
    ran_after: list[str] = []

    def sleeper() -> None:
        try:
            tsleep(chan, "zzz")
            ran_after.append("sleeper")
        finally:
            unwound.append("sleeper")

    def waiter() -> None:
        mtx_lock(m)
        try:
            cv_wait(cv, m)
            ran_after.append("waiter")
        finally:
            unwound.append("waiter")

    a = sched.spawn(sleeper, name="a", daemon=True)
    b = sched.spawn(waiter, name="b", daemon=True)
    never = sched.spawn(lambda: ran_after.append("never"), name="never", daemon=True)
    sched.kill(never)  # not started yet: it never runs
    sched.yield_()
    assert a.state is ThreadState.BLOCKED and b.state is ThreadState.BLOCKED
    sched.kill(a)
    sched.kill(b)
    assert a.state is b.state is never.state is ThreadState.DONE
    assert sorted(unwound) == ["sleeper", "waiter"]
    assert not cv.waiters
    wakeup(chan)
    sched.yield_()
    assert ran_after == []
    # The waiter does not take its interlock back on the way out.
    assert m.owner is None and a.held == [] and b.held == []
