"""The network part of ``gntdma run``: each guest's vifs, real stacks on them, traffic.

:func:`attach_nets` gives every guest of the plan the vifs its config names
(:func:`~gntdma.toolstack.vif.attach_vif` on the bridge ``bridge=`` names)
and wires each to a Linux stack (:class:`~gntdma.toolstack.netwire.NetWiring`):
dom0's namespace per bridge, one namespace per vif. :meth:`NetJob.run`
is the workload: ``ping`` from each guest's namespace to dom0's and, for the
first vif of each guest, a bulk TCP transfer of random bytes from dom0's
namespace to the guest's, checked by SHA-256; guests sharing a bridge also
ping each other. :meth:`NetJob.detach` unwires and unplugs the vifs before the
guests go. A run whose plan says networking is unavailable has no NetJob.
"""

from __future__ import annotations

import random
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, final

from gntdma.host.netload import ping, pump, random_file, tcp_transfer
from gntdma.host.netns import NetnsError
from gntdma.sched import ThreadState
from gntdma.toolstack.host import Guest, Host
from gntdma.toolstack.interrupt import private_dir
from gntdma.toolstack.netwire import NetWiring, WiredVif
from gntdma.toolstack.preflight import RunPlan
from gntdma.toolstack.report import Report
from gntdma.toolstack.vif import Vif, VifError, attach_vif, detach_vif, random_mac
from gntdma.toolstack.xlcfg import GuestConfig

__all__ = ["BULK_BYTES", "PING_COUNT", "NetJob", "attach_guest_vifs", "make_netjob",
           "plan_macs"]

#: Bytes of the verified bulk transfer to each guest.
BULK_BYTES: Final = 16 << 20
#: Echo requests of each ping.
PING_COUNT: Final = 3
#: What a network check's programs may raise: a failed check, never a traceback
#: (a timeout, a missing tool, a non-zero exit, output that does not parse).
_CHECK_FAILURES: Final = (NetnsError, OSError, subprocess.SubprocessError, ValueError)


def _on_thread(host: Host, fn: Callable[[], object], name: str) -> None:
    t = host.sched.spawn(fn, name=name)
    host.sched.run(until=lambda: t.state is ThreadState.DONE)
    if t.exc is not None:
        raise t.exc


@final
class NetJob:
    """The vifs of a run and their wiring."""

    def __init__(self, host: Host, log: Callable[[str], None],
                 macs: dict[tuple[str, int], str] | None = None) -> None:
        self.host = host
        self.log = log
        #: The MAC of each vif without ``mac=``, by (guest name, index in its config).
        self.macs: dict[tuple[str, int], str] = {} if macs is None else macs
        self.wiring = NetWiring(host.sched, host.dom0.kernel)
        self.vifs: list[tuple[Guest, Vif, WiredVif]] = []
        self.failed: list[str] = []
        self.results: dict[str, dict[str, Any]] = {}

    def run(self, report: Report, seed: int) -> None:
        """Ping and the verified transfer; their checks."""
        if not self.vifs and not self.failed:
            return
        self.check_attached(report)
        live = [(g, v, wv) for g, v, wv in self.vifs if g.name not in self.host.crashed]
        pings: list[str] = []
        ok = True
        for _g, _v, wv in live:
            r = self._ping(wv.netns, wv.bridge.address)
            self.results.setdefault(wv.name, {})["ping"] = r
            ok = ok and r.startswith(f"{PING_COUNT}/{PING_COUNT}")
            pings.append(f"{wv.name} -> dom0 {r}")
        for i, (_g, _v, a) in enumerate(live):  # guests on one bridge see each other
            for _g2, _v2, b in live[i + 1:]:
                if a.bridge is b.bridge:
                    r = self._ping(a.netns, b.address)
                    ok = ok and r.startswith(f"{PING_COUNT}/{PING_COUNT}")
                    pings.append(f"{a.name} -> {b.name} {r}")
        if live:
            report.check("ping through netfront, netback and the bridge gets every reply", ok,
                         "; ".join(pings))
        firsts: dict[str, WiredVif] = {}
        for g, _v, wv in live:
            firsts.setdefault(g.name, wv)
        if not firsts:
            return
        with private_dir("gntdma-net-") as d:
            src = Path(d) / "bulk.bin"
            sha = random_file(src, BULK_BYTES)
            for wv in firsts.values():
                try:
                    t = pump(self.host.sched, lambda wv=wv: tcp_transfer(  # type: ignore[misc]
                        wv.bridge.netns, wv.netns, wv.address, src, sha256=sha, timeout=60))
                    good = t.ok
                    detail = (f"{wv.name}: {t.size >> 20} MiB from dom0 in {t.seconds:.2f} s "
                              f"({t.mbit_s:.0f} Mbit/s), SHA-256 {t.received_sha256[:16]}..."
                              + ("" if good else f" != {t.sent_sha256[:16]}..."))
                    self.results.setdefault(wv.name, {}).update(
                        transfer_bytes=t.received_size, transfer_seconds=round(t.seconds, 3),
                        transfer_sha256_ok=good)
                except _CHECK_FAILURES as e:
                    good, detail = False, f"{wv.name}: {e}"
                report.check("bulk TCP transfer into the guest's namespace: equal SHA-256",
                             good, detail)

    def check_attached(self, report: Report) -> None:
        """The check that every vif attached and was wired (none if there is no vif)."""
        if not self.vifs and not self.failed:
            return
        report.check("vifs attached and wired to their namespaces", not self.failed,
                     "; ".join(self.failed) or ", ".join(
                         f"{wv.name} {wv.address} ({wv.netns.name})" for _g, _v, wv in self.vifs))

    def _ping(self, ns: Any, addr: str) -> str:
        try:
            r = pump(self.host.sched, lambda: ping(ns, addr, count=PING_COUNT, interval=0.1))
        except _CHECK_FAILURES as e:
            return f"failed: {e}"
        rtt = f", avg {r.rtt_avg_ms:.2f} ms" if r.rtt_avg_ms is not None else ""
        return f"{r.received}/{r.sent} replies{rtt}"

    def figures(self, guest: Guest) -> list[dict[str, Any]]:
        """The per-vif figures of ``guest`` for the JSON report."""
        out = []
        for g, vif, wv in self.vifs:
            if g is not guest:
                continue
            nb = vif.netback.statistics()
            nf = vif.netfront.statistics()
            out.append({
                "vif": vif.name,
                "mac": vif.mac,
                "bridge": vif.bridge.name,
                "netns": wv.netns.name,
                "address": wv.address,
                "packets": nb.tx_packets + nb.rx_packets,
                "bytes": nb.tx_bytes + nb.rx_bytes,
                "gso_packets": nb.tx_gso_packets + nb.rx_gso_packets,
                "drops": nb.drops + nf.drops + wv.nic.stats.drops,
                "errors": nb.errors + nf.rx_errors + nf.tx_errors + wv.nic.stats.errors,
                **self.results.get(wv.name, {}),
            })
        return out

    def detach(self) -> bool:
        """Unwire and unplug every vif, then the namespaces go; True if all went cleanly."""
        clean = [True]

        def go() -> None:
            for g, vif, wv in reversed(self.vifs):
                self.wiring.unwire(wv)
                if g.name not in self.host.crashed and not detach_vif(self.host, vif):
                    clean[0] = False
            self.vifs.clear()
            self.wiring.close()

        _on_thread(self.host, go, "net/detach")
        return clean[0]


