"""Fixtures shared by every test: a fresh scheduler and a clean WITNESS."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gntdma.sched import WITNESS, Scheduler
from gntdma.toolstack.host import Host


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
