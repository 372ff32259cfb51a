"""The two load walks of a persistent map agree (``gntdma.xen.busdma_persist``).

Under a tag whose boundary and ``maxsegsz`` are ``PAGE_SIZE`` a persistent load
builds its segments from the buffer's page pieces in one pass
(``PersistentPool._load_pages``); any other tag takes the chunk walk of the
bounce layer (``_load_chunks``: FreeBSD sys/x86/x86/busdma_bounce.c
``_bus_dmamap_load_buffer``, a chunk ends at a page end, at ``maxsegsz`` and at a
boundary line, ``_bus_dmamap_addseg`` for each). On such a tag both must give the
same segments (as pool page, offset and length), the same pieces of the
caller's buffer, the same pages added and the same error, for every kind of
buffer (kernel virtual, physical, page array), chained loads, segment limits
(EFBIG) and page shortages (ENOMEM). Loads on other tags copy both ways too.
"""

from __future__ import annotations

import errno
import random

from busdma_helpers import PAGE, Loads, pattern, peer_map, peer_unmap
from hypothesis import given, settings
from hypothesis import strategies as st

from gntdma.sched import Mutex
from gntdma.sys import (
    BUS_DMA_NOWAIT,
    BUS_DMASYNC_POSTREAD,
    BUS_DMASYNC_POSTWRITE,
    BUS_DMASYNC_PREREAD,
    BUS_DMASYNC_PREWRITE,
    BUS_SPACE_MAXADDR,
    M_BUSDMA_XEN,
    M_DEVBUF,
    M_WAITOK,
    BusDmaTag,
    bus_dma_segment_t,
    bus_dma_tag_create,
    bus_dma_tag_destroy,
    bus_dmamap_create,
    bus_dmamap_destroy,
    bus_dmamap_load,
    bus_dmamap_sync,
    bus_dmamap_unload,
    busdma_lock_mutex,
)
from gntdma.toolstack.host import Guest, Host
from gntdma.xen.busdma import (
    BUS_DMA_XEN_DOMID_SHIFT,
    BUS_DMA_XEN_PERSISTENT,
    xen_dmamap_get_grefs,
    xen_get_dma_tag,
)
from gntdma.xen.busdma_persist import PersistentPool

_Outcome = tuple[int, list[tuple[int, int, int]], list[int], list[int], int]


def _tag(g: Guest, lock: Mutex, alignment: int, boundary: int, maxsegsz: int,
         nsegments: int, backend: int = 0) -> BusDmaTag:
    error, tag = bus_dma_tag_create(
        xen_get_dma_tag(g.kernel), alignment, boundary, BUS_SPACE_MAXADDR, BUS_SPACE_MAXADDR,
        64 * PAGE, nsegments, maxsegsz, backend << BUS_DMA_XEN_DOMID_SHIFT,
        busdma_lock_mutex, lock)
    assert error == 0 and tag is not None
    return tag


def _outcome(pool: PersistentPool, segs: list[bus_dma_segment_t], error: int) -> _Outcome:
    """What a walk did, independent of which pages the pool has: each segment as
    (pool page index, offset, length), the buffer pieces, the pages held, the error."""
    index = {pa >> 12: i for i, (_va, pa) in enumerate(pool.pages)}
    shape = [(index[s.ds_addr >> 12], s.ds_addr & (PAGE - 1), s.ds_len) for s in segs]
    assert [s.ds_addr for s in segs] == pool.dsts and [s.ds_len for s in segs] == pool.lens
    return error, shape, list(pool.bufs), list(pool.lens), len(pool.pages)


def _buffer(g: Guest, rng: random.Random, kind: str, alloc: list[tuple[int, int]]
            ) -> tuple[int, list[int], int]:
    """A buffer of ``kind``: (address or offset, page array, length)."""
    k = g.kernel
    npages = rng.randint(1, 12)
    off = rng.choice([0, 1, 512, 1000, 2048, PAGE - 1])
    n = rng.randint(0, npages * PAGE - off)
    if kind == "phys":  # physically contiguous
        va = k.contigmalloc(npages * PAGE, M_DEVBUF, M_WAITOK, 0, BUS_SPACE_MAXADDR, PAGE, 0)
        alloc.append((va, npages * PAGE))
        return k.pmap_kextract(va) + off, [], n
    va = k.malloc(npages * PAGE, M_DEVBUF, M_WAITOK)
    alloc.append((va, 0))
    if kind == "vaddr":
        return va + off, [], n
    return off, [k.pmap_kextract(va + i * PAGE) >> 12 for i in range(npages)], n


