"""bus_dma(9): the machine-independent entry points (FreeBSD ``subr_bus_dma.c``).

Rules
-----
Return contract of the callback loaders (``bus_dmamap_load``, ``_load_bio``,
``_load_ma``, ``_load_phys``, ``_load_mem``):

- ``0``: the callback has already run, with ``error`` 0 and the segments, or
  with an error (EFBIG: out of segments) and ``nseg`` 0.
- ``EINPROGRESS``: deferred (bounce pages short, or the implementation's own
  resource short); only without ``BUS_DMA_NOWAIT``. The callback runs later,
  exactly once, with the tag's lockfunc held (FIFO order on ``taskqueue_swi``
  for bounce deferrals). A deferral does not stall later loads on the tag.
- ``ENOMEM``: only with ``BUS_DMA_NOWAIT``; the callback ran with ENOMEM.
- ``EINVAL``: invalid request (longer than the tag's maxsize, or a map that is
  loaded or has a load pending: also a DMA-API debug report); the callback ran
  with EINVAL and ``nseg`` 0.

``bus_dmamap_load_mbuf`` and ``_load_uio`` imply NOWAIT, call their callback2
``(arg, segs, nseg, mapsize, error)`` and return the error itself.
``bus_dmamap_load_mbuf_sg`` implies NOWAIT, has no callback and returns
``(error, segs, nsegs)``.

Differences from FreeBSD, all on the safe side: a load that fails leaves
nothing behind (the implementation's ``map_unload`` runs before the callback);
unloading a map whose load is deferred cancels it; loading a loaded map is
refused with EINVAL; destroying a loaded map is refused with EBUSY; the
segments given to a callback are a fresh list the caller may keep (``map.dm_segs``
keeps a copy while the map is loaded). ``parent`` may be a :class:`Kernel`,
meaning no parent tag (FreeBSD's NULL) in that kernel.

The load, unload and sync calls must be made with the tag's lock held, except
during single-threaded attach, as in FreeBSD.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import Any

from gntdma.sched import KernelPanic
from gntdma.sys._bio import BIO_UNMAPPED, bio, uio
from gntdma.sys._busdma_impl import BusDmaImpl, buffer_client_ranges, segments_length
from gntdma.sys._busdma_types import (
    BUS_DMA_LOAD_MBUF,
    BUS_DMA_LOCK,
    BUS_DMA_NOWAIT,
    BUS_DMA_UNLOCK,
    BUS_DMA_WAITOK,
    BUS_DMASYNC_POSTREAD,
    BUS_DMASYNC_POSTWRITE,
    BUS_DMASYNC_PREREAD,
    BUS_DMASYNC_PREWRITE,
    BUS_SPACE_MAXADDR,
    BUS_SPACE_MAXSIZE,
    BUS_SPACE_UNRESTRICTED,
    MEMDESC_BIO,
    MEMDESC_MBUF,
    BusDmaCallback,
    BusDmaCallback2,
    BusDmaLockFunc,
    BusDmaMap,
    BusDmaTag,
    MapState,
    MemBuffer,
    bus_dma_segment_t,
    kernel_state,
    memdesc,
    memdesc_buffers,
    memdesc_length,
    memdesc_mbuf,
    memdesc_paddr,
    memdesc_uio,
    memdesc_vaddr,
    memdesc_vmpages,
)
from gntdma.sys._dmadebug import DmaDebugKind
from gntdma.sys._kernel import Kernel
from gntdma.sys._mbuf import mbuf

__all__ = [
    "bus_dma_tag_create",
    "bus_dma_tag_destroy",
    "bus_dmamap_complete_deferred",
    "bus_dmamap_create",
    "bus_dmamap_destroy",
    "bus_dmamap_load",
    "bus_dmamap_load_bio",
    "bus_dmamap_load_ma",
    "bus_dmamap_load_mbuf",
    "bus_dmamap_load_mbuf_sg",
    "bus_dmamap_load_mem",
    "bus_dmamap_load_phys",
    "bus_dmamap_load_uio",
    "bus_dmamap_sync",
    "bus_dmamap_unload",
    "bus_dmamem_alloc",
    "bus_dmamem_free",
    "bus_get_dma_tag",
    # busdma_debug_check_detach: in gntdma.sys._busdma_detach
    "busdma_load_memdesc",
    "busdma_replay_load",
]

_SYNC_ALL = (BUS_DMASYNC_PREREAD | BUS_DMASYNC_POSTREAD | BUS_DMASYNC_PREWRITE
             | BUS_DMASYNC_POSTWRITE)
_SYNC_PRE = BUS_DMASYNC_PREREAD | BUS_DMASYNC_PREWRITE
_SYNC_POST = BUS_DMASYNC_POSTREAD | BUS_DMASYNC_POSTWRITE
_IDLE, _LOADING, _LOADED = MapState.IDLE, MapState.LOADING, MapState.LOADED
_EINPROGRESS = errno.EINPROGRESS
_tuple_new = tuple.__new__


def _default_impl(kern: Kernel) -> BusDmaImpl:
    from gntdma.sys._busdma_bounce import bounce_impl

    return bounce_impl(kern)


# -- tags ----------------------------------------------------------------------------------


def bus_get_dma_tag(kern: Kernel) -> BusDmaTag:
    """The kernel's root tag (no restrictions, bounce implementation); never destroyed."""
    st = kernel_state(kern)
    if st.root is None:
        error, tag = _default_impl(kern).tag_create(
            None, kern, 1, 0, BUS_SPACE_MAXADDR, BUS_SPACE_MAXADDR, BUS_SPACE_MAXSIZE,
            BUS_SPACE_UNRESTRICTED, BUS_SPACE_MAXSIZE, 0, None, None)
        if error != 0 or tag is None:
            raise KernelPanic(f"bus_get_dma_tag: cannot create the root tag: {error}")
        tag.is_root = True
        tag.name = "root"
        st.root = tag
    return st.root


