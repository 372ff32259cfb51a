"""The generic Xen shared ring (``xen/io/ring.h``), sans-IO.

Theory of operation
-------------------

A shared ring is a 64-byte header (:class:`SringHeader`: ``req_prod``,
``req_event``, ``rsp_prod``, ``rsp_event``) followed by ``nr_ents`` slots of
``entry_size`` bytes, ``nr_ents`` being the largest power of two that fits in the
area (``__RD32``). The frontend produces requests and consumes responses
(:class:`FrontRing`), the backend the reverse (:class:`BackRing`). Both work on
a ``memoryview`` of the same shared pages; neither sleeps, signals or logs. A
producer's push returns whether the peer asked to be notified; the caller sends
the event (or not). Indices are free-running u32 values that wrap at ``2**32``;
the slot of index ``i`` is ``i & (nr_ents - 1)``.

Rules
-----

- Barriers are the caller's: ``wmb``, ``rmb`` and ``mb`` callables passed at
  construction (no-ops by default) are called exactly where ``ring.h`` places
  ``xen_wmb``/``xen_mb`` (push: ``wmb`` before publishing the producer index,
  ``mb`` before reading the peer's event index; final check: ``mb`` between
  writing our event index and re-reading the producer index) and where every
  consumer loop places ``rmb`` (after reading the peer's producer index, before
  reading slots: in :meth:`FrontRing.unconsumed_responses` and
  :meth:`BackRing.unconsumed_requests`).
- Every slot is copied out (``bytes``) before anyone looks at it: a peer that
  rewrites a slot after we read it cannot change what we validated.
- A peer's producer index is validated every time it is read: a frontend may
  never have more than ``nr_ents`` requests outstanding
  (``RING_REQUEST_PROD_OVERFLOW``) and its index may not go backwards; a
  backend may not publish more responses than there are requests
  (``RING_RESPONSE_PROD_OVERFLOW``, and stricter: not more than were pushed).
  A violation raises :class:`RingProtocolError`; the ring is then broken and the
  driver disconnects the device.
- Misuse by our own side (putting into a full ring, getting past what
  ``unconsumed_*`` reported, answering a request never consumed) raises
  :class:`OverflowError` or :class:`IndexError`: a bug, not a peer's doing.
- A put writes ``len(data)`` bytes at the start of the slot and leaves the rest
  as it was, as a C assignment of a smaller union member does.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Final, final

from gntdma.abi._wire import Field, Layout, WireStruct, layout, wire
from gntdma.abi.xen import PAGE_SIZE
from gntdma.errors import GntdmaError

__all__ = [
    "SRING_HEADER_SIZE",
    "BackRing",
    "Barrier",
    "FrontRing",
    "RingArea",
    "RingProtocolError",
    "SringHeader",
    "ring_nr_ents",
    "sring_init",
]

#: Bytes of the shared-ring header before the first slot (``offsetof(sring, ring)``).
SRING_HEADER_SIZE: Final = 64

_M: Final = 0xFFFFFFFF
_U32: Final = struct.Struct("<I")
_REQ_PROD: Final = 0
_REQ_EVENT: Final = 4
_RSP_PROD: Final = 8
_RSP_EVENT: Final = 12

#: A memory barrier: called at the points ring.h names, does whatever the caller needs.
Barrier = Callable[[], None]

#: The shared ring area: one buffer, or the ring's pages (each 4096 bytes, in order),
#: since the pages of a multi-page ring need not be contiguous in a domain's memory.
RingArea = bytearray | memoryview | Sequence[bytearray | memoryview]


def _no_barrier() -> None:
    return None


def _writable(buf: bytearray | memoryview) -> memoryview:
    view = memoryview(buf)
    if view.readonly:
        raise ValueError("a shared ring needs a writable buffer")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


class RingProtocolError(GntdmaError):
    """The peer broke the shared-ring protocol (its producer index is impossible)."""


@final
@wire(size=SRING_HEADER_SIZE)
@dataclass(frozen=True, slots=True)
class SringHeader(WireStruct):
    """The 64-byte header of a shared ring (``struct <name>_sring`` up to ``ring``).

    ``pvt`` is the 4-byte private union (``netif.smartpoll_active``,
    ``tapif_user.msg``, ``pvt_pad``); ``__pad`` is zero.
    """

    CTYPE: ClassVar[str] = "struct blkif_sring"
    LAYOUT: ClassVar[Layout] = layout(
        ("req_prod", "I"),
        ("req_event", "I"),
        ("rsp_prod", "I"),
        ("rsp_event", "I"),
        ("", "4s", "pvt"),
        ("__pad", "44x"),
        extra=(
            ("pvt", 16, 4),
            ("pvt.netif", 16, 1),
            ("pvt.netif.smartpoll_active", 16, 1),
            ("pvt.tapif_user", 16, 1),
            ("pvt.tapif_user.msg", 16, 1),
            ("pvt.pvt_pad", 16, 4),
        ),
    )
    STRUCT: ClassVar[struct.Struct] = LAYOUT.struct
    FIELDS: ClassVar[tuple[Field, ...]] = LAYOUT.fields

    req_prod: int = 0
    req_event: int = 0
    rsp_prod: int = 0
    rsp_event: int = 0
    pvt: bytes = bytes(4)


def _rd32(x: int) -> int:
    """``__RD32``: round a u32 down to a power of two (0 stays 0)."""
    return 1 << (x.bit_length() - 1) if x > 0 else 0


def ring_nr_ents(area_size: int, entry_size: int) -> int:
    """Slots of a ring of ``entry_size`` entries in ``area_size`` bytes (``__RING_SIZE``).

    Raises:
        ValueError: not even one slot fits, or the sizes are not positive.
    """
    if entry_size <= 0 or area_size <= SRING_HEADER_SIZE:
        raise ValueError(f"no ring of {entry_size}-byte entries fits in {area_size} bytes")
    n = _rd32((area_size - SRING_HEADER_SIZE) // entry_size)
    if n == 0:
        raise ValueError(f"no ring of {entry_size}-byte entries fits in {area_size} bytes")
    return n


def sring_init(buf: RingArea) -> None:
    """``SHARED_RING_INIT``: both producers 0, both events 1, private and pad zeroed.

    The slots are not touched. Only the frontend initialises a ring.
    """
    first = buf if isinstance(buf, (bytearray, memoryview)) else buf[0]
    SringHeader(req_event=1, rsp_event=1).pack_into(_writable(first), 0)


class _Ring:
    __slots__ = ("_hdr", "_idx", "_mask", "_mb", "_pages", "_rmb", "_slots", "_wmb",
                 "entry_size", "nr_ents")

    def __init__(self, buf: RingArea, entry_size: int, area_size: int | None,
                 wmb: Barrier, rmb: Barrier, mb: Barrier) -> None:
        if isinstance(buf, (bytearray, memoryview)):
            pages = [_writable(buf)]
        else:
            pages = [_writable(p) for p in buf]
            if not pages or any(len(p) != PAGE_SIZE for p in pages):
                raise ValueError(f"a ring's pages must each be {PAGE_SIZE} bytes")
        total = sum(len(p) for p in pages)
        area = total if area_size is None else area_size
        if area > total:
            raise ValueError(f"ring area of {area} bytes in a {total}-byte buffer")
        self._pages = pages
        self._hdr = pages[0]
        #: Bytes per slot (``sizeof(union <name>_sring_entry)``).
        self.entry_size = entry_size
        #: Number of slots (``RING_SIZE``), a power of two.
        self.nr_ents = ring_nr_ents(area, entry_size)
        self._wmb = wmb
        self._rmb = rmb
        self._mb = mb
        self._mask = self.nr_ents - 1
        #: The four u32 indices of the header as a view of u32 (a host of the ABI's
        #: little-endian order), else None and read with struct.
        self._idx: memoryview | None = (
            self._hdr[:_RSP_EVENT + 4].cast("I")
            if sys.byteorder == "little" and _U32.size == struct.calcsize("I") else None)
        #: A view of each slot, if the ring is one buffer (no slot straddles a page).
        self._slots: list[memoryview] | None = None
        if len(pages) == 1:
            es = entry_size
            self._slots = [self._hdr[o:o + es] for o in
                           range(SRING_HEADER_SIZE, SRING_HEADER_SIZE + self.nr_ents * es, es)]

    def _get(self, off: int) -> int:
        idx = self._idx
        if idx is not None:
            v: int = idx[off >> 2]
            return v
        v = _U32.unpack_from(self._hdr, off)[0]
        return v

    def _set(self, off: int, value: int) -> None:
        idx = self._idx
        if idx is not None:
            idx[off >> 2] = value & _M
            return
        _U32.pack_into(self._hdr, off, value & _M)

    def _slot(self, idx: int) -> int:
        return SRING_HEADER_SIZE + (idx & self._mask) * self.entry_size

    def _read_slot(self, idx: int) -> bytes:
        slots = self._slots
        if slots is not None:
            return bytes(slots[idx & self._mask])
        off = self._slot(idx)
        out = bytearray()
        end = off + self.entry_size
        while off < end:  # a slot may straddle two pages
            page, o = divmod(off, PAGE_SIZE)
            n = min(end - off, PAGE_SIZE - o)
            out += self._pages[page][o:o + n]
            off += n
        return bytes(out)

    def _write_slot(self, idx: int, data: bytes | bytearray | memoryview) -> None:
        size = len(data)
        if size > self.entry_size:
            raise ValueError(f"{size}-byte entry in a ring of {self.entry_size}-byte slots")
        slots = self._slots
        if slots is not None:
            slots[idx & self._mask][:size] = data
            return
        off = self._slot(idx)
        src = memoryview(data).cast("B")
        done = 0
        while done < size:
            page, o = divmod(off + done, PAGE_SIZE)
            n = min(size - done, PAGE_SIZE - o)
            self._pages[page][o:o + n] = src[done:done + n]
            done += n

    def _push(self, prod_off: int, event_off: int, new: int) -> bool:
        idx = self._idx
        if idx is None:
            old = self._get(prod_off)
            self._wmb()  # the peer sees the slots before the producer index
            self._set(prod_off, new)
            self._mb()  # the peer sees the new index before we read its event index
            return ((new - self._get(event_off)) & _M) < ((new - old) & _M)
        p = prod_off >> 2  # the same, on the u32 view of the header
        old = idx[p]
        self._wmb()
        idx[p] = new & _M
        self._mb()
        return ((new - idx[event_off >> 2]) & _M) < ((new - old) & _M)

    def header(self) -> SringHeader:
        """A snapshot of the shared header (for statistics and tests)."""
        return SringHeader.unpack_from(self._hdr, 0)


@final
class FrontRing(_Ring):
    """The frontend's end: produces requests, consumes responses.

    Args:
        buf: the shared ring area: a ``bytearray`` or writable ``memoryview``, or
            the sequence of the ring's 4096-byte pages in order.
        entry_size: bytes per slot, ``max(sizeof request, sizeof response)``.
        start: ``FRONT_RING_ATTACH`` index for both private indices (0 = init).
        area_size: ring bytes (pages * 4096) if ``buf`` is longer than the ring.
        wmb, rmb, mb: barrier callables (see the module rules).
    """

    __slots__ = ("_rsp_seen", "req_prod_pvt", "rsp_cons")

    def __init__(self, buf: RingArea, entry_size: int, *, start: int = 0,
                 area_size: int | None = None, wmb: Barrier = _no_barrier,
                 rmb: Barrier = _no_barrier, mb: Barrier = _no_barrier) -> None:
        super().__init__(buf, entry_size, area_size, wmb, rmb, mb)
        #: Next request slot to fill (private).
        self.req_prod_pvt = start & _M
        #: Next response to consume.
        self.rsp_cons = start & _M
        self._rsp_seen = self.rsp_cons

    def free_requests(self) -> int:
        """``RING_FREE_REQUESTS``: slots we may fill before responses come back."""
        return self.nr_ents - ((self.req_prod_pvt - self.rsp_cons) & _M)

    def full(self) -> bool:
        """``RING_FULL``: no free request slot (``free_requests() == 0``)."""
        return (self.req_prod_pvt - self.rsp_cons) & _M == self.nr_ents

    def put_request(self, data: bytes | bytearray | memoryview) -> None:
        """Write a request into the next private slot (not yet visible to the backend).

        Raises:
            OverflowError: the ring is full.
            ValueError: ``data`` is longer than a slot.
        """
        prod = self.req_prod_pvt
        if (prod - self.rsp_cons) & _M == self.nr_ents:  # full()
            raise OverflowError("put_request on a full ring")
        slots = self._slots
        if slots is not None and len(data) <= self.entry_size:  # _write_slot of one buffer
            slots[prod & self._mask][:len(data)] = data
        else:
            self._write_slot(prod, data)
        self.req_prod_pvt = (prod + 1) & _M

    def push_requests(self) -> bool:
        """``RING_PUSH_REQUESTS_AND_CHECK_NOTIFY``: publish; True if the backend must be
        notified (its ``req_event`` lies in the newly published range)."""
        idx = self._idx
        if idx is None:
            return self._push(_REQ_PROD, _REQ_EVENT, self.req_prod_pvt)
        new = self.req_prod_pvt  # _push on the u32 view of the header, one call fewer a push
        old = idx[_REQ_PROD >> 2]
        self._wmb()
        idx[_REQ_PROD >> 2] = new & _M
        self._mb()
        return ((new - idx[_REQ_EVENT >> 2]) & _M) < ((new - old) & _M)

    def _responses(self) -> tuple[int, int]:
        idx = self._idx
        prod: int = idx[_RSP_PROD >> 2] if idx is not None else self._get(_RSP_PROD)
        n = (prod - self.rsp_cons) & _M
        if n > self.nr_ents:
            raise RingProtocolError(
                f"backend rsp_prod {prod} is {n} past rsp_cons {self.rsp_cons}"
                f" in a ring of {self.nr_ents}")
        if n > (self.req_prod_pvt - self.rsp_cons) & _M:
            raise RingProtocolError(
                f"backend rsp_prod {prod} answers requests never made"
                f" (req_prod_pvt {self.req_prod_pvt}, rsp_cons {self.rsp_cons})")
        return prod, n

    def unconsumed_responses(self) -> int:
        """Responses ready to consume: reads ``rsp_prod``, validates it, then ``rmb``.

        Raises:
            RingProtocolError: the backend published an impossible ``rsp_prod``.
        """
        prod, n = self._responses()
        self._rmb()  # read the slots only after the index that covers them
        self._rsp_seen = prod
        return n

    def get_response(self) -> bytes:
        """Copy out the response at ``rsp_cons`` and advance.

        Raises:
            IndexError: no response seen by the last :meth:`unconsumed_responses`.
        """
        cons = self.rsp_cons
        if cons == self._rsp_seen:
            raise IndexError("get_response past the responses seen")
        slots = self._slots
        data = bytes(slots[cons & self._mask]) if slots is not None else self._read_slot(cons)
        self.rsp_cons = (cons + 1) & _M
        return data

    def final_check_for_responses(self) -> bool:
        """``RING_FINAL_CHECK_FOR_RESPONSES``: True if responses are pending; otherwise
        ask for an event at the next response (``rsp_event = rsp_cons + 1``), ``mb``,
        and check again. Call :meth:`unconsumed_responses` before consuming.

        Raises:
            RingProtocolError: the backend published an impossible ``rsp_prod``.
        """
        if self._responses()[1] != 0:
            return True
        self._set(_RSP_EVENT, self.rsp_cons + 1)
        self._mb()
        return self._responses()[1] != 0


@final
class BackRing(_Ring):
    """The backend's end: consumes requests, produces responses.

    Args: as for :class:`FrontRing` (``start`` is ``BACK_RING_ATTACH``'s index).
    """

    __slots__ = ("_req_seen", "req_cons", "rsp_prod_pvt")

    def __init__(self, buf: RingArea, entry_size: int, *, start: int = 0,
                 area_size: int | None = None, wmb: Barrier = _no_barrier,
                 rmb: Barrier = _no_barrier, mb: Barrier = _no_barrier) -> None:
        super().__init__(buf, entry_size, area_size, wmb, rmb, mb)
        #: Next response slot to fill (private).
        self.rsp_prod_pvt = start & _M
        #: Next request to consume.
        self.req_cons = start & _M
        self._req_seen = self.req_cons

    def _requests(self) -> tuple[int, int]:
        idx = self._idx
        prod: int = idx[_REQ_PROD >> 2] if idx is not None else self._get(_REQ_PROD)
        if (prod - self.rsp_prod_pvt) & _M > self.nr_ents:
            raise RingProtocolError(
                f"frontend req_prod {prod} has more than {self.nr_ents} requests outstanding"
                f" (rsp_prod_pvt {self.rsp_prod_pvt})")
        n = (prod - self.req_cons) & _M
        if n > self.nr_ents:
            raise RingProtocolError(
                f"frontend req_prod {prod} went back behind req_cons {self.req_cons}")
        return prod, n

    def unconsumed_requests(self) -> int:
        """Requests ready to consume: reads ``req_prod``, validates it, then ``rmb``.

        Raises:
            RingProtocolError: the frontend published an impossible ``req_prod``.
        """
        prod, n = self._requests()
        self._rmb()  # read the slots only after the index that covers them
        self._req_seen = prod
        return n

    def get_request(self) -> bytes:
        """Copy out the request at ``req_cons`` and advance.

        Raises:
            IndexError: no request seen by the last :meth:`unconsumed_requests`.
        """
        cons = self.req_cons
        if cons == self._req_seen:
            raise IndexError("get_request past the requests seen")
        slots = self._slots
        data = bytes(slots[cons & self._mask]) if slots is not None else self._read_slot(cons)
        self.req_cons = (cons + 1) & _M
        return data

    def put_response(self, data: bytes | bytearray | memoryview) -> None:
        """Write a response into the next private slot (not yet visible to the frontend).

        Raises:
            OverflowError: every consumed request already has its response.
            ValueError: ``data`` is longer than a slot.
        """
        prod = self.rsp_prod_pvt
        if self.req_cons == prod:
            raise OverflowError("put_response without a consumed request")
        slots = self._slots
        if slots is not None and len(data) <= self.entry_size:  # _write_slot of one buffer
            slots[prod & self._mask][:len(data)] = data
        else:
            self._write_slot(prod, data)
        self.rsp_prod_pvt = (prod + 1) & _M

    def push_responses(self) -> bool:
        """``RING_PUSH_RESPONSES_AND_CHECK_NOTIFY``: publish; True if the frontend must be
        notified (its ``rsp_event`` lies in the newly published range)."""
        idx = self._idx
        if idx is None:
            return self._push(_RSP_PROD, _RSP_EVENT, self.rsp_prod_pvt)
        new = self.rsp_prod_pvt  # _push on the u32 view of the header, one call fewer a push
        old = idx[_RSP_PROD >> 2]
        self._wmb()
        idx[_RSP_PROD >> 2] = new & _M
        self._mb()
        return ((new - idx[_RSP_EVENT >> 2]) & _M) < ((new - old) & _M)

    def final_check_for_requests(self) -> bool:
        """``RING_FINAL_CHECK_FOR_REQUESTS``: True if requests are pending; otherwise
        ask for an event at the next request (``req_event = req_cons + 1``), ``mb``,
        and check again. Call :meth:`unconsumed_requests` before consuming.

        Raises:
            RingProtocolError: the frontend published an impossible ``req_prod``.
        """
        if self._requests()[1] != 0:
            return True
        self._set(_REQ_EVENT, self.req_cons + 1)
        self._mb()
        return self._requests()[1] != 0
