"""``gntdma explore --dask`` on workers that share a process, addresses Dask cannot
use, and ``--merge`` given campaign options its shard files contradict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gntdma import cli


def _explore(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = cli.main(["explore", *args])
    got = capsys.readouterr()
    return rc, got.out, got.err


def _same_report(a: str, b: str) -> None:
    """Two reports equal but for the time taken (the first line's end)."""
    la, lb = a.splitlines(), b.splitlines()
    assert la[0].split(" in ")[0] == lb[0].split(" in ")[0]
    strip = [x for x in la[1:] if not x.startswith("replay file:")]
    assert strip == [x for x in lb[1:] if not x.startswith("replay file:")]


@pytest.mark.parametrize(("scenario", "seed", "schedules", "status"),
                         [("busdma-deferred-unload", "5", "30", 0), ("lost-wakeup", "1", "40", 1)])
def test_dask_worker_runs_one_schedule_at_a_time_per_process(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], scenario: str, seed: str,
        schedules: str, status: int) -> None:
    """Two workers of two threads each in this process: schedules share process-wide
    state (the installed scheduler, WITNESS), so they must take turns; the report and
    the replay file are those of one process."""
    import dask
    import distributed

    common = [scenario, "--seed", seed, "--schedules", schedules, "--dashboard", "off"]
    rc1, one, _ = _explore(capsys, *common, "--out", str(tmp_path / "one.json"))
    assert rc1 == status, one
    with dask.config.set({"temporary-directory": str(tmp_path)}), distributed.LocalCluster(
            n_workers=2, threads_per_worker=2, processes=False, protocol="tcp://",
            dashboard_address=None, local_directory=str(tmp_path)) as cluster:
        rc2, out, err = _explore(capsys, *common, "--dask", cluster.scheduler_address,
                                 "--out", str(tmp_path / "dask.json"))
    assert rc2 == rc1, (out, err)
    _same_report(one, out)
    if status == 1:
        assert (json.loads((tmp_path / "one.json").read_text())
                == json.loads((tmp_path / "dask.json").read_text()))
    else:
        assert not (tmp_path / "dask.json").exists()


@pytest.mark.parametrize("address", ["inproc://192.0.2.1/1/1", "foo://x", "tcp://"])
def test_dask_address_this_process_cannot_use_is_refused(
        capsys: pytest.CaptureFixture[str], address: str) -> None:
    """An inproc:// address of another process, an unknown scheme, no port: status 2
    and one line, no traceback."""
    pytest.importorskip("distributed")
    rc, _, err = _explore(capsys, "lost-wakeup", "--schedules", "3", "--dask", address)
    assert rc == 2
    assert err.startswith(f"gntdma explore: --dask {address}: not an address"), err
    assert len(err.strip().splitlines()) == 1, err


def test_merge_refuses_campaign_options_the_shard_files_set(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = []
    for i in (1, 2):
        f = str(tmp_path / f"s{i}.json")
        rc, out, err = _explore(capsys, "lost-wakeup", "--seed", "1", "--schedules", "20",
                                "--shard", f"{i}/2", "--out-results", f)
        assert rc in (0, 1), err
        files.append(f)
    rc, _, err = _explore(capsys, "abba-callout", "--merge", *files)
    assert rc == 2
    assert "the scenario abba-callout cannot be given with it" in err
    rc, _, err = _explore(capsys, "--strategy", "dfs", "--seed", "99", "--merge", *files)
    assert rc == 2
    assert "--strategy dfs, --seed 99 cannot be given with it" in err
    rc, _, err = _explore(capsys, "--seed", "0", "--merge", *files)  # the default, given
    assert rc == 2 and "--seed 0" in err
    rc, out, err = _explore(capsys, "--merge", *files, "--dashboard", "off",
                            "--out", str(tmp_path / "m.json"))
    assert rc in (0, 1), err
    assert out.startswith("merged 2 of 2 shards"), out
