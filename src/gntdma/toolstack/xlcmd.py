"""``gntdma xl --socket PATH VERB [ARGS...]``: the client of a host's control socket.

It sends the verb, its arguments and the current folder (relative image paths
of ``block-attach`` are taken from it, as ``xl`` takes them from its own) as
one line of JSON, prints the answer's output and error text, and exits with
its status. A missing socket, a refused connection or a host that does not
answer in time is one line on stderr and status 1, never a traceback.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Final, TextIO

__all__ = ["XL_TIMEOUT", "xl_command"]

#: Seconds to wait for an answer (attach and detach wait up to libxl's 10 s each).
XL_TIMEOUT: Final = 120.0


def xl_command(socket_path: Path, verb: str, args: list[str], *,
               out: TextIO | None = None, err: TextIO | None = None,
               timeout: float = XL_TIMEOUT) -> int:
    """Run ``verb`` on the host behind ``socket_path``; the exit status."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    req = json.dumps({"verb": verb, "args": args, "cwd": os.getcwd()}).encode() + b"\n"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(str(socket_path))
        except FileNotFoundError:
            err.write(f"gntdma xl: {socket_path}: no such control socket (is the host "
                      "running with --hold or serve?)\n")
            return 1
        except ConnectionRefusedError:
            err.write(f"gntdma xl: {socket_path}: connection refused (the host is gone; "
                      "a stale socket?)\n")
            return 1
        except OSError as e:
            err.write(f"gntdma xl: {socket_path}: {e.strerror or e}\n")
            return 1
        try:
            s.sendall(req)
            data = bytearray()
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            err.write(f"gntdma xl: no answer from {socket_path} in {timeout:.0f} s\n")
            return 1
        except OSError as e:
            err.write(f"gntdma xl: {socket_path}: {e.strerror or e}\n")
            return 1
    finally:
        s.close()
    try:
        ans = json.loads(data)
        status, text, etext = int(ans["status"]), str(ans["out"]), str(ans["err"])
    except (ValueError, KeyError, TypeError):
        err.write("gntdma xl: the host closed the connection without an answer\n")
        return 1
    out.write(text)
    err.write(etext)
    out.flush()
    return status
