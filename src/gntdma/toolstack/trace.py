"""``--trace FILE``: a Chrome trace-event JSON file of a run, a serve or a replay.

:class:`~gntdma.sched._trace.TraceRecorder` collects the events in the
kernel; here they are written to the file as they come (in batches, so a
long run does not hold them all in memory), and :func:`check_trace` checks a
file's structure (what Perfetto and ``chrome://tracing`` need to draw it).

The file is the JSON object form of the Trace Event Format:
``{"displayTimeUnit": "ms", "traceEvents": [...], "otherData": {...}}``, where
``otherData`` says what ran, how many events the file holds and whether the
event limit was reached (the trace then ends early, at an instant
``trace limit reached``).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from gntdma.errors import ConfigError
from gntdma.sched import _trace
from gntdma.sched._trace import DEFAULT_LIMIT, TraceRecorder
from gntdma.toolstack.preflight import check_output

__all__ = ["DEFAULT_LIMIT", "TraceWriter", "check_trace", "check_trace_file", "run_traced",
           "tracing"]

_PHASES = frozenset("BEbeisftM")
_METADATA = frozenset({"process_name", "thread_name", "process_sort_index",
                       "thread_sort_index", "process_labels"})


class TraceWriter:
    """Writes trace events to ``path`` as they come; :meth:`close` ends the JSON.

    The file is made at the first batch (or at :meth:`close`), not before: a
    command refused before anything ran writes nothing (:meth:`discard`).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f: IO[str] | None = None
        self._first = True
        self.written = 0

    def _file(self) -> IO[str]:
        if self._f is None:
            self._f = self.path.open("w", encoding="utf-8")
            self._f.write('{"displayTimeUnit": "ms", "traceEvents": [')
        return self._f

    def discard(self) -> None:
        """Write nothing after all (remove the file if a batch already made it)."""
        if self._f is not None:
            self._f.close()
            self._f = None
            self.path.unlink(missing_ok=True)

    def write(self, events: list[dict[str, Any]]) -> None:
        if not events:
            return
        f = self._file()
        sep = "\n" if self._first else ",\n"
        self._first = False
        f.write(sep + ",\n".join(json.dumps(ev, separators=(",", ":")) for ev in events))
        self.written += len(events)

    def close(self, other: dict[str, Any]) -> None:
        f = self._file()
        f.write('\n],\n"otherData": ' + json.dumps(other) + "}\n")
        f.close()
        self._f = None


@contextlib.contextmanager
def tracing(path: Path, *, limit: int = DEFAULT_LIMIT, command: str = "",
            say: Callable[[str], None] = print,
            refused: Callable[[], bool] | None = None) -> Iterator[TraceRecorder]:
    """Record a trace into ``path`` while the body runs (one recorder at a time).

    The body raising :class:`~gntdma.errors.ConfigError`, or ``refused()``
    true at its end, means the command was refused before anything ran
    (DESIGN 11: nothing built or written): no file is written. Any other end
    (an interruption included) writes the trace so far, every slice, span and
    flow still open closed at its end.

    Raises:
        ConfigError: ``path`` cannot be written or ``limit`` is below 1 (checked
            before anything runs).
    """
    if limit < 1:
        raise ConfigError(f"--trace-limit must be at least 1, not {limit}")
    check_output(path, "--trace")
    if _trace.active is not None:
        raise ConfigError("--trace: a trace is already being recorded")
    writer = TraceWriter(path)
    rec = _trace.start(TraceRecorder(limit=limit, sink=writer.write))
    try:
        yield rec
    except ConfigError:
        rec.finish()
        writer.discard()
        raise
    except BaseException:
        _end(rec, writer, path, limit, command, say)
        raise
    if refused is not None and refused():
        rec.finish()
        writer.discard()
    else:
        _end(rec, writer, path, limit, command, say)


def _end(rec: TraceRecorder, writer: TraceWriter, path: Path, limit: int, command: str,
         say: Callable[[str], None]) -> None:
    rec.finish()
    summary = rec.summary()
    try:
        writer.close({"command": command, **summary})
    except OSError as e:
        raise ConfigError(f"--trace {path}: {e.strerror or e}") from None
    what = (f"the limit of {limit} events was reached, the trace ends there"
            if rec.limit_reached else f"{summary['events']} events")
    say(f"trace: {path} ({what}); open it in https://ui.perfetto.dev or chrome://tracing")


def run_traced(path: Path | None, fn: Callable[[Callable[[str], None]], int], *,
               limit: int = DEFAULT_LIMIT, command: str = "",
               say: Callable[[str], None] = print,
               refused: Callable[[], bool] | None = None) -> int:
    """``fn(say)`` under a trace into ``path`` (just ``fn(say)`` without a path).

    ``refused()`` true when ``fn`` returns: it was refused before anything ran,
    and no trace is written (as when it raises ConfigError; see :func:`tracing`).

    What ``fn`` says goes on to ``say`` and into the trace as a note at its end
    (a replay's outcome is then in the file with the schedule that led to it).
    """
    if path is None:
        return fn(say)
    lines: list[str] = []

    def tee(line: str) -> None:
        lines.append(line)
        say(line)

    with tracing(path, limit=limit, command=command, say=say, refused=refused) as rec:
        try:
            return fn(tee)
        finally:
            if lines:
                rec.note(f"{command} output", {"lines": lines})


# -- the structure check ------------------------------------------------------------------------


