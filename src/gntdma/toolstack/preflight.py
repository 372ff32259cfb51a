"""Everything ``gntdma run`` checks before it builds anything.

:func:`check_options` and :func:`check_output` take the command line's values;
:func:`plan_run` reads every config, looks at every disk image and decides what
the run will do to it (:class:`DiskPlan`). Any problem raises
:class:`~gntdma.errors.ConfigError` with ``file:line: message``, so that a run
that starts has everything it needs and a refused one has touched nothing.

What happens to images (the README's "Images" section says the same):

- a target that does not exist is created sparse at its ``size=`` and written
  directly; it stays after the run (the config names it);
- an existing target of a read-write disk is opened as a snapshot (QEMU's
  ``-snapshot``): the guest's writes go to a temporary overlay, removed at the
  end, and the image is never modified; ``--overwrite`` writes it directly
  instead (its data is lost, as with fio on a device);
- a read-only disk gets a read-only workload that checks what the guest reads
  against the image's own bytes.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from gntdma.errors import ConfigError
from gntdma.host.netns import net_unavailable
from gntdma.toolstack.xlcfg import DiskSpec, GuestConfig, XlConfigError, load_config
from gntdma.toolstack.xlvif import VifSpec, vif_clash

__all__ = [
    "DOM0_MEMORY_MB",
    "MAX_THREADS",
    "MIN_MEMORY_MB",
    "VIF_STANDING_REFS",
    "DiskPlan",
    "GuestPlan",
    "RunPlan",
    "check_not_inputs",
    "check_options",
    "check_output",
    "input_files",
    "plan_run",
]

#: Threads per disk at most; more are capped with a note.
MAX_THREADS: Final = 64
#: The least guest memory a run accepts: with less, blkfront cannot connect a disk
#: (ring and command pool); from 3 MiB the I/O runs are sized to what is free.
MIN_MEMORY_MB: Final = 3
#: dom0's and the self-test guest's memory, counted against the machine.
DOM0_MEMORY_MB: Final = 64
#: The name the host's dom0 carries, as in xl: no guest may take it (libxl refuses
#: a name already in use, ``libxl__domain_rename``).
DOM0_NAME: Final = "Domain-0"
SELFTEST_MEMORY_MB: Final = 16
#: Handles in dom0's maptrack: 1024 frames of 256 (``struct grant_mapping``).
DOM0_MAPTRACK_HANDLES: Final = 1024 * 256
#: Grant references a frame holds (v1: 512 entries of 8 bytes).
REFS_PER_FRAME: Final = 512
_SECTOR: Final = 512
#: Grant entries Xen keeps for itself in every table (GNTTAB_NR_RESERVED_ENTRIES).
RESERVED_REFS: Final = 8
#: netfront's queues (XN_DEFAULT_QUEUES) and its rx ring's slots (NET_RX_RING_SIZE).
VIF_QUEUES: Final = 2
NET_RX_RING_SIZE: Final = 256
#: References a vif holds for as long as it is connected: per queue, the tx and
#: rx ring pages and the rx pool of NET_RX_RING_SIZE + 1 prealloc maps.
VIF_STANDING_REFS: Final = VIF_QUEUES * (2 + NET_RX_RING_SIZE + 1)
#: A vif's least transient need: one packet of MAX_TX_REQ_FRAGS slots per queue.
VIF_TX_REFS: Final = VIF_QUEUES * (65536 // 4096 + 2)
#: A disk's least need: its ring page and one direct request of 11 segments.
DISK_MIN_REFS: Final = 1 + 11


@dataclass(frozen=True, slots=True)
class DiskPlan:
    """One disk of one guest and what the run does to its image."""

    spec: DiskSpec
    path: Path
    #: ``create`` (new, written directly), ``snapshot`` (existing, writes to a
    #: temporary overlay), ``overwrite`` (existing, written: ``--overwrite``),
    #: ``readonly`` (read-only disk, read-only workload)
    mode: str
    exists: bool  #: whether the image existed when the run was planned


@dataclass(frozen=True, slots=True)
class GuestPlan:
    config: GuestConfig
    disks: tuple[DiskPlan, ...]
    is_default: bool = False


@dataclass(slots=True)
class RunPlan:
    guests: list[GuestPlan]
    notes: list[str] = field(default_factory=list)
    #: Why the default guest runs without its NIC (no root, no /dev/net/tun), or None.
    net_unavailable: str | None = None


def _phys_memory_mb() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20
    except (ValueError, OSError, AttributeError):
        return 1 << 30


def check_options(*, duration: float, threads: int, seed: int) -> tuple[int, list[str]]:
    """The threads per disk to use, and notes; raises ConfigError for an absurd value."""
    if not math.isfinite(duration) or duration <= 0:
        raise ConfigError(f"--duration must be a positive number of seconds, not {duration}")
    if duration > 1e7:
        raise ConfigError(f"--duration {duration:g} is more than 10^7 seconds")
    if threads < 1:
        raise ConfigError(f"--threads must be at least 1, not {threads}")
    if not 0 <= seed < 1 << 64:
        raise ConfigError(f"--seed must be from 0 to 2**64-1, not {seed}")
    if threads > MAX_THREADS:
        return MAX_THREADS, [f"note: --threads {threads} capped at {MAX_THREADS} per disk"]
    return threads, []


def check_output(path: Path | None, option: str) -> None:
    """A file the run will write must be writable before the run starts.

    Tried for real, not with ``os.access`` (which says yes to root for a file in
    /proc or on a read-only file system): an existing file is opened for writing
    without truncating it; a missing one is created and removed again.
    """
    if path is None:
        return
    if path.is_dir():
        raise ConfigError(f"{option} {path}: is a directory")
    parent = path.parent if str(path.parent) != "" else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"{option} {path}: no such directory {parent}")
    existed = os.path.lexists(path)
    try:
        # O_NONBLOCK: a FIFO with no reader is refused (ENXIO), not waited on.
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK
                     | (0 if existed else os.O_CREAT | os.O_EXCL), 0o644)
    except OSError as e:
        what = "not writable" if existed else f"cannot create a file in {parent}"
        raise ConfigError(f"{option} {path}: {what} ({e.strerror or e})") from None
    os.close(fd)
    if not existed:
        os.unlink(path)


def input_files(configs: Sequence[Path]) -> list[tuple[Path, str]]:
    """What a run reads or changes in place, with what it is: each config and each
    disk image it names. An output option must never name one of them. A config
    that cannot be read is left out (the run itself reports it)."""
    out: list[tuple[Path, str]] = []
    for p in configs:
        out.append((p, f"the config {p}"))
        try:
            cfg = load_config(p)
        except (ConfigError, OSError):
            continue
        for spec in cfg.disks:
            out.append((spec.path(cfg.base_dir), f"the disk image of {spec.vdev} in {p}"))
    return out


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # hard links too
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_not_inputs(outputs: Sequence[tuple[str, Path | None]],
                     inputs: Sequence[tuple[Path, str]]) -> None:
    """Refuse an output option that names an input of the run (DESIGN 11: an
    existing image is never overwritten without an explicit option, and no user
    file is lost).

    Raises:
        ConfigError: naming the option and what the file is.
    """
    for option, path in outputs:
        if path is None:
            continue
        for inp, what in inputs:
            if _same(path, inp):
                raise ConfigError(f"{option} {path} is {what}: refused (it would be "
                                  "overwritten)")


def _where(cfg: GuestConfig, spec: DiskSpec) -> str:
    return f"{cfg.source}:{spec.line}"


def _plan_disk(cfg: GuestConfig, spec: DiskSpec, base: Path, overwrite: bool) -> DiskPlan:
    path = spec.path(base)

    def fail(msg: str) -> ConfigError:
        return XlConfigError(cfg.source, spec.line, f"disk {spec.vdev}: {msg}")

    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise fail(f"cannot look at {path}: {e.strerror}") from None
    if st is None:
        if os.path.lexists(path):
            raise fail(f"{path} is a symbolic link to nothing")
        if spec.size is None:
            raise fail(f"{path} does not exist (give size= to create it)")
        parent = path.parent
        if not parent.is_dir():
            raise fail(f"cannot create {path}: no such directory {parent}")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise fail(f"cannot create {path}: {parent} is not writable")
        vfs = os.statvfs(parent)
        free = vfs.f_bavail * vfs.f_frsize
        if spec.size > free:
            raise fail(f"size={spec.size >> 20} MiB is more than the {free >> 20} MiB free "
                       f"on the file system of {parent}")
        return DiskPlan(spec, path, "readonly" if spec.readonly else "create", False)
    if stat.S_ISDIR(st.st_mode):
        raise fail(f"{path} is a directory, not a disk image")
    if not stat.S_ISREG(st.st_mode):
        raise fail(f"{path} is not a regular file")
    if st.st_size == 0 or st.st_size % _SECTOR != 0:
        raise fail(f"{path} has {st.st_size} bytes, not a positive multiple of {_SECTOR}")
    if spec.size is not None and spec.size != st.st_size:
        raise fail(f"{path} exists with {st.st_size} bytes, not the size={spec.size} "
                   "of the config")
    if not os.access(path, os.R_OK):
        raise fail(f"{path} is not readable")
    if spec.readonly:
        return DiskPlan(spec, path, "readonly", True)
    if overwrite:
        if not os.access(path, os.W_OK):
            raise fail(f"{path} is not writable (--overwrite)")
        return DiskPlan(spec, path, "overwrite", True)
    return DiskPlan(spec, path, "snapshot", True)


def _identity(path: Path) -> tuple[object, ...]:
    """The same file has the same identity however it is named."""
    try:
        st = os.stat(path)
    except OSError:
        return ("path", os.path.realpath(path))
    return ("inode", st.st_dev, st.st_ino)


def plan_run(configs: Sequence[Path], *, overwrite: bool = False,
             default: GuestConfig | None = None, default_image_dir: Path | None = None
             ) -> RunPlan:
    """Read and check every config and disk; raises ConfigError at the first problem.

    With no ``configs``, ``default`` (its images in ``default_image_dir``,
    gntdma's own) is the one guest.
    """
    cfgs: list[tuple[GuestConfig, Path, bool]] = []
    if configs:
        for p in configs:
            if p.is_dir():
                raise ConfigError(f"{p}: is a directory, not a config file")
            c = load_config(p)
            cfgs.append((c, c.base_dir, False))
    else:
        assert default is not None and default_image_dir is not None
        cfgs.append((default, default_image_dir, True))
    plan = RunPlan([])
    names: dict[str, str] = {}
    files: dict[tuple[object, ...], str] = {}
    phys = _phys_memory_mb()
    total_memory = DOM0_MEMORY_MB + SELFTEST_MEMORY_MB
    total_refs = 0
    all_vifs: list[VifSpec] = []
    for cfg, base, is_default in cfgs:
        plan.notes.extend(cfg.notes)
        if cfg.name == DOM0_NAME:
            raise XlConfigError(cfg.source, cfg.line_of("name"), f"guest name "
                                f"{cfg.name!r} is already in use by dom0")
        if cfg.name in names:
            raise XlConfigError(cfg.source, cfg.line_of("name"), f"guest name "
                                f"{cfg.name!r} is already the name of the guest of "
                                f"{names[cfg.name]}")
        names[cfg.name] = cfg.source
        if cfg.memory < MIN_MEMORY_MB:
            raise XlConfigError(cfg.source, cfg.line_of("memory"), f"memory = "
                                f"{cfg.memory} MiB is too small: a guest needs at least "
                                f"{MIN_MEMORY_MB} MiB")
        if cfg.memory > phys:
            raise XlConfigError(cfg.source, cfg.line_of("memory"), f"memory = "
                                f"{cfg.memory} MiB is more than this machine has "
                                f"({phys} MiB)")
        total_memory += cfg.memory
        total_refs += cfg.max_grant_frames * REFS_PER_FRAME
        disks: list[DiskPlan] = []
        for spec in cfg.disks:
            d = _plan_disk(cfg, spec, base, overwrite)
            key = _identity(d.path)
            other = files.get(key)
            if other is not None:
                raise XlConfigError(cfg.source, spec.line, f"disk {spec.vdev}: {d.path} is "
                                    f"the same file as the disk on {other}")
            files[key] = _where(cfg, spec)
            disks.append(d)
        _check_grant_budget(cfg)
        for v in cfg.vifs:
            clash = vif_clash(v, all_vifs)
            if clash is not None:
                raise XlConfigError(cfg.source, v.line, f"vif {v.text!r}: {clash} (in "
                                    "another config)")
            all_vifs.append(v)
            if v.netns is not None and os.path.exists(f"/run/netns/{v.netns}"):
                raise XlConfigError(cfg.source, v.line, f"vif {v.text!r}: network "
                                    f"namespace {v.netns} exists already")
        plan.guests.append(GuestPlan(cfg, tuple(disks), is_default))
    _check_net(plan)
    if total_memory > phys:
        raise ConfigError(f"the guests need {total_memory} MiB with dom0's, more than this "
                          f"machine has ({phys} MiB)")
    if total_refs > DOM0_MAPTRACK_HANDLES:
        raise ConfigError(f"the guests may grant {total_refs} references together, more "
                          f"than dom0's maptrack can map ({DOM0_MAPTRACK_HANDLES} handles)")
    return plan


def _check_grant_budget(cfg: GuestConfig) -> None:
    """A table too small for what the vifs hold for life (and the disks' least) is refused."""
    if not cfg.vifs:
        return
    capacity = cfg.max_grant_frames * REFS_PER_FRAME - RESERVED_REFS
    vifs = len(cfg.vifs) * (VIF_STANDING_REFS + VIF_TX_REFS)
    disks = len(cfg.disks) * DISK_MIN_REFS
    if vifs + disks > capacity:
        need = -(-(vifs + disks + RESERVED_REFS) // REFS_PER_FRAME)
        raise XlConfigError(
            cfg.source, cfg.line_of("max_grant_frames") or cfg.vifs[0].line,
            f"max_grant_frames = {cfg.max_grant_frames} gives {capacity} grant references; "
            f"{len(cfg.vifs)} vif{'s' if len(cfg.vifs) != 1 else ''} hold "
            f"{len(cfg.vifs) * VIF_STANDING_REFS} for life ({VIF_QUEUES} queues of 2 ring "
            f"pages and {NET_RX_RING_SIZE + 1} rx buffers) and need "
            f"{len(cfg.vifs) * VIF_TX_REFS} to send, and {len(cfg.disks)} disk"
            f"{'s' if len(cfg.disks) != 1 else ''} need at least {disks}: "
            f"max_grant_frames = {need} at least")


def _check_net(plan: RunPlan) -> None:
    """Without root or /dev/net/tun a config's NIC is refused; the default goes without."""
    with_vifs = [gp for gp in plan.guests if gp.config.vifs]
    if not with_vifs:
        return
    why = net_unavailable()
    if why is None:
        return
    for gp in with_vifs:
        if not gp.is_default:
            cfg = gp.config
            raise XlConfigError(cfg.source, cfg.vifs[0].line, f"vif: cannot give "
                                f"{cfg.name} a NIC here: {why}")
    plan.net_unavailable = why
    plan.notes.append(f"note: the default guest runs without its NIC: {why}")
