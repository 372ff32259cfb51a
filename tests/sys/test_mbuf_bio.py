"""mbuf chains, clusters, bio and uio."""

from __future__ import annotations

import pytest

from gntdma.sched import Scheduler
from gntdma.sys import (
    BIO_DONE,
    BIO_ERROR,
    BIO_WRITE,
    M_DEVBUF,
    M_EXT,
    M_NOWAIT,
    M_PKTHDR,
    M_TRAILINGSPACE,
    M_WAITOK,
    MCLBYTES,
    MHLEN,
    MJUM9BYTES,
    MJUM16BYTES,
    MJUMPAGESIZE,
    MLEN,
    MT_DATA,
    PAGE_SIZE,
    UIO_READ,
    UIO_WRITE,
    Kernel,
    bio,
    biodone,
    biowait,
    iovec,
    m_adj,
    m_append,
    m_copyback,
    m_copydata,
    m_defrag,
    m_freem,
    m_get,
    m_getcl,
    m_gethdr,
    m_getjcl,
    m_length,
    mtod,
    uio,
    uiomove,
)


def test_mbuf_sizes_and_storage(kern: Kernel) -> None:
    m = m_gethdr(kern, M_WAITOK)
    n = m_get(kern, M_WAITOK)
    assert m is not None and n is not None
    assert m.m_flags & M_PKTHDR and M_TRAILINGSPACE(m) == MHLEN
    assert M_TRAILINGSPACE(n) == MLEN
    assert mtod(m) // PAGE_SIZE == (mtod(m) + MHLEN - 1) // PAGE_SIZE  # never crosses a page
    m_freem(m)
    m_freem(n)
    kern.assert_no_leaks()


@pytest.mark.parametrize("size", [MCLBYTES, MJUMPAGESIZE, MJUM9BYTES, MJUM16BYTES])
def test_clusters(kern: Kernel, size: int) -> None:
    m = m_getjcl(kern, M_NOWAIT, MT_DATA, M_PKTHDR, size)
    assert m is not None and m.m_flags & M_EXT and M_TRAILINGSPACE(m) == size
    if size <= PAGE_SIZE:
        assert mtod(m) % size == 0  # aligned, within one page
    else:
        assert mtod(m) % PAGE_SIZE == 0
    m_freem(m)
    kern.assert_no_leaks()


def test_chain_copydata_copyback_adj(kern: Kernel) -> None:
    m = m_gethdr(kern, M_WAITOK)
    assert m is not None
    payload = bytes((i * 7) & 0xFF for i in range(5000))
    assert m_append(m, len(payload), payload) == 1
    assert m_length(m) == 5000 == m.m_pkthdr.len
    assert sum(1 for _ in m) > 1  # spans several mbufs
    assert m_copydata(m, 0, 5000) == payload
    assert m_copydata(m, 1234, 321) == payload[1234:1555]
    m_copyback(m, 4990, 20, b"Z" * 20)  # extends the chain by 10
    assert m_length(m) == 5010 == m.m_pkthdr.len
    assert m_copydata(m, 4980, 30) == payload[4980:4990] + b"Z" * 20
    m_adj(m, 10)
    m_adj(m, -10)
    assert m.m_pkthdr.len == 4990 == m_length(m)
    assert m_copydata(m, 0, 10) == payload[10:20]
    d = m_defrag(m, M_NOWAIT)
    assert d is not None and m_length(d) == 4990 and d.m_pkthdr.len == 4990
    assert m_copydata(d, 0, 4980) == payload[10:4990]
    assert sum(1 for _ in d) == 3  # 2 KiB clusters
    m_freem(d)
    kern.assert_no_leaks()


def test_copydata_past_end_panics(kern: Kernel) -> None:
    from gntdma.sched import KernelPanic

    m = m_getcl(kern, M_WAITOK)
    assert m is not None
    m.m_len = 10
    with pytest.raises(KernelPanic):
        m_copydata(m, 5, 10)
    m_freem(m)


def test_biodone_and_biowait(vsched: Scheduler, kern: Kernel) -> None:
    done: list[bio] = []
    bp = bio(bio_cmd=BIO_WRITE, bio_bcount=512, bio_done=done.append)
    biodone(bp)
    assert done == [bp] and bp.bio_flags & BIO_DONE
    bp2 = bio()

    def completer() -> None:
        bp2.bio_error = 5
        biodone(bp2)

    vsched.spawn(completer)
    assert biowait(bp2) == 5 and bp2.bio_flags & BIO_ERROR


def test_uiomove_both_directions(kern: Kernel) -> None:
    buf = kern.malloc(300, M_DEVBUF, M_WAITOK)
    a = kern.malloc(100, M_DEVBUF, M_WAITOK)
    b = kern.malloc(200, M_DEVBUF, M_WAITOK)
    kern.kva_write(buf, bytes(range(256)) + bytes(44))
    u = uio([iovec(a, 100), iovec(b, 200)], uio_rw=UIO_READ)
    assert u.uio_resid == 300 and u.uio_iovcnt == 2
    assert uiomove(kern, buf, 150, u) == 0
    assert u.uio_resid == 150 and u.uio_offset == 150
    assert kern.kva_read(a, 100) == bytes(range(100))
    assert kern.kva_read(b, 50) == bytes(range(100, 150))
    kern.kva_write(a, b"x" * 100)
    u2 = uio([iovec(a, 100)], uio_rw=UIO_WRITE)
    uiomove(kern, buf, 100, u2)
    assert kern.kva_read(buf, 100) == b"x" * 100
    for va in (buf, a, b):
        kern.free(va, M_DEVBUF)