def check_trace_file(path: Path) -> list[str]:
    """The problems of the trace file at ``path`` (empty: a valid trace)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        return [f"not JSON: {e}"]
    return check_trace(doc)


def check_trace(doc: object) -> list[str]:
    """The structure problems of a trace document (empty: a valid trace).

    Checked: the JSON object form with ``traceEvents``; every event has a known
    phase, a name, integer pid and tid and (except metadata) a finite ``ts``,
    never earlier than the event before it in the file; ``B``/``E`` balance per
    (pid, tid) and nest (an ``E`` ends the innermost open ``B`` of its name);
    every async ``b`` is ended by one ``e`` of the same pid, cat, id and name,
    and every ``e`` ends an open ``b``; every flow's ``s`` is followed by one
    ``f``, and both are inside a slice of their thread (what viewers bind a
    flow to); every thread with slices or instants has a ``thread_name`` and
    every pid used (global instants' included) a ``process_name``.
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("traceEvents"), list):
        return ["not a trace: no traceEvents list"]
    if doc.get("displayTimeUnit", "ms") not in ("ms", "ns"):
        return [f"bad displayTimeUnit {doc.get('displayTimeUnit')!r}"]
    problems: list[str] = []
    stacks: dict[tuple[int, int], list[str]] = {}
    spans: dict[tuple[int, str, object], str] = {}
    flows: set[tuple[str, object]] = set()
    finished: set[tuple[str, object]] = set()
    threads: set[tuple[int, int]] = set()
    pids: set[int] = set()
    named_threads: set[tuple[int, int]] = set()
    named_pids: set[int] = set()
    last_ts = -math.inf

    def bad(i: int, msg: str) -> None:
        if len(problems) < 50:
            problems.append(f"event {i}: {msg}")

    for i, ev in enumerate(doc["traceEvents"]):
        if not isinstance(ev, dict):
            bad(i, "not an object")
            continue
        ph, name, pid, tid = ev.get("ph"), ev.get("name"), ev.get("pid"), ev.get("tid")
        if not isinstance(ph, str) or ph not in _PHASES:
            bad(i, f"unknown phase {ph!r}")
            continue
        if not isinstance(name, str) or name == "":
            bad(i, "no name")
            continue
        if type(pid) is not int or type(tid) is not int:
            bad(i, "pid and tid must be integers")
            continue
        if ph == "M":
            args = ev.get("args")
            if name not in _METADATA or not isinstance(args, dict):
                bad(i, f"bad metadata event {name!r}")
            elif name == "thread_name" and isinstance(args.get("name"), str):
                named_threads.add((pid, tid))
            elif name == "process_name" and isinstance(args.get("name"), str):
                named_pids.add(pid)
            continue
        ts = ev.get("ts")
        if not isinstance(ts, (int, float)) or isinstance(ts, bool) or not math.isfinite(ts):
            bad(i, f"bad ts {ts!r}")
            continue
        if ts < last_ts:
            bad(i, f"ts {ts} earlier than the event before ({last_ts})")
        last_ts = ts
        pids.add(pid)
        if ph == "i" and ev.get("s", "t") == "g":
            continue
        if ph in "BEi":
            threads.add((pid, tid))
        if ph == "B":
            stacks.setdefault((pid, tid), []).append(name)
        elif ph == "E":
            stack = stacks.get((pid, tid))
            if not stack:
                bad(i, f"E {name!r} on pid {pid} tid {tid} with no open B")
            elif stack[-1] != name:
                bad(i, f"E {name!r} on pid {pid} tid {tid} ends B {stack[-1]!r}: not nested")
            else:
                stack.pop()
        elif ph in "be":
            cat, aid = ev.get("cat"), ev.get("id")
            if not isinstance(cat, str) or aid is None:
                bad(i, f"async {ph} {name!r} without cat and id")
                continue
            key = (pid, cat, aid if isinstance(aid, (int, str)) else repr(aid))
            if ph == "b":
                if key in spans:
                    bad(i, f"b {name!r} id {aid!r} already open")
                spans[key] = name
            elif key not in spans:
                bad(i, f"e {name!r} id {aid!r} with no open b")
            elif spans.pop(key) != name:
                bad(i, f"e {name!r} id {aid!r} ends a b of another name")
        elif ph in "sf":
            cat, aid = ev.get("cat"), ev.get("id")
            if not isinstance(cat, str) or not isinstance(aid, (int, str)):
                bad(i, f"flow {ph} {name!r} without cat and id")
            elif not stacks.get((pid, tid)):
                bad(i, f"flow {ph} {name!r} id {aid!r} outside any slice of its thread")
            elif ph == "s":
                if (cat, aid) in flows:
                    bad(i, f"flow s {name!r} id {aid!r} started twice")
                flows.add((cat, aid))
            elif (cat, aid) not in flows:
                bad(i, f"flow f {name!r} id {aid!r} with no s before it")
            elif (cat, aid) in finished:
                bad(i, f"flow f {name!r} id {aid!r} finished twice")
            else:
                finished.add((cat, aid))
        elif ph == "i" and ev.get("s", "t") not in ("t", "p"):
            bad(i, f"instant {name!r} with bad scope {ev.get('s')!r}")
    for (pid, tid), stack in sorted(stacks.items()):
        if stack:
            problems.append(f"pid {pid} tid {tid}: {len(stack)} B never ended "
                            f"(innermost {stack[-1]!r})")
    for (pid, cat, aid), name in spans.items():
        problems.append(f"async b {name!r} (pid {pid}, cat {cat}, id {aid!r}) never ended")
    for cat, aid in sorted(flows - finished, key=repr):
        problems.append(f"flow {aid!r} (cat {cat}) never finished")
    for pid, tid in sorted(threads - named_threads):
        problems.append(f"pid {pid} tid {tid}: no thread_name")
    for pid in sorted(pids - named_pids):
        problems.append(f"pid {pid}: no process_name")
    return problems