def bus_dma_tag_create(parent: BusDmaTag | Kernel, alignment: int, boundary: int, lowaddr: int,
                       highaddr: int, maxsize: int, nsegments: int, maxsegsz: int, flags: int,
                       lockfunc: BusDmaLockFunc | None, lockfuncarg: Any, *,
                       impl: BusDmaImpl | None = None) -> tuple[int, BusDmaTag | None]:
    """Create a tag; its restrictions combine with the parent's. Returns (error, tag).

    The tag's implementation is the parent's (the bounce implementation without a
    parent tag), unless ``impl`` is given: that is how an implementation makes its
    first tag over a tag of another implementation (``xen_get_dma_tag(parent)``
    passes its own impl); the tag is then counted like any other.
    """
    if isinstance(parent, BusDmaTag):
        kern = parent.kern
        ptag: BusDmaTag | None = parent
        if impl is None:
            impl = parent.impl
    else:
        kern = parent
        ptag = None
        if impl is None:
            impl = _default_impl(kern)
    error, tag = impl.tag_create(ptag, kern, alignment, boundary, lowaddr, highaddr, maxsize,
                                 nsegments, maxsegsz, flags, lockfunc, lockfuncarg)
    if error != 0 or tag is None:
        return error, None
    kernel_state(kern).tags[id(tag)] = tag
    kern.busdma.tags += 1
    return 0, tag


