"""Virtual block devices: what ``xl block-attach`` and ``xl block-detach`` do.

:func:`attach_disk` gives a guest a disk from an ``xl`` disk specification:

1. the raw image at the spec's target (relative to ``image_dir``), created
   sparse at ``size=`` when it does not exist, opened read-only for
   ``access=ro``;
2. a :class:`~gntdma.dev.blkback.Blkback` in dom0 serving it (worker threads
   start when the frontend connects);
3. both device directories in one transaction, as libxl lays them out
   (:meth:`~gntdma.toolstack.xs.HostXenstore.add_device`): backend
   ``/local/domain/0/backend/vbd/<domid>/<devid>`` with ``params``, ``type``,
   ``mode``, ``dev``, ``removable``, ``bootable``, ``device-type``,
   ``discard-enable``; frontend ``/local/domain/<domid>/device/vbd/<devid>``
   with ``virtual-device`` and ``device-type``; ``devid`` from the vdev as
   libxl computes it (xvda 51712, xvdb 51728, ...);
4. the backend's xenbus driver in dom0 and blkfront's in the guest, which
   negotiate through xenstore alone (``xen-abi.md`` 4.5);
5. a wait until both ends are Connected.

:func:`detach_disk` is libxl's unplug: ``online`` = 0 and backend ``state`` =
Closing in one transaction, a wait (``timeout``, libxl's 10 s) for the backend
to reach Closed, then both directories removed. Meanwhile the frontend lets
what is on the ring complete, fails the rest with ENXIO, goes Closing; the
backend drains and unmaps; the frontend frees everything (once) and goes
Closed; the backend goes Closed and its driver ends. Then the image is
closed. It works while threads are doing I/O on the disk.

Errors raise :class:`VbdError` (a :class:`~gntdma.errors.GntdmaError`).
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, final

from gntdma.dev.blkback import BLKBACK_DEFAULT_WORKERS, Blkback, BlkbackStatistics
from gntdma.dev.blkback_xenbus import BlkbackXenbus, xbb_attach
from gntdma.dev.blkfront import xbd_softc
from gntdma.dev.blkfront_cmd import (
    XBD_DEFAULT_MAX_INDIRECT_SEGMENTS,
    XBD_DEFAULT_RING_PAGE_ORDER,
    XbdStatistics,
)
from gntdma.dev.blkfront_io import XbdFile, XbdIOError
from gntdma.dev.blkfront_xenbus import XbdXenbus, xbd_attach
from gntdma.errors import GntdmaError
from gntdma.host.image import DiskImage, open_image
from gntdma.sched import Mutex, current_scheduler, msleep, mtx_lock, mtx_unlock, wakeup
from gntdma.toolstack.devreap import reap_driver, reap_drivers
from gntdma.toolstack.host import Guest, GuestDevice, Host
from gntdma.toolstack.xlcfg import DiskSpec
from gntdma.toolstack.xs import LIBXL_DESTROY_TIMEOUT, DeviceDirs, XenstoreSetupError
from gntdma.xen.xenbus import XenbusState
from gntdma.xenstored import XsError

__all__ = [
    "VBD_CONNECT_TIMEOUT",
    "VBD_DEVTYPE",
    "Vbd",
    "VbdError",
    "VbdStatistics",
    "attach_disk",
    "destroy_disk",
    "detach_disk",
    "new_image",
]

#: The xenbus device type of a disk.
VBD_DEVTYPE: Final = "vbd"
#: Seconds :func:`attach_disk` waits for both ends to connect.
VBD_CONNECT_TIMEOUT: Final = 10.0
#: Extra seconds :func:`detach_disk` gives the drivers' threads to end.
_THREAD_GRACE: Final = 2.0

_S = XenbusState


class VbdError(GntdmaError):
    """A disk cannot be attached (or detached)."""


@final
@dataclass(frozen=True, slots=True)
class VbdStatistics:
    """One disk: both ends' states and counters."""

    vdev: str
    devid: int
    attached: bool
    frontend_state: str  #: XenbusState name of the frontend's end
    backend_state: str  #: XenbusState name of the backend's end
    frontend: XbdStatistics
    backend: BlkbackStatistics
    image_allocated_bytes: int  #: bytes of the image file really on disk (sparse)


