"""The xs_wire codec: constants against the Xen header, golden bytes, the decoder."""

from __future__ import annotations

import errno
import shutil
import subprocess
from pathlib import Path

import pytest
from xs_helpers import HDR, Client, T, raw, z

from gntdma.abi.xs_wire import (
    XENSTORE_ABS_PATH_MAX,
    XENSTORE_PAYLOAD_MAX,
    XENSTORE_REL_PATH_MAX,
    XS_TYPE_COUNT,
    XSD_ERRORS,
    XsdSockmsg,
    XsdType,
    errno_from_name,
    errno_name,
)
from gntdma.xenstored import (
    Message,
    MessageReader,
    Xenstored,
    XsProtocolError,
)

HEADER = Path("/usr/include/xen/io/xs_wire.h")

PROBE = r"""
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <xen/io/xs_wire.h>
#define V(x) printf("%s %ld\n", #x, (long)(x))
int main(void) {
    unsigned i;
    V(XS_CONTROL); V(XS_DEBUG); V(XS_DIRECTORY); V(XS_READ); V(XS_GET_PERMS);
    V(XS_WATCH); V(XS_UNWATCH); V(XS_TRANSACTION_START); V(XS_TRANSACTION_END);
    V(XS_INTRODUCE); V(XS_RELEASE); V(XS_GET_DOMAIN_PATH); V(XS_WRITE); V(XS_MKDIR);
    V(XS_RM); V(XS_SET_PERMS); V(XS_WATCH_EVENT); V(XS_ERROR);
    V(XS_IS_DOMAIN_INTRODUCED); V(XS_RESUME); V(XS_SET_TARGET); V(XS_RESET_WATCHES);
    V(XS_DIRECTORY_PART); V(XS_INVALID); V(XS_TYPE_COUNT);
    V(XENSTORE_PAYLOAD_MAX); V(XENSTORE_ABS_PATH_MAX); V(XENSTORE_REL_PATH_MAX);
    V(sizeof(struct xsd_sockmsg)); V(offsetof(struct xsd_sockmsg, type));
    V(offsetof(struct xsd_sockmsg, req_id)); V(offsetof(struct xsd_sockmsg, tx_id));
    V(offsetof(struct xsd_sockmsg, len));
    for (i = 0; i < sizeof(xsd_errors) / sizeof(xsd_errors[0]); i++)
        printf("ERR %d %s\n", xsd_errors[i].errnum, xsd_errors[i].errstring);
    return 0;
}
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Output of a C program built against Debian's xs_wire.h (libxen-dev)."""
    assert HEADER.exists(), "libxen-dev is not installed (make test installs it)"
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc is not None, "no C compiler (make test installs gcc)"
    d = tmp_path_factory.mktemp("probe")
    (d / "probe.c").write_text(PROBE)
    subprocess.run([cc, "-o", str(d / "probe"), str(d / "probe.c")], check=True)
    out = subprocess.run([str(d / "probe")], check=True, capture_output=True, text=True)
    return out.stdout.splitlines()


def test_types_and_constants_match_the_header(probe: list[str]) -> None:
    values = dict(line.rsplit(" ", 1) for line in probe if not line.startswith("ERR "))
    ours = {m.name: m.value for m in XsdType}
    ours["XS_DEBUG"] = XsdType.XS_DEBUG.value
    for name, value in values.items():
        if name.startswith("XS_") and name != "XS_TYPE_COUNT":
            assert ours[name] == int(value), name
    assert set(ours) <= set(values)
    assert XS_TYPE_COUNT == int(values["XS_TYPE_COUNT"])
    assert XENSTORE_PAYLOAD_MAX == int(values["XENSTORE_PAYLOAD_MAX"])
    assert XENSTORE_ABS_PATH_MAX == int(values["XENSTORE_ABS_PATH_MAX"])
    assert XENSTORE_REL_PATH_MAX == int(values["XENSTORE_REL_PATH_MAX"])
    assert XsdSockmsg.SIZE == int(values["sizeof(struct xsd_sockmsg)"])
    offsets = [
        int(values[f"offsetof(struct xsd_sockmsg, {f})"])
        for f in ("type", "req_id", "tx_id", "len")
    ]
    assert offsets == [0, 4, 8, 12]


def test_error_table_matches_the_header(probe: list[str]) -> None:
    table = [(int(n), s) for _, n, s in (line.split() for line in probe if line.startswith("ERR "))]
    assert list(XSD_ERRORS) == table
    assert errno_name(errno.EAGAIN) == "EAGAIN"
    assert errno_name(errno.EXDEV) == "EINVAL"  # not in the table
    assert errno_from_name("EPERM") == errno.EPERM
    assert errno_from_name("EWHATEVER") == errno.EINVAL


