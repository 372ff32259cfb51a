"""blkback's persistent grant table against a hand-written frontend.

Source: Linux drivers/block/xen-blkback/blkback.c ``xen_blkbk_map`` (a gref in the
ring's ``persistent_gnts`` tree is used without a map, ``get_persistent_gnt``
refuses one already in use, so a gref twice in one request is mapped again for
the second; a new gref is kept while ``persistent_gnt_c < max_pgrants``),
``xen_blkbk_parse_indirect`` (indirect pages through ``xen_blkbk_map``) and
``free_persistent_gnts``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_blkback_lib import Buf, Front, Rig, pattern

from gntdma.abi.blkif import (
    BLKIF_ABI_X86_64,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    BlkifRequestIndirect,
    BlkifRequestSegment,
)
from gntdma.dev.blkback import Blkback
from gntdma.host.image import DiskImage
from gntdma.toolstack.host import Host

PAGE = 4096


def _rig(host: Host, tmp: Path, **kw: int) -> Rig:
    g = host.create_guest(f"guest{len(host.guests)}", memory_mb=8)
    img = DiskImage.create(tmp / "disk.img", 1 << 20)
    front = Front(host, g, BLKIF_ABI_X86_64)
    st = host.hv.statistics()
    bb = Blkback(host.dom0.hc, host.dom0.kernel, g.domid, img, devid=51712, **kw)
    bb.feature_persistent = True
    assert bb.connect(front.ring_refs, front.port, BLKIF_ABI_X86_64.protocol,
                      persistent=True) == 0
    return Rig(host, g, img, front, bb, st.mappings, st.grants_pinned)


def _close(r: Rig, bufs: list[Buf]) -> None:
    """Disconnect (every persistent grant unmapped: ``free_persistent_gnts``), then end
    the frontend's grants."""
    assert r.bb.disconnect() == 0
    assert r.bb.statistics().mapped_now == 0
    for b in bufs:
        r.front.release(b)
    r.front.close()
    r.img.close()


def test_a_gref_twice_in_one_request_is_mapped_again_for_the_second(
        host: Host, tmp_path: Path) -> None:
    r = _rig(host, tmp_path)
    f = r.front
    b = f.buf(False, pattern(1))
    rid = f.rw(BLKIF_OP_WRITE, 0, [(b, 0, 7)])
    f.push()
    assert f.status(rid) == BLKIF_RSP_OKAY
    st = r.bb.statistics()
    assert st.mapped_now == st.ring_pages + 1  # kept
    rid = f.rw(BLKIF_OP_READ, 8, [(b, 0, 3), (b, 4, 7)])  # the same page twice
    f.push()
    assert f.status(rid) == BLKIF_RSP_OKAY
    again = r.bb.statistics()
    assert again.segments_mapped == st.segments_mapped + 1  # the second use only
    assert again.mapped_now == st.mapped_now  # and unmapped after the request
    rid = f.rw(BLKIF_OP_READ, 0, [(b, 0, 7)])
    f.push()
    assert f.status(rid) == BLKIF_RSP_OKAY
    assert r.bb.statistics().segments_mapped == again.segments_mapped  # from the table
    assert f.data(b) == pattern(1)
    _close(r, [b])


def test_indirect_pages_enter_the_table_and_are_used_again(host: Host,
                                                           tmp_path: Path) -> None:
    """The indirect page is granted writable, as Linux xen-blkfront's persistent
    grants are: blkback maps it as a data page and keeps it."""
    r = _rig(host, tmp_path)
    f = r.front
    bufs = [f.buf(False, pattern(i)) for i in range(20)]
    raw = b"".join(BlkifRequestSegment(b.ref, 0, 7).pack() for b in bufs)
    ipage = f.buf(False, raw + bytes(PAGE - len(raw)))

    def indirect(op: int) -> int:
        rid = f.new_id()
        f.put(BlkifRequestIndirect(operation=BLKIF_OP_INDIRECT, indirect_op=op,
                                   nr_segments=20, id=rid, sector_number=0, handle=0,
                                   indirect_grefs=(ipage.ref,)))
        f.push()
        return f.status(rid)

    assert indirect(BLKIF_OP_WRITE) == BLKIF_RSP_OKAY
    st = r.bb.statistics()
    assert st.mapped_now == st.ring_pages + 20 + 1
    for b in bufs:
        f.page(b.pfn)[:] = bytes(PAGE)
    assert indirect(BLKIF_OP_READ) == BLKIF_RSP_OKAY
    again = r.bb.statistics()
    assert again.segments_mapped == st.segments_mapped  # not one map more
    assert [f.data(b) for b in bufs] == [pattern(i) for i in range(20)]
    _close(r, [*bufs, ipage])


def test_max_persistent_grants_zero_keeps_nothing(host: Host, tmp_path: Path) -> None:
    r = _rig(host, tmp_path, max_persistent_grants=0)
    f = r.front
    b = f.buf(False, pattern(2))
    for _ in range(2):
        rid = f.rw(BLKIF_OP_WRITE, 0, [(b, 0, 7)])
        f.push()
        assert f.status(rid) == BLKIF_RSP_OKAY
        st = r.bb.statistics()
        assert st.mapped_now == st.ring_pages
    _close(r, [b])


