"""netload.pump: the scheduler keeps running while a blocking program runs, and
returns as soon as it ends even when nothing else happens in the host."""

from __future__ import annotations

import os
import time

from gntdma.host.netload import pump
from gntdma.sched import Reactor, Scheduler


def test_pump_returns_when_its_thread_ends_on_an_idle_scheduler(sched: Scheduler) -> None:
    r, w = os.pipe()
    reactor = Reactor(sched)  # an external source that never fires
    reactor.add_reader(r, lambda: None)
    try:
        t0 = time.monotonic()
        assert pump(sched, lambda: (time.sleep(0.05), 42)[1]) == 42
        assert time.monotonic() - t0 < 0.9  # not the reactor's 1 s poll, nor for ever
    finally:
        reactor.remove_reader(r)
        reactor.close()
        os.close(r)
        os.close(w)
