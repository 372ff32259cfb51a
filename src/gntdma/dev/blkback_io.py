"""blkback's map and I/O path: grant maps of the frontend's pages, and the disk.

One :class:`BlkbackIO` per device does, with no lock held, everything that
touches the frontend's grants or the backing store:

- the ring pages: one ``GNTTABOP_map_grant_ref`` batch, writable
  (:meth:`BlkbackIO.map_ring`), unmapped at disconnect;
- an indirect request: its indirect pages mapped read-only, the segment
  descriptors copied out once, the pages unmapped, the descriptors checked as
  direct ones would be;
- the data: every segment mapped in one batch (read-only when the data goes
  to the disk, writable when it comes from the disk); if any element fails,
  the ones that succeeded are unmapped and the request fails (XSA-361). Then
  ONE vectored ``preadv``/``pwritev`` through :func:`gntdma.sched.blocking_io`,
  straight into or out of the mapped pages (slices ``first_sect * 512`` ..
  ``(last_sect + 1) * 512``), then the batch unmap. The caller answers only
  after that: a frontend that sees the response may end its grants at once.
- flush (``fdatasync``) and discard.

Persistent grants (blkif ``feature-persistent``, when both ends advertise it:
:attr:`BlkbackIO.persistent`), as Linux xen-blkback does them (``blkback.c``:
``get_persistent_gnt``, ``add_persistent_gnt``, ``xen_blkbk_map``,
``free_persistent_gnts``): a data segment's gref found in the device's table
(keyed by gref, at most :attr:`BlkbackIO.max_persistent` entries,
``max_persistent_grants`` 1056 by default) and not in use by another request
is used without a map; any other gref is mapped writable (a persistent grant
serves reads and writes) and, while the table has room and the gref is not in
it, kept there after the request; else it is unmapped after the request as
usual. :meth:`BlkbackIO.unmap_persistent` unmaps the table at disconnect.
Indirect pages take the same path (Linux ``xen_blkbk_parse_indirect`` maps them
with ``xen_blkbk_map``): with persistent grants they are mapped writable, kept
in the table while it has room, and put back once their descriptors are read.
A frontend may grant more than the table holds (Linux xen-blkfront grants ring
slots x (segments + indirect pages)): those beyond it are mapped per request.

Every map and unmap goes through the array form of the hypercall
(:meth:`Hypercalls.grant_table_op_raw`): the ``struct gnttab_map_grant_ref`` and
``struct gnttab_unmap_grant_ref`` of a batch packed in one buffer, each op's
results read back from it (Xen writes back a map's status, handle and
``dev_bus_addr``, an unmap's status). Every such buffer blkback builds is built
by :meth:`BlkbackIO._map_ops` and :meth:`BlkbackIO._unmap_ops`, and nowhere else;
their ``status`` starts as ``GNTST_general_error``, so an op the hypervisor did
not reach never reads as done.
"""

from __future__ import annotations

import errno
import struct
import sys
from array import array
from collections.abc import Sequence
from typing import Final, Literal, Protocol, cast, final

from gntdma.abi.blkif import (
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_WRITE,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    BLKIF_SECTOR_SIZE,
)
from gntdma.abi.grant_table import (
    GNTMAP_host_map,
    GNTMAP_readonly,
    GNTST_general_error,
    GNTST_okay,
    GnttabMapGrantRef,
    GNTTABOP_map_grant_ref,
    GNTTABOP_unmap_grant_ref,
    GnttabUnmapGrantRef,
)
from gntdma.abi.xen import PAGE_SIZE
from gntdma.dev.blkback_req import (
    BLKBACK_SEG_SIZE,
    BlkbackReq,
    BlkbackSeg,
    blkback_check_segs,
    blkback_unpack_segs,
)
from gntdma.sched import KernelPanic, blocking_io
from gntdma.xen.hypercall import Hypercalls

__all__ = ["BLKBACK_MAX_PERSISTENT_GRANTS", "BackingStore", "BlkbackIO"]

