"""The hub: the scheduler's loop, and the step a yielding or blocking thread takes.

The hub (the greenlet that runs :meth:`Hub._loop`) drains the events other OS
threads posted, fires the timers due, and runs the next thread the strategy
picks until that thread blocks, yields or ends (``_run_one``). While the hub
waits for that thread (it is *parked*), a thread that yields or blocks takes
the hub's next step itself (``_step``): the same checks in the same order, so
the same choice, and then hands over to the thread chosen directly
(``_switch_to``), or goes on if that is itself. Whatever the step needs the hub
for (an event, a timer due, the loop's end, the step limit, the hung-task
watchdog's turn, a deadlock, nothing runnable) goes back to the hub.
"""

from __future__ import annotations

import errno
import heapq
import threading
from collections import deque
from collections.abc import Callable

import greenlet

from gntdma.sched import rules as _rules
from gntdma.sched._deadlock import global_report, hung_deadline, hung_report
from gntdma.sched._errors import (
    Deadlock,
    DeadlockReport,
    HungTask,
    KernelPanic,
    StepLimitExceeded,
)
from gntdma.sched._kthread import Clock, KThread, Strategy, ThreadState, ThreadTable, _Timer
from gntdma.sched._workers import made_parent

__all__ = ["Hub"]

# The states the hub tests at every step, bound once (a global, not an Enum class
# attribute, which costs a Python call on CPython 3.11).
_RUNNABLE = ThreadState.RUNNABLE
_RUNNING = ThreadState.RUNNING
_DONE = ThreadState.DONE
_BLOCKED = ThreadState.BLOCKED


