"""Real Linux stacks through two TAP devices joined in the hub (no kernel driver
in between): the TAP layer alone carries ping, a verified TCP transfer and
iperf3, with TCP super-frames crossing as GSO frames both ways.

The end-to-end runs through netfront and netback are in tests/toolstack."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gntdma.host.netload import iperf3, ping, pump, random_file, tcp_transfer
from gntdma.host.netns import Netns, net_unavailable, unique_name
from gntdma.host.tap import Tap, TapMeta
from gntdma.sched import Reactor, Scheduler

pytestmark = pytest.mark.skipif(net_unavailable() is not None, reason=str(net_unavailable()))


class Wire:
    """Two namespaces, a TAP in each, every frame of one written to the other."""

    def __init__(self, sched: Scheduler, *, csum: bool = True, tso: bool = True) -> None:
        self.sched = sched
        self.reactor = Reactor(sched)
        self.a, self.b = Netns(), Netns()
        self.ta = Tap(unique_name("t"), csum=csum, tso=tso)
        self.tb = Tap(unique_name("t"), csum=csum, tso=tso)
        self.a.add_link(self.ta.name, "198.18.0.1/24", mac="02:00:00:00:00:01")
        self.b.add_link(self.tb.name, "198.18.0.2/24", mac="02:00:00:00:00:02")
        self.ta.start(self.reactor, lambda f, m: self._fwd(self.tb, f, m))
        self.tb.start(self.reactor, lambda f, m: self._fwd(self.ta, f, m))
        self.metas: list[TapMeta] = []

    def _fwd(self, to: Tap, frame: bytes, meta: TapMeta) -> None:
        if meta.gso_type != 0 and len(self.metas) < 64:
            self.metas.append(meta)
        to.write(frame, meta)

    def close(self) -> None:
        self.ta.close()
        self.tb.close()
        self.reactor.close()
        self.a.close()
        self.b.close()


@pytest.fixture
def wire(sched: Scheduler) -> Iterator[Wire]:
    w = Wire(sched)
    try:
        yield w
    finally:
        w.close()


def test_ping_gets_replies_through_two_taps(wire: Wire) -> None:
    r = pump(wire.sched, lambda: ping(wire.a, "198.18.0.2", count=5))
    assert (r.sent, r.received) == (5, 5)
    assert wire.ta.stats.rx_packets > 0 and wire.tb.stats.tx_packets > 0
    assert wire.ta.stats.errors == 0 and wire.tb.stats.errors == 0


def test_tcp_transfer_arrives_with_the_same_sha256_as_gso_frames(wire: Wire,
                                                                 tmp_path: Path) -> None:
    src = tmp_path / "random.bin"
    sha = random_file(src, 16 << 20)
    r = pump(wire.sched, lambda: tcp_transfer(wire.a, wire.b, "198.18.0.2", src, sha256=sha))
    assert r.ok, r
    # Linux handed over TCP super-frames (TSO negotiated with TUNSETOFFLOAD)
    assert wire.ta.stats.rx_gso_packets > 0
    assert any(m.gso_size > 0 and m.csum_blank for m in wire.metas)
    assert wire.tb.stats.tx_gso_packets > 0
    assert wire.ta.stats.errors + wire.tb.stats.errors == 0


def test_iperf3_completes(wire: Wire) -> None:
    r = pump(wire.sched, lambda: iperf3(wire.a, wire.b, "198.18.0.2", seconds=2))
    assert r.received_bits_per_second > 0
    assert r.congestion != ""


def test_without_tso_linux_sends_no_gso_frames(sched: Scheduler, tmp_path: Path) -> None:
    w = Wire(sched, csum=True, tso=False)
    try:
        src = tmp_path / "random.bin"
        sha = random_file(src, 2 << 20)
        r = pump(w.sched, lambda: tcp_transfer(w.a, w.b, "198.18.0.2", src, sha256=sha))
        assert r.ok
        assert w.ta.stats.rx_gso_packets == 0 and w.tb.stats.rx_gso_packets == 0
    finally:
        w.close()
