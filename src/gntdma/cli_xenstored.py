"""``gntdma xenstored --socket PATH``: run the xenstore daemon on a Unix socket.

Prints the socket path once it is listening, then serves until SIGINT or
SIGTERM. Point Debian's xenstore-utils or pyxs at it with
``XENSTORED_PATH=PATH``. The same daemon runs as ``python -m gntdma.xenstored``.
"""

from __future__ import annotations

import argparse
from typing import Any

from gntdma.xenstored import _daemon

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction[Any]) -> argparse.ArgumentParser:
    """Register the ``xenstored`` subcommand on the ``gntdma`` parser."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "xenstored",
        help="run the xenstore daemon on a Unix socket",
        description=__doc__,
    )
    _daemon.configure_parser(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; 0 on a clean stop, 2 if the socket cannot be set up."""
    return _daemon.run(args)
