"""vif = [...] in a config: the xl network syntax (xl-network-configuration(5),
libxl's parser in tools/libs/util/libxlu_vif.c / xl's parse_nic_config in
tools/xl/xl_parse.c: comma-separated key=value, mac as six hex octets), with
gntdma's netns= and tapname= for the real-stack wiring."""

from __future__ import annotations

import random
import re

import pytest

from gntdma.toolstack.netjob import plan_macs
from gntdma.toolstack.preflight import GuestPlan, RunPlan
from gntdma.toolstack.vif import random_mac
from gntdma.toolstack.xlcfg import XlConfigError, parse_config
from gntdma.toolstack.xlvif import DEFAULT_BRIDGE, VifSpec, VifSpecError, parse_vif_spec


def test_vif_spec_mac_bridge_and_wiring_names() -> None:
    v = parse_vif_spec(" mac=00:16:3E:0a:0B:0c , bridge=br1,netns=gnt-g1,tapname=eth0")
    assert (v.mac, v.bridge, v.netns, v.tapname) == ("00:16:3e:0a:0b:0c", "br1", "gnt-g1",
                                                     "eth0")
    d = parse_vif_spec("")
    assert (d.mac, d.bridge, d.netns, d.tapname) == (None, DEFAULT_BRIDGE, None, None)


def test_vif_xl_keys_gntdma_does_not_use_are_noted() -> None:
    v = parse_vif_spec("mac=00:16:3e:00:00:01,model=rtl8139,script=vif-bridge,backend=0")
    assert len(v.notes) == 2 and "model" in v.notes[0] and "script" in v.notes[1]


@pytest.mark.parametrize(("spec", "words"), [
    ("mac=00:16:3e:00:01", "six hex octets"),
    ("mac=01:00:5e:00:00:01", "multicast"),
    ("mac=00:00:00:00:00:00", "not an interface"),
    ("bridge=a-bridge-name-too-long", "1 to 15"),
    ("bridge=br/0", "1 to 15"),
    ("netns=..", "1 to 15"),
    ("mac=00:16:3e:00:00:01,mac=00:16:3e:00:00:02", "twice"),
    ("brige=br0", "unknown vif key"),
    ("br0", "key=value"),
    ("type=ioemu", "no emulated NICs"),
    ("backend=driverdom", "dom0 only"),
])
def test_vif_spec_refused(spec: str, words: str) -> None:
    with pytest.raises(VifSpecError, match=words):
        parse_vif_spec(spec)


def test_config_vifs_are_parsed_with_lines_and_errors_name_the_line() -> None:
    cfg = parse_config("name='g'\nvif = [ 'mac=00:16:3e:00:00:01',\n 'bridge=br1' ]\n", "g.cfg")
    assert cfg.vifs == (VifSpec(mac="00:16:3e:00:00:01", line=2, text="mac=00:16:3e:00:00:01"),
                        VifSpec(bridge="br1", line=3, text="bridge=br1"))
    with pytest.raises(XlConfigError, match=r"^g.cfg:3: vif 'mac=zz': mac="):
        parse_config("name='g'\nvif = [ 'mac=00:16:3e:00:00:01',\n 'mac=zz' ]\n", "g.cfg")


def test_two_vifs_of_a_config_may_not_share_a_mac_or_namespace() -> None:
    with pytest.raises(XlConfigError, match=r"g.cfg:3: .*mac 00:16:3e:00:00:01 is already"):
        parse_config("name='g'\nvif=['mac=00:16:3e:00:00:01',\n'mac=00:16:3E:00:00:01']",
                     "g.cfg")
    with pytest.raises(XlConfigError, match=r"netns n1 is already another vif's on line 2"):
        parse_config("name='g'\nvif=['netns=n1',\n'netns=n1']", "g.cfg")


@pytest.mark.parametrize("name", ["lo", "sit0", "tunl0", "ip6tnl0", "gre0", "gretap0",
                                  "erspan0", "ip6gre0", "ip_vti0", "ip6_vti0"])
def test_tapname_of_a_device_every_new_namespace_has_is_refused(name: str) -> None:
    """The guest's namespace is new: it always has ``lo`` (drivers/net/loopback.c
    loopback_net_init, in every netns), and the fallback tunnels (tunl0, gre0,
    gretap0, erspan0, sit0, ip6tnl0, ip6gre0, ip_vti0, ip6_vti0) whenever their
    module is loaded (Documentation/admin-guide/sysctl/net.rst
    fb_tunnels_only_for_init_net, 0 by default): renaming the TAP to one of them
    fails at run time, so the config is refused with its line."""
    with pytest.raises(VifSpecError, match=f"tapname={name!r}: .*new namespace"):
        parse_vif_spec(f"tapname={name}")
    with pytest.raises(XlConfigError, match=r"^g.cfg:3: vif 'tapname="):
        parse_config(f"name='g'\nmemory=16\nvif=['tapname={name}']\n", "g.cfg")


def test_a_tapname_may_repeat_across_vifs_since_each_has_its_own_namespace() -> None:
    """Two vifs never share a namespace (a named one is one vif's), so one TAP
    name in each is no clash."""
    cfg = parse_config("name='g'\nvif=['tapname=eth0',\n'tapname=eth0, netns=n1']\n", "g.cfg")
    assert [v.tapname for v in cfg.vifs] == ["eth0", "eth0"]


def _plan(*texts: str) -> RunPlan:
    return RunPlan([GuestPlan(parse_config(t, f"g{i}.cfg"), ()) for i, t in enumerate(texts)])


def test_a_vif_without_mac_gets_a_random_xen_oui_mac_that_replays_and_never_clashes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """libxl_nic.c libxl__device_nic_setdefault (Xen 4.17): a vif without mac= gets
    00:16:3e and three random octets, the first masked with 0x7f. gntdma draws them
    from the run's seed (the same seed, the same MACs) and never gives a MAC that a
    config of the run names or that another vif got (libxl does not check)."""
    plan = _plan("name='ga'\nvif=['', 'bridge=b1']\n",
                 "name='gb'\nvif=['mac=00:16:3e:00:02:00', '']\n")
    macs = plan_macs(plan, 7)
    assert set(macs) == {("ga", 0), ("ga", 1), ("gb", 1)}
    for mac in macs.values():
        assert re.fullmatch(r"00:16:3e:[0-7][0-9a-f](:[0-9a-f]{2}){2}", mac), mac
    assert plan_macs(plan, 7) == macs and plan_macs(plan, 8) != macs
    assert len(set(macs.values()) | {"00:16:3e:00:02:00"}) == 4
    # A generator that keeps drawing what another config names, then another vif's:
    # each vif still gets a MAC of its own.
    draws = iter([b"\x00\x02\x00", b"\x80\x02\x00", b"\x00\x00\x01", b"\x00\x00\x01",
                  b"\x00\x00\x02", b"\x00\x00\x03"])
    monkeypatch.setattr(random.Random, "randbytes", lambda self, n: next(draws))
    assert plan_macs(plan, 7) == {("ga", 0): "00:16:3e:00:00:01",
                                  ("ga", 1): "00:16:3e:00:00:02",
                                  ("gb", 1): "00:16:3e:00:00:03"}


def test_random_mac_masks_the_fourth_octet_as_libxl_does() -> None:
    rng = random.Random(1)
    macs = {random_mac(rng) for _ in range(500)}
    assert all(m.startswith("00:16:3e:") and int(m[9:11], 16) < 0x80 for m in macs)
    assert len(macs) == 500
