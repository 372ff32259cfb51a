"""Signals held back while a command makes and records a resource.

``signals_deferred`` blocked SIGINT/SIGTERM in the main thread only. With
another thread alive (the xenstored socket's, a timer re-sending a signal, the
reactor), the kernel gives a process-directed signal to a thread that does not
block it (signal(7): "A process-directed signal may be delivered to any one of
the threads that does not currently have the signal blocked"), and Python runs
the handler in the main thread at once (the ``signal`` module documentation:
"Python signal handlers are always executed in the main Python thread ...
even if the signal was received in another thread"). A review saw
``gntdma run`` interrupted while building the host leave an empty
``gntdma-PID-xxxx`` directory behind, and ``gntdma-run-xxxx`` while checking
the configs.
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from gntdma.toolstack.interrupt import Interrupted, InterruptGuard, signals_deferred

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Raised(Exception):
    pass


def _raise(signum: int, frame: FrameType | None) -> None:
    raise _Raised(signum)


class _Sender:
    """A thread, started before any block (a thread inherits its creator's signal
    mask), that sends ``kill(getpid())``, the process-directed kind, on request."""

    def __init__(self) -> None:
        self.go = threading.Semaphore(0)
        self.done = threading.Semaphore(0)
        self.signum = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            self.go.acquire()
            if self.signum == 0:
                return
            os.kill(os.getpid(), self.signum)
            self.done.release()

    def send(self, signum: int) -> None:
        self.signum = signum
        self.go.release()
        self.done.acquire()

    def close(self) -> None:
        self.signum = 0
        self.go.release()
        self.thread.join()


_sender: _Sender | None = None


def _from_another_thread(signum: int) -> None:
    assert _sender is not None
    _sender.send(signum)


@pytest.fixture
def handlers() -> Iterator[None]:
    global _sender
    old = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    _sender = _Sender()
    try:
        yield
    finally:
        _sender.close()
        _sender = None
        for sig, h in old.items():
            signal.signal(sig, h)
    # Nothing held back after the test: a mask left blocked is inherited by every
    # process started later (seen: a pool worker deaf to terminate()).
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == set()


@pytest.mark.usefixtures("handlers")
def test_a_handler_raising_as_it_is_put_back_leaves_nothing_behind(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A signal another thread took just before the block ends runs the handler put
    back, which raises in the middle of putting them back: the other handler and
    the signal mask are restored all the same (the full suite once saw SIGTERM
    left blocked, inherited by every later subprocess)."""
    real = signal.signal

    def sigterm_handler(signum: int, frame: FrameType | None) -> None:
        pass

    def signal_then_late_handler(sig: int, handler: Any) -> Any:
        prev = real(sig, handler)
        if handler is _raise:
            _raise(sig, None)  # the late handler runs right as it is put back
        return prev

    real(signal.SIGINT, _raise)
    real(signal.SIGTERM, sigterm_handler)
    monkeypatch.setattr(signal, "signal", signal_then_late_handler)
    with pytest.raises(_Raised):
        with signals_deferred():
            pass
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) is sigterm_handler
    assert signal.getsignal(signal.SIGINT) is _raise
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == set()


@pytest.mark.usefixtures("handlers")
@pytest.mark.parametrize("sig", _SIGNALS)
def test_a_signal_another_thread_receives_waits_for_the_block_to_end(sig: int) -> None:
    signal.signal(sig, _raise)
    reached = False
    with pytest.raises(_Raised) as e:
        with signals_deferred():
            _from_another_thread(sig)
            for _ in range(10_000):  # many chances for the handler to run
                pass
            reached = True
    assert reached and e.value.args == (sig,)
    assert signal.getsignal(sig) is _raise


@pytest.mark.usefixtures("handlers")
def test_a_signal_to_the_main_thread_waits_too() -> None:
    signal.signal(signal.SIGINT, _raise)
    main = threading.get_ident()
    reached = False
    with pytest.raises(_Raised):
        with signals_deferred():
            signal.pthread_kill(main, signal.SIGINT)
            reached = True
    assert reached


@pytest.mark.usefixtures("handlers")
def test_a_handler_set_inside_the_block_stays_and_gets_the_held_signal() -> None:
    """InterruptGuard puts the command's handlers back inside a deferral."""
    got: list[int] = []
    signal.signal(signal.SIGTERM, _raise)
    with signals_deferred():
        _from_another_thread(signal.SIGTERM)
        signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
    assert got == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is not _raise


