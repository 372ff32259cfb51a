"""Exploration strategies: random, PCT, bounded-preemption DFS, replay, Hypothesis.

Theory of operation
-------------------
Under an exploration strategy every scheduling point (a lock, an unlock, a
barrier, a wakeup, a checkpoint) returns to the hub, and the strategy chooses
which runnable thread goes on; the thread that reached the point is among the
candidates, so "no preemption" is one of the choices. Every random value kernel
code asks for (``random_u64``) is a choice too.

A run is a value: the seed, the thread id chosen at each step and the random
values handed out. :class:`ReplayStrategy` takes that value and makes the same
choices; if the runnable threads at a step are not what the recording saw,
the code under test has nondeterminism the scheduler does not control, and the
replay raises :class:`ReplayDivergence` rather than running something else.

Threads are named by tid, which is their creation order: deterministic as long
as the scenario is.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, final

from gntdma.errors import GntdmaError
from gntdma.sched._core import KThread

__all__ = [
    "DfsStrategy",
    "HypothesisStrategy",
    "PctStrategy",
    "RandomStrategy",
    "ReplayDivergence",
    "ReplayStrategy",
    "Schedule",
]


class ReplayDivergence(GntdmaError):
    """A replay met a step the recording did not: uncontrolled nondeterminism."""


@dataclass(slots=True)
class Schedule:
    """What a run chose: the thread at each step and each random value."""

    seed: int = 0
    steps: list[int] = field(default_factory=list)
    randoms: list[int] = field(default_factory=list)
    #: The runnable tids at each step, to detect divergence on replay.
    runnable: list[list[int]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "steps": self.steps, "randoms": self.randoms,
                "runnable": self.runnable}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Schedule:
        seed = _json_int(d["seed"], "seed")
        if not 0 <= seed < 1 << 64:
            raise ValueError(f"seed {seed} is not from 0 to 2**64-1")
        return cls(seed, [_json_int(x, "a step") for x in _json_list(d["steps"], "steps")],
                   [_json_int(x, "a random") for x in _json_list(d.get("randoms", []),
                                                                 "randoms")],
                   [[_json_int(t, "a thread id") for t in _json_list(r, "a runnable set")]
                    for r in _json_list(d.get("runnable", []), "runnable")])


class _Recording:
    """Records every choice into a :class:`Schedule`."""

    preemptive = True

    def __init__(self, seed: int) -> None:
        self.schedule = Schedule(seed)
        self._rng = random.Random(seed)

    def _record(self, runnable: Sequence[KThread], idx: int) -> int:
        schedule = self.schedule
        schedule.steps.append(runnable[idx].tid)
        schedule.runnable.append([t.tid for t in runnable])
        return idx

    def next_u64(self) -> int:
        v = self._rng.getrandbits(64)
        self.schedule.randoms.append(v)
        return v


def _current_index(runnable: Sequence[KThread], current: KThread | None) -> int | None:
    if current is None:
        return None
    for i, t in enumerate(runnable):
        if t is current:
            return i
    return None


@final
class RandomStrategy(_Recording):
    """Uniformly random choice at every scheduling point."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        # randrange(n) for an int n > 0 is _randbelow(n) (random.py, Random.randrange):
        # the same draws in the same order, without randrange's argument checks.
        self._randbelow: Callable[[int], int] = self._rng._randbelow  # type: ignore[attr-defined]
        # _randbelow is _randbelow_with_getrandbits for random.Random: draw k bits
        # until the value is below n, k = n.bit_length(); pick does that in place.
        self._getrandbits: Callable[[int], int] | None = (
            self._rng.getrandbits
            if getattr(self._randbelow, "__func__", None)
            is getattr(random.Random, "_randbelow_with_getrandbits", None) else None)

    def pick(self, runnable: Sequence[KThread], current: KThread | None, point: str) -> int:
        n = len(runnable)
        getrandbits = self._getrandbits
        if n == 2 and getrandbits is not None:
            # The hub's most frequent choice (two threads), the draws below in
            # place: 2 bits until the value is below 2.
            idx = getrandbits(2)
            while idx >= 2:
                idx = getrandbits(2)
            a, b = runnable
            tids = [a.tid, b.tid]
            schedule = self.schedule  # _record, in place
            schedule.steps.append(tids[idx])
            schedule.runnable.append(tids)
            return idx
        if getrandbits is not None and n > 0:
            k = _BIT_LENGTH[n] if n < _NBITS else n.bit_length()
            idx = getrandbits(k)
            while idx >= n:
                idx = getrandbits(k)
        else:
            idx = self._randbelow(n) if n > 0 else self._rng.randrange(n)
        schedule = self.schedule  # _record, in place
        schedule.steps.append(runnable[idx].tid)
        schedule.runnable.append([t.tid for t in runnable])
        return idx


