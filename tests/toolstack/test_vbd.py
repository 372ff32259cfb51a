"""Disks end to end through xenstore: attach, negotiate, I/O, hot-unplug, configs.

Everything here goes through the toolstack (``attach_disk``, ``detach_disk``,
``create_guest_from_config``): both xenbus drivers negotiate over the host's
xenstored alone, the data goes through blkfront, busdma_xen, the grant table
and blkback onto real image files, and the ``host`` fixture checks that
nothing leaked and WITNESS saw nothing.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import random
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from gntdma.dev.blkfront_io import xbd_discard, xbd_flush, xbd_read, xbd_write
from gntdma.host.image import DiskImage
from gntdma.hv import MAPTRACK_PER_FRAME
from gntdma.sched import WITNESS, KThread, ThreadState, tsleep
from gntdma.toolstack.domains import create_guest_from_config, destroy_guest
from gntdma.toolstack.host import Host
from gntdma.toolstack.vbd import Vbd, VbdError, attach_disk, detach_disk
from gntdma.toolstack.xlcfg import parse_config, parse_disk_spec
from gntdma.toolstack.xs import XenstoredSocket
from gntdma.xen.xenbus import XenbusState

SECT = 512
S = XenbusState


def run_threads(host: Host, fns: Sequence[Callable[[], object]], name: str = "w"
                ) -> list[KThread]:
    threads = [host.sched.spawn(fn, name=f"{name}{i}") for i, fn in enumerate(fns)]
    host.sched.run(until=lambda: all(t.state is ThreadState.DONE for t in threads))
    for t in threads:
        if t.exc is not None:
            raise t.exc
    return threads


def stamp(offset: int, length: int, gen: int) -> bytes:
    """Every 8-byte word says where it lives and which write made it."""
    return b"".join((((offset + i) // 8) ^ (gen << 40)).to_bytes(8, "little")
                    for i in range(0, length, 8))


def verified_io(vbd: Vbd, model: bytearray, rng: random.Random, ops: int, *, base: int = 0,
                span: int | None = None, sizes: Sequence[int] = (1, 8, 9, 64, 256, 257, 2048),
                gen: int = 1) -> list[str]:
    """Random reads and writes (sizes in sectors), reads checked against ``model``."""
    span = len(model) - base if span is None else span
    problems: list[str] = []
    for k in range(ops):
        ln = min(rng.choice(sizes) * SECT, span)
        off = base + rng.randrange(0, (span - ln) // SECT + 1) * SECT
        if rng.random() < 0.55:
            data = stamp(off, ln, gen * 10_000 + k)
            error = xbd_write(vbd.sc, off, data)
            if error != 0:
                problems.append(f"write {ln}@{off}: {errno.errorcode.get(error, error)}")
            else:
                model[off:off + ln] = data
        else:
            error, got = xbd_read(vbd.sc, off, ln)
            if error != 0:
                problems.append(f"read {ln}@{off}: {errno.errorcode.get(error, error)}")
            elif got != bytes(model[off:off + ln]):
                problems.append(f"read {ln}@{off}: data differs from the model")
    return problems


def xsread(host: Host, path: str) -> str:
    """Through the toolstack's own xenstore client (what ``xenstore-read`` shows)."""
    return host.xenstore.toolstack.read(path).decode()


def xsls(host: Host, path: str) -> list[str]:
    return sorted(host.xenstore.toolstack.directory(path))


# -- attach, negotiate, I/O, detach ---------------------------------------------------------


