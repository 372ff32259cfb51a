"""Real Linux stacks joined to the emulated NICs through TAP devices.

The guest kernel has no IP stack, so a Linux stack plays the guest's:

- :class:`GuestTap`, in the guest: a TAP in the guest's network namespace
  joined to netfront's interface. Frames Linux sends become mbuf chains (page
  clusters, checksum and TSO flags in the packet header, as FreeBSD's stack
  hands them to ``if_transmit``) sent by a guest kernel thread; frames
  netfront receives (``if_input``) are copied out of their mbufs, freed, and
  written to the TAP.
- :class:`TapPort`, in dom0: a TAP in dom0's namespace as a port of the
  learning bridge that joins the vifs. Frames Linux sends are input to the
  bridge by a dom0 kernel thread; frames the bridge delivers are written to
  the TAP.

The TAP is read in the hub (see :mod:`gntdma.host.tap`); the kernel-side work
runs on a kernel thread of the right domain, because it takes kernel locks
and allocates kernel memory. Frames read wait in a queue of at most
:data:`RXQ_MAX`; a full queue pauses reading (Linux then queues, and drops
past its own queue length, as with a slow NIC) until it drains to half.

Checksum flags are FreeBSD's ``sys/mbuf.h`` ones as netfront reads and sets
them: a blank TCP/UDP checksum is ``CSUM_TCP``/``CSUM_UDP`` (or their IPv6
forms), TSO is ``CSUM_TSO``/``CSUM_IP6_TSO`` with ``tso_segsz``; a received
frame with ``CSUM_DATA_VALID`` is written with ``VIRTIO_NET_HDR_F_DATA_VALID``
(the guest's stack trusts it, as FreeBSD's does).
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol, final

from gntdma.abi.netif import XEN_NETIF_GSO_TYPE_NONE, XEN_NETIF_GSO_TYPE_TCPV4
from gntdma.dev.netbridge import NetMeta
from gntdma.host.tap import Tap, TapMeta, csum_location
from gntdma.sched import PIDLE, Reactor, msleep, mtx_init, mtx_lock, mtx_unlock, wakeup
from gntdma.sys import (
    M_NOWAIT,
    M_PKTHDR,
    MJUMPAGESIZE,
    MT_DATA,
    Kernel,
    m_copydata,
    m_freem,
    m_getjcl,
    m_length,
    mbuf,
)

__all__ = [
    "CSUM_DATA_VALID",
    "CSUM_IP6_TCP",
    "CSUM_IP6_TSO",
    "CSUM_IP6_UDP",
    "CSUM_TCP",
    "CSUM_TSO",
    "CSUM_UDP",
    "RXQ_MAX",
    "GuestTap",
    "NetIf",
    "TapPort",
    "VifNetStatistics",
    "frame_to_mbuf",
    "mbuf_meta",
]

# FreeBSD sys/mbuf.h (13+), the values netfront uses.
CSUM_UDP: Final = 0x00000002
CSUM_TCP: Final = 0x00000004
CSUM_TSO: Final = 0x00000010
CSUM_IP6_UDP: Final = 0x00000200
CSUM_IP6_TCP: Final = 0x00000400
CSUM_IP6_TSO: Final = 0x00001000
CSUM_DATA_VALID: Final = 0x08000000  #: CSUM_L4_VALID

#: Frames read from a TAP and not yet taken by the kernel thread, at most.
RXQ_MAX: Final = 512
_ETH_P_IPV6: Final = b"\x86\xdd"


class NetIf(Protocol):
    """netfront's interface as the stack sees it (``netfront_info``)."""

    kern: Kernel
    if_input: Callable[[mbuf], None] | None
    if_mac: bytes
    if_mtu: int

    def if_transmit(self, m: mbuf) -> int: ...


class BridgeLike(Protocol):
    def add_port(self, port: Any) -> None: ...

    def remove_port(self, port: Any) -> None: ...

    def input(self, port: Any, frame: bytes, meta: NetMeta) -> None: ...


@dataclass(slots=True)
class VifNetStatistics:
    """A TAP's traffic as seen from the guest side or dom0 side."""

    name: str
    to_kernel: int = 0  #: frames from Linux handed to netfront or the bridge
    to_linux: int = 0  #: frames written to Linux
    gso_packets: int = 0
    drops: int = 0
    errors: int = 0


def frame_to_mbuf(kern: Kernel, frame: bytes, meta: TapMeta) -> mbuf | None:
    """``frame`` as a chain of page clusters with FreeBSD's transmit flags; None if no memory."""
    head: mbuf | None = None
    tail: mbuf | None = None
    view = memoryview(frame)
    off = 0
    while off < len(frame) or head is None:
        m = m_getjcl(kern, M_NOWAIT, MT_DATA, M_PKTHDR if head is None else 0, MJUMPAGESIZE)
        if m is None:
            m_freem(head)
            return None
        n = min(MJUMPAGESIZE, len(frame) - off)
        kern.kva_write(m.m_data, view[off:off + n])
        m.m_len = n
        off += n
        if head is None:
            head = m
        else:
            assert tail is not None
            tail.m_next = m
        tail = m
    ph = head.m_pkthdr
    ph.len = len(frame)
    if meta.csum_blank or meta.gso_type != XEN_NETIF_GSO_TYPE_NONE:
        loc = csum_location(frame)
        v6 = frame[12:14] == _ETH_P_IPV6
        if loc is not None and loc[1] == 16:
            ph.csum_flags = CSUM_IP6_TCP if v6 else CSUM_TCP
        elif loc is not None:
            ph.csum_flags = CSUM_IP6_UDP if v6 else CSUM_UDP
        if meta.gso_type != XEN_NETIF_GSO_TYPE_NONE:
            ph.csum_flags |= CSUM_TSO if meta.gso_type == XEN_NETIF_GSO_TYPE_TCPV4 else CSUM_IP6_TSO
            ph.tso_segsz = meta.gso_size
    return head


