"""The long map and unmap calls of the array form, one loop each.

A backend maps every page of a request in one ``GNTTABOP_map_grant_ref`` call
and unmaps them in one ``GNTTABOP_unmap_grant_ref`` call: hundreds of ops that
name the same granter with the same flags. :func:`map_run` and
:func:`unmap_run` do such a call with what does not change from one op to the
next (the granter, its table and memory, the caller's maptrack and physmap)
looked up once, and each op's steps inline: the same checks in the same order,
the same statuses and the same writes as :meth:`GrantOps._map_ref
<gntdma.hv._grantops.GrantOps._map_ref>` (with :meth:`GrantTable.pin
<gntdma.hv._gnttab.GrantTable.pin>`) and :meth:`GrantOps._unmap_handle
<gntdma.hv._grantops.GrantOps._unmap_handle>` (with ``_unmap_halves`` and
:meth:`GrantTable.unpin <gntdma.hv._gnttab.GrantTable.unpin>`). An op of
another form (another granter or flags, a device half, an unmap of a handle
that has one) goes to those per-op functions, in its place. Nothing an op does
changes the granter, the tables' sizes or the domains, so what is looked up once
is what each op would have found.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from gntdma.abi.grant_table import (
    GNTMAP_application_map,
    GNTMAP_contains_pte,
    GNTMAP_device_map,
    GNTMAP_host_map,
    GNTMAP_readonly,
    GNTST_bad_gntref,
    GNTST_bad_handle,
    GNTST_bad_page,
    GNTST_general_error,
    GNTST_no_space,
    GnttabMapGrantRef,
    GnttabUnmapGrantRef,
)
from gntdma.abi.xen import PAGE_SHIFT
from gntdma.hv._domain import Domain
from gntdma.hv._gnttab import (
    _ENT_SHIFT,
    _MAP_TYPE_MASK,
    _PERMIT_ACCESS,
    _READING,
    _REF_MASK,
    _REF_SHIFT,
    _WRITE_PINS,
    _WRITING,
    ActiveEntry,
    GNTPIN_hstr_inc,
    GNTPIN_hstw_inc,
    Mapping,
    _pack_flags,
    _unpack_entry,
    _unpack_flags,
)
from gntdma.hv._gnttab import _READONLY as _GTF_READONLY

__all__ = ["RUN_MIN_OPS", "map_run", "unmap_run"]

#: Calls with fewer ops take the per-op path (hoisting costs more than it saves).
RUN_MIN_OPS: Final = 8

_HOST: Final = int(GNTMAP_host_map)
_DEVICE: Final = int(GNTMAP_device_map)
_READONLY: Final = int(GNTMAP_readonly)
_KEPT: Final = _HOST | _DEVICE | _READONLY
_PV_ONLY: Final = int(GNTMAP_application_map | GNTMAP_contains_pte)
_GENERAL_ERROR: Final = int(GNTST_general_error)
_BAD_GNTREF: Final = int(GNTST_bad_gntref)
_BAD_HANDLE: Final = int(GNTST_bad_handle)
_BAD_PAGE: Final = int(GNTST_bad_page)
_NO_SPACE: Final = int(GNTST_no_space)
# A pin of incr risks overflow when pin & (incr << 7) (GNTPIN_incr2oflow_mask).
_OFLOW_SHIFT: Final = 7

_MAP_SIZE: Final = GnttabMapGrantRef.STRUCT.size
_MAP_IN: Final = GnttabMapGrantRef.STRUCT.unpack_from
_UNMAP_SIZE: Final = GnttabUnmapGrantRef.STRUCT.size
_UNMAP_IN: Final = GnttabUnmapGrantRef.STRUCT.unpack_from

Buf = bytearray | memoryview
#: (status, handle, dev_bus_addr) written back at the op's offset plus out_off.
MapOut = Callable[[Buf, int, int, int, int], None]
StatusOut = Callable[[Buf, int, int], None]


def map_run(domains: dict[int, Domain], caller: Domain, buf: Buf, n: int,
            map_ref: Callable[[Domain, int, int, int, int], tuple[int, int, int]],
            out: MapOut, out_off: int, status_out: StatusOut) -> None:
    """The ``n`` map ops in ``buf``, in order, each op's results written back.

    The first op names the run's granter and flags: a host map, without the
    device half, of a live granter. Ops that name the same are done here;
    every other op (and every op, if the first is not such a map) by
    ``map_ref``, the per-op path.
    """
    _a, flags0, _r, dom0, _s, _h, _d = _MAP_IN(buf, 0)
    granter = domains.get(dom0)
    if flags0 & (_PV_ONLY | _DEVICE | _HOST) != _HOST or granter is None or granter.dying:
        flags0 = -1  # no op matches: each goes to map_ref
        granter = caller
    readonly = flags0 & _READONLY != 0
    incr = GNTPIN_hstr_inc if readonly else GNTPIN_hstw_inc
    oflow = incr << _OFLOW_SHIFT
    set_bits = _READING if readonly else _READING | _WRITING
    kept = flags0 & _KEPT
    domid = caller.domid
    maptrack = caller.maptrack
    free = maptrack.free
    popleft = free.popleft
    put = free.append
    entries = maptrack.entries
    mspare = maptrack.spare
    p2m = caller.grant_p2m
    caller_ram = caller.memory.valid_pfn
    gt = granter.gnttab
    nr_entries = gt.nr_entries
    frames = gt.frames
    active = gt.active
    aspare = gt.spare
    memory = granter.memory
    valid_frame = memory.valid_pfn
    page_of = memory.page
    for off in range(0, n * _MAP_SIZE, _MAP_SIZE):
        host_addr, flags, ref, dom, _s, _h, _d = _MAP_IN(buf, off)
        if flags != flags0 or dom != dom0:
            status, handle, dev_bus_addr = map_ref(caller, host_addr, flags, ref, dom)
            if status == 0:
                out(buf, off + out_off, status, handle, dev_bus_addr)
            else:
                status_out(buf, off + out_off, status)
            continue
        # The maptrack handle (_map_ref: free.popleft() or Maptrack.get()).
        if len(free) > 1:
            handle = popleft()
        else:
            got = maptrack.get()
            if got is None:
                status_out(buf, off + out_off, _NO_SPACE)
                continue
            handle = got
        if ref >= nr_entries:
            put(handle)
            status_out(buf, off + out_off, _BAD_GNTREF)
            continue
        # GrantTable.pin(ref, domid, incr, readonly, True, valid_frame).
        page = frames[ref >> _REF_SHIFT]
        eoff = (ref & _REF_MASK) << _ENT_SHIFT
        act = active.get(ref)
        if act is not None:
            pin = act.pin
            if act.domid != domid or pin & oflow != 0:
                put(handle)
                status_out(buf, off + out_off, _GENERAL_ERROR)
                continue
            if not readonly and pin & _WRITE_PINS == 0:
                (eflags,) = _unpack_flags(page, eoff)
                if eflags & _GTF_READONLY:
                    put(handle)
                    status_out(buf, off + out_off, _GENERAL_ERROR)
                    continue
                _pack_flags(page, eoff, eflags | _READING | _WRITING)
            act.pin = pin + incr
            frame = act.frame
        else:
            eflags, edom, frame = _unpack_entry(page, eoff)
            if eflags & _MAP_TYPE_MASK != _PERMIT_ACCESS or edom != domid \
                    or (not readonly and eflags & _GTF_READONLY):
                put(handle)
                status_out(buf, off + out_off, _GENERAL_ERROR)
                continue
            if not valid_frame(frame):
                put(handle)
                status_out(buf, off + out_off, _BAD_PAGE)
                continue
            if aspare:
                act = aspare.pop()
                act.pin = incr
                act.frame = frame
                act.domid = edom
            else:
                act = ActiveEntry(incr, frame, edom)
            active[ref] = act
            _pack_flags(page, eoff, eflags | set_bits)
        # The host mapping.
        gfn = host_addr >> PAGE_SHIFT
        if gfn in p2m or caller_ram(gfn):
            gt.unpin(ref, incr, readonly)
            put(handle)
            status_out(buf, off + out_off, _GENERAL_ERROR)
            continue
        p2m[gfn] = (dom0, frame)
        view = page_of(frame)
        if readonly:
            view = view.toreadonly()
        dev_bus_addr = frame << PAGE_SHIFT
        if mspare:
            m = mspare.pop()
            m.granter = dom0
            m.ref = ref
            m.frame = frame
            m.flags = kept
            m.host_addr = host_addr
            m.dev_bus_addr = dev_bus_addr
            m.view = view
        else:
            m = Mapping(dom0, ref, frame, kept, host_addr, dev_bus_addr, view)
        entries[handle] = m
        out(buf, off + out_off, 0, handle, dev_bus_addr)
    if len(entries) > maptrack.peak:  # a map call only adds entries
        maptrack.peak = len(entries)


def unmap_run(domains: dict[int, Domain], caller: Domain, buf: Buf, n: int,
              unmap_handle: Callable[[Domain, int, int, int], int], status_out: StatusOut,
              status_off: int) -> None:
    """The ``n`` unmap ops in ``buf``, in order, each op's status written back.

    An unmap at a host address, with no device address, of a handle mapping a
    host half only is done here; any other op by ``unmap_handle``.
    """
    maptrack = caller.maptrack
    entries = maptrack.entries
    get = entries.get
    put = maptrack.free.append
    mspare = maptrack.spare
    p2m = caller.grant_p2m
    p2m_get = p2m.get
    last_dom = -1
    granter: Domain | None = None
    for off in range(0, n * _UNMAP_SIZE, _UNMAP_SIZE):
        host_addr, dev_bus_addr, handle, _s = _UNMAP_IN(buf, off)
        m = get(handle)
        if m is None:
            status_out(buf, off + status_off, _BAD_HANDLE)
            continue
        mflags = m.flags
        if dev_bus_addr != 0 or host_addr == 0 or mflags & (_DEVICE | _HOST) != _HOST:
            status_out(buf, off + status_off,
                       unmap_handle(caller, host_addr, dev_bus_addr, handle))
            continue
        gfn = host_addr >> PAGE_SHIFT
        dom = m.granter
        got = p2m_get(gfn)
        if got is None or got[0] != dom or got[1] != m.frame:
            status_out(buf, off + status_off, _GENERAL_ERROR)
            continue
        del p2m[gfn]
        # _unmap_halves(caller, handle, m, _HOST).
        if dom != last_dom:
            granter = domains.get(dom)
            last_dom = dom
        readonly = mflags & _READONLY != 0
        if granter is not None:
            granter.gnttab.unpin(m.ref, GNTPIN_hstr_inc if readonly else GNTPIN_hstw_inc,
                                 readonly)
        view = m.view
        if view is not None:
            view.release()
            m.view = None
        m.flags = mflags & ~_HOST
        del entries[handle]
        put(handle)
        mspare.append(m)
        status_out(buf, off + status_off, 0)
