"""Explorer benchmark: schedules per second, and schedules to the first failure.

Run: .venv/bin/python benchmarks/explore.py [--seeds N] [--schedules N]

It also reports, per strategy, the median schedules to the first failure over
seeds on small rare-interleaving scenarios defined here: a lost wakeup (a check
then a ``tsleep`` with no interlock) and an ABBA
deadlock with a periodic callout armed.

The baseline measured in the same run is the plain run strategy (FIFO, no
exploration) on the same scenario: the ratio says what controlled scheduling
costs. Schedules to the first failure use FreeBSD's inline callback delivery,
where the scenario has a bug, and report the median over several seeds.
"""

from __future__ import annotations

import argparse
import statistics
import time

from gntdma.sched import (
    MTX_NOWITNESS,
    FifoStrategy,
    Mutex,
    Schedule,
    Scheduler,
    checkpoint,
    explore,
    mtx_lock,
    mtx_unlock,
    rmb,
    strategy_stream,
    tsleep,
    wakeup,
)
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


def lost_wakeup(s: Scheduler) -> list[str]:
    """A consumer checks a flag, then sleeps with no interlock; the producer sets and wakes."""
    state = {"ready": False}
    chan = object()

    def consumer() -> None:
        for _ in range(6):
            rmb()
        if not state["ready"]:
            tsleep(chan, "ready")

    def producer() -> None:
        for _ in range(6):
            rmb()
        state["ready"] = True
        wakeup(chan)

    s.spawn(consumer, name="consumer")
    s.spawn(producer, name="producer")
    s.run()
    return []


def abba_with_callout(s: Scheduler) -> list[str]:
    """Two threads take two locks in opposite orders after some work; a callout ticks.

    WITNESS is off for these locks: the deadlock itself is what is counted.
    """
    a, b = Mutex("lock_a", MTX_NOWITNESS), Mutex("lock_b", MTX_NOWITNESS)
    tick = object()

    def softclock() -> None:
        while True:
            tsleep(tick, "softclock", 1.0)

    def worker(first: Mutex, second: Mutex) -> None:
        for _ in range(6):
            rmb()
        mtx_lock(first)
        checkpoint()
        mtx_lock(second)
        mtx_unlock(second)
        mtx_unlock(first)

    s.spawn(softclock, name="softclock", daemon=True)
    s.spawn(worker, a, b, name="one")
    s.spawn(worker, b, a, name="two")
    s.run()
    return []


SMALL = {"lost-wakeup": lost_wakeup, "abba-with-callout": abba_with_callout}


def small_to_failure(strategy: str, seeds: int, name: str) -> tuple[float, int]:
    fn = SMALL[name]
    counts = []
    for seed in range(seeds):
        res = explore(fn, strategy_stream(strategy, seed * 1000), budget=2000,
                      max_steps=20_000)
        failed = res.failure is not None and res.failure.kind == "deadlock"
        counts.append(res.schedules if failed else 10**9)
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
    for name in SMALL:
        print(f"{name}: schedules to the first failure (median of {args.seeds} seeds)")
        for strat in ("random", "pct", "dfs"):
            med, found = small_to_failure(strat, args.seeds, name)
            print(f"  {strat:<8} median {med:6.0f}   found with {found}/{args.seeds} seeds")


if __name__ == "__main__":
    main()
