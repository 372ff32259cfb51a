"""The interrupt thread of an event channel never loses an event and idles as PIDLE.

Source: FreeBSD sys/kern/kern_intr.c, ithread_loop (it_need checked and
TD_SET_IWAIT set under thread_lock) and intr_event_schedule_thread (the thread
woken under the same lock); Xen xen/common/event_channel.c, evtchn_send.
"""

from __future__ import annotations

from gntdma.abi.event_channel import EVTCHNSTAT_interdomain
from gntdma.hv import EventPort, PortHandler
from gntdma.sched import (
    Mutex,
    Scheduler,
    VirtualClock,
    checkpoint,
    explore,
    msleep,
    mtx_lock,
    mtx_unlock,
    strategy_stream,
    tsleep,
    wakeup,
)


def two_events_racing_the_idle_sleep(s: Scheduler) -> list[str]:
    p = EventPort(5, EVTCHNSTAT_interdomain)
    m = Mutex("drv")
    runs = [0]

    def handler(_port: int) -> None:
        mtx_lock(m)
        runs[0] += 1
        wakeup(runs)
        mtx_unlock(m)

    p.handler = PortHandler(p, handler, "intr", None)

    def sender() -> None:
        for n in range(1, 3):
            checkpoint()
            p.raise_()
            mtx_lock(m)
            while runs[0] < n:
                msleep(runs, m, "wait")
            mtx_unlock(m)

    s.spawn(sender, name="sender")
    s.run()
    p.handler.stop()
    return []


def test_interrupt_thread_sleeps_with_its_lock_so_no_event_is_lost() -> None:
    for res in (explore(two_events_racing_the_idle_sleep,
                        strategy_stream("dfs", 0, max_preemptions=2), budget=400),
                explore(two_events_racing_the_idle_sleep, strategy_stream("random", 0),
                        budget=200)):
        assert res.failure is None, (res.failure.kind, res.failure.report)


def test_idle_interrupt_thread_is_not_a_hung_task() -> None:
    s = Scheduler(clock=VirtualClock(), hung_timeout=60.0).install()
    try:
        p = EventPort(5, EVTCHNSTAT_interdomain)
        p.handler = PortHandler(p, lambda _port: None, "intr", None)

        def ticker() -> None:
            for _ in range(200):
                tsleep(ticker, "tick", 1.0)

        s.spawn(ticker, name="ticker")
        s.run()
        assert s.now() >= 200.0
        p.handler.stop()
    finally:
        s.shutdown()
        Scheduler.uninstall()
