"""``gntdma explore`` and ``gntdma replay``: run scenarios under exploration strategies."""

from __future__ import annotations

import importlib
import json
import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from gntdma.toolstack.explorejobs import CampaignSpec
from gntdma.toolstack.scenarios import SCENARIOS, make_scenario

if TYPE_CHECKING:
    from gntdma.toolstack.explorepool import Campaign

# exploremerge and explorepool (multiprocessing, concurrent.futures) are imported
# where a campaign, a merge or a replay needs them: one process exploring does not.

__all__ = ["explore_command", "list_scenarios", "merge_command", "replay_command"]

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


#: A source position a report quotes (a WITNESS site): directory and line dropped.
_SITE = re.compile(r"\S*?([\w.-]+\.py):\d+")


def _same_failure(kind: object, report: object, recorded: dict[str, Any]) -> bool:
    """The failure ``kind``/``report`` is the recorded one: the same kind and report
    but for where the source sits and its line numbers (a replay file written by
    another checkout, or before an edit that moved a lock's line, stays usable)."""
    if kind != recorded.get("kind"):
        return False
    if not isinstance(report, str) or not isinstance(recorded.get("report"), str):
        return report == recorded.get("report")
    return _SITE.sub(r"\1", report) == _SITE.sub(r"\1", recorded["report"])


def explore_command(scenario: str, *, strategy: str = "random", schedules: int = 1000,
                    seed: int = 0, callback_delivery: str = "taskqueue",
                    out: Path | None = None, max_steps: int = 200_000,
                    pct_depth: int = 3, max_preemptions: int = 2,
                    say: Any = print, jobs: int = 1, shard: tuple[int, int] | None = None,
                    out_results: Path | None = None, dask: str | None = None,
                    dashboard: bool = False) -> int:
    """Explore ``schedules`` schedules; 0 if none failed, 1 on a failure.

    ``dashboard`` shows the schedules done, failures found and rate live (on
    one process).

    ``jobs`` > 1 runs them on a local process pool, ``dask`` on a Dask cluster,
    ``shard`` only a slice of them (with a result file for ``merge_command``);
    each finds what one process finds.
    """
    if scenario not in SCENARIOS:
        raise ConfigError(f"unknown scenario {scenario!r}; known: {', '.join(SCENARIOS)}")
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    if schedules < 1:
        raise ConfigError("--schedules must be at least 1")
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, not {jobs}")
    if out_results is not None and shard is None:
        raise ConfigError("--out-results is the result file of a --shard run")
    if strategy == "dfs" and (shard is not None or dask is not None):
        raise ConfigError("dfs walks its tree of schedules in order: --shard and --dask "
                          "need random or pct")
    if strategy != "dfs" and (jobs > 1 or shard is not None or dask is not None):
        spec = CampaignSpec.make(scenario, callback_delivery, strategy, seed, schedules,
                                 max_steps, pct_depth)
        return _campaign_command(spec, say=say, out=out, jobs=jobs, shard=shard,
                                 out_results=out_results, dask=dask)
    if jobs > 1:
        say("dfs walks its tree of schedules in order: one process (--jobs ignored)")
    fn = make_scenario(scenario, callback_delivery)
    stream = strategy_stream(strategy, seed, pct_depth=pct_depth,
                             max_preemptions=max_preemptions)
    view = None
    if dashboard:
        from gntdma.toolstack.dashboard import ExploreView

        view = ExploreView(scenario, strategy, schedules)
        stream = view.watch(stream)
    try:
        res = explore(fn, stream, budget=schedules, max_steps=max_steps)
    except BaseException:
        if view is not None:
            view.stop(view.done, 0)
        raise
    if view is not None:
        view.stop(res.schedules, sum(res.kinds.values()))
    say(f"{scenario}: {res.schedules} schedules explored with {strategy} "
        f"(seed {seed}, callback delivery {callback_delivery}) in {res.seconds:.1f} s, "
        f"{res.per_second:.0f} schedules/s")
    if res.failure is None:
        if strategy == "dfs" and res.schedules < schedules:
            say("the bounded DFS space was exhausted: no failure in any schedule")
        else:
            say("no failure")
        return 0
    _report_failure(scenario, callback_delivery, strategy, seed, max_steps, res.schedules,
                    res.failure, out, say)
    return 1


