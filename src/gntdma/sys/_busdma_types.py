"""bus_dma(9) constants, segments, memory descriptors, tags and maps.

Tags and maps are plain classes that an implementation may subclass (its
``tag_class``/``map_class``), the way FreeBSD implementations embed
``struct bus_dma_tag_common`` in their own tag structure.
"""

from __future__ import annotations

import errno
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from gntdma.sched import KernelPanic
from gntdma.sys._bio import BIO_UNMAPPED, bio, uio
from gntdma.sys._mbuf import M_PKTHDR, m_length, mbuf
from gntdma.sys._param import PAGE_MASK, PAGE_SHIFT, PAGE_SIZE, powerof2, trunc_page

if TYPE_CHECKING:
    from gntdma.sys._busdma_impl import BusDmaImpl
    from gntdma.sys._kernel import Kernel
    from gntdma.sys._taskqueue import Task

__all__ = [
    "BUS_DMASYNC_POSTREAD",
    "BUS_DMASYNC_POSTWRITE",
    "BUS_DMASYNC_PREREAD",
    "BUS_DMASYNC_PREWRITE",
    "BUS_DMA_ALLOCNOW",
    "BUS_DMA_BUS1",
    "BUS_DMA_BUS2",
    "BUS_DMA_BUS3",
    "BUS_DMA_BUS4",
    "BUS_DMA_COHERENT",
    "BUS_DMA_KEEP_PG_OFFSET",
    "BUS_DMA_LOAD_MBUF",
    "BUS_DMA_LOCK",
    "BUS_DMA_NOCACHE",
    "BUS_DMA_NOWAIT",
    "BUS_DMA_NOWRITE",
    "BUS_DMA_UNLOCK",
    "BUS_DMA_WAITOK",
    "BUS_DMA_ZERO",
    "BUS_SPACE_MAXADDR",
    "BUS_SPACE_MAXADDR_24BIT",
    "BUS_SPACE_MAXADDR_32BIT",
    "BUS_SPACE_MAXSIZE",
    "BUS_SPACE_MAXSIZE_24BIT",
    "BUS_SPACE_MAXSIZE_32BIT",
    "BUS_SPACE_UNRESTRICTED",
    "MEMDESC_BIO",
    "MEMDESC_MBUF",
    "MEMDESC_PADDR",
    "MEMDESC_PLIST",
    "MEMDESC_UIO",
    "MEMDESC_VADDR",
    "MEMDESC_VLIST",
    "MEMDESC_VMPAGES",
    "BusDmaCallback",
    "BusDmaKernelState",
    "BusDmaCallback2",
    "BusDmaLockFunc",
    "BusDmaMap",
    "BusDmaTag",
    "MapState",
    "bus_dma_segment_t",
    "busdma_lock_mutex",
    "common_bus_dma_tag_create",
    "dflt_lock",
    "kernel_state",
    "ma_pieces",
    "memdesc",
    "memdesc_bio",
    "memdesc_buffers",
    "memdesc_length",
    "memdesc_mbuf",
    "memdesc_paddr",
    "memdesc_plist",
    "memdesc_uio",
    "memdesc_vaddr",
    "memdesc_vlist",
    "memdesc_vmpages",
]

# -- flags (FreeBSD sys/sys/bus_dma.h) --------------------------------------------------

BUS_DMA_WAITOK: Final = 0x00  #: the load may be deferred (EINPROGRESS)
BUS_DMA_NOWAIT: Final = 0x01  #: never defer: ENOMEM instead
BUS_DMA_ALLOCNOW: Final = 0x02  #: tag create: reserve bounce pages for one load now
BUS_DMA_COHERENT: Final = 0x04
BUS_DMA_ZERO: Final = 0x08  #: dmamem_alloc: zero the memory
BUS_DMA_BUS1: Final = 0x10  #: reserved for the implementation
BUS_DMA_BUS2: Final = 0x20
BUS_DMA_BUS3: Final = 0x40
BUS_DMA_BUS4: Final = 0x80
BUS_DMA_NOWRITE: Final = 0x100
BUS_DMA_NOCACHE: Final = 0x200
BUS_DMA_KEEP_PG_OFFSET: Final = 0x400  #: bounce pages keep the buffer's page offset
BUS_DMA_LOAD_MBUF: Final = 0x800  #: set by the mbuf loaders on each fragment

