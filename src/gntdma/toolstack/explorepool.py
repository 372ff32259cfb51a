"""Running a campaign's schedules anywhere, with the result of one process.

:class:`Campaign` takes schedule results in any order and keeps the sequential
explorer's verdict: it walks the schedules in order (its frontier), accepts a
PCT result only if it was run with the ``k`` the sequential explorer would have
used there (``strategy_stream``: k learnt from every earlier schedule), and
stops at the first failure in schedule order. What it still needs is asked
back by :meth:`Campaign.take`: fresh schedules, and those whose result was run
with a ``k`` that turned out stale. Random schedules are independent and always
kept.

:func:`run_campaign` drives it on any ``concurrent.futures`` executor: a local
process pool (spawn context, never fork: greenlets and the reactor thread do
not survive a fork), or a Dask cluster's executor. A worker that dies takes its
chunk with it; every chunk in flight then is a suspect, run alone and split in
halves until the schedule that kills its process is alone; that schedule is
run once more in a process of its own that streams its decisions to a file, so
that the failure ``crash`` has its replay file like any other.
"""

from __future__ import annotations

import bisect
import json
import multiprocessing
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from gntdma.errors import ConfigError
from gntdma.toolstack.explorejobs import (
    PCT_FIRST_K,
    PCT_STEPS,
    CampaignSpec,
    ScheduleResult,
    read_recording,
    record_one,
    replay_one,
    run_chunk,
)
from gntdma.toolstack.interrupt import private_dir
from gntdma.toolstack.scenarios import BUILTIN_SCENARIOS, SCENARIOS
from gntdma.toolstack.spawnworker import spawn_context

__all__ = ["Campaign", "local_pool", "replay_in_child", "run_campaign", "run_local"]

Chunk = tuple[int, ...]


class Campaign:
    """The sequential verdict over results that arrive in any order."""

    def __init__(self, spec: CampaignSpec, indices: Iterable[int] | None = None, *,
                 keep: bool = False) -> None:
        self.spec = spec
        self.pct = spec.strategy == "pct"
        #: The schedules this campaign covers, in order (a shard's slice, or all).
        self.indices: list[int] = (sorted(set(indices)) if indices is not None
                                   else list(range(spec.budget)))
        self._pos = 0  # frontier: self.indices[self._pos] is the next to accept
        self.k: int | None = PCT_FIRST_K if self.pct else None
        self.results: dict[int, ScheduleResult] = {}
        self.failure: ScheduleResult | None = None
        self._fresh = 0  # self.indices[self._fresh:] were never handed out
        self._redo: list[int] = []
        self.inflight: set[int] = set()
        #: With ``keep``: the results accepted in schedule order, the failure last.
        self.keep = keep
        self.accepted: list[ScheduleResult] = []
        #: Schedules explored, as the sequential explorer counts them.
        self.explored = 0

    @property
    def done(self) -> bool:
        return self.failure is not None or self._pos >= len(self.indices)

    @property
    def frontier(self) -> int | None:
        return None if self._pos >= len(self.indices) else self.indices[self._pos]

    def learn(self, counted: int) -> None:
        """PCT's k after a schedule that made ``counted`` choices (strategy_stream)."""
        if self.k is not None:
            self.k = min(max(self.k, counted), PCT_STEPS)

    def offer(self, r: ScheduleResult) -> None:
        front = self.frontier
        if self.done or front is None or r.index < front:
            return
        if self.pct and (r.k is None or self.k is None or r.k < self.k):
            return  # run with a k already known to be stale
        self.results[r.index] = r

    def advance(self) -> None:
        """Accept results in schedule order as far as they go."""
        while not self.done:
            i = self.indices[self._pos]
            r = self.results.get(i)
            if r is None:
                return
            if self.pct and r.k != self.k:
                del self.results[i]
                bisect.insort(self._redo, i)
                return
            self.explored += 1
            if self.keep:
                self.accepted.append(r)
            if r.kind is not None:
                self.failure = r
                return
            del self.results[i]
            self._pos += 1
            old = self.k
            self.learn(r.counted)
            if self.k != old:
                for j in [j for j, x in self.results.items()
                          if x.k is not None and self.k is not None and x.k < self.k]:
                    del self.results[j]
                    bisect.insort(self._redo, j)

    def settle(self, chunk: Chunk) -> None:
        """A chunk is back (or lost): what it did not deliver is to run again."""
        self.inflight.difference_update(chunk)
        front = self.frontier
        for i in chunk:
            if not self.done and front is not None and i >= front and i not in self.results:
                bisect.insort(self._redo, i)

    def take(self, size: int) -> tuple[Chunk, tuple[int | None, ...]]:
        """Up to ``size`` schedules to run next, with the k to run them with."""
        front = self.frontier
        if self.done or front is None:
            return (), ()
        out: list[int] = []
        # The frontier first: nothing is accepted before it is.
        if front not in self.results and front not in self.inflight:
            out.append(front)
        while self._redo and len(out) < size:
            i = self._redo.pop(0)
            if i > front and i not in self.results and i not in self.inflight \
                    and i not in out:
                out.append(i)
        while len(out) < size and self._fresh < len(self.indices):
            i = self.indices[self._fresh]
            self._fresh += 1
            if i > front and i not in self.results and i not in self.inflight:
                out.append(i)
        out.sort()
        self.inflight.update(out)
        return tuple(out), tuple(self.k for _ in out)


def _spawn() -> multiprocessing.context.SpawnContext:
    return spawn_context()  # spawned workers that leave Ctrl-C to the command


def local_pool(jobs: int) -> Callable[[], Executor]:
    """A factory of process pools of ``jobs`` spawned workers."""
    return lambda: ProcessPoolExecutor(max_workers=jobs, mp_context=_spawn())


