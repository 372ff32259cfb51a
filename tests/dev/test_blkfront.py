"""blkfront against a small dom0 backend: setup, the request path, completion, errors."""

from __future__ import annotations

import errno
import random

import pytest
from test_blkfront_lib import (
    PAGE,
    SECT,
    MiniBack,
    make_rig,
    random_io,
    ring_refs_from_keys,
    run_threads,
    stamp,
    teardown,
)

from gntdma.abi.blkif import (
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BlkifKey,
)
from gntdma.abi.grant_table import GTF_permit_access, GTF_readonly
from gntdma.dev.blkfront import XbdBackendFeatures, xbd_softc
from gntdma.dev.blkfront_io import (
    XbdFile,
    XbdIOError,
    xbd_discard,
    xbd_flush,
    xbd_read,
    xbd_write,
)
from gntdma.sys import (
    BIO_ORDERED,
    BIO_READ,
    BIO_UNMAPPED,
    BIO_WRITE,
    M_TEMP,
    M_WAITOK,
    PAGE_SHIFT,
    bio,
)
from gntdma.toolstack.host import Host


def test_setup_publishes_the_transport_keys_and_grants_the_ring(host: Host) -> None:
    g = host.create_guest("g")
    sc = xbd_softc(g.kernel, g.hc, g.gnttab, 0, name="xbd0", ring_page_order=3)
    assert sc.xbd_transport_keys() == {}
    assert sc.xbd_initialize(max_ring_page_order=2) == 0  # the backend's limit wins
    assert sc.xbd_initialize(2) == errno.EALREADY
    keys = sc.xbd_transport_keys()
    assert keys[BlkifKey.RING_PAGE_ORDER.value] == "2"
    assert BlkifKey.RING_REF.value not in keys
    refs = ring_refs_from_keys(keys)
    assert len(refs) == 4 and len(set(refs)) == 4 and refs == sc.xbd_ring_refs
    assert keys[BlkifKey.PROTOCOL.value] == "x86_64-abi"
    assert int(keys[BlkifKey.EVENT_CHANNEL.value]) == sc.xbd_evtchn != 0
    # Each ring page is granted, writable, to dom0, through the ring map.
    assert sc.xbd_ring_map is not None
    for ref, seg in zip(refs, sc.xbd_ring_map.dm_segs, strict=True):
        flags, domid, frame = g.gnttab.entry(ref)
        assert flags & GTF_permit_access and not flags & GTF_readonly
        assert domid == 0 and frame == seg.ds_addr >> PAGE_SHIFT
    assert sc.statistics().ring_size == 128
    # Never connected: free gives everything back.
    assert sc.xbd_free() == 0
    assert sc.xbd_free() == 0
    assert g.gnttab.statistics().allocated == 0


def test_single_page_ring_publishes_ring_ref(host: Host) -> None:
    rig = make_rig(host, ring_page_order=0)
    keys = rig.sc.xbd_transport_keys()
    assert BlkifKey.RING_REF.value in keys and BlkifKey.RING_PAGE_ORDER.value not in keys
    assert rig.sc.statistics().ring_size == 32
    data = stamp(0, 64 * 1024, 1)
    assert xbd_write(rig.sc, 4096, data) == 0
    assert xbd_read(rig.sc, 4096, len(data)) == (0, data)
    teardown(rig)


def test_features_are_parsed_and_checked() -> None:
    keys = {"sectors": "2048", "info": "4", "feature-flush-cache": "1",
            "feature-max-indirect-segments": "64", "max-ring-pages": "8"}
    error, f = XbdBackendFeatures.from_xenstore(keys.get)
    assert error == 0 and f is not None
    assert f.media_size == 1 << 20 and f.info == 4 and f.feature_flush_cache
    assert not f.feature_discard and f.max_indirect_segments == 64 and f.max_ring_page_order == 3
    assert XbdBackendFeatures.from_xenstore({}.get)[0] == errno.ENOENT
    assert XbdBackendFeatures.from_xenstore({"sectors": "-1"}.get)[0] == errno.EINVAL
    assert XbdBackendFeatures.from_xenstore({"sectors": "8", "sector-size": "768"}.get)[0] \
        == errno.EINVAL


