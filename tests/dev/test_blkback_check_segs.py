"""blkback_check_segs: every segment within its page and not empty, the whole
transfer inside the disk (Linux drivers/block/xen-blkback/blkback.c
``xen_blkbk_parse_indirect`` and ``dispatch_rw_block_io``: ``last_sect >=
XEN_PAGE_SIZE >> 9`` or ``last_sect < first_sect`` fails the request; ``vbd_translate``
refuses ``sector_number + nr_sects`` past the disk's size)."""

from __future__ import annotations

import errno

from gntdma.dev.blkback_req import blkback_check_segs


def test_whole_pages_are_8_sectors_each_and_must_fit_the_disk() -> None:
    segs = [(g, 0, 7) for g in range(256)]
    assert blkback_check_segs(segs, 0, 2048) == 0
    assert blkback_check_segs(segs, 1, 2048) == errno.EINVAL
    assert blkback_check_segs(segs, 1, 2049) == 0
    assert blkback_check_segs(segs[:2], 2040, 2056) == 0
    assert blkback_check_segs(segs[:2], 2041, 2056) == errno.EINVAL


def test_a_bad_segment_among_whole_pages_fails_the_request() -> None:
    for bad in ((9, 0, 8), (9, 5, 4), (9, 1, 7), (9, 0, 6)):
        segs = [(g, 0, 7) for g in range(16)]
        segs[9] = bad
        want = errno.EINVAL if bad[2] >= 8 or bad[2] < bad[1] else 0
        assert blkback_check_segs(segs, 0, 1 << 20) == want
    assert blkback_check_segs([(1, 0, 7), (2, 3, 3)], 0, 9) == 0
    assert blkback_check_segs([(1, 0, 7), (2, 3, 3)], 0, 8) == errno.EINVAL
    assert blkback_check_segs([], 1 << 30, 8) == 0  # no sectors: nothing to fit
