"""blkif on the hot path: a request's slot and segments packed and unpacked as flat values.

The wire classes of :mod:`gntdma.abi.blkif` build one frozen object per
request and one per segment; per slot and per segment that is most of what a
request costs. These functions pack and unpack the same bytes with one
precompiled :class:`struct.Struct` per layout, derived at import from the
classes' own ``LAYOUT`` (the layout is still written once, there), with the
segment array spelled out: a request's segments are a flat sequence
``gref0, first_sect0, last_sect0, gref1, ...``.

The rules of the wire classes hold: packing zero-fills unused segment and
``indirect_grefs`` slots and raises :class:`ValueError` for a value that does
not fit (our bug); unpacking returns the counts as written, unvalidated, and
only the segments (``min(nr_segments, 11)``) and references
(``min(8, ceil(nr_segments / 512))``) those counts cover.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence
from typing import Final

from gntdma.abi._wire import Buffer
from gntdma.abi.blkif import (
    BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_OP_INDIRECT,
    BlkifAbi,
    BlkifRequest,
    BlkifRequest32,
    BlkifRequestIndirect,
    BlkifRequestIndirect32,
    BlkifRequestSegment,
    blkif_indirect_pages,
)

__all__ = [
    "BlkifSeg",
    "blkif_pack_indirect",
    "blkif_pack_response",
    "blkif_pack_rw",
    "blkif_pack_segs",
    "blkif_unpack_indirect",
    "blkif_unpack_response",
    "blkif_unpack_rw",
    "blkif_unpack_segs",
]

#: A segment as unpacked: (gref, first_sect, last_sect).
BlkifSeg = tuple[int, int, int]

_SEG_FMT: Final = BlkifRequestSegment.STRUCT.format.lstrip("<")
_SEG_SIZE: Final = BlkifRequestSegment.STRUCT.size
_NSEG: Final = BLKIF_MAX_SEGMENTS_PER_REQUEST
_NGREF: Final = BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST


def _expand(cls: type[BlkifRequest] | type[BlkifRequest32] | type[BlkifRequestIndirect]
            | type[BlkifRequestIndirect32], array: str, elems: str) -> struct.Struct:
    """``cls``'s struct with its byte-array member ``array`` spelled out as ``elems``."""
    fmt = cls.STRUCT.format
    if fmt.count(array) != 1:
        raise AssertionError(f"{cls.__name__}: {array!r} not once in {fmt!r}")
    s = struct.Struct(fmt.replace(array, elems))
    if s.size != cls.STRUCT.size:
        raise AssertionError(f"{cls.__name__}: expanded to {s.size} bytes")
    return s


_SEGS_ARRAY: Final = f"{_NSEG * _SEG_SIZE}s"
_GREFS_ARRAY: Final = f"{_NGREF * 4}s"
#: Request class -> its struct with the 11 segments as values.
_RW: Final[dict[type, struct.Struct]] = {
    cls: _expand(cls, _SEGS_ARRAY, _SEG_FMT * _NSEG) for cls in (BlkifRequest, BlkifRequest32)}
#: Indirect request class -> its struct with the 8 references as values.
_INDIRECT: Final[dict[type, struct.Struct]] = {
    cls: _expand(cls, _GREFS_ARRAY, f"{_NGREF}I")
    for cls in (BlkifRequestIndirect, BlkifRequestIndirect32)}
_ZEROS: Final = (0,) * (3 * _NSEG)
#: Request class -> its struct for each count of segments n (0..11): the n segments
#: as values, the slots after them zero pad bytes (the same bytes as _RW with zeros).
_RW_N: Final[dict[type, tuple[struct.Struct, ...]]] = {
    cls: tuple(_expand(cls, _SEGS_ARRAY,
                       _SEG_FMT * n + (f"{(_NSEG - n) * _SEG_SIZE}x" if n < _NSEG else ""))
               for n in range(_NSEG + 1))
    for cls in (BlkifRequest, BlkifRequest32)}
#: Byte offset of the u8 ``nr_segments`` in both request layouts (after ``operation``).
_NR_SEGMENTS_OFFSET: Final = 1
for _cls, _s in _RW.items():
    if _s.pack(0, 0xA5, 0, 0, 0, *_ZEROS)[_NR_SEGMENTS_OFFSET] != 0xA5:
        raise AssertionError(f"{_cls.__name__}: nr_segments not at byte {_NR_SEGMENTS_OFFSET}")


