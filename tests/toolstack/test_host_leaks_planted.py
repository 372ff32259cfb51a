"""Host.leaks on the host the explorer builds for every schedule: a leak planted of each
kind the teardown checks (kernel memory, bus_dma objects, grant references and
entries, a grantee's mapping and pin, an event channel) is listed, in the host's words,
and once each is given back nothing is."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gntdma.abi.grant_table import (
    GNTMAP_host_map,
    GNTST_okay,
    GnttabMapGrantRef,
    GNTTABOP_map_grant_ref,
    GNTTABOP_unmap_grant_ref,
    GnttabUnmapGrantRef,
)
from gntdma.abi.xen import PAGE_SIZE
from gntdma.sched import RandomStrategy, Scheduler, VirtualClock, Witness
from gntdma.sys import (
    BUS_SPACE_MAXADDR,
    M_DEVBUF,
    M_WAITOK,
    bus_dma_tag_create,
    bus_dma_tag_destroy,
)
from gntdma.toolstack.host import Host
from gntdma.xen.busdma import xen_get_dma_tag


@pytest.fixture
def host() -> Iterator[Host]:
    s = Scheduler(strategy=RandomStrategy(3), clock=VirtualClock(), io_mode="inline",
                  witness=Witness()).install()
    h = Host(sched=s, dom0_memory_mb=4)
    yield h
    h.close()
    s.shutdown()
    Scheduler.uninstall()


def test_each_planted_leak_is_listed_and_none_once_given_back(host: Host) -> None:
    g = host.create_guest("guest1", memory_mb=8, max_grant_frames=1)
    k, gt, dom0 = g.kernel, g.gnttab, host.dom0
    assert host.leaks() == []
    va = k.malloc(3 * PAGE_SIZE - 512, M_DEVBUF, M_WAITOK)
    error, tag = bus_dma_tag_create(xen_get_dma_tag(k), 512, PAGE_SIZE, BUS_SPACE_MAXADDR,
                                    BUS_SPACE_MAXADDR, PAGE_SIZE, 1, PAGE_SIZE, 0, None, None)
    assert error == 0 and tag is not None
    error, head = gt.gnttab_alloc_grant_references(2)
    assert error == 0
    error, ref = gt.gnttab_grant_foreign_access(0, k.vtophys(va) >> 12, False)
    assert error == 0
    error, addr = dom0.hc.foreign.alloc()
    assert error == 0
    _, (m,) = dom0.hc.grant_table_op(GNTTABOP_map_grant_ref, [GnttabMapGrantRef(
        host_addr=addr, flags=GNTMAP_host_map, ref=ref, dom=g.domid)])
    assert isinstance(m, GnttabMapGrantRef) and m.status == GNTST_okay
    rc, port = g.hc.evtchn_alloc_unbound(0)
    assert rc == 0
    assert host.leaks() == [
        "Domain-0: 1 grant mappings still held",
        "guest1: 1 grant entries still pinned",
        "guest1: 1 event channels open",
        "guest1: 3 grant references not freed",
        "guest1: 1 grant entries still granted",
        "guest1: malloc type devbuf: 12288 bytes in 1 allocations",
        "guest1: 3 physical pages in use",
        "guest1: 3 kernel virtual pages mapped",
        "guest1: 1 bus_dma tags alive",
    ]
    dom0.hc.grant_table_op(GNTTABOP_unmap_grant_ref,
                           [GnttabUnmapGrantRef(host_addr=addr, handle=m.handle)])
    dom0.hc.foreign.free(addr)
    assert gt.gnttab_end_foreign_access(ref) == 1
    g.hc.evtchn_close(port)
    gt.gnttab_free_grant_references(head.head)
    bus_dma_tag_destroy(tag)
    k.free(va, M_DEVBUF)
    host.sched.run(until=lambda: k.statistics().taskqueue_pending == 0)
    assert host.leaks() == []
