"""The map and unmap results GNTTABOP_map_grant_ref / unmap_grant_ref hand back are
built without the dataclass __init__ (object.__new__ and each slot's setter): they
must be the objects the constructor builds, every field set, for any values."""

from __future__ import annotations

import random
from dataclasses import astuple, fields

import pytest

from gntdma.abi.grant_table import GnttabMapGrantRef, GnttabUnmapGrantRef
from gntdma.hv._grantops import _map_result, _new_map_op, _new_unmap_op, _unmap_result


def test_map_and_unmap_results_equal_the_constructors_objects() -> None:
    rng = random.Random(14)
    for _ in range(500):
        m = [rng.randrange(-(2**15), 2**64) for _ in fields(GnttabMapGrantRef)]
        u = [rng.randrange(-(2**15), 2**64) for _ in fields(GnttabUnmapGrantRef)]
        fast_m, slow_m = _new_map_op(*m), GnttabMapGrantRef(*m)
        fast_u, slow_u = _new_unmap_op(*u), GnttabUnmapGrantRef(*u)
        assert type(fast_m) is GnttabMapGrantRef and type(fast_u) is GnttabUnmapGrantRef
        assert fast_m == slow_m and astuple(fast_m) == tuple(m) and repr(fast_m) == repr(slow_m)
        assert fast_u == slow_u and astuple(fast_u) == tuple(u) and repr(fast_u) == repr(slow_u)
        assert hash(fast_m) == hash(slow_m) and hash(fast_u) == hash(slow_u)
        status = rng.randrange(-12, 1)
        assert _map_result(slow_m, status) == GnttabMapGrantRef(
            m[0], m[1], m[2], m[3], status, m[5], m[6])
        assert _unmap_result(slow_u, status) == GnttabUnmapGrantRef(u[0], u[1], u[2], status)


def test_map_result_is_frozen_like_the_constructors() -> None:
    op = _new_map_op(1, 2, 3, 4, 0, 6, 7)
    with pytest.raises(AttributeError):
        op.status = 5  # type: ignore[misc]
    assert op.pack() == GnttabMapGrantRef(1, 2, 3, 4, 0, 6, 7).pack()
