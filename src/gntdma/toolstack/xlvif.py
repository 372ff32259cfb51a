"""The ``vif = [...]`` entries of an xl.cfg-style file.

A vif specification is the xl network syntax (``xl-network-configuration(5)``):
comma-separated ``key=value`` settings, in any order, each at most once. The
keys gntdma uses:

============ ==========================================================================
``mac``      the guest's MAC address, six hex octets separated by ``:``; a group
             (multicast) address is refused, as an interface cannot have one
             (default: random under Xen's OUI ``00:16:3e``, as libxl does, drawn
             from the run's seed and never a MAC of another vif of the run)
``bridge``   the bridge in dom0 the vif joins (default ``xenbr0``); a Linux
             interface name: 1 to 15 characters, no ``/``, ``:`` or spaces
============ ==========================================================================

Two gntdma extensions name the real-stack wiring (see
:mod:`gntdma.toolstack.netwire`):

============ ==========================================================================
``netns``    the name of the network namespace that plays the guest's stack (default:
             a name unique to the run); it must not exist when the run starts
``tapname``  the name of the TAP device in that namespace (default: unique to the run);
             not a device every new namespace has: ``lo``, and the fallback tunnels
             (``tunl0``, ``sit0``, ...) that a loaded module puts in each
============ ==========================================================================

Each vif has a namespace of its own (a ``netns`` name is one vif's), so one
``tapname`` for several vifs is no clash.

Other keys ``xl`` knows (``type``, ``model``, ``vifname``, ``script``, ``ip``,
``rate``, ``mtu``, ``gatewaydev``, ``accel``, ``devid``, ``trusted``, ...) are
accepted with a note that gntdma does not use them, except ``backend`` naming
another domain than dom0 and ``type=ioemu``, which are refused (gntdma has
neither driver domains nor emulated NICs). An unknown key is an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, final

from gntdma.errors import ConfigError

__all__ = ["DEFAULT_BRIDGE", "NEW_NETNS_DEVICES", "XL_VIF_UNUSED_KEYS", "VifSpec",
           "VifSpecError", "parse_vif_spec", "vif_clash"]

DEFAULT_BRIDGE: Final = "xenbr0"
#: Keys of xl-network-configuration(5) that gntdma accepts and does not use.
XL_VIF_UNUSED_KEYS: Final = frozenset({
    "type", "model", "vifname", "script", "ip", "rate", "mtu", "gatewaydev", "accel",
    "devid", "trusted", "untrusted", "forwarddev", "backend",
})
_KEYS: Final = ("mac", "bridge", "netns", "tapname")
_MAC: Final = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")
#: A Linux interface or namespace name (dev_valid_name: at most IFNAMSIZ - 1
#: bytes, not ``.`` or ``..``, no ``/``, ``:`` or white space).
_IFNAME: Final = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
#: Devices a new network namespace has: ``lo`` always (drivers/net/loopback.c,
#: loopback_net_init), the fallback tunnels whenever their module is loaded
#: (Documentation/admin-guide/sysctl/net.rst, fb_tunnels_only_for_init_net).
NEW_NETNS_DEVICES: Final = frozenset({
    "lo", "tunl0", "gre0", "gretap0", "erspan0", "sit0", "ip6tnl0", "ip6gre0", "ip_vti0",
    "ip6_vti0",
})


class VifSpecError(ConfigError):
    """A vif specification is wrong (the caller adds where)."""


@final
@dataclass(frozen=True, slots=True)
class VifSpec:
    """One ``vif = [...]`` entry."""

    mac: str | None = None  #: lower case, or None for the default
    bridge: str = DEFAULT_BRIDGE
    netns: str | None = None
    tapname: str | None = None
    notes: tuple[str, ...] = ()  #: keys accepted and not used
    line: int = 0
    text: str = ""  #: as written


def _ifname(key: str, value: str) -> str:
    if _IFNAME.match(value) is None or value in (".", ".."):
        raise VifSpecError(f"{key}={value!r}: a name of 1 to 15 letters, digits, '_', "
                           "'.' or '-' (a Linux interface name)")
    return value


def parse_vif_spec(text: str, *, line: int = 0) -> VifSpec:
    """Parse one vif specification.

    Raises:
        VifSpecError: a setting is malformed, repeated, unknown or refused.
    """
    seen: set[str] = set()
    values: dict[str, str] = {}
    notes: list[str] = []
    for raw in text.split(","):
        item = raw.strip()
        if item == "":
            continue
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if eq == "":
            raise VifSpecError(f"{item!r}: vif settings are key=value (mac=..., bridge=...)")
        if key in seen:
            raise VifSpecError(f"{key} is given twice")
        seen.add(key)
        if key == "backend":
            if value not in ("0", "Domain-0"):
                raise VifSpecError(f"backend={value}: gntdma's backends run in dom0 only")
            continue
        if key == "type" and value.lower() == "ioemu":
            raise VifSpecError("type=ioemu: gntdma has no emulated NICs (type=vif)")
        if key in XL_VIF_UNUSED_KEYS:
            notes.append(f"{key} is an xl vif key gntdma does not use (ignored)")
            continue
        if key not in _KEYS:
            raise VifSpecError(f"unknown vif key {key!r} (gntdma knows {', '.join(_KEYS)}, "
                               "and ignores the other xl vif keys)")
        values[key] = value
    mac = values.get("mac")
    if mac is not None:
        if _MAC.match(mac) is None:
            raise VifSpecError(f"mac={mac!r}: six hex octets separated by ':' "
                               "(00:16:3e:xx:yy:zz)")
        mac = mac.lower()
        if int(mac[:2], 16) & 1 != 0:
            raise VifSpecError(f"mac={mac}: a multicast address (its first octet is odd) "
                               "cannot be an interface's")
        if mac == "00:00:00:00:00:00":
            raise VifSpecError("mac=00:00:00:00:00:00 is not an interface address")
    bridge = _ifname("bridge", values.get("bridge", DEFAULT_BRIDGE))
    netns = values.get("netns")
    tapname = values.get("tapname")
    if tapname is not None and tapname in NEW_NETNS_DEVICES:
        has = "always has" if tapname == "lo" else "may have"
        raise VifSpecError(f"tapname={tapname!r}: the guest's namespace is a new one, and a "
                           f"new namespace {has} a device called {tapname}: the TAP cannot "
                           "take that name")
    return VifSpec(mac=mac, bridge=bridge,
                   netns=_ifname("netns", netns) if netns is not None else None,
                   tapname=_ifname("tapname", tapname) if tapname is not None else None,
                   notes=tuple(notes), line=line, text=text)


def vif_clash(v: VifSpec, others: list[VifSpec] | tuple[VifSpec, ...]) -> str | None:
    """Why ``v`` cannot sit beside ``others`` (a MAC or a namespace twice), or None.

    A TAP name twice is no clash: each vif's TAP is in a namespace of its own.
    """
    for w in others:
        for what, mine, theirs in (("mac", v.mac, w.mac), ("netns", v.netns, w.netns)):
            if mine is not None and mine == theirs:
                where = f" on line {w.line}" if w.line > 0 else ""
                return f"{what} {mine} is already another vif's{where}"
    return None
