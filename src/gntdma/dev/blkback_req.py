"""blkback's request step: a raw ring slot in, a validated request or a status out.

Sans-IO: nothing here touches a grant, the ring, a lock or the disk. The
interrupt handler copies a slot out of the shared page (``RING_COPY_REQUEST``)
and hands the bytes to :func:`blkback_check_request` with the device's
:class:`BlkbackLimits`; what comes back is either a :class:`BlkbackReq` for
the workers or the status to answer at once. :func:`blkback_check_segs`
checks the segment descriptors of a request again once a worker has copied
them out of the indirect pages (:func:`blkback_unpack_segs`).

Validation (the frontend is never trusted; Linux ``xen-blkback`` behaviour,
``dispatch_rw_block_io`` and ``dispatch_discard_io`` in
``drivers/block/xen-blkback/blkback.c``):

- unknown operations, ``BLKIF_OP_RESERVED_1``, ``BLKIF_OP_WRITE_BARRIER`` (no
  ``feature-barrier``), ``BLKIF_OP_DISCARD`` when discard is off,
  ``BLKIF_OP_INDIRECT`` when indirect is off: ``BLKIF_RSP_EOPNOTSUPP``;
- ``BLKIF_DISCARD_SECURE`` is ignored (we publish ``discard-secure`` 0; blkif.h
  says the flag is then ignored, and Linux issues a plain discard);
- ``nr_segments`` 0 (except for a flush) or over 11 in a direct request, 0 or
  over the advertised maximum in an indirect one, an ``indirect_op`` that is
  neither read nor write: ``BLKIF_RSP_ERROR``;
- a segment with ``last_sect < first_sect`` or ``last_sect > 7``, a transfer
  or discard that ends past the last sector, a write or discard to a
  read-only disk: ``BLKIF_RSP_ERROR``.

These checks are blkback's own: they hold whatever the backing store would
accept.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from gntdma.abi.blkif import (
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    BLKIF_SECTORS_PER_PAGE,
    BlkifAbi,
    BlkifOp,
    BlkifRequestDiscard,
    BlkifRequestSegment,
    blkif_indirect_pages,
)
from gntdma.abi.blkif_hot import blkif_unpack_indirect, blkif_unpack_rw, blkif_unpack_segs

__all__ = [
    "BLKBACK_OP_NAMES",
    "BLKBACK_SEG_SIZE",
    "BlkbackLimits",
    "BlkbackReq",
    "BlkbackSeg",
    "blkback_check_request",
    "blkback_check_segs",
    "blkback_unpack_segs",
]

#: Bytes of one segment descriptor in an indirect page.
BLKBACK_SEG_SIZE: Final = BlkifRequestSegment.STRUCT.size

#: A segment as the workers use it: (gref, first_sect, last_sect).
BlkbackSeg = tuple[int, int, int]

#: Statistics names of the ring ``operation`` values ("unknown" for the rest).
BLKBACK_OP_NAMES: Final = {int(op): op.name.lower() for op in BlkifOp}


@dataclass(frozen=True, slots=True)
class BlkbackLimits:
    """What one device accepts: the facts the checks need, and nothing else."""

    nr_sectors: int  #: 512-byte sectors on the disk
    readonly: bool
    feature_discard: bool
    max_indirect_segments: int  #: 0: no indirect requests


@dataclass(slots=True)
class BlkbackReq:
    """A request that passed the checks, as the workers see it."""

    id: int
    operation: int  #: echoed in the response
    op: int  #: READ, WRITE, FLUSH_DISKCACHE (no data) or DISCARD
    sector_number: int
    segs: list[BlkbackSeg]  #: data segments (direct), or filled from the indirect pages
    indirect_grefs: tuple[int, ...] = ()
    nr_segments: int = 0  #: of an indirect request
    nr_sectors: int = 0  #: of a discard
    flush: bool = False  #: fdatasync after the data
    nbytes: int = 0  #: moved, for statistics


def blkback_check_request(abi: BlkifAbi, raw: bytes, lim: BlkbackLimits
                          ) -> tuple[int, int, int, BlkbackReq | None]:
    """Decode and check one copied-out slot.

    Returns ``(id, operation, status, work)``: ``operation`` is what the
    response echoes (the ``indirect_op`` of an indirect request); ``work`` is
    the request for the workers, or None when ``status`` is the answer.
    """
    op = raw[0]
    if op == BLKIF_OP_DISCARD:
        req = abi.unpack_request(raw)
        assert isinstance(req, BlkifRequestDiscard)
        status, work = _check_discard(req, lim)
        return req.id, req.operation, status, work
    if op == BLKIF_OP_INDIRECT:
        ireq = blkif_unpack_indirect(abi, raw)
        status, work = _check_indirect(ireq, lim)
        return ireq[3], ireq[1], status, work
    # Any other operation decodes as a read/write request (one struct, no objects);
    # its checks written out here (one call a request fewer).
    operation, nr_segments, _handle, id_, sector_number, segs = blkif_unpack_rw(abi, raw)
    if operation == BLKIF_OP_READ or operation == BLKIF_OP_WRITE:
        if nr_segments == 0 or nr_segments > BLKIF_MAX_SEGMENTS_PER_REQUEST:
            return id_, operation, BLKIF_RSP_ERROR, None
        op = operation
        flush = False
    elif operation == BLKIF_OP_FLUSH_DISKCACHE:
        if nr_segments > BLKIF_MAX_SEGMENTS_PER_REQUEST:
            return id_, operation, BLKIF_RSP_ERROR, None
        op = BLKIF_OP_WRITE if nr_segments > 0 else BLKIF_OP_FLUSH_DISKCACHE
        flush = True
    else:  # WRITE_BARRIER (not advertised), RESERVED_1, anything else
        return id_, operation, BLKIF_RSP_EOPNOTSUPP, None
    if op != BLKIF_OP_READ and lim.readonly:  # a flush too (xen_vbd_translate: not a read)
        return id_, operation, BLKIF_RSP_ERROR, None
    if blkback_check_segs(segs, sector_number, lim.nr_sectors) != 0:
        return id_, operation, BLKIF_RSP_ERROR, None
    return id_, operation, BLKIF_RSP_OKAY, BlkbackReq(id_, operation, op, sector_number,
                                                      segs, (), 0, 0, flush)


def _check_indirect(req: tuple[int, int, int, int, int, int, tuple[int, ...]],
                    lim: BlkbackLimits) -> tuple[int, BlkbackReq | None]:
    """``req``: :func:`~gntdma.abi.blkif_hot.blkif_unpack_indirect`'s values."""
    _op, iop, nr_segments, id_, sector_number, _handle, indirect_grefs = req
    if lim.max_indirect_segments == 0:
        return BLKIF_RSP_EOPNOTSUPP, None
    if iop != BLKIF_OP_READ and iop != BLKIF_OP_WRITE:
        return BLKIF_RSP_ERROR, None
    if nr_segments == 0 or nr_segments > lim.max_indirect_segments:
        return BLKIF_RSP_ERROR, None
    if iop == BLKIF_OP_WRITE and lim.readonly:
        return BLKIF_RSP_ERROR, None
    if len(indirect_grefs) != blkif_indirect_pages(nr_segments):
        return BLKIF_RSP_ERROR, None  # cannot happen with the limits above
    return BLKIF_RSP_OKAY, BlkbackReq(id_, iop, iop, sector_number, [],
                                      indirect_grefs=indirect_grefs,
                                      nr_segments=nr_segments)


