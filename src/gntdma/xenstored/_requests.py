"""One handler per message type, with the payload rules of C xenstored 4.17.

Each handler gets the daemon, the connection, the request and its transaction
(None outside one) and returns the reply payload, or raises
:class:`~gntdma.xenstored._wire.XsError`. The checks that come before any
handler run in :func:`dispatch`, in C's order: unknown type (ENOSYS), then
privileged-only type from an unprivileged domain (EACCES), then an unknown
transaction id (ENOENT).
"""

from __future__ import annotations

import errno
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from gntdma.xenstored._store import Transaction
from gntdma.xenstored._tree import DOMID_SELF, domain_path, is_valid_path
from gntdma.xenstored._watch import Watch
from gntdma.xenstored._wire import XENSTORE_PAYLOAD_MAX, XENSTORE_REL_PATH_MAX, Message, XsError
from gntdma.xenstored._wire import XsdType as T

if TYPE_CHECKING:
    from gntdma.xenstored._core import Connection, Xenstored

__all__ = ["dispatch"]

log = logging.getLogger("gntdma.xenstored")

_OK: Final = b"OK\0"
_ATOI = re.compile(r"[ \t\n\v\f\r]*([+-]?[0-9]*)")

Handler = Callable[["Xenstored", "Connection", Message, "Transaction | None"], bytes]


def _atoi(text: str) -> int:
    """C ``atoi`` (leading digits, 0 if none), as unsigned 32 bits."""
    m = _ATOI.match(text)
    digits = m.group(1) if m is not None else ""
    value = int(digits) if digits not in ("", "+", "-") else 0
    return value & 0xFFFFFFFF


def _onearg(msg: Message) -> str:
    """``onearg``: the payload must be one string with its NUL at the very end."""
    p = msg.payload
    if not p or p.find(b"\0") != len(p) - 1:
        raise XsError(errno.EINVAL, "expected one NUL-terminated argument")
    return p[:-1].decode("latin-1")


def _strings(msg: Message) -> list[str]:
    """``get_strings``: every NUL-terminated string (a tail without NUL is ignored)."""
    return [s.decode("latin-1") for s in msg.strings()]


# Database operations.


def _directory(xsd: Xenstored, conn: Connection, msg: Message, txn: Transaction | None) -> bytes:
    return xsd.access(conn, txn).read_node(_onearg(msg)).children_bytes


def _read(xsd: Xenstored, conn: Connection, msg: Message, txn: Transaction | None) -> bytes:
    return xsd.access(conn, txn).read_node(_onearg(msg)).value


def _get_perms(xsd: Xenstored, conn: Connection, msg: Message, txn: Transaction | None) -> bytes:
    node = xsd.access(conn, txn).read_node(_onearg(msg))
    return b"".join(str(p).encode() + b"\0" for p in node.perms)


def _directory_part(
    xsd: Xenstored, conn: Connection, msg: Message, txn: Transaction | None
) -> bytes:
    if msg.payload.count(b"\0") != 2:
        raise XsError(errno.EINVAL, "expected path and offset")
    name, offset_text = _strings(msg)[:2]
    node = xsd.access(conn, txn).read_node(name)
    offset = _atoi(offset_text)
    gen = str(node.generation).encode() + b"\0"
    children = node.children_bytes
    if offset >= len(children):
        return gen + b"\0"
    # As send_directory_part: whole names while they fit, a final NUL at the end.
    maxlen = XENSTORE_PAYLOAD_MAX - len(gen) - 1
    length = 0
    while True:
        end = children.index(b"\0", offset + length)
        name_len = end - (offset + length)
        if length + name_len >= maxlen:
            break
        length += name_len + 1
        if offset + length == len(children):
            break
    part = children[offset : offset + length]
    if offset + length == len(children):
        part += b"\0"
    return gen + part


def _write(xsd: Xenstored, conn: Connection, msg: Message, txn: Transaction | None) -> bytes:
    if b"\0" not in msg.payload:
        raise XsError(errno.EINVAL, "WRITE without a path")
    name, value = msg.payload.split(b"\0", 1)
    acc = xsd.access(conn, txn)
    acc.write(name.decode("latin-1"), value)
    xsd._fire(acc.changes)
    return _OK