def test_write_then_read_small_and_multi_page(host: Host) -> None:
    rig = make_rig(host)
    sc = rig.sc
    for off, ln in [(0, SECT), (SECT * 3, SECT * 5), (PAGE, PAGE), (7 * SECT, 10 * PAGE),
                    (1 << 20, 40 * 1024), (2 << 20, 64 * 1024), (3 << 20, 1 << 20)]:
        data = stamp(off, ln, 7)
        assert xbd_write(sc, off, data) == 0
        assert bytes(rig.be.disk[off:off + ln]) == data
        assert xbd_read(sc, off, ln) == (0, data)
    st = sc.statistics()
    assert st.direct_requests > 0 and st.indirect_requests > 0
    assert st.bytes_written == st.bytes_read > 0 and st.errors == 0
    assert st.in_flight == 0 and st.ring_occupancy == 0
    teardown(rig)


def test_writes_are_granted_read_only_and_reads_writable(host: Host) -> None:
    rig = make_rig(host)
    seen: list[tuple[int, bool]] = []

    def spy(req: object) -> None:
        from gntdma.abi.blkif import BlkifRequest

        if isinstance(req, BlkifRequest) and req.operation in (BLKIF_OP_READ, BLKIF_OP_WRITE):
            for s in req.seg:
                flags = rig.g.gnttab.entry(s.gref)[0]
                seen.append((req.operation, bool(flags & GTF_readonly)))

    rig.be.on_request = spy
    assert xbd_write(rig.sc, 0, stamp(0, 3 * PAGE, 1)) == 0
    assert xbd_read(rig.sc, 0, 3 * PAGE)[0] == 0
    assert {(BLKIF_OP_WRITE, True), (BLKIF_OP_READ, False)} == set(seen)
    assert rig.be.ro_violations == 0
    teardown(rig)


def test_random_io_direct_and_indirect_against_a_model(host: Host) -> None:
    rig = make_rig(host, size=16 << 20)
    model = bytearray(16 << 20)
    rng = random.Random(5)
    assert random_io(rig, model, rng, 200) == []
    assert bytes(rig.be.disk) == bytes(model)
    st = rig.sc.statistics()
    assert st.direct_requests > 20 and st.indirect_requests > 20
    assert rig.be.ops["indirect"] == st.indirect_requests
    assert st.max_request_segments == 256
    teardown(rig)


def test_random_io_from_several_threads(host: Host) -> None:
    rig = make_rig(host, size=16 << 20)
    model = bytearray(16 << 20)
    region = 4 << 20
    fns = [lambda i=i: random_io(rig, model, random.Random(i), 40, base=i * region,
                                 span=region, max_len=1 << 20, gen=i + 1)
           for i in range(4)]
    threads = run_threads(host, fns)
    assert all(t.result == [] for t in threads)
    assert bytes(rig.be.disk) == bytes(model)
    assert rig.sc.statistics().ring_occupancy_peak > 1
    teardown(rig)


def test_direct_only_when_the_backend_has_no_indirect(host: Host) -> None:
    rig = make_rig(host, be_kw={"max_indirect_segments": 0})
    assert rig.sc.statistics().max_request_segments == 11
    data = stamp(0, 1 << 20, 3)
    assert xbd_write(rig.sc, 0, data) == 0  # split into 44 KiB requests (11 pages)
    assert xbd_read(rig.sc, 0, len(data)) == (0, data)
    st = rig.sc.statistics()
    assert st.indirect_requests == 0 and st.direct_requests >= 2 * 24
    assert all(op != BLKIF_OP_INDIRECT for op, _, _ in rig.be.log)
    teardown(rig)


