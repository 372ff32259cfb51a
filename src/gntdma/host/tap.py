"""TAP devices: Linux network stacks at the edge of the emulated host.

A :class:`Tap` is ``/dev/net/tun`` opened with ``IFF_TAP | IFF_NO_PI |
IFF_VNET_HDR`` (``<linux/if_tun.h>``): every frame read or written is
preceded by a ``struct virtio_net_hdr`` (``<linux/virtio_net.h>``, its size
set with ``TUNSETVNETHDRSZ``), which carries what netif carries in its flags
and GSO extra slot. ``TUNSETOFFLOAD`` with ``TUN_F_CSUM | TUN_F_TSO4 |
TUN_F_TSO6`` lets Linux hand over TCP super-frames of up to 64 KiB with the
checksum left blank; the kernel refuses TSO without ``TUN_F_CSUM``
(``drivers/net/tun.c``, ``set_offload``), so :func:`offload_flags` never asks
for one without the other.

The descriptor is non-blocking. The reactor calls :meth:`Tap._readable` in the
hub whenever it is readable; it reads until ``EAGAIN`` (at most
:data:`RX_BUDGET` frames per wakeup, so that the hub goes on) and hands each
frame with its :class:`TapMeta` to the device's ``sink``. Frames are written
at once while the descriptor takes them; when a write would block, they wait
in a bounded queue that the reactor's writer drains when there is room (a
frame that finds the queue full is dropped and counted, as a NIC's full
transmit queue drops).

Conversions (Linux ``virtio_net_hdr_to_skb``/``virtio_net_hdr_from_skb`` on
one side, netif's ``NETTXF_csum_blank``/``NETTXF_data_validated`` and its GSO
extra on the other):

- ``VIRTIO_NET_HDR_F_NEEDS_CSUM`` is a blank checksum: ``csum_blank`` and
  ``data_validated`` (Linux netback sets both for ``CHECKSUM_PARTIAL``,
  ``xenvif_rx_action``/``xenvif_rx_next_skb``);
  ``VIRTIO_NET_HDR_F_DATA_VALID`` is ``data_validated``;
- ``VIRTIO_NET_HDR_GSO_TCPV4``/``TCPV6`` are ``XEN_NETIF_GSO_TYPE_TCPV4``/
  ``TCPV6`` with the same segment size; ECN is dropped from the type (the
  segments keep their TCP flags); UDP fragmentation offload is never
  negotiated;
- towards Linux, a validated checksum (``data_validated`` without
  ``csum_blank``: FreeBSD's netfront folds ``NETRXF_csum_blank`` into
  ``CSUM_DATA_VALID``, so a blank one may hide there) is written as a partial
  one too: ``tun_get_user`` takes only ``VIRTIO_NET_HDR_F_NEEDS_CSUM`` from the
  header (``virtio_net_hdr_to_skb`` ignores ``DATA_VALID``, so a frame marked
  so would have its checksum verified, and a blank one dropped), and a
  ``CHECKSUM_PARTIAL`` frame is delivered to a local socket unchecked
  (``skb_csum_unnecessary``). The namespaces are endpoints: nothing forwards
  such a frame on;
- towards Linux, a blank checksum needs ``csum_start``/``csum_offset``: they
  are found by parsing the Ethernet, IPv4/IPv6 and TCP/UDP headers, as Linux
  netback's ``skb_checksum_setup`` does for a frame from a guest; a frame
  whose headers cannot be parsed is dropped and counted in ``errors``.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, final

from gntdma.abi.netif import (
    XEN_NETIF_GSO_TYPE_NONE,
    XEN_NETIF_GSO_TYPE_TCPV4,
    XEN_NETIF_GSO_TYPE_TCPV6,
)
from gntdma.host.netns import NetnsError
from gntdma.sched import Reactor

__all__ = [
    "IFF_NO_PI",
    "IFF_TAP",
    "IFF_VNET_HDR",
    "RX_BUDGET",
    "TUNSETIFF",
    "TUNSETOFFLOAD",
    "TUNSETVNETHDRSZ",
    "TUN_F_CSUM",
    "TUN_F_TSO4",
    "TUN_F_TSO6",
    "TXQ_MAX",
    "VIRTIO_NET_HDR",
    "Tap",
    "TapMeta",
    "TapStatistics",
    "csum_location",
    "meta_from_vnet_hdr",
    "offload_flags",
    "vnet_hdr_from_meta",
]

# <linux/if_tun.h>
TUNSETIFF: Final = 0x400454CA  # _IOW('T', 202, int)
TUNSETOFFLOAD: Final = 0x400454D0  # _IOW('T', 208, unsigned int)
TUNSETVNETHDRSZ: Final = 0x400454D8  # _IOW('T', 216, int)
IFF_TAP: Final = 0x0002
IFF_NO_PI: Final = 0x1000
IFF_VNET_HDR: Final = 0x4000
TUN_F_CSUM: Final = 0x01
TUN_F_TSO4: Final = 0x02
TUN_F_TSO6: Final = 0x04

# <linux/virtio_net.h>
VIRTIO_NET_HDR_F_NEEDS_CSUM: Final = 1
VIRTIO_NET_HDR_F_DATA_VALID: Final = 2
VIRTIO_NET_HDR_GSO_NONE: Final = 0
VIRTIO_NET_HDR_GSO_TCPV4: Final = 1
VIRTIO_NET_HDR_GSO_TCPV6: Final = 4
VIRTIO_NET_HDR_GSO_ECN: Final = 0x80
#: ``struct virtio_net_hdr``: flags, gso_type, hdr_len, gso_size, csum_start,
#: csum_offset, in the host's byte order (a legacy header, no TUNSETVNETLE).
VIRTIO_NET_HDR: Final = struct.Struct("=BBHHHH")
assert VIRTIO_NET_HDR.size == 10

#: Frames read per reactor wakeup at most.
RX_BUDGET: Final = 256
#: Frames waiting for room in the device at most.
TXQ_MAX: Final = 1024
#: The largest frame read: a 64 KiB super-frame and its Ethernet header.
_RX_BUF: Final = VIRTIO_NET_HDR.size + 65536 + 14 + 4

_ETH_P_IP: Final = 0x0800
_ETH_P_IPV6: Final = 0x86DD
_ETH_P_8021Q: Final = 0x8100
_IPPROTO_TCP: Final = 6
_IPPROTO_UDP: Final = 17
#: IPv6 extension headers skipped when looking for TCP or UDP (hop-by-hop,
#: routing, destination options).
_IPV6_EXT: Final = frozenset((0, 43, 60))


@dataclass(frozen=True, slots=True)
class TapMeta:
    """What netif says of a frame besides its bytes (as in the bridge's NetMeta)."""

    gso_type: int = XEN_NETIF_GSO_TYPE_NONE
    gso_size: int = 0
    csum_blank: bool = False
    data_validated: bool = False


_PLAIN: Final = TapMeta()


def offload_flags(csum: bool, tso: bool) -> int:
    """``TUNSETOFFLOAD``'s argument: TSO only with checksum offload on."""
    if not csum:
        return 0
    return TUN_F_CSUM | (TUN_F_TSO4 | TUN_F_TSO6 if tso else 0)


def meta_from_vnet_hdr(hdr: bytes | memoryview) -> TapMeta | None:
    """The netif view of a ``virtio_net_hdr`` read from Linux; None if netif cannot carry it."""
    flags, gso_type, _hdr_len, gso_size, _cs, _co = VIRTIO_NET_HDR.unpack_from(hdr)
    gso = gso_type & ~VIRTIO_NET_HDR_GSO_ECN
    if gso == VIRTIO_NET_HDR_GSO_NONE:
        xgso, size = XEN_NETIF_GSO_TYPE_NONE, 0
    elif gso == VIRTIO_NET_HDR_GSO_TCPV4:
        xgso, size = XEN_NETIF_GSO_TYPE_TCPV4, gso_size
    elif gso == VIRTIO_NET_HDR_GSO_TCPV6:
        xgso, size = XEN_NETIF_GSO_TYPE_TCPV6, gso_size
    else:
        return None
    if xgso != XEN_NETIF_GSO_TYPE_NONE and size == 0:
        return None
    blank = (flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) != 0
    valid = blank or (flags & VIRTIO_NET_HDR_F_DATA_VALID) != 0
    if xgso == XEN_NETIF_GSO_TYPE_NONE and not blank and not valid:
        return _PLAIN
    return TapMeta(xgso, size, blank, valid)


def csum_location(frame: bytes | memoryview) -> tuple[int, int, int] | None:
    """``(csum_start, csum_offset, header length)`` of a TCP or UDP frame, or None.

    The Ethernet header (one 802.1Q tag allowed), the IPv4 header with its
    options or the IPv6 header and hop-by-hop/routing/destination extension
    headers, then TCP (checksum at 16, header length from its data offset)
    or UDP (checksum at 6, 8 bytes).
    """
    n = len(frame)
    if n < 14:
        return None
    off = 12
    etype = (frame[off] << 8) | frame[off + 1]
    off += 2
    if etype == _ETH_P_8021Q:
        if n < 18:
            return None
        etype = (frame[16] << 8) | frame[17]
        off = 18
    if etype == _ETH_P_IP:
        if n < off + 20 or frame[off] >> 4 != 4:
            return None
        ihl = (frame[off] & 0x0F) * 4
        frag = ((frame[off + 6] & 0x3F) << 8) | frame[off + 7]  # MF and the offset
        if ihl < 20 or frag != 0:
            return None  # a fragment has no transport header to fill
        proto = frame[off + 9]
        off += ihl
    elif etype == _ETH_P_IPV6:
        if n < off + 40:
            return None
        proto = frame[off + 6]
        off += 40
        while proto in _IPV6_EXT:
            if n < off + 8:
                return None
            proto, off = frame[off], off + (frame[off + 1] + 1) * 8
    else:
        return None
    if proto == _IPPROTO_TCP:
        if n < off + 20:
            return None
        thl = (frame[off + 12] >> 4) * 4
        if thl < 20 or n < off + thl:
            return None
        return off, 16, off + thl
    if proto == _IPPROTO_UDP:
        if n < off + 8:
            return None
        return off, 6, off + 8
    return None


def vnet_hdr_from_meta(frame: bytes | memoryview, meta: TapMeta) -> bytes | None:
    """The ``virtio_net_hdr`` for writing ``frame`` to Linux; None if it cannot be made."""
    plain = VIRTIO_NET_HDR.pack(0, VIRTIO_NET_HDR_GSO_NONE, 0, 0, 0, 0)
    if meta.gso_type == XEN_NETIF_GSO_TYPE_NONE and not meta.csum_blank \
            and not meta.data_validated:
        return plain
    loc = csum_location(frame)
    if loc is None:
        # Validated but no TCP/UDP header: nothing for Linux to skip.
        return None if meta.csum_blank or meta.gso_type != XEN_NETIF_GSO_TYPE_NONE else plain
    start, offset, hdr_len = loc
    if meta.gso_type == XEN_NETIF_GSO_TYPE_TCPV4:
        gso = VIRTIO_NET_HDR_GSO_TCPV4
    elif meta.gso_type == XEN_NETIF_GSO_TYPE_TCPV6:
        gso = VIRTIO_NET_HDR_GSO_TCPV6
    elif meta.gso_type == XEN_NETIF_GSO_TYPE_NONE:
        gso = VIRTIO_NET_HDR_GSO_NONE
    else:
        return None
    if gso != VIRTIO_NET_HDR_GSO_NONE and (offset != 16 or meta.gso_size == 0):
        return None  # TSO of anything but TCP, or without a segment size
    # A GSO frame's checksum is always partial: Linux segments it and fills
    # each segment's (netif puts csum_blank on GSO packets in any case).
    return VIRTIO_NET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, gso, hdr_len,
                               meta.gso_size if gso != VIRTIO_NET_HDR_GSO_NONE else 0,
                               start, offset)


