"""mbuf(9): packet buffers in kernel memory.

Theory of operation
-------------------
An :class:`mbuf` object holds the header fields; its storage is real kernel
memory: ``MSIZE`` (256) bytes from malloc type ``M_MBUF`` (a 256-byte bucket,
so it never crosses a page), of which the first 32 bytes stand for the header,
``MLEN`` bytes are internal data, or ``MHLEN`` after a packet header. ``m_data``
is a kernel virtual address, as in C (``mtod``).

Clusters (``M_EXT``) are kernel memory too, from their own malloc types:
``MCLBYTES`` (2 KiB, half a page, never crossing a page), ``MJUMPAGESIZE`` (one
page, page aligned), ``MJUM9BYTES`` and ``MJUM16BYTES`` (3 and 4 pages).
Choice made here: **9 KiB and 16 KiB clusters are page aligned but not
physically contiguous** (their pages are scattered like any large malloc), as
when FreeBSD's jumbo zones use the default page allocator. bus_dma must then
split them at page boundaries, which is the demanding case.

Data access goes through the kernel's ``kva_read``/``kva_write``, so DMA-API
debugging sees it. Functions take the kernel explicitly where C relies on the
global one (``m_get(kern, how, type)``); an mbuf remembers its kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, final

from gntdma.sched import KernelPanic
from gntdma.sys._malloc import (
    M_MBUF,
    M_MBUF_CLUSTER,
    M_MBUF_JUMBO9,
    M_MBUF_JUMBO16,
    M_MBUF_JUMBOP,
    M_NOWAIT,
    MallocType,
)
from gntdma.sys._param import PAGE_SIZE

if TYPE_CHECKING:
    from gntdma.sys._kernel import Kernel

__all__ = [
    "EXT_CLUSTER",
    "EXT_JUMBO9",
    "EXT_JUMBO16",
    "EXT_JUMBOP",
    "MCLBYTES",
    "MHLEN",
    "MJUM9BYTES",
    "MJUM16BYTES",
    "MJUMPAGESIZE",
    "MLEN",
    "MSIZE",
    "MT_DATA",
    "MT_HEADER",
    "MT_NOINIT",
    "M_EOR",
    "M_EXT",
    "M_LEADINGSPACE",
    "M_PKTHDR",
    "M_RDONLY",
    "M_TRAILINGSPACE",
    "m_adj",
    "m_append",
    "m_cat",
    "m_clget",
    "m_cljget",
    "m_copyback",
    "m_copydata",
    "m_defrag",
    "m_free",
    "m_freem",
    "m_get",
    "m_getcl",
    "m_gethdr",
    "m_getjcl",
    "m_length",
    "mbuf",
    "mtod",
    "pkthdr",
]

MSIZE: Final = 256
_M_HDR: Final = 32
_PKTHDR_SIZE: Final = 56
MLEN: Final = MSIZE - _M_HDR  # 224
MHLEN: Final = MLEN - _PKTHDR_SIZE  # 168
MCLBYTES: Final = 2048
MJUMPAGESIZE: Final = PAGE_SIZE
MJUM9BYTES: Final = 9 * 1024
MJUM16BYTES: Final = 16 * 1024

M_EXT: Final = 0x00000001
M_PKTHDR: Final = 0x00000002
M_EOR: Final = 0x00000004
M_RDONLY: Final = 0x00000008

MT_NOINIT: Final = 0
MT_DATA: Final = 1
MT_HEADER: Final = MT_DATA

EXT_CLUSTER: Final = 1
EXT_JUMBOP: Final = 4
EXT_JUMBO9: Final = 5
EXT_JUMBO16: Final = 6

_CLUSTERS: Final[dict[int, tuple[int, MallocType]]] = {
    MCLBYTES: (EXT_CLUSTER, M_MBUF_CLUSTER),
    MJUMPAGESIZE: (EXT_JUMBOP, M_MBUF_JUMBOP),
    MJUM9BYTES: (EXT_JUMBO9, M_MBUF_JUMBO9),
    MJUM16BYTES: (EXT_JUMBO16, M_MBUF_JUMBO16),
}


@dataclass(slots=True)
class pkthdr:
    """``struct pkthdr``: the fields drivers use."""

    len: int = 0
    rcvif: object = None
    csum_flags: int = 0
    csum_data: int = 0
    tso_segsz: int = 0
    flowid: int = 0
    ether_vtag: int = 0


@final
class mbuf:
    """``struct mbuf``. Create with m_get/m_gethdr/m_getcl/m_getjcl."""

    __slots__ = ("ext_buf", "ext_size", "ext_type", "kern", "m_data", "m_flags", "m_len",
                 "m_next", "m_nextpkt", "m_pkthdr", "m_type", "storage")

    def __init__(self, kern: Kernel, storage: int, type: int, flags: int) -> None:
        self.kern = kern
        self.storage = storage
        self.m_next: mbuf | None = None
        self.m_nextpkt: mbuf | None = None
        self.m_type = type
        self.m_flags = flags
        self.m_len = 0
        self.m_pkthdr = pkthdr()
        self.m_data = storage + _M_HDR + (_PKTHDR_SIZE if flags & M_PKTHDR else 0)
        self.ext_buf = 0
        self.ext_size = 0
        self.ext_type = 0

    def __repr__(self) -> str:
        return f"<mbuf data={self.m_data:#x} len={self.m_len} flags={self.m_flags:#x}>"

    def __iter__(self) -> _Chain:
        return _Chain(self)


@final
class _Chain:
    __slots__ = ("_m",)

    def __init__(self, m: mbuf | None) -> None:
        self._m = m

    def __iter__(self) -> _Chain:
        return self

    def __next__(self) -> mbuf:
        m = self._m
        if m is None:
            raise StopIteration
        self._m = m.m_next
        return m


def mtod(m: mbuf) -> int:
    """The kernel virtual address of the mbuf's data."""
    return m.m_data


