"""Disk image locks that QEMU's tools honour, and that honour theirs.

QEMU's ``file`` protocol driver (``block/file-posix.c``) locks single bytes of
the image with open-file-description locks (``F_OFD_SETLK``, shared read
locks): byte ``100 + i`` for each permission ``i`` its user holds and byte
``200 + i`` for each permission it does *not* share with others
(``raw_apply_lock_bytes``, ``RAW_LOCK_PERM_BASE``/``RAW_LOCK_SHARED_BASE``).
Then it tests (``F_OFD_GETLK`` for a write lock, ``raw_check_lock_bytes``)
that nobody else holds byte ``200 + i`` of a permission it wants, nor byte
``100 + i`` of a permission it does not share. The permissions are
``BLK_PERM_CONSISTENT_READ`` (bit 0), ``WRITE`` (1), ``WRITE_UNCHANGED`` (2)
and ``RESIZE`` (3) (``include/block/block-common.h``).

gntdma takes the same bytes as a QEMU block device does: a writer holds
consistent read and write and shares only consistent read and unchanging
writes; a reader holds consistent read and shares the same. So two gntdma runs,
or gntdma and ``qemu-io``/``qemu-img``/a QEMU guest, never write one image at
once, while readers may share it with readers.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from typing import Final

__all__ = [
    "BLK_PERM_CONSISTENT_READ",
    "BLK_PERM_RESIZE",
    "BLK_PERM_WRITE",
    "BLK_PERM_WRITE_UNCHANGED",
    "RAW_LOCK_PERM_BASE",
    "RAW_LOCK_SHARED_BASE",
    "ImageLockError",
    "lock_image",
]

#: ``block/file-posix.c``: the first permission byte and the first shared byte.
RAW_LOCK_PERM_BASE: Final = 100
RAW_LOCK_SHARED_BASE: Final = 200
#: ``include/block/block-common.h``: the permission bits.
BLK_PERM_CONSISTENT_READ: Final = 0x01
BLK_PERM_WRITE: Final = 0x02
BLK_PERM_WRITE_UNCHANGED: Final = 0x04
BLK_PERM_RESIZE: Final = 0x08
BLK_PERM_ALL: Final = 0x0F
_PERM_NAMES: Final = {BLK_PERM_CONSISTENT_READ: "consistent read", BLK_PERM_WRITE: "write",
                      BLK_PERM_WRITE_UNCHANGED: "write unchanged", BLK_PERM_RESIZE: "resize"}

# Linux <fcntl.h> (the module has them from Python 3.9 on Linux only).
_F_OFD_GETLK: Final = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK: Final = getattr(fcntl, "F_OFD_SETLK", 37)
#: ``struct flock`` on LP64 Linux: l_type, l_whence, l_start, l_len, l_pid (+ padding).
_FLOCK: Final = struct.Struct("@hhqqi4x")


class ImageLockError(OSError):
    """The image is in use by another process (or another open of it)."""


def _flock(fd: int, cmd: int, kind: int, byte: int) -> int:
    """One fcntl on one byte; returns the l_type the kernel left (GETLK)."""
    buf = fcntl.fcntl(fd, cmd, _FLOCK.pack(kind, os.SEEK_SET, byte, 1, 0))
    return int(_FLOCK.unpack(buf)[0])


def _bits(mask: int) -> list[int]:
    return [i for i in range(4) if mask & (1 << i)]


def lock_image(fd: int, path: str, *, write: bool) -> None:
    """Take QEMU's locks on the open image ``fd``, for writing or for reading.

    The locks live as long as the open file description (closing ``fd`` drops
    them). Filesystems without OFD locks are used unlocked, as QEMU's
    ``locking=auto`` does.

    Raises:
        ImageLockError: another user holds a permission this one does not share,
            or does not share one this one wants (``EAGAIN``).
    """
    perm = BLK_PERM_CONSISTENT_READ | (BLK_PERM_WRITE if write else 0)
    shared = BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE_UNCHANGED
    try:
        # raw_apply_lock_bytes: our permissions, and the ones we do not share.
        for i in _bits(perm):
            _flock(fd, _F_OFD_SETLK, fcntl.F_RDLCK, RAW_LOCK_PERM_BASE + i)
        for i in _bits(BLK_PERM_ALL & ~shared):
            _flock(fd, _F_OFD_SETLK, fcntl.F_RDLCK, RAW_LOCK_SHARED_BASE + i)
        # raw_check_lock_bytes: nobody else refuses to share what we want, nor
        # holds what we do not share.
        for i in _bits(perm):
            if _flock(fd, _F_OFD_GETLK, fcntl.F_WRLCK, RAW_LOCK_SHARED_BASE + i) != fcntl.F_UNLCK:
                raise ImageLockError(errno.EAGAIN, f'Failed to get "{_PERM_NAMES[1 << i]}" '
                                     "lock: is another process using the image?", path)
        for i in _bits(BLK_PERM_ALL & ~shared):
            if _flock(fd, _F_OFD_GETLK, fcntl.F_WRLCK, RAW_LOCK_PERM_BASE + i) != fcntl.F_UNLCK:
                raise ImageLockError(errno.EAGAIN, f'Failed to get shared '
                                     f'"{_PERM_NAMES[1 << i]}" lock: is another process '
                                     "using the image?", path)
    except ImageLockError:
        raise
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            raise ImageLockError(errno.EAGAIN, "the image is locked by another process",
                                 path) from None
        if e.errno in (errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            return  # no OFD locks here: QEMU's locking=auto goes on without
        raise
