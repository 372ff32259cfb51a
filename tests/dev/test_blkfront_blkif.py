"""blkif fidelity of blkfront (and blkback's half of the sector-size rule).

- ``sector-size``: blkif.h (``xen/include/public/io/blkif.h``, the backend
  node ``sector-size`` and the frontend node ``feature-large-sector-size``):
  a backend must publish 512 unless the frontend advertises
  ``feature-large-sector-size``; a frontend that does not supplies and
  interprets every sector quantity (``sectors``, ``sector_number``,
  ``first_sect``/``last_sect``, ``nr_sectors``) in 512-byte units. blkfront
  does not advertise it; a larger ``sector-size`` from a backend that ignores
  the rule (Linux xen-blkback publishes ``bdev_logical_block_size`` whatever
  the frontend says: ``xen_blkbk_connect`` in ``xen-blkback/xenbus.c``) is
  taken as Linux xen-blkfront takes it (``blkfront_connect`` and
  ``xlvbd_alloc_gendisk``: ``set_capacity(sectors)`` in 512-byte units, the
  sector size as the logical block size only).
- discard limits: Linux xen-blkfront ``blkfront_setup_discard`` reads
  ``discard-granularity`` and ``discard-alignment``; ``blkif_set_queue_limits``
  sets ``max_discard_sectors`` to the capacity and the granularity (the
  sector size when the key is absent: blkif.h note 4) and alignment; the
  block layer (``__blkdev_issue_discard`` in ``block/blk-lib.c``; today
  ``bio_split_discard`` in ``block/blk-merge.c``) rounds the maximum down to
  the granularity and moves every split point back to an aligned sector.
- ``BLKIF_RSP_EOPNOTSUPP``: Linux xen-blkfront ``blkif_interrupt`` turns
  ``feature_flush``/``feature_fua`` off when a ``BLKIF_OP_FLUSH_DISKCACHE`` or
  ``BLKIF_OP_WRITE_BARRIER`` is answered so, and ``feature_discard`` off for a
  ``BLKIF_OP_DISCARD``; no such request is sent again. The FreeBSD-structured
  blkfront completes that bio, and every later (or already queued) flush or
  delete, with ``EOPNOTSUPP``, FreeBSD's answer of a disk without a cache to
  flush (``g_disk_start``), where Linux completes a flush with success.
"""

from __future__ import annotations

import errno

from test_blkback_lib import make_rig as make_blkback_rig
from test_blkfront_lib import SECT, MiniBack, Rig, ring_refs_from_keys, teardown

from gntdma.abi.blkif import (
    BLKIF_ABI_X86_64,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_WRITE_BARRIER,
    BlkifAnyRequest,
    BlkifKey,
    BlkifRequestDiscard,
)
from gntdma.dev.blkfront import xbd_softc
from gntdma.dev.blkfront_cmd import XBDF_BARRIER, XBDF_DISCARD, XBDF_FLUSH, XbdBackendFeatures
from gntdma.dev.blkfront_io import xbd_discard, xbd_flush, xbd_read, xbd_write
from gntdma.sys import BIO_FLUSH, bio
from gntdma.toolstack.host import Host

MiB = 1 << 20


