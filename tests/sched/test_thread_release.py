"""A kernel thread that exits is forgotten by the scheduler: its greenlet, its frames
and everything they reference are freed (FreeBSD's thread_exit hands the thread
to thread_reap, sys/kern/kern_thread.c; nothing keeps a dead thread's stack).

Counted with ``gc`` against the start, so a scheduler list that keeps dead
threads (or a KThread that keeps its dead greenlet) fails.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import greenlet
import pytest

from gntdma.sched import (
    PIDLE,
    KThread,
    Scheduler,
    ThreadState,
    msleep,
    mtx_init,
    mtx_lock,
    mtx_unlock,
    tsleep,
    wakeup,
)


@pytest.fixture
def sched() -> Iterator[Scheduler]:
    s = Scheduler().install()
    yield s
    s.shutdown()
    Scheduler.uninstall()


class Payload:
    """Something only a thread's frame references."""


def _counts() -> dict[str, int]:
    gc.collect()
    objs = gc.get_objects()
    main = greenlet.getcurrent()  # the scheduler's hub: made on first use, kept
    return {
        "KThread": sum(1 for o in objs if isinstance(o, KThread)),
        "greenlet": sum(1 for o in objs if isinstance(o, greenlet.greenlet) and o is not main),
        "Payload": sum(1 for o in objs if isinstance(o, Payload)),
    }


def test_thread_and_its_greenlet_are_released_when_it_exits(sched: Scheduler) -> None:
    start = _counts()
    chan = object()
    m = mtx_init("rel")

    def body(i: int) -> int:
        local = Payload()  # lives in the thread's frame only
        mtx_lock(m)
        if i % 2 == 0:  # half of them sleep once before they exit
            msleep(chan, m, "rel", 0.0, PIDLE)
        mtx_unlock(m)
        return id(local) & 1

    threads = [sched.spawn(body, i, name=f"t{i}") for i in range(1000)]
    sched.run(until=lambda: all(t.state in (ThreadState.BLOCKED, ThreadState.DONE)
                                for t in threads))
    assert sched.statistics().live_threads == 500
    mtx_lock(m)
    wakeup(chan)
    mtx_unlock(m)
    sched.run()
    assert all(t.state is ThreadState.DONE and t.exc is None for t in threads)
    assert sched.threads == []
    st = sched.statistics()
    assert (st.threads, st.live_threads) == (1000, 0)
    threads.clear()
    assert _counts() == start


def test_a_kept_kthread_does_not_keep_its_greenlet(sched: Scheduler) -> None:
    """A caller may keep the KThread (its result, its exception); not its stack."""
    start = _counts()
    t = sched.spawn(lambda: Payload() and 7, name="kept")
    sched.run()
    assert t.result == 7
    assert _counts() == start | {"KThread": start["KThread"] + 1}


def test_killed_threads_are_released(sched: Scheduler) -> None:
    """Threads killed where they sleep, or before they ever ran (a crashed domain's)."""
    start = _counts()

    def sleeper() -> None:
        p = Payload()
        tsleep(p, "forever", 0.0, PIDLE)

    sleepers = [sched.spawn(sleeper, name=f"s{i}", daemon=True) for i in range(100)]
    sched.run(until=lambda: all(t.state is ThreadState.BLOCKED for t in sleepers))
    never = [sched.spawn(sleeper, name=f"n{i}") for i in range(100)]
    for t in sleepers + never:
        sched.kill(t)
    assert sched.threads == [] and sched.statistics().live_threads == 0
    sched.yield_()  # the run queue lets go of the killed threads that never ran
    sleepers.clear()
    never.clear()
    del t
    assert _counts() == start
