"""blkfront: the state of an xbd device, its lock, freezes, command queues, statistics.

The base of :class:`gntdma.dev.blkfront.xbd_softc` (see that module for the
theory of operation) and the command (``struct xbd_command``), which refer to
each other and so live together: everything both the request path
(:mod:`gntdma.dev.blkfront_req`) and the life cycle use. ``biodone`` is never
called with ``xbd_io_lock`` held: completed bios are collected by
``_xbd_bio_done`` and completed by ``_xbd_unlock`` after the unlock (or by a
task on ``taskqueue_thread`` when the completion happened where our unlock
does not run, inside a busdma callback).
"""

from __future__ import annotations

from collections import deque
from typing import Final, final

from gntdma.abi.blkif import (
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_SECTOR_SIZE,
    XEN_IO_PROTO_ABI_NATIVE,
    BlkifAbi,
    blkif_abi,
)
from gntdma.abi.ring import FrontRing
from gntdma.dev.blkfront_cmd import (
    XBD_DEFAULT_MAX_INDIRECT_SEGMENTS,
    XBD_DEFAULT_RING_PAGE_ORDER,
    XBD_MAX_INDIRECT_SEGMENTS,
    XBD_MAX_RING_PAGE_ORDER,
    XBD_Q_BUSY,
    XBD_Q_FREE,
    XBD_Q_NONE,
    XBD_Q_READY,
    XBD_SEGS_TO_SIZE,
    XBD_STATE_CONNECTED,
    XBD_STATE_DISCONNECTED,
    XBDCF_FROZEN,
    XBDCF_INITIALIZER,
    XBDCF_Q_MASK,
    XBDF_BROKEN,
    XBDF_CM_SHORTAGE,
    XBDF_DETACHING,
    XBDF_FREED,
    XBDF_NONE,
    XbdBackendFeatures,
    XbdStatistics,
)
from gntdma.sched import (
    KernelPanic,
    Mutex,
    current_scheduler,
    mtx_lock,
    mtx_unlock,
)
from gntdma.sys import (
    BusDmaMap,
    BusDmaTag,
    Kernel,
    Task,
    bio,
    biodone,
    taskqueue_enqueue,
)
from gntdma.xen.busdma import (
    xen_dmamap_get_grefs,
)
from gntdma.xen.gnttab import GntTab
from gntdma.xen.hypercall import Hypercalls

__all__ = ["XBD_RW_OPS", "xbd_command", "xbd_softc_base"]

#: Operations that carry data (and a loaded data map).
XBD_RW_OPS: Final = (BLKIF_OP_READ, BLKIF_OP_WRITE)


# -- the command ------------------------------------------------------------------------------


@final
class xbd_command:
    """``struct xbd_command``: one request slot's worth of driver state."""

    __slots__ = (
        "cm_bp",
        "cm_bytes",
        "cm_flags",
        "cm_id",
        "cm_indirect",
        "cm_indirectionmap",
        "cm_indirectionpages",
        "cm_indirectionrefs",
        "cm_map",
        "cm_nr_sectors",
        "cm_nseg",
        "cm_operation",
        "cm_sc",
        "cm_sector_number",
        "cm_status",
    )

    def __init__(self, sc: xbd_softc_base, cm_id: int) -> None:
        self.cm_sc = sc
        self.cm_id = cm_id
        self.cm_flags = XBDCF_INITIALIZER
        #: The data map (Xen tag, per-load references).
        self.cm_map: BusDmaMap | None = None
        self.cm_bp: bio | None = None
        self.cm_operation = 0
        self.cm_sector_number = 0
        self.cm_nr_sectors = 0
        self.cm_nseg = 0
        self.cm_bytes = 0
        self.cm_status = 0
        #: True when the request on the ring is BLKIF_OP_INDIRECT.
        self.cm_indirect = False
        #: Kernel va of the indirect pages (0 without indirect requests).
        self.cm_indirectionpages = 0
        #: Their map, loaded read-only with references held for the map's life.
        self.cm_indirectionmap: BusDmaMap | None = None
        #: THE references of the indirect pages (what indirect_grefs must carry).
        self.cm_indirectionrefs: list[int] = []

    @property
    def cm_queue(self) -> int:
        return self.cm_flags & XBDCF_Q_MASK

    def __repr__(self) -> str:
        return f"<xbd_command {self.cm_id} q={self.cm_queue} flags={self.cm_flags:#x}>"