@dataclass(slots=True)
class TapStatistics:
    """Counters of one TAP device (from gntdma's side: rx is read from Linux)."""

    rx_packets: int = 0
    rx_bytes: int = 0
    rx_gso_packets: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    tx_gso_packets: int = 0
    drops: int = 0
    errors: int = 0
    tx_queued: int = 0


#: What a TAP hands each frame it reads to.
TapSink = Callable[[bytes, TapMeta], None]


@final
class Tap:
    """One TAP device, non-blocking, read and written through a reactor."""

    def __init__(self, name: str, *, csum: bool = True, tso: bool = True) -> None:
        if len(name) >= 16:
            raise NetnsError(f"TAP name {name!r} longer than 15 characters")
        self.name = name
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise NetnsError(f"/dev/net/tun: {exc.strerror}") from exc
        try:
            ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            fcntl.ioctl(fd, TUNSETIFF, ifr)
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VIRTIO_NET_HDR.size))
            fcntl.ioctl(fd, TUNSETOFFLOAD, offload_flags(csum, tso))
        except OSError as exc:
            os.close(fd)
            raise NetnsError(f"TAP {name}: {exc.strerror}") from exc
        self.fd = fd
        self.offloads = offload_flags(csum, tso)
        self.stats = TapStatistics()
        self.sink: TapSink | None = None
        self._reactor: Reactor | None = None
        self._txq: collections.deque[tuple[bytes, bytes]] = collections.deque()
        self._rxbuf = bytearray(_RX_BUF)
        self.closed = False
        self.paused = False

    # -- reading (the hub) ----------------------------------------------------------

    def start(self, reactor: Reactor, sink: TapSink) -> None:
        """Deliver every frame Linux sends through this TAP to ``sink`` (in the hub)."""
        self._reactor = reactor
        self.sink = sink
        reactor.add_reader(self.fd, self._readable)

    def pause(self) -> None:
        """Stop reading (the consumer is behind); Linux queues meanwhile."""
        if not self.paused and not self.closed and self._reactor is not None:
            self.paused = True
            self._reactor.remove_reader(self.fd)

    def resume(self) -> None:
        if self.paused and not self.closed and self._reactor is not None:
            self.paused = False
            self._reactor.add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        if self.closed or self.sink is None:
            return
        buf = self._rxbuf
        view = memoryview(buf)
        hsz = VIRTIO_NET_HDR.size
        st = self.stats
        for _ in range(RX_BUDGET):
            if self.paused:
                return
            try:
                n = os.readv(self.fd, [buf])
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                st.errors += 1
                return
            if n < hsz + 14:
                st.errors += 1
                continue
            meta = meta_from_vnet_hdr(view[:hsz])
            if meta is None:
                st.drops += 1
                continue
            frame = bytes(view[hsz:n])
            st.rx_packets += 1
            st.rx_bytes += n - hsz
            if meta.gso_type != XEN_NETIF_GSO_TYPE_NONE:
                st.rx_gso_packets += 1
            self.sink(frame, meta)
        # Budget spent: more may be waiting; the reactor re-arms the reader.

    # -- writing (any thread on the scheduler) ---------------------------------------

    def write(self, frame: bytes, meta: TapMeta = _PLAIN) -> bool:
        """Send ``frame`` to Linux; False if it was dropped (bad headers, queue full)."""
        if self.closed:
            return False
        hdr = vnet_hdr_from_meta(frame, meta)
        st = self.stats
        if hdr is None:
            st.errors += 1
            return False
        if len(self._txq) > 0:
            return self._enqueue(hdr, frame)
        r = self._send(hdr, frame)
        if r == errno.EAGAIN:
            return self._enqueue(hdr, frame)
        return r == 0

    def _send(self, hdr: bytes, frame: bytes) -> int:
        st = self.stats
        try:
            os.writev(self.fd, [hdr, frame])
        except BlockingIOError:
            return errno.EAGAIN
        except OSError as exc:
            # EIO: the link is down (no carrier); EINVAL: Linux refused the
            # frame's header. Either way the frame is lost, the device goes on.
            st.errors += 1
            return exc.errno if exc.errno is not None else errno.EIO
        st.tx_packets += 1
        st.tx_bytes += len(frame)
        if hdr[1] != VIRTIO_NET_HDR_GSO_NONE:
            st.tx_gso_packets += 1
        return 0

    def _enqueue(self, hdr: bytes, frame: bytes) -> bool:
        if len(self._txq) >= TXQ_MAX:
            self.stats.drops += 1
            return False
        first = len(self._txq) == 0
        self._txq.append((hdr, frame))
        self.stats.tx_queued = len(self._txq)
        if first and self._reactor is not None:
            self._reactor.add_writer(self.fd, self._writable)
        return True

    def _writable(self) -> None:
        q = self._txq
        while len(q) > 0 and not self.closed:
            hdr, frame = q[0]
            if self._send(hdr, frame) == errno.EAGAIN:
                return  # still full: the writer stays armed
            q.popleft()
        self.stats.tx_queued = len(q)
        if self._reactor is not None:
            self._reactor.remove_writer(self.fd)

    # -- the end --------------------------------------------------------------------

    def statistics(self) -> TapStatistics:
        return self.stats

    def close(self) -> None:
        """Stop and close; Linux removes the device with its last descriptor."""
        if self.closed:
            return
        self.closed = True
        if self._reactor is not None:
            self._reactor.remove_reader(self.fd)
            self._reactor.remove_writer(self.fd)
        self.stats.drops += len(self._txq)
        self._txq.clear()
        os.close(self.fd)

    def __repr__(self) -> str:
        return f"<Tap {self.name} fd={self.fd}>"
