"""The block-device protocol: ``xen/io/blkif.h`` and ``xen/io/protocols.h``.

Two ABIs share the ring: the native ``x86_64-abi`` (:class:`BlkifRequest`,
112-byte slots) and ``x86_32-abi`` (:class:`BlkifRequest32`, 108-byte slots, u64
fields only 4-aligned). A backend picks the ABI from the frontend's ``protocol``
key with :func:`blkif_abi` and then reads and writes slots through the
:class:`BlkifAbi`, which always hands out the native classes (as Linux blkback
translates x86_32 requests into its native ones).

Array members: a request's ``seg`` holds at most 11 segments, an indirect
request's ``indirect_grefs`` at most 8 refs; packing zero-fills the unused
slots, and unpacking returns only those the request's own count covers
(``min(nr_segments, 11)`` segments; ``min(8, ceil(nr_segments / 512))`` refs). The
count itself is returned as written, unvalidated: checking it is the backend's
job.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, fields
from enum import IntEnum, IntFlag, StrEnum
from typing import Any, ClassVar, Final, TypeVar, cast, final

from gntdma.abi._wire import Buffer, Field, Layout, WireStruct, layout, wire
from gntdma.abi.ring import ring_nr_ents
from gntdma.abi.xen import PAGE_SIZE

__all__ = [
    "BLKIF_ABI_X86_32",
    "BLKIF_ABI_X86_64",
    "BLKIF_DISCARD_SECURE",
    "BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST",
    "BLKIF_MAX_INDIRECT_SEGMENTS",
    "BLKIF_MAX_SEGMENTS_PER_REQUEST",
    "BLKIF_OP_DISCARD",
    "BLKIF_OP_FLUSH_DISKCACHE",
    "BLKIF_OP_INDIRECT",
    "BLKIF_OP_READ",
    "BLKIF_OP_RESERVED_1",
    "BLKIF_OP_WRITE",
    "BLKIF_OP_WRITE_BARRIER",
    "BLKIF_RSP_EOPNOTSUPP",
    "BLKIF_RSP_ERROR",
    "BLKIF_RSP_OKAY",
    "BLKIF_SECTORS_PER_PAGE",
    "BLKIF_SECTOR_SIZE",
    "BLKIF_SEGS_PER_INDIRECT_FRAME",
    "VDISK",
    "VDISK_CDROM",
    "VDISK_READONLY",
    "VDISK_REMOVABLE",
    "XEN_IO_PROTO_ABI_ARM",
    "XEN_IO_PROTO_ABI_NATIVE",
    "XEN_IO_PROTO_ABI_X86_32",
    "XEN_IO_PROTO_ABI_X86_64",
    "BlkifAbi",
    "BlkifAnyRequest",
    "BlkifKey",
    "BlkifOp",
    "BlkifRequest",
    "BlkifRequest32",
    "BlkifRequestDiscard",
    "BlkifRequestDiscard32",
    "BlkifRequestIndirect",
    "BlkifRequestIndirect32",
    "BlkifRequestSegment",
    "BlkifResponse",
    "BlkifResponse32",
    "BlkifRsp",
    "blkif_abi",
    "blkif_indirect_pages",
    "blkif_queue_key",
    "blkif_ring_ref_key",
]

# --- constants --------------------------------------------------------------------


class BlkifOp(IntEnum):
    """The ``operation`` of a request (``BLKIF_OP_*``)."""

    READ = 0  #: read sectors into the granted pages
    WRITE = 1  #: write sectors from the granted pages
    WRITE_BARRIER = 2  #: ordered write (needs ``feature-barrier``)
    FLUSH_DISKCACHE = 3  #: flush the disk cache (needs ``feature-flush-cache``)
    RESERVED_1 = 4  #: reserved (was a blktap operation)
    DISCARD = 5  #: :class:`BlkifRequestDiscard` (needs ``feature-discard``)
    INDIRECT = 6  #: :class:`BlkifRequestIndirect` (needs ``feature-max-indirect-segments``)


BLKIF_OP_READ: Final = BlkifOp.READ
BLKIF_OP_WRITE: Final = BlkifOp.WRITE
BLKIF_OP_WRITE_BARRIER: Final = BlkifOp.WRITE_BARRIER
BLKIF_OP_FLUSH_DISKCACHE: Final = BlkifOp.FLUSH_DISKCACHE
BLKIF_OP_RESERVED_1: Final = BlkifOp.RESERVED_1
BLKIF_OP_DISCARD: Final = BlkifOp.DISCARD
BLKIF_OP_INDIRECT: Final = BlkifOp.INDIRECT


class BlkifRsp(IntEnum):
    """The int16 ``status`` of a response (``BLKIF_RSP_*``)."""

    OKAY = 0  #: completed successfully
    ERROR = -1  #: failed (-EIO)
    EOPNOTSUPP = -2  #: operation not supported (an optional op may always get this)


BLKIF_RSP_OKAY: Final = BlkifRsp.OKAY
BLKIF_RSP_ERROR: Final = BlkifRsp.ERROR
BLKIF_RSP_EOPNOTSUPP: Final = BlkifRsp.EOPNOTSUPP

#: Segments of a direct read/write request.
BLKIF_MAX_SEGMENTS_PER_REQUEST: Final = 11
#: Indirect pages one indirect request may name.
BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST: Final = 8
#: ``blkif_request_segment`` entries (8 bytes) per indirect page: 512.
BLKIF_SEGS_PER_INDIRECT_FRAME: Final = PAGE_SIZE // 8
#: Segments of the largest indirect request: 8 pages of 512.
BLKIF_MAX_INDIRECT_SEGMENTS: Final = (
    BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST * BLKIF_SEGS_PER_INDIRECT_FRAME)
#: The unit of ``sector_number``, ``first_sect``, ``last_sect`` and ``nr_sectors``
#: (unless the frontend negotiated ``feature-large-sector-size``).
BLKIF_SECTOR_SIZE: Final = 512
#: Sectors per segment page: ``last_sect`` must be below this.
BLKIF_SECTORS_PER_PAGE: Final = PAGE_SIZE // BLKIF_SECTOR_SIZE
#: ``flag`` of a discard request: erase securely (if ``discard-secure``).
BLKIF_DISCARD_SECURE: Final = 1 << 0


class VDISK(IntFlag):
    """The backend's ``info`` bitmap (``VDISK_*``)."""

    CDROM = 0x1  #: a CD-ROM
    REMOVABLE = 0x2  #: removable media
    READONLY = 0x4  #: read-only device


