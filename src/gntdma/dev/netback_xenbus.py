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
from collections.abc import Callable, Mapping
from typing import Final, final

from gntdma.abi.netif import NetifKey, netif_queue_key
from gntdma.dev.netback import Netback, NetbackQueueInfo
from gntdma.dev.netif_common import parse_u32
from gntdma.dev.xenbus_backend import XenbusBackend
from gntdma.sys import Kernel
from gntdma.xen.xenbus import XenbusDevice, XenbusState, XenStore, xenbus_backend_device

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
class NetbackXenbus(XenbusBackend):
    """The xenbus side of one vif backend (the state machine is
    :class:`~gntdma.dev.xenbus_backend.XenbusBackend`'s)."""

    _wmesg = "nb"
    # netback has nothing to undo while it waits at InitWait, connects on the
    # frontend's Connected only, and reconnects from Closing too.
    _closed_idle = (_S.Closed, _S.Initialising, _S.InitWait)
    _reconnect_from = (_S.Closing, _S.Closed)
    _connect_on = (_S.Connected,)
    _ring_error_what = "the frontend broke the protocol"
    _probe_error_what = "cannot write the backend's features"

    def __init__(self, kern: Kernel, dev: XenbusDevice, nb: Netback) -> None:
        super().__init__(kern, dev, nb.name)
        self.nb = nb
        nb.on_ring_error = self._on_ring_error

    def _disconnect(self) -> None:
        self.nb.disconnect()

    def _connected(self) -> bool:
        return self.nb.state != "disconnected"

    def _probe_keys(self) -> Mapping[str, str]:
        return self.nb.probe_keys()

    def _reconnect(self, me: XenbusState) -> None:
        # "prepare for reconnect" (a frontend that closed and came back, even
        # before we saw its Closed)
        self.nb.disconnect()
        if me == _S.Closing:
            self._xenbus_set_state(_S.Closed)
        super()._reconnect(me)

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


def netback_attach(xs: XenStore, kern: Kernel, nb: Netback) -> tuple[int, NetbackXenbus | None]:
    """Attach the xenbus driver of ``nb`` to ``backend/vif/<fe>/<devid>`` and start it."""
    error, dev = xenbus_backend_device(xs, NETBACK_XENBUS_DEVTYPE, nb.frontend_domid, nb.devid)
    if error != 0 or dev is None:
        return error, None
    drv = NetbackXenbus(kern, dev, nb)
    drv.start()
    return 0, drv