SECTOR_SHIFT: Final = 9
#: Linux xen-blkback's ``max_persistent_grants`` default (blkback.c ``max_pgrants``).
BLKBACK_MAX_PERSISTENT_GRANTS: Final = 1056
assert 1 << SECTOR_SHIFT == BLKIF_SECTOR_SIZE
#: The last sector of a page: a segment from sector 0 to it is the whole page.
_LAST_SECT: Final = (PAGE_SIZE >> SECTOR_SHIFT) - 1
#: Requests of more than ``_PMEMO_MIN`` grefs keep their table views, for at most
#: ``_PMEMO_MAX`` gref lists (all forgotten when more would be kept).
_PMEMO_MIN: Final = 8
_PMEMO_MAX: Final = 64
# Map flags as plain ints: IntFlag arithmetic builds a flag object per use, and
# the hypervisor tests each op's flags.
_MAP_HOST: Final = int(GNTMAP_host_map)
_MAP_HOST_RO: Final = int(GNTMAP_host_map | GNTMAP_readonly)
_OKAY: Final = int(GNTST_okay)
_NOT_DONE: Final = int(GNTST_general_error)
_MAP_OP: Final = GnttabMapGrantRef.STRUCT
_UNMAP_OP: Final = GnttabUnmapGrantRef.STRUCT

#: A member of every op of a packed array: (its code, index in the array viewed as
#: that code, stride, index among the struct's values).
_IntCode = Literal["Q", "I", "h", "H"]
_Column = tuple[_IntCode, int, int, int]


def _column(cls: type[GnttabMapGrantRef] | type[GnttabUnmapGrantRef], name: str) -> _Column:
    layout = cls.LAYOUT
    i = layout.names.index(name)
    code = cast(_IntCode, layout.codes[i])
    assert code in ("Q", "I", "h", "H")
    offset = next(off for member, off, _size in cls.FIELDS if member == name)
    size = struct.calcsize("<" + code)
    assert offset % size == 0 and cls.STRUCT.size % size == 0
    return code, offset // size, cls.STRUCT.size // size, i


_MAP_ADDR: Final = _column(GnttabMapGrantRef, "host_addr")
_MAP_REF: Final = _column(GnttabMapGrantRef, "ref")
_MAP_STATUS: Final = _column(GnttabMapGrantRef, "status")
_MAP_HANDLE: Final = _column(GnttabMapGrantRef, "handle")
_UNMAP_ADDR: Final = _column(GnttabUnmapGrantRef, "host_addr")
_UNMAP_HANDLE: Final = _column(GnttabUnmapGrantRef, "handle")
_UNMAP_STATUS: Final = _column(GnttabUnmapGrantRef, "status")
#: The wire structs are little-endian: on a little-endian host with the standard
#: sizes a member of every op is one strided slice of the buffer cast to its code.
_COLUMNS: Final = sys.byteorder == "little" and all(
    struct.calcsize(c) == struct.calcsize("<" + c) for c in "QIhH")


def _put_column(buf: bytearray, col: _Column, op: struct.Struct, values: Sequence[int]
                ) -> None:
    """Write ``values`` into member ``col`` of the ops in ``buf``, in order."""
    code, first, stride, i = col
    if _COLUMNS:
        with memoryview(buf) as whole, whole.cast(code) as v:
            v[first::stride] = array(code, values)
        return
    for off, x in zip(range(0, len(buf), op.size), values, strict=True):
        fields = list(op.unpack_from(buf, off))
        fields[i] = x
        op.pack_into(buf, off, *fields)


def _get_column(buf: bytearray, col: _Column, op: struct.Struct) -> list[int]:
    """Member ``col`` of every op in ``buf``, in order."""
    code, first, stride, i = col
    if _COLUMNS:
        with memoryview(buf) as whole, whole.cast(code) as v:
            return v[first::stride].tolist()
    return [fields[i] for fields in op.iter_unpack(buf)]


