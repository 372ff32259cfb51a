"""Explorer benchmark: schedules per second, and schedules to the first failure.

Run: .venv/bin/python benchmarks/explore.py [--seeds N] [--schedules N]

The baseline measured in the same run is the plain run strategy (FIFO, no
exploration) on the same scenario: the ratio says what controlled scheduling
costs. Schedules to the first failure use FreeBSD's inline callback delivery,
where the scenario has a bug, and report the median over several seeds.
"""

from __future__ import annotations

import argparse
import statistics
import time

from gntdma.sched import FifoStrategy, Schedule, Scheduler, explore, strategy_stream
from gntdma.toolstack.scenarios import make_scenario

SCENARIO = "gnttab-shortage-blkfront"


class _FifoRecording:
    """The run strategy wrapped so the explorer can drive it (no preemption)."""

    preemptive = False

    def __init__(self) -> None:
        self.schedule = Schedule(0)
        self._fifo = FifoStrategy(0)

    def pick(self, runnable, current, point):  # type: ignore[no-untyped-def]
        return self._fifo.pick(runnable, current, point)

    def next_u64(self) -> int:
        return self._fifo.next_u64()


def rate(strategy: str, n: int) -> float:
    fn = make_scenario(SCENARIO, "taskqueue")
    if strategy == "run":
        t0 = time.perf_counter()
        for _ in range(n):
            s = Scheduler(strategy=_FifoRecording()).install()  # type: ignore[arg-type]
            try:
                fn(s)
            finally:
                s.shutdown()
                Scheduler.uninstall()
        return n / (time.perf_counter() - t0)
    res = explore(fn, strategy_stream(strategy, 1), budget=n)
    assert res.failure is None, res.failure.report
    return res.per_second


def to_failure(strategy: str, seeds: int, scenario: str) -> tuple[float, int]:
    fn = make_scenario(scenario, "inline")
    counts = []
    for seed in range(seeds):
        res = explore(fn, strategy_stream(strategy, seed * 1000), budget=2000)
        counts.append(res.schedules if res.failure is not None else 10**9)
    return statistics.median(counts), sum(1 for c in counts if c < 10**9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--schedules", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=7)
    args = ap.parse_args()
    base = rate("run", args.schedules)
    print(f"{SCENARIO}, default delivery, {args.schedules} runs each")
    print(f"  {'run (FIFO, baseline)':<24} {base:8.0f} runs/s   ratio 1.00")
    for strat in ("random", "pct", "dfs"):
        r = rate(strat, args.schedules)
        print(f"  {strat:<24} {r:8.0f} schedules/s   ratio {r / base:.2f}")
    for scenario in (SCENARIO, SCENARIO + "-recursive"):
        print(f"{scenario}, inline delivery: schedules to the first failure "
              f"(median of {args.seeds} seeds)")
        for strat in ("random", "pct", "dfs"):
            med, found = to_failure(strat, args.seeds, scenario)
            print(f"  {strat:<8} median {med:6.0f}   found with {found}/{args.seeds} seeds")


if __name__ == "__main__":
    main()
