"""Grant-table benchmark: per-op cost of the guest's grant cycle and the hypervisor's map/unmap.

Run: .venv/bin/python benchmarks/gnttab.py [--ops N] [--rounds R] [--json]

Each figure is measured twice in one run: with the table at one frame and at
64 frames (Xen's default ``max_grant_frames``), both nearly full, and the
ratio 64/1 is printed (target <= 1.5: the cost of an op must not grow with
the table). The figures:

- guest ``alloc+grant+end``: ``gnttab_alloc_grant_references(1)``, claim,
  ``gnttab_grant_foreign_access_ref``, ``gnttab_end_foreign_access_ref`` and
  ``gnttab_free_grant_reference`` of one reference, in a guest whose other
  references are all allocated and granted;
- guest ``statistics()`` of that table;
- hypervisor ``map+unmap``: dom0 maps one of the guest's references (host
  map at its own address) and unmaps it, with every other entry of the
  guest's table mapped by dom0 too (the maptrack as full as the table), one op
  per hypercall and 32 per hypercall (per page), through the dataclass form
  (``grant_table_op``) and, where the hypervisor has it, the array form
  (``grant_table_op_raw``);
- a domain's ``statistics()`` in the hypervisor (the host's leak check reads
  it): pins and mappings are counters; the entries in use are read from the
  frames the guest writes (about 0.5 us of C work a frame, no per-entry work).

Each figure is the process's CPU time per op (``time.process_time``, which
other load on a shared machine moves much less than wall time), the best of
``--rounds`` rounds of ``--ops`` operations, the two table sizes taking turns.
A figure, not a test: the ratios are what to read.
"""

from __future__ import annotations

import argparse
import json
import struct
import time
from collections.abc import Callable
from typing import Any

from bench_args import positive_int

from gntdma.abi.grant_table import (
    GNTMAP_host_map,
    GnttabMapGrantRef,
    GNTTABOP_map_grant_ref,
    GNTTABOP_setup_table,
    GNTTABOP_unmap_grant_ref,
    GnttabSetupTable,
    GnttabUnmapGrantRef,
    GTF_permit_access,
)
from gntdma.abi.xen import DOMID_SELF, PAGE_SHIFT
from gntdma.hv import Hypervisor
from gntdma.toolstack.host import Host

FRAMES = (1, 64)
#: References left free in a "nearly full" table.
SPARE = 16
#: Pages per hypercall in the batched figures (a 128 KiB request).
BATCH = 32
#: Host addresses for dom0's maps: gfns from 64 GiB up, never RAM.
FOREIGN_BASE = 0x1000000 << PAGE_SHIFT


Bench = dict[str, tuple[Callable[[int], None], int]]


