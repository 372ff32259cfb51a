"""The emulated hypervisor: domains, the grant-table and event-channel hypercalls.

Hypercalls take the calling domain's id first (the hypervisor always knows who
calls) and return what Xen returns: ``grant_table_op`` returns 0 or a negative
errno for the call and puts a ``GNTST_*`` status in each result element;
``event_channel_op`` calls return 0 or a negative errno, with out-values after
it. Arguments are the wire structs of :mod:`gntdma.abi`; results are new structs
(they are frozen), in order.

The grant-table ops are in :mod:`gntdma.hv._grantops`. A host map is placed at
the host address the mapper chose and returns a handle; unmap names both.
:meth:`Hypervisor.mapped_page` hands the mapping domain a view of exactly that
one page, read-only when the map is, released when the host half is unmapped.
Nothing else hands out a foreign page.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, final

from gntdma.abi.event_channel import (
    EVTCHNSTAT_closed,
    EVTCHNSTAT_interdomain,
    EVTCHNSTAT_unbound,
)
from gntdma.abi.xen import DOMID_SELF
from gntdma.hv._domain import Domain, DomainStatistics
from gntdma.hv._evtchn import PortHandler
from gntdma.hv._grantops import GnttabOp, GrantOps
from gntdma.hv._memory import DomainMemory

__all__ = ["Domain", "DomainStatistics", "GnttabOp", "HostStatistics", "Hypervisor"]

#: Xen's defaults for the per-domain limits.
DEFAULT_MAX_GRANT_FRAMES: Final = 64
DEFAULT_MAX_MAPTRACK_FRAMES: Final = 1024


@dataclass(frozen=True, slots=True)
class HostStatistics:
    domains: tuple[DomainStatistics, ...]

    @property
    def mappings(self) -> int:
        return sum(d.mappings for d in self.domains)

    @property
    def ports(self) -> int:
        return sum(d.ports for d in self.domains)

    @property
    def grants_pinned(self) -> int:
        return sum(d.grants_pinned for d in self.domains)


@final
class Hypervisor(GrantOps):
    """The emulated Xen: creates domains and answers their hypercalls."""

    def __init__(self) -> None:
        self.domains: dict[int, Domain] = {}
        self._next_domid = 1

    # -- domains ----------------------------------------------------------------------

    def create_domain(
        self,
        name: str,
        memory_pages: int,
        *,
        high_pages: int = 0,
        max_grant_frames: int = DEFAULT_MAX_GRANT_FRAMES,
        max_maptrack_frames: int = DEFAULT_MAX_MAPTRACK_FRAMES,
        domid: int | None = None,
    ) -> Domain:
        """Create a domain; the first one created without a domid is dom0 if none exists."""
        if domid is None:
            if 0 not in self.domains:
                domid = 0
            else:
                domid = self._next_domid
                self._next_domid += 1
        if domid in self.domains or not 0 <= domid < DOMID_SELF:
            raise ValueError(f"domid {domid} is in use or invalid")
        if max_maptrack_frames < 0:
            raise ValueError("max_maptrack_frames must not be negative")
        d = Domain(domid, name, DomainMemory(memory_pages, high_pages), max_grant_frames,
                   max_maptrack_frames)
        self.domains[domid] = d
        return d

    def destroy_domain(self, domid: int) -> None:
        """Tear a domain down: its mappings of others, its ports, its memory.

        Mappings *of* its pages held by other domains keep the memory alive in
        Xen; here the views are released with the domain, so callers unmap first.
        """
        d = self.domains[domid]
        d.dying = True
        for h in list(d.maptrack.entries):
            self._unmap_all(d, h)
        for p in list(d.ports):
            self.evtchn_close(domid, p)
        del self.domains[domid]
        d.gnttab.release()
        d.memory.close()

    def statistics(self) -> HostStatistics:
        return HostStatistics(tuple(d.statistics() for d in self.domains.values()))

    # -- event channels ---------------------------------------------------------------

    def evtchn_alloc_unbound(self, caller_id: int, dom: int, remote_dom: int) -> tuple[int, int]:
        """EVTCHNOP_alloc_unbound: (rc, port)."""
        caller = self.domains[caller_id]
        d = self._resolve(caller, dom)
        if d is None:
            return -errno.ESRCH, 0
        if d is not caller and not caller.privileged:
            return -errno.EPERM, 0
        remote = d.domid if remote_dom == DOMID_SELF else remote_dom
        p = d._alloc_port()
        if p is None:
            return -errno.ENOSPC, 0
        p.state = EVTCHNSTAT_unbound
        p.remote_dom = remote
        return 0, p.port

    def evtchn_bind_interdomain(self, caller_id: int, remote_dom: int,
                                remote_port: int) -> tuple[int, int]:
        """EVTCHNOP_bind_interdomain: (rc, local_port); the new port starts pending."""
        caller = self.domains[caller_id]
        rd = self._resolve(caller, remote_dom)
        if rd is None:
            return -errno.ESRCH, 0
        rp = rd.ports.get(remote_port)
        if rp is None or rp.state != EVTCHNSTAT_unbound or rp.remote_dom != caller.domid:
            return -errno.EINVAL, 0
        lp = caller._alloc_port()
        if lp is None:
            return -errno.ENOSPC, 0
        lp.state = EVTCHNSTAT_interdomain
        lp.remote_dom, lp.remote_port = rd.domid, rp.port
        rp.state = EVTCHNSTAT_interdomain
        rp.remote_dom, rp.remote_port = caller.domid, lp.port
        lp.raise_()
        return 0, lp.port

    def evtchn_send(self, caller_id: int, port: int) -> int:
        """EVTCHNOP_send: raise the peer of an interdomain port."""
        caller = self.domains[caller_id]
        p = caller.ports.get(port)
        if p is None:
            return -errno.EINVAL
        p.sends += 1
        if p.state == EVTCHNSTAT_interdomain:
            rd = self.domains.get(p.remote_dom)
            if rd is not None:
                rp = rd.ports.get(p.remote_port)
                if rp is not None:
                    rp.raise_()
        return 0

    def evtchn_close(self, caller_id: int, port: int) -> int:
        """EVTCHNOP_close; the remote end of an interdomain port goes back to unbound."""
        caller = self.domains[caller_id]
        p = caller.ports.get(port)
        if p is None:
            return -errno.EINVAL
        if p.state == EVTCHNSTAT_interdomain:
            rd = self.domains.get(p.remote_dom)
            rp = rd.ports.get(p.remote_port) if rd is not None else None
            if rp is not None:
                rp.state = EVTCHNSTAT_unbound
                rp.remote_dom = caller.domid
                rp.remote_port = 0
        if p.handler is not None:
            p.handler.stop()
            p.handler = None
        p.state = EVTCHNSTAT_closed
        caller._free_port(port)
        return 0

    def evtchn_mask(self, caller_id: int, port: int) -> int:
        p = self.domains[caller_id].ports.get(port)
        if p is None:
            return -errno.EINVAL
        p.masked = True
        return 0

    def evtchn_unmask(self, caller_id: int, port: int) -> int:
        """EVTCHNOP_unmask: clear the mask and re-deliver a pending port."""
        p = self.domains[caller_id].ports.get(port)
        if p is None:
            return -errno.EINVAL
        p.masked = False
        if p.pending and p.handler is not None:
            p.handler.kick()
        return 0

    def evtchn_status(self, caller_id: int, dom: int, port: int) -> tuple[int, int, int, int]:
        """EVTCHNOP_status: (rc, state, remote_dom, remote_port)."""
        caller = self.domains[caller_id]
        d = self._resolve(caller, dom)
        if d is None:
            return -errno.ESRCH, 0, 0, 0
        if d is not caller and not caller.privileged:
            return -errno.EPERM, 0, 0, 0
        p = d.ports.get(port)
        if p is None:
            return 0, EVTCHNSTAT_closed, 0, 0
        return 0, p.state, p.remote_dom, p.remote_port

    def evtchn_bind_handler(self, caller_id: int, port: int, fn: Callable[[int], None],
                            name: str = "") -> int:
        """Run ``fn(port)`` on an interrupt thread of the caller for each delivery.

        This is the guest's upcall path (the evtchn ithread), not a hypercall.
        A port that is already pending is delivered at once.
        """
        d = self.domains[caller_id]
        p = d.ports.get(port)
        if p is None:
            return -errno.EINVAL
        if p.handler is not None:
            return -errno.EBUSY
        p.handler = PortHandler(p, fn, name or f"intr{d.domid}:{port}", d)
        if p.pending:
            p.handler.kick()
        return 0

    def evtchn_unbind_handler(self, caller_id: int, port: int) -> int:
        p = self.domains[caller_id].ports.get(port)
        if p is None or p.handler is None:
            return -errno.EINVAL
        p.handler.stop()
        p.handler = None
        return 0
