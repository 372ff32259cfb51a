"""``gntdma explore`` / ``gntdma replay`` on the real kernel code (CI budgets)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gntdma import cli
from gntdma.sched import RandomStrategy, run_once
from gntdma.toolstack.scenarios import SCENARIOS, make_scenario
from gntdma.toolstack.scenarios_rules import RULE_SCENARIOS  # each fails by design


@pytest.mark.parametrize("strategy", ["random", "pct", "dfs"])
def test_inline_delivery_fails_and_the_replay_reproduces(
        tmp_path: Path, strategy: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "replay.json"
    rc = cli.main(["explore", "gnttab-shortage-blkfront", "--callback-delivery", "inline",
                   "--strategy", strategy, "--schedules", "200", "--out", str(out)])
    assert rc == 1
    text = capsys.readouterr().out
    assert "failure: panic" in text
    assert "recursing on non-recursive mutex xbd_io" in text
    assert "gnttab_list" in text  # held while the callback takes the driver lock
    doc = json.loads(out.read_text())
    assert doc["outcome"]["kind"] == "panic"
    assert cli.main(["replay", str(out)]) == 1
    text = capsys.readouterr().out
    assert "reproduced: the same failure as recorded" in text


def test_recursive_driver_lock_gives_the_seeds_lock_order_reversal(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lor.json"
    rc = cli.main(["explore", "gnttab-shortage-blkfront-recursive", "--callback-delivery",
                   "inline", "--schedules", "200", "--out", str(out)])
    assert rc == 1
    text = capsys.readouterr().out
    assert "failure: reversal" in text or "failure: deadlock" in text
    assert "gnttab_list" in text and "xbd_io" in text
    assert cli.main(["replay", str(out)]) == 1
    assert "reproduced" in capsys.readouterr().out


@pytest.mark.parametrize("scenario", sorted(set(SCENARIOS) - set(RULE_SCENARIOS)))
@pytest.mark.parametrize("strategy", ["random", "pct", "dfs"])
def test_default_delivery_explores_a_budget_without_failure(
        scenario: str, strategy: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    # --out: a failure's replay file goes to the test's own directory.
    rc = cli.main(["explore", scenario, "--strategy", strategy, "--schedules", "60",
                   "--seed", "5", "--out", str(tmp_path / "replay.json")])
    assert rc == 0, capsys.readouterr().out


def test_same_seed_same_schedule_and_trace() -> None:
    fn = make_scenario("gnttab-shortage-blkfront", "taskqueue")
    a = run_once(fn, RandomStrategy(11))
    b = run_once(fn, RandomStrategy(11))
    assert a.kind is None and b.kind is None
    assert a.schedule.to_json() == b.schedule.to_json()
    assert a.steps == b.steps
    c = run_once(fn, RandomStrategy(12))
    assert c.schedule.steps != a.schedule.steps


def test_bad_arguments_are_clear(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli.main(["explore", "no-such-scenario"]) == 2
    assert "unknown scenario" in capsys.readouterr().err
    assert cli.main(["explore", "busdma-deferred-unload", "--strategy", "bogus"]) == 2
    assert "unknown strategy" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert cli.main(["replay", str(bad)]) == 2
    assert "not a gntdma replay file" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["explore", "lost-wakeup", "--seed", "abc"],
                                  ["explore", "lost-wakeup", "--schedules", "1.5"],
                                  ["run", "--threads", "x"]])
def test_a_non_integer_option_says_so_without_internal_names(
        capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "not a decimal integer" in err
    assert "_positive_int" not in err


@pytest.mark.parametrize(("given", "cpus", "run"), [
    ("99999", 2, 8), ("9", 2, 8), ("8", 2, 8), ("3", 1, 3), ("0", 3, 3), ("2", 1, 2)])
def test_jobs_past_four_a_processor_are_capped_and_said(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], given: str,
        cpus: int, run: int) -> None:
    """``--jobs N`` spawns up to N interpreters: past 4 a processor (the processors this
    process may use, its affinity) they would only share them and could exhaust the
    machine's memory, so the workers are capped there and stderr says so; ``--jobs 0``
    is one a processor."""
    import gntdma.toolstack.explorecmd as ec

    seen: list[int] = []

    def fake_explore(*_a: object, jobs: int, **_k: object) -> int:
        seen.append(jobs)
        return 0

    monkeypatch.setattr(ec, "explore_command", fake_explore)
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda _pid: set(range(cpus)))
    rc = cli.main(["explore", "gnttab-shortage-blkfront", "--schedules", "4", "--jobs", given])
    assert rc == 0
    assert seen == [run]
    err = capsys.readouterr().err
    capped = int(given) > 4 * cpus
    assert (f"--jobs {given}: at most 4 worker processes per processor, {run} on the "
            f"{cpus} this process may use" in err) == capped


@pytest.mark.parametrize(("field", "value"), [
    ("max_steps", "x"), ("max_steps", None), ("max_steps", -5), ("max_steps", 0),
    ("max_steps", 1.5), ("outcome", "x"), ("outcome", None), ("scenario", []),
    ("scenario", {})])
def test_a_replay_file_with_a_malformed_field_is_refused_with_status_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str,
        value: object) -> None:
    """README: ``gntdma replay`` refuses a file that is not a replay with status 2 and a
    message (1 is "the failure reproduced"); an edited ``max_steps`` or ``outcome``
    is such a file, not a traceback or a run with a step limit of -5."""
    out = tmp_path / "replay.json"
    rc = cli.main(["explore", "lost-wakeup", "--schedules", "200", "--out", str(out)])
    assert rc == 1
    doc = json.loads(out.read_text())
    doc[field] = value
    out.write_text(json.dumps(doc))
    capsys.readouterr()
    assert cli.main(["replay", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out}: malformed replay file: {field} is {value!r}" in err


def test_explore_runs_as_a_module_as_benchmarks_explore_py_runs_it(tmp_path: Path) -> None:
    """``python -m gntdma.cli explore`` (benchmarks/explore.py's command): everything
    ``main`` uses is defined before the module runs it."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "gntdma.cli", "explore",
                        "gnttab-shortage-blkfront", "--schedules", "3", "--jobs", "1",
                        "--dashboard", "off"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-800:]
    assert "Traceback" not in r.stderr
    assert "3 schedules" in r.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("where", "key", "value", "says"), [
    ("outcome", "kind", [1], "outcome's kind is [1], not a string"),
    ("outcome", "kind", None, "outcome's kind is None, not a string"),
    ("outcome", "report", 7, "outcome's report is 7, not a string"),
    ("outcome", "steps", "x", "outcome's steps is 'x', not an integer"),
    ("schedule", "seed", 1.5, "seed is 1.5, not an integer"),
    ("schedule", "seed", True, "seed is True, not an integer"),
    ("schedule", "seed", -1, "seed -1 is not from 0 to 2**64-1"),
    ("schedule", "seed", 1 << 70, "is not from 0 to 2**64-1"),
    ("schedule", "steps", "1", "steps is '1', not a list"),
    ("schedule", "randoms", "1", "randoms is '1', not a list"),
])
def test_a_replay_files_inner_fields_are_checked_too(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str, key: str,
        value: object, says: str) -> None:
    """The recorded outcome and schedule of a replay file are of the types ``explore``
    writes (a seed as ``explore --seed`` accepts it); anything else is a malformed file,
    status 2, not a replay that "reproduces" a failure of kind [1]."""
    out = tmp_path / "replay.json"
    assert cli.main(["explore", "lost-wakeup", "--schedules", "200", "--out", str(out)]) == 1
    doc = json.loads(out.read_text())
    doc[where][key] = value
    out.write_text(json.dumps(doc))
    capsys.readouterr()
    assert cli.main(["replay", str(out)]) == 2
    assert says in capsys.readouterr().err


def test_a_replay_file_whose_step_is_a_string_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "replay.json"
    assert cli.main(["explore", "lost-wakeup", "--schedules", "200", "--out", str(out)]) == 1
    doc = json.loads(out.read_text())
    doc["schedule"]["steps"][0] = str(doc["schedule"]["steps"][0])
    out.write_text(json.dumps(doc))
    capsys.readouterr()
    assert cli.main(["replay", str(out)]) == 2
    assert "a step is '" in capsys.readouterr().err


def test_negative_jobs_says_zero_is_allowed(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["explore", "lost-wakeup", "--jobs", "-1"]) == 2
    assert "--jobs must be 0 (one worker per processor) or more, not -1" in \
        capsys.readouterr().err
