"""blkfront under preemptive exploration strategies (random, PCT) on a virtual clock.

Ring barriers, lock operations and wakeups are scheduling points there, so
another thread may run between any two of them. This found a double
``biodone``: a drain of completed bios iterated a list another thread could
append to while the unlock let it run.
"""

from __future__ import annotations

import errno
import random
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import pytest
from test_blkfront_lib import SECT, make_rig, random_io, run_threads, stamp

from gntdma.dev.blkfront_io import xbd_write
from gntdma.sched import (
    WITNESS,
    Mutex,
    PctStrategy,
    RandomStrategy,
    Strategy,
    VirtualClock,
    msleep,
    mtx_lock,
    mtx_unlock,
    wakeup,
)
from gntdma.toolstack.host import Host


@contextmanager
def explored_host(strategy: Strategy) -> Iterator[Host]:
    WITNESS.reset()
    h = Host(strategy=strategy, clock=VirtualClock())
    try:
        yield h
        h.sched.yield_()
        assert h.leaks() == []
        assert WITNESS.reports == [], [r.format() for r in WITNESS.reports]
    except BaseException:
        with suppress(BufferError):  # a failed run still holds views of guest pages
            h.close()
        raise
    else:
        h.close()
    finally:
        WITNESS.reset()


def scenario(h: Host, seed: int) -> None:
    """Verified I/O from four threads on a short grant table, then removal mid-write."""
    g = h.create_guest("g", max_grant_frames=1)
    rig = make_rig(h, g, ring_page_order=0, size=4 << 20, max_indirect_segments=64)
    model = bytearray(4 << 20)
    region = 1 << 20
    threads = run_threads(h, [
        lambda i=i: random_io(rig, model, random.Random(seed * 10 + i), 6, base=i * region,
                              span=region, max_len=512 * 1024, gen=i + 1,
                              sizes=(1, 8, 64, 128, 1024))
        for i in range(4)])
    assert [t.result for t in threads] == [[]] * 4
    assert bytes(rig.be.disk) == bytes(model)
    ends: list[int] = []
    writes = [0]
    wlock = Mutex("writes")  # the interlock of the remover's sleep (no lost wakeup)

    def writer(i: int) -> None:
        # Bounded: under PCT a low-priority remover may only run once writers stop.
        for n in range(40):
            error = xbd_write(rig.sc, i * region, stamp(i * region, 64 * SECT, n))
            if error != 0:
                ends.append(error)
                return
            mtx_lock(wlock)
            writes[0] += 1
            wakeup(writes)
            mtx_unlock(wlock)
        ends.append(0)

    def remover() -> None:
        mtx_lock(wlock)
        while writes[0] < 6:
            msleep(writes, wlock, "writes")
        mtx_unlock(wlock)
        assert rig.sc.xbd_closing() == 0
        rig.be.disconnect()
        assert rig.sc.xbd_free() == 0
        assert rig.sc.xbd_free() == 0

    run_threads(h, [*(lambda i=i: writer(i) for i in range(3)), remover])
    assert len(ends) == 3 and set(ends) <= {0, errno.ENXIO}
    assert rig.sc.statistics().state == "freed"


@pytest.mark.parametrize("seed", range(12))
def test_random_schedules(seed: int) -> None:
    with explored_host(RandomStrategy(seed)) as h:
        scenario(h, seed)


@pytest.mark.parametrize("seed", range(12))
def test_pct_schedules(seed: int) -> None:
    with explored_host(PctStrategy(seed, depth=3, max_steps=20000)) as h:
        scenario(h, seed)
