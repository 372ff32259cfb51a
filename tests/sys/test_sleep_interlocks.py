"""Kernel sleeps keep FreeBSD's interlocks, so no wakeup is lost on any schedule.

A sleep without an interlock is a scheduling point before the sleeper is queued
(DESIGN 3), so the explorer can put the wakeup between the check and the sleep.
Each test explores a check-then-sleep race with DFS and random schedules and
expects no failure; the service threads' idle sleeps are ``PIDLE`` and the
hung-task watchdog must not report an idle kernel.

Sources: sys/kern/subr_taskqueue.c (taskqueue_thread_loop: TQ_SLEEP(tq, tq,
&tq->tq_mutex, 0, "-", 0); taskqueue_drain: msleep(task, &tq->tq_mutex, PWAIT,
"-", 0)); sys/kern/kern_timeout.c (softclock under cc_lock, a spin mutex;
_callout_stop_safe: the "codrain" sleep with cc_lock); sys/kern/vfs_bio.c
(biowait: msleep(bp, mtxp, PRIBIO, wchan, 0) with mtxp = mtx_pool_find(
mtxpool_sleep, bp); biodone wakes under the same mutex); sys/vm/vm_page.c
(vm_wait_doms: msleep(&vm_min_domains, &vm_domainset_lock, PVM | PDROP, "vmwait", 0)).
"""

from __future__ import annotations

import itertools

from gntdma.sched import (
    ExploreResult,
    Mutex,
    Scheduler,
    VirtualClock,
    checkpoint,
    explore,
    msleep,
    mtx_lock,
    mtx_unlock,
    strategy_stream,
    tsleep,
    wakeup,
)
from gntdma.sched import Scenario as ScenarioFn
from gntdma.sys import (
    M_NOWAIT,
    M_WAITOK,
    BytePhysMem,
    Kernel,
    Task,
    TaskQueue,
    bio,
    biodone,
    biowait,
    callout,
    callout_drain,
    callout_init,
    callout_init_mtx,
    callout_reset,
    taskqueue_drain,
    taskqueue_enqueue,
)


def _explore_all(scenario: ScenarioFn) -> list[ExploreResult]:
    """DFS (preemption bound 0, 1, 2) and random schedules; every result."""
    return [explore(scenario, strategy_stream("dfs", 0, max_preemptions=2), budget=400),
            explore(scenario, strategy_stream("random", 0), budget=150)]


def _assert_clean(scenario: ScenarioFn) -> None:
    for res in _explore_all(scenario):
        assert res.failure is None, (res.failure.kind, res.failure.report)


def _kernel(pages: int = 64) -> Kernel:
    return Kernel("guest", BytePhysMem([(0, pages)]), 1)


def enqueue_then_drain(s: Scheduler) -> list[str]:
    tq = TaskQueue("tq")
    ran: list[int] = []

    def fn(_arg: object, pending: int) -> None:
        checkpoint()  # still running when the drain looks
        ran.append(pending)

    task = Task(fn)

    def producer() -> None:
        checkpoint()  # the queue's thread may be on its way to sleep
        taskqueue_enqueue(tq, task)
        checkpoint()
        taskqueue_drain(tq, task)

    s.spawn(producer, name="producer")
    s.run()
    return [] if ran == [1] else [f"task ran {ran}"]


def test_taskqueue_thread_sleeps_with_tq_mutex_so_no_enqueue_is_lost() -> None:
    _assert_clean(enqueue_then_drain)


def test_taskqueue_drain_sleeps_with_tq_mutex() -> None:
    def drain_racing_the_end(s: Scheduler) -> list[str]:
        tq = TaskQueue("tq")
        task = Task(lambda _a, _p: checkpoint())

        def drainer() -> None:
            taskqueue_enqueue(tq, task)
            taskqueue_drain(tq, task)

        s.spawn(drainer, name="drainer")
        s.run()
        return []

    _assert_clean(drain_racing_the_end)


def _idle(s: Scheduler, seconds: int) -> None:
    def ticker() -> None:
        for _ in range(seconds):
            tsleep(ticker, "tick", 1.0)

    s.spawn(ticker, name="ticker")
    s.run()


def test_idle_taskqueue_thread_is_not_a_hung_task() -> None:
    s = Scheduler(clock=VirtualClock(), hung_timeout=60.0).install()
    try:
        TaskQueue("tq")
        _idle(s, 200)
        assert s.now() >= 200.0
    finally:
        s.shutdown()
        Scheduler.uninstall()


def test_idle_softclock_thread_is_not_a_hung_task() -> None:
    s = Scheduler(clock=VirtualClock(), hung_timeout=60.0).install()
    try:
        k = _kernel()
        _idle(s, 200)
        assert s.now() >= 200.0
        k.shutdown()
    finally:
        s.shutdown()
        Scheduler.uninstall()


def test_softclock_sleeps_with_cc_lock_so_no_fired_callout_is_lost() -> None:
    def fire_while_softclock_goes_idle(s: Scheduler) -> list[str]:
        k = _kernel()
        m = Mutex("drv")
        c = callout(k)
        callout_init_mtx(c, m, 0)
        done = [False]

        def handler(_arg: object) -> None:  # runs with m held
            done[0] = True
            wakeup(done)

        def driver() -> None:
            checkpoint()
            mtx_lock(m)
            callout_reset(c, 0.0, handler, None)
            while not done[0]:
                msleep(done, m, "wait")
            mtx_unlock(m)

        s.spawn(driver, name="driver")
        s.run()
        k.shutdown()
        return []

    _assert_clean(fire_while_softclock_goes_idle)


def test_callout_drain_sleeps_with_cc_lock() -> None:
    def drain_racing_the_handler(s: Scheduler) -> list[str]:
        k = _kernel()
        c = callout(k)
        callout_init(c, 1)

        def driver() -> None:
            callout_reset(c, 0.0, lambda _a: checkpoint(), None)
            checkpoint()
            callout_drain(c)

        s.spawn(driver, name="driver")
        s.run()
        k.shutdown()
        return []

    _assert_clean(drain_racing_the_handler)


def test_biowait_sleeps_with_the_bio_done_lock() -> None:
    def done_racing_the_wait(s: Scheduler) -> list[str]:
        bp = bio()
        got: list[int] = []
        s.spawn(lambda: got.append(biowait(bp)), name="waiter")
        s.spawn(lambda: biodone(bp), name="device")
        s.run()
        return [] if got == [0] else [f"biowait returned {got}"]

    _assert_clean(done_racing_the_wait)


def test_vm_wait_sleeps_with_the_domainset_lock() -> None:
    def free_racing_the_wait(s: Scheduler) -> list[str]:
        k = _kernel(8)
        held = list(itertools.takewhile(lambda p: p is not None,
                                        (k.vm_page_alloc(M_NOWAIT) for _ in range(100))))

        def waiter() -> None:
            pfn = k.vm_page_alloc(M_WAITOK)
            assert pfn is not None
            k.vm_page_free(pfn)

        def freer() -> None:
            checkpoint()
            p = held.pop()
            assert p is not None
            k.vm_page_free(p)

        s.spawn(waiter, name="waiter")
        s.spawn(freer, name="freer")
        s.run()
        for p in held:
            assert p is not None
            k.vm_page_free(p)
        k.shutdown()
        return []

    _assert_clean(free_racing_the_wait)
