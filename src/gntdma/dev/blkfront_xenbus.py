"""blkfront's xenbus driver: the negotiation of one vbd with its backend (FreeBSD xbd).

What FreeBSD's ``xbd_probe``, ``xbd_attach`` and ``xbd_backend_changed`` do
for ``sys/dev/xen/blkfront``, around the :class:`~gntdma.dev.blkfront.xbd_softc`
that does the I/O. The sequence (``xen-abi.md`` 4.4, 4.5 and 6):

1. :func:`xbd_attach` reads ``backend`` and ``backend-id`` of
   ``device/vbd/<devid>`` (they must agree), creates the softc and starts the
   device's xenbus thread; the state stays Initialising (the toolstack wrote it).
2. Backend InitWait (or later): read ``max-ring-page-order`` (or the deprecated
   ``max-ring-pages``), :meth:`~gntdma.dev.blkfront.xbd_softc.xbd_initialize`
   (ring granted, unbound port allocated and bound), then the transport keys
   (``ring-ref`` or ``ring-page-order`` + ``ring-ref%u``, ``event-channel``,
   ``protocol``) written in ONE transaction, rerun on EAGAIN; state Initialised.
3. Backend Connected: the backend's keys (``sectors``, ``sector-size``,
   ``info``, ``feature-*``, parsed and checked by
   :meth:`~gntdma.dev.blkfront_cmd.XbdBackendFeatures.from_xenstore`),
   :meth:`~gntdma.dev.blkfront.xbd_softc.xbd_connect`; state Connected.
4. Backend Closing (the toolstack's unplug, or the backend's error):
   :meth:`~gntdma.dev.blkfront.xbd_softc.xbd_closing` (bios not on the ring
   fail with ENXIO, those on it complete while the backend still serves), state
   Closing (the backend then disconnects: unmaps the ring, unbinds the port),
   :meth:`~gntdma.dev.blkfront.xbd_softc.xbd_detach` (everything freed, once,
   after the backend let go of the ring), state Closed. A backend already
   Closed (or whose directory vanished) is gone: requests on the ring fail
   with ENXIO at once; so do they when the backend published an ``error``
   (it disconnected before going Closing: nothing on the ring will be answered).
5. Our directory removed (the toolstack's last step): the thread exits.

Persistent grants (blkif.h ``feature-persistent``; Linux xen-blkfront
``talk_to_blkback`` and ``blkfront_gather_backend_features``): with
``persistent`` on, the frontend writes ``feature-persistent`` = 1 with its
transport keys when its grant budget and memory can hold them (see
:func:`xbd_persistent_segments`); when the backend's key is non-zero too, the
data maps are created with ``BUS_DMA_XEN_PERSISTENT`` (their pages stay
granted, the backend keeps them mapped), the indirect pages are granted
writable (they are persistent grants too) and requests are limited to the
segments every command's pages can hold. As Linux's ``blkfront_setup_indirect``
and ``fill_grant_buffer`` (ring slots x (segments + indirect pages) grants,
whatever the backend keeps mapped), the backend's table (Linux xen-blkback's
``max_pgrants``, 1056) sets no limit: blkback maps the grants beyond it per
request (``xen_blkbk_map``).

A failure on the way (a step's errno, garbage in the backend's keys) is
``xenbus_dev_fatal``: ``<our dir>/error`` gets ``"<errno> <message>"``, then
the close of step 4.

Theory of operation
-------------------
One kernel thread per device (``<name>/xenbus``) runs the state machine, so a
step that sleeps (xenstore requests, ``xbd_closing`` waiting for in-flight
bios, ``xbd_detach`` waiting for the backend) never holds up the guest's
``xenwatch`` thread. The watch on the backend's ``state`` only counts events
and wakes the thread; the thread re-reads both states after every event (a
watch says only that something changed) and acts on what it reads, so missed
intermediate states do not matter. The backend is not trusted: every value it
wrote is parsed and range-checked before use, and a state it should not be in
is ignored.

Rules: functions and methods return errno ints (C contract). The driver takes
no lock of its own; the softc's ``xbd_io_lock`` and the xenstore client's
``xs_request`` are never held across each other here.
"""

from __future__ import annotations

import errno
import os
from typing import Final, final

