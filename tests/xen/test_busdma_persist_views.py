"""PersistentPool's syncs through the views of its own pages (and of the callers'
pages it copied) copy exactly what ``Kernel.phys_copy`` copies (PREWRITE into the
pool, POSTREAD out of it), for buffers at any offset and length; the callers'
views kept are bounded, and every view goes before the pages are freed."""

from __future__ import annotations

import os
import random

from busdma_helpers import driver_tag

from gntdma.sched import Mutex
from gntdma.sys import (
    BUS_DMASYNC_POSTREAD,
    BUS_DMASYNC_PREWRITE,
    M_DEVBUF,
    M_WAITOK,
    bus_dma_tag_destroy,
)
from gntdma.toolstack.host import Host
from gntdma.xen.busdma_persist import PersistentPool

PAGE = 4096


def test_pool_syncs_copy_what_phys_copy_copies(host: Host) -> None:
    g = host.create_guest("g", memory_mb=16)
    k = g.kernel
    rng = random.Random(3)
    for alignment in (1, 512):
        tag = driver_tag(g, Mutex("drv"), nsegments=40, maxsize=40 * PAGE,
                         alignment=alignment)
        pool = PersistentPool(k)
        for _ in range(12):
            off = rng.choice((0, 1, 511, 512, 2048, PAGE - 1))
            n = rng.choice((1, 512, PAGE, PAGE + 1, 7 * PAGE + 300, 30 * PAGE))
            va = k.malloc(off + n, M_DEVBUF, M_WAITOK)
            data = os.urandom(n)
            k.kva_write(va + off, data)
            segs: list = []
            assert pool.load(tag, "vaddr", va + off, (), n, segs) == 0
            pool.sync(BUS_DMASYNC_PREWRITE)
            assert b"".join(k.phys_read(a, ln) for a, ln in segs) == data
            assert [tuple(s) for s in segs] == list(zip(pool.dsts, pool.lens, strict=True))
            back = os.urandom(n)
            pos = 0
            for a, ln in segs:  # the device writes the pool pages
                k.phys_write(a, back[pos : pos + ln])
                pos += ln
            pool.sync(BUS_DMASYNC_POSTREAD)
            assert k.kva_read(va + off, n) == back
            pool.unload()
            k.free(va, M_DEVBUF)
            assert len(pool.bufviews) <= max(64, 2 * len(pool))
        views = list(pool.views) + list(pool.bufviews.values())
        assert len(pool.views) == len(pool) and pool.bufviews
        pool.free()
        assert pool.views == [] and pool.bufviews == {} and len(pool) == 0
        for v in views:  # released before the pages went back
            try:
                v[0]
            except ValueError:
                continue
            raise AssertionError("a pool page's view outlived the pool")
        bus_dma_tag_destroy(tag)


def test_a_page_synced_again_copies_what_phys_copy_copies(host: Host) -> None:
    """A 4 KiB page-aligned buffer loaded and synced again and again (a command's
    buffer reused): each PREWRITE puts its data of now on the pool page, each POSTREAD
    brings the pool page's data of now back, whether its view was kept or not."""
    g = host.create_guest("g", memory_mb=16)
    k = g.kernel
    tag = driver_tag(g, Mutex("drv"), nsegments=8, maxsize=8 * PAGE, alignment=512)
    pool = PersistentPool(k)
    va = k.malloc(2 * PAGE, M_DEVBUF, M_WAITOK)
    for step in range(6):
        a = va + (step % 2) * PAGE
        n = PAGE if step != 3 else 2048  # a piece of the page in between
        data = os.urandom(n)
        k.kva_write(a, data)
        segs: list = []
        assert pool.load(tag, "vaddr", a, (), n, segs) == 0
        pool.sync(BUS_DMASYNC_PREWRITE)
        assert k.phys_read(segs[0][0], n) == data
        back = os.urandom(n)
        k.phys_write(segs[0][0], back)
        pool.sync(BUS_DMASYNC_POSTREAD)
        assert k.kva_read(a, n) == back
        pool.unload()
    assert len(pool.bufviews) == 2
    pool.free()
    k.free(va, M_DEVBUF)
    assert bus_dma_tag_destroy(tag) == 0
