"""``gntdma serve`` with a config that names a NIC: the vif is attached and wired as
``run`` does it, so the guest's network is reachable while serving (a config that
works for run works for serve), and it goes at the end with nothing left."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from tests.toolstack.serve_helpers import run, serving

from gntdma.host.netns import net_unavailable

pytestmark = pytest.mark.skipif(net_unavailable() is not None, reason=str(net_unavailable()))


def _netns() -> set[str]:
    try:
        return set(os.listdir("/run/netns"))
    except FileNotFoundError:
        return set()


def test_serve_attaches_a_configs_vif_and_the_guests_network_is_reachable_while_serving(
        tmp_path: Path) -> None:
    ns = f"gnt{os.getpid():x}n"  # unique to this test process
    cfg = tmp_path / "g.cfg"
    cfg.write_text('name = "g"\nmemory = 32\nmax_grant_frames = 4\n'
                   f"vif = [ 'mac=00:16:3e:00:00:2c, bridge=xenbr0, netns={ns}' ]\n"
                   f"disk = [ 'format=raw, vdev=xvda, access=rw, size=8M, "
                   f"target={tmp_path / 'a.img'}' ]\n")
    with serving(tmp_path, cfg) as s:
        wired = [ln for ln in s.lines if f"in namespace {ns}" in ln]
        assert wired and "198.18.0.10" in wired[0] and "dom0 198.18.0.1" in wired[0], s.lines
        # The guest's Linux stack to dom0's: TAP, netfront, rings, netback, bridge, TAP.
        p = run("ip", "netns", "exec", ns, "ping", "-c", "3", "-i", "0.2", "-W", "5",
                "198.18.0.1", timeout=60)
        assert "3 received" in p.stdout
        # and the disk is served as before
        assert s.uris == [s.uri("g/xvda")]
        report = s.stop()
    assert s.status == 0, f"{s.stderr}\n{s.lines[-15:]}"
    assert report["ok"], [c for c in report["checks"] if not c["ok"]]
    checks = {c["name"]: c["ok"] for c in report["checks"]}
    assert checks["vifs attached and wired to their namespaces"]
    assert checks["vifs detached with the libxl sequence, namespaces and TAPs removed"]
    assert checks["teardown: nothing leaked"]
    (vif,) = report["guests"][0]["vifs"]
    assert vif["netns"] == ns and vif["packets"] >= 6 and vif["errors"] == 0
    assert ns not in _netns()
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    assert f"gd{s.proc.pid:x}t" not in links
