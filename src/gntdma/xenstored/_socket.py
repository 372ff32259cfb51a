"""The Unix socket transport: xenstored's ``/var/run/xenstored/socket``.

One listening socket, any number of clients, all nonblocking under one
``selectors`` loop. Every client is a privileged (domid 0) connection of the
core, as socket clients are to C xenstored. The loop runs in the calling thread
(:meth:`XenstoredServer.serve_forever`) or in a background OS thread
(:meth:`XenstoredServer.start`); either way the core is only touched through
its locked entry points, so the rest of gntdma may use it at the same time.
Output the core queues from another thread (a watch fired by the toolstack)
wakes the loop through a socketpair.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import selectors
import socket
import stat
import threading
from types import TracebackType

from gntdma.errors import GntdmaError
from gntdma.xenstored._core import Connection, Xenstored

__all__ = ["ServerError", "XenstoredServer"]

log = logging.getLogger("gntdma.xenstored")

_RECV_SIZE = 65536
#: Stop reading from a client that does not read its replies past this backlog.
_MAX_BACKLOG = 1 << 20
_LISTEN = object()
_WAKE = object()


class ServerError(GntdmaError):
    """The socket cannot be set up (path in use, not a socket, too long)."""


class _Client:
    __slots__ = ("conn", "mask", "outbuf", "sock")

    def __init__(self, sock: socket.socket, conn: Connection) -> None:
        self.sock = sock
        self.conn = conn
        self.outbuf = bytearray()
        self.mask = 0


def _remove_stale(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ServerError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    finally:
        probe.close()
    raise ServerError(f"{path}: a daemon is already listening there")


class XenstoredServer:
    """Serve ``xenstored`` on the Unix socket ``path``.

    The socket exists once the constructor returns (a stale socket file left by
    a dead daemon is replaced); :meth:`close` removes it.
    """

    def __init__(self, xenstored: Xenstored, path: str | os.PathLike[str]) -> None:
        self.xenstored = xenstored
        self.path = os.fspath(path)
        if len(os.fsencode(self.path)) >= 108:
            raise ServerError(f"socket path too long for AF_UNIX: {self.path}")
        _remove_stale(self.path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(self.path)
            self._listener.listen(64)
        except OSError as e:
            self._listener.close()
            raise ServerError(f"cannot listen on {self.path}: {e}") from e
        self._listener.setblocking(False)
        self._inode = os.stat(self.path).st_ino
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, _LISTEN)
        self._selector.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        self._clients: dict[int, _Client] = {}  # by connection id
        self._plock = threading.Lock()
        self._pending: set[_Client] = set()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._loop_ident: int | None = None
        self._thread: threading.Thread | None = None
        self._cleanup_after_loop = False
        self._closed = False

    def __enter__(self) -> XenstoredServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def clients(self) -> int:
        """Number of connected socket clients."""
        return len(self._clients)

    # Running.

    def start(self) -> None:
        """Run the loop in a background OS thread."""
        if self._thread is not None or self._closed:
            raise ServerError("server already started or closed")
        self._idle.clear()
        self._thread = threading.Thread(target=self._run, name="xenstored-socket", daemon=True)
        self._thread.start()

    def serve_forever(self) -> None:
        """Run the loop in the calling thread until :meth:`shutdown` or :meth:`close`."""
        if self._closed:
            raise ServerError("server closed")
        self._idle.clear()
        self._run()

    def shutdown(self) -> None:
        """Ask the loop to stop (safe from signal handlers and other threads)."""
        self._stop.set()
        self._wake()

    def close(self) -> None:
        """Stop the loop, disconnect every client, remove the socket file."""
        if self._closed:
            return
        self.shutdown()
        if self._loop_ident == threading.get_ident():
            self._cleanup_after_loop = True  # called from inside the loop
            return
        self._idle.wait()
        if self._thread is not None:
            self._thread.join()
        self._cleanup()

    def _run(self) -> None:
        self._loop_ident = threading.get_ident()
        try:
            while not self._stop.is_set():
                for key, mask in self._selector.select():
                    if key.data is _LISTEN:
                        self._accept()
                    elif key.data is _WAKE:
                        self._drain_wake()
                    else:
                        client: _Client = key.data
                        if mask & selectors.EVENT_READ:
                            self._read(client)
                        if mask & selectors.EVENT_WRITE and client.conn.id in self._clients:
                            self._flush(client)
                self._flush_pending()
        finally:
            self._loop_ident = None
            self._idle.set()
            if self._cleanup_after_loop:
                self._cleanup()

    def _cleanup(self) -> None:
        if self._closed:
            return
        self._closed = True
        for client in list(self._clients.values()):
            self._drop(client)
        self._selector.close()
        self._listener.close()
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        self._wake_r.close()
        self._wake_w.close()

    # Wake-ups from the core.

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while self._wake_r.recv(4096):
                pass

    def _notify(self, client: _Client, *_: object) -> None:
        # Runs under the core lock, maybe in another thread: note and wake only.
        with self._plock:
            self._pending.add(client)
        if self._loop_ident != threading.get_ident():
            self._wake()

    def _flush_pending(self) -> None:
        with self._plock:
            pending, self._pending = self._pending, set()
        for client in pending:
            if client.conn.id in self._clients:
                self._flush(client)

    # Clients.

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("accept on %s failed: %s", self.path, e)
                return
            sock.setblocking(False)
            conn = self.xenstored.connect(0, name=f"socket{sock.fileno()}")
            client = _Client(sock, conn)
            self._clients[conn.id] = client
            client.mask = selectors.EVENT_READ
            self._selector.register(sock, client.mask, client)
            notify = functools.partial(self._notify, client)
            conn.set_callbacks(on_output=notify, on_close=notify)

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        if not data:
            self._drop(client)
            return
        try:
            client.conn.feed(data)
        except Exception:
            log.exception("xenstored failed on a request from %r", client.conn)
            self._drop(client)
            return
        self._flush(client)

    def _flush(self, client: _Client) -> None:
        client.outbuf += client.conn.data_to_send()
        if client.outbuf:
            try:
                sent = client.sock.send(client.outbuf)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as e:
                if e.errno not in (errno.EPIPE, errno.ECONNRESET):
                    log.warning("send to %r failed: %s", client.conn, e)
                self._drop(client)
                return
            del client.outbuf[:sent]
        if client.conn.closed:
            self._drop(client)  # closed by the core: one try to flush, as C does
            return
        mask = selectors.EVENT_WRITE if client.outbuf else 0
        if len(client.outbuf) < _MAX_BACKLOG:
            mask |= selectors.EVENT_READ
        if mask != client.mask:  # never 0: a backlog means EVENT_WRITE
            client.mask = mask
            self._selector.modify(client.sock, mask, client)

    def _drop(self, client: _Client) -> None:
        if self._clients.pop(client.conn.id, None) is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(client.sock)
        client.sock.close()
        client.conn.close()
