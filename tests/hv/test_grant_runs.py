"""A long map or unmap call gives each op what the op alone gives.

A backend maps the pages of a request in one ``GNTTABOP_map_grant_ref`` call
and unmaps them in one ``GNTTABOP_unmap_grant_ref`` call; the hypervisor does
such a call (RUN_MIN_OPS ops or more) in one loop with the granter looked up
once (:mod:`gntdma.hv._grantrun`). Xen does each op of the array in turn
(``xen/common/grant_table.c``, Xen 4.17: ``gnttab_map_grant_ref`` calls
``map_grant_ref`` per op, ``gnttab_unmap_grant_ref`` ``unmap_common`` per op),
so the results must be those of the struct form one op per call: every byte of
each op written back, the grant entries' flags, the active entries' pins,
the maptrack (handles handed out in the same order, the free list, the
peak) and the mapper's physmap, over random runs of ops that mostly name one
granter with one set of flags, with failures of every kind among them.
"""

from __future__ import annotations

from typing import Any

from hv_grant_helpers import FOREIGN_BASE, grant, setup
from hypothesis import given, settings
from hypothesis import strategies as st

from gntdma.abi.grant_table import (
    GNTMAP_device_map,
    GNTMAP_host_map,
    GNTMAP_readonly,
    GnttabMapGrantRef,
    GNTTABOP_map_grant_ref,
    GNTTABOP_unmap_grant_ref,
    GnttabUnmapGrantRef,
    GTF_permit_access,
    GTF_readonly,
    GTF_sub_page,
)
from gntdma.abi.xen import DOMID_SELF
from gntdma.hv import Domain, Hypervisor
from gntdma.hv._grantrun import RUN_MIN_OPS

_MAP = GnttabMapGrantRef.STRUCT
_UNMAP = GnttabUnmapGrantRef.STRUCT
_HOST = int(GNTMAP_host_map)
_RO = int(GNTMAP_readonly)
_DEV = int(GNTMAP_device_map)

# Entries 8..60 granted to dom0 (frame ref % 20), then some rewritten.
# (frames 64 and up are not the guest's but for its 8 high pages at 0x100000).
_grants = st.lists(st.tuples(st.integers(8, 30), st.sampled_from([0, 0, 0, 1]),
                             st.sampled_from([*range(0, 20), 64, 70, 0x100000, 0x100007,
                                              0x100008]),
                             st.sampled_from([int(GTF_permit_access)] * 2 + [
                                 int(GTF_permit_access | GTF_readonly)] * 2 + [
                                 int(GTF_permit_access | GTF_sub_page), 2, 0])),
                   max_size=20)
_base_flags = st.sampled_from([_HOST] * 3 + [_HOST | _RO] * 3 + [_HOST | _DEV, 0, _HOST | 8])
_base_dom = st.sampled_from([1] * 6 + [99, 0, int(DOMID_SELF)])
_addrs = st.one_of(*[st.integers(0, 600).map(lambda i: FOREIGN_BASE + (i << 12))] * 6,
                   st.integers(0, 600).map(lambda i: FOREIGN_BASE + (i << 12) + 5),
                   st.sampled_from([0, 5 << 12]))


def _host(grants: list[tuple[int, int, int, int]]) -> Hypervisor:
    hv = Hypervisor()
    hv.create_domain("Domain-0", 64, max_maptrack_frames=1)  # 255 handles: runs out
    g = hv.create_domain("guest", 64, high_pages=8, max_grant_frames=2)
    setup(hv, g, 2)
    for ref in range(8, 61):
        grant(hv, g, ref, 0, ref % 20, int(GTF_permit_access))
    for ref, domid, frame, flags in grants:
        grant(hv, g, ref, domid, frame, flags)
    return hv


def _state(hv: Hypervisor) -> list[Any]:
    out: list[Any] = []
    for domid in sorted(hv.domains):
        d: Domain = hv.domains[domid]
        gt, mt = d.gnttab, d.maptrack
        out.append([bytes(f) for f in gt.frames])
        out.append({r: (a.pin, a.frame, a.domid) for r, a in gt.active.items()})
        out.append({h: (m.granter, m.ref, m.frame, m.flags, m.host_addr, m.dev_bus_addr,
                        None if m.view is None else (m.view.readonly, bytes(m.view[:8])))
                    for h, m in mt.entries.items()})
        out.append((list(mt.free), mt.allocated, mt.peak))
        out.append(dict(d.grant_p2m))
    return out


def _one_at_a_time(hv: Hypervisor, cmd: int, buf: bytearray, size: int, n: int) -> None:
    for i in range(n):
        op = bytearray(buf[i * size:(i + 1) * size])
        assert hv.grant_table_op_raw(0, cmd, op, 1) == 0
        buf[i * size:(i + 1) * size] = op


def _map_ops(data: st.DataObject) -> bytearray:
    flags0, dom0 = data.draw(_base_flags), data.draw(_base_dom)
    n = data.draw(st.integers(1, 40))
    ops = []
    for _ in range(n):
        flags = flags0 if data.draw(st.integers(0, 9)) > 0 else data.draw(_base_flags)
        dom = dom0 if data.draw(st.integers(0, 9)) > 0 else data.draw(_base_dom)
        ref = data.draw(st.one_of(*[st.integers(8, 30)] * 6, st.integers(8, 60),
                                  st.integers(0, 1100)))
        ops.append(_MAP.pack(data.draw(_addrs), flags, ref, dom, 0x5A5A, 0xAAAA, 0xBBBB))
    return bytearray(b"".join(ops))


