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
