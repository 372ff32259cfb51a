"""Who waits for what: deadlock cycles, global deadlock reports, the hung-task watchdog.

Theory of operation
-------------------
A thread blocked on a lock (a mutex or an sx) waits for the lock's holders: its
exclusive owner, or every thread holding it shared. Those wait-for edges form a
graph; a cycle in it can never resolve, whatever timers, callouts or other
threads do, so it is reported the moment the last thread of the cycle blocks
(:func:`lock_cycle`), not when everything else has stopped.

A global deadlock (every thread blocked, nothing pending) is reported with every
blocked thread and the cycle if there is one (:func:`global_report`).

The hung-task watchdog (FreeBSD ``deadlkres`` in ``sys/kern/kern_clock.c``,
Linux ``kernel/hung_task.c``) reports a thread blocked on a lock, or in an
uninterruptible wait (no timeout, not a service thread idling for work), for
longer than a threshold of the run's clock (:func:`hung_report`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gntdma.sched._errors import DeadlockReport, WaitEdge

if TYPE_CHECKING:
    from gntdma.sched._kthread import KThread

__all__ = ["describe", "global_report", "holders", "hung_report", "lock_cycle"]


def holders(wchan: object) -> list[KThread]:
    """The threads a waiter on ``wchan`` waits for: a lock's owner or its sharers."""
    out: list[Any] = []
    owner = getattr(wchan, "owner", None)
    if owner is not None and hasattr(owner, "held"):
        out.append(owner)
    sharers = getattr(wchan, "sharers", None)
    if sharers:
        out.extend(sharers)
    return out


def _holder_site(holder: KThread, lock: object) -> str | None:
    for h in holder.held:
        if h.lock is lock:
            return h.site
    return None


def describe(wchan: object, wmesg: str) -> str:
    name = getattr(wchan, "name", None)
    kind = type(wchan).__name__
    if isinstance(name, str):
        return f"{kind} \"{name}\" ({wmesg})"
    return f"{wmesg or kind}"


def _edge(t: KThread) -> WaitEdge:
    hs = holders(t.wchan)
    holder = hs[0] if hs else None
    return WaitEdge(
        t.name,
        describe(t.wchan, t.wmesg),
        t.wait_site,
        None if holder is None else ", ".join(h.name for h in hs),
        None if holder is None else _holder_site(holder, t.wchan),
    )


def lock_cycle(t: KThread) -> list[KThread] | None:
    """The wait-for cycle ``t`` closes by blocking on its ``wchan``, or None.

    Only lock waits are edges: a thread asleep on a channel or a condition
    variable waits for nobody in particular.
    """
    wchan = t.wchan
    if not getattr(wchan, "sharers", None):
        # The usual case: one holder at most (a mutex, an sx held exclusive), not
        # itself waiting for a lock; walk below would find no cycle.
        owner = getattr(wchan, "owner", None)
        if owner is None or not hasattr(owner, "held"):
            return None
        if owner is not t and not owner.lockwait:
            return None
    path: list[KThread] = [t]
    seen: set[int] = {id(t)}

    def walk(node: KThread) -> bool:
        for h in holders(node.wchan):
            if h is t:
                return True
            if id(h) in seen or not h.lockwait:
                continue
            seen.add(id(h))
            path.append(h)
            if walk(h):
                return True
            path.pop()
        return False

    return path if walk(t) else None


def cycle_report(cycle: list[KThread]) -> DeadlockReport:
    names = (*(t.name for t in cycle), cycle[0].name)
    return DeadlockReport(
        tuple(_edge(t) for t in cycle),
        names,
        "deadlock: a cycle of threads each waiting for a lock another holds",
    )


def global_report(threads: list[KThread]) -> DeadlockReport:
    """Every blocked thread in ``threads``, and the wait-for cycle if any."""
    waits: dict[str, str] = {}
    edges: list[WaitEdge] = []
    for t in threads:
        hs = holders(t.wchan)
        if hs:
            waits[t.name] = hs[0].name
        edges.append(_edge(t))
    return DeadlockReport(tuple(edges), _find_cycle(waits))


def _find_cycle(waits: dict[str, str]) -> tuple[str, ...]:
    for start in waits:
        path = [start]
        node = start
        while node in waits:
            node = waits[node]
            if node in path:
                return (*path[path.index(node):], node)
            path.append(node)
    return ()


def hung_deadline(threads: list[KThread], limit: float) -> float | None:
    """The earliest time a counted blocked thread passes ``limit``, or None."""
    best: float | None = None
    for t in threads:
        if t.wait_counted and t.wchan is not None:
            d = t.blocked_at + limit
            if best is None or d < best:
                best = d
    return best


def hung_report(threads: list[KThread], limit: float, now: float) -> DeadlockReport | None:
    """The threads blocked past ``limit`` at ``now``, each with what it waits for."""
    hung = [t for t in threads
            if t.wait_counted and t.wchan is not None and now - t.blocked_at >= limit]
    if not hung:
        return None
    first = hung[0]
    header = (f"hung task: {first.name} blocked for more than {limit:g} seconds "
              f"(deadlkres: possible deadlock detected for {first.name}, "
              f"blocked for {now - first.blocked_at:g} seconds)")
    edges = [_edge(t) for t in hung]
    # Say what each holder is doing, so the chain can be followed.
    named = {t.name for t in hung}
    for t in hung:
        for h in holders(t.wchan):
            if h.name not in named and h.wchan is not None:
                named.add(h.name)
                edges.append(_edge(h))
    return DeadlockReport(tuple(edges), (), header)