VDISK_CDROM: Final = VDISK.CDROM
VDISK_REMOVABLE: Final = VDISK.REMOVABLE
VDISK_READONLY: Final = VDISK.READONLY

#: ``protocol`` values (io/protocols.h).
XEN_IO_PROTO_ABI_X86_32: Final = "x86_32-abi"
XEN_IO_PROTO_ABI_X86_64: Final = "x86_64-abi"
XEN_IO_PROTO_ABI_ARM: Final = "arm-abi"
#: The emulated host is x86_64.
XEN_IO_PROTO_ABI_NATIVE: Final = XEN_IO_PROTO_ABI_X86_64


class BlkifKey(StrEnum):
    """XenStore keys of a vbd (blkif.h, Linux blkfront/blkback, libxl); values are strings.

    Backend directory ``/local/domain/<be>/backend/vbd/<fe>/<devid>/`` and frontend
    directory ``/local/domain/<fe>/device/vbd/<devid>/``.
    """

    # both directories
    STATE = "state"  #: XenbusState, decimal
    # written by the toolstack
    FRONTEND = "frontend"  #: backend: path of the frontend directory
    FRONTEND_ID = "frontend-id"  #: backend: frontend domid
    BACKEND = "backend"  #: frontend: path of the backend directory
    BACKEND_ID = "backend-id"  #: frontend: backend domid
    ONLINE = "online"  #: backend: 1 while the device should exist
    REMOVABLE = "removable"  #: backend
    MODE = "mode"  #: backend: "r" or "w"
    PARAMS = "params"  #: backend: the image or device path
    TYPE = "type"  #: backend: file, phy, tap
    PHYSICAL_DEVICE = "physical-device"  #: backend: "MAJOR:MINOR" in hex
    PHYSICAL_DEVICE_PATH = "physical-device-path"  #: backend
    HOTPLUG_STATUS = "hotplug-status"  #: backend: "connected" once the script ran
    DISCARD_ENABLE = "discard-enable"  #: backend: toolstack allows discard
    VIRTUAL_DEVICE = "virtual-device"  #: frontend: the vdev number
    DEVICE_TYPE = "device-type"  #: frontend: "disk" or "cdrom"
    TRUSTED = "trusted"  #: frontend: 0 if the backend must not be trusted
    # written by the backend
    FEATURE_MAX_INDIRECT_SEGMENTS = "feature-max-indirect-segments"
    MULTI_QUEUE_MAX_QUEUES = "multi-queue-max-queues"
    MAX_RING_PAGE_ORDER = "max-ring-page-order"
    MAX_RING_PAGES = "max-ring-pages"  #: deprecated alternative to max-ring-page-order
    FEATURE_FLUSH_CACHE = "feature-flush-cache"
    FEATURE_BARRIER = "feature-barrier"
    FEATURE_DISCARD = "feature-discard"
    DISCARD_GRANULARITY = "discard-granularity"
    DISCARD_ALIGNMENT = "discard-alignment"
    DISCARD_SECURE = "discard-secure"
    FEATURE_PERSISTENT = "feature-persistent"  #: both sides advertise it
    SECTORS = "sectors"  #: size in sector-size units
    INFO = "info"  #: :class:`VDISK` bitmap
    SECTOR_SIZE = "sector-size"  #: logical sector size, >= 512
    PHYSICAL_SECTOR_SIZE = "physical-sector-size"
    # written by the frontend
    RING_REF = "ring-ref"  #: single-page ring; multi-page: ``ring-ref<i>``
    RING_PAGE_ORDER = "ring-page-order"  #: written only if > 0
    EVENT_CHANNEL = "event-channel"
    PROTOCOL = "protocol"  #: ``XEN_IO_PROTO_ABI_*``; absent = native
    MULTI_QUEUE_NUM_QUEUES = "multi-queue-num-queues"
    FEATURE_LARGE_SECTOR_SIZE = "feature-large-sector-size"


