"""The block part of ``gntdma run``: guests from configs, their disks, the workloads.

Each config makes one guest, as ``xl create`` does (the built-in default has
one guest with two disks and a grant table small enough that loads defer).
:func:`open_images` opens every image the way :mod:`~gntdma.toolstack.preflight`
planned (new ones created, existing ones as snapshots unless ``--overwrite``,
read-only ones read-only), each locked as QEMU locks images, before any host
exists. The disks attach through xenstore with blkfront on the Xen bus_dma
handlers and blkback on the images, and the workloads run on all of them at
once while a progress line shows requests, throughput, grant entries in use
and deferred loads. Then the disks detach with the libxl sequence and the
guests are destroyed.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from gntdma.abi.blkif import BLKIF_MAX_SEGMENTS_PER_REQUEST
from gntdma.dev.blkfront_io import XbdFile
from gntdma.errors import GntdmaError
from gntdma.host.image import DiskImage, open_image
from gntdma.sched import Deadlock, HungTask, ThreadState
from gntdma.toolstack.domains import create_guest_from_config
from gntdma.toolstack.host import CrashTeardown, Guest, GuestCrashed, Host
from gntdma.toolstack.netjob import NetJob, attach_guest_vifs, make_netjob
from gntdma.toolstack.preflight import DiskPlan, GuestPlan, RunPlan
from gntdma.toolstack.report import Report
from gntdma.toolstack.vbd import Vbd, detach_disk, new_image
from gntdma.toolstack.workload import (
    RUN_SECTORS,
    DiskLoad,
    file_copy,
    flush_discard,
    verified_random_io,
)
from gntdma.toolstack.xlcfg import GuestConfig, XlConfigError, parse_config
from gntdma.xen.busdma import XenDmaImpl

if TYPE_CHECKING:
    from gntdma.toolstack.dashboard import RunView

__all__ = [
    "DEFAULT_CONFIG",
    "DEFAULT_STALL_TIMEOUT",
    "OpenImages",
    "Stalled",
    "default_config",
    "open_images",
    "run_block_job",
]

#: The built-in default of ``gntdma run``.
DEFAULT_CONFIG: Final = """\
# gntdma run's built-in default: one guest, two disks, a NIC, and a grant table
# small enough (three frames: 1528 references, 518 of them held by the NIC for
# life) that bus_dma loads defer.
name = "guest1"
memory = 64
max_grant_frames = 3
max_maptrack_frames = 1024
disk = [ 'format=raw, vdev=xvda, access=rw, size=64M, target=guest1-xvda.img',
         'format=raw, vdev=xvdb, access=rw, size=64M, target=guest1-xvdb.img' ]
