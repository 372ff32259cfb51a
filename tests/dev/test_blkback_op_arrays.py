"""blkback's op arrays: a member of every op written and read at once.

blkback packs the ``struct gnttab_map_grant_ref`` / ``struct
gnttab_unmap_grant_ref`` of a batch in one buffer (the array form of
``HYPERVISOR_grant_table_op``, ``xen/include/public/grant_table.h``: the structs
back to back, little-endian here) and reads each op's status and handle back.
It fills a template op repeated and writes the members that differ per op as
one column (a strided slice of the buffer on a little-endian host, op by op
with the struct elsewhere): the bytes must be those of each op packed alone.
"""

from __future__ import annotations

import random

import pytest

from gntdma.abi.grant_table import GnttabMapGrantRef, GnttabUnmapGrantRef
from gntdma.dev import blkback_io
from gntdma.dev.blkback_io import (
    _MAP_ADDR,
    _MAP_HANDLE,
    _MAP_REF,
    _MAP_STATUS,
    _UNMAP_ADDR,
    _UNMAP_HANDLE,
    _UNMAP_STATUS,
    _get_column,
    _put_column,
)

_MAP = GnttabMapGrantRef.STRUCT
_UNMAP = GnttabUnmapGrantRef.STRUCT


@pytest.mark.parametrize("columns", [True, False])
def test_op_array_columns_are_the_members_of_each_op_packed_alone(
        columns: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blkback_io, "_COLUMNS", columns and blkback_io._COLUMNS)
    rng = random.Random(7)
    for n in (1, 2, 11, 256):
        addrs = [rng.randrange(1 << 52) << 12 for _ in range(n)]
        refs = [rng.randrange(1 << 32) for _ in range(n)]
        flags, dom = rng.randrange(1 << 32), rng.randrange(1 << 16)
        buf = bytearray(_MAP.pack(0, flags, 0, dom, -1, 0, 0) * n)
        _put_column(buf, _MAP_ADDR, _MAP, addrs)
        _put_column(buf, _MAP_REF, _MAP, refs)
        assert bytes(buf) == b"".join(_MAP.pack(a, flags, r, dom, -1, 0, 0)
                                      for a, r in zip(addrs, refs, strict=True))
        # What the hypervisor writes back, read as columns.
        out = [(rng.randrange(-16, 1), rng.randrange(1 << 32)) for _ in range(n)]
        for i, (status, handle) in enumerate(out):
            _MAP.pack_into(buf, i * _MAP.size, addrs[i], flags, refs[i], dom, status, handle,
                           rng.randrange(1 << 64))
        assert _get_column(buf, _MAP_STATUS, _MAP) == [s for s, _h in out]
        assert _get_column(buf, _MAP_HANDLE, _MAP) == [h for _s, h in out]
        handles = [rng.randrange(1 << 32) for _ in range(n)]
        ubuf = bytearray(_UNMAP.pack(0, 0, 0, -1) * n)
        _put_column(ubuf, _UNMAP_ADDR, _UNMAP, addrs)
        _put_column(ubuf, _UNMAP_HANDLE, _UNMAP, handles)
        assert bytes(ubuf) == b"".join(_UNMAP.pack(a, 0, h, -1)
                                       for a, h in zip(addrs, handles, strict=True))
        statuses = [rng.randrange(-16, 1) for _ in range(n)]
        for i, status in enumerate(statuses):
            _UNMAP.pack_into(ubuf, i * _UNMAP.size, addrs[i], 0, handles[i], status)
        assert _get_column(ubuf, _UNMAP_STATUS, _UNMAP) == statuses
