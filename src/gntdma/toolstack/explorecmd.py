"""``gntdma explore`` and ``gntdma replay``: run scenarios under exploration strategies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gntdma.errors import ConfigError
from gntdma.sched import (
    STRATEGIES,
    Outcome,
    ReplayDivergence,
    ReplayStrategy,
    Schedule,
    explore,
    run_once,
    strategy_stream,
)
from gntdma.toolstack.scenarios import SCENARIOS, make_scenario

__all__ = ["explore_command", "list_scenarios", "replay_command"]

REPLAY_FORMAT = "gntdma-replay-1"

#: One line on each scenario, for ``gntdma explore --list``.
SCENARIO_SUMMARIES = {
    "gnttab-shortage-blkfront": "the seed's blkfront on a small grant table: loads defer, "
                                "free callbacks complete them (inline delivery: the "
                                "recursion panic)",
    "gnttab-shortage-blkfront-recursive": "the same with a recursive driver lock (inline "
                                          "delivery: the gnttab_list/xbd_io lock-order "
                                          "reversal)",
    "busdma-deferred-unload": "a map unloaded while its grant-deferred load is pending: "
                              "cancelled, nothing leaked",
}


def list_scenarios() -> list[str]:
    """``name  summary``, a line each, for every scenario."""
    width = max(len(n) for n in SCENARIOS)
    out = []
    for name, factory in SCENARIOS.items():
        summary = SCENARIO_SUMMARIES.get(name)
        if summary is None:
            doc = (factory.__doc__ or "").strip().splitlines()
            summary = doc[0] if doc else "(no description)"
        out.append(f"{name:<{width}}  {summary}")
    return out


def _describe(out: Outcome) -> str:
    return f"failure: {out.kind}\n{out.report}"


def explore_command(scenario: str, *, strategy: str = "random", schedules: int = 1000,
                    seed: int = 0, callback_delivery: str = "taskqueue",
                    out: Path | None = None, max_steps: int = 200_000,
                    pct_depth: int = 3, max_preemptions: int = 2,
                    say: Any = print) -> int:
    """Explore ``schedules`` schedules; 0 if none failed, 1 on a failure."""
    if scenario not in SCENARIOS:
        raise ConfigError(f"unknown scenario {scenario!r}; known: {', '.join(SCENARIOS)}")
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    if schedules < 1:
        raise ConfigError("--schedules must be at least 1")
    fn = make_scenario(scenario, callback_delivery)
    stream = strategy_stream(strategy, seed, pct_depth=pct_depth,
                             max_preemptions=max_preemptions)
    res = explore(fn, stream, budget=schedules, max_steps=max_steps)
    say(f"{scenario}: {res.schedules} schedules explored with {strategy} "
        f"(seed {seed}, callback delivery {callback_delivery}) in {res.seconds:.1f} s, "
        f"{res.per_second:.0f} schedules/s")
    if res.failure is None:
        if strategy == "dfs" and res.schedules < schedules:
            say("the bounded DFS space was exhausted: no failure in any schedule")
        else:
            say("no failure")
        return 0
    f = res.failure
    say(f"schedule {res.schedules} failed after {f.steps} steps")
    say(_describe(f))
    path = out if out is not None else Path(f"gntdma-replay-{scenario}-{seed}.json")
    doc = {
        "format": REPLAY_FORMAT,
        "scenario": scenario,
        "callback_delivery": callback_delivery,
        "strategy": strategy,
        "max_steps": max_steps,
        "outcome": {"kind": f.kind, "report": f.report, "steps": f.steps},
        "schedule": f.schedule.to_json(),
    }
    path.write_text(json.dumps(doc) + "\n")
    say(f"replay file: {path}  (gntdma replay {path})")
    return 1


def replay_command(path: Path, say: Any = print, scenario: str | None = None) -> int:
    """Rerun a recorded schedule: 1 if it fails as recorded, 0 if it passes, 2 if it diverges.

    With ``scenario``, the file must be a replay of that scenario.
    """
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read a replay file: {e.strerror or e}") from None
    except ValueError as e:
        raise ConfigError(f"{path}: not a gntdma replay file (not JSON: {e})") from None
    if not isinstance(doc, dict) or doc.get("format") != REPLAY_FORMAT:
        raise ConfigError(f"{path}: not a gntdma replay file")
    recorded_scenario = doc.get("scenario")
    if scenario is not None and recorded_scenario != scenario:
        raise ConfigError(f"{path}: a replay of scenario {recorded_scenario!r}, not of "
                          f"{scenario!r}")
    if recorded_scenario not in SCENARIOS:
        raise ConfigError(f"{path}: a replay of scenario {recorded_scenario!r}, which this "
                          f"gntdma does not have (known: {', '.join(SCENARIOS)})")
    try:
        fn = make_scenario(str(doc["scenario"]), str(doc["callback_delivery"]))
        schedule = Schedule.from_json(doc["schedule"])
        recorded = doc["outcome"]
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{path}: malformed replay file: {e}") from e
    try:
        out = run_once(fn, ReplayStrategy(schedule), max_steps=int(doc.get("max_steps", 200_000)))
    except ReplayDivergence as e:
        say(f"replay diverged (uncontrolled nondeterminism): {e}")
        return 2
    say(f"{doc['scenario']}: replayed {len(schedule.steps)} scheduling decisions")
    if out.kind is None:
        say("no failure: the recorded failure did not reproduce")
        return 0
    say(_describe(out))
    same = out.kind == recorded.get("kind") and out.report == recorded.get("report")
    say("reproduced: the same failure as recorded" if same
        else f"a different failure than recorded ({recorded.get('kind')})")
    return 1
