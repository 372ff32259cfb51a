"""taskqueue(9): deferred work run by a daemon kernel thread.

Theory of operation
-------------------
A :class:`TaskQueue` is a FIFO of :class:`Task` objects and one daemon kernel
thread (spawned on the current scheduler with ``daemon=True``, so an idle
queue never keeps the scheduler alive nor counts in a deadlock). The thread
sleeps on the queue; ``taskqueue_enqueue`` appends and wakes it.

A task already pending is not queued twice: its ``ta_pending`` counts the
enqueues, and the function gets that count (``fn(arg, pending)``), as in
FreeBSD. A running task may be enqueued again; it then runs again later.

Rules, as FreeBSD's ``sys/kern/subr_taskqueue.c``: the queue, the pending
counts and the running task are protected by the queue's ``tq_mutex`` (an
``MTX_DEF`` mutex of class "taskqueue"). The thread checks for work and sleeps
with it as interlock (``TQ_SLEEP(tq, tq, &tq->tq_mutex, 0, "-", 0)`` in
``taskqueue_thread_loop``), idle (``PIDLE``: the hung-task watchdog does not
count a service thread waiting for work); ``taskqueue_drain`` sleeps on the
task with the same interlock, so neither can lose the wakeup that
``taskqueue_enqueue`` or the end of a task sends, whatever the schedule.

No scheduling point comes while ``tq_mutex`` is held (the wakeups are sent
just after it is dropped), so ``taskqueue_enqueue`` may be called from any
kernel thread, thread0, or the scheduler hub (a timer callback): the hub
never finds the mutex held. ``taskqueue_enqueue`` takes a sleep mutex, so it
may not be called inside a spin mutex's critical section (FreeBSD's
``taskqueue_create_fast`` queues are for that; none exists here).
"""

from __future__ import annotations

import errno
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, final

from gntdma.sched import (
    MTX_DEF,
    PIDLE,
    KernelPanic,
    current_scheduler,
    msleep,
    mtx_init,
    mtx_lock,
    mtx_unlock,
    wakeup,
)

if TYPE_CHECKING:
    from gntdma.sys._kernel import Kernel

__all__ = [
    "Task",
    "TaskQueue",
    "taskqueue_cancel",
    "taskqueue_drain",
    "taskqueue_drain_all",
    "taskqueue_enqueue",
    "taskqueue_free",
]

_PENDING_MAX = 0xFFFF


@final
class Task:
    """A task (``TASK_INIT(&task, 0, fn, arg)``): ``fn(arg, pending)`` runs on a queue."""

    __slots__ = ("_queue", "ta_context", "ta_func", "ta_pending", "ta_priority")

    def __init__(self, fn: Callable[[object, int], None], arg: object = None,
                 priority: int = 0) -> None:
        self.ta_func = fn
        self.ta_context = arg
        self.ta_pending = 0
        self.ta_priority = priority
        self._queue: TaskQueue | None = None

    def __repr__(self) -> str:
        name = getattr(self.ta_func, "__qualname__", repr(self.ta_func))
        return f"<Task {name} pending={self.ta_pending}>"


