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

Speed (issue 14, lever 5): schedules per second of ``gntdma explore
gnttab-shortage-blkfront`` on one process against commit 9e4f0e8, both measured
in this run, alternately (the old source is unpacked with ``git archive`` into
``.cache/bench-9e4f0e8`` and run by a virtual environment there that has only
greenlet; target 2.5x), and ``--jobs N`` for N = 1 .. the processors this
process may use, as a ratio to ``--jobs 1`` (target 0.8 N). ``--speed-only``
prints these alone; ``--json`` prints every figure as JSON after the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench_args import positive_int

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


def rules_table(seeds: int, budget: int) -> dict[str, dict[str, Any]]:
    print(f"issue 10 item 5 scenarios: median schedules to the scenario's bug over "
          f"{seeds} seeds, budget {budget}")
    print("  [seeds that found it]; (any: ...) when a failure of another kind came first")
    print(f"  {'scenario':<18} {'bug':<9}" + "".join(f"{s:>22}" for s in STRATS))
    figures: dict[str, dict[str, Any]] = {}
    for name, kind in RULES.items():
        cells = []
        for strat in STRATS:
            med, anym, found = rules_to_failure(strat, seeds, name, budget)
            figures.setdefault(name, {})[strat] = {"median": med, "any": anym,
                                                   "found": found, "seeds": seeds}
            m = f"{med:.0f}" if med <= budget else f">{budget}"
            extra = f" (any: {anym:.0f})" if anym < med else ""
            cells.append(f"{m} [{found}/{seeds}]{extra}")
        print(f"  {name:<18} {kind:<9}" + "".join(f"{c:>22}" for c in cells))
    return figures


REPO = Path(__file__).resolve().parent.parent
BASELINE = "9e4f0e8"
_RATE = re.compile(r": (\d+) schedules explored .* in ([\d.]+) s, (\d+) schedules/s")


def baseline_python(commit: str = BASELINE) -> tuple[str, Path]:
    """The interpreter and source tree of ``commit``, made once under .cache/."""
    base = REPO / ".cache" / f"bench-{commit}"
    src = base / "src"
    if not (src / "gntdma").is_dir():
        base.mkdir(parents=True, exist_ok=True)
        tree = subprocess.run(["git", "-C", str(REPO), "archive", commit, "src"],
                              stdout=subprocess.PIPE, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base)], input=tree, check=True)
    py = base / "venv" / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(base / "venv")], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "greenlet>=3.0"], check=True)
    return str(py), src


def explore_rate(python: str, src: Path, schedules: int,
                 jobs: int | None = None) -> tuple[float, float]:
    """Schedules per second of ``gntdma explore`` of ``src``: as it reports them (wall
    clock), and per CPU second of the whole process tree (imports included), which
    other load on the machine does not change."""
    cmd = [python, "-m", "gntdma.cli", "explore", SCENARIO, "--schedules", str(schedules)]
    if jobs is not None:
        cmd += ["--jobs", str(jobs)]
    env = dict(os.environ, PYTHONPATH=str(src))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True,
                         cwd=src.parent).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    m = _RATE.search(out)
    assert m is not None, out
    n, secs = int(m.group(1)), float(m.group(2))
    return (n / secs if secs > 0 else float(m.group(3))), n / cpu


