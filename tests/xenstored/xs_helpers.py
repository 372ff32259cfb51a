"""Test clients for the xenstore daemon: in-process over a Connection, or over a socket."""

from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from gntdma.xenstored import (
    Connection,
    Message,
    MessageReader,
    Xenstored,
    XsdType,
    XsError,
    errno_from_name,
)

T = XsdType
HDR = struct.Struct("<IIII")  # the hosts we run on are little endian


def z(*parts: str) -> bytes:
    """NUL-terminated strings: z("a", "b") == b"a\\0b\\0"."""
    return b"".join(p.encode() + b"\0" for p in parts)


def raw(type_: int, payload: bytes, req_id: int = 0, tx_id: int = 0) -> bytes:
    """A message spelled out by hand (independent of the codec under test)."""
    return HDR.pack(type_, req_id, tx_id, len(payload)) + payload


class _Base:
    """Request/reply helpers shared by both clients; events are collected aside."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self._req = 0

    def _exchange(self, msg: Message) -> Message:
        raise NotImplementedError

    def request(self, type_: int, payload: bytes, tx_id: int = 0) -> Message:
        self._req += 1
        reply = self._exchange(Message(type_, self._req, tx_id, payload))
        assert reply.req_id == self._req
        assert reply.tx_id == tx_id
        return reply

    def call(self, type_: int, payload: bytes, tx_id: int = 0) -> bytes:
        """The reply payload; an XS_ERROR reply raises XsError."""
        reply = self.request(type_, payload, tx_id)
        if reply.type == T.XS_ERROR:
            assert reply.payload.endswith(b"\0")
            raise XsError(errno_from_name(reply.payload[:-1].decode()))
        assert reply.type == type_
        return reply.payload

    def _take_event(self, msg: Message) -> None:
        assert msg.req_id == 0 and msg.tx_id == 0
        parts = msg.payload.split(b"\0")
        assert len(parts) == 3 and parts[2] == b"", msg.payload
        self.events.append((parts[0].decode("latin-1"), parts[1].decode("latin-1")))

    def take_events(self) -> list[tuple[str, str]]:
        out, self.events = self.events, []
        return out

    # Operations.

    def read(self, path: str, tx: int = 0) -> bytes:
        return self.call(T.XS_READ, path.encode() + b"\0", tx)

    def write(self, path: str, value: bytes, tx: int = 0) -> None:
        assert self.call(T.XS_WRITE, path.encode() + b"\0" + value, tx) == b"OK\0"

    def mkdir(self, path: str, tx: int = 0) -> None:
        assert self.call(T.XS_MKDIR, path.encode() + b"\0", tx) == b"OK\0"

    def rm(self, path: str, tx: int = 0) -> None:
        assert self.call(T.XS_RM, path.encode() + b"\0", tx) == b"OK\0"

    def ls(self, path: str, tx: int = 0) -> list[str]:
        data = self.call(T.XS_DIRECTORY, path.encode() + b"\0", tx)
        return [] if not data else data[:-1].decode().split("\0")

    def get_perms(self, path: str, tx: int = 0) -> list[str]:
        return self.call(T.XS_GET_PERMS, path.encode() + b"\0", tx)[:-1].decode().split("\0")

    def set_perms(self, path: str, perms: list[str], tx: int = 0) -> None:
        payload = path.encode() + b"\0" + b"".join(p.encode() + b"\0" for p in perms)
        assert self.call(T.XS_SET_PERMS, payload, tx) == b"OK\0"

    def watch(self, path: str, token: str) -> None:
        assert self.call(T.XS_WATCH, path.encode() + b"\0" + token.encode() + b"\0") == b"OK\0"

    def unwatch(self, path: str, token: str) -> None:
        payload = path.encode() + b"\0" + token.encode() + b"\0"
        assert self.call(T.XS_UNWATCH, payload) == b"OK\0"

    def start(self) -> int:
        return int(self.call(T.XS_TRANSACTION_START, b"\0")[:-1])

    def end(self, tx: int, commit: bool = True) -> None:
        assert self.call(T.XS_TRANSACTION_END, b"T\0" if commit else b"F\0", tx) == b"OK\0"


class Client(_Base):
    """An in-process client on a fresh Connection of ``xsd``."""

    def __init__(self, xsd: Xenstored, domid: int = 0) -> None:
        super().__init__()
        self.conn: Connection = xsd.connect(domid)
        self.reader = MessageReader()

    def send_raw(self, data: bytes) -> list[Message]:
        """Feed bytes; return every non-event message that came back."""
        self.conn.feed(data)
        return self.pump()

    def pump(self) -> list[Message]:
        replies = []
        for msg in self.reader.feed(self.conn.data_to_send()):
            if msg.type == T.XS_WATCH_EVENT:
                self._take_event(msg)
            else:
                replies.append(msg)
        return replies

    def _exchange(self, msg: Message) -> Message:
        replies = self.send_raw(msg.encode())
        assert len(replies) == 1, replies
        return replies[0]


class SockClient(_Base):
    """A blocking client on a Unix socket."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.reader = MessageReader()
        self._queue: list[Message] = []

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> SockClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def recv_message(self) -> Message | None:
        """The next message (None on EOF)."""
        while not self._queue:
            data = self.sock.recv(65536)
            if not data:
                return None
            self._queue.extend(self.reader.feed(data))
        return self._queue.pop(0)

    def _exchange(self, msg: Message) -> Message:
        self.sock.sendall(msg.encode())
        while True:
            reply = self.recv_message()
            assert reply is not None, "connection closed"
            if reply.type != T.XS_WATCH_EVENT:
                return reply
            self._take_event(reply)

    def wait_event(self, timeout: float = 10.0) -> tuple[str, str]:
        deadline = time.monotonic() + timeout
        while not self.events:
            left = deadline - time.monotonic()
            assert left > 0, "no watch event"
            if not self._queue:
                ready, _, _ = select.select([self.sock], [], [], left)
                if not ready:
                    continue
            msg = self.recv_message()
            assert msg is not None, "connection closed"
            assert msg.type == T.XS_WATCH_EVENT, msg
            self._take_event(msg)
        return self.events.pop(0)

    def is_closed_by_peer(self, timeout: float = 10.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False


def errno_of(fn: Callable[..., object], *args: object, **kwargs: object) -> int:
    """The errno of the XsError ``fn(*args)`` raises (fails if it raises none)."""
    try:
        fn(*args, **kwargs)
    except XsError as e:
        return e.errno
    raise AssertionError(f"{fn.__name__}{args} did not fail")


def short_tmpdir() -> str:
    """A private directory with a path short enough for AF_UNIX."""
    return tempfile.mkdtemp(prefix="gntxs", dir="/tmp")


@contextmanager
def daemon_process(argv: list[str] | None = None) -> Iterator[str]:
    """Run the daemon as a subprocess; yield its socket path; stop it and clean up."""
    tmp = short_tmpdir()
    sock = os.path.join(tmp, "socket")
    cmd = argv if argv is not None else [sys.executable, "-m", "gntdma.xenstored"]
    proc = subprocess.Popen(
        [*cmd, "--socket", sock],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "daemon did not start"
        line = proc.stdout.readline().strip()
        assert line == sock, (line, proc.stderr.read() if proc.poll() is not None else "")
        assert Path(sock).is_socket()
        yield sock
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        stderr = proc.stderr.read() if proc.stderr is not None else ""
        if proc.stderr is not None:
            proc.stderr.close()
        leftover = os.path.exists(sock)
        if leftover:
            os.unlink(sock)
        os.rmdir(tmp)
        assert proc.returncode == 0, (proc.returncode, stderr)
        assert not leftover, "daemon left its socket behind"


def wait_for(predicate: object, timeout: float = 10.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


__all__ = [
    "HDR",
    "Client",
    "SockClient",
    "T",
    "daemon_process",
    "errno_of",
    "raw",
    "short_tmpdir",
    "wait_for",
    "z",
]
