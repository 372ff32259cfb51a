"""A learning software bridge joining netback vifs (and, above the kernel, TAP devices).

What Linux's bridge does for the vifs of dom0 (``brctl addif xenbr0 vifX.Y``),
reduced to learning and forwarding:

- a :class:`BridgePort` has a ``name`` and ``port_output(frame, meta)``: the
  bridge hands it a frame; a port calls :meth:`Bridge.input` for each frame
  it receives;
- a frame whose source MAC is not a valid unicast address (a group address:
  multicast or broadcast; or all zeros) is dropped on input, neither learnt
  nor forwarded, and counted (``invalid_source``), as Linux's
  ``br_handle_frame`` (net/bridge/br_input.c) drops a frame whose source
  fails ``is_valid_ether_addr()``;
- the bridge learns the source MAC of every other frame on its input port, sends a
  frame whose destination it knows to that one port, and floods broadcast,
  multicast and unknown destinations to every port; it never sends a frame
  back to the port it came in on (nor to the port its destination is learnt
  on when that is the input port: the frame is dropped, as a bridge filters);
- :class:`NetMeta` travels with each frame: GSO type and size, and the
  checksum state (``csum_blank``: the checksum is not computed yet, netif's
  ``NETTXF_csum_blank``/``NETRXF_csum_blank``; ``data_validated``).

The bridge holds no lock while it calls a port: ``port_output`` may queue the
frame and return, or deliver it at once; a port must not call :meth:`input`
from inside ``port_output`` of the same port. Frames are immutable ``bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Protocol, final

from gntdma.sched import mtx_init, mtx_lock, mtx_unlock

__all__ = ["ETHER_ADDR_LEN", "ETHER_HDR_LEN", "Bridge", "BridgePort", "BridgeStatistics",
           "NetMeta"]

#: Bytes of a MAC address.
ETHER_ADDR_LEN: Final = 6
#: Bytes of an Ethernet header (destination, source, type).
ETHER_HDR_LEN: Final = 14
_ZERO_MAC: Final = bytes(ETHER_ADDR_LEN)


@final
@dataclass(frozen=True, slots=True)
class NetMeta:
    """What a frame carries besides its bytes."""

    gso_type: int = 0  #: 0 none, XEN_NETIF_GSO_TYPE_TCPV4 / TCPV6
    gso_size: int = 0  #: MSS of a GSO frame
    csum_blank: bool = False  #: the L4 checksum is still to be computed
    data_validated: bool = False  #: the L4 checksum has been checked


class BridgePort(Protocol):
    """A port of a :class:`Bridge`."""

    @property
    def name(self) -> str: ...

    def port_output(self, frame: bytes, meta: NetMeta) -> None:
        """The bridge delivers ``frame`` to this port."""
        ...


@final
@dataclass(frozen=True, slots=True)
class BridgeStatistics:
    ports: tuple[str, ...]
    frames: int  #: frames input
    forwarded: int  #: deliveries to one learnt port
    flooded: int  #: frames sent to every other port
    filtered: int  #: frames dropped (destination on the input port, or no other port)
    macs: int  #: addresses learnt
    invalid_source: int = 0  #: frames dropped for a group or all-zero source MAC


class Bridge:
    """A learning bridge (``name`` as in ``bridge=`` of an xl vif spec)."""

    def __init__(self, name: str = "xenbr0") -> None:
        self.name = name
        self._lock = mtx_init("bridge")
        self._ports: list[BridgePort] = []
        self._fdb: dict[bytes, BridgePort] = {}
        self._frames = 0
        self._forwarded = 0
        self._flooded = 0
        self._filtered = 0
        self._invalid_source = 0

    def __repr__(self) -> str:
        return f"<Bridge {self.name} {[p.name for p in self._ports]}>"

    def add_port(self, port: BridgePort) -> None:
        mtx_lock(self._lock)
        if all(p is not port for p in self._ports):
            self._ports.append(port)
        mtx_unlock(self._lock)

    def remove_port(self, port: BridgePort) -> None:
        """Detach ``port`` and forget the addresses learnt on it."""
        mtx_lock(self._lock)
        self._ports = [p for p in self._ports if p is not port]
        self._fdb = {mac: p for mac, p in self._fdb.items() if p is not port}
        mtx_unlock(self._lock)

    @property
    def ports(self) -> tuple[BridgePort, ...]:
        return tuple(self._ports)

    def lookup(self, mac: bytes) -> BridgePort | None:
        """The port ``mac`` was learnt on, if any."""
        return self._fdb.get(mac)

    def input(self, port: BridgePort, frame: bytes, meta: NetMeta) -> None:
        """A frame arrived on ``port``: learn, then forward or flood (no lock held after)."""
        if len(frame) < ETHER_HDR_LEN:
            self._filtered += 1
            return
        dst, src = frame[0:ETHER_ADDR_LEN], frame[ETHER_ADDR_LEN:2 * ETHER_ADDR_LEN]
        mtx_lock(self._lock)
        self._frames += 1
        if all(p is not port for p in self._ports):
            self._filtered += 1
            mtx_unlock(self._lock)
            return
        if src[0] & 1 != 0 or src == _ZERO_MAC:  # not is_valid_ether_addr(): dropped
            self._invalid_source += 1
            mtx_unlock(self._lock)
            return
        self._fdb[src] = port
        out: list[BridgePort]
        known = self._fdb.get(dst) if dst[0] & 1 == 0 else None
        if known is not None:
            out = [known] if known is not port else []
            if out:
                self._forwarded += 1
        else:
            out = [p for p in self._ports if p is not port]
            if out:
                self._flooded += 1
        if not out:
            self._filtered += 1
        mtx_unlock(self._lock)
        for p in out:
            p.port_output(frame, meta)

    def statistics(self) -> BridgeStatistics:
        return BridgeStatistics(tuple(p.name for p in self._ports), self._frames,
                                self._forwarded, self._flooded, self._filtered,
                                len(self._fdb), self._invalid_source)
