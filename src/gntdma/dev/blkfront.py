"""blkfront: the Xen block frontend (FreeBSD's xbd), on the grant-table bus_dma handlers.

Theory of operation
-------------------
One :class:`xbd_softc` per virtual disk of a guest. Every page the backend
sees is granted through busdma_xen, never with a hand-made grant:

- the shared ring (``2 ** ring-page-order`` pages of kernel memory) is loaded
  once through a map of the *ring tag*, whose references are ``ring-ref%u``;
- each command owns a data map of the *data tag* (a child of
  ``xen_get_dma_tag`` with the backend's domid in its flags, alignment 512,
  maxsegsz PAGE_SIZE, ``nsegments`` = segments per request, lockfunc
  ``busdma_lock_mutex`` on ``xbd_io_lock``): each bio is loaded into it,
  read-only (``BUS_DMA_XEN_RO``) when it goes to the disk, and the
  references come from ``xen_dmamap_get_grefs``, one per segment;
- with indirect requests each command also owns its indirect pages, loaded
  once, read-only, through a map of the *indirection tag* created with
  ``BUS_DMA_XEN_PREALLOC_REFS``; ``indirect_grefs`` of every indirect request
  are those pages' references (``cm_indirectionrefs``; the 2018 log's
  ``&cm_indirectionrefs`` bug sent something else).

Life cycle, driven by the xenbus glue (or a test):

1. :meth:`xbd_softc.xbd_initialize` (backend in InitWait): ring and event
   channel (``evtchn_alloc_unbound`` to the backend, ``xbd_int`` bound to it);
   :meth:`xbd_softc.xbd_transport_keys` are what the glue publishes.
2. :meth:`xbd_softc.xbd_connect` (backend Connected) with the backend's
   :class:`XbdBackendFeatures`: tags, the command pool (one command per ring
   slot), indirect pages; the disk is then open for bios.
3. :meth:`xbd_softc.xbd_closing` (disk removal, backend closing): no new bio
   (ENXIO), those not on the ring fail with ENXIO, those on the ring complete
   (or fail with ENXIO if the backend is gone or too slow).
4. :meth:`xbd_softc.xbd_free` once the backend let go of the ring: unload and
   destroy every map, free the indirect pages, the tags, the ring, close the
   port. It returns EBUSY (and frees nothing) while the backend still maps a
   ring or indirect page, and does nothing the second time: nothing is ever
   freed twice (the 2018 disk-removal double free). :meth:`xbd_softc.xbd_detach`
   is 3 then 4, waiting for the backend to unmap.

The request path (``xbd_strategy`` -> ``xbd_startio`` -> ``xbd_queue_request``
-> ``xbd_queue_cb``) runs with ``xbd_io_lock`` held. A load that returns
EINPROGRESS (grant references short, or bounce pages) freezes the queue
(``XBDCF_ASYNC_MAPPING``) so that later bios keep their order; its callback,
run by busdma_xen under the tag's lockfunc (the same lock), puts the request
on the ring, thaws the queue and restarts it. ``xbd_int`` (the port's
interrupt thread) consumes responses (copied out of the ring, checked: an id
not in flight or an operation that does not match breaks the device), syncs
POST, unloads (which ends grant access and frees the references), completes
the bio (``EIO`` for ``BLKIF_RSP_ERROR``, ``EOPNOTSUPP`` for
``BLKIF_RSP_EOPNOTSUPP``), frees the command, thaws and restarts the queue.

Bios larger than one request are split into children (as GEOM does for
``d_maxsize``). Flush (``BLKIF_OP_FLUSH_DISKCACHE``) and ``BIO_ORDERED`` bios
are single-stepped: they wait for the ring to drain (``XBDF_WAIT_IDLE``) and
freeze the queue until they complete (``XBDCF_Q_FREEZE``).

Rules: ``biodone`` is never called with ``xbd_io_lock`` held: completed bios
are collected and completed after the unlock (or by a task on
``taskqueue_thread`` when the completion happened inside a busdma callback),
so a ``bio_done`` may submit again. Methods return errno ints (C contract);
only the constructor raises (ValueError, for a bad configuration).
"""

from __future__ import annotations

import errno
from collections import deque
from typing import Final, final

