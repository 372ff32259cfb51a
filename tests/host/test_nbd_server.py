"""The NBD socket layer's limits: idle or slow clients cannot lock the others out
(a handshake timeout, a connection limit where a newcomer replaces the oldest
connection still negotiating, refused connections counted), and the listening
socket queues a burst of clients. No disk I/O here: the exports are never read."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from gntdma.host.nbd import LISTEN_BACKLOG, NbdDisk, NbdServer, listen_unix
from gntdma.host.nbd_proto import IHAVEOPT, NbdExport, NbdOpt
from gntdma.sched import Scheduler

_GREETING = 18


def _server(sched: Scheduler, path: Path, **kw: Any) -> NbdServer:
    disk = NbdDisk(NbdExport("g/xvda", 1 << 20), cast(Any, None))
    return NbdServer(sched, [disk], listen_unix(str(path)), **kw)


def _run(sched: Scheduler, cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Run the scheduler until ``cond()`` or ``timeout`` seconds: whether it held."""
    deadline = time.monotonic() + timeout
    ticking = [True]

    def tick() -> None:  # keeps the hub waking up to look at the deadline
        if ticking[0]:
            sched.call_later(0.02, tick)

    sched.call_later(0.02, tick)
    try:
        sched.run(until=lambda: cond() or time.monotonic() > deadline)
    finally:
        ticking[0] = False
    return cond()


def _client(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    s.connect(str(path))
    return s


def _read_all(s: socket.socket) -> tuple[bytes, bool]:
    """What the server sent so far, and whether it closed the connection."""
    out = b""
    while True:
        try:
            piece = s.recv(65536)
        except BlockingIOError:
            return out, False
        except ConnectionResetError:
            return out, True
        if piece == b"":
            return out, True
        out += piece


def _go(s: socket.socket, export: bytes = b"g/xvda") -> None:
    body = struct.pack(">I", len(export)) + export + struct.pack(">H", 0)
    s.sendall(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, NbdOpt.GO, len(body)) + body)


@pytest.fixture
def path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "nbd.sock"


def test_a_connection_still_negotiating_after_the_handshake_timeout_is_dropped(
        sched: Scheduler, path: Path) -> None:
    server = _server(sched, path, handshake_timeout=0.3)
    clients: list[socket.socket] = []
    try:
        idle = _client(path)  # connects, never says anything
        clients.append(idle)
        served = _client(path)  # negotiates, then idles in transmission
        clients.append(served)
        _go(served)
        t0 = time.monotonic()
        assert _run(sched, lambda: server.statistics().handshake_dropped == 1
                    and server.statistics().connections == 1)
        assert time.monotonic() - t0 < 3.0
        got, closed = _read_all(idle)
        assert len(got) == _GREETING and closed
        # a client in transmission may idle as long as it likes
        assert not _run(sched, lambda: server.statistics().handshake_dropped > 1, 0.8)
        got, closed = _read_all(served)
        assert not closed
        st = server.statistics()
        assert (st.connections, st.dropped, st.handshake_timeout) == (1, 0, 0.3)
    finally:
        for c in clients:
            c.close()
        server.close()


def test_at_the_connection_limit_a_new_client_replaces_the_oldest_one_negotiating(
        sched: Scheduler, path: Path) -> None:
    server = _server(sched, path, max_connections=2, handshake_timeout=0)
    clients: list[socket.socket] = []
    try:
        oldest, younger = _client(path), _client(path)
        clients += [oldest, younger]
        assert _run(sched, lambda: server.statistics().accepted == 2)
        newcomer = _client(path)
        clients.append(newcomer)
        assert _run(sched, lambda: server.statistics().accepted == 3)
        assert _run(sched, lambda: _read_all(oldest)[1] or False, 2.0)
        _go(younger)
        _go(newcomer)
        assert _run(sched, lambda: all(c.proto.export is not None
                                       for c in server.conns.values() if not c.closing))
        st = server.statistics()
        assert (st.handshake_dropped, st.refused_connections, st.max_connections) == (1, 0, 2)
    finally:
        for c in clients:
            c.close()
        server.close()


def test_at_the_connection_limit_with_every_connection_serving_a_new_client_is_refused(
        sched: Scheduler, path: Path) -> None:
    server = _server(sched, path, max_connections=2, handshake_timeout=0)
    clients: list[socket.socket] = []
    try:
        for _ in range(2):
            clients.append(_client(path))
            _go(clients[-1])
        assert _run(sched, lambda: sum(c.proto.export is not None
                                       for c in server.conns.values()) == 2)
        refused = _client(path)
        clients.append(refused)
        assert _run(sched, lambda: server.statistics().refused_connections == 1)
        # closed at once, before the greeting: the client reads end of file
        assert _read_all(refused) == (b"", True)
        st = server.statistics()
        assert (st.accepted, st.connections, st.dropped, st.handshake_dropped) == (2, 2, 0, 0)
        for c in clients[:2]:
            assert not _read_all(c)[1]
    finally:
        for c in clients:
            c.close()
        server.close()


def test_listen_backlog_queues_a_burst_of_clients(tmp_path: Path) -> None:
    # listen(2): connections beyond the backlog are refused (EAGAIN for a
    # non-blocking Unix socket); a burst of 200 clients must all be queued
    assert LISTEN_BACKLOG >= 512
    listener = listen_unix(str(tmp_path / "nbd.sock"))
    clients: list[socket.socket] = []
    try:
        for _ in range(200):
            clients.append(_client(tmp_path / "nbd.sock"))
    finally:
        for c in clients:
            c.close()
        listener.close()