def _report_failure(scenario: str, callback_delivery: str, strategy: str, seed: int,
                    max_steps: int, index: int, f: Outcome, out: Path | None,
                    say: Any) -> None:
    """The failure of schedule ``index`` (1-based) and its replay file."""
    say(f"schedule {index} failed after {f.steps} steps")
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


def _finish(campaign: Campaign, seconds: float, out: Path | None, say: Any) -> int:
    """The report of a whole campaign, as the sequential explorer gives it."""
    spec = campaign.spec
    rate = campaign.explored / seconds if seconds > 0 else 0.0
    say(f"{spec.scenario}: {campaign.explored} schedules explored with {spec.strategy} "
        f"(seed {spec.seed}, callback delivery {spec.callback_delivery}) in {seconds:.1f} s, "
        f"{rate:.0f} schedules/s")
    f = campaign.failure
    if f is None:
        say("no failure")
        return 0
    _report_failure(spec.scenario, spec.callback_delivery, spec.strategy, spec.seed,
                    spec.max_steps, f.index + 1, f.outcome(), out, say)
    return 1


def _dask_executor(address: str) -> tuple[Any, Any, int]:
    """A client of the Dask cluster at ``address``, its executor and its threads."""
    try:
        distributed: Any = importlib.import_module("distributed")
    except ImportError:
        raise ConfigError("--dask needs the optional dask extra "
                          "(pip install 'gntdma[dask]')") from None
    _check_dask_address(address)
    try:
        client = distributed.Client(address, timeout=30)
    except (OSError, TimeoutError, ValueError) as e:
        raise ConfigError(f"--dask {address}: cannot reach the scheduler: {e}") from None
    threads = max(1, sum(client.nthreads().values()))
    return client, client.get_executor(), threads


def _check_dask_address(address: str) -> None:
    """Refuse an address this process cannot use before a client is made (a client
    that fails in its constructor times out again when collected): an unknown
    scheme, no port, or an ``inproc://`` address of another process."""
    try:
        comm: Any = importlib.import_module("distributed.comm")
        scheme, loc = comm.parse_address(comm.resolve_address(address))
        if scheme == "inproc":
            inproc: Any = importlib.import_module("distributed.comm.inproc")
            if inproc.global_manager.get_listener_for(loc) is None:
                raise ValueError("no scheduler listens there in this process")
    except ValueError as e:
        raise ConfigError(f"--dask {address}: not an address of a scheduler this process "
                          f"can reach: {e} (an inproc:// address works only inside its "
                          "own process: start the cluster with protocol tcp://)") from None


def _campaign_command(spec: CampaignSpec, *, say: Any, out: Path | None, jobs: int,
                      shard: tuple[int, int] | None, out_results: Path | None,
                      dask: str | None) -> int:
    from gntdma.toolstack.exploremerge import shard_indices, write_results
    from gntdma.toolstack.explorepool import Campaign, local_pool, run_campaign, run_local

    if jobs > 1 or dask is not None:
        try:
            pickle.dumps(spec)
        except (pickle.PicklingError, AttributeError, TypeError) as e:
            raise ConfigError(f"scenario {spec.scenario!r} cannot be sent to another "
                              f"process (its factory must be importable by name): {e}"
                              ) from None
    indices = None if shard is None else shard_indices(spec.budget, *shard)
    campaign = Campaign(spec, indices, keep=shard is not None)
    if dask is not None:
        client, executor, threads = _dask_executor(dask)
        try:
            seconds = run_campaign(campaign, lambda: executor, jobs=threads)
        finally:
            client.close()
    elif jobs > 1:
        seconds = run_campaign(campaign, local_pool(jobs), jobs=jobs)
    else:
        seconds = run_local(campaign)
    if shard is None:
        return _finish(campaign, seconds, out, say)
    i, n = shard
    path = (out_results if out_results is not None else
            Path(f"gntdma-explore-{spec.scenario}-{spec.seed}-shard{i}of{n}.json"))
    write_results(path, campaign, shard, seconds)
    first = f" from schedule {indices[0] + 1}" if indices else ""
    f = campaign.failure
    found = "no failure" if f is None else f"schedule {f.index + 1} failed: {f.kind}"
    say(f"{spec.scenario}: shard {i}/{n}: {campaign.explored} schedules explored{first} "
        f"with {spec.strategy} (seed {spec.seed}) in {seconds:.1f} s; {found}")
    say(f"results: {path}  (gntdma explore --merge FILES... combines the shards)")
    return 0 if f is None else 1


