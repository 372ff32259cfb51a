"""Simulated kernel threads and the scheduler that runs them.

Theory of operation
-------------------
A kernel thread is a greenlet. One scheduler runs all of them on one OS thread:
the *hub* (the greenlet that called :meth:`Scheduler.run`) picks a runnable
thread, switches to it, and gets control back when that thread reaches a
scheduling point and blocks or yields (or, while the hub waits, that thread
takes the hub's next step itself and hands over to the thread chosen: see
``_hub``). Control never changes anywhere else, so kernel code between two
scheduling points runs atomically, like code under a spin lock on a uniprocessor.

Code that is not on a kernel thread (tests, the toolstack, the CLI) runs as
*thread0*, like FreeBSD's proc0 during boot: it may take locks and call kernel
functions directly. When thread0 has to block it runs the hub loop in place
until it is woken, so a test can call a function that sleeps without creating a
thread for it.

The choice of the next thread, and every random value kernel code asks for,
belongs to a :class:`Strategy`. ``FifoStrategy`` (the ``run`` strategy) is fair
FIFO on the real clock; exploration strategies replace it.

Blocking I/O runs inline, or on a small pool of OS threads whose completions
come back through the scheduler's event queue; the reactor thread delivers
external events (sockets) through the same queue. Deadlock: no thread runnable,
no timer, no I/O in flight, no external source registered, and a non-daemon
thread (or thread0) still waiting. A cycle of threads waiting for locks the
others hold is a deadlock too, reported as soon as it closes whatever else is
pending; the hung-task watchdog reports a thread blocked too long (see
``_deadlock``).

A thread holding a spin mutex is in a critical section (``critnest`` > 0): no
scheduling point preempts it, and blocking panics, as on FreeBSD.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar, final

import greenlet

from gntdma.sched._deadlock import cycle_report, lock_cycle
from gntdma.sched._errors import DeadlockReport, KernelPanic
from gntdma.sched._hub import Hub
from gntdma.sched._kthread import (
    Clock,
    FifoStrategy,
    HeldLock,
    KThread,
    RealClock,
    SchedulerStatistics,
    Strategy,
    ThreadState,
    ThreadTable,
    VirtualClock,
    _Timer,
)
from gntdma.sched._witness import WITNESS, Site, Witness, caller_site, caller_site_raw
from gntdma.sched._workers import WorkerPool, give_back, made_parent, take_worker

__all__ = [
    "Clock",
    "FifoStrategy",
    "HeldLock",
    "KThread",
    "RealClock",
    "Scheduler",
    "SchedulerStatistics",
    "Strategy",
    "ThreadState",
    "VirtualClock",
    "blocking_io",
    "checkpoint",
    "current_scheduler",
    "curthread",
    "random_u64",
]

T = TypeVar("T")

# The states tested at every point, bound once: a global, not an Enum class
# attribute (ThreadState.RUNNABLE costs about 70 ns on CPython 3.11, a global 6).
_RUNNABLE = ThreadState.RUNNABLE
_RUNNING = ThreadState.RUNNING
_BLOCKED = ThreadState.BLOCKED
_DONE = ThreadState.DONE


_current: Scheduler | None = None


def current_scheduler() -> Scheduler:
    """The scheduler kernel code runs under; one is created on first use."""
    global _current
    if _current is None:
        _current = Scheduler()
    return _current


def curthread() -> KThread:
    """The running kernel thread (thread0 outside any kernel thread)."""
    s = _current  # current_scheduler() without the call
    if s is None:
        s = current_scheduler()
    return s.curthread


def checkpoint() -> None:
    """Always a scheduling point: let other runnable threads run first."""
    s = _current
    if s is None:
        s = current_scheduler()
    s.yield_(point="checkpoint")


def random_u64() -> int:
    """A random 64-bit value chosen by the strategy (never call ``random``)."""
    s = _current
    if s is None:
        s = current_scheduler()
    return s._strategy.next_u64()


def blocking_io(fn: Callable[..., T], *args: Any) -> T:
    """Run real blocking I/O. Always a scheduling point."""
    s = _current  # current_scheduler() without the call
    if s is None:
        s = current_scheduler()
    if s.io_mode == "inline" and not s.point_active:
        return fn(*args)  # Scheduler.blocking_io's inline case, its point a no-op
    return s.blocking_io(fn, *args)


@final
class Scheduler(Hub):
    """Runs kernel threads one at a time under a strategy and a clock."""

    def __init__(
        self,
        strategy: Strategy | None = None,
        clock: Clock | None = None,
        io_mode: str = "inline",
        io_workers: int = 4,
        witness: Witness | None = None,
        max_steps: int = 0,
        hung_timeout: float | None = None,
        workers: WorkerPool | None = None,
    ) -> None:
        if io_mode not in ("inline", "pool"):
            raise ValueError(f"io_mode must be 'inline' or 'pool', not {io_mode!r}")
        self._strategy: Strategy = strategy if strategy is not None else FifoStrategy()
        self._first_only = type(self._strategy) is FifoStrategy
        #: The strategy's ``preemptive``, read by every scheduling point.
        self.preemptive: bool = self._strategy.preemptive
        #: Something set in place of ``point`` (a test watching every scheduling point).
        self.point_hook: Callable[[str], None] | None = None
        #: Whether a scheduling point may do anything: a preemptive strategy, or a
        #: hook. Only then do the primitives make the point: they call the hook, or
        #: make ``_point``'s test and ``yield_`` in place (``point``, a property
        #: returning a bound method, would cost two calls more).
        self.point_active: bool = self.preemptive
        self.clock: Clock = clock if clock is not None else RealClock()
        self.io_mode = io_mode
        self.witness = witness if witness is not None else WITNESS
        self._tids = itertools.count(1)
        self._timer_seq = itertools.count()
        self.thread0 = KThread(0, "thread0", daemon=False, domain=None)
        self.thread0.state = _RUNNING
        self.curthread: KThread = self.thread0
        #: The threads alive; one that ended is dropped at once, with its greenlet.
        self._table = ThreadTable()
        self._runq: deque[KThread] = deque()
        #: (deadline, sequence, timer): compared in C, never by Python code, so a
        #: signal handler that sets a timer cannot land inside a heap operation
        self._timers: list[tuple[float, int, _Timer]] = []
        #: Events from other OS threads (I/O completions, the reactor): appended
        #: there, run by the hub. ``_wakeup`` is released by a poster and waited
        #: on by the hub: ``Lock.acquire(timeout=)`` ends at its deadline even when
        #: a signal interrupts it (CPython 3.11's ``SimpleQueue.get(timeout=)``
        #: then waits forever).
        self._events: deque[Callable[[], None]] = deque()
        self._wakeup = threading.Lock()
        self._wakeup.acquire()
        self._io_in_flight = 0
        self._external = 0
        self._pool: ThreadPoolExecutor | None = None
        self._io_workers = io_workers
        self._hub: greenlet.greenlet | None = None
        self._in_loop = False
        self.switches = 0
        #: Hub decisions so far; a run past ``max_steps`` (if non-zero) is a livelock.
        self.steps = 0
        self.max_steps = max_steps
        #: Hung-task threshold in seconds; None follows ``rules.hung_task_timeout``.
        self.hung_timeout = hung_timeout
        self._deadlock: DeadlockReport | None = None
        #: Set by a lock or sleep primitive just before it calls ``block`` (the same
        #: as passing ``onlock``/``idle``, and kept when ``block`` is wrapped).
        self.wait_onlock = False
        self.wait_idle = False
        #: Set by a lock that has found its caller's site already: the site ``block``
        #: would find for the wait (so that it does not walk the frames again).
        self.wait_site: Site | None = None
        self._last: KThread | None = None
        self._last_point = "switch"
        #: While the hub waits in ``_run_one`` for the thread it switched to: a thread
        #: that yields or blocks then takes the hub's next step itself (``_step``)
        #: and switches to the thread chosen, or goes on if that is itself.
        self._parked = False
        self._start_chosen = False
        self._until: Callable[[], bool] | None = None
        #: An exception of the strategy's pick in such a step, raised by the hub.
        self._pick_exc: BaseException | None = None
        self.failures: list[tuple[KThread, BaseException]] = []
        #: Called with (thread, exception) when a thread dies of an exception;
        #: returns True if it handled it (a domain crash), False to stop run().
        self.on_thread_exception: Callable[[KThread, BaseException], bool] | None = None
        #: Where the threads' greenlets are kept for the next threads (None: not kept).
        self.workers = workers

    # -- installation ---------------------------------------------------------

    def install(self) -> Scheduler:
        """Make this the scheduler kernel code runs under; returns self."""
        global _current
        _current = self
        return self

    @staticmethod
    def uninstall() -> None:
        global _current
        _current = None

    @property
    def strategy(self) -> Strategy:
        return self._strategy

    @strategy.setter
    def strategy(self, strategy: Strategy) -> None:
        self._strategy = strategy
        self._first_only = type(strategy) is FifoStrategy
        self.preemptive = strategy.preemptive
        self.point_active = self.preemptive or self.point_hook is not None

    @property
    def threads(self) -> list[KThread]:
        """The threads alive, in creation order (a thread that ended is forgotten)."""
        return list(self._table.live.values())

    def statistics(self) -> SchedulerStatistics:
        return SchedulerStatistics(
            self._table.spawned,
            len(self._table.live),
            self.switches,
            sum(1 for _d, _s, t in self._timers if not t.cancelled),
            self._io_in_flight,
            self._external,
        )

    def now(self) -> float:
        return self.clock.now()

    # -- threads --------------------------------------------------------------

    def spawn(
        self,
        fn: Callable[..., object],
        *args: object,
        name: str = "",
        daemon: bool = False,
        domain: object | None = None,
    ) -> KThread:
        """Create a runnable kernel thread (kthread_add). Never a scheduling point."""
        tid = next(self._tids)
        t = KThread(tid, name or f"kthread{tid}", daemon, domain)

        def body() -> None:
            try:
                t.result = fn(*args)
            except greenlet.GreenletExit:
                pass
            except BaseException as exc:  # recorded for the hub
                t.exc = exc
            finally:
                # curthread stays t: the hub (or kill) learns from it who ended.
                self._release_on_exit(t)
                t.state = _DONE
                self._table.forget(t)

        t._glet = take_worker(body, self.workers)  # a greenlet (_workers)
        self._table.add(t)
        self._runq.append(t)
        return t

    def _release_on_exit(self, t: KThread) -> None:
        if t.held and t.exc is None:
            names = ", ".join(h.cls for h in t.held)
            t.exc = KernelPanic(f"thread {t.name} exited with locks held: {names}")

    def _alive(self) -> bool:
        return self._table.nondaemon > 0

    # -- scheduling points (called on the current thread) ----------------------

    def block(self, wchan: object, wmesg: str, timeout: float = 0.0, *,
              onlock: bool = False, idle: bool = False) -> int:
        """Block the current thread on ``wchan`` until woken or ``timeout`` seconds.

        Returns the waker's result (0) or ``EWOULDBLOCK`` on timeout. A timeout of
        0 waits forever (FreeBSD's ``timo`` of 0). Always a scheduling point.
        ``onlock``: ``wchan`` is a lock the thread waits for (a wait-for edge,
        checked for a cycle now). ``idle``: a service thread idling for work,
        which the hung-task watchdog does not count (like Linux's TASK_IDLE).
        Blocking inside a spin mutex's critical section panics.
        """
        t = self.curthread
        site, self.wait_site = self.wait_site, None
        if t.state is not _RUNNING:
            raise KernelPanic(f"{t.name} blocks while {t.state.value}")
        if t.critnest > 0:
            names = ", ".join(h.cls for h in t.held if h.spin)
            msg = (f"mi_switch: switch in a critical section "
                   f"(thread {t.name} blocks on {wmesg!r} holding spin mutex {names})")
            self.witness.record_panic(t.name, msg, caller_site())
            raise KernelPanic(msg)
        t.state = _BLOCKED
        t.wchan = wchan
        t.wmesg = wmesg
        t.wait_site_at = caller_site_raw() if site is None else site
        t.wake_result = 0
        onlock = onlock or self.wait_onlock
        idle = idle or self.wait_idle
        self.wait_onlock = self.wait_idle = False
        t.lockwait = onlock
        t.wait_counted = onlock or (timeout <= 0 and not idle)
        if t.wait_counted:  # only a counted wait's start is ever read (the watchdog)
            self._table.counted[t.tid] = t
            t.blocked_at = self.clock.now()
        if onlock and self._deadlock is None:
            cycle = lock_cycle(t)
            if cycle is not None:
                self._deadlock = cycle_report(cycle)
        if timeout > 0:
            tm = _Timer(self.clock.now() + timeout, next(self._timer_seq), t, None)
            t.timer = tm
            heapq.heappush(self._timers, (tm.deadline, tm.seq, tm))
        self._switch_out()
        return t.wake_result

    def yield_(self, point: str = "yield") -> None:
        """Let other runnable threads run before the current one continues."""
        t = self.curthread
        if t.critnest > 0:  # a spin mutex holder is never preempted
            return
        if t is self.thread0:
            if self._runq and not self._in_loop:
                target = self.switches + len(self._runq)
                t.state = _RUNNABLE
                self._loop(until=lambda: self.switches >= target or not self._runq)
                t.state = _RUNNING
            return
        if not self._runq and self.thread0.state is not _RUNNABLE:
            # Nobody else to run. (thread0 yielding in place is runnable without
            # being queued: go back to the hub so that it can go on.)
            return
        t.state = _RUNNABLE
        self._runq.append(t)
        self._last = t
        self._last_point = point
        # _switch_out for a kernel thread (t is not thread0 here).
        if self._parked:
            nxt = self._step()
            if nxt is t:
                return
            if nxt is not None:  # now curthread
                del nxt  # not kept by this frame while t waits (see _switch_to)
                self._switch_to()
                return
        hub = self._hub
        assert hub is not None
        hub.switch()

    def _point(self, point: str) -> None:
        """A scheduling point that preempts only under a preemptive strategy.

        Never inside a spin mutex's critical section. The hot primitives (mutex,
        sleep queue, barriers) make the same test in place: a change here is a
        change there.
        """
        if self.preemptive and self.curthread.critnest == 0:
            self.yield_(point)

    @property
    def point(self) -> Callable[[str], None]:
        """``_point``, or what was set in its place (``sched.point = watcher``)."""
        hook = self.point_hook
        return self._point if hook is None else hook

    @point.setter
    def point(self, fn: Callable[[str], None]) -> None:
        own = getattr(fn, "__func__", None) is Scheduler._point and (
            getattr(fn, "__self__", None) is self)
        self.point_hook = None if own else fn
        self.point_active = self.preemptive or self.point_hook is not None

    def _switch_out(self, point: str = "block") -> None:
        t = self.curthread
        if t is self.thread0:
            if self._in_loop:
                raise KernelPanic("thread0 would block from inside the scheduler loop")
            try:
                self._loop(until=lambda: t.state is not _BLOCKED)
            finally:
                # Woken, or an exception out of the loop (a stall, a deadlock) ends
                # the wait: thread0 runs on either way and may block again.
                if t.timer is not None:
                    t.timer.cancelled = True
                    t.timer = None
                t.wchan = None
                self._table.counted.pop(t.tid, None)
                t.state = _RUNNING
            return
        if self._parked:
            nxt = self._step()
            if nxt is not None:  # never t: it is blocked; now curthread
                del nxt  # not kept by this frame while t waits (see _switch_to)
                self._switch_to()
                return
        assert self._hub is not None
        self._hub.switch()

    # -- timers and events ---------------------------------------------------

    def call_later(self, delay: float, fn: Callable[[], None]) -> Callable[[], None]:
        """Run ``fn`` in the hub after ``delay`` seconds; returns a canceller."""
        tm = _Timer(self.clock.now() + delay, next(self._timer_seq), None, fn)
        heapq.heappush(self._timers, (tm.deadline, tm.seq, tm))

        def cancel() -> None:
            tm.cancelled = True

        return cancel

    def post(self, fn: Callable[[], None]) -> None:
        """Queue ``fn`` to run in the hub. Safe from any OS thread."""
        self._events.append(fn)
        try:
            self._wakeup.release()
        except RuntimeError:
            pass  # the hub is already woken

    def add_external_source(self) -> None:
        """Something outside (a socket, a reactor) may post events at any time."""
        self._external += 1

    def remove_external_source(self) -> None:
        self._external -= 1

    def blocking_io(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` inline or on the I/O pool. Always a scheduling point."""
        t = self.curthread
        if self.io_mode == "inline" or t is self.thread0:
            self.point("io")
            return fn(*args)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._io_workers, thread_name_prefix="gntdma-io")
        self._io_in_flight += 1
        fut: Future[T] = self._pool.submit(fn, *args)

        def done(_f: Future[T]) -> None:
            self.post(lambda: self._io_done(t))

        fut.add_done_callback(done)
        self.block(fut, "io")
        return fut.result()

    def _io_done(self, t: KThread) -> None:
        self._io_in_flight -= 1
        self.wake(t)

    # -- the hub ----------------------------------------------------------------

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Run threads until every non-daemon thread is done (or ``until()``)."""
        if until is None:
            table = self._table  # never replaced: not self._alive(), without two calls

            def until() -> bool:
                return table.nondaemon <= 0

        self._loop(until=until)

    def call(self, fn: Callable[..., T], *args: object, name: str = "call") -> T:
        """Run ``fn(*args)`` on a new kernel thread to completion and return its result."""
        t = self.spawn(fn, *args, name=name)
        self._loop(until=lambda: t.state is _DONE)
        if t.exc is not None:
            raise t.exc
        return t.result  # type: ignore[return-value]

    # -- reports and teardown ------------------------------------------------------

    def kill(self, t: KThread) -> None:
        """End ``t`` where it waits (its domain is gone): it never runs again.

        Called from thread0, the hub or another thread, never by ``t``. The thread unwinds (no
        lock is handed back: its domain's locks die with it). Never a
        scheduling point for anyone else.
        """
        if t.state is _DONE or t is self.curthread or t is self.thread0:
            return
        if t.timer is not None:
            t.timer.cancelled = True
            t.timer = None
        t.held.clear()
        t.critnest = 0
        glet = t._glet
        prev = self.curthread
        for i in range(3):  # an unwinding that blocks again is thrown at again
            if glet is None or glet.dead or (i > 0 and t.state is _DONE):  # ended
                break
            if glet.body is not None:  # never started: its worker waits for another
                give_back(glet)
                break
            t.state = _RUNNING
            self.curthread = t
            # The unwinding ends in its parent: make that the caller (a toolstack
            # thread that kills is suspended for good if it ends in the hub).
            made_parent(cur := greenlet.getcurrent())
            glet.parent = cur
            try:
                glet.throw(greenlet.GreenletExit)
            finally:
                self.curthread = prev
        t.state = _DONE
        self._table.forget(t)

    def shutdown(self) -> None:
        """Kill every thread still alive (daemons idle in their loops) and the I/O pool."""
        for t in list(self._table.live.values()):
            self.kill(t)
        self.curthread = self.thread0
        self._runq.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