def test_x86_32_protocol(host: Host) -> None:
    rig = make_rig(host, protocol="x86_32-abi")
    assert rig.sc.xbd_transport_keys()[BlkifKey.PROTOCOL.value] == "x86_32-abi"
    assert rig.be.abi is not None and rig.be.abi.entry_size == 108
    model = bytearray(8 << 20)
    assert random_io(rig, model, random.Random(3), 60) == []
    teardown(rig)


def test_flush_and_discard(host: Host) -> None:
    rig = make_rig(host)
    sc = rig.sc
    assert xbd_write(sc, 0, b"\xaa" * (64 * 1024)) == 0
    assert xbd_flush(sc) == 0
    assert xbd_discard(sc, 4096, 8192) == 0
    assert rig.be.disk[:4096] == b"\xaa" * 4096
    assert rig.be.disk[4096:12288] == bytes(8192)
    assert rig.be.disk[12288:65536] == b"\xaa" * (65536 - 12288)
    st = sc.statistics()
    assert st.flushes == 1 and st.discards == 1
    assert rig.be.ops["flush"] == 1 and rig.be.ops["discard"] == 1
    # A backend that refuses: EOPNOTSUPP reaches the bio that asked.
    rig.be.refuse_ops = {BLKIF_OP_FLUSH_DISKCACHE}
    assert xbd_flush(sc) == errno.EOPNOTSUPP
    teardown(rig)


def test_flush_waits_for_the_ring_to_drain_and_freezes_it(host: Host) -> None:
    """A flush is single-stepped: after every request before it, before any after."""
    rig = make_rig(host)
    sc, be = rig.sc, rig.be
    be.hold = True
    done: list[int] = []
    bufs = []

    def submit(cmd: int, off: int = 0, ln: int = 0) -> bio:
        va = rig.g.kernel.malloc(max(ln, SECT), M_TEMP, M_WAITOK) if ln > 0 else 0
        bp = bio(bio_cmd=cmd, bio_offset=off, bio_bcount=ln, bio_data=va,
                 bio_done=lambda b: done.append(b.bio_offset))
        if va != 0:
            bufs.append(va)
        sc.xbd_strategy(bp)
        return bp

    from gntdma.sys import BIO_FLUSH

    submit(BIO_WRITE, 0, 4096)
    submit(BIO_WRITE, 8192, 4096)
    submit(BIO_FLUSH)
    submit(BIO_WRITE, 16384, 4096)
    host.sched.yield_()
    assert [r.operation for r in be.held] == [BLKIF_OP_WRITE, BLKIF_OP_WRITE]  # flush waits
    be.release()
    host.sched.run(until=lambda: len(done) == 4)
    ops = [(op, sector) for op, sector, _ in be.log]
    assert ops == [(BLKIF_OP_WRITE, 0), (BLKIF_OP_WRITE, 16), (BLKIF_OP_FLUSH_DISKCACHE, 0),
                   (BLKIF_OP_WRITE, 32)]
    for va in bufs:
        rig.g.kernel.free(va, M_TEMP)
    teardown(rig)


def test_ordered_bio_is_single_stepped(host: Host) -> None:
    rig = make_rig(host)
    sc, be = rig.sc, rig.be
    be.hold = True
    kern = rig.g.kernel
    va = kern.malloc(3 * 4096, M_TEMP, M_WAITOK)
    done: list[bio] = []
    bps = [bio(bio_cmd=BIO_WRITE, bio_offset=i * 4096, bio_bcount=4096, bio_data=va + i * 4096,
               bio_done=done.append) for i in range(3)]
    bps[1].bio_flags |= BIO_ORDERED
    for bp in bps:
        sc.xbd_strategy(bp)
    host.sched.yield_()
    assert len(be.held) == 1
    be.release()
    be.hold = True
    host.sched.run(until=lambda: len(be.held) == 1)
    assert be.held[0].sector_number == 8  # the ordered one, alone
    be.release()
    host.sched.run(until=lambda: len(done) == 3)
    assert [s for _, s, _ in be.log] == [0, 8, 16]
    kern.free(va, M_TEMP)
    teardown(rig)


