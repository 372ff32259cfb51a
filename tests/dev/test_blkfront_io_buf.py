"""The block API does I/O in the caller's own kernel buffer: no allocation, no copy.

FreeBSD's ``physio`` (``sys/kern/kern_physio.c``) hands the driver the pages of
the caller's buffer (held, then an unmapped bio over them, or mapped into a
pbuf): the device transfers to and from those pages. :func:`xbd_read_buf` and
:func:`xbd_write_buf` do the same with a mapped bio over the caller's buffer:
the backend is granted the caller's pages, and nothing is malloc'd, junk
filled or copied. Every byte is checked against the disk.
"""

from __future__ import annotations

import errno

from test_blkfront_lib import PAGE, SECT, make_rig, stamp, teardown

from gntdma.abi.blkif import BlkifAnyRequest, BlkifRequest
from gntdma.dev.blkfront_io import xbd_read, xbd_read_buf, xbd_write_buf
from gntdma.sys import M_TEMP, M_WAITOK, PAGE_SHIFT
from gntdma.toolstack.host import Host

MiB = 1 << 20


def _temp_requests(kern: object) -> int:
    st = kern.malloc_statistics().get("temp")  # type: ignore[attr-defined]
    return 0 if st is None else int(st.requests)


def test_read_and_write_use_the_callers_buffer_and_allocate_nothing(host: Host) -> None:
    rig = make_rig(host, size=16 << 20)
    sc, kern = rig.sc, rig.g.kernel
    va = kern.malloc(MiB, M_TEMP, M_WAITOK)
    data = stamp(3 * MiB, MiB, 21)
    kern.kva_write(va, data)
    before = _temp_requests(kern)
    assert xbd_write_buf(sc, 3 * MiB, va, MiB) == 0
    assert bytes(rig.be.disk[3 * MiB:4 * MiB]) == data
    kern.kva_zero(va, MiB)
    assert xbd_read_buf(sc, 3 * MiB, va, MiB) == 0
    assert kern.kva_read(va, MiB) == data
    assert _temp_requests(kern) == before  # no buffer of the API's own
    assert xbd_read(sc, 3 * MiB, SECT)[0] == 0
    assert _temp_requests(kern) == before + 1  # the bytes API has one
    kern.free(va, M_TEMP)
    teardown(rig)


def test_the_backend_is_granted_the_callers_pages(host: Host) -> None:
    rig = make_rig(host)
    sc, g, kern = rig.sc, rig.g, rig.g.kernel
    va = kern.malloc(4 * PAGE, M_TEMP, M_WAITOK)
    frames: list[list[int]] = []

    def spy(req: BlkifAnyRequest) -> None:
        if isinstance(req, BlkifRequest) and req.nr_segments > 0:
            frames.append([g.gnttab.entry(s.gref)[2] for s in req.seg])

    rig.be.on_request = spy
    kern.kva_write(va, stamp(0, 4 * PAGE, 5))
    assert xbd_write_buf(sc, 0, va, 4 * PAGE) == 0
    assert xbd_read_buf(sc, 0, va, 4 * PAGE) == 0
    mine = [kern.pmap_kextract(va + i * PAGE) >> PAGE_SHIFT for i in range(4)]
    assert frames == [mine, mine]
    assert kern.kva_read(va, 4 * PAGE) == stamp(0, 4 * PAGE, 5)
    kern.free(va, M_TEMP)
    teardown(rig)


def test_buffer_api_errors_are_the_bytes_api_errors(host: Host) -> None:
    rig = make_rig(host, size=1 << 20)
    sc, kern = rig.sc, rig.g.kernel
    va = kern.malloc(2 * PAGE, M_TEMP, M_WAITOK)
    assert xbd_read_buf(sc, (1 << 20) - SECT, va, 2 * SECT) == errno.EIO  # past the end
    assert xbd_write_buf(sc, 100, va, SECT) == errno.EINVAL
    assert xbd_read_buf(sc, 0, va, 100) == errno.EINVAL
    assert xbd_read_buf(sc, 0, va, 0) == 0
    kern.free(va, M_TEMP)
    teardown(rig)