#: bus_dmamap_sync ops. READ is device -> memory.
BUS_DMASYNC_PREREAD: Final = 1
BUS_DMASYNC_POSTREAD: Final = 2
BUS_DMASYNC_PREWRITE: Final = 4
BUS_DMASYNC_POSTWRITE: Final = 8

#: lockfunc ops.
BUS_DMA_LOCK: Final = 0x01
BUS_DMA_UNLOCK: Final = 0x02

#: amd64 bus space limits.
BUS_SPACE_MAXADDR_24BIT: Final = 0xFFFFFF
BUS_SPACE_MAXADDR_32BIT: Final = 0xFFFFFFFF
BUS_SPACE_MAXADDR: Final = 0xFFFFFFFFFFFFFFFF
BUS_SPACE_MAXSIZE_24BIT: Final = 0xFFFFFF
BUS_SPACE_MAXSIZE_32BIT: Final = 0xFFFFFFFF
BUS_SPACE_MAXSIZE: Final = 0xFFFFFFFFFFFFFFFF
#: ``~0``: as nsegments, no limit.
BUS_SPACE_UNRESTRICTED: Final = ~0

# -- segments, callbacks ----------------------------------------------------------------


class bus_dma_segment_t(NamedTuple):
    """One DMA segment: bus (physical) address and length.

    Immutable, with the C field names. A named pair, so that the segments of a
    buffer's (pa, len) pieces are made without a Python call per segment
    (``tuple.__new__(bus_dma_segment_t, piece)``).
    """

    ds_addr: int
    ds_len: int


#: callback(arg, segs, nseg, error)
BusDmaCallback = Callable[[Any, list[bus_dma_segment_t], int, int], None]
#: callback2(arg, segs, nseg, mapsize, error), for mbuf and uio loads
BusDmaCallback2 = Callable[[Any, list[bus_dma_segment_t], int, int, int], None]
#: lockfunc(arg, op) with op BUS_DMA_LOCK or BUS_DMA_UNLOCK
BusDmaLockFunc = Callable[[Any, int], None]


def busdma_lock_mutex(arg: Any, op: int) -> None:
    """The standard lockfunc: ``arg`` is a Mutex."""
    from gntdma.sched import mtx_lock, mtx_unlock

    if op == BUS_DMA_LOCK:
        mtx_lock(arg)
    elif op == BUS_DMA_UNLOCK:
        mtx_unlock(arg)
    else:
        raise KernelPanic(f"Unknown operation {op:#x} for busdma_lock_mutex!")


def dflt_lock(arg: Any, op: int) -> None:
    """Installed when a tag is created without a lockfunc: a deferral then is a bug."""
    raise KernelPanic("driver error: busdma dflt_lock called")


# -- memory descriptors (sys/memdesc.h) -------------------------------------------------

MEMDESC_VADDR: Final = 1
MEMDESC_PADDR: Final = 2
MEMDESC_VLIST: Final = 3
MEMDESC_PLIST: Final = 4
MEMDESC_BIO: Final = 5
MEMDESC_UIO: Final = 6
MEMDESC_MBUF: Final = 7
MEMDESC_VMPAGES: Final = 9


class memdesc(NamedTuple):
    """What a load describes (immutable). Build it with the ``memdesc_*`` functions."""

    md_type: int
    md_vaddr: int = 0
    md_paddr: int = 0
    md_list: tuple[bus_dma_segment_t, ...] = ()
    md_bio: bio | None = None
    md_uio: uio | None = None
    md_mbuf: mbuf | None = None
    md_ma: tuple[int, ...] = ()
    md_offset: int = 0
    md_len: int = 0