def test_backend_error_fails_only_the_bio_that_hit_it(host: Host) -> None:
    rig = make_rig(host)
    sc = rig.sc
    rig.be.fail_sectors = {100}
    assert xbd_write(sc, 0, stamp(0, 4096, 1)) == 0
    assert xbd_write(sc, 96 * SECT, stamp(0, 8 * SECT, 1)) == errno.EIO
    error, _ = xbd_read(sc, 99 * SECT, 2 * SECT)
    assert error == errno.EIO
    assert xbd_read(sc, 0, 4096) == (0, stamp(0, 4096, 1))
    # A split bio: one child fails, the parent reports it.
    assert xbd_write(sc, 0, stamp(0, 2 << 20, 2)) == errno.EIO
    assert sc.statistics().errors >= 3
    teardown(rig)


def test_bad_bios_are_refused(host: Host) -> None:
    rig = make_rig(host, size=1 << 20, be_kw={"discard": False, "flush": False})
    sc = rig.sc
    assert xbd_write(sc, 100, b"x" * SECT) == errno.EINVAL
    assert xbd_write(sc, 0, b"x" * 100) == errno.EINVAL
    assert xbd_read(sc, (1 << 20) - SECT, 2 * SECT)[0] == errno.EIO
    assert xbd_flush(sc) == errno.EOPNOTSUPP
    assert xbd_discard(sc, 0, 4096) == errno.EOPNOTSUPP
    assert xbd_read(sc, 0, 0) == (0, b"")
    assert rig.be.log == []
    teardown(rig)


def test_read_only_disk_refuses_writes(host: Host) -> None:
    rig = make_rig(host, be_kw={"readonly": True})
    assert xbd_write(rig.sc, 0, bytes(SECT)) == errno.EROFS
    assert xbd_read(rig.sc, 0, SECT) == (0, bytes(SECT))
    f = XbdFile(rig.sc)
    assert not f.writable()
    f.close()
    teardown(rig)


def test_unmapped_bio_through_strategy(host: Host) -> None:
    rig = make_rig(host)
    kern = rig.g.kernel
    pfns = [kern.vm_page_alloc() for _ in range(300)]
    assert all(p is not None for p in pfns)
    ma = [p for p in pfns if p is not None]
    off = 3 * SECT
    length = 299 * PAGE - off  # more than one request: split, still unmapped
    data = stamp(0, length, 9)
    pos = 0
    for i, p in enumerate(ma):
        start = off if i == 0 else 0
        n = min(PAGE - start, length - pos)
        kern.physmem.page(p)[start:start + n] = data[pos:pos + n]
        pos += n
    done: list[bio] = []
    bp = bio(bio_cmd=BIO_WRITE, bio_flags=BIO_UNMAPPED, bio_offset=0, bio_bcount=length,
             bio_ma=ma, bio_ma_offset=off, bio_ma_n=len(ma), bio_done=done.append)
    rig.sc.xbd_strategy(bp)
    host.sched.run(until=lambda: bool(done))
    assert bp.bio_error == 0 and bp.bio_resid == 0
    assert bytes(rig.be.disk[:length]) == data
    rd = bio(bio_cmd=BIO_READ, bio_flags=BIO_UNMAPPED, bio_offset=0, bio_bcount=length,
             bio_ma=ma, bio_ma_offset=off, bio_ma_n=len(ma), bio_done=done.append)
    for p in ma:
        kern.physmem.page(p)[:] = bytes(PAGE)
    rig.sc.xbd_strategy(rd)
    host.sched.run(until=lambda: len(done) == 2)
    assert rd.bio_error == 0
    assert bytes(kern.physmem.page(ma[1])[:PAGE]) == data[PAGE - off:2 * PAGE - off]
    for p in ma:
        kern.vm_page_free(p)
    teardown(rig)


