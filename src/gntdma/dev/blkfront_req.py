"""blkfront: the request path of an xbd device (FreeBSD's xbd_strategy .. xbd_int).

``xbd_strategy`` queues a bio (split into children when larger than one
request), ``xbd_startio`` takes free commands for queued bios as long as the
ring, the commands and the freezes allow, ``xbd_queue_request`` loads the data
through busdma_xen (read-only when it goes to the disk) and ``xbd_queue_cb``
builds the direct or indirect request and puts it on the ring. A load that
returns EINPROGRESS freezes the queue (``XBDCF_ASYNC_MAPPING``) until its
callback. ``xbd_int`` consumes the responses, unloads, completes the bios and
restarts the queue. All of it runs with ``xbd_io_lock`` held.
"""

from __future__ import annotations

import errno

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
    BlkifRequestDiscard,
    blkif_indirect_pages,
)
from gntdma.abi.blkif_hot import (
    blkif_pack_indirect,
    blkif_pack_rw,
    blkif_pack_segs,
    blkif_unpack_response,
)
from gntdma.abi.ring import RingProtocolError
from gntdma.dev.blkfront_cmd import (
    XBD_Q_BUSY,
    XBD_Q_NONE,
    XBD_STATE_CONNECTED,
    XBDCF_ASYNC_MAPPING,
    XBDCF_FROZEN,
    XBDCF_Q_FREEZE,
    XBDCF_Q_MASK,
    XBDF_BARRIER,
    XBDF_BROKEN,
    XBDF_CM_SHORTAGE,
    XBDF_DETACHING,
    XBDF_DISCARD,
    XBDF_FLUSH,
    XBDF_FREED,
    XBDF_READONLY,
    XBDF_WAIT_IDLE,
    xbd_discard_pieces,
    xbd_mksegs,
)
from gntdma.dev.blkfront_softc import XBD_RW_OPS, xbd_command, xbd_softc_base
from gntdma.sched import (
    MA_OWNED,
    KernelPanic,
    current_scheduler,
    mtx_assert,
    wakeup,
)
from gntdma.sys import (
    BIO_DELETE,
    BIO_FLUSH,
    BIO_ORDERED,
    BIO_READ,
    BIO_UNMAPPED,
    BIO_WRITE,
    BUS_DMASYNC_POSTREAD,
    BUS_DMASYNC_POSTWRITE,
    BUS_DMASYNC_PREREAD,
    BUS_DMASYNC_PREWRITE,
    PAGE_MASK,
    PAGE_SHIFT,
    BusDmaTag,
    MapState,
    bio,
    biodone,
    bus_dma_segment_t,
    bus_dmamap_load_bio,
    bus_dmamap_sync,
    bus_dmamap_unload,
)
from gntdma.xen.busdma import (
    BUS_DMA_XEN_RO,
    xen_dmamap_get_grefs,
)

__all__ = ["xbd_softc_req"]


class _Split:
    """A bio split into children: completes when the last child does."""

    __slots__ = ("error", "parent", "remaining")

    def __init__(self, parent: bio, remaining: int) -> None:
        self.parent = parent
        self.remaining = remaining
        self.error = 0


