"""netback: the backend of one vif, a port of a software bridge (Linux xen-netback).

Theory of operation
-------------------
One :class:`Netback` serves one vif of one frontend domain. The xenbus driver
(:mod:`gntdma.dev.netback_xenbus`) publishes :meth:`Netback.probe_keys`,
parses the frontend's keys and calls :meth:`Netback.connect` with each
queue's ring references and event channels; :meth:`Netback.disconnect` on
Closing. Each queue maps its tx and rx ring pages at addresses of the kernel's
foreign-page range and binds one or two ports.

Guest tx (``xen-netback/netback.c`` ``xenvif_tx_build_gops``): the interrupt
handler copies the published tx slots out of the ring, then checks each
packet as Linux does before touching any data:

- an extra slot of type NONE or at least ``XEN_NETIF_EXTRA_TYPE_MAX``, a GSO
  extra of size 0 or an unknown GSO type (``xenvif_get_extras``,
  ``xenvif_set_skb_gso``), more data slots than ``fatal_skb_slots`` (20), a
  later slot larger than what the first says is left ("Packet is bigger than
  frame"), a slot whose offset plus size passes the page, or a packet whose
  slots are not all published (``xenvif_count_requests``): **fatal**, as
  ``xenvif_fatal_tx_err``: the vif stops and the xenbus driver disconnects it;
- more than ``XEN_NETBK_LEGACY_SLOTS_MAX`` (18) data slots, or a packet
  shorter than ``ETH_HLEN``: the packet is dropped with ``NETIF_RSP_ERROR``;
- a grant copy that fails (a bad reference): the packet is dropped with
  ``NETIF_RSP_ERROR`` (``xenvif_tx_check_gop``).

Data is grant-copied (``GNTTABOP_copy``, source the frontend's reference) into
backend pages, so the backend never maps the frontend's data pages and never
reads memory that was not granted. One response per slot, in order, extras
answered ``NETIF_RSP_NULL``. Frames go to the bridge with no lock held.

Guest rx (``xen-netback/rx.c``): a frame the bridge delivers is queued; when
the frontend has posted enough requests (one per page of data, one more for a
GSO extra) the frame is written into backend pages and grant-copied into the
posted pages (``GNTCOPY_dest_gref``), each response at its request's ring
index; a failed copy makes that slot's status ``NETIF_RSP_ERROR``.

Locking: one ``MTX_DEF`` mutex per queue; never held across a call to the
bridge. Rules: errno ints.
"""

from __future__ import annotations

import errno
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, final

