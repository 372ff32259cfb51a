"""The ``gntdma`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gntdma import cli_xenstored

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gntdma",
                                     description="Xen grant-table DMA on an emulated Xen host")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="build a host, run the main job, report")
    run.add_argument("config", nargs="?", type=Path, metavar="CONFIG",
                     help="xl.cfg-style guest config (default: the built-in one guest, "
                     "two disks, small grant table)")
    run.add_argument("--duration", type=float, default=5.0,
                     help="seconds of verified random I/O (default 5)")
    run.add_argument("--threads", type=int, default=4, help="I/O threads per disk (default 4)")
    run.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    run.add_argument("--json", type=Path, metavar="PATH", help="write a JSON report")
    run.add_argument("--hold", action="store_true",
                     help="after the job, keep the host and its xenstored socket up "
                     "until SIGINT/SIGTERM")
    cli_xenstored.add_parser(sub)
    ex = sub.add_parser("explore", help="explore the interleavings of a scenario")
    ex.add_argument("scenario", help="scenario name (gnttab-shortage-blkfront, "
                    "busdma-deferred-unload)")
    ex.add_argument("--strategy", default="random", help="random, pct or dfs")
    ex.add_argument("--schedules", type=int, default=1000, help="schedules to explore")
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--callback-delivery", choices=("taskqueue", "inline"),
                    default="taskqueue", help="grant free callbacks: gntdma's taskqueue "
                    "delivery, or FreeBSD's inline delivery under the lock")
    ex.add_argument("--pct-depth", type=int, default=3)
    ex.add_argument("--max-preemptions", type=int, default=2, help="bound for dfs")
    ex.add_argument("--out", type=Path, metavar="FILE", help="replay file of the first failure")
    rp = sub.add_parser("replay", help="rerun a replay file written by explore")
    rp.add_argument("file", type=Path)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from gntdma.errors import ConfigError
    from gntdma.toolstack.run import run_main_job

    try:
        report = run_main_job(args.config, seed=args.seed, json_path=args.json,
                              duration=args.duration, threads=args.threads, hold=args.hold)
    except (ConfigError, OSError) as e:
        print(f"gntdma run: {e}", file=sys.stderr)
        return 2
    print(report.format())
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return cmd_run(args)
    if args.command == "xenstored":
        return cli_xenstored.run(args)
    from gntdma.errors import ConfigError
    from gntdma.toolstack.explorecmd import explore_command, replay_command

    try:
        if args.command == "explore":
            return explore_command(args.scenario, strategy=args.strategy,
                                   schedules=args.schedules, seed=args.seed,
                                   callback_delivery=args.callback_delivery, out=args.out,
                                   pct_depth=args.pct_depth,
                                   max_preemptions=args.max_preemptions)
        if args.command == "replay":
            return replay_command(args.file)
    except ConfigError as e:
        print(f"gntdma {args.command}: {e}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