def test_page_walk_and_chunk_walk_give_the_same_load(host: Host) -> None:
    g = host.create_guest("g", memory_mb=16)
    lock = Mutex("drv")
    k = g.kernel
    rng = random.Random(20261203)
    tags = {(al, ns): _tag(g, lock, al, PAGE, PAGE, ns)
            for al in (1, 512, 2048, PAGE, 2 * PAGE) for ns in (1, 3, 8, -1)}
    seen: set[tuple[int, bool]] = set()
    for _case in range(400):
        tag = tags[rng.choice(list(tags))]
        pools = (PersistentPool(k), PersistentPool(k))
        preload = rng.randint(0, 4)  # pages the pools hold from earlier loads
        alloc: list[tuple[int, int]] = []
        for p in pools:
            assert p._page(tag, preload - 1)
        chained = rng.random() < 0.3
        kinds = [rng.choice(("vaddr", "phys", "ma")) for _ in range(2 if chained else 1)]
        bufs = [_buffer(g, rng, kind, alloc) for kind in kinds]
        short = rng.random() < 0.2
        got: list[_Outcome] = []
        for walk, p in zip(("_load_pages", "_load_chunks"), pools, strict=True):
            segs: list[bus_dma_segment_t] = []
            if short:
                k.inject_malloc_failure(M_BUSDMA_XEN, 1)
            error = 0
            for kind, (a, ma, n) in zip(kinds, bufs, strict=True):
                error = getattr(p, walk)(tag, kind, a, ma, n, segs)
                if error != 0:
                    break
            k._inject.clear()
            got.append(_outcome(p, segs, error))
        assert got[0] == got[1], (tag.alignment, tag.nsegments, kinds, bufs, preload, short)
        seen.add((got[0][0], chained))
        for p in pools:
            p.free()
        for va, size in alloc:
            if size != 0:
                k.contigfree(va, size, M_DEVBUF)
            else:
                k.free(va, M_DEVBUF)
    # Every outcome was met: loads that fit, EFBIG, ENOMEM, chained or not.
    assert {(0, False), (0, True), (errno.EFBIG, False), (errno.ENOMEM, False)} <= seen
    for tag in tags.values():
        assert bus_dma_tag_destroy(tag) == 0


@settings(max_examples=25, deadline=None)
@given(boundary=st.sampled_from([512, 1024, 2048, PAGE]),
       maxsegsz=st.sampled_from([512, 1536, 2048, PAGE]),
       alignment=st.sampled_from([1, 512]),
       off=st.sampled_from([0, 100, 512, 3000]), n=st.integers(1, 3 * PAGE))
def test_persistent_load_copies_both_ways_on_any_tag(boundary: int, maxsegsz: int,
                                                       alignment: int, off: int,
                                                       n: int) -> None:
    """PREWRITE puts the buffer on the granted pages, POSTREAD brings back what the
    backend wrote, whichever walk the tag takes; every segment within one page."""
    host = Host()
    try:
        g = host.create_guest("g", memory_mb=8)
        be = host.create_guest("be", memory_mb=4)
        lock = Mutex("drv")
        tag = _tag(g, lock, alignment, boundary, maxsegsz, -1, backend=be.domid)
        error, m = bus_dmamap_create(tag, BUS_DMA_XEN_PERSISTENT)
        assert error == 0 and m is not None
        data = pattern(n, 5)
        raw = g.kernel.malloc(n + off, M_DEVBUF, M_WAITOK)
        va = raw + off
        g.kernel.kva_write(va, data)
        assert bus_dmamap_load(tag, m, va, n, Loads(lock).cb, None, BUS_DMA_NOWAIT) == 0
        segs = list(m.dm_segs)
        assert sum(s.ds_len for s in segs) == n
        assert all(s.ds_len <= maxsegsz and (s.ds_addr & (PAGE - 1)) + s.ds_len <= PAGE
                   for s in segs)
        assert len({s.ds_addr >> 12 for s in segs}) == len(segs)  # a page each
        bus_dmamap_sync(tag, m, BUS_DMASYNC_PREWRITE)
        answer = pattern(n, 6)
        got, pos = b"", 0
        for ref, s in zip(xen_dmamap_get_grefs(m), segs, strict=True):
            status, h = peer_map(be, g, ref, writable=True)
            assert status == 0
            view = be.hc.mapped_page(h)
            o = s.ds_addr & (PAGE - 1)
            got += bytes(view[o : o + s.ds_len])
            view[o : o + s.ds_len] = answer[pos : pos + s.ds_len]
            pos += s.ds_len
            peer_unmap(be, h)
        assert got == data
        bus_dmamap_sync(tag, m, BUS_DMASYNC_POSTWRITE)
        bus_dmamap_sync(tag, m, BUS_DMASYNC_PREREAD)
        bus_dmamap_sync(tag, m, BUS_DMASYNC_POSTREAD)
        assert g.kernel.kva_read(va, n) == answer
        bus_dmamap_unload(tag, m)
        assert bus_dmamap_destroy(tag, m) == 0
        g.kernel.free(raw, M_DEVBUF)
        assert bus_dma_tag_destroy(tag) == 0
        assert g.kernel.dma_debug.reports() == []
    finally:
        host.close()
