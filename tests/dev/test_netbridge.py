"""The learning bridge's ingress rule for source addresses.

Linux net/bridge/br_input.c ``br_handle_frame``: ``if
(!is_valid_ether_addr(eth_hdr(skb)->h_source)) goto drop;`` before anything
else, so a frame whose source is a group address (multicast, broadcast) or
all zeros is dropped, neither forwarded nor learnt (``br_fdb_update`` is
never reached); include/linux/etherdevice.h ``is_valid_ether_addr``: not
multicast and not zero.
"""

from __future__ import annotations

import pytest

from gntdma.dev.netbridge import Bridge, NetMeta


class _Port:
    def __init__(self, name: str) -> None:
        self.name = name
        self.got: list[bytes] = []

    def port_output(self, frame: bytes, meta: NetMeta) -> None:
        self.got.append(frame)


A = b"\x02\x00\x00\x00\x00\x0a"
B = b"\x02\x00\x00\x00\x00\x0b"


@pytest.mark.parametrize("src", [b"\x00" * 6, b"\x01\x00\x5e\x00\x00\x01", b"\xff" * 6],
                         ids=["zero", "multicast", "broadcast"])
def test_a_frame_with_an_invalid_source_mac_is_dropped_and_not_learnt(src: bytes) -> None:
    br = Bridge()
    p0, p1 = _Port("p0"), _Port("p1")
    br.add_port(p0)
    br.add_port(p1)
    for dst in (b"\xff" * 6, B):  # broadcast, and unknown unicast: both would flood
        br.input(p0, dst + src + b"\x08\x00" + bytes(46), NetMeta())
    assert br.lookup(src) is None
    assert p1.got == [] and p0.got == []
    st = br.statistics()
    assert (st.frames, st.invalid_source, st.flooded, st.macs) == (2, 2, 0, 0)


def test_a_frame_with_a_valid_source_is_still_learnt_and_flooded() -> None:
    br = Bridge()
    p0, p1 = _Port("p0"), _Port("p1")
    br.add_port(p0)
    br.add_port(p1)
    br.input(p0, B + A + b"\x08\x00" + bytes(46), NetMeta())
    assert br.lookup(A) is p0 and len(p1.got) == 1
    assert br.statistics().invalid_source == 0
