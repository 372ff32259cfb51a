"""The implementation hook API, used the way the Xen grant-table handlers use it.

``RefImpl`` hands out one "reference" per segment from a small pool (standing
for grant references): it takes them in the load hooks (deferring a sleepable
load that finds too few), writes them in ``map_complete`` (standing for the
grant entries), and gives them back in ``map_unload``. A deferred load is
completed from the taskqueue with ``map_complete`` + ``bus_dmamap_complete_deferred``.
"""

from __future__ import annotations

import errno
from collections import deque
from typing import Any

from gntdma_sys_testlib import Rec

from gntdma.sched import Mutex, Scheduler, mtx_owned
from gntdma.sys import (
    BUS_DMA_NOWAIT,
    BUS_SPACE_MAXADDR,
    BUS_SPACE_UNRESTRICTED,
    M_DEVBUF,
    M_WAITOK,
    PAGE_SHIFT,
    PAGE_SIZE,
    BounceImpl,
    BounceMap,
    BusDmaMap,
    BusDmaTag,
    Kernel,
    bus_dma_segment_t,
    bus_dma_tag_create,
    bus_dma_tag_destroy,
    bus_dmamap_complete_deferred,
    bus_dmamap_create,
    bus_dmamap_destroy,
    bus_dmamap_load,
    bus_dmamap_unload,
    bus_get_dma_tag,
    busdma_lock_mutex,
    taskqueue_drain_all,
)


class RefMap(BounceMap):
    def __init__(self, dmat: BusDmaTag, flags: int) -> None:
        super().__init__(dmat, flags)
        self.refs: list[int] = []
        self.kept_segs: list[bus_dma_segment_t] | None = None


class RefImpl(BounceImpl):
    name = "refs"
    map_class = RefMap

    def __init__(self, kern: Kernel, nrefs: int) -> None:
        super().__init__(kern)
        self.free = list(range(nrefs))
        self.written: dict[int, int] = {}  # ref -> frame
        self.waiting: deque[RefMap] = deque()

    def _take(self, m: RefMap, segs: list[bus_dma_segment_t], flags: int) -> int:
        need = len(segs) - len(m.refs)  # coalescing may add no new segment
        if need > len(self.free):
            if flags & BUS_DMA_NOWAIT:
                return errno.ENOSPC
            m.kept_segs = segs  # the generic layer's list stays valid
            self.waiting.append(m)
            return errno.EINPROGRESS
        m.refs.extend(self.free.pop() for _ in range(need))
        return 0

    def load_buffer(self, dmat: BusDmaTag, map: BusDmaMap, buf: int, buflen: int, flags: int,
                    segs: list[bus_dma_segment_t]) -> int:
        error = super().load_buffer(dmat, map, buf, buflen, flags, segs)
        if error != 0:
            return error
        assert isinstance(map, RefMap)
        return self._take(map, segs, flags)

    def map_complete(self, dmat: BusDmaTag, map: BusDmaMap, segs: list[bus_dma_segment_t],
                     nsegs: int, error: int) -> list[bus_dma_segment_t]:
        segs = super().map_complete(dmat, map, segs, nsegs, error)
        assert isinstance(map, RefMap)
        if error == 0:
            assert len(map.refs) == nsegs
            for ref, seg in zip(map.refs, segs, strict=True):
                self.written[ref] = seg.ds_addr >> PAGE_SHIFT
        return segs

    def map_unload(self, dmat: BusDmaTag, map: BusDmaMap) -> None:
        assert isinstance(map, RefMap)
        for ref in map.refs:
            self.written.pop(ref, None)
            self.free.append(ref)
        map.refs = []
        map.kept_segs = None
        if map in self.waiting:
            self.waiting.remove(map)  # cancel a deferred load
        super().map_unload(dmat, map)
        if self.waiting:
            self.kern.enqueue_swi(self._retry)

    def _retry(self) -> None:
        while self.waiting:
            m = self.waiting[0]
            segs = m.kept_segs
            assert segs is not None
            if len(segs) - len(m.refs) > len(self.free):
                return
            self.waiting.popleft()
            assert self._take(m, segs, BUS_DMA_NOWAIT) == 0
            m.kept_segs = None
            segs = self.map_complete(m.dmat, m, segs, len(segs), 0)
            bus_dmamap_complete_deferred(m.dmat, m, segs, 0)


