"""The xenstore wire protocol (``xen/include/public/io/xs_wire.h``), sans-IO.

Every message in either direction is a 16-byte :class:`XsdSockmsg` header
(``type``, ``req_id``, ``tx_id``, ``len``: four u32) followed by ``len``
payload bytes, at most :data:`XENSTORE_PAYLOAD_MAX`. The same byte
stream runs over the Unix socket and over a domain's shared-page rings, so
this module knows nothing about either: :class:`MessageReader` turns bytes into
:class:`Message` values and :meth:`Message.encode` turns them back.

Errors travel as errno *names* ("EINVAL\\0"), in the order of the header's
``xsd_errors`` table (:data:`XSD_ERRORS`).

The header's definitions (message types, limits, the error table, the
``xsd_sockmsg`` header) live in :mod:`gntdma.abi.xs_wire`, shared with the guest
client; they are re-exported here unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from gntdma.abi.xs_wire import (
    XENSTORE_ABS_PATH_MAX,
    XENSTORE_PAYLOAD_MAX,
    XENSTORE_REL_PATH_MAX,
    XS_TYPE_COUNT,
    XSD_ERRORS,
    XsdSockmsg,
    XsdType,
    errno_from_name,
    errno_name,
)
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


class XsProtocolError(GntdmaError):
    """A peer broke the wire protocol (for example an oversize payload)."""


class XsError(GntdmaError):
    """A xenstore operation failed with an errno that goes on the wire by name."""

    def __init__(self, err: int, detail: str = "") -> None:
        self.errno = err
        self.name = errno_name(err)
        super().__init__(f"{self.name}: {detail}" if detail else self.name)


@dataclass(frozen=True, slots=True)
class Message:
    """One complete message: a type, the two ids and the payload."""

    type: int
    req_id: int
    tx_id: int
    payload: bytes

    def __post_init__(self) -> None:
        XsdSockmsg(self.type, self.req_id, self.tx_id, 0)  # each must fit in a u32

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