def bus_dma_tag_destroy(dmat: BusDmaTag) -> int:
    """Drop the tag (and, at zero references, its parent's reference). EBUSY with maps."""
    if dmat.is_root:
        return errno.EBUSY
    if dmat.ref_count <= 0:
        raise KernelPanic(f"bus_dma_tag_destroy: {dmat.desc()} already destroyed")
    kern = dmat.kern
    if dmat.map_count != 0:
        kern.dma_debug.report(DmaDebugKind.TAG_DESTROY_BUSY,
                              f"destroy of {dmat.desc()} with {dmat.map_count} live maps",
                              tag=dmat.desc())
        return errno.EBUSY
    error: int = dmat.impl.tag_destroy(dmat)
    if error == 0:
        st = kernel_state(kern)
        t: BusDmaTag | None = dmat
        while t is not None and t.ref_count == 0 and id(t) in st.tags:
            del st.tags[id(t)]
            kern.busdma.tags -= 1
            t = t.parent
    return error


# -- maps ----------------------------------------------------------------------------------


def _register(dmat: BusDmaTag, map: BusDmaMap) -> None:
    dmat.maps[id(map)] = map
    dmat.map_count += 1
    dmat.kern.busdma.maps += 1


def _unregister(dmat: BusDmaTag, map: BusDmaMap) -> None:
    del dmat.maps[id(map)]
    dmat.map_count -= 1
    dmat.kern.busdma.maps -= 1
    map.destroyed = True


def _check_map(dmat: BusDmaTag, map: BusDmaMap, fn: str) -> None:
    if map.destroyed:
        raise KernelPanic(f"{fn}: {map.desc()} was destroyed")
    if map.dmat is not dmat:
        raise KernelPanic(f"{fn}: {map.desc()} does not belong to {dmat.desc()}")


def bus_dmamap_create(dmat: BusDmaTag, flags: int) -> tuple[int, BusDmaMap | None]:
    if dmat.ref_count <= 0:
        raise KernelPanic(f"bus_dmamap_create on destroyed {dmat.desc()}")
    error, map = dmat.impl.map_create(dmat, flags)
    if error != 0 or map is None:
        return error, None
    _register(dmat, map)
    return 0, map


def bus_dmamap_destroy(dmat: BusDmaTag, map: BusDmaMap) -> int:
    """Destroy an unloaded map; EBUSY (and a DMA-API debug report) if it is loaded."""
    _check_map(dmat, map, "bus_dmamap_destroy")
    if map.dmamem:
        raise KernelPanic("bus_dmamap_destroy of a bus_dmamem_alloc map; use bus_dmamem_free")
    if map.state is not MapState.IDLE:
        dmat.kern.dma_debug.report(DmaDebugKind.DESTROY_LOADED_MAP,
                                   f"destroy of {map.state.value} {map.desc()}",
                                   tag=dmat.desc(), map=map.desc())
        return errno.EBUSY
    error: int = dmat.impl.map_destroy(dmat, map)
    if error == 0:
        _unregister(dmat, map)
    return error


def bus_dmamem_alloc(dmat: BusDmaTag, flags: int) -> tuple[int, int, BusDmaMap | None]:
    """Memory that satisfies the tag (``maxsize`` bytes) and a map for it: (error, vaddr, map)."""
    error, vaddr, map = dmat.impl.mem_alloc(dmat, flags)
    if error != 0 or map is None:
        return (error if error != 0 else errno.ENOMEM), 0, None
    map.dmamem = True
    _register(dmat, map)
    return 0, vaddr, map


def bus_dmamem_free(dmat: BusDmaTag, vaddr: int, map: BusDmaMap) -> None:
    _check_map(dmat, map, "bus_dmamem_free")
    if not map.dmamem:
        raise KernelPanic("bus_dmamem_free: map was not made by bus_dmamem_alloc")
    if map.state is not MapState.IDLE:
        dmat.kern.dma_debug.report(DmaDebugKind.DESTROY_LOADED_MAP,
                                   f"bus_dmamem_free of {map.state.value} {map.desc()}",
                                   tag=dmat.desc(), map=map.desc())
        bus_dmamap_unload(dmat, map)
    dmat.impl.mem_free(dmat, vaddr, map)
    _unregister(dmat, map)


# -- loads -----------------------------------------------------------------------------------


