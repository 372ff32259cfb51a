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

Bios that touch more pages than a request has segments are split into
children (as GEOM does for ``d_maxsize``), each as long as its pages allow: a
page-aligned bio of ``xbd_max_request_segments`` pages is one request
(``xbd_max_request_size`` is what fits at any alignment). Flush
(``BLKIF_OP_FLUSH_DISKCACHE``) and ``BIO_ORDERED`` bios are single-stepped:
they wait for the ring to drain (``XBDF_WAIT_IDLE``) and freeze the queue
until they complete (``XBDCF_Q_FREEZE``).

Rules: ``biodone`` is never called with ``xbd_io_lock`` held: completed bios
are collected and completed after the unlock (or by a task on
``taskqueue_thread`` when the completion happened inside a busdma callback),
so a ``bio_done`` may submit again. Methods return errno ints (C contract);
only the constructor raises (ValueError, for a bad configuration).
"""

from __future__ import annotations

import errno
from typing import Final, final

from gntdma.abi.blkif import (
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_SECTOR_SIZE,
    VDISK_READONLY,
    BlkifKey,
    blkif_ring_ref_key,
)
from gntdma.abi.ring import FrontRing, sring_init
from gntdma.dev.blkfront_cmd import (
    XBD_INDIRECT_SEGS_TO_PAGES,
    XBD_Q_FREE,
    XBD_SEGS_TO_SIZE,
    XBD_STATE_CONNECTED,
    XBD_STATE_DISCONNECTED,
    XBDF_BARRIER,
    XBDF_BROKEN,
    XBDF_DETACHING,
    XBDF_DISCARD,
    XBDF_FLUSH,
    XBDF_FREED,
    XBDF_READONLY,
    XbdBackendFeatures,
    XbdStatistics,
    xbd_discard_limits,
    xbd_size_requests,
)
from gntdma.dev.blkfront_req import xbd_softc_req
from gntdma.dev.blkfront_softc import xbd_command
from gntdma.sched import (
    current_scheduler,
    mb,
    msleep,
    rmb,
    tsleep,
    wakeup,
    wmb,
)
from gntdma.sys import (
    BUS_DMA_NOWAIT,
    BUS_SPACE_MAXADDR,
    M_NOWAIT,
    M_WAITOK,
    M_XENBLOCKFRONT,
    M_ZERO,
    PAGE_MASK,
    PAGE_SHIFT,
    PAGE_SIZE,
    BusDmaTag,
    MapState,
    bus_dma_segment_t,
    bus_dma_tag_create,
    bus_dma_tag_destroy,
    bus_dmamap_create,
    bus_dmamap_destroy,
    bus_dmamap_load,
    bus_dmamap_unload,
    busdma_lock_mutex,
    taskqueue_drain,
)
from gntdma.xen.busdma import (
    BUS_DMA_XEN_DOMID_SHIFT,
    BUS_DMA_XEN_PERSISTENT,
    BUS_DMA_XEN_PREALLOC_REFS,
    BUS_DMA_XEN_RO,
    xen_dmamap_get_grefs,
    xen_get_dma_tag,
)

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



@final
class xbd_softc(xbd_softc_req):
    """One Xen virtual block device, frontend side (FreeBSD ``struct xbd_softc``).

    Constructor arguments: see :class:`gntdma.dev.blkfront_softc.xbd_softc_base`.
    """

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
        # The ring's references are held for the disk's life (a prealloc map).
        error, map_ = bus_dmamap_create(dmat, BUS_DMA_XEN_PREALLOC_REFS)
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
        wanted = max(min(features.max_indirect_segments, self.xbd_indirect_segments_max),
                     BLKIF_MAX_SEGMENTS_PER_REQUEST)
        ncmds = ring.nr_ents
        budget = self.xbd_gnttab.gnttab_ever_available() // max(1, self.xbd_grant_share)
        segs = xbd_size_requests(wanted, ncmds, budget)
        if segs < 2:
            return errno.ENOSPC  # not even a one-page request beside what is held
        shadow = [xbd_command(self, i) for i in range(ncmds)]
        indirect_dmat: BusDmaTag | None = None
        if segs > BLKIF_MAX_SEGMENTS_PER_REQUEST:
            indirect_dmat = self._xbd_alloc_indirect(shadow, XBD_INDIRECT_SEGS_TO_PAGES(segs))
            if indirect_dmat is None:
                segs = min(BLKIF_MAX_SEGMENTS_PER_REQUEST, budget)
        # What the indirect pages hold for life is gone: never ask for more than the rest.
        segs = min(segs, self.xbd_gnttab.gnttab_ever_available())
        if segs < 2:
            self._xbd_free_indirect(shadow, indirect_dmat)
            return errno.ENOSPC
        self.xbd_sizing_note = "" if segs >= wanted else (
            f"{self.name}: {budget} grant references for this disk "
            f"({self.xbd_gnttab.capacity} in the table, shared by the {self.xbd_grant_share} "
            f"disk(s) still to connect beside what is held for life): requests limited "
            f"to {segs} segments "
            f"({XBD_SEGS_TO_SIZE(segs) >> 10} KiB), "
            + ("indirect" if segs > BLKIF_MAX_SEGMENTS_PER_REQUEST else "no indirect")
            + f" requests (it would use {wanted})")
        error = self._xbd_alloc_data_maps(shadow, segs)
        if error != 0:
            self._xbd_free_indirect(shadow, indirect_dmat)
            return error
        self._xbd_lock()
        self.xbd_features = features
        self.xbd_sector_size = ssize
        # Sector quantities are 512-byte units: we do not advertise
        # feature-large-sector-size (blkif.h); ssize is the logical block size.
        self.xbd_media_size = features.media_size
        (self.xbd_discard_max_sectors, self.xbd_discard_granularity,
         self.xbd_discard_alignment) = xbd_discard_limits(features)
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
        """Indirect pages for every command, granted read-only (writable with persistent
        grants: Linux xen-blkfront grants them as its data pages, and xen-blkback's
        ``xen_blkbk_map`` maps them writable then); None (all undone) on failure."""
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
            # No sleep for memory that may never come (a small guest): without it
            # the disk uses direct requests (FreeBSD's xbd_connect: M_NOWAIT, and
            # xbd_max_request_indirectpages = 0 on failure).
            cm.cm_indirectionpages = kern.malloc(size, M_XENBLOCKFRONT, M_NOWAIT | M_ZERO)
            if cm.cm_indirectionpages == 0:
                error = errno.ENOMEM
                break
            got: list[int] = []
            bus_dmamap_load(dmat, map_, cm.cm_indirectionpages, size, indirect_cb, got,
                            BUS_DMA_NOWAIT | (0 if self.xbd_persistent else BUS_DMA_XEN_RO))
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
            BUS_SPACE_MAXADDR, segs << PAGE_SHIFT, segs, PAGE_SIZE,
            self.xbd_otherend_id << BUS_DMA_XEN_DOMID_SHIFT, busdma_lock_mutex,
            self.xbd_io_lock)
        if error != 0 or dmat is None:
            return error
        dmat.name = f"{self.name} data"
        for cm in shadow:
            error, map_ = bus_dmamap_create(
                dmat, BUS_DMA_XEN_PERSISTENT if self.xbd_persistent else 0)
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
