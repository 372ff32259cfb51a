"""SIGINT and SIGTERM at any point of ``gntdma run`` (issue 11 item 7).

The run is a subprocess with ``TMPDIR`` in the test's directory, so that what
it made for itself (temp dirs, the xenstored socket, default images,
snapshot overlays) can be checked to be gone exactly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from run_helpers import spawn, write_cfg


def _wait_for(p: subprocess.Popen[str], marker: str, timeout: float = 60.0) -> list[str]:
    assert p.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if line == "":
            break
        seen.append(line)
        if marker in line:
            return seen
    raise AssertionError(f"{marker!r} never printed; got {seen!r}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize(("marker", "phase"), [
    ("xenstored:", None),                       # while the host is being set up
    ("self-test:", None),                       # self-test or attaching the disks
    ("verified random I/O", "running the workloads"),
])
def test_a_signal_ends_the_run_promptly_and_removes_what_it_made(
        tmp_path: Path, sig: signal.Signals, marker: str, phase: str | None) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    (work / "old.img").write_bytes(bytes(1 << 20))
    cfg = write_cfg(work / "g.cfg", "name='g'\nmemory=16\nmax_grant_frames=2\ndisk=[\n"
                    "  'vdev=xvda, size=8M, target=new.img',\n"
                    "  'vdev=xvdb, target=old.img' ]\n")
    p = spawn(tmp, "run", str(cfg), "--duration", "60", cwd=work)
    try:
        _wait_for(p, marker)
        os.kill(p.pid, sig)
        t0 = time.monotonic()
        _out, err = p.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 128 + sig, err
    assert took < 15
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"interrupted by {sig.name}" in lines[0]
    assert "deadlock" not in err.lower()
    if phase is not None:
        assert phase in lines[0]
    assert os.listdir(tmp) == []  # nothing gntdma made for itself is left
    assert sorted(os.listdir(work)) == ["g.cfg", "new.img", "old.img"]  # the config's stay
    assert (work / "old.img").read_bytes() == bytes(1 << 20)


def test_a_signal_during_the_default_run_removes_its_images(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    p = spawn(tmp, "run", "--duration", "60", cwd=tmp_path)
    try:
        _wait_for(p, "verified random I/O")
        assert any(os.scandir(tmp))  # the default images and the socket live there
        p.send_signal(signal.SIGTERM)
        _out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 143 and "Traceback" not in err
    assert os.listdir(tmp) == []