from gntdma.abi.blkif import (
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_OKAY,
    BLKIF_SECTOR_SIZE,
    VDISK_READONLY,
    XEN_IO_PROTO_ABI_NATIVE,
    BlkifAbi,
    BlkifAnyRequest,
    BlkifKey,
    BlkifRequest,
    BlkifRequestDiscard,
    BlkifRequestIndirect,
    blkif_abi,
    blkif_indirect_pages,
    blkif_ring_ref_key,
)
from gntdma.abi.ring import FrontRing, RingProtocolError, sring_init
from gntdma.dev.blkfront_cmd import (
    XBD_DEFAULT_MAX_INDIRECT_SEGMENTS,
    XBD_DEFAULT_RING_PAGE_ORDER,
    XBD_INDIRECT_SEGS_TO_PAGES,
    XBD_MAX_INDIRECT_SEGMENTS,
    XBD_MAX_RING_PAGE_ORDER,
    XBD_Q_BUSY,
    XBD_Q_FREE,
    XBD_Q_NONE,
    XBD_Q_READY,
    XBD_SEGS_TO_SIZE,
    XBD_STATE_CONNECTED,
    XBD_STATE_DISCONNECTED,
    XBDCF_ASYNC_MAPPING,
    XBDCF_FROZEN,
    XBDCF_INITIALIZER,
    XBDCF_Q_FREEZE,
    XBDCF_Q_MASK,
    XBDF_BARRIER,
    XBDF_BROKEN,
    XBDF_CM_SHORTAGE,
    XBDF_DETACHING,
    XBDF_DISCARD,
    XBDF_FLUSH,
    XBDF_FREED,
    XBDF_NONE,
    XBDF_READONLY,
    XBDF_WAIT_IDLE,
    XbdBackendFeatures,
    XbdStatistics,
    xbd_command,
    xbd_mksegarray,
)
from gntdma.sched import (
    MA_OWNED,
    KernelPanic,
    Mutex,
    current_scheduler,
    mb,
    msleep,
    mtx_assert,
    mtx_lock,
    mtx_unlock,
    rmb,
    tsleep,
    wakeup,
    wmb,
)
from gntdma.sys import (
    BIO_DELETE,
    BIO_FLUSH,
    BIO_ORDERED,
    BIO_READ,
    BIO_UNMAPPED,
    BIO_WRITE,
    BUS_DMA_NOWAIT,
    BUS_DMASYNC_POSTREAD,
    BUS_DMASYNC_POSTWRITE,
    BUS_DMASYNC_PREREAD,
    BUS_DMASYNC_PREWRITE,
    BUS_SPACE_MAXADDR,
    M_WAITOK,
    M_XENBLOCKFRONT,
    M_ZERO,
    PAGE_MASK,
    PAGE_SHIFT,
    PAGE_SIZE,
    BusDmaMap,
    BusDmaTag,
    Kernel,
    MapState,
    Task,
    bio,
    biodone,
    bus_dma_segment_t,
    bus_dma_tag_create,
    bus_dma_tag_destroy,
    bus_dmamap_create,
    bus_dmamap_destroy,
    bus_dmamap_load,
    bus_dmamap_load_bio,
    bus_dmamap_sync,
    bus_dmamap_unload,
    busdma_lock_mutex,
    taskqueue_drain,
    taskqueue_enqueue,
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

__all__ = [
    "XBD_CLOSE_TIMEOUT",
    "XbdBackendFeatures",
    "XbdStatistics",
    "xbd_command",
    "xbd_softc",
]

#: Seconds xbd_closing waits for in-flight requests, xbd_detach for the backend to unmap.
XBD_CLOSE_TIMEOUT: Final = 10.0
_FREE_POLL: Final = 0.001

_RW_OPS: Final = (BLKIF_OP_READ, BLKIF_OP_WRITE)


class _Split:
    """A bio split into children: completes when the last child does."""

    __slots__ = ("error", "parent", "remaining")

    def __init__(self, parent: bio, remaining: int) -> None:
        self.parent = parent
        self.remaining = remaining
        self.error = 0


@final
class xbd_softc:
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
    """

    def __init__(self, kern: Kernel, hc: Hypercalls, gnttab: GntTab, otherend_id: int, *,
                 name: str = "xbd0", vdev: int = 0, protocol: str = XEN_IO_PROTO_ABI_NATIVE,
                 ring_page_order: int = XBD_DEFAULT_RING_PAGE_ORDER,
                 max_indirect_segments: int = XBD_DEFAULT_MAX_INDIRECT_SEGMENTS) -> None:
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
        cm.cm_flags = XBDCF_INITIALIZER
        cm.cm_bp = None
        cm.cm_operation = 0
        cm.cm_sector_number = 0
        cm.cm_nr_sectors = 0
        cm.cm_nseg = 0
        cm.cm_bytes = 0
        cm.cm_status = 0
        cm.cm_indirect = False
        self._xbd_enqueue_cm(cm, XBD_Q_FREE)
        self.xbd_thaw(XBDF_CM_SHORTAGE)

    # -- setup: ring and event channel ---------------------------------------------------------

    def xbd_initialize(self, max_ring_page_order: int = 0) -> int:
        """Allocate and grant the ring, allocate the event channel, bind ``xbd_int``.

        ``max_ring_page_order`` is the backend's ``max-ring-page-order`` (0 when
        it has none). Returns 0, EALREADY if already done, ENXIO after a
        detach, or the error of the step that failed (nothing is left held).
        """
        if self.xbd_flags & (XBDF_DETACHING | XBDF_FREED):
            return errno.ENXIO
        if self.xbd_ring is not None:
            return errno.EALREADY
        kern = self.xbd_kern
        order = max(0, min(self.xbd_ring_page_order_max, max_ring_page_order))
        npages = 1 << order
        size = npages << PAGE_SHIFT
        va = kern.malloc(size, M_XENBLOCKFRONT, M_WAITOK | M_ZERO)
        error, dmat = bus_dma_tag_create(
            xen_get_dma_tag(kern), PAGE_SIZE, PAGE_SIZE, BUS_SPACE_MAXADDR, BUS_SPACE_MAXADDR,
            size, npages, PAGE_SIZE, self.xbd_otherend_id << BUS_DMA_XEN_DOMID_SHIFT,
            busdma_lock_mutex, self.xbd_io_lock)
        if error != 0 or dmat is None:
            kern.free(va, M_XENBLOCKFRONT)
            return error
        dmat.name = f"{self.name} ring"
        error, map_ = bus_dmamap_create(dmat, 0)
        if error != 0 or map_ is None:
            bus_dma_tag_destroy(dmat)
            kern.free(va, M_XENBLOCKFRONT)
            return error
        map_.name = f"{self.name} ring"
        got: list[int] = []

        def ring_cb(_arg: object, segs: list[bus_dma_segment_t], nseg: int, err: int) -> None:
            got.append(err)
            if err == 0 and (nseg != npages or any(s.ds_len != PAGE_SIZE or s.ds_addr & PAGE_MASK
                                                   for s in segs)):
                got[-1] = errno.EFBIG  # each ring page must be exactly one segment

        bus_dmamap_load(dmat, map_, va, size, ring_cb, None, BUS_DMA_NOWAIT)
        error = got[0] if got else errno.EIO
        if error != 0:
            bus_dmamap_unload(dmat, map_)
            bus_dmamap_destroy(dmat, map_)
            bus_dma_tag_destroy(dmat)
            kern.free(va, M_XENBLOCKFRONT)
            return error
        pages = kern.kva_views(va, size)
        sring_init(pages)
        ring = FrontRing(pages, self.xbd_abi.entry_size, wmb=wmb, rmb=rmb, mb=mb)
        rc, port = self.xbd_hc.evtchn_alloc_unbound(self.xbd_otherend_id)
        if rc == 0:
            rc = self.xbd_hc.evtchn_bind_handler(port, self.xbd_int, f"{kern.name}/{self.name}")
            if rc != 0:
                self.xbd_hc.evtchn_close(port)
        if rc != 0:
            bus_dmamap_unload(dmat, map_)
            bus_dmamap_destroy(dmat, map_)
            bus_dma_tag_destroy(dmat)
            kern.free(va, M_XENBLOCKFRONT)
            return -rc if rc < 0 else rc
        self._xbd_lock()
        self.xbd_ring_page_order = order
        self.xbd_ring_pages = npages
        self.xbd_ring_va = va
        self.xbd_ring_dmat = dmat
        self.xbd_ring_map = map_
        self.xbd_ring_refs = xen_dmamap_get_grefs(map_)
        self.xbd_ring = ring
        self.xbd_evtchn = port
        self._xbd_unlock()
        return 0

    def xbd_transport_keys(self) -> dict[str, str]:
        """What the glue writes in the frontend directory before Initialised.

        ``ring-ref`` for a one-page ring, else ``ring-page-order`` and
        ``ring-ref0..N-1``; ``event-channel``; ``protocol``. Empty before
        :meth:`xbd_initialize`.
        """
        if self.xbd_ring is None:
            return {}
        keys: dict[str, str] = {}
        if self.xbd_ring_pages == 1:
            keys[BlkifKey.RING_REF.value] = str(self.xbd_ring_refs[0])
        else:
            keys[BlkifKey.RING_PAGE_ORDER.value] = str(self.xbd_ring_page_order)
            for i, ref in enumerate(self.xbd_ring_refs):
                keys[blkif_ring_ref_key(i)] = str(ref)
        keys[BlkifKey.EVENT_CHANNEL.value] = str(self.xbd_evtchn)
        keys[BlkifKey.PROTOCOL.value] = self.xbd_abi.protocol
        return keys

    @property
    def xbd_protocol(self) -> str:
        return self.xbd_abi.protocol

    # -- setup: negotiation, tags, commands ------------------------------------------------------

    def xbd_connect(self, features: XbdBackendFeatures) -> int:
        """Take the backend's features, build the tags and the command pool, open the disk.

        Returns 0 (also if already connected), EINVAL before xbd_initialize or
        for impossible features, ENXIO after a detach, or the bus_dma error
        that stopped the setup (nothing is left held then). When the indirect
        pages cannot be granted (a grant table too small), the disk uses
        direct requests only, as FreeBSD does.
        """
        if self.xbd_flags & (XBDF_DETACHING | XBDF_FREED):
            return errno.ENXIO
        if self.xbd_state == XBD_STATE_CONNECTED:
            return 0
        ring = self.xbd_ring
        ssize = features.sector_size
        if (ring is None or features.sectors < 0 or ssize < BLKIF_SECTOR_SIZE
                or ssize & (ssize - 1) != 0 or ssize > PAGE_SIZE):
            return errno.EINVAL
        segs = min(features.max_indirect_segments, self.xbd_indirect_segments_max)
        if segs <= BLKIF_MAX_SEGMENTS_PER_REQUEST:
            segs = BLKIF_MAX_SEGMENTS_PER_REQUEST
        ncmds = ring.nr_ents
        shadow = [xbd_command(self, i) for i in range(ncmds)]
        indirect_dmat: BusDmaTag | None = None
        if segs > BLKIF_MAX_SEGMENTS_PER_REQUEST:
            indirect_dmat = self._xbd_alloc_indirect(shadow, XBD_INDIRECT_SEGS_TO_PAGES(segs))
            if indirect_dmat is None:
                segs = BLKIF_MAX_SEGMENTS_PER_REQUEST
        error = self._xbd_alloc_data_maps(shadow, segs)
        if error != 0:
            self._xbd_free_indirect(shadow, indirect_dmat)
            return error
        self._xbd_lock()
        self.xbd_features = features
        self.xbd_sector_size = ssize
        self.xbd_media_size = features.sectors * ssize
        self.xbd_max_request_segments = segs
        self.xbd_max_request_indirectpages = (XBD_INDIRECT_SEGS_TO_PAGES(segs)
                                              if indirect_dmat is not None else 0)
        self.xbd_max_request_size = XBD_SEGS_TO_SIZE(segs)
        self.xbd_indirect_dmat = indirect_dmat
        self.xbd_shadow = shadow
        for cm in shadow:
            self._xbd_enqueue_cm(cm, XBD_Q_FREE)
        if features.feature_flush_cache:
            self.xbd_flags |= XBDF_FLUSH
        if features.feature_barrier:
            self.xbd_flags |= XBDF_BARRIER
        if features.feature_discard:
            self.xbd_flags |= XBDF_DISCARD
        if features.info & VDISK_READONLY:
            self.xbd_flags |= XBDF_READONLY
        self.xbd_state = XBD_STATE_CONNECTED
        self.xbd_startio()
        self._xbd_unlock()
        return 0

    def _xbd_alloc_indirect(self, shadow: list[xbd_command], npages: int) -> BusDmaTag | None:
        """Indirect pages for every command, granted read-only; None (all undone) on failure."""
        kern = self.xbd_kern
        size = npages << PAGE_SHIFT
        error, dmat = bus_dma_tag_create(
            xen_get_dma_tag(kern), PAGE_SIZE, PAGE_SIZE, BUS_SPACE_MAXADDR, BUS_SPACE_MAXADDR,
            size, npages, PAGE_SIZE, self.xbd_otherend_id << BUS_DMA_XEN_DOMID_SHIFT,
            busdma_lock_mutex, self.xbd_io_lock)
        if error != 0 or dmat is None:
            return None
        dmat.name = f"{self.name} indirect"

        def indirect_cb(arg: object, segs: list[bus_dma_segment_t], nseg: int,
                        err: int) -> None:
            assert isinstance(arg, list)
            arg.append(err if err != 0 or nseg == npages else errno.EFBIG)

        for cm in shadow:
            error, map_ = bus_dmamap_create(dmat, BUS_DMA_XEN_PREALLOC_REFS)
            if error != 0 or map_ is None:
                break
            map_.name = f"{self.name} indirect {cm.cm_id}"
            cm.cm_indirectionmap = map_
            cm.cm_indirectionpages = kern.malloc(size, M_XENBLOCKFRONT, M_WAITOK | M_ZERO)
            got: list[int] = []
            bus_dmamap_load(dmat, map_, cm.cm_indirectionpages, size, indirect_cb, got,
                            BUS_DMA_NOWAIT | BUS_DMA_XEN_RO)
            error = got[0] if got else errno.EIO
            if error != 0:
                break
            cm.cm_indirectionrefs = xen_dmamap_get_grefs(map_)
        if error != 0:
            self._xbd_free_indirect(shadow, dmat)
            return None
        return dmat

    def _xbd_free_indirect(self, shadow: list[xbd_command], dmat: BusDmaTag | None) -> None:
        if dmat is None:
            return
        for cm in shadow:
            m = cm.cm_indirectionmap
            if m is not None:
                bus_dmamap_unload(dmat, m)
                bus_dmamap_destroy(dmat, m)
                cm.cm_indirectionmap = None
            if cm.cm_indirectionpages != 0:
                self.xbd_kern.free(cm.cm_indirectionpages, M_XENBLOCKFRONT)
                cm.cm_indirectionpages = 0
            cm.cm_indirectionrefs = []
        bus_dma_tag_destroy(dmat)

    def _xbd_alloc_data_maps(self, shadow: list[xbd_command], segs: int) -> int:
        error, dmat = bus_dma_tag_create(
            xen_get_dma_tag(self.xbd_kern), BLKIF_SECTOR_SIZE, PAGE_SIZE, BUS_SPACE_MAXADDR,
            BUS_SPACE_MAXADDR, XBD_SEGS_TO_SIZE(segs), segs, PAGE_SIZE,
            self.xbd_otherend_id << BUS_DMA_XEN_DOMID_SHIFT, busdma_lock_mutex,
            self.xbd_io_lock)
        if error != 0 or dmat is None:
            return error
        dmat.name = f"{self.name} data"
        for cm in shadow:
            error, map_ = bus_dmamap_create(dmat, 0)
            if error != 0 or map_ is None:
                for c in shadow:
                    if c.cm_map is not None:
                        bus_dmamap_destroy(dmat, c.cm_map)
                        c.cm_map = None
                bus_dma_tag_destroy(dmat)
                return error
            map_.name = f"{self.name} data {cm.cm_id}"
            cm.cm_map = map_
        self.xbd_io_dmat = dmat
        return 0

    # -- the block-device entry point -----------------------------------------------------------

    def xbd_strategy(self, bp: bio) -> None:
        """Submit ``bp`` (``d_strategy``); it completes through ``biodone``.

        Errors reported in the bio: ENXIO (not connected, detached), EIO (the
        backend broke the ring, a range past the end, a backend error),
        EINVAL (offset or length not a multiple of the sector size), EROFS (a
        write to a read-only disk), EOPNOTSUPP (flush or delete the backend
        does not offer, or refused).
        """
        self._xbd_lock()
        try:
            self._st_bios += 1
            error = self._xbd_check_bio(bp)
            if error != 0:
                self._xbd_bio_done(bp, error)
                return
            if (bp.bio_cmd in (BIO_READ, BIO_WRITE) and bp.bio_bcount == 0):
                self._xbd_bio_done(bp, 0)
                return
            if bp.bio_cmd in (BIO_READ, BIO_WRITE) and bp.bio_bcount > self.xbd_max_request_size:
                self.xbd_bioq.extend(self._xbd_split(bp))
            else:
                self.xbd_bioq.append(bp)
            self.xbd_startio()
        finally:
            self._xbd_unlock()

    def _xbd_check_bio(self, bp: bio) -> int:
        if self.xbd_flags & (XBDF_DETACHING | XBDF_FREED) or self.xbd_state != XBD_STATE_CONNECTED:
            return errno.ENXIO
        if self.xbd_flags & XBDF_BROKEN:
            return errno.EIO
        cmd = bp.bio_cmd
        if cmd == BIO_FLUSH:
            return 0 if self.xbd_flags & (XBDF_FLUSH | XBDF_BARRIER) else errno.EOPNOTSUPP
        if cmd not in (BIO_READ, BIO_WRITE, BIO_DELETE):
            return errno.EOPNOTSUPP
        if cmd != BIO_READ and self.xbd_flags & XBDF_READONLY:
            return errno.EROFS
        if cmd == BIO_DELETE and not self.xbd_flags & XBDF_DISCARD:
            return errno.EOPNOTSUPP
        ss = self.xbd_sector_size
        if bp.bio_offset < 0 or bp.bio_bcount < 0 or bp.bio_offset % ss or bp.bio_bcount % ss:
            return errno.EINVAL
        if bp.bio_offset + bp.bio_bcount > self.xbd_media_size:
            return errno.EIO
        return 0

    def _xbd_split(self, bp: bio) -> list[bio]:
        """Children of at most one request each, completing ``bp`` when all are done."""
        step = self.xbd_max_request_size
        n = (bp.bio_bcount + step - 1) // step
        split = _Split(bp, n)
        children: list[bio] = []
        for i in range(n):
            off = i * step
            ln = min(step, bp.bio_bcount - off)
            child = bio(bio_cmd=bp.bio_cmd, bio_offset=bp.bio_offset + off, bio_bcount=ln,
                        bio_done=self._xbd_child_done, bio_caller1=split)
            if i == 0:
                child.bio_flags |= bp.bio_flags & BIO_ORDERED
            if bp.bio_flags & BIO_UNMAPPED:
                at = bp.bio_ma_offset + off
                first = at >> PAGE_SHIFT
                child.bio_flags |= BIO_UNMAPPED
                child.bio_ma_offset = at & PAGE_MASK
                child.bio_ma_n = (child.bio_ma_offset + ln + PAGE_MASK) >> PAGE_SHIFT
                child.bio_ma = bp.bio_ma[first:first + child.bio_ma_n]
            else:
                child.bio_data = bp.bio_data + off
            children.append(child)
        return children

    def _xbd_child_done(self, child: bio) -> None:
        split = child.bio_caller1
        assert isinstance(split, _Split)
        self._xbd_lock()
        split.remaining -= 1
        if child.bio_error != 0 and split.error == 0:
            split.error = child.bio_error
        last = split.remaining == 0
        self._xbd_unlock()
        if last:
            parent = split.parent
            if split.error != 0:
                parent.bio_error = split.error
                parent.bio_resid = parent.bio_bcount
            else:
                parent.bio_resid = 0
            biodone(parent)

    # -- dispatch ------------------------------------------------------------------------------

    def xbd_startio(self) -> None:
        """Put as many bios on the ring as it, the commands and the freezes allow."""
        mtx_assert(self.xbd_io_lock, MA_OWNED)
        ring = self.xbd_ring
        if (ring is None or self.xbd_state != XBD_STATE_CONNECTED
                or self.xbd_flags & (XBDF_DETACHING | XBDF_BROKEN)):
            return
        queued = 0
        while not ring.full():
            if self.xbd_qfrozen_cnt != 0:
                break
            cm = self._xbd_dequeue(self.xbd_cm_ready)
            if cm is None:
                cm = self.xbd_bio_command()
            if cm is None:
                break
            if cm.cm_flags & XBDCF_Q_FREEZE:
                # Freeze the queue until this command completes.
                self.xbd_cm_freeze(cm, XBDCF_Q_FREEZE)
            self.xbd_queue_request(cm)
            queued += 1
        if queued != 0:
            self.xbd_flush_requests()

    def xbd_bio_command(self) -> xbd_command | None:
        """A command for the next queued bio (None: no bio, or must wait)."""
        if not self.xbd_bioq:
            return None
        cm = self._xbd_dequeue(self.xbd_cm_free)
        if cm is None:
            self.xbd_freeze(XBDF_CM_SHORTAGE)
            return None
        bp = self.xbd_bioq.popleft()
        cm.cm_bp = bp
        cm.cm_sector_number = bp.bio_offset // BLKIF_SECTOR_SIZE
        cm.cm_bytes = bp.bio_bcount
        if bp.bio_cmd == BIO_READ:
            cm.cm_operation = BLKIF_OP_READ
        elif bp.bio_cmd == BIO_WRITE:
            cm.cm_operation = BLKIF_OP_WRITE
        elif bp.bio_cmd == BIO_DELETE:
            cm.cm_operation = BLKIF_OP_DISCARD
            cm.cm_nr_sectors = bp.bio_bcount // BLKIF_SECTOR_SIZE
        elif self.xbd_flags & XBDF_FLUSH:
            cm.cm_operation = BLKIF_OP_FLUSH_DISKCACHE
        else:
            cm.cm_operation = BLKIF_OP_WRITE_BARRIER
        if bp.bio_cmd == BIO_FLUSH or bp.bio_flags & BIO_ORDERED:
            # Single step: after everything on the ring, before anything later.
            cm.cm_flags |= XBDCF_Q_FREEZE
            if self.xbd_cm_busy:
                self.xbd_freeze(XBDF_WAIT_IDLE)
                self._xbd_requeue_ready(cm)
                return None
        return cm

    def xbd_queue_request(self, cm: xbd_command) -> None:
        """Load the command's data (if any); ``xbd_queue_cb`` puts it on the ring."""
        if cm.cm_operation not in _RW_OPS:
            self.xbd_queue_cb(cm, [], 0, 0)
            return
        bp = cm.cm_bp
        assert bp is not None and self.xbd_io_dmat is not None and cm.cm_map is not None
        flags = BUS_DMA_XEN_RO if cm.cm_operation == BLKIF_OP_WRITE else 0
        error = bus_dmamap_load_bio(self.xbd_io_dmat, cm.cm_map, bp, self.xbd_queue_cb, cm,
                                    flags)
        if error == errno.EINPROGRESS:
            # Keep the queue in order: the next bio may need fewer resources, so
            # bus_dma would not make it wait for this one.
            self._st_deferred += 1
            cm.cm_flags |= XBDCF_ASYNC_MAPPING
            self.xbd_cm_freeze(cm, XBDCF_ASYNC_MAPPING)
        # Any other error was given to xbd_queue_cb, which completed the bio.

    def _xbd_indirect_grefs(self, cm: xbd_command, npages: int) -> list[int]:
        """The references of the command's indirect pages that the request uses."""
        return cm.cm_indirectionrefs[:npages]

    def xbd_queue_cb(self, arg: object, segs: list[bus_dma_segment_t], nsegs: int,
                     error: int) -> None:
        """Build the request from the loaded segments and put it on the ring."""
        cm = arg
        assert isinstance(cm, xbd_command)
        mtx_assert(self.xbd_io_lock, MA_OWNED)
        is_async = bool(cm.cm_flags & XBDCF_ASYNC_MAPPING)
        cm.cm_flags &= ~XBDCF_ASYNC_MAPPING
        ring = self.xbd_ring
        bp = cm.cm_bp
        assert bp is not None
        if error == 0 and (ring is None or self.xbd_flags & (XBDF_DETACHING | XBDF_BROKEN)):
            # The device went away while the load waited.
            if cm.cm_map is not None and cm.cm_operation in _RW_OPS:
                bus_dmamap_unload(self._xbd_io_dmat(), cm.cm_map)
            error = errno.EIO if self.xbd_flags & XBDF_BROKEN else errno.ENXIO
        elif error != 0:
            error = errno.EIO  # the load failed (EFBIG...): FreeBSD reports EIO
        if error != 0:
            self.xbd_cm_thaw(cm)
            self.xbd_free_command(cm)
            self._xbd_bio_done(bp, error)
            if is_async:
                self.xbd_startio()
                self._xbd_kick_done()
            return
        assert ring is not None
        if nsegs > self.xbd_max_request_segments:
            raise KernelPanic(f"{self.name}: {nsegs} segments, at most "
                              f"{self.xbd_max_request_segments}")
        req: BlkifAnyRequest
        if cm.cm_operation == BLKIF_OP_DISCARD:
            req = BlkifRequestDiscard(handle=self.xbd_vdev, id=cm.cm_id,
                                      sector_number=cm.cm_sector_number,
                                      nr_sectors=cm.cm_nr_sectors)
            self._st_discards += 1
        elif cm.cm_operation not in _RW_OPS:
            req = BlkifRequest(operation=cm.cm_operation, nr_segments=0, handle=self.xbd_vdev,
                               id=cm.cm_id, sector_number=cm.cm_sector_number)
            self._st_flushes += 1
        else:
            assert cm.cm_map is not None
            refs = xen_dmamap_get_grefs(cm.cm_map)
            sg = xbd_mksegarray(segs, nsegs, refs)
            if nsegs <= BLKIF_MAX_SEGMENTS_PER_REQUEST:
                req = BlkifRequest(operation=cm.cm_operation, nr_segments=nsegs,
                                   handle=self.xbd_vdev, id=cm.cm_id,
                                   sector_number=cm.cm_sector_number, seg=tuple(sg))
                self._st_direct += 1
            else:
                npages = blkif_indirect_pages(nsegs)
                m = cm.cm_indirectionmap
                assert m is not None and self.xbd_indirect_dmat is not None
                self.xbd_kern.kva_write(cm.cm_indirectionpages, b"".join(s.pack() for s in sg))
                bus_dmamap_sync(self.xbd_indirect_dmat, m, BUS_DMASYNC_PREWRITE)
                req = BlkifRequestIndirect(indirect_op=cm.cm_operation, nr_segments=nsegs,
                                           id=cm.cm_id, sector_number=cm.cm_sector_number,
                                           handle=self.xbd_vdev,
                                           indirect_grefs=tuple(self._xbd_indirect_grefs(
                                               cm, npages)))
                cm.cm_indirect = True
                self._st_indirect += 1
            op = BUS_DMASYNC_PREREAD if cm.cm_operation == BLKIF_OP_READ else BUS_DMASYNC_PREWRITE
            bus_dmamap_sync(self._xbd_io_dmat(), cm.cm_map, op)
        cm.cm_nseg = nsegs
        ring.put_request(self.xbd_abi.pack_request(req))
        self._st_requests += 1
        occ = (ring.req_prod_pvt - ring.rsp_cons) & 0xFFFFFFFF
        self._st_occupancy_peak = max(self._st_occupancy_peak, occ)
        self._xbd_enqueue_cm(cm, XBD_Q_BUSY)
        if is_async:
            # Called back by bus_dma, not from xbd_startio: publish now, thaw, go on.
            if not cm.cm_flags & XBDCF_Q_FREEZE:
                self.xbd_cm_thaw(cm)
            self.xbd_flush_requests()
            self.xbd_startio()
            self._xbd_kick_done()

    def _xbd_io_dmat(self) -> BusDmaTag:
        dmat = self.xbd_io_dmat
        assert dmat is not None
        return dmat

    def xbd_flush_requests(self) -> None:
        """Publish the requests; notify the backend if its event index asks for it."""
        ring = self.xbd_ring
        assert ring is not None
        if ring.push_requests():
            self.xbd_hc.evtchn_send(self.xbd_evtchn)

    # -- completion -------------------------------------------------------------------------------

    def xbd_int(self, _port: int) -> None:
        """The event channel's handler (interrupt thread): consume the responses."""
        self._xbd_lock()
        try:
            ring = self.xbd_ring
            if (ring is None or self.xbd_state != XBD_STATE_CONNECTED
                    or self.xbd_flags & XBDF_BROKEN):
                return
            try:
                while True:
                    n = ring.unconsumed_responses()
                    for _ in range(n):
                        if not self._xbd_response(ring.get_response()):
                            return
                    if not ring.final_check_for_responses():
                        break
            except RingProtocolError as e:
                self._xbd_broken(str(e))
                return
            if not self.xbd_cm_busy:
                self.xbd_thaw(XBDF_WAIT_IDLE)
                wakeup(self._xbd_idle_chan)
            self.xbd_startio()
        finally:
            self._xbd_unlock()

    def _xbd_response(self, raw: bytes) -> bool:
        """Complete the command a response answers; False if the response is bogus."""
        rsp = self.xbd_abi.unpack_response(raw)
        cid = rsp.id
        cm = self.xbd_cm_busy.get(cid) if 0 <= cid < len(self.xbd_shadow) else None
        if cm is None:
            self._xbd_broken(f"response id {cid} is not a request in flight")
            return False
        if rsp.operation != cm.cm_operation and not (cm.cm_indirect
                                                     and rsp.operation == BLKIF_OP_INDIRECT):
            self._xbd_broken(f"response id {cid} has operation {rsp.operation}, "
                             f"the request {cm.cm_operation}")
            return False
        self._xbd_remove_busy(cm)
        self._xbd_cm_unload(cm)
        # Release any hold this command has on future command dispatch.
        self.xbd_cm_thaw(cm)
        cm.cm_status = rsp.status
        self.xbd_bio_complete(cm)
        return True

    def _xbd_cm_unload(self, cm: xbd_command) -> None:
        """POST syncs and unload: ends grant access and frees the data references."""
        if cm.cm_operation in _RW_OPS and cm.cm_map is not None:
            dmat = self._xbd_io_dmat()
            op = BUS_DMASYNC_POSTREAD if cm.cm_operation == BLKIF_OP_READ \
                else BUS_DMASYNC_POSTWRITE
            if cm.cm_map.state is MapState.LOADED:
                bus_dmamap_sync(dmat, cm.cm_map, op)
            bus_dmamap_unload(dmat, cm.cm_map)
        if cm.cm_indirect and cm.cm_indirectionmap is not None:
            assert self.xbd_indirect_dmat is not None
            bus_dmamap_sync(self.xbd_indirect_dmat, cm.cm_indirectionmap,
                            BUS_DMASYNC_POSTWRITE)

    def xbd_bio_complete(self, cm: xbd_command) -> None:
        bp = cm.cm_bp
        assert bp is not None
        status = cm.cm_status
        if status == BLKIF_RSP_OKAY:
            error = 0
            if cm.cm_operation == BLKIF_OP_READ:
                self._st_bytes_read += cm.cm_bytes
            elif cm.cm_operation == BLKIF_OP_WRITE:
                self._st_bytes_written += cm.cm_bytes
        elif status == BLKIF_RSP_EOPNOTSUPP:
            error = errno.EOPNOTSUPP
        else:
            error = errno.EIO
        self.xbd_free_command(cm)
        self._xbd_bio_done(bp, error)

    def _xbd_fail_unissued(self, error: int) -> None:
        """Fail every bio not on the ring: queued, ready, or waiting for its mapping."""
        while self.xbd_bioq:
            self._xbd_bio_done(self.xbd_bioq.popleft(), error)
        while True:
            cm = self._xbd_dequeue(self.xbd_cm_ready)
            if cm is None:
                break
            self._xbd_abort_cm(cm, error)
        for cm in self.xbd_shadow:
            if cm.cm_flags & XBDCF_ASYNC_MAPPING:
                cm.cm_flags &= ~XBDCF_ASYNC_MAPPING
                if cm.cm_map is not None:
                    bus_dmamap_unload(self._xbd_io_dmat(), cm.cm_map)  # cancels the wait
                self._xbd_abort_cm(cm, error)
        if self.xbd_flags & XBDF_WAIT_IDLE:
            self.xbd_thaw(XBDF_WAIT_IDLE)

    def _xbd_abort_cm(self, cm: xbd_command, error: int) -> None:
        bp = cm.cm_bp
        self.xbd_cm_thaw(cm)
        self.xbd_free_command(cm)
        if bp is not None:
            self._xbd_bio_done(bp, error)

    def _xbd_broken(self, reason: str) -> None:
        """The backend broke the protocol: stop using the ring (the glue detaches)."""
        if self.xbd_flags & XBDF_BROKEN:
            return
        self.xbd_flags |= XBDF_BROKEN
        self.xbd_protocol_error = reason
        self._xbd_fail_unissued(errno.EIO)
        wakeup(self._xbd_idle_chan)

    # -- disconnect ---------------------------------------------------------------------------

    def xbd_closing(self, *, backend_gone: bool = False,
                    timeout: float = XBD_CLOSE_TIMEOUT) -> int:
        """Stop the disk: new bios and those not on the ring get ENXIO; wait for the rest.

        Requests on the ring complete normally unless the backend is gone (or
        broke the ring, or takes more than ``timeout`` seconds): those fail
        with ENXIO, their maps unloaded. Idempotent; returns 0. Sleeps.
        """
        self._xbd_lock()
        try:
            if not self.xbd_flags & XBDF_DETACHING:
                self.xbd_flags |= XBDF_DETACHING
                self._xbd_fail_unissued(errno.ENXIO)
            if not backend_gone and self.xbd_state == XBD_STATE_CONNECTED:
                s = current_scheduler()
                deadline = s.now() + timeout
                while self.xbd_cm_busy and not self.xbd_flags & XBDF_BROKEN:
                    left = deadline - s.now()
                    if left <= 0:
                        break
                    msleep(self._xbd_idle_chan, self.xbd_io_lock, "xbdclose", left)
            for cm in list(self.xbd_cm_busy.values()):
                self._xbd_remove_busy(cm)
                self._xbd_cm_unload(cm)
                self._xbd_abort_cm(cm, errno.ENXIO)
            self.xbd_state = XBD_STATE_DISCONNECTED
            wakeup(self._xbd_idle_chan)
            return 0
        finally:
            self._xbd_unlock()

    def _xbd_backend_maps_pages(self) -> bool:
        """Whether the backend still maps a ring or indirect page (never free those)."""
        gt = self.xbd_gnttab
        refs = list(self.xbd_ring_refs)
        for cm in self.xbd_shadow:
            refs.extend(cm.cm_indirectionrefs)
        return any(gt.gnttab_query_foreign_access(r) != 0 for r in refs)

    def xbd_free(self) -> int:
        """Give everything back: maps, indirect pages, tags, ring, port (``xbd_free``).

        Returns 0 (and does nothing the second time: nothing is freed twice),
        EBUSY if the disk is still open (call :meth:`xbd_closing` first) or the
        backend still maps the ring or an indirect page (nothing is freed;
        call again once the backend has disconnected).
        """
        self._xbd_lock()
        try:
            if self.xbd_flags & XBDF_FREED:
                return 0
            if self.xbd_state == XBD_STATE_CONNECTED or self.xbd_cm_busy:
                return errno.EBUSY
            if self._xbd_backend_maps_pages():
                return errno.EBUSY
            self.xbd_flags |= XBDF_DETACHING | XBDF_FREED
            if self.xbd_evtchn != 0:
                self.xbd_hc.evtchn_close(self.xbd_evtchn)  # stops xbd_int's thread
                self.xbd_evtchn = 0
            dmat = self.xbd_io_dmat
            for cm in self.xbd_shadow:
                if cm.cm_map is not None and dmat is not None:
                    if cm.cm_map.state is not MapState.IDLE:
                        bus_dmamap_unload(dmat, cm.cm_map)
                    bus_dmamap_destroy(dmat, cm.cm_map)
                    cm.cm_map = None
            self._xbd_free_indirect(self.xbd_shadow, self.xbd_indirect_dmat)
            self.xbd_indirect_dmat = None
            if dmat is not None:
                bus_dma_tag_destroy(dmat)
                self.xbd_io_dmat = None
            self.xbd_shadow = []
            self.xbd_cm_free.clear()
            self.xbd_ring = None
            rdmat, rmap = self.xbd_ring_dmat, self.xbd_ring_map
            if rdmat is not None and rmap is not None:
                bus_dmamap_unload(rdmat, rmap)
                bus_dmamap_destroy(rdmat, rmap)
                bus_dma_tag_destroy(rdmat)
            self.xbd_ring_dmat = self.xbd_ring_map = None
            self.xbd_ring_refs = []
            if self.xbd_ring_va != 0:
                self.xbd_kern.free(self.xbd_ring_va, M_XENBLOCKFRONT)
                self.xbd_ring_va = 0
        finally:
            self._xbd_unlock()
        taskqueue_drain(self.xbd_kern.taskqueue_thread, self._xbd_done_task)
        return 0

    def xbd_detach(self, *, backend_gone: bool = False,
                   timeout: float = XBD_CLOSE_TIMEOUT) -> int:
        """Remove the disk: :meth:`xbd_closing`, then :meth:`xbd_free` once the backend
        has unmapped the ring (polled for ``timeout`` seconds). 0 or EBUSY. Sleeps."""
        self.xbd_closing(backend_gone=backend_gone, timeout=timeout)
        deadline = current_scheduler().now() + timeout
        while True:
            error = self.xbd_free()
            if error != errno.EBUSY or current_scheduler().now() >= deadline:
                return error
            tsleep(self._xbd_free_chan, "xbdfree", _FREE_POLL)

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