@final
@dataclass(eq=False)
class Vbd:
    """A disk attached to a guest, both ends connected."""

    guest: Guest
    spec: DiskSpec
    image_path: Path
    image: DiskImage
    dirs: DeviceDirs
    blkback: Blkback
    backend: BlkbackXenbus
    frontend: XbdXenbus
    #: A file view of the disk for workloads (:class:`io.RawIOBase`).
    file: XbdFile
    attached: bool = True
    #: detach_disk is under way (a crash of the guest meanwhile forces it).
    detaching: bool = False
    #: The interlock of ``detaching`` (a crash's teardown sleeps until it is False).
    detach_lock: Mutex = field(default_factory=lambda: Mutex("vbd detach"))
    #: How the host tears it down if the guest crashes or the host goes.
    device: GuestDevice | None = None

    @property
    def vdev(self) -> str:
        return self.spec.vdev

    @property
    def devid(self) -> int:
        return self.dirs.devid

    @property
    def sc(self) -> xbd_softc:
        """The guest's xbd softc of this disk."""
        return self.frontend.sc

    @property
    def readonly(self) -> bool:
        return self.spec.readonly

    def __repr__(self) -> str:
        return (f"<Vbd {self.vdev} ({self.devid}) of {self.guest.name}: "
                f"{self.frontend.state.name}/{self.backend.state.name}>")

    def statistics(self) -> VbdStatistics:
        try:
            allocated = self.image.allocated_bytes() if not self.image.closed else 0
        except OSError:
            allocated = 0
        return VbdStatistics(
            vdev=self.vdev,
            devid=self.devid,
            attached=self.attached,
            frontend_state=self.frontend.state.name,
            backend_state=self.backend.state.name,
            frontend=self.sc.statistics(),
            backend=self.blkback.statistics(),
            image_allocated_bytes=allocated,
        )


def _backend_keys(spec: DiskSpec, path: Path) -> dict[str, str]:
    """What libxl writes in the backend directory of a file-backed disk."""
    return {
        "params": str(path),
        "type": "file",
        "mode": "r" if spec.readonly else "w",
        "dev": spec.vdev,
        "removable": "0",
        "bootable": "1",
        "device-type": "disk",
        "discard-enable": "1" if spec.discard else "0",
    }


def _frontend_keys(spec: DiskSpec) -> dict[str, str]:
    """What libxl writes in the frontend directory of a disk."""
    return {"virtual-device": str(spec.devid), "device-type": "disk"}


def _release(host: Host, dirs: DeviceDirs | None, front: XbdXenbus | None,
             back: BlkbackXenbus | None, bb: Blkback | None, image: DiskImage | None,
             timeout: float) -> bool:
    """Unplug what exists of a disk; True if everything went down cleanly."""
    clean = True
    drivers = [drv for drv in (back, front) if drv is not None]
    errors_before = [drv.error for drv in drivers]
    if dirs is not None:
        clean = host.xenstore.remove_device(dirs, timeout)
    if not reap_drivers(drivers, errors_before, timeout + _THREAD_GRACE):
        clean = False
    if bb is not None:
        bb.disconnect()  # a no-op once its driver ended
    if image is not None and not image.closed:
        image.close()
    return clean


def new_image(path: Path, size: int, *, readonly: bool = False) -> DiskImage:
    """Make the image ``path``, sparse at ``size`` bytes (opened read-only for
    ``readonly``, as :func:`~gntdma.host.image.open_image` opens a new one).

    The file is made here with ``O_EXCL``, so it is this call's: if it cannot be
    set up (its size too large for the file system, ...), it is removed before
    the error goes up (DESIGN 11: nothing left behind).

    Raises:
        FileExistsError: ``path`` exists (never touched).
        OSError: it cannot be made or set up (an ImageError among them).
    """
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
    try:
        image = DiskImage.create(path, size, exist_ok=True)  # the empty file: sized
        if readonly:
            image.close()
            image = DiskImage.open(path, readonly=True)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        raise
    return image


def _open_image(path: Path, spec: DiskSpec) -> tuple[DiskImage, bool]:
    """:func:`~gntdma.host.image.open_image` of the spec's image; True if this call
    made the file (:func:`new_image`: a file that was there, or that another
    process made meanwhile, is never taken for ours)."""
    if spec.size is not None and not os.path.lexists(path):
        try:
            return new_image(path, spec.size, readonly=spec.readonly), True
        except FileExistsError:  # made meanwhile: not ours, taken as it is
            pass
    return open_image(path, size=spec.size, readonly=spec.readonly), False


