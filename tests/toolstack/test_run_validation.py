"""Every bad config, disk or option is refused before anything runs (issue 11 items 8, 9).

A refused run exits with status 2 and says ``file:line: message``; nothing was
built (no xenstored socket printed) and no file was made. Small but valid
configs and options run and pass.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from run_helpers import gntdma_cmd, phys_memory_mb, run_cli, run_json, subprocess_env, write_cfg


def _refused(capsys: pytest.CaptureFixture[str], tmp_path: Path, text: bytes | str,
             *extra: str) -> str:
    cfg = tmp_path / "bad.cfg"
    if isinstance(text, bytes):
        cfg.write_bytes(text)
    else:
        cfg.write_text(text)
    before = sorted(os.listdir(tmp_path))
    rc, out, err = run_cli(capsys, "run", str(cfg), "--duration", "0.1", *extra)
    assert rc == 2, (out, err)
    assert "xenstored:" not in out and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == before  # nothing made
    return err


@pytest.mark.parametrize(("disk", "line", "message"), [
    ("'vdev=xvda, target=missing.img'", 3, "does not exist (give size= to create it)"),
    ("'vdev=xvda, target=adir'", 3, "is a directory"),
    ("'vdev=xvda, target=odd.img'", 3, "not a positive multiple of 512"),
    ("'vdev=xvda, target=empty.img'", 3, "not a positive multiple of 512"),
    ("'vdev=xvda, size=2M, target=one.img'", 3, "exists with 1048576 bytes, not the size="),
    ("'vdev=xvda, size=16T, target=huge.img'", 3, "free on the file system"),
    ("'vdev=xvda, size=1M, target=nodir/x.img'", 3, "no such directory"),
    ("'vdev=xvda, target=dangling.img'", 3, "symbolic link to nothing"),
])
def test_a_disk_problem_is_refused_before_anything_runs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], disk: str, line: int,
        message: str) -> None:
    (tmp_path / "adir").mkdir()
    (tmp_path / "odd.img").write_bytes(bytes(1000))
    (tmp_path / "empty.img").write_bytes(b"")
    (tmp_path / "one.img").write_bytes(bytes(1 << 20))
    (tmp_path / "dangling.img").symlink_to("nowhere.img")
    err = _refused(capsys, tmp_path, f"name='g'\nmemory=16\ndisk=[{disk}]\n")
    assert f"bad.cfg:{line}: disk xvda: " in err and message in err


@pytest.mark.parametrize(("text", "where", "message"), [
    ("name='g'\nmemory=2\n", "bad.cfg:2", "too small"),
    (f"name='g'\nmemory={(phys_memory_mb() + 1)}\n", "bad.cfg:2", "more than this machine"),
    ("name='g'\nmax_grant_frames=65\n", "bad.cfg:2", "at most 64"),
    ("name='g'\nmax_grant_frames=0\n", "bad.cfg:2", "at least 1"),
    ("name='g'\nmax_maptrack_frames=1025\n", "bad.cfg:2", "at most 1024"),
    ("name='g'\nmemroy=16\n", "bad.cfg:2", "unknown key 'memroy'"),
    (b"name='g\xff'\n", "bad.cfg", "not UTF-8"),
    ("name='g'\ndisk=['vdev=xvda, size=3000, target=x.img']\n", "bad.cfg:2",
     "not a positive multiple of 512"),
])
def test_a_config_problem_is_refused_with_its_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str | bytes, where: str,
        message: str) -> None:
    err = _refused(capsys, tmp_path, text)
    assert f"{where}:" in err and message in err


def test_xl_keys_gntdma_does_not_use_are_accepted_with_a_note(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_cfg(tmp_path / "g.cfg", "name='g'\nmemory=16\nbuilder='generic'\nvcpus=2\n"
                    "on_crash='destroy'\nvif=['bridge=xenbr0, model=e1000']\n")
    rc, out, err = run_cli(capsys, "run", str(cfg), "--duration", "0.1")
    assert rc == 0, err
    assert "g.cfg:3: note: builder is an xl key gntdma does not use (ignored)" in out
    assert "g.cfg:4: note: vcpus" in out and "g.cfg:5: note: on_crash" in out
    assert "g.cfg:6: note: vif: model is an xl vif key gntdma does not use (ignored)" in out


@pytest.mark.parametrize("args", [
    ["run", "--duration", "inf"], ["run", "--duration", "nan"], ["run", "--duration", "-1"],
    ["run", "--duration", "0"], ["run", "--seed", "-1"], ["run", "--seed", str(2**64)],
    ["run", "--threads", "0"], ["run", "--threads", "many"],
    ["explore", "busdma-deferred-unload", "--pct-depth", "0"],
    ["explore", "busdma-deferred-unload", "--max-preemptions", "-1"],
    ["explore", "busdma-deferred-unload", "--schedules", "0"],
    ["explore", "busdma-deferred-unload", "--seed", "-1"],
    ["explore"],
])
def test_absurd_options_get_status_2(capsys: pytest.CaptureFixture[str],
                                     args: list[str]) -> None:
    rc, out, err = run_cli(capsys, *args)
    assert rc == 2, (out, err)
    assert "xenstored:" not in out and "schedules explored" not in out
    assert err.strip() != "" and "Traceback" not in err


def test_output_paths_are_checked_before_the_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        for args in (["run", "--json", str(tmp_path / "nodir" / "r.json")],
                     ["run", "--json", str(tmp_path)],
                     ["explore", "busdma-deferred-unload", "--out",
                      str(tmp_path / "nodir" / "x.json")]):
            rc, out, err = run_cli(capsys, *args)
            assert rc == 2 and ("--json" in err or "--out" in err), (out, err)
            assert "xenstored:" not in out and "schedules explored" not in out
        if os.geteuid() != 0:  # root writes anywhere
            rc, out, err = run_cli(capsys, "run", "--json", str(locked / "r.json"))
            assert rc == 2 and "cannot create" in err
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize(("disks", "extra"), [
    ("'vdev=xvda, access=ro, size=1M, target=ro.img'", []),          # read-only only
    ("'vdev=xvda, size=1536K, target=small.img'", []),               # under 2 MiB
    ("'vdev=xvda, size=512, target=one.img'", []),                   # one sector
    ("", []),                                                        # no disks
    ("'vdev=xvda, size=4M, target=t.img'", ["--threads", "1000"]),   # capped
    ("'vdev=xvda, size=4M, target=d.img'", ["--duration", "0.001"]),
])
def test_valid_small_configs_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  disks: str, extra: list[str]) -> None:
    cfg = write_cfg(tmp_path / "g.cfg", f"name='g'\nmemory=16\ndisk=[{disks}]\n")
    args = [str(cfg), "--duration", "0.1", *extra]
    rc, rep, err = run_json(capsys, tmp_path, *args)
    assert rc == 0 and rep["ok"] is True, (err, rep.get("checks"))
    if "1000" in extra:
        assert rep["threads"] == 64
        assert "note: --threads 1000 capped at 64 per disk" in rep["notes"]
    for d in rep["guests"][0]["disks"]:
        assert d["bytes_verified"] > 0


def test_run_piped_into_head_exits_quietly(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    cmd = " ".join(f"'{a}'" for a in gntdma_cmd("run", "--duration", "0.5"))
    r = subprocess.run(f"{cmd} | head -n 2; exit ${{PIPESTATUS[0]}}", shell=True,
                       executable="/bin/bash", cwd=tmp_path, env=subprocess_env(tmp),
                       capture_output=True, text=True, timeout=120)
    assert len(r.stdout.splitlines()) == 2
    assert r.stderr == "", r.stderr  # no BrokenPipeError, no traceback
    assert r.returncode == 0
    assert os.listdir(tmp) == []
