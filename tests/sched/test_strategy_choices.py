"""The choices DFS and PCT make at one step, against their definitions.

DFS (iterative context bounding, Musuvathi and Qadeer, PLDI 2007): rank 0
continues the current thread (the first runnable one when it blocked), rank
j > 0 takes the j-th other thread in runnable order; after an explicit yield
the others come first and the yielder last. PCT (Burckhardt et al., ASPLOS
2010): the highest priority runnable thread runs, the first of them on a tie.
The picks compute these without building the lists; the lists are the
definition checked here.
"""

from __future__ import annotations

import random

from gntdma.sched import DfsStrategy, KThread, PctStrategy


def _threads(n: int) -> list[KThread]:
    return [KThread(10 + i, f"t{i}", False, None) for i in range(n)]


def test_dfs_takes_the_ranked_choice_of_its_order() -> None:
    for n in range(1, 8):
        runnable = _threads(n)
        for cur in [None, *range(n)]:
            current = None if cur is None else runnable[cur]
            for point in ("checkpoint", "switch", "mtx_lock"):
                if cur is not None and point == "checkpoint":
                    order = [i for i in range(n) if i != cur] + [cur]
                else:
                    first = 0 if cur is None else cur
                    order = [first] + [i for i in range(n) if i != first]
                for rank in range(n):
                    dfs = DfsStrategy(0)
                    dfs._prefix = [rank]
                    idx = dfs.pick(runnable, current, point)
                    assert idx == order[rank], (n, cur, point, rank)
                    choice = dfs._trail[0]
                    assert (choice.n, choice.default, choice.rank, choice.preempting) == (
                        n, order[0], rank, cur is not None)
                    assert dfs.schedule.steps == [runnable[idx].tid]
                    assert dfs.schedule.runnable == [[t.tid for t in runnable]]


def test_pct_runs_the_first_of_the_highest_priorities() -> None:
    rng = random.Random(5)
    runnable = _threads(5)
    pct = PctStrategy(3, depth=3, max_steps=50)
    for step in range(300):
        k = rng.randint(1, 5)
        now = rng.sample(runnable, k)
        current = rng.choice([None, *now])
        point = rng.choice(["checkpoint", "switch"])
        # Give two threads the same priority now and then: the first one wins.
        if step % 7 == 0 and k > 1 and all(t.tid in pct._prio for t in now):
            pct._prio[now[1].tid] = pct._prio[now[0].tid]
        idx = pct.pick(now, current, point)
        prios = [pct._prio[t.tid] for t in now]
        assert idx == max(range(k), key=lambda i: prios[i])
        assert pct.schedule.steps[-1] == now[idx].tid
        assert pct.schedule.runnable[-1] == [t.tid for t in now]


def test_random_takes_randrange_of_the_runnable_count() -> None:
    """RandomStrategy's choice is ``Random(seed).randrange(n)`` at every step
    (random.py, Random.randrange -> _randbelow_with_getrandbits), for deques
    (the hub's run queue) and lists of 1 to 70 threads, two threads most often."""
    from collections import deque

    from gntdma.sched import RandomStrategy

    threads = _threads(70)
    for seed in (0, 7, 12345):
        rng = random.Random(seed)
        sizes = random.Random(seed + 1)
        strat = RandomStrategy(seed)
        steps: list[int] = []
        seen: list[list[int]] = []
        for step in range(2000):
            n = 2 if step % 3 else sizes.randint(1, 70)
            now = threads[step % 5 : step % 5 + n] if n + step % 5 <= 70 else threads[:n]
            runnable = deque(now) if step % 2 else list(now)
            idx = strat.pick(runnable, None, "switch")
            assert idx == rng.randrange(n), (seed, step, n)
            steps.append(now[idx].tid)
            seen.append([t.tid for t in now])
        assert strat.schedule.steps == steps
        assert strat.schedule.runnable == seen


def test_pct_picks_between_two_threads_as_between_more() -> None:
    """PCT's choice between two threads (its own path) is the general one's: the
    same priorities drawn in runnable order, the same change points and demotions,
    the first of the highest (Burckhardt et al., ASPLOS 2010, PCT's scheduler)."""
    runnable = _threads(4)
    for seed in range(6):
        rng = random.Random(seed)
        two = PctStrategy(seed, depth=3, max_steps=40)
        ref = PctStrategy(seed, depth=3, max_steps=40)
        for _step in range(400):
            now = rng.sample(runnable, 2)
            current = rng.choice([None, *now])
            point = rng.choice(["checkpoint", "switch"])
            if rng.random() < 0.1 and all(t.tid in ref._prio for t in now):
                for p in (two, ref):  # a tie: the first one wins
                    p._prio[now[1].tid] = p._prio[now[0].tid]
            assert two.pick(now, current, point) == _pct_by_lists(ref, now, current, point)
            assert two._prio == ref._prio and two._low == ref._low
            assert two.choices == ref.choices
        assert two.schedule == ref.schedule


def _pct_by_lists(p: PctStrategy, runnable: list[KThread], current: KThread | None,
                  point: str) -> int:
    """PCT's step as defined, with the lists: priorities, then the first of the highest."""
    p._step += 1
    tids = [t.tid for t in runnable]
    for tid in tids:
        if tid not in p._prio:
            p._prio[tid] = p.depth + p._rng.randrange(1 << 30)
    fair_yield = point == "checkpoint" and p._step > p.k
    if not fair_yield:
        p._counted += 1
    if current is not None and (p._step in p._changes or fair_yield):
        p._prio[current.tid] = p._low
        p._low -= 1
    prios = [p._prio[tid] for tid in tids]
    best = max(range(len(tids)), key=lambda i: prios[i])
    p.schedule.steps.append(tids[best])
    p.schedule.runnable.append(tids)
    return best
