"""blkback driven by a hand-written frontend: data, flush, discard, indirect, both ABIs,
errors, connect and disconnect."""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path

import pytest
from test_blkback_lib import PAGE, SECT, Front, fresh_host, make_rig, pattern

from gntdma.abi.blkif import (
    BLKIF_ABI_X86_32,
    BLKIF_ABI_X86_64,
    BLKIF_DISCARD_SECURE,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_RESERVED_1,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    BlkifAbi,
    BlkifRequestDiscard,
    BlkifRequestIndirect,
)
from gntdma.abi.grant_table import GnttabMapGrantRef, GNTTABOP_map_grant_ref
from gntdma.dev.blkback import BackingStore, Blkback, BlkbackState
from gntdma.host.image import DiskImage
from gntdma.toolstack.host import Host
from gntdma.xen.hypercall import Hypercalls

ABIS = pytest.mark.parametrize("abi", [BLKIF_ABI_X86_64, BLKIF_ABI_X86_32],
                               ids=["x86_64", "x86_32"])
MiB = 1 << 20


def mappings(host: Host) -> int:
    return host.hv.statistics().mappings


def ports(host: Host) -> int:
    return host.hv.statistics().ports


class Store:
    """A BackingStore wrapping a DiskImage that counts calls and can fail them."""

    def __init__(self, img: DiskImage) -> None:
        self.img = img
        self.calls: list[str] = []
        self.fail: set[str] = set()

    @property
    def size(self) -> int:
        return self.img.size

    @property
    def readonly(self) -> bool:
        return self.img.readonly

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if name in self.fail:
            raise OSError(errno.EIO, f"injected {name} failure")

    def preadv(self, bufs: Sequence[memoryview], offset: int) -> int:
        self._call("preadv")
        return self.img.preadv(bufs, offset)

    def pwritev(self, bufs: Sequence[memoryview], offset: int) -> int:
        self._call("pwritev")
        return self.img.pwritev(bufs, offset)

    def flush(self) -> None:
        self._call("flush")
        self.img.flush()

    def discard(self, offset: int, length: int) -> None:
        self._call("discard")
        self.img.discard(offset, length)


def test_disk_image_is_a_backing_store(tmp_path: Path) -> None:
    with DiskImage.create(tmp_path / "d.img", 4096) as img:
        store: BackingStore = img
        assert store.size == 4096


# -- data path -----------------------------------------------------------------------


@ABIS
def test_write_then_read_back(host: Host, tmp_path: Path, abi: BlkifAbi) -> None:
    r = make_rig(host, tmp_path, abi)
    f = r.front
    a, b, c = f.buf(True, pattern(1)), f.buf(True, pattern(2)), f.buf(True, pattern(3))
    # sectors 10..: 2 sectors of a (3..4), 8 of b (0..7), 1 of c (7)
    rid = f.rw(BLKIF_OP_WRITE, 10, [(a, 3, 4), (b, 0, 7), (c, 7, 7)])
    f.push()
    (rsp,) = f.wait(rid)
    assert (rsp.id, rsp.operation, rsp.status) == (rid, BLKIF_OP_WRITE, BLKIF_RSP_OKAY)
    expect = pattern(1)[3 * SECT:5 * SECT] + pattern(2) + pattern(3)[7 * SECT:]
    assert r.disk(10 * SECT, len(expect)) == expect
    assert r.disk(0, 10 * SECT) == bytes(10 * SECT)  # nothing else written
    # read it back into other places of other pages
    x, y = f.buf(fill=bytes(PAGE)), f.buf(fill=bytes(PAGE))
    rid = f.rw(BLKIF_OP_READ, 10, [(x, 1, 7), (y, 0, 3)])
    f.push()
    (rsp,) = f.wait(rid)
    assert (rsp.operation, rsp.status) == (BLKIF_OP_READ, BLKIF_RSP_OKAY)
    assert f.data(x) == bytes(SECT) + expect[:7 * SECT]
    assert f.data(y) == expect[7 * SECT:11 * SECT] + bytes(4 * SECT)
    for p in (a, b, c, x, y):
        f.release(p)  # asserts the backend unmapped before it answered
    st = r.bb.statistics()
    assert st.requests_by_op == {"write": 1, "read": 1}
    assert (st.bytes_written, st.bytes_read) == (11 * SECT, 11 * SECT)
    assert (st.segments, st.errors, st.in_flight, st.responses) == (5, 0, 0, 2)
    assert st.protocol == abi.protocol and st.state == "connected"
    assert st.mapped_now == 1  # the ring page only
    r.close()
    assert r.bb.statistics().mapped_now == 0
    assert r.mappings() == 0