@final
class PctStrategy(_Recording):
    """Probabilistic concurrency testing (Burckhardt et al., ASPLOS 2010).

    Each thread gets a random priority when first seen; ``depth - 1`` change
    points are drawn in ``[1, k]``; the highest-priority runnable thread runs,
    and at a change point the running thread drops below every priority so far.
    A bug of depth d is found with probability at least 1/(n * k^(d-1)).

    Steps count only real choices (the hub asks only when more than one thread
    can run), and ``finished`` reports them so the next runs draw their change
    points among choices (k), as shuttle (``shuttle-schedulers/src/pct.rs``,
    ``PctScheduler::next_task``) and Coyote (``PrioritizationStrategy``) do.

    A yield (``checkpoint()``) is a plain choice for the first k choices, the
    run the change points are drawn from: the priorities alone decide, so the
    yielder goes on if it is the highest. Only after them does a yielding
    thread drop below every priority, so a polling loop lets the thread it
    waits for run. This is Coyote's fair PCT (``ComboStrategy``: PCT for a
    prefix, then a fair strategy), with shuttle's demotion on ``yield_now`` as
    the fair part. Demoting at every yield, as shuttle does, loses PCT's
    guarantee here: in shuttle every atomic access is a scheduling point
    (``thread::switch`` before each load and store), but here plain Python state
    changes between scheduling points, so a forced switch at a yield runs the
    other thread's whole next step (a store and its wakeup) before the yielder
    can look, and a check-then-sleep after a ``checkpoint()`` never loses its
    wakeup. The suffix's yields do not count towards k: a polling loop's spin
    must not lengthen the next run's prefix.
    """

    def __init__(self, seed: int, depth: int = 3, max_steps: int = 2000,
                 on_finish: Callable[[int], None] | None = None) -> None:
        super().__init__(seed)
        if depth < 1:
            raise ValueError("PCT depth must be at least 1")
        self.depth = depth
        self._on_finish = on_finish
        self._prio: dict[int, int] = {}
        #: The k change points are drawn from.
        self.k = max_steps
        self._changes = {self._rng.randint(1, max_steps) for _ in range(1, depth)}
        self._step = 0
        self._counted = 0
        # Demoted threads get ever lower priorities, below every initial one (>= depth).
        self._low = 0

    @property
    def choices(self) -> int:
        """The choices so far that count towards k (all but the yields after k)."""
        return self._counted

    def pick(self, runnable: Sequence[KThread], current: KThread | None, point: str) -> int:
        self._step += 1
        if len(runnable) == 2:
            return self._pick_two(runnable, current, point)
        prio = self._prio
        tids = [t.tid for t in runnable]  # made once: the priorities and the record
        for tid in tids:
            if tid not in prio:
                prio[tid] = self.depth + self._rng.randrange(1 << 30)
        fair_yield = point == "checkpoint" and self._step > self.k
        if not fair_yield:
            self._counted += 1
        if current is not None and (self._step in self._changes or fair_yield):
            prio[current.tid] = self._low
            self._low -= 1
        prios = [prio[tid] for tid in tids]
        best = prios.index(max(prios))  # the first of the highest, as max() with a key
        schedule = self.schedule  # _record, in place
        schedule.steps.append(tids[best])
        schedule.runnable.append(tids)
        return best

    def _pick_two(self, runnable: Sequence[KThread], current: KThread | None,
                  point: str) -> int:
        """``pick`` of two threads (the most frequent), the same steps without lists:
        the priorities drawn in runnable order, the first of the highest."""
        prio = self._prio
        a, b = runnable
        ta = a.tid
        tb = b.tid
        if ta not in prio:
            prio[ta] = self.depth + self._rng.randrange(1 << 30)
        if tb not in prio:
            prio[tb] = self.depth + self._rng.randrange(1 << 30)
        fair_yield = point == "checkpoint" and self._step > self.k
        if not fair_yield:
            self._counted += 1
        if current is not None and (self._step in self._changes or fair_yield):
            prio[current.tid] = self._low
            self._low -= 1
        best = 0 if prio[ta] >= prio[tb] else 1
        schedule = self.schedule  # _record, in place
        schedule.steps.append(tb if best else ta)
        schedule.runnable.append([ta, tb])
        return best

    def finished(self, steps: int) -> None:
        """The run ended after ``steps`` scheduler steps; reports its choices as k."""
        if self._on_finish is not None:
            self._on_finish(self._counted)


@final
class ReplayStrategy:
    """Makes exactly the choices of a recorded :class:`Schedule`."""

    preemptive = True

    def __init__(self, schedule: Schedule) -> None:
        self.recorded = schedule
        self.schedule = Schedule(schedule.seed)
        self._i = 0
        self._r = 0

    def pick(self, runnable: Sequence[KThread], current: KThread | None, point: str) -> int:
        i = self._i
        tids = [t.tid for t in runnable]
        if i >= len(self.recorded.steps):
            raise ReplayDivergence(f"step {i}: the recording ended, runnable {tids}")
        if i < len(self.recorded.runnable) and self.recorded.runnable[i] != tids:
            raise ReplayDivergence(
                f"step {i}: runnable threads {tids}, recorded {self.recorded.runnable[i]}")
        want = self.recorded.steps[i]
        if want not in tids:
            raise ReplayDivergence(f"step {i}: thread {want} is not runnable ({tids})")
        self._i += 1
        self.schedule.steps.append(want)
        self.schedule.runnable.append(tids)
        return tids.index(want)

    def next_u64(self) -> int:
        if self._r >= len(self.recorded.randoms):
            raise ReplayDivergence(f"random value {self._r} was not in the recording")
        v = self.recorded.randoms[self._r]
        self._r += 1
        self.schedule.randoms.append(v)
        return v


