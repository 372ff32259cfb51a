"""TAP device rules: offload negotiation and the virtio_net_hdr <-> netif conversions.

Sources: Linux include/uapi/linux/virtio_net.h (struct virtio_net_hdr, its flags
and GSO types), include/uapi/linux/if_tun.h (ioctls, IFF_*, TUN_F_*),
drivers/net/tun.c set_offload (TSO only with TUN_F_CSUM, else EINVAL),
include/linux/virtio_net.h virtio_net_hdr_to_skb (csum_start/csum_offset of a
partial checksum), Xen include/public/io/netif.h (XEN_NETIF_GSO_TYPE_TCPV4 1,
TCPV6 2) and Linux drivers/net/xen-netback/netback.c checksum_setup (the
transport header found by parsing IPv4/IPv6 for a blank checksum)."""

from __future__ import annotations

import errno
import fcntl
import os
import struct

import pytest

from gntdma.abi.netif import (
    XEN_NETIF_GSO_TYPE_NONE,
    XEN_NETIF_GSO_TYPE_TCPV4,
    XEN_NETIF_GSO_TYPE_TCPV6,
)
from gntdma.host.netns import ip, net_unavailable, unique_name
from gntdma.host.tap import (
    IFF_NO_PI,
    IFF_TAP,
    IFF_VNET_HDR,
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUNSETIFF,
    TUNSETOFFLOAD,
    TXQ_MAX,
    VIRTIO_NET_HDR,
    Tap,
    TapMeta,
    csum_location,
    meta_from_vnet_hdr,
    offload_flags,
    vnet_hdr_from_meta,
)

needs_net = pytest.mark.skipif(net_unavailable() is not None, reason=str(net_unavailable()))

MAC = b"\x02\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x02"


def _ipv4(proto: int, l4: bytes, *, ihl: int = 5, frag: int = 0) -> bytes:
    ip = bytes([0x40 | ihl, 0]) + struct.pack("!HHH", 20 + len(l4), 1, frag) \
        + bytes([64, proto, 0, 0]) + bytes([198, 18, 0, 1, 198, 18, 0, 2]) + bytes(4 * (ihl - 5))
    return MAC + b"\x08\x00" + ip + l4


def _tcp(doff: int = 5, payload: bytes = b"x" * 100) -> bytes:
    return struct.pack("!HHIIBBHHH", 1, 2, 0, 0, doff << 4, 0x18, 1000, 0, 0) \
        + bytes(4 * (doff - 5)) + payload


def test_tso_offload_only_with_checksum_offload() -> None:
    assert offload_flags(csum=False, tso=True) == 0
    assert offload_flags(csum=True, tso=False) == TUN_F_CSUM
    assert offload_flags(csum=True, tso=True) == TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6


@needs_net
def test_linux_refuses_tso_without_checksum_offload() -> None:
    # drivers/net/tun.c set_offload: TSO bits are consumed only under
    # TUN_F_CSUM; any bit left over is -EINVAL.
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", unique_name("t").encode(),
                                               IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        with pytest.raises(OSError) as ei:
            fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_TSO4)
        assert ei.value.errno == errno.EINVAL
        assert fcntl.ioctl(fd, TUNSETOFFLOAD, offload_flags(True, True)) == 0
    finally:
        os.close(fd)


def test_needs_csum_is_csum_blank_and_data_validated() -> None:
    m = meta_from_vnet_hdr(VIRTIO_NET_HDR.pack(1, 0, 0, 0, 34, 16))
    assert m == TapMeta(XEN_NETIF_GSO_TYPE_NONE, 0, csum_blank=True, data_validated=True)
    m = meta_from_vnet_hdr(VIRTIO_NET_HDR.pack(2, 0, 0, 0, 0, 0))
    assert m == TapMeta(XEN_NETIF_GSO_TYPE_NONE, 0, csum_blank=False, data_validated=True)
    assert meta_from_vnet_hdr(VIRTIO_NET_HDR.pack(0, 0, 0, 0, 0, 0)) == TapMeta()


def test_gso_types_map_to_netif_and_ecn_is_dropped() -> None:
    m = meta_from_vnet_hdr(VIRTIO_NET_HDR.pack(1, 1 | 0x80, 66, 1448, 34, 16))
    assert m is not None and (m.gso_type, m.gso_size) == (XEN_NETIF_GSO_TYPE_TCPV4, 1448)
    m = meta_from_vnet_hdr(VIRTIO_NET_HDR.pack(1, 4, 86, 1428, 54, 16))
    assert m is not None and (m.gso_type, m.gso_size) == (XEN_NETIF_GSO_TYPE_TCPV6, 1428)


def test_udp_fragmentation_offload_and_zero_segment_size_are_not_carried() -> None:
    assert meta_from_vnet_hdr(VIRTIO_NET_HDR.pack(1, 3, 42, 1472, 34, 6)) is None
    assert meta_from_vnet_hdr(VIRTIO_NET_HDR.pack(1, 1, 54, 0, 34, 16)) is None


def test_csum_location_parses_ipv4_options_vlan_ipv6_extensions_and_udp() -> None:
    assert csum_location(_ipv4(6, _tcp())) == (34, 16, 54)
    assert csum_location(_ipv4(6, _tcp(doff=8), ihl=6)) == (38, 16, 38 + 32)
    tagged = MAC + b"\x81\x00\x00\x05" + _ipv4(17, bytes(8) + b"u")[12:]
    assert csum_location(tagged) == (38, 6, 46)
    ip6 = struct.pack("!IHBB", 0x60000000, 8 + len(_tcp()), 0, 64) + bytes(32)
    hbh = bytes([6, 0]) + bytes(6)  # hop-by-hop options, next header TCP
    assert csum_location(MAC + b"\x86\xdd" + ip6 + hbh + _tcp()) == (62, 16, 82)


