"""vif = [...] in a config: the xl network syntax (xl-network-configuration(5),
libxl's parser in tools/libs/util/libxlu_vif.c / xl's parse_nic_config in
tools/xl/xl_parse.c: comma-separated key=value, mac as six hex octets), with
gntdma's netns= and tapname= for the real-stack wiring."""

from __future__ import annotations

import pytest

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