def busdma_load_memdesc(dmat: BusDmaTag, map: BusDmaMap, mem: memdesc, flags: int,
                        segs: list[bus_dma_segment_t]) -> int:
    """Hand every buffer of ``mem`` to the implementation's load hooks; first error wins."""
    impl = dmat.impl
    if mem.md_type == MEMDESC_MBUF:
        flags |= BUS_DMA_LOAD_MBUF
    for kind, a, n, ma in memdesc_buffers(mem):
        if kind == "vaddr":
            error: int = impl.load_buffer(dmat, map, a, n, flags, segs)
        elif kind == "phys":
            error = impl.load_phys(dmat, map, a, n, flags, segs)
        else:
            error = impl.load_ma(dmat, map, ma, n, a, flags, segs)
        if error != 0:
            return error
    return 0


def _start(dmat: BusDmaTag, map: BusDmaMap, mem: memdesc, fn: str) -> int:
    _check_map(dmat, map, fn)
    if map.state is not MapState.IDLE:
        dmat.kern.dma_debug.report(
            DmaDebugKind.LOAD_LOADED_MAP,
            f"{fn} of a map that is {map.state.value}: {map.desc()}",
            tag=dmat.desc(), map=map.desc())
        return errno.EINVAL
    map.last_op_unload = False  # an unload after any load attempt is not a double unload
    total = memdesc_length(mem)
    if total < 0 or total > dmat.maxsize:
        return errno.EINVAL
    return 0


def _run(dmat: BusDmaTag, map: BusDmaMap, mem: memdesc,
         flags: int) -> tuple[int, list[bus_dma_segment_t]]:
    """One pass of a load through the implementation."""
    map.state = _LOADING
    map.load_gen += 1
    map.load_flags = flags
    map.last_op_unload = False
    segs: list[bus_dma_segment_t] = []
    impl = dmat.impl
    if mem.md_type == MEMDESC_BIO:  # one buffer: busdma_load_memdesc's hook called here
        bp = mem.md_bio
        assert bp is not None
        if bp.bio_flags & BIO_UNMAPPED:
            error = impl.load_ma(dmat, map, tuple(bp.bio_ma), bp.bio_bcount, bp.bio_ma_offset,
                                 flags, segs)
        else:
            error = impl.load_buffer(dmat, map, bp.bio_data, bp.bio_bcount, flags, segs)
    else:
        error = busdma_load_memdesc(dmat, map, mem, flags, segs)
    if error == _EINPROGRESS:
        if not map.deferred:
            map.deferred = True
            dmat.kern.busdma.deferred_pending += 1
            dmat.kern.busdma.deferred_total += 1
        return error, segs
    segs = impl.map_complete(dmat, map, segs, len(segs), error)
    if error != 0 or map.deferred:
        _finish(dmat, map, mem, segs, error)
    else:  # _finish of a load that completed at once
        map.state = _LOADED
        map.dm_segs = list(segs)
        map.dm_mem = mem
        map.dm_mapsize = segs[0][1] if len(segs) == 1 else segments_length(segs)
        dmat.kern.busdma.maps_loaded += 1
    return error, segs


def _finish(dmat: BusDmaTag, map: BusDmaMap, mem: memdesc | None,
            segs: list[bus_dma_segment_t], error: int) -> None:
    if map.deferred:
        map.deferred = False
        dmat.kern.busdma.deferred_pending -= 1
    if error != 0:
        dmat.impl.map_unload(dmat, map)
        _reset(map)
        map.last_op_unload = False
    else:
        map.state = MapState.LOADED
        map.dm_segs = list(segs)
        map.dm_mem = mem
        map.dm_mapsize = segments_length(segs)
        dmat.kern.busdma.maps_loaded += 1


