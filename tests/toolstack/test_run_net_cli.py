"""gntdma run with NICs: the default guest's NIC, two guests on one bridge, the
grant budget of a vif, runs where networking is unavailable, and a killed run
that leaves no namespace behind."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from run_helpers import run_cli, run_json, spawn, write_cfg

from gntdma.host.netns import net_unavailable
from gntdma.toolstack import preflight
from gntdma.toolstack.preflight import VIF_STANDING_REFS

pytestmark = pytest.mark.skipif(net_unavailable() is not None, reason=str(net_unavailable()))

VIF_KEYS = {"vif", "packets", "bytes", "gso_packets", "drops", "errors"}


def _netns() -> set[str]:
    try:
        return set(os.listdir("/run/netns"))
    except FileNotFoundError:
        return set()


def test_the_default_run_has_a_nic_with_ping_and_a_verified_transfer(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
        ) -> None:
    monkeypatch.chdir(tmp_path)
    rc, rep, err = run_json(capsys, tmp_path, "--duration", "0.5")
    assert rc == 0, err
    vifs = rep["guests"][0]["vifs"]
    assert len(vifs) == 1 and VIF_KEYS <= set(vifs[0])
    v = vifs[0]
    assert v["packets"] > 0 and v["bytes"] >= 16 << 20 and v["gso_packets"] > 0
    assert v["errors"] == 0 and v["transfer_sha256_ok"] is True
    names = {c["name"]: c["ok"] for c in rep["checks"]}
    assert names["ping through netfront, netback and the bridge gets every reply"]
    assert names["bulk TCP transfer into the guest's namespace: equal SHA-256"]
    assert names["vifs detached with the libxl sequence, namespaces and TAPs removed"]
    assert not any(n.startswith(f"gd{os.getpid():x}") for n in _netns())


def test_two_guests_from_two_configs_on_one_bridge_ping_each_other(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ns = f"gnt{os.getpid():x}a"  # unique to this run
    a = write_cfg(tmp_path / "a.cfg", "name='ga'\nmemory=16\nmax_grant_frames=4\n"
                  f"vif=['mac=00:16:3e:00:00:0a, bridge=br7, netns={ns}, tapname=eth0']\n")
    b = write_cfg(tmp_path / "b.cfg", "name='gb'\nmemory=16\nmax_grant_frames=4\n"
                  "vif=['mac=00:16:3e:00:00:0b, bridge=br7']\n")
    rc, rep, err = run_json(capsys, tmp_path, str(a), str(b), "--duration", "0.2")
    assert rc == 0, err
    ping = next(c for c in rep["checks"] if c["name"].startswith("ping through"))
    assert ping["ok"] and "vif2.0 -> vif3.0 3/3" in ping["detail"], ping
    va, vb = rep["guests"][0]["vifs"][0], rep["guests"][1]["vifs"][0]
    assert (va["netns"], va["bridge"], vb["bridge"]) == (ns, "br7", "br7")
    assert ns not in _netns()


def test_a_grant_table_too_small_for_a_vif_is_refused_with_the_numbers(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_cfg(tmp_path / "g.cfg", "name='g'\nmemory=16\nmax_grant_frames=1\n"
                    "vif=['mac=00:16:3e:00:00:01']\n")
    rc, _out, err = run_cli(capsys, "run", str(cfg))
    assert rc == 2
    assert "g.cfg:3: max_grant_frames = 1 gives 504 grant references" in err
    assert f"hold {VIF_STANDING_REFS} for life" in err and "max_grant_frames = 2 at least" in err


def test_a_mac_in_two_configs_is_refused(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    a = write_cfg(tmp_path / "a.cfg", "name='ga'\nvif=['mac=00:16:3e:00:00:0a']\n")
    b = write_cfg(tmp_path / "b.cfg", "name='gb'\nvif=['mac=00:16:3E:00:00:0A']\n")
    rc, _out, err = run_cli(capsys, "run", str(a), str(b))
    assert rc == 2 and "b.cfg:2:" in err and "mac 00:16:3e:00:00:0a is already" in err


def test_without_root_or_tun_a_configs_nic_is_refused_and_the_default_goes_without(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
        ) -> None:
    why = "/dev/net/tun is missing (no TUN/TAP support in this system)"
    monkeypatch.setattr(preflight, "net_unavailable", lambda: why)
    cfg = write_cfg(tmp_path / "g.cfg", "name='g'\nmemory=16\nvif=['bridge=xenbr0']\n")
    rc, _out, err = run_cli(capsys, "run", str(cfg))
    assert rc == 2 and f"g.cfg:3: vif: cannot give g a NIC here: {why}" in err
    monkeypatch.chdir(tmp_path)
    rc, rep, err = run_json(capsys, tmp_path, "--duration", "0.2")
    assert rc == 0, err
    assert f"note: the default guest runs without its NIC: {why}" in rep["notes"]
    assert "vifs" not in rep["guests"][0]


def test_a_killed_run_leaves_no_namespace_behind(tmp_path: Path) -> None:
    p = spawn(tmp_path, "run", "--duration", "60", cwd=tmp_path)
    prefix = f"gd{p.pid:x}n"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(n.startswith(prefix) for n in _netns()):
            assert p.poll() is None, p.communicate()
            time.sleep(0.05)
        assert any(n.startswith(prefix) for n in _netns())
        time.sleep(0.5)
    finally:
        p.send_signal(signal.SIGKILL)
        p.communicate()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(n.startswith(prefix) for n in _netns()):
        time.sleep(0.05)
    assert not any(n.startswith(prefix) for n in _netns())
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    assert f"gd{p.pid:x}t" not in out