def test_header_golden_bytes() -> None:
    msg = Message(T.XS_READ, 0x01020304, 5, b"/a\0")
    assert msg.encode() == bytes.fromhex("02000000040302010500000003000000") + b"/a\0"
    assert XsdSockmsg.unpack(msg.encode()[:16]) == XsdSockmsg(2, 0x01020304, 5, 3)
    assert msg.strings() == [b"/a"]
    with pytest.raises(ValueError):
        Message(T.XS_READ, 1 << 32, 0, b"")


def test_encoder_refuses_oversize_payload() -> None:
    Message(T.XS_WRITE, 0, 0, b"x" * XENSTORE_PAYLOAD_MAX).encode()
    with pytest.raises(XsProtocolError):
        Message(T.XS_WRITE, 0, 0, b"x" * (XENSTORE_PAYLOAD_MAX + 1)).encode()


def test_reader_is_incremental() -> None:
    stream = (
        raw(T.XS_READ, b"/a\0", 1) + raw(T.XS_WRITE, b"/b\0v", 2, 9) + raw(T.XS_DIRECTORY, b"", 3)
    )
    r = MessageReader()
    got: list[Message] = []
    for i in range(len(stream)):
        got += r.feed(stream[i : i + 1])
    assert got == [
        Message(T.XS_READ, 1, 0, b"/a\0"),
        Message(T.XS_WRITE, 2, 9, b"/b\0v"),
        Message(T.XS_DIRECTORY, 3, 0, b""),
    ]
    assert r.buffered == 0
    assert MessageReader().feed(stream) == got
    assert MessageReader().feed(stream + stream[:5]) == got


def test_reader_rejects_oversize_payload_for_good() -> None:
    r = MessageReader()
    assert r.feed(raw(T.XS_WRITE, b"x" * XENSTORE_PAYLOAD_MAX)) != []
    with pytest.raises(XsProtocolError):
        r.feed(HDR.pack(T.XS_WRITE, 0, 0, XENSTORE_PAYLOAD_MAX + 1))
    with pytest.raises(XsProtocolError):
        r.feed(b"")
    # Messages before the bad header still come out of next_message().
    r = MessageReader()
    r.receive(raw(T.XS_READ, b"/a\0", 1) + HDR.pack(T.XS_READ, 2, 0, 1 << 31))
    assert r.next_message() == Message(T.XS_READ, 1, 0, b"/a\0")
    with pytest.raises(XsProtocolError):
        r.next_message()


# Golden exchanges: one request per message type, the exact reply bytes.
# (type, request payload, tx, reply type, reply payload); run in order on one daemon.
GOLDEN: list[tuple[int, bytes, int, int, bytes]] = [
    (T.XS_WRITE, b"/a/b\0hello", 0, T.XS_WRITE, b"OK\0"),
    (T.XS_READ, b"/a/b\0", 0, T.XS_READ, b"hello"),
    (T.XS_MKDIR, b"/a/c\0", 0, T.XS_MKDIR, b"OK\0"),
    (T.XS_DIRECTORY, b"/a\0", 0, T.XS_DIRECTORY, b"b\0c\0"),
    (T.XS_DIRECTORY, b"/a/c\0", 0, T.XS_DIRECTORY, b""),
    (T.XS_GET_PERMS, b"/a\0", 0, T.XS_GET_PERMS, b"n0\0"),
    (T.XS_SET_PERMS, b"/a/b\0n0\0r5\0b7\0", 0, T.XS_SET_PERMS, b"OK\0"),
    (T.XS_GET_PERMS, b"/a/b\0", 0, T.XS_GET_PERMS, b"n0\0r5\0b7\0"),
    (T.XS_RM, b"/a/c\0", 0, T.XS_RM, b"OK\0"),
    (T.XS_RM, b"/a/c\0", 0, T.XS_RM, b"OK\0"),
    (T.XS_RM, b"/nope/c\0", 0, T.XS_ERROR, b"ENOENT\0"),
    (T.XS_READ, b"/a/c\0", 0, T.XS_ERROR, b"ENOENT\0"),
    (T.XS_TRANSACTION_START, b"\0", 0, T.XS_TRANSACTION_START, b"1\0"),
    (T.XS_WRITE, b"/a/t\0x", 1, T.XS_WRITE, b"OK\0"),
    (T.XS_TRANSACTION_END, b"T\0", 1, T.XS_TRANSACTION_END, b"OK\0"),
    (T.XS_TRANSACTION_END, b"T\0", 1, T.XS_ERROR, b"ENOENT\0"),
    (T.XS_TRANSACTION_START, b"\0", 0, T.XS_TRANSACTION_START, b"2\0"),
    (T.XS_TRANSACTION_END, b"F\0", 2, T.XS_TRANSACTION_END, b"OK\0"),
    (T.XS_GET_DOMAIN_PATH, b"7\0", 0, T.XS_GET_DOMAIN_PATH, b"/local/domain/7\0"),
    (T.XS_IS_DOMAIN_INTRODUCED, b"7\0", 0, T.XS_IS_DOMAIN_INTRODUCED, b"F\0"),
    (T.XS_INTRODUCE, z("7", "1234", "3"), 0, T.XS_INTRODUCE, b"OK\0"),
    (T.XS_IS_DOMAIN_INTRODUCED, b"7\0", 0, T.XS_IS_DOMAIN_INTRODUCED, b"T\0"),
    (T.XS_INTRODUCE, z("8", "1", "4"), 0, T.XS_INTRODUCE, b"OK\0"),
    (T.XS_SET_TARGET, z("8", "7"), 0, T.XS_SET_TARGET, b"OK\0"),
    (T.XS_RESUME, b"7\0", 0, T.XS_RESUME, b"OK\0"),
    (T.XS_RELEASE, b"7\0", 0, T.XS_RELEASE, b"OK\0"),
    (T.XS_RELEASE, b"7\0", 0, T.XS_ERROR, b"ENOENT\0"),
    (T.XS_RELEASE, b"8\0", 0, T.XS_RELEASE, b"OK\0"),
    (T.XS_DIRECTORY_PART, z("/a", "0"), 0, T.XS_DIRECTORY_PART, b"%d\0b\0t\0\0"),
    (T.XS_DIRECTORY_PART, z("/a", "2"), 0, T.XS_DIRECTORY_PART, b"%d\0t\0\0"),
    (T.XS_DIRECTORY_PART, z("/a", "4"), 0, T.XS_DIRECTORY_PART, b"%d\0\0"),
    (T.XS_CONTROL, b"check\0", 0, T.XS_CONTROL, b"OK\0"),
    (T.XS_CONTROL, b"nonsense\0", 0, T.XS_ERROR, b"EINVAL\0"),
    (T.XS_RESET_WATCHES, b"\0", 0, T.XS_RESET_WATCHES, b"OK\0"),
    (T.XS_UNWATCH, b"/a\0tok\0", 0, T.XS_ERROR, b"ENOENT\0"),
    (T.XS_WATCH_EVENT, b"/a\0tok\0", 0, T.XS_ERROR, b"ENOSYS\0"),
    (T.XS_ERROR, b"EINVAL\0", 0, T.XS_ERROR, b"ENOSYS\0"),
    (20, b"", 0, T.XS_ERROR, b"ENOSYS\0"),  # XS_RESTRICT, removed
    (23, b"", 0, T.XS_ERROR, b"ENOSYS\0"),
    (T.XS_INVALID, b"", 0, T.XS_ERROR, b"ENOSYS\0"),
]


