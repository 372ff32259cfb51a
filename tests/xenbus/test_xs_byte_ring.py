"""The sans-IO xenstore byte ring (:mod:`gntdma.abi.xs_ring`), each rule a test.

Rules: ``xen/io/xs_wire.h`` (``struct xenstore_domain_interface``,
``MASK_XENSTORE_IDX``) and ``docs/misc/xenstore-ring.txt``; C xenstored
``xenstored_domain.c`` ``domain_can_read``/``readchn``/``writechn`` (a
producer more than XENSTORE_RING_SIZE ahead is ``XENSTORE_ERROR_RINGIDX``).
"""

from __future__ import annotations

import struct

from gntdma.abi.xs_ring import XsByteRing
from gntdma.abi.xs_wire import (
    XENSTORE_DOMAIN_INTERFACE_OFFSETS as OFF,
)
from gntdma.abi.xs_wire import (
    XENSTORE_ERROR_RINGIDX,
    XENSTORE_RING_SIZE,
)

U32 = struct.Struct("=I")


def _pair() -> tuple[memoryview, XsByteRing, XsByteRing]:
    page = memoryview(bytearray(4096))
    return page, XsByteRing(page, server=False), XsByteRing(page, server=True)


def test_bytes_written_by_the_guest_are_read_by_the_daemon_across_the_wrap() -> None:
    page, guest, daemon = _pair()
    U32.pack_into(page, OFF["req_prod"], 0xFFFFFFF0)  # indices near the u32 wrap
    U32.pack_into(page, OFF["req_cons"], 0xFFFFFFF0)
    guest.resync()
    daemon.resync()
    data = bytes(range(256)) * 3
    res = guest.write(data)
    assert (res.moved, res.notify, res.error) == (len(data), True, 0)
    res, got = daemon.read()
    assert got == data and res.notify and U32.unpack_from(page, OFF["req_cons"])[0] == (
        0xFFFFFFF0 + len(data)) & 0xFFFFFFFF


def test_write_moves_only_what_fits_and_reports_nothing_to_notify_when_full() -> None:
    _, guest, daemon = _pair()
    assert guest.write(b"x" * 5000).moved == XENSTORE_RING_SIZE
    full = guest.write(b"y")
    assert (full.moved, full.notify) == (0, False)
    daemon.read(100)
    assert guest.write(b"y" * 200).moved == 100


def test_hostile_producer_index_is_an_error_result_not_an_exception() -> None:
    page, _, daemon = _pair()
    U32.pack_into(page, OFF["req_prod"], XENSTORE_RING_SIZE + 1)
    res, data = daemon.read()
    assert (res.error, res.moved, data) == (XENSTORE_ERROR_RINGIDX, 0, b"")
    assert U32.unpack_from(page, OFF["req_cons"])[0] == 0  # nothing consumed


def test_hostile_consumer_index_is_an_error_result() -> None:
    page, _, daemon = _pair()
    U32.pack_into(page, OFF["rsp_cons"], 0x80000000)
    res, room, _ = daemon.room()
    assert res.error == XENSTORE_ERROR_RINGIDX and room == 0
    assert daemon.write(b"reply").error == XENSTORE_ERROR_RINGIDX
    assert U32.unpack_from(page, OFF["rsp_prod"])[0] == 0


def test_peer_index_is_fetched_once_per_read() -> None:
    page, guest, _ = _pair()
    guest.write(b"abc")
    reads: list[int] = []

    daemon = XsByteRing(page, server=True)
    real = U32.unpack_from

    def counting(buf: object, off: int = 0) -> tuple[int, ...]:
        if off == OFF["req_prod"]:
            reads.append(off)
        return real(buf, off)  # type: ignore[arg-type]

    import gntdma.abi.xs_ring as mod
    old = mod._U32
    mod._U32 = type("S", (), {"unpack_from": staticmethod(counting),
                              "pack_into": staticmethod(old.pack_into)})()  # type: ignore[assignment]
    try:
        _res, data = daemon.read()
    finally:
        mod._U32 = old
    assert data == b"abc" and reads == [OFF["req_prod"]]


def test_a_raising_barrier_abandons_the_write_before_the_index_is_published() -> None:
    page = memoryview(bytearray(4096))

    def gone() -> None:
        raise RuntimeError("gone")

    guest = XsByteRing(page, server=False, wmb=gone)
    try:
        guest.write(b"abc")
    except RuntimeError:
        pass
    assert U32.unpack_from(page, OFF["req_prod"])[0] == 0 and guest.prod == 0
