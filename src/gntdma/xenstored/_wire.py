"""The xenstore wire protocol (``xen/include/public/io/xs_wire.h``), sans-IO.

Every message in either direction is a 16-byte :class:`XsdSockmsg` header
(``type``, ``req_id``, ``tx_id``, ``len``: four host-endian u32) followed by
``len`` payload bytes, at most :data:`XENSTORE_PAYLOAD_MAX`. The same byte
stream runs over the Unix socket and over a domain's shared-page rings, so
this module knows nothing about either: :class:`MessageReader` turns bytes into
:class:`Message` values and :meth:`Message.encode` turns them back.

Errors travel as errno *names* ("EINVAL\\0"), in the order of the header's
``xsd_errors`` table (:data:`XSD_ERRORS`).
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, Final

from gntdma.errors import GntdmaError

__all__ = [
    "XENSTORE_ABS_PATH_MAX",
    "XENSTORE_PAYLOAD_MAX",
    "XENSTORE_REL_PATH_MAX",
    "XSD_ERRORS",
    "XS_TYPE_COUNT",
    "Message",
    "MessageReader",
    "XsError",
    "XsProtocolError",
    "XsdSockmsg",
    "XsdType",
    "errno_from_name",
    "errno_name",
]

#: Largest payload in either direction; xenstored kills a client that sends more.
XENSTORE_PAYLOAD_MAX: Final = 4096
#: Longest absolute path.
XENSTORE_ABS_PATH_MAX: Final = 3072
#: Longest relative path (also the limit below ``/local/domain/<domid>/``).
XENSTORE_REL_PATH_MAX: Final = 2048


class XsdType(IntEnum):
    """``enum xsd_sockmsg_type`` of Xen 4.17 ``io/xs_wire.h``."""

    XS_CONTROL = 0
    XS_DEBUG = 0  # alias of XS_CONTROL, as in the header
    XS_DIRECTORY = 1
    XS_READ = 2
    XS_GET_PERMS = 3
    XS_WATCH = 4
    XS_UNWATCH = 5
    XS_TRANSACTION_START = 6
    XS_TRANSACTION_END = 7
    XS_INTRODUCE = 8
    XS_RELEASE = 9
    XS_GET_DOMAIN_PATH = 10
    XS_WRITE = 11
    XS_MKDIR = 12
    XS_RM = 13
    XS_SET_PERMS = 14
    XS_WATCH_EVENT = 15
    XS_ERROR = 16
    XS_IS_DOMAIN_INTRODUCED = 17
    XS_RESUME = 18
    XS_SET_TARGET = 19
    # 20 was XS_RESTRICT, removed.
    XS_RESET_WATCHES = 21
    XS_DIRECTORY_PART = 22
    XS_INVALID = 0xFFFF  # guaranteed to remain invalid


#: ``XS_TYPE_COUNT``: number of valid types (one past XS_DIRECTORY_PART).
XS_TYPE_COUNT: Final = 23

#: ``xsd_errors[]`` in header order: (errno value, errno name). Only these
#: names go on the wire; anything else is reported as EINVAL (the first entry).
XSD_ERRORS: Final[tuple[tuple[int, str], ...]] = tuple(
    (getattr(errno, name), name)
    for name in (
        "EINVAL",
        "EACCES",
        "EEXIST",
        "EISDIR",
        "ENOENT",
        "ENOMEM",
        "ENOSPC",
        "EIO",
        "ENOTEMPTY",
        "ENOSYS",
        "EROFS",
        "EBUSY",
        "EAGAIN",
        "EISCONN",
        "E2BIG",
        "EPERM",
    )
)
_NAME_BY_ERRNO: Final = {num: name for num, name in XSD_ERRORS}
_ERRNO_BY_NAME: Final = {name: num for num, name in XSD_ERRORS}


def errno_name(err: int) -> str:
    """The wire name of ``err``; EINVAL for an errno not in :data:`XSD_ERRORS`."""
    return _NAME_BY_ERRNO.get(err, "EINVAL")


def errno_from_name(name: str) -> int:
    """The errno for a wire name; EINVAL for an unknown name (as libxenstore does)."""
    return _ERRNO_BY_NAME.get(name, errno.EINVAL)


class XsProtocolError(GntdmaError):
    """A peer broke the wire protocol (for example an oversize payload)."""


class XsError(GntdmaError):
    """A xenstore operation failed with an errno that goes on the wire by name."""

    def __init__(self, err: int, detail: str = "") -> None:
        self.errno = err
        self.name = errno_name(err)
        super().__init__(f"{self.name}: {detail}" if detail else self.name)


def _u32(name: str, value: int) -> None:
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{name} {value} does not fit in a u32")


@dataclass(frozen=True, slots=True)
class XsdSockmsg:
    """``struct xsd_sockmsg``: the 16-byte header before every payload."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("=IIII")
    SIZE: ClassVar[int] = 16

    type: int  #: XsdType value (kept as int: peers send unknown types)
    req_id: int  #: echoed in the reply
    tx_id: int  #: transaction id, 0 outside transactions
    len: int  #: payload length

    def __post_init__(self) -> None:
        for name in ("type", "req_id", "tx_id", "len"):
            _u32(name, getattr(self, name))

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.type, self.req_id, self.tx_id, self.len)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> XsdSockmsg:
        return cls(*cls.STRUCT.unpack(data))


