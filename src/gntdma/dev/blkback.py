"""blkback: the backend of one virtual block device, serving a backing store.

Theory of operation
-------------------
One :class:`Blkback` serves one vbd of one frontend domain from dom0 (or any
backend domain: everything goes through that domain's :class:`Hypercalls`).
It is driven from outside: the xenbus negotiation (or a test) reads the
frontend's ``ring-ref*``, ``event-channel`` and ``protocol`` keys and calls
:meth:`Blkback.connect`; it publishes :meth:`Blkback.probe_keys` before
InitWait and :meth:`Blkback.connect_keys` before Connected, and calls
:meth:`Blkback.disconnect` on Closing. The backing store is anything that
satisfies :class:`BackingStore` (``gntdma.host.image.DiskImage`` does), so this
layer never imports the host layer.

The device is three modules, by concern:

- :mod:`gntdma.dev.blkback_req`: the sans-IO step from a raw slot (bytes
  copied out of the ring) to a validated request or an error status, and the
  list of checks;
- :mod:`gntdma.dev.blkback_io`: the grant maps of the ring, indirect and data
  pages, and the disk I/O (:class:`~gntdma.dev.blkback_io.BlkbackIO`);
- this module: the life cycle (its states as a table), the interrupt handler,
  the workers, the responses and the statistics.

Connect maps the frontend's ring pages (one ``GNTTABOP_map_grant_ref`` batch,
writable), attaches a :class:`~gntdma.abi.ring.BackRing` at the shared
``rsp_prod`` (``BACK_RING_ATTACH``, as Linux does), binds the frontend's
unbound port with ``EVTCHNOP_bind_interdomain``, starts the worker threads and
binds the interrupt handler (the new port starts pending, so the handler runs
once at once and picks up anything queued before the bind).

The request path:

1. The interrupt handler (the port's interrupt thread) takes the device lock,
   reads and validates ``req_prod``, copies each request slot out of the
   shared page (``RING_COPY_REQUEST``: nothing is read twice from shared
   memory) and checks it (:func:`~gntdma.dev.blkback_req.blkback_check_request`).
   A bad request is answered at once, a good one is queued for the workers. It
   loops until ``RING_FINAL_CHECK_FOR_REQUESTS`` finds nothing more. In-flight
   requests are bounded by the ring size, because a frontend may not have more
   than ``RING_SIZE`` requests without responses (an index that says otherwise
   breaks the ring).
2. A worker thread (``workers`` of them, default 4, so requests overlap)
   takes a request and executes it with no lock held
   (:meth:`~gntdma.dev.blkback_io.BlkbackIO.execute`: map, one vectored
   transfer, unmap).
3. The response is written under the device lock, pushed, and the frontend
   notified only if the ring's hold-off asks for it
   (``RING_PUSH_RESPONSES_AND_CHECK_NOTIFY``).

The response echoes the request's ``id`` and its operation (the
``indirect_op`` for an indirect request). A ``BLKIF_OP_FLUSH_DISKCACHE`` with
segments is a write followed by ``fdatasync`` (what Linux blkfront sends for
``REQ_FUA``/``REQ_PREFLUSH`` writes); without segments it is ``fdatasync``.
A flush makes durable every write already completed; writes still in flight
when it arrives are not ordered against it (the blkif flush contract).

Life cycle (:data:`BLKBACK_TRANSITIONS`)::

    DISCONNECTED --connect--> CONNECTED --disconnect--> CLOSING --drained--> DISCONNECTED
                              CONNECTED --ring_error--> BROKEN --disconnect--> CLOSING

A broken ring (a ``req_prod`` that is impossible: ``RingProtocolError``) stops
the consumption of requests at once; the state becomes ``BROKEN``, the reason
is kept in :attr:`Blkback.error`, ``on_ring_error`` is called, and a task on
the backend kernel's ``taskqueue_thread`` disconnects the device. Requests
already in flight complete. Nothing the frontend writes can crash the
backend domain.

Locking: one mutex, ``blkback``, protects the ring, the work queue, the state
and the statistics. It is held across ring barriers (scheduling points) but
never across a grant map, the store's I/O or a sleep other than the
condition-variable waits. No other lock is taken while it is held.

Rules: :meth:`Blkback.connect` and :meth:`Blkback.disconnect` return errno
ints (0 on success) and may be called from thread0 or any kernel thread of
the backend domain except the device's own interrupt and worker threads.
``disconnect`` sleeps until in-flight requests have completed.
"""

from __future__ import annotations

