"""The bus_dma return contract (busdma.md section 5), loader by loader."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

import pytest
from gntdma_sys_testlib import Rec, check_segments, mk_map, mk_tag

from gntdma.sys import (
    BUS_DMA_ALLOCNOW,
    BUS_DMA_NOWAIT,
    BUS_SPACE_MAXADDR_32BIT,
    M_DEVBUF,
    M_PKTHDR,
    M_WAITOK,
    MJUM9BYTES,
    MT_DATA,
    PAGE_SIZE,
    UIO_WRITE,
    DmaDebugKind,
    Kernel,
    MapState,
    bus_dma_segment_t,
    bus_dmamap_load,
    bus_dmamap_load_mbuf,
    bus_dmamap_load_mbuf_sg,
    bus_dmamap_load_mem,
    bus_dmamap_load_uio,
    bus_dmamap_unload,
    iovec,
    m_append,
    m_freem,
    m_getjcl,
    mbuf,
    memdesc_vlist,
    uio,
)


class Rec2:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, list[bus_dma_segment_t], int, int, int]] = []

    def __call__(self, arg: Any, segs: list[bus_dma_segment_t], nseg: int, mapsize: int,
                 error: int) -> None:
        self.calls.append((arg, segs, nseg, mapsize, error))


def test_success_runs_callback_before_returning(kern: Kernel) -> None:
    tag = mk_tag(kern)
    map = mk_map(tag)
    va = kern.malloc(3 * PAGE_SIZE, M_DEVBUF, M_WAITOK)
    cb = Rec()
    for flags in (0, BUS_DMA_NOWAIT):
        assert bus_dmamap_load(tag, map, va, 3 * PAGE_SIZE, cb, "x", flags) == 0
        assert cb.last[0] == "x" and cb.last[3] == 0 and cb.last[2] == len(cb.last[1])
        assert map.state is MapState.LOADED and map.dm_segs == cb.last[1]
        assert map.dm_mapsize == 3 * PAGE_SIZE
        bus_dmamap_unload(tag, map)
    kern.free(va, M_DEVBUF)


def test_efbig_returns_zero_with_error_in_callback(kern: Kernel) -> None:
    tag = mk_tag(kern, nsegments=1, maxsegsz=PAGE_SIZE)
    map = mk_map(tag)
    va = kern.malloc(2 * PAGE_SIZE, M_DEVBUF, M_WAITOK)
    cb = Rec()
    assert bus_dmamap_load(tag, map, va, 2 * PAGE_SIZE, cb, None, 0) == 0
    assert cb.calls == [(None, [], 0, errno.EFBIG)]
    assert map.state is MapState.IDLE  # a failed load leaves nothing behind
    bus_dmamap_unload(tag, map)  # the usual defensive unload is fine
    assert kern.dma_debug.reports() == []
    kern.free(va, M_DEVBUF)


def test_einval_for_oversize_and_for_loaded_map(kern: Kernel) -> None:
    tag = mk_tag(kern, maxsize=PAGE_SIZE)
    map = mk_map(tag)
    va = kern.malloc(2 * PAGE_SIZE, M_DEVBUF, M_WAITOK)
    cb = Rec()
    assert bus_dmamap_load(tag, map, va, PAGE_SIZE + 1, cb, None, 0) == errno.EINVAL
    assert cb.last == (None, [], 0, errno.EINVAL)
    assert bus_dmamap_load(tag, map, va, 100, cb, None, 0) == 0
    assert bus_dmamap_load(tag, map, va, 100, cb, None, 0) == errno.EINVAL
    assert cb.last[3] == errno.EINVAL
    assert [r.kind for r in kern.dma_debug.reports()] == [DmaDebugKind.LOAD_LOADED_MAP]
    assert map.state is MapState.LOADED  # the first load is untouched
    bus_dmamap_unload(tag, map)
    kern.free(va, M_DEVBUF)


def _packet(kern: Kernel, payload: bytes) -> mbuf:
    m = m_getjcl(kern, M_WAITOK, MT_DATA, M_PKTHDR, MJUM9BYTES)
    assert m is not None
    m.m_data += 100
    assert m_append(m, len(payload), payload) == 1
    return m


def test_load_mbuf_and_mbuf_sg(kern: Kernel) -> None:
    tag = mk_tag(kern, maxsize=65536, nsegments=4, maxsegsz=PAGE_SIZE, boundary=PAGE_SIZE)
    map = mk_map(tag)
    payload = bytes(range(256)) * 30  # 7680 bytes in a scattered 9k cluster
    m = _packet(kern, payload)
    cb2 = Rec2()
    assert bus_dmamap_load_mbuf(tag, map, m, cb2, "m", 0) == 0
    arg, segs, nseg, mapsize, error = cb2.calls[-1]
    assert (arg, nseg, mapsize, error) == ("m", len(segs), len(payload), 0)
    check_segments(tag, segs, len(payload))
    assert b"".join(kern.phys_read(s.ds_addr, s.ds_len) for s in segs) == payload
    bus_dmamap_unload(tag, map)
    error, segs2, nsegs = bus_dmamap_load_mbuf_sg(tag, map, m, 0)
    assert (error, segs2, nsegs) == (0, segs, len(segs))
    bus_dmamap_unload(tag, map)
    small = mk_tag(kern, nsegments=1, maxsegsz=PAGE_SIZE)
    smap = mk_map(small)
    assert bus_dmamap_load_mbuf(small, smap, m, cb2, None, 0) == errno.EFBIG
    assert cb2.calls[-1] == (None, [], 0, 0, errno.EFBIG)
    assert bus_dmamap_load_mbuf_sg(small, smap, m, 0) == (errno.EFBIG, [], 0)
    tiny = mk_tag(kern, maxsize=1000)
    assert bus_dmamap_load_mbuf_sg(tiny, mk_map(tiny), m, 0)[0] == errno.EINVAL
    m_freem(m)


def test_load_uio_and_vlist(kern: Kernel) -> None:
    tag = mk_tag(kern)
    map = mk_map(tag)
    a = kern.malloc(300, M_DEVBUF, M_WAITOK)
    b = kern.malloc(5000, M_DEVBUF, M_WAITOK)
    u = uio([iovec(a, 300), iovec(b, 5000)], uio_resid=4000, uio_rw=UIO_WRITE)
    cb2 = Rec2()
    assert bus_dmamap_load_uio(tag, map, u, cb2, None, 0) == 0
    assert cb2.calls[-1][3] == 4000 and sum(s.ds_len for s in cb2.calls[-1][1]) == 4000
    bus_dmamap_unload(tag, map)
    cb = Rec()
    mem = memdesc_vlist([bus_dma_segment_t(a, 300), bus_dma_segment_t(b, 5000)])
    assert bus_dmamap_load_mem(tag, map, mem, cb, None, 0) == 0
    assert sum(s.ds_len for s in cb.last[1]) == 5300
    bus_dmamap_unload(tag, map)
    kern.free(a, M_DEVBUF)
    kern.free(b, M_DEVBUF)


@pytest.mark.parametrize("nowait", [True, False])
def test_enomem_only_with_nowait(kernel_factory: Callable[..., Kernel], nowait: bool) -> None:
    kern = kernel_factory(bounce_max_pages=1)

    def lockfunc(arg: Any, op: int) -> None:
        pass

    tag = mk_tag(kern, lowaddr=BUS_SPACE_MAXADDR_32BIT, maxsize=PAGE_SIZE,
                 flags=BUS_DMA_ALLOCNOW, lockfunc=lockfunc)
    hog, map = mk_map(tag), mk_map(tag)
    va = kern.kmem_alloc_attr(2 * PAGE_SIZE, M_WAITOK, 1 << 32, (1 << 64) - 1)
    assert kern.busdma.bounce_pages == 1
    assert bus_dmamap_load(tag, hog, va, PAGE_SIZE, Rec(), None, BUS_DMA_NOWAIT) == 0
    cb = Rec()
    rv = bus_dmamap_load(tag, map, va + PAGE_SIZE, PAGE_SIZE, cb, None,
                         BUS_DMA_NOWAIT if nowait else 0)
    if nowait:
        assert rv == errno.ENOMEM and cb.calls == [(None, [], 0, errno.ENOMEM)]
        assert map.state is MapState.IDLE
    else:
        assert rv == errno.EINPROGRESS and cb.calls == [] and map.state is MapState.LOADING
        bus_dmamap_unload(tag, map)
    bus_dmamap_unload(tag, hog)
    assert kern.busdma.bounce_pages_free == 1