@final
class TaskQueue:
    """A taskqueue with one daemon thread (``taskqueue_create`` + ``taskqueue_start_threads``)."""

    def __init__(self, name: str, kern: Kernel | None = None) -> None:
        self.name = name
        self.kern = kern
        self._queue: deque[Task] = deque()
        self._running: Task | None = None
        self._exit = False
        self.tasks_run = 0
        #: FreeBSD's tq_mutex (``_taskqueue_create``: MTX_DEF, named "taskqueue").
        self.tq_mutex = mtx_init("taskqueue", MTX_DEF)
        prefix = f"{kern.name}/" if kern is not None else ""
        self.thread = current_scheduler().spawn(
            self._loop, name=f"{prefix}{name}", daemon=True, domain=kern
        )

    def __repr__(self) -> str:
        return f"<TaskQueue {self.name} queued={len(self._queue)}>"

    def pending(self) -> int:
        """Tasks queued or running."""
        return len(self._queue) + (1 if self._running is not None else 0)

    def _loop(self) -> None:
        """taskqueue_thread_loop: run the tasks, sleep idle with tq_mutex as interlock."""
        m = self.tq_mutex
        mtx_lock(m)
        while True:
            while not self._queue:
                if self._exit:
                    mtx_unlock(m)
                    return
                msleep(self, m, "-", 0.0, PIDLE)
            task = self._queue.popleft()
            pending = task.ta_pending
            task.ta_pending = 0
            self._running = task
            mtx_unlock(m)
            try:
                task.ta_func(task.ta_context, pending)
            except BaseException as exc:
                # The thread dies with the task (a panic crashes the domain; a
                # kill at shutdown): no lock, and no scheduling point for a kill.
                self._running = None
                self.tasks_run += 1
                if isinstance(exc, Exception):  # not a kill (GreenletExit)
                    wakeup(task)
                raise
            mtx_lock(m)
            self._running = None
            self.tasks_run += 1
            mtx_unlock(m)
            wakeup(task)
            mtx_lock(m)

    def enqueue(self, task: Task) -> int:
        return taskqueue_enqueue(self, task)

    def enqueue_call(self, fn: Callable[[], None]) -> None:
        """Queue a one-shot ``fn()`` (a fresh task each time: never coalesced)."""
        taskqueue_enqueue(self, Task(lambda _arg, _pending: fn()))

    def free(self) -> None:
        """Let the thread finish what is queued and exit (``taskqueue_free``)."""
        mtx_lock(self.tq_mutex)
        self._exit = True
        mtx_unlock(self.tq_mutex)
        wakeup(self)


def taskqueue_enqueue(tq: TaskQueue, task: Task) -> int:
    """Queue ``task``; a task already pending only counts the enqueue. Returns 0.

    Takes ``tq_mutex``; the wakeup of the thread is sent once it is dropped.
    """
    m = tq.tq_mutex
    mtx_lock(m)
    if task.ta_pending > 0:
        if task._queue is not tq:
            mtx_unlock(m)
            raise KernelPanic(f"taskqueue_enqueue: {task!r} pending on another queue")
        if task.ta_pending < _PENDING_MAX:
            task.ta_pending += 1
        mtx_unlock(m)
        return 0
    if tq._exit:
        mtx_unlock(m)
        raise KernelPanic(f"taskqueue_enqueue on freed queue {tq.name}")
    task.ta_pending = 1
    task._queue = tq
    tq._queue.append(task)
    mtx_unlock(m)
    wakeup(tq)
    return 0


def taskqueue_cancel(tq: TaskQueue, task: Task) -> tuple[int, int]:
    """Dequeue ``task`` if pending; returns (error, pending count it had).

    ``EBUSY`` if the task is running now (it may also have been dequeued).
    """
    pending = 0
    mtx_lock(tq.tq_mutex)
    if task.ta_pending > 0 and task._queue is tq:
        pending = task.ta_pending
        tq._queue.remove(task)
        task.ta_pending = 0
    error = errno.EBUSY if tq._running is task else 0
    mtx_unlock(tq.tq_mutex)
    if pending > 0:
        wakeup(task)
    return error, pending


def taskqueue_drain(tq: TaskQueue, task: Task) -> None:
    """Wait until ``task`` is neither pending nor running. Sleeps.

    As FreeBSD's ``taskqueue_drain``: ``msleep(task, &tq->tq_mutex, PWAIT, "-", 0)``.
    """
    m = tq.tq_mutex
    mtx_lock(m)
    while (task.ta_pending > 0 and task._queue is tq) or tq._running is task:
        msleep(task, m, "tq_drain")
    mtx_unlock(m)


def taskqueue_drain_all(tq: TaskQueue) -> None:
    """Wait until every task queued now (and any it queues) has run. Sleeps."""
    while True:
        mtx_lock(tq.tq_mutex)
        last = tq._queue[-1] if tq._queue else tq._running
        mtx_unlock(tq.tq_mutex)
        if last is None:
            return
        taskqueue_drain(tq, last)


def taskqueue_free(tq: TaskQueue) -> None:
    tq.free()
