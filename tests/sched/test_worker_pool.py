"""Kernel threads on greenlets kept from the schedules before (sched/_workers),
and the collector paced by schedules (``ScheduleGc``).

An explorer run reuses the greenlets of a schedule's threads for the next
schedule's threads. A run must not tell the difference: the same decisions,
the same outcomes and reports, nothing of a thread left for the next, a thread
killed by another thread and a thread killed before it started handled as with
a greenlet of their own, and nothing left once the exploration ends.
"""

from __future__ import annotations

import gc

import greenlet

from gntdma.sched import (
    Mutex,
    RandomStrategy,
    Scenario,
    Scheduler,
    ThreadState,
    VirtualClock,
    WorkerPool,
    checkpoint,
    curthread,
    explore,
    mtx_lock,
    mtx_unlock,
    run_once,
    strategy_stream,
    tsleep,
)
from gntdma.sched._explore import SCHEDULE_GC_THRESHOLD
from gntdma.sched._workers import POOL_MAX
from gntdma.toolstack.scenarios import make_scenario


def _greenlets() -> int:
    gc.collect()
    main = greenlet.getcurrent()
    return sum(1 for o in gc.get_objects() if isinstance(o, greenlet.greenlet) and o is not main)


def _racy(s: Scheduler) -> list[str]:
    """Threads that lock, yield, sleep, kill one another and end with an error."""
    m = Mutex("racy")
    seen: list[str] = []

    def worker(n: int) -> None:
        for _ in range(3):
            mtx_lock(m)
            seen.append(f"{n}:{curthread().name}")
            checkpoint()
            mtx_unlock(m)

    def sleeper() -> None:
        tsleep(sleeper, "idle", 0.0)

    def killer(t: object) -> None:
        checkpoint()
        s.kill(t)  # type: ignore[arg-type]

    for n in range(3):
        s.spawn(worker, n, name=f"w{n}")
    late = s.spawn(sleeper, name="late", daemon=True)
    s.spawn(killer, late, name="killer")
    never = s.spawn(sleeper, name="never", daemon=True)
    s.kill(never)  # killed before it started
    s.run()
    return [] if len(seen) == 9 else [f"seen {seen}"]


def _failing(s: Scheduler) -> list[str]:
    def boom() -> None:
        checkpoint()
        raise RuntimeError("boom")

    s.spawn(boom, name="boom")
    s.spawn(checkpoint, name="other")
    s.run()
    return []


def test_a_schedule_on_kept_greenlets_is_the_schedule_on_new_ones() -> None:
    pool = WorkerPool()
    try:
        for scenario in (_racy, _failing):
            for seed in range(40):
                a = run_once(scenario, RandomStrategy(seed))
                b = run_once(scenario, RandomStrategy(seed), workers=pool)
                assert (a.kind, a.report, a.steps) == (b.kind, b.report, b.steps)
                assert a.schedule.to_json() == b.schedule.to_json()
        assert 0 < len(pool.workers) <= POOL_MAX
    finally:
        pool.close()


def test_an_explored_scenario_leaves_no_greenlet() -> None:
    before = _greenlets()
    fn = make_scenario("gnttab-shortage-blkfront", "taskqueue")
    res = explore(fn, strategy_stream("random", 3), budget=5)
    assert res.schedules == 5 and res.failure is None
    assert _greenlets() == before


def test_a_kept_greenlet_carries_nothing_of_its_last_thread() -> None:
    pool = WorkerPool()
    s = Scheduler(strategy=RandomStrategy(0), clock=VirtualClock(), workers=pool).install()
    try:
        frames: list[object] = []

        def first() -> None:
            frames.append(greenlet.getcurrent())

        t = s.spawn(first, name="first")
        s.run()
        assert t._glet is None and pool.workers == frames  # kept, the thread let go
        w = pool.workers[0]
        assert w.body is None and w.gr_frame is not None
        assert w.gr_frame.f_locals.get("body") is None  # no frame of the thread

        def second() -> None:
            frames.append(greenlet.getcurrent())

        s.spawn(second, name="second")
        s.run()
        assert frames[1] is frames[0]  # the same greenlet ran the second thread
    finally:
        s.shutdown()
        Scheduler.uninstall()
        pool.close()
    assert pool.workers == []