def attach_disk(host: Host, guest: Guest, spec: DiskSpec, *, image_dir: str | Path,
                timeout: float = VBD_CONNECT_TIMEOUT,
                workers: int = BLKBACK_DEFAULT_WORKERS,
                ring_page_order: int = XBD_DEFAULT_RING_PAGE_ORDER,
                max_indirect_segments: int = XBD_DEFAULT_MAX_INDIRECT_SEGMENTS,
                image: DiskImage | None = None, grant_share: int = 1,
                persistent: bool = False) -> Vbd:
    """Give ``guest`` the disk ``spec`` describes and wait until it is connected.

    Args:
        image_dir: where a relative ``target`` is taken from.
        timeout: seconds to wait for both ends to be Connected.
        workers: blkback worker threads.
        ring_page_order: the largest ring blkfront asks for (``2 ** order`` pages).
        max_indirect_segments: segments per request blkfront uses at most.
        image: the image, already opened by the caller (``gntdma run`` opens
            existing images as snapshots); the disk owns it from then on.
        grant_share: disks of the guest still to attach, this one included:
            blkfront takes at most that share of the grant references not held
            for life (``xbd_softc``'s ``grant_share``).
        persistent: both ends advertise blkif ``feature-persistent`` (persistent
            grants; off by default, see DESIGN 7).

    Raises:
        VbdError: the image cannot be opened or created, the device exists, a
            driver fails to attach, or the ends do not connect in time (the
            drivers' errors are in the message); nothing is left attached.
    """
    dom0 = host.dom0
    if guest.xenstore is None or dom0.xenstore is None:
        raise VbdError(f"{guest.name}: no xenstore (the domain is being destroyed)")
    path = spec.path(image_dir)
    what = f"{guest.name} {spec.vdev} ({path})"
    created = False  # the image file is this call's: removed again if the attach fails
    if image is None:
        try:
            image, created = _open_image(path, spec)
        except OSError as e:
            raise VbdError(f"{what}: {e}") from e
    dirs: DeviceDirs | None = None
    back: BlkbackXenbus | None = None
    front: XbdXenbus | None = None
    bb: Blkback | None = None
    ok = False
    try:
        bb = Blkback(dom0.hc, dom0.kernel, guest.domid, image, devid=spec.devid,
                     workers=workers, feature_discard=spec.discard)
        bb.feature_persistent = persistent
        try:
            dirs = host.xenstore.add_device(guest.domid, dom0.domid, VBD_DEVTYPE, spec.devid,
                                            front=_frontend_keys(spec),
                                            back=_backend_keys(spec, path))
        except XenstoreSetupError as e:
            raise VbdError(f"{what}: {e}") from e
        error, back = xbb_attach(dom0.xenstore, dom0.kernel, bb)
        if back is None:
            raise VbdError(f"{what}: blkback's xenbus driver did not attach: "
                           f"{os.strerror(error)}")
        with host.guest_code(guest, f"attaching {spec.vdev}"):
            error, front = xbd_attach(guest.kernel, guest.hc, guest.gnttab, guest.xenstore,
                                      spec.devid, ring_page_order=ring_page_order,
                                      max_indirect_segments=max_indirect_segments,
                                      grant_share=grant_share, persistent=persistent)
        if front is None:
            raise VbdError(f"{what}: blkfront's xenbus driver did not attach: "
                           f"{os.strerror(error)}")
        sched = current_scheduler()
        deadline = sched.now() + timeout
        end = {_S.Connected, _S.Closing, _S.Closed}
        ferr, fst = _wait_state(host, guest, front, end, timeout)
        berr, bst = _wait_state(host, guest, back, end, max(0.0, deadline - sched.now()))
        if guest.name in host.crashed:
            raise VbdError(f"{what}: the guest crashed while the disk connected")
        if ferr != 0 or berr != 0 or fst != _S.Connected or bst != _S.Connected:
            why = "; ".join(e for e in (f"frontend {fst.name}"
                                        + (f": {front.error}" if front.error else ""),
                                        f"backend {bst.name}"
                                        + (f": {back.error}" if back.error else "")))
            timed_out = errno.ETIMEDOUT in (ferr, berr)
            raise VbdError(f"{what}: did not connect{' in time' if timed_out else ''} "
                           f"({why})")
        vbd = Vbd(guest, spec, path, image, dirs, bb, back, front, XbdFile(front.sc))
        vbd.device = GuestDevice(spec.vdev, lambda: destroy_disk(host, vbd),
                                 lambda: _abandon(vbd))
        host.add_device(guest, vbd.device)
        ok = True
        return vbd
    finally:
        if not ok:
            if guest.name in host.crashed:
                # The guest crashed on the way (on_crash=destroy): the host removes the
                # device's directories with the domain, and blkback ends on that; no
                # unplug that would wait for the dead frontend.
                dirs = None
            _release(host, dirs, front, back, bb, image, min(timeout, LIBXL_DESTROY_TIMEOUT))
            if created:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


#: Seconds between two looks at whether the guest crashed, while a disk connects.
_CRASH_POLL: Final = 0.05