class BackingStore(Protocol):
    """What blkback serves a disk from (``gntdma.host.image.DiskImage`` is one).

    Offsets and lengths are in bytes. A transfer moves every byte or raises
    :class:`OSError`: that is the only exception blkback expects from a store,
    and it becomes ``BLKIF_RSP_ERROR``. Methods are called from worker
    threads through :func:`gntdma.sched.blocking_io`, possibly on an OS thread
    of the I/O pool, possibly several at once.
    """

    @property
    def size(self) -> int:
        """Bytes on the disk (a whole number of 512-byte sectors)."""
        ...

    @property
    def readonly(self) -> bool:
        """Whether writes and discards are refused."""
        ...

    def preadv(self, bufs: Sequence[memoryview], offset: int) -> int:
        """Read into ``bufs`` in order from ``offset``; returns the byte count."""
        ...

    def pwritev(self, bufs: Sequence[memoryview], offset: int) -> int:
        """Write ``bufs`` in order at ``offset``; returns the byte count."""
        ...

    def flush(self) -> None:
        """Make every completed write durable."""
        ...

    def discard(self, offset: int, length: int) -> None:
        """Forget ``length`` bytes at ``offset``: they read back as zeros."""
        ...


@final
class BlkbackIO:
    """The grant maps and disk I/O of one device, with their counters.

    Args:
        hc: the backend domain's hypercalls.
        frontend_domid: the domain whose grants are mapped.
        store: the disk.
        name: the device's name, for messages.
    """

    def __init__(self, hc: Hypercalls, frontend_domid: int, store: BackingStore,
                 name: str) -> None:
        self.hc = hc
        self.frontend_domid = frontend_domid
        self.store = store
        self.name = name
        self.flushes = 0
        self.map_errors = 0
        self.io_errors = 0
        self.segments_mapped = 0
        self.mapped_now = 0
        self.mapped_peak = 0
        #: handle -> the host address (from the kernel's foreign-page range) it is mapped at.
        self._host_addrs: dict[int, int] = {}
        #: Keep data grants mapped between requests (negotiated per connection).
        self.persistent = False
        self.max_persistent = BLKBACK_MAX_PERSISTENT_GRANTS
        #: gref -> the handle of its persistent mapping (Linux's per-ring
        #: ``persistent_gnts`` tree; ``struct persistent_gnt``'s handle and page).
        self._pgnts: dict[int, int] = {}
        #: gref -> the mapping's page view, as the hypervisor gave it (not a new view).
        self._pviews: dict[int, memoryview] = {}
        #: The grefs of the table in use by a request now (Linux ``persistent_gnt.active``).
        self._pbusy: set[int] = set()
        #: Requests' grefs that the table held, each once -> (their set, their views),
        #: for the next request of the same grefs (a frontend's command serves the
        #: same pages each time): at most ``_PMEMO_MAX``, forgotten with the table.
        self._pmemo: dict[tuple[int, ...], tuple[set[int], list[memoryview]]] = {}
        #: Data segments served by a persistent mapping, without a map.
        self.persistent_hits = 0

    # -- the ring ----------------------------------------------------------------------

    def map_ring(self, ring_refs: Sequence[int], persistent: bool = False
                 ) -> tuple[list[int], list[memoryview]] | None:
        """Map the ring pages writable: (handles, pages), or None (nothing left mapped).
        ``persistent``: use persistent grants on this connection."""
        self.persistent = persistent
        handles = self._map_batch(_MAP_HOST, ring_refs)
        if handles is None:
            return None
        return handles, [self.hc.mapped_page(h) for h in handles]

    # -- requests ----------------------------------------------------------------------

    def execute(self, req: BlkbackReq) -> int:
        """Do one request (no lock held); returns the response status."""
        if req.op == BLKIF_OP_DISCARD:
            try:
                blocking_io(self.store.discard, req.sector_number << SECTOR_SHIFT,
                            req.nr_sectors << SECTOR_SHIFT)
            except OSError:
                self.io_errors += 1
                return BLKIF_RSP_ERROR
            return BLKIF_RSP_OKAY
        if req.op == BLKIF_OP_FLUSH_DISKCACHE:
            return self._flush()
        if req.indirect_grefs:
            error, segs = self._read_indirect(req.indirect_grefs, req.nr_segments)
            if error != 0 or blkback_check_segs(
                    segs, req.sector_number, self.store.size >> SECTOR_SHIFT) != 0:
                return BLKIF_RSP_ERROR
            req.segs = segs
        status = self._transfer(req)
        if status == BLKIF_RSP_OKAY and req.flush:
            status = self._flush()
        return status

    def _flush(self) -> int:
        self.flushes += 1
        try:
            blocking_io(self.store.flush)
        except OSError:
            self.io_errors += 1
            return BLKIF_RSP_ERROR
        return BLKIF_RSP_OKAY

    def _read_indirect(self, grefs: tuple[int, ...], nr_segments: int
                       ) -> tuple[int, list[BlkbackSeg]]:
        """Map the indirect pages read-only, copy the descriptors out, unmap (with
        persistent grants: from the table or mapped writable, as data pages are, and
        put back; Linux ``xen_blkbk_parse_indirect``, ``xen_blkbk_map``).

        Returns (0, segments) or (EFAULT, []) if a page does not map.
        """
        used: list[int] = []
        if self.persistent:
            got = self._map_persistent(grefs, used)
            handles, temp, _hits = got if got is not None else (None, [], 0)
        else:
            handles = self._map_batch(_MAP_HOST_RO, grefs)
            temp = handles if handles is not None else []
        if handles is None:
            self.map_errors += 1
            return errno.EFAULT, []
        chunks: list[bytes] = []
        left = nr_segments * BLKBACK_SEG_SIZE
        try:
            for h in handles:
                n = min(left, PAGE_SIZE)
                with self.hc.mapped_page(h)[:n] as v:
                    chunks.append(bytes(v))  # one copy: each descriptor is read once
                left -= n
        finally:
            self._pbusy.difference_update(used)  # Linux put_persistent_gnt (xen_blkbk_unmap)
            self.unmap_batch(temp)
        return 0, blkback_unpack_segs(b"".join(chunks))

    def _transfer(self, req: BlkbackReq) -> int:
        """Map the data segments, one vectored read or write, unmap."""
        to_disk = req.op == BLKIF_OP_WRITE
        segs = req.segs
        if self.persistent and len(segs) == 1:  # one segment (4 KiB): no lists or sets
            g, first, last = segs[0]
            page = self._pviews.get(g)
            busy = self._pbusy
            if page is not None and g not in busy:  # _persistent_views' case, one gref
                busy.add(g)
                self.persistent_hits += 1
                whole = first == 0 and last == _LAST_SECT
                v = page if whole else page[first << SECTOR_SHIFT:(last + 1) << SECTOR_SHIFT]
                try:
                    req.nbytes = blocking_io(self.store.pwritev if to_disk else
                                             self.store.preadv, [v],
                                             req.sector_number << SECTOR_SHIFT)
                except OSError:
                    self.io_errors += 1
                    return BLKIF_RSP_ERROR
                finally:
                    if not whole:
                        v.release()
                    busy.discard(g)  # Linux put_persistent_gnt
                return BLKIF_RSP_OKAY
        grefs, firsts, lasts = zip(*segs, strict=True) if segs else ((), (), ())
        used: list[int] = []
        pages: list[memoryview] | None = None
        if self.persistent:
            pages = self._persistent_views(grefs)
            if pages is not None:  # every gref from the table: no map, no lookup
                handles: list[int] | None = []
                temp: list[int] = []
                used = list(grefs)
                hits = len(grefs)
            else:
                got = self._map_persistent(grefs, used)
                handles, temp, hits = got if got is not None else (None, [], 0)
            self.persistent_hits += hits
        else:
            handles = self._map_batch(_MAP_HOST_RO if to_disk else _MAP_HOST, grefs)
            temp = handles if handles is not None else []
        if handles is None:
            self.map_errors += 1
            return BLKIF_RSP_ERROR
        views: list[memoryview] = []  # the partial-page views made here, released after
        status = BLKIF_RSP_OKAY
        try:
            if pages is None:
                pages = self.hc.mapped_pages(handles)
            n = len(segs)
            if len(pages) == n and firsts.count(0) == n and lasts.count(_LAST_SECT) == n:
                iov = pages  # every segment a whole page: the mappings' views
            else:
                iov = []
                for page, (_gref, first, last) in zip(pages, segs, strict=True):
                    if first == 0 and last == _LAST_SECT:  # the whole page
                        iov.append(page)
                        continue
                    v = page[first << SECTOR_SHIFT:(last + 1) << SECTOR_SHIFT]
                    views.append(v)
                    iov.append(v)
            offset = req.sector_number << SECTOR_SHIFT
            try:
                if to_disk:
                    req.nbytes = blocking_io(self.store.pwritev, iov, offset)
                else:
                    req.nbytes = blocking_io(self.store.preadv, iov, offset)
            except OSError:
                self.io_errors += 1
                status = BLKIF_RSP_ERROR
        finally:
            for v in views:
                v.release()
            self._pbusy.difference_update(used)  # Linux put_persistent_gnt
            self.unmap_batch(temp)
        return status

    # -- persistent grants ------------------------------------------------------------

    def _persistent_views(self, grefs: Sequence[int]) -> list[memoryview] | None:
        """The page views of ``grefs`` when the table holds every one of them, none in
        use and none twice (then all are in use now); else None (nothing taken)."""
        busy = self._pbusy
        key = grefs if type(grefs) is tuple else tuple(grefs)
        memo = self._pmemo.get(key) if len(key) > _PMEMO_MIN else None
        if memo is not None:  # the table holds each, each once
            if not busy.isdisjoint(memo[0]):
                return None
            busy |= memo[0]
            return list(memo[1])
        views = self._pviews
        want = set(grefs)
        if not grefs or not views.keys() >= want or not busy.isdisjoint(want):
            return None
        if len(want) != len(grefs):  # a gref twice: the second one maps itself
            return None
        busy |= want
        got = list(map(views.__getitem__, grefs))
        if len(key) > _PMEMO_MIN:
            if len(self._pmemo) >= _PMEMO_MAX:
                self._pmemo.clear()
            self._pmemo[key] = (want, got)
        return list(got)

    def _map_persistent(self, grefs: Sequence[int], used: list[int]
                        ) -> tuple[list[int], list[int], int] | None:
        """The handle of each gref (from the table, or mapped now), those to unmap after
        the request, and how many the table served without a map; None if a map failed
        (nothing of this request left in use).
        The table's grefs used are appended to ``used`` (to be put back after)."""
        table = self._pgnts
        busy = self._pbusy
        handles = [0] * len(grefs)
        todo: list[int] = []
        for i, g in enumerate(grefs):
            h = table.get(g)
            if h is not None and g not in busy:
                busy.add(g)
                used.append(g)
                handles[i] = h
            else:
                todo.append(i)
        hits = len(grefs) - len(todo)
        temp: list[int] = []
        if todo:
            mapped = self._map_batch(_MAP_HOST, [grefs[i] for i in todo])
            if mapped is None:
                busy.difference_update(used)
                used.clear()
                return None
            for i, h in zip(todo, mapped, strict=True):
                handles[i] = h
                g = grefs[i]
                if g not in table and len(table) < self.max_persistent:
                    table[g] = h
                    self._pviews[g] = self.hc.mapped_page(h)
                    busy.add(g)
                    used.append(g)
                else:
                    temp.append(h)
        return handles, temp, hits

    @property
    def persistent_grants(self) -> int:
        """Grants mapped persistently now."""
        return len(self._pgnts)

    def unmap_ring(self, handles: list[int]) -> None:
        """The connection is over: unmap the ring and every persistent grant."""
        self.unmap_batch(handles)
        self.unmap_persistent()

    def unmap_persistent(self) -> None:
        """Unmap every persistent grant (disconnect, nothing in flight: Linux
        ``free_persistent_gnts``)."""
        table = self._pgnts
        if self._pbusy:
            raise KernelPanic(f"{self.name}: persistent grants in use at disconnect")
        handles = list(table.values())
        table.clear()
        self._pviews.clear()
        self._pmemo.clear()
        self.unmap_batch(handles)

    # -- grant maps ----------------------------------------------------------------------

    def _map_ops(self, flags: int, grefs: Sequence[int]) -> tuple[bytearray, list[int]]:
        """The packed ``struct gnttab_map_grant_ref`` of each gref (``host_addr``,
        ``flags``, ``g``, the frontend; status not done), each at its own address from
        the kernel's foreign-page range (Linux's blkback takes its pages from
        ``gnttab_alloc_pages``), and those addresses, in order; they go back in
        :meth:`_map_batch` or :meth:`unmap_batch`."""
        dom = self.frontend_domid
        error, addrs = self.hc.foreign.alloc_many(len(grefs))
        if error != 0:
            raise KernelPanic(f"{self.name}: no address for a foreign page ({error})")
        if len(addrs) != len(grefs):
            raise KernelPanic(f"{self.name}: {len(addrs)} foreign addresses for "
                              f"{len(grefs)} grants")
        buf = bytearray(_MAP_OP.pack(0, flags, 0, dom, _NOT_DONE, 0, 0) * len(grefs))
        _put_column(buf, _MAP_ADDR, _MAP_OP, addrs)
        _put_column(buf, _MAP_REF, _MAP_OP, grefs)
        return buf, addrs

    def _unmap_ops(self, handles: Sequence[int]) -> bytearray:
        """The packed ``struct gnttab_unmap_grant_ref`` of each handle: at the address it
        was mapped at, no device address, status not done."""
        buf = bytearray(_UNMAP_OP.pack(0, 0, 0, _NOT_DONE) * len(handles))
        _put_column(buf, _UNMAP_ADDR, _UNMAP_OP,
                    list(map(self._host_addrs.__getitem__, handles)))
        _put_column(buf, _UNMAP_HANDLE, _UNMAP_OP, handles)
        return buf

    def _map_batch(self, flags: int, grefs: Sequence[int]) -> list[int] | None:
        """Map every gref in one hypercall: the handles, or None (nothing left mapped)."""
        buf, addrs = self._map_ops(flags, grefs)
        n = len(addrs)
        rc = self.hc.grant_table_op_raw(GNTTABOP_map_grant_ref, buf, n)
        statuses = _get_column(buf, _MAP_STATUS, _MAP_OP)
        got = _get_column(buf, _MAP_HANDLE, _MAP_OP)
        host_addrs = self._host_addrs
        if statuses.count(_OKAY) == n:  # every op done (each one's status read)
            handles = got
            host_addrs.update(zip(handles, addrs, strict=True))
        else:
            handles = []
            free = self.hc.foreign.free
            for addr, status, handle in zip(addrs, statuses, got, strict=True):
                if status == _OKAY:
                    handles.append(handle)
                    host_addrs[handle] = addr
                else:
                    free(addr)
        self.segments_mapped += len(handles)
        self.mapped_now += len(handles)
        self.mapped_peak = max(self.mapped_peak, self.mapped_now)
        if rc != 0 or len(handles) != len(addrs):
            self.unmap_batch(handles)  # XSA-361: undo the elements that worked
            return None
        return handles

    def unmap_batch(self, handles: list[int]) -> None:
        """Unmap our own handles in one hypercall; a failure is a kernel panic."""
        if not handles:
            return
        buf = self._unmap_ops(handles)
        n = len(handles)
        rc = self.hc.grant_table_op_raw(GNTTABOP_unmap_grant_ref, buf, n)
        statuses = _get_column(buf, _UNMAP_STATUS, _UNMAP_OP)
        if rc != 0 or statuses.count(_OKAY) != n:
            bad = [(h, status) for h, status in zip(handles, statuses, strict=True)
                   if status != _OKAY]
            raise KernelPanic(f"{self.name}: unmap of our own handles failed: rc {rc}, "
                              f"(handle, status) {bad}")
        self.hc.foreign.free_many(list(map(self._host_addrs.pop, handles)))
        self.mapped_now -= len(handles)
