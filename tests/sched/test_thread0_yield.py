"""thread0 yielding in place gets the CPU back even from a thread that polls.

thread0 (test or toolstack code) runs the scheduler loop in place when it
yields; it is runnable but not queued, so a kernel thread polling with
``checkpoint()`` must still go back to the loop rather than find nobody else
to run (a lock taken on the way to a wakeup is such a yield).
"""

from __future__ import annotations

import pytest

from gntdma.sched import Scheduler, checkpoint


@pytest.mark.timeout(20)
def test_thread0_yield_is_not_starved_by_a_polling_thread(sched: Scheduler) -> None:
    stop = [False]
    polls = [0]

    def poller() -> None:
        while not stop[0]:
            polls[0] += 1
            checkpoint()

    sched.spawn(poller, name="poller", daemon=True)
    sched.yield_()  # runs the poller, and must come back
    stop[0] = True
    assert polls[0] >= 1
