"""Network namespaces for real traffic, held by a child tied to the run's life.

Each namespace is created with iproute2's ``ip netns add`` by a small holder
process of its own. The holder:

- runs in a session of its own (a Ctrl-C or a kill of the run's process
  group does not reach it before it has cleaned up);
- has a pipe from the run on its standard input and deletes the namespace
  (``ip netns del``) when that pipe reaches end of file, that is when the run
  closes it or dies in any way, SIGKILL included (the kernel closes the
  run's end);
- also asks for a parent-death signal (``prctl(PR_SET_PDEATHSIG, SIGTERM)``),
  which it treats as the same end.

TAP devices that gntdma opens disappear with their descriptor, so a crashed
or killed run leaves neither namespace nor device behind.

Names are unique per run and at most 15 characters (``IFNAMSIZ - 1``, the
limit of a link name; the namespace names use the same scheme): ``gd`` and the
run's process id in hexadecimal, then a kind letter and a counter.
Addresses come from 198.18.0.0/15, the range RFC 2544 reserves for
benchmarking networks, which nothing routes.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from typing import IO, Final, final

from gntdma.errors import GntdmaError

__all__ = [
    "IFNAMSIZ",
    "NET_PREFIX",
    "Netns",
    "NetnsError",
    "ip",
    "net_unavailable",
    "unique_name",
]

#: ``IFNAMSIZ`` of ``<net/if.h>``: a link name is at most 15 bytes and a NUL.
IFNAMSIZ: Final = 16
#: The private range addresses are taken from (RFC 2544 benchmarking).
NET_PREFIX: Final = "198.18"
_NETNS_DIR: Final = "/run/netns"

_counter = itertools.count()

# The holder: creates the namespace, says so, waits for its stdin to close
# (or SIGTERM from the parent-death signal), deletes the namespace.
_HOLDER: Final = r"""
import ctypes, os, signal, subprocess, sys
name = sys.argv[1]
def end(*_a):
    subprocess.run(["ip", "netns", "del", name], stderr=subprocess.DEVNULL)
    os._exit(0)
signal.signal(signal.SIGTERM, end)
signal.signal(signal.SIGINT, signal.SIG_IGN)
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
except OSError:
    pass
if os.getppid() != int(sys.argv[2]):
    os._exit(1)
r = subprocess.run(["ip", "netns", "add", name], stderr=subprocess.PIPE, text=True)
if r.returncode != 0:
    sys.stdout.write("ERR " + r.stderr.strip() + "\n"); sys.stdout.flush(); os._exit(1)
subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"])
sys.stdout.write("OK\n"); sys.stdout.flush()
while True:
    try:
        if os.read(0, 4096) == b"":
            break
    except InterruptedError:
        continue
    except OSError:
        break
end()
"""


class NetnsError(GntdmaError):
    """A namespace, link or address could not be set up."""


def unique_name(kind: str) -> str:
    """A link or namespace name unique in this run: ``gd<pid hex><kind><n>``."""
    name = f"gd{os.getpid():x}{kind}{next(_counter)}"
    if len(name) >= IFNAMSIZ:
        raise NetnsError(f"name {name!r} longer than {IFNAMSIZ - 1} characters")
    return name


def net_unavailable() -> str | None:
    """Why real networking cannot be used here, or None when it can."""
    if os.geteuid() != 0:
        return "network namespaces and TAP devices need root (run as root, or without a NIC)"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing (no TUN/TAP support in this system)"
    if shutil.which("ip") is None:
        return "iproute2's ip command is not installed (apt-get install iproute2)"
    return None


def ip(*args: str, netns: str | None = None) -> str:
    """Run ``ip [-n NETNS] ARGS``; its output, or NetnsError with its message."""
    argv = ["ip"] + (["-n", netns] if netns is not None else []) + list(args)
    r = subprocess.run(argv, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: {r.stderr.strip() or f'exit {r.returncode}'}")
    return r.stdout


@final
class Netns:
    """A network namespace held by a child process for as long as the run lives."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name if name is not None else unique_name("n")
        if len(self.name) >= IFNAMSIZ:
            raise NetnsError(f"namespace name {self.name!r} longer than {IFNAMSIZ - 1} characters")
        self._holder: subprocess.Popen[bytes] | None = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, self.name, str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
            close_fds=True)
        assert self._holder.stdout is not None
        line = self._holder.stdout.readline().decode(errors="replace").strip()
        if line != "OK":
            self._reap()
            raise NetnsError(f"ip netns add {self.name}: {line.removeprefix('ERR ') or 'failed'}")

    @property
    def holder_pid(self) -> int:
        return -1 if self._holder is None else self._holder.pid

    @property
    def alive(self) -> bool:
        return self._holder is not None and os.path.exists(os.path.join(_NETNS_DIR, self.name))

    def ip(self, *args: str) -> str:
        return ip(*args, netns=self.name)

    def argv(self, cmd: Sequence[str]) -> list[str]:
        """``cmd`` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(self, cmd: Sequence[str], *, timeout: float | None = None,
            check: bool = True, what: str | None = None) -> subprocess.CompletedProcess[str]:
        """``cmd`` in the namespace; a timeout, a missing ``ip`` or (with ``check``) a
        non-zero exit raise :class:`NetnsError` (``what``: the command's name in it)."""
        what = " ".join(cmd) if what is None else what
        try:
            r = subprocess.run(self.argv(cmd), capture_output=True, text=True,
                               timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise NetnsError(f"{what} in {self.name}: timed out after {timeout} s "
                             "(killed)") from None
        except OSError as e:
            raise NetnsError(f"{what} in {self.name}: {e}") from None
        if check and r.returncode != 0:
            raise NetnsError(f"{what} in {self.name}: exit {r.returncode}: "
                             f"{(r.stderr or r.stdout).strip()[-500:]}")
        return r

    def popen(self, cmd: Sequence[str], *, stdin: int | IO[bytes] | None = None,
              stdout: int | IO[bytes] | None = None,
              stderr: int | IO[bytes] | None = None) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.argv(cmd), stdin=stdin, stdout=stdout, stderr=stderr)

    def add_link(self, ifname: str, address: str | None = None, *, mtu: int | None = None,
                 mac: str | None = None, rename: str | None = None) -> str:
        """Move ``ifname`` (in the run's namespace) here, give it an address, bring it up.

        ``rename``: its name here (a name the run's namespace may already use).
        Returns the link's name in this namespace.
        """
        ip("link", "set", ifname, "netns", self.name)
        if rename is not None and rename != ifname:
            self.ip("link", "set", ifname, "name", rename)
            ifname = rename
        if mtu is not None:
            self.ip("link", "set", ifname, "mtu", str(mtu))
        if mac is not None:
            self.ip("link", "set", ifname, "address", mac)
        if address is not None:
            self.ip("addr", "add", address, "dev", ifname)
        self.ip("link", "set", ifname, "up")
        return ifname

    def close(self) -> None:
        """Delete the namespace (its holder does, then exits)."""
        self._reap()

    def _reap(self) -> None:
        h = self._holder
        if h is None:
            return
        self._holder = None
        assert h.stdin is not None and h.stdout is not None
        try:
            h.stdin.close()
        except OSError:
            pass
        try:
            h.wait(timeout=10)
        except subprocess.TimeoutExpired:
            h.kill()
            h.wait()
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)
        h.stdout.close()

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Netns {self.name}>"