def _crashed(e: BaseException) -> bool:
    # A local worker that died, or a Dask worker that died running the task.
    return isinstance(e, BrokenProcessPool) or type(e).__name__ == "KilledWorker"


def _died(code: int | None) -> str:
    return (f"killed by signal {-code}" if code is not None and code < 0
            else f"exit status {code}")


def replay_in_child(scenario: str, delivery: str, schedule: dict[str, Any],
                    max_steps: int) -> tuple[str | None, dict[str, Any]]:
    """Replay a schedule in a process of its own: how that process died (None if it
    did not), and how the run ended (``kind``/``report``, or ``divergence``)."""
    factory = None if scenario in BUILTIN_SCENARIOS else SCENARIOS[scenario]
    with private_dir("gntdma-replay-") as tmp:
        path = Path(tmp) / "outcome.json"
        p = _spawn().Process(target=replay_one, daemon=True,
                             args=(factory, scenario, delivery, schedule, max_steps,
                                   str(path)))
        p.start()
        p.join()
        if p.exitcode == 0 and path.exists():
            return None, dict(json.loads(path.read_text()))
        return _died(p.exitcode), {}


def _isolate_one(spec: CampaignSpec, index: int, k: int | None,
                 workdir: Path) -> ScheduleResult:
    """Run one schedule in a process of its own; a crash if that process dies."""
    base = str(workdir / f"schedule-{index}")
    p = _spawn().Process(target=record_one, args=(spec, index, k, base), daemon=True)
    p.start()
    p.join()
    done = Path(base + ".json")
    if p.exitcode == 0 and done.exists():
        return ScheduleResult.from_json(json.loads(done.read_text()))
    how = _died(p.exitcode)
    if not Path(base + ".steps").exists():  # it died before the schedule began
        raise ConfigError(f"a worker process could not start ({how}); the "
                          "scenario must be importable by a fresh interpreter")
    sched = read_recording(Path(base + ".steps"), spec.seed + index)
    report = (f"the process running schedule {index + 1} died ({how}) after "
              f"{len(sched.steps)} scheduling decisions")
    return ScheduleResult(index, k, len(sched.steps), len(sched.steps), "crash", report,
                          sched.to_json())


def _close(ex: Executor, futures: Iterable[Future[list[ScheduleResult]]]) -> None:
    for f in futures:
        f.cancel()
    try:
        ex.shutdown(wait=True, cancel_futures=True)
    except TypeError:  # an executor without cancel_futures (Dask's)
        ex.shutdown(wait=True)


def run_campaign(campaign: Campaign, executor_factory: Callable[[], Executor], *,
                 jobs: int, chunk: int | None = None) -> float:
    """Run what ``campaign`` needs on executors from ``executor_factory``; seconds taken."""
    t0 = time.perf_counter()
    if chunk is None:
        # PCT results run ahead of the frontier are lost whenever k grows: keep
        # fewer of them in flight.
        chunk = max(1, min(4 if campaign.pct else 32, len(campaign.indices) // (jobs * 8)))
    campaign.advance()
    suspects: list[Chunk] = []
    futures: dict[Future[list[ScheduleResult]], Chunk] = {}
    alone: Future[list[ScheduleResult]] | None = None  # a suspect running by itself
    with private_dir("gntdma-explore-") as tmp:
        ex = executor_factory()
        try:
            while not campaign.done:
                if suspects or alone is not None:
                    if alone is None and not futures:
                        front = campaign.frontier or 0
                        s = tuple(i for i in suspects.pop(0)
                                  if i >= front and i not in campaign.results)
                        if len(s) == 1:
                            campaign.inflight.add(s[0])
                            campaign.offer(_isolate_one(campaign.spec, s[0], campaign.k,
                                                        Path(tmp)))
                            campaign.settle(s)
                            campaign.advance()
                        elif s:
                            campaign.inflight.update(s)
                            alone = ex.submit(run_chunk, campaign.spec, s,
                                              tuple(campaign.k for _ in s))
                            futures[alone] = s
                        continue
                else:
                    while len(futures) < 2 * jobs:
                        idx, ks = campaign.take(chunk)
                        if not idx:
                            break
                        futures[ex.submit(run_chunk, campaign.spec, idx, ks)] = idx
                if not futures:
                    raise RuntimeError("explore: the campaign has nothing to run but is "
                                       "not done")
                finished, _ = wait(futures, return_when=FIRST_COMPLETED)
                broken = False
                for f in finished:
                    c = futures.pop(f)
                    e = f.exception()
                    if e is None:
                        for r in f.result():
                            campaign.offer(r)
                    elif _crashed(e):
                        broken = broken or isinstance(e, BrokenProcessPool)
                        if f is alone:  # it crashed by itself: halve it
                            half = len(c) // 2
                            suspects[:0] = [c[:half], c[half:]]
                        else:
                            suspects.append(c)
                    else:
                        raise e
                    if f is alone:
                        alone = None
                    campaign.settle(c)
                if broken:  # every chunk in flight went down with the pool
                    for f, c in futures.items():
                        wait([f])
                        suspects.append(c)
                        campaign.settle(c)
                    futures.clear()
                    alone = None
                    suspects.sort()
                    _close(ex, ())
                    ex = executor_factory()
                campaign.advance()
        finally:
            _close(ex, futures)
    return time.perf_counter() - t0


def run_local(campaign: Campaign) -> float:
    """Run what ``campaign`` needs in this process, in order (``--jobs 1``)."""
    t0 = time.perf_counter()
    campaign.advance()
    while not campaign.done:
        idx, ks = campaign.take(1)
        for r in run_chunk(campaign.spec, idx, ks):
            campaign.offer(r)
        campaign.settle(idx)
        campaign.advance()
    return time.perf_counter() - t0
