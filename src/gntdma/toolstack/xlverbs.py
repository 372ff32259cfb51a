"""The verbs of ``gntdma xl``, as Xen 4.17's ``xl`` prints them.

Each verb runs on a toolstack kernel thread of the host (see
:mod:`gntdma.toolstack.control`) and answers ``(status, stdout, stderr)``.
Output follows ``tools/xl`` (RELEASE-4.17.7): ``xl list`` the columns of
``list_domains`` (``xl_info.c``) plus a ``Grant frames`` column (frames set
up / ``max_grant_frames``); ``xl info`` the ``key : value`` lines of
``print_info``; ``block-list`` and ``network-list`` the columns of
``main_blocklist`` (``xl_block.c``) and ``main_networklist`` (``xl_nic.c``),
read from xenstore as ``libxl_device_disk_getinfo`` and
``libxl_device_nic_getinfo`` do; errors the words of ``find_domain``
(``xl_utils.c``) and of each verb. ``xl list``'s ``Time(s)`` is CPU time,
which the model does not account: it shows ``-``.

What may be detached is what the host attached through the toolstack: the
job's disks and vifs (given with :meth:`Console.add_disks` and
:meth:`Console.set_net`) and those attached with ``block-attach`` or
``network-attach``; :meth:`Console.release` detaches the latter before the
job tears the guests down. ``destroy`` is ``xl destroy``: the guest is
destroyed at once with its devices removed by force, as after a crash
(:meth:`~gntdma.toolstack.host.Host.crash_guest`, why "destroyed by xl
destroy").
"""

from __future__ import annotations

import json
import platform
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, final

import gntdma
from gntdma.errors import ConfigError, GntdmaError
from gntdma.host.netns import NetnsError
from gntdma.sched import ThreadState, tsleep
from gntdma.toolstack.host import Guest, Host
from gntdma.toolstack.netjob import NetJob
from gntdma.toolstack.vbd import Vbd, VbdError, attach_disk, detach_disk
from gntdma.toolstack.vif import Vif, VifError, attach_vif, detach_vif, random_mac
from gntdma.toolstack.xlcfg import parse_disk_spec, vdev_to_devid
from gntdma.toolstack.xlvif import parse_vif_spec
from gntdma.toolstack.xs import GUEST_SPECIAL_PAGES
from gntdma.xenstored import XsError

__all__ = ["VERBS", "Console"]

#: libxl's ERROR_INVAL, what ``find_domain`` prints for a name it does not know.
_ERROR_INVAL: Final = -6
#: Seconds ``destroy`` waits for the domain to go.
_DESTROY_TIMEOUT: Final = 30.0
#: Xen's version as the model follows it.
_XEN: Final = (4, 17, ".7")

Answer = tuple[int, str, str]

#: ``help("list")`` (xl_cmdtable.c), the options this console has.
_LIST_USAGE: Final = ("Usage: xl [-v] list [options] [Domain]\n\n"
                      "List information about all/some domains.\n\n"
                      "Options:\n\n-l, --long              Output all VM details\n")


@dataclass(frozen=True, slots=True)
class _Cmd:
    """A verb's entry of ``cmd_table`` (xl_cmdtable.c) and the ``num_opts_req`` its
    ``main_*`` gives ``SWITCH_FOREACH_OPT`` (xl_utils.h)."""

    min_args: int
    usage: str
    desc: str
    can_dryrun: bool = False
    modifies: bool = False
    options: str = ""

    def help(self, verb: str) -> str:
        """``help(command)`` (xl.c): what ``-h`` and too few arguments print on stdout."""
        text = (f"Usage: xl [-vtT{'f' if self.modifies else ''}"
                f"{'N' if self.can_dryrun else ''}] {verb} {self.usage}\n\n{self.desc}.\n\n")
        return text + (f"Options:\n\n{self.options}\n" if self.options else "")


