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
   memory) and decodes it in the frontend's ABI. It validates everything it
   can from the slot; a bad request is answered at once, a good one is queued
   for the workers. It loops until ``RING_FINAL_CHECK_FOR_REQUESTS`` finds
   nothing more. In-flight requests are bounded by the ring size, because a
   frontend may not have more than ``RING_SIZE`` requests without responses
   (an index that says otherwise breaks the ring).
2. A worker thread (``workers`` of them, default 4, so requests overlap)
   takes a request. For an indirect request it first maps the indirect pages
   read-only, copies the segment descriptors out, unmaps them, and validates
   the descriptors as it would direct ones. It maps every data segment in one
   ``GNTTABOP_map_grant_ref`` batch (read-only when the data goes to the disk,
   writable when it comes from the disk); if any element fails, the ones that
   succeeded are unmapped and the request fails (XSA-361). Then ONE vectored
   ``preadv``/``pwritev`` on the store through :func:`gntdma.sched.blocking_io`,
   straight into or out of the mapped pages (slices ``first_sect * 512`` ..
   ``(last_sect + 1) * 512``), then the batch unmap, and only then the
   response: a frontend that sees the response may end its grants at once.
3. The response is written under the device lock, pushed, and the frontend
   notified only if the ring's hold-off asks for it
   (``RING_PUSH_RESPONSES_AND_CHECK_NOTIFY``).

Validation (the frontend is never trusted; Linux ``xen-blkback`` behaviour):

- unknown operations, ``BLKIF_OP_RESERVED_1``, ``BLKIF_OP_WRITE_BARRIER`` (no
  ``feature-barrier``), ``BLKIF_OP_DISCARD`` when discard is off, secure
  discard, ``BLKIF_OP_INDIRECT`` when indirect is off: ``BLKIF_RSP_EOPNOTSUPP``;
- ``nr_segments`` 0 (except for a flush) or over 11 in a direct request, 0 or
  over the advertised maximum in an indirect one, an ``indirect_op`` that is
  neither read nor write: ``BLKIF_RSP_ERROR``;
- a segment with ``last_sect < first_sect`` or ``last_sect > 7``, a transfer
  or discard that ends past the last sector, a write or discard to a
  read-only disk, a grant reference that fails to map (data or indirect page),
  an I/O error: ``BLKIF_RSP_ERROR``.

The response echoes the request's ``id`` and its operation (the
``indirect_op`` for an indirect request). A ``BLKIF_OP_FLUSH_DISKCACHE`` with
segments is a write followed by ``fdatasync`` (what Linux blkfront sends for
``REQ_FUA``/``REQ_PREFLUSH`` writes); without segments it is ``fdatasync``.
A flush makes durable every write already completed; writes still in flight
when it arrives are not ordered against it (the blkif flush contract).

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
import struct
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Final, Protocol, final

from gntdma.abi.blkif import (
    BLKIF_DISCARD_SECURE,
    BLKIF_MAX_INDIRECT_SEGMENTS,
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    BLKIF_SECTOR_SIZE,
    BLKIF_SECTORS_PER_PAGE,
    VDISK_READONLY,
    BlkifAbi,
    BlkifKey,
    BlkifOp,
    BlkifRequestDiscard,
    BlkifRequestIndirect,
    BlkifResponse,
    blkif_abi,
    blkif_indirect_pages,
)
from gntdma.abi.grant_table import (
    GNTMAP_host_map,
    GNTMAP_readonly,
    GNTST_okay,
    GnttabMapGrantRef,
    GNTTABOP_map_grant_ref,
    GNTTABOP_unmap_grant_ref,
    GnttabUnmapGrantRef,
)
from gntdma.abi.ring import BackRing, RingProtocolError, SringHeader
from gntdma.abi.xen import PAGE_SIZE
from gntdma.sched import (
    Condvar,
    KernelPanic,
    Mutex,
    blocking_io,
    current_scheduler,
    cv_broadcast,
    cv_signal,
    cv_wait,
    mb,
    mtx_lock,
    mtx_unlock,
    rmb,
    wmb,
)
from gntdma.sys import Kernel
from gntdma.xen.hypercall import Hypercalls