def guest_setup(host: Host, frames: int, ops: int) -> tuple[Bench, Callable[[], None]]:
    """alloc+grant+end and statistics() in a guest whose table has ``frames`` frames."""
    g = host.create_guest(f"bench{frames}", max_grant_frames=frames)
    gt = g.gnttab
    pfn = g.kernel.vm_page_alloc()
    assert pfn is not None
    held = frames * 512 - 8 - SPARE
    error, head = gt.gnttab_alloc_grant_references(held)
    assert error == 0 and gt.nr_frames == frames, (error, gt.nr_frames)
    refs = [gt.gnttab_claim_grant_reference(head) for _ in range(held)]
    for ref in refs:
        gt.gnttab_grant_foreign_access_ref(ref, 0, pfn, False)

    def cycle(n: int) -> None:
        alloc = gt.gnttab_alloc_grant_references
        claim = gt.gnttab_claim_grant_reference
        grant = gt.gnttab_grant_foreign_access_ref
        end = gt.gnttab_end_foreign_access_ref
        free = gt.gnttab_free_grant_reference
        for _ in range(n):
            _error, h = alloc(1)
            ref = claim(h)
            grant(ref, 0, pfn, False)
            end(ref)
            free(ref)

    def stats(n: int) -> None:
        for _ in range(n):
            gt.statistics()

    def done() -> None:
        st = gt.statistics()
        assert st.granted == held and st.allocated == held, st
        for ref in refs:
            gt.gnttab_end_foreign_access_ref(ref)
            gt.gnttab_free_grant_reference(ref)
        g.kernel.vm_page_free(pfn)
        host.destroy_guest(g)

    return {"guest alloc+grant+end": (cycle, ops),
            "guest statistics()": (stats, max(1, ops // 100))}, done


def hv_setup(hv: Hypervisor, frames: int, ops: int) -> tuple[Bench, Callable[[], None]]:
    """map+unmap and statistics() with the granter's table at ``frames`` frames, every
    entry of it mapped by dom0 but the ones measured."""
    g = hv.create_domain(f"bench{frames}", 256, max_grant_frames=frames)
    op = GnttabSetupTable(dom=DOMID_SELF, nr_frames=frames)
    rc, _ = hv.grant_table_op(g.domid, GNTTABOP_setup_table, [op])
    assert rc == 0 and g.gnttab.nr_frames == frames
    table = hv.grant_frames(g.domid)
    nr = frames * 512
    for ref in range(8, nr):
        f, i = divmod(ref, 512)
        struct.pack_into("<HHI", table[f], i * 8, int(GTF_permit_access), 0, ref % 256)
    base = FOREIGN_BASE + (g.domid << 32)
    addrs = iter(range(base, base + (nr << PAGE_SHIFT), 1 << PAGE_SHIFT))
    host_map = int(GNTMAP_host_map)  # as blkback passes it
    one = (next(addrs), nr - 1)  # measured one op per call
    batch = [(next(addrs), ref) for ref in range(nr - 1 - BATCH, nr - 1)]  # BATCH per call
    live: list[tuple[int, int]] = []
    for ref in range(8, nr - 1 - BATCH):  # dom0 maps every other entry
        a = next(addrs)
        _, (r,) = hv.grant_table_op(0, GNTTABOP_map_grant_ref,
                                    [GnttabMapGrantRef(host_addr=a, flags=host_map, ref=ref,
                                                       dom=g.domid)])
        assert isinstance(r, GnttabMapGrantRef) and r.status == 0, r
        live.append((a, r.handle))

    def struct_form(todo: list[tuple[int, int]]) -> Callable[[int], None]:
        def run(n: int) -> None:
            top = hv.grant_table_op
            for _ in range(n // len(todo)):
                _, res = top(0, GNTTABOP_map_grant_ref,
                             [GnttabMapGrantRef(host_addr=a, flags=host_map, ref=r, dom=g.domid)
                              for a, r in todo])
                top(0, GNTTABOP_unmap_grant_ref,
                    [GnttabUnmapGrantRef(host_addr=a, handle=m.handle)  # type: ignore[union-attr]
                     for (a, _r), m in zip(todo, res, strict=True)])
        return run

    def stats(n: int) -> None:
        for _ in range(n):
            g.statistics()

    bench: Bench = {"hv map+unmap (structs)": (struct_form([one]), ops),
                    f"hv map+unmap x{BATCH} (structs)": (struct_form(batch), ops)}
    raw = getattr(hv, "grant_table_op_raw", None)
    if raw is not None:
        map_size, unmap_size = GnttabMapGrantRef.STRUCT.size, GnttabUnmapGrantRef.STRUCT.size
        handle_at = GnttabMapGrantRef.LAYOUT.fields[5][1]
        unpack_handle = struct.Struct("<I").unpack_from
        pack_unmap = GnttabUnmapGrantRef.STRUCT.pack_into

        def array_form(todo: list[tuple[int, int]]) -> Callable[[int], None]:
            mbuf = bytearray(b"".join(GnttabMapGrantRef(host_addr=a, flags=host_map, ref=r,
                                                        dom=g.domid).pack() for a, r in todo))
            ubuf = bytearray(unmap_size * len(todo))
            k = len(todo)

            def run(n: int) -> None:
                for _ in range(n // k):
                    raw(0, GNTTABOP_map_grant_ref, mbuf, k)
                    for i, (a, _r) in enumerate(todo):
                        (h,) = unpack_handle(mbuf, i * map_size + handle_at)
                        pack_unmap(ubuf, i * unmap_size, a, 0, h, 0)
                    raw(0, GNTTABOP_unmap_grant_ref, ubuf, k)
            return run

        bench["hv map+unmap (array)"] = (array_form([one]), ops)
        bench[f"hv map+unmap x{BATCH} (array)"] = (array_form(batch), ops)
    bench["hv domain statistics()"] = (stats, max(1, ops // 100))

    def done() -> None:
        for a, h in live:
            hv.grant_table_op(0, GNTTABOP_unmap_grant_ref,
                              [GnttabUnmapGrantRef(host_addr=a, handle=h)])
        hv.destroy_domain(g.domid)

    return bench, done


def measure(benches: dict[int, Bench], rounds: int) -> dict[int, dict[str, float]]:
    """Microseconds per op of every figure: the best of ``rounds`` rounds, the table
    sizes taking turns within each round so that both see the same machine."""
    best: dict[int, dict[str, float]] = {f: {} for f in benches}
    for bench in benches.values():  # warm up
        for fn, n in bench.values():
            fn(max(1, n // 10))
    for _ in range(rounds):
        for name in benches[FRAMES[0]]:
            for frames, bench in benches.items():
                fn, n = bench[name]
                t = time.process_time()
                fn(n)
                us = (time.process_time() - t) / n * 1e6
                best[frames][name] = min(best[frames].get(name, us), us)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", type=positive_int, default=20000, help="operations per round")
    ap.add_argument("--rounds", type=positive_int, default=5, help="rounds; the best is kept")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args()
    host = Host()
    hv = host.hv
    try:
        benches: dict[int, Bench] = {}
        undo: list[Callable[[], None]] = []
        for frames in FRAMES:
            gb, gdone = guest_setup(host, frames, args.ops)
            hb, hdone = hv_setup(hv, frames, args.ops)
            benches[frames] = gb | hb
            undo += [gdone, hdone]
        per = measure(benches, args.rounds)
        for fn in undo:
            fn()
        assert hv.statistics().mappings == 0
    finally:
        host.close()
    lo, hi = FRAMES
    rows: list[dict[str, Any]] = []
    for name in per[lo]:
        rows.append({"figure": name, f"us_{lo}_frame": round(per[lo][name], 3),
                     f"us_{hi}_frames": round(per[hi][name], 3),
                     "ratio": round(per[hi][name] / per[lo][name], 2)})
    if args.json:
        print(json.dumps({"frames": list(FRAMES), "spare_refs": SPARE, "ops": args.ops,
                          "rounds": args.rounds, "target_ratio": 1.5, "figures": rows},
                         indent=2))
        return
    print(f"per-op microseconds, tables nearly full ({SPARE} references spare), "
          f"best of {args.rounds} x {args.ops} ops; target ratio <= 1.5")
    print(f"{'figure':28} {f'{lo} frame':>10} {f'{hi} frames':>10} {'ratio':>7}")
    for r in rows:
        print(f"{r['figure']:28} {r[f'us_{lo}_frame']:10.3f} {r[f'us_{hi}_frames']:10.3f} "
              f"{r['ratio']:7.2f}")


if __name__ == "__main__":
    main()
