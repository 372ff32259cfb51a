"""Timers set from a signal handler (``gntdma run``'s and ``serve``'s
:class:`~gntdma.toolstack.interrupt.InterruptGuard` asks the hub to raise at its next
turn with ``call_later``).

A Python signal handler runs between any two bytecodes of the main thread. The
timer heap must therefore never run Python code while ``heapq`` moves its
entries: an entry ordered by a Python ``__lt__`` (a dataclass with
``order=True``) lets the handler push a timer in the middle of another push or
pop, and the interrupted one fails with "list changed size during iteration"
and drops a timer (the pop's earliest one): a kernel thread's sleep that never
times out, or the guard's raise that never comes. Entries are compared as
``(deadline, sequence)`` tuples, in C.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from types import FrameType

import pytest

from gntdma.sched import Scheduler, tsleep


@pytest.mark.skipif(sys.platform != "linux", reason="setitimer signals (Linux CI)")
def test_call_later_from_a_signal_handler_never_breaks_the_timer_heap(
        sched: Scheduler) -> None:
    fired: list[int] = []
    asked = [0]

    def handler(signum: int, frame: FrameType | None) -> None:
        asked[0] += 1
        sched.call_later(0.0, lambda: fired.append(1))

    def worker(i: int) -> None:
        for j in range(300):
            tsleep(object(), "nap", 0.00005 * (1 + (i + j) % 7))  # a timer pushed and popped

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
    try:
        for i in range(16):
            sched.spawn(worker, i, name=f"w{i}")
        sched.run()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    done = [False]
    sched.call_later(0.01, lambda: done.__setitem__(0, True))
    sched.run(until=lambda: done[0])
    assert asked[0] > 100, asked  # the handler ran often, in the middle of everything
    assert len(fired) == asked[0]  # every timer it set fired; none was lost
    assert sched.statistics().timers == 0


class _Signaller:
    """Sends ``sig`` to the main thread every ``period`` seconds from another thread."""

    def __init__(self, sig: signal.Signals, period: float) -> None:
        self.sig, self.period = sig, period
        self.stop = threading.Event()
        self.main = threading.main_thread().ident
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        assert self.main is not None
        while not self.stop.wait(self.period):
            signal.pthread_kill(self.main, self.sig)

    def __enter__(self) -> _Signaller:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def test_a_signal_during_the_hubs_timed_wait_never_makes_it_wait_forever(
        sched: Scheduler) -> None:
    """The hub waits for its next timer or an event from another OS thread. In
    CPython 3.11 ``queue.SimpleQueue.get(timeout=...)`` interrupted by a signal
    close to its deadline waits with the negative time left, which means
    forever: the first ``gntdma serve`` that met it at SIGTERM never ended (its
    one-second line stopped too). Here signals every 50 us meet the hub's waits
    for 3000 short timers; each wait ends at its timer (a hub that fires none for a
    second is stuck: it is freed by a posted event, and counted)."""
    received = [0]

    def handler(signum: int, frame: FrameType | None) -> None:
        received[0] += 1

    fired = [0]
    late = [0]

    def tick() -> None:
        fired[0] += 1
        if fired[0] < 3000:
            sched.call_later(0.00002, tick)

    def rescue(stop: threading.Event) -> None:
        seen = -1
        while not stop.wait(1.0):
            if fired[0] == seen:  # no timer fired for a second: the hub is stuck
                late[0] += 1
                sched.post(lambda: None)
            seen = fired[0]

    old = signal.signal(signal.SIGUSR1, handler)
    stop = threading.Event()
    rescuer = threading.Thread(target=rescue, args=(stop,), daemon=True)
    rescuer.start()
    t0 = time.monotonic()
    try:
        with _Signaller(signal.SIGUSR1, 0.00005):
            sched.call_later(0.00002, tick)
            sched.run(until=lambda: fired[0] >= 3000 or time.monotonic() - t0 > 30)
    finally:
        signal.signal(signal.SIGUSR1, old)
        stop.set()
        rescuer.join()
    assert received[0] > 50, received
    assert late[0] == 0, f"the hub was stuck past its timer; freed {late[0]} times"
    assert fired[0] == 3000
