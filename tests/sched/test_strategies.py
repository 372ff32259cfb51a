"""Exploration strategies as good as their papers and the tools that refined them.

- PCT (Burckhardt et al., ASPLOS 2010) draws its change points among the real
  choices of a run, and learns the run length k from those choices, as shuttle
  (``shuttle/src/scheduler/pct.rs``, ``PctScheduler::next_task``: the step
  counter only moves when more than one task is runnable) and Coyote do.
- A thread that yields (``checkpoint()``) is deprioritised (shuttle's PCT does
  it on ``is_yielding``; DFS makes "another thread" the default after a yield),
  so a polling loop is not a livelock.
- DFS bounds preemptions iteratively, 0, 1, 2, ... (iterative context bounding,
  Musuvathi and Qadeer, PLDI 2007), so a bug one preemption deep is found
  before the search goes two deep.
"""

from __future__ import annotations

from gntdma.sched import (
    DfsStrategy,
    PctStrategy,
    Scheduler,
    checkpoint,
    explore,
    rmb,
    run_once,
    strategy_stream,
    tsleep,
    wakeup,
)


def _increment(state: dict[str, int]) -> None:
    v = state["x"]
    rmb()  # the window of a non-atomic increment
    state["x"] = v + 1


def long_prefix_lost_update(s: Scheduler) -> list[str]:
    """One thread ticks alone for a long time (no choice at those steps), then two race."""
    state = {"x": 0, "go": 0}
    go = object()

    def ticker() -> None:
        for _ in range(300):
            tsleep(state, "tick", 0.01)  # alone: each wake is a step with one runnable thread
        state["go"] = 1
        wakeup(go)
        _increment(state)

    def waiter() -> None:
        while state["go"] == 0:
            tsleep(go, "go")
        _increment(state)

    s.spawn(ticker, name="ticker")
    s.spawn(waiter, name="waiter")
    s.run()
    return [] if state["x"] == 2 else [f"lost update: x = {state['x']}"]


def test_pct_learns_k_from_choices_not_steps() -> None:
    # A run of this scenario has hundreds of scheduler steps but only a few
    # steps with a choice; k must be the number of choices.
    p1 = PctStrategy(0)
    out = run_once(long_prefix_lost_update, p1)
    seen: list[int] = []
    p2 = PctStrategy(1, on_finish=seen.append)
    out2 = run_once(long_prefix_lost_update, p2)
    p2.finished(out2.steps)
    assert out.steps > 300
    assert seen == [p2.choices]
    assert p2.choices < out2.steps // 10


def test_pct_finds_a_bug_behind_a_long_sequential_prefix() -> None:
    found = []
    for seed in range(5):
        res = explore(long_prefix_lost_update, strategy_stream("pct", seed * 100, pct_depth=2),
                      budget=30)
        found.append(res.failure is not None)
    assert sum(found) >= 4, found


def polling_loop(s: Scheduler) -> list[str]:
    """A thread polls a flag with checkpoint(); the other sets it. No bug."""
    state = {"flag": False}

    def poller() -> None:
        while not state["flag"]:
            checkpoint()

    def setter() -> None:
        for _ in range(3):
            rmb()
        state["flag"] = True

    s.spawn(poller, name="poller")
    s.spawn(setter, name="setter")
    s.run()
    return []


def test_pct_polling_loop_is_no_livelock() -> None:
    for seed in range(20):
        out = run_once(polling_loop, PctStrategy(seed, depth=3, max_steps=50), max_steps=5000)
        assert out.kind is None, (seed, out.kind, out.report)


def test_dfs_polling_loop_is_no_livelock() -> None:
    res = explore(polling_loop, strategy_stream("dfs", 0), budget=200, max_steps=5000)
    assert res.failure is None, res.failure.report
    assert res.schedules > 5


def one_preemption_bug(s: Scheduler) -> list[str]:
    """A lost update one preemption deep, in threads with many scheduling points after it.

    With two preemptions allowed from the start, DFS (deepest choice first)
    spends hundreds of schedules on two-preemption variants of the tail.
    """
    state = {"x": 0}

    def worker() -> None:
        for _ in range(3):
            rmb()
        _increment(state)
        for _ in range(20):
            rmb()

    def other() -> None:
        for _ in range(20):
            rmb()
        _increment(state)
        for _ in range(20):
            rmb()

    s.spawn(worker, name="worker")
    s.spawn(other, name="other")
    s.run()
    return [] if state["x"] == 2 else [f"lost update: x = {state['x']}"]


def test_dfs_iterates_the_preemption_bound() -> None:
    res = explore(one_preemption_bug, strategy_stream("dfs", 0, max_preemptions=2), budget=2000)
    assert res.failure is not None
    assert res.schedules <= 60, res.schedules
    d = DfsStrategy(max_preemptions=2)
    assert d.new_execution() and d.bound == 0
