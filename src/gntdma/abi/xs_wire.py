"""The xenstore wire protocol and store page of Xen 4.17 ``xen/io/xs_wire.h``.

Both ends of xenstore use these: the daemon (:mod:`gntdma.xenstored`, over its
Unix socket and the domains' rings) and the guest client
(:mod:`gntdma.xen.xenstore`, over its store ring).

- Every message in either direction is a 16-byte :class:`XsdSockmsg` header
  (``type``, ``req_id``, ``tx_id``, ``len``: four u32) followed by ``len``
  payload bytes, at most :data:`XENSTORE_PAYLOAD_MAX`. ``type`` is an
  :class:`XsdType` (kept as an int in the header: peers send unknown types).
- Errors travel as errno *names* ("EINVAL\\0") in an ``XS_ERROR`` reply; only the
  names of :data:`XSD_ERRORS` go on the wire.
- A domain's store page starts with ``struct xenstore_domain_interface``: two
  :data:`XENSTORE_RING_SIZE`-byte byte rings (``req``: guest to daemon, ``rsp``:
  daemon to guest) with free-running u32 indices masked with
  :data:`MASK_XENSTORE_IDX`, then ``server_features``, ``connection`` and
  ``error`` (:data:`XENSTORE_DOMAIN_INTERFACE_OFFSETS`).

The constants are checked against Debian's ``libxen-dev`` header by
``tests/xenstored/test_xs_wire.py`` and ``tests/xenbus/test_xs_ring_layout.py``.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, Final, final

from gntdma.abi._wire import Field, Layout, WireStruct, layout, wire

__all__ = [
    "MASK_XENSTORE_IDX",
    "XENSTORE_ABS_PATH_MAX",
    "XENSTORE_CONNECTED",
    "XENSTORE_DOMAIN_INTERFACE_OFFSETS",
    "XENSTORE_DOMAIN_INTERFACE_SIZE",
    "XENSTORE_ERROR_COMM",
    "XENSTORE_ERROR_NONE",
    "XENSTORE_ERROR_PROTO",
    "XENSTORE_ERROR_RINGIDX",
    "XENSTORE_PAYLOAD_MAX",
    "XENSTORE_RECONNECT",
    "XENSTORE_REL_PATH_MAX",
    "XENSTORE_RING_SIZE",
    "XENSTORE_SERVER_FEATURE_ERROR",
    "XENSTORE_SERVER_FEATURE_RECONNECTION",
    "XSD_ERRORS",
    "XS_TYPE_COUNT",
    "XsdSockmsg",
    "XsdType",
    "errno_from_name",
    "errno_name",
]

# --- messages ---------------------------------------------------------------------


class XsdType(IntEnum):
    """``enum xsd_sockmsg_type``: the type of a message."""

    XS_CONTROL = 0  #: daemon control
    XS_DEBUG = 0  #: alias of XS_CONTROL, as in the header
    XS_DIRECTORY = 1  #: list a node's children
    XS_READ = 2  #: read a node's value
    XS_GET_PERMS = 3  #: a node's permission list
    XS_WATCH = 4  #: register a watch (path, token)
    XS_UNWATCH = 5  #: unregister a watch
    XS_TRANSACTION_START = 6  #: open a transaction; the reply is its id
    XS_TRANSACTION_END = 7  #: "T" commits, "F" aborts
    XS_INTRODUCE = 8  #: toolstack: introduce a domain
    XS_RELEASE = 9  #: toolstack: release a domain
    XS_GET_DOMAIN_PATH = 10  #: "/local/domain/<domid>"
    XS_WRITE = 11  #: write a node's value
    XS_MKDIR = 12  #: create a node
    XS_RM = 13  #: remove a subtree
    XS_SET_PERMS = 14  #: set a node's permission list
    XS_WATCH_EVENT = 15  #: daemon to client: a watch fired
    XS_ERROR = 16  #: daemon to client: the request failed
    XS_IS_DOMAIN_INTRODUCED = 17  #: toolstack: is a domain known
    XS_RESUME = 18  #: toolstack: a domain resumed
    XS_SET_TARGET = 19  #: toolstack: device model target
    # 20 was XS_RESTRICT, removed.
    XS_RESET_WATCHES = 21  #: drop every watch of the connection
    XS_DIRECTORY_PART = 22  #: list children, in parts
    XS_INVALID = 0xFFFF  #: guaranteed to remain invalid


#: ``XS_TYPE_COUNT``: number of valid types (one past XS_DIRECTORY_PART).
XS_TYPE_COUNT: Final = 23

#: Largest payload in either direction; xenstored kills a client that sends more.
XENSTORE_PAYLOAD_MAX: Final = 4096
#: Longest absolute path.
XENSTORE_ABS_PATH_MAX: Final = 3072
#: Longest relative path (also the limit below ``/local/domain/<domid>/``).
XENSTORE_REL_PATH_MAX: Final = 2048

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


@final
@wire(size=16)
@dataclass(frozen=True, slots=True)
class XsdSockmsg(WireStruct):
    """``struct xsd_sockmsg``: the 16-byte header before every payload.

    Unlike most wire structs it checks its values when made: each must fit in a
    u32 (:class:`ValueError` otherwise). Decoding never fails on content.
    """

    CTYPE: ClassVar[str] = "struct xsd_sockmsg"
    LAYOUT: ClassVar[Layout] = layout(
        ("type", "I"),
        ("req_id", "I"),
        ("tx_id", "I"),
        ("len", "I"),
    )
    STRUCT: ClassVar[struct.Struct] = LAYOUT.struct
    FIELDS: ClassVar[tuple[Field, ...]] = LAYOUT.fields
    #: ``sizeof(struct xsd_sockmsg)``.
    SIZE: ClassVar[int] = 16

    type: int  #: XsdType value (kept as int: peers send unknown types)
    req_id: int  #: echoed in the reply
    tx_id: int  #: transaction id, 0 outside transactions
    len: int  #: payload length

    def __post_init__(self) -> None:
        for name in ("type", "req_id", "tx_id", "len"):
            value = getattr(self, name)
            if not 0 <= value <= 0xFFFFFFFF:
                raise ValueError(f"{name} {value} does not fit in a u32")


if XsdSockmsg.STRUCT.size != XsdSockmsg.SIZE:
    raise AssertionError(f"XsdSockmsg is {XsdSockmsg.STRUCT.size} bytes, header says 16")

# --- the store page: struct xenstore_domain_interface ------------------------------

#: Bytes in each of the two rings (``XENSTORE_RING_SIZE``).
XENSTORE_RING_SIZE: Final = 1024
#: ``MASK_XENSTORE_IDX(idx)`` is ``idx & MASK_XENSTORE_IDX``.
MASK_XENSTORE_IDX: Final = XENSTORE_RING_SIZE - 1
#: ``server_features`` bit: the ring can be reset with ``XENSTORE_RECONNECT``.
XENSTORE_SERVER_FEATURE_RECONNECTION: Final = 1
#: ``server_features`` bit: the ``error`` field is present.
XENSTORE_SERVER_FEATURE_ERROR: Final = 2
#: ``connection``: the steady state.
XENSTORE_CONNECTED: Final = 0
#: ``connection``: the guest asks for a reset (reconnection in progress).
XENSTORE_RECONNECT: Final = 1
#: ``error``: none.
XENSTORE_ERROR_NONE: Final = 0
#: ``error``: communication problem.
XENSTORE_ERROR_COMM: Final = 1
#: ``error``: invalid ring index.
XENSTORE_ERROR_RINGIDX: Final = 2
#: ``error``: protocol violation (payload too long).
XENSTORE_ERROR_PROTO: Final = 3

#: ``offsetof(struct xenstore_domain_interface, <field>)``, in declaration order.
XENSTORE_DOMAIN_INTERFACE_OFFSETS: Final = {
    "req": 0,
    "rsp": 1024,
    "req_cons": 2048,
    "req_prod": 2052,
    "rsp_cons": 2056,
    "rsp_prod": 2060,
    "server_features": 2064,
    "connection": 2068,
    "error": 2072,
}
#: ``sizeof(struct xenstore_domain_interface)``.
XENSTORE_DOMAIN_INTERFACE_SIZE: Final = 2076

_DOMAIN_INTERFACE: Final = layout(
    ("req", f"{XENSTORE_RING_SIZE}s"),
    ("rsp", f"{XENSTORE_RING_SIZE}s"),
    ("req_cons", "I"),
    ("req_prod", "I"),
    ("rsp_cons", "I"),
    ("rsp_prod", "I"),
    ("server_features", "I"),
    ("connection", "I"),
    ("error", "I"),
)
# In declaration order: users unpack the offsets' values in this order.
if (
    [(member, offset) for member, offset, _ in _DOMAIN_INTERFACE.fields]
    != list(XENSTORE_DOMAIN_INTERFACE_OFFSETS.items())
    or _DOMAIN_INTERFACE.struct.size != XENSTORE_DOMAIN_INTERFACE_SIZE
):
    raise AssertionError("struct xenstore_domain_interface: offsets or size disagree")
