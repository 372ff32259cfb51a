"""netfront's converted-design bugs (reference/busdma.md 6.2) as regression tests, netback's
per-slot checks (Linux drivers/net/xen-netback/netback.c), and hostile peers.

A hostile peer is played by writing its ring directly: the frontend's tx ring
(fuzzed tx slots against netback) or netback's rx responses (fuzzed against
netfront). The other side must survive, and after the unplug nothing leaks.
"""

from __future__ import annotations

import random

from test_net_e2e import detach_all, pair, send
from test_net_lib import frame

from gntdma.abi.netif import (
    NETIF_RSP_ERROR,
    NetifExtraInfo,
    NetifRxRequest,
    NetifTxRequest,
    NetifTxResponse,
    NETTXF_extra_info,
    NETTXF_more_data,
)
from gntdma.dev.netfront_queue import xn_queue
from gntdma.sched import mtx_lock, mtx_unlock
from gntdma.sys import MapState
from gntdma.toolstack.host import Host
from gntdma.toolstack.vif import Vif
from gntdma.xen.busdma import xen_dmamap_get_grefs
from gntdma.xen.xenbus import XenbusState


def test_mbuf_crossing_a_page_is_two_slots(host: Host) -> None:
    """FreeBSD netfront with Roger Pau Monne's fix (xen-devel, Dec 2021): tx loads with
    bus_dmamap_load_mbuf_sg on a tag with boundary PAGE_SIZE, so a 200-byte mbuf that
    starts 100 bytes before a page end is two slots; the converted one-segment load
    failed with EFBIG (busdma.md 6.2)."""
    va, vb, _sa, sb, _ = pair(host, queues=1)
    f = frame(vb.netfront.if_mac, va.netfront.if_mac, bytes(range(186)))
    send(host, va, vb, sb, [(f, 0, 0)], lead=4096 - 100)
    st = va.statistics().frontend
    assert (st.tx_packets, st.tx_slots, st.tx_errors) == (1, 2, 0)
    assert sb.got[0][0] == f
    detach_all(host, va, vb)


def test_rx_pool_exhaustion_stops_the_refill_and_never_wraps(host: Host) -> None:
    """busdma.md 6.2: the converted pool_idx was unsigned, so the exhaustion check was
    dead and the index wrapped. Here an empty pool stops xn_alloc_rx_buffers, arms the
    refill callout, and never hands out a map already posted."""
    va, vb, _sa, sb, _ = pair(host, queues=1, rx_pool_size=8)
    q: xn_queue = vb.netfront.queues[0]
    posted = [m for m in q.rx_maps if m is not None]
    assert len(posted) == 8 and len({id(m) for m in posted}) == 8 and q.rx_pool == []
    assert all(m.state is not MapState.IDLE for m in posted)
    assert vb.statistics().frontend.rx_refill_callouts >= 1
    frames = [(frame(vb.netfront.if_mac, va.netfront.if_mac, bytes([i]) * 300), 0, 0)
              for i in range(40)]
    send(host, va, vb, sb, frames)
    assert [g[0] for g in sb.got] == [f[0] for f in frames]
    assert vb.netfront.kern.dma_debug.reports() == []
    detach_all(host, va, vb)


def test_rx_rebuild_after_reconnect_does_not_reload_loaded_maps(host: Host) -> None:
    """busdma.md 6.2: xn_rebuild_rx_bufs reloaded maps still loaded (nrefs 2 on a one-
    segment map). Here the buffers kept over a reconnect are posted again with the
    grant they hold, without a load; traffic flows after the reconnect."""
    va, vb, _sa, sb, _ = pair(host, queues=1)
    sc = vb.netfront
    q = sc.queues[0]
    before = {id(m): xen_dmamap_get_grefs(m)[0] for m in q.rx_maps if m is not None}
    loads = sc.rx_loads
    vb.frontend.reconnect()
    host.sched.run(until=lambda: vb.frontend.connects == 2
                   and vb.backend.state == XenbusState.Connected)
    after = {id(m): xen_dmamap_get_grefs(m)[0] for m in q.rx_maps if m is not None}
    assert after == before and sc.rx_loads == loads
    assert sc.kern.dma_debug.reports() == []
    f = frame(sc.if_mac, va.netfront.if_mac, bytes(3000))
    send(host, va, vb, sb, [(f, 0, 0)])
    assert sb.got[-1][0] == f
    detach_all(host, va, vb)


# --- a hostile frontend: tx slots written straight into the ring -----------------------


def raw_tx(host: Host, v: Vif, slots: list[bytes]) -> list[NetifTxResponse]:
    """Put ``slots`` on queue 0's tx ring as they are, notify, return the responses."""
    sc = v.netfront
    q = sc.queues[0]
    out: list[NetifTxResponse] = []

    def go() -> None:
        mtx_lock(q.lock)
        q.connected = False  # the test reads the responses, not netfront
        ring = q.tx
        assert ring is not None
        for s in slots:
            ring.put_request(s)
        ring.push_requests()
        mtx_unlock(q.lock)
        sc.hc.evtchn_send(q.tx_port)

    host.sched.call(go)
    host.sched.run(until=lambda: q.tx is not None and (q.tx.unconsumed_responses() > 0
                                                       or v.netback.state != "connected"))
    ring = q.tx
    assert ring is not None
    for _ in range(ring.unconsumed_responses()):
        out.append(NetifTxResponse.unpack_from(ring.get_response()))
    return out


