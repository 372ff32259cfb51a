"""Scenarios for ``gntdma explore``: one bug of each class FreeBSD's lock rules catch.

Each is a small driver with the bug, run on a real guest kernel (its taskqueue,
softclock and callouts), so that the explorer finds it and ``gntdma replay``
shows it again (DESIGN 3; FreeBSD sys/kern/kern_synch.c, subr_witness.c,
kern_mutex.c):

``lost-wakeup``: an interrupt handler sets "done" and wakes the waiter; the
waiter checks "done" and sleeps with ``tsleep``, no interlock. On SMP the
wakeup can come between the check and the sleep: the waiter sleeps forever.

``sleep-with-mutex``: a driver sleeps (``msleep`` on another lock) with its
``MTX_DEF`` I/O mutex held: WITNESS's "Sleeping on ... with the following
non-sleepable locks held".

``abba-callout``: two threads take two driver locks in opposite orders while a
periodic callout keeps a timer armed; the cycle is reported at once.

``spin-barrier``: a producer fills a ring in a spin-mutex critical section; the
barrier inside does not preempt it (so the consumer never sees a torn slot),
but when it finds the ring full it takes the driver's sleep mutex inside the
spin section: "acquiring blockable sleep lock with spinlock or critical
section held".

Every factory takes the callback delivery for symmetry with the other
scenarios, and ignores it.
"""

from __future__ import annotations

from collections.abc import Callable

from gntdma.sched import (
    MTX_SPIN,
    Mutex,
    Scheduler,
    checkpoint,
    msleep,
    mtx_lock,
    mtx_unlock,
    tsleep,
    wakeup,
    wmb,
)
from gntdma.sys import BytePhysMem, Kernel, callout, callout_init, callout_reset

__all__ = ["RULE_SCENARIOS"]

ScenarioFn = Callable[[Scheduler], list[str]]


def _kernel() -> Kernel:
    return Kernel("guest1", BytePhysMem([(0, 64)]), 1)


def lost_wakeup(_delivery: str) -> ScenarioFn:
    """a check then a tsleep without interlock races its wakeup: the wakeup is lost"""
    def scenario(s: Scheduler) -> list[str]:
        k = _kernel()
        state = {"done": False}

        def waiter() -> None:
            checkpoint()
            if not state["done"]:  # BUG: no interlock between this check and the sleep
                tsleep(state, "xbdwait")

        def intr() -> None:
            state["done"] = True
            wakeup(state)

        s.spawn(waiter, name="guest1/xbd0-wait")
        s.spawn(intr, name="guest1/xbd0-intr", daemon=True)
        s.run()
        k.shutdown()
        return []
    return scenario


def sleep_with_mutex(_delivery: str) -> ScenarioFn:
    """a driver sleeps on another lock with its MTX_DEF I/O mutex held (WITNESS)"""
    def scenario(s: Scheduler) -> list[str]:
        k = _kernel()
        io, free = Mutex("xbd_io"), Mutex("xbd_free")
        state = {"free": 0}

        def submit() -> None:
            mtx_lock(io)
            mtx_lock(free)
            while state["free"] == 0:  # BUG: sleeps holding xbd_io
                msleep(state, free, "xbdfree")
            state["free"] -= 1
            mtx_unlock(free)
            mtx_unlock(io)

        def complete() -> None:
            mtx_lock(free)
            state["free"] += 1
            wakeup(state)
            mtx_unlock(free)

        s.spawn(submit, name="guest1/xbd0-submit")
        s.spawn(complete, name="guest1/xbd0-done")
        s.run()
        k.shutdown()
        return []
    return scenario


def abba_callout(_delivery: str) -> ScenarioFn:
    """an ABBA deadlock between two driver locks with a periodic callout armed"""
    def scenario(s: Scheduler) -> list[str]:
        k = _kernel()
        a, b = Mutex("xbd_io"), Mutex("xbd_cfg")
        tick = callout(k)
        callout_init(tick, 1)
        ticks = [0]

        def watchdog(_arg: object) -> None:  # re-arms itself: a timer is always armed
            ticks[0] += 1
            callout_reset(tick, 1.0, watchdog, None)

        def one() -> None:
            mtx_lock(a)
            checkpoint()
            mtx_lock(b)
            mtx_unlock(b)
            mtx_unlock(a)

        def two() -> None:
            mtx_lock(b)
            checkpoint()
            mtx_lock(a)  # BUG: the opposite order
            mtx_unlock(a)
            mtx_unlock(b)

        callout_reset(tick, 1.0, watchdog, None)
        s.spawn(one, name="guest1/xbd0-io")
        s.spawn(two, name="guest1/xbd0-cfg")
        s.run()
        k.shutdown()
        return []
    return scenario


def spin_barrier(_delivery: str) -> ScenarioFn:
    """a barrier inside a spin section, then a sleep mutex taken inside it (panic)"""
    def scenario(s: Scheduler) -> list[str]:
        k = _kernel()
        spin, io = Mutex("evtchn_ring", MTX_SPIN), Mutex("xbd_io")
        ring: list[tuple[int, int]] = []
        errors: list[str] = []
        slot = [0, 0]

        def producer() -> None:
            for i in range(3):
                mtx_lock(spin)
                slot[0] = i
                wmb()  # no preemption here: the consumer cannot see a torn slot
                slot[1] = i
                ring.append((slot[0], slot[1]))
                if len(ring) >= 2:  # BUG: a sleep mutex inside the spin section
                    mtx_lock(io)
                    mtx_unlock(io)
                mtx_unlock(spin)
                checkpoint()

        def consumer() -> None:
            for _ in range(3):
                mtx_lock(spin)
                if slot[0] != slot[1]:
                    errors.append(f"torn slot {slot}")
                got = bool(ring)
                if got:
                    ring.pop(0)
                mtx_unlock(spin)
                checkpoint()

        s.spawn(producer, name="guest1/ring-prod")
        s.spawn(consumer, name="guest1/ring-cons")
        s.run()
        k.shutdown()
        return errors
    return scenario


#: The scenarios of the lock rules: each has its bug, found by the explorer.
RULE_SCENARIOS: dict[str, Callable[[str], ScenarioFn]] = {
    "lost-wakeup": lost_wakeup,
    "sleep-with-mutex": sleep_with_mutex,
    "abba-callout": abba_callout,
    "spin-barrier": spin_barrier,
}