def _reset(map: BusDmaMap) -> None:
    map.state = MapState.IDLE
    map.dm_segs = []
    map.dm_mem = None
    map.dm_ranges = None
    map.dm_mapsize = 0
    map.mem = None
    map.callback = None
    map.callback_arg = None
    map.load_gen += 1


def _call(callback: BusDmaCallback, arg: Any, segs: list[bus_dma_segment_t], error: int) -> None:
    if error != 0:
        callback(arg, [], 0, error)
    else:
        callback(arg, list(segs), len(segs), 0)


def bus_dmamap_load_mem(dmat: BusDmaTag, map: BusDmaMap, mem: memdesc,
                        callback: BusDmaCallback, callback_arg: Any, flags: int) -> int:
    """Load a memory descriptor (the common path of every callback loader)."""
    if map.destroyed or map.dmat is not dmat or map.state is not MapState.IDLE:
        error = _start(dmat, map, mem, "bus_dmamap_load")  # a panic or EINVAL, reported
    else:  # _start of an idle map of this tag
        map.last_op_unload = False  # an unload after any load attempt is not a double unload
        if mem.md_type == MEMDESC_BIO:
            bp = mem.md_bio
            assert bp is not None
            total = bp.bio_bcount
        else:
            total = memdesc_length(mem)
        error = errno.EINVAL if total < 0 or total > dmat.maxsize else 0
    if error != 0:
        callback(callback_arg, [], 0, error)
        return error
    if not flags & BUS_DMA_NOWAIT:
        dmat.impl.map_waitok(dmat, map, mem, callback, callback_arg)
    error, segs = _run(dmat, map, mem, flags)
    if error == 0:  # _call
        callback(callback_arg, list(segs), len(segs), 0)
        return 0
    if error == errno.EINPROGRESS:
        return error
    callback(callback_arg, [], 0, error)
    return error if error in (errno.ENOMEM, errno.EINVAL) else 0


def bus_dmamap_load(dmat: BusDmaTag, map: BusDmaMap, buf: int, buflen: int,
                    callback: BusDmaCallback, callback_arg: Any, flags: int) -> int:
    """Load ``buflen`` bytes of kernel memory at ``buf``."""
    return bus_dmamap_load_mem(dmat, map, memdesc_vaddr(buf, buflen), callback, callback_arg,
                               flags)


def bus_dmamap_load_bio(dmat: BusDmaTag, map: BusDmaMap, bp: bio, callback: BusDmaCallback,
                        callback_arg: Any, flags: int) -> int:
    """Load a bio, mapped (``bio_data``) or unmapped (``bio_ma``)."""
    mem = _tuple_new(memdesc, (MEMDESC_BIO, 0, 0, (), bp, None, None, (), 0, 0))  # memdesc_bio
    return bus_dmamap_load_mem(dmat, map, mem, callback, callback_arg, flags)


def bus_dmamap_load_ma(dmat: BusDmaTag, map: BusDmaMap, ma: Sequence[int], tlen: int,
                       ma_offs: int, callback: BusDmaCallback, callback_arg: Any,
                       flags: int) -> int:
    """Load ``tlen`` bytes of the pages ``ma`` (pfns), from ``ma_offs`` into the first."""
    return bus_dmamap_load_mem(dmat, map, memdesc_vmpages(ma, tlen, ma_offs), callback,
                               callback_arg, flags)


def bus_dmamap_load_phys(dmat: BusDmaTag, map: BusDmaMap, paddr: int, buflen: int,
                         callback: BusDmaCallback, callback_arg: Any, flags: int) -> int:
    return bus_dmamap_load_mem(dmat, map, memdesc_paddr(paddr, buflen), callback,
                               callback_arg, flags)


def _load_now(dmat: BusDmaTag, map: BusDmaMap, mem: memdesc, flags: int,
              fn: str) -> tuple[int, list[bus_dma_segment_t]]:
    error = _start(dmat, map, mem, fn)
    if error != 0:
        return error, []
    error, segs = _run(dmat, map, mem, flags | BUS_DMA_NOWAIT)
    if error == errno.EINPROGRESS:
        raise KernelPanic(f"{fn}: implementation deferred a NOWAIT load")
    return error, segs


