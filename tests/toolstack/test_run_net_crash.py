"""gntdma run with NICs: a guest that crashes has its vifs torn down at once, like
its disks (DESIGN 3, issue 13 item 5 and issue 11 item 3)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from run_helpers import run_json, write_cfg

from gntdma.host.netns import net_unavailable

pytestmark = pytest.mark.skipif(net_unavailable() is not None, reason=str(net_unavailable()))


def _netns() -> set[str]:
    try:
        return set(os.listdir("/run/netns"))
    except FileNotFoundError:
        return set()


def _disk(tmp: Path) -> str:
    return f"'format=raw, vdev=xvda, access=rw, size=8M, target={tmp / 'd0.img'}'"


def test_a_crashed_guests_vif_is_destroyed_at_once_and_the_other_guests_net_goes_on(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """xl's default ``on_crash = "destroy"`` (docs/man/xl.cfg.5.pod.in) destroys the
    domain with every device: libxl_domain.c ``libxl__destroy_domid`` ->
    ``libxl__devices_destroy``, which removes vifs as it removes disks (libxl_device.c
    ``libxl__initiate_device_generic_remove`` with ``LIBXL__FORCE_ON``: frontend
    directory gone, backend ``online`` 0 and Closing; netback sees its frontend gone
    and disconnects, Linux xen-netback ``xenvif_disconnect_data``: rings unmapped,
    event channels unbound; the hotplug script takes the vif off the bridge). Here:
    two guests with a NIC each on one bridge; one panics in its disk's interrupt
    thread mid-workload. At the moment the toolstack is done with it: no page of it
    mapped in dom0, no port bound to it, its vif backend directory gone, its netback
    no longer a port of the bridge, its namespace and TAP gone, the other guest still
    running. The other guest's ping and verified transfer pass, nothing leaks, the
    report names the crash and the vif torn down."""
    from gntdma.abi.event_channel import EVTCHNSTAT_interdomain
    from gntdma.dev.blkfront import xbd_softc
    from gntdma.sched import KernelPanic
    from gntdma.toolstack.host import Guest, Host
    from gntdma.toolstack.netwire import NetWiring, WiredBridge, WiredVif

    real_int = xbd_softc.xbd_int
    panicked = {"n": 0}

    def panicking(self: xbd_softc, port: int) -> None:
        # The first interrupt after the disk completed writes and reads: its workload
        # is under way (a count of interrupts is not: one drains what is there).
        st = self.statistics()
        if self.xbd_kern.name == "victim" and st.bytes_written > 0 and st.bytes_read > 0:
            panicked["n"] += 1
            raise KernelPanic("injected: xbd_int")
        real_int(self, port)

    bridges: list[WiredBridge] = []
    wired: dict[str, WiredVif] = {}
    real_bridge, real_wire = NetWiring.bridge, NetWiring.wire

    def bridge(self: NetWiring, name: str) -> WiredBridge:
        wb = real_bridge(self, name)
        if wb not in bridges:
            bridges.append(wb)
        return wb

    def wire(self: NetWiring, vif: Any, wb: WiredBridge, **kw: Any) -> WiredVif:
        wv = real_wire(self, vif, wb, **kw)
        wired[vif.guest.name] = wv
        return wv

    seen: dict[str, Any] = {}
    real_destroy = Host._destroy_crashed

    def destroy(self: Host, g: Guest, crash: Any) -> None:
        real_destroy(self, g, crash)
        # The moment the toolstack is done with the crashed guest:
        seen["vif backend dir"] = self.xenstored.exists(
            f"/local/domain/0/backend/vif/{g.domid}")
        seen["victim alive"] = g.domid in self.hv.domains
        # dom0's maptrack (grant_table.c): no page of the crashed guest mapped any more.
        seen["dom0 mappings"] = sum(1 for m in self.hv.domains[0].maptrack.entries.values()
                                    if m.granter == g.domid)
        seen["victim ports bound in dom0"] = sum(
            1 for p in self.hv.domains[0].ports.values()
            if p.state == EVTCHNSTAT_interdomain and p.remote_dom == g.domid)
        seen["victim's netback on the bridge"] = any(
            p.name == f"vif{g.domid}.0" for wb in bridges for p in wb.bridge.ports)
        seen["victim namespace"] = wired["victim"].netns.name in _netns()
        seen["victim tap open"] = not wired["victim"].nic.tap.closed
        seen["survivor still running"] = any(
            t.name.startswith("survivor/") and t.state.name != "DONE"
            for t in self.sched.threads)

    monkeypatch.setattr(xbd_softc, "xbd_int", panicking)
    monkeypatch.setattr(Host, "_destroy_crashed", destroy)
    monkeypatch.setattr(NetWiring, "bridge", bridge)
    monkeypatch.setattr(NetWiring, "wire", wire)
    pid = f"{os.getpid():x}"
    (tmp_path / "v").mkdir()
    (tmp_path / "s").mkdir()
    victim = write_cfg(tmp_path / "v" / "v.cfg", "name='victim'\nmemory=32\n"
                       "max_grant_frames=4\n"
                       f"vif=['mac=00:16:3e:00:00:1a, bridge=brc, netns=gnt{pid}v']\n"
                       f"disk=[{_disk(tmp_path / 'v')}]\n")
    survivor = write_cfg(tmp_path / "s" / "s.cfg", "name='survivor'\nmemory=32\n"
                         "max_grant_frames=4\n"
                         f"vif=['mac=00:16:3e:00:00:1b, bridge=brc, netns=gnt{pid}s']\n"
                         f"disk=[{_disk(tmp_path / 's')}]\n")
    rc, rep, err = run_json(capsys, tmp_path, "--duration", "1.5", "--stall-timeout", "30",
                            str(victim), str(survivor))
    assert rc == 1 and rep["ok"] is False, err
    assert "Traceback" not in err and "stalled" not in rep
    assert panicked["n"] == 1, "the victim did not get far enough to panic"
    assert "injected: xbd_int" in rep["crashed"]["victim"]
    failed = [c for c in rep["checks"] if not c["ok"]]
    assert [c["name"] for c in failed] == ["victim: no guest crashed"], failed
    assert seen == {"vif backend dir": False, "victim alive": False, "dom0 mappings": 0,
                    "victim ports bound in dom0": 0, "victim's netback on the bridge": False,
                    "victim namespace": False, "victim tap open": False,
                    "survivor still running": True}
    victim_vif = rep["guests"][0]["vifs"][0]["vif"]
    (torn,) = [c for c in rep["checks"] if c["name"].startswith("victim: crashed guest "
                                                                  "destroyed")]
    assert victim_vif in torn["detail"] and "xvda" in torn["detail"]
    assert "backends closed" in torn["detail"]
    checks = {c["name"]: c for c in rep["checks"]}
    ping = checks["ping through netfront, netback and the bridge gets every reply"]
    assert ping["ok"] and "3/3" in ping["detail"] and victim_vif not in ping["detail"]
    transfer = checks["bulk TCP transfer into the guest's namespace: equal SHA-256"]
    assert transfer["ok"] and victim_vif not in transfer["detail"]
    assert checks["teardown: nothing leaked"]["ok"]
    assert checks["vifs detached with the libxl sequence, namespaces and TAPs removed"]["ok"]
    assert not {f"gnt{pid}v", f"gnt{pid}s"} & _netns()
