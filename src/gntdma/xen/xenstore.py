"""The guest's xenstore client over its store ring (FreeBSD ``sys/dev/xen/xenstore/xenstore.c``).

Rules (``io/xs_wire.h``, ``docs/misc/xenstore-ring.txt``):

- The store page holds ``struct xenstore_domain_interface``: ``req`` (ours to
  write) and ``rsp`` (the daemon's), 1024-byte byte rings with free-running u32
  indices masked with 1023. We own ``req_prod`` and ``rsp_cons``; both sides
  notify over the store event channel after moving an index.
- Every message is the 16-byte ``xsd_sockmsg`` header and at most
  ``XENSTORE_PAYLOAD_MAX`` bytes. Replies carry the request's ``req_id``; errors
  come back as ``XS_ERROR`` with the errno *name*. Watch events (``req_id`` 0)
  carry ``path\\0token\\0``.
- If the daemon sets ``error`` (it found garbage in our ring), or publishes an
  index more than a ring's size away from ours, the connection is gone:
  requests in flight fail with ``EIO`` and the client asks for a reset
  (``connection`` = ``XENSTORE_RECONNECT``); once the daemon says
  ``XENSTORE_CONNECTED`` again the watches are registered anew.

The header's definitions come from :mod:`gntdma.abi.xs_wire`; the byte ring
itself (indices read once and validated, barriers where Linux's
``xb_write``/``xb_read`` and FreeBSD's ``xs_write_store``/``xs_read_store``
put them) is :class:`gntdma.abi.xs_ring.XsByteRing`, shared with the daemon.

Theory of operation
-------------------
:class:`XenStore` is the ``xs`` softc of one guest kernel. Any kernel thread
(or thread0) may call the ``xs_*`` functions; each returns an errno int, 0 on
success, with out-values after it, as the C functions do. A request gets a
``req_id`` and sleeps until the reply with that id arrives, so several threads
may have requests in flight at once (FreeBSD keeps one: its ``request_mutex``
is held until the reply; ours only while the message is written).

Locks, as FreeBSD's softc has them:

- ``request_lock`` (sx "xenstore request"): held exclusive while one message is
  written into the request ring, so that it goes in contiguously; sleepable,
  because a writer that finds the ring full sleeps for room.
- ``ring_lock`` (mutex "ring lock"): the connection state (connected, the
  generation counted in resets, detached) and the wakeups of writers waiting
  for room or for a reconnect; a writer checks for room and sleeps with it as
  the interlock, the store interrupt wakes writers with it held, so no wakeup
  is lost. The bytes are copied with it dropped, as ``xs_write_store`` does;
  a reset or detach meanwhile makes the ring's next barrier abandon the copy.
- ``reply_lock`` (mutex "reply lock"): the requests waiting for replies; each
  waiter sleeps with it as the interlock, as ``xs_read_reply`` does.
- ``registered_watches_lock`` (mutex "watches") and ``watch_events_lock``
  (mutex "watch events"): the watch table and the queue of watch events.
- ``xenwatch_lock`` (sx "xenwatch"): held by the xenwatch thread while it runs
  a callback; ``xs_unregister_watch`` takes and drops it to wait for a running
  callback, unless the xenwatch thread unregisters from a callback.

Lock order: ``xenwatch_lock`` before ``request_lock``; ``ring_lock`` before
``reply_lock``; no sx is taken with a mutex held.

The store event channel's handler runs on the guest's interrupt thread: it
copies the response bytes out of the ring, gives the room back, cuts the bytes
into messages, hands replies to their waiters and queues watch events for the
``xenwatch`` thread, which calls each watch's callback with ``(path, token)``.
Callbacks therefore run in one thread, one at a time, and may call ``xs_*``
functions themselves (the interrupt thread never blocks on xenstore). The
xenwatch thread's wait for events is an idle wait (``PIDLE``): the hung-task
watchdog does not count it.
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

from gntdma.abi.xs_ring import XsByteRing
from gntdma.abi.xs_wire import (
    XENSTORE_CONNECTED,
    XENSTORE_DOMAIN_INTERFACE_OFFSETS,
    XENSTORE_ERROR_NONE,
    XENSTORE_PAYLOAD_MAX,
    XENSTORE_RECONNECT,
    XENSTORE_SERVER_FEATURE_RECONNECTION,
    XsdSockmsg,
    XsdType,
    errno_from_name,
)
from gntdma.sched import (
    MTX_DEF,
    PIDLE,
    KThread,
    Mutex,
    Sx,
    current_scheduler,
    mb,
    msleep,
    mtx_lock,
    mtx_unlock,
    rmb,
    sx_xlock,
    sx_xunlock,
    wakeup,
    wmb,
)
from gntdma.xen.hypercall import Hypercalls
from gntdma.xen.xenstore_ops import (
    XS_TRANSACTION_RETRIES,
    XST_NIL,
    XsOps,
    XsWatch,
    XsWatchCallback,
    xs_join,
)

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

_FEATURES: Final = XENSTORE_DOMAIN_INTERFACE_OFFSETS["server_features"]
_CONNECTION: Final = XENSTORE_DOMAIN_INTERFACE_OFFSETS["connection"]
_ERROR: Final = XENSTORE_DOMAIN_INTERFACE_OFFSETS["error"]
_U32: Final = struct.Struct("=I")
_HDR: Final = XsdSockmsg.STRUCT  # struct xsd_sockmsg: type, req_id, tx_id, len
_M32: Final = 0xFFFFFFFF
_T = XsdType

#: In the watch event queue: register the watches again (after a reconnect).
_RESUME: Final = ("", "")


class _Reset(Exception):
    """A ring operation was abandoned at a barrier: the connection was reset or detached."""


@final
class _Request:
    __slots__ = ("error", "generation", "reply", "req_id", "started", "type")

    def __init__(self, req_id: int, type_: int) -> None:
        self.req_id = req_id
        self.type = type_
        #: the connection (counted in resets) the request was written on (ring_lock)
        self.generation = 0
        #: its first bytes are in the ring: a reset fails it (ring_lock)
        self.started = False
        self.reply: tuple[int, bytes] | None = None  # reply_lock
        self.error = 0  # reply_lock


@dataclass(frozen=True, slots=True)
class XenStoreStatistics:
    """Counts for tests and leak checks."""

    requests: int  #: requests sent
    pending: int  #: requests waiting for their reply
    watches: int  #: watches registered
    events: int  #: watch events delivered to callbacks
    reconnects: int  #: ring resets after an error


@final
class XenStore(XsOps):
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
        self.request_lock = Sx("xenstore request")
        self.ring_lock = Mutex("ring lock", MTX_DEF)
        self.reply_lock = Mutex("reply lock", MTX_DEF)
        self.registered_watches_lock = Mutex("watches", MTX_DEF)
        self.watch_events_lock = Mutex("watch events", MTX_DEF)
        self.xenwatch_lock = Sx("xenwatch")
        #: False from a daemon-reported error until the reset completes (ring_lock)
        self.connected = True
        self._generation = 0  # ring_lock
        self._detached = False  # ring_lock
        #: ring operations under way with ring_lock dropped; the last one after
        #: a detach releases the page (ring_lock)
        self._ring_users = 0
        self._ring = self._new_ring(hc.own_page(store_gfn))
        self._rbuf = bytearray()  # the interrupt thread's
        self._req_ids = itertools.count(1)
        self._tokens = itertools.count(1)
        self._pending: dict[int, _Request] = {}  # reply_lock
        self._watches: dict[str, XsWatch] = {}  # registered_watches_lock
        #: watch events for the xenwatch thread; _RESUME: register the watches again
        self._events: deque[tuple[str, str]] = deque()  # watch_events_lock
        self._ring_chan = object()  # writers waiting for room, or for the reconnect
        self._watch_chan = object()  # the xenwatch thread waiting for events
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

    @property
    def ring(self) -> XsByteRing:
        """The byte ring of the current connection."""
        return self._ring

    # -- watches and life cycle (the requests are XsOps') ------------------------------

    def xs_register_watch(self, watch: XsWatch) -> int:
        """Watch ``watch.node``; the callback runs once soon, then on every change."""
        mtx_lock(self.registered_watches_lock)
        if watch.token is not None:
            mtx_unlock(self.registered_watches_lock)
            return errno.EEXIST
        token = f"{self.domid}:{next(self._tokens)}"
        watch.token = token
        self._watches[token] = watch
        mtx_unlock(self.registered_watches_lock)
        error, _ = self._talk(_T.XS_WATCH, XST_NIL, f"{watch.node}\0{token}\0".encode())
        if error != 0 and error != errno.EIO:
            # EIO: lost in a reset; the resume registers it again.
            mtx_lock(self.registered_watches_lock)
            if self._watches.get(token) is watch:
                del self._watches[token]
                watch.token = None
            mtx_unlock(self.registered_watches_lock)
        return error

    def xs_unregister_watch(self, watch: XsWatch) -> int:
        """Stop watching; after return the callback is not running nor will run."""
        mtx_lock(self.registered_watches_lock)
        token = watch.token
        if token is None or self._watches.get(token) is not watch:
            mtx_unlock(self.registered_watches_lock)
            return errno.EINVAL
        del self._watches[token]
        mtx_unlock(self.registered_watches_lock)
        error, _ = self._talk(_T.XS_UNWATCH, XST_NIL, f"{watch.node}\0{token}\0".encode())
        if error in (errno.ENOENT, errno.EIO, errno.ENXIO):
            error = 0  # the daemon forgot it already (a reset), or we are going away
        mtx_lock(self.watch_events_lock)  # cancel its pending events
        if any(ev[1] == token for ev in self._events):
            kept = [ev for ev in self._events if ev[1] != token]
            self._events.clear()
            self._events.extend(kept)
        mtx_unlock(self.watch_events_lock)
        if current_scheduler().curthread is not self.xenwatch:
            # Flush a callback running now, unless we are it (xs_unregister_watch).
            sx_xlock(self.xenwatch_lock)
            sx_xunlock(self.xenwatch_lock)
        watch.token = None
        return error

    def xs_detach(self) -> None:
        """The kernel goes away: fail what waits, stop the threads, drop the page."""
        mtx_lock(self.ring_lock)
        if self._detached:
            mtx_unlock(self.ring_lock)
            return
        self._detached = True
        if self._ring_users == 0:
            self._ring.page.release()
        wakeup(self._ring_chan)
        mtx_unlock(self.ring_lock)
        try:
            self.hc.evtchn_unbind_handler(self.store_port)
        except KeyError:
            pass  # the domain is gone already, and its port with it
        mtx_lock(self.reply_lock)
        for req in self._pending.values():
            req.error = errno.ENXIO
            wakeup(req)
        mtx_unlock(self.reply_lock)
        mtx_lock(self.watch_events_lock)
        self._events.clear()
        wakeup(self._watch_chan)
        mtx_unlock(self.watch_events_lock)
        mtx_lock(self.registered_watches_lock)
        for w in self._watches.values():
            w.token = None
        self._watches.clear()
        mtx_unlock(self.registered_watches_lock)

    def statistics(self) -> XenStoreStatistics:
        return XenStoreStatistics(self._requests, len(self._pending), len(self._watches),
                                  self._delivered, self._reconnects)

    # -- the ring --------------------------------------------------------------------------

    def _new_ring(self, page: memoryview) -> XsByteRing:
        """The byte ring of the connection now; its barriers abandon it after a reset."""
        generation = self._generation

        def barrier(fn: Callable[[], None]) -> Callable[[], None]:
            def b() -> None:
                fn()
                if self._detached or self._generation != generation:
                    raise _Reset
            return b

        return XsByteRing(page, server=False, wmb=barrier(wmb), rmb=barrier(rmb),
                          mb=barrier(mb))

    def _ring_done(self) -> None:
        """A ring operation with ring_lock dropped is over (ring_lock held)."""
        self._ring_users -= 1
        if self._ring_users == 0 and self._detached:
            self._ring.page.release()

    # -- requests --------------------------------------------------------------------------

    def _talk(self, type_: int, xbt: int, payload: bytes) -> tuple[int, bytes]:
        """Send one request and sleep until its reply: (error, reply payload)."""
        if self._detached:
            return errno.ENXIO, b""
        if len(payload) > XENSTORE_PAYLOAD_MAX:
            return errno.E2BIG, b""
        if not 0 <= xbt <= _M32:
            return errno.EINVAL, b""
        mtx_lock(self.reply_lock)
        req_id = next(self._req_ids) & _M32
        while req_id == 0 or req_id in self._pending:
            req_id = next(self._req_ids) & _M32
        req = _Request(req_id, type_)
        self._pending[req_id] = req
        mtx_unlock(self.reply_lock)
        error = self._send(req, _HDR.pack(type_, req_id, xbt, len(payload)) + payload)
        mtx_lock(self.reply_lock)
        if error == 0:
            # FreeBSD xs_read_reply: mtx_sleep(&xs.reply_list, &xs.reply_lock, ...).
            while req.reply is None and req.error == 0:
                msleep(req, self.reply_lock, "xswait")
            error = req.error
        del self._pending[req_id]
        mtx_unlock(self.reply_lock)
        if error != 0:
            return error, b""
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
        sx_xlock(self.request_lock)
        try:
            return self._write_store(req, data)
        finally:
            sx_xunlock(self.request_lock)

    def _write_store(self, req: _Request, data: bytes) -> int:
        """FreeBSD ``xs_write_store``, the whole message (request_lock held)."""
        mtx_lock(self.ring_lock)
        while not self.connected and not self._detached:
            msleep(self._ring_chan, self.ring_lock, "xsreconn")
        req.generation = self._generation
        req.started = True
        off = 0
        while True:  # ring_lock held here
            if self._detached:
                mtx_unlock(self.ring_lock)
                return errno.ENXIO
            if req.generation != self._generation or not self.connected:
                mtx_unlock(self.ring_lock)
                return errno.EIO
            if off == len(data):
                self._requests += 1
                mtx_unlock(self.ring_lock)
                return 0
            ring = self._ring
            res, room, cons = ring.room()
            if res.error != 0:
                mtx_unlock(self.ring_lock)
                self._broken(res.detail)
                mtx_lock(self.ring_lock)
                continue
            if room == 0:
                # Checked and slept on with ring_lock: the interrupt's wakeup is not lost.
                msleep(self._ring_chan, self.ring_lock, "xbwrite")
                continue
            self._ring_users += 1
            mtx_unlock(self.ring_lock)
            moved = 0
            try:
                moved = ring.write(data[off: off + room], cons).moved
            except _Reset:
                pass  # reset or detached meanwhile: nothing published
            mtx_lock(self.ring_lock)
            self._ring_done()
            if moved > 0:
                off += moved
                mtx_unlock(self.ring_lock)
                self.hc.evtchn_send(self.store_port)
                mtx_lock(self.ring_lock)

    # -- the store interrupt (guest interrupt thread) -----------------------------------

    def _intr(self, port: int) -> None:
        mtx_lock(self.ring_lock)
        if self._detached:
            mtx_unlock(self.ring_lock)
            return
        if not self.connected:
            mtx_unlock(self.ring_lock)
            self._check_reconnected()
            return
        ring = self._ring
        if _U32.unpack_from(ring.page, _ERROR)[0] != XENSTORE_ERROR_NONE:
            mtx_unlock(self.ring_lock)
            self._broken("the daemon reset the connection")
            return
        self._ring_users += 1
        mtx_unlock(self.ring_lock)
        try:
            res, data = ring.read()
        except _Reset:
            res, data = None, b""
        mtx_lock(self.ring_lock)
        self._ring_done()
        mtx_unlock(self.ring_lock)
        if res is None:
            return
        if res.error != 0:
            self._broken(res.detail)
            return
        if res.moved > 0:
            self.hc.evtchn_send(self.store_port)
            self._rbuf += data
            self._dispatch()
        # FreeBSD xs_intr: hold ring_lock across the wakeup so no writer misses it.
        mtx_lock(self.ring_lock)
        wakeup(self._ring_chan)
        mtx_unlock(self.ring_lock)

    def _dispatch(self) -> None:
        buf = self._rbuf
        events: list[tuple[str, str]] = []
        while len(buf) >= _HDR.size:
            type_, req_id, _tx, length = _HDR.unpack_from(buf, 0)
            if length > XENSTORE_PAYLOAD_MAX:
                self._broken(f"reply of {length} bytes")
                break
            end = _HDR.size + length
            if len(buf) < end:
                break
            payload = bytes(buf[_HDR.size: end])
            del buf[:end]
            if type_ == _T.XS_WATCH_EVENT:
                parts = payload.split(b"\0")
                if len(parts) < 3:
                    log.warning("%s: malformed watch event %r", self.name, payload)
                    continue
                events.append((parts[0].decode("latin-1"), parts[1].decode("latin-1")))
                continue
            mtx_lock(self.reply_lock)
            req = self._pending.get(req_id)
            if req is None or req.reply is not None:
                mtx_unlock(self.reply_lock)
                log.warning("%s: reply to unknown request %d", self.name, req_id)
                continue
            req.reply = (type_, payload)
            wakeup(req)
            mtx_unlock(self.reply_lock)
        if events:
            self._queue_events(events)

    def _queue_events(self, events: list[tuple[str, str]]) -> None:
        mtx_lock(self.watch_events_lock)
        if not self._detached:
            self._events.extend(events)
            wakeup(self._watch_chan)
        mtx_unlock(self.watch_events_lock)

    # -- errors and reconnection ------------------------------------------------------

    def _broken(self, why: str) -> None:
        """The connection is gone: fail what waits, ask the daemon for a reset."""
        mtx_lock(self.ring_lock)
        if self._detached or not self.connected:
            mtx_unlock(self.ring_lock)
            return
        log.warning("%s: xenstore connection lost: %s", self.name, why)
        self.connected = False
        self._generation += 1
        mtx_lock(self.reply_lock)
        for req in self._pending.values():
            if req.started and req.generation != self._generation and req.reply is None \
                    and req.error == 0:
                req.error = errno.EIO
                wakeup(req)
        mtx_unlock(self.reply_lock)
        wakeup(self._ring_chan)  # a writer waiting for room fails its request now
        page = self._ring.page
        ask = (_U32.unpack_from(page, _FEATURES)[0] & XENSTORE_SERVER_FEATURE_RECONNECTION) != 0
        if ask:
            _U32.pack_into(page, _CONNECTION, XENSTORE_RECONNECT)
        mtx_unlock(self.ring_lock)
        if ask:  # else stays broken: every request fails with EIO
            self.hc.evtchn_send(self.store_port)

    def _check_reconnected(self) -> None:
        mtx_lock(self.ring_lock)
        page = self._ring.page
        if (self._detached or self.connected
                or _U32.unpack_from(page, _CONNECTION)[0] != XENSTORE_CONNECTED
                or _U32.unpack_from(page, _ERROR)[0] != XENSTORE_ERROR_NONE):
            mtx_unlock(self.ring_lock)
            return
        self._ring = self._new_ring(page)  # the daemon's fresh indices
        self._rbuf.clear()
        self._reconnects += 1
        self.connected = True
        wakeup(self._ring_chan)
        mtx_unlock(self.ring_lock)
        mtx_lock(self.registered_watches_lock)
        resume = bool(self._watches)
        mtx_unlock(self.registered_watches_lock)
        if resume:
            self._queue_events([_RESUME])

    # -- the xenwatch thread ------------------------------------------------------------

    def _xenwatch_loop(self) -> None:
        while True:
            mtx_lock(self.watch_events_lock)
            while not self._events and not self._detached:
                msleep(self._watch_chan, self.watch_events_lock, "waitev", pri=PIDLE)
            if self._detached:
                mtx_unlock(self.watch_events_lock)
                return
            mtx_unlock(self.watch_events_lock)
            sx_xlock(self.xenwatch_lock)
            try:
                mtx_lock(self.watch_events_lock)
                item = self._events.popleft() if self._events else None
                mtx_unlock(self.watch_events_lock)
                if item is _RESUME:
                    self._reregister()
                elif item is not None:
                    self._deliver(*item)
            finally:
                sx_xunlock(self.xenwatch_lock)

    def _deliver(self, path: str, token: str) -> None:
        mtx_lock(self.registered_watches_lock)
        w = self._watches.get(token)
        mtx_unlock(self.registered_watches_lock)
        if w is not None:
            self._delivered += 1
            w.callback(path, token)

    def _reregister(self) -> None:
        mtx_lock(self.registered_watches_lock)
        watches = list(self._watches.items())
        mtx_unlock(self.registered_watches_lock)
        for token, w in watches:
            mtx_lock(self.registered_watches_lock)
            current = self._watches.get(token) is w
            mtx_unlock(self.registered_watches_lock)
            if not current:
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
