"""The guest's xenstore client over its store ring (FreeBSD ``sys/xen/xenstore/xenstore.c``).

Rules (``io/xs_wire.h``, ``docs/misc/xenstore-ring.txt``):

- The store page holds ``struct xenstore_domain_interface``: ``req`` (ours to
  write) and ``rsp`` (the daemon's), 1024-byte byte rings with free-running u32
  indices masked with 1023. We own ``req_prod`` and ``rsp_cons``; both sides
  notify over the store event channel after moving an index.
- Every message is the 16-byte ``xsd_sockmsg`` header and at most
  ``XENSTORE_PAYLOAD_MAX`` bytes. Replies carry the request's ``req_id``; errors
  come back as ``XS_ERROR`` with the errno *name*. Watch events (``req_id`` 0)
  carry ``path\\0token\\0``.
- If the daemon sets ``error`` (it found garbage in our ring), the connection is
  gone: requests in flight fail with ``EIO`` and the client asks for a reset
  (``connection`` = ``XENSTORE_RECONNECT``); once the daemon says
  ``XENSTORE_CONNECTED`` again the watches are registered anew.

The header's definitions (message types, limits, the error table, the
``xsd_sockmsg`` header and the page layout) come from :mod:`gntdma.abi.xs_wire`,
shared with the daemon.

Theory of operation
-------------------
:class:`XenStore` is the ``xs`` softc of one guest kernel. Any kernel thread
(or thread0) may call the ``xs_*`` functions; each returns an errno int, 0 on
success, with out-values after it, as the C functions do. A request gets a
``req_id`` and waits (``tsleep``) until the reply with that id arrives, so
several threads may have requests in flight at once. Writers take
``xs_request`` (a sleep mutex) so that one message is written into the request
ring contiguously; a writer that finds the ring full sleeps until the daemon
notifies.

The store event channel's handler runs on the guest's interrupt thread: it
copies the response bytes out of the ring, gives the room back, cuts the bytes
into messages, hands replies to their waiters and queues watch events for the
``xenwatch`` thread, which calls each watch's callback with ``(path, token)``.
Callbacks therefore run in one thread, one at a time, and may call ``xs_*``
functions themselves (the interrupt thread never blocks on xenstore).
"""

from __future__ import annotations

import errno
import itertools
import logging
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, final

from gntdma.abi.xs_wire import (
    MASK_XENSTORE_IDX,
    XENSTORE_CONNECTED,
    XENSTORE_DOMAIN_INTERFACE_OFFSETS,
    XENSTORE_ERROR_NONE,
    XENSTORE_PAYLOAD_MAX,
    XENSTORE_RECONNECT,
    XENSTORE_RING_SIZE,
    XENSTORE_SERVER_FEATURE_RECONNECTION,
    XsdSockmsg,
    XsdType,
    errno_from_name,
)
from gntdma.sched import (
    MTX_DEF,
    KThread,
    Mutex,
    current_scheduler,
    mb,
    mtx_lock,
    mtx_unlock,
    rmb,
    tsleep,
    wakeup,
    wmb,
)
from gntdma.xen.hypercall import Hypercalls

__all__ = [
    "XST_NIL",
    "XS_TRANSACTION_RETRIES",
    "XenStore",
    "XenStoreStatistics",
    "XsWatch",
    "XsWatchCallback",
    "xs_attach",
    "xs_join",
]

log = logging.getLogger("gntdma.xen.xenstore")

#: The null transaction (FreeBSD's ``XST_NIL``).
XST_NIL: Final = 0
#: Times :meth:`XenStore.xs_transaction_run` reruns a transaction that got EAGAIN.
XS_TRANSACTION_RETRIES: Final = 64

# The fields of the store page, in the header's order (which gntdma.abi.xs_wire checks).
(_REQ, _RSP, _REQ_CONS, _REQ_PROD, _RSP_CONS, _RSP_PROD, _FEATURES, _CONNECTION,
 _ERROR) = XENSTORE_DOMAIN_INTERFACE_OFFSETS.values()
_U32: Final = struct.Struct("=I")
_HDR: Final = XsdSockmsg.STRUCT  # struct xsd_sockmsg: type, req_id, tx_id, len
_M32: Final = 0xFFFFFFFF
_T = XsdType

#: ``callback(path, token)``, run on the xenwatch thread.
XsWatchCallback = Callable[[str, str], None]


def xs_join(dir: str, node: str) -> str:
    """FreeBSD ``xs_join``: ``dir/node``, or ``dir`` when ``node`` is empty."""
    return dir if node == "" else f"{dir}/{node}"


