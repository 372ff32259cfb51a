"""blkif persistent grants: ``feature-persistent`` between blkfront and blkback.

Sources: blkif.h (xen/include/public/io/blkif.h, ``feature-persistent``: both
ends advertise it, the backend may then keep the frontend's grants mapped);
Linux xen-blkfront (drivers/block/xen-blkfront.c ``talk_to_blkback`` writes
the frontend's key, ``blkfront_gather_backend_features`` uses persistent grants
only if the backend's key is set too) and xen-blkback
(drivers/block/xen-blkback/xenbus.c ``connect_ring`` reads the frontend's key,
``connect`` writes the backend's; blkback.c ``xen_blkbk_map`` keeps mapped
grants in the ring's ``persistent_gnts`` tree keyed by gref, at most
``max_persistent_grants`` (1056), ``free_persistent_gnts`` unmaps them at
disconnect).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from gntdma.abi.grant_table import GNTMAP_host_map, GNTST_okay
from gntdma.dev.blkback import Blkback, BlkbackState
from gntdma.dev.blkback_xenbus import BlkbackXenbus, xbb_attach
from gntdma.dev.blkfront_io import xbd_read, xbd_write
from gntdma.dev.blkfront_xenbus import XbdXenbus, xbd_attach, xbd_persistent_segments
from gntdma.host.image import DiskImage, open_image
from gntdma.sys import DmaDebugKind
from gntdma.toolstack.host import Guest, Host
from gntdma.toolstack.xs import DeviceDirs
from gntdma.xen.busdma import XenDmaMap
from gntdma.xen.xenbus import XenbusState

S = XenbusState
DEVID = 51712
SIZE = 8 << 20
PAGE = 4096


@dataclass
class Pair:
    g: Guest
    img: DiskImage
    bb: Blkback
    dirs: DeviceDirs
    back: BlkbackXenbus
    front: XbdXenbus


def _pair(host: Host, tmp_path: Path, *, front: bool, back: bool,
          g: Guest | None = None) -> Pair:
    if g is None:
        g = host.create_guest("g", memory_mb=32)
    img = open_image(tmp_path / "d.img", size=SIZE)
    bb = Blkback(host.dom0.hc, host.dom0.kernel, g.domid, img, devid=DEVID)
    bb.feature_persistent = back
    dirs = host.xenstore.add_device(g.domid, 0, "vbd", DEVID)
    assert host.dom0.xenstore is not None and g.xenstore is not None
    error, bdrv = xbb_attach(host.dom0.xenstore, host.dom0.kernel, bb)
    assert error == 0 and bdrv is not None
    error, fdrv = xbd_attach(g.kernel, g.hc, g.gnttab, g.xenstore, DEVID,
                             ring_page_order=0, persistent=front)
    assert error == 0 and fdrv is not None
    assert fdrv.wait_state({S.Connected}, 5.0) == (0, S.Connected)
    assert bdrv.wait_state({S.Connected}, 5.0) == (0, S.Connected)
    return Pair(g, img, bb, dirs, bdrv, fdrv)


def _io(host: Host, p: Pair, rounds: int = 3) -> None:
    """Writes then reads of several sizes; the data must come back exactly."""
    for r in range(rounds):
        for off, n in ((0, PAGE), (PAGE * 8, 64 * PAGE), (512 * 3, 512 * 9)):
            data = os.urandom(n)
            assert host.sched.call(xbd_write, p.front.sc, off, data) == 0
            error, got = host.sched.call(xbd_read, p.front.sc, off, n)
            assert error == 0 and got == data, (r, off, n)
            buf = bytearray(n)
            assert p.img.preadv([memoryview(buf)], off) == n and buf == data


def _close(host: Host, p: Pair) -> None:
    p.front.stop()
    assert p.front.wait_done(5.0) == 0
    assert p.front.sc.statistics().state == "freed"
    if p.dirs in host.xenstore.devices:
        host.xenstore.remove_device(p.dirs, timeout=1.0)
    p.back.stop()
    assert p.back.wait_done(5.0) == 0
    assert p.bb.state == BlkbackState.DISCONNECTED
    assert p.bb.statistics().mapped_now == 0
    assert p.g.gnttab.statistics().allocated == 0
    p.img.close()


def _data_maps(p: Pair) -> list[XenDmaMap]:
    maps = [cm.cm_map for cm in p.front.sc.xbd_shadow]
    assert all(isinstance(m, XenDmaMap) for m in maps)
    return [m for m in maps if isinstance(m, XenDmaMap)]


@pytest.mark.parametrize(("front", "back"), [(True, True), (True, False), (False, True),
                                             (False, False)])
def test_feature_persistent_used_only_when_both_ends_advertise(
        host: Host, tmp_path: Path, front: bool, back: bool) -> None:
    """blkif.h: persistent grants only when both advertise ``feature-persistent``; the
    same workload gives the same data either way."""
    p = _pair(host, tmp_path, front=front, back=back)
    xsd = host.xenstored
    assert xsd.read(f"{p.dirs.backend_path}/feature-persistent") == (b"1" if back else b"0")
    assert xsd.exists(f"{p.dirs.frontend_path}/feature-persistent") is front
    both = front and back
    assert p.front.persistent_used is both
    assert all((m.pool is not None) is both for m in _data_maps(p))
    _io(host, p, rounds=2)
    st = p.bb.statistics()
    if both:
        assert st.mapped_now > st.ring_pages  # kept between requests
    else:
        assert st.mapped_now == st.ring_pages  # nothing kept between requests
    _close(host, p)


def test_backend_keeps_persistent_grants_mapped_until_disconnect(host: Host,
                                                                 tmp_path: Path) -> None:
    """Linux blkback.c: a persistent grant stays mapped after its request and is used
    again without a map; ``free_persistent_gnts`` unmaps them all at disconnect."""
    p = _pair(host, tmp_path, front=True, back=True)
    ncmds = len(p.front.sc.xbd_shadow)
    # What the guest's grants and memory allow (a quarter of 32 MiB: 64 pages per
    # command), not what blkback keeps mapped: Linux xen-blkfront
    # blkfront_setup_indirect and fill_grant_buffer do not ask max_pgrants.
    assert ncmds == 32 and p.front.sc.xbd_max_request_segments == 64

    def writes() -> None:
        for i in range(2 * ncmds):  # every command, each with its one-page request
            assert xbd_write(p.front.sc, (i % 8) * PAGE, os.urandom(PAGE)) == 0

    host.sched.call(writes)
    before = p.bb.statistics()
    assert before.mapped_now == before.ring_pages + ncmds
    host.sched.call(writes)  # the same commands, hence the same grants, again
    after = p.bb.statistics()
    assert after.segments == before.segments + 2 * ncmds
    assert after.segments_mapped == before.segments_mapped  # not one map more
    assert after.mapped_now == before.mapped_now
    _io(host, p, rounds=1)
    after = p.bb.statistics()
    # Every persistent grant is one of the frontend's data map refs, granted writable,
    # or an indirect page's (Linux blkback.c xen_blkbk_parse_indirect maps those with
    # xen_blkbk_map, persistent too).
    refs = {r for m in _data_maps(p) for r in m.refs}
    refs |= {r for cm in p.front.sc.xbd_shadow for r in cm.cm_indirectionrefs}
    assert after.mapped_now - after.ring_pages <= len(refs)
    _close(host, p)


def test_detach_and_reattach_with_persistent_grants(host: Host, tmp_path: Path) -> None:
    """The disk is detached (every persistent grant unmapped, everything of the guest
    given back) and attached again: the new connection negotiates persistent grants
    again and sees the data the first one wrote."""
    p = _pair(host, tmp_path, front=True, back=True)
    _io(host, p, rounds=1)
    data = os.urandom(16 * PAGE)
    assert host.sched.call(lambda: xbd_write(p.front.sc, 0, data)) == 0
    _close(host, p)
    q = _pair(host, tmp_path, front=True, back=True, g=p.g)
    assert q.front.persistent_used
    error, got = host.sched.call(lambda: xbd_read(q.front.sc, 0, len(data)))
    assert error == 0 and got == data
    _io(host, q, rounds=2)
    assert q.bb.statistics().mapped_now > q.bb.statistics().ring_pages
    _close(host, q)


@pytest.mark.parametrize("how", ["backend_stops", "forced_removal"])
def test_backend_gone_with_persistent_grants_leaves_nothing_mapped(
        host: Host, tmp_path: Path, how: str) -> None:
    """The backend's driver stops (its domain's side gone) or the toolstack removes the
    device by force while persistent grants are mapped: nothing stays mapped, the
    frontend frees everything."""
    p = _pair(host, tmp_path, front=True, back=True)
    _io(host, p, rounds=1)
    assert p.bb.statistics().mapped_now > p.bb.statistics().ring_pages
    if how == "backend_stops":
        p.back.stop()
    else:
        host.xenstore.remove_device(p.dirs, timeout=0.05, force=True)
    assert p.back.wait_done(5.0) == 0
    assert p.bb.statistics().mapped_now == 0
    if p.dirs in host.xenstore.devices:
        assert p.front.wait_state({S.Closed}, 5.0) == (0, S.Closed)
        host.xenstore.remove_device(p.dirs, timeout=0.05)
    assert p.front.wait_done(5.0) == 0
    assert p.front.sc.statistics().state == "freed"
    assert p.g.gnttab.statistics().allocated == 0
    assert p.g.kernel.dma_debug.reports() == []
    p.img.close()


def test_backend_that_keeps_a_persistent_page_mapped_at_destroy(host: Host,
                                                               tmp_path: Path) -> None:
    """A hostile backend keeps one of the frontend's persistent pages mapped past the
    disconnect: the frontend's destroy reports it, the reference and page are kept out
    of circulation, and come back when the backend lets go."""
    p = _pair(host, tmp_path, front=True, back=True)
    _io(host, p, rounds=1)
    ref = next(r for m in _data_maps(p) for r in m.refs)
    hc = host.dom0.hc
    error, addr = hc.foreign.alloc()
    assert error == 0
    from gntdma.abi.grant_table import (
        GnttabMapGrantRef,
        GNTTABOP_map_grant_ref,
        GNTTABOP_unmap_grant_ref,
        GnttabUnmapGrantRef,
    )
    _, (r,) = hc.grant_table_op(GNTTABOP_map_grant_ref, [GnttabMapGrantRef(
        host_addr=addr, flags=int(GNTMAP_host_map), ref=ref, dom=p.g.domid)])
    assert isinstance(r, GnttabMapGrantRef) and r.status == GNTST_okay
    p.front.stop()
    assert p.front.wait_done(5.0) == 0
    assert p.front.sc.statistics().state == "freed"
    kinds = [x.kind for x in p.g.kernel.dma_debug.reports()]
    assert kinds == [DmaDebugKind.STILL_MAPPED_AT_UNLOAD]
    gt = p.g.gnttab
    assert gt.statistics().reclaim_pending == 1 and gt.statistics().allocated == 1
    _, (u,) = hc.grant_table_op(GNTTABOP_unmap_grant_ref,
                                [GnttabUnmapGrantRef(host_addr=addr, handle=r.handle)])
    assert isinstance(u, GnttabUnmapGrantRef) and u.status == GNTST_okay
    hc.foreign.free(addr)
    host.sched.run(until=lambda: gt.statistics().reclaim_pending == 0)
    assert gt.statistics().allocated == 0
    p.g.kernel.dma_debug.reset()
    gt.reports.clear()
    if p.dirs in host.xenstore.devices:
        host.xenstore.remove_device(p.dirs, timeout=1.0)
    p.back.stop()
    assert p.back.wait_done(5.0) == 0
    p.img.close()


def test_persistent_segments_fit_the_grant_budget_and_memory() -> None:
    """Every command keeps its pages granted for life: commands x (segments + indirect
    pages) references and commands x segments pages must fit."""
    assert xbd_persistent_segments(32, 32, 1056, 4096) == 32  # Linux's 32 x (32 + 1)
    assert xbd_persistent_segments(32, 256, 1056, 4096) == 32
    assert xbd_persistent_segments(32, 256, 100_000, 2048) == 64
    assert xbd_persistent_segments(512, 256, 32768, 2048) == 0  # not even 11 fit
    assert xbd_persistent_segments(32, 0, 1000, 1000) == 11
