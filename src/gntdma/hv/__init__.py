"""The emulated Xen hypervisor: domains, memory, grant tables, maptrack, event channels."""

from gntdma.hv._evtchn import EventPort, PortHandler
from gntdma.hv._gnttab import (
    INITIAL_NR_GRANT_FRAMES,
    MAPTRACK_PER_FRAME,
    GrantTable,
    Mapping,
    Maptrack,
)
from gntdma.hv._grantops import map_grant_ref_op, unmap_grant_ref_op
from gntdma.hv._hypervisor import (
    DEFAULT_MAX_GRANT_FRAMES,
    DEFAULT_MAX_MAPTRACK_FRAMES,
    Domain,
    DomainStatistics,
    HostStatistics,
    Hypervisor,
)
from gntdma.hv._memory import HIGHMEM_START_PFN, DomainMemory

__all__ = [
    "DEFAULT_MAX_GRANT_FRAMES",
    "DEFAULT_MAX_MAPTRACK_FRAMES",
    "HIGHMEM_START_PFN",
    "INITIAL_NR_GRANT_FRAMES",
    "MAPTRACK_PER_FRAME",
    "Domain",
    "DomainMemory",
    "DomainStatistics",
    "EventPort",
    "GrantTable",
    "HostStatistics",
    "Hypervisor",
    "Mapping",
    "Maptrack",
    "PortHandler",
    "map_grant_ref_op",
    "unmap_grant_ref_op",
]
