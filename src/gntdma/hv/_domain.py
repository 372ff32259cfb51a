"""A domain as the hypervisor keeps it: memory, grant table, maptrack, ports."""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import final

from gntdma.abi.event_channel import EVTCHN_2L_NR_CHANNELS
from gntdma.hv._evtchn import EventPort
from gntdma.hv._gnttab import GrantTable, Maptrack
from gntdma.hv._memory import DomainMemory

__all__ = ["Domain", "DomainStatistics"]


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
        #: The grant entries of this domain's physmap: gfn -> (granter, frame)
        #: (``p2m_grant_map_rw``/``_ro`` entries that host maps add).
        self.grant_p2m: dict[int, tuple[int, int]] = {}
        self.ports: dict[int, EventPort] = {}
        #: Closed ports below ``_next_port`` (a heap), and the first never used:
        #: the lowest free port in O(log ports).
        self._free_ports: list[int] = []
        self._next_port = 1
        self.privileged = domid == 0
        self.dying = False

    def __repr__(self) -> str:
        return f"<Domain {self.domid} {self.name}>"

    def _alloc_port(self) -> EventPort | None:
        """``get_free_port`` (xen/common/event_channel.c): the lowest free port
        (port 0 is never handed out), or None when every port is in use."""
        if self._free_ports:
            p = heapq.heappop(self._free_ports)
        elif self._next_port < EVTCHN_2L_NR_CHANNELS:
            p = self._next_port
            self._next_port += 1
        else:
            return None
        ep = EventPort(p)
        self.ports[p] = ep
        return ep

    def _free_port(self, port: int) -> None:
        """``port`` is closed: it is free again."""
        del self.ports[port]
        heapq.heappush(self._free_ports, port)

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
