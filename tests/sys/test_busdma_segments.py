"""Segment building: hand-computed tables, and the coalescing rule itself."""

from __future__ import annotations

import errno
from typing import Any

import pytest
from gntdma_sys_testlib import Rec, check_segments, mk_map, mk_tag

from gntdma.sys import (
    BUS_DMA_NOWAIT,
    BUS_SPACE_UNRESTRICTED,
    M_DEVBUF,
    M_WAITOK,
    PAGE_SIZE,
    Kernel,
    bus_dma_segment_t,
    bus_dmamap_addseg,
    bus_dmamap_load,
    bus_dmamap_load_ma,
    bus_dmamap_load_phys,
    bus_dmamap_unload,
    vm_addr_bound_ok,
)

S = bus_dma_segment_t
UNR = BUS_SPACE_UNRESTRICTED
BIG = 1 << 40

# (name, tag params, physical buffer, length, expected error, expected segments)
PHYS_CASES = [
    ("contiguous pages coalesce", dict(), 0x1000, 0x3000, 0, [S(0x1000, 0x3000)]),
    ("maxsegsz splits", dict(maxsegsz=0x1000), 0x1000, 0x3000, 0,
     [S(0x1000, 0x1000), S(0x2000, 0x1000), S(0x3000, 0x1000)]),
    # chunks end at page ends; a chunk never merges partially into the last segment
    ("maxsegsz splits mid-page", dict(maxsegsz=0x1000), 0x1800, 0x2000, 0,
     [S(0x1800, 0x800), S(0x2000, 0x1000), S(0x3000, 0x800)]),
    ("boundary stops coalescing", dict(boundary=0x2000), 0x1800, 0x2000, 0,
     [S(0x1800, 0x800), S(0x2000, 0x1800)]),
    ("sub-page boundary clamps maxsegsz", dict(boundary=0x400), 0x1200, 0x900, 0,
     [S(0x1200, 0x200), S(0x1400, 0x400), S(0x1800, 0x300)]),
    ("nsegments exhausted: EFBIG", dict(maxsegsz=0x1000, nsegments=2), 0x1000, 0x3000,
     errno.EFBIG, []),
    ("exactly nsegments", dict(maxsegsz=0x1000, nsegments=3), 0x1000, 0x3000, 0,
     [S(0x1000, 0x1000), S(0x2000, 0x1000), S(0x3000, 0x1000)]),
    ("maxsize exceeded: EINVAL", dict(maxsize=0x2000), 0x1000, 0x2001, errno.EINVAL, []),
    ("zero length", dict(), 0x1000, 0, 0, []),
    ("byte buffer", dict(), 0x1FFF, 2, 0, [S(0x1FFF, 2)]),
]


@pytest.mark.parametrize(("name", "params", "pa", "length", "error", "expected"), PHYS_CASES,
                         ids=[c[0] for c in PHYS_CASES])
def test_phys_segment_table(kern: Kernel, name: str, params: dict[str, Any], pa: int,
                            length: int, error: int, expected: list[bus_dma_segment_t]) -> None:
    tag = mk_tag(kern, **params)
    map = mk_map(tag)
    cb = Rec()
    rv = bus_dmamap_load_phys(tag, map, pa, length, cb, "arg", BUS_DMA_NOWAIT)
    assert rv == (errno.EINVAL if error == errno.EINVAL else 0)
    assert cb.calls == [("arg", expected, len(expected), error)]
    if error == 0:
        check_segments(tag, expected, length)
        assert map.dm_segs == expected
    bus_dmamap_unload(tag, map)


def test_page_array_coalesces_only_contiguous_pages(kern: Kernel) -> None:
    tag = mk_tag(kern)
    map = mk_map(tag)
    cb = Rec()
    assert bus_dmamap_load_ma(tag, map, [5, 6, 9], 0x2000, 0x800, cb, None, BUS_DMA_NOWAIT) == 0
    assert cb.last[1] == [S(0x5800, 0x1800), S(0x9000, 0x800)]
    bus_dmamap_unload(tag, map)


