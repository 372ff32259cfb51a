"""Helpers shared by the bus_dma tests (imported by name; not a conftest)."""

from __future__ import annotations

from typing import Any

from gntdma.sys import (
    BUS_SPACE_MAXADDR,
    BUS_SPACE_MAXSIZE,
    BUS_SPACE_UNRESTRICTED,
    BusDmaLockFunc,
    BusDmaMap,
    BusDmaTag,
    Kernel,
    bus_dma_segment_t,
    bus_dma_tag_create,
    bus_dmamap_create,
    bus_get_dma_tag,
)

FOUR_GIB = 1 << 32


class Rec:
    """A bus_dma callback that records its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, list[bus_dma_segment_t], int, int]] = []

    def __call__(self, arg: Any, segs: list[bus_dma_segment_t], nseg: int, error: int) -> None:
        self.calls.append((arg, list(segs), nseg, error))

    @property
    def last(self) -> tuple[Any, list[bus_dma_segment_t], int, int]:
        return self.calls[-1]


def mk_tag(kern: Kernel, parent: BusDmaTag | None = None, *, alignment: int = 1,
           boundary: int = 0, lowaddr: int = BUS_SPACE_MAXADDR,
           highaddr: int = BUS_SPACE_MAXADDR, maxsize: int = BUS_SPACE_MAXSIZE,
           nsegments: int = BUS_SPACE_UNRESTRICTED, maxsegsz: int = BUS_SPACE_MAXSIZE,
           flags: int = 0, lockfunc: BusDmaLockFunc | None = None,
           lockfuncarg: Any = None) -> BusDmaTag:
    error, tag = bus_dma_tag_create(parent if parent is not None else bus_get_dma_tag(kern),
                                    alignment, boundary, lowaddr, highaddr, maxsize, nsegments,
                                    maxsegsz, flags, lockfunc, lockfuncarg)
    assert error == 0 and tag is not None
    return tag


def mk_map(tag: BusDmaTag, flags: int = 0) -> BusDmaMap:
    error, map = bus_dmamap_create(tag, flags)
    assert error == 0 and map is not None
    return map


def device_read(kern: Kernel, segs: list[bus_dma_segment_t]) -> bytes:
    """What a device reads through the segments."""
    return b"".join(kern.phys_read(s.ds_addr, s.ds_len) for s in segs)


def device_write(kern: Kernel, segs: list[bus_dma_segment_t], data: bytes) -> None:
    """A device writes ``data`` through the segments."""
    pos = 0
    for s in segs:
        kern.phys_write(s.ds_addr, data[pos : pos + s.ds_len])
        pos += s.ds_len
    assert pos == len(data)


def check_segments(tag: BusDmaTag, segs: list[bus_dma_segment_t], total: int) -> None:
    """Every segment obeys the tag; lengths add up."""
    assert sum(s.ds_len for s in segs) == total
    assert len(segs) <= (tag.nsegments if tag.nsegments >= 0 else 1 << 62)
    for s in segs:
        assert 0 < s.ds_len <= tag.maxsegsz
        assert s.ds_addr + s.ds_len - 1 <= tag.lowaddr or s.ds_addr > tag.highaddr
        if tag.boundary != 0:
            b = tag.boundary
            assert s.ds_addr // b == (s.ds_addr + s.ds_len - 1) // b, (s, b)
        if tag.alignment <= 4096:
            assert s.ds_addr % tag.alignment == 0, (s, tag.alignment)
