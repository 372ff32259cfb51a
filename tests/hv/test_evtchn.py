"""Event channels: alloc_unbound, bind (new port pending), send, close, mask, coalescing."""

from __future__ import annotations

import errno

from gntdma.abi.event_channel import EVTCHNSTAT_interdomain, EVTCHNSTAT_unbound
from gntdma.abi.xen import DOMID_SELF
from gntdma.hv import Domain, Hypervisor
from gntdma.sched import Scheduler


def test_bind_send_close_and_coalescing(sched: Scheduler, hv: Hypervisor, dom0: Domain,
                                        guest: Domain) -> None:
    rc, gport = hv.evtchn_alloc_unbound(guest.domid, DOMID_SELF, 0)
    assert rc == 0 and gport != 0
    assert hv.evtchn_status(guest.domid, DOMID_SELF, gport)[1] == EVTCHNSTAT_unbound
    assert hv.evtchn_bind_interdomain(0, guest.domid, 999)[0] == -errno.EINVAL
    rc, bport = hv.evtchn_bind_interdomain(0, guest.domid, gport)
    assert rc == 0
    assert dom0.ports[bport].pending  # the new port starts pending
    seen: list[int] = []
    assert hv.evtchn_bind_handler(0, bport, seen.append) == 0
    sched.yield_()
    assert seen == [bport]
    got: list[int] = []
    hv.evtchn_bind_handler(guest.domid, gport, got.append)
    for _ in range(5):  # coalesce into one delivery
        assert hv.evtchn_send(0, bport) == 0
    sched.yield_()
    assert got == [gport]
    # masked: nothing until unmask, then exactly one
    hv.evtchn_mask(guest.domid, gport)
    hv.evtchn_send(0, bport)
    hv.evtchn_send(0, bport)
    sched.yield_()
    assert got == [gport]
    hv.evtchn_unmask(guest.domid, gport)
    sched.yield_()
    assert got == [gport, gport]
    # close: the remote end goes back to unbound and can be bound again
    assert hv.evtchn_close(0, bport) == 0
    st = hv.evtchn_status(guest.domid, DOMID_SELF, gport)
    assert st[1] == EVTCHNSTAT_unbound and st[2] == 0
    rc, bport2 = hv.evtchn_bind_interdomain(0, guest.domid, gport)
    assert rc == 0
    assert hv.evtchn_status(0, DOMID_SELF, bport2)[1] == EVTCHNSTAT_interdomain
    assert hv.evtchn_send(guest.domid, 4000) == -errno.EINVAL
    assert hv.evtchn_close(0, bport2) == 0
    assert hv.evtchn_close(guest.domid, gport) == 0
    assert hv.statistics().ports == 0


def test_alloc_unbound_for_another_domain_needs_privilege(sched: Scheduler, hv: Hypervisor,
                                                          guest: Domain) -> None:
    assert hv.evtchn_alloc_unbound(guest.domid, 0, 0)[0] == -errno.EPERM
    rc, port = hv.evtchn_alloc_unbound(0, guest.domid, 0)  # dom0 may
    assert rc == 0
    assert hv.evtchn_close(guest.domid, port) == 0
