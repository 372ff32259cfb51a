"""Spawned worker processes that leave SIGINT to the process that started them.

A terminal's Ctrl-C reaches its whole foreground process group: the command
and the workers it spawned (``gntdma explore --jobs N``, a schedule replayed in
a process of its own). The command handles it (one line, 130); a worker with
Python's default handler would raise ``KeyboardInterrupt`` wherever it is, most
often while it imports gntdma or waits for work, and print a traceback each.
A worker here ignores SIGINT for its whole life; the command ends it (its pool
shuts down). SIGTERM keeps its default action: it ends a worker silently, and
``Process.terminate`` still works.

A spawned child runs Python from the start, so it cannot inherit a handler,
only a disposition (SIG_IGN, which the parent cannot set without losing its
own SIGINT) or a signal mask. The parent starts each child with SIGINT blocked
in the starting thread (the child inherits the mask across ``exec``; the
parent's own SIGINT waits the few ms of the start, or goes to another thread);
the child, when it unpickles its process object (before it imports gntdma or
runs anything else of ours), sets SIG_IGN and unblocks it, which drops a SIGINT
that came in between. This module imports the standard library only: a child
imports it, and nothing of gntdma beyond two empty package files, before it
ignores SIGINT.
"""

from __future__ import annotations

import multiprocessing.context
import signal
from typing import Any

__all__ = ["spawn_context"]

_SIGINT = {signal.SIGINT}


class _QuietProcess(multiprocessing.context.SpawnProcess):
    def start(self) -> None:
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGINT)
        try:
            super().start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Unpickled in the child only, in its main thread, before its target.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # SIGTERM too: a parent that held it blocked (a command recording a
        # resource) must not leave its workers deaf to terminate().
        signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGINT, signal.SIGTERM))
        self.__dict__.update(state)


class _QuietSpawnContext(multiprocessing.context.SpawnContext):
    Process = _QuietProcess


_CONTEXT = _QuietSpawnContext()


def spawn_context() -> multiprocessing.context.SpawnContext:
    """The ``spawn`` context whose processes ignore SIGINT (never ``fork``: greenlets
    and the reactor thread do not survive it)."""
    return _CONTEXT