def _check_discard(req: BlkifRequestDiscard, lim: BlkbackLimits
                   ) -> tuple[int, BlkbackReq | None]:
    if not lim.feature_discard:
        return BLKIF_RSP_EOPNOTSUPP, None
    # req.flag: BLKIF_DISCARD_SECURE is ignored with discard-secure 0 (blkif.h).
    if lim.readonly:
        return BLKIF_RSP_ERROR, None
    if req.sector_number + req.nr_sectors > lim.nr_sectors:
        return BLKIF_RSP_ERROR, None
    if req.nr_sectors == 0:
        return BLKIF_RSP_OKAY, None
    return BLKIF_RSP_OKAY, BlkbackReq(req.id, req.operation, BLKIF_OP_DISCARD,
                                      req.sector_number, [], nr_sectors=req.nr_sectors)


def blkback_check_segs(segs: Sequence[BlkbackSeg], sector_number: int, nr_sectors: int) -> int:
    """0 if every segment is well formed and the transfer fits the disk, else EINVAL."""
    total = 0
    for _gref, first, last in segs:
        if last >= BLKIF_SECTORS_PER_PAGE or last < first:
            return errno.EINVAL
        total += last - first + 1
    if total > 0 and sector_number + total > nr_sectors:
        return errno.EINVAL
    return 0


def blkback_unpack_segs(raw: bytes) -> list[BlkbackSeg]:
    """The segment descriptors copied out of indirect pages, in order."""
    return blkif_unpack_segs(raw)
