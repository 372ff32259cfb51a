#!/usr/bin/env python3
"""The images of docs/getting-started.md, from a real run of ``gntdma run``.

Runs the built-in default job (one guest, two disks, a NIC, a grant table
small enough that loads defer) for a few seconds with the dashboard on a
recording console and ``--plots``, then writes into ``--out`` (default
``docs/img``):

- ``dashboard.svg``: the dashboard at the busiest second of the run (rich's
  SVG export);
- the PNG plots of ``--plots`` (grant entries, deferred-load latency, ring
  occupancy, throughput).

Usage: ``.venv/bin/python scripts/make_docs.py [--out DIR] [--duration S] [--seed N]``.
Exit status 0 when the run passed every check and every file was written.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from rich.console import Console

from gntdma.toolstack.dashboard import RunView, render
from gntdma.toolstack.run import run_main_job

#: Columns of the screenshot.
WIDTH = 110


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent
                    / "docs" / "img", help="where the images go (default docs/img)")
    ap.add_argument("--duration", type=float, default=6.0, help="seconds of I/O (default 6)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out: Path = args.out
    lines: list[str] = []
    # The live display goes to a terminal-like buffer (it is thrown away); the
    # screenshot is drawn again from the recorded series afterwards.
    view = RunView(dashboard=True, console=Console(file=io.StringIO(), force_terminal=True,
                                                   width=WIDTH))
    report = run_main_job(seed=args.seed, duration=args.duration, plots_dir=out, view=view,
                          log=lines.append)
    metrics = view.metrics
    if metrics is None or not metrics.samples:
        print("make_docs: the run recorded no samples", file=sys.stderr)
        return 1
    # The second with the most requests in flight (not the first sample, taken at
    # the start, nor the last, a part of a second at the end).
    inner = range(1, len(metrics.samples) - 1) if len(metrics.samples) > 2 \
        else range(len(metrics.samples))
    busiest = max(inner, key=lambda i: (sum(d.in_flight for d in metrics.samples[i].disks),
                                        sum(d.mib_s for d in metrics.samples[i].disks)))
    shot = Console(record=True, file=io.StringIO(), width=WIDTH, force_terminal=True)
    shot.print(render(metrics, at=busiest))
    svg = out / "dashboard.svg"
    shot.save_svg(str(svg), title="gntdma run")
    for f in [svg, *(Path(p) for p in report.figures.get("plots", []))]:
        print(f)
    if not report.ok:
        print(report.format(), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
