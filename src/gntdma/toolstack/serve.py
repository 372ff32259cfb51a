"""``gntdma serve [CONFIG ...] --nbd PATH``: a guest's disks exported over NBD.

The host and its guests are built exactly as ``gntdma run`` builds them (the
same config checks, images opened and locked the same way, the same disks
attached through xenstore with blkfront on the Xen bus_dma handlers), then
every disk is exported by :class:`~gntdma.host.nbd.NbdServer` as
``<guest>/<vdev>`` (the default export is the first disk of the first guest)
on a Unix socket, or on TCP with ``--nbd-listen HOST:PORT`` (an address
other than loopback only with ``--allow-remote``: NBD has no
authentication). Every byte a client reads or writes goes through blkfront,
the grant tables, the ring and blkback. ``--nbd-handshake-timeout`` and
``--nbd-max-connections`` bound what idle clients can hold (see
:mod:`gntdma.host.nbd`); the report (docs/report.md) counts the connections
dropped while negotiating and those refused at the limit.

A config's vifs are attached and wired as ``run`` does it (before the disks,
each on its bridge, the guest's Linux stack in a namespace of its own and
dom0's per bridge; the log names the namespaces and addresses), so the
guest's network is reachable while serving, e.g. ``ip netns exec <guest's
namespace> ping <dom0's address>``. A config that works for ``run`` works for
``serve``: the same preflight refuses a NIC without root or ``/dev/net/tun``
(the default guest goes without it, with a note). At the end the vifs are
unplugged before the disks detach, and the report has their figures.

SIGINT and SIGTERM are the normal end (DESIGN 11): the connections close
(requests in flight complete), the disks detach, the host is checked for
leaks, the report is printed (``--json`` as for ``run``), and the exit
status is 0, or 1 if a check failed. A signal while the host is still being
built interrupts as ``run`` does (130, 143). Images stay; what gntdma made
for itself (temporary directory, default images, the socket) goes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import signal
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import gntdma
from gntdma.dev.blkfront_cmd import XBDF_BARRIER, XBDF_DISCARD, XBDF_FLUSH
from gntdma.errors import ConfigError
from gntdma.host.nbd import (
    HANDSHAKE_TIMEOUT,
    MAX_CONNECTIONS,
    NbdDisk,
    NbdServer,
    listen_tcp,
    listen_unix,
    remove_socket,
)
from gntdma.host.nbd_proto import NbdExport
from gntdma.sched import WITNESS, Deadlock, KernelPanic
from gntdma.sys import MAXPHYS
from gntdma.toolstack.control import HostConsole, check_control_path
from gntdma.toolstack.domains import create_guest_from_config
from gntdma.toolstack.host import Guest, Host
from gntdma.toolstack.interrupt import (
    InterruptGuard,
    ignore_later_signals,
    private_dir,
    signals_deferred,
)
from gntdma.toolstack.mainjob import OpenImages, default_config, open_images
from gntdma.toolstack.netjob import NetJob, attach_guest_vifs, make_netjob
from gntdma.toolstack.preflight import RunPlan, check_output, plan_run
from gntdma.toolstack.report import Report
from gntdma.toolstack.tunables import apply_debug_options
from gntdma.toolstack.vbd import Vbd, detach_disk
from gntdma.toolstack.xlcfg import GuestConfig
from gntdma.toolstack.xs import serve_host_xenstored

if TYPE_CHECKING:
    from gntdma.toolstack.dashboard import RunView

__all__ = ["parse_listen", "serve_main"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def parse_listen(text: str, allow_remote: bool) -> tuple[str, int, str | None]:
    """``HOST:PORT`` of ``--nbd-listen``: (host, port, warning or None).

    Raises:
        ConfigError: not HOST:PORT, or not loopback without ``allow_remote``.
    """
    host, sep, port_s = text.rpartition(":")
    host = host.strip("[]")
    if sep == "" or host == "" or not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ConfigError(f"--nbd-listen {text}: expected HOST:PORT")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return host, int(port_s), None
    if not allow_remote:
        raise ConfigError(f"--nbd-listen {text}: not a loopback address; NBD has no "
                          "authentication, so anyone who reaches it reads and writes the "
                          "disks (say --allow-remote to do it anyway)")
    return host, int(port_s), (f"warning: serving NBD on {text}: NBD has no authentication, "
                               "anyone who can reach this address can read and write the disks")


def _chunk(vbds: Sequence[Vbd]) -> int:
    """The largest piece of a request one bio carries: every worker of a connection
    per disk holds one at once in half the guest's free memory (issue 11)."""
    from gntdma.host.nbd import WORKERS

    kern = vbds[0].sc.xbd_kern
    budget = kern.vm.nfree * 4096 // (2 * WORKERS * len(vbds))
    chunk = 4096
    while chunk * 2 <= min(budget, MAXPHYS):
        chunk *= 2
    return chunk


