"""Event-channel structs and constants: golden bytes, union views, round trips."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gntdma.abi import event_channel as ec
from gntdma.abi._wire import WireStruct
from gntdma.abi.event_channel import (
    EVTCHNOP,
    EVTCHNSTAT,
    EvtchnAllocUnbound,
    EvtchnBindInterdomain,
    EvtchnClose,
    EvtchnSend,
    EvtchnStatus,
    EvtchnUnmask,
)
from gntdma.abi.xen import DOMID_SELF

GOLDEN: list[tuple[WireStruct, str]] = [
    (EvtchnAllocUnbound(dom=DOMID_SELF, remote_dom=0, port=5), "f07f 0000 05000000"),
    (EvtchnBindInterdomain(remote_dom=1, remote_port=7, local_port=0x10009),
     "0100 0000 07000000 09000100"),
    (EvtchnSend(port=0x1FF), "ff010000"),
    (EvtchnClose(port=4095), "ff0f0000"),
    (EvtchnUnmask(port=1), "01000000"),
    (EvtchnStatus.of_interdomain(dom=DOMID_SELF, port=3, vcpu=1, remote_dom=2, remote_port=12),
     "f07f 0000 03000000 02000000 01000000 0200 0000 0c000000"),
]


@pytest.mark.parametrize(("obj", "hexbytes"), GOLDEN, ids=lambda x: type(x).__name__)
def test_golden_bytes(obj: WireStruct, hexbytes: str) -> None:
    raw = bytes.fromhex(hexbytes.replace(" ", ""))
    assert obj.pack() == raw
    assert type(obj).unpack(raw) == obj


def test_every_evtchn_struct_has_a_golden_test() -> None:
    structs = {getattr(ec, n) for n in ec.__all__
               if isinstance(getattr(ec, n), type) and issubclass(getattr(ec, n), WireStruct)}
    assert structs == {type(o) for o, _ in GOLDEN}
    assert {c.__name__: c.STRUCT.size for c in structs} == {
        "EvtchnAllocUnbound": 8, "EvtchnBindInterdomain": 12, "EvtchnSend": 4,
        "EvtchnClose": 4, "EvtchnUnmask": 4, "EvtchnStatus": 24}


def test_status_union_views() -> None:
    s = EvtchnStatus.of_interdomain(dom=1, port=2, vcpu=0, remote_dom=3, remote_port=4)
    assert s.status == EVTCHNSTAT.interdomain
    assert (s.interdomain_dom, s.interdomain_port) == (3, 4)
    u = EvtchnStatus.of_unbound(dom=1, port=2, vcpu=0, remote_dom=7)
    assert (u.status, u.unbound_dom) == (EVTCHNSTAT.unbound, 7)
    assert u.pack()[16:24] == bytes.fromhex("0700000000000000")
    v = EvtchnStatus.of_virq(dom=1, port=2, vcpu=3, virq=0x10002)
    assert (v.status, v.virq, v.vcpu) == (EVTCHNSTAT.virq, 0x10002, 3)
    assert v.pack()[16:20] == bytes.fromhex("02000100")
    assert v.unbound_dom == 2  # the u16 view of the same bytes
    p = EvtchnStatus.of_pirq(dom=1, port=2, vcpu=0, pirq=9)
    assert (p.status, p.pirq) == (EVTCHNSTAT.pirq, 9)
    raw = bytes.fromhex("0100 0000 02000000 02000000 00000000 0500 ffff 06000000".replace(" ", ""))
    r = EvtchnStatus.unpack(raw)
    # garbage in the upper half of u.interdomain's u16 slot does not leak into .dom
    assert (r.interdomain_dom, r.interdomain_port, r.pirq) == (5, 6, 0xFFFF0005)


@pytest.mark.parametrize("cls", sorted({type(o) for o, _ in GOLDEN}, key=lambda c: c.__name__),
                         ids=lambda c: c.__name__)
@given(data=st.data())
def test_any_bytes_round_trip_except_padding(cls: type[WireStruct], data: st.DataObject) -> None:
    raw = data.draw(st.binary(min_size=cls.STRUCT.size, max_size=cls.STRUCT.size))
    mask = cls.unpack(b"\xff" * cls.STRUCT.size).pack()
    assert cls.unpack(raw).pack() == bytes(a & b for a, b in zip(raw, mask, strict=True))


def test_constants() -> None:
    assert [int(o) for o in EVTCHNOP] == list(range(14))
    assert EVTCHNOP.bind_interdomain == 0 and EVTCHNOP.set_priority == 13
    assert [(s.name, int(s)) for s in EVTCHNSTAT] == [
        ("closed", 0), ("unbound", 1), ("interdomain", 2), ("pirq", 3), ("virq", 4), ("ipi", 5)]
    assert ec.EVTCHN_2L_NR_CHANNELS == 4096 == ec.NR_EVENT_CHANNELS
