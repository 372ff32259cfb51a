"""Debian's xenstore-utils against a running host: in process, and `gntdma run --hold`.

A missing tool is a failure, not a skip: ``make test`` installs xenstore-utils.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from xenbus_testlib import xs

from gntdma.toolstack.host import Host
from gntdma.toolstack.xs import XenstoredSocket
from gntdma.xen.xenbus import XST_NIL, XsWatch

pytestmark = [pytest.mark.realclient, pytest.mark.slow]


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} is missing: install xenstore-utils (make test does)"
    return path


def xst(sock: str, name: str, *args: str) -> str:
    proc = subprocess.run([tool(name), *args], env={**os.environ, "XENSTORED_PATH": sock},
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, (name, args, proc.stderr)
    return proc.stdout


def test_xenstore_ls_sees_the_hosts_domains(host: Host) -> None:
    g = host.create_guest("guest-a", memory_mb=4)
    assert xs(g).xs_write(XST_NIL, "data", "from-guest", "over the ring") == 0
    events: list[str] = []
    w = XsWatch("data", lambda p, t: events.append(p))
    assert xs(g).xs_register_watch(w) == 0
    host.sched.run(until=lambda: len(events) == 1)
    with XenstoredSocket(host.xenstored) as sock:
        path = sock.path
        listing = xst(path, "xenstore-ls", "/local/domain")
        assert re.search(rf"^{g.domid} = \"\"$", listing, re.M), listing
        assert 'name = "guest-a"' in listing and 'name = "Domain-0"' in listing
        assert xst(path, "xenstore-read", f"/local/domain/{g.domid}/data/from-guest") \
            == "over the ring\n"
        # A write from outside (the socket's OS thread) reaches the guest's watch.
        xst(path, "xenstore-write", f"/local/domain/{g.domid}/data/from-outside", "hi")
        host.sched.add_external_source()
        try:
            cancel = host.sched.call_later(20.0, lambda: None)
            host.sched.run(until=lambda: len(events) == 2)
            cancel()
        finally:
            host.sched.remove_external_source()
        assert events[1] == "data/from-outside"
        assert xs(g).xs_read(XST_NIL, "data/from-outside") == (0, b"hi")
    assert not os.path.exists(path) and not os.path.exists(os.path.dirname(path))
    assert xs(g).xs_unregister_watch(w) == 0


def _read_until(proc: subprocess.Popen[str], pattern: str, timeout: float) -> list[str]:
    """Lines of ``proc``'s stdout up to one matching ``pattern``.

    Reads the raw descriptor: select() on the buffered text stream would miss
    lines already pulled into its buffer by an earlier readline().
    """
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    lines: list[str] = []
    pending = b""
    deadline = time.monotonic() + timeout
    while True:
        while b"\n" in pending:
            raw, pending = pending.split(b"\n", 1)
            line = raw.decode()
            lines.append(line)
            if re.search(pattern, line):
                return lines
        left = deadline - time.monotonic()
        assert left > 0, f"no {pattern!r} in {lines}"
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        assert chunk, f"EOF before {pattern!r}: {lines}"
        pending += chunk


def _gntdma(*args: str) -> list[str]:
    return [sys.executable, "-m", "gntdma.cli", *args]


def test_gntdma_run_hold_serves_xenstore_until_sigint(tmp_path: Path) -> None:
    proc = subprocess.Popen(_gntdma("run", "--hold"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        lines = _read_until(proc, r"^holding:", 120)
        m = next(re.match(r"^xenstored: (\S+)", ln) for ln in lines
                 if ln.startswith("xenstored:"))
        assert m is not None
        path = m.group(1)
        assert any("0 failed" in ln for ln in lines), lines
        listing = xst(path, "xenstore-ls")
        assert re.search(r'^  0 = ""$', listing, re.M), listing
        assert 'name = "guest1"' in listing and 'name = "Domain-0"' in listing
        dm = re.search(r"^guest1: domid (\d+)", "\n".join(lines), re.M)
        assert dm is not None, lines
        domid = dm.group(1)
        assert re.search(rf'^  {domid} = ""$', listing, re.M), listing
        assert xst(path, "xenstore-read", f"/local/domain/{domid}/name") == "guest1\n"
        # its disks are there too, in the libxl layout
        assert "vbd" in xst(path, "xenstore-ls", "/local/domain/0/backend")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "0 failed" in out
    assert not os.path.exists(path) and not os.path.exists(os.path.dirname(path))


def test_gntdma_run_without_hold_exits_and_removes_the_socket(tmp_path: Path) -> None:
    t0 = time.monotonic()
    proc = subprocess.run(_gntdma("run"), capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - t0 < 60
    m = re.search(r"^xenstored: (\S+)", proc.stdout, re.M)
    assert m is not None, proc.stdout
    assert not os.path.exists(m.group(1))
    assert "holding" not in proc.stdout