def merge_command(paths: list[Path], *, say: Any = print, out: Path | None = None,
                  jobs: int = 1) -> int:
    """Combine shard result files into the report of one unsharded run."""
    from gntdma.toolstack.exploremerge import merge_campaign, read_results
    from gntdma.toolstack.explorepool import local_pool, run_campaign, run_local

    files = [read_results(p) for p in paths]
    campaign, seconds = merge_campaign(files)
    rerun = 0
    if not campaign.done:  # PCT schedules run with a k the earlier shards changed
        before = campaign.explored
        seconds += (run_campaign(campaign, local_pool(jobs), jobs=jobs) if jobs > 1
                    else run_local(campaign))
        rerun = campaign.explored - before
    n = files[0].shard[1]
    say(f"merged {len(files)} of {n} shards" +
        (f"; {rerun} schedules run again here (their PCT k was stale)" if rerun else ""))
    return _finish(campaign, seconds, out, say)


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
    if not isinstance(recorded_scenario, str):
        raise ConfigError(f"{path}: malformed replay file: scenario is "
                          f"{recorded_scenario!r}, not a name")
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
        max_steps = doc.get("max_steps", 200_000)
        if not isinstance(recorded, dict):
            raise ValueError(f"outcome is {recorded!r}, not an object")
        for key, kind, what, needed in (("kind", str, "a string", True),
                                        ("report", str, "a string", False),
                                        ("steps", int, "an integer", False)):
            v = recorded.get(key)
            if (needed or v is not None) and type(v) is not kind:
                raise ValueError(f"outcome's {key} is {v!r}, not {what}")
        if type(max_steps) is not int or max_steps < 1:
            raise ValueError(f"max_steps is {max_steps!r}, not a count of steps")
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{path}: malformed replay file: {e}") from e
    if recorded.get("kind") == "crash":  # it killed its process: replay it in another
        return _replay_crash(doc, schedule, recorded, say)
    try:
        out = run_once(fn, ReplayStrategy(schedule), max_steps=max_steps)
    except ReplayDivergence as e:
        say(f"replay diverged (uncontrolled nondeterminism): {e}")
        return 2
    say(f"{doc['scenario']}: replayed {len(schedule.steps)} scheduling decisions")
    if out.kind is None:
        say("no failure: the recorded failure did not reproduce")
        return 0
    say(_describe(out))
    same = _same_failure(out.kind, out.report, recorded)
    say("reproduced: the same failure as recorded" if same
        else f"a different failure than recorded ({recorded.get('kind')})")
    return 1


def _replay_crash(doc: dict[str, Any], schedule: Schedule, recorded: dict[str, Any],
                  say: Any) -> int:
    """A schedule that killed the process running it, replayed in a process of its own."""
    from gntdma.toolstack.explorepool import replay_in_child

    died, end = replay_in_child(str(doc["scenario"]), str(doc["callback_delivery"]),
                                schedule.to_json(), int(doc.get("max_steps", 200_000)))
    if "divergence" in end:
        say(f"replay diverged (uncontrolled nondeterminism): {end['divergence']}")
        return 2
    say(f"{doc['scenario']}: replayed {len(schedule.steps)} scheduling decisions in a "
        "process of its own")
    if died is None:
        kind = end.get("kind")
        if kind is None:
            say("no failure: the recorded failure did not reproduce")
            return 0
        say(f"failure: {kind}\n{end.get('report', '')}")
        say("a different failure than recorded (crash)")
        return 1
    say(f"failure: crash\nthe replaying process died ({died})")
    same = f"({died})" in str(recorded.get("report", ""))
    say("reproduced: the same failure as recorded" if same
        else f"a different failure than recorded ({recorded.get('report')})")
    return 1