@pytest.mark.usefixtures("handlers")
def test_nothing_held_nothing_sent() -> None:
    signal.signal(signal.SIGINT, _raise)
    with signals_deferred():
        pass
    assert signal.getsignal(signal.SIGINT) is _raise


def _signal_after(monkeypatch: pytest.MonkeyPatch, tmp: Path,
                  signum: int) -> list[str]:
    """``tempfile.mkdtemp`` (in ``tmp``) that gets ``signum`` as it returns."""
    made: list[str] = []
    real: Callable[..., str] = tempfile.mkdtemp

    def mkdtemp(*args: Any, **kwargs: Any) -> str:
        kwargs["dir"] = str(tmp)
        d = real(*args, **kwargs)
        made.append(d)
        _from_another_thread(signum)
        return d

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    return made


@pytest.mark.usefixtures("handlers")
@pytest.mark.parametrize("sig", _SIGNALS)
def test_run_interrupted_as_its_temp_dir_is_made_removes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sig: int) -> None:
    from gntdma.toolstack.run import run_main_job

    made = _signal_after(monkeypatch, tmp_path, sig)
    with pytest.raises(Interrupted) as e:
        with InterruptGuard() as guard:
            run_main_job(guard=guard, duration=0.5, log=lambda _s: None)
    assert e.value.signum == sig and e.value.phase == "checking the configs"
    assert len(made) == 1 and list(tmp_path.iterdir()) == []


@pytest.mark.usefixtures("handlers")
def test_serve_interrupted_as_its_temp_dir_is_made_removes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gntdma.toolstack.serve import serve_main

    made = _signal_after(monkeypatch, tmp_path, signal.SIGINT)
    with pytest.raises(Interrupted):
        with InterruptGuard() as guard:
            serve_main([], nbd_path=tmp_path / "nbd.sock", guard=guard, log=lambda _s: None)
    assert len(made) == 1 and list(tmp_path.iterdir()) == []


@pytest.mark.usefixtures("handlers")
def test_the_xenstored_socket_interrupted_as_its_dir_is_made_removes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gntdma.toolstack.xs import XenstoredSocket
    from gntdma.xenstored import Xenstored

    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    made = _signal_after(monkeypatch, tmp_path, signal.SIGTERM)
    with pytest.raises(Interrupted):
        with InterruptGuard():
            XenstoredSocket(Xenstored())
    assert len(made) == 1 and list(tmp_path.iterdir()) == []


def _signal_before(monkeypatch: pytest.MonkeyPatch, module: Any, name: str,
                   signum: int) -> list[str]:
    """``module.name`` (a removal: ``shutil.rmtree``, ``os.rmdir``) that gets
    ``signum`` from another thread just before it does its work."""
    calls: list[str] = []
    real: Callable[..., Any] = getattr(module, name)

    def removal(path: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(str(path))
        if len(calls) == 1:
            _from_another_thread(signum)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(module, name, removal)
    return calls


@pytest.mark.usefixtures("handlers")
def test_the_xenstored_socket_interrupted_as_it_removes_its_dir_removes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An outside review: a signal landing in the teardown's removal (``os.rmdir``
    of the socket's directory) left ``gntdma-PID-xxxx`` behind."""
    from gntdma.toolstack.xs import XenstoredSocket
    from gntdma.xenstored import Xenstored

    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(Interrupted):
        with InterruptGuard():
            s = XenstoredSocket(Xenstored())
            calls = _signal_before(monkeypatch, os, "rmdir", signal.SIGINT)
            s.close()
    assert calls and list(tmp_path.iterdir()) == []


@pytest.mark.usefixtures("handlers")
def test_run_interrupted_as_it_removes_its_temp_dir_removes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same for ``gntdma run``'s own directory (default images in it): a signal
    in the middle of ``shutil.rmtree`` left ``gntdma-run-xxxx`` behind."""
    import shutil

    from gntdma.toolstack.run import run_main_job

    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    calls = _signal_before(monkeypatch, shutil, "rmtree", signal.SIGTERM)
    with pytest.raises(Interrupted) as e:
        with InterruptGuard() as guard:
            run_main_job(guard=guard, duration=0.3, log=lambda _s: None)
    assert e.value.signum == signal.SIGTERM
    assert calls and list(tmp_path.iterdir()) == []
