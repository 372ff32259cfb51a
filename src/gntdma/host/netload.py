"""Traffic between network namespaces: ping, a verified bulk TCP transfer, iperf3.

These run real Linux programs in the namespaces (``ip netns exec``) and block
the calling OS thread; a caller on the scheduler's thread runs them on another
OS thread and keeps the scheduler going meanwhile (see :func:`pump`).

The bulk transfer sends a file of random bytes from one namespace to a
listener in the other, which hashes what it receives with SHA-256: both
programs are this Python run with a few lines of code, so nothing but the
kernel's TCP and gntdma's path sits between them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

from gntdma.host.netns import Netns, NetnsError
from gntdma.sched import Scheduler

__all__ = [
    "IperfResult",
    "PingResult",
    "TransferResult",
    "congestion_control",
    "iperf3",
    "ping",
    "pump",
    "random_file",
    "tcp_transfer",
]

T = TypeVar("T")

_RECEIVER: Final = r"""
import hashlib, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
sys.stdout.write("LISTENING\n"); sys.stdout.flush()
s.settimeout(float(sys.argv[3]))
c, _ = s.accept()
c.settimeout(float(sys.argv[3]))
h = hashlib.sha256(); n = 0
buf = bytearray(1 << 20)
while True:
    k = c.recv_into(buf)
    if k == 0:
        break
    h.update(memoryview(buf)[:k]); n += k
sys.stdout.write(f"{n} {h.hexdigest()}\n"); sys.stdout.flush()
"""

_SENDER: Final = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[4]))
with open(sys.argv[3], "rb") as f:
    c.sendfile(f)
c.shutdown(socket.SHUT_WR)
c.recv(1)
c.close()
"""


@dataclass(frozen=True, slots=True)
class PingResult:
    sent: int
    received: int
    rtt_avg_ms: float | None
    rtt_min_ms: float | None
    rtt_max_ms: float | None


@dataclass(frozen=True, slots=True)
class TransferResult:
    size: int
    sent_sha256: str
    received_size: int
    received_sha256: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.received_size == self.size and self.received_sha256 == self.sent_sha256

    @property
    def mbit_s(self) -> float:
        return self.size * 8 / 1e6 / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True, slots=True)
class IperfResult:
    seconds: float
    sent_bits_per_second: float
    received_bits_per_second: float
    retransmits: int
    congestion: str


def pump(sched: Scheduler, fn: Callable[[], T]) -> T:
    """Run ``fn()`` on an OS thread while the scheduler runs (from the hub's caller).

    The thread posts an event when it ends, so that a scheduler with nothing
    else to do wakes up and sees it.
    """
    box: list[T] = []
    err: list[BaseException] = []
    done = threading.Event()

    def body() -> None:
        try:
            box.append(fn())
        except BaseException as exc:
            err.append(exc)
        finally:
            done.set()
            sched.post(lambda: None)

    th = threading.Thread(target=body, name="gntdma-netload", daemon=True)
    sched.add_external_source()
    try:
        th.start()
        sched.run(until=done.is_set)
    finally:
        sched.remove_external_source()
    th.join()
    if len(err) > 0:
        raise err[0]
    return box[0]


