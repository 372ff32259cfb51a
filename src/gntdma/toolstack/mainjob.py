"""The block part of ``gntdma run``: a guest from a config, its disks, the workloads.

The guest is created from an xl.cfg-style config (the built-in default has one
guest with two disks and a grant table small enough that loads defer), its
disks attach through xenstore with blkfront on the Xen bus_dma handlers and
blkback on image files, and the workloads run on them while a progress line
shows requests, throughput, grant entries in use and deferred loads. Then the
disks detach with the libxl sequence and the guest is destroyed.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from gntdma.toolstack.domains import create_guest_from_config
from gntdma.toolstack.host import Guest, Host
from gntdma.toolstack.report import Report
from gntdma.toolstack.vbd import Vbd, detach_disk
from gntdma.toolstack.workload import DiskLoad, file_copy, flush_discard, verified_random_io
from gntdma.toolstack.xlcfg import GuestConfig, parse_config
from gntdma.xen.busdma import XenDmaImpl

__all__ = ["DEFAULT_CONFIG", "load_config", "run_block_job"]

#: The built-in default of ``gntdma run``.
DEFAULT_CONFIG: Final = """\
# gntdma run's built-in default: one guest, two disks, and a grant table
# small enough (two frames: 1016 references) that bus_dma loads defer.
name = "guest1"
memory = 64
max_grant_frames = 2
max_maptrack_frames = 1024
disk = [ 'format=raw, vdev=xvda, access=rw, size=64M, target=guest1-xvda.img',
         'format=raw, vdev=xvdb, access=rw, size=64M, target=guest1-xvdb.img' ]
