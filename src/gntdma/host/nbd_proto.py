"""The NBD protocol, server side, sans-IO: bytes in, requests and bytes out.

One :class:`NbdServerConnection` per client connection. It speaks the fixed
newstyle handshake (``NBD_OPT_EXPORT_NAME``, ``ABORT``, ``LIST``, ``INFO``,
``GO``, ``STRUCTURED_REPLY``; anything else gets ``NBD_REP_ERR_UNSUP``) and
the transmission phase (``READ``, ``WRITE`` with ``FUA``, ``FLUSH``,
``TRIM``, ``WRITE_ZEROES``, ``DISC``), as the NBD protocol document
(NetworkBlockDevice/nbd ``doc/proto.md``) defines them. It never touches a
socket: the caller asks :meth:`~NbdServerConnection.recv_buffer` where the
next bytes go (a write's payload is received straight into its own buffer),
reports how many arrived with :meth:`~NbdServerConnection.received`, gets
back the requests that are ready to run, answers each with
:meth:`~NbdServerConnection.reply` in any order, and sends what
:meth:`~NbdServerConnection.take_output` hands out (a list of buffers, for
one ``sendmsg``).

Peer data is validated, never asserted on. A request the export cannot
honour (out of range, unaligned to the advertised minimum block, too large,
an unknown command or flag, a write to a read-only export) is answered with
the NBD error here and never reaches the caller; so is a request of length 0
(a success that moves no data: the caller never sees an empty read, write or
trim, and no reply buffer is ever empty). A breach of a mandatory
condition (a bad magic number, unknown client flags, an unknown export
after ``NBD_OPT_EXPORT_NAME``, an option too large to be anything but a
denial of service) ends the connection: :attr:`~NbdServerConnection.closed`
is set with the reason, and the caller drops it (a hard disconnect).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Final, final

__all__ = [
    "NbdCmd",
    "NbdCmdFlag",
    "NbdError",
    "NbdExport",
    "NbdInfo",
    "NbdOpt",
    "NbdRep",
    "NbdReplyType",
    "NbdRequest",
    "NbdServerConnection",
    "NbdTxFlag",
    "nbd_error_from_errno",
]

NBDMAGIC: Final = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT: Final = 0x49484156454F5054  # "IHAVEOPT"
NBD_REP_MAGIC: Final = 0x3E889045565A9
NBD_REQUEST_MAGIC: Final = 0x25609513
NBD_SIMPLE_REPLY_MAGIC: Final = 0x67446698
NBD_STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF

NBD_FLAG_FIXED_NEWSTYLE: Final = 1 << 0
NBD_FLAG_NO_ZEROES: Final = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE: Final = 1 << 0
NBD_FLAG_C_NO_ZEROES: Final = 1 << 1

NBD_REPLY_FLAG_DONE: Final = 1 << 0

#: Option data larger than this is taken as a denial of service (hard disconnect).
MAX_OPTION_LENGTH: Final = 64 << 10
#: The longest string the protocol allows (export names, messages).
MAX_STRING: Final = 4096


class NbdOpt(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10


class NbdRep(IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = (1 << 31) + 1
    ERR_POLICY = (1 << 31) + 2
    ERR_INVALID = (1 << 31) + 3
    ERR_PLATFORM = (1 << 31) + 4
    ERR_TLS_REQD = (1 << 31) + 5
    ERR_UNKNOWN = (1 << 31) + 6
    ERR_SHUTDOWN = (1 << 31) + 7
    ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
    ERR_TOO_BIG = (1 << 31) + 9


class NbdInfo(IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class NbdTxFlag(IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class NbdCmd(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class NbdCmdFlag(IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class NbdError(IntEnum):
    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class NbdReplyType(IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


def nbd_error_from_errno(error: int) -> NbdError:
    """The NBD error for a kernel errno ("Error values": EROFS is a write to a
    read-only export, EPERM; EDQUOT and EFBIG map to ENOSPC; the server should
    not return ENOTSUP, so an operation the disk refuses is EINVAL)."""
    import errno as e

    table = {0: NbdError.OK, e.EPERM: NbdError.EPERM, e.EROFS: NbdError.EPERM,
             e.ENOSPC: NbdError.ENOSPC, e.EDQUOT: NbdError.ENOSPC, e.EFBIG: NbdError.ENOSPC,
             e.EINVAL: NbdError.EINVAL, e.EOPNOTSUPP: NbdError.EINVAL,
             e.ENOMEM: NbdError.ENOMEM, e.ESHUTDOWN: NbdError.ESHUTDOWN}
    return table.get(error, NbdError.EIO)


_GREETING: Final = struct.Struct(">QQH")
_OPT_HDR: Final = struct.Struct(">QII")
_REP_HDR: Final = struct.Struct(">QIII")
_REQ: Final = struct.Struct(">IHHQQI")
_SIMPLE: Final = struct.Struct(">IIQ")
_CHUNK: Final = struct.Struct(">IHHQI")
_U32: Final = struct.Struct(">I")
_U16: Final = struct.Struct(">H")
_U64: Final = struct.Struct(">Q")
_INFO_EXPORT: Final = struct.Struct(">HQH")
_INFO_BLOCK: Final = struct.Struct(">HIII")
_ERROR_CHUNK: Final = struct.Struct(">IH")


@dataclass(frozen=True, slots=True)
class NbdExport:
    """What a connection may serve: a name, a size and what it supports."""

    name: str
    size: int
    readonly: bool = False
    flush: bool = False  #: FLUSH and FUA are durable (the disk has a flush)
    trim: bool = False  #: TRIM discards
    description: str = ""
    min_block: int = 512
    preferred_block: int = 4096
    max_payload: int = 32 << 20

    @property
    def tx_flags(self) -> NbdTxFlag:
        f = NbdTxFlag.HAS_FLAGS | NbdTxFlag.CAN_MULTI_CONN
        if self.readonly:
            f |= NbdTxFlag.READ_ONLY
        else:
            f |= NbdTxFlag.SEND_WRITE_ZEROES
            if self.trim:
                f |= NbdTxFlag.SEND_TRIM
        if self.flush:
            f |= NbdTxFlag.SEND_FLUSH | NbdTxFlag.SEND_FUA
        return f


@dataclass(frozen=True, slots=True)
class NbdRequest:
    """A valid request for the caller to run, then :meth:`NbdServerConnection.reply` to."""

    cookie: int
    cmd: NbdCmd
    flags: NbdCmdFlag
    offset: int
    length: int
    payload: bytearray | None = None  #: a write's data


#: The command flags each command may carry ("Command flags": FUA "is valid for
#: all commands, provided NBD_FLAG_SEND_FUA has been negotiated, in which case the
#: server MUST accept all commands with this bit set (even by ignoring the bit)").
_ALLOWED_FLAGS: Final = {
    NbdCmd.READ: NbdCmdFlag.FUA,
    NbdCmd.WRITE: NbdCmdFlag.FUA,
    NbdCmd.FLUSH: NbdCmdFlag.FUA,
    NbdCmd.TRIM: NbdCmdFlag.FUA,
    NbdCmd.WRITE_ZEROES: NbdCmdFlag.FUA | NbdCmdFlag.NO_HOLE,
    NbdCmd.DISC: NbdCmdFlag.FUA,
}

# Where the next bytes go.
_CLIENT_FLAGS, _OPT_HEADER, _OPT_DATA, _REQ_HEADER, _PAYLOAD, _SKIP, _CLOSED = range(7)


@final
class NbdServerConnection:
    """The server's side of one NBD connection (sans-IO)."""

    def __init__(self, exports: Sequence[NbdExport], default: str | None = None) -> None:
        self.exports = {e.name: e for e in exports}
        self.default = default if default is not None else (
            exports[0].name if exports else None)
        self.export: NbdExport | None = None  #: the export of the transmission phase
        self.structured = False
        self.no_zeroes = False
        self.closed = False
        self.close_reason = ""
        self.disconnect_requested = False  #: NBD_CMD_DISC or NBD_OPT_ABORT
        self.options = 0  #: options handled
        self.requests = 0  #: requests passed to the caller
        self.errors = 0  #: requests answered with an error here
        self.empty = 0  #: requests of length 0 answered with success here
        self._out: list[bytes | bytearray | memoryview] = []
        self._phase = _CLIENT_FLAGS
        self._buf = bytearray(_REQ.size)
        self._want = 4
        self._have = 0
        self._opt = 0
        self._pending: tuple[int, NbdCmd, NbdCmdFlag, int, int] | None = None
        self._skip_error = NbdError.OK
        self._out.append(_GREETING.pack(NBDMAGIC, IHAVEOPT,
                                        NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES))

    # -- input ---------------------------------------------------------------------

    def recv_buffer(self) -> memoryview:
        """Where the next bytes from the client go (never empty unless closed)."""
        if self.closed:
            return memoryview(bytearray(0))
        return memoryview(self._buf)[self._have:self._want]

    def received(self, n: int) -> list[NbdRequest]:
        """``n`` bytes were put into :meth:`recv_buffer`: the requests now ready."""
        if self.closed or n <= 0:
            return []
        self._have += n
        if self._have < self._want:
            return []
        self._have = 0
        return self._complete()

    def receive_data(self, data: bytes) -> list[NbdRequest]:
        """Feed ``data`` (copied through the receive buffers): the requests ready."""
        out: list[NbdRequest] = []
        view = memoryview(data)
        while len(view) > 0 and not self.closed:
            buf = self.recv_buffer()
            k = min(len(buf), len(view))
            buf[:k] = view[:k]
            view = view[k:]
            out += self.received(k)
        return out

    def _expect(self, phase: int, n: int, buf: bytearray | None = None) -> None:
        self._phase = phase
        self._want = n
        self._buf = buf if buf is not None else (
            self._buf if len(self._buf) >= n else bytearray(n))

    def _fail(self, why: str) -> None:
        self.closed = True
        self.close_reason = why
        self._phase = _CLOSED

    def _complete(self) -> list[NbdRequest]:
        phase = self._phase
        if phase == _CLIENT_FLAGS:
            (flags,) = _U32.unpack_from(self._buf)
            if flags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES):
                # "Newstyle negotiation": the server MUST close on unknown client flags
                self._fail(f"unknown client flags {flags:#x}")
                return []
            self.no_zeroes = flags & NBD_FLAG_C_NO_ZEROES != 0
            self._expect(_OPT_HEADER, _OPT_HDR.size)
        elif phase == _OPT_HEADER:
            magic, opt, length = _OPT_HDR.unpack_from(self._buf)
            if magic != IHAVEOPT:
                self._fail(f"bad option magic {magic:#x}")
            elif length > MAX_OPTION_LENGTH:
                self._fail(f"option {opt} of {length} bytes")
            else:
                self._opt = opt
                if length == 0:
                    self._option(b"")
                else:
                    self._expect(_OPT_DATA, length, bytearray(length))
        elif phase == _OPT_DATA:
            self._option(bytes(self._buf))
        elif phase == _REQ_HEADER:
            return self._request()
        elif phase == _PAYLOAD:
            assert self._pending is not None
            cookie, cmd, flags, offset, length = self._pending
            self._pending = None
            payload = self._buf
            self._expect(_REQ_HEADER, _REQ.size, bytearray(_REQ.size))
            self.requests += 1
            return [NbdRequest(cookie, cmd, flags, offset, length, payload)]
        elif phase == _SKIP:
            assert self._pending is not None
            cookie, _cmd, _flags, _offset, left = self._pending
            left -= self._want
            if left > 0:
                self._pending = (cookie, _cmd, _flags, _offset, left)
                self._expect(_SKIP, min(left, 1 << 20))
            else:
                self._pending = None
                self._error(cookie, self._skip_error, "request refused")
                self._expect(_REQ_HEADER, _REQ.size, bytearray(_REQ.size))
        return []

    # -- handshake -----------------------------------------------------------------

    def _rep(self, opt: int, rep: int, data: bytes = b"") -> None:
        self._out.append(_REP_HDR.pack(NBD_REP_MAGIC, opt, rep, len(data)) + data)

    def _option(self, data: bytes) -> None:
        opt = self._opt
        self.options += 1
        self._expect(_OPT_HEADER, _OPT_HDR.size, bytearray(_OPT_HDR.size))
        if opt == NbdOpt.EXPORT_NAME:
            ex = self._lookup(data)
            if ex is None:
                # "Newstyle negotiation": unwilling to allow the export, the server
                # MUST terminate the session
                self._fail(f"NBD_OPT_EXPORT_NAME of an unknown export {data[:64]!r}")
                return
            self._out.append(_U64.pack(ex.size) + _U16.pack(ex.tx_flags)
                             + (b"" if self.no_zeroes else bytes(124)))
            self._go(ex)
        elif opt == NbdOpt.ABORT:
            self._rep(opt, NbdRep.ACK)
            self.disconnect_requested = True
            self._fail("NBD_OPT_ABORT")
        elif opt == NbdOpt.LIST:
            if len(data) != 0:
                self._rep(opt, NbdRep.ERR_INVALID, b"NBD_OPT_LIST takes no data")
                return
            for ex in self.exports.values():
                name = ex.name.encode()
                self._rep(opt, NbdRep.SERVER, _U32.pack(len(name)) + name
                          + ex.description.encode())
            self._rep(opt, NbdRep.ACK)
        elif opt == NbdOpt.STRUCTURED_REPLY:
            if len(data) != 0:
                self._rep(opt, NbdRep.ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data")
                return
            self.structured = True
            self._rep(opt, NbdRep.ACK)
        elif opt in (NbdOpt.INFO, NbdOpt.GO):
            self._info_go(opt, data)
        else:
            self._rep(opt, NbdRep.ERR_UNSUP, f"option {opt} is not supported".encode())

    def _lookup(self, name: bytes) -> NbdExport | None:
        try:
            text = name.decode()
        except UnicodeDecodeError:
            return None
        if text == "" and self.default is not None:
            text = self.default
        return self.exports.get(text)

    def _info_go(self, opt: int, data: bytes) -> None:
        # "NBD_OPT_INFO and NBD_OPT_GO": 32-bit name length, name, 16-bit count of
        # information requests, 16 bits each
        if len(data) < 6:
            self._rep(opt, NbdRep.ERR_INVALID, b"option data too short")
            return
        (nlen,) = _U32.unpack_from(data)
        if nlen > MAX_STRING or 4 + nlen + 2 > len(data):
            self._rep(opt, NbdRep.ERR_INVALID, b"bad export name length")
            return
        (ninfo,) = _U16.unpack_from(data, 4 + nlen)
        if len(data) != 4 + nlen + 2 + 2 * ninfo:
            self._rep(opt, NbdRep.ERR_INVALID, b"bad information request count")
            return
        requested = {_U16.unpack_from(data, 6 + nlen + 2 * i)[0] for i in range(ninfo)}
        ex = self._lookup(data[4:4 + nlen])
        if ex is None:
            self._rep(opt, NbdRep.ERR_UNKNOWN, b"no such export")
            return
        if NbdInfo.NAME in requested:
            self._rep(opt, NbdRep.INFO, _U16.pack(NbdInfo.NAME) + ex.name.encode())
        if NbdInfo.DESCRIPTION in requested and ex.description != "":
            self._rep(opt, NbdRep.INFO, _U16.pack(NbdInfo.DESCRIPTION)
                      + ex.description.encode())
        # sent whether or not requested: the constraints are not the defaults
        self._rep(opt, NbdRep.INFO, _INFO_BLOCK.pack(NbdInfo.BLOCK_SIZE, ex.min_block,
                                                     ex.preferred_block, ex.max_payload))
        self._rep(opt, NbdRep.INFO, _INFO_EXPORT.pack(NbdInfo.EXPORT, ex.size, ex.tx_flags))
        self._rep(opt, NbdRep.ACK)
        if opt == NbdOpt.GO:
            self._go(ex)

    def _go(self, ex: NbdExport) -> None:
        self.export = ex
        self._expect(_REQ_HEADER, _REQ.size, bytearray(_REQ.size))

    # -- transmission --------------------------------------------------------------

    def _request(self) -> list[NbdRequest]:
        magic, flags, cmd, cookie, offset, length = _REQ.unpack_from(self._buf)
        self._buf = bytearray(_REQ.size)
        if magic != NBD_REQUEST_MAGIC:
            self._fail(f"bad request magic {magic:#x}")
            return []
        ex = self.export
        assert ex is not None
        error = self._check(ex, cmd, flags, offset, length)
        if cmd == NbdCmd.WRITE and length > 0 and error != NbdError.OK:
            # the payload follows whatever we think of the request: skip it
            self._pending = (cookie, NbdCmd.WRITE, NbdCmdFlag(flags), offset, length)
            self._skip_error = error
            self._expect(_SKIP, min(length, 1 << 20))
            return []
        if error != NbdError.OK:
            self._error(cookie, error, "request refused")
            return []
        command, cflags = NbdCmd(cmd), NbdCmdFlag(flags)
        if command == NbdCmd.DISC:
            self.disconnect_requested = True
            self._fail("NBD_CMD_DISC")
            return []
        if command == NbdCmd.WRITE and length > 0:
            self._pending = (cookie, command, cflags, offset, length)
            self._expect(_PAYLOAD, length, bytearray(length))
            return []
        if length == 0 and command != NbdCmd.FLUSH:
            # A request of no bytes moves no data and persists nothing: answered
            # here, so that no empty bio or empty reply buffer exists further on
            # ("Request types": the server SHOULD NOT disconnect on a length of 0).
            self.empty += 1
            self._success(cookie)
            return []
        self.requests += 1
        return [NbdRequest(cookie, command, cflags, offset, length,
                           bytearray(0) if command == NbdCmd.WRITE else None)]

    def _check(self, ex: NbdExport, cmd: int, flags: int, offset: int,
               length: int) -> NbdError:
        """The error for a request, NbdError.OK if it may run ("Error values",
        "Size constraints", "Request types")."""
        try:
            command = NbdCmd(cmd)
        except ValueError:
            return NbdError.EINVAL  # unknown command
        allowed = _ALLOWED_FLAGS.get(command)
        if allowed is None:
            return NbdError.EINVAL  # CACHE, BLOCK_STATUS: not advertised
        if flags & ~allowed:
            return NbdError.EINVAL
        txf = ex.tx_flags
        if command == NbdCmd.DISC:
            return NbdError.OK
        if flags & NbdCmdFlag.FUA and not txf & NbdTxFlag.SEND_FUA:
            return NbdError.EINVAL
        if command == NbdCmd.FLUSH:
            if not txf & NbdTxFlag.SEND_FLUSH or offset != 0 or length != 0:
                return NbdError.EINVAL
            return NbdError.OK
        if command == NbdCmd.TRIM and not txf & NbdTxFlag.SEND_TRIM and not ex.readonly:
            return NbdError.EINVAL
        writes = command in (NbdCmd.WRITE, NbdCmd.TRIM, NbdCmd.WRITE_ZEROES)
        if writes and ex.readonly:
            return NbdError.EPERM
        if offset % ex.min_block != 0 or length % ex.min_block != 0:
            return NbdError.EINVAL
        if command in (NbdCmd.READ, NbdCmd.WRITE) and length > ex.max_payload:
            return NbdError.EINVAL
        if offset + length > ex.size:
            return NbdError.ENOSPC if command in (NbdCmd.WRITE,
                                                  NbdCmd.WRITE_ZEROES) else NbdError.EINVAL
        return NbdError.OK

    # -- output --------------------------------------------------------------------

    def _error(self, cookie: int, error: NbdError, message: str) -> None:
        self.errors += 1
        self._emit_error(cookie, error, message)

    def _emit_error(self, cookie: int, error: NbdError, message: str) -> None:
        if self.structured:
            msg = message.encode()[:MAX_STRING]
            body = _ERROR_CHUNK.pack(error, len(msg)) + msg
            self._out.append(_CHUNK.pack(NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE,
                                         NbdReplyType.ERROR, cookie, len(body)) + body)
        else:
            self._out.append(_SIMPLE.pack(NBD_SIMPLE_REPLY_MAGIC, error, cookie))

    def _success(self, cookie: int) -> None:
        """A reply of success with no data (a structured reply: one NONE chunk with
        DONE, "valid as a reply to any request")."""
        if self.structured:
            self._out.append(_CHUNK.pack(NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE,
                                         NbdReplyType.NONE, cookie, 0))
        else:
            self._out.append(_SIMPLE.pack(NBD_SIMPLE_REPLY_MAGIC, 0, cookie))

    def reply(self, req: NbdRequest, error: int,
              data: bytes | bytearray | memoryview | None = None) -> None:
        """Answer ``req``: ``error`` an :class:`NbdError` value (0: success), and for a
        successful read its ``req.length`` bytes of ``data`` (never empty: a read
        of no bytes is answered by the core and never reaches the caller)."""
        if error != NbdError.OK:
            self._emit_error(req.cookie, NbdError(error), f"{req.cmd.name} failed")
            return
        if req.cmd == NbdCmd.READ and req.length > 0:
            assert data is not None and len(data) == req.length
            if self.structured:
                self._out.append(_CHUNK.pack(NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE,
                                             NbdReplyType.OFFSET_DATA, req.cookie,
                                             8 + req.length) + _U64.pack(req.offset))
            else:
                self._out.append(_SIMPLE.pack(NBD_SIMPLE_REPLY_MAGIC, 0, req.cookie))
            self._out.append(data)
            return
        self._success(req.cookie)

    def take_output(self) -> list[bytes | bytearray | memoryview]:
        """Every buffer queued for the client, in order; the queue is then empty."""
        out, self._out = self._out, []
        return out

    def has_output(self) -> bool:
        return len(self._out) > 0
