"""NBD benchmark: fio against ``gntdma serve`` and against nbdkit's file plugin.

Run: .venv/bin/python benchmarks/nbd.py [--seconds S] [--size-mb N] [--rounds R] [--json]

Both servers serve the same image file at once (gntdma with ``--overwrite``
through a guest's blkfront, the grant tables, the ring and blkback; nbdkit's
file plugin straight from the file) on Unix sockets, and the same fio jobs
(``--ioengine=nbd``) run against each in turn, interleaved, so that both see
the same machine: 1 MiB sequential read and write at queue depth 8, 4 KiB
random read and write at queue depth 32. It prints MiB/s and IOPS of both
and the ratio (gntdma / nbdkit); ``--json`` prints the same as JSON. nbdkit
is installed from Debian when it is missing. Targets once the performance
work has landed: 0.5 of nbdkit at 1 MiB and 0.2 at 4 KiB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_args import positive_float, positive_int

JOBS = (
    ("seq-read-1M-qd8", "read", "1M", 8),
    ("seq-write-1M-qd8", "write", "1M", 8),
    ("rand-read-4k-qd32", "randread", "4k", 32),
    ("rand-write-4k-qd32", "randwrite", "4k", 32),
)


def _ensure_nbdkit() -> str:
    path = shutil.which("nbdkit")
    if path is None:
        print("installing nbdkit from Debian", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "-qq", "nbdkit"], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        path = shutil.which("nbdkit")
    if path is None:
        raise SystemExit("nbdkit is not installed and could not be installed")
    return path


def _wait_socket(path: Path, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{what} did not come up")
        time.sleep(0.05)


def _fio(uri: str, rw: str, bs: str, qd: int, seconds: float, size_mb: int) -> dict[str, float]:
    out = subprocess.run(
        ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
         f"--iodepth={qd}", f"--size={size_mb}M", "--time_based", f"--runtime={seconds}",
         "--output-format=json"], capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return {"mib_s": side["bw_bytes"] / (1 << 20), "iops": side["iops"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=positive_float, default=5.0, help="per job and server")
    ap.add_argument("--size-mb", type=positive_int, default=256, help="image size")
    ap.add_argument("--rounds", type=positive_int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    nbdkit = _ensure_nbdkit()
    tmp = Path(tempfile.mkdtemp(prefix="gntdma-nbdbench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        img = tmp / "disk.img"
        with open(img, "wb") as f:
            f.truncate(args.size_mb << 20)
        cfg = tmp / "bench.cfg"
        cfg.write_text('name = "bench"\nmemory = 256\nmax_grant_frames = 64\n'
                       f"disk = [ 'format=raw, vdev=xvda, access=rw, target={img}' ]\n")
        gsock, ksock = tmp / "gntdma.sock", tmp / "nbdkit.sock"
        procs.append(subprocess.Popen(
            [sys.executable, "-c", "import sys; from gntdma.cli import main; sys.exit(main())",
             "serve", str(cfg), "--overwrite", "--nbd", str(gsock)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ,
                                                                      "TMPDIR": str(tmp)}))
        _wait_socket(gsock, procs[-1], "gntdma serve")
        procs.append(subprocess.Popen([nbdkit, "-f", "-U", str(ksock), "file", str(img)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_socket(ksock, procs[-1], "nbdkit")
        uris = {"gntdma": f"nbd+unix:///bench/xvda?socket={gsock}",
                "nbdkit": f"nbd+unix:///?socket={ksock}"}
        results: dict[str, dict[str, list[dict[str, float]]]] = {
            name: {"gntdma": [], "nbdkit": []} for name, *_ in JOBS}
        for r in range(args.rounds):
            for name, rw, bs, qd in JOBS:
                order = ["gntdma", "nbdkit"] if r % 2 == 0 else ["nbdkit", "gntdma"]
                for server in order:
                    results[name][server].append(
                        _fio(uris[server], rw, bs, qd, args.seconds, args.size_mb))
    finally:
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    table: list[dict[str, Any]] = []
    for name, *_ in JOBS:
        row: dict[str, Any] = {"job": name}
        for server in ("gntdma", "nbdkit"):
            runs = results[name][server]
            row[server] = {k: sum(x[k] for x in runs) / len(runs) for k in ("mib_s", "iops")}
        row["ratio"] = row["gntdma"]["mib_s"] / max(row["nbdkit"]["mib_s"], 1e-9)
        table.append(row)
    if args.json:
        print(json.dumps({"seconds": args.seconds, "size_mb": args.size_mb,
                          "rounds": args.rounds, "jobs": table}, indent=2))
        return 0
    print(f"{'job':<20} {'gntdma MiB/s':>13} {'IOPS':>9} {'nbdkit MiB/s':>13} {'IOPS':>9} "
          f"{'ratio':>6}")
    for row in table:
        g, k = row["gntdma"], row["nbdkit"]
        print(f"{row['job']:<20} {g['mib_s']:13.1f} {g['iops']:9.0f} {k['mib_s']:13.1f} "
              f"{k['iops']:9.0f} {row['ratio']:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
