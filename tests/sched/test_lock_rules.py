"""FreeBSD's lock classes, deadlock cycles found at once, and the hung-task watchdog.

Sources: sys/kern/kern_synch.c (_sleep: WITNESS_WARN "Sleeping on"; the
"spin locks can only use msleep_spin" KASSERT), sys/kern/subr_witness.c
(witness_warn, witness_list_lock; witness_checkorder: "acquiring blockable sleep
lock with spinlock or critical section held", "lock order reversal: (sleepable
after non-sleepable)"), sys/kern/kern_mutex.c (unlock_spin), sys/kern/kern_sx.c
and sx(9), sys/kern/kern_clock.c (deadlkres), Linux kernel/hung_task.c.
"""

from __future__ import annotations

import pytest

from gntdma.sched import (
    MTX_SPIN,
    PIDLE,
    SA_SLOCKED,
    SA_XLOCKED,
    Condvar,
    Deadlock,
    HungTask,
    KernelPanic,
    Mutex,
    RandomStrategy,
    Scheduler,
    VirtualClock,
    checkpoint,
    cv_wait,
    explore,
    msleep,
    msleep_spin,
    mtx_lock,
    mtx_unlock,
    run_once,
    strategy_stream,
    sx_assert,
    sx_downgrade,
    sx_init,
    sx_slock,
    sx_sunlock,
    sx_try_upgrade,
    sx_try_xlock,
    sx_xlock,
    sx_xunlock,
    tsleep,
    wakeup,
    wmb,
)


def test_sleep_with_sleep_mutex_held_is_reported(sched: Scheduler) -> None:
    m = Mutex("xbd_io")

    def body() -> None:
        mtx_lock(m)  # TAKEN-HERE
        tsleep(body, "xbdfree", 0.001)
        mtx_unlock(m)

    sched.call(body)
    sleeps = sched.witness.sleeps()
    assert len(sleeps) == 1
    text = sleeps[0].format()
    assert text.startswith('Sleeping on "xbdfree" with the following non-sleepable locks held:')
    assert "\nexclusive sleep mutex xbd_io r = 0 locked @ " in text
    assert text.endswith(f"test_lock_rules.py:{_line('# TAKEN-HERE')}")


def test_sleep_reports_every_mutex_but_the_interlock(sched: Scheduler) -> None:
    outer, inter = Mutex("outer"), Mutex("inter")
    cv = Condvar("cv")

    def body() -> None:
        mtx_lock(inter)
        msleep(body, inter, "alone", 0.001)  # only the interlock: allowed
        mtx_unlock(inter)
        mtx_lock(outer)
        mtx_lock(inter)
        cv_wait_timed(cv, inter)  # outer is held across the sleep: reported
        mtx_unlock(inter)
        mtx_unlock(outer)

    sched.call(body)
    texts = [r.format() for r in sched.witness.sleeps()]
    assert len(texts) == 1
    assert 'Sleeping on "cv"' in texts[0] and "sleep mutex outer" in texts[0]
    assert "sleep mutex inter" not in texts[0]


def cv_wait_timed(cv: Condvar, m: Mutex) -> None:
    from gntdma.sched import cv_timedwait

    cv_timedwait(cv, m, 0.001)


def test_blocking_on_a_contested_mutex_while_holding_another_is_allowed(
        sched: Scheduler) -> None:
    a, b = Mutex("a"), Mutex("b")

    def holder() -> None:
        mtx_lock(b)
        checkpoint()
        mtx_unlock(b)

    def taker() -> None:
        mtx_lock(a)
        mtx_lock(b)  # blocks on a turnstile, not a sleep
        mtx_unlock(b)
        mtx_unlock(a)

    sched.spawn(holder)
    sched.spawn(taker)
    sched.run()
    assert sched.witness.reports == []


def test_sx_shared_exclusive_and_sleepable(sched: Scheduler) -> None:
    sx = sx_init("xs_request")
    log: list[str] = []

    def reader(i: int) -> None:
        sx_slock(sx)
        sx_assert(sx, SA_SLOCKED)
        log.append(f"r{i}+")
        tsleep(reader, "read", 0.01)  # an sx may be held across a sleep
        log.append(f"r{i}-")
        sx_sunlock(sx)

    def writer() -> None:
        sx_xlock(sx)
        sx_assert(sx, SA_XLOCKED)
        log.append("w+")
        checkpoint()
        log.append("w-")
        sx_downgrade(sx)
        sx_assert(sx, SA_SLOCKED)
        assert sx_try_upgrade(sx) == 1
        sx_xunlock(sx)

    sched.spawn(reader, 1)
    sched.spawn(reader, 2)
    sched.spawn(writer)
    sched.run()
    assert log[:2] == ["r1+", "r2+"]  # two readers at once
    assert log.index("w+") > log.index("r2-") and log.index("w-") == log.index("w+") + 1
    assert sched.witness.reports == []
    assert sx_try_xlock(sx) == 1
    sx_xunlock(sx)


