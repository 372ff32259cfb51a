"""SIGINT and SIGTERM during ``gntdma run``: stop at once, clean up, say so in one line.

:class:`InterruptGuard` installs handlers for both signals for the length of
a run. A signal raises :class:`Interrupted` (a :class:`BaseException`, like
:class:`KeyboardInterrupt`, so that nothing on the way catches it as an
error) in the code the main program runs. When it arrives while a simulated
kernel thread runs, raising it there would kill that thread half-way and leave
the others waiting for it (a deadlock report instead of "interrupted"), so
the guard has the scheduler's hub raise it instead, at its next turn; and it
keeps raising it at every later turn, so that no wait of a teardown on the
way out (a detach, a disk's release) lingers. :meth:`InterruptGuard.disarm`
stops that before the host's own teardown. A second signal while the run
stops is ignored: the cleanup is already under way.

A signal whose :class:`Interrupted` is raised where Python cannot pass it on
(a weakref callback, a ``__del__``: Python prints "Exception ignored in" and
goes on) is not lost: with a host armed, the hub raises it at its next turn
anyway; else the guard forgets it and sends the signal again 10 ms later, to be
raised where it can be. If the command is done before that, the guard's exit
raises it: it came while the command ran.

A signal that arrives while what the run made for itself is being made or
removed is held back (:func:`signals_deferred`) and raised once that is done.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import greenlet

from gntdma.sched import schedule_running, stop_after_schedule

__all__ = ["InterruptGuard", "Interrupted", "ScheduleInterruptGuard", "ignore_later_signals",
           "private_dir", "signals_deferred"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """The run was interrupted by a signal; :attr:`status` is the exit status."""

    def __init__(self, signum: int, phase: str = "") -> None:
        self.signum = signum
        self.phase = phase
        super().__init__(signal.Signals(signum).name)

    @property
    def status(self) -> int:
        """128 + the signal number: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back while a resource is made and recorded.

    Between creating a temporary directory or socket and keeping the name that
    removes it, a signal would leave it behind; held back, it is delivered (and
    raised) once the block ends, with the resource recorded. The caller's
    cleanup must already cover that moment: make the resource inside the
    ``try`` whose ``finally`` removes it.

    Blocking the signals in the main thread is not enough while other threads
    run: the kernel then gives a process-directed signal to one of them, and
    Python runs the handler in the main thread all the same. So the handlers
    are also swapped for one that only notes the signal, and a noted signal is
    sent to the main thread again, to the handlers put back, when the block ends.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []

    def note(signum: int, frame: FrameType | None) -> None:
        if signum not in noted:
            noted.append(signum)

    def put_back(sig: int) -> None:
        if signal.getsignal(sig) is note:  # unless the block set its own
            signal.signal(sig, old[sig])

    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    old: dict[int, Any] = {}
    try:
        for sig in _SIGNALS:
            old[sig] = signal.signal(sig, note)
        yield
    finally:
        # A signal another thread took just now may still run a handler put back
        # here, and raise: every step below happens all the same (a mask or a
        # handler left behind would outlive the command's own handling).
        try:
            try:
                if signal.SIGINT in old:
                    put_back(signal.SIGINT)
            finally:
                if signal.SIGTERM in old:
                    put_back(signal.SIGTERM)
        finally:
            try:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            finally:
                main = threading.get_ident()
                for signum in noted:
                    signal.pthread_kill(main, signum)


@contextlib.contextmanager
def private_dir(prefix: str) -> Iterator[Path]:
    """A new private directory in the temp directory, removed with all in it on the
    way out. A signal while it is made or removed is held back and raised once
    that is done: it is never left behind, whole or in part."""
    path: str | None = None
    try:
        with signals_deferred():
            path = tempfile.mkdtemp(prefix=prefix)
        yield Path(path)
    finally:
        if path is not None:
            with signals_deferred():
                shutil.rmtree(path, ignore_errors=True)


def ignore_later_signals() -> None:
    """A signal has ended the command: SIGINT and SIGTERM are ignored from now on.

    Its cleanup, its last line and the interpreter's exit go on undisturbed (one
    line, the first signal's status). ``SIG_IGN`` outlasts the interpreter's
    finalization, which puts the default action back for a Python handler (a
    late SIGTERM would kill the process with -15). Main thread only.
    """
    if threading.current_thread() is threading.main_thread():
        for sig in _SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