def _mkdir(xsd: Xenstored, conn: Connection, msg: Message, txn: Transaction | None) -> bytes:
    acc = xsd.access(conn, txn)
    acc.mkdir(_onearg(msg))
    xsd._fire(acc.changes)
    return _OK


def _rm(xsd: Xenstored, conn: Connection, msg: Message, txn: Transaction | None) -> bytes:
    acc = xsd.access(conn, txn)
    acc.rm(_onearg(msg))
    xsd._fire(acc.changes)
    return _OK


def _set_perms(xsd: Xenstored, conn: Connection, msg: Message, txn: Transaction | None) -> bytes:
    count = msg.payload.count(b"\0")
    if count < 2:
        raise XsError(errno.EINVAL, "SET_PERMS needs a path and a permission")
    strings = _strings(msg)
    acc = xsd.access(conn, txn)
    acc.set_perms(strings[0], strings[1:count])
    xsd._fire(acc.changes)
    return _OK


# Watches.


def _watch_args(xsd: Xenstored, conn: Connection, msg: Message) -> tuple[str, str, bool]:
    strings = _strings(msg)
    if len(strings) != 2:
        raise XsError(errno.EINVAL, "expected path and token")
    wpath, token = strings
    if wpath.startswith("@"):
        if len(wpath) > XENSTORE_REL_PATH_MAX:
            raise XsError(errno.EINVAL, "special watch path too long")
        return wpath, token, False
    path = xsd.access(conn).canonical(wpath)
    return path, token, path != wpath


def _watch(xsd: Xenstored, conn: Connection, msg: Message, txn: Transaction | None) -> bytes:
    path, token, relative = _watch_args(xsd, conn, msg)
    if not path.startswith("@") and not is_valid_path(path, xsd.quotas.path_max):
        raise XsError(errno.EINVAL, f"invalid watch path {path!r}")
    if conn.find_watch(path, token) is not None:
        raise XsError(errno.EEXIST, "watch exists")
    # do_watch: "domain_watch(conn) > quota_nb_watch_per_domain", so a domain
    # may hold one watch more than the quota, as in C.
    if not conn.privileged and xsd.domain_watches(conn.domid) > xsd.quotas.watches:
        raise XsError(errno.E2BIG, "too many watches")
    watch = Watch(path, token, domain_path(conn.domid) if relative else None)
    xsd.add_watch(conn, watch)
    # Fire once straight away, after the reply.
    event = watch.event_payload(path)
    if len(event) <= XENSTORE_PAYLOAD_MAX:
        conn._deferred.append(Message(T.XS_WATCH_EVENT, 0, 0, event).encode())
    return _OK


def _unwatch(xsd: Xenstored, conn: Connection, msg: Message, txn: Transaction | None) -> bytes:
    path, token, _ = _watch_args(xsd, conn, msg)
    if xsd.remove_watch(conn, path, token):
        return _OK
    raise XsError(errno.ENOENT, "no such watch")


def _reset_watches(
    xsd: Xenstored, conn: Connection, msg: Message, txn: Transaction | None
) -> bytes:
    xsd._reset(conn)
    return _OK


# Transactions.


def _transaction_start(
    xsd: Xenstored, conn: Connection, msg: Message, txn: Transaction | None
) -> bytes:
    if txn is not None:
        raise XsError(errno.EBUSY, "no nested transactions")
    # do_transaction_start: "conn->transaction_started > quota_max_transaction",
    # so a connection may hold one transaction more than the quota, as in C.
    if not conn.privileged and len(conn.transactions) > xsd.quotas.transactions:
        raise XsError(errno.ENOSPC, "too many transactions")
    while conn._next_txid == 0 or conn._next_txid in conn.transactions:
        conn._next_txid = (conn._next_txid + 1) & 0xFFFFFFFF
    txid = conn._next_txid
    conn._next_txid = (txid + 1) & 0xFFFFFFFF
    conn.transactions[txid] = xsd.store.begin(txid)
    return str(txid).encode() + b"\0"


