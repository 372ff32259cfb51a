"""The control socket of a running host: what ``gntdma xl`` talks to.

``gntdma run --hold`` (or ``--control PATH``) and ``gntdma serve`` open a Unix
socket (mode 0600) on which :class:`ControlServer` takes one request per
connection: a line of JSON ``{"verb": ..., "args": [...], "cwd": ...}``, answered
by a line of JSON ``{"status": N, "out": "...", "err": "..."}``. The reactor
thread only says that a socket is readable; reading, parsing and answering
happen in the scheduler's hub and on a toolstack kernel thread (``xl/<verb>``),
so the verbs use the same toolstack functions as the job itself
(:func:`~gntdma.toolstack.vbd.attach_disk`, :func:`~gntdma.toolstack.vif.attach_vif`,
...) and may sleep like them. What the verbs print is in :mod:`.xlverbs`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, Final, final

from gntdma.errors import ConfigError
from gntdma.sched import Reactor, Scheduler, ThreadState
from gntdma.toolstack.host import Host
from gntdma.toolstack.netjob import NetJob
from gntdma.toolstack.report import Report
from gntdma.toolstack.vbd import Vbd
from gntdma.toolstack.xlverbs import Console

__all__ = ["MAX_REQUEST", "ControlServer", "HostConsole", "check_control_path", "hold_running"]

#: Bytes a request may have (its line included).
MAX_REQUEST: Final = 64 << 10
#: ``sun_path`` holds 108 bytes, the terminating NUL included.
_SUN_PATH_MAX: Final = 107
#: Seconds an answer may take to go out before the client is dropped.
_SEND_TIMEOUT: Final = 5.0


def check_control_path(path: Path) -> None:
    """Refuse a control socket path that cannot be used, before anything runs.

    Raises:
        ConfigError: too long for a Unix socket, something already there, or a
            folder that does not exist.
    """
    text = os.fsencode(path)
    if len(text) > _SUN_PATH_MAX:
        raise ConfigError(f"--control {path}: too long for a Unix socket "
                          f"({len(text)} bytes, at most {_SUN_PATH_MAX})")
    if path.exists() or path.is_symlink():
        raise ConfigError(f"--control {path}: something is already there (remove it first)")
    parent = path.parent if str(path.parent) != "" else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"--control {path}: no such folder {parent}")


@final
class ControlServer:
    """Serves ``console`` on a Unix socket at ``path`` until :meth:`close`."""

    def __init__(self, sched: Scheduler, path: Path, console: Console) -> None:
        self.sched = sched
        self.path = path
        self.console = console
        self.closed = False
        self.requests = 0
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o177)
            try:
                self.listener.bind(str(path))
            finally:
                os.umask(old)
            os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
            self.listener.listen(16)
            self.listener.setblocking(False)
        except OSError:
            self.listener.close()
            with contextlib.suppress(OSError):
                if path.is_socket():
                    path.unlink()
            raise
        self._conns: dict[int, tuple[socket.socket, bytearray]] = {}
        self.reactor = Reactor(sched)
        self.reactor.add_reader(self.listener.fileno(), self._accept)

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            conn.setblocking(False)
            fd = conn.fileno()
            self._conns[fd] = (conn, bytearray())
            self.reactor.add_reader(fd, lambda fd=fd: self._read(fd))  # type: ignore[misc]

    def _read(self, fd: int) -> None:
        entry = self._conns.get(fd)
        if entry is None:
            return
        conn, buf = entry
        try:
            data = conn.recv(MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client went away before it asked anything
            self._drop(fd)
            return
        buf += data
        line, nl, _rest = bytes(buf).partition(b"\n")
        if not nl:
            if len(buf) >= MAX_REQUEST:
                self._answer_now(fd, 1, "", f"request longer than {MAX_REQUEST} bytes\n")
            return
        self.reactor.remove_reader(fd)
        try:
            req = json.loads(line)
            verb, args, cwd = _parse_request(req)
        except (ValueError, TypeError) as e:
            self._answer_now(fd, 1, "", f"bad request: {e}\n")
            return
        self.requests += 1
        self.sched.spawn(self._serve, fd, verb, args, cwd, name=f"xl/{verb}"[:40])

    def _serve(self, fd: int, verb: str, args: list[str], cwd: str) -> None:
        """One verb, on a toolstack thread (it may sleep: attach, detach, destroy)."""
        status, out, err = self.console.run(verb, args, cwd)
        self._answer_now(fd, status, out, err)

    def _answer_now(self, fd: int, status: int, out: str, err: str) -> None:
        entry = self._conns.pop(fd, None)
        if entry is None:
            return
        conn = entry[0]
        self.reactor.remove_reader(fd)
        data = json.dumps({"status": status, "out": out, "err": err}).encode() + b"\n"
        try:
            conn.setblocking(True)
            conn.settimeout(_SEND_TIMEOUT)
            conn.sendall(data)
        except OSError:
            pass
        finally:
            conn.close()

    def _drop(self, fd: int) -> None:
        entry = self._conns.pop(fd, None)
        self.reactor.remove_reader(fd)
        if entry is not None:
            entry[0].close()

    def close(self) -> None:
        """Stop serving: no new request; the socket file goes."""
        if self.closed:
            return
        self.closed = True
        self.reactor.remove_reader(self.listener.fileno())
        for fd in list(self._conns):
            self._drop(fd)
        self.reactor.close()
        self.listener.close()
        with contextlib.suppress(OSError):
            if self.path.is_socket():
                self.path.unlink()


def _parse_request(req: Any) -> tuple[str, list[str], str]:
    if not isinstance(req, dict):
        raise ValueError("not a JSON object")
    verb, args, cwd = req.get("verb"), req.get("args", []), req.get("cwd", "/")
    if not isinstance(verb, str) or not verb:
        raise ValueError("no verb")
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise ValueError("args must be a list of strings")
    if not isinstance(cwd, str) or not os.path.isabs(cwd):
        raise ValueError("cwd must be an absolute path")
    return verb, args, cwd


def hold_running(sched: Scheduler, log: Callable[[str], None],
                 stop: threading.Event | None = None) -> int:
    """Keep the host running until SIGINT or SIGTERM (or ``stop``); the signal, or 0.

    Unlike a plain wait the scheduler runs meanwhile, so the control socket is
    answered and the guests' threads go on.
    """
    got = [0]

    def handler(signum: int, frame: FrameType | None) -> None:
        if got[0] == 0:
            got[0] = signum

    old: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    log("holding: the host stays up until SIGINT or SIGTERM (Ctrl-C)")

    def poll() -> None:
        if stop is not None and stop.is_set() and got[0] == 0:
            got[0] = -1
        if got[0] == 0:
            sched.call_later(0.1, poll)

    try:
        sched.call_later(0.1, poll)
        sched.run(until=lambda: got[0] != 0)
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
    return max(got[0], 0)


@final
class HostConsole:
    """A job's control socket: the console and its server, and their end.

    ``gntdma run`` and ``gntdma serve`` give it the disks and the network they
    attach (:meth:`attached`); :meth:`release` (thread0) stops serving and
    detaches what ``gntdma xl`` attached, before the job tears its own down.
    """

    def __init__(self, host: Host, path: Path, log: Callable[[str], None]) -> None:
        self.host = host
        self.console = Console(host, log)
        self.server = ControlServer(host.sched, path, self.console)
        log(f"control: gntdma xl --socket {path} list")

    def attached(self, vbds: list[Vbd], net: NetJob | None) -> None:
        self.console.add_disks(vbds)
        self.console.set_net(net)

    def release(self, report: Report | None = None) -> None:
        """No more requests; detach what the verbs attached (runs the scheduler)."""
        if self.console.released:
            return
        self.server.close()
        t = self.host.sched.spawn(self.console.release, name="xl/release")
        self.host.sched.run(until=lambda: t.state is ThreadState.DONE)
        if report is not None:
            report.figures["xl"] = {"requests": self.server.requests,
                                    "destroyed": list(self.console.destroyed)}
            report.check("gntdma xl: what it attached detached cleanly", t.result is True,
                         f"{self.server.requests} request(s)")

    def close(self) -> None:
        """The socket goes (whatever happened)."""
        self.server.close()