def make_netjob(host: Host, plan: RunPlan, log: Callable[[str], None]) -> NetJob | None:
    """The network job of ``plan``, or None when it has no vif to run."""
    if plan.net_unavailable is not None or not any(gp.config.vifs for gp in plan.guests):
        return None
    return NetJob(host, log, plan_macs(plan, host.seed))


def plan_macs(plan: RunPlan, seed: int) -> dict[tuple[str, int], str]:
    """A MAC for each vif of ``plan`` without ``mac=``, by (guest name, index).

    What ``xl create`` gets from libxl (:func:`~gntdma.toolstack.vif.random_mac`:
    random under Xen's OUI), drawn from ``seed`` so that a run replays, and
    never a MAC any config of the run names nor one drawn for another vif.
    """
    taken = {v.mac for gp in plan.guests for v in gp.config.vifs if v.mac is not None}
    rng = random.Random(f"vif-mac/{seed}")
    out: dict[tuple[str, int], str] = {}
    for gp in plan.guests:
        for i, v in enumerate(gp.config.vifs):
            if v.mac is None:
                mac = random_mac(rng, taken)
                taken.add(mac)
                out[(gp.config.name, i)] = mac
    return out


def attach_guest_vifs(job: NetJob, cfg: GuestConfig, guest: Guest) -> None:
    """Attach and wire the vifs ``cfg`` gives ``guest`` (sleeps: on a kernel thread
    or from the hub through the scheduler)."""
    host, log = job.host, job.log
    for i, spec in enumerate(cfg.vifs):
        where = f"{cfg.source}:{spec.line}"
        mac = spec.mac if spec.mac is not None else job.macs.get((cfg.name, i))
        try:
            wb = job.wiring.bridge(spec.bridge)
            vif = attach_vif(host, guest, mac=mac, bridge=wb.bridge)
        except (VifError, NetnsError, OSError) as e:
            job.failed.append(f"{where}: {guest.name}: {e}")
            continue
        try:
            wv = job.wiring.wire(vif, wb, netns=spec.netns, tapname=spec.tapname)
        except (NetnsError, OSError) as e:
            job.failed.append(f"{where}: {guest.name}: {e}")
            detach_vif(host, vif)
            continue
        job.vifs.append((guest, vif, wv))
        log(f"{guest.name}: {vif.name} mac {vif.mac} on {wb.bridge.name}: "
            f"{wv.address} in namespace {wv.netns.name} (dom0 {wb.address} in "
            f"{wb.netns.name})")