import errno
from collections import defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Final, final

from gntdma.abi.blkif import (
    BLKIF_MAX_INDIRECT_SEGMENTS,
    BLKIF_OP_DISCARD,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    BLKIF_SECTOR_SIZE,
    VDISK_READONLY,
    BlkifAbi,
    BlkifKey,
    blkif_abi,
)
from gntdma.abi.blkif_hot import blkif_pack_response
from gntdma.abi.ring import BackRing, RingProtocolError, SringHeader
from gntdma.dev.blkback_io import BLKBACK_MAX_PERSISTENT_GRANTS as _MAX_PGNTS
from gntdma.dev.blkback_io import SECTOR_SHIFT, BackingStore, BlkbackIO
from gntdma.dev.blkback_req import (
    BLKBACK_OP_NAMES,
    BlkbackLimits,
    BlkbackReq,
    blkback_check_request,
)
from gntdma.sched import (
    PIDLE,
    Condvar,
    Mutex,
    current_scheduler,
    cv_broadcast,
    cv_wait,
    mb,
    msleep,
    mtx_lock,
    mtx_unlock,
    rmb,
    wakeup,
    wakeup_one,
    wmb,
)
from gntdma.sys import Kernel
from gntdma.xen.hypercall import Hypercalls

__all__ = [
    "BLKBACK_DEFAULT_MAX_INDIRECT_SEGMENTS", "BLKBACK_DEFAULT_MAX_RING_PAGE_ORDER",
    "BLKBACK_DEFAULT_WORKERS", "BLKBACK_TRANSITIONS", "BackingStore", "Blkback",
    "BlkbackEvent", "BlkbackState", "BlkbackStatistics",
]

#: Segments per indirect request advertised by default (Linux ``MAX_INDIRECT_SEGMENTS``).
BLKBACK_DEFAULT_MAX_INDIRECT_SEGMENTS: Final = 256
#: Largest ``ring-page-order`` accepted by default (16 pages, Linux's default).
BLKBACK_DEFAULT_MAX_RING_PAGE_ORDER: Final = 4
#: Worker threads per device by default.
BLKBACK_DEFAULT_WORKERS: Final = 4


class BlkbackState(IntEnum):
    """Where a :class:`Blkback` is in its life."""

    DISCONNECTED = 0  #: no ring (never connected, or disconnected)
    CONNECTED = 1  #: serving requests
    CLOSING = 2  #: disconnect under way: draining in-flight requests
    BROKEN = 3  #: the frontend broke the ring; a disconnect is queued


class BlkbackEvent(IntEnum):
    """What moves a :class:`Blkback` from one state to another."""

    CONNECT = 0  #: the ring is mapped and the port bound
    RING_ERROR = 1  #: the frontend broke the ring
    DISCONNECT = 2  #: a disconnect starts draining
    DRAINED = 3  #: nothing in flight, workers gone, ring unmapped


_S = BlkbackState
_E = BlkbackEvent
#: (state, event) -> next state. A pair missing from the table cannot happen
#: (KASSERT), except CONNECT, which :meth:`Blkback.connect` refuses with EISCONN.
BLKBACK_TRANSITIONS: Final[Mapping[tuple[BlkbackState, BlkbackEvent], BlkbackState]] = {
    (_S.DISCONNECTED, _E.CONNECT): _S.CONNECTED,
    (_S.CONNECTED, _E.RING_ERROR): _S.BROKEN,
    (_S.CONNECTED, _E.DISCONNECT): _S.CLOSING,
    (_S.BROKEN, _E.DISCONNECT): _S.CLOSING,
    (_S.CLOSING, _E.DRAINED): _S.DISCONNECTED,
}


@dataclass(frozen=True, slots=True)
class BlkbackStatistics:
    """Counters of one device since it was created (across reconnects)."""

    state: str
    protocol: str  #: of the current or last connection ("" if never connected)
    ring_pages: int
    ring_size: int  #: slots
    connects: int
    #: Requests by their ring ``operation`` ("read", "write", "flush_diskcache",
    #: "discard", "indirect", "write_barrier", "reserved_1", "unknown").
    requests_by_op: Mapping[str, int]
    requests: int
    indirect_requests: int
    segments: int  #: data segments transferred
    bytes_read: int  #: from the disk into the frontend's pages
    bytes_written: int  #: from the frontend's pages to the disk
    sectors_discarded: int
    flushes: int  #: fdatasync calls
    responses: int
    errors: int  #: responses with BLKIF_RSP_ERROR
    eopnotsupp: int  #: responses with BLKIF_RSP_EOPNOTSUPP
    map_errors: int  #: requests failed because a grant did not map
    io_errors: int  #: requests failed because the store raised OSError
    in_flight: int  #: queued to or running on a worker now
    in_flight_peak: int
    segments_mapped: int  #: grant maps done (ring, indirect and data pages), in total
    mapped_now: int  #: pages of the frontend mapped right now (ring included)
    mapped_peak: int
    interrupts: int  #: runs of the interrupt handler
    notifications: int  #: events sent to the frontend
    ring_errors: int  #: times the frontend broke the ring
    error: str  #: why the ring last broke ("" if it never did)