def test_file_view_unaligned_read_modify_write(host: Host) -> None:
    rig = make_rig(host, size=4 << 20)
    model = bytearray(4 << 20)
    rng = random.Random(11)
    with XbdFile(rig.sc, chunk=256 * 1024) as f:
        assert f.readable() and f.writable() and f.seekable() and f.size == 4 << 20
        for _ in range(60):
            off = rng.randrange(0, (4 << 20) - 1)
            ln = rng.choice([1, 3, 511, 512, 513, 4095, 4097, 100_000, 700_000])
            ln = min(ln, (4 << 20) - off)
            if rng.random() < 0.5:
                data = rng.randbytes(ln)
                f.seek(off)
                assert f.write(data) == ln and f.tell() == off + ln
                model[off:off + ln] = data
            else:
                f.seek(off)
                assert f.read(ln) == bytes(model[off:off + ln])
        f.seek(-10, 2)
        assert f.read(100) == bytes(model[-10:])
        assert f.read(1) == b""
        with pytest.raises(XbdIOError) as ei:
            f.write(b"x")
        assert ei.value.errno == errno.ENOSPC
        f.seek(-3, 2)
        assert f.write(b"abcdef") == 3
        model[-3:] = b"abc"
        f.flush()
    assert bytes(rig.be.disk) == bytes(model)
    assert rig.be.ops["flush"] >= 2
    teardown(rig)


def test_backend_answering_an_unknown_id_breaks_the_device(host: Host) -> None:
    rig = make_rig(host)
    sc, be = rig.sc, rig.be
    assert xbd_write(sc, 0, bytes(4096)) == 0

    be.forge_id = 77  # answer a request id that is not in flight
    done: list[bio] = []
    va = rig.g.kernel.malloc(4096, M_TEMP, M_WAITOK)
    sc.xbd_strategy(bio(bio_cmd=BIO_READ, bio_offset=0, bio_bcount=4096, bio_data=va,
                        bio_done=done.append))
    host.sched.run(until=lambda: sc.statistics().state == "broken")
    st = sc.statistics()
    assert st.state == "broken" and "77" in st.protocol_error
    assert xbd_read(sc, 0, 4096)[0] == errno.EIO
    assert done == []  # still on the ring: the backend may be using its pages
    assert sc.xbd_closing(backend_gone=True) == 0
    assert len(done) == 1 and done[0].bio_error == errno.ENXIO
    assert sc.xbd_free() == errno.EBUSY  # the backend still maps the ring
    be.disconnect()
    assert sc.xbd_free() == 0
    rig.g.kernel.free(va, M_TEMP)
    host.sched.run(until=lambda: rig.g.gnttab.statistics().reclaim_pending == 0)
    rig.g.kernel.dma_debug.reset()
    rig.g.gnttab.reports.clear()


def test_two_disks_share_nothing(host: Host) -> None:
    a = make_rig(host, name="xbd0")
    b = make_rig(host, a.g, name="xbd1")
    assert xbd_write(a.sc, 0, b"a" * 4096) == 0
    assert xbd_write(b.sc, 0, b"b" * 4096) == 0
    assert a.be.disk[:4096] == b"a" * 4096 and b.be.disk[:4096] == b"b" * 4096
    teardown(a, last=False)
    teardown(b)


def test_miniback_is_independent_of_the_frontend_under_test(host: Host) -> None:
    """Sanity of the test backend: it rejects a request a broken frontend would send."""
    g = host.create_guest("g")
    be = MiniBack(host, g, 1 << 20)
    assert be._rw(BLKIF_OP_WRITE, 0, []) == 0
    from gntdma.abi.blkif import BlkifRequestSegment

    assert be._rw(BLKIF_OP_WRITE, 0, [BlkifRequestSegment(8, 3, 2)]) != 0
    be.errors.clear()