vif = [ 'mac=00:16:3e:00:00:01, bridge=xenbr0' ]
"""

SECTOR: Final = 512
#: A thread's region must hold this many sectors for a large run (indirect requests).
_INDIRECT_SECTORS: Final = 128


def default_config() -> GuestConfig:
    """The built-in default config."""
    return parse_config(DEFAULT_CONFIG, "<built-in default>")


@dataclass(eq=False)
class OpenImage:
    """An image opened for a run, and a plain descriptor the verifier reads it by."""

    plan: DiskPlan
    image: DiskImage
    base_fd: int
    created: bool  #: made by this run (removed again if the run is refused)

    def base(self, offset: int, nbytes: int) -> bytes:
        """The image's own bytes (a snapshot's base; sectors the run never wrote)."""
        return os.pread(self.base_fd, nbytes, offset)


class OpenImages:
    """Every image of a run, by (guest index, disk index); :meth:`close` closes them."""

    def __init__(self) -> None:
        self.by_disk: dict[tuple[int, int], OpenImage] = {}

    def close(self, *, refused: bool = False) -> None:
        """Close everything; ``refused``: also remove the images this run created."""
        for oi in self.by_disk.values():
            oi.image.close()
            with contextlib.suppress(OSError):
                os.close(oi.base_fd)
            if refused and oi.created:
                with contextlib.suppress(OSError):
                    os.unlink(oi.plan.path)
        self.by_disk.clear()


def _open(d: DiskPlan, overlay_dir: Path) -> tuple[DiskImage, bool]:
    if d.mode == "snapshot":
        return DiskImage.snapshot(d.path, overlay_dir), False
    if d.mode == "overwrite":
        return DiskImage.open(d.path), False
    if d.mode == "readonly" and d.exists:
        return open_image(d.path, size=d.spec.size, readonly=True), False
    assert d.spec.size is not None  # a new image: removed again if it cannot be set up
    return new_image(d.path, d.spec.size, readonly=d.mode == "readonly"), True


def open_images(plan: RunPlan, overlay_dir: Path) -> OpenImages:
    """Open (and lock) every image of ``plan``: existing ones first, then new ones.

    Raises:
        XlConfigError: an image cannot be opened (in use by another process, it
            changed since it was checked, ...), at its config line; nothing
            stays open and no image this run created is left.
    """
    out = OpenImages()
    order = sorted(((gi, di, d) for gi, g in enumerate(plan.guests)
                    for di, d in enumerate(g.disks)), key=lambda t: t[2].exists is False)
    try:
        for gi, di, d in order:
            try:
                image, created = _open(d, overlay_dir)
            except OSError as e:
                why = e.strerror if e.errno != errno.EEXIST else "it appeared meanwhile"
                raise XlConfigError(plan.guests[gi].config.source, d.spec.line,
                                    f"disk {d.spec.vdev}: {d.path}: {why}") from None
            try:
                fd = os.open(d.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                image.close()
                raise
            out.by_disk[gi, di] = OpenImage(d, image, fd, created)
    except BaseException:
        out.close(refused=True)
        raise
    return out


def _impl(g: Guest) -> XenDmaImpl:
    from gntdma.sys import kernel_state

    impl = kernel_state(g.kernel).impls["xen"]
    assert isinstance(impl, XenDmaImpl)
    return impl


#: Seconds without a completed I/O after which the workloads count as stalled.
DEFAULT_STALL_TIMEOUT: Final = 5.0


class Stalled(GntdmaError):
    """The workloads stopped making progress; the message says who waits for what."""


class _StallWatchdog:
    """A hub timer: if no I/O of the workloads completes for ``timeout`` seconds, it
    raises :class:`Stalled` out of the scheduler loop with what every thread in an
    uninterruptible or lock wait waits for (the scheduler's wait-for report)."""

    def __init__(self, host: Host, guests: Sequence[Guest], disks: Sequence[_Disk],
                 timeout: float) -> None:
        self.host, self.guests, self.disks, self.timeout = host, guests, disks, timeout
        self.last = -1
        self.since = host.sched.now()
        self.cancel: Callable[[], None] | None = None
        if disks:
            self.cancel = host.sched.call_later(min(0.25, timeout), self.tick)

    def _done(self) -> int:
        return sum(d.load.reads + d.load.writes for d in self.disks) + sum(
            d.vbd.statistics().frontend.requests for d in self.disks)

    def tick(self) -> None:
        now = self.host.sched.now()
        done = self._done()
        if done != self.last:
            self.last, self.since = done, now
        elif now - self.since >= self.timeout:
            self.cancel = None
            raise Stalled(self.describe(now - self.since))
        self.cancel = self.host.sched.call_later(min(0.25, self.timeout), self.tick)

    def describe(self, idle: float) -> str:
        sched = self.host.sched
        counted = {t.name for t in sched.threads
                   if t.state is ThreadState.BLOCKED and t.wait_counted}
        waits = [f"{e.thread} waits for {e.waits_for} at {e.site}"
                 + (f" (held by {e.holder})" if e.holder else "")
                 for e in sched.deadlock_report().edges if e.thread in counted]
        grants = [f"{g.name}: {g.gnttab.statistics().allocated} grant references in use of "
                  f"{g.gnttab.capacity} ({g.gnttab.held_for_life} held for life), "
                  f"{g.gnttab.statistics().callbacks_queued} loads waiting for references"
                  for g in self.guests if g.name not in self.host.crashed]
        return (f"no I/O completed for {idle:.1f} s (--stall-timeout {self.timeout:g}): "
                + "; ".join(waits + grants))

    def stop(self) -> None:
        if self.cancel is not None:
            self.cancel()
            self.cancel = None


class _Progress:
    """A progress line a second, from a hub timer (it never blocks); with a ``view``,
    the same timer samples the series and refreshes the dashboard (which, when
    shown, takes the place of the line)."""

    def __init__(self, host: Host, guests: Sequence[Guest], vbds: list[Vbd],
                 log: Callable[[str], None], view: RunView | None = None) -> None:
        self.host, self.guests, self.vbds, self.log = host, guests, vbds, log
        self.view = view
        if view is not None:
            view.attach(host, guests, vbds)
        self.t0 = host.sched.now()
        self.last_bytes = 0
        self.last_t = self.t0
        self.cancel: Callable[[], None] | None = None
        self.cancel = host.sched.call_later(1.0, self.tick)

    def tick(self) -> None:
        now = self.host.sched.now()
        fr = [v.statistics().frontend for v in self.vbds]
        total = sum(s.bytes_read + s.bytes_written for s in fr)
        rate = (total - self.last_bytes) / max(now - self.last_t, 1e-6) / (1 << 20)
        self.last_bytes, self.last_t = total, now
        use = []
        for g in self.guests:
            if g.name in self.host.crashed:  # destroyed: its table is gone
                use.append("crashed")
                continue
            gst = g.gnttab.statistics()
            use.append(f"{gst.allocated:4d}/{gst.nr_frames * 512 - 8}")
        if self.view is not None and self.view.tick():
            self.cancel = self.host.sched.call_later(1.0, self.tick)
            return
        self.log(f"  [{now - self.t0:5.1f}s] requests {sum(s.requests for s in fr):7d}  "
                 f"{rate:7.1f} MiB/s  grant entries in use {' '.join(use)}  deferred loads "
                 f"{sum(s.deferred_loads for s in fr):5d}")
        self.cancel = self.host.sched.call_later(1.0, self.tick)

    def stop(self) -> None:
        if self.cancel is not None:
            self.cancel()
            self.cancel = None
        if self.view is not None:
            self.view.stop()


@dataclass(eq=False)
class _Disk:
    """A disk of the job: its vbd, its image, and how the workload uses it."""

    vbd: Vbd
    image: OpenImage
    load: DiskLoad
    threads: int = 0  #: threads of random I/O
    region: int = 0  #: sectors each thread owns

    @property
    def rio_sectors(self) -> int:
        """Sectors of the random I/O area: the first half, or all of a 1-sector disk."""
        sectors = self.vbd.sc.xbd_media_size // SECTOR
        return sectors // 2 if sectors >= 2 else sectors


def _attach(host: Host, gp: GuestPlan, gi: int, images: OpenImages,
            log: Callable[[str], None], net: NetJob | None) -> tuple[Guest, list[_Disk]]:
    cfg = gp.config
    try:
        guest, vbds = create_guest_from_config(
            host, cfg, None,
            images=[images.by_disk[gi, di].image for di in range(len(gp.disks))],
            before_disks=None if net is None else lambda g: attach_guest_vifs(net, cfg, g))
    except GuestCrashed as e:
        # The host destroys it (on_crash=destroy); the other guests go on.
        log(f"{cfg.name}: crashed while it was created ({e.why}); destroyed")
        return e.guest, []
    disks = []
    for di, v in enumerate(vbds):
        oi = images.by_disk[gi, di]
        load = DiskLoad(f"{guest.name}/{v.vdev}", v.sc, base=oi.base, readonly=v.readonly)
        disks.append(_Disk(v, oi, load))
    log(f"{guest.name}: domid {guest.domid}, {cfg.memory} MiB, max_grant_frames "
        f"{cfg.max_grant_frames}, disks "
        + (", ".join(f"{d.vbd.vdev} ({_size(d.vbd.sc.xbd_media_size)}, {d.vbd.spec.access}, "
                     f"{d.image.plan.mode})" for d in disks) or "none"))
    return guest, disks


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n} bytes"