def mbuf_meta(m: mbuf) -> TapMeta:
    """The netif view of a received mbuf's packet header."""
    ph = m.m_pkthdr
    valid = (ph.csum_flags & CSUM_DATA_VALID) != 0
    if ph.csum_flags & (CSUM_TSO | CSUM_IP6_TSO) and ph.tso_segsz > 0:
        gso = XEN_NETIF_GSO_TYPE_TCPV4 if ph.csum_flags & CSUM_TSO else 2
        return TapMeta(gso, ph.tso_segsz, True, True)
    if valid:
        return TapMeta(data_validated=True)
    return TapMeta()


class _TapPump:
    """A TAP's frames queued in the hub, taken by one kernel thread."""

    def __init__(self, tap: Tap, reactor: Reactor, kern: Kernel, name: str) -> None:
        self.tap = tap
        self.reactor = reactor
        self.kern = kern
        self.stats = VifNetStatistics(name)
        self._q: collections.deque[tuple[bytes, TapMeta]] = collections.deque()
        self._lock = mtx_init(f"tappump {tap.name}")
        self._closing = False
        self._done = False
        self._thread = kern.sched.spawn(self._run, name=f"tap/{tap.name}", daemon=True,
                                        domain=kern)
        tap.start(reactor, self._from_linux)

    def _from_linux(self, frame: bytes, meta: TapMeta) -> None:  # in the hub
        self._q.append((frame, meta))
        if len(self._q) >= RXQ_MAX:
            self.tap.pause()
        if len(self._q) == 1:
            wakeup(self._q)

    def _run(self) -> None:
        q = self._q
        while True:
            mtx_lock(self._lock)
            while len(q) == 0 and not self._closing:
                msleep(q, self._lock, "taprx", 0.0, PIDLE)
            if self._closing:
                mtx_unlock(self._lock)
                break
            frame, meta = q.popleft()
            mtx_unlock(self._lock)
            if self.tap.paused and len(q) <= RXQ_MAX // 2:
                self.tap.resume()
            self.deliver(frame, meta)
        self._done = True
        wakeup(self)

    def deliver(self, frame: bytes, meta: TapMeta) -> None:
        raise NotImplementedError

    def to_linux(self, frame: bytes, meta: TapMeta) -> None:
        if self.tap.write(frame, meta):
            self.stats.to_linux += 1
            if meta.gso_type != XEN_NETIF_GSO_TYPE_NONE:
                self.stats.gso_packets += 1
        else:
            self.stats.drops += 1

    def stop(self) -> None:
        """Stop reading and let the kernel thread end (call from a kernel thread or the hub)."""
        self.tap.close()
        self._closing = True
        self.stats.drops += len(self._q)
        self._q.clear()
        wakeup(self._q)


@final
class GuestTap(_TapPump):
    """The guest's Linux stack on netfront: a TAP in the guest's namespace."""

    def __init__(self, nic: NetIf, tap: Tap, reactor: Reactor) -> None:
        self.nic = nic
        super().__init__(tap, reactor, nic.kern, tap.name)
        nic.if_input = self._if_input

    def deliver(self, frame: bytes, meta: TapMeta) -> None:
        m = frame_to_mbuf(self.kern, frame, meta)
        if m is None:
            self.stats.drops += 1
            return
        if meta.gso_type != XEN_NETIF_GSO_TYPE_NONE:
            self.stats.gso_packets += 1
        error = self.nic.if_transmit(m)  # the driver owns m from here
        if error == 0:
            self.stats.to_kernel += 1
        else:
            self.stats.errors += 1

    def _if_input(self, m: mbuf) -> None:
        frame = m_copydata(m, 0, m_length(m))
        meta = mbuf_meta(m)
        m_freem(m)
        if not self._closing:
            self.to_linux(frame, meta)

    def stop(self) -> None:
        self.nic.if_input = None
        super().stop()


@final
class TapPort(_TapPump):
    """dom0's Linux stack on the bridge: a TAP in dom0's namespace as a bridge port."""

    def __init__(self, bridge: BridgeLike, tap: Tap, reactor: Reactor, kern: Kernel) -> None:
        self.bridge = bridge
        super().__init__(tap, reactor, kern, tap.name)
        bridge.add_port(self)

    @property
    def name(self) -> str:
        return self.tap.name

    def deliver(self, frame: bytes, meta: TapMeta) -> None:
        m = NetMeta(meta.gso_type, meta.gso_size, meta.csum_blank, meta.data_validated)
        self.stats.to_kernel += 1
        if meta.gso_type != XEN_NETIF_GSO_TYPE_NONE:
            self.stats.gso_packets += 1
        self.bridge.input(self, frame, m)

    def port_output(self, frame: bytes, meta: NetMeta) -> None:
        if self._closing:
            self.stats.drops += 1
            return
        self.to_linux(frame, TapMeta(meta.gso_type, meta.gso_size, meta.csum_blank,
                                     meta.data_validated))

    def stop(self) -> None:
        self.bridge.remove_port(self)
        super().stop()
