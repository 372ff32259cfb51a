"""Explorer benchmark: schedules per second, and schedules to the first failure.

Run: .venv/bin/python benchmarks/explore.py [--seeds N] [--schedules N]

The baseline measured in the same run is the plain run strategy (FIFO, no
exploration) on the same scenario: the ratio says what controlled scheduling
costs. Schedules to the first failure of that scenario use FreeBSD's inline callback
delivery, where it has a bug, and report the median over several seeds.

It also reports, per strategy, the median schedules to the first failure over
seeds on the scenarios of issue 10 item 5 as ``gntdma explore`` runs them (the
registered ``lost-wakeup``, ``sleep-with-mutex``, ``abba-callout`` and
``spin-barrier`` of ``gntdma.toolstack.scenarios_rules``, default callback
delivery): the count is to the scenario's own bug (the kind
``gntdma explore`` reports for it); the first failure of another kind, if
sooner, is shown too. Seeds are
0, 1000, 2000, ... so that the schedules of two seeds do not overlap (DFS
enumerates the same schedules whatever the seed).
``--rules-only`` prints that table alone.
"""

from __future__ import annotations

import argparse
import statistics
import time

from gntdma.sched import (
    FifoStrategy,
    Schedule,
    Scheduler,
    explore,
    run_once,
    strategy_stream,
)
from gntdma.toolstack.scenarios import make_scenario
from gntdma.toolstack.scenarios_rules import RULE_SCENARIOS

SCENARIO = "gnttab-shortage-blkfront"
STRATS = ("random", "pct", "dfs")


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


#: The scenarios of issue 10 item 5, as registered for ``gntdma explore``, and the
#: kind of failure each one's bug is (tests/toolstack/test_explore_rules.py).
RULES: dict[str, str] = {
    "lost-wakeup": "deadlock",
    "sleep-with-mutex": "sleep",
    "abba-callout": "deadlock",
    "spin-barrier": "panic",
}
assert set(RULES) == set(RULE_SCENARIOS)


def rules_to_failure(strategy: str, seeds: int, name: str,
                     budget: int) -> tuple[float, float, int]:
    """Median schedules to the scenario's own bug, and to any failure, over seeds.

    Unlike ``explore`` it goes on past a failure of another kind (abba-callout's
    runs that do not deadlock end in WITNESS's lock order reversal), so that the
    rare interleaving itself is measured. A seed that does not find the bug in
    ``budget`` schedules counts as ``budget + 1``. Returns the two medians and
    the seeds that found the bug.
    """
    fn = make_scenario(name, "taskqueue")
    own: list[int] = []
    first: list[int] = []
    for seed in range(seeds):
        hit = anyk = budget + 1
        for i, strat in enumerate(strategy_stream(strategy, seed * 1000), start=1):
            if i > budget:
                break
            out = run_once(fn, strat, max_steps=20_000)
            finished = getattr(strat, "finished", None)
            if finished is not None:
                finished(out.steps)
            if out.kind is not None:
                anyk = min(anyk, i)
            if out.kind == RULES[name]:
                hit = i
                break
        own.append(hit)
        first.append(anyk)
    return (statistics.median(own), statistics.median(first),
            sum(1 for c in own if c <= budget))


def rules_table(seeds: int, budget: int) -> None:
    print(f"issue 10 item 5 scenarios: median schedules to the scenario's bug over "
          f"{seeds} seeds, budget {budget}")
    print("  [seeds that found it]; (any: ...) when a failure of another kind came first")
    print(f"  {'scenario':<18} {'bug':<9}" + "".join(f"{s:>22}" for s in STRATS))
    for name, kind in RULES.items():
        cells = []
        for strat in STRATS:
            med, anym, found = rules_to_failure(strat, seeds, name, budget)
            m = f"{med:.0f}" if med <= budget else f">{budget}"
            extra = f" (any: {anym:.0f})" if anym < med else ""
            cells.append(f"{m} [{found}/{seeds}]{extra}")
        print(f"  {name:<18} {kind:<9}" + "".join(f"{c:>22}" for c in cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--schedules", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=7)
    ap.add_argument("--budget", type=int, default=2000,
                    help="schedules per seed for the item-5 scenarios")
    ap.add_argument("--rules-only", action="store_true",
                    help="only the table of the item-5 scenarios")
    args = ap.parse_args()
    if not args.rules_only:
        base = rate("run", args.schedules)
        print(f"{SCENARIO}, default delivery, {args.schedules} runs each")
        print(f"  {'run (FIFO, baseline)':<24} {base:8.0f} runs/s   ratio 1.00")
        for strat in STRATS:
            r = rate(strat, args.schedules)
            print(f"  {strat:<24} {r:8.0f} schedules/s   ratio {r / base:.2f}")
        for scenario in (SCENARIO, SCENARIO + "-recursive"):
            print(f"{scenario}, inline delivery: schedules to the first failure "
                  f"(median of {args.seeds} seeds)")
            for strat in STRATS:
                med, found = to_failure(strat, args.seeds, scenario)
                print(f"  {strat:<8} median {med:6.0f}   found with {found}/{args.seeds} seeds")
    rules_table(args.seeds, args.budget)

if __name__ == "__main__":
    main()