class Hub:
    """The scheduler's hub; :class:`gntdma.sched.Scheduler` sets the state below."""

    _strategy: Strategy
    #: The strategy is the run strategy (``FifoStrategy``), whose pick is always 0:
    #: the hub takes the first runnable thread without calling it.
    _first_only: bool
    clock: Clock
    thread0: KThread
    curthread: KThread
    _table: ThreadTable
    _runq: deque[KThread]
    _timers: list[tuple[float, int, _Timer]]
    _events: deque[Callable[[], None]]
    _wakeup: threading.Lock
    _io_in_flight: int
    _external: int
    _hub: greenlet.greenlet | None
    _in_loop: bool
    switches: int
    steps: int
    max_steps: int
    hung_timeout: float | None
    _deadlock: DeadlockReport | None
    _last: KThread | None
    _last_point: str
    _parked: bool
    #: ``_switch_to`` went back to the hub to start the thread chosen (curthread).
    _start_chosen: bool
    _until: Callable[[], bool] | None
    _pick_exc: BaseException | None
    failures: list[tuple[KThread, BaseException]]
    on_thread_exception: Callable[[KThread, BaseException], bool] | None

    def wake(self, t: KThread, result: int = 0) -> None:
        """Make a blocked thread runnable. Never a scheduling point."""
        if t.state is not _BLOCKED:
            return
        if t.timer is not None:
            t.timer.cancelled = True
            t.timer = None
        t.state = _RUNNABLE
        t.wchan = None
        t.lockwait = False
        if t.wait_counted:  # only a counted wait is in the table's counted
            t.wait_counted = False
            self._table.counted.pop(t.tid, None)
        t.wake_result = result
        if t is not self.thread0:
            self._runq.append(t)

    def _step(self) -> KThread | None:
        """The hub's next step, taken by the thread that yields or blocks.

        The same checks in the same order as ``_loop`` and ``_run_one``, so the
        same choice: returns the thread chosen, set running, or None when the
        hub must take the step (an event to drain, a timer due or a cancelled
        one to drop, a deadlock to raise, the loop's end, the step limit, the
        watchdog's turn, nothing runnable, or the pick raised).
        """
        while True:
            if self._events or self._deadlock is not None:
                return None
            timers = self._timers
            if timers and (timers[0][2].cancelled or timers[0][0] <= self.clock.now()):
                return None
            until = self._until
            if until is None or until():
                return None
            runq = self._runq
            steps = self.steps + 1
            if (not runq or (self.max_steps and steps > self.max_steps)
                    or (steps & 1023 == 0 and not self.clock.virtual)):
                return None
            self.steps = steps
            last, self._last = self._last, None
            point, self._last_point = self._last_point, "switch"
            if len(runq) > 1 and not self._first_only:
                try:
                    idx = self._strategy.pick(runq, last, point)
                except BaseException as exc:  # the hub raises it, as when it picks
                    self._pick_exc = exc
                    return None
                if idx == 0:
                    nxt = runq.popleft()
                else:
                    nxt = runq[idx]
                    del runq[idx]
            else:
                nxt = runq.popleft()
            if nxt.state is _RUNNABLE:
                nxt.state = _RUNNING
                self.curthread = nxt
                self.switches += 1
                return nxt

    def _switch_to(self) -> None:
        """Switch from the thread that took the step to the one it chose (curthread).

        No frame of the thread that switches keeps the chosen thread: a thread
        that blocks for long (an idle daemon) must not keep alive a thread that
        ends meanwhile (only its greenlet, dead, until the sleeper runs again).
        """
        glet = self.curthread._glet
        assert glet is not None
        if glet.body is not None:
            # Not started yet: the hub starts it (see _run_one). A greenlet starts
            # at the Python depth of whoever switches to it first, so threads
            # starting each other would nest one depth per thread
            # (RecursionError past a few hundred new threads).
            self._start_chosen = True
            hub = self._hub
            assert hub is not None
            hub.switch()
            return
        glet.switch()

    def _loop(self, until: Callable[[], bool]) -> None:
        if self._in_loop:
            raise KernelPanic("scheduler loop re-entered")
        self._in_loop = True
        self._until = until
        self._hub = greenlet.getcurrent()
        # The hub's per-step work, bound once: the queues are never replaced, and
        # draining or firing nothing is skipped (each does nothing then).
        events = self._events
        timers = self._timers
        runq = self._runq
        run_one = self._run_one
        try:
            while True:
                if self._deadlock is not None:
                    report, self._deadlock = self._deadlock, None
                    raise Deadlock(report)
                if events:
                    self._drain_events()
                if timers:
                    self._fire_timers()
                if until():
                    return
                if runq:
                    run_one()
                    continue
                if not self._wait_for_something():
                    if until():
                        return
                    raise Deadlock(self.deadlock_report())
        finally:
            self._in_loop = False
            self._until = None

    def _run_one(self) -> None:
        steps = self.steps = self.steps + 1
        if self.max_steps and steps > self.max_steps:
            raise StepLimitExceeded(f"no end after {self.max_steps} scheduling steps")
        if steps & 1023 == 0 and not self.clock.virtual:
            self._check_hung(self.clock.now())
        last, self._last = self._last, None
        point, self._last_point = self._last_point, "switch"
        # ``point`` is where ``last`` yielded ("checkpoint" for an explicit yield);
        # "switch" when the previous thread blocked.
        runq = self._runq
        if len(runq) > 1 and not self._first_only:
            idx = self._strategy.pick(runq, last, point)
            if idx == 0:
                t = runq.popleft()
            else:
                t = runq[idx]
                del runq[idx]
        else:
            t = runq.popleft()
        if t.state is not _RUNNABLE:
            return
        t.state = _RUNNING
        self.curthread = t
        self.switches += 1
        glet = t._glet
        assert glet is not None
        if glet.body is not None:  # not started yet: it must return to the hub when it ends
            made_parent(hub := greenlet.getcurrent())
            glet.parent = hub
        self._parked = True
        try:
            glet.switch()
            while self._start_chosen:  # a thread's step chose a thread not started yet
                self._start_chosen = False
                glet = self.curthread._glet
                assert glet is not None
                made_parent(hub := greenlet.getcurrent())
                glet.parent = hub
                glet.switch()
        finally:
            self._parked = False
        # Back from whichever thread blocked, yielded or ended last (threads may
        # have handed over to each other in between, see ``_step``).
        t = self.curthread
        self.curthread = self.thread0
        if self._pick_exc is not None:
            exc, self._pick_exc = self._pick_exc, None
            raise exc
        if t.state is _DONE and t.exc is not None:
            exc = t.exc
            self.failures.append((t, exc))
            handler = self.on_thread_exception
            if handler is None or not handler(t, exc):
                exc.add_note(f"in kernel thread {t.name}")
                raise exc

    def _drain_events(self) -> None:
        events = self._events
        while events:
            events.popleft()()

    def _fire_timers(self) -> None:
        now = self.clock.now()
        timers = self._timers
        while timers and (timers[0][2].cancelled or timers[0][0] <= now):
            tm = heapq.heappop(timers)[2]
            if tm.cancelled:
                continue
            if tm.thread is not None:
                tm.thread.timer = None
                self.wake(tm.thread, errno.EWOULDBLOCK)
            elif tm.fn is not None:
                tm.fn()

    def _next_deadline(self) -> float | None:
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        return self._timers[0][0] if self._timers else None

    def _wait_for_something(self) -> bool:
        """Nothing runnable: wait for a timer, I/O or an external event.

        Returns False when nothing can ever happen again.
        """
        deadline = self._next_deadline()
        outside = self._io_in_flight > 0 or self._external > 0
        if deadline is None and not outside:
            return False
        limit = self.hung_limit()
        hung_at = hung_deadline(self._table.counted_waits(), limit) if limit > 0 else None
        if hung_at is not None and (deadline is None or hung_at < deadline):
            deadline = hung_at
        if self.clock.virtual and not outside:
            assert deadline is not None
            self.clock.advance_to(deadline)
            if hung_at is not None:
                self._check_hung(self.clock.now())
            return True
        timeout = -1.0 if deadline is None else max(0.0, deadline - self.clock.now())
        if not self._events:
            self._wakeup.acquire(True, timeout)
        if not self._events:
            if hung_at is not None:
                self._check_hung(self.clock.now())
            return True
        self._events.popleft()()
        return True

    def hung_limit(self) -> float:
        """The hung-task threshold in seconds now (0: the watchdog is off)."""
        if self.hung_timeout is not None:
            return self.hung_timeout
        return _rules.hung_task_timeout

    def _blocked(self) -> list[KThread]:
        return self._table.blocked(self.thread0)

    def _check_hung(self, now: float) -> None:
        limit = self.hung_limit()
        if limit <= 0:
            return
        report = hung_report(self._table.counted_waits(), limit, now)
        if report is not None:
            raise HungTask(report)

    def deadlock_report(self) -> DeadlockReport:
        """Who waits for what, who holds it, and the wait-for cycle if any."""
        return global_report(self._blocked())