def test_attach_io_detach_end_to_end(host: Host, tmp_path: Path) -> None:
    g = host.create_guest("g", memory_mb=64)
    spec = parse_disk_spec("format=raw, vdev=xvda, access=rw, size=16M, target=disks/a.img")
    (tmp_path / "disks").mkdir()
    vbd = attach_disk(host, g, spec, image_dir=tmp_path)
    path = tmp_path / "disks" / "a.img"
    assert vbd.image_path == path and path.stat().st_size == 16 << 20
    assert path.stat().st_blocks == 0  # created sparse
    assert (vbd.vdev, vbd.devid) == ("xvda", 51712)
    assert vbd.frontend.state == S.Connected and vbd.backend.state == S.Connected
    fe, be = vbd.dirs.frontend_path, vbd.dirs.backend_path
    assert (fe, be) == (f"/local/domain/{g.domid}/device/vbd/51712",
                        f"/local/domain/0/backend/vbd/{g.domid}/51712")
    assert xsread(host, f"{fe}/state") == xsread(host, f"{be}/state") == "4"
    assert vbd.sc.name == "xbd0" and vbd.sc.statistics().state == "connected"

    model = bytearray(16 << 20)
    assert host.sched.call(lambda: verified_io(vbd, model, random.Random(1), 80)) == []

    def file_and_flush_discard() -> str:
        data = os.urandom((3 << 20) + 777)
        f = vbd.file
        f.seek(12345)
        assert f.write(data) == len(data)
        f.flush()
        f.seek(12345)
        back = f.read(len(data))
        model[12345:12345 + len(data)] = data
        assert xbd_flush(vbd.sc) == 0
        assert xbd_discard(vbd.sc, 8 << 20, 1 << 20) == 0
        model[8 << 20:9 << 20] = bytes(1 << 20)
        return hashlib.sha256(back).hexdigest() + hashlib.sha256(data).hexdigest()

    h = host.sched.call(file_and_flush_discard)
    assert h[:64] == h[64:]
    assert path.read_bytes() == bytes(model)
    st = vbd.statistics()
    assert st.attached and (st.frontend_state, st.backend_state) == ("Connected", "Connected")
    assert st.frontend.direct_requests > 0 and st.frontend.indirect_requests > 0
    assert st.backend.requests == st.frontend.requests and st.backend.errors == 0
    assert st.frontend.bytes_written == st.backend.bytes_written
    assert st.backend.flushes >= 1 and st.backend.sectors_discarded == 2048
    assert 0 < st.image_allocated_bytes <= 16 << 20

    assert detach_disk(host, vbd) is True
    assert not vbd.attached and vbd.frontend.done and vbd.backend.done
    assert not host.xenstored.exists(fe) and not host.xenstored.exists(be)
    assert host.xenstore.devices == []
    assert vbd.sc.statistics().state == "freed" and vbd.sc.statistics().grant_refs_in_use == 0
    bst = vbd.blkback.statistics()
    assert bst.state == "disconnected" and bst.mapped_now == 0 and bst.in_flight == 0
    assert vbd.image.closed and vbd.file.closed
    assert host.sched.call(lambda: xbd_write(vbd.sc, 0, bytes(SECT))) == errno.ENXIO
    assert detach_disk(host, vbd) is True  # twice: nothing happens
    assert path.read_bytes() == bytes(model)  # the image keeps the data