def test_a_thread_that_killed_another_does_not_keep_its_greenlet() -> None:
    pool = WorkerPool()
    s = Scheduler(strategy=RandomStrategy(0), clock=VirtualClock(), workers=pool).install()
    try:
        def sleeper() -> None:
            tsleep(sleeper, "idle", 0.0)

        victim = s.spawn(sleeper, name="victim", daemon=True)
        ran: list[object] = []

        def killer() -> None:
            ran.append(greenlet.getcurrent())
            while victim.state is not ThreadState.BLOCKED:  # started, asleep
                checkpoint()
            s.kill(victim)

        s.spawn(killer, name="killer")
        s.run()
        assert ran[0].dead  # ended as a greenlet of its own: it was a parent
        assert ran[0] not in pool.workers
        assert victim._glet is None
    finally:
        s.shutdown()
        Scheduler.uninstall()
        pool.close()


def _thresholds_seen(seen: list[tuple[int, int, int]]) -> Scenario:
    def scenario(s: Scheduler) -> list[str]:
        seen.append(gc.get_threshold())
        s.spawn(checkpoint, name="t")
        s.run()
        return []
    return scenario


def test_the_collector_runs_once_a_schedule_and_its_thresholds_are_put_back() -> None:
    before = gc.get_threshold()
    seen: list[tuple[int, int, int]] = []
    collections: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info["generation"] == 1:
            collections.append(1)

    gc.callbacks.append(count)
    try:
        res = explore(_thresholds_seen(seen), strategy_stream("random", 0), budget=7)
    finally:
        gc.callbacks.remove(count)
    assert res.schedules == 7
    assert seen == [(SCHEDULE_GC_THRESHOLD, *before[1:])] * 7
    assert len(collections) >= 7  # one after each schedule at least
    assert gc.get_threshold() == before
    gc.disable()
    try:
        seen.clear()
        explore(_thresholds_seen(seen), strategy_stream("random", 0), budget=2)
        assert seen == [before] * 2 and not gc.isenabled()
    finally:
        gc.enable()


def test_a_kept_greenlet_runs_each_thread_in_an_empty_context() -> None:
    """A new greenlet starts in an empty ``contextvars`` context (greenlet's
    ``gr_context`` None): a thread run on a kept greenlet does too, so a context
    variable set by a thread of one schedule, or by a thread that ended, is not seen
    by the next one, and a schedule explored finds what its replay finds."""
    import contextvars

    from gntdma.sched import KernelPanic, ReplayStrategy, Schedule

    flag: contextvars.ContextVar[bool] = contextvars.ContextVar("flag", default=False)

    def scenario(s: Scheduler) -> list[str]:
        seen: list[str] = []

        def t(name: str) -> None:
            if flag.get():
                raise KernelPanic(f"{name} saw a value its context never set")
            flag.set(True)
            seen.append(name)

        s.spawn(t, "a", name="a")
        s.run()
        s.spawn(t, "b", name="b")  # after a ended: a's greenlet, kept, runs b
        s.run()
        return []

    res = explore(scenario, iter([RandomStrategy(1), RandomStrategy(2), RandomStrategy(3)]),
                  budget=3)
    assert res.failure is None, res.failure.report if res.failure else ""
    assert res.schedules == 3
    out = run_once(scenario, RandomStrategy(4), workers=WorkerPool())
    assert out.kind is None
    sched = Schedule.from_json(out.schedule.to_json())
    assert run_once(scenario, ReplayStrategy(sched)).kind is None