from gntdma.abi.blkif import BLKIF_MAX_SEGMENTS_PER_REQUEST, BlkifKey
from gntdma.dev.blkfront import XBD_CLOSE_TIMEOUT, xbd_softc
from gntdma.dev.blkfront_cmd import (
    XBD_DEFAULT_MAX_INDIRECT_SEGMENTS,
    XBD_DEFAULT_RING_PAGE_ORDER,
    XBD_INDIRECT_SEGS_TO_PAGES,
    XbdBackendFeatures,
)
from gntdma.sys import Kernel
from gntdma.xen.gnttab import GntTab
from gntdma.xen.hypercall import Hypercalls
from gntdma.xen.xenbus import (
    XENBUS_KEY_STATE,
    XST_NIL,
    XenbusDevice,
    XenbusDriver,
    XenbusState,
    XenStore,
    xenbus_frontend_device,
    xs_join,
)

__all__ = [
    "XBD_XENBUS_DEVTYPE",
    "XBD_XENBUS_KEY_ERROR",
    "XbdXenbus",
    "xbd_attach",
    "xbd_persistent_segments",
    "xbd_probe",
    "xbd_vdevice_to_unit",
]

#: The xenbus device type blkfront drives.
XBD_XENBUS_DEVTYPE: Final = "vbd"
#: Where ``xenbus_dev_fatal`` writes its message, in the driver's own directory.
XBD_XENBUS_KEY_ERROR: Final = "error"

_S = XenbusState


def xbd_vdevice_to_unit(devid: int) -> int:
    """The disk number of a vbd id (``docs/misc/vbd-interface.txt``): xvda 0, xvdb 1...

    xvd, sd and hd numbers give their disk index; the extended scheme
    (``1 << 28``) its 20-bit disk; anything else is taken as it is.
    """
    if devid & (1 << 28):
        return (devid >> 8) & 0xFFFFF
    major = devid >> 8
    if major in (202, 8):  # xvd, sd: 16 partitions per disk
        return (devid >> 4) & 0xF
    if major == 3:  # hd a, b
        return (devid >> 6) & 0x3
    if major == 22:  # hd c, d
        return 2 + ((devid >> 6) & 0x3)
    return devid


def xbd_persistent_segments(ncmds: int, wanted: int, refs: int, pages: int) -> int:
    """Segments per request when every command keeps its pages granted for life.

    ``ncmds`` commands each hold up to that many persistent pages and references
    (and, past 11 segments, their indirect pages' references): all of it must fit
    in ``refs`` references and ``pages`` pages of memory. The most segments up to
    ``wanted`` that fit, or 0 when not even 11 (a direct request's most) do.
    """
    segs = max(wanted, BLKIF_MAX_SEGMENTS_PER_REQUEST)
    while segs >= BLKIF_MAX_SEGMENTS_PER_REQUEST:
        ind = XBD_INDIRECT_SEGS_TO_PAGES(segs) if segs > BLKIF_MAX_SEGMENTS_PER_REQUEST else 0
        if ncmds * (segs + ind) <= refs and ncmds * segs <= pages:
            return segs
        segs -= 1
    return 0


def xbd_probe(xs: XenStore, devid: int) -> int:
    """Whether ``device/vbd/<devid>`` is ours to drive: 0, or the error that says not."""
    error, dev = xenbus_frontend_device(xs, XBD_XENBUS_DEVTYPE, devid)
    if error != 0:
        return error
    assert dev is not None
    return 0


