"""blkfront end to end through blkback on real image files, every byte verified."""

from __future__ import annotations

import errno
import hashlib
import os
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_blkfront_lib import (
    SECT,
    check_clean,
    ring_refs_from_keys,
    run_threads,
    stamp,
)

from gntdma.abi.blkif import BlkifKey
from gntdma.dev.blkback import Blkback
from gntdma.dev.blkfront import XbdBackendFeatures, xbd_softc
from gntdma.dev.blkfront_io import XbdFile, xbd_discard, xbd_flush, xbd_read, xbd_write
from gntdma.host.image import DiskImage
from gntdma.sched import tsleep
from gntdma.toolstack.host import Guest, Host


@dataclass
class E2E:
    host: Host
    g: Guest
    img: DiskImage
    bb: Blkback
    sc: xbd_softc


def connect(host: Host, tmp: Path, g: Guest | None = None, *, size: int = 16 << 20,
            name: str = "xbd0", devid: int = 51712, protocol: str = "x86_64-abi",
            max_grant_frames: int = 64, ring_page_order: int = 2,
            max_indirect_segments: int = 256, be_indirect: int = 256, be_ring_order: int = 4,
            memory_mb: int = 64) -> E2E:
    """The xenbus sequence by hand: probe keys, initialise, connect back, connect front."""
    if g is None:
        g = host.create_guest("g", max_grant_frames=max_grant_frames, memory_mb=memory_mb)
    img = DiskImage.create(tmp / f"{name}-{g.domid}.img", size)
    bb = Blkback(host.dom0.hc, host.dom0.kernel, g.domid, img, devid=devid,
                 max_indirect_segments=be_indirect, max_ring_page_order=be_ring_order)
    probe = bb.probe_keys()  # backend InitWait
    sc = xbd_softc(g.kernel, g.hc, g.gnttab, host.dom0.domid, name=name, vdev=devid,
                   protocol=protocol, ring_page_order=ring_page_order,
                   max_indirect_segments=max_indirect_segments)
    assert sc.xbd_initialize(XbdBackendFeatures.max_ring_page_order_from_xenstore(probe.get)) \
        == 0
    keys = sc.xbd_transport_keys()  # frontend Initialised
    assert bb.connect(ring_refs_from_keys(keys), int(keys[BlkifKey.EVENT_CHANNEL.value]),
                      keys[BlkifKey.PROTOCOL.value]) == 0
    published = {**probe, **bb.connect_keys()}  # backend Connected
    error, feats = XbdBackendFeatures.from_xenstore(published.get)
    assert error == 0 and feats is not None
    assert sc.xbd_connect(feats) == 0  # frontend Connected
    return E2E(host, g, img, bb, sc)


def disconnect(e: E2E, *, last: bool = True, map_errors: int = 0) -> None:
    assert e.sc.xbd_closing() == 0
    assert e.bb.disconnect() == 0
    assert e.sc.xbd_free() == 0
    e.img.close()
    st = e.bb.statistics()
    assert st.map_errors == map_errors and st.mapped_now == 0 and st.ring_errors == 0
    if last:
        check_clean(e.g)


def image_bytes(e: E2E) -> bytes:
    with open(e.img.path, "rb") as f:
        return f.read()


