"""What netfront and netback share: checksum flags, MAC text, key parsing, limits.

A frontend module never imports a backend module nor the reverse; both import
this one. Checksum flags are FreeBSD's ``sys/mbuf.h`` ``CSUM_*`` values
(``m_pkthdr.csum_flags``).
"""

from __future__ import annotations

from typing import Final

from gntdma.abi.netif import XEN_NETIF_NR_SLOTS_MIN
from gntdma.abi.xen import PAGE_SIZE

__all__ = [
    "CSUM_DATA_VALID",
    "CSUM_IP6_TCP",
    "CSUM_IP6_TSO",
    "CSUM_IP6_UDP",
    "CSUM_L4_CALC",
    "CSUM_L4_VALID",
    "CSUM_PSEUDO_HDR",
    "CSUM_TCP",
    "CSUM_TSO",
    "CSUM_UDP",
    "CSUM_OFFLOAD_TX",
    "ETH_HLEN",
    "MAX_TX_REQ_FRAGS",
    "NET_RX_SLOTS_MIN",
    "XEN_NETBK_FATAL_SKB_SLOTS",
    "XEN_NETBK_LEGACY_SLOTS_MAX",
    "format_mac",
    "parse_mac",
    "parse_u32",
]

# sys/mbuf.h (FreeBSD 13+): transmit requests and receive results.
CSUM_UDP: Final = 0x00000002  #: CSUM_IP_UDP: compute the UDP checksum
CSUM_TCP: Final = 0x00000004  #: CSUM_IP_TCP: compute the TCP checksum
CSUM_TSO: Final = 0x00000010  #: CSUM_IP_TSO: TCP segmentation offload, IPv4
CSUM_IP6_UDP: Final = 0x00000200
CSUM_IP6_TCP: Final = 0x00000400
CSUM_IP6_TSO: Final = 0x00001000
CSUM_L4_CALC: Final = 0x04000000  #: receive: the L4 checksum was checked
CSUM_L4_VALID: Final = 0x08000000  #: receive: ... and is good
CSUM_DATA_VALID: Final = CSUM_L4_VALID
CSUM_PSEUDO_HDR: Final = CSUM_L4_CALC
#: Transmit flags that leave the checksum to the other end (netif ``csum_blank``).
CSUM_OFFLOAD_TX: Final = (CSUM_UDP | CSUM_TCP | CSUM_TSO | CSUM_IP6_UDP | CSUM_IP6_TCP
                          | CSUM_IP6_TSO)

#: Bytes of an Ethernet header: the smallest packet netback accepts.
ETH_HLEN: Final = 14
#: FreeBSD netfront: the most tx slots of one packet (65536 / PAGE_SIZE + 2).
MAX_TX_REQ_FRAGS: Final = 65536 // PAGE_SIZE + 2
#: Linux netfront/FreeBSD netfront: rx requests posted before the backend is told.
NET_RX_SLOTS_MIN: Final = XEN_NETIF_NR_SLOTS_MIN + 1
#: Linux netback: packets of more slots than this are dropped (xenvif_count_requests).
XEN_NETBK_LEGACY_SLOTS_MAX: Final = XEN_NETIF_NR_SLOTS_MIN
#: Linux netback ``fatal_skb_slots`` default: more slots than this disable the vif.
XEN_NETBK_FATAL_SKB_SLOTS: Final = 20


def parse_mac(text: str | None) -> bytes | None:
    """``aa:bb:cc:dd:ee:ff`` (six hex bytes, colon-separated) as 6 bytes, or None."""
    if text is None:
        return None
    parts = text.strip().split(":")
    if len(parts) != 6 or any(len(p) != 2 or not p.isascii() for p in parts):
        return None
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        return None


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def parse_u32(raw: str | None) -> int | None:
    """A decimal u32 as a peer writes it (no sign, no spaces), or None."""
    if raw is None or not 1 <= len(raw) <= 10 or not raw.isascii() or not raw.isdigit():
        return None
    v = int(raw)
    return v if v <= 0xFFFFFFFF else None
