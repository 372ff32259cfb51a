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

Rules: the queue's state changes only between scheduling points (no lock is
needed: a kernel thread runs atomically until its next scheduling point), so
``taskqueue_enqueue`` may be called from any kernel thread, thread0, or the
scheduler hub (a timer callback). Its only scheduling point is the final
``wakeup``, and only under a preemptive strategy.
"""

from __future__ import annotations

import errno
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, final

from gntdma.sched import KernelPanic, current_scheduler, tsleep, wakeup

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
        while True:
            while not self._queue:
                if self._exit:
                    return
                tsleep(self, "-")
            task = self._queue.popleft()
            pending = task.ta_pending
            task.ta_pending = 0
            self._running = task
            try:
                task.ta_func(task.ta_context, pending)
            finally:
                self._running = None
                self.tasks_run += 1
                wakeup(task)

    def enqueue(self, task: Task) -> int:
        return taskqueue_enqueue(self, task)

    def enqueue_call(self, fn: Callable[[], None]) -> None:
        """Queue a one-shot ``fn()`` (a fresh task each time: never coalesced)."""
        taskqueue_enqueue(self, Task(lambda _arg, _pending: fn()))

    def free(self) -> None:
        """Let the thread finish what is queued and exit (``taskqueue_free``)."""
        self._exit = True
        wakeup(self)


def taskqueue_enqueue(tq: TaskQueue, task: Task) -> int:
    """Queue ``task``; a task already pending only counts the enqueue. Returns 0."""
    if task.ta_pending > 0:
        if task._queue is not tq:
            raise KernelPanic(f"taskqueue_enqueue: {task!r} pending on another queue")
        if task.ta_pending < _PENDING_MAX:
            task.ta_pending += 1
        return 0
    if tq._exit:
        raise KernelPanic(f"taskqueue_enqueue on freed queue {tq.name}")
    task.ta_pending = 1
    task._queue = tq
    tq._queue.append(task)
    wakeup(tq)
    return 0


def taskqueue_cancel(tq: TaskQueue, task: Task) -> tuple[int, int]:
    """Dequeue ``task`` if pending; returns (error, pending count it had).

    ``EBUSY`` if the task is running now (it may also have been dequeued).
    """
    pending = 0
    if task.ta_pending > 0 and task._queue is tq:
        pending = task.ta_pending
        tq._queue.remove(task)
        task.ta_pending = 0
        wakeup(task)
    error = errno.EBUSY if tq._running is task else 0
    return error, pending


def taskqueue_drain(tq: TaskQueue, task: Task) -> None:
    """Wait until ``task`` is neither pending nor running. Sleeps."""
    while (task.ta_pending > 0 and task._queue is tq) or tq._running is task:
        tsleep(task, "tq_drain")


def taskqueue_drain_all(tq: TaskQueue) -> None:
    """Wait until every task queued now (and any it queues) has run. Sleeps."""
    while tq._queue or tq._running is not None:
        last = tq._queue[-1] if tq._queue else tq._running
        assert last is not None
        taskqueue_drain(tq, last)


def taskqueue_free(tq: TaskQueue) -> None:
    tq.free()
