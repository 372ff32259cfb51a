"""blkback against a hostile frontend: fuzzed slots, garbage indirect pages, bad
grants, slots rewritten while the backend reads them, broken producer indices.

The backend must answer every request it consumes exactly once, with the
status the rules give (checked against a model here), never touch a page that
was not granted to it (nor a granted page outside what a successful read may
write), leave nothing mapped, and keep dom0 running: a broken ring only
disconnects that device.
"""

from __future__ import annotations

import os
import random
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_blkback_lib import PAGE, SECT, Buf, Front, Rig, fresh_host, make_rig, pattern

from gntdma.abi.blkif import (
    BLKIF_ABI_X86_32,
    BLKIF_ABI_X86_64,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    BlkifAbi,
    BlkifAnyRequest,
    BlkifRequestDiscard,
    BlkifRequestIndirect,
    BlkifRequestSegment,
    BlkifResponse,
    BlkifRsp,
)
from gntdma.abi.ring import SringHeader, sring_init
from gntdma.dev.blkback import BlkbackState
from gntdma.sched import RandomStrategy, VirtualClock, checkpoint
from gntdma.toolstack.host import Host

DISK_SECTORS = 160
MAX_INDIRECT = 256
M32 = 0xFFFFFFFF
ABIS = [BLKIF_ABI_X86_64, BLKIF_ABI_X86_32]

# -- what the fuzzer writes ------------------------------------------------------------

#: Pages a segment may name: "dst" pages are granted writable and are where reads
#: go; "src" pages are granted writable and only ever written from; "ro" pages are
#: granted read-only; "bogus" refs were never granted; "other" is granted to a
#: domain that is not the backend.
READ_LABELS = ["dst0", "dst1", "ro0", "bogus", "other"]
WRITE_LABELS = ["src0", "src1", "ro0", "ro1", "bogus", "other"]


@dataclass(frozen=True)
class RawSlot:
    data: bytes


@dataclass(frozen=True)
class Rw:
    op: int
    nr_segments: int
    sector: int
    segs: tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class Indirect:
    iop: int
    nr_segments: int
    sector: int
    segs: tuple[tuple[str, int, int], ...]  # descriptors, when not garbage
    garbage: bytes | None  # the indirect page, as raw bytes
    page_label: str  # "ipage" (granted) or a SEG_LABELS one


@dataclass(frozen=True)
class Discard:
    flag: int
    sector: int
    nr_sectors: int


Spec = RawSlot | Rw | Indirect | Discard

sectors = st.one_of(st.integers(0, DISK_SECTORS + 4),
                    st.integers(DISK_SECTORS - 12, DISK_SECTORS),
                    st.integers(0, (1 << 64) - 1))
sect_in_page = st.one_of(st.integers(0, 7), st.sampled_from([7, 8, 9, 255]),
                         st.integers(0, 255))
GOOD_READ = ["dst0", "dst1"]
GOOD_WRITE = ["src0", "src1", "ro0", "ro1"]


def seg_list(labels: list[str], max_size: int, clean: bool
             ) -> st.SearchStrategy[tuple[tuple[str, int, int], ...]]:
    well_formed = st.tuples(st.sampled_from(labels), st.integers(0, 7), st.integers(0, 7)) \
        .map(lambda t: (t[0], min(t[1], t[2]), max(t[1], t[2])))
    one = well_formed if clean else st.one_of(
        well_formed, st.tuples(st.sampled_from(labels), sect_in_page, sect_in_page))
    return st.lists(one, min_size=1 if clean else 0, max_size=max_size).map(tuple)


def _total(segs: tuple[tuple[str, int, int], ...]) -> int:
    return sum(b - a + 1 for _l, a, b in segs)


def _spoil(draw: st.DrawFn, segs: tuple[tuple[str, int, int], ...], read: bool
           ) -> tuple[tuple[str, int, int], ...]:
    """One segment of a clean list made to name a grant that cannot be mapped."""
    i = draw(st.integers(0, len(segs) - 1))
    bad = draw(st.sampled_from(["bogus", "other", "ro0"] if read else ["bogus", "other"]))
    return (*segs[:i], (bad, segs[i][1], segs[i][2]), *segs[i + 1:])