def test_keys_written_match_the_blkif_abi(host: Host, tmp_path: Path) -> None:
    """xen-abi.md 4.4: who writes what, in which directory, as decimal strings."""
    g = host.create_guest("g", memory_mb=32)
    a = attach_disk(host, g, parse_disk_spec("a.img,raw,xvda,rw,size=8M"), image_dir=tmp_path)
    b = attach_disk(host, g, parse_disk_spec("b.img,raw,xvdb,w,size=4M"), image_dir=tmp_path,
                    ring_page_order=0)
    assert (a.devid, b.devid) == (51712, 51728) and b.sc.name == "xbd1"
    be, fe = a.dirs.backend_path, a.dirs.frontend_path
    toolstack_keys = {"frontend", "frontend-id", "online", "state", "params", "type", "mode",
                      "dev", "removable", "bootable", "device-type", "discard-enable"}
    probe_keys = {"max-ring-page-order", "feature-max-indirect-segments"}
    connect_keys = {"sectors", "info", "sector-size", "physical-sector-size",
                    "feature-flush-cache", "feature-barrier", "feature-persistent",
                    "feature-discard", "discard-granularity", "discard-alignment",
                    "discard-secure"}
    assert set(xsls(host, be)) == toolstack_keys | probe_keys | connect_keys
    want = {"frontend": fe, "frontend-id": str(g.domid), "online": "1", "state": "4",
            "params": str(tmp_path / "a.img"), "type": "file", "mode": "w", "dev": "xvda",
            "device-type": "disk", "discard-enable": "1", "max-ring-page-order": "4",
            "feature-max-indirect-segments": "256", "sectors": str((8 << 20) // 512),
            "info": "0", "sector-size": "512", "physical-sector-size": "512",
            "feature-flush-cache": "1", "feature-barrier": "0", "feature-persistent": "0",
            "feature-discard": "1", "discard-granularity": "512", "discard-alignment": "0",
            "discard-secure": "0"}
    for key, value in want.items():
        assert xsread(host, f"{be}/{key}") == value, key
    # Frontend, multi-page ring: ring-page-order and ring-ref0..3, no plain ring-ref.
    ring_refs = [f"ring-ref{i}" for i in range(4)]
    assert set(xsls(host, fe)) == {"backend", "backend-id", "state", "virtual-device",
                                   "device-type", "ring-page-order", "event-channel",
                                   "protocol", *ring_refs}
    assert xsread(host, f"{fe}/backend") == be and xsread(host, f"{fe}/backend-id") == "0"
    assert xsread(host, f"{fe}/virtual-device") == "51712"
    assert xsread(host, f"{fe}/ring-page-order") == "2"
    assert [int(xsread(host, f"{fe}/{k}")) for k in ring_refs] == a.sc.xbd_ring_refs
    assert int(xsread(host, f"{fe}/event-channel")) == a.sc.xbd_evtchn
    assert xsread(host, f"{fe}/protocol") == "x86_64-abi"
    assert a.blkback.statistics().ring_pages == 4
    # Frontend, one-page ring: ring-ref only.
    bfe = b.dirs.frontend_path
    assert set(xsls(host, bfe)) == {"backend", "backend-id", "state", "virtual-device",
                                    "device-type", "ring-ref", "event-channel", "protocol"}
    assert [int(xsread(host, f"{bfe}/ring-ref"))] == b.sc.xbd_ring_refs
    assert b.blkback.statistics().ring_pages == 1
    # Each end owns its directory, the other reads it.
    perms = host.xenstored.get_perms
    assert perms(fe) == [f"n{g.domid}", "r0"] and perms(be) == ["n0", f"r{g.domid}"]
    assert detach_disk(host, b) is True
    assert detach_disk(host, a) is True
    assert not host.xenstored.exists(f"/local/domain/{g.domid}/device")


def test_readonly_disk(host: Host, tmp_path: Path) -> None:
    data = os.urandom(1 << 20)
    (tmp_path / "ro.img").write_bytes(data)
    g = host.create_guest("g", memory_mb=32)
    vbd = attach_disk(host, g, parse_disk_spec("ro.img,,xvdc,ro"), image_dir=tmp_path)
    be = vbd.dirs.backend_path
    assert (xsread(host, f"{be}/mode"), xsread(host, f"{be}/info")) == ("r", "4")
    assert xsread(host, f"{be}/feature-discard") == "0"
    assert host.sched.call(lambda: xbd_read(vbd.sc, 0, 1 << 20)) == (0, data)
    assert host.sched.call(lambda: xbd_write(vbd.sc, 0, bytes(SECT))) == errno.EROFS
    assert not vbd.file.writable()
    assert detach_disk(host, vbd) is True
    assert (tmp_path / "ro.img").read_bytes() == data


@pytest.mark.realclient
def test_xenstore_ls_shows_the_libxl_layout(host: Host, tmp_path: Path) -> None:
    tool = shutil.which("xenstore-ls")
    assert tool is not None, "xenstore-ls is missing: install xenstore-utils (make test does)"
    g = host.create_guest("guest-a", memory_mb=32)
    vbd = attach_disk(host, g, parse_disk_spec("vdev=xvda,size=8M,target=a.img"),
                      image_dir=tmp_path)
    with XenstoredSocket(host.xenstored) as sock:
        def ls(path: str) -> str:
            proc = subprocess.run([tool, path], env={**os.environ, "XENSTORED_PATH": sock.path},
                                  capture_output=True, text=True, timeout=30, check=False)
            assert proc.returncode == 0, proc.stderr
            return proc.stdout

        back = ls("/local/domain/0/backend")
        front = ls(f"/local/domain/{g.domid}/device")
    # xenstore-ls prints a tree: "vbd", "<fe domid>", "<devid>" then indented keys.
    assert re.search(rf'^vbd = ""\n {g.domid} = ""\n  51712 = ""$', back, re.M), back
    for line in (f'frontend = "/local/domain/{g.domid}/device/vbd/51712"', 'online = "1"',
                 'state = "4"', 'mode = "w"', 'type = "file"', 'sectors = "16384"',
                 'sector-size = "512"', 'info = "0"', 'feature-flush-cache = "1"',
                 'max-ring-page-order = "4"', 'feature-max-indirect-segments = "256"'):
        assert re.search(rf"^   {re.escape(line)}$", back, re.M), (line, back)
    for line in (f'backend = "/local/domain/0/backend/vbd/{g.domid}/51712"',
                 'backend-id = "0"', 'state = "4"', 'virtual-device = "51712"',
                 'ring-page-order = "2"', 'protocol = "x86_64-abi"'):
        assert re.search(rf"^  {re.escape(line)}$", front, re.M), (line, front)
    assert re.search(r'^  ring-ref3 = "\d+"$', front, re.M)
    assert re.search(r'^  event-channel = "\d+"$', front, re.M)
    assert detach_disk(host, vbd) is True


# -- hot-unplug while threads write -------------------------------------------------------------


@pytest.fixture(params=["inline", "pool"])
def io_host(request: pytest.FixtureRequest) -> Iterator[Host]:
    """The ``host`` fixture's checks, image I/O inline or on OS threads (then
    requests really stay in flight while the disk goes)."""
    WITNESS.reset()
    h = Host(io_mode=request.param)
    try:
        yield h
        h.sched.yield_()
        assert h.leaks() == []
        assert WITNESS.reports == [], [r.format() for r in WITNESS.reports]
    finally:
        h.close()
        WITNESS.reset()


def test_detach_while_four_threads_write(io_host: Host, tmp_path: Path) -> None:
    """The seed's double free: the disk goes while threads write; in-flight writes
    complete, the others fail with ENXIO, everything is freed once, nothing leaks."""
    host = io_host
    g = host.create_guest("g", memory_mb=64)
    vbd = attach_disk(host, g, parse_disk_spec("vdev=xvda,size=16M,target=a.img"),
                      image_dir=tmp_path)
    model = bytearray(16 << 20)
    region = 4 << 20
    results: list[tuple[int, int]] = []
    detached: list[bool] = []
    on_ring_at_close: list[int] = []
    closing = vbd.sc.xbd_closing

    def spy_closing(**kw: object) -> int:
        on_ring_at_close.append(vbd.sc.statistics().in_flight)
        return closing(**kw)  # type: ignore[arg-type]

    vbd.sc.xbd_closing = spy_closing  # type: ignore[method-assign]

    def writer(i: int) -> None:
        rng = random.Random(i)
        n = 0
        while True:
            ln = rng.choice([1, 8, 300, 1024]) * SECT  # never split: all or nothing
            off = i * region + rng.randrange(0, (region - ln) // SECT + 1) * SECT
            data = stamp(off, ln, i * 100_000 + n)
            error = xbd_write(vbd.sc, off, data)
            if error != 0:
                results.append((n, error))
                return
            model[off:off + ln] = data
            n += 1

    def remover() -> None:
        while vbd.sc.statistics().bytes_written < 6 << 20:
            tsleep(remover, "poll", 0.0005)
        assert results == []  # really while every writer is writing
        detached.append(detach_disk(host, vbd))

    run_threads(host, [*(functools.partial(writer, i) for i in range(4)), remover])
    assert detached == [True]
    if io_host.sched.io_mode == "pool":  # the image I/O runs on OS threads meanwhile
        assert on_ring_at_close[0] > 0  # requests on the ring completed: see the model
    assert len(results) == 4 and all(n > 0 and err == errno.ENXIO for n, err in results)
    assert (tmp_path / "a.img").read_bytes() == bytes(model)  # what completed is there
    st = vbd.statistics()
    assert st.frontend.state == "freed" and st.frontend.grant_refs_in_use == 0
    assert st.backend.in_flight == 0 and st.backend.mapped_now == 0
    assert st.backend.errors == 0 and st.backend.map_errors == 0
    assert vbd.frontend.error == "" and vbd.backend.error == ""
    assert g.gnttab.statistics().allocated == 0
    assert g.gnttab.reports == [] and g.kernel.dma_debug.reports() == []


# -- guests from configs ----------------------------------------------------------------------


@pytest.mark.slow
def test_config_two_disks_max_grant_frames_4_eight_threads(host: Host, tmp_path: Path) -> None:
    """The seed's `make -j4` freeze, from a config: loads defer, everything completes."""
    cfg = parse_config("""
        name = "shortage"
        memory = 128
        max_grant_frames = 4
        max_maptrack_frames = 256
        disk = [ 'format=raw, vdev=xvda, size=32M, target=a.img',
                 'format=raw, vdev=xvdb, size=32M, target=b.img', ]
    """)
    g, vbds = create_guest_from_config(host, cfg, tmp_path)
    assert g.name == "shortage" and g.gnttab.max_frames == 4
    assert g.domain.maptrack.limit == 256 * MAPTRACK_PER_FRAME
    assert [(v.vdev, v.devid, v.sc.name) for v in vbds] == [("xvda", 51712, "xbd0"),
                                                            ("xvdb", 51728, "xbd1")]
    size = 32 << 20
    models = [bytearray(size) for _ in vbds]
    region = size // 4
    big = (8, 255, 256, 257, 1024, 2048, 4096, 8192)  # up to 4 MiB

    def worker(i: int) -> list[str]:
        return verified_io(vbds[i % 2], models[i % 2], random.Random(300 + i), 12,
                           base=(i // 2) * region, span=region, sizes=big, gen=i + 1)

    threads = run_threads(host, [functools.partial(worker, i) for i in range(8)])
    assert [t.result for t in threads] == [[]] * 8
    for name, model in zip(("a.img", "b.img"), models, strict=True):
        assert (tmp_path / name).read_bytes() == bytes(model)
    stats = [v.statistics() for v in vbds]
    assert sum(s.frontend.deferred_loads for s in stats) > 0
    assert all(s.frontend.indirect_requests > 0 and s.frontend.errors == 0 for s in stats)
    assert g.gnttab.statistics().peak_allocated > 1900  # the table really ran short
    assert destroy_guest(host, g, vbds) is True
    assert list(host.guests) == [0]


def test_config_errors_leave_nothing_behind(host: Host, tmp_path: Path) -> None:
    cfg = parse_config("""
        name = "broken"
        memory = 16
        disk = [ 'vdev=xvda, size=4M, target=a.img', 'vdev=xvdb, target=missing.img' ]
    """)
    with pytest.raises(VbdError, match=r"xvdb.*does not exist"):
        create_guest_from_config(host, cfg, tmp_path)
    assert list(host.guests) == [0]  # the guest is gone, its first disk detached
    assert (tmp_path / "a.img").exists() and not (tmp_path / "missing.img").exists()
    # The same device twice on one guest.
    g = host.create_guest("g", memory_mb=16)
    vbd = attach_disk(host, g, parse_disk_spec("vdev=xvda,size=4M,target=a.img"),
                      image_dir=tmp_path)
    with pytest.raises(VbdError, match="exists"):
        attach_disk(host, g, parse_disk_spec("vdev=xvda,size=4M,target=b.img"),
                    image_dir=tmp_path)
    assert not (tmp_path / "b.img").exists()  # the failed attach removed the image it made
    # An image of the wrong size.
    DiskImage.create(tmp_path / "b.img", 4 << 20).close()
    with pytest.raises(VbdError, match="not the"):
        attach_disk(host, g, parse_disk_spec("vdev=xvdb,size=8M,target=b.img"),
                    image_dir=tmp_path)
    assert vbd.statistics().frontend.state == "connected"
    assert destroy_guest(host, g, [vbd]) is True
