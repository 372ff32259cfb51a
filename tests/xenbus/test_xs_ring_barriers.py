"""Where the byte ring puts its barriers, each side, as the C ends put them.

Sources:

- Linux ``drivers/xen/xenbus/xenbus_comms.c``: ``xb_write`` reads the indices,
  then ``mb()`` ("Must write data /after/ reading the consumer index"), copies,
  ``wmb()`` ("Other side must not see new producer until data is there"),
  publishes ``req_prod``; ``xb_read`` reads the indices, ``rmb()`` ("Must read
  data /after/ reading the producer index"), copies, ``mb()`` ("Other side
  must not see free space until we've copied out"), publishes ``rsp_cons``.
- FreeBSD ``sys/dev/xen/xenstore/xenstore.c``: ``xs_write_store`` (``wmb()``
  before ``req_prod += avail``) and ``xs_read_store`` (``rmb()`` before the
  copy, ``mb()`` before ``rsp_cons += avail``).
- C xenstored 4.17 ``tools/xenstore/xenstored_domain.c``: ``writechn`` and
  ``readchn`` put ``xen_mb()`` after reading the indices and again between
  the copy and the index update.
"""

from __future__ import annotations

import struct

from gntdma.abi.xs_ring import XsByteRing
from gntdma.abi.xs_wire import XENSTORE_DOMAIN_INTERFACE_OFFSETS as OFF

U32 = struct.Struct("=I")


def _recording_ring(page: memoryview, server: bool, log: list[str]) -> XsByteRing:
    out = "rsp" if server else "req"

    def barrier(name: str) -> None:
        # What the page shows at the barrier: have our bytes been copied yet?
        copied_out = bytes(page[OFF[out]: OFF[out] + 4]) != b"\0\0\0\0"
        log.append(f"{name}:{'after' if copied_out else 'before'}-copy-out")

    return XsByteRing(page, server=server, wmb=lambda: barrier("wmb"),
                      rmb=lambda: barrier("rmb"), mb=lambda: barrier("mb"))


def test_write_puts_a_full_barrier_between_reading_the_consumer_index_and_the_copy() -> None:
    for server in (False, True):
        page = memoryview(bytearray(4096))
        log: list[str] = []
        ring = _recording_ring(page, server, log)
        prod_off = OFF["rsp_prod" if server else "req_prod"]
        res = ring.write(b"abcd")
        assert res.moved == 4
        # mb before the bytes are written, wmb after them and before the index.
        assert log == ["mb:before-copy-out", "wmb:after-copy-out"], (server, log)
        assert U32.unpack_from(page, prod_off)[0] == 4


def test_write_with_a_consumer_index_from_room_still_has_the_full_barrier() -> None:
    page = memoryview(bytearray(4096))
    log: list[str] = []
    ring = _recording_ring(page, False, log)
    res, room, cons = ring.room()
    assert res.error == 0 and room == 1024
    assert ring.write(b"wxyz", cons).moved == 4
    assert log == ["mb:before-copy-out", "wmb:after-copy-out"]


def test_read_puts_rmb_before_the_copy_and_mb_before_giving_the_room_back() -> None:
    page = memoryview(bytearray(4096))
    seen: list[tuple[str, int]] = []
    cons_off = OFF["rsp_cons"]

    def barrier(name: str) -> None:
        seen.append((name, U32.unpack_from(page, cons_off)[0]))

    ring = XsByteRing(page, server=False, rmb=lambda: barrier("rmb"),
                      mb=lambda: barrier("mb"), wmb=lambda: barrier("wmb"))
    page[OFF["rsp"]: OFF["rsp"] + 3] = b"xyz"
    U32.pack_into(page, OFF["rsp_prod"], 3)
    res, data = ring.read()
    assert data == b"xyz" and res.moved == 3
    # Both barriers come before the consumer index moves.
    assert seen == [("rmb", 0), ("mb", 0)]
    assert U32.unpack_from(page, cons_off)[0] == 3
