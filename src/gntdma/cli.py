"""The ``gntdma`` command.

Exit statuses (DESIGN section 11): 0 every check passed, 1 a check failed, 2
bad usage or a bad config (found before anything ran), 130 and 143
interrupted by SIGINT and SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gntdma
from gntdma import cli_xenstored

__all__ = ["main"]


class _Output:
    """Lines to stdout that survive a reader going away (``gntdma run | head``).

    Once the pipe is broken, stdout is pointed at /dev/null and the run goes
    on quietly to its end (and its exit status).
    """

    def __init__(self) -> None:
        self.broken = False
        #: The command was refused before anything ran (a ConfigError): no trace.
        self.refused = False

    def say(self, line: str) -> None:
        if self.broken:
            return
        try:
            print(line, flush=True)
        except BrokenPipeError:
            self.broken = True
            with contextlib.suppress(OSError, ValueError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)


def _positive_int(text: str) -> int:
    """A decimal integer option (its range is checked by the command)."""
    try:
        return int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a decimal integer: {text!r}") from None


def _path(text: str) -> Path:
    """A path option's value: an empty one is refused (``Path('')`` is ``.``)."""
    if text == "":
        raise argparse.ArgumentTypeError("an empty path")
    return Path(text)


def _same_file(args: argparse.Namespace) -> str | None:
    """Two output options of ``args`` naming one file (through ./, .. or a symlink),
    or one naming an input of the command (a config, a disk image it names, the
    replay file): checked before anything is opened."""
    seen: dict[str, str] = {}
    outputs: list[tuple[str, Path | None]] = []
    for opt in ("trace", "json", "control"):
        path = getattr(args, opt, None)
        if path is None:
            continue
        real = os.path.realpath(path)
        if real in seen:
            return f"--{seen[real]} and --{opt} name the same file {path}"
        seen[real] = opt
        outputs.append((f"--{opt}", path))
    if not outputs:
        return None
    from gntdma.errors import ConfigError
    from gntdma.toolstack.preflight import check_not_inputs, input_files

    inputs = input_files(getattr(args, "configs", None) or [])
    if getattr(args, "file", None) is not None:
        inputs.append((args.file, f"the replay file {args.file}"))
    try:
        check_not_inputs(outputs, inputs)
    except ConfigError as e:
        return str(e)
    return None


def _trace_options(p: argparse.ArgumentParser) -> None:
    """--trace and --trace-limit, of run, serve and replay."""
    p.add_argument("--trace", type=_path, metavar="FILE",
                   help="write a Chrome trace-event JSON file (open it in Perfetto or "
                   "chrome://tracing): thread tracks, locks, notifications, requests")
    p.add_argument("--trace-limit", type=int, default=4_000_000, metavar="N",
                   help="stop tracing after N events (default 4000000)")


def _traced(args: argparse.Namespace, out: _Output, fn: Callable[[Any], int]) -> int:
    """``fn(say)``, under ``--trace`` when given."""
    same = _same_file(args)
    if same is not None:
        print(f"gntdma {args.command}: {same}", file=sys.stderr)
        return 2
    if getattr(args, "trace", None) is None:
        return fn(out.say)
    from gntdma.errors import ConfigError
    from gntdma.toolstack.trace import run_traced

    try:
        return run_traced(args.trace, fn, limit=args.trace_limit, command=args.command,
                          say=out.say, refused=lambda: out.refused)
    except ConfigError as e:
        print(f"gntdma {args.command}: {e}", file=sys.stderr)
        return 2


def _tunable_options(p: argparse.ArgumentParser) -> None:
    """--no-dma-debug and --no-junk, of run and serve: off in every guest's kernel."""
    p.add_argument("--no-dma-debug", dest="dma_debug", action="store_false",
                   help="turn the guest kernels' DMA-API debugging off (hw.busdma.dma_debug=0; "
                   "default on)")
    p.add_argument("--no-junk", dest="junk_fill", action="store_false",
                   help="do not fill memory the guest kernels free with junk "
                   "(vm.debug.divisor=0; default on)")


def _view_options(p: argparse.ArgumentParser) -> None:
    """--dashboard and --plots, of run and serve."""
    p.add_argument("--dashboard", choices=("auto", "on", "off"), default="auto",
                   help="the live dashboard instead of the progress lines (default auto: "
                   "when stdout is a terminal)")
    p.add_argument("--plots", type=_path, metavar="DIR",
                   help="write PNG plots (grant entries, deferred-load latency, ring "
                   "occupancy, throughput) into DIR (needs the plots extra)")


def _dashboard(args: argparse.Namespace) -> bool:
    if args.dashboard == "off" or (args.dashboard == "auto" and not _isatty(sys.stdout)):
        return False  # what dashboard_wanted says, without importing rich for nothing
    from gntdma.toolstack.dashboard import dashboard_wanted

    return dashboard_wanted(args.dashboard)