def random_file(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path``; their SHA-256."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left > 0:
            chunk = os.urandom(min(left, 1 << 20))
            h.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return h.hexdigest()


_PING_RE: Final = re.compile(r"(\d+) packets transmitted, (\d+) received")
_RTT_RE: Final = re.compile(r"= ([\d.]+)/([\d.]+)/([\d.]+)/")


def ping(ns: Netns, addr: str, *, count: int = 5, interval: float = 0.2,
         size: int = 56, timeout: float = 10.0) -> PingResult:
    """``ping`` from ``ns`` to ``addr``."""
    r = ns.run(["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-s", str(size),
                "-W", "2", addr], timeout=timeout + count * interval + 5, check=False)
    m = _PING_RE.search(r.stdout)
    if m is None:
        raise NetnsError(f"ping {addr} in {ns.name}: {(r.stderr or r.stdout).strip()[-300:]}")
    rtt = _RTT_RE.search(r.stdout)
    lo, avg, hi = (float(rtt.group(1)), float(rtt.group(2)), float(rtt.group(3))) if rtt \
        else (None, None, None)
    return PingResult(int(m.group(1)), int(m.group(2)), avg, lo, hi)


def tcp_transfer(src: Netns, dst: Netns, dst_addr: str, path: Path, *, sha256: str | None = None,
                 port: int = 5201 + 7, timeout: float = 120.0) -> TransferResult:
    """Send the file at ``path`` from ``src`` to a listener at ``dst_addr`` in ``dst``.

    Raises:
        NetnsError: a program timed out, is missing, or failed (a check's failure).
    """
    size = path.stat().st_size
    if sha256 is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        sha256 = h.hexdigest()
    recv = dst.popen([sys.executable, "-c", _RECEIVER, dst_addr, str(port), str(timeout)],
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert recv.stdout is not None and recv.stderr is not None
    try:
        if recv.stdout.readline().strip() != b"LISTENING":
            raise NetnsError(f"receiver in {dst.name}: {recv.stderr.read().decode()[-300:]}")
        t0 = time.monotonic()
        src.run([sys.executable, "-c", _SENDER, dst_addr, str(port), str(path), str(timeout)],
                timeout=timeout, what=f"TCP sender to {dst_addr}:{port}")
        line = recv.stdout.readline().decode().split()
        seconds = time.monotonic() - t0
        try:
            recv.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise NetnsError(f"receiver in {dst.name}: still running {timeout} s after "
                             "the sender ended (killed)") from None
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
        recv.stdout.close()
        recv.stderr.close()
    if len(line) != 2:
        raise NetnsError(f"receiver in {dst.name} reported nothing")
    return TransferResult(size, sha256, int(line[0]), line[1], seconds)


def congestion_control(ns: Netns) -> str:
    """The TCP congestion control in use in ``ns``."""
    r = ns.run(["sysctl", "-n", "net.ipv4.tcp_congestion_control"], check=False)
    return r.stdout.strip() or "unknown"


def iperf3(client: Netns, server: Netns, addr: str, *, seconds: float = 3.0,
           port: int = 5201, timeout: float = 60.0) -> IperfResult:
    """An ``iperf3`` TCP run from ``client`` to a one-off server at ``addr`` in ``server``."""
    srv = server.popen(["iperf3", "-s", "-1", "-B", addr, "-p", str(port)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        r = None
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # until the server listens
            r = client.run(["iperf3", "-c", addr, "-p", str(port), "-t", str(seconds), "-J"],
                           timeout=timeout, check=False)
            # (iperf3 -J may exit 0 with the refusal in its JSON)
            if "Connection refused" not in r.stdout + r.stderr:
                break
            time.sleep(0.1)
        assert r is not None
        if r.returncode != 0:
            raise NetnsError(f"iperf3 -c {addr}: {(r.stdout + r.stderr).strip()[-400:]}")
        try:  # a one-off server ends with its client; the client has its results
            srv.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.wait()
        if srv.stderr is not None:
            srv.stderr.close()
    j = json.loads(r.stdout)
    end = j.get("end", {})
    if "sum_sent" not in end or "sum_received" not in end:
        raise NetnsError(f"iperf3 -c {addr}: {j.get('error', 'no summary')}")
    return IperfResult(
        seconds=float(end["sum_sent"]["seconds"]),
        sent_bits_per_second=float(end["sum_sent"]["bits_per_second"]),
        received_bits_per_second=float(end["sum_received"]["bits_per_second"]),
        retransmits=int(end["sum_sent"].get("retransmits", 0)),
        congestion=str(end.get("sender_tcp_congestion", congestion_control(client))),
    )