_tuple_new = tuple.__new__


def memdesc_vaddr(vaddr: int, length: int) -> memdesc:
    return memdesc(MEMDESC_VADDR, md_vaddr=vaddr, md_len=length)


def memdesc_paddr(paddr: int, length: int) -> memdesc:
    return memdesc(MEMDESC_PADDR, md_paddr=paddr, md_len=length)


def memdesc_vlist(vlist: Sequence[bus_dma_segment_t]) -> memdesc:
    """Kernel virtual buffers (``ds_addr`` is a kernel va)."""
    return memdesc(MEMDESC_VLIST, md_list=tuple(vlist))


def memdesc_plist(plist: Sequence[bus_dma_segment_t]) -> memdesc:
    return memdesc(MEMDESC_PLIST, md_list=tuple(plist))


def memdesc_bio(bp: bio) -> memdesc:
    # memdesc(MEMDESC_BIO, md_bio=bp), built with no Python call (one per I/O)
    return _tuple_new(memdesc, (MEMDESC_BIO, 0, 0, (), bp, None, None, (), 0, 0))


def memdesc_uio(u: uio) -> memdesc:
    return memdesc(MEMDESC_UIO, md_uio=u)


def memdesc_mbuf(m: mbuf) -> memdesc:
    return memdesc(MEMDESC_MBUF, md_mbuf=m)


def memdesc_vmpages(ma: Sequence[int], length: int, offset: int) -> memdesc:
    """Pages (pfns), ``length`` bytes starting ``offset`` bytes into the first."""
    return memdesc(MEMDESC_VMPAGES, md_ma=tuple(ma), md_len=length, md_offset=offset)


#: One buffer of a memory descriptor: ("vaddr", va, len, ()), ("phys", pa, len, ()),
#: or ("ma", offset, len, pfns).
MemBuffer = tuple[str, int, int, tuple[int, ...]]


def memdesc_buffers(mem: memdesc) -> list[MemBuffer]:
    """The buffers a load of ``mem`` hands to the implementation, in order."""
    t = mem.md_type
    if t == MEMDESC_BIO:  # the usual load first
        bp = mem.md_bio
        assert bp is not None
        if bp.bio_flags & BIO_UNMAPPED:
            return [("ma", bp.bio_ma_offset, bp.bio_bcount, tuple(bp.bio_ma))]
        return [("vaddr", bp.bio_data, bp.bio_bcount, ())]
    if t == MEMDESC_VADDR:
        return [("vaddr", mem.md_vaddr, mem.md_len, ())]
    if t == MEMDESC_PADDR:
        return [("phys", mem.md_paddr, mem.md_len, ())]
    if t == MEMDESC_VLIST:
        return [("vaddr", s.ds_addr, s.ds_len, ()) for s in mem.md_list]
    if t == MEMDESC_PLIST:
        return [("phys", s.ds_addr, s.ds_len, ()) for s in mem.md_list]
    if t == MEMDESC_VMPAGES:
        return [("ma", mem.md_offset, mem.md_len, mem.md_ma)]
    if t == MEMDESC_UIO:
        u = mem.md_uio
        assert u is not None
        out: list[MemBuffer] = []
        resid = u.uio_resid
        for iov in u.uio_iov:
            if resid <= 0:
                break
            n = min(resid, iov.iov_len)
            if n > 0:
                out.append(("vaddr", iov.iov_base, n, ()))
            resid -= n
        return out
    if t == MEMDESC_MBUF:
        m = mem.md_mbuf
        assert m is not None
        return [("vaddr", x.m_data, x.m_len, ()) for x in m if x.m_len > 0]
    raise KernelPanic(f"memdesc: bad type {t}")


