"""Per-domain xenstore rings: how a guest reaches xenstored, as on Xen.

Rules (``io/xs_wire.h``, ``docs/misc/xenstore-ring.txt``, C xenstored ``domain.c``):

- The store page starts with ``struct xenstore_domain_interface``: ``req`` (guest
  to daemon) and ``rsp`` (daemon to guest), two 1024-byte byte rings with
  free-running u32 indices masked with 1023, then ``server_features``,
  ``connection`` and ``error``. The same xs_wire byte stream as on the Unix
  socket runs over the two rings.
- The daemon owns ``req_cons`` and ``rsp_prod``, the guest ``req_prod`` and
  ``rsp_cons``; each side notifies the other over the store event channel after
  moving an index.
- A producer that runs more than 1024 bytes ahead of its consumer is garbage:
  the daemon sets ``error`` (``XENSTORE_ERROR_RINGIDX``), drops the connection's
  watches and transactions and ignores the ring. A message over
  ``XENSTORE_PAYLOAD_MAX`` does the same with ``XENSTORE_ERROR_PROTO``.
- Reconnection (``XENSTORE_SERVER_FEATURE_RECONNECTION``): the guest sets
  ``connection`` to ``XENSTORE_RECONNECT`` and notifies; the daemon discards the
  connection's state, sets every index to 0, clears ``error``, sets
  ``connection`` back to ``XENSTORE_CONNECTED`` and notifies.
- INTRODUCE of a domain already introduced (dom0 included) resets its ring as
  C xenstored 4.17's ``do_introduce`` does: ``domain_conn_reset`` drops the
  connection's watches, transactions, buffered output and partial input and
  sets the four indices to 0 (then ``xen_wmb``); if the guest had asked for a
  reconnect, ``connection`` becomes ``XENSTORE_CONNECTED`` and the guest is
  notified. ``error`` is left as it was, as in C.

The header's constants and the page layout come from :mod:`gntdma.abi.xs_wire`,
shared with the guest client.

Theory of operation
-------------------
A :class:`DomainRing` is made by the toolstack after it introduced the domain.
It maps the guest's store page through the reserved grant reference
``GNTTAB_RESERVED_XENSTORE`` (dom0's own store page is simply its own memory),
binds the guest's unbound store port, and runs :meth:`DomainRing._intr` on an
interrupt thread of the daemon's domain for every notification. The handler
copies request bytes out of the ring with the sans-IO
:class:`~gntdma.abi.xs_ring.XsByteRing` shared with the guest client (indices
are read once, validated against our own shadow copies, then the bytes are
copied before anything looks at them), feeds them to the domain's
:class:`~gntdma.xenstored._core.Connection`,
and writes the queued replies and watch events into the response ring as far
as there is room. It stops taking requests while replies are waiting for room
(the guest frees room, notifies, and the handler goes on).

Output that the core queues on its own (a watch fired by another connection,
perhaps from the socket server's OS thread) reaches the ring through the
connection's ``on_output`` hook. That hook runs under the core lock: it only
posts one callback into the scheduler (:meth:`Scheduler.post`, safe from any
OS thread), which sets the daemon's port pending so the handler runs again.

The core's lock is re-entrant and all kernel threads share one OS thread, so
it must never be held across a scheduling point. Here the core is entered only
through ``feed``, ``data_to_send``, ``has_output`` and ``close``, none of which
schedules, and the hooks never schedule either; the barriers of the handler
are outside every call into the core.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, final

from gntdma.abi.grant_table import (
    GNTTAB_RESERVED_XENSTORE,
    GNTMAP_host_map,
    GNTST_okay,
    GnttabMapGrantRef,
    GNTTABOP_map_grant_ref,
    GNTTABOP_unmap_grant_ref,
    GnttabUnmapGrantRef,
)
from gntdma.abi.xs_ring import XsByteRing
from gntdma.abi.xs_wire import (
    XENSTORE_CONNECTED,
    XENSTORE_DOMAIN_INTERFACE_OFFSETS,
    XENSTORE_ERROR_NONE,
    XENSTORE_ERROR_PROTO,
    XENSTORE_RECONNECT,
    XENSTORE_SERVER_FEATURE_ERROR,
    XENSTORE_SERVER_FEATURE_RECONNECTION,
)
from gntdma.errors import GntdmaError
from gntdma.hv import Hypervisor, map_grant_ref_op, unmap_grant_ref_op
from gntdma.sched import Scheduler, mb, rmb, wmb
from gntdma.xenstored._core import Connection, Xenstored

__all__ = [
    "MAP_ADDRESSES",
    "DomainRing",
    "MapAddresses",
    "RingError",
    "RingStatistics",
]

log = logging.getLogger("gntdma.xenstored")

# The fields of the store page, in the header's order (which gntdma.abi.xs_wire checks).
_FEATURES = XENSTORE_DOMAIN_INTERFACE_OFFSETS["server_features"]
_CONNECTION = XENSTORE_DOMAIN_INTERFACE_OFFSETS["connection"]
_ERROR = XENSTORE_DOMAIN_INTERFACE_OFFSETS["error"]
_U32: Final = struct.Struct("=I")
#: Features this daemon offers.
_SERVER_FEATURES: Final = XENSTORE_SERVER_FEATURE_RECONNECTION | XENSTORE_SERVER_FEATURE_ERROR


#: xenstored's own address range for the store pages it maps (a dom0 user
#: process picks the address of a grant map itself; gntdma's is private to it).
XENSTORED_MAP_BASE: Final = 0x7F00_0000_0000
XENSTORED_MAP_PAGES: Final = 0x8000  # one page per domain: DOMID_FIRST_RESERVED
_PAGE_SIZE: Final = 4096


class MapAddresses:
    """Page-aligned, non-zero host addresses for grant maps, from a private range."""

    def __init__(self, base: int = XENSTORED_MAP_BASE, pages: int = XENSTORED_MAP_PAGES) -> None:
        assert base != 0 and base % _PAGE_SIZE == 0
        self._base = base
        self._pages = pages
        self._next = 0
        self._free: list[int] = []
        self.in_use: set[int] = set()
        self._lock = threading.Lock()

    def alloc(self) -> int:
        with self._lock:
            if self._free:
                addr = self._free.pop()
            elif self._next < self._pages:
                addr = self._base + self._next * _PAGE_SIZE
                self._next += 1
            else:
                raise RingError("xenstored: no free address to map a store page at")
            self.in_use.add(addr)
            return addr

    def free(self, addr: int) -> None:
        with self._lock:
            self.in_use.remove(addr)
            self._free.append(addr)


#: The addresses of the one xenstored process of the emulated host.
MAP_ADDRESSES: Final = MapAddresses()


class RingError(GntdmaError):
    """The ring of a domain cannot be set up (grant map or event channel refused)."""


def _closed(conn: Connection) -> bool:
    return conn.closed


class _Gone(Exception):
    """The ring was closed while its handler was preempted at a barrier."""


@dataclass(frozen=True, slots=True)
class RingStatistics:
    """What one domain's ring carried, and how often it was reset."""

    domid: int
    request_bytes: int
    response_bytes: int
    notifications: int
    #: times the daemon found garbage and stopped serving the ring
    errors: int
    #: resets done on the guest's request (``XENSTORE_RECONNECT``)
    reconnects: int
    #: the page's ``error`` field as the daemon last set it
    error: int
    #: the error of the last reset (``XENSTORE_ERROR_*``), 0 if none yet
    last_error: int


