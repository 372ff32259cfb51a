"""Kernel threads and what the scheduler needs to know about them.

A :class:`KThread` is the state of one simulated kernel thread (its greenlet,
its wait channel, the locks it holds); :class:`HeldLock` one lock it holds.
Clocks, the :class:`Strategy` protocol and the run strategy live here too.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol, final

import greenlet

from gntdma.sched._witness import Site, site_str

__all__ = [
    "Clock",
    "FifoStrategy",
    "Held",
    "HeldLock",
    "KThread",
    "RealClock",
    "SchedulerStatistics",
    "Strategy",
    "ThreadState",
    "ThreadTable",
    "VirtualClock",
]


class ThreadState(Enum):
    RUNNABLE = "runnable"
    RUNNING = "running"
    BLOCKED = "blocked"
    DONE = "done"


# Bound once: an Enum class attribute costs a Python call on CPython 3.11.
_RUNNABLE = ThreadState.RUNNABLE
_BLOCKED = ThreadState.BLOCKED


class Clock(Protocol):
    """Where time comes from: the real monotonic clock, or a virtual one."""

    virtual: bool

    def now(self) -> float: ...

    def advance_to(self, deadline: float) -> None: ...


@final
class RealClock:
    virtual = False

    def now(self) -> float:
        return time.monotonic()

    def advance_to(self, deadline: float) -> None:
        pass


@final
class VirtualClock:
    """A clock that only moves when the scheduler jumps it to the next timeout."""

    virtual = True

    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance_to(self, deadline: float) -> None:
        if deadline > self._now:
            self._now = deadline


class Strategy(Protocol):
    """Chooses which thread runs next, and every random value.

    ``preemptive`` strategies are consulted at every scheduling point (a lock, a
    barrier, a checkpoint); non-preemptive ones only when the running thread
    blocks or yields.
    """

    preemptive: bool

    def pick(self, runnable: Sequence[KThread], current: KThread | None, point: str) -> int:
        """Index into ``runnable`` of the thread to run next."""
        ...

    def next_u64(self) -> int: ...


@final
class FifoStrategy:
    """The ``run`` strategy: fair FIFO, no preemption, seeded randomness."""

    preemptive = False

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def pick(self, runnable: Sequence[KThread], current: KThread | None, point: str) -> int:
        return 0

    def next_u64(self) -> int:
        return self._rng.getrandbits(64)


class Held(Protocol):
    """What a thread's list of held locks holds: a :class:`HeldLock`, or a mutex.

    A mutex has one owner at a time, so it is its own record (its ``site_at``
    is where its owner took it): taking one builds no object.
    """

    @property
    def lock(self) -> Any: ...

    @property
    def cls(self) -> str: ...

    @property
    def site_at(self) -> Site: ...

    @property
    def site(self) -> str: ...

    @property
    def dupok(self) -> bool: ...

    @property
    def sleepable(self) -> bool: ...

    @property
    def spin(self) -> bool: ...

    @property
    def shared(self) -> bool: ...

    @property
    def witness(self) -> bool: ...


@dataclass(slots=True)
class HeldLock:
    """A lock a thread holds: the lock, its class, and where it was taken.

    ``sleepable`` is FreeBSD's LO_SLEEPABLE (an sx; not a mutex), ``spin`` an
    MTX_SPIN mutex, ``shared`` a shared hold of an sx.
    """

    lock: Any
    cls: str
    site_at: Site
    dupok: bool
    sleepable: bool
    spin: bool = False
    shared: bool = False
    #: Checked by WITNESS (no SX_NOWITNESS).
    witness: bool = True

    @property
    def site(self) -> str:
        """``file:line`` of the acquisition (formatted only when asked for)."""
        return site_str(self.site_at)


@final
class KThread:
    """A simulated kernel thread."""

    __slots__ = (
        "_glet",
        "blocked_at",
        "critnest",
        "daemon",
        "domain",
        "exc",
        "held",
        "lockwait",
        "name",
        "result",
        "state",
        "tid",
        "timer",
        "wait_counted",
        "wait_site_at",
        "wake_result",
        "wchan",
        "wmesg",
    )

    def __init__(self, tid: int, name: str, daemon: bool, domain: object | None) -> None:
        self.tid = tid
        self.name = name
        self.daemon = daemon
        self.domain = domain
        self.state = _RUNNABLE
        self.wchan: object | None = None
        self.wmesg = ""
        #: Where the thread last blocked, unformatted (see ``wait_site``).
        self.wait_site_at: Site | None = None
        self.wake_result = 0
        self.timer: _Timer | None = None
        self.held: list[Held] = []
        #: Spin mutexes held: a critical section while > 0.
        self.critnest = 0
        #: When the thread last entered a wait the watchdog counts, on the run's clock.
        self.blocked_at = 0.0
        #: Whether the hung-task watchdog counts the current wait.
        self.wait_counted = False
        #: Whether the current wait is for a lock (an edge of the wait-for graph).
        self.lockwait = False
        self.result: object = None
        self.exc: BaseException | None = None
        self._glet: greenlet.greenlet | None = None

    @property
    def wait_site(self) -> str:
        """``file:line`` where the thread last blocked ("" if it never did)."""
        at = self.wait_site_at
        return "" if at is None else site_str(at)

    def __repr__(self) -> str:
        return f"<KThread {self.tid} {self.name} {self.state.value}>"


@dataclass(frozen=True, slots=True)
class SchedulerStatistics:
    threads: int  #: spawned so far
    live_threads: int
    switches: int
    timers: int
    io_in_flight: int
    external_sources: int


@final
class ThreadTable:
    """The scheduler's threads that have not ended, and the few it must find fast.

    A thread is added when spawned and forgotten when it ends or is killed,
    with its greenlet (whoever keeps the :class:`KThread` keeps its result and
    exception, not its stack): nothing grows with the threads a run has ended.
    ``counted`` holds the threads in a wait the hung-task watchdog counts
    (``wait_counted``), so that the watchdog looks at them, not at every
    idle service thread.
    """

    __slots__ = ("counted", "live", "nondaemon", "spawned")

    def __init__(self) -> None:
        #: tid -> thread, in creation order
        self.live: dict[int, KThread] = {}
        self.spawned = 0
        self.nondaemon = 0  #: live non-daemon threads
        self.counted: dict[int, KThread] = {}

    def add(self, t: KThread) -> None:
        self.live[t.tid] = t
        self.spawned += 1
        if not t.daemon:
            self.nondaemon += 1

    def forget(self, t: KThread) -> None:
        """``t`` is done (idempotent)."""
        if self.live.pop(t.tid, None) is not None and not t.daemon:
            self.nondaemon -= 1
        self.counted.pop(t.tid, None)
        t._glet = None

    def blocked(self, thread0: KThread) -> list[KThread]:
        """Every blocked thread: thread0 first, then in creation order."""
        out = [t for t in self.live.values() if t.state is _BLOCKED]
        if thread0.state is _BLOCKED:
            out.insert(0, thread0)
        return out

    def counted_waits(self) -> list[KThread]:
        """The blocked threads the watchdog counts, in :meth:`blocked`'s order."""
        out = [t for t in self.counted.values() if t.state is _BLOCKED]
        out.sort(key=_tid)
        return out


def _tid(t: KThread) -> int:
    return t.tid


@dataclass(slots=True, eq=False)
class _Timer:
    deadline: float
    seq: int
    thread: KThread | None
    fn: Callable[[], None] | None
    cancelled: bool = False
