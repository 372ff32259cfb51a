"""Several configs, the report, the examples and the other commands (issue 11 item 10)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from run_helpers import phys_memory_mb, run_cli, run_json, write_cfg

import gntdma
from gntdma.toolstack.scenarios import SCENARIOS

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_several_configs_make_several_guests(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    a = write_cfg(tmp_path / "a.cfg", "name='a'\nmemory=16\nmax_grant_frames=2\n"
                  "disk=['vdev=xvda, size=4M, target=a.img']\n")
    b = write_cfg(tmp_path / "b.cfg", "name='b'\nmemory=16\n"
                  "disk=['vdev=xvda, size=4M, target=b.img', "
                  "'vdev=xvdb, size=4M, target=b2.img']\n")
    rc, rep, err = run_json(capsys, tmp_path, str(a), str(b), "--duration", "0.3",
                            "--seed", "7")
    assert rc == 0 and rep["ok"] is True, err
    assert [g["name"] for g in rep["guests"]] == ["a", "b"]
    assert [g["config"] for g in rep["guests"]] == [str(a), str(b)]
    assert len({g["domid"] for g in rep["guests"]}) == 2
    assert [len(g["disks"]) for g in rep["guests"]] == [1, 2]
    # the report says what ran: version, configs, seed, duration
    assert rep["version"] == gntdma.__version__
    assert rep["configs"] == [str(a), str(b)]
    assert rep["seed"] == 7 and rep["duration"] == 0.3


def test_duplicate_guest_names_are_refused(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    a = write_cfg(tmp_path / "a.cfg", "name='same'\nmemory=16\n")
    b = write_cfg(tmp_path / "b.cfg", "# another\nname='same'\nmemory=16\n")
    rc, out, err = run_cli(capsys, "run", str(a), str(b))
    assert rc == 2 and f"{b}:2: guest name 'same'" in err and "xenstored:" not in out


def test_a_guest_may_not_take_dom0s_name(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    # xl: dom0 is "Domain-0", and libxl refuses a domain name already in use.
    cfg = write_cfg(tmp_path / "d.cfg", "memory=16\nname='Domain-0'\n")
    rc, out, err = run_cli(capsys, "run", str(cfg))
    assert rc == 2 and f"{cfg}:2: guest name 'Domain-0' is already in use" in err
    assert "xenstored:" not in out


def test_combined_budgets_are_checked_before_anything_runs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Nine guests of 64 grant frames may grant more than dom0's maptrack maps.
    cfgs = [str(write_cfg(tmp_path / f"g{i}.cfg", f"name='g{i}'\nmemory=8\n"
                          "max_grant_frames=64\n")) for i in range(9)]
    rc, out, err = run_cli(capsys, "run", *cfgs)
    assert rc == 2 and "maptrack" in err and "xenstored:" not in out
    # Two guests each within the machine's memory, together beyond it.
    half = phys_memory_mb() // 2 + 1
    cfgs = [str(write_cfg(tmp_path / f"m{i}.cfg", f"name='m{i}'\nmemory={half}\n"))
            for i in range(2)]
    rc, out, err = run_cli(capsys, "run", *cfgs)
    assert rc == 2 and "more than this machine has" in err and "xenstored:" not in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _err = run_cli(capsys, "--version")
    assert rc == 0 and out.strip() == f"gntdma {gntdma.__version__}"


def test_explore_list_names_every_scenario_on_one_line(
        capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _err = run_cli(capsys, "explore", "--list")
    lines = out.strip().splitlines()
    assert rc == 0 and len(lines) == len(SCENARIOS)
    for name, line in zip(SCENARIOS, lines, strict=True):
        assert line.split()[0] == name and len(line.split()) > 1


def test_replay_of_another_scenario_or_corrupt_json_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    rc, _o, _e = run_cli(capsys, "explore", "gnttab-shortage-blkfront",
                         "--callback-delivery", "inline", "--schedules", "200",
                         "--out", str(out))
    assert rc == 1 and out.exists()
    rc, _o, err = run_cli(capsys, "replay", str(out), "--scenario", "busdma-deferred-unload")
    assert rc == 2
    assert "a replay of scenario 'gnttab-shortage-blkfront', not of " \
           "'busdma-deferred-unload'" in err
    doc = json.loads(out.read_text())
    doc["scenario"] = "no-such-scenario"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(doc))
    rc, _o, err = run_cli(capsys, "replay", str(other))
    assert rc == 2 and "'no-such-scenario', which this gntdma does not have" in err
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text(out.read_text()[:50])
    rc, _o, err = run_cli(capsys, "replay", str(corrupt))
    assert rc == 2 and "not JSON" in err and "Traceback" not in err


def test_the_examples_run_and_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "examples"
    shutil.copytree(EXAMPLES, work)
    cfgs = sorted(work.glob("*.cfg"))
    assert len(cfgs) >= 5
    singles = [c for c in cfgs if not c.name.startswith("guest-")]
    for cfg in singles:
        rc, rep, err = run_json(capsys, tmp_path, str(cfg), "--duration", "0.2")
        assert rc == 0 and rep["ok"] is True, (cfg.name, err)
    rc, rep, err = run_json(capsys, tmp_path, str(work / "guest-a.cfg"),
                            str(work / "guest-b.cfg"), "--duration", "0.2")
    assert rc == 0 and rep["ok"] is True, err
    assert [g["name"] for g in rep["guests"]] == ["guest-a", "guest-b"]
