"""netfront's state: the queues, the softc base, and the shared-ring pages.

:class:`xn_softc_base` holds what the receive half (:mod:`gntdma.dev.netfront_rx`)
and the transmit half (:mod:`gntdma.dev.netfront_tx`) share; :class:`xn_queue`
one queue. Each ring page is kernel memory loaded once into a one-segment map created with
``BUS_DMA_XEN_PREALLOC_REFS`` on a Xen tag naming the backend domain (as
blkfront's ring), so its grant reference is held until :func:`xn_ring_free`.
"""

from __future__ import annotations

import errno
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, final

from gntdma.abi.ring import FrontRing
from gntdma.sched import mtx_init
from gntdma.sys import (
    BUS_DMA_NOWAIT,
    BUS_SPACE_MAXADDR,
    M_WAITOK,
    M_XENNETFRONT,
    M_ZERO,
    PAGE_MASK,
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
    bus_dmamap_unload,
    callout,
    callout_init_mtx,
    mbuf,
)
from gntdma.xen.busdma import (
    BUS_DMA_XEN_DOMID_SHIFT,
    BUS_DMA_XEN_PREALLOC_REFS,
    xen_dmamap_get_grefs,
    xen_get_dma_tag,
)
from gntdma.xen.gnttab import GntTab
from gntdma.xen.hypercall import Hypercalls

__all__ = ["NETFRONT_TX_QUEUE_MAX", "XN_RX_REFILL_DELAY", "NetfrontFeatures", "NetfrontStatistics",
           "TxPkt", "XnRing",
           "xn_queue", "xn_ring_alloc", "xn_ring_free", "xn_softc_base"]

#: Packets waiting for tx ring space per queue (the drbr of FreeBSD); more: ENOBUFS.
#: Packets waiting for tx ring space per queue (the drbr of FreeBSD); more: ENOBUFS.
NETFRONT_TX_QUEUE_MAX: Final = 1024
#: Seconds before the rx refill callout retries when buffers are short.
XN_RX_REFILL_DELAY: Final = 0.01




@final
@dataclass(eq=False)
class XnRing:
    va: int
    dmat: BusDmaTag
    map: BusDmaMap
    ref: int

    @property
    def pages(self) -> list[memoryview]:
        return self.dmat.kern.kva_views(self.va, PAGE_SIZE)


def xn_ring_alloc(kern: Kernel, otherend_id: int, name: str) -> tuple[int, XnRing | None]:
    """A zeroed ring page granted (writable) to ``otherend_id``: (0, ring) or (errno, None)."""
    va = kern.malloc(PAGE_SIZE, M_XENNETFRONT, M_WAITOK | M_ZERO)
    error, dmat = bus_dma_tag_create(xen_get_dma_tag(kern), PAGE_SIZE, PAGE_SIZE,
                                     BUS_SPACE_MAXADDR, BUS_SPACE_MAXADDR, PAGE_SIZE, 1,
                                     PAGE_SIZE, otherend_id << BUS_DMA_XEN_DOMID_SHIFT,
                                     None, None)
    if error != 0 or dmat is None:
        kern.free(va, M_XENNETFRONT)
        return error, None
    dmat.name = name
    error, map_ = bus_dmamap_create(dmat, BUS_DMA_XEN_PREALLOC_REFS)
    if error != 0 or map_ is None:
        bus_dma_tag_destroy(dmat)
        kern.free(va, M_XENNETFRONT)
        return error, None
    map_.name = name
    got: list[int] = []

    def cb(_arg: object, segs: list[bus_dma_segment_t], nseg: int, err: int) -> None:
        got.append(err if err != 0 or (nseg == 1 and segs[0].ds_addr & PAGE_MASK == 0)
                   else errno.EFBIG)

    bus_dmamap_load(dmat, map_, va, PAGE_SIZE, cb, None, BUS_DMA_NOWAIT)
    error = got[0] if got else errno.EIO
    if error != 0:
        bus_dmamap_unload(dmat, map_)
        bus_dmamap_destroy(dmat, map_)
        bus_dma_tag_destroy(dmat)
        kern.free(va, M_XENNETFRONT)
        return error, None
    return 0, XnRing(va, dmat, map_, xen_dmamap_get_grefs(map_)[0])


def xn_ring_free(kern: Kernel, r: XnRing) -> None:
    """End the grant and free the page (the backend must no longer map it)."""
    bus_dmamap_unload(r.dmat, r.map)
    bus_dmamap_destroy(r.dmat, r.map)
    bus_dma_tag_destroy(r.dmat)
    kern.free(r.va, M_XENNETFRONT)


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


@final
class TxPkt:
    __slots__ = ("left", "m", "map")

    def __init__(self, m: mbuf, map_: BusDmaMap, left: int) -> None:
        self.m = m
        self.map = map_
        self.left = left


@final
class xn_queue:
    """One queue: its rings, event channel(s), rx pool and tx state (netfront_rxq+txq)."""

    def __init__(self, sc: xn_softc_base, qid: int) -> None:
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
        #: responses of packets not yet complete: (key in rx_held, raw slot)
        self.rx_partial: list[tuple[int, bytes]] = []
        #: buffers of consumed responses, by key, until their packet is parsed
        self.rx_held: dict[int, tuple[mbuf, BusDmaMap]] = {}
        self.rx_seq = 0
        # tx
        self.tx_dmat: BusDmaTag | None = None
        self.tx_maps_free: list[BusDmaMap] = []
        self.tx_maps_all: list[BusDmaMap] = []
        self.tx_pkts: dict[int, TxPkt] = {}
        self.tx_free_ids: list[int] = []
        self.tx_pending: deque[mbuf] = deque()
        self.tx_packets = 0


class xn_softc_base:
    """The state of one vif, frontend side (FreeBSD ``struct netfront_info``).

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

    def _xn_ring_broken(self, q: xn_queue, why: str) -> None:
        q.connected = False
        self._count("ring_errors")
        cb = self.on_ring_error
        if cb is not None:
            self.kern.taskqueue_thread.enqueue_call(lambda: cb(why))
