"""Fixtures shared by every test: a fresh scheduler and a clean WITNESS."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gntdma.sched import WITNESS, Scheduler


@pytest.fixture
def sched() -> Iterator[Scheduler]:
    """A fresh run-strategy scheduler, installed for kernel code; torn down after."""
    WITNESS.reset()
    s = Scheduler().install()
    yield s
    s.shutdown()
    Scheduler.uninstall()
    WITNESS.reset()
