"""Failures the scheduler raises: kernel panics and deadlocks."""

from __future__ import annotations

from dataclasses import dataclass

from gntdma.errors import GntdmaError

__all__ = [
    "Deadlock",
    "DeadlockReport",
    "HungTask",
    "KernelPanic",
    "StepLimitExceeded",
    "WaitEdge",
]


class KernelPanic(GntdmaError):
    """A KASSERT failed or the kernel called panic().

    A panic ends the thread that raised it; the toolstack decides whether the
    domain crashes.
    """


@dataclass(frozen=True, slots=True)
class WaitEdge:
    """One thread of a deadlock report: where it waits and on what."""

    thread: str
    waits_for: str
    site: str
    holder: str | None
    holder_site: str | None


@dataclass(frozen=True, slots=True)
class DeadlockReport:
    """Every blocked thread, and the wait-for cycle when there is one.

    ``header`` is the first line; empty for a global deadlock (every thread
    blocked, nothing pending).
    """

    edges: tuple[WaitEdge, ...]
    cycle: tuple[str, ...]
    header: str = ""

    def format(self) -> str:
        lines = [self.header or "deadlock: every thread is blocked and nothing is pending"]
        if self.cycle:
            lines.append("wait-for cycle: " + " -> ".join(self.cycle))
        for e in self.edges:
            held = ""
            if e.holder is not None:
                held = f", held by {e.holder} (taken at {e.holder_site})"
            lines.append(f"  {e.thread} waits for {e.waits_for} at {e.site}{held}")
        return "\n".join(lines)


class Deadlock(GntdmaError):
    """Every live thread is blocked and no timeout, I/O or external event is pending."""

    def __init__(self, report: DeadlockReport) -> None:
        super().__init__(report.format())
        self.report = report


class HungTask(GntdmaError):
    """A kernel thread stayed blocked on a lock, or in an uninterruptible wait,
    longer than the hung-task threshold (FreeBSD deadlkres, Linux hung_task)."""

    def __init__(self, report: DeadlockReport) -> None:
        super().__init__(report.format())
        self.report = report


class StepLimitExceeded(GntdmaError):
    """A run took more scheduling steps than allowed: a livelock, or a spin loop."""
