"""Spawned explorer workers leave Ctrl-C to the command.

A terminal sends SIGINT to its whole foreground process group (POSIX, General
Terminal Interface: "the INTR special character ... shall be sent to all
processes in the foreground process group"). A review saw ``gntdma explore
--jobs 2`` print about forty lines of ``Process SpawnProcess-N: Traceback ...
KeyboardInterrupt`` from its workers besides its own one line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gntdma.toolstack.explorepool import local_pool
from gntdma.toolstack.spawnworker import spawn_context


def test_a_pool_worker_ignores_sigint_and_keeps_sigterm() -> None:
    ex = local_pool(1)()
    try:
        assert ex.submit(signal.getsignal, signal.SIGINT).result() == signal.SIG_IGN
        assert ex.submit(signal.getsignal, signal.SIGTERM).result() == signal.SIG_DFL
        assert ex.submit(signal.pthread_sigmask, signal.SIG_BLOCK, []).result() == set()
    finally:
        ex.shutdown()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # pytest's, here
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == set()


@pytest.mark.parametrize("held", [(), (signal.SIGTERM,)])
def test_a_worker_still_ends_on_sigterm(held: tuple[int, ...]) -> None:
    """Also when the starting thread held SIGTERM blocked (the mask crosses exec)."""
    p = spawn_context().Process(target=time.sleep, args=(60,), daemon=True)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        p.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    deadline = time.monotonic() + 30
    while p.pid is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)
    p.terminate()
    p.join(30)
    assert p.exitcode == -signal.SIGTERM


def test_a_sigint_while_the_child_starts_is_dropped_not_raised() -> None:
    """A SIGINT sent while the child is still starting (SIGINT blocked, inherited from
    the parent) is dropped when the child ignores it, not raised once it unblocks."""
    p = spawn_context().Process(target=time.sleep, args=(1.5,), daemon=True)
    p.start()
    assert p.pid is not None
    os.kill(p.pid, signal.SIGINT)  # at once: the child is still importing
    time.sleep(0.3)
    os.kill(p.pid, signal.SIGINT)
    p.join(30)
    assert p.exitcode == 0


@pytest.mark.parametrize("delay", [0.3, 0.6])
def test_ctrl_c_to_the_process_group_prints_one_line(tmp_path: Path, delay: float) -> None:
    t = tmp_path / "t"
    t.mkdir()
    gntdma = Path(sys.executable).with_name("gntdma")
    p = subprocess.Popen([str(gntdma), "explore", "gnttab-shortage-blkfront", "--schedules",
                          "3000", "--jobs", "2", "--out", "f.json"], cwd=tmp_path,
                         env=dict(os.environ, TMPDIR=str(t)), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    time.sleep(delay)
    os.killpg(p.pid, signal.SIGINT)
    _out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert err == "gntdma explore: interrupted by SIGINT\n"
    assert list(t.iterdir()) == [] and not (tmp_path / "f.json").exists()
