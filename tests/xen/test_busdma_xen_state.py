"""Hypothesis state machine: busdma_xen against a model of the bus_dma contract.

One guest (with memory above 4 GiB or not) on a grant table of 1 to 3 frames, most
of which the test holds to make references short; driver tags with random
constraints (nsegments, maxsize, alignment 1/512/4096, lowaddr full or 32-bit),
granting to dom0 or to a backend domain; plain, prealloc and ``bus_dmamem_alloc``
maps. Rules load random buffers (kernel memory at random offsets, mbuf chains
through ``load_mbuf_sg``/``load_mbuf``, unmapped bios, page arrays), NOWAIT or
sleepable, read-only or not, unload at any moment (a load still deferred
included), give held references back or take more, let a backend keep a grant
mapped, and let the kernel threads run.

The model checks, after every step:
- the return contract (0 / EINPROGRESS only when sleepable / ENOMEM only with
  NOWAIT / EINVAL for an oversize load or a busy map) and that each deferral and
  each shortage is justified;
- every completed load: segments obey the tag and cover the buffer exactly, in
  order (a segment is the buffer's own memory or a bounce page for a chunk that
  had to bounce); each reference grants its segment's frame to the tag's backend
  with the load's read-only flag; the backend, mapping each reference through the
  hypervisor, reads exactly the buffer's bytes (after PREWRITE) and cannot map a
  read-only one writable, and the other domain cannot map it at all;
- the client callback runs exactly once per load (never for a load unloaded while
  deferred), under the driver lock, on taskqueue_swi when deferred;
- no deferred load waits while what it waits for is there (references, or bounce
  pages);
- after an unload no entry of that load is still granted (unless the backend
  still maps it: then it is reported and reclaimed when the backend lets go);
- every grant reference is accounted for; DMA-API debug reports are exactly the
  expected ones; at the end nothing is left (``host.leaks() == []``), no report,
  no WITNESS report.
"""

from __future__ import annotations

import errno
import random
from dataclasses import dataclass, field
from typing import Any

from busdma_helpers import (
    PAGE,
    free_pages,
    page_array,
    peer_map,
    peer_read,
    peer_unmap,
    settle,
    xen_impl,
)
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from gntdma.abi.grant_table import GNTST_okay, GTF_permit_access, GTF_readonly
from gntdma.sched import WITNESS, Mutex, mtx_lock, mtx_unlock
from gntdma.sys import (
    BIO_UNMAPPED,
    BIO_WRITE,
    BUS_DMA_NOWAIT,
    BUS_DMA_WAITOK,
    BUS_DMASYNC_POSTWRITE,
    BUS_DMASYNC_PREWRITE,
    BUS_SPACE_MAXADDR,
    BUS_SPACE_MAXADDR_32BIT,
    M_DEVBUF,
    M_LEADINGSPACE,
    M_PKTHDR,
    M_TRAILINGSPACE,
    M_WAITOK,
    MCLBYTES,
    MJUMPAGESIZE,
    MT_DATA,
    BusDmaMap,
    BusDmaTag,
    DmaDebugKind,
    MapState,
    bio,
    bounce_impl,
    bus_dma_segment_t,
    bus_dma_tag_create,
    bus_dma_tag_destroy,
    bus_dmamap_create,
    bus_dmamap_destroy,
    bus_dmamap_load,
    bus_dmamap_load_bio,
    bus_dmamap_load_ma,
    bus_dmamap_load_mbuf,
    bus_dmamap_load_mbuf_sg,
    bus_dmamap_sync,
    bus_dmamap_unload,
    bus_dmamem_alloc,
    bus_dmamem_free,
    busdma_lock_mutex,
    m_append,
    m_freem,
    m_gethdr,
    m_getjcl,
)
from gntdma.toolstack.host import Guest, Host
from gntdma.xen.busdma import (
    BUS_DMA_XEN_DOMID_SHIFT,
    BUS_DMA_XEN_PREALLOC_REFS,
    BUS_DMA_XEN_RO,
    xen_dmamap_get_grefs,
    xen_get_dma_tag,
)

GREFS_PER_FRAME = 512


