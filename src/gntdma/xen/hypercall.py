"""The guest's hypercall shim: the one place guest code reaches the hypervisor.

Everything in :mod:`gntdma.xen` and the drivers above talks to the emulated Xen
through a :class:`Hypercalls` object bound to its own domain id, exactly as a
guest's ``HYPERVISOR_*`` calls trap with the caller known to Xen. It also
holds the kernel's range of addresses for foreign pages (:attr:`Hypercalls.foreign`),
where grant maps are placed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import final

from gntdma.hv import Hypervisor
from gntdma.hv._hypervisor import GnttabOp
from gntdma.xen.foreign import ForeignPages

__all__ = ["GnttabOp", "Hypercalls"]


@final
class Hypercalls:
    """Hypercalls of one domain."""

    def __init__(self, hv: Hypervisor, domid: int) -> None:
        self._hv = hv
        self.domid = domid
        #: Host addresses for the grants this kernel maps (one allocator per kernel).
        self.foreign = ForeignPages()

    def grant_table_op(self, cmd: int, ops: Sequence[GnttabOp]) -> tuple[int, list[GnttabOp]]:
        """HYPERVISOR_grant_table_op: (rc, results)."""
        return self._hv.grant_table_op(self.domid, cmd, ops)

    def grant_table_op_raw(self, cmd: int, buf: bytearray | memoryview, count: int) -> int:
        """HYPERVISOR_grant_table_op on ``count`` packed op structs in ``buf``: rc.

        The array form: results are written back into ``buf`` in place, with no
        object per op (:meth:`gntdma.hv.Hypervisor.grant_table_op_raw`).
        """
        return self._hv.grant_table_op_raw(self.domid, cmd, buf, count)

    def grant_frames(self) -> list[memoryview]:
        """Map this domain's own grant-table frames (after setup_table)."""
        return self._hv.grant_frames(self.domid)

    def mapped_page(self, handle: int) -> memoryview:
        """The page this domain mapped under ``handle``."""
        return self._hv.mapped_page(self.domid, handle)

    def mapped_pages(self, handles: Sequence[int]) -> list[memoryview]:
        """The pages this domain mapped under ``handles``, in order."""
        return self._hv.mapped_pages(self.domid, handles)

    def own_page(self, pfn: int) -> memoryview:
        """One of this domain's own pseudo-physical pages."""
        return self._hv.domains[self.domid].memory.page(pfn)

    def evtchn_alloc_unbound(self, remote_dom: int, dom: int = 0x7FF0) -> tuple[int, int]:
        return self._hv.evtchn_alloc_unbound(self.domid, dom, remote_dom)

    def evtchn_bind_interdomain(self, remote_dom: int, remote_port: int) -> tuple[int, int]:
        return self._hv.evtchn_bind_interdomain(self.domid, remote_dom, remote_port)

    def evtchn_send(self, port: int) -> int:
        return self._hv.evtchn_send(self.domid, port)

    def evtchn_close(self, port: int) -> int:
        return self._hv.evtchn_close(self.domid, port)

    def evtchn_mask(self, port: int) -> int:
        return self._hv.evtchn_mask(self.domid, port)

    def evtchn_unmask(self, port: int) -> int:
        return self._hv.evtchn_unmask(self.domid, port)

    def evtchn_bind_handler(self, port: int, fn: Callable[[int], None], name: str = "") -> int:
        return self._hv.evtchn_bind_handler(self.domid, port, fn, name)

    def evtchn_unbind_handler(self, port: int) -> int:
        return self._hv.evtchn_unbind_handler(self.domid, port)