def test_sx_after_mutex_is_a_sleepable_after_non_sleepable_reversal(sched: Scheduler) -> None:
    m, sx = Mutex("sc_mtx"), sx_init("cfg_sx")

    def body() -> None:
        mtx_lock(m)
        sx_slock(sx)
        sx_sunlock(sx)
        mtx_unlock(m)

    sched.call(body)
    revs = sched.witness.reversals()
    assert len(revs) == 1
    text = revs[0].format()
    assert text.startswith("lock order reversal: (sleepable after non-sleepable)")
    assert " 1st sc_mtx @ " in text and " 2nd cfg_sx @ " in text


def spin_section(s: Scheduler) -> list[str]:
    spin = Mutex("intr_spin", MTX_SPIN)
    log: list[str] = []

    def holder() -> None:
        for _ in range(3):
            mtx_lock(spin)
            log.append("in")
            wmb()  # a barrier does not preempt a spin holder
            checkpoint()
            log.append("out")
            mtx_unlock(spin)

    def other() -> None:
        for _ in range(3):
            log.append("other")
            checkpoint()

    s.spawn(holder)
    s.spawn(other)
    s.run()
    bad = [i for i in range(len(log) - 1) if log[i] == "in" and log[i + 1] != "out"]
    return [f"preempted inside a spin section: {log}"] if bad else []


def test_spin_mutex_is_a_critical_section() -> None:
    res = explore(spin_section, strategy_stream("random", 0), budget=200)
    assert res.failure is None, res.failure.report


def test_sleep_mutex_inside_spin_mutex_panics(sched: Scheduler) -> None:
    spin, m = Mutex("sched_lock", MTX_SPIN), Mutex("xbd_io")

    def body() -> None:
        mtx_lock(spin)
        try:
            mtx_lock(m)
        finally:
            mtx_unlock(spin)

    with pytest.raises(KernelPanic, match=r"acquiring blockable sleep lock with spinlock or "
                                          r"critical section held \(sleep mutex\) xbd_io @ "):
        sched.call(body)


def test_msleep_with_spin_interlock_panics_and_msleep_spin_sleeps(sched: Scheduler) -> None:
    spin = Mutex("evtchn_spin", MTX_SPIN)
    chan = object()

    def wrong() -> None:
        mtx_lock(spin)
        try:
            msleep(chan, spin, "wrong", 0.001)
        finally:
            mtx_unlock(spin)

    with pytest.raises(KernelPanic, match="spin locks can only use msleep_spin"):
        sched.call(wrong)

    def right() -> int:
        mtx_lock(spin)
        rv = msleep_spin(chan, spin, "right")
        owned = spin.owner is not None
        mtx_unlock(spin)
        return rv if owned else -1

    t = sched.spawn(right)
    sched.yield_()
    assert spin.owner is None  # released while asleep
    wakeup(chan)
    sched.run()
    assert t.result == 0


def check_then_tsleep(s: Scheduler) -> list[str]:
    """A check followed by a tsleep with no interlock: atomic on one CPU, racy on SMP."""
    state = {"ready": False}
    chan = object()

    def consumer() -> None:
        if not state["ready"]:
            tsleep(chan, "ready")

    def producer() -> None:
        state["ready"] = True
        wakeup(chan)

    s.spawn(consumer, name="consumer")
    s.spawn(producer, name="producer")
    s.run()
    return []


def test_tsleep_without_interlock_can_lose_the_wakeup() -> None:
    res = explore(check_then_tsleep, strategy_stream("dfs", 0, max_preemptions=2), budget=200)
    assert res.failure is not None and res.failure.kind == "deadlock"
    assert 'consumer waits for _Channel "ready"' in res.failure.report


def abba_with_periodic_callout(s: Scheduler) -> list[str]:
    a, b = Mutex("lock_a"), Mutex("lock_b")
    tick = object()

    def softclock() -> None:  # a periodic callout keeps a timer armed forever
        while True:
            tsleep(tick, "softclock", 1.0)

    def one() -> None:
        mtx_lock(a)  # ONE-A
        checkpoint()
        mtx_lock(b)
        mtx_unlock(b)
        mtx_unlock(a)

    def two() -> None:
        mtx_lock(b)  # TWO-B
        checkpoint()
        mtx_lock(a)
        mtx_unlock(a)
        mtx_unlock(b)

    s.spawn(softclock, name="softclock", daemon=True)
    s.spawn(one, name="one")
    s.spawn(two, name="two")
    s.run()
    return []


