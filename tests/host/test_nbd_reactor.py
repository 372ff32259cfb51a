"""The reactor's writers, which the NBD socket layer needs: a full socket buffer
never blocks the scheduler thread; the writer runs when there is room again."""

from __future__ import annotations

import socket
import threading

from gntdma.sched import Reactor, Scheduler, tsleep, wakeup


def _fill(s: socket.socket) -> int:
    n = 0
    while True:
        try:
            n += s.send(b"x" * 65536)
        except BlockingIOError:
            return n


def test_writer_runs_when_a_full_socket_has_room_again(sched: Scheduler) -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    reactor = Reactor(sched)
    chan = object()
    calls: list[int] = []
    try:
        queued = _fill(a)

        def writable() -> None:
            calls.append(a.send(b"y"))
            reactor.remove_writer(a.fileno())
            wakeup(chan)

        reactor.add_writer(a.fileno(), writable)

        def drain() -> None:
            left = queued
            while left > 0:
                left -= len(b.recv(1 << 20))

        threading.Timer(0.05, drain).start()
        assert sched.call(lambda: tsleep(chan, "wait", 10.0)) == 0
        assert calls == [1]
    finally:
        reactor.close()
        a.close()
        b.close()
    assert sched.statistics().external_sources == 0


def test_reader_and_writer_of_one_socket_are_armed_independently(sched: Scheduler) -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    reactor = Reactor(sched)
    chan = object()
    seen: list[str] = []
    try:
        def readable() -> None:
            seen.append("r:" + a.recv(10).decode())
            reactor.remove_reader(a.fileno())
            wakeup(chan)

        def writable() -> None:
            seen.append("w")
            reactor.remove_writer(a.fileno())
            wakeup(chan)

        reactor.add_reader(a.fileno(), readable)
        reactor.add_writer(a.fileno(), writable)
        threading.Timer(0.05, lambda: b.send(b"hi")).start()

        def wait_both() -> None:
            while len(seen) < 2:
                tsleep(chan, "wait", 5.0)

        sched.call(wait_both)
        assert sorted(seen) == ["r:hi", "w"]
    finally:
        reactor.close()
        a.close()
        b.close()
