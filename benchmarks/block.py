"""Block benchmark: blkfront + blkback against direct preadv/pwritev on the same image.

Run: .venv/bin/python benchmarks/block.py [--seconds S] [--size-mb N]

For each workload (sequential 1 MiB and random 4 KiB, reads and writes, queue
depth 1 and 32) it measures the same I/O twice in one run: directly on the
image file with os.preadv/os.pwritev (the baseline; queue depth 32 is 32 OS
threads) and through a guest's blkfront, the grant tables and blkback (queue
depth 32 is 32 guest threads). It prints MiB/s, IOPS and the ratio
(through gntdma / direct). Targets: >= 0.8 for 1 MiB sequential and >= 0.3
for 4 KiB random at queue depth 32.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gntdma.dev.blkfront_io import xbd_read, xbd_write
from gntdma.sched import ThreadState
from gntdma.toolstack.domains import create_guest_from_config
from gntdma.toolstack.host import Host
from gntdma.toolstack.vbd import detach_disk
from gntdma.toolstack.xlcfg import parse_config

MiB = 1 << 20


_CACHE: dict[tuple[str, int, int, int], list[int]] = {}


def _offsets(kind: str, bs: int, size: int, n: int, seed: int) -> list[int]:
    """Offsets for one worker, computed once (outside the measured time)."""
    key = (kind, bs, size, seed)
    if key not in _CACHE:
        if kind == "seq":
            start = seed * 64 * bs
            _CACHE[key] = [(start + i * bs) % (size - bs + 1) // bs * bs for i in range(n)]
        else:
            rng = random.Random(seed)
            _CACHE[key] = [rng.randrange(size // bs) * bs for _ in range(n)]
    return _CACHE[key]


def _warm(kinds: list[tuple[str, str, int, int]], size: int) -> None:
    for kind, _op, bs, qd in kinds:
        for i in range(qd):
            _offsets(kind, bs, size, 4096, i)


def direct(path: Path, kind: str, op: str, bs: int, qd: int, size: int,
           seconds: float) -> tuple[float, int]:
    """(seconds, ios) of direct preadv/pwritev with ``qd`` OS threads."""
    fd = os.open(path, os.O_RDWR)
    buf = bytearray(os.urandom(bs))
    deadline = time.perf_counter() + seconds
    counts = [0] * qd

    def worker(i: int) -> None:
        offs = _offsets(kind, bs, size, 4096, i)
        b = bytearray(buf)
        n = 0
        while time.perf_counter() < deadline:
            off = offs[n % len(offs)]
            if op == "read":
                os.preadv(fd, [b], off)
            else:
                os.pwritev(fd, [b], off)
            n += 1
        counts[i] = n

    t0 = time.perf_counter()
    with ThreadPoolExecutor(qd) as ex:
        list(ex.map(worker, range(qd)))
    el = time.perf_counter() - t0
    os.close(fd)
    return el, sum(counts)


def through_gntdma(host: Host, sc: object, kind: str, op: str, bs: int, qd: int, size: int,
                   seconds: float) -> tuple[float, int]:
    """(seconds, ios) through blkfront with ``qd`` guest threads."""
    counts = [0] * qd
    data = os.urandom(bs)
    deadline = host.sched.now() + seconds

    def worker(i: int) -> None:
        offs = _offsets(kind, bs, size, 4096, i)
        n = 0
        while host.sched.now() < deadline:
            off = offs[n % len(offs)]
            if op == "read":
                err, _ = xbd_read(sc, off, bs)  # type: ignore[arg-type]
            else:
                err = xbd_write(sc, off, data)  # type: ignore[arg-type]
            assert err == 0, err
            n += 1
        counts[i] = n

    t0 = time.perf_counter()
    threads = [host.sched.spawn(worker, i, name=f"bench{i}") for i in range(qd)]
    host.sched.run(until=lambda: all(t.state is ThreadState.DONE for t in threads))
    return time.perf_counter() - t0, sum(counts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--size-mb", type=int, default=256)
    args = ap.parse_args()
    size = args.size_mb * MiB
    with tempfile.TemporaryDirectory(prefix="gntdma-bench-") as tmp:
        cfg = parse_config(
            f'name = "bench"\nmemory = 128\nmax_grant_frames = 64\n'
            f"disk = [ 'format=raw, vdev=xvda, access=rw, size={args.size_mb}M, "
            f"target=bench.img' ]\n", "<benchmark>")
        host = Host()
        guest, (vbd,) = create_guest_from_config(host, cfg, tmp)
        path = Path(tmp) / "bench.img"
        with open(path, "r+b") as f:  # fill it, so reads hit real data in the page cache
            for off in range(0, size, 8 * MiB):
                f.seek(off)
                f.write(os.urandom(8 * MiB))
        print(f"image {size >> 20} MiB, {args.seconds:g} s per measurement")
        print(f"{'workload':<26} {'direct MiB/s':>12} {'gntdma MiB/s':>12} "
              f"{'direct IOPS':>11} {'gntdma IOPS':>11} {'ratio':>6}")
        cases: list[tuple[str, str, int, int]] = [
            ("seq", "read", MiB, 1), ("seq", "write", MiB, 1),
            ("seq", "read", MiB, 32), ("seq", "write", MiB, 32),
            ("rand", "read", 4096, 1), ("rand", "write", 4096, 1),
            ("rand", "read", 4096, 32), ("rand", "write", 4096, 32),
        ]
        _warm(cases, size)
        run: Callable[..., tuple[float, int]] = through_gntdma
        for kind, op, bs, qd in cases:
            de, dn = direct(path, kind, op, bs, qd, size, args.seconds)
            ge, gn = run(host, vbd.sc, kind, op, bs, qd, size, args.seconds)
            d_iops, g_iops = dn / de, gn / ge
            label = f"{kind} {bs >> 10 if bs < MiB else bs >> 20}{'K' if bs < MiB else 'M'} " \
                    f"{op} qd{qd}"
            print(f"{label:<26} {d_iops * bs / MiB:12.1f} {g_iops * bs / MiB:12.1f} "
                  f"{d_iops:11.0f} {g_iops:11.0f} {g_iops / d_iops:6.3f}")
        detach_disk(host, vbd)
        host.destroy_guest(guest)
        host.close()


if __name__ == "__main__":
    main()
