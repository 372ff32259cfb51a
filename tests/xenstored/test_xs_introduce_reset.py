"""INTRODUCE of a domain already introduced resets its ring, as C xenstored 4.17 does.

Source: Xen RELEASE-4.17.7 ``tools/xenstore/xenstored_domain.c``:

- ``do_introduce`` calls ``introduce_domain`` (which, for a domain introduced
  already, dom0 the master domain included, only rebinds the event channel),
  then ``domain_conn_reset``, then, if ``interface->connection ==
  XENSTORE_RECONNECT``, sets it to ``XENSTORE_CONNECTED`` and notifies.
- ``domain_conn_reset``: ``conn_delete_all_watches``,
  ``conn_delete_all_transactions``, ``conn_free_buffered_data`` (the queued
  output), ``talloc_free(conn->in)`` (a request partly read), then
  ``req_cons = req_prod = rsp_cons = rsp_prod = 0`` and ``xen_wmb()``. The
  connection itself stays; ``interface->error`` is not touched.
"""

from __future__ import annotations

import struct

from gntdma.abi.xs_wire import (
    XENSTORE_CONNECTED,
    XENSTORE_DOMAIN_INTERFACE_OFFSETS,
    XENSTORE_RECONNECT,
    XsdType,
)
from gntdma.sched import ThreadState
from gntdma.toolstack.host import Guest, Host
from gntdma.toolstack.xs import store_pfn
from gntdma.xen.xenstore import XST_NIL, XsWatch

U32 = struct.Struct("=I")
HDR = struct.Struct("<IIII")
OFF = XENSTORE_DOMAIN_INTERFACE_OFFSETS
INDICES = ("req_cons", "req_prod", "rsp_cons", "rsp_prod")


def z(*parts: str) -> bytes:
    return b"".join(p.encode() + b"\0" for p in parts)


def raw(type_: int, payload: bytes, req_id: int) -> bytes:
    return HDR.pack(type_, req_id, 0, len(payload)) + payload


def u32(page: memoryview, field: str) -> int:
    return int(U32.unpack_from(page, OFF[field])[0])


def put(page: memoryview, field: str, value: int) -> None:
    U32.pack_into(page, OFF[field], value & 0xFFFFFFFF)


def push_request_bytes(page: memoryview, data: bytes) -> None:
    """What a guest kernel does: bytes at req_prod (wrapping), then the index."""
    prod = u32(page, "req_prod")
    for i, b in enumerate(data):
        page[OFF["req"] + ((prod + i) & 1023)] = b
    put(page, "req_prod", prod + len(data))


def on_dom0(host: Host, fn: object) -> object:
    out: list[object] = []
    t = host.sched.spawn(lambda: out.append(fn()),  # type: ignore[operator]
                         name="Domain-0/tool", domain=host.dom0.kernel)
    host.sched.run(until=lambda: t.state is ThreadState.DONE)
    assert t.exc is None
    return out[0]


def quiet_guest(host: Host, g: Guest) -> memoryview:
    """The guest's kernel stops using its client; the test drives the page by hand."""
    assert g.xenstore is not None
    g.xenstore.xs_detach()
    g.xenstore = None
    return g.hc.own_page(store_pfn(g.domain.memory))


def test_introduce_of_an_introduced_domain_resets_its_ring_as_domain_conn_reset(
        host: Host) -> None:
    g = host.create_guest("g1", memory_mb=4)
    c = g.xenstore
    assert c is not None
    assert c.xs_register_watch(XsWatch("data", lambda p, t: None)) == 0
    err, _tx = c.xs_transaction_start()
    assert err == 0
    ring = host.xenstore.rings[g.domid]
    conn = ring.conn
    host.sched.yield_()
    assert conn.watches and conn.transactions
    page = quiet_guest(host, g)
    port = host.xenstore.store_ports[g.domid]

    # A reply bigger than the room the guest leaves (it stops consuming), and
    # the first 10 bytes of a next request: buffered output and partial input.
    host.xenstored.write(f"/local/domain/{g.domid}/big", b"x" * 1500)
    push_request_bytes(page, raw(XsdType.XS_READ, b"big\0", 7) + raw(2, b"name\0", 8)[:10])
    assert g.hc.evtchn_send(port) == 0
    host.sched.yield_()
    assert u32(page, "rsp_prod") - u32(page, "rsp_cons") == 1024
    assert conn.has_output
    assert u32(page, "req_prod") != 0
    put(page, "connection", XENSTORE_RECONNECT)  # and it asked for a reconnect

    # The toolstack introduces the domain again, over dom0's ring.
    d0 = host.dom0.xenstore
    assert d0 is not None
    payload = z(str(g.domid), str(store_pfn(g.domain.memory)), str(port))
    assert on_dom0(host, lambda: d0._talk(XsdType.XS_INTRODUCE, XST_NIL, payload)) == (0, b"OK\0")
    host.sched.yield_()

    assert [u32(page, f) for f in INDICES] == [0, 0, 0, 0]
    assert u32(page, "connection") == XENSTORE_CONNECTED
    assert ring.conn is conn and not conn.closed  # the connection stays
    assert conn.watches == [] and conn.transactions == {} and not conn.has_output
    # The partial request is gone: a request written at index 0 is answered at 0.
    msg = raw(XsdType.XS_READ, b"name\0", 9)
    page[OFF["req"]: OFF["req"] + len(msg)] = msg
    put(page, "req_prod", len(msg))
    assert g.hc.evtchn_send(port) == 0
    host.sched.yield_()
    n = u32(page, "rsp_prod")
    assert bytes(page[OFF["rsp"]: OFF["rsp"] + n]) == raw(XsdType.XS_READ, b"g1", 9)
    assert ring.statistics().errors == 0
    page.release()


def test_introduce_of_domain_0_resets_dom0s_ring_as_domain_conn_reset(host: Host) -> None:
    d0 = host.dom0
    assert d0.xenstore is not None
    assert d0.xenstore.xs_write(XST_NIL, "/local/domain/0/x", "", "1") == 0
    page = quiet_guest(host, d0)
    assert u32(page, "req_prod") != 0 and u32(page, "rsp_prod") != 0
    ring = host.xenstore.rings[0]

    # init-dom0 over the socket: INTRODUCE 0 <gfn> <port>.
    tool = host.xenstored.connect(0, name="init-dom0")
    port = host.xenstore.store_ports[0]
    tool.feed(raw(XsdType.XS_INTRODUCE, z("0", str(store_pfn(d0.domain.memory)), str(port)), 1))
    assert tool.data_to_send() == raw(XsdType.XS_INTRODUCE, b"OK\0", 1)
    host.sched.yield_()
    assert [u32(page, f) for f in INDICES] == [0, 0, 0, 0]
    assert ring.statistics().errors == 0
    tool.close()
    page.release()
