"""Exploration strategies as good as their papers and the tools that refined them.

- PCT (Burckhardt et al., ASPLOS 2010) draws its change points among the real
  choices of a run, and learns the run length k from those choices, as shuttle
  (``shuttle/src/scheduler/pct.rs``, ``PctScheduler::next_task``: the step
  counter only moves when more than one task is runnable) and Coyote do.
- A thread that yields (``checkpoint()``) is deprioritised once PCT's k choices
  are spent (Coyote's fair PCT, ``ComboStrategy``: PCT for a prefix, then a fair
  strategy; shuttle's demotion on ``is_yielding`` is the fair part; DFS makes
  "another thread" the default after a yield), so a polling loop is not a
  livelock. Within the k choices a yield is a plain choice, so PCT keeps its
  guarantee for a bug just after a yield (a check-then-tsleep after a
  ``checkpoint()``).
- DFS bounds preemptions iteratively, 0, 1, 2, ... (iterative context bounding,
  Musuvathi and Qadeer, PLDI 2007), so a bug one preemption deep is found
  before the search goes two deep.
"""

from __future__ import annotations

import pytest

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


def checkpoint_then_check_then_tsleep(s: Scheduler) -> list[str]:
    """A consumer yields once (some work first), then checks a flag and sleeps with no
    interlock; the producer sets the flag and wakes it (no scheduling point in between).

    The lost wakeup needs the consumer to go on past its yield while the producer
    can run: a forced demotion at every yield made that unreachable, because the
    producer's store and wakeup run in one step.
    """
    state = {"ready": False}
    chan = object()

    def consumer() -> None:
        checkpoint()
        if not state["ready"]:
            tsleep(chan, "ready")

    def producer() -> None:
        state["ready"] = True
        wakeup(chan)

    s.spawn(consumer, name="consumer")
    s.spawn(producer, name="producer", daemon=True)
    s.run()
    return []


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_pct_finds_a_lost_wakeup_after_a_checkpoint(depth: int) -> None:
    # PCT's guarantee (Burckhardt et al., ASPLOS 2010, Theorem 9): a bug of depth d
    # is found with probability >= 1/(n k^(d-1)) per schedule. Here n = 2 and the
    # learnt k is 16 (the run has about 4 choices), so depth 2 gives 1/32 per
    # schedule: 400 schedules miss it with probability < 1e-5.
    for seed in (0, 1000, 2000, 3000, 4000):
        res = explore(checkpoint_then_check_then_tsleep,
                      strategy_stream("pct", seed, pct_depth=depth), budget=400)
        assert res.failure is not None, (depth, seed, res.schedules)
        assert res.failure.kind == "deadlock", res.failure.report
        assert "consumer" in res.failure.report


def test_pct_found_rate_meets_its_bound_at_depth_2() -> None:
    # The depth-2 lost wakeup above: the consumer must run first (1/n) and the one
    # change point must fall on its tsleep window (1/k). With k = 8 fixed and n = 2
    # the bound is 1/16 per schedule; the measured rate over 1600 seeds must not be
    # below it by more than three standard deviations.
    k, n, runs = 8, 2, 1600
    found = 0
    for seed in range(runs):
        p = PctStrategy(seed, depth=2, max_steps=k)
        out = run_once(checkpoint_then_check_then_tsleep, p)
        assert p.choices <= k, p.choices  # the theorem needs k >= the run's choices
        found += out.kind == "deadlock"
    bound = 1 / (n * k)
    sigma = (runs * bound * (1 - bound)) ** 0.5
    assert found >= runs * bound - 3 * sigma, (found, runs * bound)
