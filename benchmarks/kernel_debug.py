"""Kernel debugging benchmark: what DMA-API debugging and junk fill cost a guest kernel.

Run: .venv/bin/python benchmarks/kernel_debug.py [--rounds R] [--json]

One process, one kernel whose tunables are switched between rounds
(``Kernel.set_tunables``): ``hw.busdma.dma_debug`` and ``vm.debug.divisor`` both
on (the default of tests, the explorer and ``gntdma run``) and both off
(``--no-dma-debug --no-junk``). Each figure is the best of R alternating
timings, in microseconds per operation, with the ratio off/on:

- an I/O's bus_dma life on a never-bouncing tag: load, PREREAD sync, POSTREAD
  sync, the CPU reading the buffer, unload (DMA-API debugging tracks the
  buffer's pages from the PRE sync to the POST sync and checks the read);
- malloc and free of the same size (junk fill writes every freed byte).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

from bench_args import positive_int

from gntdma.sched import Scheduler
from gntdma.sys import (
    BUS_DMA_NOWAIT,
    BUS_DMASYNC_POSTREAD,
    BUS_DMASYNC_PREREAD,
    BUS_SPACE_MAXADDR,
    M_DEVBUF,
    M_WAITOK,
    PAGE_SIZE,
    BusDmaMap,
    BusDmaTag,
    BytePhysMem,
    Kernel,
    KernelTunables,
    bus_dma_segment_t,
    bus_dma_tag_create,
    bus_dmamap_create,
    bus_dmamap_load,
    bus_dmamap_sync,
    bus_dmamap_unload,
    bus_get_dma_tag,
)

ON = KernelTunables(dma_debug=True, junk_divisor=1)
OFF = KernelTunables(dma_debug=False, junk_divisor=0)
SIZES = ((1 << 20, 30), (64 << 10, 300), (4 << 10, 3000))


def _noop(_arg: object, _segs: list[bus_dma_segment_t], _nseg: int, _error: int) -> None:
    pass


def _io(kern: Kernel, tag: BusDmaTag, map: BusDmaMap, va: int, n: int) -> Callable[[], None]:
    def one() -> None:
        bus_dmamap_load(tag, map, va, n, _noop, None, BUS_DMA_NOWAIT)
        bus_dmamap_sync(tag, map, BUS_DMASYNC_PREREAD)
        bus_dmamap_sync(tag, map, BUS_DMASYNC_POSTREAD)
        kern.kva_read(va, n)
        bus_dmamap_unload(tag, map)

    return one


def _malloc_free(kern: Kernel, n: int) -> Callable[[], None]:
    def one() -> None:
        kern.free(kern.malloc(n, M_DEVBUF, M_WAITOK), M_DEVBUF)

    return one


def _time(fn: Callable[[], None], reps: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(reps):
        fn()
    return (time.perf_counter_ns() - t0) / reps / 1000


def measure(rounds: int) -> dict[str, dict[str, float]]:
    s = Scheduler().install()
    try:
        kern = Kernel("bench", BytePhysMem([(0, 2048)]), 1)
        err, tag = bus_dma_tag_create(bus_get_dma_tag(kern), 1, 0, BUS_SPACE_MAXADDR,
                                      BUS_SPACE_MAXADDR, 1 << 20, 256, PAGE_SIZE, 0, None, None)
        assert err == 0 and tag is not None
        err, map = bus_dmamap_create(tag, 0)
        assert err == 0 and map is not None
        va = kern.malloc(1 << 20, M_DEVBUF, M_WAITOK)
        cases: dict[str, tuple[Callable[[], None], int]] = {}
        for n, reps in SIZES:
            cases[f"I/O bus_dma life {n >> 10} KiB"] = (_io(kern, tag, map, va, n), reps)
        for n, reps in SIZES:
            cases[f"malloc+free {n >> 10} KiB"] = (_malloc_free(kern, n), reps)
        best = {name: {"on": float("inf"), "off": float("inf")} for name in cases}
        for _ in range(rounds):
            for name, (fn, reps) in cases.items():
                for label, t in (("on", ON), ("off", OFF)):
                    kern.set_tunables(t)
                    best[name][label] = min(best[name][label], _time(fn, reps))
        kern.set_tunables(ON)
        kern.free(va, M_DEVBUF)
        for v in best.values():
            v["ratio"] = v["off"] / v["on"]
        return best
    finally:
        s.shutdown()
        Scheduler.uninstall()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=positive_int, default=5)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args()
    res = measure(args.rounds)
    if args.json:
        print(json.dumps({"tunables": {"on": ON.sysctls(), "off": OFF.sysctls()},
                          "us_per_op": res}, indent=2))
        return
    print(f"on: {ON.describe()}; off: {OFF.describe()}")
    print(f"{'operation':28} {'on us':>9} {'off us':>9} {'off/on':>7}")
    for name, v in res.items():
        print(f"{name:28} {v['on']:9.1f} {v['off']:9.1f} {v['ratio']:7.2f}")


if __name__ == "__main__":
    main()