def _split(payload: bytes) -> list[str]:
    """NUL-terminated strings of a reply (what follows the last NUL is dropped)."""
    return [p.decode("latin-1") for p in payload.split(b"\0")[:-1]]


@final
class XsWatch:
    """``struct xs_watch``: a node to watch and the callback to run on changes."""

    __slots__ = ("callback", "node", "token")

    def __init__(self, node: str, callback: XsWatchCallback) -> None:
        self.node = node
        self.callback = callback
        #: the token the watch is registered under (None: not registered)
        self.token: str | None = None

    def __repr__(self) -> str:
        return f"<XsWatch {self.node} token={self.token}>"


@final
class _Request:
    __slots__ = ("error", "generation", "reply", "req_id", "started", "type")

    def __init__(self, req_id: int, type_: int) -> None:
        self.req_id = req_id
        self.type = type_
        #: the connection (counted in resets) the request was written on
        self.generation = 0
        #: its first bytes are in the ring: a reset fails it
        self.started = False
        self.reply: tuple[int, bytes] | None = None
        self.error = 0



@dataclass(frozen=True, slots=True)
class XenStoreStatistics:
    """Counts for tests and leak checks."""

    requests: int  #: requests sent
    pending: int  #: requests waiting for their reply
    watches: int  #: watches registered
    events: int  #: watch events delivered to callbacks
    reconnects: int  #: ring resets after an error