#: RELEASE-4.17.7: xl_cmdtable.c for the texts, xl_block.c (main_blockattach 2,
#: main_blocklist 1, main_blockdetach 2), xl_nic.c (main_networkattach 1,
#: main_networklist 1, main_networkdetach 2), xl_vmcontrol.c (main_destroy 1),
#: xl_info.c (main_list, main_info: 0) for the arguments each requires.
_CMDS: Final = {
    "list": _Cmd(0, "[options] [Domain]\n", "List information about all/some domains"),
    "info": _Cmd(0, "", "Get information about Xen host"),
    "block-attach": _Cmd(2, "<Domain> <disk-spec-component(s)>...",
                         "Create a new virtual block device", True, True),
    "block-list": _Cmd(1, "<Domain(s)>", "List virtual block devices for a domain"),
    "block-detach": _Cmd(2, "[option] <Domain> <DevId>",
                         "Destroy a domain's virtual block device", False, True),
    "network-attach": _Cmd(1, "<Domain> [type=<type>] [mac=<mac>] [bridge=<bridge>] "
                           "[ip=<ip>] [script=<script>] [backend=<BackDomain>] "
                           "[vifname=<name>] [rate=<rate>] [model=<model>] "
                           "[accel=<accel>] [mtu=<mtu>]",
                           "Create a new virtual network device", True, True),
    "network-list": _Cmd(1, "<Domain(s)>", "List virtual network interfaces for a domain"),
    "network-detach": _Cmd(2, "<Domain> <DevId|mac>",
                           "Destroy a domain's virtual network device", False, True),
    "destroy": _Cmd(1, "[options] <Domain>\n", "Terminate a domain immediately",
                    False, True),
}


def _getopt(verb: str, args: list[str]) -> Answer | list[str]:
    """``def_getopt`` (xl_utils.c) for a verb that takes no option of its own here:
    ``-h``/``--help`` is the help (status 0); another option "option `X' not
    supported." (status 2); fewer arguments than the verb requires "'xl VERB'
    requires at least N argument(s)." and the help (status 2, xl's ``exit(2)``).
    Otherwise the arguments, ``--`` taken out (getopt's end of the options)."""
    cmd = _CMDS[verb]
    rest: list[str] = []
    it = iter(args)
    for a in it:
        if a == "--":
            rest.extend(it)
            break
        if a in ("-h", "--help"):
            return 0, cmd.help(verb), ""
        if a.startswith("-") and a != "-":
            bad = a if a.startswith("--") else a[1]
            return 2, "", f"option `{bad}' not supported.\n"
        rest.append(a)
    if len(rest) < cmd.min_args:
        n = cmd.min_args
        return 2, cmd.help(verb), (f"'xl {verb}' requires at least {n} "
                                   f"argument{'s' if n > 1 else ''}.\n\n")
    return rest


class _Fail(Exception):
    """A verb failed: its message for stderr (status 1)."""


