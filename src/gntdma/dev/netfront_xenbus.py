"""netfront's xenbus driver: one vif's negotiation with its backend (FreeBSD xn, Linux netfront).

The sequence (``xen-abi.md`` 5.4 and 6):

1. :func:`xn_attach` reads ``backend``/``backend-id`` and ``mac`` (and
   ``mtu``) of ``device/vif/<devid>``, creates the :class:`netfront_info` and
   starts the device's xenbus thread.
2. Backend InitWait (or later), we Initialising: read the backend's features
   (``feature-rx-copy`` is required, as Linux netfront requires it;
   ``multi-queue-max-queues``, ``feature-split-event-channels``,
   ``feature-gso-tcpv4``/``v6``, ``feature-sg``), set the queues up, write
   the ring references, event channels, ``multi-queue-num-queues`` (only when
   the backend has ``multi-queue-max-queues``), ``request-rx-copy``,
   ``feature-rx-notify``, ``feature-sg``, ``feature-gso-tcpv4``/``v6`` and
   ``feature-ipv6-csum-offload`` in ONE transaction, post the rx buffers,
   and go **directly to Connected** (netfront has no Initialised step).
3. Backend Closing or Closed: stop the queues, Closing, wait until the backend
   unmapped the rings, free them, Closed (rx buffers are kept). A backend that
   then comes back to InitWait gets us Initialising again: reconnect, with
   the kept rx buffers posted as they are. :meth:`XnXenbus.reconnect` (Linux
   ``netfront_resume``) closes and goes Initialising itself.
4. Our directory removed, or :meth:`stop`: close and free everything.

A failure is ``xenbus_dev_fatal``: ``<our dir>/error`` and Closing.
"""

from __future__ import annotations

import errno
import os
from typing import Final, final

from gntdma.abi.netif import NetifKey
from gntdma.dev.netfront import NetfrontFeatures, netfront_info
from gntdma.dev.netif_common import parse_mac, parse_u32
from gntdma.sched import current_scheduler, tsleep
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

__all__ = ["XN_CLOSE_TIMEOUT", "XN_DEFAULT_QUEUES", "XN_XENBUS_DEVTYPE", "XnXenbus", "xn_attach"]

XN_XENBUS_DEVTYPE: Final = "vif"
#: Seconds the close waits for the backend to unmap the rings.
XN_CLOSE_TIMEOUT: Final = 10.0
#: Queues netfront asks for (at most the backend's ``multi-queue-max-queues``).
XN_DEFAULT_QUEUES: Final = 2
_S = XenbusState


