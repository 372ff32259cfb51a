"""Scale benchmark: a thousand guests in one process, then every object given back.

Run: .venv/bin/python benchmarks/scale.py [--guests N] [--json] [--profile FILE]

One :class:`~gntdma.toolstack.host.Host`; N guests (default 1000) created one
after the other as ``xl create`` does (:func:`create_guest_from_config`), each
with two sparse raw disks of 64 MiB in a temporary directory the benchmark
makes and removes. Each disk, once connected, does one verified I/O: a
pattern written through blkfront, read back and compared. All N guests live
together; then they are destroyed (disks unplugged, domains gone).

Printed:

- the time to create a guest (domain, kernel, both disks connected, both
  verified I/Os), at guest 10 and guest N, each the average of a window of
  guests (6-15 and the last ten), and their ratio (target <= 1.5: creating a
  guest must not cost more as the host fills);
- after every guest is destroyed, what is still held against the start (the
  host with dom0, after one warm-up guest created and destroyed): kernel
  threads (the scheduler's and ``gc``'s count of KThread objects), greenlets
  (``gc`` objects of greenlet type), domains, hypervisor grant tables, event
  channels, dom0's free pages, xenstore nodes and watches, and the bytes
  ``tracemalloc`` traces (``--no-tracemalloc`` to time without it);
- the process's RSS now and its peak (``/proc/self/status`` VmRSS, VmHWM).

A figure, not a test; ``tests/toolstack/test_scale.py`` is the small, fast
version that asserts release and linear cost.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import pstats
import signal
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import greenlet
from bench_args import check_output, positive_int

from gntdma.dev.blkfront_io import xbd_read, xbd_write
from gntdma.sched import WITNESS
from gntdma.toolstack.domains import create_guest_from_config, destroy_guest
from gntdma.toolstack.host import Guest, Host
from gntdma.toolstack.vbd import Vbd
from gntdma.toolstack.xlcfg import parse_config

SECT = 512
CONNECT_TIMEOUT = 300.0
#: Types whose live instances are counted with ``gc`` (by class name).
KERNEL_TYPES = ("KThread", "Domain", "GrantTable", "Maptrack", "EventPort", "PortHandler",
                "Kernel", "GntTab", "Blkback", "xbd_softc", "DomainRing", "XenStore",
                "DiskImage")


def config(i: int, memory: int, disk_mb: int) -> str:
    return (f'name = "g{i}"\nmemory = {memory}\n'
            f"disk = [ 'format=raw, vdev=xvda, access=rw, size={disk_mb}M, target=g{i}a.img',\n"
            f"         'format=raw, vdev=xvdb, access=rw, size={disk_mb}M, target=g{i}b.img' ]\n")


def verified_io(host: Host, vbd: Vbd, i: int) -> None:
    """Write a pattern near the disk's end, read it back, compare."""
    pattern = (i.to_bytes(4, "little") + vbd.vdev.encode().ljust(4, b"\0")) * (8 * SECT // 8)
    off = vbd.image.size - 64 * SECT

    def io() -> None:
        error = xbd_write(vbd.sc, off, pattern)
        if error != 0:
            raise RuntimeError(f"g{i} {vbd.vdev}: write failed: {error}")
        error, got = xbd_read(vbd.sc, off, len(pattern))
        if error != 0 or got != pattern:
            raise RuntimeError(f"g{i} {vbd.vdev}: read back {error}, data differs")

    host.sched.call(io, name=f"io/g{i}/{vbd.vdev}")


def create(host: Host, i: int, memory: int, disk_mb: int, tmp: Path
           ) -> tuple[Guest, list[Vbd]]:
    cfg = parse_config(config(i, memory, disk_mb), f"<g{i}>")
    # A generous connect timeout: on a loaded machine a full gc pass of a large heap
    # can take longer than libxl's 10 s, and the figure is the cost, not the timeout.
    guest, vbds = create_guest_from_config(host, cfg, tmp, timeout=CONNECT_TIMEOUT)
    for vbd in vbds:
        verified_io(host, vbd, i)
    return guest, vbds


def kernel_objects() -> dict[str, int]:
    """Live objects of the kernel's types and greenlets, counted with ``gc``."""
    gc.collect()
    names = Counter(type(o).__name__ for o in gc.get_objects())
    out = {k: names.get(k, 0) for k in KERNEL_TYPES}
    main = greenlet.getcurrent()  # the scheduler's hub, kept for the process's life
    out["greenlet"] = sum(1 for o in gc.get_objects()
                          if isinstance(o, greenlet.greenlet) and o is not main)
    return out


def host_objects(host: Host) -> dict[str, int]:
    """What the host's own tables hold."""
    xsd = host.xenstored.statistics()
    dom0 = host.hv.domains[0]
    return {
        "live threads": host.sched.statistics().live_threads,
        "domains": len(host.hv.domains),
        "dom0 ports": len(dom0.ports),
        "dom0 maptrack": len(dom0.maptrack.entries),
        "dom0 free pages": host.dom0.kernel.vm.nfree,
        "xenstore nodes": xsd.nodes,
        "xenstore watches": xsd.watches,
        "xenstore connections": xsd.connections,
    }


def rss() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


#: [start of the pass under way, seconds in gc, full collections]
_gc_time = [0.0, 0.0, 0]


def _gc_timer(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _gc_time[0] = time.perf_counter()
    else:
        _gc_time[1] += time.perf_counter() - _gc_time[0]
        _gc_time[2] += info["generation"] == 2


def window(times: list[float], first: int, last: int) -> float:
    """Average of guests ``first``..``last`` (1-based, inclusive)."""
    part = times[first - 1:last]
    return sum(part) / len(part)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--guests", type=positive_int, default=1000)
    ap.add_argument("--memory", type=positive_int, default=16, help="MiB per guest (default 16)")
    ap.add_argument("--disk-mb", type=positive_int, default=64)
    ap.add_argument("--json", action="store_true", help="the figures as JSON")
    ap.add_argument("--no-tracemalloc", action="store_true")
    ap.add_argument("--profile", metavar="FILE", help="cProfile the creations into FILE")
    args = ap.parse_args()
    n = args.guests
    if n < 20:
        ap.error("--guests must be at least 20 (two windows of ten)")
    if args.profile is not None:
        check_output(ap, "--profile", args.profile)
    # SIGTERM ends the run through the same unwinding as an error: images removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if not args.no_tracemalloc:
        tracemalloc.start()
    WITNESS.reset()
    with tempfile.TemporaryDirectory(prefix="gntdma-scale-") as tmpdir:
        tmp = Path(tmpdir)
        host = Host(dom0_memory_mb=256)
        try:
            g, vbds = create(host, 0, args.memory, args.disk_mb, tmp)  # warm-up
            destroy_guest(host, g, vbds)
            del g, vbds
            host.sched.yield_()
            for p in tmp.iterdir():
                p.unlink()
            gc.collect()
            objs0, host0 = kernel_objects(), host_objects(host)
            snap0 = tracemalloc.take_snapshot() if tracemalloc.is_tracing() else None
            traced0 = tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else 0
            prof = cProfile.Profile() if args.profile else None
            times: list[float] = []
            cpu: list[float] = []  # the process's CPU time: what other load does not skew
            gc.callbacks.append(_gc_timer)
            guests: list[tuple[Guest, list[Vbd]]] = []
            t_all = time.perf_counter()
            for i in range(1, n + 1):
                t0, c0 = time.perf_counter(), time.process_time()
                if prof is not None:
                    prof.enable()
                guests.append(create(host, i, args.memory, args.disk_mb, tmp))
                if prof is not None:
                    prof.disable()
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
                if i % 100 == 0:
                    print(f"  {i} guests, last {times[-1] * 1e3:.1f} ms", file=sys.stderr)
            create_s = time.perf_counter() - t_all
            rss_full = rss()
            t0 = time.perf_counter()
            while guests:
                g, vbds = guests.pop()
                if not destroy_guest(host, g, vbds):
                    raise RuntimeError(f"{g.name}: a disk did not go down cleanly")
            del g, vbds
            destroy_s = time.perf_counter() - t0
            del guests
            host.sched.yield_()
            leaks = host.leaks()
            gc.collect()
            objs1, host1 = kernel_objects(), host_objects(host)
            traced1 = tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else 0
            grown = [] if snap0 is None else [
                str(d) for d in tracemalloc.take_snapshot().compare_to(snap0, "lineno")[:5]]
            spawned = host.sched.statistics().threads
            witness = [r.format() for r in WITNESS.reports]
        finally:
            host.close()
        if prof is not None:
            prof.dump_stats(args.profile)
            pstats.Stats(args.profile, stream=sys.stderr).sort_stats("tottime").print_stats(40)
        images = sum(1 for _ in tmp.iterdir())  # destroyed guests leave their images
    removed = not tmp.exists()
    gc.callbacks.remove(_gc_timer)
    early = window(times, 6, 15)
    late = window(times, n - 9, n)
    cpu_early, cpu_late = window(cpu, 6, 15), window(cpu, n - 9, n)
    result = {
        "guests": n,
        "memory_mb": args.memory,
        "disks_per_guest": 2,
        "disk_mb": args.disk_mb,
        "tracemalloc": not args.no_tracemalloc,
        "create_seconds": create_s,
        "destroy_seconds": destroy_s,
        "guest_10_ms": early * 1e3,
        f"guest_{n}_ms": late * 1e3,
        "ratio": late / early,
        "cpu_guest_10_ms": cpu_early * 1e3,
        f"cpu_guest_{n}_ms": cpu_late * 1e3,
        "cpu_ratio": cpu_late / cpu_early,
        "gc_seconds": _gc_time[1],
        "gc_full_collections": _gc_time[2],
        "target_ratio": 1.5,
        "threads_spawned": spawned,
        "objects_start": objs0 | host0,
        "objects_end": objs1 | host1,
        "traced_bytes_start": traced0,
        "traced_bytes_end": traced1,
        "traced_growth_top": grown,
        "rss_bytes": rss_full.get("VmRSS", 0),
        "peak_rss_bytes": rss().get("VmHWM", 0),
        "leaks": leaks,
        "witness": witness,
        "images_made": images,
        "temp_dir_removed": removed,
    }
    start, end = objs0 | host0, objs1 | host1
    kept = [k for k in start if end[k] != start[k]]
    result["objects_kept"] = kept
    ok = (not leaks and not witness and not kept and removed
          and min(late / early, cpu_late / cpu_early) <= 1.5)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{n} guests, {args.memory} MiB each, two {args.disk_mb} MiB sparse disks each, "
              f"one verified I/O per disk; tracemalloc "
              f"{'on' if not args.no_tracemalloc else 'off'}")
        print(f"create all {create_s:8.1f} s   destroy all {destroy_s:8.1f} s")
        print(f"{'creation of':<28}{'ms':>10}{'CPU ms':>10}")
        print(f"{'guest 10 (6-15)':<28}{early * 1e3:10.2f}{cpu_early * 1e3:10.2f}")
        print(f"{f'guest {n} ({n - 9}-{n})':<28}{late * 1e3:10.2f}{cpu_late * 1e3:10.2f}")
        print(f"{'ratio (target <= 1.5)':<28}{late / early:10.3f}{cpu_late / cpu_early:10.3f}")
        print(f"gc: {_gc_time[1]:.1f} s in all, {_gc_time[2]} full collections")
        print(f"{'after destroy, vs start':<28}{'start':>10}{'end':>10}")
        for k, v0 in (objs0 | host0).items():
            print(f"{k:<28}{v0:10d}{(objs1 | host1)[k]:10d}")
        print(f"{'(threads spawned)':<28}{'':10}{spawned:10d}")
        if snap0 is not None:
            print(f"{'traced bytes':<28}{traced0:10d}{traced1:10d}")
            for line in grown:
                print(f"  {line}")
        print(f"RSS with {n} guests {rss_full.get('VmRSS', 0) >> 20} MiB, "
              f"peak {result['peak_rss_bytes'] >> 20} MiB")
        for line in leaks + witness + [f"{k} not back to the start" for k in kept]:
            print(f"LEAK {line}")
        print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
