"""The sans-IO NBD server core against the NBD protocol document
(NetworkBlockDevice/nbd doc/proto.md; sections named in each test)."""

from __future__ import annotations

import struct

from gntdma.host.nbd_proto import (
    IHAVEOPT,
    NBD_REP_MAGIC,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
    NBDMAGIC,
    NbdCmd,
    NbdCmdFlag,
    NbdError,
    NbdExport,
    NbdInfo,
    NbdOpt,
    NbdRep,
    NbdReplyType,
    NbdServerConnection,
    NbdTxFlag,
)

SIZE = 1 << 20
EXPORTS = [NbdExport("g1/xvda", SIZE, flush=True, trim=True, description="disk a"),
           NbdExport("g1/xvdb", SIZE, readonly=True)]


def _out(c: NbdServerConnection) -> bytes:
    return b"".join(bytes(b) for b in c.take_output())


def _opt(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def _replies(raw: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    while raw:
        magic, opt, rep, n = struct.unpack_from(">QIII", raw)
        assert magic == NBD_REP_MAGIC
        out.append((opt, rep, raw[20:20 + n]))
        raw = raw[20 + n:]
    return out


def _go_data(name: str, infos: tuple[int, ...] = ()) -> bytes:
    n = name.encode()
    return struct.pack(">I", len(n)) + n + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos)


def _connected(structured: bool = False, name: str = "g1/xvda") -> NbdServerConnection:
    c = NbdServerConnection(EXPORTS)
    _out(c)
    c.receive_data(struct.pack(">I", 3))
    if structured:
        c.receive_data(_opt(NbdOpt.STRUCTURED_REPLY))
    c.receive_data(_opt(NbdOpt.GO, _go_data(name)))
    _out(c)
    assert c.export is not None
    return c


def _req(cmd: int, offset: int = 0, length: int = 0, flags: int = 0, cookie: int = 7) -> bytes:
    return struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def _simple(raw: bytes) -> tuple[int, int]:
    magic, error, cookie = struct.unpack_from(">IIQ", raw)
    assert magic == NBD_SIMPLE_REPLY_MAGIC
    return error, cookie


def test_greeting_is_fixed_newstyle_with_no_zeroes() -> None:
    # "Newstyle negotiation", "Handshake flags"
    c = NbdServerConnection(EXPORTS)
    assert _out(c) == struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3)


def test_unknown_client_flags_close_the_connection() -> None:
    # "Newstyle negotiation": the server MUST close if it does not recognize the flags
    c = NbdServerConnection(EXPORTS)
    c.receive_data(struct.pack(">I", 1 << 7))
    assert c.closed and "client flags" in c.close_reason


def test_list_replies_server_per_export_then_ack() -> None:
    # "Option types": NBD_OPT_LIST; "Option reply types": NBD_REP_SERVER
    c = NbdServerConnection(EXPORTS)
    _out(c)
    c.receive_data(struct.pack(">I", 1) + _opt(NbdOpt.LIST))
    reps = _replies(_out(c))
    assert [r[1] for r in reps] == [NbdRep.SERVER, NbdRep.SERVER, NbdRep.ACK]
    n = struct.unpack_from(">I", reps[0][2])[0]
    assert reps[0][2][4:4 + n] == b"g1/xvda" and reps[0][2][4 + n:] == b"disk a"


def test_unknown_option_gets_err_unsup_and_haggling_goes_on() -> None:
    # "Fixed newstyle negotiation": unknown options are answered NBD_REP_ERR_UNSUP
    c = NbdServerConnection(EXPORTS)
    _out(c)
    c.receive_data(struct.pack(">I", 1) + _opt(99, b"xyz") + _opt(NbdOpt.STARTTLS))
    assert [r[1] for r in _replies(_out(c))] == [NbdRep.ERR_UNSUP, NbdRep.ERR_UNSUP]
    assert not c.closed


def test_go_sends_export_and_block_size_info_then_ack() -> None:
    # "Option reply types": NBD_INFO_EXPORT and NBD_INFO_BLOCK_SIZE (14 bytes)
    c = NbdServerConnection(EXPORTS)
    _out(c)
    c.receive_data(struct.pack(">I", 1)
                   + _opt(NbdOpt.GO, _go_data("g1/xvdb", (NbdInfo.BLOCK_SIZE, NbdInfo.NAME))))
    reps = _replies(_out(c))
    infos = {struct.unpack_from(">H", d)[0]: d for _o, r, d in reps if r == NbdRep.INFO}
    assert reps[-1][1] == NbdRep.ACK
    _t, size, flags = struct.unpack(">HQH", infos[NbdInfo.EXPORT])
    assert size == SIZE and flags & NbdTxFlag.READ_ONLY
    assert len(infos[NbdInfo.BLOCK_SIZE]) == 14
    assert struct.unpack(">HIII", infos[NbdInfo.BLOCK_SIZE])[1:] == (512, 4096, 32 << 20)
    assert infos[NbdInfo.NAME][2:] == b"g1/xvdb"
    assert c.export is EXPORTS[1]


