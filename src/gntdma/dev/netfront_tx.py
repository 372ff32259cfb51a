"""netfront transmit: queue selection, slots from bus_dmamap_load_mbuf_sg, completions.

See :mod:`gntdma.dev.netfront` for the theory of operation.
"""

from __future__ import annotations

import errno
import zlib

from gntdma.abi.netif import (
    NETIF_RSP_NULL,
    XEN_NETIF_GSO_TYPE_TCPV4,
    XEN_NETIF_GSO_TYPE_TCPV6,
    XEN_NETIF_MAX_TX_SIZE,
    NetifExtraInfo,
    NetifTxRequest,
    NetifTxResponse,
    NETTXF_csum_blank,
    NETTXF_data_validated,
    NETTXF_extra_info,
    NETTXF_more_data,
)
from gntdma.abi.ring import RingProtocolError
from gntdma.dev.netfront_queue import (
    NETFRONT_TX_QUEUE_MAX,
    TxPkt,
    xn_queue,
    xn_softc_base,
)
from gntdma.dev.netif_common import (
    CSUM_IP6_TSO,
    CSUM_OFFLOAD_TX,
    CSUM_TSO,
    MAX_TX_REQ_FRAGS,
)
from gntdma.sched import mtx_lock, mtx_unlock
from gntdma.sys import (
    BUS_DMASYNC_POSTWRITE,
    BUS_DMASYNC_PREWRITE,
    M_NOWAIT,
    PAGE_SIZE,
    bus_dmamap_create,
    bus_dmamap_load_mbuf_sg,
    bus_dmamap_sync,
    bus_dmamap_unload,
    m_copydata,
    m_defrag,
    m_freem,
    m_length,
    mbuf,
)
from gntdma.xen.busdma import (
    BUS_DMA_XEN_RO,
    xen_dmamap_get_grefs,
)

__all__ = ["xn_softc_tx"]


