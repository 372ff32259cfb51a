"""taskqueue(9) and callout(9)."""

from __future__ import annotations

import errno

import pytest

from gntdma.sched import (
    KernelPanic,
    Mutex,
    Scheduler,
    ThreadState,
    mtx_lock,
    mtx_unlock,
    tsleep,
    wakeup,
)
from gntdma.sys import (
    Kernel,
    Task,
    callout,
    callout_active,
    callout_drain,
    callout_init,
    callout_init_mtx,
    callout_pending,
    callout_reset,
    callout_stop,
    taskqueue_cancel,
    taskqueue_drain,
    taskqueue_drain_all,
    taskqueue_enqueue,
)


def test_taskqueue_fifo_and_dedup(vsched: Scheduler, kern: Kernel) -> None:
    log: list[tuple[str, int]] = []
    tasks = {n: Task(lambda arg, pending: log.append((str(arg), pending)), n) for n in "abc"}
    tq = kern.taskqueue_thread
    for n in "abcab":
        assert taskqueue_enqueue(tq, tasks[n]) == 0
    assert tasks["a"].ta_pending == 2
    assert kern.statistics().taskqueue_pending == 3
    taskqueue_drain_all(tq)
    assert log == [("a", 2), ("b", 2), ("c", 1)]
    assert kern.statistics().taskqueue_pending == 0


def test_task_requeued_while_running_runs_again(vsched: Scheduler, kern: Kernel) -> None:
    runs: list[int] = []
    tq = kern.taskqueue_thread

    def fn(_arg: object, pending: int) -> None:
        runs.append(pending)
        if len(runs) == 1:
            taskqueue_enqueue(tq, t)

    t = Task(fn)
    taskqueue_enqueue(tq, t)
    taskqueue_drain_all(tq)
    assert runs == [1, 1]


def test_drain_waits_for_running_task_and_cancel(vsched: Scheduler, kern: Kernel) -> None:
    chan = object()
    state: list[str] = []

    def slow(_arg: object, _pending: int) -> None:
        state.append("start")
        tsleep(chan, "slow")
        state.append("end")

    tq = kern.taskqueue_thread
    t = Task(slow)
    other = Task(lambda a, p: state.append("other"))
    taskqueue_enqueue(tq, t)
    taskqueue_enqueue(tq, other)
    vsched.run(until=lambda: state == ["start"])
    assert taskqueue_cancel(tq, t) == (errno.EBUSY, 0)
    assert taskqueue_cancel(tq, other) == (0, 1)
    vsched.spawn(lambda: wakeup(chan))
    taskqueue_drain(tq, t)
    assert state == ["start", "end"]


def test_swi_enqueue_call(vsched: Scheduler, kern: Kernel) -> None:
    seen: list[int] = []
    kern.enqueue_swi(lambda: seen.append(1))
    kern.enqueue_swi(lambda: seen.append(2))  # plain calls are never coalesced
    taskqueue_drain_all(kern.taskqueue_swi)
    assert seen == [1, 2]


def test_callout_fires_on_a_kernel_thread(vsched: Scheduler, kern: Kernel) -> None:
    c = callout(kern)
    callout_init(c, 1)
    fired: list[tuple[object, float, str]] = []
    t0 = vsched.now()
    callout_reset(c, 5.0, lambda arg: fired.append((arg, vsched.now(), vsched.curthread.name)),
                  "x")
    assert callout_pending(c) and callout_active(c)
    assert kern.statistics().callouts_pending == 1
    vsched.run(until=lambda: bool(fired))
    assert fired[0][0] == "x" and fired[0][1] - t0 == pytest.approx(5.0)
    assert fired[0][2].endswith("softclock")
    assert not callout_pending(c) and callout_active(c)
    assert kern.statistics().callouts_pending == 0
    assert callout_stop(c) == -1


def test_callout_stop_and_reset(vsched: Scheduler, kern: Kernel) -> None:
    c = callout(kern)
    callout_init(c, 1)
    fired: list[object] = []
    callout_reset(c, 1.0, fired.append, 1)
    assert callout_reset(c, 2.0, fired.append, 2) == 1
    assert callout_stop(c) == 1
    assert not callout_active(c) and not callout_pending(c)
    callout_reset(c, 3.0, fired.append, 3)
    sentinel = callout(kern)
    callout_init(sentinel, 1)
    callout_reset(sentinel, 10.0, fired.append, "end")
    vsched.run(until=lambda: "end" in fired)
    assert fired == [3, "end"]  # nothing else fired


def test_callout_stop_under_lock_wins_against_a_fired_timer(vsched: Scheduler,
                                                            kern: Kernel) -> None:
    m = Mutex("drv")
    c = callout(kern)
    callout_init_mtx(c, m, 0)
    fired: list[object] = []
    mtx_lock(m)
    callout_reset(c, 1.0, fired.append, "no")
    # the timer fires; the softclock thread blocks on our lock
    vsched.run(until=lambda: kern.softclock.thread.state is ThreadState.BLOCKED
               and kern.softclock.thread.wchan is m)
    assert callout_stop(c) == 1
    mtx_unlock(m)
    vsched.run(until=lambda: kern.softclock.thread.state is ThreadState.BLOCKED
               and kern.softclock.thread.wmesg == "softclock")
    assert fired == []


def test_callout_mtx_handler_runs_locked(vsched: Scheduler, kern: Kernel) -> None:
    m = Mutex("drv2")
    c = callout(kern)
    callout_init_mtx(c, m, 0)
    held: list[bool] = []
    mtx_lock(m)
    callout_reset(c, 0.5, lambda _a: held.append(m.owner is vsched.curthread), None)
    mtx_unlock(m)
    with pytest.raises(KernelPanic, match="not held"):
        callout_reset(c, 0.5, lambda _a: None, None)
    vsched.run(until=lambda: bool(held))
    assert held == [True]


def test_callout_drain_waits_for_handler(vsched: Scheduler, kern: Kernel) -> None:
    c = callout(kern)
    callout_init(c, 1)
    chan = object()
    log: list[str] = []

    def handler(_a: object) -> None:
        log.append("in")
        tsleep(chan, "handler")
        log.append("out")

    callout_reset(c, 1.0, handler, None)
    vsched.run(until=lambda: log == ["in"])
    assert callout_stop(c) == 0  # running: cannot be stopped
    vsched.spawn(lambda: wakeup(chan))
    assert callout_drain(c) == 0
    assert log == ["in", "out"]
    kern.assert_no_leaks()


def test_shutdown_cancels_callouts(vsched: Scheduler, kern: Kernel) -> None:
    c = callout(kern)
    callout_init(c, 0)
    callout_reset(c, 1.0, lambda _a: None, None)
    kern.shutdown()
    assert kern.statistics().callouts_pending == 0
