"""Persistent grants at the disk's full request size, as Linux has them.

Sources: Linux drivers/block/xen-blkfront.c (``blkfront_setup_indirect`` sizes
its grants by its ``max_indirect_segments`` and the backend's
``feature-max-indirect-segments``, ``fill_grant_buffer`` grants ring slots x
(segments + ``INDIRECT_GREFS``), nothing asks what the backend keeps mapped;
``get_indirect_grant`` takes an indirect page from the persistent grants, granted
as the data pages) and drivers/block/xen-blkback/blkback.c (``xen_blkbk_map``:
a gref in the ring's ``persistent_gnts`` tree is used without a map, any other
is mapped without ``GNTMAP_readonly`` when persistent grants are used and kept
while ``persistent_gnt_c < max_pgrants`` (1056), else unmapped after the request;
``xen_blkbk_parse_indirect`` maps the indirect pages with ``xen_blkbk_map``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gntdma.dev.blkback import Blkback, BlkbackState
from gntdma.dev.blkback_io import BLKBACK_MAX_PERSISTENT_GRANTS
from gntdma.dev.blkback_xenbus import xbb_attach
from gntdma.dev.blkfront_cmd import XBD_INDIRECT_SEGS_TO_PAGES
from gntdma.dev.blkfront_io import xbd_read, xbd_write
from gntdma.dev.blkfront_xenbus import XbdXenbus, xbd_attach
from gntdma.host.image import open_image
from gntdma.toolstack.host import Guest, Host
from gntdma.xen.xenbus import XenbusState

S = XenbusState
DEVID = 51712
PAGE = 4096
MIB = 1 << 20


def _pair(host: Host, tmp_path: Path, memory_mb: int,
          **kw: int) -> tuple[Guest, Blkback, XbdXenbus]:
    g = host.create_guest("g", memory_mb=memory_mb)
    img = open_image(tmp_path / "d.img", size=64 * MIB)
    bb = Blkback(host.dom0.hc, host.dom0.kernel, g.domid, img, devid=DEVID, **kw)
    bb.feature_persistent = True
    host.xenstore.add_device(g.domid, 0, "vbd", DEVID)
    assert host.dom0.xenstore is not None and g.xenstore is not None
    error, back = xbb_attach(host.dom0.xenstore, host.dom0.kernel, bb)
    assert error == 0 and back is not None
    error, front = xbd_attach(g.kernel, g.hc, g.gnttab, g.xenstore, DEVID,
                              ring_page_order=0, persistent=True)
    assert error == 0 and front is not None
    assert front.wait_state({S.Connected}, 5.0) == (0, S.Connected)
    assert back.wait_state({S.Connected}, 5.0) == (0, S.Connected)
    assert front.persistent_used
    return g, bb, front


def _close(host: Host, g: Guest, bb: Blkback, front: XbdXenbus) -> None:
    front.stop()
    assert front.wait_done(5.0) == 0
    assert front.sc.statistics().state == "freed"
    for dirs in list(host.xenstore.devices):
        host.xenstore.remove_device(dirs, timeout=1.0)
    assert bb.state == BlkbackState.DISCONNECTED
    assert bb.statistics().mapped_now == 0
    assert g.gnttab.statistics().allocated == 0
    bb.store.close()  # type: ignore[attr-defined]


def test_persistent_requests_are_not_capped_by_the_backends_max_pgrants(
        host: Host, tmp_path: Path) -> None:
    """Linux ``blkfront_setup_indirect``/``fill_grant_buffer``: the frontend grants
    ring slots x (segments + indirect pages), bounded by its own grant table and
    memory, not by blkback's ``max_pgrants``: at ring order 0 (32 slots) a guest with
    memory for it uses the backend's 256 segments (32 x 257 = 8224 grants), and a
    1 MiB I/O takes at most 2 requests, not 8 of 32 segments."""
    g, bb, front = _pair(host, tmp_path, memory_mb=256)
    sc = front.sc
    ncmds = len(sc.xbd_shadow)
    segs = sc.xbd_max_request_segments
    assert ncmds == 32 and segs == 256
    assert ncmds * (segs + XBD_INDIRECT_SEGS_TO_PAGES(segs)) > BLKBACK_MAX_PERSISTENT_GRANTS
    data = os.urandom(MIB)
    before = bb.statistics().requests
    assert host.sched.call(xbd_write, sc, 0, data) == 0
    error, got = host.sched.call(xbd_read, sc, 0, MIB)
    assert error == 0 and got == data
    assert bb.statistics().requests - before <= 4  # 2 I/Os of 1 MiB
    _close(host, g, bb, front)


def test_indirect_pages_are_persistent_grants(host: Host, tmp_path: Path) -> None:
    """Linux ``xen_blkbk_parse_indirect`` maps the indirect pages with
    ``xen_blkbk_map`` (writable with persistent grants, kept in the table), and
    blkfront's ``get_indirect_grant`` gives them from its persistent grants: once
    every command served an indirect request, the same requests again map nothing."""
    g, bb, front = _pair(host, tmp_path, memory_mb=32)
    sc = front.sc
    ncmds = len(sc.xbd_shadow)
    n = 16 * PAGE  # 16 segments: an indirect request

    def writes() -> None:
        for i in range(2 * ncmds):
            assert xbd_write(sc, (i % 8) * n, os.urandom(n)) == 0

    host.sched.call(writes)
    before = bb.statistics()
    assert before.indirect_requests >= 2 * ncmds
    host.sched.call(writes)
    after = bb.statistics()
    assert after.indirect_requests == before.indirect_requests + 2 * ncmds
    assert after.errors == 0 and after.map_errors == 0
    assert after.segments_mapped == before.segments_mapped  # not one map more
    # Every command's indirect page and data pages stay mapped, nothing more.
    assert after.mapped_now - after.ring_pages == ncmds * (16 + 1)
    _close(host, g, bb, front)


def test_grants_beyond_max_pgrants_are_mapped_per_request(host: Host,
                                                          tmp_path: Path) -> None:
    """Linux ``xen_blkbk_map``: a grant is kept only while ``persistent_gnt_c <
    max_pgrants``; one past the table is mapped for its request and unmapped after it,
    and the data is right either way."""
    g, bb, front = _pair(host, tmp_path, memory_mb=256)
    sc = front.sc
    ncmds = len(sc.xbd_shadow)
    blobs = [os.urandom(MIB) for _ in range(4)]

    def rounds() -> None:
        for i in range(ncmds):
            off = (i % 4) * MIB
            assert xbd_write(sc, off, blobs[i % 4]) == 0
            error, got = xbd_read(sc, off, MIB)
            assert error == 0 and got == blobs[i % 4], i

    host.sched.call(rounds)
    st = bb.statistics()
    io = bb._io  # the table is blkback's own
    assert io.persistent_grants == BLKBACK_MAX_PERSISTENT_GRANTS
    assert st.mapped_now == st.ring_pages + BLKBACK_MAX_PERSISTENT_GRANTS
    assert st.errors == 0 and st.map_errors == 0
    host.sched.call(rounds)
    again = bb.statistics()
    assert again.segments_mapped > st.segments_mapped  # those beyond: per request
    assert again.mapped_now == st.mapped_now
    assert io.persistent_grants == BLKBACK_MAX_PERSISTENT_GRANTS
    _close(host, g, bb, front)


def test_max_persistent_grants_parameter_bounds_the_table(host: Host,
                                                          tmp_path: Path) -> None:
    """Linux xen-blkback's ``max_persistent_grants`` module parameter (``max_pgrants``,
    read by ``xen_blkbk_map`` at each map): a table as large as the frontend's grants
    (32 x (256 + 1)) keeps every one of them, so a second pass maps nothing; a
    negative size is refused; lowering it unmaps nothing and keeps no more."""
    with pytest.raises(ValueError):
        Blkback(host.dom0.hc, host.dom0.kernel, 1, None,  # type: ignore[arg-type]
                max_persistent_grants=-1)
    g, bb, front = _pair(host, tmp_path, memory_mb=256, max_persistent_grants=32 * 257)
    sc = front.sc
    assert bb.max_persistent_grants == 32 * 257
    data = os.urandom(MIB)

    def passes() -> None:
        for _ in range(len(sc.xbd_shadow)):
            assert xbd_write(sc, 0, data) == 0
            error, got = xbd_read(sc, 0, MIB)
            assert error == 0 and got == data

    host.sched.call(passes)
    st = bb.statistics()
    host.sched.call(passes)
    again = bb.statistics()
    assert again.segments_mapped == st.segments_mapped
    assert again.mapped_now == st.mapped_now > st.ring_pages + BLKBACK_MAX_PERSISTENT_GRANTS
    bb.max_persistent_grants = 10
    host.sched.call(passes)
    assert bb.statistics().mapped_now == again.mapped_now
    with pytest.raises(ValueError):
        bb.max_persistent_grants = -1
    _close(host, g, bb, front)