def run_block_job(host: Host, report: Report, plan: RunPlan, images: OpenImages, *,
                  duration: float, threads: int, seed: int,
                  log: Callable[[str], None] = print,
                  pause: Callable[[], None] | None = None,
                  phase: Callable[[str], None] = lambda _p: None,
                  stall_timeout: float = DEFAULT_STALL_TIMEOUT,
                  view: RunView | None = None,
                  on_attached: Callable[[list[Vbd], NetJob | None], None] | None = None,
                  ) -> list[dict[str, Any]]:
    """Create the guests and disks of ``plan``, run the workloads, detach; their figures.

    ``pause`` runs after the workloads, while the guests and disks are still up
    (``gntdma run --hold``); ``phase`` is told what the job is doing;
    ``on_attached`` is given the disks and the network once they are attached
    (``gntdma xl`` may detach them); ``view``
    shows the dashboard and records the series while the workloads run.

    Raises:
        Stalled: no I/O completed for ``stall_timeout`` seconds of the workloads.
    """
    guests: list[Guest] = []
    disks_of: list[list[_Disk]] = []
    phase("attaching the disks")
    net = make_netjob(host, plan, log)
    for gi, gp in enumerate(plan.guests):
        guest, disks = _attach(host, gp, gi, images, log, net)
        guests.append(guest)
        disks_of.append(disks)
    every = [d for ds in disks_of for d in ds]
    if on_attached is not None:
        on_attached([d.vbd for d in every], net)
    warnings = [f"warning: {d.load.name}: the config can only just run: "
                f"{d.vbd.sc.xbd_sizing_note}" for d in every if d.vbd.sc.xbd_sizing_note]
    for w in warnings:
        log(w)
    report.figures["warnings"] = warnings
    report.check("guests created and their disks connected through xenstore",
                 all(d.vbd.statistics().frontend_state == "Connected" for d in every),
                 f"{len(guests)} guest{'s' if len(guests) != 1 else ''}, {len(every)} disks"
                 + "".join(f", {d.load.name} {d.vbd.statistics().frontend_state}"
                           for d in every))
    phase("running the workloads")
    _workloads(host, report, plan, guests, every, duration, threads, seed, log, stall_timeout,
               view)
    if net is not None:
        net.run(report, seed)
    figures = [_figures(host, g, gp, ds) for g, gp, ds in zip(guests, plan.guests, disks_of,
                                                          strict=True)]
    if net is not None:
        for g, fig in zip(guests, figures, strict=True):
            fig["vifs"] = net.figures(g)
    if pause is not None:
        pause()
    if net is not None:
        phase("detaching the vifs")
        report.check("vifs detached with the libxl sequence, namespaces and TAPs removed",
                     net.detach(), "unplug: online=0 + Closing, backend Closed")
    phase("detaching the disks")
    for g, ds, fig in zip(guests, disks_of, figures, strict=True):
        detached = True
        if g.name not in host.crashed:
            detached = all([detach_disk(host, d.vbd) for d in reversed(ds)])
        crash = host.crashes.get(g.name)
        if crash is not None:  # the toolstack destroyed it when it crashed
            host.wait_crashes()
            fig["crashed"] = crash.why
            _check_crash_teardown(report, crash)
            continue
        left = g.gnttab.statistics()
        fig["leaked_grant_refs"] = left.allocated
        report.check(f"{g.name}: no grant reference left after the disks detached",
                     left.allocated == 0 and left.granted == 0,
                     f"{left.allocated} allocated, {left.granted} granted")
        host.destroy_guest(g)
        report.check(f"{g.name}: disks detached with the libxl sequence and the guest "
                     "destroyed", detached,
                     "unplug: online=0 + Closing, backend Closed, directories removed")
    return figures


