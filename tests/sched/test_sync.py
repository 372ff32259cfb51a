"""Mutexes, condition variables, sleep/wakeup, timeouts, I/O and deadlock reports."""

from __future__ import annotations

import errno
import threading

import pytest

from gntdma.sched import (
    MA_NOTOWNED,
    MA_OWNED,
    MTX_DUPOK,
    MTX_NEW,
    MTX_NOPROFILE,
    MTX_NOWITNESS,
    MTX_QUIET,
    MTX_RECURSE,
    MTX_SPIN,
    SX_DUPOK,
    SX_NEW,
    SX_NOADAPTIVE,
    SX_NOPROFILE,
    SX_NOWITNESS,
    SX_QUIET,
    SX_RECURSE,
    Condvar,
    Deadlock,
    KernelPanic,
    Mutex,
    Scheduler,
    VirtualClock,
    blocking_io,
    checkpoint,
    curthread,
    cv_broadcast,
    cv_signal,
    cv_timedwait,
    cv_wait,
    msleep,
    mtx_assert,
    mtx_init,
    mtx_lock,
    mtx_trylock,
    mtx_unlock,
    sx_init,
    tsleep,
    wakeup,
    wakeup_one,
)


def test_mutex_excludes_and_hands_over(sched: Scheduler) -> None:
    m = Mutex("m")
    log: list[str] = []

    def worker(name: str) -> None:
        for i in range(3):
            mtx_lock(m)
            log.append(f"{name}+{i}")
            checkpoint()  # others run, but cannot enter
            log.append(f"{name}-{i}")
            mtx_unlock(m)
            checkpoint()

    sched.spawn(worker, "a")
    sched.spawn(worker, "b")
    sched.run()
    assert len(log) == 12
    for i in range(0, 12, 2):  # every entry is followed by its own exit
        assert log[i][0] == log[i + 1][0] and log[i][1] == "+" and log[i + 1][1] == "-"
    assert {e[0] for e in log} == {"a", "b"}


def test_recursion_on_non_recursive_mutex_panics(sched: Scheduler) -> None:
    m = Mutex("plain")
    mtx_lock(m)
    with pytest.raises(KernelPanic, match="recursing on non-recursive mutex plain"):
        mtx_lock(m)
    mtx_unlock(m)
    assert len(sched.witness.panics()) == 1


def test_recursive_mutex_counts(sched: Scheduler) -> None:
    m = Mutex("rec", MTX_RECURSE)
    mtx_lock(m)
    mtx_lock(m)
    assert mtx_trylock(m) == 1
    mtx_unlock(m)
    mtx_unlock(m)
    mtx_assert(m, MA_OWNED)
    mtx_unlock(m)
    mtx_assert(m, MA_NOTOWNED)


def test_unlock_by_non_owner_panics(sched: Scheduler) -> None:
    m = Mutex("owned")

    def holder() -> None:
        mtx_lock(m)
        tsleep(m, "hold", 0.01)
        mtx_unlock(m)

    t = sched.spawn(holder)
    sched.yield_()  # holder takes the lock and sleeps
    assert m.owner is t
    with pytest.raises(KernelPanic, match="not owned by thread0"):
        mtx_unlock(m)
    sched.run()


def test_trylock_fails_when_held(sched: Scheduler) -> None:
    m = Mutex("t")
    got: list[int] = []

    def other() -> None:
        got.append(mtx_trylock(m))

    mtx_lock(m)
    sched.call(other)
    mtx_unlock(m)
    assert got == [0]


def test_sleeping_with_spin_lock_panics(sched: Scheduler) -> None:
    spin = Mutex("spin", MTX_SPIN)

    def body() -> None:
        mtx_lock(spin)
        try:
            tsleep(body, "zzz", 0.001)
        finally:
            mtx_unlock(spin)

    # sys/kern/subr_witness.c, witness_warn: the spin mutex is listed; the
    # switch in a critical section panics.
    with pytest.raises(KernelPanic, match="Sleeping on \"zzz\" with the following "
                                          "non-sleepable locks held:\nexclusive spin mutex spin"):
        sched.call(body)


def test_condvar_signal_and_broadcast(sched: Scheduler) -> None:
    m = Mutex("cvm")
    cv = Condvar("cv")
    state = {"go": 0, "woke": 0}

    def waiter() -> None:
        mtx_lock(m)
        while state["go"] == 0:
            cv_wait(cv, m)
        state["woke"] += 1
        mtx_unlock(m)

    for _ in range(3):
        sched.spawn(waiter)
    sched.yield_()
    mtx_lock(m)
    state["go"] = 1
    cv_signal(cv)
    mtx_unlock(m)
    sched.yield_()
    assert state["woke"] == 1
    mtx_lock(m)
    cv_broadcast(cv)
    mtx_unlock(m)
    sched.run()
    assert state["woke"] == 3