def _alloc(kern: Kernel, how: int, type: int, flags: int) -> mbuf | None:
    va = kern.malloc(MSIZE, M_MBUF, how)
    if va == 0:
        return None
    return mbuf(kern, va, type, flags)


def m_get(kern: Kernel, how: int, type: int = MT_DATA) -> mbuf | None:
    return _alloc(kern, how, type, 0)


def m_gethdr(kern: Kernel, how: int, type: int = MT_DATA) -> mbuf | None:
    return _alloc(kern, how, type, M_PKTHDR)


def m_cljget(m: mbuf, how: int, size: int) -> int:
    """Attach a cluster of ``size`` to ``m``; returns its va, 0 on failure."""
    if size not in _CLUSTERS:
        raise KernelPanic(f"m_cljget: bad cluster size {size}")
    if m.m_flags & M_EXT:
        raise KernelPanic("m_cljget: mbuf already has a cluster")
    ext_type, mtype = _CLUSTERS[size]
    va = m.kern.malloc(size, mtype, how)
    if va == 0:
        return 0
    m.ext_buf = va
    m.ext_size = size
    m.ext_type = ext_type
    m.m_flags |= M_EXT
    m.m_data = va
    return va


def m_clget(m: mbuf, how: int) -> int:
    return m_cljget(m, how, MCLBYTES)


def m_getjcl(kern: Kernel, how: int, type: int, flags: int, size: int) -> mbuf | None:
    """An mbuf (with a packet header if ``flags & M_PKTHDR``) and a cluster of ``size``."""
    m = _alloc(kern, how, type, flags & M_PKTHDR)
    if m is None:
        return None
    if m_cljget(m, how, size) == 0:
        kern.free(m.storage, M_MBUF)
        return None
    return m


def m_getcl(kern: Kernel, how: int, type: int = MT_DATA, flags: int = 0) -> mbuf | None:
    return m_getjcl(kern, how, type, flags, MCLBYTES)


def m_free(m: mbuf) -> mbuf | None:
    """Free one mbuf (and its cluster); returns the next in the chain."""
    if m.storage == 0:
        raise KernelPanic(f"m_free: {m!r} already freed")
    n = m.m_next
    if m.m_flags & M_EXT:
        m.kern.free(m.ext_buf, _CLUSTERS[m.ext_size][1])
        m.ext_buf = 0
    m.kern.free(m.storage, M_MBUF)
    m.storage = 0
    m.m_next = None
    return n


def m_freem(m: mbuf | None) -> None:
    while m is not None:
        m = m_free(m)


def _start(m: mbuf) -> int:
    return m.ext_buf if m.m_flags & M_EXT else m.storage + _M_HDR + (
        _PKTHDR_SIZE if m.m_flags & M_PKTHDR else 0)


def _size(m: mbuf) -> int:
    if m.m_flags & M_EXT:
        return m.ext_size
    return MHLEN if m.m_flags & M_PKTHDR else MLEN


def M_LEADINGSPACE(m: mbuf) -> int:
    return m.m_data - _start(m)


def M_TRAILINGSPACE(m: mbuf) -> int:
    return _start(m) + _size(m) - (m.m_data + m.m_len)


def m_length(m0: mbuf, last: list[mbuf] | None = None) -> int:
    """Total data length of the chain; ``last`` (if given) receives the last mbuf."""
    n = 0
    m: mbuf | None = m0
    tail = m0
    while m is not None:
        n += m.m_len
        tail = m
        m = m.m_next
    if last is not None:
        last[:] = [tail]
    return n


def m_copydata(m: mbuf, off: int, length: int) -> bytes:
    """Copy ``length`` bytes from offset ``off`` of the chain (a panic if too short)."""
    if off < 0 or length < 0:
        raise KernelPanic(f"m_copydata: off {off} len {length}")
    cur: mbuf | None = m
    while off > 0:
        if cur is None:
            raise KernelPanic("m_copydata: offset past end of chain")
        if off < cur.m_len:
            break
        off -= cur.m_len
        cur = cur.m_next
    out = []
    while length > 0:
        if cur is None:
            raise KernelPanic("m_copydata: chain too short")
        n = min(cur.m_len - off, length)
        if n > 0:
            out.append(cur.kern.kva_read(cur.m_data + off, n))
        length -= n
        off = 0
        cur = cur.m_next
    return b"".join(out)


