"""The reactor: one OS thread that turns ready file descriptors into events.

External events (a client on the xenstored or NBD socket, a TAP frame) arrive
on file descriptors that the scheduler thread must not block on. The reactor
thread waits on them with ``selectors`` and, when one is readable (a reader)
or writable (a writer: a socket whose buffer was full has room again), posts
its callback into the scheduler's event queue; the callback then runs in the
hub, on the scheduler's thread, like every other piece of kernel-side code.
A descriptor's interest is disarmed while its callback is queued and re-armed
after it ran, so one readiness produces one callback; a reader and a writer
of the same descriptor are armed independently.
"""

from __future__ import annotations

import os
import selectors
import threading
from collections.abc import Callable
from typing import final

from gntdma.sched._core import Scheduler

__all__ = ["Reactor"]

_R = selectors.EVENT_READ
_W = selectors.EVENT_WRITE


@final
class Reactor:
    """Watches file descriptors for a scheduler."""

    def __init__(self, sched: Scheduler) -> None:
        self._sched = sched
        self._sel = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._sel.register(self._wake_r, _R, None)
        self._callbacks: dict[int, Callable[[], None]] = {}  # readers
        self._writers: dict[int, Callable[[], None]] = {}
        self._armed: dict[int, int] = {}  # fd -> events registered with the selector
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="gntdma-reactor", daemon=True)
        self._thread.start()
        sched.add_external_source()

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Run ``callback()`` in the hub whenever ``fd`` is readable."""
        with self._lock:
            self._callbacks[fd] = callback
            self._set(fd, self._armed.get(fd, 0) | _R)
        self._poke()

    def remove_reader(self, fd: int) -> None:
        with self._lock:
            self._callbacks.pop(fd, None)
            self._set(fd, self._armed.get(fd, 0) & ~_R)
        self._poke()

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        """Run ``callback()`` in the hub when ``fd`` is writable (until removed)."""
        with self._lock:
            self._writers[fd] = callback
            self._set(fd, self._armed.get(fd, 0) | _W)
        self._poke()

    def remove_writer(self, fd: int) -> None:
        with self._lock:
            self._writers.pop(fd, None)
            self._set(fd, self._armed.get(fd, 0) & ~_W)
        self._poke()

    def _set(self, fd: int, events: int) -> None:
        """Register ``fd`` for ``events`` (none: unregister); with the lock held."""
        old = self._armed.get(fd, 0)
        if events == old:
            return
        try:
            if events == 0:
                self._armed.pop(fd, None)
                self._sel.unregister(fd)
            elif old == 0:
                self._sel.register(fd, events, fd)
                self._armed[fd] = events
            else:
                self._sel.modify(fd, events, fd)
                self._armed[fd] = events
        except (KeyError, ValueError, OSError):
            self._armed.pop(fd, None)

    def _poke(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _dispatch(self, fd: int, event: int) -> None:
        table = self._callbacks if event == _R else self._writers
        cb = table.get(fd)
        if cb is None:
            return
        try:
            cb()
        finally:
            with self._lock:
                if table.get(fd) is not None:
                    self._set(fd, self._armed.get(fd, 0) | event)
            self._poke()

    def _run(self) -> None:
        while not self._closed:
            events = self._sel.select(timeout=1.0)
            for key, mask in events:
                if key.data is None:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    continue
                fd = int(key.data)
                with self._lock:
                    armed = self._armed.get(fd, 0)
                    fired = mask & armed
                    if fired == 0:
                        continue
                    self._set(fd, armed & ~fired)
                for ev in (_R, _W):
                    if fired & ev:
                        self._sched.post(lambda fd=fd, ev=ev: self._dispatch(fd, ev))  # type: ignore[misc]

    def close(self) -> None:
        """Stop the thread; the scheduler no longer waits for external events."""
        if self._closed:
            return
        self._closed = True
        self._poke()
        self._thread.join(timeout=5)
        self._sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._sched.remove_external_source()
