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

The hot ops. Map, unmap and copy run on plain ints (:meth:`GrantOps._map_ref`,
:meth:`GrantOps._unmap_handle`, :meth:`GrantOps._copy_one`) and on the raw grant
entries (:class:`gntdma.hv._gnttab.GrantTable`). Two forms call them: the
dataclass form (:meth:`GrantOps.grant_table_op`, a result struct per op) and the
array form (:meth:`GrantOps.grant_table_op_raw`): a buffer of packed wire
structs, read and written back in place as Xen's ``copy_from_guest`` /
``copy_to_guest`` do, with no object per op.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import fields, replace
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
from gntdma.hv._grantrun import RUN_MIN_OPS, map_run, unmap_run

__all__ = [
    "GNTTAB_COPY_FLAT",
    "GNTTAB_COPY_STATUS_OFFSET",
    "GNTTAB_MAP_GRANT_REF_OUT",
    "GNTTAB_MAP_GRANT_REF_OUT_OFFSET",
    "GNTTAB_OP_STATUS",
    "GNTTAB_UNMAP_GRANT_REF_STATUS_OFFSET",
    "GnttabOp",
    "GrantOps",
    "map_grant_ref_op",
    "unmap_grant_ref_op",
]

# Plain ints: arithmetic on the IntFlag members builds a flag object per use.
_HOST: Final = int(GNTMAP_host_map)
_DEVICE: Final = int(GNTMAP_device_map)
_READONLY: Final = int(GNTMAP_readonly)
_HALVES: Final = _HOST | _DEVICE
_KEPT: Final = _HALVES | _READONLY
_PV_ONLY: Final = int(GNTMAP_application_map | GNTMAP_contains_pte)
_COPY_SOURCE_GREF: Final = int(GNTCOPY_source_gref)
_COPY_DEST_GREF: Final = int(GNTCOPY_dest_gref)
_OKAY: Final = int(GNTST_okay)
_GENERAL_ERROR: Final = int(GNTST_general_error)
_BAD_DOMAIN: Final = int(GNTST_bad_domain)
_BAD_GNTREF: Final = int(GNTST_bad_gntref)
_BAD_HANDLE: Final = int(GNTST_bad_handle)
_BAD_DEV_ADDR: Final = int(GNTST_bad_dev_addr)
_BAD_PAGE: Final = int(GNTST_bad_page)
_BAD_COPY_ARG: Final = int(GNTST_bad_copy_arg)
_NO_SPACE: Final = int(GNTST_no_space)
_PERMISSION_DENIED: Final = int(GNTST_permission_denied)
_DOMID_SELF: Final = int(DOMID_SELF)



def _offset(fields: Sequence[tuple[str, int, int]], member: str) -> int:
    """Byte offset of ``member`` in a wire struct's ``FIELDS``."""
    for name, offset, _size in fields:
        if name == member:
            return offset
    raise AssertionError(f"no member {member}")


# Precompiled views of the op structs, from their layouts in gntdma.abi.grant_table:
# (status, handle, dev_bus_addr), what a map writes back at the offset of status;
# a lone int16 status; struct gnttab_copy with both gnttab_copy_ptr members inline
# (source.u, .domid, .offset, dest.u, .domid, .offset, len, flags, status).
_MAP_LAYOUT: Final = GnttabMapGrantRef.LAYOUT
GNTTAB_MAP_GRANT_REF_OUT: Final = struct.Struct(
    "<" + "".join(_MAP_LAYOUT.codes[_MAP_LAYOUT.names.index("status"):]))
GNTTAB_MAP_GRANT_REF_OUT_OFFSET: Final = _offset(GnttabMapGrantRef.FIELDS, "status")
GNTTAB_OP_STATUS: Final = struct.Struct("<h")
GNTTAB_UNMAP_GRANT_REF_STATUS_OFFSET: Final = _offset(GnttabUnmapGrantRef.FIELDS, "status")
GNTTAB_COPY_STATUS_OFFSET: Final = _offset(GnttabCopy.FIELDS, "status")
_COPY_PTR_CODE: Final = f"{GnttabCopyPtr.STRUCT.size}s"
GNTTAB_COPY_FLAT: Final = struct.Struct(
    "<" + GnttabCopyPtr.STRUCT.format[1:] * 2
    + GnttabCopy.STRUCT.format.removeprefix("<" + _COPY_PTR_CODE * 2))
