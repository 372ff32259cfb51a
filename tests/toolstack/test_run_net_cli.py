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
from gntdma.toolstack import netjob, preflight
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


def test_a_default_mac_never_equals_a_mac_another_config_names(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A vif without mac= gets a random address under Xen's OUI, as libxl does
    (tools/libs/light/libxl_nic.c libxl__device_nic_setdefault: 00:16:3e, then
    three random octets, the first masked with 0x7f), drawn from the run's seed
    and never a MAC any config of the run names: the address the old default
    gave ga (00:16:3e:00:02:00, from its domid and devid) named by gb runs."""
    a = write_cfg(tmp_path / "a.cfg", "name='ga'\nmemory=16\nvif=['bridge=brm']\n")
    b = write_cfg(tmp_path / "b.cfg", "name='gb'\nmemory=16\n"
                  "vif=['mac=00:16:3e:00:02:00, bridge=brm']\n")
    rc, rep, err = run_json(capsys, tmp_path, str(a), str(b), "--duration", "0.1")
    assert rc == 0, (err[-800:], [c["detail"] for c in rep.get("checks", []) if not c["ok"]])
    ma, mb = (g["vifs"][0]["mac"] for g in rep["guests"])
    assert mb == "00:16:3e:00:02:00" and ma != mb and ma.startswith("00:16:3e:")
    assert int(ma.split(":")[3], 16) & 0x80 == 0
    ping = next(c for c in rep["checks"] if c["name"].startswith("ping through"))
    assert ping["ok"] and "vif2.0 -> vif3.0 3/3" in ping["detail"], ping


def test_tapname_lo_is_refused_up_front(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_cfg(tmp_path / "g.cfg", "name='g'\nmemory=16\nvif=['tapname=lo']\n")
    rc, _out, err = run_cli(capsys, "run", str(cfg), "--duration", "0.1")
    assert rc == 2 and "g.cfg:3: vif 'tapname=lo': tapname='lo'" in err, err


def test_one_tapname_for_two_vifs_of_a_config_runs_each_in_its_namespace(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_cfg(tmp_path / "g.cfg", "name='g'\nmemory=32\nmax_grant_frames=4\n"
                    "vif=['tapname=eth0','tapname=eth0']\n")
    rc, rep, err = run_json(capsys, tmp_path, str(cfg), "--duration", "0.1")
    assert rc == 0, (err[-800:], [c["detail"] for c in rep.get("checks", []) if not c["ok"]])
    vifs = rep["guests"][0]["vifs"]
    assert len(vifs) == 2 and vifs[0]["netns"] != vifs[1]["netns"]


@pytest.mark.parametrize(("what", "exc"), [
    ("tcp_transfer", subprocess.TimeoutExpired(["python", "-c", "sender"], 60)),
    ("tcp_transfer", FileNotFoundError(2, "No such file or directory", "ip")),
    ("tcp_transfer", subprocess.CalledProcessError(1, ["ip", "netns", "exec"])),
    ("ping", subprocess.TimeoutExpired(["ping"], 11)),
], ids=["transfer-timeout", "transfer-tool-missing", "transfer-exit-1", "ping-timeout"])
def test_a_network_check_that_fails_is_a_failed_check_not_a_traceback(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        what: str, exc: Exception) -> None:
    def fail(*_a: object, **_k: object) -> None:
        raise exc

    monkeypatch.setattr(netjob, what, fail)
    cfg = write_cfg(tmp_path / "g.cfg", "name='g'\nmemory=16\nvif=['bridge=brt']\n")
    rc, rep, err = run_json(capsys, tmp_path, str(cfg), "--duration", "0.1")
    assert "Traceback" not in err and rc == 1, err[-1500:]
    name = ("bulk TCP transfer into the guest's namespace: equal SHA-256" if what ==
            "tcp_transfer" else "ping through netfront, netback and the bridge gets every reply")
    check = next(c for c in rep["checks"] if c["name"] == name)
    assert not check["ok"] and str(exc) in check["detail"], check
    assert [c["name"] for c in rep["checks"] if not c["ok"]] == [name]


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
