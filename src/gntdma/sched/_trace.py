"""A recorder of what kernel threads do, as Chrome trace events.

Theory of operation
-------------------
Tracing is off unless a :class:`TraceRecorder` is installed as :data:`active`
(:func:`start`). The trace points in the kernel are one global check each
(``if _trace.active is not None: _trace.active.lock_acquired(...)``), so a run
without a trace pays a load and a compare per point.

The recorder turns what it is told into events of the Trace Event Format
(the format ``chrome://tracing`` and Perfetto read), kept as plain dicts:

- one process (pid) per domain, named after it; a thread of no domain goes
  with the domain its name starts with (``guest1/xbd0-int``), or whose domid
  it starts with (``dom0/blkback0``), if there is one, else in the process
  "host" (thread0 among them); one track (tid) per
  kernel thread, named after it (``M`` metadata, written by :meth:`finish`);
- lock holds as ``B``/``E`` slices named after the lock on the holder's track,
  waits for a lock as ``wait <lock>``, sleeps as ``sleep <wmesg>``, handler
  runs of an event channel as ``evtchn port N``;
- notifications as ``i`` instant events on the notifier's track, with a flow
  (``s``/``f``) from the notifier to the handler run that serves them (a flow
  starts and ends in a slice, as viewers bind it: the innermost one open on
  the notifier's track, or a short ``notify`` slice around it); a notification
  whose handler never ran by the end (an interrupted run, the limit reached)
  has its flow dropped by :meth:`finish` (its ``s`` becomes an instant
  ``notify not served``) or, if the ``s`` was already written, closed in a
  ``notify not served`` slice on the notifier's track: every flow that starts
  also finishes;
- marks of the whole trace (``trace limit reached``, a command's output) as
  global instants of pid 0, named ``trace marks``;
- a bio from its creation to ``biodone``, and a deferred bus_dma load from
  ``EINPROGRESS`` to its callback, as async spans (``b``/``e``, same ``cat``
  and ``id``).

Slices on a track must nest, but locks need not be released in the order
they were taken: releasing a lock that is not the innermost slice ends the
slices inside it first and begins them again just after (``"resumed"`` in
their args). Whatever is still open at the end (a killed thread's locks, a
thread that panicked holding them, a bio never completed) is ended by
:meth:`finish`, so begins and ends always balance.

Timestamps are microseconds on the scheduler's clock. On the real clock they
count from the first event; on the virtual clock of exploration they are the
virtual time plus one microsecond per scheduling step, so that a replayed
schedule reads step by step. Every event is later than the one before it (by
a nanosecond when the clock has not moved), whatever the clock.

After ``limit`` events the recorder stops (an instant ``trace limit reached``
marks where), uninstalls itself and only closes what is open at the end.
Events go to ``sink`` in batches when one is given (the toolstack writes
them to a file); the kernel itself never does I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, final

from gntdma.sched import _core
from gntdma.sched._kthread import KThread

__all__ = ["DEFAULT_LIMIT", "TraceRecorder", "active", "on_switch", "start", "stop"]

#: Events recorded before the recorder stops (a file of roughly 150 bytes each).
DEFAULT_LIMIT: Final = 4_000_000

#: The installed recorder, or None when tracing is off.
active: TraceRecorder | None = None

Event = dict[str, Any]

#: bio_cmd values (sys/bio.h) and the names of their spans.
_BIO_NAMES: Final = {1: "read", 2: "write", 3: "delete", 4: "getattr", 5: "flush"}


def _curthread() -> KThread:
    """The running kernel thread (thread0 outside any)."""
    return _core.current_scheduler().curthread


#: Called with the recorder at every start and with None at every stop (see on_switch).
_switches: list[Callable[[TraceRecorder | None], None]] = []


def on_switch(fn: Callable[[TraceRecorder | None], None]) -> None:
    """Have ``fn`` told of the active recorder now and at every start and stop.

    For the lock primitives: a recorder in a global of their own module is one
    global load a trace point (this module's attribute costs about 15 ns more).
    """
    _switches.append(fn)
    fn(active)


def start(rec: TraceRecorder) -> TraceRecorder:
    """Install ``rec``: the trace points report to it from now on."""
    global active
    active = rec
    for fn in _switches:
        fn(rec)
    return rec


def stop() -> None:
    """Turn tracing off (the recorder keeps what it has)."""
    global active
    active = None
    for fn in _switches:
        fn(None)


@final
class _Track:
    """One kernel thread's track: its ids and the slices open on it, innermost last."""

    __slots__ = ("name", "open", "pid", "tid")

    def __init__(self, pid: int, tid: int, name: str) -> None:
        self.pid = pid
        self.tid = tid
        self.name = name
        #: (key, name, cat) of each open slice.
        self.open: list[tuple[object, str, str]] = []


@final
class TraceRecorder:
    """Collects trace events of the kernel threads (see the module docstring)."""

    def __init__(self, limit: int = DEFAULT_LIMIT,
                 sink: Callable[[list[Event]], None] | None = None,
                 batch: int = 65536) -> None:
        if limit < 1:
            raise ValueError(f"trace limit must be at least 1, not {limit}")
        self.limit = limit
        self.sink = sink
        self.batch = batch
        #: Events not yet handed to ``sink`` (all of them without a sink).
        self.events: list[Event] = []
        self.count = 0
        self.limit_reached = False
        self.finished = False
        self._last_ns = -1
        self._t0: float | None = None
        self._pids: dict[str, int] = {}
        self._domids: dict[int, int] = {}
        self._tracks: dict[KThread, _Track] = {}
        self._async: dict[tuple[str, int], tuple[int, int, str, object]] = {}
        self._next_id = 1
        #: Flows started at a notification and not yet finished, by port: their ids,
        #: the notifier's track, the ``s`` event and its index (see :meth:`_unserved`).
        self._flows: dict[int, tuple[object, list[tuple[int, _Track, Event, int]]]] = {}
        #: Events handed to the sink so far (the index in the file of events[0]).
        self._flushed = 0
        #: Whether a mark of the whole trace (pid 0) was made: pid 0 is then named.
        self._marks = False

    # -- time and emission --------------------------------------------------------------------

    def _now_ns(self) -> int:
        s = _core._current  # never made here: no scheduler, no new time
        if s is None:
            ns = self._last_ns + 1
        elif s.clock.virtual:
            ns = int(s.clock.now() * 1e9) + s.steps * 1000
        else:
            now = s.clock.now()
            if self._t0 is None:
                self._t0 = now
            ns = int((now - self._t0) * 1e9)
        if ns <= self._last_ns:
            ns = self._last_ns + 1
        self._last_ns = ns
        return ns

    def _emit(self, ev: Event, force: bool = False) -> None:
        if self.limit_reached and not force:
            return
        ev["ts"] = self._now_ns() / 1000
        self.events.append(ev)
        self.count += 1
        if self.sink is not None and len(self.events) >= self.batch:
            self.flush()
        if self.count >= self.limit and not self.limit_reached:
            self.limit_reached = True
            self._marks = True
            self.events.append({"ph": "i", "s": "g", "name": "trace limit reached",
                                "cat": "trace", "pid": 0, "tid": 0,
                                "ts": self._now_ns() / 1000,
                                "args": {"limit": self.limit}})
            self.count += 1
            if active is self:
                stop()

    def flush(self) -> None:
        """Hand the events so far to the sink."""
        if self.sink is not None and self.events:
            out, self.events = self.events, []
            self._flushed += len(out)
            self.sink(out)

    # -- processes and tracks -----------------------------------------------------------------

    def _pid(self, domain: object | None) -> int:
        if domain is None:
            name = "host"
        else:
            name = str(getattr(domain, "name", None) or repr(domain))
        pid = self._pids.get(name)
        if pid is None:
            pid = self._pids[name] = len(self._pids) + 1
        domid = getattr(domain, "domid", None)
        if isinstance(domid, int) and pid not in self._domids:
            self._domids[pid] = domid
        return pid

    def track(self, t: KThread) -> _Track:
        """The track of ``t`` (made on first use)."""
        tr = self._tracks.get(t)
        if tr is None:
            pid = None
            if t.domain is None and "/" in t.name:  # "guest1/xbd0-int": a thread for guest1
                prefix = t.name.split("/", 1)[0]
                pid = self._pids.get(prefix)
                if pid is None and prefix.startswith("dom") and prefix[3:].isdigit():
                    # "dom0/blkback0": a thread for the domain of domid 0 (Domain-0)
                    domid = int(prefix[3:])
                    pid = next((p for p, d in self._domids.items() if d == domid), None)
            if pid is None:
                pid = self._pid(t.domain)
            tr = self._tracks[t] = _Track(pid, len(self._tracks) + 1, t.name)
        return tr

    def _begin(self, tr: _Track, key: object, name: str, cat: str,
               args: dict[str, Any] | None = None) -> None:
        if self.limit_reached:
            return
        tr.open.append((key, name, cat))
        ev: Event = {"ph": "B", "name": name, "cat": cat, "pid": tr.pid, "tid": tr.tid}
        if args:
            ev["args"] = args
        self._emit(ev)

    def _end(self, tr: _Track, key: object) -> None:
        """End the open slice ``key``, and any inside it (begun again just after)."""
        stack = tr.open
        for i in range(len(stack) - 1, -1, -1):
            if stack[i][0] is key or stack[i][0] == key:
                break
        else:
            return
        inner = stack[i + 1:]
        for j in range(len(stack) - 1, i - 1, -1):
            self._emit({"ph": "E", "name": stack[j][1], "cat": stack[j][2],
                        "pid": tr.pid, "tid": tr.tid}, force=True)
        del stack[i:]
        for k, name, cat in inner:
            self._begin(tr, k, name, cat, {"resumed": True})

    # -- locks and sleeps ---------------------------------------------------------------------

    def lock_wait(self, t: KThread, lock: object) -> None:
        """``t`` blocks waiting for ``lock`` (again, if it lost it to another thread)."""
        tr = self.track(t)
        key = ("wait", id(lock))
        if tr.open and tr.open[-1][0] == key:
            return
        self._begin(tr, key, f"wait {getattr(lock, 'name', '?')}", "lock")

    def lock_acquired(self, t: KThread, lock: object, shared: bool = False) -> None:
        """``t`` now holds ``lock`` (ending its wait for it, if it waited)."""
        tr = self.track(t)
        self._end(tr, ("wait", id(lock)))
        name = str(getattr(lock, "name", "?"))
        self._begin(tr, lock, f"{name} (shared)" if shared else name, "lock")

    def lock_released(self, t: KThread, lock: object) -> None:
        """``t`` no longer holds ``lock``."""
        self._end(self.track(t), lock)

    def sleep(self, t: KThread, wmesg: str) -> None:
        """``t`` goes to sleep on ``wmesg`` (msleep, cv_wait)."""
        self._begin(self.track(t), ("sleep",), f"sleep {wmesg}", "sleep")

    def woken(self, t: KThread) -> None:
        """``t`` is back from its sleep."""
        self._end(self.track(t), ("sleep",))

    def instant(self, name: str, args: dict[str, Any] | None = None,
                t: KThread | None = None) -> None:
        """A moment on ``t``'s track (the current thread's by default)."""
        tr = self.track(t if t is not None else _curthread())
        ev: Event = {"ph": "i", "s": "t", "name": name, "cat": "kernel",
                     "pid": tr.pid, "tid": tr.tid}
        if args:
            ev["args"] = args
        self._emit(ev)

    def note(self, name: str, args: dict[str, Any] | None = None) -> None:
        """A moment of the whole trace (a global instant), e.g. a run's outcome."""
        ev: Event = {"ph": "i", "s": "g", "name": name, "cat": "trace", "pid": 0, "tid": 0}
        if args:
            ev["args"] = args
        self._marks = True
        self._emit(ev, force=True)

    # -- event channels -----------------------------------------------------------------------

    def evtchn_notify(self, port: Any) -> None:
        """The current thread raises ``port`` (an ``EventPort`` of the target domain)."""
        tr = self.track(_curthread())
        handler = port.handler
        if port.pending:
            result = "coalesced"
        elif port.masked:
            result = "masked"
        elif handler is None:
            result = "no handler"
        else:
            result = "delivered"
        args: dict[str, Any] = {"port": port.port, "result": result}
        if handler is not None:
            args["handler"] = handler.name
        self._emit({"ph": "i", "s": "t", "name": f"notify port {port.port}", "cat": "evtchn",
                    "pid": tr.pid, "tid": tr.tid, "args": args})
        if self.limit_reached:
            return
        fid = self._next_id
        self._next_id += 1
        # A flow starts from the slice open around it: a short one if there is none.
        bare = not tr.open
        if bare:
            self._begin(tr, ("notify",), "notify", "evtchn")
        if not self.limit_reached:  # (the short slice may have reached it: no flow then)
            entry = self._flows.get(id(port))
            if entry is None or entry[0] is not port:
                entry = self._flows[id(port)] = (port, [])
            start: Event = {"ph": "s", "name": "evtchn", "cat": "evtchn", "id": fid,
                            "pid": tr.pid, "tid": tr.tid}
            at = self._flushed + len(self.events)  # its index in the file
            self._emit(start)
            entry[1].append((fid, tr, start, at))
        if bare:
            self._end(tr, ("notify",))

    def evtchn_run(self, port: Any) -> None:
        """The current thread (``port``'s interrupt thread) runs its handler."""
        if self.limit_reached:
            return  # no slice to end a flow in: finish() closes the flows still open
        tr = self.track(_curthread())
        self._begin(tr, ("evtchn", id(port)), f"evtchn port {port.port}", "evtchn")
        entry = self._flows.pop(id(port), None)
        if entry is not None and entry[0] is port:
            # Each ``s`` was written: its ``f`` too, in the slice just begun, even if
            # that slice's B reached the limit.
            for fid, _notifier, _start, _at in entry[1]:
                self._emit({"ph": "f", "bp": "e", "name": "evtchn", "cat": "evtchn",
                            "id": fid, "pid": tr.pid, "tid": tr.tid}, force=True)

    def evtchn_ran(self, port: Any) -> None:
        """The handler of ``port`` returned."""
        self._end(self.track(_curthread()), ("evtchn", id(port)))

    # -- async spans: bios, deferred loads ----------------------------------------------------

    def _async_begin(self, cat: str, obj: object, name: str, args: dict[str, Any]) -> None:
        key = (cat, id(obj))
        if key in self._async:
            self._async_end(cat, obj, {"abandoned": True})
        if self.limit_reached:
            return
        tr = self.track(_curthread())
        aid = self._next_id
        self._next_id += 1
        self._async[key] = (aid, tr.pid, name, obj)
        self._emit({"ph": "b", "name": name, "cat": cat, "id": aid, "pid": tr.pid,
                    "tid": tr.tid, "args": args})

    def _async_end(self, cat: str, obj: object, args: dict[str, Any]) -> None:
        span = self._async.pop((cat, id(obj)), None)
        if span is None:
            return
        aid, pid, name, _obj = span
        tr = self.track(_curthread())
        self._emit({"ph": "e", "name": name, "cat": cat, "id": aid, "pid": pid,
                    "tid": tr.tid if tr.pid == pid else 0, "args": args}, force=True)

    def bio_start(self, bp: Any) -> None:
        """A bio is made (its request begins)."""
        cmd = int(bp.bio_cmd)
        self._async_begin("bio", bp, f"bio {_BIO_NAMES.get(cmd, str(cmd))}",
                          {"offset": bp.bio_offset, "length": bp.bio_bcount})

    def bio_done(self, bp: Any) -> None:
        """``biodone`` of a bio."""
        self._async_end("bio", bp, {"error": bp.bio_error})

    def load_deferred(self, map: Any, nsegs: int) -> None:
        """A bus_dma load returned EINPROGRESS (waiting for grant references)."""
        self._async_begin("busdma", map, "deferred load",
                          {"segments": nsegs, "map": str(getattr(map, "name", "") or "")})

    def load_done(self, map: Any, error: int, cancelled: bool = False) -> None:
        """A deferred load completed (its callback ran with ``error``) or was cancelled."""
        self._async_end("busdma", map, {"error": error, "cancelled": cancelled})

    # -- the end ------------------------------------------------------------------------------

    def finish(self) -> None:
        """End everything still open, add the names of processes and threads, flush."""
        if self.finished:
            return
        self.finished = True
        if active is self:
            stop()
        for _port, pending in self._flows.values():
            for fid, tr, start, at in pending:
                self._unserved(fid, tr, start, at)
        self._flows.clear()
        for tr in self._tracks.values():
            while tr.open:
                _key, name, cat = tr.open.pop()
                self._emit({"ph": "E", "name": name, "cat": cat, "pid": tr.pid,
                            "tid": tr.tid, "args": {"unfinished": True}}, force=True)
        for (cat, _), (aid, pid, name, _obj) in list(self._async.items()):
            self._emit({"ph": "e", "name": name, "cat": cat, "id": aid, "pid": pid,
                        "tid": 0, "args": {"unfinished": True}}, force=True)
        self._async.clear()
        if self._marks:
            self.events.append({"ph": "M", "name": "process_name", "pid": 0, "tid": 0,
                                "args": {"name": "trace marks"}})
        for name, pid in self._pids.items():
            domid = self._domids.get(pid)
            label = name if domid is None else f"{name} (domid {domid})"
            self.events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
                                "args": {"name": label}})
            if domid is not None:
                self.events.append({"ph": "M", "name": "process_sort_index", "pid": pid,
                                    "tid": 0, "args": {"sort_index": domid}})
        for tr in self._tracks.values():
            self.events.append({"ph": "M", "name": "thread_name", "pid": tr.pid,
                                "tid": tr.tid, "args": {"name": tr.name}})
        self.flush()

    def _unserved(self, fid: int, tr: _Track, start: Event, at: int) -> None:
        """A notification whose handler never ran (an interrupted run, the limit
        reached): its flow is dropped (the ``s`` not yet handed to the sink becomes
        an instant ``notify not served``) or, already written, ends where it
        started, in a ``notify not served`` slice."""
        i = at - self._flushed
        if 0 <= i < len(self.events) and self.events[i] is start:
            self.events[i] = {"ph": "i", "s": "t", "name": "notify not served",
                              "cat": "evtchn", "pid": tr.pid, "tid": tr.tid,
                              "ts": start["ts"], "args": {"flow": fid}}
            return
        for ph, extra in (("B", {"args": {"unserved": True}}), ("f", {"bp": "e", "id": fid}),
                          ("E", {})):
            name = "evtchn" if ph == "f" else "notify not served"
            self._emit({"ph": ph, "name": name, "cat": "evtchn", "pid": tr.pid,
                        "tid": tr.tid, **extra}, force=True)

    def summary(self) -> dict[str, Any]:
        """What the trace holds, for the file and the report."""
        return {"events": self.count, "limit": self.limit,
                "limit_reached": self.limit_reached,
                "processes": len(self._pids), "threads": len(self._tracks)}