def m_copyback(m0: mbuf, off: int, length: int, cp: bytes) -> None:
    """Copy ``cp[:length]`` into the chain at ``off``, extending it with M_NOWAIT mbufs."""
    data = memoryview(cp)[:length]
    m = m0
    totlen = 0
    while off > m.m_len:
        off -= m.m_len
        totlen += m.m_len
        if m.m_next is None:
            n = m_get(m.kern, M_NOWAIT, m.m_type)
            if n is None:
                return
            n.m_len = min(MLEN, length + off)
            m.kern.kva_zero(n.m_data, n.m_len)
            m.m_next = n
        m = m.m_next
    pos = 0
    while length > 0:
        if m.m_next is None and off + length > m.m_len:
            grow = min(M_TRAILINGSPACE(m), off + length - m.m_len)
            if grow > 0:
                m.m_len += grow
        mlen = min(m.m_len - off, length)
        if mlen > 0:
            m.kern.kva_write(m.m_data + off, data[pos : pos + mlen])
        pos += mlen
        length -= mlen
        totlen += off + mlen
        off = 0
        if length == 0:
            break
        if m.m_next is None:
            n = m_get(m.kern, M_NOWAIT, m.m_type)
            if n is None:
                break
            n.m_len = min(MLEN, length)
            m.m_next = n
        m = m.m_next
    if m0.m_flags & M_PKTHDR and m0.m_pkthdr.len < totlen:
        m0.m_pkthdr.len = totlen


def m_append(m0: mbuf, length: int, cp: bytes) -> int:
    """Append ``cp[:length]`` to the chain; 1 on success, 0 if an mbuf could not be had."""
    last: list[mbuf] = []
    m_length(m0, last)
    m = last[0]
    remainder = length
    pos = 0
    space = M_TRAILINGSPACE(m)
    if space > 0:
        n = min(space, remainder)
        m.kern.kva_write(m.m_data + m.m_len, cp[pos : pos + n])
        m.m_len += n
        pos += n
        remainder -= n
    while remainder > 0:
        nm = m_get(m.kern, M_NOWAIT, m.m_type)
        if nm is None:
            break
        n = min(MLEN, remainder)
        nm.kern.kva_write(nm.m_data, cp[pos : pos + n])
        nm.m_len = n
        m.m_next = nm
        m = nm
        pos += n
        remainder -= n
    if m0.m_flags & M_PKTHDR:
        m0.m_pkthdr.len += length - remainder
    return 1 if remainder == 0 else 0


def m_adj(mp: mbuf, req_len: int) -> None:
    """Trim ``req_len`` bytes from the head (positive) or tail (negative) of the chain."""
    if req_len >= 0:
        n = req_len
        m: mbuf | None = mp
        while m is not None and n > 0:
            cut = min(m.m_len, n)
            m.m_len -= cut
            m.m_data += cut
            n -= cut
            m = m.m_next
        if mp.m_flags & M_PKTHDR:
            mp.m_pkthdr.len -= req_len - n
    else:
        total = m_length(mp)
        keep = max(0, total + req_len)
        m = mp
        while m is not None:
            if m.m_len >= keep:
                m.m_len = keep
                keep = 0
                nxt = m.m_next
                while nxt is not None:
                    nxt.m_len = 0
                    nxt = nxt.m_next
                break
            keep -= m.m_len
            m = m.m_next
        if mp.m_flags & M_PKTHDR:
            mp.m_pkthdr.len = max(0, total + req_len)


def m_cat(m: mbuf, n: mbuf | None) -> None:
    """Append chain ``n`` to chain ``m`` (no copy)."""
    last: list[mbuf] = []
    m_length(m, last)
    last[0].m_next = n


def m_defrag(m0: mbuf, how: int) -> mbuf | None:
    """Copy the chain into as few clusters as possible; frees ``m0`` on success.

    Returns the new chain, or None (``m0`` untouched) if memory is short.
    """
    total = m_length(m0)
    data = m_copydata(m0, 0, total)
    head: mbuf | None = None
    tail: mbuf | None = None
    pos = 0
    first = True
    while first or pos < total:
        size = MCLBYTES if total - pos > MLEN else 0
        if size != 0:
            nm = m_getcl(m0.kern, how, m0.m_type, M_PKTHDR if first else 0)
        else:
            nm = (m_gethdr if first else m_get)(m0.kern, how, m0.m_type)
        if nm is None:
            m_freem(head)
            return None
        n = min(_size(nm), total - pos)
        if n > 0:
            nm.kern.kva_write(nm.m_data, data[pos : pos + n])
        nm.m_len = n
        pos += n
        if tail is None:
            head = nm
        else:
            tail.m_next = nm
        tail = nm
        first = False
    assert head is not None
    if m0.m_flags & M_PKTHDR:
        h = m0.m_pkthdr
        head.m_pkthdr = pkthdr(total, h.rcvif, h.csum_flags, h.csum_data, h.tso_segsz,
                               h.flowid, h.ether_vtag)
    m_freem(m0)
    return head