assert XsdSockmsg.STRUCT.size == XsdSockmsg.SIZE


@dataclass(frozen=True, slots=True)
class Message:
    """One complete message: a type, the two ids and the payload."""

    type: int
    req_id: int
    tx_id: int
    payload: bytes

    def __post_init__(self) -> None:
        _u32("type", self.type)
        _u32("req_id", self.req_id)
        _u32("tx_id", self.tx_id)

    @property
    def header(self) -> XsdSockmsg:
        return XsdSockmsg(self.type, self.req_id, self.tx_id, len(self.payload))

    def encode(self) -> bytes:
        """Header plus payload; raises XsProtocolError above XENSTORE_PAYLOAD_MAX."""
        if len(self.payload) > XENSTORE_PAYLOAD_MAX:
            raise XsProtocolError(
                f"payload of {len(self.payload)} bytes exceeds {XENSTORE_PAYLOAD_MAX}"
            )
        return self.header.pack() + self.payload

    def strings(self) -> list[bytes]:
        """The NUL-terminated strings of the payload (bytes after the last NUL dropped)."""
        parts = self.payload.split(b"\0")
        return parts[:-1]


class MessageReader:
    """Incremental decoder: give it bytes as they arrive, get complete messages.

    A header announcing more than :data:`XENSTORE_PAYLOAD_MAX` bytes raises
    :class:`XsProtocolError` (xenstored drops such a client) and leaves the
    reader broken: every later call raises the same error. Messages complete
    before the bad header are returned first by :meth:`next_message`;
    :meth:`feed` (all at once) raises without them.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._broken: XsProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete message."""
        return len(self._buf)

    def receive(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer ``data``; take the messages out with :meth:`next_message`."""
        if self._broken is not None:
            raise self._broken
        self._buf += data

    def next_message(self) -> Message | None:
        """The next complete message, or None if more bytes are needed."""
        if self._broken is not None:
            raise self._broken
        if len(self._buf) < XsdSockmsg.SIZE:
            return None
        hdr = XsdSockmsg.unpack(self._buf[: XsdSockmsg.SIZE])
        if hdr.len > XENSTORE_PAYLOAD_MAX:
            self._broken = XsProtocolError(
                f"peer announced a {hdr.len}-byte payload"
                f" (max {XENSTORE_PAYLOAD_MAX}), type {hdr.type}"
            )
            raise self._broken
        end = XsdSockmsg.SIZE + hdr.len
        if len(self._buf) < end:
            return None
        payload = bytes(self._buf[XsdSockmsg.SIZE : end])
        del self._buf[:end]
        return Message(hdr.type, hdr.req_id, hdr.tx_id, payload)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Buffer ``data`` and return every message now complete."""
        self.receive(data)
        out: list[Message] = []
        while (msg := self.next_message()) is not None:
            out.append(msg)
        return out
