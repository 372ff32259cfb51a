"""One exploration campaign cut into schedules that any process can run.

A campaign is a scenario, a strategy, a seed and a budget. Schedule ``i`` of a
random campaign is ``RandomStrategy(seed + i)``; of a PCT campaign,
``PctStrategy(seed + i, depth, k_i)``, where ``k_i`` is what the sequential
explorer has learnt from schedules ``0 .. i-1`` (``strategy_stream``). A worker
is told the ``k`` it must use; the campaign (``explorepool.Campaign``) keeps a
result only if that ``k`` was the right one, so that any number of processes,
shards or cluster workers find what one process finds.

Everything here is sent to other processes: the spec and the results are plain
picklable data, and a worker runs a chunk of schedules with :func:`run_chunk`.
A scenario registered at run time (not one of ``BUILTIN_SCENARIOS``) travels as
its factory, which must be importable by name in the worker.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gntdma.sched import (
    KThread,
    Outcome,
    PctStrategy,
    RandomStrategy,
    RecordingStrategy,
    ReplayDivergence,
    ReplayStrategy,
    Schedule,
    ScheduleGc,
    WorkerPool,
    run_once,
)
from gntdma.toolstack.scenarios import BUILTIN_SCENARIOS, SCENARIOS, ScenarioFn, make_scenario

__all__ = [
    "PCT_FIRST_K",
    "PCT_STEPS",
    "CampaignSpec",
    "ScheduleResult",
    "read_recording",
    "record_one",
    "replay_one",
    "run_chunk",
    "strategy_for",
]

#: ``strategy_stream``'s PCT learning: k starts here and is capped at PCT_STEPS.
PCT_FIRST_K = 16
PCT_STEPS = 2000


@dataclass(frozen=True, slots=True)
class CampaignSpec:
    """What decides every schedule of a campaign (not where it runs)."""

    scenario: str
    callback_delivery: str
    strategy: str
    seed: int
    budget: int
    max_steps: int = 200_000
    pct_depth: int = 3
    #: The factory of a scenario registered at run time (None: a built-in one).
    factory: Callable[[str], ScenarioFn] | None = field(default=None, compare=False)

    @classmethod
    def make(cls, scenario: str, callback_delivery: str, strategy: str, seed: int,
             budget: int, max_steps: int, pct_depth: int) -> CampaignSpec:
        factory = None if scenario in BUILTIN_SCENARIOS else SCENARIOS[scenario]
        return cls(scenario, callback_delivery, strategy, seed, budget, max_steps,
                   pct_depth, factory)

    def scenario_fn(self) -> ScenarioFn:
        if self.factory is not None:
            if self.callback_delivery not in ("taskqueue", "inline"):
                raise ValueError(f"callback delivery must be taskqueue or inline, not "
                                 f"{self.callback_delivery!r}")
            return self.factory(self.callback_delivery)
        return make_scenario(self.scenario, self.callback_delivery)

    def to_json(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "callback_delivery": self.callback_delivery,
                "strategy": self.strategy, "seed": self.seed, "budget": self.budget,
                "max_steps": self.max_steps, "pct_depth": self.pct_depth}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CampaignSpec:
        return cls.make(str(d["scenario"]), str(d["callback_delivery"]), str(d["strategy"]),
                        int(d["seed"]), int(d["budget"]), int(d["max_steps"]),
                        int(d["pct_depth"]))


@dataclass(frozen=True, slots=True)
class ScheduleResult:
    """How schedule ``index`` ended when run with PCT's ``k`` (None for random)."""

    index: int
    k: int | None
    #: What the strategy's ``finished`` reports (PCT: its real choices; the next k).
    counted: int
    steps: int
    kind: str | None = None
    report: str = ""
    schedule: dict[str, Any] | None = None

    def outcome(self) -> Outcome:
        sched = Schedule.from_json(self.schedule) if self.schedule is not None else Schedule()
        return Outcome(self.kind, self.report, sched, self.steps)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"index": self.index, "k": self.k, "counted": self.counted,
                             "steps": self.steps}
        if self.kind is not None:
            d.update(kind=self.kind, report=self.report, schedule=self.schedule)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ScheduleResult:
        k = d.get("k")
        kind = d.get("kind")
        schedule = d.get("schedule")
        return cls(int(d["index"]), None if k is None else int(k), int(d["counted"]),
                   int(d["steps"]), None if kind is None else str(kind),
                   str(d.get("report", "")), schedule if isinstance(schedule, dict) else None)