def test_deadlock_cycle_reported_at_once_while_a_timer_is_armed() -> None:
    out = run_once(abba_with_periodic_callout, RandomStrategy(0), max_steps=20_000)
    seed = 0
    while out.kind != "deadlock" and seed < 50:  # a schedule where both take their first lock
        seed += 1
        out = run_once(abba_with_periodic_callout, RandomStrategy(seed), max_steps=20_000)
    assert out.kind == "deadlock", (out.kind, out.report)
    assert "a cycle of threads each waiting for a lock another holds" in out.report
    assert set(out.report.split("wait-for cycle: ")[1].split("\n")[0].split(" -> ")) == {
        "one", "two"}
    assert f"test_lock_rules.py:{_line('# ONE-A')}" in out.report
    assert f"test_lock_rules.py:{_line('# TWO-B')}" in out.report


def test_sx_deadlock_cycle_is_reported(sched: Scheduler) -> None:
    x, y = sx_init("x"), sx_init("y")

    def one() -> None:
        sx_xlock(x)
        checkpoint()
        sx_slock(y)

    def two() -> None:
        sx_xlock(y)
        checkpoint()
        sx_xlock(x)

    sched.spawn(one, name="one")
    sched.spawn(two, name="two")
    sched.call_later(5.0, lambda: None)  # something pending: not a global deadlock
    with pytest.raises(Deadlock, match="a cycle of threads") as ei:
        sched.run()
    assert set(ei.value.report.cycle) == {"one", "two"}


def _hung_scenario(idle_only: bool) -> Scheduler:
    s = Scheduler(clock=VirtualClock()).install()
    sx = sx_init("cfg")
    chan = object()

    def holder() -> None:
        sx_xlock(sx)  # HOLDER-SITE
        for _ in range(1000):  # timed sleeps: not counted
            tsleep(holder, "poll", 1.0)
        sx_xunlock(sx)

    def waiter() -> None:
        sx_slock(sx)
        sx_sunlock(sx)

    def service() -> None:
        tsleep(chan, "-", 0.0, PIDLE)  # a service thread idling for work: not counted

    s.spawn(service, name="taskq", daemon=True)
    if idle_only:
        s.spawn(lambda: [tsleep(chan, "tick", 1.0) for _ in range(200)], name="ticker")
    else:
        s.spawn(holder, name="holder")
        s.spawn(waiter, name="waiter")
    return s


def test_hung_task_reports_a_lock_waiter_and_its_holder() -> None:
    s = _hung_scenario(False)
    try:
        with pytest.raises(HungTask) as ei:
            s.run()
        assert s.now() == 60.0
        text = ei.value.report.format()
        assert "hung task: waiter blocked for more than 60 seconds" in text
        assert 'waiter waits for Sx "cfg"' in text and "held by holder" in text
        assert f"test_lock_rules.py:{_line('# HOLDER-SITE')}" in text
        assert "taskq" not in text
    finally:
        s.shutdown()
        Scheduler.uninstall()


def test_hung_task_ignores_idle_service_threads_and_timed_sleeps() -> None:
    s = _hung_scenario(True)
    try:
        s.run()
        assert s.now() >= 200.0
    finally:
        s.shutdown()
        Scheduler.uninstall()


def test_hung_task_threshold_is_configurable() -> None:
    s = Scheduler(clock=VirtualClock(), hung_timeout=5.0).install()
    try:
        s.spawn(lambda: tsleep(s, "stuck"), name="stuck")
        s.call_later(100.0, lambda: None)
        with pytest.raises(HungTask, match="stuck blocked for more than 5 seconds"):
            s.run()
    finally:
        s.shutdown()
        Scheduler.uninstall()


def test_uninterruptible_cv_wait_counts() -> None:
    s = Scheduler(clock=VirtualClock()).install()
    try:
        m, cv = Mutex("m"), Condvar("never")

        def body() -> None:
            mtx_lock(m)
            cv_wait(cv, m)

        s.spawn(body, name="cvwaiter")
        s.call_later(1000.0, lambda: None)
        with pytest.raises(HungTask, match="cvwaiter blocked for more than 60 seconds"):
            s.run()
    finally:
        s.shutdown()
        Scheduler.uninstall()


def _line(marker: str) -> int:
    with open(__file__) as f:
        for n, line in enumerate(f, 1):
            if marker in line and "_line(" not in line:
                return n
    raise AssertionError(marker)
