"""WITNESS: reversals with both sites, duplicates, and the panics it records."""

from __future__ import annotations

from gntdma.sched import MTX_DUPOK, Mutex, Scheduler, mtx_lock, mtx_unlock


def _take(first: Mutex, second: Mutex) -> None:
    mtx_lock(first)
    mtx_lock(second)  # SECOND-SITE
    mtx_unlock(second)
    mtx_unlock(first)


def test_reversal_reports_both_sites(sched: Scheduler) -> None:
    a, b = Mutex("xbd_io"), Mutex("gnttab_list")
    sched.call(_take, a, b)
    assert sched.witness.reports == []
    sched.call(_take, b, a)
    revs = sched.witness.reversals()
    assert len(revs) == 1
    r = revs[0]
    assert (r.first, r.second) == ("gnttab_list", "xbd_io")
    assert r.first_site.endswith(f"test_witness.py:{_line('mtx_lock(first)')}")
    assert r.second_site.endswith(f"test_witness.py:{_line('# SECOND-SITE')}")
    assert r.established is not None
    text = r.format()
    assert "lock order reversal" in text and "xbd_io" in text and "gnttab_list" in text
    # Reported the first time only.
    sched.call(_take, b, a)
    assert len(sched.witness.reversals()) == 1


def test_transitive_reversal(sched: Scheduler) -> None:
    a, b, c = Mutex("A"), Mutex("B"), Mutex("C")
    sched.call(_take, a, b)
    sched.call(_take, b, c)
    sched.call(_take, c, a)
    assert [(r.first, r.second) for r in sched.witness.reversals()] == [("C", "A")]


def test_same_class_needs_dupok(sched: Scheduler) -> None:
    sched.call(_take, Mutex("q"), Mutex("q"))
    assert [r.kind for r in sched.witness.reports] == ["duplicate"]
    sched.witness.reset()
    sched.call(_take, Mutex("d", MTX_DUPOK), Mutex("d", MTX_DUPOK))
    assert sched.witness.reports == []


def _line(marker: str) -> int:
    with open(__file__) as f:
        for n, line in enumerate(f, 1):
            if marker in line and "_line(" not in line:
                return n
    raise AssertionError(marker)


def test_duplicate_is_excused_by_the_dupok_of_the_lock_taken(sched: Scheduler) -> None:
    """sys/kern/subr_witness.c, witness_checkorder: ``if (w1 == w) { if (!(lock->lo_flags
    & LO_DUPOK) && !(flags & LOP_DUPOK) ...`` "acquiring duplicate lock of same type":
    ``lock`` is the lock being taken. A DUPOK lock taken over a plain one of its class is
    no report; a plain one taken over a DUPOK one is (it was the other way round)."""
    sched.call(_take, Mutex("c"), Mutex("c", MTX_DUPOK))
    assert sched.witness.reports == []
    sched.call(_take, Mutex("c", MTX_DUPOK), Mutex("c"))
    assert [(r.kind, r.first, r.second) for r in sched.witness.reports] == [
        ("duplicate", "c", "c")]


def test_sx_duplicate_is_excused_by_the_dupok_of_the_lock_taken(sched: Scheduler) -> None:
    from gntdma.sched import SX_DUPOK, sx_init, sx_xlock, sx_xunlock

    def take(first_flags: int, second_flags: int) -> None:
        a, b = sx_init("s", first_flags), sx_init("s", second_flags)
        sx_xlock(a)
        sx_xlock(b)
        sx_xunlock(b)
        sx_xunlock(a)

    sched.call(take, 0, SX_DUPOK)
    assert sched.witness.reports == []
    sched.call(take, SX_DUPOK, 0)
    assert [r.kind for r in sched.witness.reports] == ["duplicate"]


def test_a_duplicate_is_looked_for_in_the_lock_taken_last_only(sched: Scheduler) -> None:
    """witness_checkorder compares the lock taken with the one taken last (``plock``):
    "Note that we only have to check for this on the last lock we just acquired. Any
    other cases will be caught as lock order violations." Holding c, then d, taking
    another c is the reversal d -> c against the order c -> d just made, not a
    duplicate."""
    c1, d, c2 = Mutex("c"), Mutex("d"), Mutex("c")

    def take() -> None:
        mtx_lock(c1)
        mtx_lock(d)
        mtx_lock(c2)
        mtx_unlock(c2)
        mtx_unlock(d)
        mtx_unlock(c1)

    sched.call(take)
    assert [(r.kind, r.first, r.second) for r in sched.witness.reports] == [
        ("reversal", "d", "c")]


def test_a_lock_without_witness_is_not_the_lock_taken_last(sched: Scheduler) -> None:
    """subr_witness.c, witness_lock: ``if (... (w = lock->lo_witness) == NULL) return;``
    a MTX_NOWITNESS/SX_NOWITNESS lock never goes on the thread's lock list, so taking
    A, N (no witness), A is a duplicate of A: the last lock on the list (it was hidden)."""
    from gntdma.sched import MTX_NOWITNESS, MTX_SPIN, SX_NOWITNESS, sx_init, sx_xlock, sx_xunlock

    def mutexes(flags: int) -> None:
        a1, n, a2 = Mutex("A", flags), Mutex("N", flags | MTX_NOWITNESS), Mutex("A", flags)
        for m in (a1, n, a2):
            mtx_lock(m)
        for m in (a2, n, a1):
            mtx_unlock(m)

    def sxs() -> None:
        a1, n, a2 = sx_init("S"), sx_init("NS", SX_NOWITNESS), sx_init("S")
        for x in (a1, n, a2):
            sx_xlock(x)
        for x in (a2, n, a1):
            sx_xunlock(x)

    for run, cls in ((lambda: mutexes(0), "A"), (lambda: mutexes(MTX_SPIN), "A"), (sxs, "S")):
        sched.witness.reset()
        sched.call(run)
        assert [(r.kind, r.first) for r in sched.witness.reports] == [("duplicate", cls)]


def test_a_lock_without_witness_is_no_source_of_order(sched: Scheduler) -> None:
    """Taking B while holding a NOWITNESS N records no N -> B; so taking a witnessed
    lock of N's class while holding B is no reversal."""
    from gntdma.sched import MTX_NOWITNESS

    n, b, n2 = Mutex("N", MTX_NOWITNESS), Mutex("B"), Mutex("N")
    sched.call(_take, n, b)
    sched.call(_take, b, n2)
    assert sched.witness.reports == []
    assert "N" not in sched.witness.order


def test_sleeping_with_a_sleep_mutex_without_witness_is_no_report(sched: Scheduler) -> None:
    """witness_warn lists the thread's lock list: a NOWITNESS sleep mutex is not on it."""
    from gntdma.sched import MTX_NOWITNESS, tsleep

    def sleep_holding(m: Mutex) -> None:
        mtx_lock(m)
        tsleep(object(), "nap", 0.001)
        mtx_unlock(m)

    sched.call(sleep_holding, Mutex("quiet", MTX_NOWITNESS))
    assert sched.witness.reports == []
    sched.call(sleep_holding, Mutex("loud"))
    assert [r.kind for r in sched.witness.reports] != []