def _isatty(stream: object) -> bool:
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError):
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gntdma",
                                     description="Xen grant-table DMA on an emulated Xen host")
    parser.add_argument("--version", action="version", version=f"gntdma {gntdma.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="build a host, run the main job, report")
    run.add_argument("configs", nargs="*", type=Path, metavar="CONFIG",
                     help="xl.cfg-style guest configs, one guest each (default: the "
                     "built-in one guest, two disks, small grant table)")
    run.add_argument("--duration", type=float, default=5.0,
                     help="seconds of verified random I/O (default 5)")
    run.add_argument("--threads", type=_positive_int, default=4,
                     help="I/O threads per disk (default 4, at most 64)")
    run.add_argument("--seed", type=_positive_int, default=0,
                     help="seed of every random choice (0 to 2**64-1)")
    run.add_argument("--json", type=_path, metavar="PATH", help="write a JSON report")
    run.add_argument("--overwrite", action="store_true",
                     help="write existing images directly (their data is lost); by default "
                     "writes to an existing image go to a temporary overlay")
    run.add_argument("--stall-timeout", type=float, default=5.0, metavar="SECONDS",
                     help="end the run with a failed check when no I/O completes for this "
                     "long (default 5)")
    run.add_argument("--hold", action="store_true",
                     help="after the job, keep the host and its xenstored socket up "
                     "until SIGINT/SIGTERM, and serve gntdma xl on a control socket")
    run.add_argument("--control", type=_path, metavar="PATH",
                     help="the control socket for gntdma xl (default with --hold: one in "
                     "the run's temporary folder, named in the output)")
    _view_options(run)
    _tunable_options(run)
    _trace_options(run)
    sv = sub.add_parser("serve", help="build a host and export its guests' disks over NBD "
                        "until SIGINT/SIGTERM")
    sv.add_argument("configs", nargs="*", type=Path, metavar="CONFIG",
                    help="xl.cfg-style guest configs, one guest each (default: the built-in one)")
    sv.add_argument("--nbd", type=_path, metavar="PATH", help="serve on this Unix socket")
    sv.add_argument("--nbd-listen", metavar="HOST:PORT",
                    help="serve on TCP instead (loopback only, unless --allow-remote)")
    sv.add_argument("--allow-remote", action="store_true",
                    help="allow --nbd-listen on an address other than loopback (NBD has no "
                    "authentication)")
    sv.add_argument("--nbd-max-connections", type=int, default=256, metavar="N",
                    help="connections open at once (default 256); beyond, a new client "
                    "replaces the oldest one still negotiating, or is refused")
    sv.add_argument("--nbd-handshake-timeout", type=float, default=5.0, metavar="SECONDS",
                    help="drop a connection still negotiating after this long (default 5; "
                    "0: never)")
    sv.add_argument("--seed", type=_positive_int, default=0)
    sv.add_argument("--control", type=_path, metavar="PATH",
                    help="the control socket for gntdma xl (default: one in the serve's "
                    "temporary folder, named in the output)")
    _view_options(sv)
    _tunable_options(sv)
    sv.add_argument("--json", type=_path, metavar="PATH", help="write a JSON report")
    sv.add_argument("--overwrite", action="store_true",
                    help="write existing images directly (by default writes go to a "
                    "temporary overlay)")
    _trace_options(sv)
    cli_xenstored.add_parser(sub)
    xl = sub.add_parser("xl", help="xl-like console of a running host (run --hold, serve)")
    xl.add_argument("--socket", type=_path, required=True, metavar="PATH",
                    help="the host's control socket (printed by run --hold and serve)")
    xl.add_argument("verb", choices=("list", "info", "block-list", "block-attach",
                                     "block-detach", "network-list", "network-attach",
                                     "network-detach", "destroy"))
    xl.add_argument("args", nargs=argparse.REMAINDER, metavar="ARG")
    ex = sub.add_parser("explore", help="explore the interleavings of a scenario")
    ex.add_argument("scenario", nargs="?", help="scenario name (see --list)")
    ex.add_argument("--list", action="store_true", help="list the scenarios and exit")
    # The campaign's options default to None (see _EXPLORE_DEFAULTS): --merge takes
    # its campaign from the shard files and refuses any of them given.
    ex.add_argument("--strategy", help="random (default), pct or dfs")
    ex.add_argument("--schedules", type=_positive_int,
                    help="schedules to explore (default 1000)")
    ex.add_argument("--seed", type=_positive_int)
    ex.add_argument("--callback-delivery", choices=("taskqueue", "inline"),
                    help="grant free callbacks: gntdma's taskqueue "
                    "delivery, or FreeBSD's inline delivery under the lock")
    ex.add_argument("--pct-depth", type=_positive_int, help="at least 1 (default 3)")
    ex.add_argument("--max-preemptions", type=_positive_int,
                    help="bound for dfs (0 or more, default 2)")
    ex.add_argument("--out", type=Path, metavar="FILE", help="replay file of the first failure")
    ex.add_argument("--dashboard", choices=("auto", "on", "off"), default="auto",
                    help="a live display of the schedules done, failures found and rate "
                    "(default auto: when stdout is a terminal)")
    ex.add_argument("--jobs", type=_positive_int, default=1, metavar="N",
                    help="run the schedules on N worker processes (0: one per core; "
                    "default 1); the result is the same")
    ex.add_argument("--shard", metavar="I/N", help="run only the I-th of N slices of the "
                    "schedules (1 <= I <= N) and write a result file for --merge")
    ex.add_argument("--out-results", type=Path, metavar="FILE",
                    help="the result file of --shard")
    ex.add_argument("--merge", nargs="+", type=Path, metavar="FILE",
                    help="combine the result files of every shard into the report and "
                    "replay file of one unsharded run")
    ex.add_argument("--dask", metavar="ADDRESS",
                    help="run the schedules on an existing Dask cluster (its scheduler's "
                    "address; needs the dask extra)")
    rp = sub.add_parser("replay", help="rerun a replay file written by explore")
    rp.add_argument("file", type=Path)
    rp.add_argument("--scenario", help="the scenario the file must be a replay of")
    _trace_options(rp)
    return parser


def cmd_run(args: argparse.Namespace, out: _Output) -> int:
    from gntdma.errors import ConfigError, GntdmaError
    from gntdma.toolstack.interrupt import Interrupted, InterruptGuard
    from gntdma.toolstack.run import run_main_job

    with InterruptGuard() as guard:
        try:
            report = run_main_job(args.configs, seed=args.seed, json_path=args.json,
                                  duration=args.duration, threads=args.threads,
                                  hold=args.hold, overwrite=args.overwrite, log=out.say,
                                  guard=guard, stall_timeout=args.stall_timeout,
                                  dashboard=_dashboard(args), plots_dir=args.plots,
                                  control=args.control, dma_debug=args.dma_debug,
                                  junk_fill=args.junk_fill)
            out.say(report.format())
        except Interrupted as e:
            print(f"gntdma run: interrupted by {e.name} while {e.phase}; what it made for "
                  "itself is removed", file=sys.stderr)
            return e.status
        except ConfigError as e:
            out.refused = True
            print(f"gntdma run: {e}", file=sys.stderr)
            return 2
        except OSError as e:
            print(f"gntdma run: {e}", file=sys.stderr)
            return 2
        except GntdmaError as e:
            print(f"gntdma run: failed: {e}", file=sys.stderr)
            return 1
    return 0 if report.ok else 1


def cmd_serve(args: argparse.Namespace, out: _Output) -> int:
    from gntdma.errors import ConfigError, GntdmaError
    from gntdma.toolstack.interrupt import Interrupted, InterruptGuard
    from gntdma.toolstack.serve import serve_main

    with InterruptGuard() as guard:
        try:
            report = serve_main(args.configs, nbd_path=args.nbd, nbd_listen=args.nbd_listen,
                                allow_remote=args.allow_remote, seed=args.seed,
                                json_path=args.json, overwrite=args.overwrite, log=out.say,
                                guard=guard, max_connections=args.nbd_max_connections,
                                handshake_timeout=args.nbd_handshake_timeout,
                                dashboard=_dashboard(args), plots_dir=args.plots,
                                control=args.control, dma_debug=args.dma_debug,
                                junk_fill=args.junk_fill)
            out.say(report.format())
        except Interrupted as e:
            print(f"gntdma serve: interrupted by {e.name} while {e.phase}; what it made for "
                  "itself is removed", file=sys.stderr)
            return e.status
        except (ConfigError, OSError) as e:
            out.refused = isinstance(e, ConfigError)
            print(f"gntdma serve: {e}", file=sys.stderr)
            return 2
        except GntdmaError as e:
            print(f"gntdma serve: failed: {e}", file=sys.stderr)
            return 1
    return 0 if report.ok else 1


#: explore's campaign options (what a shard file records) and their defaults.
_EXPLORE_CAMPAIGN = (("the scenario", "scenario"), ("--strategy", "strategy"),
                     ("--schedules", "schedules"), ("--seed", "seed"),
                     ("--callback-delivery", "callback_delivery"),
                     ("--pct-depth", "pct_depth"), ("--max-preemptions", "max_preemptions"),
                     ("--shard", "shard"), ("--out-results", "out_results"),
                     ("--dask", "dask"))
_EXPLORE_DEFAULTS: dict[str, object] = {
    "strategy": "random", "schedules": 1000, "seed": 0, "callback_delivery": "taskqueue",
    "pct_depth": 3, "max_preemptions": 2}


def _explore(args: argparse.Namespace, out: _Output) -> int:
    from gntdma.errors import ConfigError
    from gntdma.toolstack.explorecmd import explore_command, list_scenarios

    if args.list:
        for line in list_scenarios():
            out.say(line)
        return 0
    cpus = _processors()
    if args.jobs < 0:
        raise ConfigError(f"--jobs must be 0 (one worker per processor) or more, not {args.jobs}")
    jobs = args.jobs if args.jobs != 0 else cpus
    if jobs > JOBS_PER_PROCESSOR * cpus:
        # Each worker is a spawned interpreter with the package imported (tens of MiB):
        # thousands of them would exhaust the machine, and past the processors they
        # only share them.
        print(f"gntdma explore: --jobs {jobs}: at most {JOBS_PER_PROCESSOR} worker "
              f"processes per processor, {JOBS_PER_PROCESSOR * cpus} on the {cpus} this "
              f"process may use", file=sys.stderr)
        jobs = JOBS_PER_PROCESSOR * cpus
    if args.merge is not None:
        from gntdma.toolstack.explorecmd import merge_command

        given = [f"{opt} {getattr(args, dest)}" for opt, dest in _EXPLORE_CAMPAIGN
                 if getattr(args, dest) is not None]
        if len(given) > 0:
            raise ConfigError(f"--merge takes the campaign from its shard files: "
                              f"{', '.join(given)} cannot be given with it")
        _check_output(args.out, "--out")
        return merge_command(args.merge, say=out.say, out=args.out, jobs=jobs)
    for dest, value in _EXPLORE_DEFAULTS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)
    if args.scenario is None:
        raise ConfigError("give a scenario name (gntdma explore --list shows them)")
    if args.pct_depth < 1:
        raise ConfigError(f"--pct-depth must be at least 1, not {args.pct_depth}")
    if args.max_preemptions < 0:
        raise ConfigError(f"--max-preemptions must be 0 or more, not {args.max_preemptions}")
    if not 0 <= args.seed < 1 << 64:
        raise ConfigError(f"--seed must be from 0 to 2**64-1, not {args.seed}")
    _check_output(args.out, "--out")
    _check_output(args.out_results, "--out-results")
    shard = None
    if args.shard is not None:
        from gntdma.toolstack.exploremerge import parse_shard

        shard = parse_shard(args.shard)
    return explore_command(args.scenario, strategy=args.strategy,
                           schedules=args.schedules, seed=args.seed,
                           callback_delivery=args.callback_delivery, out=args.out,
                           pct_depth=args.pct_depth,
                           max_preemptions=args.max_preemptions, say=out.say,
                           jobs=jobs, shard=shard, out_results=args.out_results,
                           dask=args.dask, dashboard=_dashboard(args))


