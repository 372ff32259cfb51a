"""``GNTTABOP_*`` as Xen 4.17 answers them (``xen/common/grant_table.c``).

Host addresses. gntdma's mappers are auto-translated, like a PVH dom0 or an HVM
driver domain (x86 ``create_grant_p2m_mapping`` / ``replace_grant_p2m_mapping``
in ``xen/arch/x86/hvm/grant_table.c``; Arm's ``create_grant_host_mapping`` is
the same): a host map puts a grant entry in the mapper's physmap at gfn
``host_addr >> PAGE_SHIFT`` (the low bits are ignored, as there); the
hypervisor records it, and an unmap whose ``host_addr`` is not 0 removes the
grant entry at that gfn, which must map the same frame, else
``GNTST_general_error`` and the mapping stays. A gfn already holding a grant
mapping is refused (``p2m_add_page``: -EPERM, and Xen also crashes the mapper;
here only the status). A gfn of the mapper's own RAM is refused too
(``GNTST_general_error``), where Xen would silently replace the RAM page: a
mapper takes its addresses from a range with no RAM behind it
(:mod:`gntdma.xen.foreign`, like Linux's unpopulated-alloc and FreeBSD's
``xenmem_alloc``), so gntdma does not model holes punched in a physmap.

Device maps. Xen refuses ``GNTMAP_device_map`` to a translated mapper ("No
device mapping in HVM domain", ``GNTST_general_error``); gntdma keeps the device
half as a PV mapper has it, pinned with ``GNTPIN_dev*`` and removed by an unmap
that gives ``dev_bus_addr``, separately from the host half. The PV page-table
forms (``GNTMAP_application_map``, ``GNTMAP_contains_pte``) are
``GNTST_general_error`` as for a translated mapper. Every successful map
returns ``dev_bus_addr`` (``mfn_to_maddr(mfn)``); the machine frame of a page
here is its frame number in the granter (no host-wide machine space).
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Final

from gntdma.abi.grant_table import (
    GNTTAB_NR_RESERVED_ENTRIES,
    GNTCOPY_dest_gref,
    GNTCOPY_source_gref,
    GNTMAP_application_map,
    GNTMAP_contains_pte,
    GNTMAP_device_map,
    GNTMAP_host_map,
    GNTMAP_readonly,
    GNTST_bad_copy_arg,
    GNTST_bad_dev_addr,
    GNTST_bad_domain,
    GNTST_bad_gntref,
    GNTST_bad_handle,
    GNTST_bad_page,
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
from gntdma.hv._domain import Domain
from gntdma.hv._gnttab import (
    GNTPIN_devr_inc,
    GNTPIN_devw_inc,
    GNTPIN_hstr_inc,
    GNTPIN_hstw_inc,
    Mapping,
)

__all__ = ["GnttabOp", "GrantOps"]

# Plain ints: arithmetic on the IntFlag members builds a flag object per use.
_HOST: Final = int(GNTMAP_host_map)
_DEVICE: Final = int(GNTMAP_device_map)
_READONLY: Final = int(GNTMAP_readonly)
_HALVES: Final = _HOST | _DEVICE
_PV_ONLY: Final = int(GNTMAP_application_map | GNTMAP_contains_pte)
_COPY_SOURCE_GREF: Final = int(GNTCOPY_source_gref)
_COPY_DEST_GREF: Final = int(GNTCOPY_dest_gref)

GnttabOp = GnttabMapGrantRef | GnttabUnmapGrantRef | GnttabSetupTable | GnttabQuerySize | GnttabCopy

#: cmd -> (method, the struct every op must be, whether the call takes exactly one op:
#: ``gnttab_setup_table`` and ``gnttab_query_size`` return -EINVAL for a count other than 1).
_GNTTAB_HANDLERS: Final[dict[int, tuple[str, type, bool]]] = {
    GNTTABOP_map_grant_ref: ("_map", GnttabMapGrantRef, False),
    GNTTABOP_unmap_grant_ref: ("_unmap", GnttabUnmapGrantRef, False),
    GNTTABOP_setup_table: ("_setup_table", GnttabSetupTable, True),
    GNTTABOP_query_size: ("_query_size", GnttabQuerySize, True),
    GNTTABOP_copy: ("_copy", GnttabCopy, False),
}


# The per-op results of the hot ops, built directly: what ``replace(op, status=...)``
# gives (the structs are final), without its per-call field walk.
def _map_result(op: GnttabMapGrantRef, status: int) -> GnttabMapGrantRef:
    return GnttabMapGrantRef(op.host_addr, op.flags, op.ref, op.dom, status, op.handle,
                             op.dev_bus_addr)


def _unmap_result(op: GnttabUnmapGrantRef, status: int) -> GnttabUnmapGrantRef:
    return GnttabUnmapGrantRef(op.host_addr, op.dev_bus_addr, op.handle, status)


def _pin_incr(flags: int, half: int) -> int:
    """The ``GNTPIN_*_inc`` of one half of a mapping with ``flags``."""
    if half == _DEVICE:
        return GNTPIN_devr_inc if flags & _READONLY else GNTPIN_devw_inc
    return GNTPIN_hstr_inc if flags & _READONLY else GNTPIN_hstw_inc


class GrantOps:
    """The grant-table hypercalls of :class:`gntdma.hv.Hypervisor`."""

    domains: dict[int, Domain]

    def _resolve(self, caller: Domain, dom: int) -> Domain | None:
        if dom == DOMID_SELF:
            return caller
        return self.domains.get(dom)

    def grant_table_op(self, caller_id: int, cmd: int,
                       ops: Sequence[GnttabOp]) -> tuple[int, list[GnttabOp]]:
        """HYPERVISOR_grant_table_op: (rc, results), one result per op."""
        caller = self.domains.get(caller_id)
        if caller is None:
            return -errno.ESRCH, []
        handler = _GNTTAB_HANDLERS.get(cmd)
        if handler is None:
            return -errno.ENOSYS, []
        name, op_type, single = handler
        if single and len(ops) != 1:
            return -errno.EINVAL, []
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

    def gnttab_seed(self, caller_id: int, domid: int, ref: int, grantee: int, frame: int,
                    flags: int) -> int:
        """Write reserved entry ``ref`` of ``domid``'s grant table: 0 or -errno.

        What a toolstack in a privileged domain does with ``xc_dom_gnttab_seed``
        (``tools/libs/guest/xg_dom_boot.c``): map the new domain's first grant
        frame and fill in the console and xenstore entries, domid and frame
        first, then flags. Only a privileged caller (-EPERM), only a live domain
        (-ESRCH), only the reserved entries 0..7 (-EINVAL).
        """
        caller = self.domains.get(caller_id)
        if caller is None or not caller.privileged:
            return -errno.EPERM
        d = self.domains.get(domid)
        if d is None or d.dying:
            return -errno.ESRCH
        if not 0 <= ref < GNTTAB_NR_RESERVED_ENTRIES:
            return -errno.EINVAL
        d.gnttab.write(ref, flags, grantee, frame)
        return 0

    def _map(self, caller: Domain, op: GnttabMapGrantRef) -> GnttabMapGrantRef:
        # The order of map_grant_ref: flags, domain, maptrack handle, ref, pins,
        # then the host mapping (undone, pins and handle, if it fails).
        flags = op.flags
        if flags & _HALVES == 0:
            return _map_result(op, GNTST_bad_gntref)
        if flags & _PV_ONLY:
            return _map_result(op, GNTST_general_error)
        granter = self.domains.get(op.dom)
        if granter is None or granter.dying:
            return _map_result(op, GNTST_bad_domain)
        handle = caller.maptrack.get()
        if handle is None:
            return _map_result(op, GNTST_no_space)
        if op.ref >= granter.gnttab.nr_entries:
            caller.maptrack.put(handle)
            return _map_result(op, GNTST_bad_gntref)
        readonly = flags & _READONLY != 0
        incr = (_pin_incr(flags, _DEVICE) if flags & _DEVICE else 0) + \
               (_pin_incr(flags, _HOST) if flags & _HOST else 0)
        status, frame = granter.gnttab.pin(op.ref, caller.domid, incr, readonly, True,
                                           granter.memory.valid_pfn)
        if status != GNTST_okay:
            caller.maptrack.put(handle)
            return _map_result(op, status)
        view = None
        if flags & _HOST:
            gfn = op.host_addr >> PAGE_SHIFT
            if gfn in caller.grant_p2m or caller.memory.valid_pfn(gfn):
                granter.gnttab.unpin(op.ref, incr, readonly)
                caller.maptrack.put(handle)
                return _map_result(op, GNTST_general_error)
            caller.grant_p2m[gfn] = (granter.domid, frame)
            view = granter.memory.page(frame)
            if readonly:
                view = view.toreadonly()
        dev_bus_addr = frame << PAGE_SHIFT
        caller.maptrack.add(handle, Mapping(granter.domid, op.ref, frame,
                                            flags & (_HALVES | _READONLY), op.host_addr,
                                            dev_bus_addr, view))
        return GnttabMapGrantRef(op.host_addr, flags, op.ref, op.dom, GNTST_okay, handle,
                                 dev_bus_addr)

    def mapped_page(self, caller_id: int, handle: int) -> memoryview:
        """The view of the page host-mapped under ``handle`` in the caller's maptrack."""
        m = self.domains[caller_id].maptrack.entries.get(handle)
        if m is None or m.view is None:
            raise KeyError(f"domain {caller_id} has no host mapping with handle {handle}")
        return m.view

    def _unmap(self, caller: Domain, op: GnttabUnmapGrantRef) -> GnttabUnmapGrantRef:
        # unmap_common: the device address is checked first, then the host
        # mapping is replaced; a half is removed only when its address is given.
        m = caller.maptrack.entries.get(op.handle)
        if m is None:
            return _unmap_result(op, GNTST_bad_handle)
        dev = op.dev_bus_addr != 0 and m.flags & _DEVICE != 0
        if dev and op.dev_bus_addr != m.dev_bus_addr:
            return _unmap_result(op, GNTST_bad_dev_addr)
        done = 0
        if op.host_addr != 0 and m.flags & _HOST:
            gfn = op.host_addr >> PAGE_SHIFT
            if caller.grant_p2m.get(gfn) != (m.granter, m.frame):
                return _unmap_result(op, GNTST_general_error)
            del caller.grant_p2m[gfn]
            done |= _HOST
        if dev:
            done |= _DEVICE
        self._unmap_halves(caller, op.handle, m, done)
        return _unmap_result(op, GNTST_okay)

    def _unmap_halves(self, caller: Domain, handle: int, m: Mapping, done: int) -> None:
        granter = self.domains.get(m.granter)
        readonly = m.flags & _READONLY != 0
        for half in (_DEVICE, _HOST):
            if done & half:
                m.flags &= ~half
                if granter is not None:
                    granter.gnttab.unpin(m.ref, _pin_incr(m.flags, half), readonly)
        if done & _HOST and m.view is not None:
            m.view.release()
            m.view = None
        if m.flags & _HALVES == 0:
            del caller.maptrack.entries[handle]
            caller.maptrack.put(handle)

    def _unmap_all(self, caller: Domain, handle: int) -> None:
        """Both halves of a mapping, as when the mapping domain dies."""
        m = caller.maptrack.entries[handle]
        if m.flags & _HOST:
            gfn = m.host_addr >> PAGE_SHIFT
            if caller.grant_p2m.get(gfn) == (m.granter, m.frame):
                del caller.grant_p2m[gfn]
        self._unmap_halves(caller, handle, m, m.flags & _HALVES)

    def _copy(self, caller: Domain, op: GnttabCopy) -> GnttabCopy:
        # gnttab_copy_one: lock both domains, claim the source then the
        # destination (the grant checks), and only then check the bounds
        # (gnttab_copy_buf).
        sides: list[tuple[GnttabCopyPtr, bool]] = [
            (op.source, op.flags & _COPY_SOURCE_GREF != 0),
            (op.dest, op.flags & _COPY_DEST_GREF != 0),
        ]
        doms: list[Domain] = []
        for ptr, is_gref in sides:
            if not is_gref and ptr.domid != DOMID_SELF:
                return replace(op, status=GNTST_permission_denied)
            d = self._resolve(caller, ptr.domid)
            if d is None or d.dying:
                return replace(op, status=GNTST_bad_domain)
            doms.append(d)
        pinned: list[tuple[Domain, int, int, bool]] = []
        views: list[memoryview] = []
        status: int = GNTST_okay
        for (ptr, is_gref), d, readonly in zip(sides, doms, (True, False), strict=True):
            if is_gref:
                ref = ptr.ref
                if ref >= d.gnttab.nr_entries:
                    status = GNTST_bad_gntref
                    break
                incr = GNTPIN_hstr_inc if readonly else GNTPIN_hstw_inc
                st, frame = d.gnttab.pin(ref, caller.domid, incr, readonly, False,
                                         d.memory.valid_pfn)
                if st != GNTST_okay:
                    status = st
                    break
                pinned.append((d, ref, incr, readonly))
            else:
                frame = ptr.u
                if not d.memory.valid_pfn(frame):
                    status = GNTST_bad_page
                    break
            views.append(d.memory.page(frame))
        if status == GNTST_okay:
            so, do = op.source.offset, op.dest.offset
            if so + op.len > PAGE_SIZE or do + op.len > PAGE_SIZE:
                status = GNTST_bad_copy_arg
            else:
                src, dst = views
                dst[do : do + op.len] = src[so : so + op.len]
        for v in views:
            v.release()
        for d, ref, incr, readonly in pinned:
            d.gnttab.unpin(ref, incr, readonly)
        return replace(op, status=status)