def test_info_of_unknown_export_is_err_unknown_and_stays_in_handshake() -> None:
    # "Option types": NBD_OPT_INFO/GO of an export the server does not have: NBD_REP_ERR_UNKNOWN
    c = NbdServerConnection(EXPORTS)
    _out(c)
    c.receive_data(struct.pack(">I", 1) + _opt(NbdOpt.INFO, _go_data("nope")))
    assert [r[1] for r in _replies(_out(c))] == [NbdRep.ERR_UNKNOWN]
    assert c.export is None and not c.closed


def test_go_with_inconsistent_lengths_is_err_invalid() -> None:
    c = NbdServerConnection(EXPORTS)
    _out(c)
    c.receive_data(struct.pack(">I", 1) + _opt(NbdOpt.GO, _go_data("g1/xvda", (3,))[:-1]))
    assert [r[1] for r in _replies(_out(c))] == [NbdRep.ERR_INVALID]


def test_export_name_of_default_export_replies_size_flags_and_zeroes() -> None:
    # "Newstyle negotiation": NBD_OPT_EXPORT_NAME reply, 124 zero bytes without C_NO_ZEROES
    c = NbdServerConnection(EXPORTS)
    _out(c)
    c.receive_data(struct.pack(">I", 1) + _opt(NbdOpt.EXPORT_NAME, b""))
    raw = _out(c)
    assert len(raw) == 8 + 2 + 124 and struct.unpack_from(">Q", raw)[0] == SIZE
    assert c.export is EXPORTS[0]


def test_export_name_of_unknown_export_terminates_the_session() -> None:
    c = NbdServerConnection(EXPORTS)
    c.receive_data(struct.pack(">I", 3) + _opt(NbdOpt.EXPORT_NAME, b"nope"))
    assert c.closed


def test_abort_is_acked_and_ends_the_connection() -> None:
    c = NbdServerConnection(EXPORTS)
    _out(c)
    c.receive_data(struct.pack(">I", 3) + _opt(NbdOpt.ABORT))
    assert [r[1] for r in _replies(_out(c))] == [NbdRep.ACK]
    assert c.closed and c.disconnect_requested


def test_huge_option_is_a_hard_disconnect() -> None:
    # "Size constraints"/"Termination of the session": a denial of service may be dropped
    c = NbdServerConnection(EXPORTS)
    c.receive_data(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, 1, 1 << 30))
    assert c.closed


def test_write_payload_is_received_into_its_own_buffer() -> None:
    c = _connected()
    assert c.receive_data(_req(NbdCmd.WRITE, 4096, 1024)) == []
    buf = c.recv_buffer()
    assert len(buf) == 1024
    buf[:] = b"\xab" * 1024
    reqs = c.received(1024)
    assert len(reqs) == 1 and reqs[0].payload is not None
    assert reqs[0].payload == b"\xab" * 1024 and reqs[0].offset == 4096


def test_read_beyond_the_end_is_einval() -> None:
    # "Error values": a read including sectors beyond the device is NBD_EINVAL
    c = _connected()
    assert c.receive_data(_req(NbdCmd.READ, SIZE - 512, 1024)) == []
    assert _simple(_out(c)) == (NbdError.EINVAL, 7)


def test_write_beyond_the_end_is_enospc_and_its_payload_skipped() -> None:
    # "Error values": a write including sectors beyond the device is NBD_ENOSPC
    c = _connected()
    reqs = c.receive_data(_req(NbdCmd.WRITE, SIZE, 512) + bytes(512)
                          + _req(NbdCmd.READ, 0, 512, cookie=8))
    assert [r.cookie for r in reqs] == [8]
    assert _simple(_out(c)) == (NbdError.ENOSPC, 7)


def test_unaligned_request_is_einval() -> None:
    # "Size constraints": not aligned to the advertised minimum block: NBD_EINVAL
    c = _connected()
    c.receive_data(_req(NbdCmd.READ, 100, 512))
    assert _simple(_out(c))[0] == NbdError.EINVAL