def _transaction_end(
    xsd: Xenstored, conn: Connection, msg: Message, txn: Transaction | None
) -> bytes:
    arg = _onearg(msg)
    if arg not in ("T", "F"):
        raise XsError(errno.EINVAL, "TRANSACTION_END takes T or F")
    if txn is None:
        raise XsError(errno.ENOENT, "not in a transaction")
    del conn.transactions[txn.id]
    if arg == "T":
        xsd._fire(xsd.store.commit(txn, xsd.caller(conn), xsd.quotas))
    return _OK


# Domains.


def _introduce(xsd: Xenstored, conn: Connection, msg: Message, txn: Transaction | None) -> bytes:
    strings = _strings(msg)
    if len(strings) < 3:
        raise XsError(errno.EINVAL, "expected domid, gfn, port")
    domid, gfn, port = _atoi(strings[0]), _atoi(strings[1]), _atoi(strings[2])
    if port == 0:
        raise XsError(errno.EINVAL, "bad event channel")
    if domid == 0:
        # do_introduce -> introduce_domain: dom0 (the master domain) is
        # introduced at start-up, so this only resets its own connection.
        xsd._introduce_master()
        return _OK
    xsd._check_guest(domid)
    xsd._introduce(domid, gfn, port)
    return _OK


def _guest_arg(xsd: Xenstored, msg: Message) -> int:
    domid = _atoi(_onearg(msg))
    if domid == 0:
        raise XsError(errno.EINVAL, "domain 0")
    xsd._domain(domid)
    return domid


def _release(xsd: Xenstored, conn: Connection, msg: Message, txn: Transaction | None) -> bytes:
    xsd.release_domain(_guest_arg(xsd, msg))
    return _OK


def _resume(xsd: Xenstored, conn: Connection, msg: Message, txn: Transaction | None) -> bytes:
    xsd._domain(_guest_arg(xsd, msg)).shutdown = False
    return _OK


def _get_domain_path(
    xsd: Xenstored, conn: Connection, msg: Message, txn: Transaction | None
) -> bytes:
    return domain_path(_atoi(_onearg(msg))).encode() + b"\0"


def _is_domain_introduced(
    xsd: Xenstored, conn: Connection, msg: Message, txn: Transaction | None
) -> bytes:
    domid = _atoi(_onearg(msg))
    known = domid == DOMID_SELF or xsd.is_domain_introduced(domid)
    return b"T\0" if known else b"F\0"


def _set_target(xsd: Xenstored, conn: Connection, msg: Message, txn: Transaction | None) -> bytes:
    strings = _strings(msg)
    if len(strings) < 2:
        raise XsError(errno.EINVAL, "expected domid and target")
    domid, tdomid = _atoi(strings[0]), _atoi(strings[1])
    dom = xsd._domain(domid)
    xsd._domain(tdomid)
    dom.target = tdomid
    return _OK


# CONTROL.

_QUOTA_DESCR: Final = {
    "nodes": "Nodes per domain",
    "watches": "Watches per domain",
    "transactions": "Transactions per domain",
    "transaction-nodes": "Max. number of accessed nodes per transaction",
    "node-size": "Max. size of a node",
    "path-max": "Max. length of a node path",
    "permissions": "Max. number of permissions per node",
}
_QUOTA_ATTR: Final = {
    "nodes": "nodes",
    "watches": "watches",
    "transactions": "transactions",
    "transaction-nodes": "transaction_nodes",
    "node-size": "node_size",
    "path-max": "path_max",
    "permissions": "permissions",
}

_CONTROL_HELP: Final = (
    ("check", ""),
    ("log", "on|off"),
    ("print", "<string>"),
    ("quota", "[set <name> <val>|<domid>]"),
    ("help", ""),
)


