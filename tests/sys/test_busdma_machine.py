"""A Hypothesis state machine: loads and unloads of random buffers against a model."""

from __future__ import annotations

import errno
from typing import Any

from gntdma_sys_testlib import check_segments, device_read, device_write
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from gntdma.sched import Mutex, Scheduler, VirtualClock
from gntdma.sys import (
    BUS_DMA_NOWAIT,
    BUS_DMASYNC_POSTREAD,
    BUS_DMASYNC_POSTWRITE,
    BUS_DMASYNC_PREREAD,
    BUS_DMASYNC_PREWRITE,
    BUS_SPACE_MAXADDR,
    BUS_SPACE_MAXADDR_32BIT,
    BUS_SPACE_UNRESTRICTED,
    M_DEVBUF,
    M_WAITOK,
    PAGE_SIZE,
    BounceMap,
    BounceTag,
    BusDmaMap,
    BusDmaTag,
    BytePhysMem,
    DmaDebugKind,
    Kernel,
    bounce_impl,
    bus_dma_segment_t,
    bus_dma_tag_create,
    bus_dma_tag_destroy,
    bus_dmamap_create,
    bus_dmamap_destroy,
    bus_dmamap_load,
    bus_dmamap_sync,
    bus_dmamap_unload,
    bus_get_dma_tag,
    busdma_lock_mutex,
    taskqueue_drain_all,
)

HIGH = 0x100000
NMAPS = 3


class BusDmaMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.sched = Scheduler(clock=VirtualClock()).install()
        self.kern = Kernel("m", BytePhysMem([(0, 160), (HIGH, 160)]), seed=3,
                           bounce_max_pages=8)
        self.mtx = Mutex("drv")
        self.buffers: list[tuple[int, int, bool]] = []  # va, size, high
        self.state: list[str] = ["idle"] * NMAPS
        self.loaded: list[tuple[int, int, list[bus_dma_segment_t]] | None] = [None] * NMAPS
        self.last_unload = [False] * NMAPS
        self.pending: list[int] = []  # maps in deferral order
        self.completed: list[tuple[int, list[bus_dma_segment_t], int]] = []
        self.req: list[tuple[int, int]] = [(0, 0)] * NMAPS
        self.expect_reports: dict[DmaDebugKind, int] = {}
        self.tag: BusDmaTag | None = None
        self.maps: list[BusDmaMap] = []

    @initialize(alignment=st.sampled_from([1, 4, 512]), boundary=st.sampled_from([0, 4096, 8192]),
                maxsegsz=st.sampled_from([512, 4096, 65536]),
                nsegments=st.sampled_from([2, 8, BUS_SPACE_UNRESTRICTED]),
                low32=st.booleans())
    def make_tag(self, alignment: int, boundary: int, maxsegsz: int, nsegments: int,
                 low32: bool) -> None:
        error, tag = bus_dma_tag_create(
            bus_get_dma_tag(self.kern), alignment, boundary,
            BUS_SPACE_MAXADDR_32BIT if low32 else BUS_SPACE_MAXADDR, BUS_SPACE_MAXADDR,
            6 * PAGE_SIZE, nsegments, maxsegsz, 0, busdma_lock_mutex, self.mtx)
        assert error == 0 and tag is not None
        self.tag = tag
        for _ in range(NMAPS):
            error, map = bus_dmamap_create(tag, 0)
            assert error == 0 and map is not None
            self.maps.append(map)

    def _expect(self, kind: DmaDebugKind) -> None:
        self.expect_reports[kind] = self.expect_reports.get(kind, 0) + 1

    @rule(npages=st.integers(1, 6), high=st.booleans(), seed=st.integers(0, 255))
    def alloc_buffer(self, npages: int, high: bool, seed: int) -> None:
        if len(self.buffers) >= 6:
            return
        size = npages * PAGE_SIZE
        if high:
            va = self.kern.kmem_alloc_attr(size, M_WAITOK, HIGH * PAGE_SIZE, (1 << 64) - 1)
        else:
            va = self.kern.malloc(size, M_DEVBUF, M_WAITOK)
        self.kern.kva_write(va, bytes((seed + i * 13) & 0xFF for i in range(size)))
        self.buffers.append((va, size, high))

    def _callback(self, idx: int) -> Any:
        def cb(_arg: Any, segs: list[bus_dma_segment_t], nseg: int, error: int) -> None:
            self.completed.append((idx, segs, error))
        return cb

    def _check_data(self, idx: int, segs: list[bus_dma_segment_t]) -> None:
        va, ln = self.req[idx]
        assert self.tag is not None
        check_segments(self.tag, segs, ln)
        bus_dmamap_sync(self.tag, self.maps[idx], BUS_DMASYNC_PREWRITE)
        assert device_read(self.kern, segs) == self.kern.kva_read(va, ln)
        bus_dmamap_sync(self.tag, self.maps[idx], BUS_DMASYNC_POSTWRITE)

    def _absorb(self) -> None:
        """Apply callbacks that ran to the model."""
        for idx, segs, error in self.completed:
            assert self.state[idx] in ("loading", "pending")
            if self.state[idx] == "pending":
                assert self.pending[0] == idx, "deferred callbacks run in FIFO order"
                self.pending.pop(0)
            event(f"callback error {errno.errorcode.get(error, error)}")
            if error == 0:
                self.state[idx] = "loaded"
                self.loaded[idx] = (*self.req[idx], segs)
                self._check_data(idx, segs)
            else:
                assert error == errno.EFBIG and segs == []
                self.state[idx] = "idle"
        self.completed.clear()

    @precondition(lambda self: self.buffers)
    @rule(idx=st.integers(0, NMAPS - 1), b=st.integers(0, 5), off=st.integers(0, 3 * PAGE_SIZE),
          length=st.integers(0, 7 * PAGE_SIZE), nowait=st.booleans())
    def load(self, idx: int, b: int, off: int, length: int, nowait: bool) -> None:
        assert self.tag is not None
        va, size, _ = self.buffers[b % len(self.buffers)]
        off = min(off, size)
        length = min(length, size - off)
        before = self.state[idx]
        if before == "idle":
            self.state[idx] = "loading"
            self.req[idx] = (va + off, length)
            self.last_unload[idx] = False
        rv = bus_dmamap_load(self.tag, self.maps[idx], va + off, length, self._callback(idx),
                             None, BUS_DMA_NOWAIT if nowait else 0)
        if before != "idle":
            assert rv == errno.EINVAL
            assert self.completed == [(idx, [], errno.EINVAL)]
            self.completed.clear()
            self._expect(DmaDebugKind.LOAD_LOADED_MAP)
            return
        if length > 6 * PAGE_SIZE:
            assert rv == errno.EINVAL and self.completed == [(idx, [], errno.EINVAL)]
            self.completed.clear()
            self.state[idx] = "idle"
            return
        event(f"load returned {errno.errorcode.get(rv, rv)}")
        if rv == errno.EINPROGRESS:
            assert not nowait and self.completed == []
            self.state[idx] = "pending"
            self.pending.append(idx)
            return
        if rv == errno.ENOMEM:
            assert nowait and self.completed == [(idx, [], errno.ENOMEM)]
            self.completed.clear()
            self.state[idx] = "idle"
            return
        assert rv == 0 and len(self.completed) == 1
        self._absorb()

    @rule(idx=st.integers(0, NMAPS - 1))
    def unload(self, idx: int) -> None:
        assert self.tag is not None
        s = self.state[idx]
        if s == "idle" and self.last_unload[idx]:
            self._expect(DmaDebugKind.DOUBLE_UNLOAD)
        if s == "pending":
            self.pending.remove(idx)
        bus_dmamap_unload(self.tag, self.maps[idx])
        if s != "idle":
            self.last_unload[idx] = True
        self.state[idx] = "idle"
        self.loaded[idx] = None

    @rule()
    def run_swi(self) -> None:
        taskqueue_drain_all(self.kern.taskqueue_swi)
        self._absorb()

    @precondition(lambda self: "loaded" in self.state)
    @rule(data=st.data())
    def device_roundtrip(self, data: st.DataObject) -> None:
        assert self.tag is not None
        idx = data.draw(st.sampled_from([i for i, s in enumerate(self.state) if s == "loaded"]))
        rec = self.loaded[idx]
        assert rec is not None
        va, ln, segs = rec
        incoming = data.draw(st.binary(min_size=ln, max_size=ln))
        bus_dmamap_sync(self.tag, self.maps[idx], BUS_DMASYNC_PREREAD)
        device_write(self.kern, segs, incoming)
        bus_dmamap_sync(self.tag, self.maps[idx], BUS_DMASYNC_POSTREAD)
        assert self.kern.kva_read(va, ln) == incoming

    @invariant()
    def counters_match_model(self) -> None:
        if self.tag is None:
            return
        c = self.kern.busdma
        assert c.maps_loaded == self.state.count("loaded")
        assert c.deferred_pending == len(self.pending)
        for z in bounce_impl(self.kern).zones():
            assert z.free_bpages + z.reserved_bpages + z.active_bpages == z.total_bpages
            assert z.free_bpages >= 0 and z.reserved_bpages >= 0
            assert len(z.pages) == z.free_bpages + z.reserved_bpages
        assert isinstance(self.tag, BounceTag)
        reserved = sum(m.pagesreserved for m in self.maps if isinstance(m, BounceMap))
        zone = self.tag.bounce_zone
        if zone is not None:
            assert zone.reserved_bpages == reserved

    def teardown(self) -> None:
        try:
            if self.tag is not None:
                for i, m in enumerate(self.maps):
                    if self.state[i] != "idle":
                        bus_dmamap_unload(self.tag, m)
                    self.state[i] = "idle"
                taskqueue_drain_all(self.kern.taskqueue_swi)
                assert self.completed == []
                for m in self.maps:
                    assert bus_dmamap_destroy(self.tag, m) == 0
                assert bus_dma_tag_destroy(self.tag) == 0
            for va, size, high in self.buffers:
                if high:
                    self.kern.kmem_free(va, size)
                else:
                    self.kern.free(va, M_DEVBUF)
            got: dict[DmaDebugKind, int] = {}
            for r in self.kern.dma_debug.reports():
                got[r.kind] = got.get(r.kind, 0) + 1
            assert got == self.expect_reports
            self.kern.assert_no_leaks()
        finally:
            self.kern.shutdown()
            self.sched.shutdown()
            Scheduler.uninstall()


TestBusDmaMachine = BusDmaMachine.TestCase
TestBusDmaMachine.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
