"""Virtual network interfaces: what ``xl network-attach`` and ``network-detach`` do.

:func:`attach_vif` gives a guest a NIC on a :class:`~gntdma.dev.netbridge.Bridge`:
a :class:`~gntdma.dev.netback.Netback` in dom0 (a port of the bridge once
connected), both device directories in one transaction as libxl lays them out
(backend ``/local/domain/0/backend/vif/<domid>/<devid>`` with ``mac``,
``bridge``, ``handle``, ``type``, ``script``; frontend
``/local/domain/<domid>/device/vif/<devid>`` with ``mac`` and ``handle``),
both xenbus drivers, and a wait until both ends are Connected.
:func:`detach_vif` is libxl's unplug (``online`` 0 and Closing, wait for
Closed, remove the directories). Errors raise :class:`VifError`.

A vif is a device of its guest for the host (:meth:`Host.add_device`), as a
vbd is: when the guest crashes, :func:`destroy_vif` removes it by force
(``libxl__devices_destroy``), and a host that closes with it attached
abandons it. Whatever joined the vif to the outside world (the Linux stack
wiring of :mod:`~gntdma.toolstack.netwire`) registers in
:attr:`Vif.on_destroy` and goes first.

The guest's interface is ``Vif.netfront`` (``if_transmit``, ``if_input``,
``if_mac``, ``if_mtu``, ``statistics()``); the bridge port is ``Vif.port``.
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Final, final

from gntdma.dev.netback import NETBACK_MAX_QUEUES, Netback, NetbackStatistics
from gntdma.dev.netback_xenbus import NetbackXenbus, netback_attach
from gntdma.dev.netbridge import Bridge
from gntdma.dev.netfront import NetfrontStatistics, netfront_info
from gntdma.dev.netfront_xenbus import XN_DEFAULT_QUEUES, XnXenbus, xn_attach
from gntdma.dev.netif_common import format_mac, parse_mac
from gntdma.errors import GntdmaError
from gntdma.sched import current_scheduler
from gntdma.toolstack.devreap import reap_driver, reap_drivers
from gntdma.toolstack.host import Guest, GuestDevice, Host
from gntdma.toolstack.xs import LIBXL_DESTROY_TIMEOUT, DeviceDirs, XenstoreSetupError
from gntdma.xen.xenbus import XenbusState

__all__ = ["VIF_CONNECT_TIMEOUT", "VIF_DEVTYPE", "XEN_OUI", "Vif", "VifError", "VifStatistics",
           "attach_vif", "default_mac", "destroy_vif", "detach_vif", "random_mac"]

VIF_DEVTYPE: Final = "vif"
VIF_CONNECT_TIMEOUT: Final = 10.0
#: Xen's organizationally unique identifier, the first three octets of a default MAC.
XEN_OUI: Final = b"\x00\x16\x3e"
_S = XenbusState


class VifError(GntdmaError):
    """A NIC cannot be attached (or detached)."""


@final
@dataclass(frozen=True, slots=True)
class VifStatistics:
    vif: str
    devid: int
    mac: str
    attached: bool
    frontend_state: str
    backend_state: str
    frontend: NetfrontStatistics
    backend: NetbackStatistics


@final
@dataclass(eq=False)
class Vif:
    """A NIC attached to a guest, both ends connected."""

    guest: Guest
    devid: int
    mac: str
    bridge: Bridge
    dirs: DeviceDirs
    netback: Netback
    backend: NetbackXenbus
    frontend: XnXenbus
    attached: bool = True
    #: The host's record of it (torn down with the guest if it crashes).
    device: GuestDevice | None = None
    #: What goes before the vif when it is removed by force (the guest's Linux
    #: stack wiring): called once, on a toolstack thread, by :func:`destroy_vif`.
    on_destroy: list[Callable[[], None]] = field(default_factory=list)

    @property
    def netfront(self) -> netfront_info:
        """The guest's interface (the seam: if_transmit, if_input, if_mac, if_mtu)."""
        return self.frontend.sc

    @property
    def port(self) -> Netback:
        """The dom0 end: a port of :attr:`bridge`."""
        return self.netback

    @property
    def name(self) -> str:
        return self.netback.name

    def statistics(self) -> VifStatistics:
        return VifStatistics(self.name, self.devid, self.mac, self.attached,
                             self.frontend.state.name, self.backend.state.name,
                             self.netfront.statistics(), self.netback.statistics())


