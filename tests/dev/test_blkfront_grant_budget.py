"""blkfront sizes its requests by the grant references it may use (issue 11 item 1).

DESIGN section 7: "the driver sizes its requests so that [a load waiting for
references that can never come back] does not happen". FreeBSD's xbd
(sys/dev/xen/blkfront/blkfront.c, ``xbd_connect``) takes
``feature-max-indirect-segments`` as it is and allocates indirect pages for
every command; on a one-frame table two such disks hold more than half the
table for life and one request of the first needs more than the rest.
"""

from __future__ import annotations

from gntdma.abi.blkif import BLKIF_MAX_SEGMENTS_PER_REQUEST
from gntdma.dev.blkfront_cmd import XBD_INDIRECT_SEGS_TO_PAGES, xbd_size_requests


def test_request_never_larger_than_what_the_table_can_serve_beside_what_is_held() -> None:
    for budget in range(0, 1200, 7):
        for ncmds in (32, 64, 128):
            segs = xbd_size_requests(256, ncmds, budget)
            held = ncmds * XBD_INDIRECT_SEGS_TO_PAGES(segs) \
                if segs > BLKIF_MAX_SEGMENTS_PER_REQUEST else 0
            assert held + segs <= budget, (budget, ncmds, segs)
            assert segs <= 256


def test_small_share_falls_back_to_direct_requests_large_one_keeps_indirect() -> None:
    # One frame (504 refs), four disks: 125 each cannot pay 128 indirect pages.
    assert xbd_size_requests(256, 128, 125) == BLKIF_MAX_SEGMENTS_PER_REQUEST
    # Half a frame: indirect pages for 128 commands and a 122-segment request.
    assert xbd_size_requests(256, 128, 250) == 122
    # Plenty: what was asked for.
    assert xbd_size_requests(256, 128, 4000) == 256
    # Fewer than 11 references: direct requests of fewer segments.
    assert xbd_size_requests(256, 128, 5) == 5