def _expected_from_pages(kern: Kernel, va: int, length: int, maxsegsz: int, boundary: int,
                         nsegs: int) -> tuple[int, list[bus_dma_segment_t]]:
    """An independent model: walk pages, cut at maxsegsz/boundary, merge neighbours."""
    segs: list[list[int]] = []
    off = 0
    while off < length:
        pa = kern.pmap_kextract(va + off)
        n = min(PAGE_SIZE - pa % PAGE_SIZE, length - off, maxsegsz)
        if boundary:
            n = min(n, boundary - pa % boundary)
        if segs and segs[-1][0] + segs[-1][1] == pa and segs[-1][1] + n <= maxsegsz and (
                not boundary or segs[-1][0] // boundary == (pa + n - 1) // boundary):
            segs[-1][1] += n
        else:
            if len(segs) == nsegs:
                return errno.EFBIG, []
            segs.append([pa, n])
        off += n
    return 0, [S(a, n) for a, n in segs]


@pytest.mark.parametrize("maxsegsz", [512, 4096, 8192, BIG])
@pytest.mark.parametrize("boundary", [0, 4096, 16384])
@pytest.mark.parametrize("offset", [0, 100, 4095])
def test_scattered_kva_matches_model(kern: Kernel, maxsegsz: int, boundary: int,
                                     offset: int) -> None:
    va = kern.malloc(16 * PAGE_SIZE, M_DEVBUF, M_WAITOK)
    length = 13 * PAGE_SIZE + 77
    for nsegs in (UNR, 8, 30):
        tag = mk_tag(kern, maxsegsz=maxsegsz, boundary=boundary, nsegments=nsegs)
        map = mk_map(tag)
        cb = Rec()
        assert bus_dmamap_load(tag, map, va + offset, length, cb, None, BUS_DMA_NOWAIT) == 0
        want_err, want = _expected_from_pages(kern, va + offset, length, tag.maxsegsz,
                                              boundary, nsegs if nsegs >= 0 else 1 << 30)
        assert cb.last[3] == want_err
        assert cb.last[1] == want
        bus_dmamap_unload(tag, map)
    kern.free(va, M_DEVBUF)


ADDSEG_CASES = [
    # (maxsegsz, boundary, nsegments, existing, (addr, size), returned, resulting segs)
    (BIG, 0, UNR, [], (0x1000, 0x800), 0x800, [S(0x1000, 0x800)]),
    (BIG, 0, UNR, [S(0x1000, 0x800)], (0x1800, 0x800), 0x800, [S(0x1000, 0x1000)]),
    (0x1000, 0, UNR, [S(0x1000, 0x800)], (0x1800, 0x1000), 0x1000,
     [S(0x1000, 0x800), S(0x1800, 0x1000)]),
    (BIG, 0x2000, UNR, [S(0x1000, 0x1000)], (0x2000, 0x800), 0x800,
     [S(0x1000, 0x1000), S(0x2000, 0x800)]),
    (BIG, 0x2000, UNR, [], (0x1800, 0x1000), 0x800, [S(0x1800, 0x800)]),
    (BIG, 0, 1, [S(0x1000, 0x800)], (0x3000, 0x800), 0, [S(0x1000, 0x800)]),
    (BIG, 0, 1, [S(0x1000, 0x800)], (0x1800, 0x800), 0x800, [S(0x1000, 0x1000)]),
    (BIG, 0, 0, [], (0x1000, 0x800), 0, []),
]


@pytest.mark.parametrize(("maxsegsz", "boundary", "nsegs", "existing", "chunk", "ret", "after"),
                         ADDSEG_CASES)
def test_addseg_table(kern: Kernel, maxsegsz: int, boundary: int, nsegs: int,
                      existing: list[bus_dma_segment_t], chunk: tuple[int, int], ret: int,
                      after: list[bus_dma_segment_t]) -> None:
    tag = mk_tag(kern, maxsegsz=maxsegsz, boundary=boundary, nsegments=nsegs)
    segs = list(existing)
    assert bus_dmamap_addseg(tag, chunk[0], chunk[1], segs) == ret
    assert segs == after


def test_vm_addr_bound_ok() -> None:
    assert vm_addr_bound_ok(0x1000, 0x1000, 0x1000)
    assert not vm_addr_bound_ok(0x1800, 0x1000, 0x1000)
    assert vm_addr_bound_ok(0x1800, 0x1000, 0)
    assert vm_addr_bound_ok(0xFFFF_F000, 0x1000, 1 << 32)
    assert not vm_addr_bound_ok(0xFFFF_F000, 0x1001, 1 << 32)