def test_cv_timedwait_times_out_on_virtual_clock() -> None:
    s = Scheduler(clock=VirtualClock()).install()
    try:
        m = Mutex("tm")
        cv = Condvar("never")

        def body() -> int:
            mtx_lock(m)
            rv = cv_timedwait(cv, m, 5.0)
            mtx_assert(m, MA_OWNED)
            mtx_unlock(m)
            return rv

        assert s.call(body) == errno.EWOULDBLOCK
        assert s.now() == 5.0
    finally:
        s.shutdown()
        Scheduler.uninstall()


def test_sleep_wakeup_channels(sched: Scheduler) -> None:
    chan = object()
    order: list[int] = []

    def sleeper(i: int) -> None:
        assert tsleep(chan, "chan") == 0
        order.append(i)

    for i in range(3):
        sched.spawn(sleeper, i)
    sched.yield_()
    wakeup_one(chan)
    sched.yield_()
    assert order == [0]
    wakeup(chan)
    sched.run()
    assert order == [0, 1, 2]


def test_msleep_releases_interlock(sched: Scheduler) -> None:
    m = Mutex("inter")
    chan = object()
    seen: list[bool] = []

    def sleeper() -> None:
        mtx_lock(m)
        msleep(chan, m, "wait")
        seen.append(m.owner is not None)
        mtx_unlock(m)

    sched.spawn(sleeper)
    sched.yield_()
    assert m.owner is None
    wakeup(chan)
    sched.run()
    assert seen == [True]


def test_thread0_blocks_by_running_the_scheduler(sched: Scheduler) -> None:
    m = Mutex("boot")

    def holder() -> None:
        mtx_lock(m)
        tsleep(holder, "hold", 0.01)
        mtx_unlock(m)

    sched.spawn(holder)
    sched.yield_()
    assert m.owner is not None
    mtx_lock(m)  # thread0 sleeps until the holder lets go
    mtx_unlock(m)


def test_deadlock_is_reported_with_holders_and_cycle(sched: Scheduler) -> None:
    a, b = Mutex("lock_a"), Mutex("lock_b")

    def one() -> None:
        mtx_lock(a)
        checkpoint()
        mtx_lock(b)

    def two() -> None:
        mtx_lock(b)
        checkpoint()
        mtx_lock(a)

    sched.spawn(one, name="one")
    sched.spawn(two, name="two")
    with pytest.raises(Deadlock) as ei:
        sched.run()
    rep = ei.value.report
    assert set(rep.cycle) == {"one", "two"}
    text = rep.format()
    assert 'Mutex "lock_b"' in text and "held by two" in text
    assert "test_sync.py" in text


def test_blocking_io_on_pool_returns_results() -> None:
    s = Scheduler(io_mode="pool").install()
    try:
        ids: list[int] = []

        def io(i: int) -> int:
            ids.append(threading.get_ident())
            return i * 2

        results: list[int] = []

        def body(i: int) -> None:
            results.append(blocking_io(io, i))

        for i in range(8):
            s.spawn(body, i)
        s.run()
        assert sorted(results) == [i * 2 for i in range(8)]
        assert threading.get_ident() not in ids
    finally:
        s.shutdown()
        Scheduler.uninstall()


def test_external_events_are_delivered(sched: Scheduler) -> None:
    chan = object()
    sched.add_external_source()

    def poster() -> None:
        sched.post(lambda: wakeup(chan))

    threading.Timer(0.01, poster).start()
    assert sched.call(lambda: tsleep(chan, "ext")) == 0
    sched.remove_external_source()


def test_thread_exit_with_lock_held_panics(sched: Scheduler) -> None:
    m = Mutex("leaked")
    with pytest.raises(KernelPanic, match="exited with locks held: leaked"):
        sched.call(lambda: mtx_lock(m))


def test_reactor_delivers_readable_fds_into_the_scheduler(sched: Scheduler) -> None:
    import os

    from gntdma.sched import Reactor

    r, w = os.pipe()
    reactor = Reactor(sched)
    chan = object()
    got: list[bytes] = []

    def readable() -> None:
        got.append(os.read(r, 100))
        wakeup(chan)

    reactor.add_reader(r, readable)
    threading.Timer(0.01, lambda: os.write(w, b"ping")).start()
    assert sched.call(lambda: tsleep(chan, "wait", 5.0)) == 0
    assert got == [b"ping"]
    reactor.remove_reader(r)
    reactor.close()
    os.close(r)
    os.close(w)
    assert sched.statistics().external_sources == 0