def test_golden_exchanges() -> None:
    xsd = Xenstored()
    c = Client(xsd)
    for i, (type_, payload, tx, rtype, rpayload) in enumerate(GOLDEN):
        if b"%d" in rpayload:
            gen = xsd.store.nodes["/a"].generation
            rpayload = rpayload.replace(b"%d", str(gen).encode())
        req_id = 0x1000 + i
        c.conn.feed(raw(type_, payload, req_id, tx))
        out = c.conn.data_to_send()
        assert out == raw(rtype, rpayload, req_id, tx), (i, XsdType(type_).name, out)


def test_watch_golden_bytes() -> None:
    xsd = Xenstored()
    c = Client(xsd)
    c.conn.feed(raw(T.XS_WATCH, b"/w\0tok\0", 77, 123))  # tx_id of a WATCH is ignored
    assert c.conn.data_to_send() == raw(T.XS_WATCH, b"OK\0", 77, 123) + raw(
        T.XS_WATCH_EVENT, b"/w\0tok\0"
    )
    c.conn.feed(raw(T.XS_WRITE, b"/w/x\0v", 78))
    assert c.conn.data_to_send() == raw(T.XS_WATCH_EVENT, b"/w/x\0tok\0") + raw(
        T.XS_WRITE, b"OK\0", 78
    )
    c.conn.feed(raw(T.XS_UNWATCH, b"/w\0tok\0", 79, 5))
    assert c.conn.data_to_send() == raw(T.XS_UNWATCH, b"OK\0", 79, 5)


def test_req_id_is_echoed_verbatim() -> None:
    c = Client(Xenstored())
    for req_id in (0, 1, 0x7FFFFFFF, 0xFFFFFFFF):
        c.conn.feed(raw(T.XS_READ, b"/tool\0", req_id))
        assert c.conn.data_to_send() == raw(T.XS_READ, b"", req_id)
        c.conn.feed(raw(T.XS_READ, b"/none\0", req_id))
        assert c.conn.data_to_send() == raw(T.XS_ERROR, b"ENOENT\0", req_id)


def test_partial_output_and_many_requests_in_one_chunk() -> None:
    c = Client(Xenstored())
    c.conn.feed(b"".join(raw(T.XS_GET_DOMAIN_PATH, b"%d\0" % i, i) for i in range(10)))
    out = b""
    while c.conn.has_output:
        out += c.conn.data_to_send(7)
    msgs = MessageReader().feed(out)
    assert [(m.req_id, m.payload) for m in msgs] == [
        (i, b"/local/domain/%d\0" % i) for i in range(10)
    ]
