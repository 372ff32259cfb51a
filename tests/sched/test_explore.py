"""Exploration strategies find planted bugs; runs replay exactly; nondeterminism is flagged."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gntdma.sched import (
    MTX_NOWITNESS,
    DfsStrategy,
    HypothesisStrategy,
    Mutex,
    PctStrategy,
    RandomStrategy,
    ReplayDivergence,
    ReplayStrategy,
    Schedule,
    Scheduler,
    checkpoint,
    explore,
    mtx_lock,
    mtx_unlock,
    rmb,
    run_once,
    strategy_stream,
    tsleep,
    wakeup,
)


def two_lock_deadlock(s: Scheduler) -> list[str]:
    a, b = Mutex("a", MTX_NOWITNESS), Mutex("b", MTX_NOWITNESS)

    def one() -> None:
        mtx_lock(a)
        mtx_lock(b)
        mtx_unlock(b)
        mtx_unlock(a)

    def two() -> None:
        mtx_lock(b)
        mtx_lock(a)
        mtx_unlock(a)
        mtx_unlock(b)

    s.spawn(one, name="one")
    s.spawn(two, name="two")
    s.run()
    return []


def lost_wakeup(s: Scheduler) -> list[str]:
    state = {"ready": False}
    chan = object()

    def consumer() -> None:
        seen = state["ready"]
        rmb()  # the window: the producer may run here
        if not seen:
            tsleep(chan, "ready")

    def producer() -> None:
        checkpoint()
        state["ready"] = True
        wakeup(chan)

    s.spawn(consumer, name="consumer")
    s.spawn(producer, name="producer")
    s.run()
    return []


def test_fifo_run_misses_both_bugs() -> None:
    for scen in (two_lock_deadlock, lost_wakeup):
        s = Scheduler().install()
        try:
            assert scen(s) == []
        finally:
            s.shutdown()
            Scheduler.uninstall()


@pytest.mark.parametrize("scenario", [two_lock_deadlock, lost_wakeup])
@pytest.mark.parametrize("strategy", ["random", "pct", "dfs"])
def test_each_strategy_finds_the_planted_bug(strategy: str, scenario: object) -> None:
    res = explore(scenario, strategy_stream(strategy, seed=1), budget=500)  # type: ignore[arg-type]
    assert res.failure is not None, f"{strategy} found nothing in {res.schedules} schedules"
    assert res.failure.kind == "deadlock"
    # The recorded schedule replays to the same failure.
    again = run_once(scenario, ReplayStrategy(res.failure.schedule))  # type: ignore[arg-type]
    assert again.kind == "deadlock"
    assert again.report == res.failure.report
    assert again.schedule.steps == res.failure.schedule.steps


def test_deadlock_report_names_the_cycle() -> None:
    res = explore(two_lock_deadlock, strategy_stream("dfs", 0), budget=100)
    assert res.failure is not None
    text = res.failure.report
    assert "wait-for cycle" in text and "one" in text and "two" in text
    assert 'Mutex "a"' in text and 'Mutex "b"' in text


def test_same_seed_same_schedule() -> None:
    a = run_once(lost_wakeup, RandomStrategy(42))
    b = run_once(lost_wakeup, RandomStrategy(42))
    assert a.schedule.steps == b.schedule.steps and a.kind == b.kind and a.steps == b.steps
    p1 = run_once(two_lock_deadlock, PctStrategy(7))
    p2 = run_once(two_lock_deadlock, PctStrategy(7))
    assert p1.schedule.to_json() == p2.schedule.to_json()


def test_schedule_round_trips_through_json() -> None:
    out = run_once(lost_wakeup, RandomStrategy(3))
    again = Schedule.from_json(out.schedule.to_json())
    assert again == out.schedule


def test_uncontrolled_nondeterminism_is_flagged() -> None:
    runs = {"n": 0}

    def leaky(s: Scheduler) -> list[str]:
        runs["n"] += 1  # state that survives between runs: not under the scheduler's control
        for i in range(1 + runs["n"]):
            s.spawn(checkpoint, name=f"t{i}")
        s.run()
        return []

    first = run_once(leaky, RandomStrategy(0))
    assert first.kind is None
    with pytest.raises(ReplayDivergence):
        run_once(leaky, ReplayStrategy(first.schedule))


def test_dfs_exhausts_a_small_space() -> None:
    def tiny(s: Scheduler) -> list[str]:
        s.spawn(checkpoint)
        s.spawn(checkpoint)
        s.run()
        return []

    d = DfsStrategy(max_preemptions=2)
    n = 0
    while d.new_execution():
        assert run_once(tiny, d).kind is None
        n += 1
        assert n < 100
    assert n >= 2


def test_hypothesis_shrinks_a_failing_schedule() -> None:
    found: list[int] = []

    @settings(max_examples=300, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def prop(data: st.DataObject) -> None:
        strat = HypothesisStrategy(lambda n: data.draw(st.integers(0, n - 1)))
        out = run_once(two_lock_deadlock, strat)
        if out.kind is not None:
            found.append(len(strat.schedule.steps))
        assert out.kind is None

    with pytest.raises(AssertionError):
        prop()
    assert found  # the failing schedule was found (and replayed while shrinking)


def test_msleep_interlock_never_loses_a_wakeup() -> None:
    """The sleeper is queued before the interlock drops: no schedule loses the wakeup."""

    def scenario(s: Scheduler) -> list[str]:
        from gntdma.sched import msleep

        m = Mutex("inter")
        state = {"flag": False}

        def sleeper() -> None:
            mtx_lock(m)
            while not state["flag"]:
                msleep(state, m, "flag")
            mtx_unlock(m)

        def waker() -> None:
            mtx_lock(m)
            state["flag"] = True
            wakeup(state)
            mtx_unlock(m)

        s.spawn(sleeper)
        s.spawn(waker)
        s.run()
        return []

    res = explore(scenario, strategy_stream("dfs", 0, max_preemptions=3), budget=5000)
    assert res.failure is None, res.failure.report
    assert res.schedules > 10