def test_csum_location_refuses_fragments_short_frames_and_other_protocols() -> None:
    assert csum_location(_ipv4(6, _tcp(), frag=0x2000)) is None  # more fragments
    assert csum_location(_ipv4(6, _tcp(), frag=0x0010)) is None  # an offset
    assert csum_location(_ipv4(1, bytes(8))) is None  # ICMP
    assert csum_location(_ipv4(6, _tcp())[:40]) is None
    assert csum_location(MAC + b"\x08\x06" + bytes(28)) is None  # ARP
    assert csum_location(b"\x00" * 13) is None


def test_vnet_hdr_for_a_gso_frame_has_needs_csum_and_the_segment_size() -> None:
    frame = _ipv4(6, _tcp(payload=b"y" * 3000))
    hdr = vnet_hdr_from_meta(frame, TapMeta(XEN_NETIF_GSO_TYPE_TCPV4, 1448, True, True))
    assert hdr is not None
    assert VIRTIO_NET_HDR.unpack(hdr) == (1, 1, 54, 1448, 34, 16)
    assert vnet_hdr_from_meta(frame, TapMeta(XEN_NETIF_GSO_TYPE_TCPV6, 1448, True, True)) \
        == VIRTIO_NET_HDR.pack(1, 4, 54, 1448, 34, 16)
    assert vnet_hdr_from_meta(frame, TapMeta()) == VIRTIO_NET_HDR.pack(0, 0, 0, 0, 0, 0)


def test_a_validated_frame_is_written_with_a_partial_checksum_as_tun_ignores_data_valid() -> None:
    # Linux include/linux/virtio_net.h virtio_net_hdr_to_skb (what tun_get_user
    # calls) acts on VIRTIO_NET_HDR_F_NEEDS_CSUM only: a DATA_VALID frame has its
    # checksum verified, and the blank one FreeBSD netfront folds into
    # CSUM_DATA_VALID (netfront.c xn_rxeof) would be dropped. CHECKSUM_PARTIAL is
    # delivered unchecked (skb_csum_unnecessary).
    frame = _ipv4(6, _tcp())
    hdr = vnet_hdr_from_meta(frame, TapMeta(data_validated=True))
    assert hdr == VIRTIO_NET_HDR.pack(1, 0, 54, 0, 34, 16)
    icmp = _ipv4(1, bytes(8))  # nothing to skip: written plain
    assert vnet_hdr_from_meta(icmp, TapMeta(data_validated=True)) \
        == VIRTIO_NET_HDR.pack(0, 0, 0, 0, 0, 0)


def test_vnet_hdr_refuses_gso_of_udp_and_gso_without_segment_size() -> None:
    udp = _ipv4(17, bytes(8) + b"u" * 3000)
    assert vnet_hdr_from_meta(udp, TapMeta(XEN_NETIF_GSO_TYPE_TCPV4, 1448, True, True)) is None
    tcp = _ipv4(6, _tcp())
    assert vnet_hdr_from_meta(tcp, TapMeta(XEN_NETIF_GSO_TYPE_TCPV4, 0, True, True)) is None
    assert vnet_hdr_from_meta(udp, TapMeta(csum_blank=True, data_validated=True)) \
        == VIRTIO_NET_HDR.pack(1, 0, 42, 0, 34, 6)


@needs_net
def test_a_blank_checksum_frame_without_transport_header_is_dropped_and_counted() -> None:
    tap = Tap(unique_name("t"))
    try:
        arp = MAC + b"\x08\x06" + bytes(28)
        assert tap.write(arp, TapMeta(csum_blank=True, data_validated=True)) is False
        assert tap.stats.errors == 1 and tap.stats.tx_packets == 0
    finally:
        tap.close()


class _FakeReactor:
    def __init__(self) -> None:
        self.writers: dict[int, object] = {}

    def add_writer(self, fd: int, cb: object) -> None:
        self.writers[fd] = cb

    def remove_writer(self, fd: int) -> None:
        self.writers.pop(fd, None)

    def remove_reader(self, fd: int) -> None:
        pass


@needs_net
def test_a_write_that_would_block_waits_for_the_reactors_writer_in_a_bounded_queue(
        monkeypatch: pytest.MonkeyPatch) -> None:
    tap = Tap(unique_name("t"))
    ip("link", "set", tap.name, "up")  # a TAP that is down refuses writes with EIO
    reactor = _FakeReactor()
    tap._reactor = reactor  # type: ignore[assignment]
    full = [True]
    real_writev = os.writev

    def writev(fd: int, bufs: list[bytes]) -> int:
        if fd == tap.fd and full[0]:
            raise BlockingIOError(errno.EAGAIN, "full")
        return real_writev(fd, bufs)

    monkeypatch.setattr(os, "writev", writev)
    try:
        frame = _ipv4(1, bytes(8))
        for _ in range(TXQ_MAX + 3):
            tap.write(frame)
        assert tap.stats.tx_queued == TXQ_MAX and tap.stats.drops == 3
        assert tap.fd in reactor.writers
        full[0] = False
        tap._writable()
        assert tap.stats.tx_queued == 0 and tap.stats.tx_packets == TXQ_MAX
        assert tap.fd not in reactor.writers
    finally:
        tap.close()