@final
class XbdXenbus(XenbusDriver):
    """The xenbus side of one blkfront disk: its thread, its states, its softc.

    Create it with :func:`xbd_attach`. :attr:`state` is the state this driver
    last read or wrote for its own end; :attr:`otherend_state` the backend's,
    as last read; :attr:`error` the first fatal error ("" if none).
    """

    _wmesg = "xbd"

    def __init__(self, kern: Kernel, dev: XenbusDevice, sc: xbd_softc, *,
                 timeout: float = XBD_CLOSE_TIMEOUT, persistent: bool = False) -> None:
        super().__init__(kern, dev, sc.name)
        self.sc = sc
        self.timeout = timeout
        #: Advertise ``feature-persistent`` (the setting; set before the backend's InitWait).
        self.persistent = persistent
        #: Whether we advertised it, and whether both ends did (the data maps use it).
        self.persistent_advertised = False
        self.persistent_used = False

    def stop(self) -> None:
        """Ask the thread to close the device (frontend-initiated close) and exit."""
        super().stop()

    # -- the thread ---------------------------------------------------------------------------

    def _xenbus_attach(self) -> None:
        error = self._xenbus_watch(xs_join(self.dev.otherend, XENBUS_KEY_STATE))
        if error != 0:
            self._xbd_fatal(error, "cannot watch the backend's state")

    def _xenbus_step(self) -> bool:
        me, be = self._read_states()
        self.otherend_state = be
        if me != self.state:
            self._note_state(me)
        return self._xbd_backend_changed(me, be)

    def _xenbus_detach(self) -> None:
        if self.sc.statistics().state != "freed":
            self.sc.xbd_detach(backend_gone=True, timeout=self.timeout)

    def _read_states(self) -> tuple[XenbusState, XenbusState]:
        """Our state and the backend's, as one consistent snapshot (a transaction)."""
        dev = self.dev
        return self._xenbus_snapshot(lambda xbt: (self._xenbus_read_state(xbt, dev.nodename),
                                                  self._xenbus_read_state(xbt, dev.otherend)))

    def _xbd_backend_changed(self, me: XenbusState, be: XenbusState) -> bool:
        """One step of the state machine (``xbd_backend_changed``); True: exit."""
        if me == _S.Unknown or be == _S.Unknown:
            # A directory went away: the toolstack removed the device (or a
            # backend that vanished). Whatever is left is freed on the way out.
            if me != _S.Unknown and me not in (_S.Closing, _S.Closed):
                self._xbd_close(backend_gone=True)
            return True
        if self._stopping:
            if me not in (_S.Closing, _S.Closed):
                self._xbd_close(backend_gone=be == _S.Closed)
            return True
        if be in (_S.Closing, _S.Closed):
            if me not in (_S.Closing, _S.Closed):
                self._xbd_close(backend_gone=be == _S.Closed or self._backend_failed())
            return False
        if me == _S.Initialising and be in (_S.InitWait, _S.Initialised, _S.Connected):
            if self._xbd_initialize() != 0:
                return False
            me = self.state
        if me == _S.Initialised and be == _S.Connected:
            self._xbd_connect()
        # Connected and Connected again: a capacity change, not supported (ignored).
        return False

    # -- the steps ------------------------------------------------------------------------------

    def _backend_failed(self) -> bool:
        """Whether the backend published an error: it disconnected before Closing, so
        nothing on the ring will be answered (do not wait for it)."""
        error, _ = self.dev.xs.xs_read(XST_NIL, self.dev.otherend, XBD_XENBUS_KEY_ERROR)
        return error == 0

    def _xbd_initialize(self) -> int:
        """Ring, port, transport keys in one transaction, Initialised (backend InitWait)."""
        order = XbdBackendFeatures.max_ring_page_order_from_xenstore(self._xenbus_otherend_reader())
        error = self.sc.xbd_initialize(order)
        if error != 0 and error != errno.EALREADY:
            self._xbd_fatal(error, "cannot set up the ring and event channel")
            return error
        keys = self.sc.xbd_transport_keys()
        self.persistent_advertised = self.persistent and self._persistent_segs() != 0
        if self.persistent_advertised:
            keys[BlkifKey.FEATURE_PERSISTENT.value] = "1"
        error = self._xenbus_write_keys(keys)
        if error != 0:
            self._xbd_fatal(error, "cannot write the ring references and event channel")
            return error
        return self._xenbus_set_state(_S.Initialised)

    def _xbd_connect(self) -> int:
        """Read the backend's features, open the disk, Connected (backend Connected)."""
        error, feats = XbdBackendFeatures.from_xenstore(self._xenbus_otherend_reader())
        if error != 0 or feats is None:
            self._xbd_fatal(error, "bad or missing backend keys (sectors, sector-size, "
                            "info, features)")
            return error
        sc = self.sc
        raw = self._xenbus_otherend_reader()(BlkifKey.FEATURE_PERSISTENT.value)
        # Linux blkfront_gather_backend_features: both ends must advertise it.
        both = (self.persistent_advertised and raw is not None and raw.strip().isdigit()
                and int(raw) != 0)
        # Once both advertised, both use it (the backend maps our grants writable).
        self.persistent_used = sc.xbd_persistent = both
        if both:
            segs = max(self._persistent_segs(feats.max_indirect_segments),
                       BLKIF_MAX_SEGMENTS_PER_REQUEST)
            sc.xbd_indirect_segments_max = min(sc.xbd_indirect_segments_max, segs)
        error = sc.xbd_connect(feats)
        if error != 0:
            self._xbd_fatal(error, "cannot connect to the backend")
            return error
        return self._xenbus_set_state(_S.Connected)

    def _persistent_segs(self, backend_max: int | None = None) -> int:
        """Segments per request persistent grants allow now (0: none): the disk's grant
        budget, and a quarter of the guest's memory for the pages. Not what the backend
        keeps mapped: Linux ``blkfront_setup_indirect`` sizes its grants by its own
        ``max_indirect_segments`` and the backend's ``feature-max-indirect-segments``."""
        sc = self.sc
        ring = sc.xbd_ring
        if ring is None:
            return 0
        wanted = sc.xbd_indirect_segments_max
        if backend_max is not None:
            wanted = min(wanted, backend_max)
        refs = sc.xbd_gnttab.gnttab_ever_available() // max(1, sc.xbd_grant_share)
        return xbd_persistent_segments(ring.nr_ents, wanted, refs,
                                       sc.xbd_kern.vm.total // 4)

    def _xbd_close(self, *, backend_gone: bool) -> None:
        """Closing, free everything once the backend let go, Closed (``xbd_closing``)."""
        sc = self.sc
        sc.xbd_closing(backend_gone=backend_gone, timeout=self.timeout)
        self._xenbus_set_state(_S.Closing)  # the backend disconnects on this
        error = sc.xbd_detach(backend_gone=backend_gone, timeout=self.timeout)
        if error != 0 and self.error == "":
            self.error = (f"{error} the backend still maps the ring after "
                          f"{self.timeout} s: not freed")
        self._xenbus_set_state(_S.Closed)

    def _xbd_fatal(self, error: int, message: str) -> None:
        """``xenbus_dev_fatal``: record and publish the error, then close."""
        text = f"{error} {message}: {os.strerror(error) if error > 0 else 'failed'}"
        if self.error == "":
            self.error = text
        self.dev.xs.xs_write(XST_NIL, self.dev.nodename, XBD_XENBUS_KEY_ERROR, text)
        self._xbd_close(backend_gone=False)


def xbd_attach(kern: Kernel, hc: Hypercalls, gnttab: GntTab, xs: XenStore, devid: int, *,
               name: str | None = None,
               ring_page_order: int = XBD_DEFAULT_RING_PAGE_ORDER,
               max_indirect_segments: int = XBD_DEFAULT_MAX_INDIRECT_SEGMENTS,
               grant_share: int = 1,
               timeout: float = XBD_CLOSE_TIMEOUT,
               persistent: bool = False) -> tuple[int, XbdXenbus | None]:
    """Attach blkfront to the guest's ``device/vbd/<devid>`` and start negotiating.

    Returns (0, driver) with the driver's thread started, or (error, None):
    the error of reading ``backend``/``backend-id`` (ENOENT, EINVAL when
    they disagree), or EINVAL for a softc that cannot be built (bad ring order).
    ``persistent``: advertise ``feature-persistent`` and use persistent grants
    when the backend advertises it too.
    The softc's ``handle`` (vdev) is the low 16 bits of ``devid``, as on the
    wire; ``name`` defaults to ``xbd<unit>``.
    """
    error, dev = xenbus_frontend_device(xs, XBD_XENBUS_DEVTYPE, devid)
    if error != 0 or dev is None:
        return error, None
    if name is None:
        name = f"xbd{xbd_vdevice_to_unit(devid)}"
    try:
        sc = xbd_softc(kern, hc, gnttab, dev.otherend_id, name=name, vdev=devid & 0xFFFF,
                       ring_page_order=ring_page_order,
                       max_indirect_segments=max_indirect_segments,
                       grant_share=grant_share)
    except ValueError:
        return errno.EINVAL, None
    drv = XbdXenbus(kern, dev, sc, timeout=timeout, persistent=persistent)
    drv.start()
    return 0, drv
