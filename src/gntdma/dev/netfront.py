"""netfront: the Xen network frontend (FreeBSD's xn), on the grant-table bus_dma handlers.

Theory of operation
-------------------
Modelled on FreeBSD ``sys/dev/xen/netfront/netfront.c`` in its converted form
(``reference/busdma.md`` 6.2) with the later upstream transmit fix:

- Each queue has a tx and an rx ring (one page each, granted through a
  ``BUS_DMA_XEN_PREALLOC_REFS`` map held for the ring's life) and one event
  channel, or two with ``feature-split-event-channels``.
- Receive buffers: a per-queue pool of ``RING_SIZE + 1`` one-segment maps
  created with ``BUS_DMA_XEN_PREALLOC_REFS`` (each holds one grant reference
  for life), loaded with a page-size cluster (``m_getjcl(MJUMPAGESIZE)``) when
  posted and unloaded when the packet comes back. The pool is a stack; an
  empty pool stops the refill (``xn_alloc_rx_buffers``) and arms a callout: it
  never wraps (the converted code's unsigned ``pool_idx`` did).
- Transmit: ``bus_dmamap_load_mbuf_sg`` on a page-bounded Xen tag (boundary
  and maxsegsz PAGE_SIZE, ``MAX_TX_REQ_FRAGS`` segments), read-only grants
  (``BUS_DMA_XEN_RO``), so an mbuf crossing a page is two slots (the converted
  code's one-segment load gave EFBIG). One grant per segment, per load.
  Checksum offload and GSO (an extra-info slot) from ``m_pkthdr``.
- After a reconnect, the rx buffers still held (maps loaded, grants written)
  are posted again as they are (``xn_rebuild_rx_bufs``), never reloaded (the
  converted code reloaded loaded maps).

The backend is not trusted: an rx response with a bad status, an offset plus
size past the page, too many slots or an unknown extra drops the packet (its
buffers are reposted); an impossible ``rsp_prod`` breaks the ring
(``on_ring_error``: the xenbus driver closes the device). A tx response for
an id not in flight is counted and ignored. Buffers are found by ring index,
as FreeBSD and Linux do (an rx response sits at its request's index).

Rules: C contracts (errno ints). One ``MTX_DEF`` mutex per queue protects its
rings and buffers; ``if_input`` is called with no lock held. The device
object given to the stack (:class:`netfront_info`) has ``if_transmit``,
``if_input``, ``if_mac``, ``if_mtu`` and ``statistics()``.
"""

from __future__ import annotations

import errno
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, final

from gntdma.abi.netif import (
    NETIF_RSP_NULL,
    NETIF_RX_ENTRY_SIZE,
    NETIF_TX_ENTRY_SIZE,
    XEN_NETIF_EXTRA_FLAG_MORE,
    XEN_NETIF_EXTRA_TYPE_GSO,
    XEN_NETIF_EXTRA_TYPE_MAX,
    XEN_NETIF_GSO_TYPE_TCPV4,
    XEN_NETIF_GSO_TYPE_TCPV6,
    XEN_NETIF_MAX_TX_SIZE,
    NetifExtraInfo,
    NetifRxRequest,
    NetifRxResponse,
    NetifTxRequest,
    NetifTxResponse,
    NETRXF_csum_blank,
    NETRXF_data_validated,
    NETRXF_extra_info,
    NETRXF_more_data,
    NETTXF_csum_blank,
    NETTXF_data_validated,
    NETTXF_extra_info,
    NETTXF_more_data,
)
from gntdma.abi.ring import FrontRing, RingProtocolError, sring_init
from gntdma.dev.netfront_queue import XnRing, xn_ring_alloc, xn_ring_free
from gntdma.dev.netif_common import (
    CSUM_DATA_VALID,
    CSUM_IP6_TSO,
    CSUM_OFFLOAD_TX,
    CSUM_PSEUDO_HDR,
    CSUM_TSO,
    MAX_TX_REQ_FRAGS,
    NET_RX_SLOTS_MIN,
)
from gntdma.sched import mb, mtx_init, mtx_lock, mtx_unlock, rmb, wmb
from gntdma.sys import (
    BUS_DMA_NOWAIT,
    BUS_DMASYNC_POSTREAD,
    BUS_DMASYNC_POSTWRITE,
    BUS_DMASYNC_PREREAD,
    BUS_DMASYNC_PREWRITE,
    BUS_SPACE_MAXADDR,
    M_NOWAIT,
    M_PKTHDR,
    MJUMPAGESIZE,
    MT_DATA,
    PAGE_SIZE,
    BusDmaMap,
    BusDmaTag,
    Kernel,
    bus_dma_segment_t,
    bus_dma_tag_create,
    bus_dma_tag_destroy,
    bus_dmamap_create,
    bus_dmamap_destroy,
    bus_dmamap_load,
    bus_dmamap_load_mbuf_sg,
    bus_dmamap_sync,
    bus_dmamap_unload,
    callout,
    callout_drain,
    callout_init_mtx,
    callout_reset,
    callout_stop,
    m_copydata,
    m_defrag,
    m_freem,
    m_getjcl,
    m_length,
    mbuf,
    mtod,
)
from gntdma.xen.busdma import (
    BUS_DMA_XEN_DOMID_SHIFT,
    BUS_DMA_XEN_PREALLOC_REFS,
    BUS_DMA_XEN_RO,
    xen_dmamap_get_grefs,
    xen_get_dma_tag,
)
from gntdma.xen.gnttab import GntTab
from gntdma.xen.hypercall import Hypercalls