def _check_crash_teardown(report: Report, crash: CrashTeardown) -> None:
    done = crash.done_at is not None
    took = f"{crash.done_at - crash.at:.2f} s" if crash.done_at is not None else "not done"
    report.check(f"{crash.name}: crashed guest destroyed, its devices torn down in dom0 "
                 "(on_crash=destroy)", done and crash.clean,
                 f"{', '.join(crash.devices) or 'no devices'}: frontend directories removed, "
                 f"backends {'closed' if crash.clean else 'did not close in time'}, "
                 f"domain destroyed ({took} after the crash)")


def _workloads(host: Host, report: Report, plan: RunPlan, guests: Sequence[Guest],
               disks: Sequence[_Disk], duration: float, threads: int, seed: int,
               log: Callable[[str], None], stall_timeout: float,
               view: RunView | None = None) -> None:
    for d in disks:
        d.threads = max(1, min(threads, d.rio_sectors))
        d.region = d.rio_sectors // d.threads
    _size_runs(disks, log)
    progress = _Progress(host, guests, [d.vbd for d in disks], log, view)
    watchdog = _StallWatchdog(host, guests, disks, stall_timeout)
    try:
        if disks:
            ro = sum(1 for d in disks if d.load.readonly)
            log(f"verified random I/O: up to {threads} threads per disk for {duration:g} s"
                + (f" ({ro} read-only disk{'s' if ro != 1 else ''}: reads checked against "
                   "the image)" if ro else ""))
            verified_random_io(host.sched, [d.load for d in disks],
                               threads=[d.threads for d in disks], duration=duration,
                               seed=seed, region_sectors=[d.region for d in disks])
        # A guest that crashed meanwhile is destroyed by then (its threads are gone).
        host.wait_crashes()
    except (Stalled, HungTask, Deadlock) as e:  # the watchdogs (stall, hung task), a deadlock
        if view is not None:
            view.watchdog(str(e))
        raise
    finally:
        progress.stop()
    try:
        live = [d for d in disks if d.vbd.guest.name not in host.crashed]
        _check_workloads(host, report, plan, guests, live, seed,
                         crashed=len(disks) - len(live))
    finally:
        watchdog.stop()