def _setup(kern: Kernel, nrefs: int) -> tuple[RefImpl, BusDmaTag, Mutex]:
    impl = RefImpl(kern, nrefs)
    mtx = Mutex("xbd_io")
    error, tag = bus_dma_tag_create(bus_get_dma_tag(kern), 1, PAGE_SIZE, BUS_SPACE_MAXADDR,
                                    BUS_SPACE_MAXADDR, 8 * PAGE_SIZE, BUS_SPACE_UNRESTRICTED,
                                    PAGE_SIZE, 0, busdma_lock_mutex, mtx, impl=impl)
    assert error == 0 and tag is not None and tag.impl is impl
    error, child = bus_dma_tag_create(tag, 512, 0, BUS_SPACE_MAXADDR, BUS_SPACE_MAXADDR,
                                      8 * PAGE_SIZE, 8, PAGE_SIZE, 0, busdma_lock_mutex, mtx)
    assert error == 0 and child is not None and child.impl is impl  # inherited
    assert child.boundary == PAGE_SIZE
    return impl, child, mtx


def _map(tag: BusDmaTag) -> RefMap:
    error, map = bus_dmamap_create(tag, 0)
    assert error == 0 and isinstance(map, RefMap)
    return map


def test_refs_written_at_completion_and_returned_at_unload(vsched: Scheduler,
                                                           kern: Kernel) -> None:
    impl, tag, mtx = _setup(kern, 3)
    a, b = _map(tag), _map(tag)
    va = kern.malloc(3 * PAGE_SIZE, M_DEVBUF, M_WAITOK)
    cb = Rec()
    assert bus_dmamap_load(tag, a, va, 3 * PAGE_SIZE, cb, "a", 0) == 0
    segs = cb.last[1]
    assert len(a.refs) == len(segs) == 3
    assert [impl.written[r] for r in a.refs] == [s.ds_addr >> PAGE_SHIFT for s in segs]
    # too few refs: a sleepable load defers, a NOWAIT one fails through the callback
    assert bus_dmamap_load(tag, b, va, PAGE_SIZE, cb, "nw", BUS_DMA_NOWAIT) == 0
    assert cb.last == ("nw", [], 0, errno.ENOSPC)
    seen: list[bool] = []

    def deferred_cb(arg: Any, s: list[bus_dma_segment_t], n: int, error: int) -> None:
        seen.append(mtx_owned(mtx))
        cb(arg, s, n, error)

    assert bus_dmamap_load(tag, b, va + PAGE_SIZE, PAGE_SIZE, deferred_cb, "b", 0) \
        == errno.EINPROGRESS
    assert kern.statistics().dma_deferred_pending == 1
    bus_dmamap_unload(tag, a)
    assert impl.written == {}
    taskqueue_drain_all(kern.taskqueue_swi)
    assert [c[0] for c in cb.calls] == ["a", "nw", "b"] and cb.last[3] == 0
    assert seen == [True]
    assert impl.written == {b.refs[0]: kern.pmap_kextract(va + PAGE_SIZE) >> PAGE_SHIFT}
    bus_dmamap_unload(tag, b)
    assert sorted(impl.free) == [0, 1, 2] and impl.written == {}
    for m in (a, b):
        assert bus_dmamap_destroy(tag, m) == 0
    parent = tag.parent
    assert bus_dma_tag_destroy(tag) == 0
    assert parent is not None and bus_dma_tag_destroy(parent) == 0
    kern.free(va, M_DEVBUF)
    kern.assert_no_leaks()


def test_unload_cancels_a_deferred_impl_load(vsched: Scheduler, kern: Kernel) -> None:
    impl, tag, _ = _setup(kern, 1)
    a, b = _map(tag), _map(tag)
    va = kern.malloc(2 * PAGE_SIZE, M_DEVBUF, M_WAITOK)
    cb = Rec()
    assert bus_dmamap_load(tag, a, va, PAGE_SIZE, cb, "a", 0) == 0
    assert bus_dmamap_load(tag, b, va + PAGE_SIZE, PAGE_SIZE, cb, "b", 0) == errno.EINPROGRESS
    bus_dmamap_unload(tag, b)  # cancelled: no callback, nothing queued
    bus_dmamap_unload(tag, a)
    taskqueue_drain_all(kern.taskqueue_swi)
    assert [c[0] for c in cb.calls] == ["a"] and impl.free == [0]
    assert kern.statistics().dma_deferred_pending == 0
    kern.free(va, M_DEVBUF)