def bus_dmamap_load_mbuf(dmat: BusDmaTag, map: BusDmaMap, m0: mbuf, callback: BusDmaCallback2,
                         callback_arg: Any, flags: int) -> int:
    """Load a packet (NOWAIT implied); callback2 gets the mapsize. Returns the error."""
    error, segs = _load_now(dmat, map, memdesc_mbuf(m0), flags, "bus_dmamap_load_mbuf")
    if error != 0:
        callback(callback_arg, [], 0, 0, error)
    else:
        callback(callback_arg, list(segs), len(segs), m0.m_pkthdr.len, 0)
    return error


def bus_dmamap_load_mbuf_sg(dmat: BusDmaTag, map: BusDmaMap, m0: mbuf,
                            flags: int) -> tuple[int, list[bus_dma_segment_t], int]:
    """Load a packet (NOWAIT implied) with no callback: (error, segs, nsegs)."""
    error, segs = _load_now(dmat, map, memdesc_mbuf(m0), flags, "bus_dmamap_load_mbuf_sg")
    if error != 0:
        return error, [], 0
    return 0, list(segs), len(segs)


def bus_dmamap_load_uio(dmat: BusDmaTag, map: BusDmaMap, u: uio, callback: BusDmaCallback2,
                        callback_arg: Any, flags: int) -> int:
    """Load a uio (kernel iovecs; NOWAIT implied); callback2 gets the mapsize."""
    resid = u.uio_resid
    error, segs = _load_now(dmat, map, memdesc_uio(u), flags, "bus_dmamap_load_uio")
    if error != 0:
        callback(callback_arg, [], 0, 0, error)
    else:
        callback(callback_arg, list(segs), len(segs), resid, 0)
    return error


def busdma_replay_load(dmat: BusDmaTag, map: BusDmaMap) -> None:
    """Replay a deferred load (``bus_dmamap_load_mem(..., BUS_DMA_WAITOK)``); for impls.

    The replay keeps the load's other flags (``map.load_flags``): an
    implementation's load flags, such as ``BUS_DMA_XEN_RO``, must not be lost.
    Call it with the tag's lockfunc held. Does nothing if the load was cancelled.
    """
    mem, callback, arg = map.mem, map.callback, map.callback_arg
    if map.state is not MapState.LOADING or not map.deferred or mem is None or callback is None:
        return
    dmat.impl.map_waitok(dmat, map, mem, callback, arg)
    error, segs = _run(dmat, map, mem, (map.load_flags & ~BUS_DMA_NOWAIT) | BUS_DMA_WAITOK)
    if error == errno.EINPROGRESS:
        return
    _call(callback, arg, segs, error)


def bus_dmamap_complete_deferred(dmat: BusDmaTag, map: BusDmaMap,
                                 segs: list[bus_dma_segment_t], error: int,
                                 locked: bool = False) -> int:
    """Finish a load an implementation deferred, and run the client callback once.

    For an implementation that completes a deferred load itself (the Xen
    grant-shortage path): it has done its own completion work (for example
    ``self.map_complete(...)`` writing grants) and calls this with the segments
    and 0, or with an error (the map is then unloaded through ``map_unload``).
    Takes the tag's lockfunc unless ``locked``. Returns 0, or ECANCELED if the
    load is no longer pending (unloaded meanwhile: nothing is done).
    """
    if not locked:
        dmat.lockfunc(dmat.lockfuncarg, BUS_DMA_LOCK)
    try:
        if map.state is not MapState.LOADING or not map.deferred or map.callback is None:
            return errno.ECANCELED
        callback, arg, mem = map.callback, map.callback_arg, map.mem
        _finish(dmat, map, mem, segs, error)
        _call(callback, arg, segs, error)
        return 0
    finally:
        if not locked:
            dmat.lockfunc(dmat.lockfuncarg, BUS_DMA_UNLOCK)