# -- mtx_trylock and mtx_destroy as sys/kern/kern_mutex.c has them -------------------------


def test_trylock_of_a_mutex_the_caller_holds_not_recursable_returns_0(sched: Scheduler) -> None:
    """sys/kern/kern_mutex.c, _mtx_trylock_flags_int: an owned mutex without
    LO_RECURSABLE/MTX_RECURSE fails to be obtained and trylock returns 0 (mutex(9):
    0 when it cannot be acquired at once); a recursable one is recursed, 1."""
    m = Mutex("m")
    r = Mutex("r", MTX_RECURSE)
    got: list[int] = []

    def t() -> None:
        mtx_lock(m)
        got.append(mtx_trylock(m))
        mtx_unlock(m)
        mtx_lock(r)
        got.append(mtx_trylock(r))
        mtx_unlock(r)
        mtx_unlock(r)
        mtx_assert(r, MA_NOTOWNED)

    sched.spawn(t)
    sched.run()
    assert got == [0, 1]


@pytest.mark.parametrize("kind", ["spin", "destroyed"])
def test_trylock_of_a_spin_or_destroyed_mutex_panics_at_the_call(sched: Scheduler,
                                                                 kind: str) -> None:
    """sys/kern/kern_mutex.c, _mtx_trylock_flags_int: KASSERTs "mtx_trylock() of spin
    mutex %s @ %s:%d" and "mtx_trylock() of destroyed mutex @ %s:%d"."""
    from gntdma.sched import mtx_destroy

    m = Mutex("s", MTX_SPIN) if kind == "spin" else Mutex("d")
    if kind == "destroyed":
        mtx_destroy(m)

    def t() -> None:
        mtx_trylock(m)

    sched.spawn(t)
    with pytest.raises(KernelPanic, match=rf"mtx_trylock\(\) of {kind} mutex \w+ @ "
                                          rf".*test_sync\.py:\d+"):
        sched.run()


@pytest.mark.parametrize(("flags", "op"), [(0, "mtx_lock"), (MTX_SPIN, "mtx_lock_spin")])
def test_lock_of_a_destroyed_mutex_panics_at_the_call(sched: Scheduler, flags: int,
                                                      op: str) -> None:
    """sys/kern/kern_mutex.c, __mtx_lock_flags and __mtx_lock_spin_flags: KASSERT
    "mtx_lock() of destroyed mutex", "mtx_lock_spin() of destroyed mutex"."""
    from gntdma.sched import mtx_destroy

    m = Mutex("d", flags)
    mtx_destroy(m)

    def t() -> None:
        mtx_lock(m)

    sched.spawn(t)
    with pytest.raises(KernelPanic, match=rf"{op}\(\) of destroyed mutex d @ .*test_sync"):
        sched.run()


@pytest.mark.parametrize("flags", [0, MTX_SPIN])
def test_destroy_of_a_mutex_held_once_by_the_caller_lets_its_hold_go(sched: Scheduler,
                                                                    flags: int) -> None:
    """mutex(9): "It is permissible to have a single hold count on a mutex when it is
    destroyed"; sys/kern/kern_mutex.c, _mtx_destroy: the hold goes as an unlock's
    (WITNESS_UNLOCK, spinlock_exit for a spin mutex), and the thread ends holding
    nothing (no "exited with locks held")."""
    from gntdma.sched import mtx_destroy

    m = Mutex("m", flags)
    after: list[int] = []

    def t() -> None:
        mtx_lock(m)
        mtx_destroy(m)
        after.append(len(curthread().held))
        after.append(curthread().critnest)
        checkpoint()  # outside any critical section again

    sched.spawn(t)
    sched.run()
    assert after == [0, 0]


@pytest.mark.parametrize("how", ["recursed", "another", "twice"])
def test_destroy_of_a_recursed_or_others_or_destroyed_mutex_panics(sched: Scheduler,
                                                                   how: str) -> None:
    """sys/kern/kern_mutex.c, _mtx_destroy: MPASS that an owned mutex is neither recursed
    nor contested, and that one the caller does not own is unowned."""
    from gntdma.sched import mtx_destroy

    m = Mutex("m", MTX_RECURSE)

    def holder() -> None:
        mtx_lock(m)
        checkpoint()
        checkpoint()
        mtx_unlock(m)

    def t() -> None:
        if how == "recursed":
            mtx_lock(m)
            mtx_lock(m)
        elif how == "twice":
            mtx_destroy(m)
        mtx_destroy(m)

    if how == "another":
        sched.spawn(holder)
    sched.spawn(t)
    with pytest.raises(KernelPanic, match={"recursed": "mtx_destroy of recursed mutex m",
                                           "another": "mtx_destroy of mutex m held by",
                                           "twice": "mtx_destroy of destroyed mutex m"}[how]):
        sched.run()


