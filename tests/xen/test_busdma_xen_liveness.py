"""busdma_xen never waits for grant references that can never come back (issue 11).

DESIGN section 7: "A load never waits for references that can never come back
(those held for life by prealloc maps and rings count as gone): it fails at
once instead". FreeBSD's ``gnttab_request_free_callback`` (sys/xen/gnttab.c)
queues the callback whatever its count, so a load larger than what can ever
be free would wait forever there; gntdma refuses it with ENOSPC, through the
client callback, as the generic ``_bus_dmamap_load_buffer`` reports EFBIG.
"""

from __future__ import annotations

import errno

from busdma_helpers import PAGE, Loads, driver_tag, kbuf, pattern

from gntdma.sched import Mutex, mtx_lock, mtx_unlock
from gntdma.sys import (
    BUS_DMA_WAITOK,
    M_DEVBUF,
    MapState,
    bus_dma_tag_destroy,
    bus_dmamap_create,
    bus_dmamap_destroy,
    bus_dmamap_load,
    bus_dmamap_unload,
)
from gntdma.toolstack.host import Host
from gntdma.xen.busdma import BUS_DMA_XEN_PREALLOC_REFS


def test_load_needing_more_refs_than_can_ever_be_free_fails_at_once(host: Host) -> None:
    """One frame (504 references); a prealloc map holds 300 for life, so a load of
    220 segments can never get its references: ENOSPC now, not EINPROGRESS forever."""
    g = host.create_guest("g", max_grant_frames=1)
    gt = g.gnttab
    lock = Mutex("drv")
    held_tag = driver_tag(g, lock, nsegments=300, maxsize=300 * PAGE)
    error, held = bus_dmamap_create(held_tag, BUS_DMA_XEN_PREALLOC_REFS)
    assert error == 0 and held is not None
    assert gt.held_for_life == 300 and gt.statistics().held_for_life == 300
    assert gt.gnttab_ever_available() == gt.capacity - 300 == 204
    tag = driver_tag(g, lock, nsegments=256, maxsize=256 * PAGE)
    _, m = bus_dmamap_create(tag, 0)
    assert m is not None
    data = pattern(220 * PAGE)
    va = kbuf(g.kernel, data)
    loads = Loads(lock)
    mtx_lock(lock)
    rc = bus_dmamap_load(tag, m, va, len(data), loads.cb, None, BUS_DMA_WAITOK)
    mtx_unlock(lock)
    assert rc == 0  # as for EFBIG: the error goes to the callback
    assert [c[2] for c in loads.calls] == [errno.ENOSPC]
    assert m.state is MapState.IDLE and gt.statistics().callbacks_queued == 0  # nothing waits
    # What can ever be free still serves a load at once.
    small = pattern(200 * PAGE)
    va2 = kbuf(g.kernel, small)
    mtx_lock(lock)
    assert bus_dmamap_load(tag, m, va2, len(small), loads.cb, None, BUS_DMA_WAITOK) == 0
    mtx_unlock(lock)
    assert loads.calls[-1][2] == 0
    bus_dmamap_unload(tag, m)
    bus_dmamap_destroy(tag, m)
    # The references held for life are given back with the map.
    assert bus_dmamap_destroy(held_tag, held) == 0
    assert gt.held_for_life == 0
    assert bus_dma_tag_destroy(tag) == 0 and bus_dma_tag_destroy(held_tag) == 0
    g.kernel.free(va, M_DEVBUF)
    g.kernel.free(va2, M_DEVBUF)
    assert gt.statistics().allocated == 0
