"""Guests from xl.cfg-style configurations: what ``xl create`` and ``xl destroy`` do.

:func:`create_guest_from_config` builds the domain a
:class:`~gntdma.toolstack.xlcfg.GuestConfig` describes (``name``, ``memory``,
``max_grant_frames``, ``max_maptrack_frames``), boots its kernel and attaches
its disks (:func:`~gntdma.toolstack.vbd.attach_disk`), each connected before
it returns. :func:`destroy_guest` detaches the disks (libxl's unplug) and
destroys the domain. Errors raise :class:`~gntdma.toolstack.vbd.VbdError`
(or ``ValueError`` for a config the host refuses); a failed creation leaves
nothing behind. A guest that crashes while it is created (a panic at boot, in
a driver's attach or connect) raises
:class:`~gntdma.toolstack.host.GuestCrashed`: the host destroys it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from gntdma.host.image import DiskImage
from gntdma.toolstack.host import Guest, GuestCrashed, Host
from gntdma.toolstack.vbd import VBD_CONNECT_TIMEOUT, Vbd, attach_disk, detach_disk
from gntdma.toolstack.xlcfg import GuestConfig
from gntdma.toolstack.xs import LIBXL_DESTROY_TIMEOUT

__all__ = ["create_guest_from_config", "destroy_guest"]


def create_guest_from_config(host: Host, cfg: GuestConfig, image_dir: str | Path | None = None,
                             *, timeout: float = VBD_CONNECT_TIMEOUT,
                             images: Sequence[DiskImage] | None = None,
                             before_disks: Callable[[Guest], None] | None = None
                             ) -> tuple[Guest, list[Vbd]]:
    """Create the guest ``cfg`` describes with its disks attached and connected.

    Relative disk targets are taken from ``image_dir`` (default: the config
    file's folder). ``images``, one per disk, are images the caller opened
    (``gntdma run`` opens them all before it builds the host).
    ``before_disks(guest)`` runs once the domain exists, before the disks
    attach (``gntdma run`` attaches the vifs there: blkfront sizes its requests
    by the grant references left once the vifs hold theirs). Returns the guest
    and its disks in config order.
    """
    base = Path(image_dir) if image_dir is not None else cfg.base_dir
    guest = host.create_guest(cfg.name, memory_mb=cfg.memory,
                              max_grant_frames=cfg.max_grant_frames,
                              max_maptrack_frames=cfg.max_maptrack_frames,
                              tunables=cfg.kernel_tunables())
    vbds: list[Vbd] = []
    try:
        if before_disks is not None:
            before_disks(guest)
        for i, spec in enumerate(cfg.disks):
            # The disks share the grant table: each takes its share of what is left.
            vbds.append(attach_disk(host, guest, spec, image_dir=base, timeout=timeout,
                                    image=images[i] if images is not None else None,
                                    grant_share=len(cfg.disks) - i))
    except Exception as e:
        if guest.name not in host.crashed:
            destroy_guest(host, guest, vbds)
            raise
        # The guest crashed on the way: the host destroys it with the disks it has
        # (on_crash=destroy); what was being attached was released by its attach.
        if isinstance(e, GuestCrashed):
            raise
        raise GuestCrashed(guest, host.crashed[guest.name]) from e
    except BaseException:
        if guest.name not in host.crashed:
            destroy_guest(host, guest, vbds)
        raise
    return guest, vbds


def destroy_guest(host: Host, guest: Guest, vbds: Sequence[Vbd] = (),
                  timeout: float = LIBXL_DESTROY_TIMEOUT) -> bool:
    """Detach ``vbds`` (in reverse order) and destroy ``guest``; True if every
    disk went down cleanly."""
    clean = True
    for vbd in reversed(vbds):
        clean = detach_disk(host, vbd, timeout) and clean
    host.destroy_guest(guest)
    return clean