class xbd_softc_base:
    """One Xen virtual block device, frontend side.

    Args:
        kern: the guest kernel.
        hc: the guest's hypercalls (event channels).
        gnttab: the guest's grant table (only to ask whether the backend still
            maps a page before freeing it).
        otherend_id: the backend's domid (``backend-id``).
        name: device name ("xbd0"), for threads and messages.
        vdev: the ``handle`` of every request (``virtual-device``).
        protocol: the ring ABI to speak (native by default).
        ring_page_order: the largest ring to use (the backend's limit also applies).
        max_indirect_segments: segments per request to use at most; the
            backend's ``feature-max-indirect-segments`` also applies; at most 11
            means no indirect requests.
        grant_share: how many disks (this one included) still to connect share
            the grant references not held for life: at connect this disk takes
            at most that share for its indirect pages and its largest request
            (see :func:`gntdma.dev.blkfront_cmd.xbd_size_requests`).
    """

    def __init__(self, kern: Kernel, hc: Hypercalls, gnttab: GntTab, otherend_id: int, *,
                 name: str = "xbd0", vdev: int = 0, protocol: str = XEN_IO_PROTO_ABI_NATIVE,
                 ring_page_order: int = XBD_DEFAULT_RING_PAGE_ORDER,
                 max_indirect_segments: int = XBD_DEFAULT_MAX_INDIRECT_SEGMENTS,
                 grant_share: int = 1) -> None:
        abi = blkif_abi(protocol)
        if abi is None:
            raise ValueError(f"{name}: unsupported blkif protocol {protocol!r}")
        if not 0 <= ring_page_order <= XBD_MAX_RING_PAGE_ORDER:
            raise ValueError(f"{name}: ring_page_order {ring_page_order} not in "
                             f"0..{XBD_MAX_RING_PAGE_ORDER}")
        if not 0 <= otherend_id <= 0xFFFF or not 0 <= vdev <= 0xFFFF:
            raise ValueError(f"{name}: bad backend domid {otherend_id} or vdev {vdev}")
        self.xbd_kern = kern
        self.xbd_hc = hc
        self.xbd_gnttab = gnttab
        self.xbd_otherend_id = otherend_id
        self.name = name
        self.xbd_vdev = vdev
        self.xbd_abi: BlkifAbi = abi
        self.xbd_ring_page_order_max = ring_page_order
        self.xbd_indirect_segments_max = min(max(max_indirect_segments, 0),
                                             XBD_MAX_INDIRECT_SEGMENTS)
        self.xbd_grant_share = max(1, grant_share)
        #: Data maps with BUS_DMA_XEN_PERSISTENT (both ends advertised feature-persistent).
        self.xbd_persistent = False
        #: Why requests are smaller than asked for ("" if they are not): a warning.
        self.xbd_sizing_note = ""
        self.xbd_io_lock = Mutex(f"{name} io", type="xbd_io")
        self.xbd_state = XBD_STATE_DISCONNECTED
        self.xbd_flags = XBDF_NONE
        self.xbd_qfrozen_cnt = 0
        # the ring
        self.xbd_ring_page_order = 0
        self.xbd_ring_pages = 0
        self.xbd_ring_va = 0
        self.xbd_ring_dmat: BusDmaTag | None = None
        self.xbd_ring_map: BusDmaMap | None = None
        self.xbd_ring_refs: list[int] = []
        self.xbd_ring: FrontRing | None = None
        self.xbd_evtchn = 0
        # negotiated at connect
        self.xbd_features = XbdBackendFeatures()
        self.xbd_sector_size = BLKIF_SECTOR_SIZE
        self.xbd_media_size = 0
        #: Discard limits in 512-byte sectors (``xbd_discard_limits``).
        self.xbd_discard_max_sectors = 0
        self.xbd_discard_granularity = 1
        self.xbd_discard_alignment = 0
        self.xbd_max_request_segments = BLKIF_MAX_SEGMENTS_PER_REQUEST
        self.xbd_max_request_indirectpages = 0
        self.xbd_max_request_size = XBD_SEGS_TO_SIZE(BLKIF_MAX_SEGMENTS_PER_REQUEST)
        self.xbd_io_dmat: BusDmaTag | None = None
        self.xbd_indirect_dmat: BusDmaTag | None = None
        # commands and queues
        self.xbd_shadow: list[xbd_command] = []
        self.xbd_cm_free: deque[xbd_command] = deque()
        self.xbd_cm_ready: deque[xbd_command] = deque()
        self.xbd_cm_busy: dict[int, xbd_command] = {}
        self.xbd_bioq: deque[bio] = deque()
        # completion outside the lock
        self._xbd_done: list[bio] = []
        self._xbd_done_task = Task(self._xbd_done_task_fn)
        self._xbd_idle_chan = object()
        self._xbd_free_chan = object()
        # statistics
        self.xbd_protocol_error = ""
        self._st_bios = 0
        self._st_requests = 0
        self._st_direct = 0
        self._st_indirect = 0
        self._st_flushes = 0
        self._st_discards = 0
        self._st_bytes_read = 0
        self._st_bytes_written = 0
        self._st_errors = 0
        self._st_deferred = 0
        self._st_occupancy_peak = 0
        # Latency histograms, log2 buckets of microseconds (bucket b: [2**(b-1), 2**b)):
        # ring requests (on the ring to answered) and deferred loads (EINPROGRESS to
        # callback), kept while ``xbd_latency`` is set (a dashboard or plots watch the
        # disk; off, the request path pays one test). ``_st_t0`` holds when a command
        # was deferred or put on the ring.
        self.xbd_latency = False
        self.xbd_lat_request = [0] * 40
        self.xbd_lat_deferred = [0] * 40
        self._st_t0: dict[int, float] = {}

    def _xbd_lat(self, hist: list[int], cm_id: int) -> None:
        """Count the time since ``_st_t0[cm_id]`` in ``hist`` (nothing if not started)."""
        t0 = self._st_t0.pop(cm_id, None)
        if t0 is not None:
            us = int((current_scheduler().now() - t0) * 1e6)
            hist[min(max(us, 0).bit_length(), len(hist) - 1)] += 1

    def __repr__(self) -> str:
        return f"<xbd_softc {self.name} state={self.xbd_state} flags={self.xbd_flags:#x}>"

    # -- locking and completion --------------------------------------------------------

    def _xbd_lock(self) -> None:
        mtx_lock(self.xbd_io_lock)

    def _xbd_unlock(self) -> None:
        """Drop xbd_io_lock, then complete the bios collected while it was held."""
        # Always a fresh list: the unlock is a scheduling point, and bios another
        # thread completes meanwhile must not land in the list this one drains.
        done, self._xbd_done = self._xbd_done, []
        mtx_unlock(self.xbd_io_lock)
        for bp in done:
            biodone(bp)

    def _xbd_done_task_fn(self, _arg: object, _pending: int) -> None:
        self._xbd_lock()
        self._xbd_unlock()

    def _xbd_kick_done(self) -> None:
        """Completions collected where our unlock will not run them: a task will."""
        if self._xbd_done:
            taskqueue_enqueue(self.xbd_kern.taskqueue_thread, self._xbd_done_task)

    def _xbd_bio_done(self, bp: bio, error: int) -> None:
        """Complete ``bp`` with ``error`` once xbd_io_lock is dropped."""
        if error != 0:
            bp.bio_error = error
            bp.bio_resid = bp.bio_bcount
            self._st_errors += 1
        else:
            bp.bio_resid = 0
        self._xbd_done.append(bp)

    # -- freeze and thaw (block.h) -------------------------------------------------------

    def xbd_freeze(self, xbd_flag: int) -> None:
        if xbd_flag != XBDF_NONE and self.xbd_flags & xbd_flag:
            return
        self.xbd_flags |= xbd_flag
        self.xbd_qfrozen_cnt += 1

    def xbd_thaw(self, xbd_flag: int) -> None:
        if xbd_flag != XBDF_NONE and not self.xbd_flags & xbd_flag:
            return
        if self.xbd_qfrozen_cnt == 0:
            raise KernelPanic(f"{self.name}: thaw with flag {xbd_flag:#x} while not frozen")
        self.xbd_flags &= ~xbd_flag
        self.xbd_qfrozen_cnt -= 1

    def xbd_cm_freeze(self, cm: xbd_command, cm_flag: int) -> None:
        if cm.cm_flags & XBDCF_FROZEN:
            return
        cm.cm_flags |= XBDCF_FROZEN | cm_flag
        self.xbd_freeze(XBDF_NONE)

    def xbd_cm_thaw(self, cm: xbd_command) -> None:
        if not cm.cm_flags & XBDCF_FROZEN:
            return
        cm.cm_flags &= ~XBDCF_FROZEN
        self.xbd_thaw(XBDF_NONE)

    # -- command queues ----------------------------------------------------------------------

    def _xbd_enqueue_cm(self, cm: xbd_command, q: int) -> None:
        if cm.cm_queue != XBD_Q_NONE:
            raise KernelPanic(f"{self.name}: {cm!r} enqueued on {q} while on a queue")
        cm.cm_flags = (cm.cm_flags & ~XBDCF_Q_MASK) | q
        if q == XBD_Q_FREE:
            self.xbd_cm_free.append(cm)
        elif q == XBD_Q_READY:
            self.xbd_cm_ready.append(cm)
        elif q == XBD_Q_BUSY:
            self.xbd_cm_busy[cm.cm_id] = cm
        else:
            raise KernelPanic(f"{self.name}: bad queue {q}")

    def _xbd_requeue_ready(self, cm: xbd_command) -> None:
        """Put ``cm`` back at the head of the ready queue (it keeps its turn)."""
        if cm.cm_queue != XBD_Q_NONE:
            raise KernelPanic(f"{self.name}: {cm!r} requeued while on a queue")
        cm.cm_flags = (cm.cm_flags & ~XBDCF_Q_MASK) | XBD_Q_READY
        self.xbd_cm_ready.appendleft(cm)

    def _xbd_remove_busy(self, cm: xbd_command) -> None:
        if cm.cm_queue != XBD_Q_BUSY or self.xbd_cm_busy.pop(cm.cm_id, None) is not cm:
            raise KernelPanic(f"{self.name}: {cm!r} is not busy")
        cm.cm_flags = (cm.cm_flags & ~XBDCF_Q_MASK) | XBD_Q_NONE

    def _xbd_dequeue(self, q: deque[xbd_command]) -> xbd_command | None:
        if not q:
            return None
        cm = q.popleft()
        cm.cm_flags = (cm.cm_flags & ~XBDCF_Q_MASK) | XBD_Q_NONE
        return cm

    def xbd_free_command(self, cm: xbd_command) -> None:
        """Back to the free pool (FreeBSD ``xbd_free_command``)."""
        if cm.cm_flags & XBDCF_FROZEN:
            raise KernelPanic(f"{self.name}: freeing frozen {cm!r}")
        cm.cm_bp = None
        cm.cm_operation = 0
        cm.cm_sector_number = 0
        cm.cm_nr_sectors = 0
        cm.cm_nseg = 0
        cm.cm_bytes = 0
        cm.cm_status = 0
        cm.cm_indirect = False
        # XBDCF_INITIALIZER, then _xbd_enqueue_cm(cm, XBD_Q_FREE) of a command in no queue
        cm.cm_flags = (XBDCF_INITIALIZER & ~XBDCF_Q_MASK) | XBD_Q_FREE
        self.xbd_cm_free.append(cm)
        if self.xbd_flags & XBDF_CM_SHORTAGE:
            self.xbd_thaw(XBDF_CM_SHORTAGE)

    # -- statistics ----------------------------------------------------------------------------

    def xbd_state_name(self) -> str:
        if self.xbd_flags & XBDF_FREED:
            return "freed"
        if self.xbd_flags & XBDF_BROKEN:
            return "broken"
        if self.xbd_flags & XBDF_DETACHING:
            return "closing"
        return "connected" if self.xbd_state == XBD_STATE_CONNECTED else "disconnected"

    def xbd_grant_refs_in_use(self) -> int:
        n = len(self.xbd_ring_refs)
        for cm in self.xbd_shadow:
            n += len(cm.cm_indirectionrefs)
            if cm.cm_map is not None:
                n += len(xen_dmamap_get_grefs(cm.cm_map))
        return n

    def statistics(self) -> XbdStatistics:
        ring = self.xbd_ring
        occ = (ring.req_prod_pvt - ring.rsp_cons) & 0xFFFFFFFF if ring is not None else 0
        return XbdStatistics(
            name=self.name,
            state=self.xbd_state_name(),
            bios=self._st_bios,
            requests=self._st_requests,
            direct_requests=self._st_direct,
            indirect_requests=self._st_indirect,
            flushes=self._st_flushes,
            discards=self._st_discards,
            bytes_read=self._st_bytes_read,
            bytes_written=self._st_bytes_written,
            errors=self._st_errors,
            deferred_loads=self._st_deferred,
            in_flight=len(self.xbd_cm_busy),
            ring_size=ring.nr_ents if ring is not None else 0,
            ring_pages=self.xbd_ring_pages if ring is not None else 0,
            ring_occupancy=occ,
            ring_occupancy_peak=self._st_occupancy_peak,
            grant_refs_in_use=self.xbd_grant_refs_in_use(),
            max_request_segments=self.xbd_max_request_segments,
            max_request_size=self.xbd_max_request_size,
            protocol_error=self.xbd_protocol_error,
        )