def verified_io(e: E2E, model: bytearray, rng: random.Random, ops: int, *, base: int = 0,
                span: int | None = None, sizes: tuple[int, ...] = (1, 8, 9, 64, 255, 256, 257,
                                                                   300, 2048, 4096),
                gen: int = 1) -> list[str]:
    """Random reads and writes (sizes in sectors), reads checked against ``model``."""
    span = len(model) - base if span is None else span
    problems: list[str] = []
    for k in range(ops):
        ln = min(rng.choice(sizes) * SECT, span)
        off = base + rng.randrange(0, (span - ln) // SECT + 1) * SECT
        if rng.random() < 0.55:
            data = stamp(off, ln, gen * 10_000 + k)
            error = xbd_write(e.sc, off, data)
            if error != 0:
                problems.append(f"write {ln}@{off}: {errno.errorcode.get(error, error)}")
            else:
                model[off:off + ln] = data
        else:
            error, got = xbd_read(e.sc, off, ln)
            if error != 0:
                problems.append(f"read {ln}@{off}: {errno.errorcode.get(error, error)}")
            elif got != bytes(model[off:off + ln]):
                problems.append(f"read {ln}@{off}: data differs from the model")
    return problems


def test_random_io_through_blkback_direct_and_indirect(host: Host, tmp_path: Path) -> None:
    e = connect(host, tmp_path)
    model = bytearray(16 << 20)
    assert verified_io(e, model, random.Random(1), 150) == []
    assert image_bytes(e) == bytes(model)
    st, bst = e.sc.statistics(), e.bb.statistics()
    assert st.direct_requests > 10 and st.indirect_requests > 10
    assert bst.indirect_requests == st.indirect_requests
    assert bst.requests == st.requests and bst.errors == 0
    assert st.bytes_written == bst.bytes_written and st.bytes_read == bst.bytes_read
    disconnect(e)


def test_random_io_from_threads_through_blkback(host: Host, tmp_path: Path) -> None:
    e = connect(host, tmp_path, size=32 << 20)
    model = bytearray(32 << 20)
    region = 4 << 20
    threads = run_threads(host, [
        lambda i=i: verified_io(e, model, random.Random(10 + i), 30, base=i * region,
                                span=region, gen=i + 1) for i in range(8)])
    assert [t.result for t in threads] == [[]] * 8
    assert image_bytes(e) == bytes(model)
    assert e.bb.statistics().in_flight_peak > 1
    disconnect(e)


def test_x86_32_frontend_through_blkback(host: Host, tmp_path: Path) -> None:
    e = connect(host, tmp_path, protocol="x86_32-abi", ring_page_order=0)
    assert e.bb.statistics().protocol == "x86_32-abi"
    model = bytearray(16 << 20)
    assert verified_io(e, model, random.Random(2), 60) == []
    assert image_bytes(e) == bytes(model)
    disconnect(e)


def test_flush_and_discard_through_blkback(host: Host, tmp_path: Path) -> None:
    e = connect(host, tmp_path)
    data = os.urandom(1 << 20)
    assert xbd_write(e.sc, 0, data) == 0
    assert xbd_flush(e.sc) == 0
    assert xbd_discard(e.sc, 64 * 1024, 128 * 1024) == 0
    error, got = xbd_read(e.sc, 0, 1 << 20)
    assert error == 0
    assert got == data[:65536] + bytes(131072) + data[196608:]
    bst = e.bb.statistics()
    assert bst.flushes >= 1 and bst.sectors_discarded == 256
    disconnect(e)


def test_indirect_refs_checked_by_blkback(host: Host, tmp_path: Path) -> None:
    """The &cm_indirectionrefs bug against the real backend: errors, never silence."""
    e = connect(host, tmp_path)
    data = stamp(0, 1 << 20, 4)

    def pointer_bytes(cm: object, n: int) -> list[int]:
        p = id(cm)
        return ([p & 0xFFFFFFFF, p >> 32 & 0xFFFFFFFF] * n)[:n]

    e.sc._xbd_indirect_grefs = pointer_bytes  # type: ignore[method-assign,assignment]
    assert xbd_write(e.sc, 0, data) == errno.EIO
    del e.sc._xbd_indirect_grefs
    assert xbd_write(e.sc, 0, data) == 0
    assert xbd_read(e.sc, 0, 1 << 20) == (0, data)
    bad = e.bb.statistics().map_errors
    assert bad >= 1
    disconnect(e, map_errors=bad)


@pytest.mark.slow
def test_grant_shortage_two_disks_eight_threads_through_blkback(host: Host,
                                                               tmp_path: Path) -> None:
    """The issue's shortage test: max_grant_frames=4, two disks, eight threads."""
    g = host.create_guest("g", max_grant_frames=4, memory_mb=128)
    size = 32 << 20
    es = [connect(host, tmp_path, g, size=size, name=f"xbd{i}", devid=51712 + 16 * i)
          for i in range(2)]
    models = [bytearray(size) for _ in es]
    region = size // 4
    big = (8, 255, 256, 257, 1024, 2048, 4096, 8192)

    def worker(i: int) -> list[str]:
        return verified_io(es[i % 2], models[i % 2], random.Random(200 + i), 16,
                           base=(i // 2) * region, span=region, sizes=big, gen=i + 1)

    threads = run_threads(host, [lambda i=i: worker(i) for i in range(8)])
    assert [t.result for t in threads] == [[]] * 8
    for e, model in zip(es, models, strict=True):
        assert image_bytes(e) == bytes(model)
    assert sum(e.sc.statistics().deferred_loads for e in es) > 0
    assert g.gnttab.statistics().peak_allocated > 1900
    disconnect(es[0], last=False)
    disconnect(es[1])
    assert g.gnttab.statistics().allocated == 0


def test_disk_removed_while_threads_write_through_blkback(host: Host, tmp_path: Path) -> None:
    e = connect(host, tmp_path)
    model = bytearray(16 << 20)
    region = 4 << 20
    results: list[tuple[int, int]] = []

    def writer(i: int) -> None:
        rng = random.Random(i)
        n = 0
        while True:
            ln = rng.choice([1, 8, 300, 2048]) * SECT
            off = i * region + rng.randrange(0, (region - ln) // SECT + 1) * SECT
            data = stamp(off, ln, i * 100_000 + n)
            error = xbd_write(e.sc, off, data)
            if error != 0:
                results.append((n, error))
                return
            model[off:off + ln] = data
            n += 1

    def remover() -> None:
        while e.sc.statistics().bytes_written < 8 << 20:
            tsleep(remover, "poll", 0.0005)
        assert e.sc.xbd_closing() == 0
        assert e.bb.disconnect() == 0  # the backend's reaction to Closing
        assert e.sc.xbd_free() == 0
        assert e.sc.xbd_detach() == 0  # again: nothing freed twice

    run_threads(host, [*(lambda i=i: writer(i) for i in range(4)), remover])
    assert len(results) == 4 and all(n > 0 and err == errno.ENXIO for n, err in results)
    assert image_bytes(e) == bytes(model)
    e.img.close()
    check_clean(e.g)


def test_large_file_copied_in_and_out_with_equal_sha256(host: Host, tmp_path: Path) -> None:
    e = connect(host, tmp_path, size=24 << 20)
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom((20 << 20) + 12345))
    h_in = hashlib.sha256(src.read_bytes()).hexdigest()
    dst = tmp_path / "dst.bin"
    with XbdFile(e.sc) as disk:
        with open(src, "rb") as f:
            while chunk := f.read(777_777):  # odd sizes: unaligned writes
                disk.write(chunk)
        disk.flush()
        disk.seek(0)
        left = src.stat().st_size
        with open(dst, "wb") as out:
            while left > 0:
                chunk = disk.read(min(left, 1 << 20))
                out.write(chunk)
                left -= len(chunk)
    assert hashlib.sha256(dst.read_bytes()).hexdigest() == h_in
    disconnect(e)
