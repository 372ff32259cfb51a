"""``gntdma run`` never hangs: grant and memory starvation run to the end, a stall ends
the run with a failed check, a guest's panic crashes that guest only (issue 11, 1-3)."""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import pytest
from run_helpers import run_json, write_cfg

from gntdma.dev.blkback import Blkback


def _disks(tmp: Path, n: int, size: str = "8M") -> str:
    return ", ".join(f"'format=raw, vdev=xvd{'abcd'[i]}, access=rw, size={size}, "
                     f"target={tmp / f'd{i}.img'}'" for i in range(n))


@pytest.mark.parametrize("ndisks", [2, 3, 4])
def test_one_grant_frame_with_several_disks_runs_to_completion(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], ndisks: int) -> None:
    """Rings and indirect pages of several disks held for life used to leave fewer
    references than one large request needs: the deferred load waited forever."""
    cfg = write_cfg(tmp_path / "f1.cfg", f"name='g'\nmemory=64\nmax_grant_frames=1\n"
                    f"disk=[{_disks(tmp_path, ndisks)}]\n")
    rc, rep, err = run_json(capsys, tmp_path, "--duration", "0.5", str(cfg))
    assert rc == 0 and rep["ok"] is True, (err, [c for c in rep.get("checks", [])
                                                 if not c["ok"]])
    # Requests were cut down to fit: the user is told the config can only just run.
    assert rep["warnings"] and all("can only just run" in w for w in rep["warnings"])


def test_memory_3_runs_to_completion(tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Four threads each waiting for a 1 MiB buffer that 3 MiB can never free waited
    forever in malloc(M_WAITOK)."""
    cfg = write_cfg(tmp_path / "m3.cfg", f"name='g'\nmemory=3\n"
                    f"disk=[{_disks(tmp_path, 1)}]\n")
    rc, rep, err = run_json(capsys, tmp_path, "--duration", "0.5", str(cfg))
    assert rc == 0 and rep["ok"] is True, (err, [c for c in rep.get("checks", [])
                                                 if not c["ok"]])


def test_stalled_workload_ends_with_a_failed_check_saying_what_waits(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend that takes requests and never answers: the run ends within the stall
    timeout with a failed check naming the threads and what they wait for."""
    monkeypatch.setattr(Blkback, "_dispatch", lambda self, raw: None)  # never answers
    cfg = write_cfg(tmp_path / "s.cfg", f"name='g'\nmemory=64\n"
                    f"disk=[{_disks(tmp_path, 1)}]\n")
    t0 = time.monotonic()
    rc, rep, _err = run_json(capsys, tmp_path, "--duration", "30", "--stall-timeout", "1",
                             str(cfg))
    assert time.monotonic() - t0 < 25  # not --duration: the stall ended it
    assert rc == 1 and rep["ok"] is False
    (stall,) = [c for c in rep["checks"] if not c["ok"]]
    assert stall["name"] == "the workloads made progress (no stall)"
    assert "no I/O completed" in stall["detail"] and "g/xvda/io0 waits for" in stall["detail"]


def test_panic_in_a_guest_thread_crashes_that_guest_only_and_is_reported(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """DESIGN 3: a KernelPanic in a guest's kernel thread (here blkfront's interrupt
    thread) crashes that domain only: the host goes on, the run ends with a report
    and a failed check naming the guest and the panic."""
    from gntdma.dev.blkfront import xbd_softc
    from gntdma.sched import KernelPanic

    real = xbd_softc.xbd_int

    def panicking(self: xbd_softc, port: int) -> None:
        if self.xbd_kern.name == "victim":
            raise KernelPanic("injected: xbd_int")
        real(self, port)

    monkeypatch.setattr(xbd_softc, "xbd_int", panicking)
    cfg = write_cfg(tmp_path / "v.cfg", f"name='victim'\nmemory=64\n"
                    f"disk=[{_disks(tmp_path, 1)}]\n")
    rc, rep, err = run_json(capsys, tmp_path, "--duration", "2", "--stall-timeout", "1",
                            str(cfg))
    assert rc == 1 and rep["ok"] is False, err
    assert "Traceback" not in err
    assert "injected: xbd_int" in rep["crashed"]["victim"]
    crash = [c for c in rep["checks"] if c["name"] == "victim: no guest crashed"]
    assert crash and not crash[0]["ok"] and "injected: xbd_int" in crash[0]["detail"]
    # The self-test guest and dom0 went on: their checks passed.
    assert all(c["ok"] for c in rep["checks"] if c["name"].startswith("dom0"))


def _open_disk_files() -> list[object]:
    """File views of guest disks still open anywhere in the process (garbage included)."""
    from gntdma.dev.blkfront_io import XbdFile

    return [o for o in gc.get_objects() if isinstance(o, XbdFile) and not o.closed]


def test_a_run_ended_by_a_stall_leaves_no_open_disk_file_behind(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that ends without detaching its disks (a stall here) closes their file
    views at host teardown, without I/O: one left open is flushed by its finalizer
    whenever the garbage collector runs, on whatever scheduler is current then."""
    gc.collect()
    before = len(_open_disk_files())
    monkeypatch.setattr(Blkback, "_dispatch", lambda self, raw: None)  # never answers
    cfg = write_cfg(tmp_path / "s.cfg", f"name='g'\nmemory=64\n"
                    f"disk=[{_disks(tmp_path, 1)}]\n")
    rc, _rep, _err = run_json(capsys, tmp_path, "--duration", "30", "--stall-timeout", "0.5",
                              str(cfg))
    assert rc == 1
    assert len(_open_disk_files()) == before  # checked before any collection


@pytest.mark.timeout(120)
def test_two_runs_in_one_process_the_second_behaves_as_the_first(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What the first run leaves behind must not reach the second: a run that ended on
    a stall, then a good run during which the garbage collector runs (at the start of
    the workloads, the stall watchdog armed): it passes as it does alone."""
    from gntdma.toolstack import mainjob

    with monkeypatch.context() as m:
        m.setattr(Blkback, "_dispatch", lambda self, raw: None)  # never answers
        first = write_cfg(tmp_path / "s.cfg", f"name='g'\nmemory=64\n"
                          f"disk=[{_disks(tmp_path, 1)}]\n")
        rc, _rep, _err = run_json(capsys, tmp_path, "--duration", "30",
                                  "--stall-timeout", "0.5", str(first))
        assert rc == 1
    real = mainjob.verified_random_io

    def collect_first(*args: Any, **kw: Any) -> None:
        gc.collect()
        real(*args, **kw)

    monkeypatch.setattr(mainjob, "verified_random_io", collect_first)
    (tmp_path / "2").mkdir()
    second = write_cfg(tmp_path / "2" / "g.cfg", f"name='g'\nmemory=64\n"
                       f"disk=[{_disks(tmp_path / '2', 1)}]\n")
    rc, rep, err = run_json(capsys, tmp_path, "--duration", "0.3", "--stall-timeout", "2",
                            str(second))
    assert rc == 0 and rep["ok"] is True, (err, [c for c in rep.get("checks", [])
                                                 if not c["ok"]])