@final
class DomainRing:
    """The daemon's end of one domain's xenstore ring.

    ``gfn`` and ``port`` are what the toolstack passed to INTRODUCE: the guest's
    store page and its unbound store port (allocated with ``server_domid`` as the
    remote domain). A foreign guest's page is mapped through ``gref`` (grant ref
    1 by default); the server domain's own page is used directly.
    """

    def __init__(
        self,
        xenstored: Xenstored,
        hv: Hypervisor,
        sched: Scheduler,
        domid: int,
        *,
        gfn: int,
        port: int,
        server_domid: int = 0,
        gref: int = GNTTAB_RESERVED_XENSTORE,
    ) -> None:
        self.xenstored = xenstored
        self.domid = domid
        self.server_domid = server_domid
        self.gfn = gfn
        self.remote_port = port
        self._hv = hv
        self._sched = sched
        self._sched_ident = threading.get_ident()
        self.closed = False
        #: dom0's maptrack handle of the mapped page (None: the server's own page)
        self.handle: int | None = None
        #: the host address the page is mapped at (0: the server's own page)
        self.host_addr = 0
        self.local_port = 0
        self.error = XENSTORE_ERROR_NONE
        self.last_error = XENSTORE_ERROR_NONE
        self._in_service = False
        self._kick_posted = False
        #: an INTRODUCE reset the connection: the handler zeroes the ring first
        self._reset_pending = False
        #: counts those resets; a ring operation begun before one is abandoned
        self._epoch = 0
        self._op_epoch = 0
        self._request_bytes = 0
        self._response_bytes = 0
        self._notifications = 0
        self._errors = 0
        self._reconnects = 0
        self._page = self._map_page(gref)
        try:
            rc, lport = hv.evtchn_bind_interdomain(server_domid, domid, port)
            if rc != 0:
                raise RingError(f"dom{domid}: cannot bind store port {port} ({rc})")
            self.local_port = lport
            self._init_page()
            self.conn = self._connect()
            rc = hv.evtchn_bind_handler(server_domid, lport, self._intr,
                                        name=f"xenstored/d{domid}")
            if rc != 0:
                raise RingError(f"dom{domid}: cannot bind the handler of port {lport} ({rc})")
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"error {self.error}" if self.error else "up"
        return f"<DomainRing dom{self.domid} port {self.local_port} {state}>"

    # -- setup and teardown -----------------------------------------------------------

    def _map_page(self, gref: int) -> memoryview:
        if self.domid == self.server_domid:
            return self._hv.domains[self.domid].memory.page(self.gfn)
        addr = MAP_ADDRESSES.alloc()
        op = map_grant_ref_op(addr, GNTMAP_host_map, gref, self.domid)
        rc, res = self._hv.grant_table_op(self.server_domid, GNTTABOP_map_grant_ref, [op])
        r = res[0] if rc == 0 and res else None
        if not isinstance(r, GnttabMapGrantRef) or r.status != GNTST_okay:
            MAP_ADDRESSES.free(addr)
            status = r.status if isinstance(r, GnttabMapGrantRef) else rc
            raise RingError(f"dom{self.domid}: cannot map store grant {gref} ({status})")
        self.handle = r.handle
        self.host_addr = addr
        return self._hv.mapped_page(self.server_domid, r.handle)

    def _init_page(self) -> None:
        page = self._page
        _U32.pack_into(page, _FEATURES, _SERVER_FEATURES)
        _U32.pack_into(page, _ERROR, XENSTORE_ERROR_NONE)
        self._ring = XsByteRing(page, server=True, wmb=lambda: self._barrier(wmb),
                                rmb=lambda: self._barrier(rmb), mb=lambda: self._barrier(mb))

    def _connect(self) -> Connection:
        conn = self.xenstored.connect(self.domid, name=f"ring{self.domid}", ring=True)
        conn.set_callbacks(on_output=self._on_output, on_close=self._on_close,
                           on_reset=self._on_reset)
        return conn

    def close(self) -> None:
        """Drop the connection, close the daemon's port, unmap the page. Idempotent."""
        if self.closed:
            return
        self.closed = True
        conn = getattr(self, "conn", None)
        if conn is not None:
            conn.set_callbacks(None, None)
            conn.close()
        if self.local_port != 0:
            self._hv.evtchn_close(self.server_domid, self.local_port)
            self.local_port = 0
        if self.handle is not None:
            op = unmap_grant_ref_op(self.host_addr, self.handle)
            rc, res = self._hv.grant_table_op(self.server_domid, GNTTABOP_unmap_grant_ref, [op])
            r = res[0] if rc == 0 and res else None
            if isinstance(r, GnttabUnmapGrantRef) and r.status == GNTST_okay:
                MAP_ADDRESSES.free(self.host_addr)  # else leaked: never reused while mapped
            else:
                log.warning("dom%d: unmap of the store page failed (%s)", self.domid,
                            r.status if isinstance(r, GnttabUnmapGrantRef) else rc)
            self.handle = None
            self.host_addr = 0
        else:
            self._page.release()

    def statistics(self) -> RingStatistics:
        return RingStatistics(self.domid, self._request_bytes, self._response_bytes,
                              self._notifications, self._errors, self._reconnects,
                              self.error, self.last_error)

    # -- hooks from the core (core lock held, maybe another OS thread) ----------------

    def _on_output(self) -> None:
        if self._in_service and threading.get_ident() == self._sched_ident:
            return  # the running handler pushes it before it returns
        self._post_kick()

    def _on_close(self, conn: Connection) -> None:
        self._post_kick()

    def _on_reset(self, conn: Connection) -> None:
        """INTRODUCE reset the connection: the ring is zeroed before anything else.

        Under the core lock, maybe on another OS thread: only note it and make
        the handler run; an operation of the handler under way is abandoned at
        its next barrier.
        """
        self._reset_pending = True
        self._epoch += 1
        self._post_kick()

    def _post_kick(self) -> None:
        if self._kick_posted:
            return
        self._kick_posted = True
        self._sched.post(self._kick)

    def _kick(self) -> None:
        """In the hub: make the handler run (set our own port pending)."""
        self._kick_posted = False
        if self.closed:
            return
        d = self._hv.domains.get(self.server_domid)
        p = d.ports.get(self.local_port) if d is not None else None
        if p is not None:
            p.raise_()

    # -- the handler (an interrupt thread of the daemon's domain) ---------------------

    def _barrier(self, fn: Callable[[], None]) -> None:
        fn()
        if self.closed or self._epoch != self._op_epoch:
            raise _Gone

    def _intr(self, port: int) -> None:
        if self.closed:
            return
        self._in_service = True
        try:
            self._service()
        except _Gone:
            pass
        finally:
            self._in_service = False

    def _service(self) -> None:
        page = self._page
        if self._reset_pending:
            self._conn_reset()
        if _U32.unpack_from(page, _CONNECTION)[0] == XENSTORE_RECONNECT:
            self._reconnect()
            return
        if self.error != XENSTORE_ERROR_NONE:
            return  # ignored until the guest asks for a reconnect
        notify = False
        while True:
            if self._reset_pending:  # an INTRODUCE this ring just carried
                self._conn_reset()
            moved = self._push_output()
            if self.error == XENSTORE_ERROR_NONE:
                moved = self._pull_input() or moved
            if self.error != XENSTORE_ERROR_NONE:
                notify = True
                break
            if not moved:
                break
            notify = True
        if notify:
            self._notify()

    def _fail(self, code: int, why: str) -> None:
        """Garbage from the guest: reset the connection and ignore the ring."""
        log.warning("dom%d: xenstore ring reset: %s", self.domid, why)
        self.error = self.last_error = code
        self._errors += 1
        _U32.pack_into(self._page, _ERROR, code)
        self.conn.set_callbacks(None, None)
        self.conn.close()

    def _pull_input(self) -> bool:
        """Take the request bytes the guest produced and feed them to the core."""
        conn = self.conn
        if conn.closed:
            self._fail(XENSTORE_ERROR_PROTO, conn.close_reason or "connection closed")
            return False
        if conn.has_output:
            return False  # replies first: the guest frees room and notifies
        self._op_epoch = self._epoch
        res, data = self._ring.read()
        if res.error != 0:
            self._fail(res.error, res.detail)
            return False
        if res.moved == 0:
            return False
        self._request_bytes += res.moved
        conn.feed(data)
        if _closed(conn):  # a protocol error: the core dropped it
            self._fail(XENSTORE_ERROR_PROTO, conn.close_reason or "protocol error")
        return True

    def _push_output(self) -> bool:
        """Write queued replies and events into the response ring as room allows."""
        conn = self.conn
        if not conn.has_output:
            return False
        self._op_epoch = self._epoch
        res, room, cons = self._ring.room()
        if res.error != 0:
            self._fail(res.error, res.detail)
            return False
        if room == 0:
            return False
        data = conn.data_to_send(room)
        if not data:
            return False
        res = self._ring.write(data, cons)
        self._response_bytes += res.moved
        return res.moved > 0

    def _conn_reset(self) -> None:
        """The ring half of ``domain_conn_reset``, then ``do_introduce``'s reconnect."""
        self._reset_pending = False
        page = self._page
        self._ring.reset()
        self._op_epoch = self._epoch
        self._barrier(wmb)  # xen_wmb()
        if _U32.unpack_from(page, _CONNECTION)[0] == XENSTORE_RECONNECT:
            _U32.pack_into(page, _CONNECTION, XENSTORE_CONNECTED)
            self._notify()

    def _reconnect(self) -> None:
        """The guest asked for a reset: fresh connection, indices 0, CONNECTED."""
        page = self._page
        old = self.conn
        old.set_callbacks(None, None)
        old.close()
        self._ring.reset()
        self.error = XENSTORE_ERROR_NONE
        _U32.pack_into(page, _ERROR, XENSTORE_ERROR_NONE)
        _U32.pack_into(page, _FEATURES, _SERVER_FEATURES)
        self.conn = self._connect()
        self._reconnects += 1
        self._reset_pending = False  # the connection and the ring are new anyway
        self._op_epoch = self._epoch
        self._barrier(wmb)
        _U32.pack_into(page, _CONNECTION, XENSTORE_CONNECTED)
        self._notify()

    def _notify(self) -> None:
        self._notifications += 1
        self._hv.evtchn_send(self.server_domid, self.local_port)
