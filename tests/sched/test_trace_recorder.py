"""The trace recorder of the kernel threads (Chrome trace events).

Lock holds and waits are slices of the holder's track, as FreeBSD's own lock
tracing shows them (sys/kern/kern_mutex.c, __mtx_lock_sleep: the
``LOCKSTAT_PROFILE_OBTAIN_LOCK_SUCCESS`` and ``KTR_LOCK`` records of a wait
and its acquisition; sys/kern/kern_synch.c, _sleep: ``KTR_STATE`` of a sleep
on its wmesg). The structure check is the one of ``gntdma.toolstack.trace``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest

from gntdma.sched import (
    Scheduler,
    VirtualClock,
    _sx,
    _sync,
    _trace,
    checkpoint,
    msleep,
    mtx_init,
    mtx_lock,
    mtx_unlock,
    sx_init,
    sx_slock,
    sx_sunlock,
    sx_xlock,
    sx_xunlock,
    tsleep,
    wakeup,
)
from gntdma.sched._trace import TraceRecorder
from gntdma.toolstack.trace import check_trace


@pytest.fixture
def sched() -> Iterator[Scheduler]:
    s = Scheduler(clock=VirtualClock()).install()
    try:
        yield s
    finally:
        _trace.stop()
        s.shutdown()
        Scheduler.uninstall()


def _doc(rec: TraceRecorder) -> dict[str, Any]:
    rec.finish()
    return {"traceEvents": rec.events, "displayTimeUnit": "ms"}


def _names(doc: dict[str, Any]) -> dict[tuple[int, int], str]:
    return {(e["pid"], e["tid"]): e["args"]["name"] for e in doc["traceEvents"]
            if e["ph"] == "M" and e["name"] == "thread_name"}


def _on(doc: dict[str, Any], thread: str) -> list[tuple[str, str]]:
    """(ph, name) of the slice and instant events on the track of ``thread``."""
    names = _names(doc)
    return [(e["ph"], e["name"]) for e in doc["traceEvents"]
            if e["ph"] in "BEi" and names.get((e["pid"], e["tid"])) == thread]


def test_lock_hold_and_wait_are_slices_of_each_threads_track(sched: Scheduler) -> None:
    rec = _trace.start(TraceRecorder())
    m = mtx_init("xbd_io")

    def holder() -> None:
        mtx_lock(m)
        checkpoint()  # the waiter runs and blocks on m
        mtx_unlock(m)

    def waiter() -> None:
        mtx_lock(m)
        mtx_unlock(m)

    sched.spawn(holder, name="guest1/holder")
    sched.spawn(waiter, name="guest1/waiter")
    sched.run()
    doc = _doc(rec)
    assert check_trace(doc) == []
    assert _on(doc, "guest1/holder") == [("B", "xbd_io"), ("E", "xbd_io")]
    assert _on(doc, "guest1/waiter") == [("B", "wait xbd_io"), ("E", "wait xbd_io"),
                                         ("B", "xbd_io"), ("E", "xbd_io")]


def test_locks_released_out_of_order_keep_the_slices_nested(sched: Scheduler) -> None:
    rec = _trace.start(TraceRecorder())
    a, b = mtx_init("a"), mtx_init("b")
    mtx_lock(a)
    mtx_lock(b)
    mtx_unlock(a)  # not the innermost: b ends first and begins again
    mtx_unlock(b)
    doc = _doc(rec)
    assert check_trace(doc) == []
    assert _on(doc, "thread0") == [("B", "a"), ("B", "b"), ("E", "b"), ("E", "a"),
                                   ("B", "b"), ("E", "b")]
    resumed = [e for e in doc["traceEvents"] if e.get("args", {}).get("resumed")]
    assert [e["name"] for e in resumed] == ["b"]


def test_sleep_drops_the_interlock_slice_and_takes_it_again(sched: Scheduler) -> None:
    rec = _trace.start(TraceRecorder())
    m = mtx_init("bio done")
    chan = object()

    def sleeper() -> None:
        mtx_lock(m)
        msleep(chan, m, "biowait")
        mtx_unlock(m)

    sched.spawn(sleeper, name="guest1/io0")
    sched.call(lambda: wakeup(chan), name="guest1/intr")
    sched.run()
    doc = _doc(rec)
    assert check_trace(doc) == []
    assert _on(doc, "guest1/io0") == [("B", "bio done"), ("E", "bio done"),
                                      ("B", "sleep biowait"), ("E", "sleep biowait"),
                                      ("B", "bio done"), ("E", "bio done")]


def test_sx_shared_and_exclusive_holds_and_waits(sched: Scheduler) -> None:
    rec = _trace.start(TraceRecorder())
    sx = sx_init("xenstore")

    def reader() -> None:
        sx_slock(sx)
        checkpoint()
        sx_sunlock(sx)

    def writer() -> None:
        sx_xlock(sx)
        sx_xunlock(sx)

    sched.spawn(reader, name="r")
    sched.spawn(writer, name="w")
    sched.run()
    doc = _doc(rec)
    assert check_trace(doc) == []
    assert _on(doc, "r") == [("B", "xenstore (shared)"), ("E", "xenstore (shared)")]
    assert _on(doc, "w") == [("B", "wait xenstore"), ("E", "wait xenstore"),
                             ("B", "xenstore"), ("E", "xenstore")]


def test_killed_threads_open_slices_are_ended_at_the_end(sched: Scheduler) -> None:
    rec = _trace.start(TraceRecorder())
    m = mtx_init("xbd_io")
    chan = object()

    def stuck() -> None:
        mtx_lock(m)
        tsleep(chan, "forever")

    t = sched.spawn(stuck, name="guest1/stuck", daemon=True)
    sched.run(until=lambda: t.wchan is not None)
    sched.kill(t)  # its domain is gone: no unlock, no wakeup
    doc = _doc(rec)
    assert check_trace(doc) == []
    ends = [e for e in doc["traceEvents"] if e["ph"] == "E"]
    # The sleep ends as the thread unwinds; the lock it never released, at the end.
    assert [(e["name"], e.get("args")) for e in ends] == [
        ("sleep forever", None), ("xbd_io", {"unfinished": True})]


def test_virtual_clock_timestamps_count_steps_and_always_increase(sched: Scheduler) -> None:
    rec = _trace.start(TraceRecorder())
    m = mtx_init("m")

    def worker() -> None:
        for _ in range(3):
            mtx_lock(m)
            mtx_unlock(m)
            checkpoint()
        tsleep(object(), "nap", 2.0)  # the virtual clock jumps 2 s

    sched.spawn(worker, name="w0")
    sched.spawn(worker, name="w1")
    sched.run()
    doc = _doc(rec)
    assert check_trace(doc) == []
    ts = [e["ts"] for e in doc["traceEvents"] if e["ph"] != "M"]
    assert all(b > a for a, b in itertools.pairwise(ts))
    # A microsecond per scheduling step, on top of the virtual time in microseconds.
    assert ts[-1] >= 2_000_000 + sched.steps
    assert ts[0] < 10


def test_limit_stops_the_trace_and_says_so(sched: Scheduler) -> None:
    rec = _trace.start(TraceRecorder(limit=5))
    m = mtx_init("m")
    for _ in range(10):
        mtx_lock(m)
        mtx_unlock(m)
    assert rec.limit_reached
    # The trace points cost a global check from here on, the locks' own included.
    assert _trace.active is None and _sync._tr is None and _sx._tr is None
    doc = _doc(rec)
    assert check_trace(doc) == []
    marks = [e for e in doc["traceEvents"] if e["name"] == "trace limit reached"]
    assert len(marks) == 1 and marks[0]["args"] == {"limit": 5}
    assert rec.summary()["limit_reached"] is True
    assert sum(1 for e in doc["traceEvents"] if e["ph"] in "BE") == 6  # 3 B, 3 E


def test_a_sink_gets_every_event_in_batches(sched: Scheduler) -> None:
    got: list[list[dict[str, Any]]] = []
    rec = _trace.start(TraceRecorder(sink=got.append, batch=4))
    m = mtx_init("m")
    for _ in range(5):
        mtx_lock(m)
        mtx_unlock(m)
    rec.finish()
    assert rec.events == []
    assert [len(b) for b in got[:2]] == [4, 4]
    events = [e for b in got for e in b]
    assert check_trace({"traceEvents": events}) == []
    assert sum(1 for e in events if e["ph"] in "BE") == 10


class _Port:
    """What the recorder reads of an event channel port (hv/_evtchn.py's EventPort)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.handler = type("H", (), {"name": f"intr{port}"})()
        self.pending = False
        self.masked = False


def _flow_ids(doc: dict[str, Any], ph: str) -> list[int]:
    return sorted(e["id"] for e in doc["traceEvents"] if e["ph"] == ph)


def test_a_notification_whose_handler_never_ran_has_its_flow_closed(
        sched: Scheduler) -> None:
    # An interrupted run: the notification was sent, its handler thread never ran
    # it (hv/_evtchn.py: evtchn_notify without evtchn_run). Every flow that starts
    # finishes: a start still in the recorder becomes an instant saying so.
    rec = _trace.start(TraceRecorder())
    served, unserved = _Port(3), _Port(4)
    rec.evtchn_notify(served)
    rec.evtchn_notify(unserved)
    rec.evtchn_run(served)
    rec.evtchn_ran(served)
    doc = _doc(rec)
    assert _flow_ids(doc, "s") == _flow_ids(doc, "f") and len(_flow_ids(doc, "s")) == 1
    assert ("i", "notify not served") in _on(doc, "thread0")
    assert check_trace(doc) == []


def test_a_written_flow_start_never_served_is_closed_in_a_slice(sched: Scheduler) -> None:
    # The start already went to the file (batches of 1): it cannot be taken back,
    # so the flow ends where it started, in a slice saying it was not served.
    got: list[dict[str, Any]] = []
    rec = _trace.start(TraceRecorder(sink=got.extend, batch=1))
    rec.evtchn_notify(_Port(4))
    rec.finish()
    doc = {"traceEvents": got}
    assert _flow_ids(doc, "s") == _flow_ids(doc, "f") != []
    assert ("B", "notify not served") in _on(doc, "thread0")
    assert check_trace(doc) == []


def test_a_notification_served_after_the_limit_still_finishes_its_flow(
        sched: Scheduler) -> None:
    rec = _trace.start(TraceRecorder(limit=8))
    port = _Port(5)
    rec.evtchn_notify(port)
    m = mtx_init("m")
    for _ in range(5):
        mtx_lock(m)
        mtx_unlock(m)
    assert rec.limit_reached
    rec.evtchn_run(port)  # no slice can begin past the limit: the flow waits for finish()
    rec.evtchn_ran(port)
    doc = _doc(rec)
    assert _flow_ids(doc, "s") == _flow_ids(doc, "f")
    assert ("i", "notify not served") in _on(doc, "thread0")
    assert check_trace(doc) == []


def test_trace_marks_on_pid_0_have_a_process_name(sched: Scheduler) -> None:
    rec = _trace.start(TraceRecorder())
    m = mtx_init("m")
    mtx_lock(m)
    mtx_unlock(m)
    rec.note("replay output", {"lines": ["ok"]})
    doc = _doc(rec)
    procs = {e["pid"]: e["args"]["name"] for e in doc["traceEvents"]
             if e["ph"] == "M" and e["name"] == "process_name"}
    assert procs.get(0) == "trace marks"
    assert check_trace(doc) == []
