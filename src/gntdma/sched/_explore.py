"""Running a scenario under a strategy, once or for many schedules.

A scenario is a function that builds what it needs on the scheduler it is given
(threads, locks, a whole host), lets it run, tears it down, and returns the
leaks it found (an empty list when clean). One run ends in an :class:`Outcome`
whose ``kind`` is None for success, or one of ``deadlock``, ``panic``,
``reversal`` (a WITNESS lock-order reversal), ``sleep`` (WITNESS: a sleep with
a non-sleepable lock held), ``hung`` (the hung-task watchdog), ``leak``,
``livelock`` (the step limit) and ``error`` (any other exception: a bug in the
scenario or the model).

Every run gets a fresh WITNESS graph and a virtual clock, and blocking I/O runs
inline, so that the schedule alone decides what happens.
"""

from __future__ import annotations

import gc
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from gntdma.sched._core import Scheduler, Strategy, VirtualClock
from gntdma.sched._errors import Deadlock, HungTask, KernelPanic, StepLimitExceeded
from gntdma.sched._strategies import (
    DfsStrategy,
    PctStrategy,
    RandomStrategy,
    ReplayDivergence,
    Schedule,
)
from gntdma.sched._witness import Witness
from gntdma.sched._workers import WorkerPool

__all__ = [
    "STRATEGIES",
    "ExploreResult",
    "Outcome",
    "RecordingStrategy",
    "Scenario",
    "ScheduleGc",
    "explore",
    "run_once",
    "schedule_running",
    "stop_after_schedule",
    "strategy_stream",
]


class RecordingStrategy(Strategy, Protocol):
    schedule: Schedule


Scenario = Callable[[Scheduler], list[str]]


@dataclass(slots=True)
class Outcome:
    kind: str | None
    report: str
    schedule: Schedule
    steps: int

    @property
    def failed(self) -> bool:
        return self.kind is not None

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "report": self.report, "steps": self.steps,
                "schedule": self.schedule.to_json()}


#: Whether ``run_once`` is running a schedule, and what to raise once it is done.
_running = False
_stop: list[BaseException] = []


def schedule_running() -> bool:
    """Whether a schedule runs now (``run_once``, in this process)."""
    return _running


def stop_after_schedule(exc: BaseException) -> None:
    """Have the schedule in progress end as it would, then ``run_once`` raise ``exc``.

    For a signal handler (``explore``, ``replay``): raised inside the schedule, the
    exception would be a failure of it (a kernel thread ended half-way, a hub step cut
    short, a teardown panicking over them). The first one asked for is kept.
    """
    if not _stop:
        _stop.append(exc)


def run_once(scenario: Scenario, strategy: RecordingStrategy, *,
             max_steps: int = 200_000, workers: WorkerPool | None = None) -> Outcome:
    """Run ``scenario`` once under ``strategy``; classify how it ended. ``workers``:
    the greenlets of the runs before, kept for this one's threads.

    Raises what ``stop_after_schedule`` was given while it ran, once it is done."""
    global _running
    _running = True
    try:
        return _run_once(scenario, strategy, max_steps, workers)
    finally:
        _running = False
        if _stop:
            raise _stop.pop()  # the signal's, in place of the outcome or another error


def _run_once(scenario: Scenario, strategy: RecordingStrategy, max_steps: int,
              workers: WorkerPool | None) -> Outcome:
    witness = Witness()
    s = Scheduler(strategy=strategy, clock=VirtualClock(), io_mode="inline",
                  witness=witness, max_steps=max_steps, workers=workers).install()
    kind: str | None = None
    report = ""
    try:
        leaks = scenario(s)
        if leaks:
            kind, report = "leak", "\n".join(leaks)
    except Deadlock as e:
        kind, report = "deadlock", e.report.format()
    except HungTask as e:
        kind, report = "hung", e.report.format()
    except KernelPanic as e:
        kind, report = "panic", f"panic: {e}"
    except StepLimitExceeded as e:
        kind, report = "livelock", str(e)
    except ReplayDivergence:
        raise
    except Exception as e:  # a bug in the scenario or the model: report it whole
        kind, report = "error", "".join(traceback.format_exception(e)).rstrip()
    finally:
        try:
            s.shutdown()
        finally:
            Scheduler.uninstall()
    if kind is None or kind == "leak":
        revs = witness.reversals()
        if revs:
            kind, report = "reversal", "\n".join(r.format() for r in revs)
        elif kind is None and witness.panics():
            kind, report = "panic", "\n".join(r.format() for r in witness.panics())
        elif kind is None and witness.sleeps():
            kind, report = "sleep", "\n".join(r.format() for r in witness.sleeps())
    if kind in ("deadlock", "panic") and witness.reversals():
        report += "\n" + "\n".join(r.format() for r in witness.reversals())
    return Outcome(kind, report, strategy.schedule, s.steps)


