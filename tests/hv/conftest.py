"""A hypervisor with dom0 and a guest, torn down with a leak check."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gntdma.hv import Domain, Hypervisor
from gntdma.sched import Scheduler


@pytest.fixture
def hv(sched: Scheduler) -> Iterator[Hypervisor]:
    h = Hypervisor()
    h.create_domain("Domain-0", 64)
    h.create_domain("guest", 64, high_pages=8, max_grant_frames=4, max_maptrack_frames=1)
    yield h
    stats = h.statistics()
    assert stats.mappings == 0, stats
    assert stats.grants_pinned == 0, stats
    for domid in sorted(h.domains, reverse=True):
        h.destroy_domain(domid)


@pytest.fixture
def dom0(hv: Hypervisor) -> Domain:
    return hv.domains[0]


@pytest.fixture
def guest(hv: Hypervisor) -> Domain:
    return hv.domains[1]
