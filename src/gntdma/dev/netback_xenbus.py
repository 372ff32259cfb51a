"""netback's xenbus driver: one vif's negotiation in the backend domain (Linux xen-netback).

1. Probe: :meth:`~gntdma.dev.netback.Netback.probe_keys` in one transaction,
   InitWait (``netback_probe``).
2. Frontend Connected (netfront skips Initialised): ``connect_data_rings``:
   ``request-rx-copy`` must be 1 (else ``EOPNOTSUPP``, as Linux), then
   ``multi-queue-num-queues`` (absent: 1; 0 or more than we allow: fatal),
   and per queue (``queue-<n>/`` with two or more) ``tx-ring-ref``,
   ``rx-ring-ref`` and ``event-channel`` or ``event-channel-tx`` +
   ``event-channel-rx``; every value a decimal u32. Connect, Connected.
3. Frontend Closing: disconnect, Closing. Frontend Closed: Closed, and end if
   ``online`` is 0 or the frontend is gone. A frontend back at Initialising
   after we closed gets InitWait again (reconnect).
4. A frontend that breaks the protocol (``xenvif_fatal_tx_err``, a broken
   ring): ``<our dir>/error``, disconnect, Closing.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Final, final

from gntdma.abi.netif import NetifKey, netif_queue_key
from gntdma.dev.netback import Netback, NetbackQueueInfo
from gntdma.dev.netif_common import parse_u32
from gntdma.sys import Kernel
from gntdma.xen.xenbus import (
    XENBUS_KEY_ONLINE,
    XENBUS_KEY_STATE,
    XST_NIL,
    XenbusDevice,
    XenbusDriver,
    XenbusState,
    XenStore,
    xenbus_backend_device,
    xs_join,
)

__all__ = ["NETBACK_XENBUS_DEVTYPE", "NetbackXenbus", "netback_attach",
           "netback_parse_frontend"]

NETBACK_XENBUS_DEVTYPE: Final = "vif"
_S = XenbusState


def netback_parse_frontend(read: Callable[[str], str | None], max_queues: int
                           ) -> tuple[int, list[NetbackQueueInfo], str]:
    """The frontend's queues: (0, queues, "") or (errno, [], why) (``connect``)."""
    if read(NetifKey.REQUEST_RX_COPY.value) != "1":
        return errno.EOPNOTSUPP, [], "request-rx-copy is not 1"
    raw = read(NetifKey.MULTI_QUEUE_NUM_QUEUES.value)
    n = 1 if raw is None else parse_u32(raw)
    if n is None or not 1 <= n <= max_queues:
        return errno.EINVAL, [], f"multi-queue-num-queues {raw!r} not in 1..{max_queues}"
    out = []
    for i in range(n):
        pre = f"{netif_queue_key(i)}/" if n > 1 else ""
        vals: dict[str, int | None] = {}
        for key in (NetifKey.TX_RING_REF, NetifKey.RX_RING_REF, NetifKey.EVENT_CHANNEL,
                    NetifKey.EVENT_CHANNEL_TX, NetifKey.EVENT_CHANNEL_RX):
            v = read(pre + key.value)
            vals[key.value] = None if v is None else parse_u32(v)
            if v is not None and vals[key.value] is None:
                return errno.EINVAL, [], f"{pre}{key.value} {v!r} is not a decimal u32"
        tx, rx = vals[NetifKey.TX_RING_REF.value], vals[NetifKey.RX_RING_REF.value]
        if tx is None or rx is None:
            return errno.ENOENT, [], f"no {pre}tx-ring-ref or {pre}rx-ring-ref"
        etx, erx = vals[NetifKey.EVENT_CHANNEL_TX.value], vals[NetifKey.EVENT_CHANNEL_RX.value]
        if etx is None or erx is None:
            e = vals[NetifKey.EVENT_CHANNEL.value]
            if e is None:
                return errno.ENOENT, [], f"no {pre}event-channel"
            etx = erx = e
        out.append(NetbackQueueInfo(tx, rx, etx, erx))
    return 0, out, ""


