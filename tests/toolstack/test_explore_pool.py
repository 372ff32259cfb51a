"""``gntdma explore --jobs/--shard/--merge/--dask``: any number of processes, shards or
cluster workers find what one process finds (DESIGN 10: a run is its seed and steps)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from gntdma import cli
from gntdma.sched import Scheduler, checkpoint
from gntdma.toolstack.explorejobs import PCT_FIRST_K, CampaignSpec, ScheduleResult
from gntdma.toolstack.explorepool import Campaign
from gntdma.toolstack.scenarios import SCENARIOS, ScenarioFn

CRASH_STATUS = 23


def _ordered(nthreads: int, crash: bool) -> ScenarioFn:
    """Threads that finish in reverse order only in rare schedules: then a leak (or,
    with ``crash``, the process dies)."""
    def scenario(s: Scheduler) -> list[str]:
        log: list[int] = []

        def worker(n: int) -> None:
            for _ in range(n + 1):
                checkpoint()
            log.append(n)

        for n in range(nthreads):
            s.spawn(worker, n, name=f"guest1/w{n}")
        s.run()
        if log == list(range(nthreads - 1, -1, -1)):
            if crash:
                os._exit(CRASH_STATUS)
            return ["the threads finished in reverse order"]
        return []
    return scenario


# Module-level factories: a spawned worker imports them by name.
def rare4(_delivery: str) -> ScenarioFn:
    """random: first found near schedule 55 (seeds 0-4)"""
    return _ordered(4, crash=False)


def rare5(_delivery: str) -> ScenarioFn:
    """pct: first found near schedule 220"""
    return _ordered(5, crash=False)


def crash4(_delivery: str) -> ScenarioFn:
    return _ordered(4, crash=True)


@pytest.fixture(autouse=True)
def _scenarios(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(SCENARIOS, "test-rare4", rare4)
    monkeypatch.setitem(SCENARIOS, "test-rare5", rare5)
    monkeypatch.setitem(SCENARIOS, "test-crash4", crash4)


def _explore(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    rc = cli.main(["explore", *args])
    return rc, capsys.readouterr().out


def _same_report(a: str, b: str) -> None:
    """Two reports equal but for the time taken (the first line's end)."""
    la, lb = a.splitlines(), b.splitlines()
    assert la[0].split(" in ")[0] == lb[0].split(" in ")[0]
    strip = [x for x in la[1:] if not x.startswith("replay file:")]
    assert strip == [x for x in lb[1:] if not x.startswith("replay file:")]


CASES = [("test-rare4", "random", "3"), ("test-rare5", "pct", "5")]


@pytest.mark.parametrize(("scenario", "strategy", "seed"), CASES)
def test_jobs_find_the_first_failure_and_replay_file_of_one_process(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], scenario: str, strategy: str,
        seed: str) -> None:
    common = [scenario, "--strategy", strategy, "--seed", seed, "--schedules", "600"]
    rc1, one = _explore(capsys, *common, "--out", str(tmp_path / "one.json"))
    rc2, two = _explore(capsys, *common, "--jobs", "2", "--out", str(tmp_path / "two.json"))
    assert rc1 == rc2 == 1, one
    index = int(one.splitlines()[1].split()[1])
    assert index > 40  # many chunks ran on both workers before the failure
    _same_report(one, two)
    assert (json.loads((tmp_path / "one.json").read_text())
            == json.loads((tmp_path / "two.json").read_text()))
    assert cli.main(["replay", str(tmp_path / "two.json")]) == 1
    assert "reproduced: the same failure as recorded" in capsys.readouterr().out