class xn_softc_tx(xn_softc_base):
    """Transmit half of :class:`~gntdma.dev.netfront.netfront_info`."""

    # -- tx -----------------------------------------------------------------------------

    def _xn_select_queue(self, m: mbuf) -> xn_queue:
        n = len(self.queues)
        flow = m.m_pkthdr.flowid
        if flow == 0 and n > 1:
            hdr = m_copydata(m, 0, min(m_length(m), 54))
            if len(hdr) >= 38 and hdr[12:14] == b"\x08\x00":  # IPv4: addresses, ports
                flow = zlib.crc32(hdr[26:38])
            elif len(hdr) >= 54 and hdr[12:14] == b"\x86\xdd":  # IPv6
                flow = zlib.crc32(hdr[22:54])
            else:
                flow = zlib.crc32(hdr[0:12])
        return self.queues[flow % n]

    def if_transmit(self, m: mbuf) -> int:
        """Send one frame (the mbuf chain; the driver owns it from here): 0 or errno."""
        if not self.queues or self.state != "connected":
            m_freem(m)
            return errno.ENXIO
        length = m_length(m)
        if length > XEN_NETIF_MAX_TX_SIZE or length == 0:
            m_freem(m)
            self._count("tx_errors")
            return errno.EMSGSIZE
        q = self._xn_select_queue(m)
        mtx_lock(q.lock)
        if not q.connected:
            mtx_unlock(q.lock)
            m_freem(m)
            return errno.ENXIO
        if len(q.tx_pending) >= NETFRONT_TX_QUEUE_MAX:
            mtx_unlock(q.lock)
            m_freem(m)
            self._count("drops")
            return errno.ENOBUFS
        q.tx_pending.append(m)
        error = self._xn_txq_start(q)
        mtx_unlock(q.lock)
        return error

    def _xn_txq_start(self, q: xn_queue) -> int:
        """Put pending packets on the ring while they fit. Lock held."""
        ring = q.tx
        assert ring is not None
        error = 0
        sent = False
        while q.tx_pending:
            if ring.free_requests() < MAX_TX_REQ_FRAGS + 1 or len(q.tx_free_ids) < MAX_TX_REQ_FRAGS:
                break
            m = q.tx_pending.popleft()
            error = self._xn_assemble_tx_request(q, m)
            sent = sent or error == 0
        if sent and ring.push_requests():
            self.hc.evtchn_send(q.tx_port)
        return error

    def _xn_assemble_tx_request(self, q: xn_queue, m: mbuf) -> int:
        ring, dmat = q.tx, q.tx_dmat
        assert ring is not None and dmat is not None
        if q.tx_maps_free:
            map_ = q.tx_maps_free.pop()
        else:
            error, nm = bus_dmamap_create(dmat, 0)
            if error != 0 or nm is None:
                m_freem(m)
                self._count("tx_errors")
                return error if error != 0 else errno.ENOMEM
            map_ = nm
            q.tx_maps_all.append(map_)
        error, segs, nsegs = bus_dmamap_load_mbuf_sg(dmat, map_, m, BUS_DMA_XEN_RO)
        if error == errno.EFBIG:
            bus_dmamap_unload(dmat, map_)
            m2 = m_defrag(m, M_NOWAIT)
            if m2 is not None:
                m = m2
                error, segs, nsegs = bus_dmamap_load_mbuf_sg(dmat, map_, m, BUS_DMA_XEN_RO)
        if error != 0:
            bus_dmamap_unload(dmat, map_)
            q.tx_maps_free.append(map_)
            m_freem(m)
            self._count("tx_errors")
            return error
        ph = m.m_pkthdr
        gso = 0
        if ph.csum_flags & (CSUM_TSO | CSUM_IP6_TSO) and ph.tso_segsz > 0:
            gso = XEN_NETIF_GSO_TYPE_TCPV4 if ph.csum_flags & CSUM_TSO else XEN_NETIF_GSO_TYPE_TCPV6
            if not (self.features.gso_tcpv4 if gso == XEN_NETIF_GSO_TYPE_TCPV4
                    else self.features.gso_tcpv6):
                bus_dmamap_unload(dmat, map_)
                q.tx_maps_free.append(map_)
                m_freem(m)
                self._count("tx_errors")
                return errno.EINVAL
        bus_dmamap_sync(dmat, map_, BUS_DMASYNC_PREWRITE)
        grefs = xen_dmamap_get_grefs(map_)
        total = m_length(m)
        pkt = TxPkt(m, map_, nsegs)
        for i in range(nsegs):
            s = segs[i]
            flags = 0
            if i == 0:
                if ph.csum_flags & CSUM_OFFLOAD_TX:
                    flags |= NETTXF_csum_blank | NETTXF_data_validated
                if gso != 0:
                    flags |= NETTXF_extra_info
            if i + 1 < nsegs:
                flags |= NETTXF_more_data
            tid = q.tx_free_ids.pop()
            q.tx_pkts[tid] = pkt
            ring.put_request(NetifTxRequest(gref=grefs[i], offset=s.ds_addr & (PAGE_SIZE - 1),
                                            flags=int(flags), id=tid,
                                            size=total if i == 0 else s.ds_len).pack())
            if i == 0 and gso != 0:
                ring.put_request(NetifExtraInfo.gso(ph.tso_segsz, gso).pack())
        q.tx_packets += 1
        self._count("tx_packets")
        self._count("tx_bytes", total)
        self._count("tx_slots", nsegs)
        if gso != 0:
            self._count("tx_gso_packets")
        return 0

    def _xn_tx_release(self, q: xn_queue, pkt: TxPkt) -> None:
        dmat = q.tx_dmat
        assert dmat is not None
        bus_dmamap_sync(dmat, pkt.map, BUS_DMASYNC_POSTWRITE)
        bus_dmamap_unload(dmat, pkt.map)
        q.tx_maps_free.append(pkt.map)
        m_freem(pkt.m)

    def _xn_intr_tx(self, q: xn_queue) -> None:
        """``xn_txeof``: release completed slots, then send what waits."""
        mtx_lock(q.lock)
        ring = q.tx
        if not q.connected or ring is None:
            mtx_unlock(q.lock)
            return
        try:
            while True:
                for _ in range(ring.unconsumed_responses()):
                    r = NetifTxResponse.unpack_from(ring.get_response())
                    if r.status == NETIF_RSP_NULL:
                        continue
                    pkt = q.tx_pkts.pop(r.id, None)
                    if pkt is None:
                        self._count("tx_bad_ids")
                        continue
                    q.tx_free_ids.append(r.id)
                    if r.status < 0:
                        self._count("tx_errors")
                    pkt.left -= 1
                    if pkt.left == 0:
                        self._xn_tx_release(q, pkt)
                if not ring.final_check_for_responses():
                    break
            self._xn_txq_start(q)
        except RingProtocolError as e:
            self._xn_ring_broken(q, f"tx ring: {e}")
        mtx_unlock(q.lock)

