"""blkback's xenbus driver: one vbd's negotiation in the backend domain.

What the xenbus half of Linux ``xen-blkback`` (``xenbus.c``) and FreeBSD
``xbb`` do, around a :class:`~gntdma.dev.blkback.Blkback` that serves the disk.
The sequence (``xen-abi.md`` 4.4, 4.5 and 6):

1. Probe (our state Initialising, as the toolstack wrote it):
   :meth:`~gntdma.dev.blkback.Blkback.probe_keys` (``max-ring-page-order``,
   ``feature-max-indirect-segments``) in one transaction; state InitWait.
2. Frontend Initialised (or Connected): ``xbb_collect_frontend_info`` reads
   ``ring-page-order`` (absent: one page, ``ring-ref``), ``ring-ref`` or
   ``ring-ref0..N-1``, ``event-channel`` and ``protocol`` and checks every
   one (decimal, in range, present, a known ABI); then
   :meth:`~gntdma.dev.blkback.Blkback.connect` (ring mapped, port bound,
   workers started), :meth:`~gntdma.dev.blkback.Blkback.connect_keys`
   (``sectors``, ``info``, ``sector-size``, ``feature-flush-cache``,
   ``feature-discard``...) in one transaction; state Connected.
3. Frontend Closing: :meth:`~gntdma.dev.blkback.Blkback.disconnect` (drains
   the requests in flight, unbinds, unmaps); state Closing. Frontend Closed:
   state Closed, and if ``online`` is 0 (or the frontend's directory is gone)
   the driver ends; with ``online`` 1 a frontend that comes back to
   Initialising gets a new InitWait (reconnect).
4. The toolstack's unplug writes ``online`` = 0 and our ``state`` = Closing:
   a connected device waits for the frontend to close (so that what is on the
   ring completes); a device that is not connected goes Closed at once and
   the driver ends. Our directory removed (libxl's forced removal after its
   timeout): disconnect and end.

Nothing the frontend writes can crash the backend: a value that does not
parse, is out of range or missing, a ring that does not map, a port that does
not bind, is ``xenbus_dev_fatal``: ``<our dir>/error`` gets
``"<errno> <message>"`` and the state goes Closing, with nothing left mapped or
bound. A frontend that breaks the ring while connected (``on_ring_error``) is
treated the same way.

Differences from Linux xen-blkback
----------------------------------
Keys (Linux: ``xen_blkbk_probe`` and ``connect`` in ``xen-blkback/xenbus.c``):

- ``feature-persistent``: off unless ``Blkback.feature_persistent`` is set
  (then 1, and when the frontend's key is non-zero too, data and indirect
  grants stay mapped between requests, at most ``Blkback.max_persistent_grants``
  per device, 1056 by default, unmapped at disconnect); Linux's
  ``feature_persistent`` module parameter is on by default, and Linux also
  purges grants unused for 60 s, and unused ones while the frontend uses more
  than the table holds (``purge_persistent_gnt``; not done here: the table keeps
  the first grants it took, those beyond it are mapped per request).
- ``multi-queue-max-queues``: not written (one ring); Linux writes its queue
  count and reads ``multi-queue-num-queues`` and ``queue-N/`` directories.
- ``feature-barrier``: we write 0 and answer ``BLKIF_OP_WRITE_BARRIER`` with
  ``EOPNOTSUPP``; Linux writes its flush support there and serves a barrier
  as a drain of the ring followed by a flushed write.
- ``feature-flush-cache``: always 1 here (``fdatasync`` of the image); Linux
  writes 1 only when the device has a volatile write cache.
- ``feature-max-indirect-segments``: 256 by default, as Linux, but
  configurable and left out when 0 (indirect requests get ``EOPNOTSUPP``).
- ``max-ring-page-order``: 4 by default, as Linux's module parameter.
- ``sector-size``, ``physical-sector-size``: always 512 (our stores have
  512-byte blocks), as blkif.h asks of a frontend without
  ``feature-large-sector-size``; Linux writes the device's logical and
  physical block sizes whatever the frontend advertises.
- ``info``: only ``VDISK_READONLY``; Linux adds ``VDISK_CDROM`` and
  ``VDISK_REMOVABLE`` from the vbd type.
- ``feature-discard``: from the toolstack's choice and 0 on a read-only disk;
  Linux from the device's discard support and ``discard-enable``, read-only
  or not. ``discard-granularity`` 512 and ``discard-alignment`` 0 here, the
  device's limits in Linux; ``discard-secure`` always 0.
- the store comes from the toolstack, not from ``physical-device``/``mode``
  written by hotplug scripts.

Behaviours (``xen-blkback/blkback.c``):

- a ``BLKIF_OP_FLUSH_DISKCACHE`` with data is the write then ``fdatasync``
  (this write durable too); Linux issues the write with ``REQ_PREFLUSH``
  (earlier writes durable before it).
- I/O is one synchronous vectored call per request on one of several worker
  threads, data pages mapped and unmapped around it; Linux submits bios from
  one thread per ring and answers in their completion.
- a disconnect drains what is in flight; Linux fails the state change with
  "pending I/O" while requests are out.
- the same answers as Linux otherwise: unknown operations ``EOPNOTSUPP``,
  bad segment counts and segments, read-only writes, flushes and discards and
  ranges past the end ``BLKIF_RSP_ERROR`` (``dispatch_rw_block_io``,
  ``xen_vbd_translate``), ``BLKIF_DISCARD_SECURE`` ignored when
  ``discard-secure`` is 0 (``dispatch_discard_io``).

Theory of operation
-------------------
One kernel thread per device (``blkback.<fe>.<devid>/xenbus``) in the backend
domain runs the state machine. Watches on the frontend's ``state`` and on our
own ``state`` and ``online`` only count events and wake it; the thread re-reads
the three nodes after every event and acts on what it reads. It never holds a
lock across a xenstore request; :meth:`Blkback.disconnect` sleeps only here,
never on the device's own interrupt or worker threads.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Mapping
from typing import Final, final

from gntdma.abi.blkif import BlkifKey, blkif_abi, blkif_ring_ref_key
from gntdma.dev.blkback import Blkback, BlkbackState
from gntdma.dev.xenbus_backend import XENBUS_BACKEND_KEY_ERROR, XenbusBackend
from gntdma.sys import Kernel
from gntdma.xen.xenbus import XenbusDevice, XenbusState, XenStore, xenbus_backend_device

__all__ = [
    "XBB_STOP_TIMEOUT",
    "XBB_XENBUS_DEVTYPE",
    "XBB_XENBUS_KEY_ERROR",
    "BlkbackXenbus",
    "XbbFrontendInfo",
    "xbb_attach",
    "xbb_parse_frontend_info",
]

#: The xenbus device type blkback serves.
XBB_XENBUS_DEVTYPE: Final = "vbd"
#: Where ``xenbus_dev_fatal`` writes its message, in the driver's own directory.
XBB_XENBUS_KEY_ERROR: Final = XENBUS_BACKEND_KEY_ERROR
#: Seconds a driver waits for its thread to end in :meth:`BlkbackXenbus.wait_done`.
XBB_STOP_TIMEOUT: Final = 10.0

_U32_MAX: Final = 0xFFFFFFFF
_S = XenbusState


class XbbFrontendInfo:
    """The frontend's transport keys, parsed and checked."""

    __slots__ = ("evtchn", "protocol", "ring_refs")

    def __init__(self, ring_refs: list[int], evtchn: int, protocol: str | None) -> None:
        self.ring_refs = ring_refs
        self.evtchn = evtchn
        self.protocol = protocol

    def __repr__(self) -> str:
        return (f"<XbbFrontendInfo ring-refs={self.ring_refs} event-channel={self.evtchn} "
                f"protocol={self.protocol!r}>")


