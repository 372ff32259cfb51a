"""Fixtures shared by every test: a fresh scheduler and a clean WITNESS."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from gntdma.sched import WITNESS, Scheduler
from gntdma.toolstack.host import Host


@pytest.fixture(autouse=True)
def _no_signal_held_back() -> Iterator[None]:
    """No test leaves a signal blocked in the main thread: every process started
    after it would inherit the mask (seen once: daemons deaf to SIGINT, a pool
    worker deaf to terminate(), a dozen failures far from the cause)."""
    yield
    held = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    if held:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)
        pytest.fail(f"the test left {sorted(s.name for s in held)} blocked")


@pytest.fixture
def sched() -> Iterator[Scheduler]:
    """A fresh run-strategy scheduler, installed for kernel code; torn down after."""
    WITNESS.reset()
    s = Scheduler().install()
    yield s
    s.shutdown()
    Scheduler.uninstall()
    WITNESS.reset()


@pytest.fixture
def host() -> Iterator[Host]:
    """A host with dom0; teardown asserts nothing leaked and WITNESS saw nothing."""
    WITNESS.reset()
    h = Host()
    try:
        yield h
        h.sched.yield_()
        assert h.leaks() == []
        assert WITNESS.reports == [], [r.format() for r in WITNESS.reports]
    finally:
        h.close()
        WITNESS.reset()


def _tree_entries(root: Path) -> set[str]:
    return {p.name for p in root.iterdir()}


_ROOT = Path(__file__).resolve().parent.parent
_CWD_BEFORE: dict[str, set[str]] = {}


def pytest_sessionstart(session: pytest.Session) -> None:
    for d in {_ROOT, Path.cwd()}:
        _CWD_BEFORE[str(d)] = _tree_entries(d)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """No test leaves a file in the repository or the working directory."""
    left: list[str] = []
    for d, before in _CWD_BEFORE.items():
        new = _tree_entries(Path(d)) - before
        new -= {".pytest_cache", ".hypothesis", "__pycache__"}
        left += [f"{d}/{n}" for n in sorted(new)]
    if left:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(f"\ntests left these behind: {', '.join(left)}")