def random_mac(rng: random.Random, avoid: Collection[str] = ()) -> str:
    """A random address under Xen's OUI, as libxl gives a vif without ``mac=``.

    tools/libs/light/libxl_nic.c ``libxl__device_nic_setdefault``: ``00:16:3e``
    and three random octets, the first masked with ``0x7f``. Drawn from ``rng``
    (so a seed replays it) and drawn again while it is one of ``avoid`` (libxl
    does not check; in one process a clash would be gntdma's own doing).
    """
    while True:
        r = rng.randbytes(3)
        mac = format_mac(XEN_OUI + bytes([r[0] & 0x7F, r[1], r[2]]))
        if mac not in avoid:
            return mac


def default_mac(host: Host, domid: int, devid: int) -> str:
    """:func:`random_mac` from the host's seed, the domain and the device, never the
    MAC of a vif the host has."""
    in_use: set[str] = set()
    for d in host.xenstore.devices:
        if d.devtype == VIF_DEVTYPE and host.xenstored.exists(f"{d.backend_path}/mac"):
            in_use.add(host.xenstored.read(f"{d.backend_path}/mac").decode().lower())
    return random_mac(random.Random(f"vif-mac/{host.seed}/{domid}/{devid}"), in_use)


def _release(host: Host, dirs: DeviceDirs | None, front: XnXenbus | None,
             back: NetbackXenbus | None, nb: Netback, timeout: float) -> bool:
    clean = True
    if dirs is not None:
        clean = host.xenstore.remove_device(dirs, timeout)
    for drv in (back, front):
        # each one's errors from before counted from when its turn comes
        if drv is not None and not reap_drivers([drv], [drv.error], timeout + 2.0):
            clean = False
    nb.disconnect()
    return clean


