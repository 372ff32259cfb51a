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
from collections.abc import Callable

from gntdma.abi.netif import (
    NETIF_RX_ENTRY_SIZE,
    NETIF_TX_ENTRY_SIZE,
    XEN_NETIF_MAX_TX_SIZE,
)
from gntdma.abi.ring import FrontRing, sring_init
from gntdma.dev.netfront_queue import (
    NETFRONT_TX_QUEUE_MAX,
    NetfrontFeatures,
    NetfrontStatistics,
    xn_queue,
    xn_ring_alloc,
    xn_ring_free,
)
from gntdma.dev.netfront_rx import xn_softc_rx
from gntdma.dev.netfront_tx import xn_softc_tx
from gntdma.dev.netif_common import (
    MAX_TX_REQ_FRAGS,
)
from gntdma.sched import mb, mtx_lock, mtx_unlock, rmb, wmb
from gntdma.sys import (
    BUS_SPACE_MAXADDR,
    PAGE_SIZE,
    bus_dma_tag_create,
    bus_dma_tag_destroy,
    bus_dmamap_create,
    bus_dmamap_destroy,
    bus_dmamap_unload,
    callout_drain,
    callout_stop,
    m_freem,
)
from gntdma.xen.busdma import (
    BUS_DMA_XEN_DOMID_SHIFT,
    BUS_DMA_XEN_PREALLOC_REFS,
    xen_get_dma_tag,
)

__all__ = ["NETFRONT_TX_QUEUE_MAX", "NetfrontFeatures", "NetfrontStatistics", "netfront_info",
           "xn_queue"]


def _handler(fn: Callable[[xn_queue], None], q: xn_queue) -> Callable[[int], None]:
    def intr(_port: int) -> None:
        fn(q)

    return intr



class netfront_info(xn_softc_rx, xn_softc_tx):
    """One vif, frontend side (FreeBSD ``struct netfront_info``): the interface object.

    Constructor arguments: see :class:`~gntdma.dev.netfront_queue.xn_softc_base`.
    """

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
        if len(q.rx_mbufs) != q.rx.nr_ents:  # a reconnect keeps the buffers it holds
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
            for key in list(q.rx_held):
                self._xn_rx_recycle(q, key)  # not connected: back to the pool
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

    def _xn_intr(self, q: xn_queue) -> None:
        self._xn_intr_tx(q)
        self._xn_intr_rx(q)

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