@dataclass
class TagModel:
    tag: BusDmaTag
    lock: Mutex
    nsegments: int
    maxsize: int
    alignment: int
    lowaddr: int
    peer: Guest
    other: Guest


@dataclass
class LoadModel:
    """One load attempt that was accepted (not refused as invalid)."""

    ident: int
    data: bytes
    pieces: list[tuple[int, int]]  # the buffer's physical (pa, len) pieces, in order
    ro: bool
    nowait: bool
    free: Any  # frees the buffer, once the load is over
    calls: list[tuple[list[bus_dma_segment_t], int, int, str, bool]] = field(
        default_factory=list)
    state: str = "pending"  # pending, loaded, failed, cancelled, unloaded
    refs: list[int] = field(default_factory=list)
    callback: bool = True  # False for load_mbuf_sg
    bounced: bool = False  # deferred by the bounce layer


@dataclass
class MapModel:
    tm: TagModel
    map: BusDmaMap
    kind: str  # plain, prealloc, dmamem
    va: int = 0  # dmamem
    load: LoadModel | None = None
    last_unload: bool = False
    pins: dict[int, int] = field(default_factory=dict)  # ref -> backend handle


#: True one time in four
rarely = st.integers(0, 3).map(lambda x: x == 0)

tag_specs = st.tuples(
    st.integers(1, 12),  # nsegments
    st.integers(1, 8),  # maxsize in pages
    st.sampled_from([1, 512, 4096]),  # alignment
    st.booleans(),  # 32-bit lowaddr
    st.booleans(),  # backend domain (else dom0)
)


class BusDmaXenMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        WITNESS.reset()
        self.host = Host()
        self.tags: list[TagModel] = []
        self.maps: list[MapModel] = []
        self.loads: list[LoadModel] = []
        self.held: list[int] = []
        self.expected: list[DmaDebugKind] = []
        self.reclaiming: dict[int, int] = {}  # pinned ref unloaded -> backend handle
        self.pin_peers: dict[int, Guest] = {}  # reclaiming ref -> the backend mapping it
        self.ids = 0

    # -- setup ----------------------------------------------------------------------

    @initialize(frames=st.integers(1, 3), high=st.booleans(), small_bounce=st.booleans(),
                specs=st.lists(tag_specs, min_size=1, max_size=3),
                prealloc=st.lists(rarely, min_size=6, max_size=6),
                dmamem=st.booleans(), leave=st.integers(0, 6))
    def setup(self, frames: int, high: bool, small_bounce: bool,
              specs: list[tuple[int, int, int, bool, bool]], prealloc: list[bool],
              dmamem: bool, leave: int) -> None:
        host = self.host
        self.backend = host.create_guest("backend", memory_mb=4)
        self.g = host.create_guest("g", memory_mb=8, high_memory_mb=8 if high else 0,
                                   max_grant_frames=frames)
        self.k = self.g.kernel
        self.gt = self.g.gnttab
        if small_bounce:
            # Enough for any one load (its pages + 1), so a deferral always ends.
            self.k.bounce_max_pages = max(s[1] for s in specs) + 1 + frames
        root = xen_get_dma_tag(self.k)
        for i, (nseg, pages, align, low32, to_backend) in enumerate(specs):
            peer, other = ((self.backend, host.dom0) if to_backend
                           else (host.dom0, self.backend))
            lock = Mutex(f"drv{i}")
            lowaddr = BUS_SPACE_MAXADDR_32BIT if low32 else BUS_SPACE_MAXADDR
            error, tag = bus_dma_tag_create(
                root, align, PAGE, lowaddr, BUS_SPACE_MAXADDR, pages * PAGE, nseg, PAGE,
                peer.domid << BUS_DMA_XEN_DOMID_SHIFT, busdma_lock_mutex, lock)
            assert error == 0 and tag is not None
            assert tag.boundary == PAGE and tag.maxsegsz == PAGE
            tm = TagModel(tag, lock, nseg, pages * PAGE, align, tag.lowaddr, peer, other)
            self.tags.append(tm)
            for j in range(2):
                self._create_map(tm, prealloc[2 * i + j])
        if dmamem:
            tm = self.tags[0]
            error, va, m = bus_dmamem_alloc(tm.tag, BUS_DMA_NOWAIT)
            if tm.nsegments * PAGE < tm.maxsize:  # one contiguous run, across page lines
                assert error == errno.ENOMEM and m is None
            else:
                assert error == 0 and m is not None
                self.maps.append(MapModel(tm, m, "dmamem", va))
        self._hold(self.gt.free_count + self._growable() - leave)

    def teardown(self) -> None:
        try:
            if not self.tags:
                return
            for ref, handle in list(self.reclaiming.items()):
                peer_unmap(self.pin_peers[ref], handle)
            self.reclaiming.clear()
            for mm in self.maps:
                for handle in mm.pins.values():
                    peer_unmap(mm.tm.peer, handle)
                mm.pins.clear()
                self._unload(mm)
            self._step_end()
            for mm in self.maps:
                if mm.kind == "dmamem":
                    bus_dmamem_free(mm.tm.tag, mm.va, mm.map)
                else:
                    assert bus_dmamap_destroy(mm.tm.tag, mm.map) == 0
            for tm in self.tags:
                assert bus_dma_tag_destroy(tm.tag) == 0
            for ref in self.held:
                self.gt.gnttab_free_grant_reference(ref)
            self.held.clear()
            self.host.sched.run(until=lambda: self.gt.statistics().reclaim_pending == 0)
            settle(self.host)
            self.callbacks_run_once()
            assert self.host.leaks() == []
            assert self.k.dma_debug.reports() == []
            assert self.gt.reports == []
            assert WITNESS.reports == [], [r.format() for r in WITNESS.reports]
        finally:
            self.host.close()
            WITNESS.reset()

    # -- helpers ----------------------------------------------------------------------

    def _growable(self) -> int:
        return max(0, self.gt.max_frames - self.gt.nr_frames) * GREFS_PER_FRAME

    def _available(self) -> int:
        # References kept for a starving load are not available to the others.
        return self.gt.free_count - self.gt.kept + self._growable()

    def _hold(self, n: int) -> None:
        while n > 0:
            error, head = self.gt.gnttab_alloc_grant_references(min(n, 64))
            assert error == 0
            for _ in range(min(n, 64)):
                self.held.append(self.gt.gnttab_claim_grant_reference(head))
            n -= 64

    def _create_map(self, tm: TagModel, prealloc: bool) -> None:
        avail = self._available()
        error, m = bus_dmamap_create(tm.tag, BUS_DMA_XEN_PREALLOC_REFS if prealloc else 0)
        if prealloc and tm.nsegments > avail:
            assert error == errno.ENOSPC and m is None
            return
        assert error == 0 and m is not None
        if prealloc:
            assert len(m.refs) == tm.nsegments  # type: ignore[attr-defined]
        self.maps.append(MapModel(tm, m, "prealloc" if prealloc else "plain"))

    def _pick(self, i: int) -> MapModel:
        return self.maps[i % len(self.maps)]

    def _pick_idle(self, i: int, busy: int, dmamem: bool = True) -> MapModel | None:
        """Mostly a map with no load, unloading one if need be, as a driver reusing a
        map does (busy == 0: any map, to try loading a busy one). ``dmamem``: whether
        a ``bus_dmamem_alloc`` map will do (it only loads its own memory)."""
        maps = [mm for mm in self.maps if dmamem or mm.kind != "dmamem"]
        if not maps:
            return None
        if busy == 0:
            return maps[i % len(maps)]
        idle = [mm for mm in maps if mm.load is None]
        if idle:
            return idle[i % len(idle)]
        mm = maps[i % len(maps)]
        self._unload(mm)
        return mm

    def _pick_loaded(self, i: int, idle: int) -> MapModel:
        """Mostly a map with a load, done or pending (idle == 0: any map)."""
        busy = [mm for mm in self.maps if mm.load is not None]
        return busy[i % len(busy)] if busy and idle != 0 else self._pick(i)

    def _recorder(self, ld: LoadModel, lock: Mutex) -> Any:
        def cb(_arg: Any, segs: list[bus_dma_segment_t], nseg: int, error: int) -> None:
            t = self.host.sched.curthread
            ld.calls.append((list(segs), nseg, error, t.name, lock.owner is t))
        return cb

    def _va_pieces(self, va: int, n: int) -> list[tuple[int, int]]:
        out = []
        while n > 0:
            ln = min(n, PAGE - (va & (PAGE - 1)))
            out.append((self.k.pmap_kextract(va), ln))
            va += ln
            n -= ln
        return out

    def _new_load(self, data: bytes, pieces: list[tuple[int, int]], ro: bool, nowait: bool,
                  free: Any) -> LoadModel:
        self.ids += 1
        ld = LoadModel(self.ids, data, pieces, ro, nowait, free)
        self.loads.append(ld)
        return ld

    def _busy_load(self, mm: MapModel, rv: int, ld: LoadModel) -> None:
        """A load attempt on a map that is loaded or has a load pending."""
        assert rv == errno.EINVAL
        if ld.callback:
            assert [c[2] for c in ld.calls] == [errno.EINVAL]
        ld.state = "refused"
        ld.free()
        self.expected.append(DmaDebugKind.LOAD_LOADED_MAP)

    def _after_load(self, mm: MapModel, ld: LoadModel, rv: int, total: int,
                    returns_error: bool = False) -> None:
        """Check a load's outcome against the contract; ``rv`` as the loader returned it
        (the mbuf loaders return the error itself, the others 0 but for ENOMEM)."""
        tm, m = mm.tm, mm.map
        if mm.load is not None:
            self._busy_load(mm, rv, ld)
            return
        mm.last_unload = False
        if total > tm.maxsize:
            assert rv == errno.EINVAL and m.state is MapState.IDLE
            if ld.callback:
                assert [c[2] for c in ld.calls] == [errno.EINVAL]
            ld.state = "refused"
            ld.free()
            return
        if rv == errno.EINPROGRESS:
            assert not ld.nowait and ld.calls == [] and m.state is MapState.LOADING
            xm: Any = m
            if xm.grant_wait:
                need = len(xm.pending_segs) - len(xm.refs)
                assert need > self._available(), (need, self._available())
                event("load deferred: grant references short")
            else:
                assert xm.bounce_waiting  # deferred by the bounce layer
                event("load deferred: bounce pages short")
                ld.bounced = True
            ld.state = "pending"
            mm.load = ld
            return
        if ld.callback:
            assert len(ld.calls) == 1, ld.calls
            _, _, error, _, locked = ld.calls[0]
            assert locked  # the driver holds its lock around the load
        else:
            error = rv
        if error == 0:
            assert rv == 0
            ld.state = "loaded"
            mm.load = ld
            self._verify(mm, ld)
            return
        assert m.state is MapState.IDLE
        event(f"load failed: {errno.errorcode[error]}")
        ld.state = "failed"
        ld.free()
        xm = m
        if mm.kind != "prealloc":
            assert xm.refs == []
        if error == errno.EFBIG:
            assert rv == (errno.EFBIG if returns_error else 0)
            assert len(ld.pieces) > tm.nsegments  # else it fitted
        elif error == errno.ENOMEM:
            assert ld.nowait and rv == errno.ENOMEM
            # refs short, or bounce pages short (a tag that can bounce)
            assert len(ld.pieces) > self._available() or xm.dmat.bounce_flags & 1
        else:
            raise AssertionError(f"unexpected error {error} (rv {rv})")

    def _verify(self, mm: MapModel, ld: LoadModel) -> None:
        """A loaded map: segments, grants, what the backend reads."""
        tm, m = mm.tm, mm.map
        segs = list(m.dm_segs)
        if ld.callback:
            ((csegs, nseg, error, _, _),) = ld.calls
            assert error == 0 and csegs == segs and nseg == len(segs)
        assert 1 <= len(segs) <= tm.nsegments
        # Segments obey the tag and cover the buffer exactly, in order.
        bpages = {bp.busaddr for bp in m.bpages}  # type: ignore[attr-defined]
        cursor = 0
        for s in segs:
            assert 0 < s.ds_len <= PAGE and (s.ds_addr & (PAGE - 1)) + s.ds_len <= PAGE
            assert s.ds_addr % tm.alignment == 0 and s.ds_addr + s.ds_len - 1 <= tm.lowaddr
            pa = self._pa_at(ld.pieces, cursor)
            if s.ds_addr & ~(PAGE - 1) in bpages:
                # a bounce page, for a chunk that had to bounce
                assert pa > tm.lowaddr or pa % tm.alignment != 0
            else:
                self._check_run(ld.pieces, cursor, s)
            cursor += s.ds_len
        assert cursor == len(ld.data)
        # References: one per segment, each granting its frame to the backend.
        refs = xen_dmamap_get_grefs(m)
        assert len(refs) == len(segs) and len(set(refs)) == len(refs)
        if mm.kind != "prealloc":
            assert len(m.refs) == len(segs)  # type: ignore[attr-defined]
        bus_dmamap_sync(tm.tag, m, BUS_DMASYNC_PREWRITE)
        got = []
        want = GTF_permit_access | (GTF_readonly if ld.ro else 0)
        for ref, s in zip(refs, segs, strict=True):
            assert self.gt.entry(ref) == (want, tm.peer.domid, s.ds_addr >> 12)
            status, chunk = peer_read(tm.peer, self.g, ref, s, writable=not ld.ro)
            assert status == GNTST_okay
            got.append(chunk)
            if ld.ro:
                assert peer_map(tm.peer, self.g, ref, writable=True)[0] != GNTST_okay
            assert peer_map(tm.other, self.g, ref, writable=False)[0] != GNTST_okay
        assert b"".join(got) == ld.data
        bus_dmamap_sync(tm.tag, m, BUS_DMASYNC_POSTWRITE)
        ld.refs = refs
        event("load verified" + (", read-only" if ld.ro else "")
              + (", bounced" if bpages else "") + (f", {mm.kind} map"))

    @staticmethod
    def _pa_at(pieces: list[tuple[int, int]], off: int) -> int:
        for pa, ln in pieces:
            if off < ln:
                return pa + off
            off -= ln
        raise AssertionError("offset past the buffer")

    def _check_run(self, pieces: list[tuple[int, int]], off: int,
                   s: bus_dma_segment_t) -> None:
        """The buffer's bytes [off, off+len) are physically at [ds_addr, ds_addr+len)."""
        done = 0
        while done < s.ds_len:
            assert self._pa_at(pieces, off + done) == s.ds_addr + done, (off, s)
            rem = off + done
            for _, ln in pieces:  # the rest of the piece holding offset off+done
                if rem < ln:
                    break
                rem -= ln
            done += ln - rem

    def _lock(self, tm: TagModel) -> None:
        mtx_lock(tm.lock)

    def _unlock(self, tm: TagModel) -> None:
        mtx_unlock(tm.lock)

    def _unload(self, mm: MapModel) -> None:
        tm, m = mm.tm, mm.map
        ld = mm.load
        self._lock(tm)
        bus_dmamap_unload(tm.tag, m)
        self._unlock(tm)
        assert m.state is MapState.IDLE and xen_dmamap_get_grefs(m) == []
        if ld is None:  # never loaded, or the last load failed: only a repeat is reported
            if mm.last_unload:
                self.expected.append(DmaDebugKind.DOUBLE_UNLOAD)
            return
        mm.last_unload = True
        mm.load = None
        if ld.state == "pending":
            ld.state = "cancelled"
            event("unload of a deferred load")
        else:
            ld.state = "unloaded"
            busy = [r for r in ld.refs if r in mm.pins]
            for r in ld.refs:
                if r in mm.pins:
                    continue
                assert self.gt.entry(r)[0] & GTF_permit_access == 0  # access ended
            if busy:
                event("unload with a grant still mapped by the backend")
                self.expected.append(DmaDebugKind.STILL_MAPPED_AT_UNLOAD)
                for r in busy:
                    self.reclaiming[r] = mm.pins.pop(r)
                    self.pin_peers[r] = tm.peer
                    assert r not in m.refs  # type: ignore[attr-defined]
        if mm.kind != "prealloc":
            assert m.refs == []  # type: ignore[attr-defined]
        ld.free()

    def _step_end(self) -> None:
        """Let deferred work run, then check completions and the invariants."""
        settle(self.host)
        for mm in self.maps:
            ld = mm.load
            if ld is None or ld.state != "pending" or not ld.calls:
                continue
            assert len(ld.calls) == 1
            _, _, error, thread, locked = ld.calls[0]
            assert thread == f"{self.g.name}/swi" and locked  # taskqueue_swi, lockfunc
            event("deferred load completed" + (" after a bounce replay" if ld.bounced
                                               else ""))
            if error == 0:
                ld.state = "loaded"
                assert mm.map.state is MapState.LOADED
                self._verify(mm, ld)
            else:
                assert error == errno.EFBIG and len(ld.pieces) > mm.tm.nsegments
                assert mm.map.state is MapState.IDLE
                ld.state = "failed"
                mm.load = None
                ld.free()
        kinds = [r.kind for r in self.k.dma_debug.reports()]
        assert sorted(kinds, key=str) == sorted(self.expected, key=str), (kinds, self.expected)
        self.k.dma_debug.reset()
        self.expected.clear()
        self.gt.reports.clear()  # "still in use, reclaim deferred" for pinned refs

    # -- rules: loads ---------------------------------------------------------------------

    def _flags(self, nowait: bool, ro: bool) -> int:
        return (BUS_DMA_NOWAIT if nowait else BUS_DMA_WAITOK) | (BUS_DMA_XEN_RO if ro else 0)

    def _size(self, tm: TagModel, size: int) -> int:
        """Up to what the segments can hold, or ~4% over maxsize (EINVAL)."""
        return max(1, min(tm.maxsize, tm.nsegments * PAGE) * size // 96)

    @rule(i=st.integers(0, 63), busy=st.integers(0, 9), size=st.integers(1, 100),
          offset=st.integers(0, PAGE - 1), nowait=rarely, ro=st.booleans(),
          seed=st.integers(0, 2**32))
    def load_kbuf(self, i: int, busy: int, size: int, offset: int, nowait: bool, ro: bool,
                  seed: int) -> None:
        mm = self._pick_idle(i, busy)
        assert mm is not None
        tm = mm.tm
        if mm.kind == "dmamem":
            n = min(self._size(tm, size), tm.maxsize)
            data = random.Random(seed).randbytes(n)
            if mm.load is None:
                self.k.kva_write(mm.va, data)
            va = mm.va
            ld = self._new_load(data, self._va_pieces(va, n), ro, nowait, lambda: None)
        else:
            n = self._size(tm, size)
            data = random.Random(seed).randbytes(n)
            base = self.k.malloc(offset + n, M_DEVBUF, M_WAITOK)
            va = base + offset
            self.k.kva_write(va, data)
            ld = self._new_load(data, self._va_pieces(va, n), ro, nowait,
                                lambda: self.k.free(base, M_DEVBUF))
        self._lock(tm)
        rv = bus_dmamap_load(tm.tag, mm.map, va, n, self._recorder(ld, tm.lock), None,
                             self._flags(nowait, ro))
        self._unlock(tm)
        self._after_load(mm, ld, rv, n)
        self._step_end()

    @rule(i=st.integers(0, 63), busy=st.integers(0, 9), size=st.integers(1, 100),
          cluster=st.sampled_from([0, MCLBYTES, MJUMPAGESIZE]), lead=st.integers(0, 1500),
          sg=st.booleans(), ro=st.booleans(), seed=st.integers(0, 2**32))
    def load_mbuf(self, i: int, busy: int, size: int, cluster: int, lead: int, sg: bool,
                  ro: bool, seed: int) -> None:
        mm = self._pick_idle(i, busy, dmamem=False)
        if mm is None:
            self._step_end()
            return
        tm = mm.tm
        n = self._size(tm, size)
        data = random.Random(seed).randbytes(n)
        m0 = (m_gethdr(self.k, M_WAITOK, MT_DATA) if cluster == 0
              else m_getjcl(self.k, M_WAITOK, MT_DATA, M_PKTHDR, cluster))
        assert m0 is not None
        if cluster != 0:
            m0.m_data += min(lead, M_TRAILINGSPACE(m0) - 1)
            assert M_LEADINGSPACE(m0) >= 0
        assert m_append(m0, n, data) == 1 and m0.m_pkthdr.len == n
        pieces = [p for x in m0 if x.m_len > 0 for p in self._va_pieces(x.m_data, x.m_len)]
        ld = self._new_load(data, pieces, ro, True, lambda: m_freem(m0))
        flags = BUS_DMA_XEN_RO if ro else 0
        self._lock(tm)
        if sg:
            ld.callback = False
            error, segs, nsegs = bus_dmamap_load_mbuf_sg(tm.tag, mm.map, m0, flags)
            if error == 0:
                assert nsegs == len(segs) and segs == mm.map.dm_segs
            else:
                assert (segs, nsegs) == ([], 0)
            rv = error
        else:
            rec = self._recorder(ld, tm.lock)
            sizes: list[int] = []

            def cb2(arg: Any, segs: list[bus_dma_segment_t], nseg: int, mapsize: int,
                    error: int) -> None:
                sizes.append(mapsize)
                rec(arg, segs, nseg, error)

            rv = bus_dmamap_load_mbuf(tm.tag, mm.map, m0, cb2, None, flags)
            assert sizes == [n if ld.calls[0][2] == 0 else 0]
            assert rv == ld.calls[0][2]
        self._unlock(tm)
        self._after_load(mm, ld, rv, n, returns_error=True)
        self._step_end()

    @rule(i=st.integers(0, 63), busy=st.integers(0, 9), size=st.integers(1, 100),
          offset=st.integers(0, PAGE - 1), nowait=rarely, ro=st.booleans(),
          use_bio=st.booleans(), seed=st.integers(0, 2**32))
    def load_pages(self, i: int, busy: int, size: int, offset: int, nowait: bool, ro: bool,
                   use_bio: bool, seed: int) -> None:
        mm = self._pick_idle(i, busy, dmamem=False)
        if mm is None:
            self._step_end()
            return
        tm = mm.tm
        n = self._size(tm, size)
        data = random.Random(seed).randbytes(n)
        pfns = page_array(self.k, data, offset)
        pieces = []
        pos, off = 0, offset
        for pfn in pfns:
            ln = min(n - pos, PAGE - off)
            pieces.append(((pfn << 12) + off, ln))
            pos += ln
            off = 0
        ld = self._new_load(data, pieces, ro, nowait, lambda: free_pages(self.k, pfns))
        cb = self._recorder(ld, tm.lock)
        self._lock(tm)
        if use_bio:
            bp = bio(bio_cmd=BIO_WRITE, bio_flags=BIO_UNMAPPED, bio_bcount=n, bio_ma=pfns,
                     bio_ma_offset=offset, bio_ma_n=len(pfns))
            rv = bus_dmamap_load_bio(tm.tag, mm.map, bp, cb, None, self._flags(nowait, ro))
        else:
            rv = bus_dmamap_load_ma(tm.tag, mm.map, pfns, n, offset, cb, None,
                                    self._flags(nowait, ro))
        self._unlock(tm)
        self._after_load(mm, ld, rv, n)
        self._step_end()

    # -- rules: unload, maps, references, the backend ----------------------------------------

    @rule(i=st.integers(0, 63), idle=st.integers(0, 9))
    def unload(self, i: int, idle: int) -> None:
        self._unload(self._pick_loaded(i, idle))
        self._step_end()

    @rule(i=st.integers(0, 63), prealloc=rarely)
    def create_map(self, i: int, prealloc: bool) -> None:
        if len(self.maps) < 10:
            self._create_map(self.tags[i % len(self.tags)], prealloc)
        self._step_end()

    @rule(i=st.integers(0, 63))
    def destroy_map(self, i: int) -> None:
        mm = self._pick(i)
        if mm.kind == "dmamem" or len(self.maps) <= 1:
            return
        tm = mm.tm
        prealloc_refs = len(mm.map.refs) if mm.kind == "prealloc" else 0  # type: ignore
        free = self.gt.free_count
        error = bus_dmamap_destroy(tm.tag, mm.map)
        if mm.load is not None:
            assert error == errno.EBUSY
            self.expected.append(DmaDebugKind.DESTROY_LOADED_MAP)
        else:
            assert error == 0
            assert self.gt.free_count == free + prealloc_refs
            self.maps.remove(mm)
        self._step_end()

    @rule(n=st.integers(1, 8))
    def free_held(self, n: int) -> None:
        for _ in range(min(n, len(self.held))):
            self.gt.gnttab_free_grant_reference(self.held.pop())
        self._step_end()

    @rule(n=st.integers(1, 8))
    def hold_more(self, n: int) -> None:
        self._hold(min(n, self._available()))
        self._step_end()

    @rule(i=st.integers(0, 63), j=st.integers(0, 15))
    def backend_pins(self, i: int, j: int) -> None:
        """The backend maps one reference of a loaded map and keeps it mapped."""
        mm = self._pick(i)
        ld = mm.load
        if ld is None or ld.state != "loaded" or len(mm.pins) >= 2:
            return
        ref = ld.refs[j % len(ld.refs)]
        if ref in mm.pins:
            return
        status, handle = peer_map(mm.tm.peer, self.g, ref, writable=not ld.ro)
        assert status == GNTST_okay
        mm.pins[ref] = handle
        self._step_end()

    @rule(i=st.integers(0, 63))
    def backend_unpins(self, i: int) -> None:
        pins = [(ref, h, mm) for mm in self.maps for ref, h in mm.pins.items()]
        if self.reclaiming:
            ref = sorted(self.reclaiming)[i % len(self.reclaiming)]
            peer_unmap(self.pin_peers.pop(ref), self.reclaiming.pop(ref))
            # The grant table reclaims it once it can end access (a timer, then swi).
            self.host.sched.run(until=lambda: ref not in self.gt.reclaim)
            # Access ended; the reference was freed (and may serve a load already).
            in_use = {r for mm in self.maps for r in xen_dmamap_get_grefs(mm.map)}
            assert self.gt.entry(ref)[0] == 0 or ref in in_use
        elif pins:
            ref, handle, mm = pins[i % len(pins)]
            peer_unmap(mm.tm.peer, handle)
            del mm.pins[ref]
        self._step_end()

    @rule()
    def run_threads(self) -> None:
        self._step_end()

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def callbacks_run_once(self) -> None:
        """Exactly once per load with a callback; never while pending, nor if cancelled."""
        for ld in self.loads:
            want = 0 if ld.state in ("pending", "cancelled") or not ld.callback else 1
            assert len(ld.calls) == want, (ld.ident, ld.state, ld.calls)

    @invariant()
    def nothing_waits_for_what_is_there(self) -> None:
        if not self.tags:
            return
        for mm in self.maps:
            xm: Any = mm.map
            if mm.load is None or mm.load.state != "pending":
                continue
            if xm.grant_wait:
                need = len(xm.pending_segs) - len(xm.refs)
                assert need > self._available(), (need, self._available())
            else:
                assert xm.bounce_waiting
        for z in bounce_impl(self.k).zones():
            assert not z.waiting or z.free_bpages == 0

    @invariant()
    def every_reference_is_accounted_for(self) -> None:
        if not self.tags:
            return
        st_ = self.gt.statistics()
        in_maps = sum(len(x.refs) for x in xen_impl(self.g).maps.values())
        assert st_.allocated == len(self.held) + in_maps + st_.reclaim_pending
        loaded = sum(len(mm.load.refs) for mm in self.maps
                     if mm.load is not None and mm.load.state == "loaded")
        assert st_.granted == loaded + len(self.reclaiming)
        for mm in self.maps:
            xm: Any = mm.map
            if mm.kind == "prealloc":
                assert len(xm.refs) <= mm.tm.nsegments
            elif mm.load is None or mm.load.state == "pending":
                assert xm.refs == []

# About 0.1 s per example: 100 examples of up to 40 steps take a few seconds.
BusDmaXenMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=40,
                                              deadline=None)
test_busdma_xen_state_machine = BusDmaXenMachine.TestCase
