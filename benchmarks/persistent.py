"""Persistent grants benchmark: per-load grants against persistent grants, one run.

Run: .venv/bin/python benchmarks/persistent.py [--seconds S] [--size-mb N]
     [--ring-page-order O] [--memory-mb M] [--max-persistent-grants N]
     [--case TEXT ...] [--submit bio_done|threads] [--json]

The workloads of ``benchmarks/block.py`` that have a target (1 MiB sequential
read and write at queue depth 1, 4 KiB random read and write at queue depth 32)
run through one guest's blkfront, the grant tables and blkback, on two disks
of the guest (two images of the same size and kind), alternating in one
process: with per-load grants (the data maps
grant and end every segment on each request, blkback maps and unmaps them
around each transfer) and with persistent grants (blkif ``feature-persistent``
on both ends: the data maps copy through pages granted once, blkback keeps
them mapped). Queue depth 32 is as block.py's ``--submit`` makes it: by default
32 bios in flight from one guest thread (``bio_done``), with ``--submit
threads`` 32 guest threads each waiting in ``biowait``; each slot does its I/O
in a kernel buffer of its own. Both disks use the same ring order (default 0, one
page and 32 commands, as Linux's blkfront default), so the comparison is one
of the grant life cycle only. It prints MiB/s, IOPS and the ratio
(persistent / per-load) of each workload (no target: a comparison), the ring requests
each I/O took and their segments (blkfront splits an I/O into requests of at most
the segments it negotiated: with persistent grants, those every command's pages
can hold within the guest's grant table and a quarter of its memory, as Linux's
``blkfront_setup_indirect`` sizes them whatever blkback keeps mapped: 256, as
the per-load disk, at ring order 0 in a 256 MiB guest), and, with ``--json``,
the same figures as JSON after the table. blkback keeps as many grants mapped
as the frontend grants (commands x (segments + indirect pages)), or
``--max-persistent-grants`` (Linux xen-blkback's ``max_persistent_grants``,
1056 by default there; the grants beyond it are mapped per request). A ring
order whose commands cannot hold even 11 persistent segments each negotiates
no persistent grants: the benchmark says so and ends with status 2. The guest's
debugging tunables (DMA-API debugging, junk fill) are those of a default guest.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

from bench_args import (
    check_space,
    nonnegative_int,
    positive_float,
    positive_int,
    remove_on_signal,
)
from block import SUBMIT, SUBMIT_TEXT, offsets, tunables_of

from gntdma.dev.blkback import Blkback
from gntdma.dev.blkback_xenbus import xbb_attach
from gntdma.dev.blkfront_cmd import XBD_INDIRECT_SEGS_TO_PAGES
from gntdma.dev.blkfront_xenbus import XbdXenbus, xbd_attach
from gntdma.host.image import DiskImage
from gntdma.toolstack.host import Guest, Host
from gntdma.xen.xenbus import XenbusState

MiB: Final = 1 << 20
DEVID: Final = 51712
#: (kind, op, block size, queue depth): the workloads of block.py with a target.
CASES: Final[list[tuple[str, str, int, int]]] = [
    ("seq", "read", MiB, 1), ("seq", "write", MiB, 1),
    ("rand", "read", 4096, 32), ("rand", "write", 4096, 32),
]


def label(kind: str, op: str, bs: int, qd: int) -> str:
    unit = f"{bs >> 20}M" if bs >= MiB else f"{bs >> 10}K"
    return f"{kind} {unit} {op} qd{qd}"


@dataclass
class Disk:
    """One attached disk: its image, backend and frontend."""

    img: DiskImage
    bb: Blkback
    front: XbdXenbus
    dirs: object

    def close(self, host: Host) -> None:
        from gntdma.toolstack.xs import DeviceDirs

        assert isinstance(self.dirs, DeviceDirs)
        host.xenstore.remove_device(self.dirs, timeout=10.0)
        self.front.wait_done(10.0)
        self.img.close()


def attach(host: Host, g: Guest, path: Path, devid: int, persistent: bool,
           ring_page_order: int, max_persistent_grants: int | None = None) -> Disk:
    """Attach a disk and wait until it is connected; with persistent grants, blkback
    keeps ``max_persistent_grants`` mapped at most (None: as many as the frontend
    grants)."""
    img = DiskImage.open(path)
    bb = Blkback(host.dom0.hc, host.dom0.kernel, g.domid, img, devid=devid)
    bb.feature_persistent = persistent
    dirs = host.xenstore.add_device(g.domid, 0, "vbd", devid)
    assert host.dom0.xenstore is not None and g.xenstore is not None
    error, back = xbb_attach(host.dom0.xenstore, host.dom0.kernel, bb)
    assert error == 0 and back is not None, error
    error, front = xbd_attach(g.kernel, g.hc, g.gnttab, g.xenstore, devid,
                              ring_page_order=ring_page_order, persistent=persistent)
    assert error == 0 and front is not None, error
    connected = {XenbusState.Connected}
    if (front.wait_state(connected, 10.0) != (0, XenbusState.Connected)
            or back.wait_state(connected, 10.0) != (0, XenbusState.Connected)):
        raise SystemExit(f"persistent.py: a disk of the {g.name} guest did not connect "
                         f"(frontend: {front.error or front.state.name}; backend: "
                         f"{back.error or back.state.name}); --memory-mb too small?")
    if front.persistent_used is not persistent:
        raise SystemExit(f"persistent.py: ring order {ring_page_order}: blkfront did not use "
                         f"persistent grants (xbd_persistent_segments: its "
                         f"{front.sc.xbd_ring.nr_ents if front.sc.xbd_ring else 0} commands "
                         f"cannot each hold 11 persistent segments within the grant budget)")
    sc = front.sc
    segs = sc.xbd_max_request_segments
    bb.max_persistent_grants = (max_persistent_grants if max_persistent_grants is not None
                                else len(sc.xbd_shadow) * (segs
                                                           + XBD_INDIRECT_SEGS_TO_PAGES(segs)))
    return Disk(img, bb, front, dirs)


def measure(host: Host, disk: Disk, kind: str, op: str, bs: int, qd: int, size: int,
            seconds: float, submit: str = "bio_done") -> tuple[float, int]:
    """(seconds, ios) through blkfront with ``qd`` I/Os in flight, each slot in its own
    buffer (block.py's measurement with its ``--submit``, its offsets drawn before the
    measured time)."""
    for i in range(qd):
        offsets(kind, bs, size, 4096, i)
    return SUBMIT[submit](host, disk.front.sc, kind, op, bs, qd, size, seconds)


def requests_and_segments(disk: Disk) -> tuple[int, int]:
    """The read and write requests blkback has served on ``disk`` and their segments."""
    st = disk.bb.statistics()
    reqs = sum(n for op, n in st.requests_by_op.items() if op in ("read", "write", "indirect"))
    return reqs, st.segments


@dataclass(frozen=True, slots=True)
class Figure:
    workload: str
    kind: str
    op: str
    block_size: int
    queue_depth: int
    per_load_mib_s: float
    persistent_mib_s: float
    per_load_iops: float
    persistent_iops: float
    ratio: float  #: persistent / per-load
    per_load_requests_per_io: float  #: ring requests per I/O
    persistent_requests_per_io: float
    per_load_segments_per_request: float
    persistent_segments_per_request: float


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=positive_float, default=2.0, help="per measurement")
    ap.add_argument("--rounds", type=positive_int, default=2,
                    help="alternations of the two modes per workload (default 2)")
    ap.add_argument("--size-mb", type=positive_int, default=256)
    ap.add_argument("--memory-mb", type=positive_int, default=256, help="the guest's memory")
    ap.add_argument("--ring-page-order", type=int, default=0, choices=range(5))
    ap.add_argument("--max-persistent-grants", type=nonnegative_int, default=None,
                    help="blkback's persistent grant table (Linux's max_persistent_grants, "
                         "0 keeps none; default: the frontend's grants)")
    ap.add_argument("--case", action="append", default=[],
                    help="run only workloads whose name contains TEXT (repeatable)")
    ap.add_argument("--submit", choices=tuple(SUBMIT), default="bio_done",
                    help="the guest's queue depth, as block.py's --submit (default bio_done)")
    ap.add_argument("--json", action="store_true", help="the figures as JSON too")
    args = ap.parse_args()
    size = args.size_mb * MiB
    cases = [c for c in CASES if not args.case or any(t in label(*c) for t in args.case)]
    if not cases:
        ap.error(f"no workload matches {args.case}")
    check_space(ap, "--size-mb", 2 * size)
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="gntdma-bench-") as tmp:
        remove_on_signal(tmp)
        paths = [Path(tmp) / f"bench{i}.img" for i in range(2)]
        for path in paths:
            DiskImage.create(path, size).close()
            with open(path, "r+b") as f:  # real data, so reads hit the page cache
                for off in range(0, size, 8 * MiB):
                    f.seek(off)
                    f.write(os.urandom(8 * MiB))
        host = Host()
        g = host.create_guest("bench", memory_mb=args.memory_mb)
        try:
            disks = {mode: attach(host, g, paths[i], DEVID + 16 * i, mode == "persistent",
                                  args.ring_page_order, args.max_persistent_grants)
                     for i, mode in enumerate(("per-load", "persistent"))}
        except SystemExit as e:  # a disk that cannot work with these options: usage error
            ap.error(str(e).removeprefix("persistent.py: "))
        setup = {"segments_per_request_max":
                 disks["persistent"].front.sc.xbd_max_request_segments,
                 "blkback_max_persistent_grants": disks["persistent"].bb.max_persistent_grants,
                 "kernel_tunables": {"guest": tunables_of(g.kernel),
                                     "dom0": tunables_of(host.dom0.kernel)}}
        print(f"image {args.size_mb} MiB, guest {args.memory_mb} MiB, ring order "
              f"{args.ring_page_order}, {args.seconds:g} s per measurement, "
              f"{args.rounds} alternating round(s) per mode, "
              f"{disks['persistent'].front.sc.xbd_max_request_segments} segments per "
              f"persistent request at most, blkback keeps "
              f"{disks['persistent'].bb.max_persistent_grants} persistent grants mapped at "
              f"most; kernel tunables, guest: "
              f"{g.kernel.tunables.describe()}, dom0: {host.dom0.kernel.tunables.describe()}")
        print(f"guest submission: {SUBMIT_TEXT[args.submit]}")
        print("no target: a comparison of persistent and per-load grants (ratio = "
              "persistent / per-load; block.py's targets are ratios to direct I/O)")
        print(f"{'workload':<20} {'per-load MiB/s':>14} {'persist MiB/s':>14} "
              f"{'per-load IOPS':>13} {'persist IOPS':>13} {'ratio':>6} "
              f"{'reqs/io (l/p)':>13} {'segs/req (l/p)':>14}")
        for kind, op, bs, qd in cases:
            totals = {mode: [0.0, 0] for mode in disks}
            served = {mode: [0, 0] for mode in disks}  # requests, segments
            for _ in range(args.rounds):
                for mode, disk in disks.items():
                    r0, s0 = requests_and_segments(disk)
                    el, n = measure(host, disk, kind, op, bs, qd, size, args.seconds,
                                    args.submit)
                    r1, s1 = requests_and_segments(disk)
                    totals[mode][0] += el
                    totals[mode][1] += int(n)
                    served[mode][0] += r1 - r0
                    served[mode][1] += s1 - s0
            iops = {m: t[1] / t[0] for m, t in totals.items()}
            per_io = {m: served[m][0] / max(1, totals[m][1]) for m in disks}
            per_req = {m: served[m][1] / max(1, served[m][0]) for m in disks}
            fig = Figure(label(kind, op, bs, qd), kind, op, bs, qd,
                         iops["per-load"] * bs / MiB, iops["persistent"] * bs / MiB,
                         iops["per-load"], iops["persistent"],
                         iops["persistent"] / iops["per-load"],
                         per_io["per-load"], per_io["persistent"],
                         per_req["per-load"], per_req["persistent"])
            figures.append(fig)
            reqs = f"{fig.per_load_requests_per_io:.2f}/{fig.persistent_requests_per_io:.2f}"
            segs = (f"{fig.per_load_segments_per_request:.1f}/"
                    f"{fig.persistent_segments_per_request:.1f}")
            print(f"{fig.workload:<20} {fig.per_load_mib_s:14.1f} {fig.persistent_mib_s:14.1f} "
                  f"{fig.per_load_iops:13.0f} {fig.persistent_iops:13.0f} {fig.ratio:6.3f} "
                  f"{reqs:>13} {segs:>14}")
        stats = {m: d.bb.statistics() for m, d in disks.items()}
        for m, st in stats.items():
            print(f"{m}: blkback mapped {st.segments_mapped} grants for {st.segments} "
                  f"segments, {st.mapped_now} mapped now")
        for d in disks.values():
            d.close(host)
        host.destroy_guest(g)
        host.close()
    if args.json:
        print(json.dumps({"target": None, "seconds": args.seconds, "rounds": args.rounds,
                          "size_mb": args.size_mb, "memory_mb": args.memory_mb,
                          "submit": args.submit,
                          "ring_page_order": args.ring_page_order,
                          **setup,
                          "workloads": [asdict(f) for f in figures],
                          "grant_maps": {m: {"segments": s.segments,
                                             "segments_mapped": s.segments_mapped,
                                             "mapped_now": s.mapped_now}
                                         for m, s in stats.items()}}, indent=2))


if __name__ == "__main__":
    main()