def _check_workloads(host: Host, report: Report, plan: RunPlan, guests: Sequence[Guest],
                     disks: Sequence[_Disk], seed: int, crashed: int = 0) -> None:
    """The checks of the workloads on ``disks`` (those of guests that did not crash:
    ``crashed`` more were lost with their guest, whose crash is a check of its own)."""
    loads = [d.load for d in disks]
    errors = [e for ld in loads for e in ld.errors]
    verified = sum(ld.bytes_verified for ld in loads)
    if not disks:
        report.check("verified random I/O: no disks" + (" of a running guest" if crashed
                     else "") + ", nothing to do", True,
                     f"every disk's guest crashed ({crashed} disks)" if crashed
                     else "no disk in the config(s)")
    else:
        report.check("verified random I/O: every sector read back as written (or as the "
                     "image held it)", not errors and all(ld.bytes_verified > 0 for ld in loads),
                     "; ".join(errors[:3]) or f"{_size(verified)} verified, "
                     f"{sum(ld.writes for ld in loads)} writes, "
                     f"{sum(ld.reads for ld in loads)} reads"
                     + (f" ({crashed} disks of crashed guests not counted)" if crashed else ""))
    big = [d for d in disks if min(d.region, d.load.max_run) >= _INDIRECT_SECTORS
           and d.vbd.sc.xbd_max_request_segments > BLKIF_MAX_SEGMENTS_PER_REQUEST]
    fr = [d.vbd.statistics().frontend for d in big]
    if big:
        direct = sum(s.direct_requests for s in fr)
        indirect = sum(s.indirect_requests for s in fr)
        report.check("direct and indirect requests both used", direct > 0 and indirect > 0,
                     f"{direct} direct, {indirect} indirect")
    if any(g.is_default for g in plan.guests):
        deferred = sum(d.vbd.statistics().frontend.deferred_loads for d in disks)
        peak = max((g.gnttab.statistics().peak_allocated for g in guests
                    if g.name not in host.crashed), default=0)
        report.check("loads deferred on the small grant table, and all completed",
                     deferred > 0 and not errors,
                     f"{deferred} deferred loads, peak "
                     f"{peak} grant "
                     "references")
    for d in disks:
        # A guest that crashes during the copy takes the copy with it: the next disk.
        if (not d.load.readonly and d.vbd.guest.name not in host.crashed
                and _copy_and_discard(host, report, d, seed)):
            break


def _size_runs(disks: Sequence[_Disk], log: Callable[[str], None]) -> None:
    """Bound each thread's largest run so that every thread's buffer fits at once in
    half the memory its guest has free (the rest is for the kernel): a thread never
    waits for memory that can never be free (issue 11)."""
    by_kernel: dict[int, list[_Disk]] = {}
    for d in disks:
        by_kernel.setdefault(id(d.vbd.sc.xbd_kern), []).append(d)
    for ds in by_kernel.values():
        kern = ds[0].vbd.sc.xbd_kern
        nthreads = sum(d.threads for d in ds)
        per_thread = kern.vm.nfree * 4096 // (2 * nthreads) // SECTOR
        max_run = max((r for r in RUN_SECTORS if r <= per_thread), default=1)
        for d in ds:
            d.load.max_run = max_run
        if max_run < RUN_SECTORS[-1]:
            log(f"warning: {kern.name}: the config can only just run: {kern.vm.nfree * 4} "
                f"KiB free for {nthreads} I/O threads: runs of at most {max_run * SECTOR >> 10}"
                " KiB")


