"""``gntdma run [CONFIG]``: build a host, run the workloads, check everything, report.

Two phases. A self-test guest shows the grant table and the Xen bus_dma
handlers at work (grants mapped and copied by dom0, read-only refused, ENOSPC
and a free callback, a load deferred on a full table). Then the main job: the
guest of CONFIG (or the built-in default) with its disks, the verified
workloads, detach. The host's xenstored is served on a Unix socket meanwhile.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from gntdma.sched import WITNESS, Deadlock, KernelPanic
from gntdma.toolstack.busdmademo import run_deferred_load_demo
from gntdma.toolstack.grantdemo import run_grant_demo
from gntdma.toolstack.host import Host
from gntdma.toolstack.mainjob import load_config, run_block_job
from gntdma.toolstack.report import Report
from gntdma.toolstack.xs import hold_until_signal, serve_host_xenstored

__all__ = ["run_main_job"]


def run_main_job(config: Path | None = None, *, seed: int = 0, json_path: Path | None = None,
                 duration: float = 5.0, threads: int = 4, image_dir: Path | None = None,
                 log: Callable[[str], None] = print, hold: bool = False) -> Report:
    """Run the job; the report says whether every check held.

    With ``hold`` the host stays up after the job until SIGINT or SIGTERM.
    Raises :class:`~gntdma.errors.ConfigError` for a bad config or option.
    """
    from gntdma.errors import ConfigError

    if duration <= 0 or threads < 1:
        raise ConfigError("--duration must be positive and --threads at least 1")
    cfg, is_default = load_config(config)
    WITNESS.reset()
    report = Report()
    host = Host(seed=seed)
    xs_socket = serve_host_xenstored(host.xenstored, log)
    try:
        probe = host.create_guest("selftest", memory_mb=16, max_grant_frames=2)
        log(f"self-test: {probe.name} (domid {probe.domid}, max_grant_frames "
            f"{probe.gnttab.max_frames})")
        run_grant_demo(host, probe, report, log=log)
        run_deferred_load_demo(host, probe, report, log=log)
        host.destroy_guest(probe)
        def pause() -> None:
            log(f"job done: {report.format().splitlines()[-1]}; "
                f"{cfg.name} and its disks stay up")
            hold_until_signal(log)

        try:
            guest = run_block_job(host, report, cfg, is_default=is_default,
                                  duration=duration, threads=threads, seed=seed,
                                  image_dir=image_dir if image_dir is not None else
                                  (None if is_default else cfg.base_dir), log=log,
                                  pause=pause if hold else None)
        except (Deadlock, KernelPanic) as e:
            # The host is wedged: say why, skip the rest, tear down what can be.
            report.check("the job ran to its end (no deadlock, no panic)", False, str(e))
            report.figures["witness"] = {"reversals": len(WITNESS.reversals()),
                                         "panics": len(WITNESS.panics())}
            return _finish(report, json_path)
        report.figures["guests"] = [guest]
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
    finally:
        xs_socket.close()
        host.close()
    return _finish(report, json_path)


def _finish(report: Report, json_path: Path | None) -> Report:
    if json_path is not None:
        json_path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return report