def test_write_to_read_only_export_is_eperm() -> None:
    # "Error values": a write or trim on a read-only export: NBD_EPERM
    c = _connected(name="g1/xvdb")
    assert c.receive_data(_req(NbdCmd.WRITE, 0, 512) + bytes(512)) == []
    assert _simple(_out(c))[0] == NbdError.EPERM
    c.receive_data(_req(NbdCmd.TRIM, 0, 512))
    assert _simple(_out(c))[0] == NbdError.EPERM


def test_unknown_command_and_inapplicable_flag_are_einval() -> None:
    # "Error values": unknown command, or a flag not documented for the request: NBD_EINVAL
    # (NO_HOLE is documented for WRITE_ZEROES only; FUA is valid on every command,
    # see test_fua_is_accepted_on_every_command_when_send_fua_is_advertised)
    c = _connected()
    c.receive_data(_req(42) + _req(NbdCmd.READ, 0, 512, flags=NbdCmdFlag.NO_HOLE))
    raw = _out(c)
    assert _simple(raw)[0] == NbdError.EINVAL and _simple(raw[16:])[0] == NbdError.EINVAL


def test_fua_is_accepted_on_every_command_when_send_fua_is_advertised() -> None:
    # doc/proto.md "Command flags": NBD_CMD_FLAG_FUA "is valid for all commands,
    # provided NBD_FLAG_SEND_FUA has been negotiated, in which case the server MUST
    # accept all commands with this bit set (even by ignoring the bit)"
    c = _connected()
    assert c.export is not None and c.export.tx_flags & NbdTxFlag.SEND_FUA
    fua = NbdCmdFlag.FUA
    reqs = c.receive_data(_req(NbdCmd.READ, 0, 512, flags=fua, cookie=1)
                          + _req(NbdCmd.FLUSH, flags=fua, cookie=2)
                          + _req(NbdCmd.TRIM, 0, 512, flags=fua, cookie=3)
                          + _req(NbdCmd.WRITE_ZEROES, 0, 512, flags=fua, cookie=4)
                          + _req(NbdCmd.WRITE, 0, 512, flags=fua, cookie=5) + bytes(512))
    assert [(r.cmd, r.cookie) for r in reqs] == [
        (NbdCmd.READ, 1), (NbdCmd.FLUSH, 2), (NbdCmd.TRIM, 3), (NbdCmd.WRITE_ZEROES, 4),
        (NbdCmd.WRITE, 5)]
    assert _out(c) == b"" and c.errors == 0
    c.receive_data(_req(NbdCmd.DISC, flags=fua))
    assert c.closed and c.disconnect_requested


def test_fua_without_send_fua_is_einval() -> None:
    # "Command flags": FUA is valid only "provided NBD_FLAG_SEND_FUA has been negotiated"
    c = _connected(name="g1/xvdb")  # read-only, no flush: SEND_FUA not advertised
    assert c.export is not None and not c.export.tx_flags & NbdTxFlag.SEND_FUA
    c.receive_data(_req(NbdCmd.READ, 0, 512, flags=NbdCmdFlag.FUA))
    assert _simple(_out(c))[0] == NbdError.EINVAL


def _zero_length_requests(offset: int) -> bytes:
    return (_req(NbdCmd.READ, offset, 0, cookie=1) + _req(NbdCmd.WRITE, offset, 0, cookie=2)
            + _req(NbdCmd.TRIM, offset, 0, cookie=3)
            + _req(NbdCmd.WRITE_ZEROES, offset, 0, cookie=4))


def test_zero_length_requests_are_answered_by_the_core_with_simple_replies() -> None:
    # doc/proto.md "Request types", NBD_CMD_READ: "The client SHOULD NOT request a
    # read length of 0; the behavior of a server on such a request is unspecified
    # although the server SHOULD NOT disconnect" (the same for WRITE, TRIM and
    # WRITE_ZEROES). gntdma answers success with no payload, in the core: no empty
    # request reaches the disk, no empty buffer reaches the socket.
    for offset in (0, SIZE):
        c = _connected()
        assert c.receive_data(_zero_length_requests(offset)) == []
        out = c.take_output()
        assert all(len(b) > 0 for b in out)
        raw = b"".join(bytes(b) for b in out)
        assert [_simple(raw[i:]) for i in range(0, 64, 16)] == [(0, 1), (0, 2), (0, 3), (0, 4)]
        assert len(raw) == 64 and not c.closed and c.empty == 4 and c.requests == 0