def _unmap_ops(data: st.DataObject, hv: Hypervisor) -> bytearray:
    live = sorted(hv.domains[0].maptrack.entries.items())
    n = data.draw(st.integers(1, 40))
    ops = []
    for _ in range(n):
        kind = data.draw(st.integers(0, 9))
        if live and kind > 2:  # a live handle at its own address, mostly
            h, m = data.draw(st.sampled_from(live))
            if kind > 3:
                addr = m.host_addr
            else:  # another mapping's address (its gfn maps another frame), or any
                addr = data.draw(st.one_of(st.sampled_from([o.host_addr for _h, o in live]),
                                           _addrs))
            dev = 0 if kind > 4 else data.draw(st.sampled_from([0, m.dev_bus_addr, 7 << 12]))
            ops.append(_UNMAP.pack(addr, dev, h, 0x5A5A))
        else:
            ops.append(_UNMAP.pack(data.draw(_addrs), data.draw(st.sampled_from([0, 9 << 12])),
                                   data.draw(st.integers(0, 300)), 0x5A5A))
    return bytearray(b"".join(ops))


@settings(max_examples=120, deadline=None)
@given(grants=_grants, data=st.data())
def test_a_long_map_or_unmap_call_gives_each_op_what_the_op_alone_gives(
        grants: list[tuple[int, int, int, int]], data: st.DataObject) -> None:
    a, b = _host(grants), _host(grants)
    long_calls = 0
    for _ in range(data.draw(st.integers(1, 14))):
        if data.draw(st.booleans()):
            cmd, size, buf = GNTTABOP_map_grant_ref, _MAP.size, _map_ops(data)
        else:
            cmd, size, buf = GNTTABOP_unmap_grant_ref, _UNMAP.size, _unmap_ops(data, a)
        n = len(buf) // size
        long_calls += n >= RUN_MIN_OPS
        alone = bytearray(buf)
        assert a.grant_table_op_raw(0, cmd, buf, n) == 0
        _one_at_a_time(b, cmd, alone, size, n)
        assert buf == alone
        assert _state(a) == _state(b)
    for hv in (a, b):
        for domid in sorted(hv.domains, reverse=True):
            hv.destroy_domain(domid)


def test_a_long_map_call_then_unmap_call_of_one_granter_leaves_nothing_pinned() -> None:
    # The common backend case, end to end: RUN_MIN_OPS * 4 pages mapped in one
    # call (read-only), each view the granter's page, then unmapped in one call.
    hv = _host([])
    g = hv.domains[1]
    n = RUN_MIN_OPS * 4
    for i in range(n):
        grant(hv, g, 8 + i, 0, i, int(GTF_permit_access))
        g.memory.page(i)[:4] = i.to_bytes(4, "little")
    buf = bytearray(b"".join(_MAP.pack(FOREIGN_BASE + (i << 12), _HOST | _RO, 8 + i, 1, 0, 0, 0)
                             for i in range(n)))
    assert hv.grant_table_op_raw(0, GNTTABOP_map_grant_ref, buf, n) == 0
    res = list(_MAP.iter_unpack(buf))
    assert [r[4] for r in res] == [0] * n
    pages = hv.mapped_pages(0, [r[5] for r in res])
    assert [int.from_bytes(p[:4], "little") for p in pages] == list(range(n))
    assert all(p.readonly for p in pages)
    assert len(g.gnttab.active) == n and hv.domains[0].maptrack.peak == n
    ubuf = bytearray(b"".join(_UNMAP.pack(FOREIGN_BASE + (i << 12), 0, r[5], 0)
                              for i, r in enumerate(res)))
    assert hv.grant_table_op_raw(0, GNTTABOP_unmap_grant_ref, ubuf, n) == 0
    assert [u[3] for u in _UNMAP.iter_unpack(ubuf)] == [0] * n
    assert g.gnttab.active == {} and hv.domains[0].maptrack.entries == {}
    assert hv.domains[0].grant_p2m == {}
    for domid in (1, 0):
        hv.destroy_domain(domid)


def test_a_long_map_call_refuses_the_pin_past_the_counter_top_bit_as_one_op_does() -> None:
    # map_grant_ref: "if ( unlikely(act->pin & GNTPIN_incr2oflow_mask(pin_incr)) )"
    # -> GNTST_general_error: the 129th host-write pin of one entry is refused, in
    # a long call as one op at a time.
    a, b = _host([]), _host([])
    n = 140
    buf = bytearray(b"".join(_MAP.pack(FOREIGN_BASE + (i << 12), _HOST, 8, 1, 0, 0, 0)
                             for i in range(n)))
    alone = bytearray(buf)
    assert a.grant_table_op_raw(0, GNTTABOP_map_grant_ref, buf, n) == 0
    _one_at_a_time(b, GNTTABOP_map_grant_ref, alone, _MAP.size, n)
    assert buf == alone
    assert [r[4] for r in _MAP.iter_unpack(buf)] == [0] * 128 + [-1] * 12
    assert _state(a) == _state(b)
    for hv in (a, b):
        for domid in sorted(hv.domains, reverse=True):
            hv.destroy_domain(domid)
