"""``--trace``, ``--plots``, ``--json``, ``--control`` of run, serve and replay:
refused up front, nothing written for a refused command, nothing left by an
interrupted one but a valid trace (DESIGN 11; issue 15 review)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from tests.toolstack.run_helpers import run_cli, spawn, write_cfg

from gntdma.toolstack.trace import check_trace_file


@pytest.mark.parametrize("cmd", ["run", "serve"])
def test_refused_config_writes_no_trace_and_makes_no_plots_dir(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], cmd: str) -> None:
    bad = write_cfg(tmp_path / "bad.cfg", 'name = "b"\nmemory = 1\n')
    extra = ["--nbd", str(tmp_path / "n.sock")] if cmd == "serve" else []
    rc, out, err = run_cli(capsys, cmd, str(bad), *extra, "--plots", str(tmp_path / "P"),
                           "--trace", str(tmp_path / "t.json"))
    assert rc == 2 and f"{bad}:2:" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.cfg"]
    assert "trace:" not in out


def test_replay_of_a_corrupt_file_writes_no_trace(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    rc, out, _err = run_cli(capsys, "replay", str(bad), "--trace", str(tmp_path / "t.json"))
    assert rc == 2 and "trace:" not in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]


@pytest.mark.parametrize("how", ["same", "dot", "symlink"])
def test_trace_and_json_naming_the_same_file_are_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str) -> None:
    trace = tmp_path / "x.json"
    json_path = {"same": trace, "dot": tmp_path / "." / "x.json",
                 "symlink": tmp_path / "link.json"}[how]
    if how == "symlink":
        json_path.symlink_to(trace)
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, out, err = run_cli(capsys, "run", "--duration", "0.001", "--trace", str(trace),
                           "--json", str(json_path))
    assert rc == 2 and out == "" and "name the same file" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("opt", ["--plots", "--trace", "--json", "--control"])
def test_an_empty_path_option_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, opt: str) -> None:
    monkeypatch.chdir(tmp_path)  # Path("") is ".": the current folder
    rc, out, err = run_cli(capsys, "run", "--duration", "0.001", opt, "")
    assert rc == 2 and out == "" and "empty path" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_run_leaves_no_plots_dir_and_a_valid_trace(
        tmp_path: Path, sig: int, status: int) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("x")
    for plots in (tmp_path / "P", mine):
        trace = tmp_path / "t.json"
        p = spawn(tmp_path, "run", "--duration", "60", "--dashboard", "off", "--plots",
                  str(plots), "--trace", str(trace), cwd=tmp_path)
        assert p.stdout is not None
        deadline = time.monotonic() + 120
        for line in p.stdout:  # the progress lines of the main job: it runs
            if line.lstrip().startswith("[") or time.monotonic() > deadline:
                break
        time.sleep(1.0)
        p.send_signal(sig)
        assert p.wait(timeout=120) == status
        p.stdout.close()
        assert p.stderr is not None
        p.stderr.close()
        assert not (tmp_path / "P").exists()  # the folder gntdma would have made
        assert sorted(os.listdir(mine)) == ["keep.txt"]  # a user's folder stays as it was
        assert check_trace_file(trace) == []
        trace.unlink()


def _cfg_with_image(tmp_path: Path) -> tuple[Path, Path]:
    img = tmp_path / "d.img"
    img.write_bytes(b"\x5a" * (1 << 20))
    cfg = write_cfg(tmp_path / "g.cfg", "name='g'\nmemory=16\n"
                    f"disk=['vdev=xvda, target={img}']\n")
    return cfg, img


@pytest.mark.parametrize("opt", ["--json", "--trace"])
@pytest.mark.parametrize("victim", ["image", "config", "image-via-symlink"])
def test_an_output_option_naming_an_input_of_the_run_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], opt: str, victim: str) -> None:
    """DESIGN 11: an existing image is never overwritten without an explicit option,
    and a run refused before it starts writes nothing: ``--json``/``--trace`` naming
    the config's disk image or the config itself is refused with status 2 and the
    file is left as it was (``--overwrite`` is about images a config creates, not
    about turning one into a report)."""
    cfg, img = _cfg_with_image(tmp_path)
    target = {"image": img, "config": cfg, "image-via-symlink": tmp_path / "l.json"}[victim]
    if victim == "image-via-symlink":
        target.symlink_to(img)
    before = {p: p.read_bytes() for p in (cfg, img)}
    rc, out, err = run_cli(capsys, "run", str(cfg), "--duration", "0.05", opt, str(target))
    assert rc == 2, (out, err)
    assert "would be overwritten" in err and err.count("\n") == 1, err
    assert {p: p.read_bytes() for p in (cfg, img)} == before


def test_replay_trace_onto_the_replay_file_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rp = tmp_path / "r.json"
    rp.write_text('{"format": "gntdma-replay"}\n')
    before = rp.read_bytes()
    rc, _out, err = run_cli(capsys, "replay", str(rp), "--trace", str(rp))
    assert rc == 2 and "would be overwritten" in err, err
    assert rp.read_bytes() == before


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs /proc")
@pytest.mark.parametrize("opt", ["--json", "--trace", "--plots"])
def test_an_output_that_cannot_be_written_is_refused_before_the_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], opt: str) -> None:
    """/proc takes no new file, even from root (for whom ``os.access`` says yes):
    refused with status 2 before anything runs (no report, no check line), one line,
    no traceback (issue 11 item 9)."""
    cfg, _img = _cfg_with_image(tmp_path)
    rc, out, err = run_cli(capsys, "run", str(cfg), "--duration", "0.05", opt,
                           "/proc/gntdma-out")
    assert rc == 2, (out[-500:], err)
    assert out == "" and "Traceback" not in err and err.count("\n") == 1, (out[-500:], err)
    assert "/proc/gntdma-out" in err


def test_an_output_fifo_with_no_reader_is_refused_not_waited_on(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg, _img = _cfg_with_image(tmp_path)
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    rc, out, err = run_cli(capsys, "run", str(cfg), "--duration", "0.05", "--json", str(fifo))
    assert rc == 2 and out == "" and "not writable" in err, err
    assert time.monotonic() - t0 < 30