def _rig(host: Host, size: int, extra: dict[str, str]) -> Rig:
    """A connected blkfront whose backend publishes ``extra`` over MiniBack's keys."""
    g = host.create_guest("g", max_grant_frames=64, memory_mb=64)
    be = MiniBack(host, g, size)
    keys = {
        BlkifKey.SECTORS.value: str(size // SECT),
        BlkifKey.SECTOR_SIZE.value: str(SECT),
        BlkifKey.INFO.value: "0",
        BlkifKey.FEATURE_FLUSH_CACHE.value: "1",
        BlkifKey.FEATURE_DISCARD.value: "1",
        BlkifKey.MAX_RING_PAGE_ORDER.value: "2",
        BlkifKey.FEATURE_MAX_INDIRECT_SEGMENTS.value: "256",
    }
    keys.update(extra)
    error, feats = XbdBackendFeatures.from_xenstore(keys.get)
    assert error == 0 and feats is not None
    sc = xbd_softc(g.kernel, g.hc, g.gnttab, host.dom0.domid, name="xbd0", vdev=51712,
                   ring_page_order=2, max_indirect_segments=256)
    assert sc.xbd_initialize(feats.max_ring_page_order) == 0
    tkeys = sc.xbd_transport_keys()
    be.connect(ring_refs_from_keys(tkeys), int(tkeys[BlkifKey.EVENT_CHANNEL.value]),
               tkeys[BlkifKey.PROTOCOL.value])
    assert sc.xbd_connect(feats) == 0
    return Rig(host, g, sc, be)


# -- sector-size ---------------------------------------------------------------------------


def test_sector_quantities_are_512_bytes_unless_feature_large_sector_size(host: Host) -> None:
    size = 4 * MiB
    rig = _rig(host, size, {BlkifKey.SECTOR_SIZE.value: "4096"})
    sc = rig.sc
    # blkfront does not promise to use sector-size units...
    assert BlkifKey.FEATURE_LARGE_SECTOR_SIZE.value not in sc.xbd_transport_keys()
    # ...so "sectors" counts 512-byte units, and the sector size is the block size
    assert sc.xbd_media_size == size
    assert sc.xbd_sector_size == 4096
    data = bytes(range(256)) * 16
    assert xbd_write(sc, 8192, data) == 0
    assert rig.be.disk[8192:8192 + 4096] == data  # sector_number 16 in 512-byte units
    assert xbd_read(sc, 8192, 4096) == (0, data)
    assert xbd_write(sc, 512, bytes(512)) == errno.EINVAL  # not a whole logical block
    assert xbd_read(sc, size - 4096, 4096)[0] == 0
    assert xbd_read(sc, size, 4096)[0] == errno.EIO  # the end is where 512 * sectors says
    teardown(rig)


def test_blkback_publishes_512_byte_sectors(host: Host, tmp_path: object) -> None:
    # The backend half: gntdma's stores have 512-byte logical blocks, and
    # blkback publishes 512 whatever the frontend advertises (blkif.h).
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    r = make_blkback_rig(host, tmp_path, BLKIF_ABI_X86_64)
    keys = r.bb.connect_keys()
    assert keys[BlkifKey.SECTOR_SIZE.value] == "512"
    assert keys[BlkifKey.SECTORS.value] == str(MiB // 512)
    r.close()


# -- discard-granularity and discard-alignment ------------------------------------------------


def test_discard_granularity_and_alignment_are_parsed_with_blkif_defaults() -> None:
    base = {"sectors": "2048", "feature-discard": "1"}
    error, f = XbdBackendFeatures.from_xenstore(
        {**base, "discard-granularity": "4096", "discard-alignment": "1024"}.get)
    assert error == 0 and f is not None
    assert (f.discard_granularity, f.discard_alignment) == (4096, 1024)
    error, f = XbdBackendFeatures.from_xenstore(base.get)
    assert error == 0 and f is not None
    assert (f.discard_granularity, f.discard_alignment) == (0, 0)  # absent
    assert XbdBackendFeatures.from_xenstore(
        {**base, "discard-granularity": "x"}.get)[0] == errno.EINVAL


def test_discard_requests_are_split_at_aligned_sectors_as_linux_does(host: Host) -> None:
    # 8195 sectors, granularity 8 sectors, alignment 2 sectors: the largest
    # discard is the capacity rounded down to the granularity (8192), and the
    # split point is moved back to the aligned sector 8186 (= 2 mod 8).
    size = 4 * MiB + 3 * SECT
    rig = _rig(host, size, {BlkifKey.DISCARD_GRANULARITY.value: "4096",
                            BlkifKey.DISCARD_ALIGNMENT.value: "1024"})
    seen: list[tuple[int, int]] = []

    def record(req: BlkifAnyRequest) -> None:
        if isinstance(req, BlkifRequestDiscard):
            seen.append((req.sector_number, req.nr_sectors))

    rig.be.on_request = record
    rig.be.disk[:] = b"\xee" * size
    assert xbd_discard(rig.sc, 0, size) == 0
    assert seen == [(0, 8186), (8186, 9)]
    assert rig.be.disk == bytes(size)
    seen.clear()
    assert xbd_discard(rig.sc, 4096, 8192) == 0  # within the limit: one request as it is
    assert seen == [(8, 16)]
    teardown(rig)


# -- BLKIF_RSP_EOPNOTSUPP ------------------------------------------------------------------


def test_flushes_stop_after_the_backend_answers_eopnotsupp(host: Host) -> None:
    rig = _rig(host, 4 * MiB, {})
    sc, be = rig.sc, rig.be
    assert xbd_flush(sc) == 0
    be.refuse_ops = {BLKIF_OP_FLUSH_DISKCACHE}
    assert xbd_flush(sc) == errno.EOPNOTSUPP
    assert sc.xbd_flags & (XBDF_FLUSH | XBDF_BARRIER) == 0
    assert be.ops["flush"] == 2
    assert xbd_flush(sc) == errno.EOPNOTSUPP  # not sent again
    assert [op for op, _s, _n in be.log].count(BLKIF_OP_FLUSH_DISKCACHE) == 2
    assert [op for op, _s, _n in be.log].count(BLKIF_OP_WRITE_BARRIER) == 0
    assert xbd_write(sc, 0, bytes(4096)) == 0  # the disk goes on
    teardown(rig)


def test_a_queued_flush_is_not_sent_after_eopnotsupp(host: Host) -> None:
    rig = _rig(host, 4 * MiB, {})
    sc, be = rig.sc, rig.be
    be.refuse_ops = {BLKIF_OP_FLUSH_DISKCACHE}
    be.hold = True
    errors: list[int] = []
    for _ in range(2):  # the second waits behind the first (a flush is single-stepped)
        sc.xbd_strategy(bio(bio_cmd=BIO_FLUSH, bio_done=lambda b: errors.append(b.bio_error)))
    host.sched.yield_()
    assert len(be.held) == 1
    be.release()
    host.sched.run(until=lambda: len(errors) == 2)
    assert errors == [errno.EOPNOTSUPP, errno.EOPNOTSUPP]
    ops = [op for op, _s, _n in be.log]
    assert ops == [BLKIF_OP_FLUSH_DISKCACHE]  # no second flush, and no barrier instead
    teardown(rig)


def test_discards_stop_after_the_backend_answers_eopnotsupp(host: Host) -> None:
    rig = _rig(host, 4 * MiB, {})
    sc, be = rig.sc, rig.be
    be.refuse_ops = {BLKIF_OP_DISCARD}
    assert xbd_discard(sc, 0, 4096) == errno.EOPNOTSUPP
    assert sc.xbd_flags & XBDF_DISCARD == 0
    assert xbd_discard(sc, 0, 4096) == errno.EOPNOTSUPP
    assert be.ops["discard"] == 1
    teardown(rig)
