"""A vif is a device of its guest, as a vbd is: registered at attach, forgotten at
detach, removed by force when the guest crashes, abandoned when the host closes.
No TAP or namespace here (no root needed): the vif is on a bridge of its own."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from gntdma.abi.event_channel import EVTCHNSTAT_interdomain
from gntdma.dev.netbridge import Bridge
from gntdma.sched import ThreadState
from gntdma.toolstack.host import Guest, Host
from gntdma.toolstack.vif import Vif, attach_vif, detach_vif

T = TypeVar("T")


def _on_thread(host: Host, fn: Callable[[], T]) -> T:
    t = host.sched.spawn(fn, name="t")
    host.sched.run(until=lambda: t.state is ThreadState.DONE)
    if t.exc is not None:
        raise t.exc
    return t.result  # type: ignore[return-value]


def _attach(host: Host, g: Guest, br: Bridge) -> Vif:
    return _on_thread(host, lambda: attach_vif(host, g, mac=None, bridge=br))


def test_a_vif_is_a_device_of_its_guest_until_detached(host: Host) -> None:
    g = host.create_guest("g", memory_mb=16, max_grant_frames=4)
    vif = _attach(host, g, Bridge("xenbr0"))
    assert [d.name for d in host.devices[g.domid]] == [vif.name]
    assert _on_thread(host, lambda: detach_vif(host, vif))
    assert g.domid not in host.devices
    host.destroy_guest(g)


def test_a_crashed_guests_vif_is_removed_by_force_with_it(host: Host) -> None:
    """libxl_domain.c ``libxl__destroy_domid`` -> ``libxl__devices_destroy``: every
    device of the dead domain, vifs included, goes by libxl_device.c
    ``libxl__initiate_device_generic_remove`` with ``LIBXL__FORCE_ON`` (frontend
    directory removed, backend ``online`` 0 and Closing); netback disconnects from
    its dead frontend (Linux xen-netback ``xenvif_disconnect_data``: rings unmapped,
    event channels unbound) and leaves the bridge."""
    g = host.create_guest("g", memory_mb=16, max_grant_frames=4)
    br = Bridge("xenbr0")
    vif = _attach(host, g, br)
    unwired: list[str] = []
    vif.on_destroy.append(lambda: unwired.append(vif.name))
    assert [p.name for p in br.ports] == [vif.name]
    domid = g.domid
    host.crash_guest(g, "injected")
    host.wait_crashes()
    crash = host.crashes["g"]
    assert crash.devices == [vif.name] and crash.clean and crash.done_at is not None
    assert unwired == [vif.name]  # the wiring went first, once
    assert not vif.attached and vif.netback.state == "disconnected"
    assert br.ports == ()
    dom0 = host.hv.domains[0]
    assert not any(m.granter == domid for m in dom0.maptrack.entries.values())
    assert not any(p.state == EVTCHNSTAT_interdomain and p.remote_dom == domid
                   for p in dom0.ports.values())
    assert not host.xenstored.exists(f"/local/domain/0/backend/vif/{domid}")
    assert domid not in host.devices and domid not in host.hv.domains


def test_a_vif_still_attached_when_the_host_closes_is_abandoned() -> None:
    host = Host()
    try:
        g = host.create_guest("g", memory_mb=16, max_grant_frames=4)
        vif = _attach(host, g, Bridge("xenbr0"))
        unwired: list[str] = []
        vif.on_destroy.append(lambda: unwired.append(vif.name))
    finally:
        host.close()
    assert not vif.attached and unwired == [] and host.devices == {}