def memdesc_length(mem: memdesc) -> int:
    """Bytes a load of ``mem`` maps (``m_pkthdr.len`` for a packet)."""
    if mem.md_type == MEMDESC_MBUF:
        m = mem.md_mbuf
        assert m is not None
        return m.m_pkthdr.len if m.m_flags & M_PKTHDR else m_length(m)
    if mem.md_type == MEMDESC_BIO:  # its one buffer's length
        bp = mem.md_bio
        assert bp is not None
        return bp.bio_bcount
    if mem.md_type == MEMDESC_VADDR:  # its one buffer's length
        return mem.md_len
    return sum(b[2] for b in memdesc_buffers(mem))


def ma_pieces(ma: Sequence[int], offset: int, length: int) -> list[tuple[int, int]]:
    """(pa, len) pieces, one per page, of ``length`` bytes at ``offset`` in page array ``ma``."""
    out: list[tuple[int, int]] = []
    while length > 0:
        idx = offset >> PAGE_SHIFT
        off = offset & PAGE_MASK
        n = min(length, PAGE_SIZE - off)
        out.append(((ma[idx] << PAGE_SHIFT) | off, n))
        offset += n
        length -= n
    return out


# -- tags and maps ------------------------------------------------------------------------


class MapState(Enum):
    IDLE = "idle"  #: not loaded
    LOADING = "loading"  #: a load returned EINPROGRESS and has not completed
    LOADED = "loaded"


class BusDmaTag:
    """``struct bus_dma_tag_common``: what every implementation's tag has."""

    def __init__(self, kern: Kernel, impl: BusDmaImpl) -> None:
        self.kern = kern
        self.impl = impl
        self.parent: BusDmaTag | None = None
        self.alignment = 1
        self.boundary = 0
        self.lowaddr = BUS_SPACE_MAXADDR
        self.highaddr = BUS_SPACE_MAXADDR
        self.maxsize = BUS_SPACE_MAXSIZE
        self.nsegments = BUS_SPACE_UNRESTRICTED
        self.maxsegsz = BUS_SPACE_MAXSIZE
        self.flags = 0
        self.lockfunc: BusDmaLockFunc = dflt_lock
        self.lockfuncarg: Any = None
        self.ref_count = 1
        self.map_count = 0
        self.maps: dict[int, BusDmaMap] = {}
        self.is_root = False
        #: A name for reports (set it after creation if you like).
        self.name = ""

    def desc(self) -> str:
        name = f" {self.name}" if self.name else ""
        return (f"tag{name}@{id(self):x}(align={self.alignment:#x}, bound={self.boundary:#x}, "
                f"lowaddr={self.lowaddr:#x}, maxsize={self.maxsize:#x}, "
                f"nsegs={self.nsegments}, maxsegsz={self.maxsegsz:#x})")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.desc()}>"

    def segment_limit(self) -> int:
        """nsegments as a count (unrestricted: no limit)."""
        return self.nsegments if self.nsegments >= 0 else 1 << 62


class BusDmaMap:
    """What every implementation's map has: the generic load state."""

    def __init__(self, dmat: BusDmaTag, flags: int) -> None:
        self.dmat = dmat
        self.flags = flags
        self.state = MapState.IDLE
        #: The segments of the current load (valid while LOADED; a copy of what the
        #: callback got).
        self.dm_segs: list[bus_dma_segment_t] = []
        self.dm_mapsize = 0
        #: The memory descriptor of the current load (for DMA-API debugging).
        self.dm_mem: memdesc | None = None
        #: DMA-API debugging: the client ranges of ``dm_mem`` at the last PRE sync, with
        #: what they were computed from (the buffers and the pmap generation).
        self.dm_ranges: tuple[object, int, list[tuple[int, int]]] | None = None
        #: The last buffer's pieces, if it needs no bounce page, and what they were
        #: computed from (``map_pieces_unbounced``).
        self.dm_pieces: tuple[object, list[tuple[int, int]] | None] | None = None
        #: Saved by map_waitok for a load that may be deferred.
        self.mem: memdesc | None = None
        self.callback: BusDmaCallback | None = None
        self.callback_arg: Any = None
        #: True while a load is deferred (EINPROGRESS returned, callback not run).
        self.deferred = False
        #: Incremented on every load start and unload; lets deferred work detect staleness.
        self.load_gen = 0
        self.load_flags = 0
        self.last_op_unload = False
        self.destroyed = False
        #: Allocated by bus_dmamem_alloc.
        self.dmamem = False
        self.name = ""

    @property
    def dm_nsegs(self) -> int:
        return len(self.dm_segs)

    def desc(self) -> str:
        name = f" {self.name}" if self.name else ""
        return f"map{name}@{id(self):x} of {self.dmat.desc()}"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.desc()} {self.state.value}>"


