"""A signal handler's exception during a schedule is raised once the schedule is done.

``gntdma explore``/``replay`` (toolstack.interrupt.ScheduleInterruptGuard) hand the
exception to ``stop_after_schedule`` instead of raising it inside kernel code, where
it would be a failure of the schedule or a replay divergence.
"""

from __future__ import annotations

import pytest

from gntdma.sched import (
    Mutex,
    RandomStrategy,
    Scheduler,
    mtx_lock,
    mtx_unlock,
    run_once,
    schedule_running,
    stop_after_schedule,
)


class Stop(BaseException):
    pass


def test_the_schedule_ends_as_it_would_then_the_exception_is_raised() -> None:
    done: list[str] = []
    assert not schedule_running()

    def scenario(s: Scheduler) -> list[str]:
        m = Mutex("m")

        def worker(i: int) -> None:
            for _ in range(20):
                mtx_lock(m)
                if len(done) == 5:
                    assert schedule_running()
                    stop_after_schedule(Stop())  # as a signal handler would
                    stop_after_schedule(Stop("second"))  # the first one is kept
                done.append(f"{i}")
                mtx_unlock(m)

        for i in range(3):
            s.spawn(worker, i)
        s.run()
        return []

    with pytest.raises(Stop) as e:
        run_once(scenario, RandomStrategy(seed=1))
    assert e.value.args == ()
    assert len(done) == 60  # every thread ran to its end
    assert not schedule_running()
    out = run_once(lambda s: [], RandomStrategy(seed=1))  # nothing left over for the next
    assert out.kind is None
