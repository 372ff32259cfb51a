"""The network-device protocol: ``xen/io/netif.h`` (Xen 4.17).

Two rings per queue: tx (frontend -> backend packets; :class:`NetifTxRequest`
slots of 12 bytes, :class:`NetifTxResponse` of 4) and rx (the frontend posts
empty pages as :class:`NetifRxRequest`, the backend fills them and answers
with :class:`NetifRxResponse`, 8 bytes each). :class:`NetifExtraInfo` overlays a
tx request or an rx response slot (GSO, multicast, hash). The layouts are the
same on x86_32 and x86_64.

The wire format of a packet (netif.h, ``xen-abi.md`` 5.2): on tx the first
slot's ``size`` is the whole packet's length, the following data slots carry
their own lengths, ``NETTXF_more_data`` links the data slots and
``NETTXF_extra_info`` says extra slots follow the first; the backend answers
one tx response per slot (``NETIF_RSP_NULL`` for an extra). On rx each
response sits at the ring index of the request it consumed, its ``status``
is the byte count of that slot (or a negative ``NETIF_RSP_*``).

Values are returned as written, unvalidated: checking them is the peer's job.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag, StrEnum
from typing import ClassVar, Final, final

from gntdma.abi._wire import Field, Layout, WireStruct, layout, wire
from gntdma.abi.ring import ring_nr_ents
from gntdma.abi.xen import PAGE_SIZE

__all__ = [
    "NETIF_RSP_DROPPED",
    "NETIF_RSP_ERROR",
    "NETIF_RSP_NULL",
    "NETIF_RSP_OKAY",
    "NETIF_RX_ENTRY_SIZE",
    "NETIF_RX_RING_SIZE",
    "NETIF_TX_ENTRY_SIZE",
    "NETIF_TX_RING_SIZE",
    "NETRXF_csum_blank",
    "NETRXF_data_validated",
    "NETRXF_extra_info",
    "NETRXF_gso_prefix",
    "NETRXF_more_data",
    "NETTXF_csum_blank",
    "NETTXF_data_validated",
    "NETTXF_extra_info",
    "NETTXF_more_data",
    "XEN_NETIF_EXTRA_FLAG_MORE",
    "XEN_NETIF_EXTRA_TYPE_GSO",
    "XEN_NETIF_EXTRA_TYPE_HASH",
    "XEN_NETIF_EXTRA_TYPE_MAX",
    "XEN_NETIF_EXTRA_TYPE_MCAST_ADD",
    "XEN_NETIF_EXTRA_TYPE_MCAST_DEL",
    "XEN_NETIF_EXTRA_TYPE_NONE",
    "XEN_NETIF_GSO_TYPE_NONE",
    "XEN_NETIF_GSO_TYPE_TCPV4",
    "XEN_NETIF_GSO_TYPE_TCPV6",
    "XEN_NETIF_MAX_TX_SIZE",
    "XEN_NETIF_NR_SLOTS_MIN",
    "NETRXF",
    "NETTXF",
    "NetifExtraInfo",
    "NetifExtraType",
    "NetifGsoType",
    "NetifKey",
    "NetifRsp",
    "NetifRxRequest",
    "NetifRxResponse",
    "NetifTxRequest",
    "NetifTxResponse",
    "netif_queue_key",
]

# --- constants --------------------------------------------------------------------

#: Every backend accepts packets of up to this many tx slots; a frontend uses no more.
XEN_NETIF_NR_SLOTS_MIN: Final = 18
#: The largest packet: tx ``size`` is 16 bits.
XEN_NETIF_MAX_TX_SIZE: Final = 0xFFFF


class NETTXF(IntFlag):
    """``flags`` of a tx request (``NETTXF_*``)."""

    csum_blank = 1 << 0  #: protocol checksum field is blank (to be filled)
    data_validated = 1 << 1  #: protocol checksum already validated
    more_data = 1 << 2  #: another data slot of this packet follows
    extra_info = 1 << 3  #: extra-info slot(s) follow this slot


NETTXF_csum_blank: Final = NETTXF.csum_blank
NETTXF_data_validated: Final = NETTXF.data_validated
NETTXF_more_data: Final = NETTXF.more_data
NETTXF_extra_info: Final = NETTXF.extra_info


class NETRXF(IntFlag):
    """``flags`` of an rx response (``NETRXF_*``); note the csum bits are swapped vs tx."""

    data_validated = 1 << 0  #: protocol checksum validated
    csum_blank = 1 << 1  #: protocol checksum field is blank
    more_data = 1 << 2  #: another data slot of this packet follows
    extra_info = 1 << 3  #: extra-info slot(s) follow
    gso_prefix = 1 << 4  #: deprecated GSO prefix slot


NETRXF_data_validated: Final = NETRXF.data_validated
NETRXF_csum_blank: Final = NETRXF.csum_blank
NETRXF_more_data: Final = NETRXF.more_data
NETRXF_extra_info: Final = NETRXF.extra_info
NETRXF_gso_prefix: Final = NETRXF.gso_prefix


class NetifExtraType(IntEnum):
    """``type`` of an extra-info slot (``XEN_NETIF_EXTRA_TYPE_*``, 4.17: no XDP)."""

    NONE = 0  #: never used: invalid
    GSO = 1  #: ``u.gso``
    MCAST_ADD = 2  #: ``u.mcast``
    MCAST_DEL = 3  #: ``u.mcast``
    HASH = 4  #: ``u.hash``
    MAX = 5  #: first invalid type


XEN_NETIF_EXTRA_TYPE_NONE: Final = NetifExtraType.NONE
XEN_NETIF_EXTRA_TYPE_GSO: Final = NetifExtraType.GSO
XEN_NETIF_EXTRA_TYPE_MCAST_ADD: Final = NetifExtraType.MCAST_ADD
XEN_NETIF_EXTRA_TYPE_MCAST_DEL: Final = NetifExtraType.MCAST_DEL
XEN_NETIF_EXTRA_TYPE_HASH: Final = NetifExtraType.HASH
XEN_NETIF_EXTRA_TYPE_MAX: Final = NetifExtraType.MAX

#: ``flags`` of an extra-info slot: another extra follows.
XEN_NETIF_EXTRA_FLAG_MORE: Final = 1 << 0


class NetifGsoType(IntEnum):
    """``u.gso.type`` (``XEN_NETIF_GSO_TYPE_*``)."""

    NONE = 0
    TCPV4 = 1
    TCPV6 = 2


XEN_NETIF_GSO_TYPE_NONE: Final = NetifGsoType.NONE
XEN_NETIF_GSO_TYPE_TCPV4: Final = NetifGsoType.TCPV4
XEN_NETIF_GSO_TYPE_TCPV6: Final = NetifGsoType.TCPV6


class NetifRsp(IntEnum):
    """``status`` of a response (``NETIF_RSP_*``); an rx status > 0 is a byte count."""

    DROPPED = -2
    ERROR = -1
    OKAY = 0
    NULL = 1  #: no-op response for an extra-info slot


NETIF_RSP_DROPPED: Final = NetifRsp.DROPPED
NETIF_RSP_ERROR: Final = NetifRsp.ERROR
NETIF_RSP_OKAY: Final = NetifRsp.OKAY
NETIF_RSP_NULL: Final = NetifRsp.NULL


class NetifKey(StrEnum):
    """XenStore keys of a vif (netif.h, Linux netfront/netback, libxl; ``xen-abi.md`` 5.4).

    Backend ``/local/domain/<be>/backend/vif/<fe>/<devid>/``, frontend
    ``/local/domain/<fe>/device/vif/<devid>/``.
    """

    STATE = "state"
    FRONTEND = "frontend"
    FRONTEND_ID = "frontend-id"
    BACKEND = "backend"
    BACKEND_ID = "backend-id"
    ONLINE = "online"
    HANDLE = "handle"
    MAC = "mac"  #: "aa:bb:cc:dd:ee:ff"; netfront reads its own, netback the backend's
    BRIDGE = "bridge"
    SCRIPT = "script"
    TYPE = "type"
    MTU = "mtu"
    HOTPLUG_STATUS = "hotplug-status"
    # written by the backend
    FEATURE_SG = "feature-sg"
    FEATURE_GSO_TCPV4 = "feature-gso-tcpv4"
    FEATURE_GSO_TCPV6 = "feature-gso-tcpv6"
    FEATURE_IPV6_CSUM_OFFLOAD = "feature-ipv6-csum-offload"
    FEATURE_RX_COPY = "feature-rx-copy"
    FEATURE_RX_FLIP = "feature-rx-flip"
    FEATURE_MULTICAST_CONTROL = "feature-multicast-control"
    FEATURE_SPLIT_EVENT_CHANNELS = "feature-split-event-channels"
    MULTI_QUEUE_MAX_QUEUES = "multi-queue-max-queues"
    FEATURE_CTRL_RING = "feature-ctrl-ring"
    # written by the frontend
    TX_RING_REF = "tx-ring-ref"
    RX_RING_REF = "rx-ring-ref"
    EVENT_CHANNEL = "event-channel"
    EVENT_CHANNEL_TX = "event-channel-tx"
    EVENT_CHANNEL_RX = "event-channel-rx"
    MULTI_QUEUE_NUM_QUEUES = "multi-queue-num-queues"
    REQUEST_RX_COPY = "request-rx-copy"
    FEATURE_RX_NOTIFY = "feature-rx-notify"
    FEATURE_NO_CSUM_OFFLOAD = "feature-no-csum-offload"
    REQUEST_MULTICAST_CONTROL = "request-multicast-control"


def netif_queue_key(n: int) -> str:
    """The directory of queue ``n`` when there are two or more: ``queue-<n>``."""
    return f"queue-{n}"


# --- structs ----------------------------------------------------------------------


@final
@wire(size=12)
@dataclass(frozen=True, slots=True)
class NetifTxRequest(WireStruct):
    """``struct netif_tx_request``: one slot of a packet to send."""

    CTYPE: ClassVar[str] = "struct netif_tx_request"
    LAYOUT: ClassVar[Layout] = layout(
        ("gref", "I"), ("offset", "H"), ("flags", "H"), ("id", "H"), ("size", "H"))
    STRUCT: ClassVar[struct.Struct] = LAYOUT.struct
    FIELDS: ClassVar[tuple[Field, ...]] = LAYOUT.fields

    gref: int = 0
    offset: int = 0  #: data start in the granted page
    flags: int = 0  #: :class:`NETTXF`
    id: int = 0  #: echoed in the response
    size: int = 0  #: first slot: the packet's length; others: this slot's


@final
@wire(size=4)
@dataclass(frozen=True, slots=True)
class NetifTxResponse(WireStruct):
    """``struct netif_tx_response``."""

    CTYPE: ClassVar[str] = "struct netif_tx_response"
    LAYOUT: ClassVar[Layout] = layout(("id", "H"), ("status", "h"))
    STRUCT: ClassVar[struct.Struct] = LAYOUT.struct
    FIELDS: ClassVar[tuple[Field, ...]] = LAYOUT.fields

    id: int = 0
    status: int = 0  #: :class:`NetifRsp`


@final
@wire(size=8)
@dataclass(frozen=True, slots=True)
class NetifRxRequest(WireStruct):
    """``struct netif_rx_request``: an empty page granted writable for one rx slot."""

    CTYPE: ClassVar[str] = "struct netif_rx_request"
    LAYOUT: ClassVar[Layout] = layout(("id", "H"), ("pad", "2x"), ("gref", "I"))
    STRUCT: ClassVar[struct.Struct] = LAYOUT.struct
    FIELDS: ClassVar[tuple[Field, ...]] = LAYOUT.fields

    id: int = 0
    gref: int = 0


@final
@wire(size=8)
@dataclass(frozen=True, slots=True)
class NetifRxResponse(WireStruct):
    """``struct netif_rx_response``."""

    CTYPE: ClassVar[str] = "struct netif_rx_response"
    LAYOUT: ClassVar[Layout] = layout(
        ("id", "H"), ("offset", "H"), ("flags", "H"), ("status", "h"))
    STRUCT: ClassVar[struct.Struct] = LAYOUT.struct
    FIELDS: ClassVar[tuple[Field, ...]] = LAYOUT.fields

    id: int = 0
    offset: int = 0  #: data start in the page
    flags: int = 0  #: :class:`NETRXF`
    status: int = 0  #: > 0: bytes in this slot; < 0: :class:`NetifRsp`


_GSO: Final = struct.Struct("<HBBH")


@final
@wire(size=8)
@dataclass(frozen=True, slots=True)
class NetifExtraInfo(WireStruct):
    """``struct netif_extra_info``: overlays a tx request or an rx response slot.

    ``u`` is the 6-byte union as bytes; :meth:`gso` builds a GSO extra and the
    ``gso_*`` properties read the ``u.gso`` view, :attr:`mcast_addr` the
    ``u.mcast`` view.
    """

    CTYPE: ClassVar[str] = "struct netif_extra_info"
    LAYOUT: ClassVar[Layout] = layout(
        ("type", "B"), ("flags", "B"), ("", "6s", "u"),
        extra=(
            ("u", 2, 6),
            ("u.gso", 2, 6), ("u.gso.size", 2, 2), ("u.gso.type", 4, 1),
            ("u.gso.pad", 5, 1), ("u.gso.features", 6, 2),
            ("u.mcast", 2, 6), ("u.mcast.addr", 2, 6),
            ("u.hash", 2, 6), ("u.hash.type", 2, 1), ("u.hash.algorithm", 3, 1),
            ("u.hash.value", 4, 4),
            ("u.pad", 2, 6),
        ),
    )
    STRUCT: ClassVar[struct.Struct] = LAYOUT.struct
    FIELDS: ClassVar[tuple[Field, ...]] = LAYOUT.fields

    type: int = 0  #: :class:`NetifExtraType`
    flags: int = 0  #: :data:`XEN_NETIF_EXTRA_FLAG_MORE`
    u: bytes = bytes(6)

    @classmethod
    def gso(cls, size: int, gso_type: int, *, flags: int = 0,
            features: int = 0) -> NetifExtraInfo:
        """A GSO extra: ``u.gso`` = {size (MSS), type, pad 0, features}."""
        return cls(int(NetifExtraType.GSO), flags, _GSO.pack(size, gso_type, 0, features))

    @property
    def gso_size(self) -> int:
        v: int = _GSO.unpack(self.u)[0]
        return v

    @property
    def gso_type(self) -> int:
        v: int = _GSO.unpack(self.u)[1]
        return v

    @property
    def gso_features(self) -> int:
        v: int = _GSO.unpack(self.u)[3]
        return v

    @property
    def mcast_addr(self) -> bytes:
        return self.u


#: Slot sizes: ``sizeof(union netif_tx_sring_entry)`` and ``netif_rx_sring_entry``.
NETIF_TX_ENTRY_SIZE: Final = NetifTxRequest.STRUCT.size
NETIF_RX_ENTRY_SIZE: Final = NetifRxResponse.STRUCT.size
#: ``NET_TX_RING_SIZE`` / ``NET_RX_RING_SIZE`` of a one-page ring: 256 each.
NETIF_TX_RING_SIZE: Final = ring_nr_ents(PAGE_SIZE, NETIF_TX_ENTRY_SIZE)
NETIF_RX_RING_SIZE: Final = ring_nr_ents(PAGE_SIZE, NETIF_RX_ENTRY_SIZE)