def _check_output(path: Path | None, option: str) -> None:
    if path is not None:  # preflight (and the config parser it imports) only when needed
        from gntdma.toolstack.preflight import check_output

        check_output(path, option)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = _Output()
    if args.command == "run":
        return _traced(args, out, lambda _say: cmd_run(args, out))
    if args.command == "serve":
        return _traced(args, out, lambda _say: cmd_serve(args, out))
    if args.command == "xenstored":
        return cli_xenstored.run(args)
    if args.command == "xl":
        from gntdma.toolstack.xlcmd import xl_command

        return xl_command(args.socket, args.verb, list(args.args))
    from gntdma.errors import ConfigError
    from gntdma.toolstack.explorecmd import replay_command
    from gntdma.toolstack.interrupt import Interrupted, ScheduleInterruptGuard

    with ScheduleInterruptGuard():
        try:
            if args.command == "explore":
                return _explore(args, out)
            if args.command == "replay":
                return _traced(args, out, lambda say: replay_command(
                    args.file, say=say, scenario=args.scenario))
        except ConfigError as e:
            print(f"gntdma {args.command}: {e}", file=sys.stderr)
            return 2
        except Interrupted as e:
            print(f"gntdma {args.command}: interrupted by {e.name}", file=sys.stderr)
            return e.status
        except KeyboardInterrupt:
            print(f"gntdma {args.command}: interrupted by SIGINT", file=sys.stderr)
            return 130
    return 2


#: Worker processes of ``explore --jobs`` per processor this process may use, at most.
JOBS_PER_PROCESSOR = 4


def _processors() -> int:
    """The processors this process may run on (its affinity, as a cluster's cgroup sets)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


if __name__ == "__main__":
    sys.exit(main())