@final
class NetbackXenbus(XenbusDriver):
    """The xenbus side of one vif backend."""

    _wmesg = "nb"

    def __init__(self, kern: Kernel, dev: XenbusDevice, nb: Netback) -> None:
        super().__init__(kern, dev, nb.name)
        self.nb = nb
        self.online = True
        self.errors = 0
        self._ring_error = ""
        nb.on_ring_error = self._on_ring_error

    def _on_ring_error(self, why: str) -> None:
        self._ring_error = why
        self._kick()

    def _xenbus_attach(self) -> None:
        dev = self.dev
        for node in (xs_join(dev.otherend, XENBUS_KEY_STATE),
                     xs_join(dev.nodename, XENBUS_KEY_STATE),
                     xs_join(dev.nodename, XENBUS_KEY_ONLINE)):
            self._xenbus_watch(node)

    def _xenbus_step(self) -> bool:
        xs, dev = self.dev.xs, self.dev

        def snap(xbt: int) -> tuple[XenbusState, XenbusState, bool]:
            error, raw = xs.xs_read(xbt, dev.nodename, XENBUS_KEY_ONLINE)
            return (self._xenbus_read_state(xbt, dev.nodename),
                    self._xenbus_read_state(xbt, dev.otherend), error == 0 and raw.strip() == b"1")

        me, fe, self.online = self._xenbus_snapshot(snap)
        self.otherend_state = fe
        if me != self.state:
            self._note_state(me)
        nb = self.nb
        if me == _S.Unknown:
            nb.disconnect()
            return True
        if self._stopping:
            nb.disconnect()
            self._xenbus_set_state(_S.Closed)
            return True
        if self._ring_error != "":
            why, self._ring_error = self._ring_error, ""
            if me == _S.Connected:
                self._fatal(errno.EIO, f"the frontend broke the protocol: {why}")
                return False
        if me == _S.Initialising:
            if self._probe() != 0:
                return False
            me = self.state
        if fe in (_S.Closed, _S.Unknown):
            nb.disconnect()
            if me not in (_S.Closed, _S.Initialising, _S.InitWait):
                if me != _S.Closing:
                    self._xenbus_set_state(_S.Closing)
                self._xenbus_set_state(_S.Closed)
            return not self.online or fe == _S.Unknown
        if fe == _S.Closing:
            nb.disconnect()
            if me not in (_S.Closing, _S.Closed):
                self._xenbus_set_state(_S.Closing)
            return False
        if not self.online:
            if nb.state != "disconnected":
                return False
            self._xenbus_set_state(_S.Closed)
            return True
        if fe == _S.Initialising and me in (_S.Closing, _S.Closed):
            # "prepare for reconnect" (a frontend that closed and came back, even
            # before we saw its Closed)
            nb.disconnect()
            if me == _S.Closing:
                self._xenbus_set_state(_S.Closed)
            self.dev.xs.xs_rm(XST_NIL, self.dev.nodename, "error")
            self._probe()
            return False
        if me == _S.Closing:
            return False
        if fe == _S.Connected and me == _S.InitWait:
            self._connect()
        return False

    def _xenbus_detach(self) -> None:
        self.nb.disconnect()

    def _probe(self) -> int:
        error = self._xenbus_write_keys(self.nb.probe_keys())
        if error != 0:
            self._fatal(error, "cannot write the backend's features")
            return error
        return self._xenbus_set_state(_S.InitWait)

    def _connect(self) -> None:
        read = self._xenbus_otherend_reader()
        error, queues, why = netback_parse_frontend(read, self.nb.max_queues)
        if error != 0:
            self._fatal(error, f"bad frontend keys: {why}")
            return
        error = self.nb.connect(queues, gso_tcpv4=read(NetifKey.FEATURE_GSO_TCPV4.value) == "1",
                                gso_tcpv6=read(NetifKey.FEATURE_GSO_TCPV6.value) == "1")
        if error != 0:
            self._fatal(error, f"cannot connect to {queues}")
            return
        self._xenbus_set_state(_S.Connected)

    def _fatal(self, error: int, message: str) -> None:
        text = f"{error} {message} ({os.strerror(error) if error > 0 else 'failed'})"
        self.error = text
        self.errors += 1
        self.dev.xs.xs_write(XST_NIL, self.dev.nodename, "error", text)
        self.nb.disconnect()
        self._xenbus_set_state(_S.Closing)


def netback_attach(xs: XenStore, kern: Kernel, nb: Netback) -> tuple[int, NetbackXenbus | None]:
    """Attach the xenbus driver of ``nb`` to ``backend/vif/<fe>/<devid>`` and start it."""
    error, dev = xenbus_backend_device(xs, NETBACK_XENBUS_DEVTYPE, nb.frontend_domid, nb.devid)
    if error != 0 or dev is None:
        return error, None
    drv = NetbackXenbus(kern, dev, nb)
    drv.start()
    return 0, drv