def _disks(guests: Sequence[tuple[Guest, list[Vbd]]]) -> list[NbdDisk]:
    out = []
    for guest, vbds in guests:
        if not vbds:
            continue
        chunk = _chunk(vbds)
        for v in vbds:
            flags = v.sc.xbd_flags
            ex = NbdExport(f"{guest.name}/{v.vdev}", v.sc.xbd_media_size,
                           readonly=v.readonly,
                           flush=flags & (XBDF_FLUSH | XBDF_BARRIER) != 0,
                           trim=flags & XBDF_DISCARD != 0,
                           description=f"gntdma guest {guest.name} (domid {guest.domid}) "
                           f"disk {v.vdev}",
                           min_block=v.sc.xbd_sector_size)
            out.append(NbdDisk(ex, v.sc, chunk=chunk))
    return out


def serve_main(configs: Sequence[Path], *, nbd_path: Path | None = None,
               nbd_listen: str | None = None, allow_remote: bool = False, seed: int = 0,
               json_path: Path | None = None, overwrite: bool = False,
               log: Callable[[str], None] = print, guard: InterruptGuard | None = None,
               stop: threading.Event | None = None, max_connections: int = MAX_CONNECTIONS,
               handshake_timeout: float = HANDSHAKE_TIMEOUT, dashboard: bool = False,
               plots_dir: Path | None = None, control: Path | None = None,
               dma_debug: bool = True, junk_fill: bool = True) -> Report:
    """Serve until SIGINT/SIGTERM (or ``stop``); the report says whether every check held.

    ``dma_debug``/``junk_fill`` False turn that kernel debugging off in every
    guest (``--no-dma-debug``, ``--no-junk``; :mod:`gntdma.toolstack.tunables`).

    ``gntdma xl`` is served on the control socket ``control`` (default: one in
    the serve's temporary folder, named in the output).

    ``dashboard`` shows the live dashboard instead of the live line; ``plots_dir``
    receives PNG plots of the time served (named in the report).

    Raises:
        ConfigError: a bad config, disk or option, found before anything ran.
        Interrupted: SIGINT or SIGTERM before the disks were served.
    """
    guard = guard if guard is not None else InterruptGuard()
    guard.phase = "checking the configs"
    if (nbd_path is None) == (nbd_listen is None):
        raise ConfigError("give exactly one of --nbd PATH and --nbd-listen HOST:PORT")
    if not 0 <= seed < 1 << 64:
        raise ConfigError(f"--seed must be from 0 to 2**64-1, not {seed}")
    if not 1 <= max_connections <= 1 << 16:
        raise ConfigError(f"--nbd-max-connections must be from 1 to 65536, not {max_connections}")
    if not 0 <= handshake_timeout <= 3600:  # also refuses nan
        raise ConfigError("--nbd-handshake-timeout must be from 0 to 3600 seconds, not "
                          f"{handshake_timeout}")
    limits = (max_connections, handshake_timeout)
    tcp = parse_listen(nbd_listen, allow_remote) if nbd_listen is not None else None
    if nbd_path is not None:
        if nbd_path.exists() or nbd_path.is_symlink():
            raise ConfigError(f"--nbd {nbd_path}: exists (remove it, or name another path)")
        if not nbd_path.parent.is_dir():
            raise ConfigError(f"--nbd {nbd_path}: no such directory {nbd_path.parent}")
        if len(str(nbd_path).encode()) > 107:
            raise ConfigError(f"--nbd {nbd_path}: a Unix socket path is at most 107 bytes")
    check_output(json_path, "--json")
    if control is not None:
        check_control_path(control)
    if plots_dir is not None:
        from gntdma.toolstack.plots import check_plots_dir

        check_plots_dir(plots_dir)
    view = None
    if dashboard or plots_dir is not None:
        from gntdma.toolstack.dashboard import RunView

        view = RunView(dashboard=dashboard)
    with private_dir("gntdma-serve-") as tmp:  # made and removed whole, whatever the signals
        plan = plan_run(configs, overwrite=overwrite, default=default_config(),
                        default_image_dir=tmp)
        for note in plan.notes:
            log(note)
        tunables = apply_debug_options(plan, dma_debug=dma_debug, junk_fill=junk_fill,
                                       log=log)
        if tcp is not None and tcp[2] is not None:
            log(tcp[2])
        guard.phase = "opening the images"
        images: OpenImages | None = None
        try:
            with signals_deferred():
                images = open_images(plan, tmp)
            report = _serve(plan, images, seed, nbd_path, tcp, log, guard, stop, limits,
                            view, control=control if control is not None else tmp / "xl.sock")
        finally:
            guard.disarm()
            if images is not None:
                with signals_deferred():  # a signal now is raised once they are closed
                    images.close()
    report.figures = {"version": gntdma.__version__,
                      "configs": [str(p) for p in configs] or ["<built-in default>"],
                      "seed": seed, "overwrite": overwrite, "notes": plan.notes,
                      "kernel_tunables": tunables,
                      **report.figures}
    if plots_dir is not None and view is not None and view.metrics is not None:
        from gntdma.toolstack.plots import write_plots

        report.figures["plots"] = [str(p) for p in write_plots(view.metrics, plots_dir)]
    if json_path is not None:
        json_path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return report