def tx(gref: int, offset: int, size: int, flags: int = 0, id_: int = 1) -> bytes:
    return NetifTxRequest(gref=gref, offset=offset, flags=flags, id=id_, size=size).pack()


def assert_fatal(host: Host, v: Vif) -> None:
    host.sched.run(until=lambda: v.backend.state in (XenbusState.Closing, XenbusState.Closed))
    assert v.netback.statistics().fatal_errors == 1
    assert host.xenstored.exists(f"{v.dirs.backend_path}/error")


def test_netback_fatal_on_a_slot_past_the_page(host: Host) -> None:
    """netback.c xenvif_tx_build_gops: txreq.offset + txreq.size > XEN_PAGE_SIZE is
    xenvif_fatal_tx_err."""
    va, vb, *_ = pair(host, queues=1)
    raw_tx(host, va, [tx(8, 4000, 200)])
    assert_fatal(host, va)
    detach_all(host, va, vb)


def test_netback_drops_a_packet_shorter_than_eth_hlen(host: Host) -> None:
    """netback.c xenvif_tx_build_gops: txreq.size < ETH_HLEN -> XEN_NETIF_RSP_ERROR."""
    va, vb, *_ = pair(host, queues=1)
    assert raw_tx(host, va, [tx(8, 0, 10, id_=7)]) == [NetifTxResponse(7, NETIF_RSP_ERROR)]
    assert va.netback.state == "connected"
    detach_all(host, va, vb)


def test_netback_drops_a_packet_with_a_bad_reference(host: Host) -> None:
    """netback.c xenvif_tx_check_gop: a failed grant copy -> XEN_NETIF_RSP_ERROR."""
    va, vb, *_ = pair(host, queues=1)
    assert raw_tx(host, va, [tx(99999, 0, 100, id_=3)]) == [NetifTxResponse(3, NETIF_RSP_ERROR)]
    assert va.netback.statistics().errors == 1 and va.netback.state == "connected"
    detach_all(host, va, vb)


def test_netback_fatal_when_sizes_do_not_add_up(host: Host) -> None:
    """netback.c xenvif_count_requests: a later slot bigger than what is left of the
    first's size is "Packet is bigger than frame": fatal."""
    va, vb, *_ = pair(host, queues=1)
    raw_tx(host, va, [tx(8, 0, 100, NETTXF_more_data, 1), tx(9, 0, 200, 0, 2)])
    assert_fatal(host, va)
    detach_all(host, va, vb)


def test_netback_drops_more_than_legacy_slots_and_is_fatal_past_fatal_skb_slots(
        host: Host) -> None:
    """netback.c xenvif_count_requests: > XEN_NETBK_LEGACY_SLOTS_MAX (18) slots drop the
    packet with errors; > fatal_skb_slots (20) disable the vif."""
    va, vb, *_ = pair(host, queues=1)
    slots = [tx(8, 0, 14, NETTXF_more_data, 0)] + [
        tx(8, 0, 0, NETTXF_more_data if i < 17 else 0, i + 1) for i in range(18)]
    rsps = raw_tx(host, va, slots)
    assert len(rsps) == 19 and all(r.status == NETIF_RSP_ERROR for r in rsps)
    assert va.netback.state == "connected"
    slots = [tx(8, 0, 14, NETTXF_more_data, 0)] + [
        tx(8, 0, 0, NETTXF_more_data if i < 20 else 0, i + 1) for i in range(21)]
    raw_tx(host, va, slots)
    assert_fatal(host, va)
    detach_all(host, va, vb)


def test_netback_fatal_on_an_unknown_extra_type(host: Host) -> None:
    """netback.c xenvif_get_extras: type NONE or >= XEN_NETIF_EXTRA_TYPE_MAX is fatal."""
    va, vb, *_ = pair(host, queues=1)
    raw_tx(host, va, [tx(8, 0, 60, NETTXF_extra_info), NetifExtraInfo(type=9).pack()])
    assert_fatal(host, va)
    detach_all(host, va, vb)


def test_fuzzed_tx_slots_never_crash_netback(host: Host) -> None:
    rng = random.Random(5)
    va, vb, *_ = pair(host, queues=1)
    for _ in range(6):
        if va.netback.state != "connected":
            break
        slots = [rng.randbytes(12) for _ in range(rng.randint(1, 6))]
        raw_tx(host, va, slots)
    assert host.crashed == {}
    detach_all(host, va, vb)


# --- a hostile backend: rx responses written straight into the ring --------------------


def test_fuzzed_rx_responses_never_crash_netfront(host: Host) -> None:
    """Bad ids, statuses, offsets and flags: netfront drops the packets (or closes on an
    impossible index) and leaks nothing (FreeBSD xn_get_responses checks)."""
    rng = random.Random(7)
    va, vb, _sa, _sb, _ = pair(host, queues=1)
    nb = vb.netback
    q = nb.queues[0]

    def fuzz() -> None:
        for _ in range(20):
            mtx_lock(q.lock)
            ring = q.rx
            if ring is None or not q.active:
                mtx_unlock(q.lock)
                return
            n = min(ring.unconsumed_requests(), rng.randint(1, 5))
            for _ in range(n):
                NetifRxRequest.unpack_from(ring.get_request())
                ring.put_response(rng.randbytes(8))
            ring.push_responses()
            mtx_unlock(q.lock)
            nb.hc.evtchn_send(q.rx_port)
            host.sched.yield_()

    host.sched.call(fuzz)
    host.sched.yield_()
    assert host.crashed == {}
    st = vb.statistics().frontend
    assert st.rx_errors + st.ring_errors > 0
    detach_all(host, va, vb)
