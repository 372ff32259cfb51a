"""blkfront: constants, command flags and queues, negotiation values.

The pieces of FreeBSD's ``block.h`` that :mod:`gntdma.dev.blkfront` builds on:
the softc flags (``XBDF_*``), the command flags and queues (``XBDCF_*``,
``XBD_Q_*``), the size arithmetic (``XBD_SEGS_TO_SIZE``...), what the backend
tells the frontend (:class:`XbdBackendFeatures`, parsed from xenstore strings)
and the driver's counters (:class:`XbdStatistics`). ``xbd_mksegarray`` turns
bus_dma segments and their grant references into ``blkif_request_segment``
entries.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from itertools import repeat
from typing import Final, final

from gntdma.abi.blkif import (
    BLKIF_MAX_INDIRECT_SEGMENTS,
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_SECTOR_SIZE,
    BLKIF_SECTORS_PER_PAGE,
    BlkifKey,
    BlkifRequestSegment,
)
from gntdma.sched import KernelPanic
from gntdma.sys import MAXPHYS, PAGE_MASK, PAGE_SIZE, bus_dma_segment_t

__all__ = [
    "XBDCF_ASYNC_MAPPING",
    "XBDCF_FROZEN",
    "XBDCF_INITIALIZER",
    "XBDCF_Q_FREEZE",
    "XBDCF_Q_MASK",
    "XBDF_BARRIER",
    "XBDF_BROKEN",
    "XBDF_CM_SHORTAGE",
    "XBDF_DETACHING",
    "XBDF_DISCARD",
    "XBDF_FLUSH",
    "XBDF_FREED",
    "XBDF_NONE",
    "XBDF_READONLY",
    "XBDF_WAIT_IDLE",
    "XBD_DEFAULT_MAX_INDIRECT_SEGMENTS",
    "XBD_DEFAULT_RING_PAGE_ORDER",
    "XBD_MAX_INDIRECT_SEGMENTS",
    "XBD_MAX_RING_PAGE_ORDER",
    "XBD_MAX_RING_PAGES",
    "XBD_Q_BUSY",
    "XBD_Q_FREE",
    "XBD_Q_NONE",
    "XBD_Q_READY",
    "XBD_STATE_CONNECTED",
    "XBD_STATE_DISCONNECTED",
    "XbdBackendFeatures",
    "XbdStatistics",
    "XBD_INDIRECT_SEGS_TO_PAGES",
    "XBD_SEGS_TO_SIZE",
    "XBD_SIZE_TO_SEGS",
    "xbd_discard_limits",
    "xbd_discard_pieces",
    "xbd_mksegarray",
    "xbd_mksegs",
    "xbd_size_requests",
]

_SECTOR_SHIFT: Final = BLKIF_SECTOR_SIZE.bit_length() - 1
_SECTOR_MASK: Final = BLKIF_SECTOR_SIZE - 1
#: The last sector of a page.
_LAST_SECT: Final = (PAGE_SIZE >> _SECTOR_SHIFT) - 1

# -- softc state and flags (block.h) ---------------------------------------------------

XBD_STATE_DISCONNECTED: Final = 0  #: no I/O: before xbd_connect, or after xbd_closing
XBD_STATE_CONNECTED: Final = 1  #: serving bios

XBDF_NONE: Final = 0
XBDF_BARRIER: Final = 1 << 1  #: backend supports BLKIF_OP_WRITE_BARRIER
XBDF_FLUSH: Final = 1 << 2  #: backend supports BLKIF_OP_FLUSH_DISKCACHE
XBDF_CM_SHORTAGE: Final = 1 << 4  #: frozen: no free command
XBDF_WAIT_IDLE: Final = 1 << 6  #: frozen: an ordered request waits for the ring to drain
XBDF_DISCARD: Final = 1 << 8  #: backend supports BLKIF_OP_DISCARD
XBDF_READONLY: Final = 1 << 9  #: the backend's info says VDISK_READONLY
XBDF_DETACHING: Final = 1 << 10  #: xbd_closing ran: new bios get ENXIO
XBDF_BROKEN: Final = 1 << 11  #: the backend broke the ring protocol
XBDF_FREED: Final = 1 << 12  #: xbd_free ran: every resource is gone

# -- command flags and queues ------------------------------------------------------------

XBDCF_Q_MASK: Final = 0xFF
#: This command holds one count of xbd_qfrozen_cnt.
XBDCF_FROZEN: Final = 1 << 8
#: Its bus_dma load returned EINPROGRESS: the queue is frozen until the callback.
XBDCF_ASYNC_MAPPING: Final = 1 << 10
#: Freeze the queue from dispatch to completion (single-step an ordered request).
XBDCF_Q_FREEZE: Final = 1 << 11

XBD_Q_FREE: Final = 0
XBD_Q_READY: Final = 1  #: built, waiting for dispatch (an ordered request waiting for idle)
XBD_Q_BUSY: Final = 2  #: on the ring, owned by the backend
XBD_Q_NONE: Final = XBDCF_Q_MASK  #: in no queue (being built or mapping)
XBDCF_INITIALIZER: Final = XBD_Q_NONE

# -- sizes ----------------------------------------------------------------------------------

#: FreeBSD's XBD_MAX_RING_PAGES: 32 pages, order 5.
XBD_MAX_RING_PAGES: Final = 32
XBD_MAX_RING_PAGE_ORDER: Final = 5
#: Ring order asked for when the backend allows it (4 pages, 128 requests).
XBD_DEFAULT_RING_PAGE_ORDER: Final = 2
#: Segments of the largest indirect request (8 pages of 512).
XBD_MAX_INDIRECT_SEGMENTS: Final = BLKIF_MAX_INDIRECT_SEGMENTS


def XBD_SEGS_TO_SIZE(segs: int) -> int:
    """Bytes a request of ``segs`` segments always fits: one page less (any alignment)."""
    return (segs - 1) * PAGE_SIZE


def XBD_SIZE_TO_SEGS(size: int) -> int:
    return size // PAGE_SIZE + 1


def XBD_INDIRECT_SEGS_TO_PAGES(segs: int) -> int:
    per_page = PAGE_SIZE // BlkifRequestSegment.STRUCT.size
    return (segs + per_page - 1) // per_page


#: Segments per request the frontend asks for by default: a MAXPHYS transfer.
XBD_DEFAULT_MAX_INDIRECT_SEGMENTS: Final = XBD_SIZE_TO_SEGS(MAXPHYS)


def xbd_size_requests(wanted: int, ncmds: int, budget: int) -> int:
    """Segments per request for a disk allowed ``budget`` grant references.

    The budget pays for what the disk holds for life beyond its ring (one set of
    indirect pages per command) and for one request of the largest size, so that
    a request never needs more references than can ever be free (DESIGN section
    7). Indirect requests are kept while they fit, with as many segments as
    fit; else direct requests of at most 11 segments (fewer if the budget is
    smaller). Less than 2 means not even a one-page request fits.
    """
    segs = wanted
    while segs > BLKIF_MAX_SEGMENTS_PER_REQUEST:
        held = ncmds * XBD_INDIRECT_SEGS_TO_PAGES(segs)
        if held + segs <= budget:
            return segs
        segs = min(segs - 1, budget - held)
    return max(0, min(wanted, BLKIF_MAX_SEGMENTS_PER_REQUEST, budget))


# -- what the backend says ---------------------------------------------------------------


@final
@dataclass(frozen=True, slots=True)
class XbdBackendFeatures:
    """The backend's xenstore values the frontend uses (blkif.h section "backend").

    ``sectors`` counts 512-byte units: blkfront does not advertise
    ``feature-large-sector-size``, so every sector quantity on the wire is in
    512-byte units (blkif.h, ``sector-size``), and a larger ``sector_size`` is
    the disk's logical block size only, as Linux xen-blkfront takes it.
    ``max_indirect_segments`` 0 means no indirect requests;
    ``discard_granularity`` and ``discard_alignment`` are bytes, 0 when absent;
    ``max_ring_page_order`` is read before the ring is allocated (InitWait),
    the rest at Connected.
    """

    sectors: int = 0
    sector_size: int = BLKIF_SECTOR_SIZE
    info: int = 0
    feature_flush_cache: bool = False
    feature_barrier: bool = False
    feature_discard: bool = False
    discard_granularity: int = 0
    discard_alignment: int = 0
    max_indirect_segments: int = 0
    max_ring_page_order: int = 0

    @property
    def media_size(self) -> int:
        """Bytes on the disk: ``sectors`` are 512-byte units (see the class)."""
        return self.sectors * BLKIF_SECTOR_SIZE

    @staticmethod
    def max_ring_page_order_from_xenstore(read: Callable[[str], str | None]) -> int:
        """The ring order the backend allows, read at InitWait (before ``sectors`` exists).

        ``max-ring-page-order``, else the deprecated ``max-ring-pages``; 0 when
        absent or not a decimal number; at most ``XBD_MAX_RING_PAGE_ORDER``.
        """
        for key, pages in ((BlkifKey.MAX_RING_PAGE_ORDER, False),
                           (BlkifKey.MAX_RING_PAGES, True)):
            raw = read(key.value)
            if raw is not None and raw.strip().isdigit():
                v = int(raw.strip())
                order = v.bit_length() - 1 if pages and v > 0 else (0 if pages else v)
                return min(order, XBD_MAX_RING_PAGE_ORDER)
        return 0

    @staticmethod
    def from_xenstore(read: Callable[[str], str | None]
                      ) -> tuple[int, XbdBackendFeatures | None]:
        """Parse the backend's keys; ``read(key)`` returns the value or None if absent.

        Returns (0, features), (ENOENT, None) if ``sectors`` is missing, or
        (EINVAL, None) for a value that is not a decimal number or a sector
        size that is not a power of two of at least 512 (the backend is not
        trusted: nothing it writes is used unchecked).
        """
        def num(key: str, default: int) -> int | None:
            raw = read(key)
            if raw is None or raw.strip() == "":
                return default
            raw = raw.strip()
            if not raw.isdigit():
                return None
            return int(raw)

        vals: dict[str, int] = {}
        for key, default in ((BlkifKey.SECTORS, -1), (BlkifKey.SECTOR_SIZE, BLKIF_SECTOR_SIZE),
                             (BlkifKey.INFO, 0), (BlkifKey.FEATURE_FLUSH_CACHE, 0),
                             (BlkifKey.FEATURE_BARRIER, 0), (BlkifKey.FEATURE_DISCARD, 0),
                             (BlkifKey.DISCARD_GRANULARITY, 0),
                             (BlkifKey.DISCARD_ALIGNMENT, 0),
                             (BlkifKey.FEATURE_MAX_INDIRECT_SEGMENTS, 0),
                             (BlkifKey.MAX_RING_PAGE_ORDER, -1), (BlkifKey.MAX_RING_PAGES, 0)):
            v = num(key.value, default)
            if v is None:
                return errno.EINVAL, None
            vals[key.value] = v
        sectors = vals[BlkifKey.SECTORS.value]
        if sectors < 0:
            return errno.ENOENT, None
        ssize = vals[BlkifKey.SECTOR_SIZE.value]
        if ssize < BLKIF_SECTOR_SIZE or ssize & (ssize - 1) != 0:
            return errno.EINVAL, None
        order = vals[BlkifKey.MAX_RING_PAGE_ORDER.value]
        if order < 0:  # the deprecated max-ring-pages, if any
            pages = vals[BlkifKey.MAX_RING_PAGES.value]
            order = pages.bit_length() - 1 if pages > 0 else 0
        return 0, XbdBackendFeatures(
            sectors=sectors,
            sector_size=ssize,
            info=vals[BlkifKey.INFO.value],
            feature_flush_cache=vals[BlkifKey.FEATURE_FLUSH_CACHE.value] != 0,
            feature_barrier=vals[BlkifKey.FEATURE_BARRIER.value] != 0,
            feature_discard=vals[BlkifKey.FEATURE_DISCARD.value] != 0,
            discard_granularity=vals[BlkifKey.DISCARD_GRANULARITY.value],
            discard_alignment=vals[BlkifKey.DISCARD_ALIGNMENT.value],
            max_indirect_segments=vals[BlkifKey.FEATURE_MAX_INDIRECT_SEGMENTS.value],
            max_ring_page_order=min(order, XBD_MAX_RING_PAGE_ORDER),
        )


@final
@dataclass(frozen=True, slots=True)
class XbdStatistics:
    """Counters of one xbd device (since :meth:`xbd_softc.xbd_connect`)."""

    name: str
    state: str  #: "disconnected", "connected", "closing", "broken", "freed"
    bios: int  #: bios submitted to xbd_strategy (a split bio counts once)
    requests: int  #: ring requests issued, every kind
    direct_requests: int  #: reads and writes of at most 11 segments
    indirect_requests: int  #: BLKIF_OP_INDIRECT requests
    flushes: int
    discards: int
    bytes_read: int  #: by requests that completed OK
    bytes_written: int
    errors: int  #: bios completed with an error (backend status, load error, ENXIO...)
    deferred_loads: int  #: bus_dma loads that returned EINPROGRESS (queue frozen)
    in_flight: int  #: commands on the ring
    ring_size: int  #: slots (= commands)
    ring_pages: int
    ring_occupancy: int  #: requests produced and not yet answered
    ring_occupancy_peak: int
    grant_refs_in_use: int  #: ring + indirect pages + loaded data maps
    max_request_segments: int
    max_request_size: int
    protocol_error: str  #: why the backend's ring was declared broken ("" if never)


def xbd_mksegs(segs: list[bus_dma_segment_t], nsegs: int, refs: list[int]) -> list[int]:
    """The ``blkif_request_segment`` of each bus_dma segment, flat: ``gref, first_sect,
    last_sect`` for segment 0, then 1...; ``refs[i]`` grants segment ``i``.

    ``first_sect`` is the segment's 512-byte offset in its page, ``last_sect``
    the last sector it covers (inclusive). The data tag guarantees what is
    asserted: 512-aligned, never crossing a page. The flat form is what
    :mod:`gntdma.abi.blkif_hot` packs, with no object per segment.
    """
    if len(refs) < nsegs:
        raise KernelPanic(f"xbd_mksegarray: {nsegs} segments but {len(refs)} grant refs")
    if nsegs == 1:  # the loop below for one segment
        addr, ln = segs[0]
        off = addr & PAGE_MASK
        if off & _SECTOR_MASK == 0 and ln & _SECTOR_MASK == 0 and 0 < ln <= PAGE_SIZE - off:
            fsect = off >> _SECTOR_SHIFT
            return [refs[0], fsect, fsect + (ln >> _SECTOR_SHIFT) - 1]
    elif nsegs > 1:
        addrs, lens = zip(*segs[:nsegs], strict=True)
        if lens.count(PAGE_SIZE) == nsegs and not any([a & PAGE_MASK for a in addrs]):
            # Every segment a whole page (the loop's checks all pass): sectors 0 to
            # the last of the page, by slices.
            flat = [0] * (3 * nsegs)
            flat[0::3] = refs[:nsegs]
            flat[2::3] = repeat(_LAST_SECT, nsegs)
            return flat
    out: list[int] = []
    append = out.append
    for i in range(nsegs):
        s = segs[i]
        off = s.ds_addr & PAGE_MASK
        ln = s.ds_len
        if off & _SECTOR_MASK or ln & _SECTOR_MASK or ln <= 0:
            raise KernelPanic(f"xbd_mksegarray: segment {i} {s} is not sector aligned")
        fsect = off >> _SECTOR_SHIFT
        lsect = fsect + (ln >> _SECTOR_SHIFT) - 1
        if lsect >= BLKIF_SECTORS_PER_PAGE:
            raise KernelPanic(f"xbd_mksegarray: segment {i} {s} crosses a page")
        append(refs[i])
        append(fsect)
        append(lsect)
    return out


def xbd_mksegarray(segs: list[bus_dma_segment_t], nsegs: int,
                   refs: list[int]) -> list[BlkifRequestSegment]:
    """One ``blkif_request_segment`` per bus_dma segment (:func:`xbd_mksegs` as objects)."""
    flat = xbd_mksegs(segs, nsegs, refs)
    return [BlkifRequestSegment(gref=flat[i], first_sect=flat[i + 1], last_sect=flat[i + 2])
            for i in range(0, len(flat), 3)]


# -- discard limits -----------------------------------------------------------------------------


def xbd_discard_limits(features: XbdBackendFeatures) -> tuple[int, int, int]:
    """(max_sectors, granularity, alignment) of discards, in 512-byte sectors.

    As Linux sets them (xen-blkfront ``blkif_set_queue_limits``, then the block
    layer's ``__blkdev_issue_discard``): the granularity is
    ``discard-granularity`` (the sector size when absent, blkif.h note 4), at
    least one sector; the alignment is ``discard-alignment`` modulo the
    granularity; the largest discard is the capacity rounded down to the
    granularity (0: the disk is smaller than one granule).
    """
    gran_bytes = features.discard_granularity
    if gran_bytes == 0:
        gran_bytes = features.sector_size
    gran = max(gran_bytes // BLKIF_SECTOR_SIZE, 1)
    align = (features.discard_alignment // BLKIF_SECTOR_SIZE) % gran
    max_sectors = features.sectors - features.sectors % gran
    return max_sectors, gran, align


def xbd_discard_pieces(sector: int, nr_sectors: int, max_sectors: int, gran: int,
                       align: int) -> list[tuple[int, int]]:
    """(sector, nr_sectors) of each discard request for one delete, in order.

    Each is at most ``max_sectors``; where a delete is split, the split point
    is moved back to the last sector that is ``align`` modulo ``gran`` (Linux
    ``__blkdev_issue_discard``). Empty when ``max_sectors`` is 0 (Linux
    refuses such a discard with ``EOPNOTSUPP``).
    """
    if max_sectors <= 0:
        return []
    pieces: list[tuple[int, int]] = []
    while nr_sectors > 0:
        req = min(nr_sectors, max_sectors)
        end = sector + req
        if req < nr_sectors and end % gran != align:
            end = (end - align) // gran * gran + align
            req = end - sector
        pieces.append((sector, req))
        sector += req
        nr_sectors -= req
    return pieces