def _listen(nbd_path: Path | None, tcp: tuple[str, int, str | None] | None) -> Any:
    if nbd_path is not None:
        return listen_unix(str(nbd_path))
    assert tcp is not None
    return listen_tcp(tcp[0], tcp[1])


def _uris(disks: Sequence[NbdDisk], nbd_path: Path | None, addr: Any) -> list[str]:
    if nbd_path is not None:
        return [f"nbd+unix:///{d.export.name}?socket={nbd_path}" for d in disks]
    host, port = addr[0], addr[1]
    host = f"[{host}]" if ":" in host else host
    return [f"nbd://{host}:{port}/{d.export.name}" for d in disks]


class _Progress:
    """A live line a second, from a hub timer: requests, MiB/s, grant entries, deferred loads
    (with a ``view``: the same timer samples the series and refreshes the dashboard,
    which, when shown, takes the place of the line)."""

    def __init__(self, host: Host, guests: Sequence[tuple[Guest, list[Vbd]]],
                 server: NbdServer, log: Callable[[str], None],
                 view: RunView | None = None) -> None:
        self.host, self.guests, self.server, self.log = host, guests, server, log
        self.view = view
        if view is not None:
            view.attach(host, [g for g, _v in guests], [v for _g, vs in guests for v in vs])
        self.t0 = self.last_t = host.sched.now()
        self.last_bytes = 0
        self.cancel: Callable[[], None] | None = host.sched.call_later(1.0, self.tick)

    def tick(self) -> None:
        now = self.host.sched.now()
        st = self.server.statistics()
        total = st.bytes_read + st.bytes_written
        rate = (total - self.last_bytes) / max(now - self.last_t, 1e-6) / (1 << 20)
        self.last_bytes, self.last_t = total, now
        use = " ".join(f"{g.gnttab.statistics().allocated:4d}/{g.gnttab.capacity}"
                       for g, _v in self.guests)
        deferred = sum(v.statistics().frontend.deferred_loads for _g, vs in self.guests
                       for v in vs)
        if self.view is not None and self.view.tick(
                f"NBD: {st.connections} connections, {st.requests} requests"):
            self.cancel = self.host.sched.call_later(1.0, self.tick)
            return
        self.log(f"  [{now - self.t0:6.1f}s] connections {st.connections:3d}  requests "
                 f"{st.requests:8d}  {rate:7.1f} MiB/s  grant entries in use {use}  "
                 f"deferred loads {deferred:6d}")
        self.cancel = self.host.sched.call_later(1.0, self.tick)

    def stop(self) -> None:
        if self.cancel is not None:
            self.cancel()
            self.cancel = None
        if self.view is not None:
            self.view.stop()