@final
class XenStore:
    """The xenstore client of one guest kernel, over its store ring.

    ``store_gfn`` and ``store_port`` are what a guest reads from
    ``HVM_PARAM_STORE_PFN`` and ``HVM_PARAM_STORE_EVTCHN``: the page the domain
    builder set aside and the port the toolstack allocated.
    """

    def __init__(self, hc: Hypercalls, store_gfn: int, store_port: int, *,
                 name: str = "", domain: object | None = None) -> None:
        self.hc = hc
        self.domid = hc.domid
        self.name = name or f"dom{hc.domid}"
        self.store_gfn = store_gfn
        self.store_port = store_port
        self._page: memoryview | None = hc.own_page(store_gfn)
        self.request_lock = Mutex("xs_request", MTX_DEF)
        self._req_prod = _U32.unpack_from(self._page, _REQ_PROD)[0]
        self._rsp_cons = _U32.unpack_from(self._page, _RSP_CONS)[0]
        self._rbuf = bytearray()
        self._req_ids = itertools.count(1)
        self._tokens = itertools.count(1)
        self._pending: dict[int, _Request] = {}
        self._watches: dict[str, XsWatch] = {}
        #: watch events for the xenwatch thread; None asks it to register the watches again
        self._events: deque[tuple[str, str] | None] = deque()
        self._running: XsWatch | None = None
        self._ring_chan = object()  # writers waiting for room, or for the reconnect
        self._watch_chan = object()  # the xenwatch thread waiting for events
        self._done_chan = object()  # unregister waiting for a running callback
        #: False from a daemon-reported error until the reset completes
        self.connected = True
        self._generation = 0
        self._detached = False
        self._requests = 0
        self._delivered = 0
        self._reconnects = 0
        self.xenwatch: KThread = current_scheduler().spawn(
            self._xenwatch_loop, name=f"{self.name}/xenwatch", daemon=True, domain=domain)
        rc = hc.evtchn_bind_handler(store_port, self._intr, name=f"{self.name}/xs_intr")
        if rc != 0:
            self.xs_detach()
            raise OSError(-rc, f"xenstore: cannot bind store port {store_port}")

    def __repr__(self) -> str:
        return f"<XenStore {self.name} port {self.store_port}>"

    # -- the public API: FreeBSD's xs_* functions ---------------------------------------

    def xs_read(self, xbt: int, dir: str, node: str = "") -> tuple[int, bytes]:
        """Read ``dir/node``: (error, value)."""
        return self._talk(_T.XS_READ, xbt, xs_join(dir, node).encode() + b"\0")

    def xs_write(self, xbt: int, dir: str, node: str, value: str | bytes) -> int:
        """Write ``value`` (no trailing NUL goes on the wire) to ``dir/node``."""
        data = value.encode() if isinstance(value, str) else value
        error, _ = self._talk(_T.XS_WRITE, xbt, xs_join(dir, node).encode() + b"\0" + data)
        return error

    def xs_mkdir(self, xbt: int, dir: str, node: str = "") -> int:
        error, _ = self._talk(_T.XS_MKDIR, xbt, xs_join(dir, node).encode() + b"\0")
        return error

    def xs_rm(self, xbt: int, dir: str, node: str = "") -> int:
        """Remove ``dir/node`` and everything below it."""
        error, _ = self._talk(_T.XS_RM, xbt, xs_join(dir, node).encode() + b"\0")
        return error

    def xs_directory(self, xbt: int, dir: str, node: str = "") -> tuple[int, list[str]]:
        """The children of ``dir/node``: (error, names)."""
        error, payload = self._talk(_T.XS_DIRECTORY, xbt, xs_join(dir, node).encode() + b"\0")
        return error, _split(payload) if error == 0 else []

    def xs_exists(self, xbt: int, dir: str, node: str = "") -> int:
        """1 if ``dir/node`` exists (and may be listed), 0 if not (FreeBSD's contract)."""
        error, _ = self.xs_directory(xbt, dir, node)
        return 1 if error == 0 else 0

    def xs_get_perms(self, xbt: int, dir: str, node: str = "") -> tuple[int, list[str]]:
        error, payload = self._talk(_T.XS_GET_PERMS, xbt, xs_join(dir, node).encode() + b"\0")
        return error, _split(payload) if error == 0 else []

    def xs_set_perms(self, xbt: int, dir: str, node: str, perms: list[str]) -> int:
        """Set the permission list (``["n1", "r0"]``: owner first)."""
        payload = xs_join(dir, node).encode() + b"\0" + b"".join(
            p.encode() + b"\0" for p in perms)
        error, _ = self._talk(_T.XS_SET_PERMS, xbt, payload)
        return error

    def xs_get_domain_path(self, domid: int) -> tuple[int, str]:
        error, payload = self._talk(_T.XS_GET_DOMAIN_PATH, XST_NIL, f"{domid}\0".encode())
        return error, payload.rstrip(b"\0").decode("latin-1") if error == 0 else ""

    def xs_transaction_start(self) -> tuple[int, int]:
        """Open a transaction: (error, xbt)."""
        error, payload = self._talk(_T.XS_TRANSACTION_START, XST_NIL, b"\0")
        if error != 0:
            return error, XST_NIL
        text = payload.rstrip(b"\0")
        if not text.isdigit() or int(text) == XST_NIL or int(text) > _M32:
            return errno.EIO, XST_NIL
        return 0, int(text)

    def xs_transaction_end(self, xbt: int, abort: bool) -> int:
        """Commit (``abort`` False) or abort ``xbt``; EAGAIN: redo the transaction."""
        error, _ = self._talk(_T.XS_TRANSACTION_END, xbt, b"F\0" if abort else b"T\0")
        return error

    def xs_transaction_run(self, fn: Callable[[int], int],
                           retries: int = XS_TRANSACTION_RETRIES) -> int:
        """Run ``fn(xbt)`` in a transaction and commit; redo all of it on EAGAIN.

        ``fn`` returns 0 to commit or an errno to abort with (an EAGAIN from
        ``fn`` also reruns it). Returns the first error that is not EAGAIN, or
        EAGAIN after ``retries`` reruns.
        """
        error = errno.EAGAIN
        for _ in range(retries + 1):
            error, xbt = self.xs_transaction_start()
            if error != 0:
                return error
            error = fn(xbt)
            if error != 0:
                self.xs_transaction_end(xbt, abort=True)
            else:
                error = self.xs_transaction_end(xbt, abort=False)
            if error != errno.EAGAIN:
                return error
        return error

    def xs_register_watch(self, watch: XsWatch) -> int:
        """Watch ``watch.node``; the callback runs once soon, then on every change."""
        if watch.token is not None:
            return errno.EEXIST
        token = f"{self.domid}:{next(self._tokens)}"
        watch.token = token
        self._watches[token] = watch
        error, _ = self._talk(_T.XS_WATCH, XST_NIL, f"{watch.node}\0{token}\0".encode())
        if error != 0 and error != errno.EIO:
            # EIO: lost in a reset; the resume registers it again.
            del self._watches[token]
            watch.token = None
        return error

    def xs_unregister_watch(self, watch: XsWatch) -> int:
        """Stop watching; after return the callback is not running nor will run."""
        token = watch.token
        if token is None or self._watches.get(token) is not watch:
            return errno.EINVAL
        del self._watches[token]
        error, _ = self._talk(_T.XS_UNWATCH, XST_NIL, f"{watch.node}\0{token}\0".encode())
        if error in (errno.ENOENT, errno.EIO):
            error = 0  # the daemon forgot it already (a reset)
        if self._events:
            kept = [ev for ev in self._events if ev is None or ev[1] != token]
            self._events.clear()
            self._events.extend(kept)
        me = current_scheduler().curthread
        while self._running is watch and me is not self.xenwatch and not self._detached:
            tsleep(self._done_chan, "xswatchd")
        watch.token = None
        return error

    def xs_detach(self) -> None:
        """The kernel goes away: fail what waits, stop the threads, drop the page."""
        if self._detached:
            return
        self._detached = True
        try:
            self.hc.evtchn_unbind_handler(self.store_port)
        except KeyError:
            pass  # the domain is gone already, and its port with it
        for req in self._pending.values():
            req.error = errno.ENXIO
            wakeup(req)
        wakeup(self._watch_chan)
        wakeup(self._ring_chan)
        wakeup(self._done_chan)
        for w in self._watches.values():
            w.token = None
        self._watches.clear()
        self._events.clear()
        if self._page is not None:
            self._page.release()
            self._page = None

    def statistics(self) -> XenStoreStatistics:
        return XenStoreStatistics(self._requests, len(self._pending), len(self._watches),
                                  self._delivered, self._reconnects)

    # -- requests --------------------------------------------------------------------------

    def _talk(self, type_: int, xbt: int, payload: bytes) -> tuple[int, bytes]:
        """Send one request and sleep until its reply: (error, reply payload)."""
        if self._detached:
            return errno.ENXIO, b""
        if len(payload) > XENSTORE_PAYLOAD_MAX:
            return errno.E2BIG, b""
        if not 0 <= xbt <= _M32:
            return errno.EINVAL, b""
        req_id = next(self._req_ids) & _M32
        while req_id == 0 or req_id in self._pending:
            req_id = next(self._req_ids) & _M32
        req = _Request(req_id, type_)
        self._pending[req_id] = req
        try:
            error = self._send(req, _HDR.pack(type_, req_id, xbt, len(payload)) + payload)
            if error != 0:
                return error, b""
            while req.reply is None and req.error == 0:
                tsleep(req, "xsreply")
        finally:
            self._pending.pop(req_id, None)
        if req.error != 0:
            return req.error, b""
        assert req.reply is not None
        rtype, data = req.reply
        if rtype == _T.XS_ERROR:
            name = data[:-1] if data.endswith(b"\0") else data
            return errno_from_name(name.decode("latin-1")), b""
        if rtype != type_:
            log.warning("%s: reply of type %d to a request of type %d", self.name, rtype, type_)
            return errno.EIO, b""
        return 0, data

    def _send(self, req: _Request, data: bytes) -> int:
        """Write one whole message into the request ring (sleeping for room)."""
        mtx_lock(self.request_lock)
        try:
            while not self.connected and not self._detached:
                tsleep(self._ring_chan, "xsreconn")
            req.generation = self._generation
            req.started = True
            off = 0
            while off < len(data):
                if self._detached:
                    return errno.ENXIO
                if req.error != 0 or req.generation != self._generation or not self.connected:
                    return req.error if req.error != 0 else errno.EIO
                page = self._page
                assert page is not None
                prod = self._req_prod
                cons = _U32.unpack_from(page, _REQ_CONS)[0]
                used = (prod - cons) & _M32
                if used > XENSTORE_RING_SIZE:
                    self._broken("req_cons out of range")
                    return errno.EIO
                room = XENSTORE_RING_SIZE - used
                if room == 0:
                    tsleep(self._ring_chan, "xswrite")
                    continue
                n = min(room, len(data) - off)
                start = prod & MASK_XENSTORE_IDX
                first = min(n, XENSTORE_RING_SIZE - start)
                page[_REQ + start : _REQ + start + first] = data[off : off + first]
                if first < n:
                    page[_REQ : _REQ + n - first] = data[off + first : off + n]
                wmb()  # the bytes before the index
                if self._detached or req.generation != self._generation:
                    continue  # re-checked at the top
                self._req_prod = (prod + n) & _M32
                _U32.pack_into(page, _REQ_PROD, self._req_prod)
                self.hc.evtchn_send(self.store_port)
                off += n
            self._requests += 1
            return 0
        finally:
            mtx_unlock(self.request_lock)

    # -- the store interrupt (guest interrupt thread) -----------------------------------

    def _intr(self, port: int) -> None:
        page = self._page
        if page is None or self._detached:
            return
        if not self.connected:
            self._check_reconnected(page)
            return
        if _U32.unpack_from(page, _ERROR)[0] != XENSTORE_ERROR_NONE:
            self._broken("the daemon reset the connection")
            return
        prod = _U32.unpack_from(page, _RSP_PROD)[0]
        cons = self._rsp_cons
        avail = (prod - cons) & _M32
        if avail > XENSTORE_RING_SIZE:
            self._broken("rsp_prod out of range")
            return
        if avail > 0:
            rmb()  # the bytes after the index
            if self._detached or not self.connected or self._rsp_cons != cons:
                return
            start = cons & MASK_XENSTORE_IDX
            first = min(avail, XENSTORE_RING_SIZE - start)
            self._rbuf += page[_RSP + start : _RSP + start + first]
            if first < avail:
                self._rbuf += page[_RSP : _RSP + avail - first]
            mb()  # done reading before the room is given back
            if self._detached or not self.connected or self._rsp_cons != cons:
                return
            self._rsp_cons = (cons + avail) & _M32
            _U32.pack_into(page, _RSP_CONS, self._rsp_cons)
            self.hc.evtchn_send(self.store_port)
            self._dispatch()
        wakeup(self._ring_chan)  # writers waiting for room

    def _dispatch(self) -> None:
        buf = self._rbuf
        while len(buf) >= _HDR.size:
            type_, req_id, _tx, length = _HDR.unpack_from(buf, 0)
            if length > XENSTORE_PAYLOAD_MAX:
                self._broken(f"reply of {length} bytes")
                return
            end = _HDR.size + length
            if len(buf) < end:
                return
            payload = bytes(buf[_HDR.size : end])
            del buf[:end]
            if type_ == _T.XS_WATCH_EVENT:
                parts = payload.split(b"\0")
                if len(parts) < 3:
                    log.warning("%s: malformed watch event %r", self.name, payload)
                    continue
                self._events.append((parts[0].decode("latin-1"), parts[1].decode("latin-1")))
                wakeup(self._watch_chan)
                continue
            req = self._pending.get(req_id)
            if req is None or req.reply is not None:
                log.warning("%s: reply to unknown request %d", self.name, req_id)
                continue
            req.reply = (type_, payload)
            wakeup(req)

    # -- errors and reconnection ------------------------------------------------------

    def _broken(self, why: str) -> None:
        """The connection is gone: fail what waits, ask the daemon for a reset."""
        page = self._page
        if page is None or not self.connected:
            return
        log.warning("%s: xenstore connection lost: %s", self.name, why)
        self.connected = False
        self._generation += 1
        for req in self._pending.values():
            if req.started and req.reply is None and req.error == 0:
                req.error = errno.EIO
                wakeup(req)
        wakeup(self._ring_chan)  # a writer waiting for room fails its request now
        self._rbuf.clear()
        features = _U32.unpack_from(page, _FEATURES)[0]
        if not features & XENSTORE_SERVER_FEATURE_RECONNECTION:
            return  # stays broken: every request fails with EIO
        _U32.pack_into(page, _CONNECTION, XENSTORE_RECONNECT)
        self.hc.evtchn_send(self.store_port)

    def _check_reconnected(self, page: memoryview) -> None:
        if _U32.unpack_from(page, _CONNECTION)[0] != XENSTORE_CONNECTED:
            return
        if _U32.unpack_from(page, _ERROR)[0] != XENSTORE_ERROR_NONE:
            return
        self._req_prod = _U32.unpack_from(page, _REQ_PROD)[0]
        self._rsp_cons = _U32.unpack_from(page, _RSP_CONS)[0]
        self._rbuf.clear()
        self._reconnects += 1
        self.connected = True
        wakeup(self._ring_chan)
        if self._watches:
            self._events.append(None)
            wakeup(self._watch_chan)

    # -- the xenwatch thread ------------------------------------------------------------

    def _xenwatch_loop(self) -> None:
        while not self._detached:
            if not self._events:
                tsleep(self._watch_chan, "xenwatch")
                continue
            item = self._events.popleft()
            if item is None:
                self._reregister()
                continue
            path, token = item
            w = self._watches.get(token)
            if w is None:
                continue
            self._running = w
            try:
                self._delivered += 1
                w.callback(path, token)
            finally:
                self._running = None
                wakeup(self._done_chan)

    def _reregister(self) -> None:
        for token, w in list(self._watches.items()):
            if self._watches.get(token) is not w:
                continue
            error, _ = self._talk(_T.XS_WATCH, XST_NIL, f"{w.node}\0{token}\0".encode())
            if error not in (0, errno.EEXIST):
                log.warning("%s: watch %s lost in a reset (%d)", self.name, w.node, error)


def xs_attach(hc: Hypercalls, store_gfn: int, store_port: int, *, name: str = "",
              domain: object | None = None) -> tuple[int, XenStore | None]:
    """Attach the kernel's xenstore client to its store page and port: (error, xs)."""
    try:
        return 0, XenStore(hc, store_gfn, store_port, name=name, domain=domain)
    except OSError as e:
        return e.errno if e.errno is not None else errno.ENXIO, None
