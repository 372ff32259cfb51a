"""A load's pages are looked up once, and never reused across a change of the mappings.

A sleepable load counts its bounce pages before it loads (FreeBSD x86
``busdma_bounce.c``: ``_bus_dmamap_count_pages`` then ``_bus_dmamap_load_buffer``,
each taking ``pmap_kextract`` of the buffer), and DMA-API debugging takes the
buffer's physical ranges at the PRE sync. gntdma keeps the pages of the last
buffer on the map for the three; these tests check that a buffer whose kernel
mapping changed in between is looked up again (``pmap_kenter`` moves a page).
"""

from __future__ import annotations

from gntdma_sys_testlib import Rec, mk_map, mk_tag

from gntdma.sys import (
    BIO_READ,
    BUS_DMASYNC_POSTREAD,
    BUS_DMASYNC_PREREAD,
    M_DEVBUF,
    M_WAITOK,
    MEMDESC_BIO,
    PAGE_SIZE,
    DmaDebugKind,
    Kernel,
    bio,
    bus_dmamap_load,
    bus_dmamap_load_bio,
    bus_dmamap_sync,
    bus_dmamap_unload,
    memdesc,
    memdesc_bio,
    memdesc_length,
)


def test_a_page_moved_between_two_loads_of_a_buffer_is_looked_up_again(kern: Kernel) -> None:
    tag = mk_tag(kern, alignment=512, boundary=PAGE_SIZE, maxsegsz=PAGE_SIZE)
    map = mk_map(tag)
    buf, obuf = kern.malloc(4 * PAGE_SIZE, M_DEVBUF, M_WAITOK), kern.malloc(
        2 * PAGE_SIZE, M_DEVBUF, M_WAITOK)
    va = (buf + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    other = (obuf + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    old_pa, new_pa = kern.pmap_kextract(va + PAGE_SIZE), kern.pmap_kextract(other)
    for step in range(3):
        rec = Rec()
        assert bus_dmamap_load(tag, map, va, 2 * PAGE_SIZE, rec, None, 0) == 0
        _arg, segs, nseg, error = rec.last
        want = old_pa if step == 0 else new_pa
        assert error == 0 and nseg == 2 and segs[1].ds_addr == want
        bus_dmamap_sync(tag, map, BUS_DMASYNC_PREREAD)
        kern.dma_debug.reset()
        kern.kva_read(other, 8)  # the device owns the moved page from step 1 on
        owned = kern.dma_debug.reports(DmaDebugKind.CPU_ACCESS_DEVICE_OWNED)
        assert len(owned) == (0 if step == 0 else 1)
        bus_dmamap_sync(tag, map, BUS_DMASYNC_POSTREAD)
        if step == 1:  # the same mapping as the load: its pages, kept, are the ranges
            bus_dmamap_sync(tag, map, BUS_DMASYNC_PREREAD)
            bus_dmamap_sync(tag, map, BUS_DMASYNC_POSTREAD)
        bus_dmamap_unload(tag, map)
        if step == 0:
            kern.pmap_kenter(va + PAGE_SIZE, new_pa)
    kern.pmap_kenter(va + PAGE_SIZE, old_pa)
    kern.dma_debug.reset()
    kern.free(buf, M_DEVBUF)
    kern.free(obuf, M_DEVBUF)


def test_memdesc_bio_is_the_descriptor_of_the_bio_with_every_other_field_its_default() -> None:
    bp = bio(bio_cmd=BIO_READ, bio_bcount=4096, bio_data=0x1000)
    mem = memdesc_bio(bp)
    assert type(mem) is memdesc and mem == memdesc(MEMDESC_BIO, md_bio=bp)
    assert mem.md_bio is bp and memdesc_length(mem) == 4096


def test_a_bio_load_keeps_the_descriptor_memdesc_bio_gives(kern: Kernel) -> None:
    """bus_dmamap_load_bio (FreeBSD subr_bus_dma.c: memdesc_bio, then
    bus_dmamap_load_mem) keeps the bio's descriptor on the map while loaded."""
    tag = mk_tag(kern, alignment=512, boundary=PAGE_SIZE, maxsegsz=PAGE_SIZE)
    map = mk_map(tag)
    va = kern.malloc(PAGE_SIZE, M_DEVBUF, M_WAITOK)
    bp = bio(bio_cmd=BIO_READ, bio_bcount=PAGE_SIZE, bio_data=va)
    rec = Rec()
    assert bus_dmamap_load_bio(tag, map, bp, rec, None, 0) == 0
    assert type(map.dm_mem) is memdesc and map.dm_mem == memdesc_bio(bp)
    assert map.dm_mem.md_bio is bp and rec.last[2] == 1
    bus_dmamap_unload(tag, map)
    kern.free(va, M_DEVBUF)
