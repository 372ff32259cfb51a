"""Lock micro-benchmark: what a lock and unlock pair costs a kernel thread.

Run: .venv/bin/python benchmarks/locks.py [--pairs N] [--repeat R] [--json]

Under the run strategy (no preemption), one kernel thread takes and releases
locks in a loop: an uncontested ``mtx_lock``/``mtx_unlock`` holding nothing
else (the common case of the data path), the same pair while another mutex
is held (WITNESS checks the order), and ``sx_xlock``/``sx_xunlock``. Each
figure is the best of R timings of N pairs, in nanoseconds per pair, with its
ratio to a baseline measured in the same run: ``threading.Lock`` acquire and
release, what a lock costs a Python program that records nothing.

Each lock records where it was taken (the site WITNESS, the deadlock
detector and the watchdog report). The second table shows what capturing
that site costs on its own, with the ratio to walking the frames and reading
``f_lineno`` on every lock (how it was captured before a site became a
token formatted only when a report needs it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

from bench_args import positive_int

from gntdma.sched import Mutex, Scheduler, Sx, _witness, mtx_lock, mtx_unlock, sx_xlock, sx_xunlock

_SCHED_DIR = os.path.dirname(os.path.abspath(_witness.__file__))


_IN_SCHED: dict[str, bool] = {}


def _walk_site() -> tuple[str, int]:
    """A site as locks took it before: walk the frames, read ``f_lineno`` at each lock."""
    f: FrameType | None = sys._getframe(1)
    while f is not None:
        filename = f.f_code.co_filename
        inside = _IN_SCHED.get(filename)
        if inside is None:
            inside = _IN_SCHED[filename] = os.path.dirname(filename) == _SCHED_DIR
        if not inside:
            return filename, f.f_lineno
        f = f.f_back
    return "?", 0


def _best(fn: Callable[[int], None], pairs: int, repeat: int) -> float:
    """Nanoseconds per pair, the best of ``repeat`` timings of ``pairs`` pairs."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        fn(pairs)
        best = min(best, (time.perf_counter_ns() - t0) / pairs)
    return best


def _in_thread(body: Callable[[int], None]) -> Callable[[int], None]:
    """``body`` run on a kernel thread of a fresh run-strategy scheduler."""

    def run(n: int) -> None:
        s = Scheduler().install()
        try:
            s.spawn(body, n, name="bench")
            s.run()
        finally:
            s.shutdown()
            Scheduler.uninstall()

    return run


def _mtx_pairs(n: int) -> None:
    m = Mutex("bench_mtx")
    for _ in range(n):
        mtx_lock(m)
        mtx_unlock(m)


def _mtx_nested_pairs(n: int) -> None:
    outer = Mutex("bench_outer")
    m = Mutex("bench_inner")
    mtx_lock(outer)
    for _ in range(n):
        mtx_lock(m)
        mtx_unlock(m)
    mtx_unlock(outer)


def _sx_pairs(n: int) -> None:
    sx = Sx("bench_sx")
    for _ in range(n):
        sx_xlock(sx)
        sx_xunlock(sx)


def _threading_pairs(n: int) -> None:
    lk = threading.Lock()
    for _ in range(n):
        lk.acquire()
        lk.release()


def _capture(fn: Callable[[], object]) -> Callable[[int], None]:
    def loop(n: int) -> None:
        for _ in range(n):
            fn()

    return loop


def _token_site() -> object:
    return _witness.caller_site_raw()


def _legacy_site() -> object:
    return _walk_site()


def measure(pairs: int, repeat: int) -> dict[str, object]:
    base = _best(_threading_pairs, pairs, repeat)
    locks = {
        "mtx_lock+mtx_unlock": _best(_in_thread(_mtx_pairs), pairs, repeat),
        "mtx_lock+mtx_unlock, one mutex held": _best(_in_thread(_mtx_nested_pairs), pairs,
                                                     repeat),
        "sx_xlock+sx_xunlock": _best(_in_thread(_sx_pairs), pairs, repeat),
    }
    legacy = _best(_capture(_legacy_site), pairs, repeat)
    token = _best(_capture(_token_site), pairs, repeat)
    return {
        "pairs": pairs,
        "repeat": repeat,
        "baseline": {"threading.Lock acquire+release": base},
        "locks": {k: {"ns": v, "ratio": v / base} for k, v in locks.items()},
        "site_capture": {
            "frame walk + f_lineno (before)": {"ns": legacy, "ratio": 1.0},
            "caller_site_raw (now)": {"ns": token, "ratio": token / legacy},
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=positive_int, default=200_000)
    ap.add_argument("--repeat", type=positive_int, default=5)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args()
    res = measure(args.pairs, args.repeat)
    if args.json:
        print(json.dumps(res, indent=2))
        return
    base = res["baseline"]
    assert isinstance(base, dict)
    print(f"{'pair':40} {'ns/pair':>9} {'ratio':>7}")
    for k, v in base.items():
        print(f"{k:40} {v:9.0f} {1.0:7.2f}")
    for table in ("locks", "site_capture"):
        rows = res[table]
        assert isinstance(rows, dict)
        if table == "site_capture":
            print(f"\n{'site capture':40} {'ns/call':>9} {'ratio':>7}")
        for k, v in rows.items():
            print(f"{k:40} {v['ns']:9.0f} {v['ratio']:7.2f}")


if __name__ == "__main__":
    main()
