"""``gntdma run`` on a terminal shows the live dashboard (issue 15 item 1): a real run in
a subprocess whose stdout is a pseudo-terminal."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import time
from pathlib import Path

from run_helpers import gntdma_cmd, subprocess_env

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r")


def _run_on_a_pty(tmp: Path, *args: str, timeout: float = 240) -> tuple[int, str]:
    """Run ``gntdma ARGS`` with a pseudo-terminal as stdout and stderr: (status, output)."""
    master, slave = pty.openpty()
    env = subprocess_env(tmp)
    env.update(TERM="xterm-256color", COLUMNS="120", LINES="60")
    env.pop("NO_COLOR", None)
    p = subprocess.Popen(gntdma_cmd(*args), cwd=tmp, env=env, stdin=subprocess.DEVNULL,
                         stdout=slave, stderr=slave)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _w, _x = select.select([master], [], [], 1.0)
            if not ready:
                if p.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(master)
    return rc, out.decode("utf-8", "replace")


def test_dashboard_under_a_pty_shows_the_expected_figures(tmp_path: Path) -> None:
    """The frames show per guest the grant entries in use against the capacity of the
    default's max_grant_frames = 3 (3 * 512 - 8 = 1528 entries, xen/common/grant_table.c
    gives 512 8-byte grant_entry_v1 a 4 KiB frame; the first 8 are reserved,
    GNTTAB_NR_RESERVED_ENTRIES of xen/include/public/grant_table.h, NR_RESERVED_ENTRIES of
    Linux drivers/xen/grant-table.c) and the deferred loads, per disk the ring
    occupancy against its size, throughput and latency; the last frame's completed
    deferred loads are those the report counts, none left waiting."""
    report = tmp_path / "r.json"
    rc, raw = _run_on_a_pty(tmp_path, "run", "--duration", "3", "--json", str(report))
    assert rc == 0, raw[-3000:]
    assert "\x1b[" in raw  # a terminal gets the live display
    text = _ANSI.sub("", raw)
    assert "guests: grant table" in text and "devices: rings, throughput, latency" in text
    assert "reports (0)" in text
    # No plain progress line on a terminal.
    assert not re.search(r"^  \[ *\d+\.\ds\] requests", text, re.M)
    rows = re.findall(r"guest1\s+\S+ (\d+)/(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", text)
    assert len(rows) >= 3, text[-4000:]  # the start, a frame a second, the last
    in_use, capacity, frames, waiting, completed = (int(x) for x in rows[-1])
    assert capacity == 1528 and frames == 3 and 0 <= in_use <= capacity
    assert waiting == 0
    doc = json.loads(report.read_text())
    (check,) = [c for c in doc["checks"] if c["name"].startswith("loads deferred on the small")]
    deferred = int(check["detail"].split()[0])
    assert completed == deferred > 0
    disks = re.findall(r"guest1/(xvd[ab])\s+\S+ (\d+)/(\d+)\s+([\d.]+)\s+(\d+)\s+"
                       r"(-|[\d.]+ (?:us|ms))\s+(-|[\d.]+ (?:us|ms))\s+(\d+)", text)
    assert {d[0] for d in disks} == {"xvda", "xvdb"}
    # A blkif ring page holds 32 requests (__CONST_RING_SIZE(blkif, 4096) of Xen's
    # public io/ring.h with the 112-byte blkif_request of io/blkif.h), and a ring is a
    # power of two of pages (max-ring-page-order): its size is 32 times a power of two.
    for d in disks:
        ring = int(d[2])
        assert ring % 32 == 0 and (ring // 32) & (ring // 32 - 1) == 0 and int(d[1]) <= ring
    assert any(float(d[3]) > 0 and int(d[4]) > 0 and d[5] != "-" for d in disks)
    # Requests shown never exceed what the report counts for the disk.
    per_disk = {d["vdev"]: d["requests"] for d in doc["guests"][0]["disks"]}
    for d in disks:
        assert int(d[7]) <= per_disk[d[0]]
