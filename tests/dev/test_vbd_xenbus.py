"""The blkfront and blkback xenbus drivers, each against a hostile or absent peer.

The other end is played by the test through xenstore (and, for a frontend,
through the guest's own grant table and event channels): garbage in the
transport keys, a broken ring, a backend that lies about the disk, a frontend
that never answers. The driver under test must refuse with an ``error`` node
and Closing, leave nothing mapped or bound, and keep working for the next
(honest) peer.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gntdma.dev.blkback import Blkback, BlkbackState
from gntdma.dev.blkback_xenbus import (
    BlkbackXenbus,
    XbbFrontendInfo,
    xbb_attach,
    xbb_parse_frontend_info,
)
from gntdma.dev.blkfront_io import xbd_read, xbd_write
from gntdma.dev.blkfront_xenbus import XbdXenbus, xbd_attach, xbd_probe, xbd_vdevice_to_unit
from gntdma.host.image import DiskImage
from gntdma.sched import ThreadState
from gntdma.sys import BIO_WRITE, M_TEMP, M_WAITOK, bio
from gntdma.toolstack.host import Guest, Host
from gntdma.toolstack.xs import DeviceDirs
from gntdma.xen.xenbus import XST_NIL, XenbusState, XenStore

S = XenbusState
DEVID = 51712
SIZE = 8 << 20


def xs(g: Guest) -> XenStore:
    assert g.xenstore is not None
    return g.xenstore


def on_thread(host: Host, fn: Callable[[], object], name: str = "t") -> object:
    """Run ``fn`` on a kernel thread to completion; its result."""
    t = host.sched.spawn(fn, name=name)
    host.sched.run(until=lambda: t.state is ThreadState.DONE)
    if t.exc is not None:
        raise t.exc
    return t.result


@dataclass
class Back:
    """A real blkback and its xenbus driver on a device whose frontend the test plays."""

    host: Host
    g: Guest
    img: DiskImage
    bb: Blkback
    dirs: DeviceDirs
    drv: BlkbackXenbus

    @property
    def fe(self) -> str:
        return self.dirs.frontend_path

    @property
    def be(self) -> str:
        return self.dirs.backend_path

    def error_node(self) -> str | None:
        try:
            return self.host.xenstored.read(f"{self.be}/error").decode()
        except Exception:
            return None


@pytest.fixture
def back(host: Host, tmp_path: Path) -> Iterator[Back]:
    g = host.create_guest("g", memory_mb=32)
    img = DiskImage.create(tmp_path / "d.img", SIZE)
    bb = Blkback(host.dom0.hc, host.dom0.kernel, g.domid, img, devid=DEVID)
    dirs = host.xenstore.add_device(g.domid, 0, "vbd", DEVID)
    assert host.dom0.xenstore is not None
    error, drv = xbb_attach(host.dom0.xenstore, host.dom0.kernel, bb)
    assert error == 0 and drv is not None
    b = Back(host, g, img, bb, dirs, drv)
    try:
        yield b
    finally:
        if b.dirs in host.xenstore.devices:
            host.xenstore.remove_device(b.dirs, timeout=1.0)
        drv.stop()
        assert drv.wait_done(5.0) == 0
        assert bb.state == BlkbackState.DISCONNECTED
        assert bb.statistics().mapped_now == 0
        img.close()


def fe_write(b: Back, keys: dict[str, str]) -> None:
    c = xs(b.g)
    for k, v in keys.items():
        assert c.xs_write(XST_NIL, b.fe, k, v) == 0


def fe_state(b: Back, st: XenbusState) -> None:
    """The hostile frontend writes its state raw (no transition checks)."""
    fe_write(b, {"state": str(int(st))})


def fe_rm(b: Back, keys: list[str]) -> None:
    c = xs(b.g)
    for k in keys:
        c.xs_rm(XST_NIL, b.fe, k)


def dom0_mappings(host: Host) -> int:
    s = next(d for d in host.hv.statistics().domains if d.domid == 0)
    return host.xenstore.discount(s).mappings


# -- the frontend keys parser, alone ------------------------------------------------------


def _reader(d: dict[str, str]) -> Callable[[str], str | None]:
    return d.get


def test_parse_frontend_info_accepts_the_abi_layouts() -> None:
    err, info, _ = xbb_parse_frontend_info(_reader({"ring-ref": "8", "event-channel": "5"}), 4)
    assert err == 0 and isinstance(info, XbbFrontendInfo)
    assert (info.ring_refs, info.evtchn, info.protocol) == ([8], 5, None)
    keys = {"ring-page-order": "2", "event-channel": "7", "protocol": "x86_32-abi",
            **{f"ring-ref{i}": str(100 + i) for i in range(4)}}
    err, info, _ = xbb_parse_frontend_info(_reader(keys), 4)
    assert err == 0 and info is not None
    assert (info.ring_refs, info.evtchn, info.protocol) == ([100, 101, 102, 103], 7,
                                                            "x86_32-abi")
    # ring-page-order 0 written anyway: one ring-ref0 (Linux reads it that way)
    err, info, _ = xbb_parse_frontend_info(
        _reader({"ring-page-order": "0", "ring-ref0": "9", "event-channel": "3"}), 4)
    assert err == 0 and info is not None and info.ring_refs == [9]


@pytest.mark.parametrize(("keys", "want"), [
    ({"event-channel": "5"}, errno.ENOENT),
    ({"ring-ref": "8"}, errno.ENOENT),
    ({"ring-ref": "abc", "event-channel": "5"}, errno.EINVAL),
    ({"ring-ref": "-3", "event-channel": "5"}, errno.EINVAL),
    ({"ring-ref": " 8", "event-channel": "5"}, errno.EINVAL),
    ({"ring-ref": "4294967296", "event-channel": "5"}, errno.EINVAL),
    ({"ring-ref": "8" * 4000, "event-channel": "5"}, errno.EINVAL),
    ({"ring-ref": "\u0668", "event-channel": "5"}, errno.EINVAL),  # a non-ASCII digit
    ({"ring-ref": "8", "event-channel": "0x5"}, errno.EINVAL),
    ({"ring-page-order": "5", "ring-ref0": "8", "event-channel": "5"}, errno.EINVAL),
    ({"ring-page-order": "", "ring-ref0": "8", "event-channel": "5"}, errno.EINVAL),
    ({"ring-page-order": "1", "ring-ref0": "8", "event-channel": "5"}, errno.ENOENT),
    ({"ring-ref": "8", "event-channel": "5", "protocol": "vax-abi"}, errno.ENOSYS),
])
def test_parse_frontend_info_refuses_garbage(keys: dict[str, str], want: int) -> None:
    err, info, why = xbb_parse_frontend_info(_reader(keys), 4)
    assert (err, info) == (want, None) and why != ""


def test_vdevice_to_unit() -> None:
    assert [xbd_vdevice_to_unit(d) for d in (51712, 51728, 51952, 2048, 2064, 768, 832,
                                             5632, 5696, (1 << 28) | (40 << 8))] == \
        [0, 1, 15, 0, 1, 0, 1, 2, 3, 40]


# -- the backend against a hostile frontend ------------------------------------------------


@dataclass
class RealRing:
    """A page the guest really granted to dom0, and a port really unbound for it."""

    pfn: int
    ref: int
    port: int


def real_ring(b: Back, req_prod: int = 0) -> RealRing:
    g = b.g
    pfn = g.kernel.vm_page_alloc(M_WAITOK)
    assert pfn is not None
    page = g.hc.own_page(pfn)
    page[:] = bytes(4096)
    struct.pack_into("<I", page, 0, req_prod)  # sring req_prod
    page.release()
    err, ref = g.gnttab.gnttab_grant_foreign_access(0, pfn, False)
    assert err == 0
    rc, port = g.hc.evtchn_alloc_unbound(0)
    assert rc == 0
    return RealRing(pfn, ref, port)


def free_ring(b: Back, r: RealRing) -> None:
    assert b.g.gnttab.gnttab_end_foreign_access(r.ref) == 1  # nobody maps it any more
    assert b.g.hc.evtchn_close(r.port) == 0
    b.g.kernel.vm_page_free(r.pfn)


def test_backend_refuses_garbage_frontend_keys_and_keeps_serving(host: Host, back: Back
                                                                ) -> None:
    b = back
    drv = b.drv
    assert drv.wait_state({S.InitWait}, 5.0) == (0, S.InitWait)
    probe = set(host.xenstored.directory(b.be))
    assert {"max-ring-page-order", "feature-max-indirect-segments"} <= probe
    assert "sectors" not in probe  # written at connect (xen-abi.md 4.4)
    ring = real_ring(b)
    broken = real_ring(b, req_prod=1000)  # indices no ring can have
    rounds: list[tuple[dict[str, str], int]] = [
        ({"ring-ref": "abc", "event-channel": "5"}, errno.EINVAL),
        ({"event-channel": str(ring.port)}, errno.ENOENT),
        ({"ring-ref": "99999999999", "event-channel": "5"}, errno.EINVAL),
        ({"ring-page-order": "9", "ring-ref0": str(ring.ref), "event-channel": "5"},
         errno.EINVAL),
        ({"ring-page-order": "2", "ring-ref0": str(ring.ref), "ring-ref1": str(ring.ref),
          "ring-ref2": str(ring.ref), "event-channel": "5"}, errno.ENOENT),
        ({"ring-ref": "3000", "event-channel": str(ring.port)}, errno.ENOENT),  # not granted
        ({"ring-ref": str(ring.ref), "event-channel": "-1"}, errno.EINVAL),
        ({"ring-ref": str(ring.ref), "event-channel": "4242"}, 0),  # no such port
        ({"ring-ref": str(ring.ref), "event-channel": str(ring.port),
          "protocol": "sparc-abi"}, errno.ENOSYS),
        ({"ring-ref": str(broken.ref), "event-channel": str(broken.port)}, errno.EIO),
    ]
    all_keys = sorted({k for keys, _ in rounds for k in keys})
    for i, (keys, want) in enumerate(rounds):
        fe_write(b, keys)
        fe_state(b, S.Initialised)
        assert drv.wait_state({S.Closing, S.Connected}, 5.0) == (0, S.Closing), keys
        err = b.error_node()
        assert err is not None, keys
        if want != 0:
            assert err.startswith(f"{want} "), (keys, err)
        assert b.bb.state == BlkbackState.DISCONNECTED
        assert b.bb.statistics().connects == 0 and b.bb.statistics().mapped_now == 0
        assert dom0_mappings(host) == 0
        assert drv.errors == i + 1
        # The frontend gives up: Closed; then tries again from Initialising.
        fe_rm(b, all_keys)
        fe_state(b, S.Closed)
        assert drv.wait_state({S.Closed}, 5.0) == (0, S.Closed)
        fe_state(b, S.Initialising)
        assert drv.wait_state({S.InitWait}, 5.0) == (0, S.InitWait)
        assert b.error_node() is None  # cleared for the new attempt
    assert not drv.done
    free_ring(b, ring)
    free_ring(b, broken)
    # An honest frontend on the same device now connects and does I/O.
    g = b.g
    error, fdrv = xbd_attach(g.kernel, g.hc, g.gnttab, xs(g), DEVID)
    assert error == 0 and fdrv is not None
    assert fdrv.wait_state({S.Connected, S.Closed}, 5.0) == (0, S.Connected)
    assert drv.state == S.Connected
    data = bytes(range(256)) * 64

    def io() -> object:
        assert xbd_write(fdrv.sc, 4096, data) == 0
        return xbd_read(fdrv.sc, 4096, len(data))

    assert on_thread(host, io) == (0, data)
    assert host.xenstore.remove_device(b.dirs) is True
    assert drv.wait_done(5.0) == 0 and fdrv.wait_done(5.0) == 0
    assert fdrv.sc.statistics().state == "freed" and fdrv.error == ""


def test_garbage_frontend_state_reads_as_unknown_and_unregisters(host: Host, back: Back
                                                                  ) -> None:
    b = back
    assert b.drv.wait_state({S.InitWait}, 5.0) == (0, S.InitWait)
    fe_write(b, {"state": "banana"})  # Unknown: a frontend that vanished (Linux)
    assert b.drv.wait_done(5.0) == 0
    assert b.drv.state == S.Closed
    # Unregistered: nobody answers the unplug's Closing any more (libxl times out).
    assert host.xenstore.remove_device(b.dirs, timeout=0.05) is False
    assert not host.xenstored.exists(b.be)


def test_unplug_before_the_frontend_starts_closes_at_once(host: Host, back: Back) -> None:
    b = back
    assert b.drv.wait_state({S.InitWait}, 5.0) == (0, S.InitWait)
    t0 = host.sched.now()
    assert host.xenstore.remove_device(b.dirs) is True
    assert host.sched.now() - t0 < 1.0
    assert b.drv.wait_done(1.0) == 0


def test_forced_removal_of_a_connected_frontend_that_never_closes(host: Host, back: Back
                                                                   ) -> None:
    """libxl's timeout passes, the directories go: the backend lets go of everything."""
    b = back
    assert b.drv.wait_state({S.InitWait}, 5.0) == (0, S.InitWait)
    ring = real_ring(b)
    fe_write(b, {"ring-ref": str(ring.ref), "event-channel": str(ring.port)})
    fe_state(b, S.Initialised)
    assert b.drv.wait_state({S.Connected, S.Closing}, 5.0) == (0, S.Connected)
    keys = set(host.xenstored.directory(b.be))
    assert {"sectors", "info", "sector-size", "feature-flush-cache"} <= keys
    assert host.xenstored.read(f"{b.be}/sectors") == str(SIZE // 512).encode()
    assert dom0_mappings(host) == 1  # the ring
    assert host.xenstore.remove_device(b.dirs, timeout=0.2) is False  # never Closed
    assert b.drv.wait_done(5.0) == 0
    assert b.bb.state == BlkbackState.DISCONNECTED and dom0_mappings(host) == 0
    free_ring(b, ring)


def test_frontend_that_breaks_the_ring_is_closed_with_an_error(host: Host, back: Back
                                                               ) -> None:
    b = back
    g = b.g
    error, fdrv = xbd_attach(g.kernel, g.hc, g.gnttab, xs(g), DEVID)
    assert error == 0 and fdrv is not None
    assert fdrv.wait_state({S.Connected}, 5.0) == (0, S.Connected)
    sc = fdrv.sc
    # A write goes on the ring; before blkback reads it, the guest scribbles an
    # impossible req_prod on its shared ring (the kick is already on the way).
    va = g.kernel.malloc(4096, M_TEMP, M_WAITOK)
    done: list[bio] = []
    bp = bio(bio_cmd=BIO_WRITE, bio_offset=0, bio_bcount=4096, bio_data=va,
             bio_done=done.append)
    sc.xbd_strategy(bp)
    assert sc.statistics().in_flight == 1
    g.kernel.kva_write(sc.xbd_ring_va, struct.pack("<I", 5000))
    t0 = host.sched.now()
    assert b.drv.wait_state({S.Closing, S.Closed}, 5.0)[0] == 0
    # The backend said why: the frontend does not wait for an answer that
    # cannot come (XBD_CLOSE_TIMEOUT), the write fails at once.
    host.sched.run(until=lambda: done != [])
    assert bp.bio_error == errno.ENXIO and host.sched.now() - t0 < 2.0
    g.kernel.free(va, M_TEMP)
    err = b.error_node()
    assert err is not None and err.startswith(f"{errno.EIO} the frontend broke the ring")
    # The frontend sees Closing and closes; the backend follows to Closed, still online.
    assert fdrv.wait_state({S.Closed}, 5.0) == (0, S.Closed)
    assert b.drv.wait_state({S.Closed}, 5.0) == (0, S.Closed)
    assert sc.statistics().state == "freed" and b.bb.statistics().ring_errors == 1
    assert on_thread(host, lambda: xbd_write(sc, 0, bytes(512))) == errno.ENXIO
    assert not b.drv.done
    assert host.xenstore.remove_device(b.dirs) is True
    assert fdrv.wait_done(5.0) == 0


def test_frontend_initiated_close_leaves_the_backend_online(host: Host, back: Back) -> None:
    b = back
    g = b.g
    assert xbd_probe(xs(g), DEVID) == 0
    assert xbd_probe(xs(g), DEVID + 16) == errno.ENOENT
    error, fdrv = xbd_attach(g.kernel, g.hc, g.gnttab, xs(g), DEVID)
    assert error == 0 and fdrv is not None
    assert fdrv.wait_state({S.Connected}, 5.0) == (0, S.Connected)
    fdrv.stop()
    assert fdrv.wait_done(5.0) == 0
    assert fdrv.state == S.Closed and fdrv.sc.statistics().state == "freed"
    assert b.drv.wait_state({S.Closed}, 5.0) == (0, S.Closed)
    assert not b.drv.done and b.bb.state == BlkbackState.DISCONNECTED
    assert host.xenstore.remove_device(b.dirs) is True


# -- the frontend against a hostile backend --------------------------------------------------


@pytest.mark.parametrize("lie", [
    {"sectors": "12abc"},
    {"sectors": str(SIZE // 512), "sector-size": "1000"},
    {"sector-size": "512"},  # no sectors at all
])
def test_frontend_refuses_a_backend_that_lies_about_the_disk(host: Host,
                                                             lie: dict[str, str]) -> None:
    g = host.create_guest("g", memory_mb=32)
    dirs = host.xenstore.add_device(g.domid, 0, "vbd", DEVID)
    dom0 = xs(host.dom0)
    be, fe = dirs.backend_path, dirs.frontend_path
    error, fdrv = xbd_attach(g.kernel, g.hc, g.gnttab, xs(g), DEVID)
    assert error == 0 and fdrv is not None
    # The "backend": garbage limits (read as "no multi-page ring"), InitWait.
    assert dom0.xs_write(XST_NIL, be, "max-ring-page-order", "lots") == 0
    assert dom0.xs_write(XST_NIL, be, "state", "2") == 0
    assert fdrv.wait_state({S.Initialised}, 5.0) == (0, S.Initialised)
    assert host.xenstored.exists(f"{fe}/ring-ref")
    assert not host.xenstored.exists(f"{fe}/ring-page-order")
    for k, v in lie.items():
        assert dom0.xs_write(XST_NIL, be, k, v) == 0
    assert dom0.xs_write(XST_NIL, be, "state", "4") == 0
    assert fdrv.wait_state({S.Closed, S.Connected}, 5.0) == (0, S.Closed)
    err = host.xenstored.read(f"{fe}/error").decode()
    assert err.split()[0] in (str(errno.EINVAL), str(errno.ENOENT)), err
    assert fdrv.error == err  # the first fatal error, as published
    assert fdrv.sc.statistics().state == "freed"
    assert g.gnttab.statistics().allocated == 0
    assert host.xenstore.remove_device(dirs, timeout=0.05) is False  # nobody to go Closed
    assert fdrv.wait_done(5.0) == 0


def test_frontend_drivers_are_threads_of_their_domains(host: Host, back: Back) -> None:
    b = back
    g = b.g
    error, fdrv = xbd_attach(g.kernel, g.hc, g.gnttab, xs(g), DEVID)
    assert error == 0 and isinstance(fdrv, XbdXenbus)
    assert fdrv.wait_state({S.Connected}, 5.0) == (0, S.Connected)
    assert fdrv.thread is not None and fdrv.thread.domain is g.kernel
    assert fdrv.thread.name == "xbd0/xenbus" and fdrv.sc.xbd_vdev == DEVID
    assert b.drv.thread is not None and b.drv.thread.domain is host.dom0.kernel
    assert fdrv.start() == errno.EALREADY
    assert host.xenstore.remove_device(b.dirs) is True
    assert fdrv.wait_done(5.0) == 0