def signals_ignored() -> bool:
    """True once :func:`ignore_later_signals` has run (serve's signal ended its serving)."""
    return signal.getsignal(signal.SIGINT) == signal.SIG_IGN


class InterruptGuard:
    """SIGINT/SIGTERM handlers for a run (installed only in the main thread)."""

    def __init__(self) -> None:
        self.signum = 0
        #: what the run was doing; the message names it
        self.phase = "starting"
        self._call_later: Callable[[float, Callable[[], None]], Any] | None = None
        self._old: dict[int, Any] = {}
        self._unraisable_before: Callable[[sys.UnraisableHookArgs], Any] | None = None
        #: a signal swallowed in a __del__/weakref callback, sent again by _timer
        self._pending = 0
        self._timer: threading.Timer | None = None

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._old[sig] = signal.signal(sig, self._handler)
            self._unraisable_before = sys.unraisablehook
            sys.unraisablehook = self._unraisable
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.disarm()
        late = 0
        if self._pending != 0 and self.signum == 0:
            # Swallowed and not delivered again yet: it came while the command
            # ran, so it ends it (raised below, once the handlers are settled).
            late, self.signum, self._pending = self._pending, self._pending, 0
            if self._timer is not None:
                self._timer.cancel()
        if self._unraisable_before is not None:
            sys.unraisablehook = self._unraisable_before
            self._unraisable_before = None
        if not self._old:
            return
        # Blocked while the handlers are put back: a signal in between reaches the
        # old handler (the console script's: one line, 130/143) once they are, never
        # a half-restored state; a second signal after the first is dropped.
        with signals_deferred():
            if self.signum != 0 or signals_ignored():
                # Ended by a signal (this guard's, or serve's normal end): later
                # ones are ignored to the process's exit.
                ignore_later_signals()
            else:
                for sig, old in self._old.items():
                    signal.signal(sig, old)
            self._old.clear()
            if self.signum != 0:
                while signal.sigtimedwait(_SIGNALS, 0) is not None:
                    pass
        if late != 0 and t is None:
            raise Interrupted(late, self.phase)

    def arm(self, call_later: Callable[[float, Callable[[], None]], Any]) -> None:
        """A host is up: signals are raised by its scheduler's hub from now on."""
        self._call_later = call_later

    def disarm(self) -> None:
        """The host is being torn down: no more raising from its scheduler."""
        self._call_later = None

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self._pending = 0
        if self.signum != 0:
            return  # already stopping
        self.signum = signum
        in_main = greenlet.getcurrent().parent is None
        if self._call_later is None or in_main:
            if self._call_later is not None:
                self._call_later(0.0, self._fire)  # later waits end at once too
            raise Interrupted(signum, self.phase)
        self._call_later(0.0, self._fire)

    def _unraisable(self, u: sys.UnraisableHookArgs) -> None:
        """This guard's ``Interrupted`` raised where Python cannot pass it on."""
        e = u.exc_value
        if isinstance(e, Interrupted) and e.signum == self.signum:
            if self._call_later is None:  # nothing else raises it: deliver it again
                self.signum = 0
                self._pending = e.signum
                # To the main thread: a thread-directed signal waits there while
                # signals_deferred blocks it (a process-directed one would not).
                main = threading.main_thread().ident
                assert main is not None
                timer = threading.Timer(0.01, signal.pthread_kill, (main, e.signum))
                timer.daemon = True
                timer.start()
                self._timer = timer
            return  # armed: the hub's _fire raises it at its next turn
        assert self._unraisable_before is not None
        self._unraisable_before(u)

    def _fire(self) -> None:
        if self._call_later is not None:
            self._call_later(0.0, self._fire)
        raise Interrupted(self.signum, self.phase)


class ScheduleInterruptGuard(InterruptGuard):
    """SIGINT/SIGTERM handlers for ``gntdma explore`` and ``gntdma replay``.

    A signal while a schedule runs (:func:`gntdma.sched.schedule_running`) ends
    it once the schedule is done (:func:`gntdma.sched.stop_after_schedule`):
    raised inside it, the exception would be a failure of the schedule (a kernel
    thread ended half-way, a hub step cut short, its teardown panicking over them)
    or a replay's divergence. At any other moment it is raised at once. The
    schedule in progress runs to its end: a few ms, at most ``max_steps`` steps.
    """

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self._pending = 0
        if self.signum != 0:
            return  # already stopping
        self.signum = signum
        if schedule_running():
            stop_after_schedule(Interrupted(signum, self.phase))
            return
        raise Interrupted(signum, self.phase)