def strategy_for(spec: CampaignSpec, index: int, k: int | None,
                 on_finish: Callable[[int], None]) -> RecordingStrategy:
    """The strategy of schedule ``index``, exactly as ``strategy_stream`` makes it."""
    if spec.strategy == "random":
        return RandomStrategy(spec.seed + index)
    if spec.strategy == "pct":
        assert k is not None
        return PctStrategy(spec.seed + index, spec.pct_depth, k, on_finish=on_finish)
    raise ValueError(f"strategy {spec.strategy!r} does not cut into independent schedules")


def _run(spec: CampaignSpec, fn: ScenarioFn, index: int, k: int | None,
         wrap: Callable[[RecordingStrategy], RecordingStrategy] | None = None,
         workers: WorkerPool | None = None) -> ScheduleResult:
    counted: list[int] = []
    strat = strategy_for(spec, index, k, counted.append)
    out = run_once(fn, wrap(strat) if wrap is not None else strat, max_steps=spec.max_steps,
                   workers=workers)
    finished = getattr(strat, "finished", None)
    if finished is not None:
        finished(out.steps)
    n = counted[-1] if counted else out.steps
    if out.kind is None:
        return ScheduleResult(index, k, n, out.steps)
    return ScheduleResult(index, k, n, out.steps, out.kind, out.report,
                          out.schedule.to_json())


#: One schedule at a time in a process: schedules share process-wide state (the
#: installed scheduler, WITNESS, memo caches), so two run side by side (a Dask
#: worker with several threads, several workers in one process) would mix their
#: runs. A worker's threads take turns; the parallelism is in processes.
_ONE_AT_A_TIME = threading.Lock()


def run_chunk(spec: CampaignSpec, indices: Sequence[int],
              ks: Sequence[int | None]) -> list[ScheduleResult]:
    """Run schedules in the order given, up to and including the first that fails
    (one chunk at a time in a process)."""
    with _ONE_AT_A_TIME:
        fn = spec.scenario_fn()
        results = []
        workers = WorkerPool()  # a schedule's threads' greenlets run the next one's
        gc_ = ScheduleGc()  # the collector once after each schedule
        try:
            for index, k in zip(indices, ks, strict=True):
                r = _run(spec, fn, index, k, workers=workers)
                gc_.after_schedule()
                results.append(r)
                if r.kind is not None:
                    break
        finally:
            gc_.close()
            workers.close()
        return results


class _Tap:
    """A strategy that writes each decision to a file as it is made (unbuffered),
    so that the schedule of a run whose process dies is still known."""

    def __init__(self, inner: RecordingStrategy, fd: int) -> None:
        self._inner = inner
        self._fd = fd
        self.preemptive = inner.preemptive
        self.schedule = inner.schedule  # the inner strategy records into it

    def pick(self, runnable: Sequence[KThread], current: KThread | None, point: str) -> int:
        idx = self._inner.pick(runnable, current, point)
        ids = ",".join(str(t.tid) for t in runnable)
        os.write(self._fd, f"s {runnable[idx].tid} {ids}\n".encode())
        return idx

    def next_u64(self) -> int:
        v = self._inner.next_u64()
        os.write(self._fd, f"r {v}\n".encode())
        return v


def record_one(spec: CampaignSpec, index: int, k: int | None, base: str) -> None:
    """Run one schedule, its decisions streamed to ``base.steps``, its result to
    ``base.json``: for a schedule that kills its process."""
    fn = spec.scenario_fn()
    fd = os.open(base + ".steps", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        r = _run(spec, fn, index, k, wrap=lambda s: _Tap(s, fd))
    finally:
        os.close(fd)
    Path(base + ".json").write_text(json.dumps(r.to_json()))


def read_recording(path: Path, seed: int) -> Schedule:
    """The schedule a :class:`_Tap` wrote, up to where its process died."""
    sched = Schedule(seed)
    for line in path.read_text().splitlines():
        parts = line.split(" ")
        if parts[0] == "s" and len(parts) == 3:
            sched.steps.append(int(parts[1]))
            sched.runnable.append([int(t) for t in parts[2].split(",")])
        elif parts[0] == "r" and len(parts) == 2:
            sched.randoms.append(int(parts[1]))
    return sched


def replay_one(factory: Callable[[str], ScenarioFn] | None, scenario: str, delivery: str,
               schedule: dict[str, Any], max_steps: int, path: str) -> None:
    """Replay a schedule (in a process of its own) and write how it ended to ``path``."""
    fn = factory(delivery) if factory is not None else make_scenario(scenario, delivery)
    try:
        out = run_once(fn, ReplayStrategy(Schedule.from_json(schedule)), max_steps=max_steps)
    except ReplayDivergence as e:
        Path(path).write_text(json.dumps({"divergence": str(e)}))
        return
    Path(path).write_text(json.dumps({"kind": out.kind, "report": out.report}))
