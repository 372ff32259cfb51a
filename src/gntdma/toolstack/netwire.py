"""Real network stacks on a run's NICs: namespaces, TAP devices and their addresses.

For each bridge a run uses, dom0's Linux stack is a network namespace with a
TAP that is a port of the bridge (:class:`~gntdma.host.vifnet.TapPort`); it
has address ``198.18.<bridge>.1/24``. For each vif, the guest's Linux stack is
a namespace of its own with a TAP joined to netfront
(:class:`~gntdma.host.vifnet.GuestTap`), with the vif's MAC and address
``198.18.<bridge>.<10 + n>/24``. A packet from a guest's namespace to dom0's
crosses TAP, netfront, the rings and grant tables, netback, the bridge and
TAP; between two guests on one bridge it crosses both vifs.

All of it goes with the run: :meth:`NetWiring.close`, or the namespace holders
when the run dies (see :mod:`gntdma.host.netns`). A vif's wiring also goes with
its guest: when the guest crashes, the toolstack's forced removal of the vif
(:func:`~gntdma.toolstack.vif.destroy_vif`) unwires it first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, final

from gntdma.dev.netbridge import Bridge
from gntdma.host.netns import NET_PREFIX, Netns, NetnsError, net_unavailable, unique_name
from gntdma.host.tap import Tap
from gntdma.host.vifnet import GuestTap, TapPort, VifNetStatistics
from gntdma.sched import Reactor, Scheduler
from gntdma.sys import Kernel
from gntdma.toolstack.vif import Vif

__all__ = ["GUEST_HOST_BASE", "NetWiring", "WiredBridge", "WiredVif", "net_unavailable"]

#: Guests' addresses on a bridge start at ``.GUEST_HOST_BASE``.
GUEST_HOST_BASE: Final = 10


@final
@dataclass(eq=False)
class WiredBridge:
    bridge: Bridge
    index: int
    netns: Netns
    port: TapPort
    guests: int = 0

    @property
    def address(self) -> str:
        return f"{NET_PREFIX}.{self.index}.1"


@final
@dataclass(eq=False)
class WiredVif:
    vif: Vif
    netns: Netns
    nic: GuestTap
    address: str
    bridge: WiredBridge

    @property
    def name(self) -> str:
        return self.vif.name

    def statistics(self) -> VifNetStatistics:
        return self.nic.stats


@final
class NetWiring:
    """The namespaces and TAPs of one run."""

    def __init__(self, sched: Scheduler, dom0_kernel: Kernel) -> None:
        why = net_unavailable()
        if why is not None:
            raise NetnsError(why)
        self.sched = sched
        self.dom0_kernel = dom0_kernel
        self.reactor = Reactor(sched)
        self.bridges: dict[str, WiredBridge] = {}
        self.vifs: list[WiredVif] = []
        self.closed = False

    def bridge(self, name: str) -> WiredBridge:
        """The bridge called ``name`` with dom0's namespace on it (made on first use).

        Not a scheduling point until the port is added (call on a kernel thread).
        """
        wb = self.bridges.get(name)
        if wb is not None:
            return wb
        index = len(self.bridges)
        if index > 255:
            raise NetnsError("more than 256 bridges")
        br = Bridge(name)
        ns = Netns()
        tap: Tap | None = None
        try:
            tap = Tap(unique_name("t"))
            ns.add_link(tap.name, f"{NET_PREFIX}.{index}.1/24")
        except BaseException:
            if tap is not None:
                tap.close()
            ns.close()
            raise
        port = TapPort(br, tap, self.reactor, self.dom0_kernel)
        wb = WiredBridge(br, index, ns, port)
        self.bridges[name] = wb
        return wb

    def wire(self, vif: Vif, bridge: WiredBridge, *, netns: str | None = None,
             tapname: str | None = None) -> WiredVif:
        """A namespace for ``vif``'s guest (``netns``: its name), its TAP joined to netfront."""
        n = GUEST_HOST_BASE + bridge.guests
        if n > 254:
            raise NetnsError(f"bridge {bridge.bridge.name}: more than "
                             f"{254 - GUEST_HOST_BASE} guests")
        bridge.guests += 1
        addr = f"{NET_PREFIX}.{bridge.index}.{n}"
        ns = Netns(netns)
        tap: Tap | None = None
        try:
            tap = Tap(unique_name("t"))
            tap.name = ns.add_link(tap.name, f"{addr}/24", mac=vif.mac,
                                   mtu=vif.netfront.if_mtu, rename=tapname)
        except BaseException:
            if tap is not None:
                tap.close()
            ns.close()
            raise
        nic = GuestTap(vif.netfront, tap, self.reactor)
        wv = WiredVif(vif, ns, nic, addr, bridge)
        self.vifs.append(wv)
        vif.on_destroy.append(lambda: self.unwire(wv))
        return wv

    def unwire(self, wv: WiredVif) -> None:
        """Stop ``wv``'s TAP and delete its namespace (before detaching the vif).

        A second call does nothing.
        """
        if wv in self.vifs:
            self.vifs.remove(wv)
            wv.nic.stop()
            wv.netns.close()

    def close(self) -> None:
        """Everything down: TAPs, namespaces, the reactor. Call on a kernel thread."""
        if self.closed:
            return
        self.closed = True
        for wv in list(self.vifs):
            self.unwire(wv)
        for wb in self.bridges.values():
            wb.port.stop()
            wb.netns.close()
        self.reactor.close()
