"""WITNESS: lock-order checking across the whole process, as in FreeBSD.

Theory of operation: every lock belongs to a class, named by the lock's name
(all ``xbd_io`` mutexes share a class). Each time a thread takes a lock of
class B while it holds a lock of class A, the edge A -> B enters one order
graph, remembered with the two acquisition sites where it was first seen. If B
already reaches A in the graph, the new edge closes a cycle: that is a lock-order
reversal, reported once per pair of classes with both sites of the new
acquisition and the sites where the established order was first seen. Nothing
blocks and nothing is raised for a reversal; it is a report.

Taking a sleepable lock (an sx) while holding a non-sleepable one (a mutex) is
reported as a reversal at once, as FreeBSD's ``witness_checkorder`` does ("lock
order reversal: (sleepable after non-sleepable)"), and adds no edge. Sleeping
with a non-sleepable lock held is reported as ``witness_warn`` words it
(``record_sleep``).

Recursion on a non-recursive lock, unlock by a thread that does not own the
lock, and sleeping with a lock that forbids it are panics, raised by the lock
code itself; they are recorded here too so that tests and the CLI see them.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from types import CodeType, FrameType
from typing import Final

__all__ = ["WITNESS", "Witness", "WitnessReport", "caller_site"]

_SCHED_DIR: Final = os.path.dirname(os.path.abspath(__file__))


#: co_filename -> whether the file is in ``gntdma.sched`` (one dirname per file, not per call).
_IN_SCHED: dict[str, bool] = {}


def caller_site() -> str:
    """The file:line of the first frame outside ``gntdma.sched``."""
    f: FrameType | None = sys._getframe(1)
    in_sched = _IN_SCHED
    while f is not None:
        filename = f.f_code.co_filename
        inside = in_sched.get(filename)
        if inside is None:
            inside = in_sched[filename] = os.path.dirname(filename) == _SCHED_DIR
        if not inside:
            return f"{filename}:{f.f_lineno}"
        f = f.f_back
    return "?:0"


#: A site as the cheapest token a lock can take: the code object of the first frame
#: outside ``gntdma.sched`` and the offset of its last instruction (``f_lasti``).
#: ``site_str`` turns it into the same ``file:line`` text as ``caller_site`` only
#: when a report needs it; ``None`` for the code is the unknown site ``?:0``.
Site = tuple[CodeType | None, int]

_NO_SITE: Final[Site] = (None, 0)


def caller_site_raw() -> Site:
    """``caller_site`` as a token: ``site_str(caller_site_raw()) == caller_site()``.

    Called from a function of ``gntdma.sched`` (a lock, a sleep), so the walk
    starts at that function's caller: ``sys._getframe(2)`` builds no frame
    object for the function itself, and no line number is computed here.
    """
    try:
        f = sys._getframe(2)
    except ValueError:
        return _NO_SITE
    code = f.f_code
    if _IN_SCHED.get(code.co_filename) is False:  # the caller's caller: nearly always
        return code, f.f_lasti
    return site_of(f)


def site_of(f: FrameType | None) -> Site:
    """The site token of the first frame from ``f`` outwards outside ``gntdma.sched``."""
    in_sched = _IN_SCHED
    while f is not None:
        code = f.f_code
        inside = in_sched.get(code.co_filename)
        if inside is None:
            inside = in_sched[code.co_filename] = os.path.dirname(code.co_filename) == _SCHED_DIR
        if not inside:
            return code, f.f_lasti
        f = f.f_back
    return _NO_SITE


#: (id(code), lasti) -> (code, text): each site is formatted once. The code object is
#: kept with its text and compared by identity (equal code objects of two files exist).
_SITE_TEXT: dict[tuple[int, int], tuple[CodeType, str]] = {}


def site_str(site: Site) -> str:
    """``file:line`` of a site token, the text ``f"{co_filename}:{f_lineno}"`` gives."""
    code, lasti = site
    if code is None:
        return "?:0"
    key = (id(code), lasti)
    hit = _SITE_TEXT.get(key)
    if hit is not None and hit[0] is code:
        return hit[1]
    # f_lineno is PyCode_Addr2Line(code, f_lasti): the line of the co_lines() range
    # holding the offset, None for an instruction without a line.
    line: int | None = code.co_firstlineno if lasti < 0 else None
    for start, end, ln in code.co_lines():
        if start <= lasti < end:
            line = ln
            break
    text = f"{code.co_filename}:{line}"
    if len(_SITE_TEXT) >= 16384:
        _SITE_TEXT.clear()
    _SITE_TEXT[key] = (code, text)
    return text


@dataclass(frozen=True, slots=True)
class WitnessReport:
    """One WITNESS finding.

    ``kind`` is ``"reversal"``, ``"duplicate"`` (two locks of one class without
    DUPOK), ``"sleep"`` (a sleep with non-sleepable locks held; ``message`` is
    the whole text) or ``"panic"``. ``note`` qualifies a reversal, as FreeBSD
    does ("sleepable after non-sleepable"). For a reversal, ``first`` and ``second`` are the
    classes in the order this acquisition took them, with their sites, and
    ``established`` names the sites where the opposite order was first seen.
    """

    kind: str
    thread: str
    first: str
    first_site: str
    second: str
    second_site: str
    established: tuple[str, str] | None = None
    message: str = ""
    note: str = ""

    def format(self) -> str:
        if self.kind == "sleep":
            return self.message
        if self.kind == "panic":
            return f"panic: {self.message} (thread {self.thread}, at {self.second_site})"
        if self.kind == "duplicate":
            return (
                f"acquiring duplicate lock of same type: \"{self.second}\"\n"
                f" 1st {self.first} @ {self.first_site}\n"
                f" 2nd {self.second} @ {self.second_site}"
            )
        head = f"lock order reversal: ({self.note})" if self.note else "lock order reversal:"
        text = (
            f"{head}\n"
            f" 1st {self.first} @ {self.first_site}\n"
            f" 2nd {self.second} @ {self.second_site}"
        )
        if self.established is not None:
            text += (
                f"\n established order {self.second} -> {self.first} first seen:"
                f"\n  {self.second} @ {self.established[0]}"
                f"\n  {self.first} @ {self.established[1]}"
            )
        return text


@dataclass(slots=True)
class _Edge:
    from_site: str
    to_site: str


@dataclass(slots=True)
class Witness:
    """The process-wide lock-order graph and the findings so far."""

    enabled: bool = True
    order: dict[str, dict[str, _Edge]] = field(default_factory=dict)
    reported: set[tuple[str, str]] = field(default_factory=set)
    reports: list[WitnessReport] = field(default_factory=list)

    def reset(self) -> None:
        """Forget the graph and the findings (tests start from a clean slate)."""
        self.order.clear()
        self.reported.clear()
        self.reports.clear()

    def reversals(self) -> list[WitnessReport]:
        return [r for r in self.reports if r.kind == "reversal"]

    def sleeps(self) -> list[WitnessReport]:
        """The reports of sleeps with non-sleepable locks held."""
        return [r for r in self.reports if r.kind == "sleep"]

    def panics(self) -> list[WitnessReport]:
        return [r for r in self.reports if r.kind == "panic"]

    def _reaches(self, src: str, dst: str) -> list[str] | None:
        """A path src -> ... -> dst in the order graph, or None."""
        stack: list[tuple[str, list[str]]] = [(src, [src])]
        seen = {src}
        while stack:
            node, path = stack.pop()
            for nxt in self.order.get(node, {}):
                if nxt == dst:
                    return [*path, nxt]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
        return None

    def check_order(
        self,
        thread: str,
        held: list[tuple[str, Site, bool, bool]],
        cls: str,
        site: Site,
        sleepable: bool = False,
        dupok: bool = False,
    ) -> None:
        """Record that ``thread`` takes class ``cls`` at ``site`` while holding ``held``.

        ``held`` lists (class, site, dupok, sleepable) of the locks the thread
        holds, oldest first; ``sleepable`` and ``dupok`` are those of the lock taken.

        As ``witness_checkorder`` (sys/kern/subr_witness.c): a duplicate (a lock of
        the class taken) is looked for in the lock taken last only, and excused by
        the DUPOK of the lock being taken (``lock->lo_flags & LO_DUPOK``), not of
        the one held; a lock of the same class held before others adds no edge (those
        cases are "caught as lock order violations", against the others).
        """
        if not self.enabled:
            return
        last = len(held) - 1
        for i, (hcls, hsite, _held_dupok, hsleepable) in enumerate(held):
            if sleepable and not hsleepable and hcls != cls:
                # sys/kern/subr_witness.c, witness_checkorder: a sleepable lock
                # after a non-sleepable one is a reversal whatever the graph says.
                key = (hcls, cls) if hcls < cls else (cls, hcls)
                if key not in self.reported:
                    self.reported.add(key)
                    self.reports.append(WitnessReport(
                        "reversal", thread, hcls, site_str(hsite), cls, site_str(site),
                        None, "", "sleepable after non-sleepable"))
                continue
            if hcls == cls:
                if i == last and not dupok and (cls, cls) not in self.reported:
                    self.reported.add((cls, cls))
                    self.reports.append(
                        WitnessReport("duplicate", thread, hcls, site_str(hsite), cls,
                                      site_str(site))
                    )
                continue
            succ = self.order.setdefault(hcls, {})
            if cls in succ:
                continue
            path = self._reaches(cls, hcls)
            if path is not None:
                key = (hcls, cls) if hcls < cls else (cls, hcls)
                if key not in self.reported:
                    self.reported.add(key)
                    first_edge = self.order[path[0]][path[1]]
                    self.reports.append(
                        WitnessReport(
                            "reversal",
                            thread,
                            hcls,
                            site_str(hsite),
                            cls,
                            site_str(site),
                            (first_edge.from_site, first_edge.to_site),
                        )
                    )
                continue
            succ[cls] = _Edge(site_str(hsite), site_str(site))

    def record_sleep(self, thread: str, message: str, site: str) -> None:
        """A sleep with non-sleepable locks held (``witness_warn``); not fatal."""
        if self.enabled:
            self.reports.append(WitnessReport("sleep", thread, "", "", "", site, None, message))

    def record_panic(self, thread: str, message: str, site: str) -> None:
        self.reports.append(WitnessReport("panic", thread, "", "", "", site, None, message))


#: The one lock-order graph of the process.
WITNESS: Final = Witness()
