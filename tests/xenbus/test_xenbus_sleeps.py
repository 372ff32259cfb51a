"""xenbus sleeps keep an interlock: no watch event or state change is lost.

A sleep without an interlock lets the explorer put the wakeup between the check
and the sleep (DESIGN 3; FreeBSD sys/kern/kern_synch.c, _sleep and sleep(9):
a condition is checked and slept on under the mutex passed to msleep). The
xenbus thread idles as a service thread (PIDLE) and is not a hung task.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from gntdma.sched import Scheduler, VirtualClock, checkpoint, explore, strategy_stream, tsleep
from gntdma.xen.xenbus import (
    XenbusDevice,
    XenbusDriver,
    XenbusRole,
    XenbusState,
    xenbus_wait_state,
)
from gntdma.xen.xenstore import XenStore


class _FakeXs:
    """Just what xenbus_wait_state uses: one state node and its watch."""

    def __init__(self) -> None:
        self.state = XenbusState.Initialising
        self.watch: Any = None

    def xs_register_watch(self, watch: Any) -> int:
        self.watch = watch
        return 0

    def xs_unregister_watch(self, watch: Any) -> int:
        self.watch = None
        return 0

    def xs_read(self, _xbt: int, _path: str, _key: str) -> tuple[int, bytes]:
        return 0, str(int(self.state)).encode()

    def change(self, state: XenbusState) -> None:  # what the xenwatch thread does
        self.state = state
        if self.watch is not None:
            cb: Callable[[str, str], None] = self.watch.callback
            cb("/dev/state", "")


def _dev() -> XenbusDevice:
    xs = cast(XenStore, _FakeXs())
    return XenbusDevice(xs, XenbusRole.FRONTEND, "vbd", 1, "/d/1/vbd", "/d/0/vbd", 0)


class _Counting(XenbusDriver):
    """A driver whose step ends the thread after ``want`` events."""

    def __init__(self, want: int) -> None:
        super().__init__(cast(Any, None), _dev(), "t")
        self.want = want

    def _xenbus_step(self) -> bool:
        return self._events >= self.want


def _assert_clean(scenario: Callable[[Scheduler], list[str]]) -> None:
    for res in (explore(scenario, strategy_stream("dfs", 0, max_preemptions=2), budget=400),
                explore(scenario, strategy_stream("random", 0), budget=150)):
        assert res.failure is None, (res.failure.kind, res.failure.report)


def test_xenbus_thread_sleeps_with_the_device_lock_so_no_event_is_lost() -> None:
    def kicks_racing_the_idle_sleep(s: Scheduler) -> list[str]:
        drv = _Counting(2)
        drv.start()

        def watcher() -> None:
            for _ in range(2):
                checkpoint()
                drv._xenbus_changed("/x", "")
            drv.wait_done(0.0 + 1e9)

        s.spawn(watcher, name="xenwatch")
        s.run()
        return [] if drv.done else ["the xenbus thread missed an event"]

    _assert_clean(kicks_racing_the_idle_sleep)


def test_wait_state_sleeps_with_the_device_lock() -> None:
    def state_racing_the_wait(s: Scheduler) -> list[str]:
        drv = _Counting(1)
        got: list[int] = []

        def waiter() -> None:
            got.append(drv.wait_state({XenbusState.Connected}, 1e9)[0])

        s.spawn(waiter, name="waiter")
        s.spawn(lambda: drv._note_state(XenbusState.Connected), name="driver")
        s.run()
        if got != [0] or s.now() > 0.0:  # woken by the change, not by the timeout
            return [f"wait_state returned {got} at {s.now()}"]
        return []

    _assert_clean(state_racing_the_wait)


def test_xenbus_wait_state_sleeps_with_its_watch_lock() -> None:
    def change_racing_the_wait(s: Scheduler) -> list[str]:
        xs = _FakeXs()
        got: list[int] = []

        def waiter() -> None:
            got.append(xenbus_wait_state(cast(XenStore, xs), "/dev",
                                         {XenbusState.Connected}, 0.0)[0])

        s.spawn(waiter, name="waiter")
        s.spawn(lambda: xs.change(XenbusState.Connected), name="xenwatch")
        s.run()
        return [] if got == [0] else [f"xenbus_wait_state returned {got}"]

    _assert_clean(change_racing_the_wait)


def test_idle_xenbus_thread_is_not_a_hung_task() -> None:
    s = Scheduler(clock=VirtualClock(), hung_timeout=60.0).install()
    try:
        drv = _Counting(1)
        drv.start()

        def ticker() -> None:
            for _ in range(200):
                tsleep(ticker, "tick", 1.0)

        s.spawn(ticker, name="ticker")
        s.run()
        assert s.now() >= 200.0
    finally:
        s.shutdown()
        Scheduler.uninstall()
