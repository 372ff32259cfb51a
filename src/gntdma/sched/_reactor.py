"""The reactor: one OS thread that turns readable file descriptors into events.

External events (a client on the xenstored socket, a TAP frame) arrive on file
descriptors that the scheduler thread must not block on. The reactor thread
waits on them with ``selectors`` and, when one is readable, posts its callback
into the scheduler's event queue; the callback then runs in the hub, on the
scheduler's thread, like every other piece of kernel-side code. A descriptor is
disarmed while its callback is queued and re-armed after it ran, so one
readiness produces one callback.
"""

from __future__ import annotations

import os
import selectors
import threading
from collections.abc import Callable
from typing import final

from gntdma.sched._core import Scheduler

__all__ = ["Reactor"]


@final
class Reactor:
    """Watches file descriptors for a scheduler."""

    def __init__(self, sched: Scheduler) -> None:
        self._sched = sched
        self._sel = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._callbacks: dict[int, Callable[[], None]] = {}
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="gntdma-reactor", daemon=True)
        self._thread.start()
        sched.add_external_source()

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Run ``callback()`` in the hub whenever ``fd`` is readable."""
        with self._lock:
            self._callbacks[fd] = callback
            self._sel.register(fd, selectors.EVENT_READ, fd)
        self._poke()

    def remove_reader(self, fd: int) -> None:
        with self._lock:
            self._callbacks.pop(fd, None)
            try:
                self._sel.unregister(fd)
            except (KeyError, ValueError):
                pass
        self._poke()

    def _poke(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _rearm(self, fd: int) -> None:
        with self._lock:
            if fd in self._callbacks:
                try:
                    self._sel.register(fd, selectors.EVENT_READ, fd)
                except (KeyError, ValueError):
                    pass
        self._poke()

    def _dispatch(self, fd: int) -> None:
        cb = self._callbacks.get(fd)
        if cb is None:
            return
        try:
            cb()
        finally:
            self._rearm(fd)

    def _run(self) -> None:
        while not self._closed:
            events = self._sel.select(timeout=1.0)
            for key, _mask in events:
                if key.data is None:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    continue
                fd = int(key.data)
                with self._lock:
                    try:
                        self._sel.unregister(fd)
                    except (KeyError, ValueError):
                        continue
                self._sched.post(lambda fd=fd: self._dispatch(fd))  # type: ignore[misc]

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