def _u32(raw: str | None) -> int | None:
    """A decimal u32 as a frontend writes it (no sign, no spaces), or None."""
    if raw is None or not 1 <= len(raw) <= 10 or not raw.isascii() or not raw.isdigit():
        return None
    v = int(raw)
    return v if v <= _U32_MAX else None


def xbb_parse_frontend_info(read: Callable[[str], str | None], max_ring_page_order: int
                            ) -> tuple[int, XbbFrontendInfo | None, str]:
    """Parse a frontend's transport keys; ``read(key)`` is the value or None.

    Returns (0, info, "") or (errno, None, why): EINVAL for a value that is
    not a decimal u32, a ``ring-page-order`` over ``max_ring_page_order``;
    ENOENT for a missing ``ring-ref``/``ring-ref%u``/``event-channel``; ENOSYS
    for a ``protocol`` this backend does not speak. (Linux
    ``connect_ring``/``read_per_ring_refs``.)
    """
    raw_order = read(BlkifKey.RING_PAGE_ORDER.value)
    refs: list[int] = []
    if raw_order is None:
        raw = read(BlkifKey.RING_REF.value)
        if raw is None:
            return errno.ENOENT, None, "no ring-ref"
        ref = _u32(raw)
        if ref is None:
            return errno.EINVAL, None, f"ring-ref {raw!r} is not a decimal u32"
        refs.append(ref)
    else:
        order = _u32(raw_order)
        if order is None or order > max_ring_page_order:
            return errno.EINVAL, None, (f"ring-page-order {raw_order!r} is not a number "
                                        f"in 0..{max_ring_page_order}")
        for i in range(1 << order):
            key = blkif_ring_ref_key(i)
            raw = read(key)
            if raw is None:
                return errno.ENOENT, None, f"no {key} (ring-page-order {order})"
            ref = _u32(raw)
            if ref is None:
                return errno.EINVAL, None, f"{key} {raw!r} is not a decimal u32"
            refs.append(ref)
    raw = read(BlkifKey.EVENT_CHANNEL.value)
    if raw is None:
        return errno.ENOENT, None, "no event-channel"
    evtchn = _u32(raw)
    if evtchn is None:
        return errno.EINVAL, None, f"event-channel {raw!r} is not a decimal u32"
    protocol = read(BlkifKey.PROTOCOL.value)
    if protocol is not None and protocol != "" and blkif_abi(protocol) is None:
        return errno.ENOSYS, None, f"unknown protocol {protocol!r}"
    return 0, XbbFrontendInfo(refs, evtchn, protocol if protocol != "" else None), ""


