"""The grant ops' array form, and their cost as the table grows.

``HYPERVISOR_grant_table_op`` takes an array of op structs in the caller's
memory: Xen reads each with ``copy_from_guest`` and writes it back
(``xen/common/grant_table.c``, Xen 4.17: ``gnttab_map_grant_ref`` copies the
whole op back, ``gnttab_unmap_grant_ref`` and ``gnttab_copy`` only its
``status`` with ``__copy_field_to_guest``). The array form
(:meth:`Hypervisor.grant_table_op_raw`) must give every op exactly the result
the struct form gives, and leave the rest of the array as the caller wrote it.

Map, unmap and the statistics the leak checks read must not do per-entry work:
with 64 grant frames (Xen's default ``max_grant_frames``) nearly all mapped they
run the same Python lines as with one (counted with a trace function, which
the machine's load does not move).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

from hv_grant_helpers import FOREIGN_BASE, grant, setup
from hypothesis import given, settings
from hypothesis import strategies as st

from gntdma.abi.grant_table import (
    GNTMAP_host_map,
    GNTST_okay,
    GnttabCopy,
    GnttabCopyPtr,
    GnttabMapGrantRef,
    GNTTABOP_copy,
    GNTTABOP_map_grant_ref,
    GNTTABOP_unmap_grant_ref,
    GnttabUnmapGrantRef,
    GTF_permit_access,
    GTF_readonly,
    GTF_sub_page,
)
from gntdma.abi.xen import DOMID_SELF
from gntdma.hv import Hypervisor

# -- the array form gives the struct form's results ---------------------------------

_MAP = GnttabMapGrantRef.STRUCT
_UNMAP = GnttabUnmapGrantRef.STRUCT
_COPY = GnttabCopy.STRUCT


def _host(seed_grants: list[tuple[int, int, int, int]]) -> Hypervisor:
    hv = Hypervisor()
    hv.create_domain("Domain-0", 64)
    g = hv.create_domain("guest", 64, high_pages=8, max_grant_frames=2, max_maptrack_frames=1)
    setup(hv, g, 2)
    for ref, domid, frame, flags in seed_grants:
        grant(hv, g, ref, domid, frame, flags)
    return hv


_flags = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 2 | 8, 2 | 16, 2 | 4 | 0x10000])
_doms = st.sampled_from([1, 0, 99, int(DOMID_SELF)])
_refs = st.one_of(st.integers(8, 40), st.integers(0, 1100))
_addrs = st.one_of(st.integers(0, 40).map(lambda i: FOREIGN_BASE + (i << 12)),
                   st.sampled_from([0, 5 << 12, FOREIGN_BASE + 7]))
_map_op = st.builds(lambda a, f, r, d: ("map", (a, f, r, d, 0, 0xAAAA, 0xBBBB)),
                    _addrs, _flags, _refs, _doms)
_unmap_op = st.builds(lambda a, b, h: ("unmap", (a, b, h)), _addrs,
                      st.sampled_from([0, 9 << 12, 12345 << 12]), st.integers(0, 260))
_side = st.tuples(st.one_of(st.integers(8, 40), st.integers(0, 80), st.just(1 << 40)),
                  st.sampled_from([1, 0, int(DOMID_SELF), 99]), st.integers(0, 4100))
_copy_op = st.builds(lambda s, d, n, f: ("copy", (s, d, n, f)), _side, _side,
                     st.integers(0, 4100), st.integers(0, 3))
_grants = st.lists(st.tuples(st.integers(8, 40), st.sampled_from([0, 1, 2]),
                             st.integers(0, 80),
                             st.sampled_from([int(GTF_permit_access),
                                              int(GTF_permit_access | GTF_readonly),
                                              int(GTF_permit_access | GTF_sub_page), 2, 0])),
                   max_size=30)


def _run_struct(hv: Hypervisor, kind: str, ops: list[Any]) -> list[bytes]:
    if kind == "map":
        cmd, objs = GNTTABOP_map_grant_ref, [GnttabMapGrantRef(*o) for o in ops]
    elif kind == "unmap":
        cmd, objs = GNTTABOP_unmap_grant_ref, [GnttabUnmapGrantRef(*o) for o in ops]
    else:
        cmd = GNTTABOP_copy
        objs = [GnttabCopy(GnttabCopyPtr(*s), GnttabCopyPtr(*d), n, f) for s, d, n, f in ops]
    rc, res = hv.grant_table_op(0, cmd, objs)
    assert rc == 0 and len(res) == len(ops)
    return [r.pack() for r in res]


def _run_array(hv: Hypervisor, kind: str, ops: list[Any]) -> list[bytes]:
    if kind == "map":
        cmd, size = GNTTABOP_map_grant_ref, _MAP.size
        buf = bytearray(b"".join(_MAP.pack(*o) for o in ops))
    elif kind == "unmap":
        cmd, size = GNTTABOP_unmap_grant_ref, _UNMAP.size
        buf = bytearray(b"".join(_UNMAP.pack(*o, 0) for o in ops))
    else:
        cmd, size = GNTTABOP_copy, _COPY.size
        buf = bytearray(b"".join(GnttabCopy(GnttabCopyPtr(*s), GnttabCopyPtr(*d), n, f).pack()
                                 for s, d, n, f in ops))
    assert hv.grant_table_op_raw(0, cmd, buf, len(ops)) == 0
    return [bytes(buf[i * size:(i + 1) * size]) for i in range(len(ops))]


@settings(max_examples=150, deadline=None)
@given(grants=_grants, batches=st.lists(st.lists(st.one_of(_map_op, _unmap_op, _copy_op),
                                                 min_size=1, max_size=6), max_size=25))
def test_array_form_gives_each_op_the_result_of_the_struct_form(
        grants: list[tuple[int, int, int, int]], batches: list[list[tuple[str, Any]]]) -> None:
    a, b = _host(grants), _host(grants)
    for batch in batches:
        kind = batch[0][0]
        ops = [o for k, o in batch if k == kind]
        # Every byte of every op as the caller reads it back after the call.
        assert _run_array(b, kind, ops) == _run_struct(a, kind, ops)
    for domid in (0, 1):
        da, db = a.domains[domid], b.domains[domid]
        assert [bytes(f) for f in da.gnttab.frames] == [bytes(f) for f in db.gnttab.frames]
        assert sorted(da.maptrack.entries) == sorted(db.maptrack.entries)
        assert da.grant_p2m == db.grant_p2m
        assert bytes(da.memory.page(0)) + bytes(da.memory.page(40)) == \
            bytes(db.memory.page(0)) + bytes(db.memory.page(40))
    for hv in (a, b):
        for domid in sorted(hv.domains, reverse=True):
            hv.destroy_domain(domid)


def test_array_form_past_the_buffer_is_efault_after_the_ops_before(hv: Hypervisor) -> None:
    # gnttab_map_grant_ref: a fault on copy_from_guest of op i returns -EFAULT
    # with ops 0..i-1 done (and written back).
    g = hv.domains[1]
    setup(hv, g)
    grant(hv, g, 8, 0, 5, GTF_permit_access)
    buf = bytearray(_MAP.pack(FOREIGN_BASE, int(GNTMAP_host_map), 8, 1, 0, 0, 0))
    assert hv.grant_table_op_raw(0, GNTTABOP_map_grant_ref, buf, 2) == -14
    _addr, _f, _r, _d, status, handle, _dba = _MAP.unpack(buf)
    assert status == GNTST_okay
    ubuf = bytearray(_UNMAP.pack(FOREIGN_BASE, 0, handle, 0))
    assert hv.grant_table_op_raw(0, GNTTABOP_unmap_grant_ref, ubuf, 1) == 0
    assert _UNMAP.unpack(ubuf)[3] == GNTST_okay


# -- no per-entry work ----------------------------------------------------------------


def lines_run(fn: Callable[[], Any]) -> int:
    """The Python lines ``fn()`` executes (every frame it calls included)."""
    n = 0

    def tracer(frame: FrameType, event: str, arg: object) -> Any:
        nonlocal n
        if event == "line":
            n += 1
        return tracer

    old = sys.gettrace()
    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(old)
    return n


def _work(frames: int) -> tuple[int, int, int]:
    """Lines of one map+unmap (struct form), one in the array form, and one
    statistics(), with ``frames`` grant frames all granted and mapped but one."""
    hv = Hypervisor()
    hv.create_domain("Domain-0", 64)
    g = hv.create_domain("guest", 64, max_grant_frames=frames)
    setup(hv, g, frames)
    nr = frames * 512
    for ref in range(8, nr):
        grant(hv, g, ref, 0, ref % 64, GTF_permit_access)
    live = []
    for ref in range(8, nr - 1):
        addr = FOREIGN_BASE + (ref << 12)
        _, (r,) = hv.grant_table_op(0, GNTTABOP_map_grant_ref, [GnttabMapGrantRef(
            host_addr=addr, flags=GNTMAP_host_map, ref=ref, dom=g.domid)])
        assert isinstance(r, GnttabMapGrantRef) and r.status == GNTST_okay
        live.append((addr, r.handle))
    addr = FOREIGN_BASE + (nr << 12)

    def map_unmap() -> None:
        _, (r,) = hv.grant_table_op(0, GNTTABOP_map_grant_ref, [GnttabMapGrantRef(
            host_addr=addr, flags=GNTMAP_host_map, ref=nr - 1, dom=g.domid)])
        assert isinstance(r, GnttabMapGrantRef) and r.status == GNTST_okay
        _, (u,) = hv.grant_table_op(0, GNTTABOP_unmap_grant_ref, [GnttabUnmapGrantRef(
            host_addr=addr, handle=r.handle)])
        assert isinstance(u, GnttabUnmapGrantRef) and u.status == GNTST_okay

    mbuf = bytearray(_MAP.pack(addr, int(GNTMAP_host_map), nr - 1, g.domid, 0, 0, 0))
    ubuf = bytearray(_UNMAP.size)

    def map_unmap_array() -> None:
        assert hv.grant_table_op_raw(0, GNTTABOP_map_grant_ref, mbuf, 1) == 0
        _UNMAP.pack_into(ubuf, 0, addr, 0, _MAP.unpack(mbuf)[5], 0)
        assert hv.grant_table_op_raw(0, GNTTABOP_unmap_grant_ref, ubuf, 1) == 0

    out = (min(lines_run(map_unmap) for _ in range(3)),
           min(lines_run(map_unmap_array) for _ in range(3)),
           min(lines_run(hv.statistics) for _ in range(3)))
    st_ = hv.statistics()
    assert st_.mappings == len(live) and st_.domains[1].grant_entries_in_use == nr - 8
    for a, h in live:
        hv.grant_table_op(0, GNTTABOP_unmap_grant_ref, [GnttabUnmapGrantRef(host_addr=a,
                                                                            handle=h)])
    for domid in sorted(hv.domains, reverse=True):
        hv.destroy_domain(domid)
    return out


def test_map_unmap_and_statistics_do_no_per_entry_work() -> None:
    one, full = _work(1), _work(64)
    assert full[:2] == one[:2], (one, full)
    # statistics(): pins and mappings are counters; the entries in use are read
    # from the frames at most a few lines per frame, never a line per entry.
    assert full[2] - one[2] <= 4 * 63, (one, full)
