"""The emulated hypervisor: domains, the grant-table and event-channel hypercalls.

Hypercalls take the calling domain's id first (the hypervisor always knows who
calls) and return what Xen returns: ``grant_table_op`` returns 0 or a negative
errno for the call and puts a ``GNTST_*`` status in each result element;
``event_channel_op`` calls return 0 or a negative errno, with out-values after
it. Arguments are the wire structs of :mod:`gntdma.abi`; results are new structs
(they are frozen), in order.

A map returns a handle; :meth:`Hypervisor.mapped_page` hands the mapping domain
a view of exactly that one page, read-only when the grant or the map is, and
the view is released at unmap. Nothing else hands out a foreign page.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Final, final

from gntdma.abi.event_channel import (
    EVTCHN_2L_NR_CHANNELS,
    EVTCHNSTAT_closed,
    EVTCHNSTAT_interdomain,
    EVTCHNSTAT_unbound,
)
from gntdma.abi.grant_table import (
    GNTCOPY_dest_gref,
    GNTCOPY_source_gref,
    GNTMAP_device_map,
    GNTMAP_host_map,
    GNTMAP_readonly,
    GNTST_bad_copy_arg,
    GNTST_bad_dev_addr,
    GNTST_bad_domain,
    GNTST_bad_gntref,
    GNTST_bad_handle,
    GNTST_bad_page,
    GNTST_bad_virt_addr,
    GNTST_general_error,
    GNTST_no_space,
    GNTST_okay,
    GNTST_permission_denied,
    GnttabCopy,
    GnttabCopyPtr,
    GnttabMapGrantRef,
    GNTTABOP_copy,
    GNTTABOP_map_grant_ref,
    GNTTABOP_query_size,
    GNTTABOP_setup_table,
    GNTTABOP_unmap_grant_ref,
    GnttabQuerySize,
    GnttabSetupTable,
    GnttabUnmapGrantRef,
)
from gntdma.abi.xen import DOMID_SELF, PAGE_SHIFT, PAGE_SIZE
from gntdma.hv._evtchn import EventPort, PortHandler
from gntdma.hv._gnttab import GrantTable, Mapping, Maptrack
from gntdma.hv._memory import DomainMemory

__all__ = ["Domain", "DomainStatistics", "HostStatistics", "Hypervisor"]

#: Xen's defaults for the per-domain limits.
DEFAULT_MAX_GRANT_FRAMES: Final = 64
DEFAULT_MAX_MAPTRACK_FRAMES: Final = 1024

# Plain ints: arithmetic on the IntFlag members builds a flag object per use.
_MAP_HOST_OR_DEVICE: Final = int(GNTMAP_host_map | GNTMAP_device_map)
_MAP_DEVICE: Final = int(GNTMAP_device_map)
_MAP_READONLY: Final = int(GNTMAP_readonly)
_COPY_SOURCE_GREF: Final = int(GNTCOPY_source_gref)
_COPY_DEST_GREF: Final = int(GNTCOPY_dest_gref)

GnttabOp = GnttabMapGrantRef | GnttabUnmapGrantRef | GnttabSetupTable | GnttabQuerySize | GnttabCopy

#: cmd -> (Hypervisor method, the struct type every op of the call must be).
_GNTTAB_HANDLERS: Final[dict[int, tuple[str, type]]] = {
    GNTTABOP_map_grant_ref: ("_map", GnttabMapGrantRef),
    GNTTABOP_unmap_grant_ref: ("_unmap", GnttabUnmapGrantRef),
    GNTTABOP_setup_table: ("_setup_table", GnttabSetupTable),
    GNTTABOP_query_size: ("_query_size", GnttabQuerySize),
    GNTTABOP_copy: ("_copy", GnttabCopy),
}


# The per-op results of the hot ops, built directly: what ``replace(op, status=...)``
# gives (the structs are final), without its per-call field walk.
def _map_result(op: GnttabMapGrantRef, status: int) -> GnttabMapGrantRef:
    return GnttabMapGrantRef(op.host_addr, op.flags, op.ref, op.dom, status, op.handle,
                             op.dev_bus_addr)


def _unmap_result(op: GnttabUnmapGrantRef, status: int) -> GnttabUnmapGrantRef:
    return GnttabUnmapGrantRef(op.host_addr, op.dev_bus_addr, op.handle, status)


@dataclass(frozen=True, slots=True)
class DomainStatistics:
    domid: int
    name: str
    grant_frames: int
    grant_entries_in_use: int
    grants_pinned: int
    mappings: int
    maptrack_peak: int
    ports: int


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
class Domain:
    """A domain: id, name, memory, grant table, maptrack and event channels."""

    def __init__(self, domid: int, name: str, memory: DomainMemory,
                 max_grant_frames: int, max_maptrack_frames: int) -> None:
        self.domid = domid
        self.name = name
        self.memory = memory
        self.gnttab = GrantTable(max_grant_frames)
        self.maptrack = Maptrack(max_maptrack_frames)
        self.ports: dict[int, EventPort] = {}
        self.privileged = domid == 0
        self.dying = False

    def __repr__(self) -> str:
        return f"<Domain {self.domid} {self.name}>"

    def _alloc_port(self) -> EventPort | None:
        for p in range(1, EVTCHN_2L_NR_CHANNELS):
            if p not in self.ports:
                ep = EventPort(p)
                self.ports[p] = ep
                return ep
        return None

    def statistics(self) -> DomainStatistics:
        return DomainStatistics(
            self.domid,
            self.name,
            self.gnttab.nr_frames,
            self.gnttab.entries_in_use(),
            len(self.gnttab.active),
            len(self.maptrack.entries),
            self.maptrack.peak,
            len(self.ports),
        )


@final
class Hypervisor:
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
            self._unmap_one(d, h)
        for p in list(d.ports):
            self.evtchn_close(domid, p)
        del self.domains[domid]
        d.gnttab.release()
        d.memory.close()

    def statistics(self) -> HostStatistics:
        return HostStatistics(tuple(d.statistics() for d in self.domains.values()))

    def _resolve(self, caller: Domain, dom: int) -> Domain | None:
        if dom == DOMID_SELF:
            return caller
        return self.domains.get(dom)

    # -- grant tables ---------------------------------------------------------------

    def grant_table_op(self, caller_id: int, cmd: int,
                       ops: Sequence[GnttabOp]) -> tuple[int, list[GnttabOp]]:
        """HYPERVISOR_grant_table_op: (rc, results), one result per op."""
        caller = self.domains.get(caller_id)
        if caller is None:
            return -errno.ESRCH, []
        handler = _GNTTAB_HANDLERS.get(cmd)
        if handler is None:
            return -errno.ENOSYS, []
        name, op_type = handler
        for op in ops:
            if not isinstance(op, op_type):
                return -errno.EFAULT, []
        fn: Callable[[Domain, GnttabOp], GnttabOp] = getattr(self, name)
        return 0, [fn(caller, op) for op in ops]

    def _setup_table(self, caller: Domain, op: GnttabSetupTable) -> GnttabSetupTable:
        d = self._resolve(caller, op.dom)
        if d is None:
            return replace(op, status=GNTST_bad_domain)
        if d is not caller and not caller.privileged:
            return replace(op, status=GNTST_permission_denied)
        if op.nr_frames > d.gnttab.max_frames or not d.gnttab.grow(op.nr_frames):
            return replace(op, status=GNTST_general_error)
        return replace(op, status=GNTST_okay)

    def _query_size(self, caller: Domain, op: GnttabQuerySize) -> GnttabQuerySize:
        d = self._resolve(caller, op.dom)
        if d is None:
            return replace(op, status=GNTST_bad_domain)
        if d is not caller and not caller.privileged:
            return replace(op, status=GNTST_permission_denied)
        return replace(op, nr_frames=d.gnttab.nr_frames, max_nr_frames=d.gnttab.max_frames,
                       status=GNTST_okay)

    def grant_frames(self, caller_id: int) -> list[memoryview]:
        """The caller's own grant-table frames, writable (what setup_table's frame list names)."""
        return list(self.domains[caller_id].gnttab.frames)

    def _map(self, caller: Domain, op: GnttabMapGrantRef) -> GnttabMapGrantRef:
        flags = op.flags
        if not flags & _MAP_HOST_OR_DEVICE:
            return _map_result(op, GNTST_bad_gntref)
        granter = self.domains.get(op.dom)
        if granter is None or granter.dying:
            return _map_result(op, GNTST_bad_domain)
        if op.ref >= granter.gnttab.nr_entries:
            return _map_result(op, GNTST_bad_gntref)
        handle = caller.maptrack.get()
        if handle is None:
            return _map_result(op, GNTST_no_space)
        write = not flags & _MAP_READONLY
        status, frame = granter.gnttab.pin(op.ref, caller.domid, write)
        if status != GNTST_okay:
            caller.maptrack.put(handle)
            return _map_result(op, status)
        if not granter.memory.valid_pfn(frame):
            granter.gnttab.unpin(op.ref, write)
            caller.maptrack.put(handle)
            return _map_result(op, GNTST_bad_page)
        view = granter.memory.page(frame)
        if not write:
            view = view.toreadonly()
        dev_bus_addr = frame << PAGE_SHIFT if flags & _MAP_DEVICE else 0
        caller.maptrack.add(handle, Mapping(granter.domid, op.ref, frame, not write,
                                            op.host_addr, dev_bus_addr, view))
        return GnttabMapGrantRef(op.host_addr, flags, op.ref, op.dom, GNTST_okay, handle,
                                 dev_bus_addr)

    def mapped_page(self, caller_id: int, handle: int) -> memoryview:
        """The view of the page mapped under ``handle`` in the caller's maptrack."""
        m = self.domains[caller_id].maptrack.entries.get(handle)
        if m is None:
            raise KeyError(f"domain {caller_id} has no mapping with handle {handle}")
        return m.view

    def _unmap(self, caller: Domain, op: GnttabUnmapGrantRef) -> GnttabUnmapGrantRef:
        m = caller.maptrack.entries.get(op.handle)
        if m is None:
            return _unmap_result(op, GNTST_bad_handle)
        if op.host_addr != 0 and op.host_addr != m.host_addr:
            return _unmap_result(op, GNTST_bad_virt_addr)
        if op.dev_bus_addr != 0 and op.dev_bus_addr != m.dev_bus_addr:
            return _unmap_result(op, GNTST_bad_dev_addr)
        self._unmap_one(caller, op.handle)
        return _unmap_result(op, GNTST_okay)

    def _unmap_one(self, caller: Domain, handle: int) -> None:
        m = caller.maptrack.entries.pop(handle)
        m.view.release()
        caller.maptrack.put(handle)
        granter = self.domains.get(m.granter)
        if granter is not None:
            granter.gnttab.unpin(m.ref, not m.readonly)

    def _copy(self, caller: Domain, op: GnttabCopy) -> GnttabCopy:
        sides: list[tuple[GnttabCopyPtr, bool]] = [
            (op.source, bool(op.flags & _COPY_SOURCE_GREF)),
            (op.dest, bool(op.flags & _COPY_DEST_GREF)),
        ]
        doms: list[Domain] = []
        for ptr, is_gref in sides:
            if not is_gref and ptr.domid != DOMID_SELF:
                return replace(op, status=GNTST_permission_denied)
            d = self._resolve(caller, ptr.domid)
            if d is None or d.dying:
                return replace(op, status=GNTST_bad_domain)
            doms.append(d)
        if op.source.offset + op.len > PAGE_SIZE or op.dest.offset + op.len > PAGE_SIZE:
            return replace(op, status=GNTST_bad_copy_arg)
        pinned: list[tuple[Domain, int, bool]] = []
        views: list[memoryview] = []
        status: int = GNTST_okay
        for (ptr, is_gref), d, write in zip(sides, doms, (False, True), strict=True):
            if is_gref:
                if ptr.u >= d.gnttab.nr_entries:
                    status = GNTST_bad_gntref
                    break
                st, frame = d.gnttab.pin(ptr.u, caller.domid, write)
                if st != GNTST_okay:
                    status = st
                    break
                pinned.append((d, ptr.u, write))
            else:
                frame = ptr.u
            if not d.memory.valid_pfn(frame):
                status = GNTST_bad_page
                break
            views.append(d.memory.page(frame))
        if status == GNTST_okay:
            src, dst = views
            so, do = op.source.offset, op.dest.offset
            dst[do : do + op.len] = src[so : so + op.len]
        for v in views:
            v.release()
        for d, ref, write in pinned:
            d.gnttab.unpin(ref, write)
        return replace(op, status=status)

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
        del caller.ports[port]
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
