"""``gntdma serve`` against hostile and careless clients: fuzzed handshakes and
requests (Hypothesis), a client that never reads its replies, many connections.
The server answers errors or drops that connection only; the host keeps serving
the others; nothing leaks (the report's teardown checks)."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.toolstack.serve_helpers import Served, serving, starved_config

from gntdma.host.nbd_proto import (
    IHAVEOPT,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NbdCmd,
    NbdError,
    NbdOpt,
)

pytestmark = [pytest.mark.slow]


def _recv(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        piece = s.recv(n - len(out))
        if not piece:
            raise ConnectionError("closed")
        out += piece
    return out


def _connect(path: Path, export: str = "starved/xvda") -> socket.socket:
    """A fixed newstyle client after NBD_OPT_GO, with simple replies."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(str(path))
    _recv(s, 18)
    name = export.encode()
    s.sendall(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, NbdOpt.GO, 6 + len(name))
              + struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
    while True:
        _m, _o, rep, n = struct.unpack(">QIII", _recv(s, 20))
        _recv(s, n)
        if rep == 1:
            return s
        assert rep < 1 << 31, f"GO refused: {rep:#x}"


def _req(cmd: int, offset: int, length: int, cookie: int, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def _roundtrip(path: Path, data: bytes, offset: int = 0) -> None:
    """A well-behaved client writes and reads back ``data``."""
    with _connect(path) as s:
        s.sendall(_req(NbdCmd.WRITE, offset, len(data), 1) + data)
        magic, err, cookie = struct.unpack(">IIQ", _recv(s, 16))
        assert (magic, err, cookie) == (NBD_SIMPLE_REPLY_MAGIC, 0, 1)
        s.sendall(_req(NbdCmd.READ, offset, len(data), 2))
        magic, err, cookie = struct.unpack(">IIQ", _recv(s, 16))
        assert (err, cookie) == (0, 2)
        assert _recv(s, len(data)) == data
        s.sendall(_req(NbdCmd.DISC, 0, 0, 3))


def _clean(s: Served) -> dict:
    report = s.stop()
    assert s.status == 0, s.stderr
    assert report["ok"], [c for c in report["checks"] if not c["ok"]]
    return report


def test_out_of_range_and_malformed_requests_get_nbd_errors_and_the_connection_goes_on(
        tmp_path: Path) -> None:
    # doc/proto.md "Error values": EINVAL for a read beyond the end or unaligned,
    # ENOSPC for a write beyond the end
    with serving(tmp_path, starved_config(tmp_path, size="8M")) as s:
        size = 8 << 20
        with _connect(s.socket) as c:
            c.sendall(_req(NbdCmd.READ, size, 512, 1) + _req(NbdCmd.READ, 3, 512, 2)
                      + _req(NbdCmd.WRITE, size - 512, 1024, 3) + bytes(1024)
                      + _req(77, 0, 0, 4))
            got = {}
            for _ in range(4):
                _m, err, cookie = struct.unpack(">IIQ", _recv(c, 16))
                got[cookie] = err
            assert got == {1: NbdError.EINVAL, 2: NbdError.EINVAL, 3: NbdError.ENOSPC,
                           4: NbdError.EINVAL}
        _roundtrip(s.socket, b"\x42" * 4096)
        _clean(s)


def test_a_client_that_never_reads_its_replies_does_not_stop_the_others(
        tmp_path: Path) -> None:
    # A full socket buffer must never block the scheduler thread (DESIGN 9): the
    # replies of the stuck client wait for the reactor's writer, the host goes on.
    with serving(tmp_path, starved_config(tmp_path, size="8M", frames=2)) as s:
        stuck = _connect(s.socket)
        stuck.setblocking(False)
        burst = b"".join(_req(NbdCmd.READ, 0, 1 << 20, i) for i in range(48))
        sent = 0
        try:
            while sent < len(burst):
                sent += stuck.send(burst[sent:])
        except BlockingIOError:
            pass
        for i in range(3):
            _roundtrip(s.socket, bytes([i]) * (64 << 10), offset=i << 20)
        stuck.close()
        report = _clean(s)
    assert report["nbd"]["accepted"] == 4


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_handshakes_and_requests_never_hurt_the_host(
        served: Served, data: st.DataObject) -> None:
    handshake = data.draw(st.one_of(
        st.binary(max_size=64),
        st.builds(lambda f, o, body: struct.pack(">I", f) + struct.pack(
            ">QII", IHAVEOPT, o, len(body)) + body,
            st.sampled_from([0, 1, 3, 4, 1 << 31]), st.integers(0, 12),
            st.binary(max_size=40)),
    ))
    go = data.draw(st.booleans())
    reqs = data.draw(st.lists(st.builds(
        _req, st.integers(0, 9), st.integers(0, (16 << 20)),
        st.sampled_from([0, 1, 511, 512, 4096, 1 << 20, 1 << 31]), st.integers(0, 99),
        st.integers(0, 0xFFFF)), max_size=6))
    tail = data.draw(st.binary(max_size=64))
    try:
        if go:
            c = _connect(served.socket)
        else:
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.settimeout(30)
            c.connect(str(served.socket))
            c.sendall(handshake)
        with c:
            for r in reqs:
                cmd, length = struct.unpack_from(">H", r, 6)[0], struct.unpack_from(">I", r, 24)[0]
                c.sendall(r + (bytes(min(length, 4096)) if cmd == NbdCmd.WRITE else b""))
            c.sendall(tail)
            c.shutdown(socket.SHUT_WR)
            c.settimeout(5)
            try:
                while c.recv(1 << 20):
                    pass
            except (TimeoutError, OSError):
                pass
    except (ConnectionError, BrokenPipeError):
        pass
    # whatever that client did, a well-behaved one is served
    _roundtrip(served.socket, data.draw(st.binary(min_size=512, max_size=512)))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("hostile")
    with serving(tmp, starved_config(tmp, size="16M")) as s:
        yield s
        _clean(s)
