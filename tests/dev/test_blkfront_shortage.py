"""blkfront on a grant table that runs short: the seed's `make -j4` freeze, by name."""

from __future__ import annotations

import random

import pytest
from test_blkfront_lib import SECT, make_rig, random_io, run_threads, teardown

from gntdma.abi.blkif import BLKIF_OP_INDIRECT, BLKIF_OP_WRITE
from gntdma.sys import BIO_WRITE, M_TEMP, M_WAITOK, bio
from gntdma.toolstack.host import Host
from gntdma.xen.gnttab import GrantRefHead


def _take_all_but(g: object, leave: int) -> GrantRefHead:
    """Allocate every free reference the table can ever have but ``leave``."""
    gt = g.gnttab  # type: ignore[attr-defined]
    while gt.nr_frames < gt.max_frames:
        error, h = gt.gnttab_alloc_grant_references(gt.free_count + 1)  # grows the table
        assert error == 0
        gt.gnttab_free_grant_references(h.head)
    error, head = gt.gnttab_alloc_grant_references(gt.free_count - leave)
    assert error == 0 and gt.free_count == leave
    return head


def test_deferred_load_freezes_the_queue_so_later_bios_keep_their_order(host: Host) -> None:
    """A small bio behind a big one that waits for references must not overtake it."""
    g = host.create_guest("g", max_grant_frames=2)
    rig = make_rig(host, g, ring_page_order=0)
    sc, be, kern = rig.sc, rig.be, g.kernel
    head = _take_all_but(g, leave=100)
    big_len, small_len = 1 << 20, 4096
    va = kern.malloc(big_len + small_len, M_TEMP, M_WAITOK)
    done: list[bio] = []
    big = bio(bio_cmd=BIO_WRITE, bio_offset=0, bio_bcount=big_len, bio_data=va,
              bio_done=done.append)
    small = bio(bio_cmd=BIO_WRITE, bio_offset=4 << 20, bio_bcount=small_len,
                bio_data=va + big_len, bio_done=done.append)
    sc.xbd_strategy(big)  # one request of 256 references: deferred
    sc.xbd_strategy(small)  # would fit in the 100 left, but must wait its turn
    host.sched.yield_()
    st = sc.statistics()
    assert st.deferred_loads == 1 and be.log == [] and done == []
    assert sc.xbd_qfrozen_cnt == 1
    g.gnttab.gnttab_free_grant_references(head.head)
    host.sched.run(until=lambda: len(done) == 2)
    assert big.bio_error == 0 and small.bio_error == 0
    assert [(op, sector) for op, sector, _ in be.log] == [
        (BLKIF_OP_INDIRECT, 0), (BLKIF_OP_WRITE, 8192)]
    assert sc.xbd_qfrozen_cnt == 0
    kern.free(va, M_TEMP)
    teardown(rig)


def test_shortage_with_nothing_in_flight_completes_when_references_come_back(
        host: Host) -> None:
    """The wait is for references held elsewhere: freeing them restarts the queue."""
    g = host.create_guest("g", max_grant_frames=1)
    rig = make_rig(host, g, ring_page_order=0, max_indirect_segments=64)
    head = _take_all_but(g, leave=3)
    from gntdma.dev.blkfront_io import xbd_read, xbd_write

    results: list[object] = []

    def io() -> None:
        results.append(xbd_write(rig.sc, 0, b"\x5a" * (32 * 4096)))
        results.append(xbd_read(rig.sc, 0, 32 * 4096))

    t = host.sched.spawn(io, name="io")
    host.sched.run(until=lambda: rig.sc.statistics().deferred_loads == 1)
    host.sched.yield_()
    assert results == []
    g.gnttab.gnttab_free_grant_references(head.head)
    host.sched.run(until=lambda: t.exc is not None or len(results) == 2)
    assert results == [0, (0, b"\x5a" * (32 * 4096))]
    teardown(rig)


@pytest.mark.slow
def test_grant_shortage_eight_threads_two_disks_max_grant_frames_4(host: Host) -> None:
    """Seed: `make -j4` froze on a grant shortage; with busdma_xen it must complete."""
    g = host.create_guest("g", max_grant_frames=4, memory_mb=128)
    size = 32 << 20
    rigs = [make_rig(host, g, name=f"xbd{i}", size=size) for i in range(2)]
    models = [bytearray(size) for _ in rigs]
    region = size // 4
    big = (8, 64, 255, 256, 257, 511, 1024, 2048, 4096, 8192)  # sectors: up to 4 MiB

    def worker(i: int) -> list[int]:
        rig, model = rigs[i % 2], models[i % 2]
        return random_io(rig, model, random.Random(100 + i), 24, base=(i // 2) * region,
                         span=region, max_len=4 << 20, gen=i + 1, sizes=big)

    threads = run_threads(host, [lambda i=i: worker(i) for i in range(8)])
    assert [t.result for t in threads] == [[]] * 8
    for rig, model in zip(rigs, models, strict=True):
        assert bytes(rig.be.disk) == bytes(model)
    stats = [r.sc.statistics() for r in rigs]
    assert sum(s.deferred_loads for s in stats) > 0
    assert all(s.indirect_requests > 0 and s.errors == 0 for s in stats)
    assert g.gnttab.statistics().peak_allocated > 1900  # the table really ran short
    assert all(s.in_flight == 0 and s.grant_refs_in_use == 4 + 128 for s in stats)
    teardown(rigs[0], last=False)
    teardown(rigs[1])
    assert g.gnttab.statistics().allocated == 0
    assert SECT == 512
