"""The bus_dma implementation hook API (FreeBSD's ``struct bus_dma_impl``).

Theory of operation
-------------------
The public functions (``bus_dma_tag_create``, ``bus_dmamap_load_*``,
``bus_dmamap_unload``, ``bus_dmamap_sync`` ...; FreeBSD's
``subr_bus_dma.c``) do what is common to every implementation: argument and
state checks, the return contract, calling the client callback, DMA-API
debugging. They reach the machine-dependent part through the tag's ``impl``,
an instance of a :class:`BusDmaImpl` subclass, exactly like FreeBSD x86
reaches ``bus_dma_bounce_impl`` or the Xen grant-table implementation through
``dmat->common.impl``. A child tag inherits its parent's impl:
``bus_dma_tag_create(parent, ...)`` calls ``parent.impl.tag_create(...)``.

:class:`~gntdma.sys.BounceImpl` is the generic implementation (x86
``busdma_bounce.c``). The Xen grant-table implementation subclasses it (or
wraps it) and overrides some hooks; each hook below says what the generic
layer expects.

Hooks (``dmat`` is always a tag of this impl; errors are errno ints)
----------------------------------------------------------------------
``tag_create(parent, kern, alignment, boundary, lowaddr, highaddr, maxsize,
nsegments, maxsegsz, flags, lockfunc, lockfuncarg) -> (error, tag)``
    Build a tag (``bus_dma_tag_create`` registers and counts it afterwards).
    Use :func:`common_bus_dma_tag_create` with ``self.tag_class`` for the checks
    and the inheritance, then set ``tag.impl = self`` and add your own state.
    ``parent`` is None for a root.
``tag_destroy(dmat) -> int``
    Called when ``dmat.map_count == 0`` (the generic layer returns EBUSY
    before that). Drop a reference on ``dmat`` and, when it reaches 0, free it
    and drop one on its parent, up the chain.
``map_create(dmat, flags) -> (error, map)``
    Build a ``self.map_class`` map. The generic layer counts maps
    (``dmat.map_count``, ``dmat.maps``): implementations do not.
``map_destroy(dmat, map) -> int``
    Called only for an unloaded map. EBUSY to refuse.
``mem_alloc(dmat, flags) -> (error, vaddr, map)`` / ``mem_free(dmat, vaddr, map)``
    bus_dmamem_alloc/free: memory satisfying the tag, and a map for it (the
    generic layer counts it as a map of the tag).
``map_waitok(dmat, map, mem, callback, callback_arg)``
    Called before a load without BUS_DMA_NOWAIT (and before a replay of a
    deferred load): remember ``mem``, ``callback`` and ``callback_arg`` (the
    base class stores them in ``map.mem``, ``map.callback``,
    ``map.callback_arg``) so that a deferred load can be completed later.
``load_buffer(dmat, map, buf, buflen, flags, segs) -> int``
``load_phys(dmat, map, paddr, buflen, flags, segs) -> int``
``load_ma(dmat, map, ma, tlen, ma_offs, flags, segs) -> int``
    Add the segments of one buffer (kernel va, physical range, or page array
    of pfns with an offset into the first page) to ``segs``, the list being
    built for this load. One load may call these several times (an mbuf chain,
    a uio, a vlist): coalesce into ``segs[-1]`` or append, never touch earlier
    entries, and use :func:`bus_dmamap_addseg` for the rules. The new segments
    of a call are ``segs[before:]`` where ``before = len(segs)`` on entry (it
    can be 0 new segments when a buffer coalesces into the last one). Return 0,
    EFBIG (out of segments), ENOMEM (BUS_DMA_NOWAIT shortage), or EINPROGRESS
    (deferred: the load completes later, see below).
``map_complete(dmat, map, segs, nsegs, error) -> segs``
    Called once a load has run its course without deferring, before the client
    callback, with the error the load ended with. Return the segments the
    callback gets (the bounce impl returns ``segs``). **This is where an
    implementation finishes a successful load** (the Xen handlers write one
    grant entry per segment here).
``map_unload(dmat, map)``
    Undo everything a load did, including a partial or failed load and a load
    still deferred (cancel it: leave nothing queued). The generic layer calls it
    from ``bus_dmamap_unload`` and itself after a load that failed, so it must
    cope with any intermediate state. **This is where an implementation
    releases what the load took** (the Xen handlers end foreign access and free
    the references here), then calls the base class.
``map_sync(dmat, map, op)``
    Bounce copies: PREWRITE copies the buffer to the bounce pages, POSTREAD
    copies them back.

Deferred loads
--------------
A hook that returns EINPROGRESS owns the completion. Either it replays the whole
load later with :func:`bus_dmamap_load_mem` semantics (the bounce impl does this
on ``taskqueue_swi`` through :func:`busdma_replay_load`, under the tag's
lockfunc), or it completes it itself: call ``self.map_complete(...)`` with the
segments it kept (the ``segs`` list passed to the load hooks stays valid), then
:func:`bus_dmamap_complete_deferred` with 0 or an error, which takes the tag's
lockfunc, records the map loaded (or unloads it on error) and runs the client
callback exactly once. The Xen grant-shortage path does the latter from its grant
free callback.

Recipe: a grant-table implementation
------------------------------------
(``tests/sys/test_busdma_impl_hooks.py`` runs exactly this with a toy pool.)

- ``class XenImpl(BounceImpl)`` with ``map_class = XenMap`` (a ``BounceMap``
  subclass holding ``refs``, the kept segments and the grant free callback) and
  ``tag_class`` a ``BounceTag`` subclass holding the domid. Make the root Xen
  tag with ``bus_dma_tag_create(parent, ..., impl=xen_impl)``; children inherit
  the impl. Instances are per kernel (``kernel_state(kern).impls`` is a place
  to keep them).
- ``load_buffer``/``load_phys``/``load_ma``: call ``super()``; on success take
  references for the segments that appeared (``len(segs) - len(map.refs)``).
  Short with BUS_DMA_NOWAIT: return the grant-table error (the client callback
  gets it, the load returns 0). Short and sleepable: keep ``segs``, register a
  grant free callback, return EINPROGRESS.
- ``map_complete``: ``segs = super().map_complete(...)``; if ``error == 0``
  grant ``refs[i]`` to ``segs[i].ds_addr >> PAGE_SHIFT`` (read-only per the load
  flags saved in ``map.load_flags``); return ``segs``.
- the free callback (on ``taskqueue_swi``, no lock held): claim the references,
  ``segs = self.map_complete(dmat, map, kept, len(kept), 0)``, then
  ``bus_dmamap_complete_deferred(dmat, map, segs, 0)`` (it takes the lockfunc
  and returns ECANCELED if the load was unloaded meanwhile).
- ``map_unload``: cancel a pending free callback, end foreign access and free
  the references (or keep them for a preallocating map), then
  ``super().map_unload(dmat, map)``.
- ``map_create``/``map_destroy``: preallocated references.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import islice, repeat
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from gntdma.sys._busdma_types import (
    BusDmaCallback,
    BusDmaLockFunc,
    BusDmaMap,
    BusDmaTag,
    MemBuffer,
    bus_dma_segment_t,
    ma_pieces,
    memdesc,
)
from gntdma.sys._param import PAGE_MASK, PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from gntdma.sys._kernel import Kernel

__all__ = [
    "AddrAt",
    "BusDmaImpl",
    "PiecesAt",
    "buffer_accessors",
    "buffer_pieces",
    "buffer_pieces_unbounced",
    "bus_dmamap_addpages",
    "bus_dmamap_addpieces",
    "buffer_client_ranges",
    "bus_dmamap_addseg",
    "map_pieces_unbounced",
    "segments_length",
    "vm_addr_bound_ok",
]

_tuple_new = tuple.__new__
_DS_LEN = itemgetter(1)  # bus_dma_segment_t.ds_len

#: The physical address at an offset into a buffer.
AddrAt = Callable[[int], int]
#: The (pa, len) pieces of ``n`` bytes at an offset into a buffer.
PiecesAt = Callable[[int, int], list[tuple[int, int]]]


def buffer_accessors(kern: Kernel, kind: str, a: int,
                     ma: Sequence[int]) -> tuple[AddrAt, PiecesAt]:
    """Address and piece functions of one buffer of a memory descriptor: a kernel
    virtual address (``vaddr``), a physical address (``phys``) or a page array (``ma``)."""
    if kind == "vaddr":
        def v_addr(off: int) -> int:
            return kern.pmap_kextract(a + off)

        def v_pieces(off: int, n: int) -> list[tuple[int, int]]:
            out = []
            va = a + off
            while n > 0:
                ln = min(n, PAGE_SIZE - (va & PAGE_MASK))
                out.append((kern.pmap_kextract(va), ln))
                va += ln
                n -= ln
            return out

        return v_addr, v_pieces
    if kind == "phys":
        return (lambda off: a + off), (lambda off, n: [(a + off, n)])

    def m_addr(off: int) -> int:
        o = a + off
        return (ma[o >> PAGE_SHIFT] << PAGE_SHIFT) | (o & PAGE_MASK)

    return m_addr, (lambda off, n: ma_pieces(ma, a + off, n))


def buffer_pieces(kern: Kernel, kind: str, a: int, ma: Sequence[int],
                  n: int) -> list[tuple[int, int]]:
    """The (pa, len) pieces, one per page, of ``n`` bytes of one buffer of a memory
    descriptor (as :func:`buffer_accessors` gives them), looked up at once: one page
    table lookup per page of a kernel virtual buffer, the same fault at the first
    unmapped page."""
    if kind == "vaddr":
        return kern.pmap_kextract_pieces(a, n)
    if kind == "ma":
        return ma_pieces(ma, a, n)
    out: list[tuple[int, int]] = []
    end = a + n
    while a < end:
        ln = min(end - a, PAGE_SIZE - (a & PAGE_MASK))
        out.append((a, ln))
        a += ln
    return out


def buffer_pieces_unbounced(kern: Kernel, dmat: BusDmaTag, kind: str, a: int,
                            ma: Sequence[int], n: int) -> list[tuple[int, int]] | None:
    """The pieces of :func:`buffer_pieces` when the bounce walk of ``dmat`` would take
    the buffer page by page and bounce none of it, else None.

    The walk (``_bus_dmamap_count_pages`` / ``_bus_dmamap_load_buffer`` of FreeBSD's
    x86 ``busdma_bounce.c``) starts a chunk at each page while a chunk is never cut
    inside a page (``maxsegsz`` at least a page, no boundary line inside a page) and
    none bounces; a chunk bounces when ``must_bounce`` holds of its start: above
    ``lowaddr`` and at most ``highaddr``, or off the tag's alignment. So when no
    page start bounces, the walk's chunks are the pages, its count is 0 and its
    segments are those of :func:`bus_dmamap_addpieces`. None also when a page is
    not mapped (or past a page array), so that the walk faults where it would.
    """
    b = dmat.boundary
    if dmat.maxsegsz < PAGE_SIZE or 0 < b < PAGE_SIZE or dmat.alignment > PAGE_SIZE:
        return None
    if kind == "vaddr":
        pieces = kern.pmap_kextract_pieces_mapped(a, n)
        if pieces is None:
            return None
    elif kind == "ma":
        if n > 0 and (a + n - 1) >> PAGE_SHIFT >= len(ma):
            return None
        pieces = ma_pieces(ma, a, n)
    else:
        pieces = buffer_pieces(kern, kind, a, ma, n)
    lowaddr, highaddr, amask = dmat.lowaddr, dmat.highaddr, dmat.alignment - 1
    for pa, _ln in pieces:
        if lowaddr < pa <= highaddr or pa & amask != 0:
            return None
    return pieces


def map_pieces_unbounced(
        kern: Kernel, dmat: BusDmaTag, map: BusDmaMap, kind: str, a: int, ma: Sequence[int],
        n: int, walk: Callable[[Kernel, BusDmaTag, str, int, Sequence[int], int],
                               list[tuple[int, int]] | None]) -> list[tuple[int, int]] | None:
    """``walk(kern, dmat, kind, a, ma, n)`` (:func:`buffer_pieces_unbounced`), kept on
    ``map`` for the last buffer asked for.

    A sleepable load asks for each buffer twice (its count of bounce pages, then the
    load), and DMA-API debugging takes the client ranges of the loaded buffer at its
    PRE sync: asked again for the same buffer while no kernel mapping changed
    (``Kernel.pmap_gen``), it gives the same list, which no caller changes.
    """
    key = ((kind, a, n, ma), kern.pmap_gen)
    memo = map.dm_pieces
    if memo is not None and memo[0] == key:
        return memo[1]
    pieces = walk(kern, dmat, kind, a, ma, n)
    map.dm_pieces = (key, pieces)
    return pieces


def bus_dmamap_addpieces(dmat: BusDmaTag, pieces: list[tuple[int, int]],
                         segs: list[bus_dma_segment_t]) -> int:
    """Add page pieces that are never bounced to ``segs``; the bytes added.

    Each piece is cut at ``maxsegsz`` and at boundary lines, the chunks the
    bounce walk makes of a buffer that does not bounce (a piece never crosses a
    page), and each chunk is added by the rules of :func:`bus_dmamap_addseg`,
    written out here for the tag's limits read once: coalesced into the last
    segment when contiguous, within ``maxsegsz`` and within one boundary window,
    else a new segment. Stops when the segments run out (fewer bytes than the
    pieces hold: EFBIG for the caller).
    """
    b = dmat.boundary
    bmask = ~(b - 1) if b != 0 else 0
    maxsegsz = dmat.maxsegsz
    limit = dmat.segment_limit()
    done = 0
    for pa, ln in pieces:
        while ln > 0:
            sg = ln if ln < maxsegsz else maxsegsz
            if b != 0 and (pa ^ (pa + sg - 1)) & bmask:
                sg = ((pa + b) & bmask) - pa
            if segs:
                last = segs[-1]
                start = last.ds_addr
                merged = last.ds_len + sg
                if (pa == start + last.ds_len and merged <= maxsegsz
                        and (b == 0 or ((start ^ (start + merged - 1)) & bmask) == 0)):
                    segs[-1] = bus_dma_segment_t(start, merged)
                elif len(segs) >= limit:
                    return done
                else:
                    segs.append(bus_dma_segment_t(pa, sg))
            elif limit < 1:
                return done
            else:
                segs.append(bus_dma_segment_t(pa, sg))
            pa += sg
            ln -= sg
            done += sg
    return done


def bus_dmamap_addpages(dmat: BusDmaTag, pieces: list[tuple[int, int]],
                        segs: list[bus_dma_segment_t]) -> int:
    """:func:`bus_dmamap_addpieces` of the pieces of one buffer, one per page, as
    :func:`buffer_pieces` gives them (each piece but the first starts a page, each but
    the last ends one); the bytes added.

    With a boundary of one page and ``maxsegsz`` of at least a page, the rules cut no
    piece (none crosses a page) and coalesce none but the first: a piece that starts a
    page would cross the boundary line with the segment before it. The segments are
    then the pieces, made at once, the first perhaps coalesced into ``segs[-1]``.
    Any other tag, or too few segments left, takes :func:`bus_dmamap_addpieces`.
    """
    if dmat.boundary != PAGE_SIZE or dmat.maxsegsz < PAGE_SIZE or not pieces:
        return bus_dmamap_addpieces(dmat, pieces, segs)
    merge = False
    if segs:
        start, sln = segs[-1]
        pa, ln = pieces[0]
        merged = sln + ln
        merge = (pa == start + sln and merged <= dmat.maxsegsz
                 and (start ^ (start + merged - 1)) & ~PAGE_MASK == 0)
    if len(segs) + len(pieces) - merge > dmat.segment_limit():
        return bus_dmamap_addpieces(dmat, pieces, segs)
    if merge:
        segs[-1] = bus_dma_segment_t(start, merged)
        segs.extend(map(_tuple_new, repeat(bus_dma_segment_t), islice(pieces, 1, None)))
    else:
        segs.extend(map(_tuple_new, repeat(bus_dma_segment_t), pieces))
    return sum(map(_DS_LEN, pieces))


def segments_length(segs: list[bus_dma_segment_t]) -> int:
    """The bytes the segments cover (the mapsize of a load)."""
    return sum(map(_DS_LEN, segs))


def buffer_client_ranges(kern: Kernel, map: BusDmaMap,
                         bufs: list[MemBuffer]) -> list[tuple[int, int]]:
    """The (pa, len) client ranges of the buffers ``bufs`` of a load on ``map``: the
    pieces :func:`map_pieces_unbounced` kept for the same buffer under the same kernel
    mappings, else looked up (a kernel virtual buffer faults on an unmapped page)."""
    out: list[tuple[int, int]] = []
    memo = map.dm_pieces
    for buf in bufs:
        kind, a, n, ma = buf
        if (memo is not None and memo[1] is not None and kind != "phys"
                and memo[0] == (buf, kern.pmap_gen)):
            out.extend(memo[1])
        elif kind == "phys":
            out.append((a, n))
        elif kind == "ma":
            out.extend(ma_pieces(ma, a, n))
        else:
            out.extend(kern.pmap_kextract_pieces(a, n))
    return out


def vm_addr_bound_ok(pa: int, size: int, boundary: int) -> bool:
    """True if ``[pa, pa+size)`` does not cross a ``boundary`` line (0: no boundary)."""
    if boundary == 0 or size == 0:
        return True
    return ((pa ^ (pa + size - 1)) & ~(boundary - 1)) == 0


def bus_dmamap_addseg(dmat: BusDmaTag, curaddr: int, sgsize: int,
                      segs: list[bus_dma_segment_t]) -> int:
    """Add a chunk to ``segs`` under the tag's rules; the bytes added, 0 if out of segments.

    The chunk is first cut at the next boundary line; it then coalesces into the
    last segment iff it is physically contiguous with it, the merged length is at
    most ``maxsegsz`` and the merged segment stays within one boundary window;
    otherwise it starts a new segment, unless ``nsegments`` are used up.
    """
    b = dmat.boundary
    if b != 0 and not vm_addr_bound_ok(curaddr, sgsize, b):
        sgsize = ((curaddr + b) & ~(b - 1)) - curaddr
    if segs:
        last = segs[-1]
        if (curaddr == last.ds_addr + last.ds_len
                and last.ds_len + sgsize <= dmat.maxsegsz
                and vm_addr_bound_ok(last.ds_addr, last.ds_len + sgsize, b)):
            segs[-1] = bus_dma_segment_t(last.ds_addr, last.ds_len + sgsize)
            return sgsize
        if len(segs) >= dmat.segment_limit():
            return 0
    elif dmat.segment_limit() < 1:
        return 0
    segs.append(bus_dma_segment_t(curaddr, sgsize))
    return sgsize


class BusDmaImpl:
    """Base of bus_dma implementations; see the module docstring for the hooks.

    The base class provides ``map_waitok`` (store the deferred-load context),
    ``map_complete`` (return ``segs``) and a ``name``; every other hook must be
    provided by a subclass.
    """

    name = "abstract"
    tag_class: type[BusDmaTag] = BusDmaTag
    map_class: type[BusDmaMap] = BusDmaMap

    def tag_create(self, parent: BusDmaTag | None, kern: Kernel, alignment: int,
                   boundary: int, lowaddr: int, highaddr: int, maxsize: int, nsegments: int,
                   maxsegsz: int, flags: int, lockfunc: BusDmaLockFunc | None,
                   lockfuncarg: Any) -> tuple[int, BusDmaTag | None]:
        raise NotImplementedError

    def tag_destroy(self, dmat: BusDmaTag) -> int:
        raise NotImplementedError

    def map_create(self, dmat: BusDmaTag, flags: int) -> tuple[int, BusDmaMap | None]:
        raise NotImplementedError

    def map_destroy(self, dmat: BusDmaTag, map: BusDmaMap) -> int:
        raise NotImplementedError

    def mem_alloc(self, dmat: BusDmaTag, flags: int) -> tuple[int, int, BusDmaMap | None]:
        raise NotImplementedError

    def mem_free(self, dmat: BusDmaTag, vaddr: int, map: BusDmaMap) -> None:
        raise NotImplementedError

    def load_buffer(self, dmat: BusDmaTag, map: BusDmaMap, buf: int, buflen: int, flags: int,
                    segs: list[bus_dma_segment_t]) -> int:
        raise NotImplementedError

    def load_phys(self, dmat: BusDmaTag, map: BusDmaMap, paddr: int, buflen: int, flags: int,
                  segs: list[bus_dma_segment_t]) -> int:
        raise NotImplementedError

    def load_ma(self, dmat: BusDmaTag, map: BusDmaMap, ma: Sequence[int], tlen: int,
                ma_offs: int, flags: int, segs: list[bus_dma_segment_t]) -> int:
        raise NotImplementedError

    def map_waitok(self, dmat: BusDmaTag, map: BusDmaMap, mem: memdesc,
                   callback: BusDmaCallback, callback_arg: Any) -> None:
        map.mem = mem
        map.callback = callback
        map.callback_arg = callback_arg

    def map_complete(self, dmat: BusDmaTag, map: BusDmaMap, segs: list[bus_dma_segment_t],
                     nsegs: int, error: int) -> list[bus_dma_segment_t]:
        return segs

    def map_unload(self, dmat: BusDmaTag, map: BusDmaMap) -> None:
        raise NotImplementedError

    def map_sync(self, dmat: BusDmaTag, map: BusDmaMap, op: int) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"