class _StopSignals:
    """While serving, SIGINT and SIGTERM end the serving (the first one; later ones
    are ignored: the teardown is under way)."""

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.signum == 0:
            self.signum = signum

    def __exit__(self, *exc: object) -> None:
        if self.signum != 0 and self._old:
            ignore_later_signals()  # the serve is ending: a second signal changes nothing
            return
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _serve(plan: RunPlan, images: OpenImages, seed: int, nbd_path: Path | None,
           tcp: tuple[str, int, str | None] | None, log: Callable[[str], None],
           guard: InterruptGuard, stop: threading.Event | None,
           limits: tuple[int, float] = (MAX_CONNECTIONS, HANDSHAKE_TIMEOUT),
           view: RunView | None = None, *, control: Path | None = None) -> Report:
    WITNESS.reset()
    report = Report()
    guard.phase = "building the host"
    host = Host(seed=seed)
    guard.arm(host.sched.call_later)
    xs_socket = None
    xl: HostConsole | None = None
    listener = None
    server: NbdServer | None = None
    guests: list[tuple[Guest, list[Vbd]]] = []
    net: NetJob | None = None
    done = False
    try:
        with signals_deferred():
            xs_socket = serve_host_xenstored(host.xenstored, log)
            if control is not None:
                xl = HostConsole(host, control, log)
        guard.phase = "attaching the disks"
        net = make_netjob(host, plan, log)
        for gi, gp in enumerate(plan.guests):
            guest, vbds = create_guest_from_config(
                host, gp.config, None,
                images=[images.by_disk[gi, di].image for di in range(len(gp.disks))],
                before_disks=_vifs(net, gp.config))
            guests.append((guest, vbds))
            log(f"{guest.name}: domid {guest.domid}, {gp.config.memory} MiB, "
                f"max_grant_frames {gp.config.max_grant_frames}, disks "
                + (", ".join(f"{v.vdev} ({v.sc.xbd_media_size >> 20} MiB, {v.spec.access})"
                             for v in vbds) or "none"))
        disks = _disks(guests)
        report.check("guests created and their disks connected through xenstore",
                     all(v.statistics().frontend_state == "Connected"
                         for _g, vs in guests for v in vs),
                     f"{len(guests)} guest(s), {len(disks)} disk(s)")
        if net is not None:
            net.check_attached(report)
        if xl is not None:
            xl.attached([v for _g, vs in guests for v in vs], net)
        if view is not None and net is not None:
            wired = net
            view.set_vifs(lambda: [v for _g, v, _w in wired.vifs])
        with signals_deferred():
            listener = _listen(nbd_path, tcp)
        addr = listener.getsockname()
        server = NbdServer(host.sched, disks, listener,
                           default=disks[0].export.name if disks else None,
                           max_connections=limits[0], handshake_timeout=limits[1])
        for uri in _uris(disks, nbd_path, addr):
            log(f"export: {uri}")
        guard.phase = "serving"
        guard.disarm()
        with _StopSignals() as sigs:
            log("serving until SIGINT or SIGTERM (Ctrl-C)")
            progress = _Progress(host, guests, server, log, view)
            stopped = [False]

            def poll() -> None:
                if sigs.signum != 0 or (stop is not None and stop.is_set()):
                    stopped[0] = True
                else:
                    host.sched.call_later(0.1, poll)

            host.sched.call_later(0.1, poll)
            try:
                host.sched.run(until=lambda: stopped[0])
                why = (signal.Signals(sigs.signum).name if sigs.signum != 0 else "stop")
                log(f"{why}: closing the connections, detaching the disks")
                progress.stop()
                server.close()
            except (Deadlock, KernelPanic) as e:
                progress.stop()
                report.check("the host served to its end (no deadlock, no panic)", False,
                             str(e))
                return report
            if xl is not None:
                xl.release(report)
            _finish(host, report, server, guests, net)
            done = True
    finally:
        guard.disarm()
        if net is not None and not net.wiring.closed:
            # A serve that failed or was interrupted: the namespaces and TAPs go now.
            with signals_deferred(), contextlib.suppress(Exception):
                net.detach()
        try:
            with signals_deferred():  # sockets and their directory removed whole
                if xl is not None:
                    xl.close()
                if xs_socket is not None:
                    xs_socket.close()
        finally:
            with signals_deferred():
                if listener is not None:
                    with contextlib.suppress(OSError):
                        listener.close()
                if nbd_path is not None and listener is not None:
                    remove_socket(str(nbd_path))
            if done:
                host.close()
            else:
                with contextlib.suppress(Exception):
                    host.close()
    return report


