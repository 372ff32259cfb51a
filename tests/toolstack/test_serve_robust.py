"""``gntdma serve`` stays responsive whatever a client sends: a request of length 0
is answered and serving goes on, no hostile request keeps SIGINT from ending the
server promptly, and idle clients cannot lock the others out (the handshake
timeout and the connection limit, with their figures in the report).
Protocol rules from NetworkBlockDevice/nbd doc/proto.md, named in each test."""

from __future__ import annotations

import json
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from tests.toolstack.serve_helpers import Served, serving, starved_config

from gntdma.host.nbd_proto import (
    IHAVEOPT,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
    NbdCmd,
    NbdCmdFlag,
    NbdOpt,
    NbdReplyType,
)

pytestmark = [pytest.mark.slow]

SIZE = 8 << 20


def _recv(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        piece = s.recv(n - len(out))
        if not piece:
            raise ConnectionError(f"closed after {len(out)} of {n} bytes")
        out += piece
    return out


def _req(cmd: int, offset: int, length: int, cookie: int, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def _connect(path: Path, structured: bool = False) -> socket.socket:
    """A fixed newstyle client after NBD_OPT_GO of the default export."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    _recv(s, 18)
    s.sendall(struct.pack(">I", 3))
    opts = [(NbdOpt.STRUCTURED_REPLY, b"")] if structured else []
    opts.append((NbdOpt.GO, struct.pack(">IH", 0, 0)))
    for opt, body in opts:
        s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(body)) + body)
        while True:
            _m, _o, rep, n = struct.unpack(">QIII", _recv(s, 20))
            _recv(s, n)
            assert rep < 1 << 31, f"option {opt} refused: {rep:#x}"
            if rep == 1:
                break
    return s


def _read_ok(s: socket.socket, cookie: int, structured: bool) -> None:
    """A read of 512 bytes at 0 succeeds on ``s``."""
    s.sendall(_req(NbdCmd.READ, 0, 512, cookie))
    if structured:
        magic, flags, typ, got, n = struct.unpack(">IHHQI", _recv(s, 20))
        assert (magic, flags, typ, got, n) == (NBD_STRUCTURED_REPLY_MAGIC, 1,
                                               NbdReplyType.OFFSET_DATA, cookie, 8 + 512)
        _recv(s, n)
    else:
        assert struct.unpack(">IIQ", _recv(s, 16)) == (NBD_SIMPLE_REPLY_MAGIC, 0, cookie)
        _recv(s, 512)


def _stop(s: Served, within: float) -> dict[str, Any]:
    """SIGINT, and the server must end within ``within`` seconds (else it is killed
    and the test fails): its JSON report."""
    t0 = time.monotonic()
    s.proc.send_signal(signal.SIGINT)
    try:
        s.status = s.proc.wait(timeout=within)
    except subprocess.TimeoutExpired:
        s.proc.kill()
        s.status = s.proc.wait()
        pytest.fail(f"serve still running {within} s after SIGINT")
    assert s.proc.stderr is not None
    s.stderr = s.proc.stderr.read()
    assert s.status == 0, s.stderr[-2000:]
    assert time.monotonic() - t0 < within
    report: dict[str, Any] = json.loads(s.report_path.read_text())
    assert report["ok"], [c for c in report["checks"] if not c["ok"]]
    return report


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_zero_length_read_is_answered_and_the_server_goes_on(tmp_path: Path,
                                                             structured: bool) -> None:
    # doc/proto.md "Request types", NBD_CMD_READ: "The client SHOULD NOT request a
    # read length of 0; the behavior of a server on such a request is unspecified
    # although the server SHOULD NOT disconnect." gntdma answers success with no
    # payload (structured: one NBD_REPLY_TYPE_NONE chunk with NBD_REPLY_FLAG_DONE),
    # also at offset = export size, and keeps serving every connection.
    with serving(tmp_path, starved_config(tmp_path, size="8M")) as s:
        c = _connect(s.socket, structured)
        c.sendall(_req(NbdCmd.READ, 0, 0, 9) + _req(NbdCmd.READ, SIZE, 0, 10))
        for cookie in (9, 10):
            if structured:
                assert struct.unpack(">IHHQI", _recv(c, 20)) == (
                    NBD_STRUCTURED_REPLY_MAGIC, 1, NbdReplyType.NONE, cookie, 0)
            else:
                assert struct.unpack(">IIQ", _recv(c, 16)) == (NBD_SIMPLE_REPLY_MAGIC, 0,
                                                                 cookie)
        _read_ok(c, 11, structured)  # the same connection goes on
        other = _connect(s.socket)  # and a new one is greeted and served
        _read_ok(other, 1, False)
        c.close()
        other.close()
        report = _stop(s, 20)
    assert report["nbd"]["empty_requests"] == 2


_HOSTILE: dict[str, tuple[bool, bytes]] = {
    # name: (after NBD_OPT_GO with structured replies, bytes sent)
    "zero-length read": (False, _req(NbdCmd.READ, 0, 0, 1)),
    "zero-length read at the end, structured": (True, _req(NbdCmd.READ, SIZE, 0, 1)),
    "zero-length write, trim and write-zeroes": (False, _req(NbdCmd.WRITE, 0, 0, 1)
                                                 + _req(NbdCmd.TRIM, 0, 0, 2)
                                                 + _req(NbdCmd.WRITE_ZEROES, 0, 0, 3)),
    "FUA on read and flush": (False, _req(NbdCmd.READ, 0, 512, 1, NbdCmdFlag.FUA)
                              + _req(NbdCmd.FLUSH, 0, 0, 2, NbdCmdFlag.FUA)),
    "unknown command and flags": (True, _req(99, 0, 512, 1) + _req(NbdCmd.READ, 0, 512, 2,
                                                                     0xFFFF)),
    "read beyond the end, huge length": (False, _req(NbdCmd.READ, 2**64 - 512, 2**32 - 1, 1)),
    "write header, payload never sent": (False, _req(NbdCmd.WRITE, 0, 1 << 20, 1)),
    "bad request magic": (False, b"\0" * 28),
    "handshake stalled after the greeting": (False, b""),
    "garbage handshake": (False, b"\xff" * 64),
}


@pytest.mark.parametrize("kind", list(_HOSTILE))
def test_sigint_ends_serve_promptly_after_each_hostile_request_kind(tmp_path: Path,
                                                                    kind: str) -> None:
    # DESIGN 11: SIGINT is serve's normal end, whatever a client did; a hostile
    # request must never leave a thread looping without a scheduling point
    structured, data = _HOSTILE[kind]
    with serving(tmp_path, starved_config(tmp_path, size="8M")) as s:
        if "handshake" in kind:
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(str(s.socket))
        else:
            c = _connect(s.socket, structured)
        if data:
            c.sendall(data)
        time.sleep(0.5)
        other = _connect(s.socket)  # the host still serves others meanwhile
        _read_ok(other, 1, False)
        _stop(s, 20)
        c.close()
        other.close()


def test_a_stalled_handshake_is_dropped_and_the_limit_refuses_cleanly(tmp_path: Path) -> None:
    # Idle clients cannot lock the others out: one stuck in negotiation is dropped
    # after --nbd-handshake-timeout; at --nbd-max-connections with every connection
    # serving, a newcomer is closed before the greeting and counted in the report
    with serving(tmp_path, starved_config(tmp_path, size="8M"),
                 extra=("--nbd-handshake-timeout", "0.5", "--nbd-max-connections", "2")) as s:
        idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        idle.settimeout(10)
        idle.connect(str(s.socket))
        t0 = time.monotonic()
        assert len(_recv(idle, 18)) == 18
        assert idle.recv(1) == b""  # dropped by the server
        assert time.monotonic() - t0 < 5
        a, b = _connect(s.socket), _connect(s.socket)
        time.sleep(1.0)  # longer than the handshake timeout: serving clients stay
        refused = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        refused.settimeout(10)
        refused.connect(str(s.socket))
        assert refused.recv(18) == b""
        _read_ok(a, 1, False)
        _read_ok(b, 2, False)
        for c in (idle, a, b, refused):
            c.close()
        report = _stop(s, 20)
    nbd = report["nbd"]
    assert (nbd["handshake_dropped"], nbd["refused_connections"]) == (1, 1)
    assert (nbd["max_connections"], nbd["handshake_timeout"]) == (2, 0.5)
    (check,) = [c for c in report["checks"] if c["name"] == "NBD: every connection closed"]
    assert "1 dropped while negotiating, 1 refused at the limit of 2" in check["detail"]


def test_many_idle_connections_do_not_lock_a_client_out(tmp_path: Path) -> None:
    # more idle sockets than the old fixed limit of 64: a client is still served
    with serving(tmp_path, starved_config(tmp_path, size="8M")) as s:
        idle = []
        for _ in range(100):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(str(s.socket))
            idle.append(c)
        t0 = time.monotonic()
        with _connect(s.socket) as c:
            _read_ok(c, 1, False)
        assert time.monotonic() - t0 < 10
        for c in idle:
            c.close()
        report = _stop(s, 20)
    assert report["nbd"]["refused_connections"] == 0
