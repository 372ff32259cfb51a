"""Workloads of the main job, run by "user process" threads on blkfront disks.

- **Verified random I/O**: each thread owns a region of each disk and writes
  and reads random runs of several sizes (from one sector to 1 MiB, so both
  direct and indirect requests). Every 512-byte sector written carries a
  header with its byte offset, a generation counter and the run's seed; every
  read checks each sector against the thread's model of its region (sectors
  never written must read as the image held them before the run: zeros on an
  image gntdma created, the image's own bytes on an existing one). Whatever
  the duration, each thread writes a large run (indirect requests) and one
  sector (a direct request) and reads both back. On a read-only disk the
  threads only read, and check every byte against the image.
- **File copy**: a large file of seeded random bytes is written through the
  disk's file view and read back; the SHA-256 of both must be equal.
- **Flush and discard**: a flush, then a discarded range must read as zeros
  while the data around it is intact.

Workload threads are user processes of the disk's guest (they die with it if
it crashes): they may use Python's ``random`` with a seed, and they reach the
disk only through blkfront.
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


def _zeros(offset: int, nbytes: int) -> bytes:
    return bytes(nbytes)


@dataclass(eq=False)
class DiskLoad:
    """What the workload did to one disk."""

    name: str
    sc: xbd_softc
    #: what ``nbytes`` at ``offset`` held before the run (the verifier's oracle for
    #: sectors never written in the run)
    base: Callable[[int, int], bytes] = _zeros
    readonly: bool = False  #: read-only disk: the threads only read
    #: the largest run in sectors (a thread's buffer must fit the guest's memory)
    max_run: int = RUN_SECTORS[-1]
    bytes_verified: int = 0
    reads: int = 0
    writes: int = 0
    errors: list[str] = field(default_factory=list)


def _sector(offset: int, gen: int, seed: int) -> bytes:
    fill = struct.pack("<Q", (offset * 0x9E3779B97F4A7C15 + gen) & 0xFFFFFFFFFFFFFFFF)
    return _HDR.pack(MAGIC, offset, gen, seed) + fill * ((SECTOR - _HDR.size) // 8)


def _pick(rng: random.Random, ops: int, nsect: int, last: tuple[int, int],
          readonly: bool, max_run: int) -> tuple[bool, int, int]:
    """(write?, start, run) of the next operation of a thread."""
    nsect_all, nsect = nsect, max(1, min(nsect, max_run))
    if ops < 4:  # first a large run, then one sector: each written, then read back
        run = max((r for r in RUN_SECTORS if r <= nsect), default=1) if ops < 2 else 1
        if ops % 2 == 1:
            return False, last[0], last[1]
        return not readonly, rng.randrange(0, nsect_all - run + 1), run
    run = min(rng.choice(RUN_SECTORS), nsect)
    return (not readonly and rng.random() < 0.5), rng.randrange(0, nsect_all - run + 1), run


def _worker(sched: Scheduler, load: DiskLoad, first: int, nsect: int, seed: int,
            deadline: float, max_ops: int) -> None:
    rng = random.Random(seed)
    model = [0] * nsect  # generation of each sector of my region (0: never written)
    gen = 0
    ops = 0
    last = (0, 1)
    while (ops < 4 or sched.now() < deadline) and ops < max_ops and not load.errors:
        write, start, run = _pick(rng, ops, nsect, last, load.readonly, load.max_run)
        ops += 1
        last = (start, run)
        offset = (first + start) * SECTOR
        if write:
            gen += 1
            data = b"".join(_sector(offset + i * SECTOR, gen, seed) for i in range(run))
            error = xbd_write(load.sc, offset, data)
            if error != 0:
                load.errors.append(f"{load.name}: write of {run} sectors at {offset:#x}: "
                                   f"error {error}")
                return
            for i in range(run):
                model[start + i] = gen
            load.writes += 1
            continue
        error, got = xbd_read(load.sc, offset, run * SECTOR)
        if error != 0:
            load.errors.append(f"{load.name}: read of {run} sectors at {offset:#x}: "
                               f"error {error}")
            return
        load.reads += 1
        base = b""
        if any(model[start + i] == 0 for i in range(run)):
            base = load.base(offset, run * SECTOR)
        for i in range(run):
            g = model[start + i]
            want = (base[i * SECTOR:(i + 1) * SECTOR] if g == 0
                    else _sector(offset + i * SECTOR, g, seed))
            have = got[i * SECTOR : (i + 1) * SECTOR]
            if have != want:
                hdr = _HDR.unpack_from(have) if have[:8] == MAGIC else None
                load.errors.append(
                    f"{load.name}: sector at {offset + i * SECTOR:#x}: expected "
                    + (f"generation {g}" if g != 0 else "the image's own bytes") + ", found "
                    + (f"offset {hdr[1]:#x} generation {hdr[2]}" if hdr else "other bytes"))
                return
        load.bytes_verified += run * SECTOR


def verified_random_io(sched: Scheduler, loads: Sequence[DiskLoad], *,
                       threads: int | Sequence[int],
                       duration: float, seed: int, region_sectors: int | Sequence[int],
                       max_ops: int = 1 << 30) -> None:
    """Run ``threads`` verifying threads per disk for ``duration`` seconds; sleeps.

    ``threads`` and ``region_sectors`` (each thread's region) are for every
    disk or one per disk; a disk whose region is 0 sectors gets no thread.
    """
    deadline = sched.now() + duration
    regions = ([region_sectors] * len(loads) if isinstance(region_sectors, int)
               else list(region_sectors))
    counts = [threads] * len(loads) if isinstance(threads, int) else list(threads)
    spawned = []
    for d, (load, region, count) in enumerate(zip(loads, regions, counts, strict=True)):
        if region <= 0:
            continue
        for t in range(count):
            first = t * region
            spawned.append(sched.spawn(
                _worker, sched, load, first, region, seed * 1000 + d * 100 + t,
                deadline, max_ops, name=f"{load.name}/io{t}", domain=load.sc.xbd_kern))
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
