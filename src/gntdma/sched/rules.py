"""The one switch for the kernel rules the rest of the tree does not keep yet.

``strict`` turns on, together:

- WITNESS's ``Sleeping on "wmesg" with the following non-sleepable locks held:``
  report for a sleep (``tsleep``, ``msleep``, ``cv_wait``) with an ``MTX_DEF``
  mutex held other than the sleep's interlock (FreeBSD ``_sleep`` calls
  ``WITNESS_WARN(WARN_GIANTOK | WARN_SLEEPOK, lock, ...)``);
- the SMP window of a sleep without an interlock: ``tsleep`` is a scheduling
  point before the sleeper is queued, so a wakeup can fall in between;
- the hung-task watchdog (``hung_task_timeout`` seconds of the run's clock).

It is off by default until the drivers, the taskqueue, ``biowait`` and the
xenstore client keep these rules; the tests of the rules turn it on. The rules
that nothing outside ``gntdma.sched`` breaks (spin mutexes as critical sections,
``sx(9)``, deadlock cycles found at once) are always on.

Read it at the time of use (``rules.strict``), never copy it.
"""

from __future__ import annotations

__all__ = ["hung_task_timeout", "strict"]

#: Enforce the rules listed above.
strict: bool = False

#: The hung-task threshold in seconds of the run's clock, when ``strict`` is on
#: (FreeBSD deadlkres and Linux hung_task have their own defaults; DESIGN 3 says 60).
hung_task_timeout: float = 60.0
