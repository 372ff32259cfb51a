"""Event channels: constants and hypercall structs of ``xen/event_channel.h``.

As in :mod:`gntdma.abi.grant_table`, constants exist both as enum members
(``EVTCHNOP.send``) and as module constants with the header names
(``EVTCHNOP_send``). Structs are the x86_64 layouts, checked against the headers.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, Final, final

from gntdma.abi._wire import Field, Layout, WireStruct, layout, wire

__all__ = [
    "EVTCHNOP",
    "EVTCHNOP_alloc_unbound",
    "EVTCHNOP_bind_interdomain",
    "EVTCHNOP_bind_ipi",
    "EVTCHNOP_bind_pirq",
    "EVTCHNOP_bind_vcpu",
    "EVTCHNOP_bind_virq",
    "EVTCHNOP_close",
    "EVTCHNOP_expand_array",
    "EVTCHNOP_init_control",
    "EVTCHNOP_reset",
    "EVTCHNOP_send",
    "EVTCHNOP_set_priority",
    "EVTCHNOP_status",
    "EVTCHNOP_unmask",
    "EVTCHNSTAT",
    "EVTCHNSTAT_closed",
    "EVTCHNSTAT_interdomain",
    "EVTCHNSTAT_ipi",
    "EVTCHNSTAT_pirq",
    "EVTCHNSTAT_unbound",
    "EVTCHNSTAT_virq",
    "EVTCHN_2L_NR_CHANNELS",
    "NR_EVENT_CHANNELS",
    "EvtchnAllocUnbound",
    "EvtchnBindInterdomain",
    "EvtchnClose",
    "EvtchnSend",
    "EvtchnStatus",
    "EvtchnUnmask",
]

#: Ports of the 2-level ABI: 64 x 64 bits of ``evtchn_pending`` (x86_64).
EVTCHN_2L_NR_CHANNELS: Final = 8 * 8 * 64
#: ``NR_EVENT_CHANNELS`` (xen.h): same as :data:`EVTCHN_2L_NR_CHANNELS`.
NR_EVENT_CHANNELS: Final = EVTCHN_2L_NR_CHANNELS


class EVTCHNOP(IntEnum):
    """Commands of ``HYPERVISOR_event_channel_op(cmd, arg)`` (``EVTCHNOP_*``)."""

    bind_interdomain = 0  #: :class:`EvtchnBindInterdomain`
    bind_virq = 1  #: bind a virtual IRQ
    bind_pirq = 2  #: bind a physical IRQ
    close = 3  #: :class:`EvtchnClose`
    send = 4  #: :class:`EvtchnSend`
    status = 5  #: :class:`EvtchnStatus`
    alloc_unbound = 6  #: :class:`EvtchnAllocUnbound`
    bind_ipi = 7  #: bind an inter-vCPU interrupt
    bind_vcpu = 8  #: move a port to another vCPU
    unmask = 9  #: :class:`EvtchnUnmask`
    reset = 10  #: close every port of a domain
    init_control = 11  #: FIFO ABI: register a control block
    expand_array = 12  #: FIFO ABI: add an event array page
    set_priority = 13  #: FIFO ABI: set a port's priority


EVTCHNOP_bind_interdomain: Final = EVTCHNOP.bind_interdomain
EVTCHNOP_bind_virq: Final = EVTCHNOP.bind_virq
EVTCHNOP_bind_pirq: Final = EVTCHNOP.bind_pirq
EVTCHNOP_close: Final = EVTCHNOP.close
EVTCHNOP_send: Final = EVTCHNOP.send
EVTCHNOP_status: Final = EVTCHNOP.status
EVTCHNOP_alloc_unbound: Final = EVTCHNOP.alloc_unbound
EVTCHNOP_bind_ipi: Final = EVTCHNOP.bind_ipi
EVTCHNOP_bind_vcpu: Final = EVTCHNOP.bind_vcpu
EVTCHNOP_unmask: Final = EVTCHNOP.unmask
EVTCHNOP_reset: Final = EVTCHNOP.reset
EVTCHNOP_init_control: Final = EVTCHNOP.init_control
EVTCHNOP_expand_array: Final = EVTCHNOP.expand_array
EVTCHNOP_set_priority: Final = EVTCHNOP.set_priority


class EVTCHNSTAT(IntEnum):
    """The state of a port, as ``EVTCHNOP_status`` reports it (``EVTCHNSTAT_*``)."""

    closed = 0  #: not in use
    unbound = 1  #: waiting for an interdomain bind
    interdomain = 2  #: connected to a port of another domain
    pirq = 3  #: bound to a physical IRQ
    virq = 4  #: bound to a virtual IRQ
    ipi = 5  #: bound to an inter-vCPU interrupt


EVTCHNSTAT_closed: Final = EVTCHNSTAT.closed
EVTCHNSTAT_unbound: Final = EVTCHNSTAT.unbound
EVTCHNSTAT_interdomain: Final = EVTCHNSTAT.interdomain
EVTCHNSTAT_pirq: Final = EVTCHNSTAT.pirq
EVTCHNSTAT_virq: Final = EVTCHNSTAT.virq
EVTCHNSTAT_ipi: Final = EVTCHNSTAT.ipi


@final
@wire(size=8)
@dataclass(frozen=True, slots=True)
class EvtchnAllocUnbound(WireStruct):
    """``struct evtchn_alloc_unbound``: a port in ``dom`` that ``remote_dom`` may bind.

    IN: ``dom`` (``DOMID_SELF`` unless privileged), ``remote_dom``; OUT: ``port``.
    """

    CTYPE: ClassVar[str] = "struct evtchn_alloc_unbound"
    LAYOUT: ClassVar[Layout] = layout(("dom", "H"), ("remote_dom", "H"), ("port", "I"))
    STRUCT: ClassVar[struct.Struct] = LAYOUT.struct
    FIELDS: ClassVar[tuple[Field, ...]] = LAYOUT.fields

    dom: int = 0
    remote_dom: int = 0
    port: int = 0


@final
@wire(size=12)
@dataclass(frozen=True, slots=True)
class EvtchnBindInterdomain(WireStruct):
    """``struct evtchn_bind_interdomain``: connect to an unbound port of another domain.

    IN: ``remote_dom``, ``remote_port``; OUT: ``local_port`` (starts pending).
    """

    CTYPE: ClassVar[str] = "struct evtchn_bind_interdomain"
    LAYOUT: ClassVar[Layout] = layout(
        ("remote_dom", "H"),
        ("", "2x"),
        ("remote_port", "I"),
        ("local_port", "I"),
    )
    STRUCT: ClassVar[struct.Struct] = LAYOUT.struct
    FIELDS: ClassVar[tuple[Field, ...]] = LAYOUT.fields

    remote_dom: int = 0
    remote_port: int = 0
    local_port: int = 0


@final
@wire(size=4)
@dataclass(frozen=True, slots=True)
class EvtchnSend(WireStruct):
    """``struct evtchn_send``: raise the peer end of ``port``."""

    CTYPE: ClassVar[str] = "struct evtchn_send"
    LAYOUT: ClassVar[Layout] = layout(("port", "I"))
    STRUCT: ClassVar[struct.Struct] = LAYOUT.struct
    FIELDS: ClassVar[tuple[Field, ...]] = LAYOUT.fields

    port: int = 0


@final
@wire(size=4)
@dataclass(frozen=True, slots=True)
class EvtchnClose(WireStruct):
    """``struct evtchn_close``: close ``port`` (an interdomain peer goes back to unbound)."""

    CTYPE: ClassVar[str] = "struct evtchn_close"
    LAYOUT: ClassVar[Layout] = layout(("port", "I"))
    STRUCT: ClassVar[struct.Struct] = LAYOUT.struct
    FIELDS: ClassVar[tuple[Field, ...]] = LAYOUT.fields

    port: int = 0


@final
@wire(size=4)
@dataclass(frozen=True, slots=True)
class EvtchnUnmask(WireStruct):
    """``struct evtchn_unmask``: clear the mask bit, re-deliver if pending."""

    CTYPE: ClassVar[str] = "struct evtchn_unmask"
    LAYOUT: ClassVar[Layout] = layout(("port", "I"))
    STRUCT: ClassVar[struct.Struct] = LAYOUT.struct
    FIELDS: ClassVar[tuple[Field, ...]] = LAYOUT.fields

    port: int = 0


_U16: Final = 0xFFFF


@final
@wire(size=24)
@dataclass(frozen=True, slots=True)
class EvtchnStatus(WireStruct):
    """``struct evtchn_status``: IN ``dom``, ``port``; OUT ``status``, ``vcpu``, ``u``.

    The 8-byte union ``u`` is held as two explicit u32 words, ``u_lo`` (offset 16)
    and ``u_hi`` (offset 20); its C views are the properties
    :attr:`unbound_dom` (``u.unbound.dom``), :attr:`interdomain_dom` and
    :attr:`interdomain_port` (``u.interdomain``), :attr:`pirq` and :attr:`virq`.
    Build one with the ``of_*`` constructors.
    """

    CTYPE: ClassVar[str] = "struct evtchn_status"
    LAYOUT: ClassVar[Layout] = layout(
        ("dom", "H"),
        ("", "2x"),
        ("port", "I"),
        ("status", "I"),
        ("vcpu", "I"),
        ("", "I", "u_lo"),
        ("", "I", "u_hi"),
        extra=(
            ("u", 16, 8),
            ("u.unbound", 16, 2),
            ("u.unbound.dom", 16, 2),
            ("u.interdomain", 16, 8),
            ("u.interdomain.dom", 16, 2),
            ("u.interdomain.port", 20, 4),
            ("u.pirq", 16, 4),
            ("u.virq", 16, 4),
        ),
    )
    STRUCT: ClassVar[struct.Struct] = LAYOUT.struct
    FIELDS: ClassVar[tuple[Field, ...]] = LAYOUT.fields

    dom: int = 0
    port: int = 0
    status: int = 0  #: ``EVTCHNSTAT_*``
    vcpu: int = 0
    u_lo: int = 0  #: u32 at offset 16: ``u.pirq``, ``u.virq``; low half ``u.*.dom``
    u_hi: int = 0  #: u32 at offset 20: ``u.interdomain.port``

    @property
    def unbound_dom(self) -> int:
        """``u.unbound.dom``: the domain allowed to bind an unbound port."""
        return self.u_lo & _U16

    @property
    def interdomain_dom(self) -> int:
        """``u.interdomain.dom``: the peer domain of an interdomain port."""
        return self.u_lo & _U16

    @property
    def interdomain_port(self) -> int:
        """``u.interdomain.port``: the peer port of an interdomain port."""
        return self.u_hi

    @property
    def pirq(self) -> int:
        """``u.pirq``."""
        return self.u_lo

    @property
    def virq(self) -> int:
        """``u.virq``."""
        return self.u_lo

    @classmethod
    def of_unbound(cls, dom: int, port: int, vcpu: int, remote_dom: int) -> EvtchnStatus:
        """The reply for an unbound port reserved for ``remote_dom``."""
        return cls(dom, port, EVTCHNSTAT_unbound, vcpu, remote_dom, 0)

    @classmethod
    def of_interdomain(cls, dom: int, port: int, vcpu: int, remote_dom: int,
                       remote_port: int) -> EvtchnStatus:
        """The reply for a port connected to ``remote_port`` of ``remote_dom``."""
        return cls(dom, port, EVTCHNSTAT_interdomain, vcpu, remote_dom, remote_port)

    @classmethod
    def of_pirq(cls, dom: int, port: int, vcpu: int, pirq: int) -> EvtchnStatus:
        """The reply for a port bound to a physical IRQ."""
        return cls(dom, port, EVTCHNSTAT_pirq, vcpu, pirq, 0)

    @classmethod
    def of_virq(cls, dom: int, port: int, vcpu: int, virq: int) -> EvtchnStatus:
        """The reply for a port bound to a virtual IRQ."""
        return cls(dom, port, EVTCHNSTAT_virq, vcpu, virq, 0)