def blkif_ring_ref_key(i: int) -> str:
    """The key of page ``i`` of a multi-page ring: ``ring-ref<i>``."""
    return f"{BlkifKey.RING_REF.value}{i}"


def blkif_queue_key(n: int) -> str:
    """The directory of queue ``n`` when there are two or more: ``queue-<n>``."""
    return f"queue-{n}"


def blkif_indirect_pages(nr_segments: int) -> int:
    """Indirect pages that hold ``nr_segments`` segment entries (rounded up)."""
    return -(-nr_segments // BLKIF_SEGS_PER_INDIRECT_FRAME)


# --- structs ----------------------------------------------------------------------


@final
@wire(size=8)
@dataclass(frozen=True, slots=True)
class BlkifRequestSegment(WireStruct):
    """``struct blkif_request_segment`` (both ABIs): sectors ``first_sect..last_sect``
    (inclusive) of the granted page ``gref``."""

    CTYPE: ClassVar[str] = "struct blkif_request_segment"
    LAYOUT: ClassVar[Layout] = layout(
        ("gref", "I"), ("first_sect", "B"), ("last_sect", "B"), ("", "2x"))
    STRUCT: ClassVar[struct.Struct] = LAYOUT.struct
    FIELDS: ClassVar[tuple[Field, ...]] = LAYOUT.fields

    gref: int = 0
    first_sect: int = 0
    last_sect: int = 0


_SEG: Final = BlkifRequestSegment.STRUCT.size
_SEGS_BYTES: Final = BLKIF_MAX_SEGMENTS_PER_REQUEST * _SEG
_GREFS: Final = struct.Struct(f"<{BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST}I")


def _pack_segs(cls: str, seg: tuple[BlkifRequestSegment, ...]) -> bytes:
    if len(seg) > BLKIF_MAX_SEGMENTS_PER_REQUEST:
        raise ValueError(f"{cls}: {len(seg)} segments, at most "
                         f"{BLKIF_MAX_SEGMENTS_PER_REQUEST}")
    return b"".join(s.pack() for s in seg).ljust(_SEGS_BYTES, b"\0")


def _unpack_segs(raw: bytes, nr_segments: int) -> tuple[BlkifRequestSegment, ...]:
    n = min(nr_segments, BLKIF_MAX_SEGMENTS_PER_REQUEST)
    return tuple(BlkifRequestSegment.unpack_from(raw, i * _SEG) for i in range(n))


def _pack_grefs(cls: str, grefs: tuple[int, ...]) -> bytes:
    if len(grefs) > BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST:
        raise ValueError(f"{cls}: {len(grefs)} indirect pages, at most "
                         f"{BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST}")
    try:
        return _GREFS.pack(*grefs, *(0,) * (BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST - len(grefs)))
    except struct.error as e:
        raise ValueError(f"{cls}: {e}") from None


def _unpack_grefs(raw: bytes, nr_segments: int) -> tuple[int, ...]:
    n = min(BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST, blkif_indirect_pages(nr_segments))
    return tuple(_GREFS.unpack(raw)[:n])


@final
@wire(size=112)
@dataclass(frozen=True, slots=True)
class BlkifRequest(WireStruct):
    """``struct blkif_request``, x86_64: a read, write, barrier or flush request."""

    CTYPE: ClassVar[str] = "struct blkif_request"
    LAYOUT: ClassVar[Layout] = layout(
        ("operation", "B"),
        ("nr_segments", "B"),
        ("handle", "H"),
        ("", "4x"),
        ("id", "Q"),
        ("sector_number", "Q"),
        ("seg", f"{_SEGS_BYTES}s"),
    )
    STRUCT: ClassVar[struct.Struct] = LAYOUT.struct
    FIELDS: ClassVar[tuple[Field, ...]] = LAYOUT.fields

    operation: int = 0  #: :class:`BlkifOp`
    nr_segments: int = 0
    handle: int = 0  #: ``blkif_vdev_t``
    id: int = 0  #: opaque to the backend, echoed in the response
    sector_number: int = 0
    seg: tuple[BlkifRequestSegment, ...] = ()

    def _values(self) -> tuple[Any, ...]:
        return (self.operation, self.nr_segments, self.handle, self.id, self.sector_number,
                _pack_segs(type(self).__name__, self.seg))

    @classmethod
    def _from_values(cls, values: tuple[Any, ...]) -> BlkifRequest:
        op, nr, handle, id_, sector, raw = values
        return cls(op, nr, handle, id_, sector, _unpack_segs(raw, nr))


@final
@wire(size=108)
@dataclass(frozen=True, slots=True)
class BlkifRequest32(WireStruct):
    """``struct blkif_request``, x86_32 (``id`` at 4): fields as :class:`BlkifRequest`."""

    CTYPE: ClassVar[str] = "struct blkif_request"
    LAYOUT: ClassVar[Layout] = layout(
        ("operation", "B"),
        ("nr_segments", "B"),
        ("handle", "H"),
        ("id", "Q"),
        ("sector_number", "Q"),
        ("seg", f"{_SEGS_BYTES}s"),
    )
    STRUCT: ClassVar[struct.Struct] = LAYOUT.struct
    FIELDS: ClassVar[tuple[Field, ...]] = LAYOUT.fields

    operation: int = 0
    nr_segments: int = 0
    handle: int = 0
    id: int = 0
    sector_number: int = 0
    seg: tuple[BlkifRequestSegment, ...] = ()

    def _values(self) -> tuple[Any, ...]:
        return (self.operation, self.nr_segments, self.handle, self.id, self.sector_number,
                _pack_segs(type(self).__name__, self.seg))

    @classmethod
    def _from_values(cls, values: tuple[Any, ...]) -> BlkifRequest32:
        op, nr, handle, id_, sector, raw = values
        return cls(op, nr, handle, id_, sector, _unpack_segs(raw, nr))


@final
@wire(size=32)
@dataclass(frozen=True, slots=True)
class BlkifRequestDiscard(WireStruct):
    """``struct blkif_request_discard``, x86_64 (``BLKIF_OP_DISCARD``), in a request slot."""

    CTYPE: ClassVar[str] = "struct blkif_request_discard"
    LAYOUT: ClassVar[Layout] = layout(
        ("operation", "B"),
        ("flag", "B"),
        ("handle", "H"),
        ("", "4x"),
        ("id", "Q"),
        ("sector_number", "Q"),
        ("nr_sectors", "Q"),
    )
    STRUCT: ClassVar[struct.Struct] = LAYOUT.struct
    FIELDS: ClassVar[tuple[Field, ...]] = LAYOUT.fields

    operation: int = BLKIF_OP_DISCARD
    flag: int = 0  #: :data:`BLKIF_DISCARD_SECURE` or 0
    handle: int = 0
    id: int = 0
    sector_number: int = 0
    nr_sectors: int = 0


@final
@wire(size=28)
@dataclass(frozen=True, slots=True)
class BlkifRequestDiscard32(WireStruct):
    """``struct blkif_request_discard``, x86_32: fields as :class:`BlkifRequestDiscard`."""

    CTYPE: ClassVar[str] = "struct blkif_request_discard"
    LAYOUT: ClassVar[Layout] = layout(
        ("operation", "B"),
        ("flag", "B"),
        ("handle", "H"),
        ("id", "Q"),
        ("sector_number", "Q"),
        ("nr_sectors", "Q"),
    )
    STRUCT: ClassVar[struct.Struct] = LAYOUT.struct
    FIELDS: ClassVar[tuple[Field, ...]] = LAYOUT.fields

    operation: int = BLKIF_OP_DISCARD
    flag: int = 0
    handle: int = 0
    id: int = 0
    sector_number: int = 0
    nr_sectors: int = 0


@final
@wire(size=64)
@dataclass(frozen=True, slots=True)
class BlkifRequestIndirect(WireStruct):
    """``struct blkif_request_indirect``, x86_64 (``BLKIF_OP_INDIRECT``).

    The segments live in the granted pages ``indirect_grefs``, 512 per page;
    ``nr_segments`` is u16 here.
    """

    CTYPE: ClassVar[str] = "struct blkif_request_indirect"
    LAYOUT: ClassVar[Layout] = layout(
        ("operation", "B"),
        ("indirect_op", "B"),
        ("nr_segments", "H"),
        ("", "4x"),
        ("id", "Q"),
        ("sector_number", "Q"),
        ("handle", "H"),
        ("", "2x"),
        ("indirect_grefs", f"{_GREFS.size}s"),
        ("", "4x"),
    )
    STRUCT: ClassVar[struct.Struct] = LAYOUT.struct
    FIELDS: ClassVar[tuple[Field, ...]] = LAYOUT.fields

    operation: int = BLKIF_OP_INDIRECT
    indirect_op: int = 0  #: BLKIF_OP_READ or BLKIF_OP_WRITE
    nr_segments: int = 0
    id: int = 0
    sector_number: int = 0
    handle: int = 0
    indirect_grefs: tuple[int, ...] = ()

    def _values(self) -> tuple[Any, ...]:
        return (self.operation, self.indirect_op, self.nr_segments, self.id,
                self.sector_number, self.handle,
                _pack_grefs(type(self).__name__, self.indirect_grefs))

    @classmethod
    def _from_values(cls, values: tuple[Any, ...]) -> BlkifRequestIndirect:
        op, iop, nr, id_, sector, handle, raw = values
        return cls(op, iop, nr, id_, sector, handle, _unpack_grefs(raw, nr))


@final
@wire(size=64)
@dataclass(frozen=True, slots=True)
class BlkifRequestIndirect32(WireStruct):
    """``struct blkif_request_indirect``, x86_32 (``id`` at 4, explicit ``pad`` at 56)."""

    CTYPE: ClassVar[str] = "struct blkif_request_indirect"
    LAYOUT: ClassVar[Layout] = layout(
        ("operation", "B"),
        ("indirect_op", "B"),
        ("nr_segments", "H"),
        ("id", "Q"),
        ("sector_number", "Q"),
        ("handle", "H"),
        ("", "2x"),
        ("indirect_grefs", f"{_GREFS.size}s"),
        ("pad", "8x"),
    )
    STRUCT: ClassVar[struct.Struct] = LAYOUT.struct
    FIELDS: ClassVar[tuple[Field, ...]] = LAYOUT.fields

    operation: int = BLKIF_OP_INDIRECT
    indirect_op: int = 0
    nr_segments: int = 0
    id: int = 0
    sector_number: int = 0
    handle: int = 0
    indirect_grefs: tuple[int, ...] = ()

    def _values(self) -> tuple[Any, ...]:
        return (self.operation, self.indirect_op, self.nr_segments, self.id,
                self.sector_number, self.handle,
                _pack_grefs(type(self).__name__, self.indirect_grefs))

    @classmethod
    def _from_values(cls, values: tuple[Any, ...]) -> BlkifRequestIndirect32:
        op, iop, nr, id_, sector, handle, raw = values
        return cls(op, iop, nr, id_, sector, handle, _unpack_grefs(raw, nr))


@final
@wire(size=16)
@dataclass(frozen=True, slots=True)
class BlkifResponse(WireStruct):
    """``struct blkif_response``, x86_64: ``id`` and ``operation`` echoed, int16 ``status``."""

    CTYPE: ClassVar[str] = "struct blkif_response"
    LAYOUT: ClassVar[Layout] = layout(
        ("id", "Q"), ("operation", "B"), ("", "x"), ("status", "h"), ("", "4x"))
    STRUCT: ClassVar[struct.Struct] = LAYOUT.struct
    FIELDS: ClassVar[tuple[Field, ...]] = LAYOUT.fields

    id: int = 0
    operation: int = 0
    status: int = 0  #: :class:`BlkifRsp`


@final
@wire(size=12)
@dataclass(frozen=True, slots=True)
class BlkifResponse32(WireStruct):
    """``struct blkif_response``, x86_32: fields as :class:`BlkifResponse`."""

    CTYPE: ClassVar[str] = "struct blkif_response"
    LAYOUT: ClassVar[Layout] = layout(
        ("id", "Q"), ("operation", "B"), ("", "x"), ("status", "h"))
    STRUCT: ClassVar[struct.Struct] = LAYOUT.struct
    FIELDS: ClassVar[tuple[Field, ...]] = LAYOUT.fields

    id: int = 0
    operation: int = 0
    status: int = 0


# --- the two ABIs -----------------------------------------------------------------

#: A request as the backend sees it, whatever the ABI.
BlkifAnyRequest = BlkifRequest | BlkifRequestDiscard | BlkifRequestIndirect

_T = TypeVar("_T", bound=WireStruct)


def _convert(obj: WireStruct, cls: type[_T]) -> _T:
    """The same field values in the other ABI's class."""
    if isinstance(obj, cls):
        return obj
    make = cast(Callable[..., _T], cls)
    return make(*(getattr(obj, f.name) for f in fields(cls)))  # type: ignore[arg-type]


@final
@dataclass(frozen=True, slots=True)
class BlkifAbi:
    """One blkif ABI: its ``protocol`` name, slot size and wire classes.

    Methods take and return the native (x86_64) classes whatever the ABI.
    """

    protocol: str
    #: Bytes per ring slot: ``sizeof(union blkif_sring_entry)``.
    entry_size: int
    request: type[BlkifRequest] | type[BlkifRequest32]
    discard: type[BlkifRequestDiscard] | type[BlkifRequestDiscard32]
    indirect: type[BlkifRequestIndirect] | type[BlkifRequestIndirect32]
    response: type[BlkifResponse] | type[BlkifResponse32]

    def ring_size(self, nr_pages: int) -> int:
        """Slots of a ring of ``nr_pages`` pages (32 for one page, 512 for 16)."""
        return ring_nr_ents(nr_pages * PAGE_SIZE, self.entry_size)

    def unpack_request(self, buf: Buffer, offset: int = 0) -> BlkifAnyRequest:
        """Decode the request slot at ``offset`` by its ``operation`` byte.

        Discard and indirect requests get their own layouts; every other
        operation (valid or not) decodes as a read/write request, for the
        backend to validate.
        """
        op = buf[offset]
        if op == BLKIF_OP_DISCARD:
            return _convert(self.discard.unpack_from(buf, offset), BlkifRequestDiscard)
        if op == BLKIF_OP_INDIRECT:
            return _convert(self.indirect.unpack_from(buf, offset), BlkifRequestIndirect)
        return _convert(self.request.unpack_from(buf, offset), BlkifRequest)

    def pack_request(self, req: BlkifAnyRequest) -> bytes:
        """The wire bytes of ``req`` in this ABI (at most ``entry_size`` bytes)."""
        if isinstance(req, BlkifRequestDiscard):
            return _convert(req, self.discard).pack()
        if isinstance(req, BlkifRequestIndirect):
            return _convert(req, self.indirect).pack()
        return _convert(req, self.request).pack()

    def unpack_response(self, buf: Buffer, offset: int = 0) -> BlkifResponse:
        """Decode the response slot at ``offset``."""
        return _convert(self.response.unpack_from(buf, offset), BlkifResponse)

    def pack_response(self, rsp: BlkifResponse) -> bytes:
        """The wire bytes of ``rsp`` in this ABI."""
        return _convert(rsp, self.response).pack()


#: The native ABI: 112-byte slots.
BLKIF_ABI_X86_64: Final = BlkifAbi(XEN_IO_PROTO_ABI_X86_64, 112, BlkifRequest,
                                   BlkifRequestDiscard, BlkifRequestIndirect, BlkifResponse)
#: The 32-bit x86 ABI: 108-byte slots.
BLKIF_ABI_X86_32: Final = BlkifAbi(XEN_IO_PROTO_ABI_X86_32, 108, BlkifRequest32,
                                   BlkifRequestDiscard32, BlkifRequestIndirect32,
                                   BlkifResponse32)


def blkif_abi(protocol: str | None) -> BlkifAbi | None:
    """The ABI a frontend's ``protocol`` value names; ``None`` or ``""`` means native.

    Returns:
        The ABI, or None for a protocol this host does not speak (``arm-abi``,
        garbage): the backend refuses to connect.
    """
    if protocol is None or protocol in ("", XEN_IO_PROTO_ABI_X86_64):
        return BLKIF_ABI_X86_64
    if protocol == XEN_IO_PROTO_ABI_X86_32:
        return BLKIF_ABI_X86_32
    return None
