"""blkback's own checks, with a backing store that would accept anything.

A :class:`DiskImage` refuses a write when it is read-only and a transfer past
its end, so tests over an image cannot tell whether blkback checked. Here the
store is :class:`PermissiveStore`: it says it is read-only (or small) but
does whatever it is asked and records it, so a refusal can only come from
blkback, and it must come before any I/O.

The rules are Linux's: ``xen_vbd_translate`` in
``drivers/block/xen-blkback/blkback.c`` refuses a write (and a discard, which
``dispatch_discard_io`` translates as a write) on a read-only vbd with
``-EACCES``, and a request whose end passes ``vbd_sz`` with ``-EACCES``;
``dispatch_rw_block_io`` and ``dispatch_discard_io`` answer both with
``BLKIF_RSP_ERROR`` before any bio is submitted.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from test_blkback_lib import PAGE, SECT, Rig, make_rig, pattern

from gntdma.abi.blkif import (
    BLKIF_ABI_X86_64,
    BLKIF_DISCARD_SECURE,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_READ,
    BLKIF_OP_WRITE,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BLKIF_RSP_OKAY,
    BlkifKey,
    BlkifRequest,
    BlkifRequestDiscard,
    BlkifRequestSegment,
)
from gntdma.dev.blkback_req import BlkbackLimits, blkback_check_request
from gntdma.toolstack.host import Host

#: Sectors on the permissive disk.
NSECT = 64


class PermissiveStore:
    """A BackingStore that does everything it is asked and records it."""

    def __init__(self, *, readonly: bool, sectors: int = NSECT) -> None:
        self._readonly = readonly
        self._size = sectors * SECT
        self.calls: list[tuple[str, int, int]] = []

    @property
    def size(self) -> int:
        return self._size

    @property
    def readonly(self) -> bool:
        return self._readonly

    def preadv(self, bufs: Sequence[memoryview], offset: int) -> int:
        n = sum(len(b) for b in bufs)
        self.calls.append(("preadv", offset, n))
        for b in bufs:
            b[:] = bytes(len(b))
        return n

    def pwritev(self, bufs: Sequence[memoryview], offset: int) -> int:
        n = sum(len(b) for b in bufs)
        self.calls.append(("pwritev", offset, n))
        return n

    def flush(self) -> None:
        self.calls.append(("flush", 0, 0))

    def discard(self, offset: int, length: int) -> None:
        self.calls.append(("discard", offset, length))


def _rig(host: Host, tmp_path: Path, *, readonly: bool) -> tuple[Rig, PermissiveStore]:
    # The image underneath is writable and large: only blkback can refuse.
    r = make_rig(host, tmp_path, BLKIF_ABI_X86_64, size=1 << 20)
    store = PermissiveStore(readonly=readonly)
    r.bb.store = store
    return r, store


def _discard(r: Rig, sector: int, n: int) -> int:
    rid = r.front.new_id()
    r.front.put(BlkifRequestDiscard(operation=BLKIF_OP_DISCARD, id=rid, sector_number=sector,
                                    nr_sectors=n))
    r.front.push()
    (rsp,) = r.front.wait(rid)
    return rsp.status


def test_blkback_refuses_a_write_to_a_read_only_vbd_before_any_io(
        host: Host, tmp_path: Path) -> None:
    r, store = _rig(host, tmp_path, readonly=True)
    f = r.front
    b = f.buf(True, pattern(1))
    w = f.rw(BLKIF_OP_WRITE, 0, [(b, 0, 7)])
    fua = f.rw(BLKIF_OP_FLUSH_DISKCACHE, 8, [(b, 0, 7)])  # a write, then a flush
    iw, _ = f.indirect(BLKIF_OP_WRITE, 16, [(b, 0, 7)])
    f.push()
    assert [rs.status for rs in f.wait(w, fua, iw)] == [BLKIF_RSP_ERROR] * 3
    assert store.calls == []
    # a read of the same disk is served: the refusal is about writing
    x = f.buf(fill=pattern(2))
    rd = f.rw(BLKIF_OP_READ, 0, [(x, 0, 7)])
    f.push()
    assert f.status(rd) == BLKIF_RSP_OKAY
    assert store.calls == [("preadv", 0, PAGE)]
    r.close()


def test_blkback_refuses_a_discard_on_a_read_only_vbd_before_any_io(
        host: Host, tmp_path: Path) -> None:
    r, store = _rig(host, tmp_path, readonly=True)
    assert _discard(r, 0, 8) == BLKIF_RSP_ERROR
    assert store.calls == []
    r.close()


def test_blkback_refuses_a_sector_range_past_the_end_of_the_disk_before_any_io(
        host: Host, tmp_path: Path) -> None:
    r, store = _rig(host, tmp_path, readonly=False)
    f = r.front
    b = f.buf(True, pattern(3))
    x = f.buf(fill=pattern(4))
    ids = [
        f.rw(BLKIF_OP_READ, NSECT - 7, [(x, 0, 7)]),  # 8 sectors, one past the end
        f.rw(BLKIF_OP_WRITE, NSECT, [(b, 0, 0)]),  # starts at the end
        f.rw(BLKIF_OP_WRITE, NSECT - 8, [(b, 0, 7), (b, 0, 0)]),  # the second segment
        f.rw(BLKIF_OP_FLUSH_DISKCACHE, NSECT - 1, [(b, 0, 1)]),
        f.rw(BLKIF_OP_READ, (1 << 64) - 1, [(x, 0, 0)]),  # would wrap in C
        f.indirect(BLKIF_OP_READ, NSECT - 8, [(x, 0, 7), (x, 7, 7)])[0],  # checked by
        f.indirect(BLKIF_OP_WRITE, NSECT - 1, [(b, 0, 1)])[0],  # the worker
    ]
    f.push()
    assert [rs.status for rs in f.wait(*ids)] == [BLKIF_RSP_ERROR] * len(ids)
    assert _discard(r, NSECT - 4, 5) == BLKIF_RSP_ERROR
    assert store.calls == []
    # the last sectors themselves are served
    last = f.rw(BLKIF_OP_WRITE, NSECT - 8, [(b, 0, 7)])
    f.push()
    assert f.status(last) == BLKIF_RSP_OKAY
    assert _discard(r, NSECT - 4, 4) == BLKIF_RSP_OKAY
    assert store.calls == [("pwritev", (NSECT - 8) * SECT, PAGE),
                           ("discard", (NSECT - 4) * SECT, 4 * SECT)]
    r.close()


# -- the sans-IO step alone -----------------------------------------------------------------

_RO = BlkbackLimits(nr_sectors=NSECT, readonly=True, feature_discard=True,
                    max_indirect_segments=32)
_RW = BlkbackLimits(nr_sectors=NSECT, readonly=False, feature_discard=True,
                    max_indirect_segments=32)


def _raw_rw(op: int, sector: int, segs: list[tuple[int, int, int]]) -> bytes:
    req = BlkifRequest(operation=op, nr_segments=len(segs), handle=0, id=7,
                       sector_number=sector,
                       seg=tuple(BlkifRequestSegment(gref=g, first_sect=a, last_sect=z)
                                 for g, a, z in segs))
    return BLKIF_ABI_X86_64.pack_request(req)


@pytest.mark.parametrize(("lim", "op", "sector", "segs", "status"), [
    (_RO, BLKIF_OP_WRITE, 0, [(1, 0, 7)], BLKIF_RSP_ERROR),
    (_RO, BLKIF_OP_FLUSH_DISKCACHE, 0, [(1, 0, 7)], BLKIF_RSP_ERROR),
    # Linux xen-blkback dispatch_rw_block_io: a flush is REQ_OP_WRITE with REQ_PREFLUSH,
    # and xen_vbd_translate refuses any operation but a read on a read-only vbd (-EACCES,
    # fail_response), segments or none.
    (_RO, BLKIF_OP_FLUSH_DISKCACHE, 0, [], BLKIF_RSP_ERROR),
    (_RW, BLKIF_OP_FLUSH_DISKCACHE, 0, [], BLKIF_RSP_OKAY),
    (_RO, BLKIF_OP_READ, 0, [(1, 0, 7)], BLKIF_RSP_OKAY),
    (_RW, BLKIF_OP_READ, NSECT - 8, [(1, 0, 7)], BLKIF_RSP_OKAY),
    (_RW, BLKIF_OP_READ, NSECT - 7, [(1, 0, 7)], BLKIF_RSP_ERROR),
    (_RW, BLKIF_OP_WRITE, NSECT, [(1, 3, 3)], BLKIF_RSP_ERROR),
])
def test_the_request_step_checks_without_io(lim: BlkbackLimits, op: int, sector: int,
                                            segs: list[tuple[int, int, int]],
                                            status: int) -> None:
    id_, operation, got, work = blkback_check_request(BLKIF_ABI_X86_64,
                                                     _raw_rw(op, sector, segs), lim)
    assert (id_, operation, got) == (7, op, status)
    assert (work is not None) == (status == BLKIF_RSP_OKAY)


def test_the_request_step_refuses_discard_on_read_only_and_past_the_end() -> None:
    def check(lim: BlkbackLimits, sector: int, n: int) -> int:
        raw = BLKIF_ABI_X86_64.pack_request(BlkifRequestDiscard(
            operation=BLKIF_OP_DISCARD, id=3, sector_number=sector, nr_sectors=n))
        return blkback_check_request(BLKIF_ABI_X86_64, raw, lim)[2]

    assert check(_RO, 0, 8) == BLKIF_RSP_ERROR
    assert check(_RW, NSECT - 8, 9) == BLKIF_RSP_ERROR
    assert check(_RW, NSECT - 8, 8) == BLKIF_RSP_OKAY
    off = BlkbackLimits(nr_sectors=NSECT, readonly=False, feature_discard=False,
                        max_indirect_segments=0)
    assert check(off, 0, 8) == BLKIF_RSP_EOPNOTSUPP


def test_the_secure_discard_flag_is_ignored_when_discard_secure_is_0(
        host: Host, tmp_path: Path) -> None:
    # blkif.h, struct blkif_request_discard: BLKIF_DISCARD_SECURE is "ignored if
    # discard-secure=0"; Linux dispatch_discard_io issues a plain discard then.
    r, store = _rig(host, tmp_path, readonly=False)
    assert r.bb.connect_keys()[BlkifKey.DISCARD_SECURE.value] == "0"
    rid = r.front.new_id()
    r.front.put(BlkifRequestDiscard(operation=BLKIF_OP_DISCARD, flag=BLKIF_DISCARD_SECURE,
                                    id=rid, sector_number=8, nr_sectors=8))
    r.front.push()
    (rsp,) = r.front.wait(rid)
    assert rsp.status == BLKIF_RSP_OKAY
    assert store.calls == [("discard", 8 * SECT, 8 * SECT)]
    r.close()