@dataclass(slots=True)
class BusDmaKernelState:
    """bus_dma state of one kernel (``kern.busdma_state``)."""

    root: BusDmaTag | None = None
    tags: dict[int, BusDmaTag] = field(default_factory=dict)
    #: Bounce implementation: zones, and maps whose deferred load is ready to replay.
    zones: list[Any] = field(default_factory=list)
    callbacks: deque[BusDmaMap] = field(default_factory=deque)
    swi_task: Task | None = None
    impls: dict[str, Any] = field(default_factory=dict)


def kernel_state(kern: Kernel) -> BusDmaKernelState:
    st = kern.busdma_state
    if st is None:
        st = kern.busdma_state = BusDmaKernelState()
    assert isinstance(st, BusDmaKernelState)
    return st


def common_bus_dma_tag_create(
    impl: BusDmaImpl,
    tag_class: type[BusDmaTag],
    parent: BusDmaTag | None,
    kern: Kernel,
    alignment: int,
    boundary: int,
    lowaddr: int,
    highaddr: int,
    maxsize: int,
    nsegments: int,
    maxsegsz: int,
    flags: int,
    lockfunc: BusDmaLockFunc | None,
    lockfuncarg: Any,
) -> tuple[int, BusDmaTag | None]:
    """Validate, build a ``tag_class`` tag and apply the parent's restrictions.

    Checks (EINVAL): alignment not a power of two (0 included), boundary not 0
    and not a power of two, maxsegsz 0 after clamping to the boundary, negative
    maxsize. lowaddr and highaddr are rounded to ``trunc_page(x) + PAGE_SIZE - 1``;
    with a parent, lowaddr is the min, highaddr the max, and boundary the parent's
    if 0, else the min of the non-zero values. The parent gets a reference.
    """
    if alignment < 1 or not powerof2(alignment):
        return errno.EINVAL, None
    if boundary < 0 or (boundary != 0 and not powerof2(boundary)):
        return errno.EINVAL, None
    if boundary != 0 and boundary < maxsegsz:
        maxsegsz = boundary
    if maxsegsz <= 0 or maxsize < 0:
        return errno.EINVAL, None
    tag = tag_class(kern, impl)
    tag.alignment = alignment
    tag.boundary = boundary
    tag.lowaddr = min(trunc_page(lowaddr) + PAGE_MASK, BUS_SPACE_MAXADDR)
    tag.highaddr = min(trunc_page(highaddr) + PAGE_MASK, BUS_SPACE_MAXADDR)
    tag.maxsize = maxsize
    tag.nsegments = nsegments
    tag.maxsegsz = maxsegsz
    tag.flags = flags
    if lockfunc is not None:
        tag.lockfunc = lockfunc
        tag.lockfuncarg = lockfuncarg
    if parent is not None:
        if parent.ref_count <= 0:
            raise KernelPanic(f"bus_dma_tag_create: parent {parent.desc()} was destroyed")
        tag.parent = parent
        tag.lowaddr = min(parent.lowaddr, tag.lowaddr)
        tag.highaddr = max(parent.highaddr, tag.highaddr)
        if tag.boundary == 0:
            tag.boundary = parent.boundary
        elif parent.boundary != 0:
            tag.boundary = min(parent.boundary, tag.boundary)
        if tag.boundary != 0 and tag.boundary < tag.maxsegsz:
            tag.maxsegsz = tag.boundary
        parent.ref_count += 1
    return 0, tag