@ABIS
def test_many_requests_on_a_multi_page_ring(host: Host, tmp_path: Path, abi: BlkifAbi) -> None:
    r = make_rig(host, tmp_path, abi, ring_pages=4, size=4 * MiB)
    f = r.front
    assert f.ring.nr_ents == 128
    assert r.bb.statistics().ring_size == 128
    ids: dict[int, int] = {}
    for i in range(120):
        b = f.buf(True, pattern(i))
        ids[f.rw(BLKIF_OP_WRITE, i * 8, [(b, 0, 7)])] = i
    f.push()
    assert all(rs.status == BLKIF_RSP_OKAY for rs in f.wait(*ids))
    for i in range(120):
        assert r.disk(i * 8 * SECT, PAGE) == pattern(i)
    for b in list(f.bufs):
        f.release(b)
    # read them all back, newest first
    reads = {}
    for i in reversed(range(120)):
        b = f.buf(fill=bytes(PAGE))
        reads[f.rw(BLKIF_OP_READ, i * 8, [(b, 0, 7)])] = (i, b)
    f.push()
    f.wait(*reads)
    for i, b in reads.values():
        assert f.data(b) == pattern(i)
    st = r.bb.statistics()
    assert st.in_flight_peak > 1
    assert st.interrupts >= 1
    assert st.notifications <= st.responses
    r.close()


def test_ring_indices_wrap_around_2_32(host: Host, tmp_path: Path) -> None:
    start = (1 << 32) - 5
    r = make_rig(host, tmp_path, BLKIF_ABI_X86_64, start=start)
    f = r.front
    for batch in range(4):
        ids = []
        for i in range(10):
            b = f.buf(True, pattern(batch * 10 + i))
            ids.append(f.rw(BLKIF_OP_WRITE, (batch * 10 + i) * 8, [(b, 0, 7)]))
        f.push()
        assert [rs.status for rs in f.wait(*ids)] == [BLKIF_RSP_OKAY] * 10
        for b in list(f.bufs):
            f.release(b)
    assert f.ring.req_prod_pvt == (start + 40) & 0xFFFFFFFF
    assert r.disk(39 * 8 * SECT, PAGE) == pattern(39)
    r.close()


@ABIS
def test_indirect_write_and_read(host: Host, tmp_path: Path, abi: BlkifAbi) -> None:
    r = make_rig(host, tmp_path, abi, size=4 * MiB)
    f = r.front
    bufs = [f.buf(True, pattern(i)) for i in range(40)]
    rid, ipages = f.indirect(BLKIF_OP_WRITE, 64, [(b, 0, 7) for b in bufs])
    f.push()
    (rsp,) = f.wait(rid)
    # the response carries the indirect_op, not BLKIF_OP_INDIRECT
    assert (rsp.operation, rsp.status) == (BLKIF_OP_WRITE, BLKIF_RSP_OKAY)
    assert r.disk(64 * SECT, 40 * PAGE) == b"".join(pattern(i) for i in range(40))
    for p in bufs + ipages:
        f.release(p)
    outs = [f.buf(fill=bytes(PAGE)) for _ in range(40)]
    # read the middle: half pages, to check the per-segment offsets
    rid, ipages = f.indirect(BLKIF_OP_READ, 64 + 4, [(b, 4, 7) for b in outs])
    f.push()
    assert f.status(rid) == BLKIF_RSP_OKAY
    flat = b"".join(pattern(i) for i in range(40))[4 * SECT:]
    for i, b in enumerate(outs):
        assert f.data(b) == bytes(4 * SECT) + flat[i * 4 * SECT:(i + 1) * 4 * SECT]
    st = r.bb.statistics()
    assert st.indirect_requests == 2 and st.requests_by_op == {"indirect": 2}
    assert st.bytes_written == 40 * PAGE and st.bytes_read == 40 * 4 * SECT
    r.close()