# -- unload and sync --------------------------------------------------------------------------


def bus_dmamap_unload(dmat: BusDmaTag, map: BusDmaMap) -> None:
    """Unload (no implicit sync). Cancels a deferred load. A never-loaded map is a no-op."""
    if map.destroyed or map.dmat is not dmat:
        _check_map(dmat, map, "bus_dmamap_unload")
    kern = dmat.kern
    if map.state is _IDLE:
        if map.last_op_unload:
            kern.dma_debug.report(DmaDebugKind.DOUBLE_UNLOAD,  # the map's name made once
                                  f"double unload of {(md := map.desc())}", tag=dmat.desc(), map=md)
        return
    if map.deferred:
        map.deferred = False
        kern.busdma.deferred_pending -= 1
    was_loaded = map.state is _LOADED
    dmat.impl.map_unload(dmat, map)
    if was_loaded:
        kern.busdma.maps_loaded -= 1
    # _reset
    map.state = _IDLE
    map.dm_segs = []
    map.dm_mem = None
    map.dm_ranges = None
    map.dm_mapsize = 0
    map.mem = None
    map.callback = None
    map.callback_arg = None
    map.load_gen += 1
    map.last_op_unload = True
    if kern.dma_debug.enabled:
        kern.dma_debug.drop(id(map))


def _map_client_ranges(kern: Kernel, map: BusDmaMap) -> list[tuple[int, int]]:
    """The client (CPU physical) ranges of the map's load, reused while neither the buffers the
    descriptor names nor any kernel mapping changed since they were computed."""
    mem = map.dm_mem
    if mem is None:
        return []
    bp = mem.md_bio
    if mem.md_type == MEMDESC_BIO and bp is not None and not bp.bio_flags & BIO_UNMAPPED:
        bufs: list[MemBuffer] = [("vaddr", bp.bio_data, bp.bio_bcount, ())]  # memdesc_buffers
    else:
        bufs = memdesc_buffers(mem)
    gen = kern.pmap_gen
    cached = map.dm_ranges
    if cached is not None and cached[1] == gen and cached[0] == bufs:
        return cached[2]
    out = buffer_client_ranges(kern, map, bufs)
    map.dm_ranges = (bufs, gen, out)
    return out


def bus_dmamap_sync(dmat: BusDmaTag, map: BusDmaMap, op: int) -> None:
    """PRE ops before the device touches the buffer, POST ops after. Bounce copies here."""
    if map.destroyed or map.dmat is not dmat:
        _check_map(dmat, map, "bus_dmamap_sync")
    kern = dmat.kern
    dbg = kern.dma_debug
    pre = op & _SYNC_PRE
    post = op & _SYNC_POST
    if op == 0 or op & ~_SYNC_ALL or (pre != 0 and post != 0):
        dbg.report(DmaDebugKind.SYNC_BAD_OP, f"sync op {op:#x} on {map.desc()}",
                   tag=dmat.desc(), map=map.desc())
    if map.state is not _LOADED:
        dbg.report(DmaDebugKind.SYNC_UNLOADED,
                   f"sync op {op:#x} of a map that is {map.state.value}: {map.desc()}",
                   tag=dmat.desc(), map=map.desc())
        return
    dmat.impl.map_sync(dmat, map, op)
    if dbg.enabled:
        if pre != 0:
            dbg.own(id(map), map.desc, _map_client_ranges(kern, map),
                    read=op & BUS_DMASYNC_PREREAD != 0, write=op & BUS_DMASYNC_PREWRITE != 0)
        if post != 0:
            dbg.release(id(map), read=op & BUS_DMASYNC_POSTREAD != 0,
                        write=op & BUS_DMASYNC_POSTWRITE != 0)

