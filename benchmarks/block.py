"""Block benchmark: blkfront + blkback against direct preadv/pwritev on the same image.

Run: .venv/bin/python benchmarks/block.py [--seconds S] [--rounds R] [--size-mb N] [--json]
     [--dma-debug on|off] [--junk-fill on|off] [--case TEXT ...]
     [--grants per-load|persistent|both] [--max-persistent-grants N]
     [--submit bio_done|threads]

For each workload (sequential 1 MiB and random 4 KiB, reads and writes, queue
depth 1 and 32) it measures the same I/O twice in one run: directly on the
image file with os.preadv/os.pwritev (the baseline; queue depth 32 is 32 OS
threads, each with its own buffer: Python has no asynchronous file I/O) and
through a guest's blkfront, the grant tables and blkback, in R rounds (3 by default) of direct and
gntdma alternately, so that a change of load on a shared machine touches both
sides of a ratio; the figures are those of the round of the median ratio (the
lower one of an even count) and each round's ratio is printed. It prints MiB/s, IOPS, the ratio
(through gntdma / direct), the target of the workloads that have one and
whether the ratio meets it. Targets (issue 14): 1 MiB sequential read and
write at queue depth 1 at least 0.15; 4 KiB random write at queue depth 32 at
least 0.3, random read at queue depth 32 at least 0.05.

Queue depth in the guest (``--submit``): by default one guest kernel thread
keeps N bios in flight, each handed to ``xbd_strategy`` with a ``bio_done``
callback, as GEOM and an asynchronous engine (fio's libaio or io_uring at
``iodepth=N``) drive a disk; slot i has a kernel buffer of its own and the
offsets of direct I/O's thread i. ``--submit threads`` measures N guest threads
instead, each doing its I/O in a kernel buffer of its own with
``xbd_read_buf``/``xbd_write_buf`` and sleeping in ``biowait`` until it is
done, as N processes doing synchronous I/O would: the same requests reach
blkfront, plus a sleep and a wakeup of a guest thread per I/O (about a third
of the cost of a 4 KiB persistent-grant I/O). The run prints which it used.

Kernels: both kernels (the guest's, which runs blkfront, and dom0's, which runs
blkback) boot without their debugging tunables (DMA-API debugging, junk fill on
free) by default, as production kernels do (Linux distributions build without
``CONFIG_DMA_API_DEBUG``; FreeBSD release kernels have no ``INVARIANTS`` and so
no UMA trashing): the targets measure the grant data path, not its debugging.
Tests, the explorer and ``gntdma run`` keep both on (issue 14, lever 1: "a
benchmark reports which it used"); ``--dma-debug on`` and ``--junk-fill on``
measure with them on. The table is preceded by the tunables each kernel used;
``--json`` prints the same figures as JSON after the table.

Grants: ``--grants per-load`` measures the disk as ``xl create`` attaches it
(per-load grants: each request's pages granted, mapped, unmapped and ended
around its transfer; ring order 2, 128 commands); ``--grants persistent`` a
second disk of the same guest on an image of the same size and content,
attached with persistent grants (blkif ``feature-persistent`` on both ends,
DESIGN 7); ``both`` (the default) measures both, each against direct I/O on
its own image measured just before it (the same offsets, so the same
page-cache pages: the host's write into a clean cached page costs about twice
one into a page already dirty, so a direct figure from the other image would
not be the same I/O), and says for each whether it meets the target. Both disks use the same
segments per request (256, what blkback advertises: a 1 MiB I/O is one
request); the persistent disk uses ring order 0 (32 commands, as many as
queue depth 32 needs, Linux blkfront's default) because its commands keep
their pages granted for life: at order 2, 128 commands x 256 pages would be
128 MiB of the 128 MiB guest (blkfront takes at most a quarter) and 128 x 257
references more than its 64 grant frames hold, so its requests would be cut
short. blkback keeps as many grants mapped as the frontend grants (32 x (256
+ 1 indirect page) = 8224; Linux xen-blkback's ``max_persistent_grants``
parameter, 1056 by default: ``--max-persistent-grants 1056`` measures that, where
a queue-depth-1 stream turning over the 32 commands finds 1 grant in 8 mapped).
The table gives each disk's ring requests per I/O and segments per request.

A run ends as a test host's teardown does: with DMA-API debugging's reports (when
on), WITNESS's reports or anything left once the disks and the guest are gone,
it prints them and ends 1, its figures not to be used.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final, cast

from bench_args import (
    check_space,
    nonnegative_int,
    positive_float,
    positive_int,
    remove_on_signal,
)

from gntdma.dev.blkfront import xbd_softc
from gntdma.dev.blkfront_cmd import XBD_INDIRECT_SEGS_TO_PAGES
from gntdma.dev.blkfront_io import xbd_read_buf, xbd_write_buf
from gntdma.sched import ThreadState, msleep, mtx_destroy, mtx_init, mtx_lock, mtx_unlock, wakeup
from gntdma.sys import BIO_READ, BIO_WRITE, M_TEMP, M_WAITOK, Kernel, KernelTunables, bio
from gntdma.toolstack.domains import create_guest_from_config
from gntdma.toolstack.host import Host
from gntdma.toolstack.vbd import Vbd, attach_disk, detach_disk
from gntdma.toolstack.xlcfg import parse_config, parse_disk_spec

MiB: Final = 1 << 20
#: The grant modes ``--grants`` chooses from, in the order they are measured.
MODES: Final = ("per-load", "persistent")

#: (kind, op, block size, queue depth) -> the ratio to reach (issue 14).
TARGETS: Final[dict[tuple[str, str, int, int], float]] = {
    ("seq", "read", MiB, 1): 0.15,
    ("seq", "write", MiB, 1): 0.15,
    ("rand", "write", 4096, 32): 0.3,
    ("rand", "read", 4096, 32): 0.05,
}

CASES: Final[list[tuple[str, str, int, int]]] = [
    ("seq", "read", MiB, 1), ("seq", "write", MiB, 1),
    ("seq", "read", MiB, 32), ("seq", "write", MiB, 32),
    ("rand", "read", 4096, 1), ("rand", "write", 4096, 1),
    ("rand", "read", 4096, 32), ("rand", "write", 4096, 32),
]

_CACHE: dict[tuple[str, int, int, int], list[int]] = {}


def offsets(kind: str, bs: int, size: int, n: int, seed: int) -> list[int]:
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
            offsets(kind, bs, size, 4096, i)


def label(kind: str, op: str, bs: int, qd: int) -> str:
    unit = f"{bs >> 20}M" if bs >= MiB else f"{bs >> 10}K"
    return f"{kind} {unit} {op} qd{qd}"


def direct(path: Path, kind: str, op: str, bs: int, qd: int, size: int,
           seconds: float) -> tuple[float, int]:
    """(seconds, ios) of direct preadv/pwritev with ``qd`` OS threads."""
    fd = os.open(path, os.O_RDWR)
    buf = bytearray(os.urandom(bs))
    deadline = time.perf_counter() + seconds
    counts = [0] * qd

    def worker(i: int) -> None:
        offs = offsets(kind, bs, size, 4096, i)
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


def through_gntdma(host: Host, sc: xbd_softc, kind: str, op: str, bs: int, qd: int,
                   size: int, seconds: float) -> tuple[float, int]:
    """(seconds, ios) through blkfront with ``qd`` guest threads, each in its own buffer
    and doing one I/O at least (a worker started after the deadline on a loaded machine
    would make a figure of no I/O, and a ratio of nothing)."""
    counts = [0] * qd
    failed: list[str] = []
    kern = sc.xbd_kern
    data = os.urandom(bs)
    deadline = host.sched.now() + seconds

    def worker(i: int) -> None:
        offs = offsets(kind, bs, size, 4096, i)
        va = kern.malloc(bs, M_TEMP, M_WAITOK)
        kern.kva_write(va, data)
        io = xbd_read_buf if op == "read" else xbd_write_buf
        n = 0
        # One I/O at least (never 0 IOPS); none after another thread's failed.
        while (n == 0 or host.sched.now() < deadline) and not failed:
            off = offs[n % len(offs)]
            err = io(sc, off, va, bs)
            if err != 0:  # the others finish their I/O; the run then fails
                failed.append(f"{op} of {bs} bytes at {off}: error {err}")
                break
            n += 1
        kern.free(va, M_TEMP)
        counts[i] = n

    t0 = time.perf_counter()
    threads = [host.sched.spawn(worker, i, name=f"bench{i}") for i in range(qd)]
    host.sched.run(until=lambda: all(t.state is ThreadState.DONE for t in threads))
    for t in threads:
        if t.exc is not None:
            raise t.exc
    if failed:
        raise AssertionError(failed[0])
    return time.perf_counter() - t0, sum(counts)


def through_bio_done(host: Host, sc: xbd_softc, kind: str, op: str, bs: int, qd: int,
                     size: int, seconds: float) -> tuple[float, int]:
    """(seconds, ios) through blkfront with ``qd`` bios in flight from one guest thread.

    The way GEOM and an asynchronous engine (fio's libaio, io_uring) drive a
    disk: each bio is handed to ``xbd_strategy`` with a ``bio_done`` callback;
    the callback (blkfront's interrupt thread, under the driver's lock, as
    FreeBSD's ``g_disk_done``) only queues the bio for the submitting thread and
    wakes it, as ``g_io_deliver`` queues for ``g_up``; the thread checks each
    done bio's error and sends the slot's next I/O in a new bio. Slot ``i``
    keeps its own kernel buffer and goes through ``offsets(..., i)``, the
    offsets direct I/O's thread ``i`` and ``through_gntdma``'s thread ``i``
    use; each slot does one I/O at least. A failed bio stops the sending; the
    bios in flight are waited for and the run then fails."""
    kern = sc.xbd_kern
    data = os.urandom(bs)
    cmd = BIO_READ if op == "read" else BIO_WRITE
    ios = [0]
    failed: list[str] = []

    def submitter() -> None:
        lock = mtx_init("bench done")
        done: list[bio] = []  # the wait channel too

        def bio_done(bp: bio) -> None:
            mtx_lock(lock)
            done.append(bp)
            wakeup(done)
            mtx_unlock(lock)

        offs = [offsets(kind, bs, size, 4096, i) for i in range(qd)]
        bufs = [kern.malloc(bs, M_TEMP, M_WAITOK) for _ in range(qd)]
        for va in bufs:
            kern.kva_write(va, data)
        sent = [1] * qd
        for i in range(qd):
            sc.xbd_strategy(bio(bio_cmd=cmd, bio_offset=offs[i][0], bio_bcount=bs,
                                bio_data=bufs[i], bio_done=bio_done, bio_caller1=i))
        deadline = host.sched.now() + seconds
        n = 0
        in_flight = qd
        while in_flight:
            mtx_lock(lock)
            while not done:
                msleep(done, lock, "bench")
            got = done[:]
            done.clear()
            mtx_unlock(lock)
            more = host.sched.now() < deadline
            for bp in got:
                if bp.bio_error != 0:
                    failed.append(f"{op} of {bs} bytes at {bp.bio_offset}: error "
                                  f"{bp.bio_error}")
                    more = False
                else:
                    n += 1
                if not more or failed:
                    in_flight -= 1
                    continue
                i = cast(int, bp.bio_caller1)
                k = sent[i]
                sent[i] = k + 1
                o = offs[i]
                sc.xbd_strategy(bio(bio_cmd=cmd, bio_offset=o[k % len(o)], bio_bcount=bs,
                                    bio_data=bufs[i], bio_done=bio_done, bio_caller1=i))
        for va in bufs:
            kern.free(va, M_TEMP)
        mtx_destroy(lock)
        ios[0] = n

    t0 = time.perf_counter()
    t = host.sched.spawn(submitter, name="bench")
    host.sched.run(until=lambda: t.state is ThreadState.DONE)
    if t.exc is not None:
        raise t.exc
    if failed:
        raise AssertionError(failed[0])
    return time.perf_counter() - t0, ios[0]


#: ``--submit``: how the guest keeps its queue depth of I/O in flight.
SUBMIT: Final = {"bio_done": through_bio_done, "threads": through_gntdma}
SUBMIT_TEXT: Final = {
    "bio_done": "queue depth N is N bios in flight from one guest thread (bio_done)",
    "threads": "queue depth N is N guest threads, each waiting for its bio (biowait)",
}


@dataclass(frozen=True, slots=True)
class Figure:
    """One workload's figures in one grant mode."""

    workload: str
    kind: str
    op: str
    block_size: int
    queue_depth: int
    grants: str  #: "per-load" or "persistent"
    image: str  #: the image file both the direct and the gntdma figure used
    requests_per_io: float  #: ring requests blkback served per I/O
    segments_per_request: float
    direct_mib_s: float
    gntdma_mib_s: float
    direct_iops: float
    gntdma_iops: float
    ratio: float
    target: float | None  #: the ratio to reach, None if the workload has none
    result: str  #: "pass", "miss" or "-" (no target)
    #: Each round's ratio, in order; the figures above are the median round's.
    round_ratios: list[float]


def served(disk: Vbd) -> tuple[int, int]:
    """The read and write requests blkback has served on ``disk`` and their segments."""
    st = disk.blkback.statistics()
    reqs = sum(n for op, n in st.requests_by_op.items() if op in ("read", "write", "indirect"))
    return reqs, st.segments


def fill(path: Path, size: int) -> None:
    """Write random data over the image, so that reads hit real data in the page cache."""
    with open(path, "r+b") as f:
        for off in range(0, size, 8 * MiB):
            f.seek(off)
            f.write(os.urandom(min(8 * MiB, size - off)))


def tunables_of(kern: Kernel) -> dict[str, object]:
    """What the benchmark reports of a kernel's debugging tunables."""
    return {"sysctls": kern.tunables.sysctls(), "describe": kern.tunables.describe()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=positive_float, default=2.0)
    ap.add_argument("--size-mb", type=positive_int, default=256)
    ap.add_argument("--dma-debug", choices=("on", "off"), default="off",
                    help="DMA-API debugging in the guest's and dom0's kernels (default off)")
    ap.add_argument("--junk-fill", choices=("on", "off"), default="off",
                    help="junk fill on free in the guest's and dom0's kernels (default off)")
    ap.add_argument("--case", action="append", default=[],
                    help="run only workloads whose name contains TEXT (repeatable)")
    ap.add_argument("--grants", choices=(*MODES, "both"), default="both",
                    help="per-load grants, persistent grants, or both (default)")
    ap.add_argument("--max-persistent-grants", type=nonnegative_int, default=None,
                    help="blkback's persistent grant table of the persistent disk "
                         "(Linux's max_persistent_grants, 0 keeps none; default: the "
                         "frontend's grants)")
    ap.add_argument("--rounds", type=positive_int, default=3,
                    help="measurements of each workload, direct and through gntdma "
                         "alternately; the figures are the median round's (default 3)")
    ap.add_argument("--submit", choices=tuple(SUBMIT), default="bio_done",
                    help="the guest's queue depth: bios in flight from one thread with "
                         "bio_done callbacks (default), or one thread per I/O in biowait")
    ap.add_argument("--json", action="store_true", help="the figures as JSON too")
    args = ap.parse_args()
    through = SUBMIT[args.submit]
    modes = MODES if args.grants == "both" else (args.grants,)
    size = args.size_mb * MiB
    cases = [c for c in CASES
             if not args.case or any(t in label(*c) for t in args.case)]
    if not cases:
        ap.error(f"no workload matches {args.case}")
    if args.max_persistent_grants is not None and "persistent" not in modes:
        ap.error("--max-persistent-grants: only with the persistent disk "
                 "(--grants persistent or both)")
    check_space(ap, "--size-mb", size * len(modes))
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="gntdma-bench-") as tmp:
        remove_on_signal(tmp)
        cfg = parse_config(
            f'name = "bench"\nmemory = 128\nmax_grant_frames = 64\n'
            f"dma_debug = {int(args.dma_debug == 'on')}\n"
            f"junk_fill = {int(args.junk_fill == 'on')}\n"
            f"disk = [ 'format=raw, vdev=xvda, access=rw, size={args.size_mb}M, "
            f"target=bench.img' ]\n", "<benchmark>")
        host = Host()
        host.dom0.kernel.set_tunables(KernelTunables(
            dma_debug=args.dma_debug == "on", junk_divisor=int(args.junk_fill == "on")))
        guest, (vbd,) = create_guest_from_config(host, cfg, tmp)
        path = Path(tmp) / "bench.img"
        fill(path, size)
        disks: dict[str, Vbd] = {"per-load": vbd}
        images = {"per-load": path, "persistent": Path(tmp) / "bench-persistent.img"}
        if "persistent" in modes:
            spec = parse_disk_spec(f"format=raw, vdev=xvdb, access=rw, size={args.size_mb}M, "
                                   "target=bench-persistent.img")
            disks["persistent"] = attach_disk(host, guest, spec, image_dir=tmp,
                                              ring_page_order=0, persistent=True)
            assert disks["persistent"].frontend.persistent_used
            psc = disks["persistent"].sc
            segs = psc.xbd_max_request_segments
            disks["persistent"].blkback.max_persistent_grants = (
                args.max_persistent_grants if args.max_persistent_grants is not None
                else len(psc.xbd_shadow) * (segs + XBD_INDIRECT_SEGS_TO_PAGES(segs)))
            fill(images["persistent"], size)
        tunables = {"guest": tunables_of(guest.kernel), "dom0": tunables_of(host.dom0.kernel)}
        print(f"image {size >> 20} MiB, {args.seconds:g} s per measurement, {args.rounds} "
              "rounds (direct and gntdma alternately; the figures are the median round's)")
        for who, t in tunables.items():
            print(f"kernel tunables, {who}: {t['describe']} {t['sysctls']}")
        print("targets (ratio to direct): " + ", ".join(
            f"{label(*c)} >= {v:g}" for c, v in TARGETS.items()))
        setup = {m: {"ring_page_order": d.sc.xbd_ring_page_order,
                     "commands": len(d.sc.xbd_shadow),
                     "segments_per_request_max": d.sc.xbd_max_request_segments,
                     "blkback_max_persistent_grants": (d.blkback.max_persistent_grants
                                                       if m == "persistent" else None)}
                 for m, d in disks.items() if m in modes}
        print(f"guest submission: {SUBMIT_TEXT[args.submit]}")
        print(f"grants: {', '.join(modes)}; " + "; ".join(
            f"{m}: ring order {d.sc.xbd_ring_page_order}, {len(d.sc.xbd_shadow)} commands, "
            f"{d.sc.xbd_max_request_segments} segments per request at most"
            + (f", blkback keeps {d.blkback.max_persistent_grants} grants mapped at most"
               if m == "persistent" else "") for m, d in disks.items() if m in modes))
        print(f"{'workload':<20} {'grants':<10} {'direct MiB/s':>12} {'gntdma MiB/s':>12} "
              f"{'direct IOPS':>11} {'gntdma IOPS':>11} {'ratio':>6} {'target':>6} result "
              f"{'reqs/io':>7} {'segs/req':>8} rounds' ratios")
        _warm(cases, size)
        for kind, op, bs, qd in cases:
            for mode in modes:
                # Each disk against direct I/O on its own image just before: the same
                # offsets, so the same page-cache pages (a write dirtying a clean page
                # costs the host twice one over a dirty page).
                runs: list[tuple[float, float, float, float, float]] = []
                for _ in range(args.rounds):
                    de, dn = direct(images[mode], kind, op, bs, qd, size, args.seconds)
                    r0, s0 = served(disks[mode])
                    ge, gn = through(host, disks[mode].sc, kind, op, bs, qd, size,
                                     args.seconds)
                    r1, s1 = served(disks[mode])
                    runs.append((gn / ge / (dn / de), dn / de, gn / ge,
                                 (r1 - r0) / max(1, gn), (s1 - s0) / max(1, r1 - r0)))
                # The round of the median ratio (the lower one of an even count).
                ratio, d_iops, g_iops, reqs_io, segs_req = sorted(runs)[(len(runs) - 1) // 2]
                target = TARGETS.get((kind, op, bs, qd))
                result = "-" if target is None else ("pass" if ratio >= target else "miss")
                fig = Figure(label(kind, op, bs, qd), kind, op, bs, qd, mode, images[mode].name,
                             reqs_io, segs_req, d_iops * bs / MiB, g_iops * bs / MiB, d_iops,
                             g_iops, ratio, target, result, [r[0] for r in runs])
                figures.append(fig)
                tgt = "-" if target is None else f"{target:g}"
                print(f"{fig.workload:<20} {mode:<10} {fig.direct_mib_s:12.1f} "
                      f"{fig.gntdma_mib_s:12.1f} {d_iops:11.0f} {g_iops:11.0f} {ratio:6.3f} "
                      f"{tgt:>6} {result:<6} {fig.requests_per_io:7.2f} "
                      f"{fig.segments_per_request:8.1f} "
                      f"{min(fig.round_ratios):.3f}-{max(fig.round_ratios):.3f}")
        # What a test host's teardown asserts: DMA-API debugging's reports (with it
        # on), WITNESS's, and nothing left once the disks and the guest are gone.
        problems = [f"{guest.name}: DMA-API debugging: {r.format()}"
                    for r in guest.kernel.dma_debug.reports()]
        problems += [f"WITNESS: {r.format()}" for r in host.sched.witness.reports]
        for d in reversed(disks.values()):
            detach_disk(host, d)
        host.destroy_guest(guest)
        host.sched.yield_()
        problems += [f"leak: {x}" for x in host.leaks()]
        host.close()
    if problems:
        print("\n".join(["the run went wrong; its figures are not to be used:",
                         *problems]), file=sys.stderr)
        sys.exit(1)
    met: dict[str, int] = {}
    for mode in modes:
        with_target = [f for f in figures if f.target is not None and f.grants == mode]
        met[mode] = sum(f.result == "pass" for f in with_target)
        print(f"targets met with {mode} grants: {met[mode]} of {len(with_target)}")
    if args.json:
        print(json.dumps({"seconds": args.seconds, "rounds": args.rounds,
                          "size_mb": args.size_mb, "submit": args.submit,
                          "grants": list(modes), "kernel_tunables": tunables,
                          "disks": setup,
                          "workloads": [asdict(f) for f in figures],
                          "targets_met": met,
                          "targets": sum(c in TARGETS for c in cases)}, indent=2))


if __name__ == "__main__":
    main()
