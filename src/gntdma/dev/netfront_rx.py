"""netfront receive: the rx pools, refill, and the parsing of the backend's responses.

See :mod:`gntdma.dev.netfront` for the theory of operation.
"""

from __future__ import annotations

import errno

from gntdma.abi.netif import (
    XEN_NETIF_EXTRA_FLAG_MORE,
    XEN_NETIF_EXTRA_TYPE_GSO,
    XEN_NETIF_EXTRA_TYPE_MAX,
    XEN_NETIF_GSO_TYPE_TCPV4,
    XEN_NETIF_GSO_TYPE_TCPV6,
    NetifExtraInfo,
    NetifRxRequest,
    NetifRxResponse,
    NETRXF_csum_blank,
    NETRXF_data_validated,
    NETRXF_extra_info,
    NETRXF_more_data,
)
from gntdma.abi.ring import RingProtocolError
from gntdma.dev.netfront_queue import (
    XN_RX_REFILL_DELAY,
    xn_queue,
    xn_softc_base,
)
from gntdma.dev.netif_common import (
    CSUM_DATA_VALID,
    CSUM_IP6_TSO,
    CSUM_PSEUDO_HDR,
    CSUM_TSO,
    MAX_TX_REQ_FRAGS,
    NET_RX_SLOTS_MIN,
)
from gntdma.sched import mtx_lock, mtx_unlock
from gntdma.sys import (
    BUS_DMA_NOWAIT,
    BUS_DMASYNC_POSTREAD,
    BUS_DMASYNC_PREREAD,
    M_NOWAIT,
    M_PKTHDR,
    MJUMPAGESIZE,
    MT_DATA,
    PAGE_SIZE,
    BusDmaMap,
    bus_dma_segment_t,
    bus_dmamap_load,
    bus_dmamap_sync,
    bus_dmamap_unload,
    callout_reset,
    m_freem,
    m_getjcl,
    mbuf,
    mtod,
)
from gntdma.xen.busdma import (
    xen_dmamap_get_grefs,
)

__all__ = ["xn_softc_rx"]