def blkif_pack_rw(abi: BlkifAbi, operation: int, nr_segments: int, handle: int, id_: int,
                  sector_number: int, segs: Sequence[int]) -> bytes:
    """The slot of a read/write/flush request; ``segs`` flat, at most 11 segments."""
    n = len(segs)
    if n > 3 * _NSEG or n % 3 != 0:
        raise ValueError(f"{abi.request.__name__}: {n / 3:g} segments, at most {_NSEG}")
    try:
        return _RW_N[abi.request][n // 3].pack(operation, nr_segments, handle, id_,
                                               sector_number, *segs)
    except struct.error as e:
        raise ValueError(f"{abi.request.__name__}: {e}") from None


def blkif_unpack_rw(abi: BlkifAbi, buf: Buffer, offset: int = 0
                    ) -> tuple[int, int, int, int, int, list[BlkifSeg]]:
    """(operation, nr_segments, handle, id, sector_number, segments) of a request slot."""
    if type(buf) is bytes:  # a copied-out slot: its nr_segments byte says which struct
        n = buf[offset + _NR_SEGMENTS_OFFSET]
        # the struct of min(n, 11) segments: the whole slot's size, the rest pad bytes
        v = _RW_N[abi.request][n if n < _NSEG else _NSEG].unpack_from(buf, offset)
        if n == 1:
            return v[0], v[1], v[2], v[3], v[4], [v[5:8]]
        flat = v[5:]
    else:
        v = _RW[abi.request].unpack_from(buf, offset)
        n = min(v[1], _NSEG)
        flat = v[5:5 + 3 * n]
    return v[0], v[1], v[2], v[3], v[4], list(zip(flat[0::3], flat[1::3], flat[2::3],
                                                  strict=True))


def blkif_pack_indirect(abi: BlkifAbi, indirect_op: int, nr_segments: int, id_: int,
                        sector_number: int, handle: int, grefs: Sequence[int],
                        operation: int | None = None) -> bytes:
    """The slot of a ``BLKIF_OP_INDIRECT`` request naming at most 8 indirect pages."""
    n = len(grefs)
    if n > _NGREF:
        raise ValueError(f"{abi.indirect.__name__}: {n} indirect pages, at most {_NGREF}")
    op = BLKIF_OP_INDIRECT if operation is None else operation
    try:
        return _INDIRECT[abi.indirect].pack(op, indirect_op, nr_segments, id_, sector_number,
                                            handle, *grefs, *_ZEROS[:_NGREF - n])
    except struct.error as e:
        raise ValueError(f"{abi.indirect.__name__}: {e}") from None


def blkif_unpack_indirect(abi: BlkifAbi, buf: Buffer, offset: int = 0
                          ) -> tuple[int, int, int, int, int, int, tuple[int, ...]]:
    """(operation, indirect_op, nr_segments, id, sector_number, handle, indirect_grefs)."""
    v = _INDIRECT[abi.indirect].unpack_from(buf, offset)
    n = min(_NGREF, blkif_indirect_pages(v[2]))
    return v[0], v[1], v[2], v[3], v[4], v[5], v[6:6 + n]


@functools.lru_cache(maxsize=64)
def _segs_struct(n: int) -> struct.Struct:
    return struct.Struct("<" + _SEG_FMT * n)


def blkif_pack_segs(segs: Sequence[int]) -> bytes:
    """``blkif_request_segment`` entries of ``segs`` (flat), for indirect pages."""
    try:
        return _segs_struct(len(segs) // 3).pack(*segs)
    except struct.error as e:
        raise ValueError(f"blkif_request_segment: {e}") from None


def blkif_unpack_segs(raw: Buffer) -> list[BlkifSeg]:
    """The segment entries of ``raw`` (a whole number of them), in order."""
    return list(BlkifRequestSegment.STRUCT.iter_unpack(raw))


def blkif_pack_response(abi: BlkifAbi, id_: int, operation: int, status: int) -> bytes:
    """The slot of a response."""
    try:
        return abi.response.STRUCT.pack(id_, operation, status)
    except struct.error as e:
        raise ValueError(f"{abi.response.__name__}: {e}") from None


def blkif_unpack_response(abi: BlkifAbi, buf: Buffer, offset: int = 0
                          ) -> tuple[int, int, int]:
    """(id, operation, status) of a response slot."""
    id_, op, status = abi.response.STRUCT.unpack_from(buf, offset)
    return id_, op, status