assert GNTTAB_MAP_GRANT_REF_OUT_OFFSET + GNTTAB_MAP_GRANT_REF_OUT.size == \
    GnttabMapGrantRef.STRUCT.size
assert GNTTAB_COPY_FLAT.size == GnttabCopy.STRUCT.size

_MAP_SIZE: Final = GnttabMapGrantRef.STRUCT.size
_MAP_IN: Final = GnttabMapGrantRef.STRUCT.unpack_from
_MAP_OUT: Final = GNTTAB_MAP_GRANT_REF_OUT.pack_into
_MAP_OUT_OFF: Final = GNTTAB_MAP_GRANT_REF_OUT_OFFSET
_UNMAP_SIZE: Final = GnttabUnmapGrantRef.STRUCT.size
_UNMAP_IN: Final = GnttabUnmapGrantRef.STRUCT.unpack_from
_UNMAP_STATUS_OFF: Final = GNTTAB_UNMAP_GRANT_REF_STATUS_OFFSET
_COPY_SIZE: Final = GnttabCopy.STRUCT.size
_COPY_IN: Final = GNTTAB_COPY_FLAT.unpack_from
_COPY_STATUS_OFF: Final = GNTTAB_COPY_STATUS_OFFSET
_STATUS_OUT: Final = GNTTAB_OP_STATUS.pack_into

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


# The per-op results of the dataclass form, built directly: what
# ``replace(op, status=...)`` gives (the structs are final), without its field walk.
def _map_result(op: GnttabMapGrantRef, status: int) -> GnttabMapGrantRef:
    return _new_map_op(op.host_addr, op.flags, op.ref, op.dom, status, op.handle,
                       op.dev_bus_addr)


def _unmap_result(op: GnttabUnmapGrantRef, status: int) -> GnttabUnmapGrantRef:
    return _new_unmap_op(op.host_addr, op.dev_bus_addr, op.handle, status)


def _map_incr(flags: int) -> int:
    """The pins a map with ``flags`` takes: one of each half it maps."""
    if flags & _READONLY:
        return (GNTPIN_devr_inc if flags & _DEVICE else 0) + \
               (GNTPIN_hstr_inc if flags & _HOST else 0)
    return (GNTPIN_devw_inc if flags & _DEVICE else 0) + \
           (GNTPIN_hstw_inc if flags & _HOST else 0)