def _bend(draw: st.DrawFn, segs: tuple[tuple[str, int, int], ...]
          ) -> tuple[tuple[str, int, int], ...]:
    """One segment of a clean list given sectors that break the segment rules."""
    i = draw(st.integers(0, len(segs) - 1))
    first, last = draw(st.sampled_from([(0, 8), (8, 8), (3, 2), (7, 9), (5, 255), (1, 0)]))
    return (*segs[:i], (segs[i][0], first, last), *segs[i + 1:])


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    """A request slot: clean (it should succeed), clean but for one grant that does
    not map (the other segments map, then must be unmapped), clean but for one
    segment that breaks the sector rules, or fuzzed."""
    kind = draw(st.sampled_from(["rw", "rw", "rw", "indirect", "indirect", "discard", "raw"]))
    mode = draw(st.sampled_from(["clean", "clean", "badgrant", "badseg", "fuzz", "fuzz"]))
    clean = mode != "fuzz"
    if kind == "raw":
        op = draw(st.one_of(st.sampled_from([0, 1, 3, 5, 6]), st.integers(0, 255)))
        return RawSlot(bytes([op]) + draw(st.binary(min_size=111, max_size=111)))
    if kind == "discard":
        if clean:
            n = draw(st.integers(0, 24))
            return Discard(0, draw(st.integers(0, DISK_SECTORS - n)), n)
        return Discard(draw(st.sampled_from([0, 0, 1, 2, 255])), draw(sectors),
                       draw(st.one_of(st.integers(0, 40), st.integers(0, (1 << 64) - 1))))
    if kind == "indirect":
        if clean:
            iop: int = draw(st.sampled_from([BLKIF_OP_READ, BLKIF_OP_WRITE]))
            segs = draw(seg_list(GOOD_READ if iop == BLKIF_OP_READ else GOOD_WRITE, 20,
                                 True))
            sector = draw(st.integers(0, DISK_SECTORS - _total(segs)))
            if mode == "badgrant":
                segs = _spoil(draw, segs, iop == BLKIF_OP_READ)
            elif mode == "badseg":
                segs = _bend(draw, segs)
            return Indirect(iop, len(segs), sector, segs, None, "ipage")
        iop = draw(st.one_of(st.sampled_from([int(BLKIF_OP_READ), int(BLKIF_OP_WRITE)]),
                             st.integers(0, 255)))
        labels = READ_LABELS if iop == BLKIF_OP_READ else WRITE_LABELS
        segs = draw(seg_list(labels, 24, False))
        garbage = draw(st.one_of(st.none(), st.binary(min_size=PAGE, max_size=PAGE)))
        nr = draw(st.one_of(st.just(len(segs)), st.integers(0, 600)))
        page_label = draw(st.sampled_from(["ipage", "ipage", "bogus", "other"]))
        return Indirect(iop, nr, draw(sectors), segs, garbage, page_label)
    if clean:
        op = draw(st.sampled_from([BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_FLUSH_DISKCACHE]))
        segs = draw(seg_list(GOOD_READ if op == BLKIF_OP_READ else GOOD_WRITE, 11, True))
        sector = draw(st.integers(0, DISK_SECTORS - _total(segs)))
        if mode == "badgrant":
            segs = _spoil(draw, segs, op == BLKIF_OP_READ)
        elif mode == "badseg":
            segs = _bend(draw, segs)
        return Rw(op, len(segs), sector, segs)
    op = draw(st.one_of(st.sampled_from([BLKIF_OP_READ, BLKIF_OP_WRITE,
                                         BLKIF_OP_FLUSH_DISKCACHE]), st.integers(0, 255)))
    labels = READ_LABELS if op == BLKIF_OP_READ else WRITE_LABELS
    segs = draw(seg_list(labels, 11, False))
    nr = draw(st.one_of(st.just(len(segs)), st.integers(0, 255)))
    return Rw(op, nr, draw(sectors), segs)


# -- the world of one example ----------------------------------------------------------