@final
class XnXenbus(XenbusDriver):
    """The xenbus side of one vif: its thread, its states, its :class:`netfront_info`."""

    _wmesg = "xn"

    def __init__(self, kern: Kernel, dev: XenbusDevice, sc: netfront_info, *,
                 queues: int = XN_DEFAULT_QUEUES, split: bool = True,
                 timeout: float = XN_CLOSE_TIMEOUT) -> None:
        super().__init__(kern, dev, sc.name)
        self.sc = sc
        self.want_queues = queues
        self.want_split = split
        self.timeout = timeout
        self.connects = 0
        self._ring_error = ""
        self._reconnect = False
        sc.on_ring_error = self._on_ring_error

    def reconnect(self) -> None:
        """Close and connect again (Linux ``netfront_resume``): the rx buffers kept."""
        self._reconnect = True
        self._kick()

    def _on_ring_error(self, why: str) -> None:
        self._ring_error = why
        self._kick()

    def _xenbus_attach(self) -> None:
        if self._xenbus_watch(xs_join(self.dev.otherend, XENBUS_KEY_STATE)) != 0:
            self._xn_fatal(errno.EIO, "cannot watch the backend's state")

    def _xenbus_step(self) -> bool:
        dev = self.dev
        me, be = self._xenbus_snapshot(lambda xbt: (self._xenbus_read_state(xbt, dev.nodename),
                                                    self._xenbus_read_state(xbt, dev.otherend)))
        self.otherend_state = be
        if me != self.state:
            self._note_state(me)
        if me == _S.Unknown or be == _S.Unknown or self._stopping:
            if me not in (_S.Closed, _S.Unknown):
                self._xn_close()
            return True
        if self._ring_error != "" and me == _S.Connected:
            why, self._ring_error = self._ring_error, ""
            self._xn_fatal(errno.EIO, f"the backend broke a ring: {why}")
            return False
        if self._reconnect:
            if me not in (_S.Closing, _S.Closed):
                self._xn_close()
            self._reconnect = False
            self._xenbus_set_state(_S.Initialising)
            return False
        if be in (_S.Closing, _S.Closed):
            if me not in (_S.Closing, _S.Closed, _S.Initialising):
                self._xn_close()
            return False
        if me == _S.Closed and be in (_S.InitWait, _S.Initialised):
            self._xenbus_set_state(_S.Initialising)  # reconnect
            me = self.state
        if me == _S.Initialising and be in (_S.InitWait, _S.Initialised, _S.Connected):
            self._xn_connect()
        return False

    def _xenbus_detach(self) -> None:
        self._xn_wait_free(self.sc.xn_free)

    def _xn_connect(self) -> None:
        read = self._xenbus_otherend_reader()
        if read(NetifKey.FEATURE_RX_COPY.value) != "1":
            self._xn_fatal(errno.EOPNOTSUPP, "the backend does not support rx-copy")
            return
        raw_max = read(NetifKey.MULTI_QUEUE_MAX_QUEUES.value)
        max_q = parse_u32(raw_max) if raw_max is not None else 1
        if max_q is None or max_q == 0:
            self._xn_fatal(errno.EINVAL, f"bad multi-queue-max-queues {raw_max!r}")
            return
        nq = max(1, min(self.want_queues, max_q))
        if self.sc.queues:
            nq = len(self.sc.queues)  # a reconnect keeps its queues (and their buffers)
            if nq > max_q:
                self._xn_fatal(errno.EINVAL, f"the backend now allows {max_q} queues")
                return
        split = self.want_split and read(NetifKey.FEATURE_SPLIT_EVENT_CHANNELS.value) == "1"
        error = self.sc.xn_setup(nq, split)
        if error != 0 and error != errno.EALREADY:
            self._xn_fatal(error, "cannot set up the rings and event channels")
            return
        keys = self.sc.xn_transport_keys()
        if raw_max is not None:
            keys[NetifKey.MULTI_QUEUE_NUM_QUEUES.value] = str(nq)
        for k in (NetifKey.REQUEST_RX_COPY, NetifKey.FEATURE_RX_NOTIFY, NetifKey.FEATURE_SG,
                  NetifKey.FEATURE_GSO_TCPV4, NetifKey.FEATURE_GSO_TCPV6,
                  NetifKey.FEATURE_IPV6_CSUM_OFFLOAD):
            keys[k.value] = "1"
        error = self._xenbus_write_keys(keys)
        if error != 0:
            self._xn_fatal(error, "cannot write the ring references and event channels")
            return
        feats = NetfrontFeatures(sg=read(NetifKey.FEATURE_SG.value) == "1",
                                 gso_tcpv4=read(NetifKey.FEATURE_GSO_TCPV4.value) == "1",
                                 gso_tcpv6=read(NetifKey.FEATURE_GSO_TCPV6.value) == "1")
        error = self.sc.xn_connect(feats)
        if error != 0:
            self._xn_fatal(error, "cannot connect")
            return
        self.connects += 1
        self._xenbus_set_state(_S.Connected)

    def _xn_wait_free(self, step: object) -> int:
        assert callable(step)
        deadline = current_scheduler().now() + self.timeout
        while True:
            error = int(step())
            if error != errno.EBUSY or current_scheduler().now() >= deadline:
                return error
            tsleep(self, "xnfree", 0.001)

    def _xn_close(self) -> None:
        self.sc.xn_disconnect()
        self._xenbus_set_state(_S.Closing)  # the backend unmaps on this
        error = self._xn_wait_free(self.sc.xn_free_rings)
        if error != 0 and self.error == "":
            self.error = f"{error} the backend still maps the rings: not freed"
        self._xenbus_set_state(_S.Closed)

    def _xn_fatal(self, error: int, message: str) -> None:
        text = f"{error} {message}: {os.strerror(error) if error > 0 else 'failed'}"
        if self.error == "":
            self.error = text
        self.dev.xs.xs_write(XST_NIL, self.dev.nodename, "error", text)
        self._xn_close()


def xn_attach(kern: Kernel, hc: Hypercalls, gnttab: GntTab, xs: XenStore, devid: int, *,
              name: str | None = None, queues: int = XN_DEFAULT_QUEUES, split: bool = True,
              rx_pool_size: int | None = None,
              timeout: float = XN_CLOSE_TIMEOUT) -> tuple[int, XnXenbus | None]:
    """Attach netfront to ``device/vif/<devid>`` and start negotiating: (0, driver) or
    (errno, None): ENOENT/EINVAL for ``backend``/``backend-id``, EINVAL for a bad ``mac``."""
    error, dev = xenbus_frontend_device(xs, XN_XENBUS_DEVTYPE, devid)
    if error != 0 or dev is None:
        return error, None
    error, raw = xs.xs_read(XST_NIL, dev.nodename, NetifKey.MAC.value)
    mac = parse_mac(raw.decode("latin-1")) if error == 0 else None
    if mac is None:
        return errno.EINVAL, None
    error, raw = xs.xs_read(XST_NIL, dev.nodename, NetifKey.MTU.value)
    mtu = parse_u32(raw.decode("latin-1")) if error == 0 else 1500
    if mtu is None or not 68 <= mtu <= 65535:
        return errno.EINVAL, None
    sc = netfront_info(kern, hc, gnttab, dev.otherend_id, name=name or f"xn{devid}", mac=mac,
                       mtu=mtu, rx_pool_size=rx_pool_size)
    drv = XnXenbus(kern, dev, sc, queues=queues, split=split, timeout=timeout)
    drv.start()
    return 0, drv
