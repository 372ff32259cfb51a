"""Disk removal: while threads write, with the backend gone, hung, or still mapping pages.

The seed found a double free when a disk was removed on a running system.
Here removal is closing (no new bio, in-flight ones finish or fail with
ENXIO) then free (every resource once, and never while the backend still maps
a page of it); any number of removals, in any order, from any threads.
"""

from __future__ import annotations

import errno
import random

from test_blkfront_lib import SECT, Rig, check_clean, make_rig, run_threads, stamp

from gntdma.dev.blkfront import xbd_softc
from gntdma.dev.blkfront_io import xbd_flush, xbd_read, xbd_write
from gntdma.sched import tsleep
from gntdma.sys import BIO_WRITE, M_TEMP, M_WAITOK, DmaDebugKind, bio
from gntdma.toolstack.host import Host


def _writer(rig: Rig, model: bytearray, i: int, region: int) -> tuple[int, int]:
    """Write random blocks of its region until the disk goes; (writes done, final error)."""
    rng = random.Random(i)
    n = 0
    while True:
        ln = rng.choice([1, 8, 64, 300, 2048]) * SECT
        off = i * region + rng.randrange(0, (region - ln) // SECT + 1) * SECT
        data = stamp(off, ln, i * 100_000 + n)
        error = xbd_write(rig.sc, off, data)
        if error != 0:
            return n, error
        model[off:off + ln] = data
        n += 1


def _wait_for(pred: object, poll: float = 0.0005) -> None:
    while not pred():  # type: ignore[operator]
        tsleep(_wait_for, "poll", poll)


def test_disk_removed_while_threads_write(host: Host) -> None:
    rig = make_rig(host, size=16 << 20)
    sc, be = rig.sc, rig.be
    model = bytearray(16 << 20)
    region = 4 << 20
    steps: list[int] = []

    def remover() -> None:
        _wait_for(lambda: sc.statistics().bytes_written > 8 << 20)
        steps.append(sc.xbd_closing())
        steps.append(sc.xbd_closing())  # twice: nothing happens
        steps.append(sc.xbd_free())  # the backend still maps the ring: nothing freed
        be.disconnect()  # the backend sees Closing and lets go
        steps.append(sc.xbd_free())
        steps.append(sc.xbd_free())  # nothing is freed twice
        steps.append(sc.xbd_detach())

    fns = [lambda i=i: _writer(rig, model, i, region) for i in range(4)]
    threads = run_threads(host, [*fns, remover])
    assert steps == [0, 0, errno.EBUSY, 0, 0, 0]
    results = [t.result for t in threads[:4]]
    assert all(isinstance(r, tuple) and r[0] > 0 and r[1] == errno.ENXIO for r in results)
    # The backend was alive: what was on the ring completed, nothing else reached it.
    assert bytes(be.disk) == bytes(model)
    assert xbd_write(sc, 0, bytes(SECT)) == errno.ENXIO
    assert xbd_read(sc, 0, SECT)[0] == errno.ENXIO
    assert xbd_flush(sc) == errno.ENXIO
    assert sc.statistics().state == "freed" and sc.statistics().grant_refs_in_use == 0
    check_clean(rig.g)


def test_concurrent_detaches_free_everything_once(host: Host) -> None:
    """Two removals race each other and the writers; the backend closes on its own."""
    rig = make_rig(host, size=16 << 20)
    sc, be = rig.sc, rig.be
    model = bytearray(16 << 20)
    region = 4 << 20
    got: list[int] = []

    def remover() -> None:
        _wait_for(lambda: sc.statistics().bytes_written > 4 << 20)
        got.append(sc.xbd_detach())

    def backend_watch() -> None:  # what the backend's xenbus watch would do
        _wait_for(lambda: sc.statistics().state != "connected")
        be.disconnect()

    fns = [lambda i=i: _writer(rig, model, i, region) for i in range(4)]
    run_threads(host, [*fns, remover, remover, backend_watch])
    assert got == [0, 0]
    assert bytes(be.disk) == bytes(model)
    check_clean(rig.g)


def _submit_writes(rig: Rig, n: int) -> tuple[list[bio], int]:
    kern = rig.g.kernel
    va = kern.malloc(n * 8192, M_TEMP, M_WAITOK)
    done: list[bio] = []
    for i in range(n):
        kern.kva_write(va + i * 8192, stamp(i * 8192, 8192, 3))
        rig.sc.xbd_strategy(bio(bio_cmd=BIO_WRITE, bio_offset=i * 8192, bio_bcount=8192,
                                bio_data=va + i * 8192, bio_done=done.append))
    return done, va


def test_backend_gone_fails_in_flight_with_enxio(host: Host) -> None:
    rig = make_rig(host)
    sc, be = rig.sc, rig.be
    be.hold = True
    done, va = _submit_writes(rig, 6)
    host.sched.yield_()
    assert len(be.held) == 6 and sc.statistics().in_flight == 6 and done == []
    be.disconnect()  # the backend domain died: its mappings are gone, nobody answers
    assert sc.xbd_detach(backend_gone=True) == 0
    assert len(done) == 6 and all(b.bio_error == errno.ENXIO for b in done)
    assert all(b.bio_resid == b.bio_bcount for b in done)
    rig.g.kernel.free(va, M_TEMP)
    check_clean(rig.g)


def test_hung_backend_times_out_and_nothing_mapped_is_freed(host: Host) -> None:
    rig = make_rig(host)
    sc, be, g = rig.sc, rig.be, rig.g
    be.hold = True
    done, va = _submit_writes(rig, 3)
    host.sched.yield_()
    ring_va = sc.xbd_ring_va
    assert sc.xbd_detach(timeout=0.05) == errno.EBUSY  # the backend never let go
    assert len(done) == 3 and all(b.bio_error == errno.ENXIO for b in done)
    assert sc.xbd_ring_va == ring_va and g.kernel.malloc_usable_size(ring_va) > 0
    assert sc.statistics().state == "closing"
    be.disconnect()
    assert sc.xbd_free() == 0
    rig.g.kernel.free(va, M_TEMP)
    check_clean(g)


def test_data_page_still_mapped_at_removal_is_reported_and_reclaimed(host: Host) -> None:
    """XSA-396 class: a grant the backend still maps is never reused while mapped."""
    rig = make_rig(host)
    sc, be, g = rig.sc, rig.be, rig.g
    be.hold = True
    be.hold_mapped = True
    done, va = _submit_writes(rig, 2)
    host.sched.yield_()
    assert len(be.held_handles) == 4
    assert sc.xbd_closing(backend_gone=True) == 0  # the glue gave up on the backend
    assert len(done) == 2 and all(b.bio_error == errno.ENXIO for b in done)
    reports = g.kernel.dma_debug.reports(DmaDebugKind.STILL_MAPPED_AT_UNLOAD)
    assert len(reports) == 2
    assert g.gnttab.statistics().reclaim_pending == 4
    assert sc.xbd_free() == errno.EBUSY  # the ring is mapped too
    be.disconnect()  # lets go of everything
    assert sc.xbd_free() == 0
    host.sched.run(until=lambda: g.gnttab.statistics().reclaim_pending == 0)
    g.kernel.dma_debug.reset()
    g.gnttab.reports.clear()
    g.kernel.free(va, M_TEMP)
    check_clean(g)


def test_removal_before_connect_and_bios_on_a_dead_disk(host: Host) -> None:
    g = host.create_guest("g")
    sc = xbd_softc(g.kernel, g.hc, g.gnttab, 0)
    assert xbd_read(sc, 0, SECT)[0] == errno.ENXIO  # not connected yet
    assert sc.xbd_initialize(0) == 0
    assert xbd_write(sc, 0, bytes(SECT)) == errno.ENXIO
    assert sc.xbd_detach() == 0
    assert sc.xbd_detach() == 0
    assert sc.xbd_initialize(0) == errno.ENXIO  # a removed disk stays removed
    assert xbd_read(sc, 0, SECT)[0] == errno.ENXIO
    check_clean(g)