__all__ = [
    "BLKBACK_DEFAULT_MAX_INDIRECT_SEGMENTS",
    "BLKBACK_DEFAULT_MAX_RING_PAGE_ORDER",
    "BLKBACK_DEFAULT_WORKERS",
    "BackingStore",
    "Blkback",
    "BlkbackState",
    "BlkbackStatistics",
]

#: Segments per indirect request advertised by default (Linux ``MAX_INDIRECT_SEGMENTS``).
BLKBACK_DEFAULT_MAX_INDIRECT_SEGMENTS: Final = 256
#: Largest ``ring-page-order`` accepted by default (16 pages, Linux's default).
BLKBACK_DEFAULT_MAX_RING_PAGE_ORDER: Final = 4
#: Worker threads per device by default.
BLKBACK_DEFAULT_WORKERS: Final = 4

_SEG: Final = struct.Struct("<IBB2x")  # blkif_request_segment
_SECTOR_SHIFT: Final = 9
assert 1 << _SECTOR_SHIFT == BLKIF_SECTOR_SIZE
# Map flags as plain ints: IntFlag arithmetic builds a flag object per use, and
# the hypervisor tests each op's flags.
_MAP_HOST: Final = int(GNTMAP_host_map)
_MAP_HOST_RO: Final = int(GNTMAP_host_map | GNTMAP_readonly)
#: Entries of a reused-op cache before it starts over.
_OP_CACHE_MAX: Final = 1 << 16

#: A segment as the workers use it: (gref, first_sect, last_sect).
_Seg = tuple[int, int, int]


class BackingStore(Protocol):
    """What blkback serves a disk from (``gntdma.host.image.DiskImage`` is one).

    Offsets and lengths are in bytes. A transfer moves every byte or raises
    :class:`OSError`: that is the only exception blkback expects from a store,
    and it becomes ``BLKIF_RSP_ERROR``. Methods are called from worker
    threads through :func:`gntdma.sched.blocking_io`, possibly on an OS thread
    of the I/O pool, possibly several at once.
    """

    @property
    def size(self) -> int:
        """Bytes on the disk (a whole number of 512-byte sectors)."""
        ...

    @property
    def readonly(self) -> bool:
        """Whether writes and discards are refused."""
        ...

    def preadv(self, bufs: Sequence[memoryview], offset: int) -> int:
        """Read into ``bufs`` in order from ``offset``; returns the byte count."""
        ...

    def pwritev(self, bufs: Sequence[memoryview], offset: int) -> int:
        """Write ``bufs`` in order at ``offset``; returns the byte count."""
        ...

    def flush(self) -> None:
        """Make every completed write durable."""
        ...

    def discard(self, offset: int, length: int) -> None:
        """Forget ``length`` bytes at ``offset``: they read back as zeros."""
        ...


class BlkbackState(IntEnum):
    """Where a :class:`Blkback` is in its life."""

    DISCONNECTED = 0  #: no ring (never connected, or disconnected)
    CONNECTED = 1  #: serving requests
    CLOSING = 2  #: disconnect under way: draining in-flight requests
    BROKEN = 3  #: the frontend broke the ring; a disconnect is queued


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


_OP_NAMES: Final = {int(op): op.name.lower() for op in BlkifOp}