@final
class BlkbackXenbus(XenbusBackend):
    """The xenbus side of one blkback device: its thread and its states.

    Create it with :func:`xbb_attach`. :attr:`state` is our end's state as
    last read or written; :attr:`otherend_state` the frontend's, as last read;
    :attr:`error` the last fatal error ("" if none); :attr:`online` the
    toolstack's ``online`` as last read; :attr:`errors` the fatal errors so far.
    The state machine is :class:`~gntdma.dev.xenbus_backend.XenbusBackend`'s.
    """

    _wmesg = "xbb"
    _ring_error_what = "the frontend broke the ring"
    _probe_error_what = "cannot write the backend's limits"

    def __init__(self, kern: Kernel, dev: XenbusDevice, bb: Blkback) -> None:
        super().__init__(kern, dev, bb.name)
        self.bb = bb
        self._chained_ring_error = bb.on_ring_error
        bb.on_ring_error = self._on_ring_error

    # -- control -------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the thread to disconnect, go Closed and exit (forced removal)."""
        super().stop()

    def wait_done(self, timeout: float = XBB_STOP_TIMEOUT) -> int:
        """Sleep until the thread has exited: 0, or ETIMEDOUT."""
        return super().wait_done(timeout)

    # -- the device ---------------------------------------------------------------------------

    def _on_ring_error(self, reason: str) -> None:
        """Blkback's ``on_ring_error`` (its interrupt thread): note and wake."""
        super()._on_ring_error(reason)
        if self._chained_ring_error is not None:
            self._chained_ring_error(reason)

    def _xenbus_detach(self) -> None:
        super()._xenbus_detach()
        self.bb.on_ring_error = self._chained_ring_error

    def _disconnect(self) -> None:
        self.bb.disconnect()

    def _connected(self) -> bool:
        return self.bb.state != BlkbackState.DISCONNECTED

    def _probe_keys(self) -> Mapping[str, str]:
        return self.bb.probe_keys()

    def _connect(self) -> None:
        """Read and check the frontend's keys, connect, publish the disk, Connected."""
        error, info, why = xbb_parse_frontend_info(self._xenbus_otherend_reader(),
                                                   self.bb.max_ring_page_order)
        if error != 0 or info is None:
            self._fatal(error, f"bad frontend keys: {why}")
            return
        # Linux connect_ring: feature-persistent, read as an unsigned, 0 when absent.
        persistent = _u32(self._xenbus_otherend_reader()(
            BlkifKey.FEATURE_PERSISTENT.value)) not in (None, 0)
        error = self.bb.connect(info.ring_refs, info.evtchn, info.protocol, persistent)
        if error != 0:
            what = {errno.ENOENT: "a ring page does not map",
                    errno.EINVAL: "the ring size is not a power of two within the limit",
                    errno.ENOSYS: "unknown protocol",
                    errno.EIO: "the shared ring's indices are impossible",
                    errno.EISCONN: "already connected"}.get(error, "the event channel "
                                                                   "does not bind")
            self._fatal(error, f"cannot connect to {info!r}: {what}")
            return
        error = self._xenbus_write_keys(self.bb.connect_keys())
        if error != 0:
            self.bb.disconnect()
            self._fatal(error, "cannot write the disk's properties")
            return
        self._xenbus_set_state(_S.Connected)


def xbb_attach(xs: XenStore, kern: Kernel, bb: Blkback) -> tuple[int, BlkbackXenbus | None]:
    """Attach the xenbus driver of ``bb`` (its ``frontend_domid`` and ``devid``) to
    ``backend/vbd/<fe>/<devid>`` in our domain and start it: (0, driver) or
    (error, None) when the directory's ``frontend``/``frontend-id`` are missing
    (ENOENT) or disagree (EINVAL)."""
    error, dev = xenbus_backend_device(xs, XBB_XENBUS_DEVTYPE, bb.frontend_domid, bb.devid)
    if error != 0 or dev is None:
        return error, None
    drv = BlkbackXenbus(kern, dev, bb)
    drv.start()
    return 0, drv