from gntdma.abi.grant_table import (
    GNTCOPY_dest_gref,
    GNTCOPY_source_gref,
    GNTMAP_host_map,
    GNTST_okay,
    GnttabCopy,
    GnttabCopyPtr,
    GnttabMapGrantRef,
    GNTTABOP_copy,
    GNTTABOP_map_grant_ref,
    GNTTABOP_unmap_grant_ref,
    GnttabUnmapGrantRef,
)
from gntdma.abi.netif import (
    NETIF_RSP_ERROR,
    NETIF_RSP_NULL,
    NETIF_RSP_OKAY,
    NETIF_RX_ENTRY_SIZE,
    NETIF_TX_ENTRY_SIZE,
    XEN_NETIF_EXTRA_FLAG_MORE,
    XEN_NETIF_EXTRA_TYPE_GSO,
    XEN_NETIF_EXTRA_TYPE_MAX,
    XEN_NETIF_EXTRA_TYPE_NONE,
    XEN_NETIF_GSO_TYPE_TCPV4,
    XEN_NETIF_GSO_TYPE_TCPV6,
    NetifExtraInfo,
    NetifKey,
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
from gntdma.abi.ring import BackRing, RingProtocolError
from gntdma.abi.xen import DOMID_SELF, PAGE_SIZE
from gntdma.dev.netbridge import Bridge, NetMeta
from gntdma.dev.netif_common import (
    ETH_HLEN,
    XEN_NETBK_FATAL_SKB_SLOTS,
    XEN_NETBK_LEGACY_SLOTS_MAX,
)
from gntdma.sched import KernelPanic, mb, mtx_init, mtx_lock, mtx_unlock, rmb, wmb
from gntdma.sys import M_DEVBUF, M_WAITOK, Kernel
from gntdma.xen.hypercall import Hypercalls

__all__ = ["NETBACK_MAX_QUEUES", "NETBACK_RX_QUEUE_MAX", "Netback", "NetbackQueueInfo",
           "NetbackStatistics"]

#: ``multi-queue-max-queues`` we advertise.
NETBACK_MAX_QUEUES: Final = 4
#: Frames waiting for rx buffers per queue; more are dropped.
NETBACK_RX_QUEUE_MAX: Final = 256
#: Pages of one staging buffer: the largest packet (65535 bytes) plus an offset.
_STAGE_PAGES: Final = 17
_MAP_HOST: Final = int(GNTMAP_host_map)
_COPY_SRC: Final = int(GNTCOPY_source_gref)
_COPY_DST: Final = int(GNTCOPY_dest_gref)


@final
@dataclass(frozen=True, slots=True)
class NetbackQueueInfo:
    """One queue's transport keys, parsed."""

    tx_ring_ref: int
    rx_ring_ref: int
    evtchn_tx: int
    evtchn_rx: int  #: equal to ``evtchn_tx`` without split event channels


@final
@dataclass(frozen=True, slots=True)
class NetbackStatistics:
    name: str
    state: str
    queues: int
    split_event_channels: bool
    tx_packets: int  #: packets from the guest
    tx_bytes: int
    tx_gso_packets: int
    rx_packets: int  #: packets to the guest
    rx_bytes: int
    rx_gso_packets: int
    drops: int
    errors: int
    fatal_errors: int
    mapped_now: int
    error: str


class _Fatal(Exception):
    pass


@final
class _NbQueue:
    def __init__(self, nb: Netback, qid: int) -> None:
        self.nb = nb
        self.id = qid
        self.lock = mtx_init("netback queue")
        self.tx: BackRing | None = None
        self.rx: BackRing | None = None
        self.handles: list[int] = []
        self.tx_port = 0
        self.rx_port = 0
        self.tx_stage: list[tuple[int, int]] = []  # (va, pfn)
        self.rx_stage: list[tuple[int, int]] = []
        self.tx_partial: list[bytes] = []
        self.rx_queue: deque[tuple[bytes, NetMeta]] = deque()
        self.active = False


class Netback:
    """The backend of vif ``<frontend_domid>.<devid>``: a port of ``bridge``.

    Args:
        hc, kernel: the backend domain's hypercalls and kernel.
        frontend_domid: the guest.
        bridge: the bridge the vif joins at connect (None: no bridge).
        max_queues: ``multi-queue-max-queues``.
    """

    def __init__(self, hc: Hypercalls, kernel: Kernel, frontend_domid: int, *,
                 devid: int = 0, bridge: Bridge | None = None,
                 max_queues: int = NETBACK_MAX_QUEUES,
                 on_ring_error: Callable[[str], None] | None = None) -> None:
        self.hc = hc
        self.kernel = kernel
        self.frontend_domid = frontend_domid
        self.devid = devid
        self.bridge = bridge
        self.max_queues = max_queues
        self.on_ring_error = on_ring_error
        self._name = f"vif{frontend_domid}.{devid}"
        self.queues: list[_NbQueue] = []
        self.split = False
        self.gso_v4 = False
        self.gso_v6 = False
        self.state = "disconnected"
        self.error = ""
        self.stats: dict[str, int] = {}
        self._host_addrs: dict[int, int] = {}

    @property
    def name(self) -> str:
        return self._name

    def __repr__(self) -> str:
        return f"<Netback {self.name} {self.state}>"

    def _count(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    # -- keys ------------------------------------------------------------------------

    def probe_keys(self) -> dict[str, str]:
        """What netback writes before InitWait (``netback_probe``)."""
        return {
            NetifKey.FEATURE_SG.value: "1",
            NetifKey.FEATURE_GSO_TCPV4.value: "1",
            NetifKey.FEATURE_GSO_TCPV6.value: "1",
            NetifKey.FEATURE_IPV6_CSUM_OFFLOAD.value: "1",
            NetifKey.FEATURE_RX_COPY.value: "1",
            NetifKey.FEATURE_RX_FLIP.value: "0",
            NetifKey.FEATURE_SPLIT_EVENT_CHANNELS.value: "1",
            NetifKey.MULTI_QUEUE_MAX_QUEUES.value: str(self.max_queues),
        }

    # -- connect and disconnect ----------------------------------------------------------

    def connect(self, queues: Sequence[NetbackQueueInfo], *, gso_tcpv4: bool = True,
                gso_tcpv6: bool = True) -> int:
        """Map every queue's rings, bind its ports, join the bridge. Returns an errno:
        EISCONN if connected, EINVAL for a queue count out of range, ENOENT if a
        ring does not map, the negated hypercall error if a port does not bind."""
        if self.state != "disconnected":
            return errno.EISCONN
        if not 1 <= len(queues) <= self.max_queues:
            return errno.EINVAL
        self.gso_v4, self.gso_v6 = gso_tcpv4, gso_tcpv6
        self.split = any(qi.evtchn_tx != qi.evtchn_rx for qi in queues)
        self.error = ""
        self.queues = [_NbQueue(self, i) for i in range(len(queues))]
        self.state = "connected"
        for q, qi in zip(self.queues, queues, strict=True):
            error = self._connect_queue(q, qi)
            if error != 0:
                self.disconnect()
                return error
        for q in self.queues:
            q.active = True
        for q in self.queues:
            for port, fn in ((q.tx_port, self._intr_tx), (q.rx_port, self._intr_rx)):
                if port == q.rx_port and q.rx_port == q.tx_port and fn == self._intr_rx:
                    continue
                rc = self.hc.evtchn_bind_handler(port, _handler(fn, q, q.tx_port == q.rx_port),
                                                 f"{self.name}q{q.id}/intr")
                if rc != 0:
                    self.disconnect()
                    return -rc if rc < 0 else rc
        if self.bridge is not None:
            self.bridge.add_port(self)
        return 0

    def _connect_queue(self, q: _NbQueue, qi: NetbackQueueInfo) -> int:
        handles = self._map([qi.tx_ring_ref, qi.rx_ring_ref])
        if handles is None:
            return errno.ENOENT
        q.handles = handles
        q.tx = BackRing(self.hc.mapped_page(handles[0]), NETIF_TX_ENTRY_SIZE, wmb=wmb,
                        rmb=rmb, mb=mb)
        q.rx = BackRing(self.hc.mapped_page(handles[1]), NETIF_RX_ENTRY_SIZE, wmb=wmb,
                        rmb=rmb, mb=mb)
        rc, port = self.hc.evtchn_bind_interdomain(self.frontend_domid, qi.evtchn_tx)
        if rc != 0:
            return -rc
        q.tx_port = q.rx_port = port
        if qi.evtchn_rx != qi.evtchn_tx:
            rc, port = self.hc.evtchn_bind_interdomain(self.frontend_domid, qi.evtchn_rx)
            if rc != 0:
                return -rc
            q.rx_port = port
        for stage in (q.tx_stage, q.rx_stage):
            for _ in range(_STAGE_PAGES):
                va = self.kernel.malloc(PAGE_SIZE, M_DEVBUF, M_WAITOK)
                pa = self.kernel.pmap_kextract(va)
                if pa & (PAGE_SIZE - 1) != 0:
                    raise KernelPanic(f"{self.name}: staging page not page aligned")
                stage.append((va, pa // PAGE_SIZE))
        return 0

    def disconnect(self) -> int:
        """Leave the bridge, close the ports, unmap the rings, free the pages. Returns 0."""
        if self.state == "disconnected":
            return 0
        if self.bridge is not None:
            self.bridge.remove_port(self)
        for q in self.queues:
            mtx_lock(q.lock)
            q.active = False
            mtx_unlock(q.lock)
        for q in self.queues:
            for port in {q.tx_port, q.rx_port}:
                if port != 0:
                    self.hc.evtchn_close(port)
            q.tx_port = q.rx_port = 0
            mtx_lock(q.lock)
            q.tx = q.rx = None
            handles, q.handles = q.handles, []
            q.rx_queue.clear()
            mtx_unlock(q.lock)
            self._unmap(handles)
            for va, _pfn in q.tx_stage + q.rx_stage:
                self.kernel.free(va, M_DEVBUF)
            q.tx_stage, q.rx_stage = [], []
        self.queues = []
        self.state = "disconnected"
        return 0

    def _map(self, refs: list[int]) -> list[int] | None:
        ops = []
        for r in refs:
            error, addr = self.hc.foreign.alloc()
            if error != 0:
                raise KernelPanic(f"{self.name}: no address for a foreign page ({error})")
            ops.append(GnttabMapGrantRef(host_addr=addr, flags=_MAP_HOST, ref=r,
                                         dom=self.frontend_domid))
        rc, res = self.hc.grant_table_op(GNTTABOP_map_grant_ref, ops)
        handles: list[int] = []
        for op, got in zip(ops, res, strict=False):
            if isinstance(got, GnttabMapGrantRef) and got.status == GNTST_okay:
                self._host_addrs[got.handle] = op.host_addr
                handles.append(got.handle)
            else:
                self.hc.foreign.free(op.host_addr)
        for op in ops[len(res):]:
            self.hc.foreign.free(op.host_addr)
        if rc != 0 or len(handles) != len(ops):
            self._unmap(handles)
            return None
        return handles

    def _unmap(self, handles: list[int]) -> None:
        if not handles:
            return
        ops = [GnttabUnmapGrantRef(host_addr=self._host_addrs[h], handle=h) for h in handles]
        rc, res = self.hc.grant_table_op(GNTTABOP_unmap_grant_ref, ops)
        if rc != 0 or any(not isinstance(r, GnttabUnmapGrantRef) or r.status != GNTST_okay
                          for r in res):
            raise KernelPanic(f"{self.name}: unmap of our own handles failed")
        for h in handles:
            self.hc.foreign.free(self._host_addrs.pop(h))

    def _fatal(self, q: _NbQueue, why: str) -> None:
        """``xenvif_fatal_tx_err``: stop every queue; the xenbus driver disconnects."""
        for other in self.queues:
            other.active = False
        self._count("fatal_errors")
        if self.error == "":
            self.error = why
        self.state = "broken"
        cb = self.on_ring_error
        if cb is not None:
            self.kernel.taskqueue_thread.enqueue_call(lambda: cb(why))

    # -- guest tx ----------------------------------------------------------------------

    def _intr_tx(self, q: _NbQueue) -> None:
        out: list[tuple[bytes, NetMeta]] = []
        mtx_lock(q.lock)
        ring = q.tx
        if not q.active or ring is None:
            mtx_unlock(q.lock)
            return
        try:
            while True:
                for _ in range(ring.unconsumed_requests()):
                    q.tx_partial.append(ring.get_request())
                self._tx_packets(q, ring, out)
                if ring.push_responses():
                    self.hc.evtchn_send(q.tx_port)
                if not ring.final_check_for_requests():
                    break
        except RingProtocolError as e:
            self._fatal(q, f"tx ring: {e}")
        except _Fatal as e:
            self._fatal(q, str(e))
        mtx_unlock(q.lock)
        bridge = self.bridge
        for frame, meta in out:
            if bridge is not None:
                bridge.input(self, frame, meta)

    def _tx_packets(self, q: _NbQueue, ring: BackRing,
                    out: list[tuple[bytes, NetMeta]]) -> None:
        part = q.tx_partial
        while part:
            first = NetifTxRequest.unpack_from(part[0])
            n = 1
            gso: NetifExtraInfo | None = None
            if first.flags & NETTXF_extra_info:  # xenvif_get_extras
                more = True
                while more:
                    if n >= len(part):
                        raise _Fatal("missing extra info")
                    e = NetifExtraInfo.unpack_from(part[n])
                    n += 1
                    if e.type == XEN_NETIF_EXTRA_TYPE_NONE or e.type >= XEN_NETIF_EXTRA_TYPE_MAX:
                        raise _Fatal(f"invalid extra type {e.type}")
                    if e.type == XEN_NETIF_EXTRA_TYPE_GSO:
                        if e.gso_size == 0:
                            raise _Fatal("GSO size must not be zero")
                        if e.gso_type not in (XEN_NETIF_GSO_TYPE_TCPV4, XEN_NETIF_GSO_TYPE_TCPV6):
                            raise _Fatal(f"bad GSO type {e.gso_type}")
                        gso = e
                    more = bool(e.flags & XEN_NETIF_EXTRA_FLAG_MORE)
            nextras = n - 1
            data = [first]
            left = first.size
            cont = bool(first.flags & NETTXF_more_data)
            while cont:  # xenvif_count_requests
                if n >= len(part):
                    raise _Fatal(f"asked for {len(data) + 1} slots, only {len(part)} published")
                if len(data) >= XEN_NETBK_FATAL_SKB_SLOTS:
                    raise _Fatal(f"too many slots (> {XEN_NETBK_FATAL_SKB_SLOTS})")
                t = NetifTxRequest.unpack_from(part[n])
                n += 1
                if t.size > left:
                    raise _Fatal(f"packet is bigger than frame ({t.size} > {left})")
                left -= t.size
                data.append(t)
                cont = bool(t.flags & NETTXF_more_data)
            sizes = [left] + [t.size for t in data[1:]]
            for t, sz in zip(data, sizes, strict=True):
                if t.offset + sz > PAGE_SIZE:
                    raise _Fatal(f"slot crosses a page (offset {t.offset} size {sz})")
            del part[:n]
            status = NETIF_RSP_OKAY
            frame = b""
            if len(data) > XEN_NETBK_LEGACY_SLOTS_MAX or first.size < ETH_HLEN:
                status = NETIF_RSP_ERROR
                self._count("drops")
            else:
                frame_or_none = self._tx_copy(q, data, sizes)
                if frame_or_none is None:
                    status = NETIF_RSP_ERROR
                    self._count("errors")
                else:
                    frame = frame_or_none
            ring.put_response(NetifTxResponse(first.id, status).pack())
            for _ in range(nextras):
                ring.put_response(NetifTxResponse(0, NETIF_RSP_NULL).pack())
            for t in data[1:]:
                ring.put_response(NetifTxResponse(t.id, status).pack())
            if status == NETIF_RSP_OKAY:
                meta = NetMeta(gso_type=gso.gso_type if gso is not None else 0,
                               gso_size=gso.gso_size if gso is not None else 0,
                               csum_blank=bool(first.flags & NETTXF_csum_blank),
                               data_validated=bool(first.flags & NETTXF_data_validated))
                self._count("tx_packets")
                self._count("tx_bytes", len(frame))
                if gso is not None:
                    self._count("tx_gso_packets")
                out.append((frame, meta))

    def _tx_copy(self, q: _NbQueue, data: list[NetifTxRequest],
                 sizes: list[int]) -> bytes | None:
        """Grant-copy the packet's slots into the staging pages: the frame, or None."""
        ops: list[GnttabCopy] = []
        pos = 0
        for t, sz in zip(data, sizes, strict=True):
            src_off = t.offset
            while sz > 0:
                page, off = divmod(pos, PAGE_SIZE)
                n = min(sz, PAGE_SIZE - off)
                ops.append(GnttabCopy(
                    source=GnttabCopyPtr(u=t.gref, domid=self.frontend_domid, offset=src_off),
                    dest=GnttabCopyPtr(u=q.tx_stage[page][1], domid=DOMID_SELF, offset=off),
                    len=n, flags=_COPY_SRC))
                pos += n
                src_off += n
                sz -= n
        if ops:
            rc, res = self.hc.grant_table_op(GNTTABOP_copy, ops)
            if rc != 0 or len(res) != len(ops) or any(
                    not isinstance(r, GnttabCopy) or r.status != GNTST_okay for r in res):
                return None
        chunks = []
        for page in range(-(-pos // PAGE_SIZE)):
            chunks.append(self.kernel.kva_read(q.tx_stage[page][0],
                                               min(PAGE_SIZE, pos - page * PAGE_SIZE)))
        return b"".join(chunks)

    # -- guest rx ----------------------------------------------------------------------

    def port_output(self, frame: bytes, meta: NetMeta) -> None:
        """The bridge hands us a frame for the guest: queue it and send what fits."""
        qs = self.queues
        if not qs:
            self._count("drops")
            return
        q = qs[_flow_hash(frame) % len(qs)] if len(qs) > 1 else qs[0]
        mtx_lock(q.lock)
        if not q.active or len(q.rx_queue) >= NETBACK_RX_QUEUE_MAX or len(frame) > 0xFFFF:
            self._count("drops")
        else:
            q.rx_queue.append((frame, meta))
            self._rx_action(q)
        mtx_unlock(q.lock)

    def _intr_rx(self, q: _NbQueue) -> None:
        mtx_lock(q.lock)
        if q.active:
            self._rx_action(q)
        mtx_unlock(q.lock)

    def _rx_action(self, q: _NbQueue) -> None:
        """``xenvif_rx_action``: send queued frames while enough requests are posted."""
        ring = q.rx
        assert ring is not None
        sent = False
        try:
            while q.rx_queue:
                frame, meta = q.rx_queue[0]
                gso = meta.gso_type != 0
                if gso and not (self.gso_v4 if meta.gso_type == XEN_NETIF_GSO_TYPE_TCPV4
                                else self.gso_v6):
                    q.rx_queue.popleft()
                    self._count("drops")
                    continue
                need = max(1, -(-len(frame) // PAGE_SIZE)) + (1 if gso else 0)
                if ring.unconsumed_requests() < need:
                    if ring.final_check_for_requests() and ring.unconsumed_requests() >= need:
                        continue
                    break
                q.rx_queue.popleft()
                self._rx_one(q, ring, frame, meta, need)
                sent = True
        except RingProtocolError as e:
            self._fatal(q, f"rx ring: {e}")
            return
        if sent and ring.push_responses():
            self.hc.evtchn_send(q.rx_port)

    def _rx_one(self, q: _NbQueue, ring: BackRing, frame: bytes, meta: NetMeta,
                need: int) -> None:
        reqs = [NetifRxRequest.unpack_from(ring.get_request()) for _ in range(need)]
        gso = meta.gso_type != 0
        data_reqs = [reqs[0], *reqs[2:]] if gso else reqs
        ops: list[GnttabCopy] = []
        lens: list[int] = []
        for i, r in enumerate(data_reqs):
            chunk = frame[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
            va, pfn = q.rx_stage[i]
            self.kernel.kva_write(va, chunk)
            lens.append(len(chunk))
            ops.append(GnttabCopy(source=GnttabCopyPtr(u=pfn, domid=DOMID_SELF, offset=0),
                                  dest=GnttabCopyPtr(u=r.gref, domid=self.frontend_domid,
                                                     offset=0),
                                  len=len(chunk), flags=_COPY_DST))
        rc, res = self.hc.grant_table_op(GNTTABOP_copy, ops)
        ok = [rc == 0 and i < len(res) and isinstance(res[i], GnttabCopy)
              and res[i].status == GNTST_okay for i in range(len(ops))]
        flags = 0
        if meta.csum_blank:
            flags |= NETRXF_csum_blank | NETRXF_data_validated
        elif meta.data_validated:
            flags |= NETRXF_data_validated
        for i, r in enumerate(data_reqs):
            f = flags if i == 0 else 0
            if i == 0 and gso:
                f |= NETRXF_extra_info
            if i + 1 < len(data_reqs):
                f |= NETRXF_more_data
            ring.put_response(NetifRxResponse(id=r.id, offset=0, flags=int(f),
                                              status=lens[i] if ok[i] else NETIF_RSP_ERROR)
                              .pack())
            if i == 0 and gso:
                ring.put_response(NetifExtraInfo.gso(meta.gso_size, meta.gso_type).pack())
        if all(ok):
            self._count("rx_packets")
            self._count("rx_bytes", len(frame))
            if gso:
                self._count("rx_gso_packets")
        else:
            self._count("errors")

    # -- statistics ----------------------------------------------------------------------

    def statistics(self) -> NetbackStatistics:
        s = self.stats.get
        return NetbackStatistics(
            name=self.name, state=self.state, queues=len(self.queues),
            split_event_channels=self.split,
            tx_packets=s("tx_packets", 0), tx_bytes=s("tx_bytes", 0),
            tx_gso_packets=s("tx_gso_packets", 0), rx_packets=s("rx_packets", 0),
            rx_bytes=s("rx_bytes", 0), rx_gso_packets=s("rx_gso_packets", 0),
            drops=s("drops", 0), errors=s("errors", 0), fatal_errors=s("fatal_errors", 0),
            mapped_now=len(self._host_addrs), error=self.error)


def _flow_hash(frame: bytes) -> int:
    if frame[12:14] == b"\x08\x00" and len(frame) >= 38:
        return zlib.crc32(frame[26:38])
    if frame[12:14] == b"\x86\xdd" and len(frame) >= 54:
        return zlib.crc32(frame[22:54])
    return zlib.crc32(frame[0:12])


def _handler(fn: Callable[[_NbQueue], None], q: _NbQueue, both: bool) -> Callable[[int], None]:
    nb = q.nb

    def intr(_port: int) -> None:
        fn(q)
        if both:
            nb._intr_rx(q)

    return intr
