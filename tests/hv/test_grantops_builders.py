"""The op builders callers use in place of the frozen dataclasses' keyword
constructors (hv.map_grant_ref_op, hv.unmap_grant_ref_op), and xenstored's node
builder: the objects the constructors build, every field set, for any values."""

from __future__ import annotations

import random
from dataclasses import astuple

from gntdma.abi.grant_table import (
    GNTMAP_host_map,
    GNTMAP_readonly,
    GnttabMapGrantRef,
    GnttabUnmapGrantRef,
)
from gntdma.hv import map_grant_ref_op, unmap_grant_ref_op
from gntdma.xenstored._home import _node
from gntdma.xenstored._tree import Node, Perm, XsPerm


def test_the_op_builders_build_what_the_keyword_constructors_build() -> None:
    rng = random.Random(13)
    for flags in (GNTMAP_host_map | GNTMAP_readonly, GNTMAP_host_map, 0, 7):
        for _ in range(200):
            addr, ref, dom, handle = (rng.randrange(0, 2**64) for _ in range(4))
            fast_m = map_grant_ref_op(addr, flags, ref, dom)
            slow_m = GnttabMapGrantRef(host_addr=addr, flags=flags, ref=ref, dom=dom)
            fast_u = unmap_grant_ref_op(addr, handle)
            slow_u = GnttabUnmapGrantRef(host_addr=addr, handle=handle)
            assert type(fast_m) is GnttabMapGrantRef and type(fast_u) is GnttabUnmapGrantRef
            assert fast_m == slow_m and astuple(fast_m) == astuple(slow_m)
            assert repr(fast_m) == repr(slow_m) and hash(fast_m) == hash(slow_m)
            assert type(fast_m.flags) is type(slow_m.flags)
            assert fast_u == slow_u and astuple(fast_u) == astuple(slow_u)
            assert repr(fast_u) == repr(slow_u) and hash(fast_u) == hash(slow_u)


def test_the_node_builder_builds_what_the_constructor_builds() -> None:
    rng = random.Random(3)
    for _ in range(300):
        perms = tuple(Perm(rng.randrange(0, 70000), XsPerm(rng.randrange(0, 4)))
                      for _ in range(rng.randrange(1, 4)))
        children = tuple(f"c{rng.randrange(100)}" for _ in range(rng.randrange(0, 4)))
        value = rng.randbytes(rng.randrange(0, 9))
        gen = rng.randrange(0, 2**40)
        fast, slow = _node(value, perms, children, gen), Node(value, perms, children, gen)
        assert type(fast) is Node and fast == slow and astuple(fast) == astuple(slow)
        assert repr(fast) == repr(slow) and hash(fast) == hash(slow)