@final
class Console:
    """What the control socket may act on, and the verbs."""

    def __init__(self, host: Host, log: Callable[[str], None] = print) -> None:
        self.host = host
        self.log = log
        #: Disks that may be detached, by (frontend domid, devid).
        self.vbds: dict[tuple[int, int], Vbd] = {}
        #: Those ``block-attach`` made (detached by :meth:`release`).
        self.attached: list[Vbd] = []
        self.net: NetJob | None = None
        self._own_net = False
        self._vif_owner: list[Vif] = []  #: vifs ``network-attach`` made
        self.destroyed: list[str] = []
        self.released = False

    def add_disks(self, vbds: list[Vbd]) -> None:
        """Disks attached by the job (``block-detach`` may take them away)."""
        for v in vbds:
            self.vbds[v.guest.domid, v.devid] = v

    def set_net(self, net: NetJob | None) -> None:
        """The job's network (``network-attach`` adds to it)."""
        if net is not None:
            self.net = net

    # -- dispatch ---------------------------------------------------------------------

    def run(self, verb: str, args: list[str], cwd: str) -> Answer:
        """Run one verb; never raises."""
        fn = VERBS.get(verb)
        if fn is None:
            return 1, "", (f"xl: unknown verb {verb!r} (one of "
                           f"{', '.join(sorted(VERBS))})\n")
        if self.released:
            return 1, "", "the host is shutting down\n"
        if verb != "list":  # list reads its own options (-l)
            got = _getopt(verb, args)
            if isinstance(got, tuple):
                return got
            args = got
        try:
            return fn(self, args, cwd)
        except _Fail as e:
            return 1, "", f"{e}\n"
        except (GntdmaError, OSError, XsError) as e:  # a bug of a verb, said plainly
            return 1, "", f"{verb}: {e}\n"

    def _domain(self, text: str) -> Guest:
        """``libxl_domain_qualifier_to_domid``: a domid if all digits, else a name."""
        guests = self.host.guests
        if text.isdigit():
            g = guests.get(int(text))
            if g is not None:
                return g
        else:
            for g in guests.values():
                if g.name == text:
                    return g
        raise _Fail(f"{text} is an invalid domain identifier (rc={_ERROR_INVAL})")

    def _live(self, text: str) -> Guest:
        g = self._domain(text)
        if g.name in self.host.crashed:
            raise _Fail(f"{text}: the domain is dying")
        return g

    # -- list, info -----------------------------------------------------------------------

    def list_(self, args: list[str], cwd: str) -> Answer:
        """``main_list`` (xl_info.c): ``-l``/``--long`` prints the domains' configs
        as JSON (``list_domains_details``); at most one domain is named. Options
        are getopt's (xl_utils.c, ``def_getopt``): ``-h`` is the help, an unknown
        one "option `X' not supported." with status 2 (``-1`` is an option, not
        a domain); xl's ``-v``, ``-Z``, ``-c``, ``-n`` are not offered here."""
        details = False
        names = []
        for a in args:
            if a in ("-l", "--long"):
                details = True
            elif a in ("-h", "--help"):
                return 0, _LIST_USAGE, ""
            elif a.startswith("-") and a != "-":
                bad = a if a.startswith("--") else a[1]
                return 2, "", f"option `{bad}' not supported.\n"
            else:
                names.append(a)
        if len(names) > 1:
            return 1, "", _LIST_USAGE
        guests = ([self._domain(a) for a in names] if names
                  else sorted(self.host.guests.values(), key=lambda g: g.domid))
        if details:
            return 0, json.dumps([self._config(g) for g in guests], indent=2) + "\n", ""
        lines = ["Name                                        ID   Mem VCPUs\tState\tTime(s)"
                 "   Grant frames"]
        for g in guests:
            mem = g.domain.memory.nr_pages * 4096 >> 20
            crashed = g.name in self.host.crashed
            threads = [t for t in self.host.sched.threads
                       if t.domain is g.kernel or t.domain is g.domain]
            running = any(t.state in (ThreadState.RUNNABLE, ThreadState.RUNNING)
                          for t in threads)
            state = ("r" if running and not crashed else "-") + \
                    ("b" if not running and not crashed else "-") + "-" + \
                    ("s" if crashed else "-") + ("c" if crashed else "-") + \
                    ("d" if crashed else "-")
            st = g.gnttab.statistics()
            lines.append(f"{g.name:<40s} {g.domid:5d} {mem:5d} {1:5d}     {state}  "
                         f"{'-':>8s}   {st.nr_frames}/{st.max_frames}")
        return 0, "\n".join(lines) + "\n", ""

    def _config(self, g: Guest) -> dict[str, object]:
        """``printf_info_one_json``: ``{"domid", "config"}``, the config a subset of
        ``libxl_domain_config`` (c_info, b_info, disks, nics) read from the host."""
        disks = []
        for _devid, fe in self._devs(g, "vbd"):
            be = self._xs(f"{fe}/backend") or ""
            disks.append({"pdev_path": self._xs(f"{be}/params") or "",
                          "vdev": self._xs(f"{be}/dev") or "",
                          "readwrite": 0 if self._xs(f"{be}/mode") == "r" else 1})
        nics = []
        for devid, fe in self._devs(g, "vif"):
            be = self._xs(f"{fe}/backend") or ""
            nics.append({"devid": devid, "mac": self._xs(f"{fe}/mac") or "",
                         "bridge": self._xs(f"{be}/bridge") or ""})
        pages = g.domain.memory.nr_pages - GUEST_SPECIAL_PAGES  # the config's memory
        return {"domid": g.domid, "config": {
            "c_info": {"type": "pv", "name": g.name},
            "b_info": {"max_memkb": pages * 4, "target_memkb": pages * 4,
                       "max_grant_frames": g.gnttab.statistics().max_frames},
            "disks": disks, "nics": nics}}

    def info(self, args: list[str], cwd: str) -> Answer:
        u = platform.uname()
        hv = self.host.hv
        total = sum(d.memory.nr_pages for d in hv.domains.values()) * 4096 >> 20
        rows = [
            ("host", u.node), ("release", u.release), ("version", u.version),
            ("machine", u.machine), ("nr_cpus", "1"), ("max_cpu_id", "0"),
            ("nr_nodes", "1"), ("total_memory", str(total)), ("free_memory", "0"),
            ("xen_major", str(_XEN[0])), ("xen_minor", str(_XEN[1])),
            ("xen_extra", _XEN[2]), ("xen_version", f"{_XEN[0]}.{_XEN[1]}{_XEN[2]}"),
            ("xen_caps", "xen-3.0-x86_64 hvm-3.0-x86_64"), ("xen_scheduler", "gntdma"),
            ("xen_pagesize", "4096"),
            ("xen_commandline", f"gntdma {gntdma.__version__} (emulated host)"),
            ("nr_domains", str(len(hv.domains))),
            ("xend_config_format", "4"),
        ]
        return 0, "".join(f"{k:<23s}: {v}\n" for k, v in rows), ""

    # -- disks -----------------------------------------------------------------------------

    def _xs(self, path: str) -> str | None:
        try:
            return self.host.xenstore.toolstack.read(path).decode("latin-1")
        except XsError:
            return None

    def _devs(self, g: Guest, devtype: str) -> list[tuple[int, str]]:
        base = f"/local/domain/{g.domid}/device/{devtype}"
        try:
            ids = self.host.xenstore.toolstack.directory(base)
        except XsError:
            return []
        return sorted((int(i), f"{base}/{i}") for i in ids if i.isdigit())

    def _int(self, path: str) -> int:
        v = self._xs(path)
        try:
            return int(v) if v is not None else -1
        except ValueError:
            return -1

    def block_list(self, args: list[str], cwd: str) -> Answer:
        out = [f"{'Vdev':<5s} {'BE':<3s} {'handle':<6s} {'state':<5s} {'evt-ch':<6s} "
               f"{'ring-ref':<8s} {'BE-path':<30s}"]
        err = []
        for a in args:
            try:
                g = self._domain(a)
            except _Fail as e:
                err.append(f"{a} is an invalid domain identifier" if "invalid" in str(e)
                           else str(e))
                continue
            for devid, fe in self._devs(g, "vbd"):
                be = self._xs(f"{fe}/backend") or ""
                out.append(f"{devid:<5d} {self._int(f'{fe}/backend-id'):<3d} {g.domid:<6d} "
                           f"{self._int(f'{fe}/state'):<5d} "
                           f"{self._int(f'{fe}/event-channel'):<6d} "
                           f"{self._int(f'{fe}/ring-ref'):<8d} {be:<30s}")
        return 0, "\n".join(out) + "\n", "".join(e + "\n" for e in err)

    def block_attach(self, args: list[str], cwd: str) -> Answer:
        g = self._live(args[0])
        try:
            spec = parse_disk_spec(",".join(args[1:]), source="command line")
        except ConfigError as e:
            raise _Fail(str(e)) from e
        if (g.domid, spec.devid) in self.vbds and self.vbds[g.domid, spec.devid].attached:
            raise _Fail(f"{spec.vdev}: {g.name} already has this device\n"
                        "libxl_device_disk_add failed.")
        try:
            vbd = attach_disk(self.host, g, spec, image_dir=cwd)
        except VbdError as e:
            raise _Fail(f"{e}\nlibxl_device_disk_add failed.") from e
        self.vbds[g.domid, spec.devid] = vbd
        self.attached.append(vbd)
        self.log(f"xl: {g.name}: {spec.vdev} attached ({vbd.image_path})")
        return 0, "", ""

    def block_detach(self, args: list[str], cwd: str) -> Answer:
        g = self._live(args[0])
        devid = _devid(args[1])
        vbd = self.vbds.get((g.domid, devid)) if devid is not None else None
        if vbd is None or not vbd.attached:
            raise _Fail(f"Error: Device {args[1]} not connected.")
        clean = detach_disk(self.host, vbd)
        del self.vbds[g.domid, vbd.devid]
        if vbd in self.attached:
            self.attached.remove(vbd)
        self.log(f"xl: {g.name}: {vbd.vdev} detached")
        if not clean:
            raise _Fail("libxl_device_disk_safe_remove failed.")
        return 0, "", ""

    # -- network ----------------------------------------------------------------------------

    def network_list(self, args: list[str], cwd: str) -> Answer:
        out = [f"{'Idx':<3s} {'BE':<2s} {'Mac Addr.':<17s} {'handle':<6s} {'state':<5s} "
               f"{'evt-ch':<6s} {'tx-':>5s}/{'rx-ring-ref':<5s} {'BE-path':<30s}"]
        for a in args:
            g = self._domain(a)
            for devid, fe in self._devs(g, "vif"):
                evt = self._int(f"{fe}/event-channel")
                if evt == -1:  # one queue with split channels, or several queues
                    evt = self._int(f"{fe}/event-channel-tx")
                    if evt == -1:
                        evt = self._int(f"{fe}/queue-0/event-channel-tx")
                tx, rx = self._int(f"{fe}/tx-ring-ref"), self._int(f"{fe}/rx-ring-ref")
                if tx == -1:
                    tx, rx = (self._int(f"{fe}/queue-0/tx-ring-ref"),
                              self._int(f"{fe}/queue-0/rx-ring-ref"))
                mac = self._xs(f"{fe}/mac") or ""
                out.append(f"{devid:<3d} {self._int(f'{fe}/backend-id'):<2d} {mac:<17s}"
                           f"{devid:6d} {self._int(f'{fe}/state'):5d} {evt:6d} "
                           f"{tx:5d}/{rx:<11d} {self._xs(f'{fe}/backend') or '':<30s}")
        return 0, "\n".join(out) + "\n", ""

    def _netjob(self) -> NetJob:
        if self.net is None:
            self.net = NetJob(self.host, self.log)
            self._own_net = True
        return self.net

    def network_attach(self, args: list[str], cwd: str) -> Answer:
        g = self._live(args[0])
        try:
            spec = parse_vif_spec(",".join(args[1:]))
        except ConfigError as e:
            raise _Fail(f"{e}\nlibxl_device_nic_add failed.") from e
        job = self._netjob()
        taken = {v.mac for _g, v, _w in job.vifs}
        mac = spec.mac if spec.mac is not None else random_mac(
            random.Random(f"xl-vif/{self.host.seed}/{len(taken)}"), taken)
        try:
            wb = job.wiring.bridge(spec.bridge)
            vif = attach_vif(self.host, g, mac=mac, bridge=wb.bridge)
        except (VifError, NetnsError, OSError) as e:
            raise _Fail(f"{e}\nlibxl_device_nic_add failed.") from e
        try:
            wv = job.wiring.wire(vif, wb, netns=spec.netns, tapname=spec.tapname)
        except (NetnsError, OSError) as e:
            detach_vif(self.host, vif)
            raise _Fail(f"{e}\nlibxl_device_nic_add failed.") from e
        job.vifs.append((g, vif, wv))
        self._vif_owner.append(vif)
        self.log(f"xl: {g.name}: {vif.name} mac {vif.mac} on {wb.bridge.name}: {wv.address} "
                 f"in namespace {wv.netns.name}")
        return 0, "", ""

    def network_detach(self, args: list[str], cwd: str) -> Answer:
        g = self._live(args[0])
        which = args[1]
        for entry in list(self.net.vifs if self.net is not None else []):
            eg, vif, wv = entry
            if eg is not g:
                continue
            if (":" in which and vif.mac == which.lower()) or (
                    ":" not in which and which.isdigit() and vif.devid == int(which)):
                assert self.net is not None
                self.net.vifs.remove(entry)
                self.net.wiring.unwire(wv)
                clean = detach_vif(self.host, vif)
                if vif in self._vif_owner:
                    self._vif_owner.remove(vif)
                self.log(f"xl: {g.name}: {vif.name} detached")
                if not clean:
                    raise _Fail("libxl_device_nic_del failed.")
                return 0, "", ""
        raise _Fail(f"Unknown device {which}.")

    # -- destroy ----------------------------------------------------------------------------

    def destroy(self, args: list[str], cwd: str) -> Answer:
        g = self._domain(args[0])
        if g.domid == 0:
            raise _Fail("Not destroying dom 0")
        if g.name not in self.host.crashed:
            # crash_guest kills threads: it runs in the hub, not on this thread
            self.host.sched.call_later(0.0, lambda: self.host.crash_guest(
                g, "destroyed by xl destroy"))
            self.destroyed.append(g.name)
        deadline = self.host.sched.now() + _DESTROY_TIMEOUT
        while g.domid in self.host.guests and self.host.sched.now() < deadline:
            tsleep(self, "xldestroy", 0.02)
        for key in [k for k in self.vbds if k[0] == g.domid]:
            vbd = self.vbds.pop(key)
            if vbd in self.attached:
                self.attached.remove(vbd)
        self.log(f"xl: {g.name} destroyed")
        if g.domid in self.host.guests:
            raise _Fail(f"destroy failed: {g.name} still there after {_DESTROY_TIMEOUT:.0f} s")
        return 0, "", ""

    # -- the end ----------------------------------------------------------------------------

    def release(self) -> bool:
        """Detach what the verbs attached (sleeps; thread0 or a toolstack thread);
        True if everything went cleanly. No verb runs afterwards."""
        self.released = True
        clean = True
        for vbd in reversed(self.attached):
            if vbd.guest.name not in self.host.crashed:
                clean = detach_disk(self.host, vbd) and clean
        self.attached.clear()
        if self.net is not None:
            # The job's own network: only what the verbs added; ours: all of it.
            for entry in [e for e in reversed(self.net.vifs)
                          if self._own_net or e[1] in self._vif_owner]:
                self.net.vifs.remove(entry)
                self.net.wiring.unwire(entry[2])
                if entry[0].name not in self.host.crashed:
                    clean = detach_vif(self.host, entry[1]) and clean
            if self._own_net:
                self.net.wiring.close()
        self._vif_owner.clear()
        return clean


def _devid(text: str) -> int | None:
    """A vdev name (``xvdb``) or its number (``51728``)."""
    if text.isdigit():
        return int(text)
    try:
        return vdev_to_devid(text)
    except (ConfigError, ValueError):
        return None


VERBS: Final[dict[str, Callable[[Console, list[str], str], Answer]]] = {
    "list": Console.list_,
    "info": Console.info,
    "block-list": Console.block_list,
    "block-attach": Console.block_attach,
    "block-detach": Console.block_detach,
    "network-list": Console.network_list,
    "network-attach": Console.network_attach,
    "network-detach": Console.network_detach,
    "destroy": Console.destroy,
}