@dataclass(slots=True)
class _Choice:
    n: int
    default: int
    rank: int
    preempting: bool  # whether a rank > 0 here is a preemption


@final
class DfsStrategy(_Recording):
    """Depth-first search over schedules with at most ``max_preemptions``.

    Call :meth:`new_execution` before each run: it sets up the next schedule
    and returns False when the bounded space is exhausted. A choice is a rank:
    0 continues the current thread (or the first runnable one when the current
    thread blocked; after an explicit yield, ``checkpoint()``, the first other
    thread, the yielder coming last), rank j > 0 takes the j-th other thread.

    The preemption bound is iterated, 0, 1, 2, ... up to ``max_preemptions``
    (iterative context bounding, Musuvathi and Qadeer, PLDI 2007): every
    schedule with b preemptions is tried before any with b + 1, so a shallow
    bug is found before the search goes deep.
    """

    def __init__(self, seed: int = 0, max_preemptions: int = 2,
                 max_depth: int = 100_000) -> None:
        super().__init__(seed)
        self.max_preemptions = max_preemptions
        self.max_depth = max_depth
        self._prefix: list[int] = []
        self._trail: list[_Choice] = []
        self._started = False
        self.executions = 0
        #: The preemption bound of the current pass.
        self.bound = 0

    def new_execution(self) -> bool:
        if self._started:
            nxt = self._backtrack()
            if nxt is None:
                if self.bound >= self.max_preemptions:
                    return False
                self.bound += 1
                nxt = []
            self._prefix = nxt
        self._started = True
        self._trail = []
        self.schedule = Schedule(self.schedule.seed)
        self._rng = random.Random(self.schedule.seed)
        self.executions += 1
        return True

    def _backtrack(self) -> list[int] | None:
        used = [0]
        for c in self._trail:
            used.append(used[-1] + (1 if c.preempting and c.rank > 0 else 0))
        for i in range(min(len(self._trail), self.max_depth) - 1, -1, -1):
            c = self._trail[i]
            if c.rank + 1 >= c.n:
                continue
            if c.preempting and used[i] + 1 > self.bound:
                continue
            return [t.rank for t in self._trail[:i]] + [c.rank + 1]
        return None

    def pick(self, runnable: Sequence[KThread], current: KThread | None, point: str) -> int:
        cur = _current_index(runnable, current)
        n = len(runnable)
        step = len(self._trail)
        rank = self._prefix[step] if step < len(self._prefix) else 0
        if rank >= n:
            raise ReplayDivergence(f"DFS step {step}: rank {rank} of {n} threads")
        # The order of the choices, without building it: after a yield the others
        # in index order, then the yielder ([i for i != cur] + [cur]); otherwise
        # the default first, then the others in index order.
        if cur is not None and point == "checkpoint":
            first = 1 if cur == 0 and n > 1 else 0
            idx = cur if rank == n - 1 else (rank if rank < cur else rank + 1)
        else:
            first = cur if cur is not None else 0
            idx = first if rank == 0 else (rank - 1 if rank - 1 < first else rank)
        self._trail.append(_Choice(n, first, rank, cur is not None))
        return self._record(runnable, idx)


@final
class HypothesisStrategy(_Recording):
    """Choices drawn from Hypothesis, so a failing schedule shrinks.

    ``draw(n)`` must return an int in ``[0, n)``; with Hypothesis it is
    ``lambda n: data.draw(st.integers(0, n - 1))``. Shrinking moves choices
    towards 0, which is "continue the current thread": fewer preemptions.
    """

    def __init__(self, draw: Callable[[int], int], seed: int = 0) -> None:
        super().__init__(seed)
        self._draw = draw

    def pick(self, runnable: Sequence[KThread], current: KThread | None, point: str) -> int:
        cur = _current_index(runnable, current)
        default = cur if cur is not None else 0
        if len(runnable) == 1:
            return self._record(runnable, 0)
        rank = self._draw(len(runnable))
        others = [i for i in range(len(runnable)) if i != default]
        idx = default if rank == 0 else others[rank - 1]
        return self._record(runnable, idx)


#: ``n.bit_length()`` of the small n a random pick draws below (a lookup, not a call).
_BIT_LENGTH = tuple(n.bit_length() for n in range(64))
_NBITS = len(_BIT_LENGTH)


def _json_int(x: object, what: str) -> int:
    """An integer of a replay file (JSON numbers only: not a string, float or bool)."""
    if type(x) is not int:
        raise ValueError(f"{what} is {x!r}, not an integer")
    return x


def _json_list(x: object, what: str) -> list[Any]:
    if type(x) is not list:
        raise ValueError(f"{what} is {x!r}, not a list")
    return x