def test_unlock_of_a_destroyed_mutex_panics_in_freebsds_words(sched: Scheduler) -> None:
    """sys/kern/kern_mutex.c, __mtx_unlock_flags: KASSERT "mtx_unlock() of destroyed
    mutex @ %s:%d" (a mutex destroyed with its single hold, then unlocked)."""
    from gntdma.sched import mtx_destroy

    m = Mutex("uw")

    def t() -> None:
        mtx_lock(m)
        mtx_destroy(m)
        mtx_unlock(m)

    sched.spawn(t)
    with pytest.raises(KernelPanic, match=r"mtx_unlock\(\) of destroyed mutex uw @ .*test_sync"):
        sched.run()


@pytest.mark.parametrize("op", ["sx_xlock", "sx_slock", "sx_try_xlock", "sx_try_slock"])
def test_an_operation_on_a_destroyed_sx_panics_at_the_call(sched: Scheduler, op: str) -> None:
    """sys/kern/kern_sx.c: KASSERT(sx->sx_lock != SX_LOCK_DESTROYED, ("sx_xlock() of
    destroyed sx @ %s:%d")), and the same in sx_slock, sx_try_xlock, sx_try_slock."""
    import gntdma.sched as gs

    sx = gs.sx_init("d")
    gs.sx_destroy(sx)

    def t() -> None:
        getattr(gs, op)(sx)

    sched.spawn(t)
    with pytest.raises(KernelPanic, match=rf"{op}\(\) of destroyed sx d @ .*test_sync"):
        sched.run()


def test_an_sx_destroyed_twice_panics() -> None:
    """sys/kern/kern_sx.c, sx_destroy -> subr_lock.c, lock_destroy: KASSERT that the
    lock is initialized; a destroyed sx is not."""
    from gntdma.sched import sx_destroy, sx_init

    sx = sx_init("d")
    sx_destroy(sx)
    with pytest.raises(KernelPanic, match="sx lock d is not initialized"):
        sx_destroy(sx)


def test_mutex_options_have_freebsds_values() -> None:
    """sys/sys/mutex.h and sys/sys/lock.h: MTX_DUPOK is LOP_DUPOK (0x10) and MTX_QUIET
    LOP_QUIET (0x02); MTX_NOPROFILE is 0x20 (MTX_DUPOK was 0x20 here)."""
    assert (MTX_SPIN, MTX_QUIET, MTX_RECURSE, MTX_NOWITNESS, MTX_DUPOK, MTX_NOPROFILE,
            MTX_NEW) == (0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40)
    m = Mutex("q", MTX_QUIET | MTX_NOPROFILE | MTX_NEW)  # accepted, nothing to do here
    assert not m.spin and not m.dupok and not m._recurse_ok
    assert Mutex("d", 0x10).dupok


@pytest.mark.parametrize("flags", [0x80, 0x100, MTX_SPIN | 0x200])
def test_mtx_init_with_an_unknown_option_panics(flags: int) -> None:
    """sys/kern/kern_mutex.c, _mtx_init: MPASS((opts & ~(MTX_SPIN | MTX_QUIET |
    MTX_RECURSE | MTX_NOWITNESS | MTX_DUPOK | MTX_NOPROFILE | MTX_NEW)) == 0)."""
    with pytest.raises(KernelPanic, match=r"Assertion \(opts & ~\(MTX_SPIN .* == 0 failed at "
                                          r".*test_sync\.py:\d+ \(mtx_init options 0x"):
        mtx_init("bad", flags)


def test_sx_options_have_freebsds_values_and_unknown_ones_panic() -> None:
    """sys/sys/sx.h values; sys/kern/kern_sx.c, sx_init_flags: MPASS((opts & ~(SX_QUIET |
    SX_RECURSE | SX_NOWITNESS | SX_DUPOK | SX_NOPROFILE | SX_NOADAPTIVE | SX_NEW)) == 0)."""
    assert (SX_DUPOK, SX_NOPROFILE, SX_NOWITNESS, SX_QUIET, SX_NOADAPTIVE, SX_RECURSE,
            SX_NEW) == (0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40)
    sx_init("ok", SX_QUIET | SX_NOPROFILE | SX_NOADAPTIVE | SX_NEW | SX_DUPOK)
    with pytest.raises(KernelPanic, match=r"Assertion \(opts & ~\(SX_QUIET .* == 0 failed at "
                                          r".*test_sync\.py:\d+ \(sx_init_flags options 0x80"):
        sx_init("bad", 0x80)