#: :func:`_map_incr` of every combination of the device, host and readonly bits.
_MAP_INCR: Final = tuple(_map_incr(f) for f in range(_KEPT + 1))


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
        if len(ops) == 1:  # nearly every call: no loop, no list comprehension
            op = ops[0]
            if not isinstance(op, op_type):
                return -errno.EFAULT, []
            return 0, [getattr(self, name)(caller, op)]
        if single:
            return -errno.EINVAL, []
        for op in ops:
            if not isinstance(op, op_type):
                return -errno.EFAULT, []
        fn: Callable[[Domain, GnttabOp], GnttabOp] = getattr(self, name)
        return 0, [fn(caller, op) for op in ops]

    def grant_table_op_raw(self, caller_id: int, cmd: int, buf: bytearray | memoryview,
                           count: int) -> int:
        """HYPERVISOR_grant_table_op on ``count`` packed op structs in ``buf``: rc.

        The array form of :meth:`grant_table_op`, as the hypercall is on Xen:
        each op is read from ``buf`` and its results written back in place
        (``gnttab_map_grant_ref`` copies the whole op back, so a map writes its
        status, and on success its handle and ``dev_bus_addr``;
        ``gnttab_unmap_grant_ref`` and ``gnttab_copy`` write only ``status``,
        ``__copy_field_to_guest(uop, &op, status)``). An op past the end of
        ``buf`` is ``-EFAULT`` for the call, the ops before it done, as a fault
        on ``copy_from_guest`` is. Same checks and statuses as the dataclass form.
        """
        caller = self.domains.get(caller_id)
        if caller is None:
            return -errno.ESRCH
        handler = _GNTTAB_HANDLERS.get(cmd)
        if handler is None:
            return -errno.ENOSYS
        _name, op_type, single = handler
        if single and count != 1:
            return -errno.EINVAL
        if count < 0:
            return -errno.EINVAL
        size: int = op_type.STRUCT.size  # type: ignore[attr-defined]
        n = min(count, len(buf) // size)
        if cmd == GNTTABOP_map_grant_ref and n >= RUN_MIN_OPS:
            map_run(self.domains, caller, buf, n, self._map_ref, _MAP_OUT, _MAP_OUT_OFF,
                    _STATUS_OUT)
        elif cmd == GNTTABOP_unmap_grant_ref and n >= RUN_MIN_OPS:
            unmap_run(self.domains, caller, buf, n, self._unmap_handle, _STATUS_OUT,
                      _UNMAP_STATUS_OFF)
        elif cmd == GNTTABOP_map_grant_ref:
            for off in range(0, n * _MAP_SIZE, _MAP_SIZE):
                host_addr, flags, ref, dom, _st, _h, _dba = _MAP_IN(buf, off)
                status, handle, dev_bus_addr = self._map_ref(caller, host_addr, flags, ref, dom)
                if status == _OKAY:
                    _MAP_OUT(buf, off + _MAP_OUT_OFF, status, handle, dev_bus_addr)
                else:
                    _STATUS_OUT(buf, off + _MAP_OUT_OFF, status)
        elif cmd == GNTTABOP_unmap_grant_ref:
            for off in range(0, n * _UNMAP_SIZE, _UNMAP_SIZE):
                host_addr, dev_bus_addr, handle, _st = _UNMAP_IN(buf, off)
                _STATUS_OUT(buf, off + _UNMAP_STATUS_OFF,
                            self._unmap_handle(caller, host_addr, dev_bus_addr, handle))
        elif cmd == GNTTABOP_copy:
            for off in range(0, n * _COPY_SIZE, _COPY_SIZE):
                su, sdom, soff, du, ddom, doff, length, flags, _st = _COPY_IN(buf, off)
                _STATUS_OUT(buf, off + _COPY_STATUS_OFF,
                            self._copy_one(caller, su, sdom, soff, du, ddom, doff, length,
                                           flags))
        else:
            fn: Callable[[Domain, GnttabOp], GnttabOp] = getattr(self, _name)
            for off in range(0, n * size, size):
                fn(caller, op_type.unpack_from(buf, off)).pack_into(  # type: ignore[attr-defined]
                    buf, off)
        return 0 if n == count else -errno.EFAULT

    def _setup_table(self, caller: Domain, op: GnttabSetupTable) -> GnttabSetupTable:
        d = self._resolve(caller, op.dom)
        if d is None:
            return replace(op, status=GNTST_bad_domain)
        if d is not caller and not caller.privileged:
            return replace(op, status=GNTST_permission_denied)
        if op.nr_frames > d.gnttab.max_frames or not d.gnttab.grow(op.nr_frames):
            return replace(op, status=GNTST_general_error)
        # What replace() builds (the class is final), without its walk of the fields.
        return GnttabSetupTable(op.dom, op.nr_frames, GNTST_okay, op.frame_list)

    def _query_size(self, caller: Domain, op: GnttabQuerySize) -> GnttabQuerySize:
        d = self._resolve(caller, op.dom)
        if d is None:
            return replace(op, status=GNTST_bad_domain)
        if d is not caller and not caller.privileged:
            return replace(op, status=GNTST_permission_denied)
        return GnttabQuerySize(op.dom, d.gnttab.nr_frames, d.gnttab.max_frames, GNTST_okay)

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
        status, handle, dev_bus_addr = self._map_ref(caller, op.host_addr, int(op.flags),
                                                     op.ref, op.dom)
        if status != _OKAY:
            return _map_result(op, status)
        return _new_map_op(op.host_addr, op.flags, op.ref, op.dom, GNTST_okay, handle,
                           dev_bus_addr)

    def _map_ref(self, caller: Domain, host_addr: int, flags: int, ref: int,
                 dom: int) -> tuple[int, int, int]:
        """One ``map_grant_ref``: (GNTST, handle, dev_bus_addr); 0, 0 unless okay.

        The order of map_grant_ref: flags, domain, maptrack handle, ref, pins,
        then the host mapping (undone, pins and handle, if it fails).
        """
        if flags & _HALVES == 0:
            return _BAD_GNTREF, 0, 0
        if flags & _PV_ONLY:
            return _GENERAL_ERROR, 0, 0
        granter = self.domains.get(dom)
        if granter is None or granter.dying:
            return _BAD_DOMAIN, 0, 0
        maptrack = caller.maptrack
        free = maptrack.free
        handle = free.popleft() if len(free) > 1 else maptrack.get()
        if handle is None:
            return _NO_SPACE, 0, 0
        gt = granter.gnttab
        if ref >= gt.nr_entries:
            free.append(handle)
            return _BAD_GNTREF, 0, 0
        readonly = flags & _READONLY != 0
        incr = _MAP_INCR[flags & _KEPT]
        memory = granter.memory
        status, frame = gt.pin(ref, caller.domid, incr, readonly, True, memory.valid_pfn)
        if status != _OKAY:
            free.append(handle)
            return status, 0, 0
        view = None
        if flags & _HOST:
            gfn = host_addr >> PAGE_SHIFT
            p2m = caller.grant_p2m
            if gfn in p2m or caller.memory.valid_pfn(gfn):
                gt.unpin(ref, incr, readonly)
                free.append(handle)
                return _GENERAL_ERROR, 0, 0
            p2m[gfn] = (dom, frame)
            view = memory.page(frame)
            if readonly:
                view = view.toreadonly()
        dev_bus_addr = frame << PAGE_SHIFT
        entries = maptrack.entries
        spare = maptrack.spare
        if spare:
            m = spare.pop()
            m.granter = dom
            m.ref = ref
            m.frame = frame
            m.flags = flags & _KEPT
            m.host_addr = host_addr
            m.dev_bus_addr = dev_bus_addr
            m.view = view
        else:
            m = Mapping(dom, ref, frame, flags & _KEPT, host_addr, dev_bus_addr, view)
        entries[handle] = m
        if len(entries) > maptrack.peak:  # Maptrack.add, inline
            maptrack.peak = len(entries)
        return _OKAY, handle, dev_bus_addr

    def mapped_page(self, caller_id: int, handle: int) -> memoryview:
        """The view of the page host-mapped under ``handle`` in the caller's maptrack."""
        m = self.domains[caller_id].maptrack.entries.get(handle)
        if m is None or m.view is None:
            raise KeyError(f"domain {caller_id} has no host mapping with handle {handle}")
        return m.view

    def mapped_pages(self, caller_id: int, handles: Iterable[int]) -> list[memoryview]:
        """:meth:`mapped_page` of each handle, in order."""
        entries = self.domains[caller_id].maptrack.entries
        out: list[memoryview] = []
        for handle in handles:
            m = entries.get(handle)
            if m is None or m.view is None:
                raise KeyError(f"domain {caller_id} has no host mapping with handle {handle}")
            out.append(m.view)
        return out

    def _unmap(self, caller: Domain, op: GnttabUnmapGrantRef) -> GnttabUnmapGrantRef:
        return _unmap_result(op, self._unmap_handle(caller, op.host_addr, op.dev_bus_addr,
                                                    op.handle))

    def _unmap_handle(self, caller: Domain, host_addr: int, dev_bus_addr: int,
                      handle: int) -> int:
        """One ``unmap_grant_ref``: the GNTST.

        unmap_common: the device address is checked first, then the host
        mapping is replaced; a half is removed only when its address is given.
        """
        m = caller.maptrack.entries.get(handle)
        if m is None:
            return _BAD_HANDLE
        mflags = m.flags
        dev = dev_bus_addr != 0 and mflags & _DEVICE != 0
        if dev and dev_bus_addr != m.dev_bus_addr:
            return _BAD_DEV_ADDR
        done = 0
        if host_addr != 0 and mflags & _HOST:
            gfn = host_addr >> PAGE_SHIFT
            p2m = caller.grant_p2m
            if p2m.get(gfn) != (m.granter, m.frame):
                return _GENERAL_ERROR
            del p2m[gfn]
            done = _HOST
        if dev:
            done |= _DEVICE
        if done != 0:
            self._unmap_halves(caller, handle, m, done)
        return _OKAY

    def _unmap_halves(self, caller: Domain, handle: int, m: Mapping, done: int) -> None:
        granter = self.domains.get(m.granter)
        flags = m.flags
        readonly = flags & _READONLY != 0
        # The device half first, then the host half, each dropping its own pin.
        if done & _DEVICE:
            flags &= ~_DEVICE
            if granter is not None:
                granter.gnttab.unpin(m.ref, GNTPIN_devr_inc if readonly else GNTPIN_devw_inc,
                                     readonly)
        if done & _HOST:
            flags &= ~_HOST
            if granter is not None:
                granter.gnttab.unpin(m.ref, GNTPIN_hstr_inc if readonly else GNTPIN_hstw_inc,
                                     readonly)
            if m.view is not None:
                m.view.release()
                m.view = None
        m.flags = flags
        if flags & _HALVES == 0:
            maptrack = caller.maptrack
            del maptrack.entries[handle]
            maptrack.free.append(handle)
            maptrack.spare.append(m)

    def _unmap_all(self, caller: Domain, handle: int) -> None:
        """Both halves of a mapping, as when the mapping domain dies."""
        m = caller.maptrack.entries[handle]
        if m.flags & _HOST:
            gfn = m.host_addr >> PAGE_SHIFT
            if caller.grant_p2m.get(gfn) == (m.granter, m.frame):
                del caller.grant_p2m[gfn]
        self._unmap_halves(caller, handle, m, m.flags & _HALVES)

    def _copy(self, caller: Domain, op: GnttabCopy) -> GnttabCopy:
        s, d = op.source, op.dest
        status = self._copy_one(caller, s.u, s.domid, s.offset, d.u, d.domid, d.offset, op.len,
                                op.flags)
        return replace(op, status=status)

    def _copy_one(self, caller: Domain, su: int, sdom: int, soff: int, du: int, ddom: int,
                  doff: int, length: int, flags: int) -> int:
        """One ``gnttab_copy_one``: the GNTST.

        Lock both domains, claim the source then the destination (the grant
        checks), and only then check the bounds (gnttab_copy_buf).
        """
        src_gref = flags & _COPY_SOURCE_GREF != 0
        dst_gref = flags & _COPY_DEST_GREF != 0
        if not src_gref and sdom != _DOMID_SELF:
            return _PERMISSION_DENIED
        sd = caller if sdom == _DOMID_SELF else self.domains.get(sdom)
        if sd is None or sd.dying:
            return _BAD_DOMAIN
        if not dst_gref and ddom != _DOMID_SELF:
            return _PERMISSION_DENIED
        dd = caller if ddom == _DOMID_SELF else self.domains.get(ddom)
        if dd is None or dd.dying:
            return _BAD_DOMAIN
        status, sframe = self._copy_claim(caller, sd, su, src_gref, True)
        if status != _OKAY:
            return status
        status, dframe = self._copy_claim(caller, dd, du, dst_gref, False)
        dst_pinned = dst_gref and status == _OKAY
        if status == _OKAY:
            if soff + length > PAGE_SIZE or doff + length > PAGE_SIZE:
                status = _BAD_COPY_ARG
            else:
                with sd.memory.page(sframe) as src, dd.memory.page(dframe) as dst:
                    dst[doff : doff + length] = src[soff : soff + length]
        # Released as they were claimed: the source, then the destination.
        if src_gref:
            sd.gnttab.unpin(su & 0xFFFFFFFF, GNTPIN_hstr_inc, True)
        if dst_pinned:
            dd.gnttab.unpin(du & 0xFFFFFFFF, GNTPIN_hstw_inc, False)
        return status

    @staticmethod
    def _copy_claim(caller: Domain, d: Domain, u: int, is_gref: bool,
                    readonly: bool) -> tuple[int, int]:
        """Claim one side of a copy (``acquire_grant_for_copy`` for a grant ref,
        ``get_paged_frame`` for the caller's own frame): (GNTST, frame)."""
        if not is_gref:
            return (_OKAY, u) if d.memory.valid_pfn(u) else (_BAD_PAGE, 0)
        ref = u & 0xFFFFFFFF  # the union's ref view: the low 32 bits
        gt = d.gnttab
        if ref >= gt.nr_entries:
            return _BAD_GNTREF, 0
        return gt.pin(ref, caller.domid, GNTPIN_hstr_inc if readonly else GNTPIN_hstw_inc,
                      readonly, False, d.memory.valid_pfn)


# -- results built without the dataclass __init__ -----------------------------------
# The op classes are frozen slotted dataclasses: their __init__ stores each field
# through object.__setattr__; a result is the same object built from object.__new__
# and each slot's own setter (the member descriptor), every field set, in order.

_Setter = Callable[[object, object], None]


def _slot_setters(cls: type) -> tuple[_Setter, ...]:
    """The member descriptors' setters of ``cls``'s dataclass fields, in field order."""
    return tuple(vars(cls)[f.name].__set__ for f in fields(cls))


_new_object: Final = object.__new__
_MAP_SET: Final = _slot_setters(GnttabMapGrantRef)
_UNMAP_SET: Final = _slot_setters(GnttabUnmapGrantRef)
_MS0, _MS1, _MS2, _MS3, _MS4, _MS5, _MS6 = _MAP_SET
_US0, _US1, _US2, _US3 = _UNMAP_SET


def _new_map_op(host_addr: int, flags: int, ref: int, dom: int, status: int, handle: int,
                dev_bus_addr: int) -> GnttabMapGrantRef:
    """``GnttabMapGrantRef(host_addr, flags, ref, dom, status, handle, dev_bus_addr)``."""
    op: GnttabMapGrantRef = _new_object(GnttabMapGrantRef)
    _MS0(op, host_addr)
    _MS1(op, flags)
    _MS2(op, ref)
    _MS3(op, dom)
    _MS4(op, status)
    _MS5(op, handle)
    _MS6(op, dev_bus_addr)
    return op


def _new_unmap_op(host_addr: int, dev_bus_addr: int, handle: int,
                  status: int) -> GnttabUnmapGrantRef:
    """``GnttabUnmapGrantRef(host_addr, dev_bus_addr, handle, status)``."""
    op: GnttabUnmapGrantRef = _new_object(GnttabUnmapGrantRef)
    _US0(op, host_addr)
    _US1(op, dev_bus_addr)
    _US2(op, handle)
    _US3(op, status)
    return op


def map_grant_ref_op(host_addr: int, flags: int, ref: int, dom: int) -> GnttabMapGrantRef:
    """``GnttabMapGrantRef(host_addr=..., flags=..., ref=..., dom=...)`` (OUT fields 0),
    built without the frozen dataclass' ``__init__`` (about 0.7 us less per op)."""
    return _new_map_op(host_addr, flags, ref, dom, 0, 0, 0)


def unmap_grant_ref_op(host_addr: int, handle: int) -> GnttabUnmapGrantRef:
    """``GnttabUnmapGrantRef(host_addr=..., handle=...)`` (``dev_bus_addr`` and status 0),
    built as :func:`map_grant_ref_op` builds its op."""
    return _new_unmap_op(host_addr, 0, handle, 0)
