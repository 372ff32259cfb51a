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
    run.add_argument("--seed", type=int, default=0, help="seed of every random choice")
    run.add_argument("--json", type=Path, metavar="PATH", help="write a JSON report")
    cli_xenstored.add_parser(sub)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from gntdma.toolstack.run import run_main_job

    report = run_main_job(seed=args.seed, json_path=args.json)
    print(report.format())
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return cmd_run(args)
    if args.command == "xenstored":
        return cli_xenstored.run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
