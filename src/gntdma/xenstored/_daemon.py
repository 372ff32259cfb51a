"""The daemon process: ``python -m gntdma.xenstored --socket PATH``.

Prints the socket path once it is listening, then serves until SIGINT or
SIGTERM and removes the socket. Point Debian's xenstore-utils or pyxs at it
with ``XENSTORED_PATH=PATH``. ``gntdma xenstored`` (:mod:`gntdma.cli_xenstored`)
is the same thing under the gntdma command.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from types import FrameType

from gntdma.xenstored._core import Xenstored

__all__ = ["configure_parser", "main", "run"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the daemon's options to ``parser``."""
    parser.add_argument(
        "--socket",
        metavar="PATH",
        default=os.environ.get("XENSTORED_PATH"),
        help="Unix socket to listen on (default: $XENSTORED_PATH)",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log connections and control messages"
    )


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; 0 on a clean stop, 2 if the socket cannot be set up."""
    if not args.socket:
        print("xenstored: --socket PATH (or XENSTORED_PATH) is required", file=sys.stderr)
        return 2
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    # Imported here: building gntdma's argument parser imports this module.
    from gntdma.xenstored._socket import ServerError, XenstoredServer

    try:
        server = XenstoredServer(Xenstored(), args.socket)
    except ServerError as e:
        print(f"xenstored: {e}", file=sys.stderr)
        return 2

    def stop(signum: int, frame: FrameType | None) -> None:
        server.shutdown()

    old = {}
    if threading.current_thread() is threading.main_thread():
        old = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(server.path, flush=True)
        server.serve_forever()
    finally:
        server.close()
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gntdma.xenstored", description=__doc__)
    configure_parser(parser)
    return run(parser.parse_args(argv))
