"""A hand-written blkif frontend for the blkback tests (helpers only, no tests).

:class:`Front` is a guest's side of one vbd written straight against the ABI:
it allocates pages in the guest, grants them with the guest's gnttab, puts
blkif requests into a :class:`FrontRing` on granted ring pages, notifies over
an unbound event channel, and collects responses on its own interrupt thread.
It can also write anything at all into the ring, as a hostile frontend would.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from gntdma.abi.blkif import (
    BLKIF_OP_INDIRECT,
    BLKIF_SECTOR_SIZE,
    BlkifAbi,
    BlkifAnyRequest,
    BlkifRequest,
    BlkifRequestIndirect,
    BlkifRequestSegment,
    BlkifResponse,
)
from gntdma.abi.ring import FrontRing, SringHeader, sring_init
from gntdma.dev.blkback import Blkback
from gntdma.host.image import DiskImage
from gntdma.sched import WITNESS
from gntdma.toolstack.host import Guest, Host

PAGE = 4096
SECT = BLKIF_SECTOR_SIZE


@dataclass
class Buf:
    """A guest page granted to dom0."""

    pfn: int
    ref: int
    readonly: bool


@dataclass
class Front:
    """The frontend of one vbd in guest ``g``."""

    host: Host
    g: Guest
    abi: BlkifAbi
    ring_pages: int = 1
    start: int = 0
    backend_domid: int = 0
    responses: dict[int, BlkifResponse] = field(default_factory=dict)
    order: list[int] = field(default_factory=list)
    bufs: list[Buf] = field(default_factory=list)
    spare_pfns: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        g = self.g
        self.ring_pfns = [self.alloc_pfn() for _ in range(self.ring_pages)]
        views = [g.hc.own_page(p) for p in self.ring_pfns]
        for v in views:
            v[:] = bytes(PAGE)
        sring_init(views[0])
        if self.start != 0:
            SringHeader(req_prod=self.start, rsp_prod=self.start, req_event=self.start + 1,
                        rsp_event=self.start + 1).pack_into(views[0], 0)
        self.views = views
        self.ring = FrontRing(views, self.abi.entry_size, start=self.start)
        self.ring_refs = [self._grant(p, False) for p in self.ring_pfns]
        rc, self.port = g.hc.evtchn_alloc_unbound(self.backend_domid)
        assert rc == 0
        assert g.hc.evtchn_bind_handler(self.port, self._intr, "blkfront-test") == 0
        self.next_id = 1

    # -- pages and grants ------------------------------------------------------------

    def alloc_pfn(self) -> int:
        pfn = self.g.kernel.vm_page_alloc()
        assert pfn is not None
        return pfn

    def _grant(self, pfn: int, readonly: bool) -> int:
        error, ref = self.g.gnttab.gnttab_grant_foreign_access(self.backend_domid, pfn,
                                                               readonly)
        assert error == 0
        return ref

    def buf(self, readonly: bool = False, fill: bytes | None = None) -> Buf:
        """A new page granted to the backend, filled with ``fill`` (or random bytes)."""
        pfn = self.alloc_pfn()
        self.page(pfn)[:] = fill if fill is not None else os.urandom(PAGE)
        b = Buf(pfn, self._grant(pfn, readonly), readonly)
        self.bufs.append(b)
        return b

    def spare(self, fill: bytes | None = None) -> int:
        """A page that is never granted (the backend must never touch it)."""
        pfn = self.alloc_pfn()
        self.page(pfn)[:] = fill if fill is not None else os.urandom(PAGE)
        self.spare_pfns.append(pfn)
        return pfn

    def page(self, pfn: int) -> memoryview:
        return self.g.hc.own_page(pfn)

    def data(self, b: Buf) -> bytes:
        return bytes(self.page(b.pfn))

    def release(self, b: Buf) -> None:
        """End access (must succeed at once: the backend unmapped before answering)."""
        assert self.g.gnttab.gnttab_end_foreign_access_ref(b.ref) == 1, \
            f"grant {b.ref} still mapped by the backend after its response"
        self.g.gnttab.gnttab_free_grant_reference(b.ref)
        self.g.kernel.vm_page_free(b.pfn)
        self.bufs.remove(b)

    # -- requests -----------------------------------------------------------------------

    def new_id(self) -> int:
        i = self.next_id
        self.next_id += 1
        return i

    def put(self, req: BlkifAnyRequest) -> None:
        self.ring.put_request(self.abi.pack_request(req))

    def put_raw(self, raw: bytes) -> None:
        self.ring.put_request(raw)

    def push(self) -> None:
        if self.ring.push_requests():
            self.notify()

    def notify(self) -> None:
        assert self.g.hc.evtchn_send(self.port) == 0

    def rw(self, op: int, sector: int, segs: Sequence[tuple[Buf | int, int, int]],
           id_: int | None = None) -> int:
        """Queue a direct request; segs are (buf or raw gref, first_sect, last_sect).

        More than 11 segments: ``nr_segments`` says so, the slot holds the first 11.
        """
        rid = self.new_id() if id_ is None else id_
        seg = tuple(BlkifRequestSegment(b.ref if isinstance(b, Buf) else b, f, last)
                    for b, f, last in segs)
        self.put(BlkifRequest(operation=op, nr_segments=len(seg), handle=0, id=rid,
                              sector_number=sector, seg=seg[:11]))
        return rid

    def indirect(self, op: int, sector: int, segs: Sequence[tuple[Buf | int, int, int]],
                 id_: int | None = None) -> tuple[int, list[Buf]]:
        """Queue an indirect request; returns its id and its indirect pages."""
        raw = b"".join(BlkifRequestSegment(b.ref if isinstance(b, Buf) else b, f, last).pack()
                       for b, f, last in segs)
        pages = []
        for off in range(0, len(raw), PAGE):
            chunk = raw[off:off + PAGE]
            pages.append(self.buf(readonly=True, fill=chunk + bytes(PAGE - len(chunk))))
        rid = self.new_id() if id_ is None else id_
        self.put(BlkifRequestIndirect(operation=BLKIF_OP_INDIRECT, indirect_op=op,
                                      nr_segments=len(segs), id=rid, sector_number=sector,
                                      handle=0, indirect_grefs=tuple(p.ref for p in pages)))
        return rid, pages

    # -- responses ----------------------------------------------------------------------

    def _intr(self, port: int) -> None:
        while True:
            for _ in range(self.ring.unconsumed_responses()):
                rsp = self.abi.unpack_response(self.ring.get_response())
                assert rsp.id not in self.responses, f"two responses for id {rsp.id}"
                self.responses[rsp.id] = rsp
                self.order.append(rsp.id)
            if not self.ring.final_check_for_responses():
                return

    def wait(self, *ids: int) -> list[BlkifResponse]:
        self.host.sched.run(until=lambda: all(i in self.responses for i in ids))
        return [self.responses[i] for i in ids]

    def status(self, rid: int) -> int:
        return self.wait(rid)[0].status

    # -- teardown -----------------------------------------------------------------------

    def close(self) -> None:
        g = self.g
        for b in list(self.bufs):
            self.release(b)
        for pfn in self.spare_pfns:
            g.kernel.vm_page_free(pfn)
        self.spare_pfns.clear()
        for pfn, ref in zip(self.ring_pfns, self.ring_refs, strict=True):
            assert g.gnttab.gnttab_end_foreign_access_ref(ref) == 1
            g.gnttab.gnttab_free_grant_reference(ref)
            g.kernel.vm_page_free(pfn)
        assert g.hc.evtchn_close(self.port) == 0
        del self.ring  # its own views of the pages go with it
        for v in self.views:  # so the domain's memory can be closed while we live on
            v.release()


def pattern(tag: int, n: int = PAGE) -> bytes:
    """``n`` recognisable bytes for ``tag``."""
    unit = tag.to_bytes(4, "little") + b"gntdma-blkback-"
    return (unit * (n // len(unit) + 1))[:n]


@dataclass
class Rig:
    """A guest, a disk image, a frontend and a connected blkback."""

    host: Host
    g: Guest
    img: DiskImage
    front: Front
    bb: Blkback
    #: hypervisor mappings and pins before blkback connected (xenstore rings hold some)
    base_mappings: int
    base_pinned: int

    def mappings(self) -> int:
        """Mappings held now beyond those before blkback connected."""
        return self.host.hv.statistics().mappings - self.base_mappings

    def pinned(self) -> int:
        return self.host.hv.statistics().grants_pinned - self.base_pinned

    def disk(self, off: int, n: int) -> bytes:
        with open(self.img.path, "rb") as f:
            f.seek(off)
            return f.read(n)

    def close(self) -> None:
        assert self.bb.disconnect() == 0
        self.front.close()
        self.img.close()


def make_rig(host: Host, tmp: Path, abi: BlkifAbi, *, size: int = 1 << 20,
             ring_pages: int = 1, start: int = 0, readonly: bool = False,
             guest_memory_mb: int = 8, **kw: object) -> Rig:
    g = host.create_guest(f"guest{len(host.guests)}", memory_mb=guest_memory_mb)
    path = tmp / f"disk{g.domid}.img"
    img = DiskImage.create(path, size)
    if readonly:
        img.close()
        img = DiskImage.open(path, readonly=True)
    front = Front(host, g, abi, ring_pages=ring_pages, start=start)
    st = host.hv.statistics()
    bb = Blkback(host.dom0.hc, host.dom0.kernel, g.domid, img, devid=51712,
                 **kw)  # type: ignore[arg-type]
    assert bb.connect(front.ring_refs, front.port, abi.protocol) == 0
    return Rig(host, g, img, front, bb, st.mappings, st.grants_pinned)


@contextmanager
def fresh_host(**kw: object) -> Iterator[Host]:
    """A host for one Hypothesis example: the same leak checks as the ``host`` fixture."""
    WITNESS.reset()
    h = Host(**kw)  # type: ignore[arg-type]
    try:
        yield h
        h.sched.yield_()
        assert h.leaks() == []
        assert WITNESS.reports == [], [r.format() for r in WITNESS.reports]
    except BaseException:
        # a failed test still holds views of guest pages in its frames
        with suppress(BufferError):
            h.close()
        raise
    else:
        h.close()
    finally:
        WITNESS.reset()