def attach_vif(host: Host, guest: Guest, *, mac: str | None, bridge: Bridge,
               devid: int | None = None, queues: int = XN_DEFAULT_QUEUES,
               split_event_channels: bool = True, max_queues: int = NETBACK_MAX_QUEUES,
               rx_pool_size: int | None = None, mtu: int | None = None,
               timeout: float = VIF_CONNECT_TIMEOUT) -> Vif:
    """Give ``guest`` a NIC on ``bridge`` and wait until both ends are connected.

    Args:
        mac: ``aa:bb:cc:dd:ee:ff``, or None for :func:`default_mac`.
        devid: the vif number (default: the next free one of the guest).
        queues: queues netfront asks for; ``max_queues`` what netback allows.
        split_event_channels: whether netfront asks for two ports per queue.
        rx_pool_size: maps per netfront rx pool (default ring size + 1).

    Raises:
        VifError: a bad MAC, the device exists, a driver does not attach, or
            the ends do not connect in time; nothing is left attached.
    """
    dom0 = host.dom0
    if guest.xenstore is None or dom0.xenstore is None:
        raise VifError(f"{guest.name}: no xenstore (the domain is being destroyed)")
    if devid is None:
        used = {d.devid for d in host.xenstore.devices
                if d.devtype == VIF_DEVTYPE and d.frontend_id == guest.domid}
        devid = next(i for i in range(len(used) + 1) if i not in used)
    mac = default_mac(host, guest.domid, devid) if mac is None else mac
    if parse_mac(mac) is None:
        raise VifError(f"{guest.name}: bad mac {mac!r}")
    what = f"{guest.name} vif {devid}"
    nb = Netback(dom0.hc, dom0.kernel, guest.domid, devid=devid, bridge=bridge,
                 max_queues=max_queues)
    dirs: DeviceDirs | None = None
    back: NetbackXenbus | None = None
    front: XnXenbus | None = None
    ok = False
    try:
        fkeys = {"mac": mac, "handle": str(devid)}
        if mtu is not None:
            fkeys["mtu"] = str(mtu)
        try:
            dirs = host.xenstore.add_device(
                guest.domid, dom0.domid, VIF_DEVTYPE, devid, front=fkeys,
                back={"mac": mac, "bridge": bridge.name, "handle": str(devid), "type": "vif",
                      "script": ""})
        except XenstoreSetupError as e:
            raise VifError(f"{what}: {e}") from e
        error, back = netback_attach(dom0.xenstore, dom0.kernel, nb)
        if back is None:
            raise VifError(f"{what}: netback's xenbus driver did not attach: "
                           f"{os.strerror(error)}")
        error, front = xn_attach(guest.kernel, guest.hc, guest.gnttab, guest.xenstore, devid,
                                 queues=queues, split=split_event_channels,
                                 rx_pool_size=rx_pool_size)
        if front is None:
            raise VifError(f"{what}: netfront's xenbus driver did not attach: "
                           f"{os.strerror(error)}")
        sched = current_scheduler()
        deadline = sched.now() + timeout
        end = {_S.Connected, _S.Closing, _S.Closed}
        ferr, fst = front.wait_state(end, timeout)
        berr, bst = back.wait_state(end, max(0.0, deadline - sched.now()))
        if ferr != 0 or berr != 0 or fst != _S.Connected or bst != _S.Connected:
            timed_out = errno.ETIMEDOUT in (ferr, berr)
            raise VifError(f"{what}: did not connect{' in time' if timed_out else ''} "
                           f"(frontend {fst.name} {front.error}; backend {bst.name} "
                           f"{back.error})")
        vif = Vif(guest, devid, mac, bridge, dirs, nb, back, front)
        vif.device = GuestDevice(nb.name, lambda: destroy_vif(host, vif),
                                 lambda: _abandon(vif))
        host.add_device(guest, vif.device)
        ok = True
        return vif
    finally:
        if not ok:
            _release(host, dirs, front, back, nb, min(timeout, LIBXL_DESTROY_TIMEOUT))


def detach_vif(host: Host, vif: Vif, timeout: float = LIBXL_DESTROY_TIMEOUT) -> bool:
    """Unplug ``vif`` (libxl's sequence) and free both ends; True if it went cleanly.

    A second call does nothing and returns True. Sleeps.
    """
    if not vif.attached:
        return True
    vif.attached = False
    if vif.device is not None:
        host.remove_device(vif.guest, vif.device)
    return _release(host, vif.dirs, vif.frontend, vif.backend, vif.netback, timeout)


def destroy_vif(host: Host, vif: Vif, timeout: float = LIBXL_DESTROY_TIMEOUT) -> bool:
    """Remove ``vif`` of a crashed guest by force; True if the backend closed in time.

    libxl_device.c ``libxl__initiate_device_generic_remove`` with
    ``LIBXL__FORCE_ON`` (``libxl__devices_destroy`` of ``libxl__destroy_domid``),
    as for a disk: what :attr:`Vif.on_destroy` names goes first (the guest's
    Linux stack: its TAP and namespace), then the frontend directory is removed
    and the backend's ``online`` 0 and Closing written in one transaction;
    netback sees its frontend gone, disconnects (leaves the bridge, closes its
    event channels, unmaps its rings, frees its grant copy staging pages) and
    closes; then the backend directory goes. Nothing of the guest's netfront
    runs: it is dead. A second call does nothing and returns True. Sleeps (a
    toolstack thread).
    """
    if not vif.attached:
        return True
    vif.attached = False
    hooks, vif.on_destroy = vif.on_destroy, []
    for hook in hooks:
        hook()
    clean = host.xenstore.remove_device(vif.dirs, timeout, force=True)
    if not reap_driver(vif.backend, timeout + 2.0):
        clean = False
    vif.netback.disconnect()  # a no-op once its driver ended
    return clean


def _abandon(vif: Vif) -> None:
    """The host goes away with ``vif`` attached: no I/O, no sleep (its threads are killed)."""
    vif.attached = False
    vif.on_destroy = []