@dataclass(slots=True)
class ExploreResult:
    schedules: int = 0
    seconds: float = 0.0
    failure: Outcome | None = None
    kinds: dict[str, int] = field(default_factory=dict)

    @property
    def per_second(self) -> float:
        return self.schedules / self.seconds if self.seconds > 0 else 0.0


def explore(scenario: Scenario, strategies: Iterator[RecordingStrategy], *,
            budget: int, max_steps: int = 200_000,
            stop_at_first: bool = True) -> ExploreResult:
    """Run ``scenario`` under up to ``budget`` strategies (one per schedule)."""
    res = ExploreResult()
    t0 = time.perf_counter()
    workers = WorkerPool()  # one schedule's threads' greenlets run the next one's
    gc_ = ScheduleGc()
    try:
        for strategy in strategies:
            if res.schedules >= budget:
                break
            out = run_once(scenario, strategy, max_steps=max_steps, workers=workers)
            gc_.after_schedule()
            finished = getattr(strategy, "finished", None)
            if finished is not None:
                finished(out.steps)
            res.schedules += 1
            if out.kind is not None:
                res.kinds[out.kind] = res.kinds.get(out.kind, 0) + 1
                if res.failure is None:
                    res.failure = out
                if stop_at_first:
                    break
    finally:
        gc_.close()
        workers.close()
    res.seconds = time.perf_counter() - t0
    return res


STRATEGIES = ("random", "pct", "dfs")


def strategy_stream(name: str, seed: int, *, pct_depth: int = 3, pct_steps: int = 2000,
                    max_preemptions: int = 2) -> Iterator[RecordingStrategy]:
    """One strategy per schedule: fresh seeds for random and PCT, the next DFS path."""
    if name == "random":
        i = 0
        while True:
            yield RandomStrategy(seed + i)
            i += 1
    elif name == "pct":
        # k, the number of steps change points are drawn from, is learnt from the
        # runs so far (as Coyote and shuttle do: PctStrategy.finished reports
        # the real choices of the run), starting small; pct_steps caps it.
        est = {"k": 16}

        def seen(steps: int) -> None:
            est["k"] = min(max(est["k"], steps), pct_steps)

        i = 0
        while True:
            yield PctStrategy(seed + i, pct_depth, est["k"], on_finish=seen)
            i += 1
    elif name == "dfs":
        d = DfsStrategy(seed, max_preemptions)
        # new_execution raises the preemption bound 0, 1, 2, ... as each is exhausted.
        while d.new_execution():
            yield d
    else:
        raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")


#: The young generation's threshold while schedules run (CPython's default is 700).
SCHEDULE_GC_THRESHOLD: Final = 100_000


class ScheduleGc:
    """The cyclic garbage collector paced by schedules, while an exploration runs.

    A schedule builds a host whose objects refer to one another (kernels,
    domains, threads, closures): all of it is cyclic garbage once the schedule
    ends, and none before. Collected every 700 allocations, as by default, those
    objects are walked while still alive, again in the middle generation, and
    those that reach the oldest are walked with every module there: a tenth of
    an exploration's time. Here the young generation is collected once after each
    schedule, when all of the schedule's garbage is dead; its automatic threshold
    is raised (``SCHEDULE_GC_THRESHOLD``) so that only a schedule that allocates
    far more than usual is collected during its run. The thresholds are put back
    by :meth:`close`; with the collector off (``gc.disable()``, a threshold of
    0) nothing changes. What a schedule does never depended on when the
    collector runs (by default it runs after any 700th allocation, wherever
    that falls): the scenarios' objects have no finalizers.
    """

    def __init__(self) -> None:
        self._old = gc.get_threshold()
        self._on = gc.isenabled() and self._old[0] > 0
        if self._on:
            gc.set_threshold(max(self._old[0], SCHEDULE_GC_THRESHOLD), *self._old[1:])

    def after_schedule(self) -> None:
        if self._on:
            gc.collect(1)

    def close(self) -> None:
        if self._on:
            self._on = False
            gc.set_threshold(*self._old)