def _wait_state(host: Host, guest: Guest, drv: XbdXenbus | BlkbackXenbus,
                states: set[XenbusState], timeout: float) -> tuple[int, XenbusState]:
    """``drv.wait_state``, ended early when ``guest`` crashes (its drivers' threads
    die without waking anyone: the wait would last its whole timeout)."""
    sched = current_scheduler()
    deadline = sched.now() + timeout
    while True:
        left = deadline - sched.now()
        error, state = drv.wait_state(states, max(0.0, min(left, _CRASH_POLL)))
        if error != errno.ETIMEDOUT or left <= _CRASH_POLL or guest.name in host.crashed:
            return error, state


def detach_disk(host: Host, vbd: Vbd, timeout: float = LIBXL_DESTROY_TIMEOUT) -> bool:
    """Unplug ``vbd`` (libxl's sequence) and free both ends; True if it went cleanly.

    False when the backend did not reach Closed in ``timeout`` seconds (the
    directories are removed anyway, as libxl's forced removal does, and the
    drivers are stopped) or a driver reported an error. Bios in flight
    complete; those not yet on the ring, and any issued later, fail with
    ENXIO. A second call does nothing and returns True. Sleeps (thread0 runs
    the scheduler meanwhile).
    """
    if not vbd.attached:
        return True
    vbd.attached = False
    # The device stays the host's until it is gone: if the guest crashes half way
    # (its blkfront never closes), the host removes it by force (destroy_disk),
    # which ends the wait below.
    vbd.detaching = True
    try:
        clean = _release(host, vbd.dirs, vbd.frontend, vbd.backend, vbd.blkback, vbd.image,
                         timeout)
    finally:
        mtx_lock(vbd.detach_lock)
        vbd.detaching = False
        wakeup(vbd)
        mtx_unlock(vbd.detach_lock)
        if vbd.device is not None:
            host.remove_device(vbd.guest, vbd.device)
    if vbd.guest.name in host.crashed:
        vbd.file.abandon()  # no I/O through a dead guest's driver
        return clean
    # The disk is gone: XbdFile.close() still tries a flush (ENXIO), ignored.
    with contextlib.suppress(XbdIOError):
        vbd.file.close()
    return clean


def destroy_disk(host: Host, vbd: Vbd, timeout: float = LIBXL_DESTROY_TIMEOUT) -> bool:
    """Remove ``vbd`` of a crashed guest by force; True if the backend closed in time.

    libxl_device.c, ``libxl__initiate_device_generic_remove`` with
    ``LIBXL__FORCE_ON`` (``libxl__devices_destroy`` of ``libxl__destroy_domid``):
    the frontend directory is removed and the backend's ``online`` 0 and
    Closing written in one transaction; blkback sees its frontend gone,
    disconnects (unmaps every grant, frees its ring, unbinds its event
    channel) and closes; then the backend directory goes. Nothing of the
    guest's blkfront runs: it is dead. Sleeps (a toolstack thread).
    """
    if vbd.detaching:
        return _destroy_detaching(host, vbd, timeout)
    if not vbd.attached:
        return True
    vbd.attached = False
    vbd.file.abandon()
    clean = host.xenstore.remove_device(vbd.dirs, timeout, force=True)
    if not reap_driver(vbd.backend, timeout + _THREAD_GRACE):
        clean = False
    vbd.blkback.disconnect()  # a no-op once its driver ended
    if not vbd.image.closed:
        vbd.image.close()
    return clean


def _destroy_detaching(host: Host, vbd: Vbd, timeout: float) -> bool:
    """The guest crashed while :func:`detach_disk` unplugs ``vbd``: that unplug waits
    for a backend that waits for the dead frontend to close. The forced removal's
    part it lacks: the frontend directory goes, blkback sees its frontend gone,
    disconnects and closes, and the unplug ends; wait for it (True if it did in
    time). One waiter on the backend's state, not two."""
    with contextlib.suppress(XsError):
        host.xenstore.toolstack.rm(vbd.dirs.frontend_path)
    deadline = current_scheduler().now() + timeout + _THREAD_GRACE
    mtx_lock(vbd.detach_lock)
    while vbd.detaching:
        left = deadline - current_scheduler().now()
        if left <= 0:
            break
        msleep(vbd, vbd.detach_lock, "xldetach", left)
    done = not vbd.detaching
    mtx_unlock(vbd.detach_lock)
    return done


def _abandon(vbd: Vbd) -> None:
    """The host goes away with ``vbd`` attached: no I/O (its threads are killed)."""
    vbd.attached = False
    vbd.file.abandon()