def test_the_same_grefs_again_are_served_from_the_table_until_it_is_emptied(
        host: Host, tmp_path: Path) -> None:
    # xen_blkbk_map: each gref found in persistent_gnts is used without a map, in
    # the request's own order; after free_persistent_gnts every gref is mapped again.
    r = _rig(host, tmp_path)
    f = r.front
    bufs = [f.buf(False, pattern(i)) for i in range(11)]
    rid = f.rw(BLKIF_OP_WRITE, 0, [(b, 0, 7) for b in bufs])
    f.push()
    assert f.status(rid) == BLKIF_RSP_OKAY
    st = r.bb.statistics()
    for order in (bufs, bufs[::-1], bufs, bufs[::-1], bufs[1:] + bufs[:1]):
        for b in order:
            f.page(b.pfn)[:] = bytes(PAGE)
        rid = f.rw(BLKIF_OP_READ, 0, [(b, 0, 7) for b in order])
        f.push()
        assert f.status(rid) == BLKIF_RSP_OKAY
        assert [f.data(b) for b in order] == [pattern(i) for i in range(11)]
        assert r.bb.statistics().segments_mapped == st.segments_mapped  # from the table
        rid = f.rw(BLKIF_OP_WRITE, 0, [(b, 0, 7) for b in order])
        f.push()
        assert f.status(rid) == BLKIF_RSP_OKAY
    r.bb._io.unmap_persistent()  # the table emptied (nothing in flight)
    for b in bufs:
        f.page(b.pfn)[:] = bytes(PAGE)
    rid = f.rw(BLKIF_OP_READ, 0, [(b, 0, 7) for b in bufs])
    f.push()
    assert f.status(rid) == BLKIF_RSP_OKAY
    assert r.bb.statistics().segments_mapped == st.segments_mapped + 11  # mapped again
    assert [f.data(b) for b in bufs] == [pattern(i) for i in range(11)]
    _close(r, bufs)


@pytest.mark.parametrize("bad", [1.5, "10", True, None])
def test_max_persistent_grants_is_an_int(host: Host, tmp_path: Path, bad: object) -> None:
    """xen-blkback blkback.c: ``module_param_named(max_persistent_grants, max_pgrants,
    int, 0644)``: a table size that is not an int is refused, the table unchanged."""
    r = _rig(host, tmp_path)
    before = r.bb.max_persistent_grants
    with pytest.raises(TypeError):
        r.bb.max_persistent_grants = bad  # type: ignore[assignment]
    assert r.bb.max_persistent_grants == before
    _close(r, [])


def test_one_segment_from_the_table_moves_its_sectors_and_is_put_back(
        host: Host, tmp_path: Path) -> None:
    # xen_blkbk_map / put_persistent_gnt: a one-segment request whose gref the table
    # holds moves first_sect..last_sect of the page without a map, and the grant is
    # free again after the request, also when the I/O failed (dispatch_rw_block_io
    # answers BLKIF_RSP_ERROR).
    r = _rig(host, tmp_path)
    f = r.front
    b = f.buf(False, pattern(3))
    rid = f.rw(BLKIF_OP_WRITE, 0, [(b, 0, 7)])
    f.push()
    assert f.status(rid) == BLKIF_RSP_OKAY
    st = r.bb.statistics()
    f.page(b.pfn)[:] = pattern(4)
    rid = f.rw(BLKIF_OP_WRITE, 16, [(b, 2, 5)])  # sectors 2..5 of the page: 2 KiB
    f.push()
    assert f.status(rid) == BLKIF_RSP_OKAY
    assert r.disk(16 * 512, 2048) == pattern(4)[1024:3072]
    f.page(b.pfn)[:] = bytes(PAGE)
    rid = f.rw(BLKIF_OP_READ, 0, [(b, 1, 6)])
    f.push()
    assert f.status(rid) == BLKIF_RSP_OKAY
    assert f.data(b) == bytes(512) + pattern(3)[:3072] + bytes(512)
    again = r.bb.statistics()
    assert again.segments_mapped == st.segments_mapped  # both from the table
    assert again.mapped_now == st.mapped_now
    assert again.bytes_written - st.bytes_written == 2048
    assert again.bytes_read - st.bytes_read == 3072
    assert r.bb._io._pbusy == set()  # put back
    r.img.close()  # the disk gone: the next transfer fails (EBADF)
    rid = f.rw(BLKIF_OP_WRITE, 0, [(b, 0, 7)])
    f.push()
    assert f.status(rid) == BLKIF_RSP_ERROR
    failed = r.bb.statistics()
    assert failed.io_errors == again.io_errors + 1
    assert failed.segments_mapped == st.segments_mapped  # from the table all the same
    assert r.bb._io._pbusy == set()  # put back after the failure too
    assert r.bb.disconnect() == 0
    assert r.bb.statistics().mapped_now == 0
    f.release(b)
    f.close()