__all__ = ["NETFRONT_TX_QUEUE_MAX", "NetfrontFeatures", "NetfrontStatistics", "netfront_info",
           "xn_queue"]

#: Packets waiting for tx ring space per queue (the drbr of FreeBSD); more: ENOBUFS.
NETFRONT_TX_QUEUE_MAX: Final = 1024
#: Seconds before the rx refill callout retries when buffers are short.
_RX_REFILL_DELAY: Final = 0.01


@final
@dataclass(frozen=True, slots=True)
class NetfrontFeatures:
    """What the backend offers, as negotiated."""

    sg: bool = True
    gso_tcpv4: bool = True
    gso_tcpv6: bool = True
    csum: bool = True


@final
@dataclass(frozen=True, slots=True)
class NetfrontStatistics:
    name: str
    state: str
    queues: int
    split_event_channels: bool
    tx_packets: int
    tx_bytes: int
    tx_slots: int
    tx_gso_packets: int
    rx_packets: int
    rx_bytes: int
    rx_gso_packets: int
    rx_errors: int
    tx_errors: int
    drops: int
    rx_posted: int
    rx_pool_free: int
    rx_refill_callouts: int
    tx_in_flight: int
    ring_errors: int
    per_queue_tx_packets: tuple[int, ...]


def _handler(fn: Callable[[xn_queue], None], q: xn_queue) -> Callable[[int], None]:
    def intr(_port: int) -> None:
        fn(q)

    return intr


@final
class _TxPkt:
    __slots__ = ("left", "m", "map")

    def __init__(self, m: mbuf, map_: BusDmaMap, left: int) -> None:
        self.m = m
        self.map = map_
        self.left = left


@final
class xn_queue:
    """One queue: its rings, event channel(s), rx pool and tx state (netfront_rxq+txq)."""

    def __init__(self, sc: netfront_info, qid: int) -> None:
        self.sc = sc
        self.id = qid
        self.lock = mtx_init("netfront queue")
        self.txr: XnRing | None = None
        self.rxr: XnRing | None = None
        self.tx: FrontRing | None = None
        self.rx: FrontRing | None = None
        self.tx_port = 0
        self.rx_port = 0
        self.connected = False
        # rx: the pool, and what each ring index holds
        self.rx_dmat: BusDmaTag | None = None
        self.rx_pool: list[BusDmaMap] = []
        self.rx_maps_all: list[BusDmaMap] = []
        self.rx_mbufs: list[mbuf | None] = []
        self.rx_maps: list[BusDmaMap | None] = []
        self.rx_callout = callout(sc.kern)
        callout_init_mtx(self.rx_callout, self.lock, 0)
        self.rx_partial: list[tuple[int, bytes]] = []
        # tx
        self.tx_dmat: BusDmaTag | None = None
        self.tx_maps_free: list[BusDmaMap] = []
        self.tx_maps_all: list[BusDmaMap] = []
        self.tx_pkts: dict[int, _TxPkt] = {}
        self.tx_free_ids: list[int] = []
        self.tx_pending: deque[mbuf] = deque()
        self.tx_packets = 0