def test_jobs_without_failure_explore_the_whole_budget(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = _explore(capsys, "gnttab-shortage-blkfront", "--schedules", "40", "--jobs", "2",
                       "--out", str(tmp_path / "r.json"))
    assert rc == 0, out
    assert out.splitlines()[0].startswith("gnttab-shortage-blkfront: 40 schedules explored")
    assert "no failure" in out


def test_pct_result_run_with_a_stale_k_is_run_again_with_the_right_one() -> None:
    # strategy_stream (sched/_explore.py): PCT's k for schedule i is learnt from the
    # choices of schedules 0..i-1; a result computed with another k is not that schedule.
    spec = CampaignSpec.make("test-rare5", "taskqueue", "pct", 0, 4, 200_000, 3)
    c = Campaign(spec)
    idx, ks = c.take(4)
    assert idx == (0, 1, 2, 3) and ks == (PCT_FIRST_K,) * 4
    c.offer(ScheduleResult(1, PCT_FIRST_K, 10, 10))
    c.offer(ScheduleResult(0, PCT_FIRST_K, 40, 40))
    c.settle(idx[:2])
    c.advance()
    assert c.explored == 1 and c.k == 40
    c.settle(idx[2:])
    idx, ks = c.take(4)
    assert idx == (1, 2, 3) and ks == (40, 40, 40)
    c.offer(ScheduleResult(1, 40, 10, 10, "leak", "x", {"seed": 1, "steps": []}))
    c.advance()
    assert c.failure is not None and c.failure.index == 1 and c.explored == 2


def test_crashing_schedule_is_isolated_with_its_own_replay_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--strategy", "random", "--seed", "3", "--schedules", "300"]
    rc, twin = _explore(capsys, "test-rare4", *common, "--out", str(tmp_path / "twin.json"))
    assert rc == 1
    index = twin.splitlines()[1].split()[1]
    rc, out = _explore(capsys, "test-crash4", *common, "--jobs", "2",
                       "--out", str(tmp_path / "crash.json"))
    assert rc == 1, out
    lines = out.splitlines()
    assert lines[0].startswith(f"test-crash4: {index} schedules explored")
    assert lines[1].startswith(f"schedule {index} failed")
    assert "failure: crash" in out
    assert f"the process running schedule {index} died (exit status {CRASH_STATUS})" in out
    doc = json.loads((tmp_path / "crash.json").read_text())
    steps = json.loads((tmp_path / "twin.json").read_text())["schedule"]["steps"]
    assert doc["outcome"]["kind"] == "crash"
    assert doc["schedule"]["steps"] != []
    assert steps[: len(doc["schedule"]["steps"])] == doc["schedule"]["steps"]
    assert cli.main(["replay", str(tmp_path / "crash.json")]) == 1
    replayed = capsys.readouterr().out
    assert "reproduced: the same failure as recorded" in replayed
    assert f"died (exit status {CRASH_STATUS})" in replayed


@pytest.mark.parametrize(("scenario", "strategy", "seed"), CASES)
def test_shards_merge_into_the_report_of_one_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], scenario: str, strategy: str,
        seed: str) -> None:
    common = [scenario, "--strategy", strategy, "--seed", seed, "--schedules", "600"]
    rc, one = _explore(capsys, *common, "--out", str(tmp_path / "one.json"))
    assert rc == 1
    files = []
    for i in (1, 2, 3):
        f = tmp_path / f"shard{i}.json"
        _explore(capsys, *common, "--shard", f"{i}/3", "--out-results", str(f))
        files.append(str(f))
    rc, merged = _explore(capsys, "--merge", *reversed(files),
                          "--out", str(tmp_path / "merged.json"))
    assert rc == 1, merged
    assert merged.splitlines()[0].startswith("merged 3 of 3 shards")
    # A PCT shard learns k from its own slice only: the merge runs again what the
    # earlier slices would have run with another k.
    assert ("run again here" in merged.splitlines()[0]) == (strategy == "pct")
    _same_report(one, "\n".join(merged.splitlines()[1:]))
    assert (json.loads((tmp_path / "one.json").read_text())
            == json.loads((tmp_path / "merged.json").read_text()))


def test_shard_without_failure_and_merge_without_failure(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["busdma-deferred-unload", "--schedules", "30", "--seed", "2"]
    for i in (1, 2):
        rc, out = _explore(capsys, *common, "--shard", f"{i}/2", "--out-results",
                           str(tmp_path / f"s{i}.json"))
        assert rc == 0, out
        assert f"shard {i}/2: 15 schedules explored" in out
    rc, out = _explore(capsys, "--merge", str(tmp_path / "s1.json"), str(tmp_path / "s2.json"))
    assert rc == 0
    assert "busdma-deferred-unload: 30 schedules explored" in out and "no failure" in out


def test_merge_refuses_a_missing_doubled_or_foreign_shard(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name, seed, shard in (("a", "1", "1/2"), ("b", "1", "2/2"), ("c", "2", "2/2")):
        _explore(capsys, "busdma-deferred-unload", "--schedules", "4", "--seed", seed,
                 "--shard", shard, "--out-results", str(tmp_path / f"{name}.json"))
    a, b, c = (str(tmp_path / f"{n}.json") for n in "abc")
    assert cli.main(["explore", "--merge", a]) == 2
    assert "shard(s) 2 of 2 missing" in capsys.readouterr().err
    assert cli.main(["explore", "--merge", a, a]) == 2
    assert "given twice" in capsys.readouterr().err
    assert cli.main(["explore", "--merge", a, c]) == 2
    assert "a shard of another campaign" in capsys.readouterr().err
    assert cli.main(["explore", "--merge", a, b]) == 0
    capsys.readouterr()


def test_bad_campaign_options_are_clear(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["explore", "lost-wakeup", "--out-results", "x.json"]) == 2
    assert "--out-results is the result file of a --shard run" in capsys.readouterr().err
    assert cli.main(["explore", "lost-wakeup", "--shard", "3/2"]) == 2
    assert "--shard 3/2: I must be from 1 to N" in capsys.readouterr().err
    assert cli.main(["explore", "lost-wakeup", "--shard", "x"]) == 2
    assert "--shard must be I/N" in capsys.readouterr().err
    assert cli.main(["explore", "abba-callout", "--strategy", "dfs", "--shard", "1/2"]) == 2
    assert "dfs walks its tree of schedules in order" in capsys.readouterr().err


def test_dask_without_the_extra_is_a_clear_error(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)  # import fails
    assert cli.main(["explore", "lost-wakeup", "--dask", "tcp://127.0.0.1:1"]) == 2
    assert "--dask needs the optional dask extra" in capsys.readouterr().err


def test_dask_cluster_finds_the_first_failure_of_one_process(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import dask
    import distributed

    common = ["test-rare4", "--strategy", "random", "--seed", "3", "--schedules", "300"]
    rc, one = _explore(capsys, *common, "--out", str(tmp_path / "one.json"))
    assert rc == 1
    # In-process workers (one thread: the scheduler is one per process); anything
    # dask writes goes to tmp_path.
    with dask.config.set({"temporary-directory": str(tmp_path)}), distributed.LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None,
            local_directory=str(tmp_path)) as cluster:
        rc, out = _explore(capsys, *common, "--dask", cluster.scheduler_address,
                           "--out", str(tmp_path / "dask.json"))
    assert rc == 1, out
    _same_report(one, out)
    assert (json.loads((tmp_path / "one.json").read_text())
            == json.loads((tmp_path / "dask.json").read_text()))
