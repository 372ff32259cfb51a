"""Workloads of the main job, run by "user process" threads on blkfront disks.

- **Verified random I/O**: each thread owns a region of each disk and writes
  and reads random runs of several sizes (from one sector to 1 MiB, so both
  direct and indirect requests). Every 512-byte sector written carries a
  header with its byte offset, a generation counter and the run's seed; every
  read checks each sector against the thread's model of its region (sectors
  never written must read as zeros).
- **File copy**: a large file of seeded random bytes is written through the
  disk's file view and read back; the SHA-256 of both must be equal.
- **Flush and discard**: a flush, then a discarded range must read as zeros
  while the data around it is intact.

Workload threads are user processes: they may use Python's ``random`` with a
seed, and they reach the disk only through blkfront.
"""

from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from gntdma.dev.blkfront import xbd_softc
from gntdma.dev.blkfront_io import XbdFile, xbd_discard, xbd_flush, xbd_read, xbd_write
from gntdma.sched import Scheduler, ThreadState

__all__ = ["DiskLoad", "file_copy", "flush_discard", "verified_random_io"]

SECTOR: Final = 512
MAGIC: Final = b"GNTDMAv1"
_HDR: Final = struct.Struct("<8sQQQ")
#: Sizes of the random runs, in sectors: 512 B .. 1 MiB.
RUN_SECTORS: Final = (1, 8, 16, 64, 128, 512, 2048)


@dataclass(eq=False)
class DiskLoad:
    """What the workload did to one disk."""

    name: str
    sc: xbd_softc
    bytes_verified: int = 0
    reads: int = 0
    writes: int = 0
    errors: list[str] = field(default_factory=list)


def _sector(offset: int, gen: int, seed: int) -> bytes:
    fill = struct.pack("<Q", (offset * 0x9E3779B97F4A7C15 + gen) & 0xFFFFFFFFFFFFFFFF)
    return _HDR.pack(MAGIC, offset, gen, seed) + fill * ((SECTOR - _HDR.size) // 8)


_ZERO_SECTOR: Final = bytes(SECTOR)


def _worker(sched: Scheduler, load: DiskLoad, first: int, nsect: int, seed: int,
            deadline: float, max_ops: int) -> None:
    rng = random.Random(seed)
    model = [0] * nsect  # generation of each sector of my region (0: never written)
    gen = 0
    ops = 0
    while sched.now() < deadline and ops < max_ops and not load.errors:
        ops += 1
        run = min(rng.choice(RUN_SECTORS), nsect)
        start = rng.randrange(0, nsect - run + 1)
        offset = (first + start) * SECTOR
        if rng.random() < 0.5:
            gen += 1
            data = b"".join(_sector(offset + i * SECTOR, gen, seed) for i in range(run))
            error = xbd_write(load.sc, offset, data)
            if error != 0:
                load.errors.append(f"write of {run} sectors at {offset:#x}: error {error}")
                return
            for i in range(run):
                model[start + i] = gen
            load.writes += 1
            continue
        error, got = xbd_read(load.sc, offset, run * SECTOR)
        if error != 0:
            load.errors.append(f"read of {run} sectors at {offset:#x}: error {error}")
            return
        load.reads += 1
        for i in range(run):
            g = model[start + i]
            want = _ZERO_SECTOR if g == 0 else _sector(offset + i * SECTOR, g, seed)
            have = got[i * SECTOR : (i + 1) * SECTOR]
            if have != want:
                hdr = _HDR.unpack_from(have) if have[:8] == MAGIC else None
                load.errors.append(
                    f"sector at {offset + i * SECTOR:#x}: expected generation {g}, found "
                    + (f"offset {hdr[1]:#x} generation {hdr[2]}" if hdr else "other bytes"))
                return
        load.bytes_verified += run * SECTOR


def verified_random_io(sched: Scheduler, loads: Sequence[DiskLoad], *, threads: int,
                       duration: float, seed: int, region_sectors: int,
                       max_ops: int = 1 << 30) -> None:
    """Run ``threads`` verifying threads per disk for ``duration`` seconds; sleeps."""
    deadline = sched.now() + duration
    spawned = []
    for d, load in enumerate(loads):
        for t in range(threads):
            first = t * region_sectors
            spawned.append(sched.spawn(
                _worker, sched, load, first, region_sectors, seed * 1000 + d * 100 + t,
                deadline, max_ops, name=f"{load.name}/io{t}"))
    sched.run(until=lambda: all(t.state is ThreadState.DONE for t in spawned))


def _stream(seed: int, nbytes: int) -> bytes:
    return random.Random(seed).randbytes(nbytes)


def file_copy(f: XbdFile, offset: int, nbytes: int, seed: int,
              chunk: int = 1 << 20) -> tuple[bool, str]:
    """Write ``nbytes`` of seeded data at ``offset`` through the file view, read it back."""
    data = _stream(seed, nbytes)
    src = hashlib.sha256(data).hexdigest()
    f.seek(offset)
    for pos in range(0, nbytes, chunk):
        f.write(data[pos : pos + chunk])
    f.flush()
    f.seek(offset)
    h = hashlib.sha256()
    left = nbytes
    while left > 0:
        piece = f.read(min(chunk, left))
        if not piece:
            break
        h.update(piece)
        left -= len(piece)
    back = h.hexdigest()
    return src == back, f"{nbytes >> 20} MiB, sha256 {src[:16]}... " + (
        "equal" if src == back else f"!= {back[:16]}...")


def flush_discard(sched: Scheduler, sc: xbd_softc, offset: int, length: int,
                  call: Callable[[Callable[[], object]], object]) -> tuple[bool, str]:
    """Write a pattern, flush, discard its middle: the middle reads as zeros, the rest intact."""
    pattern = bytes(range(256)) * (length // 256)
    third = (length // 3) // 4096 * 4096
    errors: list[int] = []
    got = b""

    def body() -> None:
        nonlocal got
        errors.append(xbd_write(sc, offset, pattern))
        errors.append(xbd_flush(sc))
        errors.append(xbd_discard(sc, offset + third, third))
        err, got = xbd_read(sc, offset, length)
        errors.append(err)

    call(body)
    if any(e != 0 for e in errors):
        return False, f"errors write/flush/discard/read: {errors}"
    mid = got[third : 2 * third]
    ok = (mid == bytes(third) and got[:third] == pattern[:third]
          and got[2 * third :] == pattern[2 * third :])
    return ok, (f"flushed; {third >> 10} KiB discarded read back as zeros, the rest intact"
                if ok else "discarded range or its neighbours read back wrong")
