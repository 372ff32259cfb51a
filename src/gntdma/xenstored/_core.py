"""The daemon core: connections, watches, domains; no transport.

Theory of operation
-------------------
:class:`Xenstored` owns the :class:`~gntdma.xenstored._store.Store` and every
:class:`Connection`. A connection is a byte pipe with a domid: the transport
(Unix socket, or later a domain's ring page) calls :meth:`Connection.feed` with
what the peer sent, takes what to send back from :meth:`Connection.data_to_send`,
and calls :meth:`Connection.close` when the peer goes away. The core tells the
transport about new output (a watch fired by another connection, or by the
toolstack from another thread) through ``on_output``, and about closing the
connection itself (protocol violation, domain released) through ``on_close``.
Both callbacks run with the core's lock held: they must only note the fact and
wake the transport, never call back into the core or block.

Every entry point takes :attr:`Xenstored.lock` (re-entrant), so the core may be
driven from a socket thread and from the rest of gntdma at the same time.

Requests are processed in order, one reply per request (C xenstored does the
same); watch events fired by a request are queued before its reply, except the
event of a new watch, which follows the WATCH reply.
"""

from __future__ import annotations

import errno
import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from gntdma.xenstored import _home, _requests
from gntdma.xenstored._store import SPECIAL_PATHS, Access, Change, Quotas, Store, Transaction
from gntdma.xenstored._tree import (
    DOMID_FIRST_RESERVED,
    SYSTEM,
    Caller,
    Perm,
    XsPerm,
    adjust_perms,
    parent_path,
    perm_for,
)
from gntdma.xenstored._watch import Watch, WatchIndex
from gntdma.xenstored._wire import (
    XENSTORE_PAYLOAD_MAX,
    Message,
    MessageReader,
    XsdType,
    XsError,
    XsProtocolError,
    errno_name,
)

__all__ = ["Connection", "Watch", "Xenstored", "XenstoredStatistics"]

log = logging.getLogger("gntdma.xenstored")

_READ = XsPerm.XS_PERM_READ


@dataclass(frozen=True, slots=True)
class XenstoredStatistics:
    """Counts for leak checks. A fresh daemon has 3 nodes (/, /tool, /tool/xenstored)."""

    nodes: int
    watches: int
    transactions: int
    connections: int
    domains: int  #: introduced domains


@dataclass
class _Domain:
    domid: int
    gfn: int = 0
    port: int = 0
    target: int | None = None
    shutdown: bool = False