@dataclass(slots=True)
class _Req:
    """A request that passed the handler's checks, as the workers see it."""

    id: int
    operation: int  #: echoed in the response
    op: int  #: READ, WRITE, FLUSH_DISKCACHE (no data) or DISCARD
    sector_number: int
    segs: list[_Seg]  #: data segments (direct), or filled from the indirect pages
    indirect_grefs: tuple[int, ...] = ()
    nr_segments: int = 0  #: of an indirect request
    nr_sectors: int = 0  #: of a discard
    flush: bool = False  #: fdatasync after the data
    nbytes: int = 0  #: moved, for statistics


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
        on_ring_error: called with the reason when the frontend breaks the ring
            (xenbus switches the device to Closing); runs on the interrupt thread.
    """

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
        self.store = store
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
        self._queue: deque[_Req] = deque()
        self._stop_workers = False
        self._workers_alive = 0
        self._in_intr = False
        # statistics
        self._protocol = ""
        self._connects = 0
        self._by_op: dict[str, int] = {}
        self._segments = 0
        self._bytes_read = 0
        self._bytes_written = 0
        self._sectors_discarded = 0
        self._flushes = 0
        self._responses = 0
        self._errors = 0
        self._eopnotsupp = 0
        self._map_errors = 0
        self._io_errors = 0
        self._in_flight = 0
        self._in_flight_peak = 0
        self._segments_mapped = 0
        self._mapped_now = 0
        self._mapped_peak = 0
        self._interrupts = 0
        self._notifications = 0
        self._ring_errors = 0
        # Map and unmap ops are frozen structs: the same (flags, dom, ref) or handle
        # gives the same op, so each is built once and reused (bounded: a frontend
        # chooses its grefs).
        self._map_ops: dict[tuple[int, int], dict[int, GnttabMapGrantRef]] = {}
        self._unmap_ops: dict[int, GnttabUnmapGrantRef] = {}

    def __repr__(self) -> str:
        return f"<Blkback {self.name} {self.state.name}>"

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
            BlkifKey.SECTORS.value: str(self.store.size >> _SECTOR_SHIFT),
            BlkifKey.INFO.value: str(info),
            BlkifKey.SECTOR_SIZE.value: str(BLKIF_SECTOR_SIZE),
            BlkifKey.PHYSICAL_SECTOR_SIZE.value: str(BLKIF_SECTOR_SIZE),
            BlkifKey.FEATURE_FLUSH_CACHE.value: "1",
            BlkifKey.FEATURE_BARRIER.value: "0",
            BlkifKey.FEATURE_PERSISTENT.value: "0",
            BlkifKey.FEATURE_DISCARD.value: "1" if discard else "0",
        }
        if discard:
            keys[BlkifKey.DISCARD_GRANULARITY.value] = str(BLKIF_SECTOR_SIZE)
            keys[BlkifKey.DISCARD_ALIGNMENT.value] = "0"
            keys[BlkifKey.DISCARD_SECURE.value] = "0"
        return keys

    # -- connect and disconnect -------------------------------------------------------

    def connect(self, ring_refs: Sequence[int], evtchn: int,
                protocol: str | None = None) -> int:
        """Map the frontend's ring, bind its port, start serving. Returns an errno.

        Args:
            ring_refs: the frontend's ``ring-ref`` (one) or ``ring-ref0..N-1``
                (a power of two, at most ``2 ** max_ring_page_order``).
            evtchn: the frontend's unbound port (``event-channel``).
            protocol: the frontend's ``protocol`` key (None or "" = native).

        Returns:
            0; ``EISCONN`` if already connected (or closing); ``ENOSYS`` for a
            protocol this host does not speak; ``EINVAL`` for a ring size that
            is not a power of two up to the maximum; ``ENOENT`` if a ring page
            does not map; ``EIO`` if the shared indices are already impossible;
            the negated hypercall error if the port does not bind.
        """
        if self.state != BlkbackState.DISCONNECTED:
            return errno.EISCONN
        abi = blkif_abi(protocol)
        if abi is None:
            return errno.ENOSYS
        n = len(ring_refs)
        if n < 1 or n > 1 << self.max_ring_page_order or n & (n - 1) != 0:
            return errno.EINVAL
        ops = [GnttabMapGrantRef(flags=GNTMAP_host_map, ref=ref, dom=self.frontend_domid)
               for ref in ring_refs]
        handles = self._map_batch(ops)
        if handles is None:
            return errno.ENOENT
        pages = [self.hc.mapped_page(h) for h in handles]
        # BACK_RING_ATTACH at the shared rsp_prod, refusing impossible indices.
        hdr = SringHeader.unpack_from(pages[0], 0)
        ring = BackRing(pages, abi.entry_size, start=hdr.rsp_prod, wmb=wmb, rmb=rmb, mb=mb)
        if (hdr.req_prod - hdr.rsp_prod) & 0xFFFFFFFF > ring.nr_ents:
            self._unmap_batch(handles)
            return errno.EIO
        rc, port = self.hc.evtchn_bind_interdomain(self.frontend_domid, evtchn)
        if rc != 0:
            self._unmap_batch(handles)
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
        self.state = BlkbackState.CONNECTED
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
        self.state = BlkbackState.CLOSING
        port = self._port
        mtx_unlock(self.lock)
        # No new interrupt runs; one already running sees CLOSING and stops.
        self.hc.evtchn_unbind_handler(port)
        mtx_lock(self.lock)
        while self._in_flight > 0 or self._in_intr:
            cv_wait(self._drain_cv, self.lock)
        self._stop_workers = True
        cv_broadcast(self._work_cv)
        while self._workers_alive > 0:
            cv_wait(self._drain_cv, self.lock)
        handles = self._ring_handles
        self._ring = None
        self._ring_handles = []
        self._port = 0
        mtx_unlock(self.lock)
        # Responses to drained requests are out and notified; now let go.
        self.hc.evtchn_close(port)
        self._unmap_batch(handles)
        mtx_lock(self.lock)
        self.state = BlkbackState.DISCONNECTED
        cv_broadcast(self._drain_cv)
        mtx_unlock(self.lock)
        return 0

    # -- statistics -----------------------------------------------------------------

    def statistics(self) -> BlkbackStatistics:
        ring = self._ring
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
            flushes=self._flushes,
            responses=self._responses,
            errors=self._errors,
            eopnotsupp=self._eopnotsupp,
            map_errors=self._map_errors,
            io_errors=self._io_errors,
            in_flight=self._in_flight,
            in_flight_peak=self._in_flight_peak,
            segments_mapped=self._segments_mapped,
            mapped_now=self._mapped_now,
            mapped_peak=self._mapped_peak,
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
        self._in_intr = True
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
        self._in_intr = False
        cv_broadcast(self._drain_cv)
        mtx_unlock(self.lock)
        if reason != "" and self.on_ring_error is not None:
            self.on_ring_error(reason)

    def _ring_broken(self, reason: str) -> None:
        """The frontend broke the ring: stop consuming, queue the disconnect. Lock held."""
        self.state = BlkbackState.BROKEN
        self.error = reason
        self._ring_errors += 1
        gen = self._generation

        def disconnect_task() -> None:
            if self._generation == gen and self.state == BlkbackState.BROKEN:
                self.disconnect()

        self.kernel.taskqueue_thread.enqueue_call(disconnect_task)

    def _dispatch(self, raw: bytes) -> None:
        """Decode and check one copied-out request slot; answer or queue it. Lock held."""
        assert self._abi is not None
        req = self._abi.unpack_request(raw)
        name = _OP_NAMES.get(req.operation, "unknown")
        self._by_op[name] = self._by_op.get(name, 0) + 1
        if isinstance(req, BlkifRequestDiscard):
            status, work = self._check_discard(req)
            operation = req.operation
        elif isinstance(req, BlkifRequestIndirect):
            status, work = self._check_indirect(req)
            operation = req.indirect_op
        else:
            operation = req.operation
            segs = [(s.gref, s.first_sect, s.last_sect) for s in req.seg]
            status, work = self._check_rw(req.id, operation, req.nr_segments,
                                          req.sector_number, segs)
        if work is None:
            self._respond(req.id, operation, status)
            return
        self._queue.append(work)
        self._in_flight += 1
        self._in_flight_peak = max(self._in_flight_peak, self._in_flight)
        cv_signal(self._work_cv)

    def _check_rw(self, id_: int, operation: int, nr_segments: int, sector_number: int,
                  segs: list[_Seg]) -> tuple[int, _Req | None]:
        if operation == BLKIF_OP_READ or operation == BLKIF_OP_WRITE:
            if nr_segments == 0 or nr_segments > BLKIF_MAX_SEGMENTS_PER_REQUEST:
                return BLKIF_RSP_ERROR, None
            op = operation
            flush = False
        elif operation == BLKIF_OP_FLUSH_DISKCACHE:
            if nr_segments > BLKIF_MAX_SEGMENTS_PER_REQUEST:
                return BLKIF_RSP_ERROR, None
            op = BLKIF_OP_WRITE if nr_segments > 0 else BLKIF_OP_FLUSH_DISKCACHE
            flush = True
        else:  # WRITE_BARRIER (not advertised), RESERVED_1, anything else
            return BLKIF_RSP_EOPNOTSUPP, None
        if op == BLKIF_OP_WRITE and self.store.readonly:
            return BLKIF_RSP_ERROR, None
        if self._check_segs(segs, sector_number) != 0:
            return BLKIF_RSP_ERROR, None
        return BLKIF_RSP_OKAY, _Req(id_, operation, op, sector_number, segs, flush=flush)

    def _check_indirect(self, req: BlkifRequestIndirect) -> tuple[int, _Req | None]:
        if self.max_indirect_segments == 0:
            return BLKIF_RSP_EOPNOTSUPP, None
        iop = req.indirect_op
        if iop != BLKIF_OP_READ and iop != BLKIF_OP_WRITE:
            return BLKIF_RSP_ERROR, None
        if req.nr_segments == 0 or req.nr_segments > self.max_indirect_segments:
            return BLKIF_RSP_ERROR, None
        if iop == BLKIF_OP_WRITE and self.store.readonly:
            return BLKIF_RSP_ERROR, None
        if len(req.indirect_grefs) != blkif_indirect_pages(req.nr_segments):
            return BLKIF_RSP_ERROR, None  # cannot happen with the limits above
        return BLKIF_RSP_OKAY, _Req(req.id, iop, iop, req.sector_number, [],
                                    indirect_grefs=req.indirect_grefs,
                                    nr_segments=req.nr_segments)

    def _check_discard(self, req: BlkifRequestDiscard) -> tuple[int, _Req | None]:
        if not self.feature_discard or (req.flag & BLKIF_DISCARD_SECURE) != 0:
            return BLKIF_RSP_EOPNOTSUPP, None
        if self.store.readonly:
            return BLKIF_RSP_ERROR, None
        if req.sector_number + req.nr_sectors > self.store.size >> _SECTOR_SHIFT:
            return BLKIF_RSP_ERROR, None
        if req.nr_sectors == 0:
            return BLKIF_RSP_OKAY, None
        return BLKIF_RSP_OKAY, _Req(req.id, req.operation, BLKIF_OP_DISCARD,
                                    req.sector_number, [], nr_sectors=req.nr_sectors)

    def _check_segs(self, segs: Sequence[_Seg], sector_number: int) -> int:
        """0 if every segment is well formed and the transfer fits the disk, else EINVAL."""
        total = 0
        for _gref, first, last in segs:
            if last >= BLKIF_SECTORS_PER_PAGE or last < first:
                return errno.EINVAL
            total += last - first + 1
        if total > 0 and sector_number + total > self.store.size >> _SECTOR_SHIFT:
            return errno.EINVAL
        return 0

    def _respond(self, id_: int, operation: int, status: int) -> None:
        """Write, push and (if the hold-off asks) notify one response. Lock held."""
        ring = self._ring
        abi = self._abi
        assert ring is not None and abi is not None
        ring.put_response(abi.pack_response(
            BlkifResponse(id=id_, operation=operation & 0xFF, status=status)))
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
                status = self._execute(req)
                mtx_lock(self.lock)
                self._complete(req, status)
                continue
            if self._stop_workers:
                break
            cv_wait(self._work_cv, self.lock)
        self._workers_alive -= 1
        cv_broadcast(self._drain_cv)
        mtx_unlock(self.lock)

    def _complete(self, req: _Req, status: int) -> None:
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
        self._respond(req.id, req.operation, status)
        self._in_flight -= 1
        if self._in_flight == 0:
            cv_broadcast(self._drain_cv)

    def _execute(self, req: _Req) -> int:
        """Do one request (no lock held); returns the response status."""
        if req.op == BLKIF_OP_DISCARD:
            try:
                blocking_io(self.store.discard, req.sector_number << _SECTOR_SHIFT,
                            req.nr_sectors << _SECTOR_SHIFT)
            except OSError:
                self._io_errors += 1
                return BLKIF_RSP_ERROR
            return BLKIF_RSP_OKAY
        if req.op == BLKIF_OP_FLUSH_DISKCACHE:
            return self._flush()
        if req.indirect_grefs:
            error, segs = self._read_indirect(req.indirect_grefs, req.nr_segments)
            if error != 0 or self._check_segs(segs, req.sector_number) != 0:
                return BLKIF_RSP_ERROR
            req.segs = segs
        status = self._transfer(req)
        if status == BLKIF_RSP_OKAY and req.flush:
            status = self._flush()
        return status

    def _flush(self) -> int:
        self._flushes += 1
        try:
            blocking_io(self.store.flush)
        except OSError:
            self._io_errors += 1
            return BLKIF_RSP_ERROR
        return BLKIF_RSP_OKAY

    def _read_indirect(self, grefs: tuple[int, ...], nr_segments: int
                       ) -> tuple[int, list[_Seg]]:
        """Map the indirect pages read-only, copy the descriptors out, unmap.

        Returns (0, segments) or (EFAULT, []) if a page does not map.
        """
        handles = self._map_batch(self._map_ops_for(_MAP_HOST_RO, self.frontend_domid, grefs))
        if handles is None:
            self._map_errors += 1
            return errno.EFAULT, []
        chunks: list[bytes] = []
        left = nr_segments * _SEG.size
        for h in handles:
            n = min(left, PAGE_SIZE)
            with self.hc.mapped_page(h)[:n] as v:
                chunks.append(bytes(v))  # one copy: each descriptor is read once
            left -= n
        self._unmap_batch(handles)
        raw = b"".join(chunks)
        return 0, list(_SEG.iter_unpack(raw))

    def _transfer(self, req: _Req) -> int:
        """Map the data segments, one vectored read or write, unmap."""
        to_disk = req.op == BLKIF_OP_WRITE
        flags = _MAP_HOST_RO if to_disk else _MAP_HOST
        handles = self._map_batch(self._map_ops_for(flags, self.frontend_domid,
                                                    [gref for gref, _f, _l in req.segs]))
        if handles is None:
            self._map_errors += 1
            return BLKIF_RSP_ERROR
        views: list[memoryview] = []
        status = BLKIF_RSP_OKAY
        try:
            for h, (_gref, first, last) in zip(handles, req.segs, strict=True):
                views.append(self.hc.mapped_page(h)[first << _SECTOR_SHIFT:
                                                    (last + 1) << _SECTOR_SHIFT])
            offset = req.sector_number << _SECTOR_SHIFT
            try:
                if to_disk:
                    req.nbytes = blocking_io(self.store.pwritev, views, offset)
                else:
                    req.nbytes = blocking_io(self.store.preadv, views, offset)
            except OSError:
                self._io_errors += 1
                status = BLKIF_RSP_ERROR
        finally:
            for v in views:
                v.release()
            self._unmap_batch(handles)
        return status

    # -- grant maps ----------------------------------------------------------------------

    def _map_ops_for(self, flags: int, dom: int, grefs: Sequence[int]
                     ) -> list[GnttabMapGrantRef]:
        """``GnttabMapGrantRef(flags=flags, ref=g, dom=dom)`` for each gref, reused."""
        cache = self._map_ops.get((flags, dom))
        if cache is None or len(cache) > _OP_CACHE_MAX:
            cache = self._map_ops[(flags, dom)] = {}
        ops: list[GnttabMapGrantRef] = []
        for g in grefs:
            op = cache.get(g)
            if op is None:
                op = cache[g] = GnttabMapGrantRef(flags=flags, ref=g, dom=dom)
            ops.append(op)
        return ops

    def _map_batch(self, ops: list[GnttabMapGrantRef]) -> list[int] | None:
        """Map every op in one hypercall: the handles, or None (nothing left mapped)."""
        rc, res = self.hc.grant_table_op(GNTTABOP_map_grant_ref, ops)
        handles = [r.handle for r in res
                   if isinstance(r, GnttabMapGrantRef) and r.status == GNTST_okay]
        self._note_mapped(len(handles))
        if rc != 0 or len(handles) != len(ops):
            self._unmap_batch(handles)  # XSA-361: undo the elements that worked
            return None
        return handles

    def _note_mapped(self, n: int) -> None:
        self._segments_mapped += n
        self._mapped_now += n
        self._mapped_peak = max(self._mapped_peak, self._mapped_now)

    def _unmap_batch(self, handles: list[int]) -> None:
        if not handles:
            return
        cache = self._unmap_ops
        if len(cache) > _OP_CACHE_MAX:
            cache.clear()
        ops: list[GnttabUnmapGrantRef] = []
        for h in handles:
            op = cache.get(h)
            if op is None:
                op = cache[h] = GnttabUnmapGrantRef(handle=h)
            ops.append(op)
        rc, res = self.hc.grant_table_op(GNTTABOP_unmap_grant_ref, ops)
        bad = [r for r in res
               if not isinstance(r, GnttabUnmapGrantRef) or r.status != GNTST_okay]
        if rc != 0 or len(res) != len(handles) or bad:
            raise KernelPanic(f"{self.name}: unmap of our own handles failed: rc {rc}, "
                              f"{bad}")
        self._mapped_now -= len(handles)
