"""Settings of the kernel rules.

FreeBSD's lock rules are always enforced (DESIGN 3): WITNESS's ``Sleeping on
"wmesg" with the following non-sleepable locks held:`` report for a sleep with
an ``MTX_DEF`` mutex held other than the sleep's interlock (FreeBSD ``_sleep``
calls ``WITNESS_WARN(WARN_GIANTOK | WARN_SLEEPOK, lock, ...)``); the SMP window
of a sleep without an interlock (``tsleep`` is a scheduling point before the
sleeper is queued, so a wakeup can fall in between); spin mutexes as critical
sections; ``sx(9)``; deadlock cycles found at once; and the hung-task watchdog.

What remains to set is the watchdog's threshold. Read it at the time of use
(``rules.hung_task_timeout``), never copy it; a scheduler's own
``hung_timeout`` overrides it.
"""

from __future__ import annotations

__all__ = ["hung_task_timeout"]

#: The hung-task threshold in seconds of the run's clock; 0 turns the watchdog
#: off (FreeBSD deadlkres and Linux hung_task have their own defaults; DESIGN 3 says 60).
hung_task_timeout: float = 60.0