"""

SECTOR: Final = 512


def load_config(path: Path | None) -> tuple[GuestConfig, bool]:
    """The config at ``path``, or the built-in default; (config, is_default)."""
    if path is None:
        return parse_config(DEFAULT_CONFIG, "<built-in default>"), True
    return parse_config(path.read_text(), str(path)), False


def _impl(g: Guest) -> XenDmaImpl:
    from gntdma.sys import kernel_state

    impl = kernel_state(g.kernel).impls["xen"]
    assert isinstance(impl, XenDmaImpl)
    return impl


class _Progress:
    """A progress line a second, from a hub timer (it never blocks)."""

    def __init__(self, host: Host, guest: Guest, vbds: list[Vbd],
                 log: Callable[[str], None]) -> None:
        self.host, self.guest, self.vbds, self.log = host, guest, vbds, log
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
        gst = self.guest.gnttab.statistics()
        self.log(f"  [{now - self.t0:5.1f}s] requests {sum(s.requests for s in fr):7d}  "
                 f"{rate:7.1f} MiB/s  grant entries in use {gst.allocated:4d}/"
                 f"{gst.nr_frames * 512 - 8}  deferred loads "
                 f"{sum(s.deferred_loads for s in fr):5d}")
        self.cancel = self.host.sched.call_later(1.0, self.tick)

    def stop(self) -> None:
        if self.cancel is not None:
            self.cancel()
            self.cancel = None


def run_block_job(host: Host, report: Report, cfg: GuestConfig, *, is_default: bool,
                  duration: float, threads: int, seed: int, image_dir: Path | None,
                  log: Callable[[str], None] = print,
                  pause: Callable[[], None] | None = None) -> dict[str, Any]:
    """Create the guest and disks of ``cfg``, run the workloads, detach; the guest's figures.

    ``pause`` runs after the workloads, while the guest and its disks are still
    up (``gntdma run --hold``).
    """
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if image_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="gntdma-images-")
        image_dir = Path(tmp.name)
    try:
        return _run(host, report, cfg, is_default, duration, threads, seed, image_dir, log,
                    pause)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _run(host: Host, report: Report, cfg: GuestConfig, is_default: bool, duration: float,
         threads: int, seed: int, image_dir: Path, log: Callable[[str], None],
         pause: Callable[[], None] | None) -> dict[str, Any]:
    guest, vbds = create_guest_from_config(host, cfg, image_dir)
    log(f"{guest.name}: domid {guest.domid}, {cfg.memory} MiB, max_grant_frames "
        f"{cfg.max_grant_frames}, disks "
        + ", ".join(f"{v.vdev} ({v.sc.xbd_media_size >> 20} MiB, {v.spec.access})"
                    for v in vbds))
    report.check("guest created and its disks connected through xenstore",
                 all(v.statistics().frontend_state == "Connected" for v in vbds),
                 f"{len(vbds)} disks: " + ", ".join(
                     f"{v.vdev} {v.statistics().frontend_state}" for v in vbds))
    rw = [v for v in vbds if not v.readonly]
    loads = [DiskLoad(v.vdev, v.sc) for v in rw]
    progress = _Progress(host, guest, vbds, log)
    try:
        if loads:
            region = min(v.sc.xbd_media_size for v in rw) // 2 // threads // SECTOR
            log(f"verified random I/O: {threads} threads per disk for {duration:g} s")
            verified_random_io(host.sched, loads, threads=threads, duration=duration,
                               seed=seed, region_sectors=region)
    finally:
        progress.stop()
    errors = [e for ld in loads for e in ld.errors]
    verified = sum(ld.bytes_verified for ld in loads)
    report.check("verified random I/O: every sector read back as written",
                 bool(loads) and not errors and verified > 0,
                 "; ".join(errors[:3]) or f"{verified >> 20} MiB verified, "
                 f"{sum(ld.writes for ld in loads)} writes, {sum(ld.reads for ld in loads)} "
                 "reads")
    fr = [v.statistics().frontend for v in vbds]
    direct = sum(s.direct_requests for s in fr)
    indirect = sum(s.indirect_requests for s in fr)
    report.check("direct and indirect requests both used", direct > 0 and indirect > 0,
                 f"{direct} direct, {indirect} indirect")
    deferred = sum(s.deferred_loads for s in fr)
    if is_default:
        report.check("loads deferred on the small grant table, and all completed",
                     deferred > 0 and not errors,
                     f"{deferred} deferred loads, peak "
                     f"{guest.gnttab.statistics().peak_allocated} grant references")
    if rw:
        v = rw[0]
        half = v.sc.xbd_media_size // 2
        nbytes = min(16 << 20, half // 2) // (1 << 20) * (1 << 20)
        ok, detail = file_copy(v.file, half, nbytes, seed)
        report.check(f"large file copied onto {v.vdev} and back: equal SHA-256", ok, detail)
        ok, detail = flush_discard(host.sched, v.sc, half + nbytes, 1 << 20,
                                   lambda fn: host.sched.call(fn, name=f"{v.vdev}/flush"))
        report.check(f"flush and discard on {v.vdev}", ok, detail)
    fr = [v.statistics().frontend for v in vbds]
    disks = []
    for v, s in zip(vbds, fr, strict=True):
        load = next((ld for ld in loads if ld.name == v.vdev), None)
        disks.append({
            "vdev": v.vdev,
            "requests": s.requests,
            "indirect_requests": s.indirect_requests,
            "bytes_read": s.bytes_read,
            "bytes_written": s.bytes_written,
            "bytes_verified": load.bytes_verified if load is not None else 0,
            "errors": s.errors,
            "deferred_loads": s.deferred_loads,
        })
    gst = guest.gnttab.statistics()
    figures: dict[str, Any] = {
        "name": guest.name,
        "domid": guest.domid,
        "max_grant_frames": cfg.max_grant_frames,
        "grant_entries_peak": gst.peak_allocated,
        "deferred_loads": sum(s.deferred_loads for s in fr),
        "busdma_grant_deferred": _impl(guest).statistics().grant_deferred,
        "disks": disks,
    }
    if pause is not None:
        pause()
    detached = all([detach_disk(host, v) for v in reversed(vbds)])
    left = guest.gnttab.statistics()
    figures["leaked_grant_refs"] = left.allocated
    report.check("no grant reference left after the disks detached",
                 left.allocated == 0 and left.granted == 0,
                 f"{left.allocated} allocated, {left.granted} granted")
    host.destroy_guest(guest)
    report.check("disks detached with the libxl sequence and the guest destroyed", detached,
                 "unplug: online=0 + Closing, backend Closed, directories removed")
    return figures