def _vifs(net: NetJob | None, cfg: GuestConfig) -> Callable[[Guest], None] | None:
    if net is None:
        return None
    return lambda g: attach_guest_vifs(net, cfg, g)


def _finish(host: Host, report: Report, server: NbdServer,
            guests: Sequence[tuple[Guest, list[Vbd]]], net: NetJob | None) -> None:
    st = server.statistics()
    report.check("NBD: every connection closed", st.connections == 0,
                 f"{st.accepted} accepted, {st.dropped} dropped for breaking the protocol "
                 f"or their socket, {st.handshake_dropped} dropped while negotiating, "
                 f"{st.refused_connections} refused at the limit of {st.max_connections}; "
                 f"{st.requests} requests, {st.refused} refused, {st.empty_requests} of "
                 f"length 0, {st.bytes_read >> 20} MiB read, "
                 f"{st.bytes_written >> 20} MiB written")
    figures: list[dict[str, Any]] = []
    vifs = {g.name: net.figures(g) for g, _vbds in guests} if net is not None else {}
    if net is not None:
        report.check("vifs detached with the libxl sequence, namespaces and TAPs removed",
                     net.detach(), "unplug: online=0 + Closing, backend Closed")
    for (guest, vbds) in guests:
        disks: list[dict[str, Any]] = []
        for v in vbds:
            nd = server.disks[f"{guest.name}/{v.vdev}"]
            fr = v.statistics().frontend
            disks.append({"export": nd.export.name, "size": nd.export.size,
                          "readonly": nd.export.readonly, "nbd_requests": nd.requests,
                          "bytes_read": nd.bytes_read, "bytes_written": nd.bytes_written,
                          "io_errors": nd.errors, "requests": fr.requests,
                          "indirect_requests": fr.indirect_requests,
                          "deferred_loads": fr.deferred_loads})
        gst = guest.gnttab.statistics()
        figures.append({"name": guest.name, "domid": guest.domid,
                        "grant_entries_peak": gst.peak_allocated,
                        "deferred_loads": sum(d["deferred_loads"] for d in disks),
                        "disks": disks})
        if vifs.get(guest.name):
            figures[-1]["vifs"] = vifs[guest.name]
        for d in disks:
            report.check(f"{d['export']}: served", True,
                         f"{d['nbd_requests']} NBD requests, {d['requests']} ring requests, "
                         f"{d['io_errors']} I/O errors, {d['deferred_loads']} deferred loads")
        detached = all([detach_disk(host, v) for v in reversed(vbds)])
        left = guest.gnttab.statistics()
        report.check(f"{guest.name}: no grant reference left after the disks detached",
                     left.allocated == 0 and left.granted == 0,
                     f"{left.allocated} allocated, {left.granted} granted")
        host.destroy_guest(guest)
        report.check(f"{guest.name}: disks detached with the libxl sequence and the guest "
                     "destroyed", detached, "")
    report.figures["guests"] = figures
    report.figures["nbd"] = {"accepted": st.accepted, "dropped": st.dropped,
                             "handshake_dropped": st.handshake_dropped,
                             "refused_connections": st.refused_connections,
                             "max_connections": st.max_connections,
                             "handshake_timeout": st.handshake_timeout,
                             "requests": st.requests, "refused": st.refused,
                             "empty_requests": st.empty_requests,
                             "bytes_read": st.bytes_read, "bytes_written": st.bytes_written}
    for name, why in host.crashed.items():
        report.check(f"{name}: no guest crashed", False, f"{name} crashed: {why}")
    host.sched.yield_()
    leaks = host.leaks()
    report.check("teardown: nothing leaked", not leaks, "; ".join(leaks) or
                 "no grants, mappings, ports, memory, maps or xenstore nodes left")
    report.check("WITNESS: no lock-order reversal or panic", not WITNESS.reports,
                 "; ".join(r.format() for r in WITNESS.reports))