def _control(xsd: Xenstored, conn: Connection, msg: Message, txn: Transaction | None) -> bytes:
    strings = _strings(msg)
    if not strings:
        raise XsError(errno.EINVAL, "no control command")
    cmd, args = strings[0], strings[1:]
    if cmd == "check" and not args:
        return _OK
    if cmd == "log" and args in (["on"], ["off"]):
        return _OK
    if cmd == "print" and len(args) == 1:
        log.info("control: %s", args[0])
        return _OK
    if cmd == "help" and not args:
        return "".join(f"{c}\t{p}\n" for c, p in _CONTROL_HELP).encode() + b"\0"
    if cmd == "quota":
        return _control_quota(xsd, args)
    raise XsError(errno.EINVAL, f"bad control command {cmd!r}")


def _control_quota(xsd: Xenstored, args: list[str]) -> bytes:
    if not args:
        lines = ["Quota settings:\n"]
        for name, descr in _QUOTA_DESCR.items():
            value = getattr(xsd.quotas, _QUOTA_ATTR[name])
            lines.append(f"{name:<17}: {value:8d} {descr}\n")
        return "".join(lines).encode() + b"\0"
    if args[0] == "set":
        if len(args) != 3 or args[1] not in _QUOTA_ATTR:
            raise XsError(errno.EINVAL, "quota set <name> <val>")
        value = _atoi(args[2])
        if not 1 <= value < 1 << 31:
            raise XsError(errno.EINVAL, "quota must be positive")
        setattr(xsd.quotas, _QUOTA_ATTR[args[1]], value)
        return _OK
    if len(args) != 1:
        raise XsError(errno.EINVAL, "quota <domid>")
    domid = _atoi(args[0])
    usage = xsd.domain_usage(domid)
    if not xsd.is_domain_introduced(domid) and not any(usage.values()):
        raise XsError(errno.ENOENT, f"unknown domain {domid}")
    text = f"Domain {domid}:\n" + "".join(f"{k:<16}: {v:8d}\n" for k, v in usage.items())
    return text.encode() + b"\0"


# Dispatch.

_PRIV: Final = 1  # privileged callers only
_NOTID: Final = 2  # tx_id ignored

_HANDLERS: Final[dict[int, tuple[Handler, int]]] = {
    T.XS_CONTROL: (_control, _PRIV),
    T.XS_DIRECTORY: (_directory, 0),
    T.XS_READ: (_read, 0),
    T.XS_GET_PERMS: (_get_perms, 0),
    T.XS_WATCH: (_watch, _NOTID),
    T.XS_UNWATCH: (_unwatch, _NOTID),
    T.XS_TRANSACTION_START: (_transaction_start, 0),
    T.XS_TRANSACTION_END: (_transaction_end, 0),
    T.XS_INTRODUCE: (_introduce, _PRIV),
    T.XS_RELEASE: (_release, _PRIV),
    T.XS_GET_DOMAIN_PATH: (_get_domain_path, 0),
    T.XS_WRITE: (_write, 0),
    T.XS_MKDIR: (_mkdir, 0),
    T.XS_RM: (_rm, 0),
    T.XS_SET_PERMS: (_set_perms, 0),
    T.XS_IS_DOMAIN_INTRODUCED: (_is_domain_introduced, _PRIV),
    T.XS_RESUME: (_resume, _PRIV),
    T.XS_SET_TARGET: (_set_target, _PRIV),
    T.XS_RESET_WATCHES: (_reset_watches, 0),
    T.XS_DIRECTORY_PART: (_directory_part, 0),
}


def dispatch(xsd: Xenstored, conn: Connection, msg: Message) -> bytes:
    """Run one request; return the reply payload or raise XsError."""
    entry = _HANDLERS.get(msg.type)
    if entry is None:
        raise XsError(errno.ENOSYS, f"unknown message type {msg.type}")
    handler, flags = entry
    if flags & _PRIV and not conn.privileged:
        raise XsError(errno.EACCES, "privileged operation")
    txn = None
    if not flags & _NOTID and msg.tx_id != 0:
        txn = conn.transactions.get(msg.tx_id)
        if txn is None:
            raise XsError(errno.ENOENT, f"no transaction {msg.tx_id}")
    return handler(xsd, conn, msg, txn)
