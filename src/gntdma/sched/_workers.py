"""The greenlets kernel threads run on, kept for the next threads once theirs end.

A greenlet's first switch and its end cost about 6 us (its stack is set up and
torn down). The explorer runs thousands of schedules that each start and end
the same twenty-odd threads; with a :class:`WorkerPool` (``run_once``'s
``workers``), a worker that ran a thread to its end waits in the pool for the
next thread instead, and taking it again costs one switch. A worker runs one
thread's ``body`` (``Scheduler.spawn``'s, which catches everything its thread
raises, GreenletExit included), drops it (no frame, argument or result of that
thread stays with the worker), and then does what a greenlet's end does: it
switches to its parent, here after joining the pool. Without a pool (a host,
the tests) a worker runs one thread and ends, a greenlet per thread as before.

What differs from a greenlet per thread is only when the worker's greenlet ends:

- A thread not started yet is a worker whose ``body`` is set; it is started,
  as a new greenlet is, by the hub (``Hub._run_one`` sets its parent to the
  hub and switches to it).
- A worker that was made the parent of another greenlet (a kernel thread that
  killed another: ``Scheduler.kill`` sets the killed one's parent to its
  caller) is not kept: a greenlet whose parent has ended goes on to that
  parent's parent, which a worker running the next thread would not be. It
  ends as a greenlet does (``keep`` False).
- At most ``POOL_MAX`` workers wait in a pool; one more ends. A pool is used
  on the OS thread that made it only (greenlets never switch between OS
  threads), and :meth:`WorkerPool.close` ends the workers waiting in it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Final

import greenlet

__all__ = ["POOL_MAX", "Worker", "WorkerPool", "give_back", "made_parent", "take_worker"]

#: Workers kept waiting in a pool.
POOL_MAX: Final = 64


class WorkerPool:
    """Workers waiting for a thread to run, for one OS thread."""

    def __init__(self) -> None:
        self.workers: list[Worker] = []
        self.ident = threading.get_ident()

    def close(self) -> None:
        """End every worker waiting (each ends as a greenlet does, back here)."""
        workers, self.workers = self.workers, []
        here = greenlet.getcurrent()
        for w in workers:
            w.pool = None
            if w.gr_frame is not None:  # started: waits in _work
                w.parent = here
                w.throw(greenlet.GreenletExit)


class Worker(greenlet.greenlet):  # type: ignore[misc]
    """A greenlet that runs one kernel thread's body after another."""

    def __init__(self, pool: WorkerPool | None) -> None:
        super().__init__(_work)
        #: The thread's body while it has not started (None once started).
        self.body: Callable[[], None] | None = None
        #: The pool the worker waits in once its thread ends (None: it ends).
        self.pool = pool
        #: Whether the worker may wait for another thread once its own ends.
        self.keep = True


def take_worker(body: Callable[[], None], pool: WorkerPool | None) -> Worker:
    """A worker (a waiting one, else a new one) that will run ``body`` when started."""
    if pool is not None and pool.ident != threading.get_ident():
        pool = None  # another OS thread's: a greenlet of its own, as without a pool
    w = pool.workers.pop() if pool is not None and pool.workers else Worker(pool)
    w.body = body
    return w


def give_back(w: Worker) -> None:
    """``w``'s thread ends before it started (killed): ``w`` waits for another."""
    w.body = None
    pool = w.pool
    if pool is not None and w.keep and len(pool.workers) < POOL_MAX:
        pool.workers.append(w)


def made_parent(g: object) -> None:
    """``g`` becomes a greenlet's parent: if it is a worker, it is not kept."""
    if type(g) is Worker:
        g.keep = False


def _work() -> None:
    me = greenlet.getcurrent()
    assert type(me) is Worker
    while True:
        body = me.body
        assert body is not None
        me.body = None
        me.gr_context = None  # an empty context, as a new greenlet starts in
        body()
        del body
        pool = me.pool
        if pool is None or not me.keep or len(pool.workers) >= POOL_MAX:
            return  # ends as a greenlet does: to its parent
        pool.workers.append(me)
        del pool
        me.parent.switch()  # the thread's end; back here to start the next