class netfront_info:
    """One vif, frontend side (FreeBSD ``struct netfront_info``): the interface object.

    Args:
        kern, hc, gnttab: the guest's kernel, hypercalls and grant table.
        otherend_id: the backend domain.
        mac: the interface's address (``if_mac``), ``mtu`` its MTU.
        rx_pool_size: maps per rx pool (default ``RING_SIZE + 1``).
    """

    def __init__(self, kern: Kernel, hc: Hypercalls, gnttab: GntTab, otherend_id: int, *,
                 name: str = "xn0", mac: bytes = bytes(6), mtu: int = 1500,
                 rx_pool_size: int | None = None) -> None:
        self.kern = kern
        self.hc = hc
        self.gnttab = gnttab
        self.otherend_id = otherend_id
        self.name = name
        self.if_mac = mac
        self.if_mtu = mtu
        #: The stack's receive entry: called with each frame (the callee frees it).
        self.if_input: Callable[[mbuf], None] | None = None
        #: Called with a reason when the backend breaks a ring (xenbus closes).
        self.on_ring_error: Callable[[str], None] | None = None
        self.features = NetfrontFeatures()
        self.split = False
        self.queues: list[xn_queue] = []
        self.rx_pool_size = rx_pool_size
        self.state = "new"
        self.stats: dict[str, int] = {}
        self.rx_loads = 0

    def __repr__(self) -> str:
        return f"<netfront {self.name} {self.state} queues={len(self.queues)}>"

    def _count(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    # -- setup ---------------------------------------------------------------------

    def xn_setup(self, nqueues: int, split: bool) -> int:
        """Create the queues' rings, ports and pools (``setup_device``): 0 or errno."""
        if self.state == "freed":
            return errno.ENXIO
        if self.queues and any(q.txr is not None for q in self.queues):
            return errno.EALREADY
        if not self.queues:
            self.queues = [xn_queue(self, i) for i in range(nqueues)]
            for q in self.queues:
                error = self._xn_create_pools(q)
                if error != 0:
                    return error
        self.split = split
        for q in self.queues:
            error = self._xn_setup_queue(q)
            if error != 0:
                self.xn_free_rings()
                return error
        self.state = "initialised"
        return 0

    def _xn_create_pools(self, q: xn_queue) -> int:
        domflags = self.otherend_id << BUS_DMA_XEN_DOMID_SHIFT
        parent = xen_get_dma_tag(self.kern)
        # One Xen tag per queue for rx: 1 segment of at most a page.
        error, rdmat = bus_dma_tag_create(parent, 1, PAGE_SIZE, BUS_SPACE_MAXADDR,
                                          BUS_SPACE_MAXADDR, PAGE_SIZE, 1, PAGE_SIZE,
                                          domflags, None, None)
        if error != 0 or rdmat is None:
            return error
        rdmat.name = f"{self.name} rxq{q.id}"
        q.rx_dmat = rdmat
        n = (self.rx_pool_size if self.rx_pool_size is not None
             else (1 << 8) + 1)  # NET_RX_RING_SIZE + 1
        for _ in range(n):
            error, m = bus_dmamap_create(rdmat, BUS_DMA_XEN_PREALLOC_REFS)
            if error != 0 or m is None:
                return error if error != 0 else errno.ENOMEM
            q.rx_pool.append(m)
            q.rx_maps_all.append(m)
        # tx: page-bounded, MAX_TX_REQ_FRAGS segments, references per load.
        error, tdmat = bus_dma_tag_create(parent, 1, PAGE_SIZE, BUS_SPACE_MAXADDR,
                                          BUS_SPACE_MAXADDR, XEN_NETIF_MAX_TX_SIZE + 1,
                                          MAX_TX_REQ_FRAGS, PAGE_SIZE, domflags, None, None)
        if error != 0 or tdmat is None:
            return error
        tdmat.name = f"{self.name} txq{q.id}"
        q.tx_dmat = tdmat
        return 0

    def _xn_setup_queue(self, q: xn_queue) -> int:
        error, txr = xn_ring_alloc(self.kern, self.otherend_id, f"{self.name} txq{q.id} ring")
        if error != 0 or txr is None:
            return error
        q.txr = txr
        error, rxr = xn_ring_alloc(self.kern, self.otherend_id, f"{self.name} rxq{q.id} ring")
        if error != 0 or rxr is None:
            return error
        q.rxr = rxr
        sring_init(txr.pages)
        sring_init(rxr.pages)
        q.tx = FrontRing(txr.pages, NETIF_TX_ENTRY_SIZE, wmb=wmb, rmb=rmb, mb=mb)
        q.rx = FrontRing(rxr.pages, NETIF_RX_ENTRY_SIZE, wmb=wmb, rmb=rmb, mb=mb)
        q.rx_mbufs = [None] * q.rx.nr_ents
        q.rx_maps = [None] * q.rx.nr_ents
        q.tx_free_ids = list(range(q.tx.nr_ents - 1, -1, -1))
        ports: list[int] = []
        handlers: list[tuple[str, Callable[[xn_queue], None]]] = (
            [("tx", self._xn_intr_tx), ("rx", self._xn_intr_rx)] if self.split
            else [("", self._xn_intr)])
        for what, fn in handlers:
            rc, port = self.hc.evtchn_alloc_unbound(self.otherend_id)
            if rc == 0:
                rc = self.hc.evtchn_bind_handler(port, _handler(fn, q),
                                                 f"{self.kern.name}/{self.name}q{q.id}{what}")
                if rc != 0:
                    self.hc.evtchn_close(port)
            if rc != 0:
                for p in ports:
                    self.hc.evtchn_close(p)
                return -rc if rc < 0 else rc
            ports.append(port)
        q.tx_port = ports[0]
        q.rx_port = ports[-1]
        return 0

    def xn_transport_keys(self) -> dict[str, str]:
        """Ring references and event channels, per queue directory when there are two+."""
        keys: dict[str, str] = {}
        for q in self.queues:
            assert q.txr is not None and q.rxr is not None
            pre = f"queue-{q.id}/" if len(self.queues) > 1 else ""
            keys[pre + "tx-ring-ref"] = str(q.txr.ref)
            keys[pre + "rx-ring-ref"] = str(q.rxr.ref)
            if self.split:
                keys[pre + "event-channel-tx"] = str(q.tx_port)
                keys[pre + "event-channel-rx"] = str(q.rx_port)
            else:
                keys[pre + "event-channel"] = str(q.tx_port)
        return keys

    # -- connect, disconnect, free --------------------------------------------------------

    def xn_connect(self, features: NetfrontFeatures) -> int:
        """Post (or re-post) rx buffers and kick the backend (``network_connect``)."""
        if self.state != "initialised":
            return errno.EINVAL
        self.features = features
        for q in self.queues:
            mtx_lock(q.lock)
            q.connected = True
            self._xn_rebuild_rx_bufs(q)
            self._xn_alloc_rx_buffers(q)
            mtx_unlock(q.lock)
            self.hc.evtchn_send(q.tx_port)
            if q.rx_port != q.tx_port:
                self.hc.evtchn_send(q.rx_port)
        self.state = "connected"
        return 0

    def xn_disconnect(self) -> None:
        """Stop the queues: ports closed, tx in flight freed; rx buffers are kept."""
        for q in self.queues:
            mtx_lock(q.lock)
            q.connected = False
            callout_stop(q.rx_callout)
            mtx_unlock(q.lock)
            callout_drain(q.rx_callout)
            for port in {q.tx_port, q.rx_port}:
                if port != 0:
                    self.hc.evtchn_close(port)
            q.tx_port = q.rx_port = 0
            mtx_lock(q.lock)
            for pkt in list(q.tx_pkts.values()):
                self._xn_tx_release(q, pkt)
            q.tx_pkts.clear()
            while q.tx_pending:
                m_freem(q.tx_pending.popleft())
                self._count("drops")
            q.rx_partial = []
            mtx_unlock(q.lock)
        if self.state == "connected":
            self.state = "initialised"

    def xn_backend_maps_rings(self) -> bool:
        refs = [r.ref for q in self.queues for r in (q.txr, q.rxr) if r is not None]
        return any(self.gnttab.gnttab_query_foreign_access(r) != 0 for r in refs)

    def xn_free_rings(self) -> int:
        """Free the rings (after :meth:`xn_disconnect`); EBUSY while the backend maps one."""
        if self.xn_backend_maps_rings():
            return errno.EBUSY
        for q in self.queues:
            for port in {q.tx_port, q.rx_port}:
                if port != 0:
                    self.hc.evtchn_close(port)
            q.tx_port = q.rx_port = 0
            for r in (q.txr, q.rxr):
                if r is not None:
                    xn_ring_free(self.kern, r)
            q.txr = q.rxr = None
            q.tx = q.rx = None
        if self.state != "freed":
            self.state = "closed"
        return 0

    def xn_free(self) -> int:
        """Everything: rings, rx buffers, pools, tags. EBUSY while a ring is mapped."""
        if self.state == "freed":
            return 0
        self.xn_disconnect()
        error = self.xn_free_rings()
        if error != 0:
            return error
        for q in self.queues:
            for i, m in enumerate(q.rx_mbufs):
                map_ = q.rx_maps[i]
                if m is not None and map_ is not None and q.rx_dmat is not None:
                    bus_dmamap_unload(q.rx_dmat, map_)
                    m_freem(m)
            q.rx_mbufs, q.rx_maps = [], []
            for map_ in q.rx_maps_all:
                assert q.rx_dmat is not None
                bus_dmamap_destroy(q.rx_dmat, map_)
            q.rx_maps_all, q.rx_pool = [], []
            for map_ in q.tx_maps_all:
                assert q.tx_dmat is not None
                bus_dmamap_destroy(q.tx_dmat, map_)
            q.tx_maps_all, q.tx_maps_free = [], []
            for t in (q.rx_dmat, q.tx_dmat):
                if t is not None:
                    bus_dma_tag_destroy(t)
            q.rx_dmat = q.tx_dmat = None
        self.state = "freed"
        return 0

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
            callout_reset(q.rx_callout, _RX_REFILL_DELAY, self._xn_rx_refill, q)
        if ring.push_requests():
            self.hc.evtchn_send(q.rx_port)

    def _xn_rx_refill(self, arg: object) -> None:
        assert isinstance(arg, xn_queue)
        self._xn_alloc_rx_buffers(arg)

    def _xn_ring_broken(self, q: xn_queue, why: str) -> None:
        q.connected = False
        self._count("ring_errors")
        cb = self.on_ring_error
        if cb is not None:
            self.kern.taskqueue_thread.enqueue_call(lambda: cb(why))

    def _xn_intr(self, q: xn_queue) -> None:
        self._xn_intr_tx(q)
        self._xn_intr_rx(q)

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
                    q.rx_partial.append((idx, ring.get_response()))
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

    def _xn_rx_recycle(self, q: xn_queue, idx: int) -> None:
        """``xn_move_rx_slot``: post the buffer of slot ``idx`` again, unchanged."""
        m, mp = q.rx_mbufs[idx], q.rx_maps[idx]
        q.rx_mbufs[idx] = q.rx_maps[idx] = None
        if m is not None and mp is not None:
            self._xn_post(q, m, mp)

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
                if r.status <= 0 or r.offset + r.status > PAGE_SIZE or q.rx_mbufs[idx] is None:
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
            m, mp = q.rx_mbufs[idx], q.rx_maps[idx]
            assert m is not None and mp is not None
            q.rx_mbufs[idx] = q.rx_maps[idx] = None
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
        pkt = _TxPkt(m, map_, nsegs)
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

    def _xn_tx_release(self, q: xn_queue, pkt: _TxPkt) -> None:
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

    # -- statistics ---------------------------------------------------------------------------

    def statistics(self) -> NetfrontStatistics:
        s = self.stats.get
        return NetfrontStatistics(
            name=self.name, state=self.state, queues=len(self.queues),
            split_event_channels=self.split,
            tx_packets=s("tx_packets", 0), tx_bytes=s("tx_bytes", 0), tx_slots=s("tx_slots", 0),
            tx_gso_packets=s("tx_gso_packets", 0), rx_packets=s("rx_packets", 0),
            rx_bytes=s("rx_bytes", 0), rx_gso_packets=s("rx_gso_packets", 0),
            rx_errors=s("rx_errors", 0), tx_errors=s("tx_errors", 0) + s("tx_bad_ids", 0),
            drops=s("drops", 0),
            rx_posted=sum(1 for q in self.queues for m in q.rx_mbufs if m is not None),
            rx_pool_free=sum(len(q.rx_pool) for q in self.queues),
            rx_refill_callouts=s("rx_refill_callouts", 0),
            tx_in_flight=sum(len({id(p) for p in q.tx_pkts.values()}) for q in self.queues),
            ring_errors=s("ring_errors", 0),
            per_queue_tx_packets=tuple(q.tx_packets for q in self.queues),
        )