def test_indirect_over_several_indirect_pages(host: Host, tmp_path: Path) -> None:
    r = make_rig(host, tmp_path, BLKIF_ABI_X86_64, size=4 * MiB, max_indirect_segments=1024)
    f = r.front
    assert r.bb.probe_keys()["feature-max-indirect-segments"] == "1024"
    # 600 one-sector segments over 75 pages: two indirect pages of descriptors
    bufs = [f.buf(True, pattern(i)) for i in range(75)]
    segs = [(bufs[i // 8], i % 8, i % 8) for i in range(600)]
    rid, ipages = f.indirect(BLKIF_OP_WRITE, 0, segs)
    assert len(ipages) == 2
    f.push()
    assert f.status(rid) == BLKIF_RSP_OKAY
    assert r.disk(0, 75 * PAGE) == b"".join(pattern(i) for i in range(75))
    assert r.bb.statistics().segments == 600
    r.close()


# -- flush and discard ---------------------------------------------------------------


def test_flush_with_and_without_data(host: Host, tmp_path: Path) -> None:
    r = make_rig(host, tmp_path, BLKIF_ABI_X86_64)
    store = Store(r.img)
    r.bb.store = store
    f = r.front
    rid = f.rw(BLKIF_OP_FLUSH_DISKCACHE, 123456789, [])  # no data: sector ignored
    f.push()
    (rsp,) = f.wait(rid)
    assert (rsp.operation, rsp.status) == (BLKIF_OP_FLUSH_DISKCACHE, BLKIF_RSP_OKAY)
    assert store.calls == ["flush"]
    b = f.buf(True, pattern(7))
    rid = f.rw(BLKIF_OP_FLUSH_DISKCACHE, 16, [(b, 0, 7)])  # a FUA write
    f.push()
    (rsp,) = f.wait(rid)
    assert (rsp.operation, rsp.status) == (BLKIF_OP_FLUSH_DISKCACHE, BLKIF_RSP_OKAY)
    assert store.calls == ["flush", "pwritev", "flush"]
    assert r.disk(16 * SECT, PAGE) == pattern(7)
    st = r.bb.statistics()
    assert st.flushes == 2 and st.requests_by_op == {"flush_diskcache": 2}
    assert st.bytes_written == PAGE
    # a failing flush is an error, and so is a failing write
    store.fail = {"flush"}
    rid = f.rw(BLKIF_OP_FLUSH_DISKCACHE, 0, [])
    f.push()
    assert f.status(rid) == BLKIF_RSP_ERROR
    store.fail = {"pwritev"}
    rid = f.rw(BLKIF_OP_WRITE, 0, [(b, 0, 0)])
    f.push()
    assert f.status(rid) == BLKIF_RSP_ERROR
    store.fail = {"preadv"}
    x = f.buf(fill=bytes(PAGE))
    rid = f.rw(BLKIF_OP_READ, 0, [(x, 0, 7)])
    f.push()
    assert f.status(rid) == BLKIF_RSP_ERROR
    assert f.data(x) == bytes(PAGE)
    store.fail = {"discard"}
    rid = f.new_id()
    f.put(BlkifRequestDiscard(operation=BLKIF_OP_DISCARD, id=rid, sector_number=0,
                              nr_sectors=8))
    f.push()
    assert f.status(rid) == BLKIF_RSP_ERROR
    st = r.bb.statistics()
    assert st.io_errors == 4 and st.sectors_discarded == 0
    f.release(x)
    f.release(b)
    assert r.mappings() == 1
    r.close()


@ABIS
def test_discard_punches_and_checks(host: Host, tmp_path: Path, abi: BlkifAbi) -> None:
    r = make_rig(host, tmp_path, abi, size=2 * MiB)
    f = r.front
    r.img.pwritev([b"\xee" * MiB], 0)
    assert r.bb.connect_keys()["feature-discard"] == "1"

    def discard(sector: int, n: int, flag: int = 0) -> int:
        rid = f.new_id()
        f.put(BlkifRequestDiscard(operation=BLKIF_OP_DISCARD, flag=flag, handle=0, id=rid,
                                  sector_number=sector, nr_sectors=n))
        f.push()
        (rsp,) = f.wait(rid)
        assert rsp.operation == BLKIF_OP_DISCARD
        return rsp.status

    assert discard(8, 16) == BLKIF_RSP_OKAY
    assert r.disk(0, 8 * SECT) == b"\xee" * (8 * SECT)
    assert r.disk(8 * SECT, 16 * SECT) == bytes(16 * SECT)
    assert r.disk(24 * SECT, SECT) == b"\xee" * SECT
    assert discard(0, 0) == BLKIF_RSP_OKAY  # nothing to do
    assert discard(4096 - 4, 4) == BLKIF_RSP_OKAY  # up to the last sector
    assert discard(4096 - 4, 5) == BLKIF_RSP_ERROR  # one past the end
    assert discard((1 << 64) - 1, 2) == BLKIF_RSP_ERROR  # wraps in C; not here
    # discard-secure is 0: the flag is ignored, a plain discard (blkif.h)
    assert discard(0, 8, BLKIF_DISCARD_SECURE) == BLKIF_RSP_OKAY
    assert r.disk(0, 8 * SECT) == bytes(8 * SECT)
    st = r.bb.statistics()
    assert st.sectors_discarded == 28 and st.errors == 2 and st.eopnotsupp == 0
    r.close()


def test_discard_off_is_eopnotsupp(host: Host, tmp_path: Path) -> None:
    r = make_rig(host, tmp_path, BLKIF_ABI_X86_64, feature_discard=False)
    keys = r.bb.connect_keys()
    assert keys["feature-discard"] == "0" and "discard-granularity" not in keys
    f = r.front
    rid = f.new_id()
    f.put(BlkifRequestDiscard(operation=BLKIF_OP_DISCARD, id=rid, sector_number=0,
                              nr_sectors=8))
    f.push()
    assert f.status(rid) == BLKIF_RSP_EOPNOTSUPP
    r.close()


# -- read-only disks -------------------------------------------------------------------


def test_read_only_disk_refuses_writes(host: Host, tmp_path: Path) -> None:
    r = make_rig(host, tmp_path, BLKIF_ABI_X86_64, readonly=True)
    f = r.front
    keys = r.bb.connect_keys()
    assert keys["info"] == "4" and keys["feature-discard"] == "0"
    assert keys["sectors"] == str(MiB // SECT)
    b = f.buf(True, pattern(1))
    w = f.rw(BLKIF_OP_WRITE, 0, [(b, 0, 7)])
    fua = f.rw(BLKIF_OP_FLUSH_DISKCACHE, 0, [(b, 0, 7)])
    flush = f.rw(BLKIF_OP_FLUSH_DISKCACHE, 0, [])
    iw, _ = f.indirect(BLKIF_OP_WRITE, 0, [(b, 0, 7)])
    d = f.new_id()
    f.put(BlkifRequestDiscard(operation=BLKIF_OP_DISCARD, id=d, sector_number=0,
                              nr_sectors=8))
    x = f.buf(fill=bytes(PAGE))
    rd = f.rw(BLKIF_OP_READ, 0, [(x, 0, 7)])
    f.push()
    # A flush without data is refused too: Linux xen-blkback dispatch_rw_block_io makes
    # it REQ_OP_WRITE | REQ_PREFLUSH and xen_vbd_translate refuses every operation but a
    # read on a read-only vbd.
    assert [rs.status for rs in f.wait(w, fua, iw, d, flush)] == [BLKIF_RSP_ERROR] * 5
    assert f.status(rd) == BLKIF_RSP_OKAY
    assert r.disk(0, PAGE) == bytes(PAGE)
    r.close()


# -- what the frontend gets wrong ---------------------------------------------------------


@ABIS
def test_unsupported_operations(host: Host, tmp_path: Path, abi: BlkifAbi) -> None:
    r = make_rig(host, tmp_path, abi)
    f = r.front
    b = f.buf(True)
    ids = {op: f.rw(op, 0, [(b, 0, 7)]) for op in
           (BLKIF_OP_WRITE_BARRIER, BLKIF_OP_RESERVED_1, 7, 42, 255)}
    f.push()
    for op, rid in ids.items():
        (rsp,) = f.wait(rid)
        assert (rsp.operation, rsp.status) == (op, BLKIF_RSP_EOPNOTSUPP)
    st = r.bb.statistics()
    assert st.requests_by_op == {"write_barrier": 1, "reserved_1": 1, "unknown": 3}
    assert st.eopnotsupp == 5 and st.segments_mapped == 1  # only the ring was mapped
    r.close()


def test_indirect_off_is_eopnotsupp(host: Host, tmp_path: Path) -> None:
    r = make_rig(host, tmp_path, BLKIF_ABI_X86_64, max_indirect_segments=0)
    assert "feature-max-indirect-segments" not in r.bb.probe_keys()
    f = r.front
    b = f.buf()
    rid, _ = f.indirect(BLKIF_OP_READ, 0, [(b, 0, 7)])
    f.push()
    (rsp,) = f.wait(rid)
    assert (rsp.operation, rsp.status) == (BLKIF_OP_READ, BLKIF_RSP_EOPNOTSUPP)
    r.close()


@ABIS
def test_malformed_requests_get_errors(host: Host, tmp_path: Path, abi: BlkifAbi) -> None:
    r = make_rig(host, tmp_path, abi, size=MiB)  # 2048 sectors
    f = r.front
    b = f.buf(fill=pattern(5))
    last = MiB // SECT
    bad = [
        f.rw(BLKIF_OP_READ, 0, []),  # no segment
        f.rw(BLKIF_OP_WRITE, 0, []),
        f.rw(BLKIF_OP_READ, 0, [(b, 0, 0)] * 12),  # over 11
        f.rw(BLKIF_OP_FLUSH_DISKCACHE, 0, [(b, 0, 0)] * 12),
        f.rw(BLKIF_OP_READ, 0, [(b, 5, 4)]),  # last before first
        f.rw(BLKIF_OP_READ, 0, [(b, 0, 8)]),  # last past the page
        f.rw(BLKIF_OP_WRITE, 0, [(b, 0, 7), (b, 9, 9)]),  # one bad segment of two
        f.rw(BLKIF_OP_READ, last - 7, [(b, 0, 7), (b, 0, 0)]),  # one sector past the end
        f.rw(BLKIF_OP_READ, (1 << 64) - 1, [(b, 0, 0)]),
        f.indirect(BLKIF_OP_READ, 0, [])[0],  # indirect with no segment
        f.indirect(BLKIF_OP_FLUSH_DISKCACHE, 0, [(b, 0, 7)])[0],  # bad indirect_op
        f.indirect(BLKIF_OP_INDIRECT, 0, [(b, 0, 7)])[0],
        f.indirect(BLKIF_OP_READ, 0, [(b, 0, 7)] * 257)[0],  # over the advertised 256
        f.indirect(BLKIF_OP_READ, 0, [(b, 0, 7), (b, 3, 2)])[0],  # bad descriptor
        f.indirect(BLKIF_OP_READ, last - 8, [(b, 0, 7), (b, 0, 0)])[0],  # past the end
    ]
    f.push()
    assert [rs.status for rs in f.wait(*bad)] == [BLKIF_RSP_ERROR] * len(bad)
    # the edge cases that are fine
    b2 = f.buf(fill=pattern(6))
    ok = [
        f.rw(BLKIF_OP_READ, last - 8, [(b, 0, 7)]),  # the last page of the disk
        f.rw(BLKIF_OP_READ, 0, [(b, 7, 7)] * 11),  # 11 segments
        # 256 indirect segments, on two grants: Xen pins one grant at most 128
        # times of a kind (grant_table.c map_grant_ref, GNTPIN_incr2oflow_mask)
        f.indirect(BLKIF_OP_READ, 0, [(b, 0, 0)] * 128 + [(b2, 0, 0)] * 128)[0],
    ]
    f.push()
    assert [rs.status for rs in f.wait(*ok)] == [BLKIF_RSP_OKAY] * len(ok)
    assert r.bb.statistics().errors == len(bad)
    assert f.data(b) != pattern(5)  # the good reads did land
    r.close()


def test_bad_grants_fail_and_leave_nothing_mapped(host: Host, tmp_path: Path) -> None:
    r = make_rig(host, tmp_path, BLKIF_ABI_X86_64)
    f = r.front
    r.img.pwritev([pattern(9)], 0)
    good = f.buf(fill=pattern(1))
    ro = f.buf(True, pattern(2))
    other = f.g.kernel.vm_page_alloc()
    assert other is not None
    f.spare_pfns.append(other)
    error, elsewhere = f.g.gnttab.gnttab_grant_foreign_access(7, other, False)  # not dom0
    assert error == 0
    ids = [
        # a good segment then an ungranted ref: the good one is mapped, then unmapped
        f.rw(BLKIF_OP_READ, 0, [(good, 0, 7), (1000, 0, 7)]),
        f.rw(BLKIF_OP_READ, 0, [(good, 0, 7), (0xFFFFFFFF, 0, 7)]),  # past the table
        f.rw(BLKIF_OP_READ, 0, [(ro, 0, 7)]),  # read into a read-only grant
        f.rw(BLKIF_OP_READ, 0, [(elsewhere, 0, 7)]),  # granted to someone else
        f.indirect(BLKIF_OP_READ, 0, [(good, 0, 7)])[0],
    ]
    # an indirect request whose indirect page is not granted
    ids.append(f.new_id())
    f.put(BlkifRequestIndirect(operation=BLKIF_OP_INDIRECT, indirect_op=BLKIF_OP_READ,
                               nr_segments=1, id=ids[-1], indirect_grefs=(1001,)))
    f.push()
    sts = [rs.status for rs in f.wait(*ids)]
    assert sts == [BLKIF_RSP_ERROR] * 4 + [BLKIF_RSP_OKAY, BLKIF_RSP_ERROR]
    # only the last good read changed the good page; the others never touched pages
    assert f.data(good) == pattern(9)
    assert f.data(ro) == pattern(2)
    st = r.bb.statistics()
    assert st.map_errors == 5 and st.mapped_now == 1
    assert r.mappings() == 1 and r.pinned() == 1  # the ring page
    assert f.g.gnttab.gnttab_end_foreign_access_ref(elsewhere) == 1
    f.g.gnttab.gnttab_free_grant_reference(elsewhere)
    r.close()


# -- connect and disconnect ---------------------------------------------------------------


def test_connect_refusals(host: Host, tmp_path: Path) -> None:
    g = host.create_guest("g", memory_mb=8)
    front = Front(host, g, BLKIF_ABI_X86_64, ring_pages=4)
    base_maps, base_ports = mappings(host), ports(host)
    with DiskImage.create(tmp_path / "d.img", MiB) as img:
        bb = Blkback(host.dom0.hc, host.dom0.kernel, g.domid, img, max_ring_page_order=1)
        assert bb.connect(front.ring_refs[:1], front.port, "arm-abi") == errno.ENOSYS
        assert bb.connect(front.ring_refs[:1], front.port, "garbage") == errno.ENOSYS
        assert bb.connect([], front.port) == errno.EINVAL
        assert bb.connect(front.ring_refs[:3], front.port) == errno.EINVAL  # not 2**n
        assert bb.connect(front.ring_refs, front.port) == errno.EINVAL  # over 2**1
        assert bb.connect([front.ring_refs[0], 999], front.port) == errno.ENOENT
        assert mappings(host) == base_maps
        assert bb.connect(front.ring_refs[:1], 4000) == errno.EINVAL  # no such port
        assert mappings(host) == base_maps
        # impossible indices already in the shared ring
        front.views[0][0:4] = (100).to_bytes(4, "little")
        assert bb.connect(front.ring_refs[:1], front.port) == errno.EIO
        front.views[0][0:4] = bytes(4)
        assert mappings(host) == base_maps and ports(host) == base_ports
        assert bb.state == BlkbackState.DISCONNECTED
        assert bb.connect(front.ring_refs[:2], front.port, "") == 0
        assert bb.statistics().ring_pages == 2 and bb.statistics().ring_size == 64
        assert bb.connect(front.ring_refs[:2], front.port) == errno.EISCONN
        assert bb.disconnect() == 0
        assert bb.disconnect() == 0  # idempotent
    front.close()
    with pytest.raises(ValueError):
        Blkback(host.dom0.hc, host.dom0.kernel, g.domid, img, workers=0)
    with pytest.raises(ValueError):
        Blkback(host.dom0.hc, host.dom0.kernel, g.domid, img, max_indirect_segments=4097)
    with pytest.raises(ValueError):
        Blkback(host.dom0.hc, host.dom0.kernel, g.domid, img, max_ring_page_order=5)


def test_requests_queued_before_connect_are_served(host: Host, tmp_path: Path) -> None:
    g = host.create_guest("g", memory_mb=8)
    f = Front(host, g, BLKIF_ABI_X86_64)
    b = f.buf(True, pattern(3))
    rid = f.rw(BLKIF_OP_WRITE, 0, [(b, 0, 7)])
    f.push()  # the port is not bound yet: the notification goes nowhere
    with DiskImage.create(tmp_path / "d.img", MiB) as img:
        bb = Blkback(host.dom0.hc, host.dom0.kernel, g.domid, img)
        assert bb.connect(f.ring_refs, f.port, None) == 0  # the new port starts pending
        assert f.status(rid) == BLKIF_RSP_OKAY
        assert bb.disconnect() == 0
    f.close()


def test_disconnect_drains_in_flight_requests(host: Host, tmp_path: Path) -> None:
    r = make_rig(host, tmp_path, BLKIF_ABI_X86_64)
    f = r.front
    ids = [f.rw(BLKIF_OP_WRITE, i * 8, [(f.buf(True, pattern(i)), 0, 7)]) for i in range(20)]
    f.push()
    host.sched.run(until=lambda: r.bb.statistics().in_flight > 0)
    assert len(f.responses) < 20
    assert r.bb.disconnect() == 0
    host.sched.run(until=lambda: len(f.responses) == 20)  # every consumed one answered
    assert all(f.responses[i].status == BLKIF_RSP_OKAY for i in ids)
    st = r.bb.statistics()
    assert st.in_flight == 0 and st.state == "disconnected" and st.mapped_now == 0
    assert r.mappings() == 0
    # not yet consumed requests stay unanswered; a reconnect serves them
    late = f.rw(BLKIF_OP_WRITE, 800, [(f.buf(True, pattern(99)), 0, 7)])
    f.push()
    host.sched.yield_()
    assert late not in f.responses
    assert r.bb.connect(f.ring_refs, f.port, "x86_64-abi") == 0
    assert f.status(late) == BLKIF_RSP_OKAY
    assert r.disk(800 * SECT, PAGE) == pattern(99)
    assert r.bb.statistics().connects == 2
    r.close()


def test_concurrent_disconnects(host: Host, tmp_path: Path) -> None:
    """Two threads disconnect at once (xenbus and a ring error): the second waits."""
    r = make_rig(host, tmp_path, BLKIF_ABI_X86_64)
    f = r.front
    ids = [f.rw(BLKIF_OP_WRITE, i * 8, [(f.buf(True, pattern(i)), 0, 7)]) for i in range(6)]
    f.push()
    host.sched.run(until=lambda: r.bb.statistics().in_flight > 0)
    rcs: list[int] = []
    for i in range(2):
        host.sched.spawn(lambda: rcs.append(r.bb.disconnect()), name=f"disc{i}",
                         domain=host.dom0.kernel)
    host.sched.run(until=lambda: len(rcs) == 2)
    assert rcs == [0, 0] and r.bb.state == BlkbackState.DISCONNECTED
    assert sorted(f.responses) == sorted(ids)
    assert r.mappings() == 0
    r.close()


def test_workers_overlap_with_pool_io(tmp_path: Path) -> None:
    with fresh_host(io_mode="pool") as host:
        r = make_rig(host, tmp_path, BLKIF_ABI_X86_64, size=4 * MiB, ring_pages=2)
        f = r.front
        data = os.urandom(32 * PAGE)
        ids = [f.rw(BLKIF_OP_WRITE, i * 8, [(f.buf(True, data[i * PAGE:(i + 1) * PAGE]),
                                            0, 7)]) for i in range(32)]
        f.push()
        assert all(rs.status == BLKIF_RSP_OKAY for rs in f.wait(*ids))
        assert r.disk(0, 32 * PAGE) == data
        assert r.bb.statistics().in_flight_peak >= 2
        for b in list(f.bufs):
            f.release(b)
        r.close()


def test_probe_and_connect_keys(host: Host, tmp_path: Path) -> None:
    with DiskImage.create(tmp_path / "d.img", 3 * MiB) as img:
        bb = Blkback(host.dom0.hc, host.dom0.kernel, 1, img)
        assert bb.probe_keys() == {"max-ring-page-order": "4",
                                   "feature-max-indirect-segments": "256"}
        assert bb.connect_keys() == {
            "sectors": str(3 * MiB // 512), "info": "0", "sector-size": "512",
            "physical-sector-size": "512", "feature-flush-cache": "1",
            "feature-barrier": "0", "feature-persistent": "0", "feature-discard": "1",
            "discard-granularity": "512", "discard-alignment": "0", "discard-secure": "0",
        }
        assert repr(bb) == "<Blkback blkback.1.0 DISCONNECTED>"



def test_map_ops_the_hypervisor_did_not_reach_are_not_mapped(
        host: Host, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # blkback maps a request's segments with the array form of
    # HYPERVISOR_grant_table_op. Xen (xen/common/grant_table.c, do_grant_table_op
    # and gnttab_map_grant_ref, 4.17) reads and writes back the ops one by one
    # and stops at a fault (-EFAULT) with the ops before it done: an op it did not
    # reach keeps what the caller wrote, so its status must not read as
    # GNTST_okay. Here the call reaches only the first of two segments: the
    # request fails, the first segment is unmapped again (XSA-361) and every
    # foreign address goes back.
    r = make_rig(host, tmp_path, BLKIF_ABI_X86_64)
    f = r.front
    a, b = f.buf(fill=pattern(1)), f.buf(fill=pattern(2))
    hc = host.dom0.hc
    real = type(hc).grant_table_op_raw
    cut: list[int] = []

    def first_op_only(self: Hypercalls, cmd: int, buf: bytearray | memoryview,
                      count: int) -> int:
        if self is hc and cmd == GNTTABOP_map_grant_ref and count == 2:
            cut.append(count)
            size = GnttabMapGrantRef.STRUCT.size
            return real(self, cmd, memoryview(buf)[:size], count)
        return real(self, cmd, buf, count)

    in_use = set(hc.foreign.in_use)
    monkeypatch.setattr(type(hc), "grant_table_op_raw", first_op_only)
    (rid,) = [f.rw(BLKIF_OP_READ, 0, [(a, 0, 7), (b, 0, 7)])]
    f.push()
    assert [rs.status for rs in f.wait(rid)] == [BLKIF_RSP_ERROR]
    assert cut == [2]
    assert f.data(a) == pattern(1) and f.data(b) == pattern(2)
    st = r.bb.statistics()
    assert st.map_errors == 1 and st.mapped_now == 1  # the ring page
    assert r.mappings() == 1 and r.pinned() == 1
    assert hc.foreign.in_use == in_use
    monkeypatch.undo()
    r.close()
