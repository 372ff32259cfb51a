"""netfront -> netback -> bridge -> netback -> netfront between two guests, in process.

Frames are compared byte for byte; the ``host`` fixture (or :func:`closed_clean`)
checks at the end that nothing leaked (grants, mappings, ports, maps, memory)
and that WITNESS saw nothing. Behaviours follow FreeBSD
``sys/dev/xen/netfront/netfront.c`` and Linux ``drivers/net/xen-netback``.
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_net_lib import Sink, frame, to_mbuf

from gntdma.dev.netbridge import Bridge
from gntdma.dev.netif_common import CSUM_DATA_VALID, CSUM_TCP, CSUM_TSO
from gntdma.sched import WITNESS
from gntdma.toolstack.host import Host
from gntdma.toolstack.vif import Vif, attach_vif, detach_vif

EDGES = [14, 15, 60, 1514, 4095, 4096, 4097, 8192, 9000, 61440, 65534, 65535]


def pair(host: Host, **kw: object) -> tuple[Vif, Vif, Sink, Sink, Bridge]:
    a, b = host.create_guest("a"), host.create_guest("b")
    br = Bridge()
    va = host.sched.call(lambda: attach_vif(host, a, mac=None, bridge=br, **kw))  # type: ignore[arg-type]
    vb = host.sched.call(lambda: attach_vif(host, b, mac=None, bridge=br, **kw))  # type: ignore[arg-type]
    sa, sb = Sink(), Sink()
    va.netfront.if_input = sa
    vb.netfront.if_input = sb
    return va, vb, sa, sb, br


def send(host: Host, src: Vif, dst: Vif, sink: Sink, frames: list[tuple[bytes, int, int]],
         lead: int = 0) -> None:
    want = len(sink.got) + len(frames)

    def tx() -> None:
        for f, csum, mss in frames:
            assert src.netfront.if_transmit(
                to_mbuf(src.netfront, f, csum_flags=csum, tso_segsz=mss, lead=lead)) == 0

    host.sched.call(tx)
    host.sched.run(until=lambda: len(sink.got) >= want)


def detach_all(host: Host, *vifs: Vif) -> None:
    for v in vifs:
        assert host.sched.call(lambda v=v: detach_vif(host, v)) is True


def payload(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def test_frames_of_edge_sizes_both_ways_with_and_without_gso(host: Host) -> None:
    va, vb, sa, sb, _ = pair(host)
    fa, fb = va.netfront.if_mac, vb.netfront.if_mac
    frames = []
    for i, n in enumerate(EDGES):
        gso = n > 1514
        frames.append((frame(fb, fa, payload(n - 14, i)), CSUM_TSO if gso else CSUM_TCP,
                       1448 if gso else 0))
    send(host, va, vb, sb, frames)
    assert [g[0] for g in sb.got] == [f[0] for f in frames]
    # checksum state and GSO size arrive with the frame (NETRXF_csum_blank, GSO extra)
    assert [(g[1] & CSUM_DATA_VALID != 0, g[2]) for g in sb.got] == [
        (True, f[2]) for f in frames]
    assert all(g[1] & CSUM_TSO for g, f in zip(sb.got, frames, strict=True) if f[2] != 0)
    back = [(frame(fa, fb, payload(n - 14, 100 + i)), 0, 0) for i, n in enumerate(EDGES)]
    send(host, vb, va, sa, back, lead=4000)
    assert [g[0] for g in sa.got] == [f[0] for f in back]
    st_a = va.statistics()
    assert st_a.frontend.tx_gso_packets == sum(1 for f in frames if f[2] != 0)
    assert st_a.backend.tx_gso_packets == st_a.frontend.tx_gso_packets
    assert vb.statistics().frontend.rx_gso_packets == st_a.frontend.tx_gso_packets
    assert st_a.frontend.rx_errors == st_a.backend.errors == st_a.backend.fatal_errors == 0
    detach_all(host, va, vb)


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(sizes=st.lists(st.integers(14, 65535), min_size=10, max_size=10),
       gso=st.lists(st.booleans(), min_size=10, max_size=10), lead=st.integers(0, 4095))
def test_frames_of_any_size_cross_byte_for_byte(sizes: list[int], gso: list[bool],
                                                lead: int) -> None:
    WITNESS.reset()
    host = Host()
    try:
        va, vb, _sa, sb, _ = pair(host)
        frames = [(frame(vb.netfront.if_mac, va.netfront.if_mac, payload(n - 14, n)),
                   CSUM_TSO if g else 0, 1400 if g else 0)
                  for n, g in zip(sizes, gso, strict=True)]
        send(host, va, vb, sb, frames, lead=lead)
        assert [g[0] for g in sb.got] == [f[0] for f in frames]
        assert [g[2] for g in sb.got] == [f[2] for f in frames]
        detach_all(host, va, vb)
        host.sched.yield_()
        assert host.leaks() == []
        assert WITNESS.reports == []
    finally:
        host.close()
        WITNESS.reset()


def test_multi_queue_and_split_event_channels_negotiated_and_flows_spread(host: Host) -> None:
    """netif.h: multi-queue-num-queues with queue-N/ keys; event-channel-tx/-rx."""
    va, vb, _sa, sb, _ = pair(host, queues=4)
    fe = va.dirs.frontend_path
    read = host.xenstored.read
    assert read(f"{fe}/multi-queue-num-queues") == b"4"
    for i in range(4):
        for k in ("tx-ring-ref", "rx-ring-ref", "event-channel-tx", "event-channel-rx"):
            assert host.xenstored.exists(f"{fe}/queue-{i}/{k}")
    assert not host.xenstored.exists(f"{fe}/event-channel")
    assert read(f"{fe}/request-rx-copy") == b"1"
    st = va.statistics()
    assert (st.frontend.queues, st.backend.queues) == (4, 4)
    assert st.frontend.split_event_channels and st.backend.split_event_channels
    frames = []
    for port in range(64):  # IPv4/UDP flows: same addresses, different ports
        ip = (bytes([0x45, 0, 0, 40, 0, 0, 0, 0, 64, 17, 0, 0]) + bytes([10, 0, 0, 1])
              + bytes([10, 0, 0, 2]) + port.to_bytes(2, "big") + b"\x00\x35")
        frames.append((vb.netfront.if_mac + va.netfront.if_mac + b"\x08\x00" + ip + bytes(20),
                       0, 0))
    send(host, va, vb, sb, frames)
    per_q = va.statistics().frontend.per_queue_tx_packets
    assert sum(per_q) == 64 and all(n > 0 for n in per_q), per_q
    detach_all(host, va, vb)


def test_one_queue_without_split_when_asked(host: Host) -> None:
    va, vb, _sa, sb, _ = pair(host, queues=1, split_event_channels=False)
    fe = va.dirs.frontend_path
    assert host.xenstored.exists(f"{fe}/event-channel")
    assert host.xenstored.exists(f"{fe}/tx-ring-ref")
    assert not va.statistics().backend.split_event_channels
    send(host, va, vb, sb, [(frame(vb.netfront.if_mac, va.netfront.if_mac, bytes(100)), 0, 0)])
    detach_all(host, va, vb)


def test_bridge_learns_and_never_returns_a_frame_to_its_port(host: Host) -> None:
    va, vb, sa, sb, br = pair(host)
    bcast = b"\xff" * 6
    send(host, va, vb, sb, [(frame(bcast, va.netfront.if_mac, bytes(50)), 0, 0)])
    assert sa.got == []  # flooded to b only
    send(host, vb, va, sa, [(frame(va.netfront.if_mac, vb.netfront.if_mac, bytes(50)), 0, 0)])
    assert br.lookup(va.netfront.if_mac) is va.port and br.lookup(vb.netfront.if_mac) is vb.port
    assert br.statistics().forwarded == 1
    detach_all(host, va, vb)