class Connection:
    """One client of the daemon, whatever carries its bytes."""

    def __init__(self, xenstored: Xenstored, domid: int, conn_id: int, name: str,
                 ring: bool = False) -> None:
        self._xsd = xenstored
        self.domid = domid
        #: the domain's own connection (its store ring), not a socket client
        self.ring = ring
        self.id = conn_id
        self.name = name or f"conn{conn_id}"
        #: (path, token) -> (registration number, watch), in registration order
        self._watches: dict[tuple[str, str], tuple[int, Watch]] = {}
        self.transactions: dict[int, Transaction] = {}
        self._next_txid = 1
        self._reader = MessageReader()
        self._out: deque[tuple[bytes, bool]] = deque()  # (message, is_watch_event)
        self._partial = b""  # head of the queue already partly handed out
        self._deferred: list[bytes] = []  # events that must follow the current reply
        self.closed = False
        self.close_reason: str | None = None
        self._on_output: Callable[[], None] | None = None
        self._on_close: Callable[[Connection], None] | None = None
        self._on_reset: Callable[[Connection], None] | None = None

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Connection {self.name} dom{self.domid} {state}>"

    @property
    def privileged(self) -> bool:
        return self.domid == 0

    @property
    def watches(self) -> list[Watch]:
        """The connection's watches, in the order they were registered."""
        return [w for _, w in self._watches.values()]

    def find_watch(self, path: str, token: str) -> Watch | None:
        entry = self._watches.get((path, token))
        return entry[1] if entry is not None else None

    def set_callbacks(
        self,
        on_output: Callable[[], None] | None = None,
        on_close: Callable[[Connection], None] | None = None,
        on_reset: Callable[[Connection], None] | None = None,
    ) -> None:
        """Install the transport's hooks (run under the core lock; must not block).

        ``on_reset``: an INTRODUCE reset the connection (``domain_conn_reset``);
        the ring transport zeroes the ring's indices.
        """
        with self._xsd.lock:
            self._on_output = on_output
            self._on_close = on_close
            self._on_reset = on_reset

    # Transport side.

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Process the complete requests in ``data`` (plus what was buffered)."""
        with self._xsd.lock:
            if self.closed:
                return
            self._reader.receive(data)
            while not self.closed:
                try:
                    msg = self._reader.next_message()
                except XsProtocolError as e:
                    self._xsd._kill(self, str(e))
                    return
                if msg is None:
                    return
                self._xsd._process(self, msg)

    def data_to_send(self, max_bytes: int | None = None) -> bytes:
        """Take up to ``max_bytes`` (default: all) of the queued output."""
        with self._xsd.lock:
            chunks = [self._partial]
            size = len(self._partial)
            while self._out and (max_bytes is None or size < max_bytes):
                data = self._out.popleft()[0]
                chunks.append(data)
                size += len(data)
            out = b"".join(chunks)
            if max_bytes is not None and len(out) > max_bytes:
                out, self._partial = out[:max_bytes], out[max_bytes:]
            else:
                self._partial = b""
            return out

    @property
    def has_output(self) -> bool:
        with self._xsd.lock:
            return bool(self._partial) or bool(self._out)

    def close(self) -> None:
        """The peer is gone: abort its transactions and drop its watches."""
        with self._xsd.lock:
            if not self.closed:
                self._xsd._teardown(self, "closed by transport")

    # Core side.

    def _queue(self, data: bytes, is_event: bool = False) -> None:
        self._out.append((data, is_event))
        if self._on_output is not None:
            self._on_output()

    def _queue_event(self, payload: bytes, path: str) -> None:
        if len(payload) > XENSTORE_PAYLOAD_MAX:
            return  # C xenstored drops over-long events too
        data = Message(XsdType.XS_WATCH_EVENT, 0, 0, payload).encode()
        # Drop an identical event still waiting to be sent (not for specials).
        if not path.startswith("@") and any(ev and d == data for d, ev in self._out):
            return
        self._queue(data, True)


class Xenstored:
    """The xenstore daemon: the store, its connections, domains and watches."""

    def __init__(self, quotas: Quotas | None = None, *,
                 domain_exists: Callable[[int], bool] | None = None) -> None:
        """``domain_exists(domid)``: does the host have that domain (C's
        ``get_domain_info``)? Without it only dom0 and introduced domains exist."""
        self.lock = threading.RLock()
        self.store = Store()
        self.quotas = quotas if quotas is not None else Quotas()
        self._connections: dict[int, Connection] = {}
        #: the same connections by domid (each domain's own, in creation order)
        self._domain_conns: dict[int, dict[int, Connection]] = {}
        #: every connection's watches by path: firing visits only those that can fire
        self._watch_index = WatchIndex()
        self._conn_ids = itertools.count(1)
        self._domains: dict[int, _Domain] = {}
        self._domain_exists = domain_exists
        #: domid -> generation count when xenstored learnt of the domain
        #: (``struct domain`` ``generation``); dom0 always exists
        self._domain_gen: dict[int, int] = {0: 0}

    # Connections.

    def connect(self, domid: int = 0, *, name: str = "", ring: bool = False) -> Connection:
        """A new connection for ``domid`` (0: privileged, like the Unix socket).

        ``ring``: the domain's own connection, over its store ring.
        """
        if not 0 <= domid < DOMID_FIRST_RESERVED:
            raise XsError(errno.EINVAL, f"bad domid {domid}")
        with self.lock:
            conn = Connection(self, domid, next(self._conn_ids), name, ring)
            self._connections[conn.id] = conn
            self._domain_conns.setdefault(domid, {})[conn.id] = conn
            return conn

    def _teardown(self, conn: Connection, reason: str) -> None:
        conn.closed = True
        conn.close_reason = reason
        self._reset(conn)
        if self._connections.pop(conn.id, None) is not None:
            conns = self._domain_conns[conn.domid]
            del conns[conn.id]
            if not conns:
                del self._domain_conns[conn.domid]

    def _reset(self, conn: Connection) -> None:
        """Drop the watches and transactions of ``conn`` (RESET_WATCHES)."""
        conn.transactions.clear()
        for seq, w in conn._watches.values():
            self._watch_index.remove(conn.id, seq, w)
        conn._watches.clear()

    def add_watch(self, conn: Connection, watch: Watch) -> None:
        """Register ``watch`` for ``conn`` (the caller checked it is new)."""
        seq = self._watch_index.add(conn.id, watch)
        conn._watches[(watch.path, watch.token)] = (seq, watch)

    def remove_watch(self, conn: Connection, path: str, token: str) -> bool:
        """Drop ``conn``'s watch on ``path`` with ``token``; False if it has none."""
        entry = conn._watches.pop((path, token), None)
        if entry is None:
            return False
        self._watch_index.remove(conn.id, *entry)
        return True

    def _kill(self, conn: Connection, reason: str) -> None:
        """Close ``conn`` from our side; its queued output stays available."""
        log.info("closing %r: %s", conn, reason)
        self._teardown(conn, reason)
        if conn._on_close is not None:
            conn._on_close(conn)

    def close(self) -> None:
        """Close every connection."""
        with self.lock:
            for conn in list(self._connections.values()):
                self._kill(conn, "daemon shutting down")

    # Requests.

    def caller(self, conn: Connection) -> Caller:
        dom = self._domains.get(conn.domid)
        return Caller(conn.domid, dom.target if dom is not None else None)

    def _process(self, conn: Connection, msg: Message) -> None:
        try:
            payload = _requests.dispatch(self, conn, msg)
            if len(payload) > XENSTORE_PAYLOAD_MAX:
                raise XsError(errno.E2BIG, "reply too long")
            reply = Message(msg.type, msg.req_id, msg.tx_id, payload)
        except XsError as e:
            conn._deferred.clear()
            name = errno_name(e.errno).encode() + b"\0"
            reply = Message(XsdType.XS_ERROR, msg.req_id, msg.tx_id, name)
        conn._queue(reply.encode())
        for event in conn._deferred:
            conn._queue(event, True)
        conn._deferred.clear()

    def access(self, conn: Connection | None, txn: Transaction | None = None) -> Access:
        caller = SYSTEM if conn is None else self.caller(conn)
        return Access(self.store, caller, self.quotas, txn, self)

    # The domains that exist (XSA-322), for the store (DomainTable).

    def _known(self, domid: int) -> int | None:
        """The generation of ``domid`` if it exists; forgets a domain that was
        only created by the host once the host has destroyed it (``check_domains``)."""
        gen = self._domain_gen.get(domid)
        if (gen is not None and domid != 0 and domid not in self._domains
                and self._domain_exists is not None and not self._domain_exists(domid)):
            del self._domain_gen[domid]
            return None
        return gen

    def older(self, domid: int, generation: int) -> bool:
        """``chk_domain_generation``."""
        gen = self._known(domid)
        return gen is not None and gen <= generation

    def alloc_permref(self, domid: int) -> bool:
        """``domain_alloc_permrefs`` for one entry."""
        if self._known(domid) is not None:
            return True
        if (self._domain_exists is not None and 0 <= domid < DOMID_FIRST_RESERVED
                and self._domain_exists(domid)):
            self._domain_gen[domid] = self.store.generation  # alloc_domain
            return True
        return False

    def domain_exists(self, domid: int) -> bool:
        """Does ``domid`` exist for xenstored (dom0, introduced, or created by the host)?"""
        with self.lock:
            return self._known(domid) is not None

    # Watches.

    def _fire(self, changes: list[Change]) -> None:
        """C xenstored's ``fire_watches`` (xenstored_watch.c): for each connection in
        the order they were made that may see the change (``watch_permitted``,
        ``check_perms_special``), an event for each of its watches the change
        matches, in the order they were registered. Only connections with a
        matching watch are looked at (the index), in that same order."""
        for change in changes:
            last = -1
            conn: Connection | None = None
            for (conn_id, _), w in self._watch_index.matching(change.path, change.exact):
                if conn_id != last:
                    last = conn_id
                    conn = self._connections.get(conn_id)
                    if conn is not None and not self._may_see(conn, change):
                        conn = None
                if conn is not None:
                    conn._queue_event(w.event_payload(change.path), change.path)

    def _may_see(self, conn: Connection, change: Change) -> bool:
        """``watch_permitted`` / ``check_perms_special`` of C xenstored."""
        caller = self.caller(conn)
        now = self.store.generation
        if change.path.startswith("@"):
            perms = self.store.special_perms.get(change.path)
            return perms is not None and self._readable(caller, perms, now)
        if change.old_perms is not None and self._readable(caller, change.old_perms, now):
            return True
        node = change.node if change.node is not None else self.store.nodes.get(change.path)
        if node is None:
            return False
        if self._readable(caller, node.perms, node.generation):
            return True
        parent = change.parent
        if parent is None:
            parent = self.store.nodes.get(parent_path(change.path))
        return parent is not None and self._readable(caller, parent.perms, parent.generation)

    def _readable(self, caller: Caller, perms: tuple[Perm, ...], generation: int) -> bool:
        perms = adjust_perms(perms, generation, self.older)
        return bool(perm_for(caller, perms) & _READ)

    def domain_watches(self, domid: int) -> int:
        return sum(len(c._watches) for c in self._domain_conns.get(domid, {}).values())

    # Domains.

    def is_domain_introduced(self, domid: int) -> bool:
        """True for dom0 and for every domain introduced and not yet released."""
        with self.lock:
            return domid == 0 or domid in self._domains

    def introduce_domain(self, domid: int, *, gfn: int = 0, port: int = 0) -> str:
        """The toolstack's INTRODUCE: returns the domain's home path.

        Creates ``/local/domain/<domid>`` owned by the domain (perms
        ``n<domid>``) if needed, then fires ``@introduceDomain``. Introducing
        a domain again resets its ring connection (``domain_conn_reset``).
        """
        with self.lock:
            self._check_guest(domid)
            home = _home.introduce_home(self, domid)
            self._introduce(domid, gfn, port)
            return home

    def _check_guest(self, domid: int) -> None:
        if not 0 < domid < DOMID_FIRST_RESERVED:
            raise XsError(errno.EINVAL, f"domain {domid} cannot be introduced")

    def _introduce_master(self) -> None:
        """INTRODUCE of domain 0: ``introduce_domain`` finds the master domain
        introduced already (``dom0_init``), so nothing is created and no
        ``@introduceDomain`` fires; ``do_introduce`` then resets its connection
        (``domain_conn_reset`` of dom0's ring, not of the socket clients)."""
        self._conn_reset(0)

    def _conn_reset(self, domid: int) -> None:
        """C 4.17 ``domain_conn_reset`` of the domain's own (ring) connection:
        its watches and transactions go, its buffered output
        (``conn_free_buffered_data``) and partly read input (``conn->in``) are
        dropped, and the transport zeroes the ring's four indices."""
        for conn in list(self._domain_conns.get(domid, {}).values()):
            if not conn.ring:
                continue
            self._reset(conn)
            conn._out.clear()
            conn._partial = b""
            conn._deferred.clear()
            conn._reader = MessageReader()
            if conn._on_reset is not None:
                conn._on_reset(conn)

    def _introduce(self, domid: int, gfn: int, port: int) -> None:
        dom = self._domains.get(domid)
        if dom is not None:
            dom.gfn, dom.port = gfn, port
            self._conn_reset(domid)
            return
        self._domains[domid] = _Domain(domid, gfn, port)
        self._domain_gen.setdefault(domid, self.store.generation)  # find_or_alloc_domain
        self._fire([Change("@introduceDomain", exact=True)])

    def release_domain(self, domid: int) -> None:
        """The toolstack's RELEASE (or domain destruction).

        Closes the domain's connections, removes every node the domain owns,
        forgets it in the special watch permissions, fires ``@releaseDomain``.
        """
        with self.lock:
            if domid not in self._domains:
                raise XsError(errno.ENOENT, f"domain {domid} is not introduced")
            del self._domains[domid]
            # destroy_domain: the struct domain goes, and with it every
            # permission entry naming it (a later domain with this domid is younger).
            self._domain_gen.pop(domid, None)
            for conn in list(self._domain_conns.get(domid, {}).values()):
                self._kill(conn, f"domain {domid} released")
            for dom in self._domains.values():
                if dom.target == domid:
                    dom.target = None
            acc = self.access(None)
            _home.remove_domain_nodes(self, acc, domid)
            self._fire(acc.changes)
            for name in SPECIAL_PATHS:
                perms = self.store.special_perms[name]
                if all(p.domid != domid for p in perms):
                    continue  # what the rebuild would make: an equal tuple
                owner = perms[0] if perms[0].domid != domid else Perm(0, perms[0].access)
                rest = tuple(p for p in perms[1:] if p.domid != domid)
                self.store.special_perms[name] = (owner, *rest)
            self._fire([Change("@releaseDomain", exact=True)])

    def domain_shutdown(self, domid: int) -> None:
        """A domain shut down or crashed: fire ``@releaseDomain`` once (until RESUME)."""
        with self.lock:
            dom = self._domains.get(domid)
            if dom is None:
                raise XsError(errno.ENOENT, f"domain {domid} is not introduced")
            if not dom.shutdown:
                dom.shutdown = True
                self._fire([Change("@releaseDomain", exact=True)])

    def _domain(self, domid: int) -> _Domain:
        dom = self._domains.get(domid)
        if dom is None:
            raise XsError(errno.ENOENT, f"domain {domid} is not introduced")
        return dom

    # Direct access for the toolstack (privileged, outside transactions).

    def read(self, path: str) -> bytes:
        with self.lock:
            return self.access(None).read_node(path).value

    def exists(self, path: str) -> bool:
        with self.lock:
            try:
                self.access(None).read_node(path)
            except XsError as e:
                if e.errno == errno.ENOENT:
                    return False
                raise
            return True

    def directory(self, path: str) -> list[str]:
        with self.lock:
            return list(self.access(None).read_node(path).children)

    def get_perms(self, path: str) -> list[str]:
        with self.lock:
            return [str(p) for p in self.access(None).read_node(path).perms]

    def write(self, path: str, value: bytes) -> None:
        self._apply(lambda acc: acc.write(path, value))

    def mkdir(self, path: str) -> None:
        self._apply(lambda acc: acc.mkdir(path))

    def rm(self, path: str) -> None:
        self._apply(lambda acc: acc.rm(path))

    def set_perms(self, path: str, perms: list[str]) -> None:
        self._apply(lambda acc: acc.set_perms(path, perms))

    def _apply(self, op: Callable[[Access], None]) -> None:
        with self.lock:
            acc = self.access(None)
            op(acc)
            self._fire(acc.changes)

    # Accounting.

    def statistics(self) -> XenstoredStatistics:
        with self.lock:
            conns = self._connections.values()
            return XenstoredStatistics(
                nodes=len(self.store.nodes),
                watches=self._watch_index.size,
                transactions=sum(len(c.transactions) for c in conns),
                connections=len(self._connections),
                domains=len(self._domains),
            )

    def connections(self) -> list[Connection]:
        with self.lock:
            return list(self._connections.values())

    def domain_usage(self, domid: int) -> dict[str, int]:
        """Quota accounting of one domain (CONTROL quota <domid>)."""
        with self.lock:
            conns = list(self._domain_conns.get(domid, {}).values())
            return {
                "nodes": self.store.owner_counts[domid],
                "watches": sum(len(c._watches) for c in conns),
                "transactions": sum(len(c.transactions) for c in conns),
            }
