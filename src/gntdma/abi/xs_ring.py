"""The xenstore byte ring of a store page (``xen/io/xs_wire.h``), sans-IO.

Theory of operation
-------------------
A store page starts with ``struct xenstore_domain_interface``: ``req`` (guest
to daemon) and ``rsp`` (daemon to guest), two :data:`XENSTORE_RING_SIZE`-byte
byte rings with free-running u32 indices masked with
:data:`MASK_XENSTORE_IDX`, then ``server_features``, ``connection`` and
``error``. An :class:`XsByteRing` is one side's view of the page: the daemon
(``server=True``) consumes ``req`` and produces ``rsp``, the guest the
reverse. Both the daemon (:mod:`gntdma.xenstored._ring`) and the guest client
(:mod:`gntdma.xen.xenstore`) use it.

Rules
-----
- It reads and writes a ``memoryview`` of the shared page and nothing else: it
  never sleeps, never notifies, never logs. :meth:`XsByteRing.read` and
  :meth:`XsByteRing.write` return an :class:`XsRingResult`: how many bytes
  moved and whether the peer should be notified (an index moved); the caller
  sends the event.
- Our own index is a private shadow, written to the page but never read back
  from it (except by :meth:`XsByteRing.resync`, after a reset both sides agreed
  on). The peer's index is copied out of the page once per operation and
  validated before use: a producer more than :data:`XENSTORE_RING_SIZE` bytes
  ahead of its consumer is garbage, reported as ``error`` in the result
  (``XENSTORE_ERROR_RINGIDX``); the caller resets the connection.
- Barriers are the caller's, callables given at construction (no-ops by
  default), called where ``docs/misc/xenstore-ring.txt`` and both C ends put
  them: ``rmb`` after reading the peer's producer index and before reading the
  bytes, ``mb`` after reading them and before giving the room back; ``mb``
  after reading the peer's consumer index and before writing the bytes (Linux
  ``xb_write``, C xenstored ``writechn``), ``wmb`` after writing them and
  before publishing our producer index. A barrier may raise to abandon the
  operation: nothing is published before the last one.
- Bytes are copied out (``bytes``) before the caller sees them.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, final

from gntdma.abi.xs_wire import (
    MASK_XENSTORE_IDX,
    XENSTORE_DOMAIN_INTERFACE_OFFSETS,
    XENSTORE_ERROR_RINGIDX,
    XENSTORE_RING_SIZE,
)

__all__ = ["XsByteRing", "XsRingResult"]

_OFF = XENSTORE_DOMAIN_INTERFACE_OFFSETS
_U32: Final = struct.Struct("=I")
_M32: Final = 0xFFFFFFFF


def _no_barrier() -> None:
    pass


@dataclass(frozen=True, slots=True)
class XsRingResult:
    """What one read or write did."""

    moved: int  #: bytes copied
    notify: bool  #: an index moved: the peer should get an event
    #: ``XENSTORE_ERROR_RINGIDX`` if the peer's index was out of range, else 0
    error: int = 0
    detail: str = ""  #: the offending indices, for the caller's log


_NOTHING: Final = XsRingResult(0, False)


@final
class XsByteRing:
    """One side of a store page's two byte rings."""

    def __init__(self, page: memoryview, *, server: bool,
                 wmb: Callable[[], None] = _no_barrier, rmb: Callable[[], None] = _no_barrier,
                 mb: Callable[[], None] = _no_barrier) -> None:
        self.page = page
        self.server = server
        if server:  # consume req, produce rsp
            self._in, self._in_cons, self._in_prod = _OFF["req"], _OFF["req_cons"], _OFF["req_prod"]
            self._out, self._out_cons, self._out_prod = (_OFF["rsp"], _OFF["rsp_cons"],
                                                         _OFF["rsp_prod"])
        else:
            self._in, self._in_cons, self._in_prod = _OFF["rsp"], _OFF["rsp_cons"], _OFF["rsp_prod"]
            self._out, self._out_cons, self._out_prod = (_OFF["req"], _OFF["req_cons"],
                                                         _OFF["req_prod"])
        self._wmb, self._rmb, self._mb = wmb, rmb, mb
        self.cons = 0  #: our consumer index (shadow)
        self.prod = 0  #: our producer index (shadow)
        self.resync()

    def resync(self) -> None:
        """Take our own indices from the page (at attach, or after a reset)."""
        self.cons = _U32.unpack_from(self.page, self._in_cons)[0]
        self.prod = _U32.unpack_from(self.page, self._out_prod)[0]

    def reset(self) -> None:
        """Set all four indices to 0 (the daemon's side of a reconnection)."""
        for name in ("req_cons", "req_prod", "rsp_cons", "rsp_prod"):
            _U32.pack_into(self.page, _OFF[name], 0)
        self.cons = self.prod = 0

    def _bad(self, prod: int, cons: int, what: str) -> XsRingResult:
        return XsRingResult(0, False, XENSTORE_ERROR_RINGIDX,
                            f"{what}: prod {prod:#x} cons {cons:#x}")

    # -- consuming -------------------------------------------------------------------

    def available(self) -> tuple[XsRingResult, int]:
        """(result, bytes the peer produced): an error result if its index is garbage."""
        prod = _U32.unpack_from(self.page, self._in_prod)[0]  # the one fetch
        avail = (prod - self.cons) & _M32
        if avail > XENSTORE_RING_SIZE:
            return self._bad(prod, self.cons, "input ring"), 0
        return _NOTHING, avail

    def read(self, max_bytes: int | None = None) -> tuple[XsRingResult, bytes]:
        """Copy out what the peer produced (up to ``max_bytes``) and give the room back."""
        res, avail = self.available()
        if res.error != 0 or avail == 0:
            return res, b""
        if max_bytes is not None:
            avail = min(avail, max_bytes)
            if avail <= 0:
                return _NOTHING, b""
        self._rmb()  # the bytes after the index
        cons = self.cons
        start = cons & MASK_XENSTORE_IDX
        first = min(avail, XENSTORE_RING_SIZE - start)
        page, ring = self.page, self._in
        data = bytes(page[ring + start: ring + start + first])
        if first < avail:
            data += bytes(page[ring: ring + avail - first])
        self._mb()  # done reading before the room is given back
        self.cons = (cons + avail) & _M32
        _U32.pack_into(page, self._in_cons, self.cons)
        return XsRingResult(avail, True), data

    # -- producing -------------------------------------------------------------------

    def room(self) -> tuple[XsRingResult, int, int]:
        """(result, free bytes, the peer's consumer index as read) for :meth:`write`."""
        cons = _U32.unpack_from(self.page, self._out_cons)[0]  # the one fetch
        used = (self.prod - cons) & _M32
        if used > XENSTORE_RING_SIZE:
            return self._bad(self.prod, cons, "output ring"), 0, cons
        return _NOTHING, XENSTORE_RING_SIZE - used, cons

    def write(self, data: bytes | bytearray | memoryview,
              cons: int | None = None) -> XsRingResult:
        """Copy as much of ``data`` as fits and publish it.

        ``cons``: the peer's consumer index a :meth:`room` call returned (the
        room the caller sized ``data`` for); None reads it now.
        """
        if cons is None:
            res, room, cons = self.room()
            if res.error != 0:
                return res
        else:
            used = (self.prod - cons) & _M32
            if used > XENSTORE_RING_SIZE:
                return self._bad(self.prod, cons, "output ring")
            room = XENSTORE_RING_SIZE - used
        n = min(room, len(data))
        if n == 0:
            return _NOTHING
        self._mb()  # the consumer index before the bytes it frees
        prod = self.prod
        start = prod & MASK_XENSTORE_IDX
        first = min(n, XENSTORE_RING_SIZE - start)
        page, ring = self.page, self._out
        page[ring + start: ring + start + first] = data[:first]
        if first < n:
            page[ring: ring + n - first] = data[first:n]
        self._wmb()  # the bytes before the index
        self.prod = (prod + n) & _M32
        _U32.pack_into(page, self._out_prod, self.prod)
        return XsRingResult(n, True)
