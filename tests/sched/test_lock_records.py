"""A mutex is its own record of a hold, and the order check skips what changes nothing.

FreeBSD keeps the file and line of a lock's acquisition in the lock itself
(``_mtx_lock_flags`` passes ``__FILE__``/``__LINE__`` to ``WITNESS_LOCK``;
``witness_lock`` records them in the held lock's ``lock_instance``,
sys/kern/subr_witness.c), and ``witness_checkorder`` returns early when the
order from each held lock is already known (its ``isitmydescendant`` check).
Here taking a mutex builds no record: the mutex is the thread's record of the
hold, and an acquisition whose order is already in the graph builds nothing
for WITNESS. The reports must be exactly those of checking every acquisition.
"""

from __future__ import annotations

import random

import pytest

from gntdma.sched import (
    MTX_DUPOK,
    MTX_SPIN,
    Condvar,
    Mutex,
    Scheduler,
    Sx,
    _sync,
    cv_timedwait,
    msleep,
    msleep_spin,
    mtx_lock,
    mtx_unlock,
    sx_xlock,
    sx_xunlock,
)
from gntdma.sched._witness import site_str


def test_a_mutex_is_its_own_hold_record(sched: Scheduler) -> None:
    m = Mutex("own_record")
    seen: list[object] = []

    def body() -> None:
        mtx_lock(m)  # OWN-SITE
        held = sched.curthread.held
        seen.extend([len(held), held[-1] is m, held[-1].lock is m, held[-1].site])
        mtx_unlock(m)
        seen.append(len(held))

    sched.call(body)
    line = _line("mtx_lock(m)  # OWN" + "-SITE")
    assert seen == [1, True, True, f"{__file__}:{line}", 0]
    assert site_str(m.site_at) == f"{__file__}:{line}"


def _line(marker: str) -> int:
    with open(__file__) as f:
        return next(i for i, text in enumerate(f, 1) if marker in text)


def _program(rng: random.Random, locks: list[Mutex], spins: list[Mutex],
             sxs: list[Sx]) -> None:
    """Random nested acquisitions: sleep locks (mutexes and sx), then spin mutexes."""
    sleep: list[Mutex | Sx] = [*locks, *sxs]
    taken: list[Mutex | Sx] = rng.sample(sleep, rng.randint(1, len(sleep)))
    taken += rng.sample(spins, rng.randint(0, len(spins)))
    for lk in taken:
        if isinstance(lk, Sx):
            sx_xlock(lk)
        else:
            mtx_lock(lk)
    order = list(range(len(taken)))
    rng.shuffle(order)
    for i in order:
        lk = taken[i]
        if isinstance(lk, Sx):
            sx_xunlock(lk)
        else:
            mtx_unlock(lk)


def _reports(sched: Scheduler, seed: int) -> tuple[list[str], list[tuple[str, str, str, str]]]:
    rng = random.Random(seed)
    locks = [Mutex("rec_a"), Mutex("rec_b"), Mutex("rec_c"), Mutex("rec_d", type="rec_a"),
             Mutex("rec_dup1", MTX_DUPOK, type="rec_dup"),
             Mutex("rec_dup2", MTX_DUPOK, type="rec_dup")]
    spins = [Mutex("rec_spin1", MTX_SPIN), Mutex("rec_spin2", MTX_SPIN)]
    sxs = [Sx("rec_sx1"), Sx("rec_sx2")]
    for _ in range(40):
        sched.call(_program, rng, locks, spins, sxs)
    w = sched.witness
    edges = [(a, b, e.from_site, e.to_site) for a, succ in w.order.items()
             for b, e in succ.items()]
    return [r.format() for r in w.reports], edges


@pytest.mark.parametrize("seed", range(25))
def test_order_check_skips_only_what_changes_nothing(
        sched: Scheduler, monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    fast = _reports(sched, seed)
    sched.witness.reset()

    def every_time(s: Scheduler, t: object, cls: str, code: object, lasti: int,
                   spin: bool, sleepable: bool, dupok: bool = False) -> None:
        _sync.check_order(s, t, cls, (code, lasti), spin, sleepable,  # type: ignore[arg-type]
                          dupok)

    monkeypatch.setattr(_sync, "check_order_lazy", every_time)
    monkeypatch.setattr("gntdma.sched._sx.check_order_lazy", every_time)
    slow = _reports(sched, seed)
    assert fast == slow
    assert fast[1]  # the programs do order locks


def test_a_mutex_retaken_after_a_sleep_is_recorded_at_the_sleep_call(sched: Scheduler) -> None:
    """msleep, msleep_spin and cv_timedwait retake their interlock at their own call."""
    m, sp, cv = Mutex("retake_m"), Mutex("retake_spin", MTX_SPIN), Condvar("retake_cv")
    chan = object()
    sites: list[str] = []

    def sleeper() -> None:
        mtx_lock(m)
        msleep(chan, m, "retake", 0.001)  # MSLEEP-SITE
        sites.append(sched.curthread.held[-1].site)
        cv_timedwait(cv, m, 0.001)  # CV-SITE
        sites.append(sched.curthread.held[-1].site)
        mtx_unlock(m)
        mtx_lock(sp)
        msleep_spin(chan, sp, "retake_spin", 0.001)  # SPIN-SITE
        sites.append(sched.curthread.held[-1].site)
        mtx_unlock(sp)

    sched.call(sleeper)
    marks = ("# MSLEEP", "# CV", "# SPIN")
    assert sites == [f"{__file__}:{_line(mark + '-SITE')}" for mark in marks]
