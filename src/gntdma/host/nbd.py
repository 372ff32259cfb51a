"""The NBD server: guest disks exported on a Unix or TCP socket.

The protocol is :mod:`gntdma.host.nbd_proto` (sans-IO); this module is the
thin layer that moves its bytes. Everything runs on the scheduler's thread:

- the listening socket and every connection are non-blocking and watched by
  the :class:`~gntdma.sched.Reactor`; a readable connection is read in the
  hub (a large write payload straight into its own buffer, small messages
  a chunk at a time), and the requests it yields are queued for the
  connection's worker threads;
- each request becomes bios submitted to the disk's blkfront from a guest
  kernel thread (a worker of the connection, spawned on demand up to
  :data:`WORKERS`, belonging to the guest's kernel, so that a panic there
  crashes that guest only); many requests are in flight per connection, and
  each is answered when its bios complete, in completion order;
- one transmit thread per connection sends the replies: it lets the other
  completions of the same batch queue theirs, then sends them all in one
  ``sendmsg``; a full socket buffer makes it sleep until the reactor's writer
  says there is room, so the scheduler thread never blocks on a client.

A client that breaks the protocol, or whose socket fails, loses its own
connection only; its requests in flight complete (so that nothing is left
half-done in the guest) and their replies are dropped. A connection with
:data:`MAX_QUEUED` requests waiting is not read until they drain.

Idle or slow clients cannot lock the others out: a connection still
negotiating after the handshake timeout (:data:`HANDSHAKE_TIMEOUT` by
default) is dropped; at most ``max_connections`` (:data:`MAX_CONNECTIONS` by
default) are open at once, and a client that comes when they are all open
takes the place of the oldest one still negotiating, or, if every one is in
transmission, is refused: closed at once, before the greeting (the client
reads end of file), and counted. The listening socket's backlog is
:data:`LISTEN_BACKLOG`, so that a burst of clients is queued, not refused by
the kernel. No hostile request makes the transmit thread loop without a
scheduling point: a reply buffer the socket took whole is dropped even when
it is empty, and a send that takes nothing waits for the reactor's writer.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, final

from gntdma.dev.blkfront import xbd_softc
from gntdma.dev.blkfront_io import xbd_discard, xbd_flush, xbd_read, xbd_write
from gntdma.host.nbd_proto import (
    NbdCmd,
    NbdCmdFlag,
    NbdExport,
    NbdRequest,
    NbdServerConnection,
    nbd_error_from_errno,
)
from gntdma.sched import (
    PIDLE,
    Mutex,
    Reactor,
    Scheduler,
    msleep,
    mtx_lock,
    mtx_unlock,
    tsleep,
    wakeup,
    wakeup_one,
)

__all__ = [
    "HANDSHAKE_TIMEOUT",
    "LISTEN_BACKLOG",
    "MAX_CONNECTIONS",
    "MAX_QUEUED",
    "WORKERS",
    "NbdDisk",
    "NbdServer",
    "NbdServerStatistics",
    "listen_tcp",
    "listen_unix",
    "remove_socket",
]

#: Worker threads per connection at most: the requests in flight on the disk.
WORKERS: Final = 32
#: Requests queued (waiting for a worker) before the connection is no longer read.
MAX_QUEUED: Final = 64
#: Connections open at once by default (see the module's text for what happens beyond).
MAX_CONNECTIONS: Final = 256
#: Seconds a connection may spend in the handshake by default before it is dropped.
HANDSHAKE_TIMEOUT: Final = 5.0
#: The listening socket's backlog (the kernel caps it at ``net.core.somaxconn``).
LISTEN_BACKLOG: Final = 1024
#: Seconds the listener rests after ``accept`` ran out of file descriptors.
_ACCEPT_BACKOFF: Final = 0.1
_IOV_MAX: Final = 1024
_RECV_CHUNK: Final = 256 << 10
#: A receive buffer at least this large is filled straight by ``recv_into``.
_DIRECT_RECV: Final = 16 << 10


@dataclass(eq=False)
class NbdDisk:
    """A guest disk to export: the blkfront softc and the export it appears as."""

    export: NbdExport
    sc: xbd_softc
    #: the largest piece of a request one bio carries (a guest kernel buffer)
    chunk: int = 1 << 20
    requests: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    errors: int = 0


@dataclass(frozen=True, slots=True)
class NbdServerStatistics:
    connections: int  #: open now
    accepted: int
    dropped: int  #: closed because the client broke the protocol or its socket failed
    requests: int
    refused: int  #: requests answered with an error by the protocol core
    bytes_read: int
    bytes_written: int
    errors: int  #: requests whose I/O failed
    #: requests of length 0, answered with success by the protocol core (no I/O)
    empty_requests: int = 0
    #: closed while still negotiating: past the handshake timeout, or making room
    #: for a new client at the connection limit
    handshake_dropped: int = 0
    #: new clients closed at once because every connection was in transmission
    refused_connections: int = 0
    max_connections: int = MAX_CONNECTIONS
    handshake_timeout: float = HANDSHAKE_TIMEOUT


def _do_request(disk: NbdDisk, req: NbdRequest) -> tuple[int, bytes | None]:
    """Run ``req`` on the disk through blkfront: (errno, data of a read). Sleeps."""
    sc, chunk = disk.sc, disk.chunk
    if req.cmd == NbdCmd.READ:
        pieces = []
        for pos in range(0, req.length, chunk):
            error, data = xbd_read(sc, req.offset + pos, min(chunk, req.length - pos))
            if error != 0:
                return error, None
            pieces.append(data)
        return 0, pieces[0] if len(pieces) == 1 else b"".join(pieces)
    if req.cmd == NbdCmd.FLUSH:
        return xbd_flush(sc), None
    if req.cmd == NbdCmd.TRIM:
        error = xbd_discard(sc, req.offset, req.length) if req.length > 0 else 0
    elif req.cmd == NbdCmd.WRITE:
        assert req.payload is not None
        view = memoryview(req.payload)
        error = 0
        for pos in range(0, req.length, chunk):
            error = xbd_write(sc, req.offset + pos, view[pos:pos + chunk])
            if error != 0:
                break
    else:  # WRITE_ZEROES
        zeros = bytes(min(chunk, req.length))
        error = 0
        for pos in range(0, req.length, chunk):
            error = xbd_write(sc, req.offset + pos, zeros[:min(chunk, req.length - pos)])
            if error != 0:
                break
    if error == 0 and req.flags & NbdCmdFlag.FUA:
        error = xbd_flush(sc)
    return error, None


@final
class _Conn:
    """One client connection."""

    def __init__(self, server: NbdServer, sock: socket.socket, cid: int) -> None:
        self.server, self.sock, self.cid = server, sock, cid
        self.fd = sock.fileno()
        self.proto = NbdServerConnection([d.export for d in server.disks.values()],
                                         server.default)
        self.lock = Mutex("nbdconn")
        self.queue: collections.deque[NbdRequest] = collections.deque()
        self.workers = 0
        self.idle = 0
        self.busy = 0
        self.closing = False
        self.broken = False
        self.reading = False
        self.tx_done = False
        self.txchan = object()
        self.wchan = object()
        self.pending: list[memoryview] = []
        self.opened = server.sched.now()
        self._cancel_handshake: Callable[[], None] | None = None
        if server.handshake_timeout > 0:
            self._cancel_handshake = server.sched.call_later(server.handshake_timeout,
                                                             self._handshake_expired)
        self.server.sched.spawn(self._tx, name=f"nbd/c{cid}/tx")
        self._read_on()

    @property
    def negotiating(self) -> bool:
        """Still in the handshake (no export chosen), and not closing."""
        return self.proto.export is None and not self.closing

    def _handshake_expired(self) -> None:
        self._cancel_handshake = None
        if self.negotiating:
            self.drop_negotiating()

    def drop_negotiating(self) -> None:
        """End a connection that is still in the handshake (hub only)."""
        self.server.handshake_dropped += 1
        self.close(broken=True, counted=False)

    # -- reading (hub) -------------------------------------------------------------

    def _read_on(self) -> None:
        if not self.reading and not self.closing:
            self.reading = True
            self.server.reactor.add_reader(self.fd, self.readable)

    def _read_off(self) -> None:
        if self.reading:
            self.reading = False
            self.server.reactor.remove_reader(self.fd)

    def readable(self) -> None:
        for _ in range(64):
            if self.closing or len(self.queue) >= MAX_QUEUED:
                break
            buf = self.proto.recv_buffer()
            try:
                if len(buf) >= _DIRECT_RECV:
                    n = self.sock.recv_into(buf)
                    reqs = self.proto.received(n) if n > 0 else []
                else:
                    data = self.sock.recv(_RECV_CHUNK)
                    n = len(data)
                    reqs = self.proto.receive_data(data) if n > 0 else []
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.close(broken=True)
                return
            if n == 0:
                self.close(broken=False)
                return
            self._queue(reqs)
            if self.proto.closed:
                self.close(broken=not self.proto.disconnect_requested)
                return
        if len(self.queue) >= MAX_QUEUED:
            self._read_off()
        self._kick()

    def _queue(self, reqs: Sequence[NbdRequest]) -> None:
        for req in reqs:
            disk = self.server.disks[self.proto.export.name]  # type: ignore[union-attr]
            disk.requests += 1
            self.queue.append(req)
            if self.idle > 0:
                self.idle -= 1
                wakeup_one(self.queue)
            elif self.workers < WORKERS:
                self.workers += 1
                self.server.sched.spawn(self._worker, disk,
                                        name=f"nbd/c{self.cid}/w{self.workers}",
                                        domain=disk.sc.xbd_kern)

    # -- the workers (guest kernel threads) ------------------------------------------

    def _worker(self, disk: NbdDisk) -> None:
        while True:
            mtx_lock(self.lock)
            while len(self.queue) == 0 and not self.closing:
                self.idle += 1
                msleep(self.queue, self.lock, "nbdreq", 0.0, PIDLE)
            if len(self.queue) == 0:
                self.workers -= 1
                mtx_unlock(self.lock)
                wakeup(self.txchan)
                return
            req = self.queue.popleft()
            self.busy += 1
            mtx_unlock(self.lock)
            error, data = _do_request(disk, req)
            self.busy -= 1
            if error != 0:
                disk.errors += 1
            elif req.cmd == NbdCmd.READ:
                disk.bytes_read += req.length
            elif req.cmd == NbdCmd.WRITE:
                disk.bytes_written += req.length
            if not self.broken:
                self.proto.reply(req, nbd_error_from_errno(error), data)
            if not self.reading and not self.closing and len(self.queue) < MAX_QUEUED // 2:
                self._read_on()
            self._kick()

    # -- the transmit thread ---------------------------------------------------------

    def _kick(self) -> None:
        wakeup(self.txchan)

    def _tx(self) -> None:
        while True:
            while (not self.proto.has_output() and not self.pending
                   and not (self.closing and self.workers == 0)):
                tsleep(self.txchan, "nbdtx", 0.0, PIDLE)
            if self.proto.has_output():
                # let the other completions of this batch queue their replies first
                self.server.sched.yield_()
                self.pending += [v for v in (memoryview(b).cast("B")
                                             for b in self.proto.take_output()) if len(v) > 0]
            if self.pending and not self.broken:
                self._send()
            elif self.broken:
                self.pending.clear()
                self.proto.take_output()
            if self.closing and self.workers == 0 and not self.pending \
                    and not self.proto.has_output():
                break
        self._finish()

    def _send(self) -> None:
        while self.pending and not self.broken:
            try:
                sent = self.sock.sendmsg(self.pending[:_IOV_MAX])
            except (BlockingIOError, InterruptedError):
                if self.server.closed:  # shutting down: a client not reading loses the rest
                    self.broken = True
                    self.pending.clear()
                    return
                self._wait_writable()
                continue
            except OSError:
                self.broken = True
                self.pending.clear()
                self.close(broken=True)
                return
            # every buffer the socket took whole goes, an empty one included
            while self.pending and len(self.pending[0]) <= sent:
                sent -= len(self.pending.pop(0))
            if sent > 0:
                self.pending[0] = self.pending[0][sent:]
            elif self.pending:
                # nothing taken of a non-empty buffer: wait for room, never spin
                if self.server.closed:
                    self.broken = True
                    self.pending.clear()
                    return
                self._wait_writable()

    def _wait_writable(self) -> None:
        self.server.reactor.add_writer(self.fd, self._writable)
        tsleep(self.wchan, "nbdsnd", 0.0, PIDLE)

    def _writable(self) -> None:
        self.server.reactor.remove_writer(self.fd)
        wakeup(self.wchan)

    # -- the end -------------------------------------------------------------------

    def close(self, *, broken: bool, counted: bool = True) -> None:
        """Stop reading; requests not started are dropped, the others complete.
        ``counted``: a broken connection counts as dropped for breaking the protocol."""
        if self.closing:
            return
        self.closing = True
        if self._cancel_handshake is not None:
            self._cancel_handshake()
            self._cancel_handshake = None
        if broken:
            if counted:
                self.server.dropped += 1
            self.broken = True
        self._read_off()
        if broken:
            self.queue.clear()  # a DISC's outstanding requests are still handled
        wakeup(self.queue)
        wakeup(self.wchan)
        self._kick()

    def _finish(self) -> None:
        self.server.reactor.remove_writer(self.fd)
        self._read_off()
        with contextlib.suppress(OSError):
            self.sock.close()
        self.tx_done = True
        self.server.refused += self.proto.errors
        self.server.empty += self.proto.empty
        self.server.conns.pop(self.cid, None)
        wakeup(self.server.conns)


@final
class NbdServer:
    """Serves ``disks`` on a listening socket until :meth:`close`."""

    def __init__(self, sched: Scheduler, disks: Sequence[NbdDisk], listener: socket.socket,
                 *, default: str | None = None,
                 on_connect: Callable[[int], None] | None = None,
                 max_connections: int = MAX_CONNECTIONS,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
        """``max_connections``: open at once (at least 1); ``handshake_timeout``:
        seconds a connection may negotiate (0: no limit)."""
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections}")
        if handshake_timeout < 0:
            raise ValueError(f"handshake_timeout must be 0 or more, not {handshake_timeout}")
        self.sched = sched
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.disks = {d.export.name: d for d in disks}
        self.default = default
        self.listener = listener
        listener.setblocking(False)
        self.reactor = Reactor(sched)
        self.conns: dict[int, _Conn] = {}
        self.accepted = 0
        self.dropped = 0
        self.refused = 0
        self.empty = 0
        self.handshake_dropped = 0
        self.refused_connections = 0
        self._next = 0
        self._on_connect = on_connect
        self.closed = False
        self.reactor.add_reader(listener.fileno(), self._accept)

    def _accept(self) -> None:
        while not self.closed:
            try:
                sock, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # out of descriptors or memory: the listener stays readable, so
                    # rest a moment instead of being called again at once
                    self.reactor.remove_reader(self.listener.fileno())
                    self.sched.call_later(_ACCEPT_BACKOFF, self._accept_again)
                return
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if not self._make_room():
                self.refused_connections += 1
                sock.close()
                continue
            self._next += 1
            self.accepted += 1
            self.conns[self._next] = _Conn(self, sock, self._next)
            if self._on_connect is not None:
                self._on_connect(self._next)

    def _accept_again(self) -> None:
        if not self.closed:
            self.reactor.add_reader(self.listener.fileno(), self._accept)

    def _make_room(self) -> bool:
        """Whether a new connection may open: under the limit, or once the oldest
        connection still negotiating has been dropped for it."""
        open_ = [c for c in self.conns.values() if not c.closing]
        if len(open_) < self.max_connections:
            return True
        negotiating = [c for c in open_ if c.negotiating]
        if not negotiating:
            return False
        min(negotiating, key=lambda c: (c.opened, c.cid)).drop_negotiating()
        return True

    def statistics(self) -> NbdServerStatistics:
        ds = self.disks.values()
        conns = self.conns.values()
        return NbdServerStatistics(
            len(self.conns), self.accepted, self.dropped,
            sum(d.requests for d in ds),
            self.refused + sum(c.proto.errors for c in conns),
            sum(d.bytes_read for d in ds), sum(d.bytes_written for d in ds),
            sum(d.errors for d in ds),
            self.empty + sum(c.proto.empty for c in conns),
            self.handshake_dropped, self.refused_connections,
            self.max_connections, self.handshake_timeout)

    def close(self) -> None:
        """Stop accepting, end every connection (requests in flight complete), stop
        the reactor. Runs the scheduler until the connections are gone."""
        if self.closed:
            return
        self.closed = True
        self.reactor.remove_reader(self.listener.fileno())
        with contextlib.suppress(OSError):
            self.listener.close()
        for c in list(self.conns.values()):
            c.close(broken=False)
        self.sched.run(until=lambda: len(self.conns) == 0)
        self.reactor.close()


def listen_unix(path: str) -> socket.socket:
    """A listening Unix socket at ``path`` (which must not exist)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(path)
        s.listen(LISTEN_BACKLOG)
    except OSError:
        s.close()
        raise
    return s


def listen_tcp(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(errno.EADDRNOTAVAIL, f"no address for {host}")
    family, _t, _p, _c, addr = infos[0]
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(addr)
        s.listen(LISTEN_BACKLOG)
    except OSError:
        s.close()
        raise
    return s


def remove_socket(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)

