"""``gntdma run [CONFIG...]``: build a host, run the workloads, check everything, report.

First everything that can be checked is checked (options, configs, disks,
budgets: :mod:`~gntdma.toolstack.preflight`) and every image is opened and
locked; a problem there is a :class:`~gntdma.errors.ConfigError` and nothing
was built. Then two phases. A self-test guest shows the grant table and the
Xen bus_dma handlers at work (grants mapped and copied by dom0, read-only
refused, ENOSPC and a free callback, a load deferred on a full table). Then
the main job: a guest per config (or the built-in default) with its disks,
the verified workloads, detach. The host's xenstored is served on a Unix
socket meanwhile.

Whatever ends the run (its end, an error, SIGINT or SIGTERM through
:class:`~gntdma.toolstack.interrupt.InterruptGuard`), everything gntdma made
for itself goes: the temporary directory (default images, snapshot
overlays), the xenstored socket and its directory. Images a config names stay.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import gntdma
from gntdma.errors import ConfigError
from gntdma.sched import WITNESS, Deadlock, KernelPanic
from gntdma.toolstack.busdmademo import run_deferred_load_demo
from gntdma.toolstack.control import HostConsole, check_control_path, hold_running
from gntdma.toolstack.grantdemo import run_grant_demo
from gntdma.toolstack.host import Host
from gntdma.toolstack.interrupt import InterruptGuard, private_dir, signals_deferred
from gntdma.toolstack.mainjob import (
    DEFAULT_STALL_TIMEOUT,
    OpenImages,
    Stalled,
    default_config,
    open_images,
    run_block_job,
)
from gntdma.toolstack.preflight import RunPlan, check_options, check_output, plan_run
from gntdma.toolstack.report import Report
from gntdma.toolstack.tunables import apply_debug_options
from gntdma.toolstack.xs import serve_host_xenstored

if TYPE_CHECKING:
    from gntdma.toolstack.dashboard import RunView
    from gntdma.toolstack.netjob import NetJob
    from gntdma.toolstack.vbd import Vbd

__all__ = ["run_main_job"]


def run_main_job(configs: Sequence[Path] | Path | None = None, *, seed: int = 0,
                 json_path: Path | None = None, duration: float = 5.0, threads: int = 4,
                 log: Callable[[str], None] = print, hold: bool = False,
                 overwrite: bool = False, guard: InterruptGuard | None = None,
                 stall_timeout: float = DEFAULT_STALL_TIMEOUT,
                 dashboard: bool = False, plots_dir: Path | None = None,
                 view: RunView | None = None,
                 control: Path | None = None, dma_debug: bool = True,
                 junk_fill: bool = True) -> Report:
    """Run the job; the report says whether every check held.

    ``dma_debug``/``junk_fill`` False turn that kernel debugging off in every
    guest (``--no-dma-debug``, ``--no-junk``; :mod:`gntdma.toolstack.tunables`).

    ``dashboard`` shows the live dashboard instead of the progress lines;
    ``plots_dir`` receives PNG plots of the workloads (named in the report);
    ``view`` is the caller's own (its console) instead of one made here.

    With ``hold`` the host stays up after the job until SIGINT or SIGTERM, and
    serves ``gntdma xl`` on a control socket (``control``, or one in the run's
    temporary folder, named in the output); ``control`` alone serves it while
    the job runs. A
    workload that completes no I/O for ``stall_timeout`` seconds ends the job
    with a failed check saying what waits for what.

    Raises:
        ConfigError: a bad config, disk or option, found before anything ran.
        Interrupted: SIGINT or SIGTERM (with ``guard`` installed); everything
            the run made for itself is removed first.
    """
    if configs is None:
        configs = []
    elif isinstance(configs, Path):
        configs = [configs]
    guard = guard if guard is not None else InterruptGuard()
    guard.phase = "checking the configs"
    threads, notes = check_options(duration=duration, threads=threads, seed=seed)
    if not math.isfinite(stall_timeout) or stall_timeout <= 0:
        raise ConfigError(f"--stall-timeout must be a positive number of seconds, "
                          f"not {stall_timeout}")
    check_output(json_path, "--json")
    if control is not None:
        check_control_path(control)
    if plots_dir is not None:
        from gntdma.toolstack.plots import check_plots_dir

        check_plots_dir(plots_dir)
    if view is None and (dashboard or plots_dir is not None):
        from gntdma.toolstack.dashboard import RunView

        view = RunView(dashboard=dashboard)
    with private_dir("gntdma-run-") as tmp:  # made and removed whole, whatever the signals
        plan = plan_run(configs, overwrite=overwrite, default=default_config(),
                        default_image_dir=tmp)
        for note in notes + plan.notes:
            log(note)
        tunables = apply_debug_options(plan, dma_debug=dma_debug, junk_fill=junk_fill,
                                       log=log)
        guard.phase = "opening the images"
        images: OpenImages | None = None
        try:
            with signals_deferred():
                images = open_images(plan, tmp)
            if control is None and hold:
                control = tmp / "xl.sock"
            report = _run(plan, images, seed, duration, threads, log, hold, guard,
                          stall_timeout, view, control=control)
        finally:
            guard.disarm()
            if images is not None:
                with signals_deferred():  # a signal now is raised once they are closed
                    images.close()
    report.figures = {
        "version": gntdma.__version__,
        "configs": [str(p) for p in configs] or ["<built-in default>"],
        "seed": seed,
        "duration": duration,
        "threads": threads,
        "overwrite": overwrite,
        "notes": notes + plan.notes,
        "kernel_tunables": tunables,
        **report.figures,
    }
    if plots_dir is not None and view is not None and view.metrics is not None:
        from gntdma.toolstack.plots import write_plots

        report.figures["plots"] = [str(p) for p in write_plots(view.metrics, plots_dir)]
    return _finish(report, json_path)


def _run(plan: RunPlan, images: OpenImages, seed: int, duration: float, threads: int,
         log: Callable[[str], None], hold: bool, guard: InterruptGuard,
         stall_timeout: float, view: RunView | None = None, *,
         control: Path | None = None) -> Report:
    WITNESS.reset()
    report = Report()
    guard.phase = "building the host"
    host = Host(seed=seed)
    guard.arm(host.sched.call_later)
    xs_socket = None
    xl: HostConsole | None = None
    done = False
    try:
        with signals_deferred():
            xs_socket = serve_host_xenstored(host.xenstored, log)
            if control is not None:
                xl = HostConsole(host, control, log)
        guard.phase = "running the self-test"
        probe = host.create_guest("selftest", memory_mb=16, max_grant_frames=2)
        log(f"self-test: {probe.name} (domid {probe.domid}, max_grant_frames "
            f"{probe.gnttab.max_frames})")
        run_grant_demo(host, probe, report, log=log)
        run_deferred_load_demo(host, probe, report, log=log)
        host.destroy_guest(probe)

        def pause() -> None:
            log(f"job done: {report.format().splitlines()[-1]}; the guests and their disks "
                "stay up")
            guard.disarm()
            hold_running(host.sched, log)
            guard.arm(host.sched.call_later)

        def phase(p: str) -> None:
            guard.phase = p
            if p.startswith("detaching") and xl is not None:
                xl.release(report)

        def attached(vbds: list[Vbd], net: NetJob | None) -> None:
            if view is not None and net is not None:  # the dashboard's NICs
                view.set_vifs(lambda: [v for _g, v, _w in net.vifs])
            if xl is not None:
                xl.attached(vbds, net)

        try:
            figures = run_block_job(host, report, plan, images, duration=duration,
                                    threads=threads, seed=seed, log=log,
                                    pause=pause if hold else None, phase=phase,
                                    stall_timeout=stall_timeout, view=view,
                                    on_attached=attached)
        except Stalled as e:
            # The workloads wait for something that does not come: say what, stop.
            _report_crashes(host, report)
            report.check("the workloads made progress (no stall)", False, str(e))
            report.figures["stalled"] = str(e)
            done = True
            return report
        except (Deadlock, KernelPanic) as e:
            # The host is wedged: say why, skip the rest, tear down what can be.
            _report_crashes(host, report)
            report.check("the job ran to its end (no deadlock, no panic)", False, str(e))
            report.figures["witness"] = {"reversals": len(WITNESS.reversals()),
                                         "panics": len(WITNESS.panics())}
            done = True
            return report
        report.figures["guests"] = figures
        _report_crashes(host, report)
        guard.phase = "checking the teardown"
        host.sched.yield_()
        leaks = host.leaks()
        report.check("teardown: nothing leaked", not leaks, "; ".join(leaks) or
                     "no grants, mappings, ports, memory, maps or xenstore nodes left")
        report.check("WITNESS: no lock-order reversal or panic", not WITNESS.reports,
                     "; ".join(r.format() for r in WITNESS.reports))
        report.figures["witness"] = {
            "reversals": len(WITNESS.reversals()),
            "panics": len(WITNESS.panics()),
        }
        done = True
    finally:
        guard.disarm()
        # On the way out of an interruption or an error, the host may be half
        # way through anything: tear down what can be, and let the first
        # exception be the one that is reported.
        try:
            with signals_deferred():  # sockets and their directory removed whole
                if xl is not None:
                    xl.close()
                if xs_socket is not None:
                    xs_socket.close()
        finally:
            if done:
                host.close()
            else:
                with contextlib.suppress(Exception):
                    host.close()
    return report


def _report_crashes(host: Host, report: Report) -> None:
    """A failed check per guest whose kernel panicked (the host went on without it)."""
    for name, why in host.crashed.items():
        report.check(f"{name}: no guest crashed", False, f"{name} crashed: {why}")
    report.figures["crashed"] = dict(host.crashed)


def _finish(report: Report, json_path: Path | None) -> Report:
    if json_path is not None:
        json_path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return report