class xbd_softc_req(xbd_softc_base):
    """The request path of :class:`gntdma.dev.blkfront.xbd_softc`."""

    # -- the block-device entry point -----------------------------------------------------------

    def xbd_strategy(self, bp: bio) -> None:
        """Submit ``bp`` (``d_strategy``); it completes through ``biodone``.

        Errors reported in the bio: ENXIO (not connected, detached), EIO (the
        backend broke the ring, a range past the end, a backend error),
        EINVAL (offset or length not a multiple of the sector size), EROFS (a
        write to a read-only disk), EOPNOTSUPP (flush or delete the backend
        does not offer, or refused).
        """
        self._xbd_lock()  # (its mtx_lock is the site WITNESS reports)
        try:
            self._st_bios += 1
            error = self._xbd_check_bio(bp)
            if error != 0:
                self._xbd_bio_done(bp, error)
                return
            cmd = bp.bio_cmd
            if cmd == BIO_READ or cmd == BIO_WRITE:
                if bp.bio_bcount == 0:
                    self._xbd_bio_done(bp, 0)
                    return
                # _xbd_bio_pages
                first = (bp.bio_ma_offset if bp.bio_flags & BIO_UNMAPPED else bp.bio_data) \
                    & PAGE_MASK
                if (first + bp.bio_bcount + PAGE_MASK) >> PAGE_SHIFT \
                        > self.xbd_max_request_segments:
                    self.xbd_bioq.extend(self._xbd_split(bp))
                else:
                    self.xbd_bioq.append(bp)
            elif cmd == BIO_DELETE:
                pieces = xbd_discard_pieces(
                    bp.bio_offset // BLKIF_SECTOR_SIZE, bp.bio_bcount // BLKIF_SECTOR_SIZE,
                    self.xbd_discard_max_sectors, self.xbd_discard_granularity,
                    self.xbd_discard_alignment)
                if not pieces:
                    self._xbd_bio_done(bp, errno.EOPNOTSUPP if bp.bio_bcount > 0 else 0)
                    return
                if len(pieces) > 1:
                    self.xbd_bioq.extend(self._xbd_split_at(
                        bp, [(s * BLKIF_SECTOR_SIZE - bp.bio_offset, n * BLKIF_SECTOR_SIZE)
                             for s, n in pieces]))
                else:
                    self.xbd_bioq.append(bp)
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
        if cmd != BIO_READ and cmd != BIO_WRITE and cmd != BIO_DELETE:
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

    @staticmethod
    def _xbd_bio_first(bp: bio) -> int:
        """The offset of the bio's data in its first page."""
        if bp.bio_flags & BIO_UNMAPPED:
            return bp.bio_ma_offset & PAGE_MASK
        return bp.bio_data & PAGE_MASK

    def _xbd_bio_pages(self, bp: bio) -> int:
        """Pages the bio's data touches: the segments its request needs."""
        return (self._xbd_bio_first(bp) + bp.bio_bcount + PAGE_MASK) >> PAGE_SHIFT

    def _xbd_split(self, bp: bio) -> list[bio]:
        """Children of at most one request each, completing ``bp`` when all are done.

        A request holds ``xbd_max_request_segments`` segments of at most a page
        each, never crossing a page (the data tag's maxsegsz and boundary), so a
        child ends where it would touch one page more, rounded down to the
        sector size: a page-aligned bio of that many pages is one request, as
        in Linux xen-blkfront (``blkif_set_queue_limits``: ``max_hw_sectors``
        is ``segments * XEN_PAGE_SIZE / 512``, ``max_segments`` the
        segments, each at most an aligned page), where FreeBSD's
        ``XBD_SEGS_TO_SIZE`` keeps one page back for any alignment.
        """
        segs = self.xbd_max_request_segments
        ss = self.xbd_sector_size
        first = self._xbd_bio_first(bp)
        pieces: list[tuple[int, int]] = []
        off = 0
        while off < bp.bio_bcount:
            room = (segs << PAGE_SHIFT) - ((first + off) & PAGE_MASK)
            ln = bp.bio_bcount - off
            if ln > room:
                ln = room - room % ss
            pieces.append((off, ln))
            off += ln
        return self._xbd_split_at(bp, pieces)

    def _xbd_split_at(self, bp: bio, pieces: list[tuple[int, int]]) -> list[bio]:
        """Children for ``pieces`` ((offset in ``bp``, length) each), completing ``bp``."""
        split = _Split(bp, len(pieces))
        children: list[bio] = []
        for i, (off, ln) in enumerate(pieces):
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
        ready, bioq = self.xbd_cm_ready, self.xbd_bioq
        # Nothing ready and nothing queued: xbd_bio_command would find no bio. RING_FULL inline.
        while (ready or bioq) and (ring.req_prod_pvt - ring.rsp_cons) & 0xFFFFFFFF != ring.nr_ents:
            if self.xbd_qfrozen_cnt != 0:
                break
            cm: xbd_command | None
            if ready:  # _xbd_dequeue
                cm = ready.popleft()
                cm.cm_flags = (cm.cm_flags & ~XBDCF_Q_MASK) | XBD_Q_NONE
            else:
                cm = self.xbd_bio_command()
                if cm is None:
                    break
            if cm.cm_flags & XBDCF_Q_FREEZE:
                # Freeze the queue until this command completes.
                self.xbd_cm_freeze(cm, XBDCF_Q_FREEZE)
            self.xbd_queue_request(cm)
            queued += 1
        if queued != 0 and ring.push_requests():  # xbd_flush_requests
            self.xbd_hc.evtchn_send(self.xbd_evtchn)

    def xbd_bio_command(self) -> xbd_command | None:
        """A command for the next queued bio (None: no bio, or must wait)."""
        bioq = self.xbd_bioq
        while bioq and ((bioq[0].bio_cmd == BIO_FLUSH
                         and self.xbd_flags & (XBDF_FLUSH | XBDF_BARRIER) == 0)
                        or (bioq[0].bio_cmd == BIO_DELETE
                            and self.xbd_flags & XBDF_DISCARD == 0)):
            # The backend answered EOPNOTSUPP to one since this was queued.
            self._xbd_bio_done(bioq.popleft(), errno.EOPNOTSUPP)
        if not bioq:
            return None
        free = self.xbd_cm_free
        if not free:
            self.xbd_freeze(XBDF_CM_SHORTAGE)
            return None
        cm = free.popleft()  # _xbd_dequeue
        cm.cm_flags = (cm.cm_flags & ~XBDCF_Q_MASK) | XBD_Q_NONE
        bp = bioq.popleft()
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
        if cm.cm_operation not in XBD_RW_OPS:
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
            if self.xbd_latency:
                self._st_t0[cm.cm_id] = current_scheduler().now()
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
        is_async = cm.cm_flags & XBDCF_ASYNC_MAPPING != 0
        cm.cm_flags &= ~XBDCF_ASYNC_MAPPING
        if is_async and self.xbd_latency:
            self._xbd_lat(self.xbd_lat_deferred, cm.cm_id)
        ring = self.xbd_ring
        bp = cm.cm_bp
        assert bp is not None
        if error == 0 and (ring is None or self.xbd_flags & (XBDF_DETACHING | XBDF_BROKEN)):
            # The device went away while the load waited.
            if cm.cm_map is not None and cm.cm_operation in XBD_RW_OPS:
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
        abi = self.xbd_abi
        op = cm.cm_operation
        raw: bytes
        if op == BLKIF_OP_DISCARD:
            raw = abi.pack_request(BlkifRequestDiscard(handle=self.xbd_vdev, id=cm.cm_id,
                                                       sector_number=cm.cm_sector_number,
                                                       nr_sectors=cm.cm_nr_sectors))
            self._st_discards += 1
        elif op not in XBD_RW_OPS:
            raw = blkif_pack_rw(abi, op, 0, self.xbd_vdev, cm.cm_id, cm.cm_sector_number, ())
            self._st_flushes += 1
        else:
            dmat = self.xbd_io_dmat
            assert cm.cm_map is not None and dmat is not None
            refs = xen_dmamap_get_grefs(cm.cm_map)
            sg = xbd_mksegs(segs, nsegs, refs)
            if nsegs <= BLKIF_MAX_SEGMENTS_PER_REQUEST:
                raw = blkif_pack_rw(abi, op, nsegs, self.xbd_vdev, cm.cm_id,
                                    cm.cm_sector_number, sg)
                self._st_direct += 1
            else:
                npages = blkif_indirect_pages(nsegs)
                m = cm.cm_indirectionmap
                assert m is not None and self.xbd_indirect_dmat is not None
                self.xbd_kern.kva_write(cm.cm_indirectionpages, blkif_pack_segs(sg))
                bus_dmamap_sync(self.xbd_indirect_dmat, m, BUS_DMASYNC_PREWRITE)
                raw = blkif_pack_indirect(abi, op, nsegs, cm.cm_id, cm.cm_sector_number,
                                          self.xbd_vdev, self._xbd_indirect_grefs(cm, npages))
                cm.cm_indirect = True
                self._st_indirect += 1
            sync = BUS_DMASYNC_PREREAD if op == BLKIF_OP_READ else BUS_DMASYNC_PREWRITE
            bus_dmamap_sync(dmat, cm.cm_map, sync)
        cm.cm_nseg = nsegs
        ring.put_request(raw)
        self._st_requests += 1
        occ = (ring.req_prod_pvt - ring.rsp_cons) & 0xFFFFFFFF
        if occ > self._st_occupancy_peak:
            self._st_occupancy_peak = occ
        if self.xbd_latency:
            self._st_t0[cm.cm_id] = current_scheduler().now()
        # _xbd_enqueue_cm(cm, XBD_Q_BUSY)
        if cm.cm_flags & XBDCF_Q_MASK != XBD_Q_NONE:
            raise KernelPanic(f"{self.name}: {cm!r} enqueued on {XBD_Q_BUSY} while on a queue")
        cm.cm_flags = (cm.cm_flags & ~XBDCF_Q_MASK) | XBD_Q_BUSY
        self.xbd_cm_busy[cm.cm_id] = cm
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
        cid, rop, status = blkif_unpack_response(self.xbd_abi, raw)
        cm = self.xbd_cm_busy.get(cid) if 0 <= cid < len(self.xbd_shadow) else None
        if cm is None:
            self._xbd_broken(f"response id {cid} is not a request in flight")
            return False
        if rop != cm.cm_operation and not (cm.cm_indirect and rop == BLKIF_OP_INDIRECT):
            self._xbd_broken(f"response id {cid} has operation {rop}, "
                             f"the request {cm.cm_operation}")
            return False
        # _xbd_remove_busy
        if cm.cm_flags & XBDCF_Q_MASK != XBD_Q_BUSY or self.xbd_cm_busy.pop(cid, None) is not cm:
            raise KernelPanic(f"{self.name}: {cm!r} is not busy")
        cm.cm_flags = (cm.cm_flags & ~XBDCF_Q_MASK) | XBD_Q_NONE
        self._xbd_cm_unload(cm)
        # Release any hold this command has on future command dispatch.
        if cm.cm_flags & XBDCF_FROZEN:
            self.xbd_cm_thaw(cm)
        cm.cm_status = status
        self.xbd_bio_complete(cm)
        return True

    def _xbd_cm_unload(self, cm: xbd_command) -> None:
        """POST syncs and unload: ends grant access and frees the data references."""
        op = cm.cm_operation
        m = cm.cm_map
        if (op == BLKIF_OP_READ or op == BLKIF_OP_WRITE) and m is not None:
            dmat = self.xbd_io_dmat
            assert dmat is not None
            if m.state is MapState.LOADED:
                bus_dmamap_sync(dmat, m, BUS_DMASYNC_POSTREAD if op == BLKIF_OP_READ
                                else BUS_DMASYNC_POSTWRITE)
            bus_dmamap_unload(dmat, m)
        if cm.cm_indirect and cm.cm_indirectionmap is not None:
            assert self.xbd_indirect_dmat is not None
            bus_dmamap_sync(self.xbd_indirect_dmat, cm.cm_indirectionmap,
                            BUS_DMASYNC_POSTWRITE)

    def xbd_bio_complete(self, cm: xbd_command) -> None:
        bp = cm.cm_bp
        assert bp is not None
        if self.xbd_latency:
            self._xbd_lat(self.xbd_lat_request, cm.cm_id)
        status = cm.cm_status
        if status == BLKIF_RSP_OKAY:
            error = 0
            if cm.cm_operation == BLKIF_OP_READ:
                self._st_bytes_read += cm.cm_bytes
            elif cm.cm_operation == BLKIF_OP_WRITE:
                self._st_bytes_written += cm.cm_bytes
        elif status == BLKIF_RSP_EOPNOTSUPP:
            # Linux xen-blkfront (blkif_interrupt): the backend no longer offers
            # the operation; nothing of the kind is sent again. The bio gets
            # EOPNOTSUPP, as every later flush or delete does at submission.
            error = errno.EOPNOTSUPP
            op = cm.cm_operation
            if op == BLKIF_OP_FLUSH_DISKCACHE or op == BLKIF_OP_WRITE_BARRIER:
                self.xbd_flags &= ~(XBDF_FLUSH | XBDF_BARRIER)
            elif op == BLKIF_OP_DISCARD:
                self.xbd_flags &= ~XBDF_DISCARD
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