def speed(schedules: int, rounds: int, scale_schedules: int) -> dict[str, Any]:
    py, old_src = baseline_python()
    new_src = REPO / "src"
    pairs = []
    for _ in range(rounds):  # alternately, so that drift hits both
        old = explore_rate(py, old_src, schedules)
        new = explore_rate(sys.executable, new_src, schedules)
        pairs.append((old, new))
    wall = [n[0] / o[0] for o, n in pairs]
    cpu = [n[1] / o[1] for o, n in pairs]
    one = {"baseline": BASELINE, "schedules": schedules, "rounds": rounds,
           "baseline_per_s": statistics.median(o[0] for o, _ in pairs),
           "per_s": statistics.median(n[0] for _, n in pairs),
           "baseline_per_cpu_s": statistics.median(o[1] for o, _ in pairs),
           "per_cpu_s": statistics.median(n[1] for _, n in pairs),
           "ratio": statistics.median(wall), "ratio_cpu": statistics.median(cpu),
           "target": 2.5}
    print(f"{SCENARIO}, one process, {schedules} schedules, {rounds} alternate rounds "
          "(load average {:.1f})".format(os.getloadavg()[0]))
    print(f"  {'':<10} {'schedules/s':>12} {'per CPU s':>10}")
    print(f"  {BASELINE:<10} {one['baseline_per_s']:12.0f} {one['baseline_per_cpu_s']:10.0f}")
    print(f"  {'now':<10} {one['per_s']:12.0f} {one['per_cpu_s']:10.0f}")
    print(f"  ratio      {one['ratio']:12.2f} {one['ratio_cpu']:10.2f}   (target >= 2.5)")
    ncpu = len(os.sched_getaffinity(0))
    rates = {n: explore_rate(sys.executable, new_src, scale_schedules, n)
             for n in range(1, ncpu + 1)}
    print(f"{SCENARIO}, --jobs N, {scale_schedules} schedules (pool start included; "
          "load average {:.1f}: the scaling needs N free cores)".format(os.getloadavg()[0]))
    print("  CPU-bound scaling: N x the schedules per CPU second against --jobs 1 (what N "
          "free cores give)")
    scaling = []
    for n, (r, c) in rates.items():
        sc = r / rates[1][0]
        bound = n * c / rates[1][1]
        scaling.append({"jobs": n, "per_s": r, "per_cpu_s": c, "scaling": sc,
                        "cpu_bound_scaling": bound, "target": 0.8 * n})
        print(f"  --jobs {n:<3} {r:8.0f} schedules/s   x{sc:.2f}   CPU-bound x{bound:.2f} "
              f"(target >= {0.8 * n:.1f})")
    return {"one_process": one, "jobs": scaling, "load_average": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--schedules", type=positive_int, default=300)
    ap.add_argument("--seeds", type=positive_int, default=7)
    ap.add_argument("--budget", type=positive_int, default=2000,
                    help="schedules per seed for the item-5 scenarios")
    ap.add_argument("--rules-only", action="store_true",
                    help="only the table of the item-5 scenarios")
    ap.add_argument("--speed-only", action="store_true",
                    help="only the speed against 9e4f0e8 and the --jobs scaling")
    ap.add_argument("--rounds", type=positive_int, default=3,
                    help="alternate rounds against 9e4f0e8 (default 3)")
    ap.add_argument("--speed-schedules", type=positive_int, default=600,
                    help="schedules of a run against 9e4f0e8 (default 600)")
    ap.add_argument("--scale-schedules", type=positive_int, default=2000,
                    help="schedules of a --jobs run (default 2000)")
    ap.add_argument("--json", action="store_true", help="the figures as JSON too")
    args = ap.parse_args()
    figures: dict[str, Any] = {}
    if args.speed_only:
        figures["speed"] = speed(args.speed_schedules, args.rounds, args.scale_schedules)
    else:
        if not args.rules_only:
            figures["rates"] = rates_table(args.schedules)
            figures["to_failure"] = to_failure_table(args.seeds)
            figures["speed"] = speed(args.speed_schedules, args.rounds,
                                     args.scale_schedules)
        figures["rules"] = rules_table(args.seeds, args.budget)
    if args.json:
        print(json.dumps(figures, indent=2))


def rates_table(schedules: int) -> dict[str, float]:
    base = rate("run", schedules)
    out = {"run": base}
    print(f"{SCENARIO}, default delivery, {schedules} runs each")
    print(f"  {'run (FIFO, baseline)':<24} {base:8.0f} runs/s   ratio 1.00")
    for strat in STRATS:
        r = rate(strat, schedules)
        out[strat] = r
        print(f"  {strat:<24} {r:8.0f} schedules/s   ratio {r / base:.2f}")
    return out


def to_failure_table(seeds: int) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for scenario in (SCENARIO, SCENARIO + "-recursive"):
        print(f"{scenario}, inline delivery: schedules to the first failure "
              f"(median of {seeds} seeds)")
        out[scenario] = {}
        for strat in STRATS:
            med, found = to_failure(strat, seeds, scenario)
            out[scenario][strat] = {"median": med, "found": found, "seeds": seeds}
            print(f"  {strat:<8} median {med:6.0f}   found with {found}/{seeds} seeds")
    return out


if __name__ == "__main__":
    main()
