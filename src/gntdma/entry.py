"""The ``gntdma`` console script: SIGINT and SIGTERM are handled from its first moment.

Left to Python, SIGINT raises :class:`KeyboardInterrupt` wherever the program
is (a traceback from the middle of an import, exit status -2) and SIGTERM
kills it without a word (-15). This module imports nothing but the standard
library's ``signal``, ``sys``, ``types`` and the interpreter's built-in
``_thread`` and ``time``: it installs its handlers first, then imports the
command line and runs it.

Until a command puts its own handlers in place (``gntdma run``'s and ``gntdma
serve``'s :class:`~gntdma.toolstack.interrupt.InterruptGuard`, the xenstored
daemon's) and again once they are restored, a signal ends the process with
one line on stderr and exit status 128 + the signal number (130 for SIGINT,
143 for SIGTERM). Nothing has been made for the run outside those handlers,
so nothing is left to remove. This holds for ``serve`` too: SIGINT and
SIGTERM are its normal end (report, then 0 or 1) once its host is built and
serving; a signal before that, while it starts or builds the host, interrupts
it as ``run`` is interrupted (130, 143, one line). A second signal while the
first is being handled is ignored. SIGINT and SIGTERM are unblocked once the
handlers are in place: one sent while a parent held them blocked across exec
is handled then.

A signal whose handler runs where Python cannot pass an exception on (a
weakref callback, such as the import machinery's module locks have, or a
``__del__``) is sent again 10 ms later, to be raised where it can be; if the
command returns before that, it ends with that signal's line and status all
the same. Once the command has returned its status, SIGINT and SIGTERM are
ignored to the process's exit: the status stands.

A signal that arrives before the interpreter has run any of this (the first
few milliseconds of the process) meets the system's default action (the
process ends by the signal, before it has made anything), or Python's own
handling of SIGINT while it starts: a SIGINT while ``site`` imports is
"Fatal Python error: init_import_site" and status 1, before gntdma has run.
"""

from __future__ import annotations

import _thread
import signal
import sys
import time
from types import FrameType

__all__ = ["main"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_COMMANDS = ("run", "serve", "explore", "replay", "xenstored")


class _Stopped(BaseException):
    """A signal ended the program outside a command's own handlers."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


_received = 0


_finished = False


#: A signal swallowed where it could not be raised, to be sent again (0: none).
_pending = 0


def _handler(signum: int, frame: FrameType | None) -> None:
    global _received, _pending
    _pending = 0
    if _received != 0:
        return  # already stopping
    _received = signum
    raise _Stopped(signum)


def _unraisable(u: sys.UnraisableHookArgs) -> None:
    """A ``_Stopped`` raised where Python cannot pass an exception on: in a weakref
    callback (the import machinery's module locks have one), a ``__del__``, a GC
    callback. Python prints it there ("Exception ignored in") and goes on, and the
    signal would be lost. Send it again in 10 ms (``resend_later``), so that the
    handler meets it at a point that can raise it (the hook itself cannot)."""
    global _received, _pending
    e = u.exc_value
    if isinstance(e, _Stopped) and not _finished:
        _received = 0
        _pending = e.signum
        resend_later(e.signum)
        return
    _unraisable_before(u)


def resend_later(signum: int, delay: float = 0.01) -> None:
    """Send ``signum`` to the main thread after ``delay`` seconds, from a new thread.

    Not from a timer signal (ITIMER_REAL and SIGALRM may be another's, such as a
    test runner's timeout), and with the interpreter's built-in ``_thread`` and
    ``time`` only: this may run inside the import machinery. To the main thread,
    not the process: while the main thread holds the signal blocked (a command
    recording a resource it made), a process-directed one would go to another
    thread and be handled at once."""
    _thread.start_new_thread(_resend, (signum, delay, _main_thread))


def _resend(signum: int, delay: float, thread: int) -> None:
    time.sleep(delay)
    signal.pthread_kill(thread, signum)


def _finish() -> None:
    """The command has returned its status: it stands. SIGINT and SIGTERM are
    ignored from now on (``SIG_IGN`` also outlasts the interpreter's finalization,
    which puts the default action back for a Python handler)."""
    global _finished
    for sig in _SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    _finished = True


_unraisable_before = sys.unraisablehook


def _say(signum: int) -> None:
    try:
        print(f"{_name}: interrupted by {signal.Signals(signum).name}", file=sys.stderr,
              flush=True)
    except (OSError, ValueError):
        pass


def _signum_of(e: BaseException) -> int:
    """The signal an exception stands for, or 0 for any other exception.

    Python wraps an exception raised at some points of class creation (a
    dataclass field's ``__set_name__`` while a module imports) in a
    RuntimeError: the signal is then the wrapped exception's.
    """
    seen = 0
    cause: BaseException | None = e
    while cause is not None and seen < 8:
        signum = _own_signum(cause)
        if signum != 0:
            return signum
        cause, seen = cause.__cause__, seen + 1
    return 0


def _own_signum(e: BaseException) -> int:
    if isinstance(e, _Stopped):
        return e.signum
    if isinstance(e, KeyboardInterrupt):
        return int(signal.SIGINT)
    # A command's own interruption (InterruptGuard's Interrupted) that got past it.
    signum = getattr(e, "signum", None)
    if isinstance(signum, int) and signum in (int(s) for s in _SIGNALS):
        return signum
    return 0


def _command(argv: list[str]) -> str:
    name = next((a for a in argv if not a.startswith("-")), "")
    return f"gntdma {name}" if name in _COMMANDS else "gntdma"


_name = "gntdma"
_main_thread = _thread.get_ident()  # main() sets it again: the thread that runs it


def main(argv: list[str] | None = None) -> int:
    """Install the handlers, then run ``gntdma.cli.main``; its exit status."""
    global _received, _finished, _pending, _name, _unraisable_before, _main_thread
    _received, _finished, _pending = 0, False, 0
    _main_thread = _thread.get_ident()
    args = sys.argv[1:] if argv is None else argv
    _name = _command(args)
    if sys.unraisablehook is not _unraisable:
        _unraisable_before = sys.unraisablehook
        sys.unraisablehook = _unraisable
    try:
        # In the try: a signal the moment a handler is in place ends the command.
        for sig in _SIGNALS:
            signal.signal(sig, _handler)
        # Handled from here on: a signal held back by whoever started us (blocked
        # across exec) is delivered now, to these handlers.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        from gntdma import cli

        status = cli.main(args)
        if _pending != 0:
            # A signal the command swallowed, not yet delivered again: it came
            # while the command ran, so it ends it.
            raise _Stopped(_pending)
        _finish()  # in the try: a signal until it is done ends the command
    except BaseException as e:
        signum = _signum_of(e)
        if signum == 0:
            _finish()
            raise
        _received = signum  # a second signal from here on is ignored
        for sig in _SIGNALS:  # also while the interpreter finalizes (SIG_IGN outlasts it)
            signal.signal(sig, signal.SIG_IGN)
        _say(signum)
        return 128 + signum
    finally:
        sys.unraisablehook = _unraisable_before
    return status


if __name__ == "__main__":
    sys.exit(main())
