"""The Unix socket server, in process and as ``python -m gntdma.xenstored``."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from xs_helpers import HDR, SockClient, T, daemon_process, errno_of, short_tmpdir, wait_for

from gntdma.xenstored import Xenstored, XsError
from gntdma.xenstored._socket import ServerError, XenstoredServer


@pytest.fixture
def sockdir() -> Iterator[str]:
    d = short_tmpdir()
    yield d
    shutil.rmtree(d)


@pytest.fixture
def served(sockdir: str) -> Iterator[tuple[Xenstored, XenstoredServer]]:
    """A daemon served from a background thread; checks for leaks at the end."""
    xsd = Xenstored()
    server = XenstoredServer(xsd, os.path.join(sockdir, "sock"))
    server.start()
    yield xsd, server
    server.close()
    assert not os.path.exists(server.path)
    stats = xsd.statistics()
    assert (stats.connections, stats.watches, stats.transactions) == (0, 0, 0)


def test_socket_lifecycle(sockdir: str) -> None:
    path = os.path.join(sockdir, "sock")
    xsd = Xenstored()
    with XenstoredServer(xsd, path) as server:
        assert Path(path).is_socket()
        with pytest.raises(ServerError, match="already listening"):
            XenstoredServer(xsd, path)
        server.start()
        with SockClient(path) as c:
            c.write("/x", b"1")
            assert c.read("/x") == b"1"
    assert not os.path.exists(path)
    assert xsd.statistics().connections == 0


def test_stale_socket_is_replaced_other_files_are_not(sockdir: str) -> None:
    path = os.path.join(sockdir, "sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # a socket file nobody listens on
    with XenstoredServer(Xenstored(), path) as server:
        server.start()
        with SockClient(path) as c:
            assert c.ls("/") == ["tool"]
    regular = os.path.join(sockdir, "file")
    Path(regular).write_text("keep me")
    with pytest.raises(ServerError, match="not a socket"):
        XenstoredServer(Xenstored(), regular)
    assert Path(regular).read_text() == "keep me"
    with pytest.raises(ServerError, match="too long"):
        XenstoredServer(Xenstored(), os.path.join(sockdir, "x" * 120))


def test_many_clients(served: tuple[Xenstored, XenstoredServer]) -> None:
    xsd, server = served
    clients = [SockClient(server.path) for _ in range(20)]
    try:
        for i, c in enumerate(clients):
            c.write(f"/many/{i}", b"%d" % i)
        for i, c in enumerate(clients):
            assert c.read(f"/many/{(i + 1) % 20}") == b"%d" % ((i + 1) % 20)
        wait_for(lambda: server.clients == 20)
        assert xsd.statistics().connections == 20
    finally:
        for c in clients:
            c.close()
    wait_for(lambda: xsd.statistics().connections == 0)


def test_concurrent_clients_from_threads(served: tuple[Xenstored, XenstoredServer]) -> None:
    xsd, server = served
    failures: list[BaseException] = []
    retries: list[int] = []

    def work(n: int) -> None:
        try:
            with SockClient(server.path) as c:
                for i in range(50):
                    while True:  # as clients do: redo the transaction on EAGAIN
                        tx = c.start()
                        c.write(f"/conc/{n}/{i}", b"v", tx)
                        c.write("/conc/counter", b"%d" % n, tx)
                        try:
                            c.end(tx)
                        except XsError as e:
                            assert e.errno == errno.EAGAIN
                            retries.append(n)
                            continue
                        break
        except BaseException as e:  # pragma: no cover - reported below
            failures.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert all(len(xsd.directory(f"/conc/{n}")) == 50 for n in range(8))
    assert xsd.read("/conc/counter") in {b"%d" % n for n in range(8)}
    wait_for(lambda: xsd.statistics().connections == 0)


def test_watch_events_arrive_asynchronously(served: tuple[Xenstored, XenstoredServer]) -> None:
    xsd, server = served
    with SockClient(server.path) as w, SockClient(server.path) as other:
        w.watch("/async", "tok")
        assert w.wait_event() == ("/async", "tok")
        other.write("/async/a", b"1")  # from another socket client
        assert w.wait_event() == ("/async/a", "tok")
        xsd.write("/async/b", b"2")  # from the toolstack, in this thread
        assert w.wait_event() == ("/async/b", "tok")
        t = threading.Thread(target=xsd.rm, args=("/async",))
        t.start()
        t.join()
        assert w.wait_event() == ("/async", "tok")
        w.unwatch("/async", "tok")


def test_oversize_message_drops_only_that_client(
    served: tuple[Xenstored, XenstoredServer],
) -> None:
    xsd, server = served
    with SockClient(server.path) as bad, SockClient(server.path) as good:
        tx = bad.start()
        bad.write("/bad", b"1", tx)
        bad.watch("/w", "t")
        bad.sock.sendall(HDR.pack(T.XS_WRITE, 9, 0, 4097) + b"x" * 64)
        assert bad.is_closed_by_peer()
        wait_for(lambda: xsd.statistics().connections == 1)
        assert xsd.statistics().transactions == 0 and xsd.statistics().watches == 0
        good.write("/good", b"1")
        assert errno_of(good.read, "/bad") == errno.ENOENT


def test_garbage_and_unknown_types_get_errors(
    served: tuple[Xenstored, XenstoredServer],
) -> None:
    _, server = served
    with SockClient(server.path) as c:
        assert errno_of(c.call, 42, b"whatever") == errno.ENOSYS
        assert errno_of(c.call, T.XS_READ, b"/no\0nul\0") == errno.EINVAL
        assert errno_of(c.read, "/bad path") == errno.EINVAL
        assert errno_of(c.read, "/" + "p" * 3000) == errno.EINVAL
        assert c.read("/tool") == b""


def test_disconnect_mid_transaction(served: tuple[Xenstored, XenstoredServer]) -> None:
    xsd, server = served
    c = SockClient(server.path)
    tx = c.start()
    c.write("/mid/x", b"1", tx)
    c.watch("/mid", "t")
    wait_for(lambda: xsd.statistics().transactions == 1)
    c.close()
    wait_for(lambda: xsd.statistics().connections == 0)
    assert xsd.statistics().transactions == 0 and xsd.statistics().watches == 0
    assert not xsd.exists("/mid")
    # Half a message, then EOF: nothing happens.
    half = SockClient(server.path)
    half.sock.sendall(HDR.pack(T.XS_WRITE, 1, 0, 10) + b"/half")
    half.close()
    wait_for(lambda: xsd.statistics().connections == 0)
    assert not xsd.exists("/half")


def test_client_that_does_not_read(served: tuple[Xenstored, XenstoredServer]) -> None:
    """A client flooding requests without reading replies does not stall others."""
    xsd, server = served
    flood = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    flood.connect(server.path)
    flood.setblocking(False)
    msg = HDR.pack(T.XS_DIRECTORY, 0, 0, 6) + b"/tool\0"
    sent = 0
    try:
        while sent < 4 << 20:
            sent += flood.send(msg * 256)
    except BlockingIOError:
        pass
    with SockClient(server.path) as c:
        c.write("/alive", b"yes")
        assert c.read("/alive") == b"yes"
    flood.close()
    wait_for(lambda: xsd.statistics().connections == 0)


def test_serve_forever_in_calling_thread(sockdir: str) -> None:
    xsd = Xenstored()
    server = XenstoredServer(xsd, os.path.join(sockdir, "sock"))
    t = threading.Thread(target=server.serve_forever)
    t.start()
    with SockClient(server.path) as c:
        c.write("/fg", b"1")
    server.close()
    t.join(10)
    assert not t.is_alive()
    assert not os.path.exists(server.path)


def test_core_close_disconnects_socket_clients(
    served: tuple[Xenstored, XenstoredServer],
) -> None:
    xsd, server = served
    with SockClient(server.path) as c:
        c.write("/x", b"1")
        xsd.close()  # from this thread, while the loop runs in its own
        assert c.is_closed_by_peer()
    wait_for(lambda: server.clients == 0)


# The daemon as a process.


def test_module_entry_point_runs_and_cleans_up() -> None:
    with daemon_process() as path, SockClient(path) as c:
        c.write("/proc", b"1")
        assert c.read("/proc") == b"1"
    # daemon_process checked exit status 0 after SIGTERM and that the socket is gone


def test_sigint_stops_the_daemon() -> None:
    d = short_tmpdir()
    path = os.path.join(d, "sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gntdma.xenstored", "--socket", path],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == path
        with SockClient(path) as c:
            c.watch("/", "t")
            proc.send_signal(signal.SIGINT)
            assert c.is_closed_by_peer()
        assert proc.wait(10) == 0
        assert not os.path.exists(path)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        shutil.rmtree(d)


CLI_DRIVER = """
import argparse, sys
from gntdma import cli_xenstored
parser = argparse.ArgumentParser(prog="gntdma")
sub = parser.add_subparsers(dest="command", required=True)
cli_xenstored.add_parser(sub)
sys.exit(cli_xenstored.run(parser.parse_args(["xenstored", *sys.argv[1:]])))
"""


def test_cli_subcommand_runs_the_daemon() -> None:
    with daemon_process([sys.executable, "-c", CLI_DRIVER]) as path, SockClient(path) as c:
        assert c.ls("/") == ["tool"]


def test_missing_socket_argument_is_an_error() -> None:
    env = {k: v for k, v in os.environ.items() if k != "XENSTORED_PATH"}
    proc = subprocess.run(
        [sys.executable, "-m", "gntdma.xenstored"], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "--socket" in proc.stderr