@dataclass
class World:
    """The frontend's pages and what the backend may do with them."""

    rig: Rig
    pages: dict[str, Buf] = field(default_factory=dict)
    refs: dict[int, str] = field(default_factory=dict)  # gref -> "rw" | "ro"
    initial: dict[int, bytes] = field(default_factory=dict)  # pfn -> bytes
    spares: list[int] = field(default_factory=list)
    disk0: bytes = b""

    @classmethod
    def build(cls, rig: Rig) -> World:
        w = cls(rig)
        f = rig.front
        for i, label in enumerate(["dst0", "dst1", "src0", "src1", "ro0", "ro1"]):
            b = f.buf(readonly=label.startswith("ro"), fill=pattern(100 + i))
            w.pages[label] = b
            w.refs[b.ref] = "ro" if b.readonly else "rw"
            w.initial[b.pfn] = pattern(100 + i)
        # granted to domain 9, which is not the backend
        pfn = f.spare(pattern(300))
        error, ref = f.g.gnttab.gnttab_grant_foreign_access(9, pfn, False)
        assert error == 0
        w.pages["other"] = Buf(pfn, ref, False)
        w.initial[pfn] = pattern(300)
        for i in range(3):  # never granted at all
            w.spares.append(f.spare(pattern(200 + i)))
            w.initial[w.spares[-1]] = pattern(200 + i)
        w.disk0 = os.urandom(DISK_SECTORS * SECT)
        rig.img.pwritev([w.disk0], 0)
        return w

    def ref(self, label: str) -> int:
        if label == "bogus":
            return 1000
        return self.pages[label].ref

    def pfn_of_ref(self, ref: int) -> int | None:
        for b in self.pages.values():
            if b.ref == ref:
                return b.pfn
        return None

    def close(self) -> None:
        g = self.rig.front.g
        other = self.pages["other"]
        assert g.gnttab.gnttab_end_foreign_access_ref(other.ref) == 1
        g.gnttab.gnttab_free_grant_reference(other.ref)


# -- the model -----------------------------------------------------------------------------

_SEG = struct.Struct("<IBB2x")


@dataclass
class Outcome:
    operation: int
    status: int
    #: for an OK read: (gref, first_sect, last_sect) written into the frontend's pages
    reads: list[tuple[int, int, int]] = field(default_factory=list)
    #: for an OK write: (disk sector, source gref, sector in page) per sector written
    writes: list[tuple[int, int, int]] = field(default_factory=list)
    #: for an OK discard: the sectors zeroed
    zeroed: range = range(0)


def _segs_ok(segs: list[tuple[int, int, int]], sector: int) -> bool:
    total = 0
    for _g, first, last in segs:
        if last >= 8 or last < first:
            return False
        total += last - first + 1
    return total == 0 or sector + total <= DISK_SECTORS


def _maps(segs: list[tuple[int, int, int]], refs: dict[int, str], writable: bool) -> bool:
    return all(refs.get(g) == "rw" or (refs.get(g) == "ro" and not writable)
               for g, _f, _l in segs)


def _data(op: int, sector: int, segs: list[tuple[int, int, int]]) -> Outcome:
    out = Outcome(op, BLKIF_RSP_OKAY)
    if op == BLKIF_OP_READ:
        out.reads = list(segs)
    else:
        s = sector
        for g, first, last in segs:
            for k in range(first, last + 1):
                out.writes.append((s, g, k))
                s += 1
    return out


def expect(req: BlkifAnyRequest, refs: dict[int, str],
           ipages: dict[int, bytes]) -> Outcome:
    """What the backend must answer (the rules in gntdma.dev.blkback_req's docstring)."""
    if isinstance(req, BlkifRequestDiscard):
        # BLKIF_DISCARD_SECURE is ignored: blkback publishes discard-secure 0
        if req.sector_number + req.nr_sectors > DISK_SECTORS:
            return Outcome(req.operation, BLKIF_RSP_ERROR)
        o = Outcome(req.operation, BLKIF_RSP_OKAY)
        o.zeroed = range(req.sector_number, req.sector_number + req.nr_sectors)
        return o
    if isinstance(req, BlkifRequestIndirect):
        iop, nr = req.indirect_op, req.nr_segments
        if iop not in (BLKIF_OP_READ, BLKIF_OP_WRITE) or nr == 0 or nr > MAX_INDIRECT:
            return Outcome(iop, BLKIF_RSP_ERROR)
        (igref,) = req.indirect_grefs
        if refs.get(igref) not in ("rw", "ro"):
            return Outcome(iop, BLKIF_RSP_ERROR)
        page = ipages[igref]
        segs = [_SEG.unpack_from(page, i * 8) for i in range(nr)]
        if not _segs_ok(segs, req.sector_number):
            return Outcome(iop, BLKIF_RSP_ERROR)
        if not _maps(segs, refs, iop == BLKIF_OP_READ):
            return Outcome(iop, BLKIF_RSP_ERROR)
        return _data(iop, req.sector_number, segs)
    op, nr = req.operation, req.nr_segments
    segs = [(s.gref, s.first_sect, s.last_sect) for s in req.seg]
    if op in (BLKIF_OP_READ, BLKIF_OP_WRITE):
        if nr == 0 or nr > 11:
            return Outcome(op, BLKIF_RSP_ERROR)
    elif op == BLKIF_OP_FLUSH_DISKCACHE:
        if nr > 11:
            return Outcome(op, BLKIF_RSP_ERROR)
    else:
        return Outcome(op, BLKIF_RSP_EOPNOTSUPP)
    if not _segs_ok(segs, req.sector_number):
        return Outcome(op, BLKIF_RSP_ERROR)
    if not _maps(segs, refs, op == BLKIF_OP_READ):
        return Outcome(op, BLKIF_RSP_ERROR)
    if op == BLKIF_OP_FLUSH_DISKCACHE and nr == 0:
        return Outcome(op, BLKIF_RSP_OKAY)
    out = _data(BLKIF_OP_WRITE if op == BLKIF_OP_FLUSH_DISKCACHE else op,
                req.sector_number, segs)
    out.operation = op
    return out