T = TypeVar("T")


class _GuestGone(Exception):
    """The guest a toolstack job ran in crashed and was destroyed meanwhile."""


def _in_guest(host: Host, guest: Guest, fn: Callable[[], T], name: str) -> T:
    """``fn()`` on a thread of ``guest``'s kernel, as a process of that guest: a crash
    of the guest meanwhile kills it with the guest's other threads (DESIGN 3), and
    :class:`_GuestGone` is raised once the guest is destroyed. Run on thread0 or in
    a thread of no domain, the guest's driver code would go on after the crash, into
    the memory the destruction released."""
    t = host.sched.spawn(fn, name=f"{guest.name}/{name}", domain=guest.kernel)
    host.sched.run(until=lambda: t.state is ThreadState.DONE)
    if guest.name in host.crashed:
        host.wait_crashes()
        raise _GuestGone(guest.name)
    if t.exc is not None:
        raise t.exc
    return t.result  # type: ignore[return-value]


def _copy_and_discard(host: Host, report: Report, d: _Disk, seed: int) -> bool:
    """The file copy and the flush and discard on ``d``: False if its guest crashed
    meanwhile (the checks not made; the crash is a check of its own)."""
    try:
        _copy_and_discard_in(host, report, d, seed)
    except _GuestGone:
        return False
    return True


def _copy_and_discard_in(host: Host, report: Report, d: _Disk, seed: int) -> None:
    v = d.vbd
    start = d.rio_sectors * SECTOR
    room = v.sc.xbd_media_size - start
    nbytes = min(16 << 20, room // 2) // SECTOR * SECTOR
    if nbytes > 1 << 20:
        nbytes = nbytes // (1 << 20) * (1 << 20)
    chunk = d.load.max_run * SECTOR  # what a buffer of the guest may hold
    if nbytes > 0:
        ok, detail = _in_guest(host, v.guest, lambda: file_copy(
            XbdFile(v.sc, chunk=chunk), start, nbytes, seed, chunk=chunk), "copy")
        report.check(f"a file copied onto {d.load.name} and back: equal SHA-256", ok, detail)
    length = min(1 << 20, chunk, room - nbytes) // 4096 * 4096
    if length >= 3 * 4096:
        ok, detail = flush_discard(host.sched, v.sc, start + nbytes, length,
                                   lambda fn: _in_guest(host, v.guest, fn, f"{v.vdev}/flush"))
        report.check(f"flush and discard on {d.load.name}", ok, detail)


def _figures(host: Host, guest: Guest, gp: GuestPlan, disks: Sequence[_Disk]
             ) -> dict[str, Any]:
    fr = [d.vbd.statistics().frontend for d in disks]
    out = []
    for d, s in zip(disks, fr, strict=True):
        out.append({
            "vdev": d.vbd.vdev,
            "image": str(d.image.plan.path) if not gp.is_default else None,
            "mode": d.image.plan.mode,
            "size": d.vbd.sc.xbd_media_size,
            "requests": s.requests,
            "indirect_requests": s.indirect_requests,
            "bytes_read": s.bytes_read,
            "bytes_written": s.bytes_written,
            "bytes_verified": d.load.bytes_verified,
            "errors": s.errors,
            "deferred_loads": s.deferred_loads,
        })
    # A crashed guest was destroyed: its grant table is gone with its memory.
    peak = (guest.gnttab.statistics().peak_allocated if guest.name not in host.crashed
            else None)
    return {
        "name": guest.name,
        "config": gp.config.source,
        "domid": guest.domid,
        "memory": gp.config.memory,
        "max_grant_frames": gp.config.max_grant_frames,
        "grant_entries_peak": peak,
        "deferred_loads": sum(s.deferred_loads for s in fr),
        "busdma_grant_deferred": (_impl(guest).statistics().grant_deferred
                                  if guest.name not in host.crashed else None),
        "disks": out,
    }