def test_zero_length_requests_are_answered_by_the_core_with_structured_replies() -> None:
    # "Structured reply types": NBD_REPLY_TYPE_NONE with NBD_REPLY_FLAG_DONE is "valid
    # as a reply to any request"; an OFFSET_DATA chunk could not carry 0 bytes (its
    # length "MUST be at least 9", and "each chunk MUST describe at least one byte")
    for offset in (0, SIZE):
        c = _connected(structured=True)
        assert c.receive_data(_zero_length_requests(offset)) == []
        out = c.take_output()
        assert all(len(b) > 0 for b in out)
        raw = b"".join(bytes(b) for b in out)
        chunks = [struct.unpack_from(">IHHQI", raw, i) for i in range(0, 80, 20)]
        assert chunks == [(NBD_STRUCTURED_REPLY_MAGIC, 1, NbdReplyType.NONE, k, 0)
                          for k in (1, 2, 3, 4)]
        assert len(raw) == 80 and not c.closed


def test_zero_length_request_beyond_the_end_is_still_einval() -> None:
    # "Error values": offset beyond the end of the export: NBD_EINVAL
    c = _connected()
    assert c.receive_data(_req(NbdCmd.READ, SIZE + 512, 0)) == []
    assert _simple(_out(c)) == (NbdError.EINVAL, 7)


def test_flush_with_offset_is_einval_and_cache_is_not_offered() -> None:
    # "Request types": NBD_CMD_FLUSH length and offset MUST be zero; CACHE not advertised
    c = _connected()
    c.receive_data(_req(NbdCmd.FLUSH, 512, 0) + _req(NbdCmd.CACHE, 0, 512))
    raw = _out(c)
    assert _simple(raw)[0] == NbdError.EINVAL and _simple(raw[16:])[0] == NbdError.EINVAL


def test_write_larger_than_maximum_payload_is_einval() -> None:
    ex = NbdExport("x", 64 << 20, max_payload=1 << 20)
    c = NbdServerConnection([ex])
    c.receive_data(struct.pack(">I", 3) + _opt(NbdOpt.GO, _go_data("x")))
    _out(c)
    assert c.receive_data(_req(NbdCmd.WRITE, 0, 2 << 20) + bytes(2 << 20)) == []
    assert _simple(_out(c))[0] == NbdError.EINVAL and not c.closed


def test_bad_request_magic_closes() -> None:
    c = _connected()
    c.receive_data(b"\0" * 28)
    assert c.closed and "magic" in c.close_reason


def test_disc_ends_the_connection() -> None:
    c = _connected()
    c.receive_data(_req(NbdCmd.DISC))
    assert c.closed and c.disconnect_requested


def test_structured_read_reply_is_offset_data_chunk_with_done() -> None:
    # "Structured reply chunk message", NBD_REPLY_TYPE_OFFSET_DATA, NBD_REPLY_FLAG_DONE
    c = _connected(structured=True)
    (r,) = c.receive_data(_req(NbdCmd.READ, 1024, 512, cookie=99))
    c.reply(r, 0, b"z" * 512)
    raw = _out(c)
    magic, flags, typ, cookie, n = struct.unpack_from(">IHHQI", raw)
    assert (magic, flags, typ, cookie, n) == (NBD_STRUCTURED_REPLY_MAGIC, 1,
                                              NbdReplyType.OFFSET_DATA, 99, 8 + 512)
    assert struct.unpack_from(">Q", raw, 20)[0] == 1024 and raw[28:] == b"z" * 512


def test_structured_error_reply_carries_the_error_and_a_message() -> None:
    # "Structured reply types": NBD_REPLY_TYPE_ERROR: 32-bit error, 16-bit message length
    c = _connected(structured=True)
    c.receive_data(_req(NbdCmd.READ, SIZE, 512, cookie=5))
    raw = _out(c)
    _magic, flags, typ, cookie, n = struct.unpack_from(">IHHQI", raw)
    assert typ == NbdReplyType.ERROR and flags == 1 and cookie == 5
    err, mlen = struct.unpack_from(">IH", raw, 20)
    assert err == NbdError.EINVAL and n == 6 + mlen


def test_replies_go_out_in_completion_order() -> None:
    c = _connected()
    r1, r2 = c.receive_data(_req(NbdCmd.READ, 0, 512, cookie=1)
                            + _req(NbdCmd.FLUSH, cookie=2))
    c.reply(r2, 0)
    c.reply(r1, NbdError.EIO)
    raw = _out(c)
    assert _simple(raw) == (0, 2) and _simple(raw[16:]) == (NbdError.EIO, 1)
