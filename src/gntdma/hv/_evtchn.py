"""Event channels, 2-level ABI semantics, delivered to handler threads.

Rules (``xen/common/event_channel.c``, ``event_2l.c``):
- Port 0 is reserved and never allocated.
- Raising a port sets its pending bit. If it was already pending nothing else
  happens (notifications coalesce). If it is masked, nothing is delivered until
  unmask, which re-delivers a pending port.
- A bound handler runs on an interrupt thread of the target domain (like a
  FreeBSD ithread); the thread clears the pending bit *before* calling the
  handler, so an event raised during the handler runs it again.

The interrupt thread checks for a pending event and goes idle under its spin
mutex, as FreeBSD's ``ithread_loop`` (``sys/kern/kern_intr.c``) checks
``it_need`` and sets ``TD_SET_IWAIT`` under ``thread_lock``, and a delivery
(``intr_event_schedule_thread``) wakes it under the same lock: the check and
the sleep are one step for the delivery, so no event is lost, whatever the
schedule. The idle wait is ``PIDLE`` (the hung-task watchdog does not count it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import final

from gntdma.abi.event_channel import EVTCHNSTAT_closed
from gntdma.sched import (
    MTX_SPIN,
    PIDLE,
    KThread,
    Scheduler,
    current_scheduler,
    msleep_spin,
    mtx_init,
    mtx_lock,
    mtx_unlock,
    trace,
    wakeup,
)

__all__ = ["EventPort", "PortHandler"]


@final
class PortHandler:
    """The interrupt thread that runs one port's handler."""

    def __init__(self, port: EventPort, fn: Callable[[int], None], name: str,
                 domain: object) -> None:
        self.port = port
        self.fn = fn
        self.name = name
        self.running = True
        self.runs = 0
        #: The interrupt thread's lock (FreeBSD's thread_lock of the ithread).
        self.lock = mtx_init("intr", MTX_SPIN)
        self.sched: Scheduler = current_scheduler()
        self.thread: KThread = self.sched.spawn(self._loop, name=name, daemon=True,
                                                domain=domain)

    def _loop(self) -> None:
        p = self.port
        m = self.lock
        mtx_lock(m)
        while self.running:
            if p.pending and not p.masked:
                p.pending = False  # clear before handling
                self.runs += 1
                mtx_unlock(m)
                if trace.active is not None:
                    trace.active.evtchn_run(p)
                self.fn(p.port)
                if trace.active is not None:
                    trace.active.evtchn_ran(p)
                mtx_lock(m)
                continue
            msleep_spin(self, m, "intr", 0.0, PIDLE)
        mtx_unlock(m)

    def kick(self) -> None:
        mtx_lock(self.lock)
        wakeup(self)
        mtx_unlock(self.lock)

    def stop(self) -> None:
        mtx_lock(self.lock)
        self.running = False
        wakeup(self)
        mtx_unlock(self.lock)


@dataclass(slots=True)
class EventPort:
    """One port of a domain's event-channel table."""

    port: int
    state: int = EVTCHNSTAT_closed
    remote_dom: int = 0
    remote_port: int = 0
    pending: bool = False
    masked: bool = False
    sends: int = 0
    handler: PortHandler | None = None

    def raise_(self) -> bool:
        """Set pending; True if a delivery is due (newly pending and unmasked)."""
        if trace.active is not None:
            trace.active.evtchn_notify(self)
        if self.pending:
            return False
        self.pending = True
        if self.masked:
            return False
        if self.handler is not None:
            self.handler.kick()
        return True

