"""``gntdma run``: build a host, run the workloads, check everything, report."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from gntdma.sched import WITNESS
from gntdma.toolstack.busdmademo import run_deferred_load_demo
from gntdma.toolstack.grantdemo import run_grant_demo
from gntdma.toolstack.host import Host
from gntdma.toolstack.report import Report
from gntdma.toolstack.xs import hold_until_signal, serve_host_xenstored

__all__ = ["run_main_job"]


def run_main_job(*, seed: int = 0, json_path: Path | None = None,
                 log: Callable[[str], None] = print, hold: bool = False) -> Report:
    """Run the built-in default job; the report says whether every check held.

    The host's xenstored is served on a Unix socket while the job runs; with
    ``hold`` the host stays up after the job until SIGINT or SIGTERM.
    """
    WITNESS.reset()
    report = Report()
    host = Host(seed=seed)
    xs_socket = serve_host_xenstored(host.xenstored, log)
    try:
        guest = host.create_guest("guest1", memory_mb=32, max_grant_frames=2)
        log(f"host: dom0 and {guest.name} (domid {guest.domid}, "
            f"max_grant_frames {guest.gnttab.max_frames})")
        run_grant_demo(host, guest, report, log=log)
        run_deferred_load_demo(host, guest, report, log=log)
        host.sched.yield_()
        leaks = host.leaks()
        report.check("teardown: nothing leaked", not leaks, "; ".join(leaks) or
                     "no grants, mappings, ports, memory or maps left")
        report.check("WITNESS: no lock-order reversal or panic", not WITNESS.reports,
                     "; ".join(r.format() for r in WITNESS.reports))
        report.figures["witness"] = {
            "reversals": len(WITNESS.reversals()),
            "panics": len(WITNESS.panics()),
        }
        if hold:
            log(f"job done: {report.format().splitlines()[-1]}")
            hold_until_signal(log)
    finally:
        xs_socket.close()
        host.close()
    if json_path is not None:
        json_path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return report