@final
class Blkback:
    """The backend of one vbd.

    Args:
        hc: the backend domain's hypercalls.
        kernel: the backend domain's kernel (threads, ``taskqueue_thread``).
        frontend_domid: the domain whose grants and port are used.
        store: the disk.
        devid: the vbd's device id (names threads and messages).
        workers: worker threads, at least 1.
        max_indirect_segments: advertised ``feature-max-indirect-segments``,
            0 (no indirect requests) .. 4096 (8 pages of 512).
        max_ring_page_order: advertised ``max-ring-page-order``, 0 .. 4.
        feature_discard: advertise and serve ``BLKIF_OP_DISCARD``.
        max_persistent_grants: :attr:`max_persistent_grants`.
        on_ring_error: called with the reason when the frontend breaks the ring
            (xenbus switches the device to Closing); runs on the interrupt thread.
    """

    feature_persistent = False  #: advertise feature-persistent (set before connect)

    def __init__(
        self,
        hc: Hypercalls,
        kernel: Kernel,
        frontend_domid: int,
        store: BackingStore,
        *,
        devid: int = 0,
        workers: int = BLKBACK_DEFAULT_WORKERS,
        max_indirect_segments: int = BLKBACK_DEFAULT_MAX_INDIRECT_SEGMENTS,
        max_ring_page_order: int = BLKBACK_DEFAULT_MAX_RING_PAGE_ORDER,
        feature_discard: bool = True,
        max_persistent_grants: int = _MAX_PGNTS,
        on_ring_error: Callable[[str], None] | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"blkback needs at least one worker, not {workers}")
        if not 0 <= max_indirect_segments <= BLKIF_MAX_INDIRECT_SEGMENTS:
            raise ValueError(f"max_indirect_segments {max_indirect_segments} is not in "
                             f"0..{BLKIF_MAX_INDIRECT_SEGMENTS}")
        if not 0 <= max_ring_page_order <= BLKBACK_DEFAULT_MAX_RING_PAGE_ORDER:
            raise ValueError(f"max_ring_page_order {max_ring_page_order} is not in "
                             f"0..{BLKBACK_DEFAULT_MAX_RING_PAGE_ORDER}")
        self.hc = hc
        self.kernel = kernel
        self.frontend_domid = frontend_domid
        self.devid = devid
        self.nworkers = workers
        self.max_indirect_segments = max_indirect_segments
        self.max_ring_page_order = max_ring_page_order
        self.feature_discard = feature_discard
        self.on_ring_error = on_ring_error
        self.name = f"blkback.{frontend_domid}.{devid}"
        self.lock = Mutex("blkback")
        self._work_cv = Condvar("blkback work")
        self._drain_cv = Condvar("blkback drain")
        self.state = BlkbackState.DISCONNECTED
        #: Why the ring last broke ("" if it never did).
        self.error = ""
        self._generation = 0
        self._abi: BlkifAbi | None = None
        self._ring: BackRing | None = None
        self._ring_handles: list[int] = []
        self._port = 0
        self._queue: deque[BlkbackReq] = deque()
        self._stop_workers = False
        self._workers_alive = 0
        self._in_intr = False
        self._lim: BlkbackLimits | None = None  # an _intr pass's limits; statistics:
        self._protocol = ""
        self._by_op: defaultdict[str, int] = defaultdict(int)
        self._segments = self._bytes_read = self._bytes_written = self._sectors_discarded = 0
        self._connects = self._responses = self._errors = self._eopnotsupp = 0
        self._in_flight = self._in_flight_peak = self._interrupts = self._notifications = 0
        self._ring_errors = 0
        self._io = BlkbackIO(hc, frontend_domid, store, self.name)
        self.max_persistent_grants = max_persistent_grants

    def __repr__(self) -> str:
        return f"<Blkback {self.name} {self.state.name}>"

    @property
    def store(self) -> BackingStore:
        """The disk (it may be replaced while no request is in flight)."""
        return self._io.store

    @store.setter
    def store(self, store: BackingStore) -> None:
        self._io.store = store

    @property
    def max_persistent_grants(self) -> int:
        """Persistent grants kept mapped at most (Linux xen-blkback ``max_pgrants``)."""
        return self._io.max_persistent

    @max_persistent_grants.setter
    def max_persistent_grants(self, n: int) -> None:
        # blkback.c: module_param_named(max_persistent_grants, max_pgrants, int, 0644).
        if not isinstance(n, int) or isinstance(n, bool):
            raise TypeError(f"max_persistent_grants must be an int, not {n!r}")
        if n < 0:
            raise ValueError(f"max_persistent_grants {n} is negative")
        self._io.max_persistent = n

    def _step(self, event: BlkbackEvent) -> None:
        """Move to the state :data:`BLKBACK_TRANSITIONS` gives. Lock held."""
        nxt = BLKBACK_TRANSITIONS.get((self.state, event))
        assert nxt is not None, f"{self.name}: {event.name} in state {self.state.name}"
        self.state = nxt

    # -- xenstore values ---------------------------------------------------------

    def probe_keys(self) -> dict[str, str]:
        """Keys the backend writes before InitWait (limits the frontend reads)."""
        keys = {BlkifKey.MAX_RING_PAGE_ORDER.value: str(self.max_ring_page_order)}
        if self.max_indirect_segments > 0:
            keys[BlkifKey.FEATURE_MAX_INDIRECT_SEGMENTS.value] = str(
                self.max_indirect_segments)
        return keys

    def connect_keys(self) -> dict[str, str]:
        """Keys the backend writes before Connected (the disk's properties)."""
        info = int(VDISK_READONLY) if self.store.readonly else 0
        discard = self.feature_discard and not self.store.readonly
        keys = {
            BlkifKey.SECTORS.value: str(self.store.size >> SECTOR_SHIFT),
            BlkifKey.INFO.value: str(info),
            BlkifKey.SECTOR_SIZE.value: str(BLKIF_SECTOR_SIZE),
            BlkifKey.PHYSICAL_SECTOR_SIZE.value: str(BLKIF_SECTOR_SIZE),
            BlkifKey.FEATURE_FLUSH_CACHE.value: "1",
            BlkifKey.FEATURE_BARRIER.value: "0",
            BlkifKey.FEATURE_PERSISTENT.value: "1" if self.feature_persistent else "0",
            BlkifKey.FEATURE_DISCARD.value: "1" if discard else "0",
        }
        if discard:
            keys[BlkifKey.DISCARD_GRANULARITY.value] = str(BLKIF_SECTOR_SIZE)
            keys[BlkifKey.DISCARD_ALIGNMENT.value] = "0"
            keys[BlkifKey.DISCARD_SECURE.value] = "0"
        return keys

    # -- connect and disconnect -------------------------------------------------------

    def connect(self, ring_refs: Sequence[int], evtchn: int,
                protocol: str | None = None, persistent: bool = False) -> int:
        """Map the ring, bind the port, serve (``persistent``: both ends agree). An errno.

        Args:
            ring_refs: the frontend's ``ring-ref`` (one) or ``ring-ref0..N-1``
                (a power of two, at most ``2 ** max_ring_page_order``).
            evtchn: the frontend's unbound port (``event-channel``).
            protocol: the frontend's ``protocol`` key (None or "" = native).

        Returns:
            0; ``EISCONN`` if already connected (or closing); ``ENOSYS`` for a protocol
            this host does not speak; ``EINVAL`` for a ring size that is not a power of
            two up to the maximum; ``ENOENT`` if a ring page does not map; ``EIO`` if the
            shared indices are already impossible; the negated hypercall error if the port
            does not bind.
        """
        if (self.state, BlkbackEvent.CONNECT) not in BLKBACK_TRANSITIONS:
            return errno.EISCONN
        abi = blkif_abi(protocol)
        if abi is None:
            return errno.ENOSYS
        n = len(ring_refs)
        if n < 1 or n > 1 << self.max_ring_page_order or n & (n - 1) != 0:
            return errno.EINVAL
        mapped = self._io.map_ring(ring_refs, persistent and self.feature_persistent)
        if mapped is None:
            return errno.ENOENT
        handles, pages = mapped
        # BACK_RING_ATTACH at the shared rsp_prod, refusing impossible indices.
        hdr = SringHeader.unpack_from(pages[0], 0)
        ring = BackRing(pages, abi.entry_size, start=hdr.rsp_prod, wmb=wmb, rmb=rmb, mb=mb)
        if (hdr.req_prod - hdr.rsp_prod) & 0xFFFFFFFF > ring.nr_ents:
            self._io.unmap_batch(handles)
            return errno.EIO
        rc, port = self.hc.evtchn_bind_interdomain(self.frontend_domid, evtchn)
        if rc != 0:
            self._io.unmap_batch(handles)
            return -rc
        mtx_lock(self.lock)
        self._generation += 1
        self._abi = abi
        self._ring = ring
        self._ring_handles = handles
        self._port = port
        self._protocol = abi.protocol
        self._connects += 1
        self._stop_workers = False
        self._step(BlkbackEvent.CONNECT)
        sched = current_scheduler()
        for i in range(self.nworkers):
            self._workers_alive += 1
            sched.spawn(self._worker, name=f"{self.name}/w{i}", daemon=True,
                        domain=self.kernel)
        mtx_unlock(self.lock)
        rc = self.hc.evtchn_bind_handler(port, self._intr, f"{self.name}/intr")
        if rc != 0:  # cannot happen for a port just bound; undo all the same
            self.disconnect()
            return -rc if rc < 0 else rc
        return 0

    def disconnect(self) -> int:
        """Stop serving: drain in-flight requests, unbind, unmap. Returns 0.

        Requests still in the ring and not yet consumed are not answered (the
        frontend re-issues them after it reconnects). Idempotent; a second
        caller waits for the first to finish. Sleeps.
        """
        mtx_lock(self.lock)
        while self.state == BlkbackState.CLOSING:
            cv_wait(self._drain_cv, self.lock)
        if self.state == BlkbackState.DISCONNECTED:
            mtx_unlock(self.lock)
            return 0
        self._step(BlkbackEvent.DISCONNECT)
        port = self._port
        mtx_unlock(self.lock)
        # No new interrupt runs; one already running sees CLOSING and stops.
        self.hc.evtchn_unbind_handler(port)
        mtx_lock(self.lock)
        while self._in_flight > 0 or self._in_intr:
            cv_wait(self._drain_cv, self.lock)
        self._stop_workers = True
        wakeup(self._work_cv)
        while self._workers_alive > 0:
            cv_wait(self._drain_cv, self.lock)
        handles = self._ring_handles
        self._ring = None
        self._ring_handles = []
        self._port = 0
        mtx_unlock(self.lock)
        # Responses to drained requests are out and notified; now let go.
        self.hc.evtchn_close(port)
        self._io.unmap_ring(handles)  # and the persistent grants
        mtx_lock(self.lock)
        self._step(BlkbackEvent.DRAINED)
        cv_broadcast(self._drain_cv)
        mtx_unlock(self.lock)
        return 0

    # -- statistics -----------------------------------------------------------------

    def statistics(self) -> BlkbackStatistics:
        ring = self._ring
        io = self._io
        return BlkbackStatistics(
            state=self.state.name.lower(),
            protocol=self._protocol,
            ring_pages=len(self._ring_handles),
            ring_size=ring.nr_ents if ring is not None else 0,
            connects=self._connects,
            requests_by_op=dict(self._by_op),
            requests=sum(self._by_op.values()),
            indirect_requests=self._by_op.get("indirect", 0),
            segments=self._segments,
            bytes_read=self._bytes_read,
            bytes_written=self._bytes_written,
            sectors_discarded=self._sectors_discarded,
            flushes=io.flushes,
            responses=self._responses,
            errors=self._errors,
            eopnotsupp=self._eopnotsupp,
            map_errors=io.map_errors,
            io_errors=io.io_errors,
            in_flight=self._in_flight,
            in_flight_peak=self._in_flight_peak,
            segments_mapped=io.segments_mapped,
            mapped_now=io.mapped_now,
            mapped_peak=io.mapped_peak,
            interrupts=self._interrupts,
            notifications=self._notifications,
            ring_errors=self._ring_errors,
            error=self.error,
        )

    # -- the interrupt handler ---------------------------------------------------------

    def _intr(self, port: int) -> None:
        """Consume every request the frontend published (interrupt thread)."""
        mtx_lock(self.lock)
        ring = self._ring
        if self.state != BlkbackState.CONNECTED or ring is None:
            mtx_unlock(self.lock)
            return
        self._interrupts += 1
        self._in_intr, self._lim = True, self._limits()  # xbb's media_num_sectors
        reason = ""
        try:
            while True:
                for _ in range(ring.unconsumed_requests()):
                    self._dispatch(ring.get_request())
                if not ring.final_check_for_requests():
                    break
        except RingProtocolError as e:
            reason = str(e)
            self._ring_broken(reason)
        self._in_intr, self._lim = False, None
        cv_broadcast(self._drain_cv)
        mtx_unlock(self.lock)
        if reason != "" and self.on_ring_error is not None:
            self.on_ring_error(reason)

    def _ring_broken(self, reason: str) -> None:
        """The frontend broke the ring: stop consuming, queue the disconnect. Lock held."""
        self._step(BlkbackEvent.RING_ERROR)
        self.error = reason
        self._ring_errors += 1
        gen = self._generation

        def disconnect_task() -> None:
            if self._generation == gen and self.state == BlkbackState.BROKEN:
                self.disconnect()

        self.kernel.taskqueue_thread.enqueue_call(disconnect_task)

    def _dispatch(self, raw: bytes) -> None:
        """Check one copied-out request slot; answer or queue it. Lock held."""
        abi = self._abi
        assert abi is not None
        op_name = BLKBACK_OP_NAMES.get(raw[0], "unknown")
        self._by_op[op_name] += 1
        lim = self._lim if self._lim is not None else self._limits()  # (outside _intr)
        if (work := (r := blkback_check_request(abi, raw, lim))[3]) is None:
            self._respond(r[0], r[1], r[2])
            return
        self._queue.append(work)
        self._in_flight = n = self._in_flight + 1
        self._in_flight_peak = n if n > self._in_flight_peak else self._in_flight_peak
        wakeup_one(self._work_cv)

    def _limits(self) -> BlkbackLimits:
        store = self.store
        return BlkbackLimits(nr_sectors=store.size >> SECTOR_SHIFT, readonly=store.readonly,
                             feature_discard=self.feature_discard,
                             max_indirect_segments=self.max_indirect_segments)

    def _respond(self, id_: int, operation: int, status: int) -> None:
        """Write, push and (if the hold-off asks) notify one response. Lock held."""
        ring = self._ring
        abi = self._abi
        assert ring is not None and abi is not None
        ring.put_response(blkif_pack_response(abi, id_, operation & 0xFF, status))
        self._responses += 1
        if status == BLKIF_RSP_ERROR:
            self._errors += 1
        elif status == BLKIF_RSP_EOPNOTSUPP:
            self._eopnotsupp += 1
        if ring.push_responses():
            self._notifications += 1
            self.hc.evtchn_send(self._port)

    # -- workers --------------------------------------------------------------------------

    def _worker(self) -> None:
        mtx_lock(self.lock)
        while True:
            if self._queue:
                req = self._queue.popleft()
                mtx_unlock(self.lock)
                status = self._io.execute(req)
                mtx_lock(self.lock)
                self._complete(req, status)
                continue
            if self._stop_workers:
                break
            # Idle for work (PIDLE), as FreeBSD's xbb runs its I/O on a taskqueue whose
            # threads idle in taskqueue_thread_loop: not a hung task however long.
            msleep(self._work_cv, self.lock, "blkback work", 0.0, PIDLE)
        self._workers_alive -= 1
        cv_broadcast(self._drain_cv)
        mtx_unlock(self.lock)

    def _complete(self, req: BlkbackReq, status: int) -> None:
        """Account for and answer a request a worker finished. Lock held."""
        if status == BLKIF_RSP_OKAY:
            if req.op == BLKIF_OP_READ:
                self._bytes_read += req.nbytes
                self._segments += len(req.segs)
            elif req.op == BLKIF_OP_WRITE:
                self._bytes_written += req.nbytes
                self._segments += len(req.segs)
            elif req.op == BLKIF_OP_DISCARD:
                self._sectors_discarded += req.nr_sectors
        # _respond(req.id, req.operation, status), written out: one call fewer a request
        ring = self._ring
        abi = self._abi
        assert ring is not None and abi is not None
        ring.put_response(blkif_pack_response(abi, req.id, req.operation & 0xFF, status))
        self._responses += 1
        if status == BLKIF_RSP_ERROR:
            self._errors += 1
        elif status == BLKIF_RSP_EOPNOTSUPP:
            self._eopnotsupp += 1
        if ring.push_responses():
            self._notifications += 1
            self.hc.evtchn_send(self._port)
        self._in_flight -= 1
        if self._in_flight == 0:
            cv_broadcast(self._drain_cv)
