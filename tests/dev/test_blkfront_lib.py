"""A small dom0 blkif backend and a rig for the blkfront tests (helpers only, no tests).

:class:`MiniBack` is the backend side of one vbd written straight against the
ABI, independent of ``gntdma.dev.blkback``: it maps the frontend's ring
through dom0's hypercalls, copies each request out, maps the granted segments
(and indirect pages) one batch per request, copies to or from a ``bytearray``
disk, unmaps, and answers. It checks what a careful backend would and records
what it saw, so tests can look at the frontend's wire behaviour; it can hold
requests unanswered, fail chosen sectors, or vanish.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from gntdma.abi.blkif import (
    BLKIF_MAX_SEGMENTS_PER_REQUEST,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    BLKIF_SECTOR_SIZE,
    BlkifAbi,
    BlkifAnyRequest,
    BlkifKey,
    BlkifRequest,
    BlkifRequestDiscard,
    BlkifRequestIndirect,
    BlkifRequestSegment,
    BlkifResponse,
    blkif_abi,
    blkif_ring_ref_key,
)
from gntdma.abi.grant_table import (
    GNTMAP_host_map,
    GNTMAP_readonly,
    GNTST_okay,
    GnttabMapGrantRef,
    GNTTABOP_map_grant_ref,
    GNTTABOP_unmap_grant_ref,
    GnttabUnmapGrantRef,
)
from gntdma.abi.ring import BackRing
from gntdma.dev.blkfront import XbdBackendFeatures, xbd_softc
from gntdma.dev.blkfront_io import xbd_read, xbd_write
from gntdma.sched import KThread, ThreadState, mb, rmb, wmb
from gntdma.sys import busdma_debug_check_detach
from gntdma.toolstack.host import Guest, Host

PAGE = 4096
SECT = BLKIF_SECTOR_SIZE


@dataclass
class MiniBack:
    """The dom0 side of one vbd of guest ``g``, over a ``bytearray`` disk."""

    host: Host
    g: Guest
    size: int
    max_indirect_segments: int = 256
    max_ring_page_order: int = 4
    flush: bool = True
    discard: bool = True
    readonly: bool = False
    #: Try a writable map of every grant the frontend should have made read-only.
    check_ro: bool = True
    disk: bytearray = field(init=False)
    ops: Counter[str] = field(default_factory=Counter)
    #: (operation, sector_number, nr_segments) of every request, in arrival order.
    log: list[tuple[int, int, int]] = field(default_factory=list)
    #: indirect_grefs of every indirect request.
    indirect_grefs_seen: list[tuple[int, ...]] = field(default_factory=list)
    #: grants that mapped writable though the data only goes to the disk.
    ro_violations: int = 0
    #: sectors whose requests are answered BLKIF_RSP_ERROR.
    fail_sectors: set[int] = field(default_factory=set)
    #: operations answered BLKIF_RSP_EOPNOTSUPP even though advertised.
    refuse_ops: set[int] = field(default_factory=set)
    #: while True, requests are consumed but not answered (in flight for the frontend).
    hold: bool = False
    held: list[BlkifAnyRequest] = field(default_factory=list)
    #: while holding, keep the data pages of held direct requests mapped (a busy device).
    hold_mapped: bool = False
    held_handles: list[int] = field(default_factory=list)
    #: called with each request before it is answered (tests tamper here).
    on_request: Callable[[BlkifAnyRequest], None] | None = None
    #: the id the next response carries instead of the request's (a lying backend).
    forge_id: int | None = None
    errors: list[str] = field(default_factory=list)
    abi: BlkifAbi | None = None
    ring: BackRing | None = None
    ring_handles: list[int] = field(default_factory=list)
    port: int = 0
    #: handle -> the host address its map was given.
    _addrs: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.disk = bytearray(self.size)
        self.hc = self.host.dom0.hc

    # -- negotiation ---------------------------------------------------------------

    def features(self) -> XbdBackendFeatures:
        """What blkback would publish, parsed the way the xenbus glue will."""
        keys = {
            BlkifKey.SECTORS.value: str(self.size // SECT),
            BlkifKey.SECTOR_SIZE.value: str(SECT),
            BlkifKey.INFO.value: "4" if self.readonly else "0",
            BlkifKey.FEATURE_FLUSH_CACHE.value: "1" if self.flush else "0",
            BlkifKey.FEATURE_DISCARD.value: "1" if self.discard else "0",
            BlkifKey.MAX_RING_PAGE_ORDER.value: str(self.max_ring_page_order),
        }
        if self.max_indirect_segments > 0:
            keys[BlkifKey.FEATURE_MAX_INDIRECT_SEGMENTS.value] = str(self.max_indirect_segments)
        error, feats = XbdBackendFeatures.from_xenstore(keys.get)
        assert error == 0 and feats is not None
        return feats

    def connect(self, ring_refs: Sequence[int], evtchn: int, protocol: str | None) -> None:
        abi = blkif_abi(protocol)
        assert abi is not None
        handles = self._map([(r, False) for r in ring_refs])
        assert handles is not None, "ring pages did not map"
        self.abi = abi
        self.ring_handles = handles
        self.ring = BackRing([self.hc.mapped_page(h) for h in handles], abi.entry_size,
                             wmb=wmb, rmb=rmb, mb=mb)
        rc, self.port = self.hc.evtchn_bind_interdomain(self.g.domid, evtchn)
        assert rc == 0
        assert self.hc.evtchn_bind_handler(self.port, self._intr, "miniback") == 0

    def disconnect(self) -> None:
        """Unbind and unmap the ring (what a backend does on the frontend's Closing)."""
        self._unmap(self.held_handles)
        self.held_handles = []
        if self.ring is None:
            return
        self.ring = None
        self.hc.evtchn_close(self.port)
        self.port = 0
        self._unmap(self.ring_handles)
        self.ring_handles = []

    # -- grants ----------------------------------------------------------------------

    def _map(self, refs: Sequence[tuple[int, bool]]) -> list[int] | None:
        """Map (ref, readonly) pairs in one batch, each at a host address of this
        domain's foreign-page range; None (nothing kept) if any fails."""
        addrs = []
        for _ in refs:
            error, addr = self.hc.foreign.alloc()
            assert error == 0
            addrs.append(addr)
        ops = [GnttabMapGrantRef(host_addr=addr,
                                 flags=GNTMAP_host_map | (GNTMAP_readonly if ro else 0),
                                 ref=ref, dom=self.g.domid)
               for (ref, ro), addr in zip(refs, addrs, strict=True)]
        rc, res = self.hc.grant_table_op(GNTTABOP_map_grant_ref, ops)
        assert rc == 0
        ok = []
        for r, addr in zip(res, addrs, strict=True):
            if isinstance(r, GnttabMapGrantRef) and r.status == GNTST_okay:
                ok.append(r.handle)
                self._addrs[r.handle] = addr
            else:
                self.hc.foreign.free(addr)
        if len(ok) != len(ops):
            self._unmap(ok)
            return None
        return ok

    def _unmap(self, handles: Sequence[int]) -> None:
        if not handles:
            return
        addrs = [self._addrs.pop(h) for h in handles]
        rc, res = self.hc.grant_table_op(
            GNTTABOP_unmap_grant_ref,
            [GnttabUnmapGrantRef(host_addr=a, handle=h) for h, a in zip(handles, addrs,
                                                                        strict=True)])
        assert rc == 0 and all(isinstance(r, GnttabUnmapGrantRef) and r.status == GNTST_okay
                               for r in res)
        for a in addrs:
            self.hc.foreign.free(a)

    def _writable_too(self, ref: int) -> bool:
        h = self._map([(ref, False)])
        if h is None:
            return False
        self._unmap(h)
        return True

    # -- requests --------------------------------------------------------------------

    def _intr(self, _port: int) -> None:
        ring, abi = self.ring, self.abi
        if ring is None or abi is None:
            return
        while True:
            for _ in range(ring.unconsumed_requests()):
                req = abi.unpack_request(ring.get_request())
                if self.hold:
                    self.held.append(req)
                    if self.hold_mapped and isinstance(req, BlkifRequest):
                        ro = req.operation == BLKIF_OP_WRITE
                        h = self._map([(sg.gref, ro) for sg in req.seg])
                        self.held_handles.extend(h or [])
                    continue
                self._answer(req)
            if not ring.final_check_for_requests():
                break
        self._push()

    def release(self) -> None:
        """Stop holding: answer every held request."""
        self.hold = False
        self._unmap(self.held_handles)
        self.held_handles = []
        held, self.held = self.held, []
        for req in held:
            self._answer(req)
        self._push()

    def _push(self) -> None:
        ring = self.ring
        if ring is not None and ring.push_responses():
            self.hc.evtchn_send(self.port)

    def _answer(self, req: BlkifAnyRequest) -> None:
        ring, abi = self.ring, self.abi
        if ring is None or abi is None:
            return
        if self.on_request is not None:
            self.on_request(req)
        status = self._do(req)
        op = req.indirect_op if isinstance(req, BlkifRequestIndirect) else req.operation
        rid = req.id
        if self.forge_id is not None:
            rid, self.forge_id = self.forge_id, None
        ring.put_response(abi.pack_response(BlkifResponse(id=rid, operation=op, status=status)))

    def _do(self, req: BlkifAnyRequest) -> int:
        if isinstance(req, BlkifRequestDiscard):
            self.ops["discard"] += 1
            self.log.append((BLKIF_OP_DISCARD, req.sector_number, 0))
            end = (req.sector_number + req.nr_sectors) * SECT
            if not self.discard or BLKIF_OP_DISCARD in self.refuse_ops:
                return BLKIF_RSP_EOPNOTSUPP
            if end > self.size:
                return BLKIF_RSP_ERROR
            self.disk[req.sector_number * SECT:end] = bytes(end - req.sector_number * SECT)
            return BLKIF_RSP_OKAY
        if isinstance(req, BlkifRequestIndirect):
            self.ops["indirect"] += 1
            self.indirect_grefs_seen.append(req.indirect_grefs)
            self.log.append((BLKIF_OP_INDIRECT, req.sector_number, req.nr_segments))
            if req.indirect_op not in (BLKIF_OP_READ, BLKIF_OP_WRITE) \
                    or not BLKIF_MAX_SEGMENTS_PER_REQUEST < req.nr_segments \
                    <= self.max_indirect_segments:
                self.errors.append(f"bad indirect request {req}")
                return BLKIF_RSP_ERROR
            npages = -(-req.nr_segments // (PAGE // 8))
            if len(req.indirect_grefs) != npages:
                return BLKIF_RSP_ERROR
            if self.check_ro and any(self._writable_too(r) for r in req.indirect_grefs):
                self.ro_violations += 1
            handles = self._map([(r, True) for r in req.indirect_grefs])
            if handles is None:
                self.errors.append(f"indirect pages {req.indirect_grefs} did not map")
                return BLKIF_RSP_ERROR
            raw = b"".join(bytes(self.hc.mapped_page(h)) for h in handles)  # copied out
            self._unmap(handles)
            segs = [BlkifRequestSegment.unpack_from(raw, i * 8)
                    for i in range(req.nr_segments)]
            return self._rw(req.indirect_op, req.sector_number, segs)
        assert isinstance(req, BlkifRequest)
        self.log.append((req.operation, req.sector_number, req.nr_segments))
        if req.operation == BLKIF_OP_FLUSH_DISKCACHE:
            self.ops["flush"] += 1
            if not self.flush or BLKIF_OP_FLUSH_DISKCACHE in self.refuse_ops:
                return BLKIF_RSP_EOPNOTSUPP
            return BLKIF_RSP_OKAY
        if req.operation not in (BLKIF_OP_READ, BLKIF_OP_WRITE):
            self.ops["other"] += 1
            return BLKIF_RSP_EOPNOTSUPP
        self.ops["read" if req.operation == BLKIF_OP_READ else "write"] += 1
        if not 1 <= req.nr_segments <= BLKIF_MAX_SEGMENTS_PER_REQUEST:
            self.errors.append(f"bad direct request {req}")
            return BLKIF_RSP_ERROR
        return self._rw(req.operation, req.sector_number, list(req.seg))

    def _rw(self, op: int, sector: int, segs: list[BlkifRequestSegment]) -> int:
        write = op == BLKIF_OP_WRITE
        if write and self.readonly:
            return BLKIF_RSP_ERROR
        nsect = 0
        for s in segs:
            if s.last_sect < s.first_sect or s.last_sect > 7:
                self.errors.append(f"bad segment {s}")
                return BLKIF_RSP_ERROR
            nsect += s.last_sect - s.first_sect + 1
        if (sector + nsect) * SECT > self.size:
            self.errors.append(f"request past the end: sector {sector} + {nsect}")
            return BLKIF_RSP_ERROR
        if any(sector <= f < sector + nsect for f in self.fail_sectors):
            return BLKIF_RSP_ERROR
        if write and self.check_ro and any(self._writable_too(s.gref) for s in segs):
            self.ro_violations += 1
        handles = self._map([(s.gref, write) for s in segs])
        if handles is None:
            self.errors.append(f"data grants {[s.gref for s in segs]} did not map")
            return BLKIF_RSP_ERROR
        pos = sector * SECT
        for s, h in zip(segs, handles, strict=True):
            view = self.hc.mapped_page(h)
            a, b = s.first_sect * SECT, (s.last_sect + 1) * SECT
            if write:
                self.disk[pos:pos + b - a] = view[a:b]
            else:
                view[a:b] = self.disk[pos:pos + b - a]
            pos += b - a
        self._unmap(handles)
        return BLKIF_RSP_OKAY


# -- a frontend and backend together -------------------------------------------------------


def ring_refs_from_keys(keys: dict[str, str]) -> list[int]:
    if BlkifKey.RING_REF.value in keys:
        return [int(keys[BlkifKey.RING_REF.value])]
    order = int(keys[BlkifKey.RING_PAGE_ORDER.value])
    return [int(keys[blkif_ring_ref_key(i)]) for i in range(1 << order)]


@dataclass
class Rig:
    host: Host
    g: Guest
    sc: xbd_softc
    be: MiniBack


def make_rig(host: Host, g: Guest | None = None, *, size: int = 8 << 20,
             name: str = "xbd0", max_grant_frames: int = 64, memory_mb: int = 64,
             protocol: str | None = None, ring_page_order: int = 2,
             max_indirect_segments: int = 256, be_kw: dict[str, object] | None = None
             ) -> Rig:
    """A guest (or ``g``) with one disk served by a :class:`MiniBack`, connected."""
    if g is None:
        g = host.create_guest("g", max_grant_frames=max_grant_frames, memory_mb=memory_mb)
    be = MiniBack(host, g, size, **(be_kw or {}))  # type: ignore[arg-type]
    kw: dict[str, object] = {}
    if protocol is not None:
        kw["protocol"] = protocol
    sc = xbd_softc(g.kernel, g.hc, g.gnttab, host.dom0.domid, name=name, vdev=51712,
                   ring_page_order=ring_page_order,
                   max_indirect_segments=max_indirect_segments, **kw)  # type: ignore[arg-type]
    assert sc.xbd_initialize(be.features().max_ring_page_order) == 0
    keys = sc.xbd_transport_keys()
    be.connect(ring_refs_from_keys(keys), int(keys[BlkifKey.EVENT_CHANNEL.value]),
               keys[BlkifKey.PROTOCOL.value])
    assert sc.xbd_connect(be.features()) == 0
    return Rig(host, g, sc, be)


def teardown(rig: Rig, *, last: bool = True) -> None:
    """The clean removal: closing, the backend lets go, free. Nothing may be left
    (in the whole guest kernel if ``last``: its only disk)."""
    assert rig.sc.xbd_closing() == 0
    rig.be.disconnect()
    assert rig.sc.xbd_free() == 0
    assert rig.be.errors == [], rig.be.errors
    assert rig.be.ro_violations == 0
    if last:
        check_clean(rig.g)


def check_clean(g: Guest) -> None:
    """No DMA-API debug report, no misuse of the grant table, nothing left loaded."""
    assert busdma_debug_check_detach(g.kernel) == 0
    assert [r.format() for r in g.kernel.dma_debug.reports()] == []
    assert g.gnttab.reports == []


def run_threads(host: Host, fns: Sequence[Callable[[], object]], name: str = "w"
                ) -> list[KThread]:
    """Run each fn on its own kernel thread of the guest until all are done."""
    threads = [host.sched.spawn(fn, name=f"{name}{i}") for i, fn in enumerate(fns)]
    host.sched.run(until=lambda: all(t.state is ThreadState.DONE for t in threads))
    for t in threads:
        if t.exc is not None:
            raise t.exc
    return threads


def stamp(offset: int, length: int, gen: int) -> bytes:
    """Recognisable data: every 8-byte word says where it lives and which write made it."""
    out = bytearray(length)
    for i in range(0, length, 8):
        word = ((offset + i) // 8) ^ (gen << 40)
        out[i:i + 8] = word.to_bytes(8, "little")
    return bytes(out)


SIZES_MIXED: Final = (1, 2, 7, 8, 9, 16, 33, 88, 100, 257, 1000, 4096)  # in sectors


def random_io(rig: Rig, model: bytearray, rng: random.Random, ops: int, *,
              base: int = 0, span: int | None = None, max_len: int = 2 << 20,
              gen: int = 1, sizes: Sequence[int] = SIZES_MIXED) -> list[int]:
    """Random sector-aligned reads and writes in ``[base, base+span)``, checked on read.

    Returns the errors seen (empty when all went well); a read that differs
    from ``model`` raises AssertionError.
    """
    sc = rig.sc
    span = len(model) - base if span is None else span
    errors: list[int] = []
    for k in range(ops):
        nsect = rng.choice(sizes)
        length = min(nsect * SECT, max_len, span)
        off = base + rng.randrange(0, (span - length) // SECT + 1) * SECT
        if rng.random() < 0.5:
            data = stamp(off, length, gen * 1000 + k)
            error = xbd_write(sc, off, data)
            if error == 0:
                model[off:off + length] = data
            else:
                errors.append(error)
        else:
            error, got = xbd_read(sc, off, length)
            if error == 0:
                assert got == bytes(model[off:off + length]), \
                    f"read of {length} at {off} differs from the model"
            else:
                errors.append(error)
    return errors
