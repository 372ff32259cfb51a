"""Indirect pages that cannot be had: the disk connects with direct requests.

FreeBSD's ``xbd_connect`` (``sys/dev/xen/blkfront/blkfront.c``) allocates each
command's indirect pages with ``contigmalloc(..., M_ZERO | M_NOWAIT, ...)`` and,
when one fails, sets ``xbd_max_request_indirectpages = 0`` and goes on: a guest
short of memory still gets its disk, without sleeping at attach. gntdma's
``_xbd_alloc_indirect`` allocates them the same way (``kern.malloc(M_NOWAIT)``)
and on failure undoes every command's pages and limits requests to
``BLKIF_MAX_SEGMENTS_PER_REQUEST`` segments (direct requests only). These tests
force the allocation to fail, once at the first command (a malloc failure
injected for the driver's type) and once part-way through the commands (a
guest whose memory is nearly exhausted), and check the disk connects with
direct requests only, leaks nothing of the undone allocations, and moves data
byte for byte.
"""

from __future__ import annotations

from test_blkfront_lib import (
    MiniBack,
    Rig,
    ring_refs_from_keys,
    stamp,
    teardown,
)

from gntdma.abi.blkif import BLKIF_MAX_SEGMENTS_PER_REQUEST, BlkifKey
from gntdma.dev.blkfront import xbd_softc
from gntdma.dev.blkfront_io import xbd_read, xbd_write
from gntdma.sys import M_NOWAIT, M_XENBLOCKFRONT
from gntdma.toolstack.host import Guest, Host


def _initialized(host: Host, g: Guest) -> tuple[xbd_softc, MiniBack]:
    """A disk of ``g`` with its ring set up and its backend connected, not yet connected
    itself (the indirect pages are allocated by xbd_connect)."""
    be = MiniBack(host, g, 8 << 20)
    sc = xbd_softc(g.kernel, g.hc, g.gnttab, host.dom0.domid, name="xbd0", vdev=51712,
                   ring_page_order=2, max_indirect_segments=256)
    assert sc.xbd_initialize(be.features().max_ring_page_order) == 0
    keys = sc.xbd_transport_keys()
    be.connect(ring_refs_from_keys(keys), int(keys[BlkifKey.EVENT_CHANNEL.value]),
               keys[BlkifKey.PROTOCOL.value])
    return sc, be


def _check_direct_only(rig: Rig) -> None:
    sc, g = rig.sc, rig.g
    assert sc.xbd_indirect_dmat is None
    assert sc.xbd_max_request_indirectpages == 0
    assert sc.xbd_max_request_segments == BLKIF_MAX_SEGMENTS_PER_REQUEST
    assert all(cm.cm_indirectionmap is None and cm.cm_indirectionpages == 0
               and cm.cm_indirectionrefs == [] for cm in sc.xbd_shadow)
    # Nothing of the undone indirect pages is left: the ring's pages only.
    assert g.kernel.malloc_statistics()["xbd"].inuse == 1
    problems: list[str] = []
    for i, (off, ln) in enumerate([(0, 1 << 20), (3 << 20, 300 * 1024), (512, 200 * 1024),
                                   (5 << 20, 44 * 1024 + 512)]):
        data = stamp(off, ln, 70 + i)
        if xbd_write(sc, off, data) != 0:
            problems.append(f"write of {ln} at {off} failed")
        error, got = xbd_read(sc, off, ln)
        if error != 0 or got != data:
            problems.append(f"read of {ln} at {off}: error {error} or data differs")
        if bytes(rig.be.disk[off:off + ln]) != data:
            problems.append(f"disk at {off}: data differs")
    assert problems == []
    st = sc.statistics()
    assert st.indirect_requests == 0 and rig.be.ops["indirect"] == 0
    assert st.direct_requests >= 4
    assert all(nseg <= BLKIF_MAX_SEGMENTS_PER_REQUEST for _, _, nseg in rig.be.log)


def test_indirect_page_malloc_failure_connects_with_direct_requests(host: Host) -> None:
    g = host.create_guest("g", max_grant_frames=64, memory_mb=64)
    sc, be = _initialized(host, g)
    g.kernel.inject_malloc_failure(M_XENBLOCKFRONT)  # the first command's indirect pages
    assert sc.xbd_connect(be.features()) == 0
    assert g.kernel.malloc_statistics()["xbd"].failures == 1
    rig = Rig(host, g, sc, be)
    _check_direct_only(rig)
    teardown(rig)


def test_nearly_exhausted_guest_memory_connects_with_direct_requests(host: Host) -> None:
    g = host.create_guest("g", max_grant_frames=64, memory_mb=16)
    sc, be = _initialized(host, g)
    kern = g.kernel
    hog: list[int] = []
    while (pfn := kern.vm_page_alloc(M_NOWAIT)) is not None:
        hog.append(pfn)
    # 40 pages: some commands get their indirect page (and the bounce pages their
    # maps add), then memory runs out; what the undo gives back is enough for the
    # data maps (the first one adds atop(maxsize) bounce pages or fails with ENOMEM,
    # bounce_bus_dmamap_create).
    for _ in range(40):
        kern.vm_page_free(hog.pop())
    ncmds = sc.xbd_ring.nr_ents if sc.xbd_ring is not None else 0
    assert ncmds > 40
    assert sc.xbd_connect(be.features()) == 0
    st = kern.malloc_statistics()["xbd"]
    assert st.failures == 1 and st.requests > 2  # failed part-way, after the ring and some
    for pfn in hog:  # memory for the I/O buffers
        kern.vm_page_free(pfn)
    rig = Rig(host, g, sc, be)
    _check_direct_only(rig)
    teardown(rig)
    assert kern.malloc_statistics()["xbd"].inuse == 0
