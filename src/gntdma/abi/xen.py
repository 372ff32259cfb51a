"""Basic Xen types and constants (``xen/xen.h``, ``xen/io/ring.h``).

Xen's page size for every ring, grant and hypercall interface is 4096 bytes
whatever the guest's own page size (``XEN_PAGE_SHIFT`` 12).
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final, NewType

__all__ = [
    "DOMID_COW",
    "DOMID_FIRST_RESERVED",
    "DOMID_IDLE",
    "DOMID_INVALID",
    "DOMID_IO",
    "DOMID_MASK",
    "DOMID_SELF",
    "DOMID_XEN",
    "HYPERVISOR",
    "HYPERVISOR_console_io",
    "HYPERVISOR_event_channel_op",
    "HYPERVISOR_grant_table_op",
    "HYPERVISOR_hvm_op",
    "HYPERVISOR_memory_op",
    "HYPERVISOR_sched_op",
    "HYPERVISOR_xen_version",
    "PAGE_MASK",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "XEN_PAGE_SHIFT",
    "XEN_PAGE_SIZE",
    "DomId",
    "EvtchnPort",
    "GrantHandle",
    "GrantRef",
]

#: A domain id (``domid_t``, u16).
DomId = NewType("DomId", int)
#: A grant reference (``grant_ref_t``, u32): an index into a grant table.
GrantRef = NewType("GrantRef", int)
#: An event channel port (``evtchn_port_t``, u32).
EvtchnPort = NewType("EvtchnPort", int)
#: A grant mapping handle (``grant_handle_t``, u32): an index into a maptrack table.
GrantHandle = NewType("GrantHandle", int)

#: ``XEN_PAGE_SHIFT`` (io/ring.h): log2 of the page size of every Xen interface.
XEN_PAGE_SHIFT: Final = 12
#: ``XEN_PAGE_SIZE``: 4096.
XEN_PAGE_SIZE: Final = 1 << XEN_PAGE_SHIFT
#: The page shift of the emulated host and its guests (same as Xen's).
PAGE_SHIFT: Final = XEN_PAGE_SHIFT
#: The page size of the emulated host and its guests: 4096.
PAGE_SIZE: Final = XEN_PAGE_SIZE
#: FreeBSD's ``PAGE_MASK`` (not Linux's): ``addr & PAGE_MASK`` is the offset in the page.
PAGE_MASK: Final = PAGE_SIZE - 1

#: Domain ids at or above this cannot name an ordinary domain.
DOMID_FIRST_RESERVED: Final = DomId(0x7FF0)
#: "The calling domain" in hypercall arguments.
DOMID_SELF: Final = DomId(0x7FF0)
#: Restricts page-table updates to I/O memory.
DOMID_IO: Final = DomId(0x7FF1)
#: Xen itself, for privileged mappings of its heap.
DOMID_XEN: Final = DomId(0x7FF2)
#: Owner of sharable (copy-on-write) pages.
DOMID_COW: Final = DomId(0x7FF3)
#: Owner of pages with no known owner.
DOMID_INVALID: Final = DomId(0x7FF4)
#: The idle domain.
DOMID_IDLE: Final = DomId(0x7FFF)
#: Mask of the valid bits of a domain id.
DOMID_MASK: Final = DomId(0x7FFF)


class HYPERVISOR(IntEnum):
    """Hypercall numbers (``__HYPERVISOR_*`` in xen/xen.h) that gntdma emulates or names."""

    memory_op = 12  #: ``HYPERVISOR_memory_op``
    xen_version = 17  #: ``HYPERVISOR_xen_version``
    console_io = 18  #: ``HYPERVISOR_console_io``
    grant_table_op = 20  #: ``HYPERVISOR_grant_table_op(cmd, args, count)``
    sched_op = 29  #: ``HYPERVISOR_sched_op``
    event_channel_op = 32  #: ``HYPERVISOR_event_channel_op(cmd, arg)``
    hvm_op = 34  #: ``HYPERVISOR_hvm_op``


HYPERVISOR_memory_op: Final = HYPERVISOR.memory_op
HYPERVISOR_xen_version: Final = HYPERVISOR.xen_version
HYPERVISOR_console_io: Final = HYPERVISOR.console_io
HYPERVISOR_grant_table_op: Final = HYPERVISOR.grant_table_op
HYPERVISOR_sched_op: Final = HYPERVISOR.sched_op
HYPERVISOR_event_channel_op: Final = HYPERVISOR.event_channel_op
HYPERVISOR_hvm_op: Final = HYPERVISOR.hvm_op