# -- building the slots ---------------------------------------------------------------------


def build_slot(w: World, abi: BlkifAbi, spec: Spec, rid: int) -> bytes:
    f = w.rig.front
    if isinstance(spec, RawSlot):
        raw = bytearray(spec.data[:abi.entry_size])
        struct.pack_into("<Q", raw, 8 if abi.entry_size == 112 else 4, rid)
        return bytes(raw)
    if isinstance(spec, Discard):
        return abi.pack_request(BlkifRequestDiscard(
            operation=BLKIF_OP_DISCARD, flag=spec.flag, id=rid,
            sector_number=spec.sector, nr_sectors=spec.nr_sectors))
    if isinstance(spec, Rw):
        seg = tuple(BlkifRequestSegment(w.ref(lab), a, b) for lab, a, b in spec.segs)
        from gntdma.abi.blkif import BlkifRequest
        return abi.pack_request(BlkifRequest(operation=spec.op, nr_segments=spec.nr_segments,
                                             id=rid, sector_number=spec.sector, seg=seg))
    if spec.garbage is not None:
        content = spec.garbage
    else:
        content = b"".join(BlkifRequestSegment(w.ref(lab), a, b).pack()
                           for lab, a, b in spec.segs).ljust(PAGE, b"\0")
    if spec.page_label == "ipage":
        ip = f.buf(readonly=True, fill=content)
        w.refs[ip.ref] = "ro"
        w.initial[ip.pfn] = content
        iref = ip.ref
    else:
        iref = w.ref(spec.page_label)
    return abi.pack_request(BlkifRequestIndirect(
        operation=BLKIF_OP_INDIRECT, indirect_op=spec.iop, nr_segments=spec.nr_segments,
        id=rid, sector_number=spec.sector,
        indirect_grefs=(iref,) * min(8, -(-spec.nr_segments // 512))))


def run_batch(w: World, abi: BlkifAbi, batch: list[Spec]) -> None:
    rig, f = w.rig, w.rig.front
    host = rig.host
    slots: list[tuple[int, bytes]] = []
    for spec in batch:
        rid = f.new_id()
        slots.append((rid, build_slot(w, abi, spec, rid)))
    ipages = {b.ref: f.data(b) for b in f.bufs}
    expected: dict[int, Outcome] = {}
    for (rid, raw), spec in zip(slots, batch, strict=True):
        f.put_raw(raw)
        expected[rid] = expect(abi.unpack_request(raw), w.refs, ipages)
        event(f"{type(spec).__name__}: {BlkifRsp(expected[rid].status).name}")
    f.push()
    got = f.wait(*expected)
    for rid, rsp in zip(expected, got, strict=True):
        e = expected[rid]
        assert (rsp.operation, rsp.status) == (e.operation & 0xFF, e.status), (
            rid, abi.unpack_request(dict(slots)[rid]))
    # -- no page written outside what a successful read may write
    allowed: dict[int, bytearray] = {}
    for e in expected.values():
        for g, first, last in e.reads:
            pfn = w.pfn_of_ref(g)
            assert pfn is not None
            mask = allowed.setdefault(pfn, bytearray(PAGE))
            mask[first * SECT:(last + 1) * SECT] = b"\1" * ((last - first + 1) * SECT)
    for pfn, before in w.initial.items():
        now = bytes(f.page(pfn))
        allowed_here = allowed.get(pfn)
        if allowed_here is None:
            assert now == before, f"page {pfn:#x} changed, no read was allowed into it"
        else:
            for i in range(0, PAGE, SECT):
                if allowed_here[i] == 0:
                    assert now[i:i + SECT] == before[i:i + SECT], f"page {pfn:#x}+{i}"
    # -- every disk sector is what it was, or what an OK write or discard made it
    disk = rig.disk(0, DISK_SECTORS * SECT)
    cands: dict[int, list[bytes]] = {}
    for e in expected.values():
        for s, g, k in e.writes:
            pfn = w.pfn_of_ref(g)
            assert pfn is not None
            cands.setdefault(s, []).append(w.initial[pfn][k * SECT:(k + 1) * SECT])
        for s in e.zeroed:
            cands.setdefault(s, []).append(bytes(SECT))
    for s in range(DISK_SECTORS):
        now = disk[s * SECT:(s + 1) * SECT]
        ok = [w.disk0[s * SECT:(s + 1) * SECT], *cands.get(s, [])]
        if s in cands:  # written or zeroed: the last one wins, which is any of them
            ok = ok[1:]
        assert now in ok, f"disk sector {s}"
    # what the next batch starts from
    w.disk0 = disk
    for pfn in w.initial:
        w.initial[pfn] = bytes(f.page(pfn))
    # -- nothing left mapped beyond the ring, nothing in flight
    st_ = rig.bb.statistics()
    assert st_.in_flight == 0 and st_.mapped_now == 1
    assert rig.mappings() == 1 and rig.pinned() == 1
    assert st_.state == "connected"
    assert host.hv.domains[0] is not None


@pytest.mark.parametrize("abi", ABIS, ids=["x86_64", "x86_32"])
@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(batches=st.lists(st.lists(specs(), min_size=1, max_size=16), min_size=1,
                        max_size=3))
def test_fuzzed_requests(tmp_path: Path, abi: BlkifAbi, batches: list[list[Spec]]) -> None:
    with fresh_host() as host:
        rig = make_rig(host, Path(tempfile.mkdtemp(dir=tmp_path)), abi,
                       size=DISK_SECTORS * SECT, guest_memory_mb=2,
                       max_indirect_segments=MAX_INDIRECT)
        w = World.build(rig)
        for batch in batches:
            run_batch(w, abi, batch)
            for b in list(rig.front.bufs):  # indirect pages of this batch
                if b not in w.pages.values():
                    del w.refs[b.ref]
                    del w.initial[b.pfn]
                    rig.front.release(b)
        w.close()
        rig.close()


# -- broken rings -----------------------------------------------------------------------------


def _header(f: Front) -> SringHeader:
    return SringHeader.unpack_from(f.views[0], 0)


def _set_req_prod(f: Front, value: int) -> None:
    struct.pack_into("<I", f.views[0], 0, value & M32)


@pytest.mark.parametrize("abi", ABIS, ids=["x86_64", "x86_32"])
@pytest.mark.parametrize("how", ["overflow", "backwards", "far"])
def test_broken_producer_index_disconnects(host: Host, tmp_path: Path, abi: BlkifAbi,
                                           how: str) -> None:
    errors: list[str] = []
    rig = make_rig(host, tmp_path, abi, on_ring_error=errors.append)
    f, bb = rig.front, rig.bb
    ids = [f.rw(BLKIF_OP_WRITE, i * 8, [(f.buf(True, pattern(i)), 0, 7)]) for i in range(5)]
    f.push()
    assert all(r.status == BLKIF_RSP_OKAY for r in f.wait(*ids))
    cons = _header(f).req_prod
    if how == "overflow":  # one more request outstanding than the ring holds
        _set_req_prod(f, cons + f.ring.nr_ents + 1)
    elif how == "backwards":  # behind what the backend already consumed
        _set_req_prod(f, cons - 2)
    else:
        _set_req_prod(f, cons + 0x80000000)
    f.notify()
    host.sched.run(until=lambda: bb.state == BlkbackState.DISCONNECTED)
    st_ = bb.statistics()
    assert st_.ring_errors == 1 and st_.mapped_now == 0 and st_.state == "disconnected"
    assert "req_prod" in bb.error and errors == [bb.error]
    assert rig.mappings() == 0 and rig.pinned() == 0
    # dom0 goes on: the frontend starts over on a fresh ring and is served
    for b in list(f.bufs):
        f.release(b)
    for v in f.views:
        v[:] = bytes(PAGE)
    sring_init(f.views[0])
    from gntdma.abi.ring import FrontRing
    f.ring = FrontRing(f.views, abi.entry_size)
    f.responses.clear()
    assert bb.connect(f.ring_refs, f.port, abi.protocol) == 0
    b = f.buf(True, pattern(42))
    rid = f.rw(BLKIF_OP_WRITE, 64, [(b, 0, 7)])
    f.push()
    assert f.status(rid) == BLKIF_RSP_OKAY
    assert rig.disk(64 * SECT, PAGE) == pattern(42)
    assert bb.statistics().connects == 2 and bb.error != ""
    rig.close()


def test_ring_broken_with_requests_in_flight(host: Host, tmp_path: Path) -> None:
    rig = make_rig(host, tmp_path, BLKIF_ABI_X86_64)
    f, bb = rig.front, rig.bb
    ids = [f.rw(BLKIF_OP_WRITE, i * 8, [(f.buf(True, pattern(i)), 0, 7)]) for i in range(8)]
    f.push()
    host.sched.run(until=lambda: bb.statistics().in_flight > 0)
    _set_req_prod(f, _header(f).req_prod + 100)
    f.notify()
    host.sched.run(until=lambda: bb.state == BlkbackState.DISCONNECTED)
    # what was consumed before the ring broke was still answered
    assert sorted(f.responses) == sorted(ids)
    assert all(f.responses[i].status == BLKIF_RSP_OKAY for i in ids)
    assert rig.mappings() == 0
    rig.close()


# -- slots rewritten while the backend reads them ------------------------------------------


class Scribbler:
    """A guest thread that rewrites request slots at every scheduling point."""

    def __init__(self, f: Front, seed: int) -> None:
        self.f = f
        self.rng = random.Random(seed)
        self.running = True
        self.writes = 0

    def __call__(self) -> None:
        ring = self.f.ring
        while self.running:
            slot = self.rng.randrange(ring.nr_ents)
            off = 64 + slot * ring.entry_size + self.rng.randrange(ring.entry_size)
            page, o = divmod(off, PAGE)
            self.f.views[page][o] = self.rng.randrange(256)
            self.writes += 1
            checkpoint()


@pytest.mark.parametrize("seed", range(6))
def test_slots_rewritten_under_the_backend(tmp_path: Path, seed: int) -> None:
    """Double fetch (XSA-155): with preemption at every barrier and a thread scribbling
    on the slots, the backend answers each consumed slot once and stays in bounds."""
    with fresh_host(strategy=RandomStrategy(seed), clock=VirtualClock()) as host:
        rig = make_rig(host, Path(tempfile.mkdtemp(dir=tmp_path)), BLKIF_ABI_X86_64,
                       size=DISK_SECTORS * SECT, guest_memory_mb=2)
        f = rig.front
        w = World.build(rig)
        got: list[BlkifResponse] = []

        def lenient(port: int) -> None:  # ids may be scribbled: just collect
            while True:
                for _ in range(f.ring.unconsumed_responses()):
                    got.append(f.abi.unpack_response(f.ring.get_response()))
                if not f.ring.final_check_for_responses():
                    return

        f.g.hc.evtchn_unbind_handler(f.port)
        f.g.hc.evtchn_bind_handler(f.port, lenient, "lenient")
        scr = Scribbler(f, seed)
        host.sched.spawn(scr, name="scribbler", daemon=True, domain=f.g.kernel)
        n = 0
        for rnd in range(3):
            for i in range(10):
                label = ["dst0", "src0", "ro0", "dst1"][i % 4]
                op = BLKIF_OP_READ if label.startswith("dst") else BLKIF_OP_WRITE
                f.rw(op, (rnd * 10 + i) % (DISK_SECTORS // 8) * 8,
                     [(w.pages[label], 0, 7)])
                n += 1
            f.push()
            host.sched.run(until=lambda n=n: len(got) == n)  # type: ignore[misc]
        scr.running = False
        assert scr.writes > 0
        assert all(r.status in (BLKIF_RSP_OKAY, BLKIF_RSP_ERROR, BLKIF_RSP_EOPNOTSUPP)
                   for r in got)
        # pages never granted, and read-only or write-source pages, are untouched
        for pfn in w.spares:
            assert bytes(f.page(pfn)) == w.initial[pfn]
        for label in ("ro0", "ro1", "src0", "src1", "other"):
            assert bytes(f.page(w.pages[label].pfn)) == w.initial[w.pages[label].pfn]
        assert rig.mappings() == 1
        f.g.hc.evtchn_unbind_handler(f.port)
        host.sched.yield_()
        w.close()
        rig.close()
