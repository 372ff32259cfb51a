"""A thread that yields or blocks takes the hub's next step itself.

Under a preemptive strategy every lock, unlock, barrier and wakeup is a
scheduling point. The thread that reaches one makes the choice the hub would
make (the same checks in the same order: events, timers, the loop's end, the
step limit, the pick) and hands over to the thread chosen, or goes on if that
is itself, instead of switching to the hub and from the hub to the next
thread. The schedules chosen, the random values and what the threads did must
be exactly those of the hub taking every step.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from types import FrameType

import greenlet
import pytest

from gntdma.sched import (
    Condvar,
    KThread,
    Mutex,
    RandomStrategy,
    Scheduler,
    ThreadState,
    VirtualClock,
    checkpoint,
    cv_signal,
    cv_timedwait,
    mtx_lock,
    mtx_unlock,
    random_u64,
    tsleep,
    wakeup,
)


def _workload(s: Scheduler, log: list[tuple[str, int]]) -> None:
    m, cv = Mutex("handoff_m"), Condvar("handoff_cv")
    box = {"n": 0}

    def producer(name: str) -> None:
        for i in range(6):
            mtx_lock(m)
            box["n"] += 1
            log.append((name, box["n"]))
            cv_signal(cv)
            mtx_unlock(m)
            if i % 2 == 0:
                checkpoint()
            else:
                tsleep(box, "nap", 0.001)  # a timer

    def consumer() -> None:
        mtx_lock(m)
        while box["n"] < 12:
            rv = cv_timedwait(cv, m, 0.002)
            log.append(("consumer", rv))
        mtx_unlock(m)
        log.append(("random", random_u64() & 0xFF))
        wakeup(box)

    def ends_early() -> None:
        mtx_lock(m)
        mtx_unlock(m)  # a thread that ends while the others hand over

    s.spawn(producer, "p1", name="p1")
    s.spawn(producer, "p2", name="p2")
    s.spawn(consumer, name="consumer")
    s.spawn(ends_early, name="early")
    s.run()


def _run(seed: int) -> tuple[list[int], list[list[int]], list[int], list[tuple[str, int]], int]:
    strategy = RandomStrategy(seed)
    s = Scheduler(strategy=strategy, clock=VirtualClock()).install()
    log: list[tuple[str, int]] = []
    try:
        _workload(s, log)
    finally:
        s.shutdown()
        Scheduler.uninstall()
    sch = strategy.schedule
    return sch.steps, sch.runnable, sch.randoms, log, s.steps


@pytest.mark.parametrize("seed", range(30))
def test_threads_hand_over_without_the_hub_and_choose_as_it_would(
        monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    handed = _run(seed)
    monkeypatch.setattr(Scheduler, "_step", lambda self: None)  # the hub takes every step
    assert handed == _run(seed)
    assert len(handed[0]) > 50  # real choices were made


def test_a_yield_that_keeps_its_thread_does_not_switch() -> None:
    """Switches into the hub greenlet: only when a thread ends or nothing is runnable."""
    s = Scheduler(strategy=RandomStrategy(3), clock=VirtualClock()).install()
    m = Mutex("handoff_count")
    switches: list[int] = [0, 0]  # into the hub, all

    def body() -> None:
        for _ in range(200):
            mtx_lock(m)
            mtx_unlock(m)

    def trace(event: str, args: tuple[greenlet.greenlet, greenlet.greenlet]) -> None:
        if event == "switch":
            switches[1] += 1
            if args[1] is hub:
                switches[0] += 1

    hub = greenlet.getcurrent()
    for _ in range(3):
        s.spawn(body)
    old: Callable[..., object] | None = greenlet.settrace(trace)
    try:
        s.run()
    finally:
        greenlet.settrace(old)
        s.shutdown()
        Scheduler.uninstall()
    assert s.steps > 1000
    assert switches[0] <= 6  # each thread's end (and its start from the hub)
    assert switches[1] < s.steps  # a thread that keeps running does not switch at all


def test_a_thread_that_blocks_keeps_no_thread_it_handed_over_to(sched: Scheduler) -> None:
    """An idle daemon hands over to a worker as it blocks; the worker ends while the
    daemon sleeps on: nothing of the daemon's keeps the worker alive."""
    chan = object()

    def daemon() -> None:
        while True:
            tsleep(chan, "idle")

    def worker() -> None:
        pass

    sched.spawn(daemon, name="handoff-daemon", daemon=True)
    sched.spawn(worker, name="handoff-worker")
    sched.run()
    gc.collect()
    names = [o.name for o in gc.get_objects() if isinstance(o, KThread)]
    assert "handoff-daemon" in names and "handoff-worker" not in names


@pytest.mark.parametrize("strategy", ["run", "random"])
def test_a_thousand_new_threads_started_by_handovers_do_not_nest(strategy: str) -> None:
    """A thread chosen by another thread's step but never started yet is started by
    the hub: a greenlet starts at the Python depth of whoever first switches to it,
    so new threads starting each other nested one depth each (RecursionError with
    200 threads that yield once under the run strategy, as `gntdma run --threads 64`
    makes)."""
    s = Scheduler(strategy=RandomStrategy(3) if strategy == "random" else None,
                  clock=VirtualClock()).install()
    try:
        depths: list[int] = []

        def child() -> None:
            f: FrameType | None = sys._getframe()
            n = 0
            while f is not None:
                n, f = n + 1, f.f_back
            depths.append(n)
            checkpoint()

        def main() -> None:
            ts = [s.spawn(child) for _ in range(1000)]
            while any(t.state is not ThreadState.DONE for t in ts):
                checkpoint()

        s.spawn(main, name="main")
        s.run()
        assert len(depths) == 1000
        assert max(depths) - min(depths) <= 2
    finally:
        s.shutdown()
        Scheduler.uninstall()