class xn_softc_rx(xn_softc_base):
    """Receive half of :class:`~gntdma.dev.netfront.netfront_info`."""

    # -- rx -----------------------------------------------------------------------------

    def _xn_post(self, q: xn_queue, m: mbuf, map_: BusDmaMap) -> None:
        """Put a loaded buffer at the next request slot. Lock held; space checked."""
        ring = q.rx
        assert ring is not None
        idx = ring.req_prod_pvt & (ring.nr_ents - 1)
        q.rx_mbufs[idx] = m
        q.rx_maps[idx] = map_
        ring.put_request(NetifRxRequest(id=idx, gref=xen_dmamap_get_grefs(map_)[0]).pack())

    def _xn_rebuild_rx_bufs(self, q: xn_queue) -> None:
        """After a reconnect: re-post the buffers still held, as they are (no reload)."""
        held = [(m, mp) for m, mp in zip(q.rx_mbufs, q.rx_maps, strict=True)
                if m is not None and mp is not None]
        assert q.rx is not None
        q.rx_mbufs = [None] * q.rx.nr_ents
        q.rx_maps = [None] * q.rx.nr_ents
        for m, mp in held:
            self._xn_post(q, m, mp)

    def _xn_alloc_rx_buffers(self, q: xn_queue) -> None:
        """Fill the free rx slots from the pool (``xn_alloc_rx_buffers``). Lock held."""
        ring, dmat = q.rx, q.rx_dmat
        if ring is None or dmat is None or not q.connected:
            return
        while ring.free_requests() > 0:
            if not q.rx_pool:  # exhausted: stop here, never wrap
                break
            map_ = q.rx_pool.pop()
            m = m_getjcl(self.kern, M_NOWAIT, MT_DATA, M_PKTHDR, MJUMPAGESIZE)
            if m is None:
                q.rx_pool.append(map_)
                break
            got: list[int] = []

            def cb(_a: object, segs: list[bus_dma_segment_t], nseg: int, err: int,
                   got: list[int] = got) -> None:
                got.append(err if err != 0 or nseg == 1 else errno.EFBIG)

            bus_dmamap_load(dmat, map_, mtod(m), PAGE_SIZE, cb, None, BUS_DMA_NOWAIT)
            self.rx_loads += 1
            if not got or got[0] != 0:
                bus_dmamap_unload(dmat, map_)
                q.rx_pool.append(map_)
                m_freem(m)
                break
            bus_dmamap_sync(dmat, map_, BUS_DMASYNC_PREREAD)
            self._xn_post(q, m, map_)
        posted = (ring.req_prod_pvt - ring.rsp_cons) & 0xFFFFFFFF
        if posted < min(NET_RX_SLOTS_MIN, ring.nr_ents):
            self._count("rx_refill_callouts")
            callout_reset(q.rx_callout, XN_RX_REFILL_DELAY, self._xn_rx_refill, q)
        if ring.push_requests():
            self.hc.evtchn_send(q.rx_port)

    def _xn_rx_refill(self, arg: object) -> None:
        assert isinstance(arg, xn_queue)
        self._xn_alloc_rx_buffers(arg)

    def _xn_intr_rx(self, q: xn_queue) -> None:
        """``xn_rxeof``: take every complete packet, deliver with no lock held."""
        out: list[mbuf] = []
        mtx_lock(q.lock)
        ring = q.rx
        if not q.connected or ring is None:
            mtx_unlock(q.lock)
            return
        try:
            while True:
                for _ in range(ring.unconsumed_responses()):
                    idx = ring.rsp_cons & (ring.nr_ents - 1)
                    m, mp = q.rx_mbufs[idx], q.rx_maps[idx]
                    q.rx_mbufs[idx] = q.rx_maps[idx] = None
                    key = q.rx_seq
                    q.rx_seq += 1
                    if m is not None and mp is not None:
                        q.rx_held[key] = (m, mp)
                    q.rx_partial.append((key, ring.get_response()))
                self._xn_rx_packets(q, out)
                if not ring.final_check_for_responses():
                    break
        except RingProtocolError as e:
            self._xn_ring_broken(q, f"rx ring: {e}")
        self._xn_alloc_rx_buffers(q)
        mtx_unlock(q.lock)
        for m in out:
            cb = self.if_input
            if cb is None:
                m_freem(m)
            else:
                cb(m)

    def _xn_rx_recycle(self, q: xn_queue, key: int) -> None:
        """``xn_move_rx_slot``: post a consumed slot's buffer again, unchanged (or give
        it back to the pool if the ring has no room)."""
        held = q.rx_held.pop(key, None)
        ring, dmat = q.rx, q.rx_dmat
        if held is None or dmat is None:
            return
        m, mp = held
        if ring is not None and q.connected and ring.free_requests() > 0:
            self._xn_post(q, m, mp)
            return
        bus_dmamap_unload(dmat, mp)
        q.rx_pool.append(mp)
        m_freem(m)

    def _xn_rx_packets(self, q: xn_queue, out: list[mbuf]) -> None:
        """Parse the complete packets at the head of ``rx_partial``. Lock held."""
        part = q.rx_partial
        while part:
            # find the packet's extent: first, extras, then more_data slots
            first = NetifRxResponse.unpack_from(part[0][1])
            n, extras, ok = 1, [], True
            flags = first.flags
            if flags & NETRXF_extra_info:
                more = True
                while more:
                    if n >= len(part):
                        return  # incomplete: wait for the rest
                    e = NetifExtraInfo.unpack_from(part[n][1])
                    extras.append(e)
                    n += 1
                    more = bool(e.flags & XEN_NETIF_EXTRA_FLAG_MORE)
                    if len(extras) > XEN_NETIF_EXTRA_TYPE_MAX:
                        ok, more = False, False
            data = [(part[0][0], first)]
            cont = bool(flags & NETRXF_more_data)
            while cont and ok:
                if n >= len(part):
                    return
                r = NetifRxResponse.unpack_from(part[n][1])
                data.append((part[n][0], r))
                n += 1
                cont = bool(r.flags & NETRXF_more_data)
                if len(data) > MAX_TX_REQ_FRAGS + 1:
                    ok = False
            slots = part[:n]
            del part[:n]
            for e in extras:
                if not 0 < e.type < XEN_NETIF_EXTRA_TYPE_MAX:
                    ok = False
                elif e.type == XEN_NETIF_EXTRA_TYPE_GSO and (
                        e.gso_type not in (XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6)
                        or e.gso_size == 0):
                    ok = False
            for idx, r in data:
                if r.status <= 0 or r.offset + r.status > PAGE_SIZE or idx not in q.rx_held:
                    ok = False
            if not ok:
                self._count("rx_errors")
                for idx, _raw in slots:
                    self._xn_rx_recycle(q, idx)
                continue
            for idx, _raw in slots[1:1 + len(extras)]:
                self._xn_rx_recycle(q, idx)
            out.append(self._xn_rx_chain(q, data, extras, flags))

    def _xn_rx_chain(self, q: xn_queue, data: list[tuple[int, NetifRxResponse]],
                     extras: list[NetifExtraInfo], flags: int) -> mbuf:
        dmat = q.rx_dmat
        assert dmat is not None
        head: mbuf | None = None
        tail: mbuf | None = None
        total = 0
        for idx, r in data:
            m, mp = q.rx_held.pop(idx)
            bus_dmamap_sync(dmat, mp, BUS_DMASYNC_POSTREAD)
            bus_dmamap_unload(dmat, mp)
            q.rx_pool.append(mp)
            m.m_data = m.ext_buf + r.offset
            m.m_len = r.status
            total += r.status
            if head is None:
                head = m
            else:
                m.m_flags &= ~M_PKTHDR
                assert tail is not None
                tail.m_next = m
            tail = m
        assert head is not None
        head.m_pkthdr.len = total
        if flags & (NETRXF_data_validated | NETRXF_csum_blank):
            head.m_pkthdr.csum_flags = CSUM_DATA_VALID | CSUM_PSEUDO_HDR
            head.m_pkthdr.csum_data = 0xFFFF
        for e in extras:
            if e.type == XEN_NETIF_EXTRA_TYPE_GSO:
                head.m_pkthdr.tso_segsz = e.gso_size
                head.m_pkthdr.csum_flags |= (CSUM_TSO if e.gso_type == XEN_NETIF_GSO_TYPE_TCPV4
                                             else CSUM_IP6_TSO)
                self._count("rx_gso_packets")
        self._count("rx_packets")
        self._count("rx_bytes", total)
        return head

