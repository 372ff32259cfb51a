"""Raw disk image files: the backing store of a virtual block device.

Theory of operation
-------------------
A :class:`DiskImage` is one open regular file holding a raw disk: byte ``n`` of
the file is byte ``n`` of the disk. Images are created sparse (``ftruncate`` to
the size, nothing written), so a 64 GiB disk costs nothing until written.
Reads and writes are vectored (``os.preadv``/``os.pwritev``) straight into and
out of the caller's buffers (for blkback: slices of the granted pages it
mapped), with no intermediate copy. A flush is ``fdatasync``. A discard punches
a hole (``fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)``), so the range
reads back as zeros and gives its blocks back to the host file system; where
the file system (or the OS) cannot punch holes, the range is overwritten with
zeros instead, which reads the same.

A :class:`DiskImage` satisfies :class:`gntdma.dev.blkback.BackingStore`.

Rules
-----
- The size of an image is fixed while it is open: a read or write that does
  not fit inside it is refused (``ImageError`` with ``EINVAL``) rather than
  growing the file or returning a short read.
- A transfer either moves every byte or raises :class:`OSError`: short
  transfers (a signal, a file system returning less) are resumed where they
  stopped; an unexpected end of file raises ``EIO``.
- A read-only image refuses writes, discards and resizing with ``EROFS``.
- Every error is an :class:`OSError` whose message names the image: an
  :class:`ImageError` for what this module refuses, the system's own for what
  the kernel refused.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Final, cast, final

from gntdma.errors import GntdmaError
from gntdma.host.imagelock import lock_image
from gntdma.host.overlay import Overlay

__all__ = [
    "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE",
    "SECTOR_SIZE",
    "DiskImage",
    "ImageError",
    "open_image",
]

#: The unit of image sizes: sizes must be whole sectors.
SECTOR_SIZE: Final = 512
#: ``fallocate(2)`` mode bits (``linux/falloc.h``).
FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02

_ZERO_CHUNK: Final = 1 << 20
_IOV_MAX_DEFAULT: Final = 1024

Buffer = memoryview | bytearray | bytes


class ImageError(GntdmaError, OSError):
    """A disk image operation this module refuses (``errno`` says why)."""

    def __init__(self, err: int, message: str, path: str | os.PathLike[str] | None = None
                 ) -> None:
        if path is None:
            super().__init__(err, message)
        else:
            super().__init__(err, message, os.fspath(path))


def _iov_max() -> int:
    try:
        n = os.sysconf("SC_IOV_MAX")
    except (AttributeError, ValueError, OSError):
        return _IOV_MAX_DEFAULT
    return n if n > 0 else _IOV_MAX_DEFAULT


_IOV_MAX: Final = _iov_max()


def _libc_fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    fn = getattr(libc, "fallocate64", None) or getattr(libc, "fallocate", None)
    if fn is None:
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    fn.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], fn)


_FALLOCATE: Final = _libc_fallocate()


def _punch_hole(fd: int, offset: int, length: int) -> int:
    """``fallocate(fd, PUNCH_HOLE | KEEP_SIZE, offset, length)``: 0 or the errno."""
    if _FALLOCATE is None:
        return errno.ENOSYS
    rc = _FALLOCATE(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
    if rc == 0:
        return 0
    err = ctypes.get_errno()
    return err if err != 0 else errno.EIO


def _byte_views(bufs: Sequence[Buffer]) -> list[memoryview]:
    # Views of bytes already (blkback's pages and slices of them): taken as they
    # are, each tested once (one loop, no view made).
    for b in bufs:
        if type(b) is not memoryview or b.format != "B" or b.ndim != 1:
            break
    else:
        return list(cast(Sequence[memoryview], bufs))
    out: list[memoryview] = []
    for b in bufs:
        v = memoryview(b)
        if v.format != "B" or v.ndim != 1:
            v = v.cast("B")
        out.append(v)
    return out


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """The part of ``views`` left after ``n`` bytes were transferred."""
    i = 0
    while i < len(views) and n >= len(views[i]):
        n -= len(views[i])
        i += 1
    rest = views[i:]
    if rest and n > 0:
        rest[0] = rest[0][n:]
    return rest


@final
class DiskImage:
    """An open raw disk image file.

    Use :meth:`create`, :meth:`open` or :func:`open_image`; close with
    :meth:`close` (or a ``with`` block).
    """

    def __init__(self, path: Path, fd: int, size: int, readonly: bool,
                 cow: Overlay | None = None) -> None:
        self.path = path
        self._fd = fd
        self._size = size
        self._readonly = readonly
        #: The temporary overlay of a snapshot disk (:meth:`snapshot`), or None.
        self._cow = cow
        #: Discards done by writing zeros because holes could not be punched.
        self.discards_zeroed = 0
        #: Discards done by punching a hole.
        self.discards_punched = 0

    # -- opening ----------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike[str], size: int, *,
               exist_ok: bool = False) -> DiskImage:
        """Create a sparse image of ``size`` bytes and open it read-write.

        With ``exist_ok``, an existing image of exactly ``size`` bytes is opened
        as it is (its data kept).

        Raises:
            ImageError: ``size`` is not a positive number of whole sectors
                (``EINVAL``), the file exists (``EEXIST``), or exists with
                another size or is not a regular file.
            OSError: the file cannot be created (no such directory, permission).
        """
        p = Path(path)
        _check_size(p, size)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (0 if exist_ok else os.O_EXCL)
        try:
            fd = os.open(p, flags, 0o644)
        except FileExistsError:
            raise ImageError(errno.EEXIST, "disk image already exists", p) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ImageError(errno.EINVAL, "disk image is not a regular file", p)
            lock_image(fd, str(p), write=True)
            if st.st_size == 0:
                os.ftruncate(fd, size)  # sparse: no block is written
            elif st.st_size != size:
                raise ImageError(errno.EINVAL, f"disk image exists with {st.st_size} bytes, "
                                 f"not the {size} asked for", p)
        except BaseException:
            os.close(fd)
            raise
        return cls(p, fd, size, False)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, readonly: bool = False) -> DiskImage:
        """Open an existing image.

        Raises:
            ImageError: not a regular file, or its size is not whole sectors
                (``EINVAL``) or zero.
            OSError: the file cannot be opened (``ENOENT``, ``EACCES``, ...).
        """
        p = Path(path)
        fd = os.open(p, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ImageError(errno.EINVAL, "disk image is not a regular file", p)
            _check_size(p, st.st_size)
            lock_image(fd, str(p), write=not readonly)
        except BaseException:
            os.close(fd)
            raise
        return cls(p, fd, st.st_size, readonly)

    @classmethod
    def snapshot(cls, path: str | os.PathLike[str], overlay_dir: str | os.PathLike[str]
                 ) -> DiskImage:
        """Open an existing image as a writable disk whose writes never reach it.

        QEMU's ``-snapshot``: the image is opened read-only (and locked as a
        reader, so nobody writes it meanwhile); writes and discards go to a
        temporary overlay in ``overlay_dir``, removed by :meth:`close`.

        Raises:
            ImageError, OSError: as :meth:`open`.
        """
        base = cls.open(path, readonly=True)
        try:
            cow = Overlay(base._fd, base.size, overlay_dir)
        except BaseException:
            base.close()
            raise
        return cls(base.path, base._fd, base.size, False, cow)

    # -- properties ---------------------------------------------------------------

    @property
    def size(self) -> int:
        """Bytes on the disk."""
        return self._size

    @property
    def sectors(self) -> int:
        """512-byte sectors on the disk."""
        return self._size // SECTOR_SIZE

    @property
    def readonly(self) -> bool:
        return self._readonly

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        self._check_open()
        return self._fd

    @property
    def snapshotted(self) -> bool:
        """Whether writes go to a temporary overlay (:meth:`snapshot`)."""
        return self._cow is not None

    def allocated_bytes(self) -> int:
        """Bytes of the file actually allocated on the host (``st_blocks * 512``);
        of the overlay for a snapshot disk."""
        self._check_open()
        if self._cow is not None:
            return self._cow.allocated_bytes()
        return os.fstat(self._fd).st_blocks * 512

    def __repr__(self) -> str:
        mode = "ro" if self._readonly else "rw"
        state = "closed" if self.closed else mode
        return f"<DiskImage {self.path} {self._size} bytes {state}>"

    # -- I/O --------------------------------------------------------------------

    def preadv(self, bufs: Sequence[Buffer], offset: int) -> int:
        """Read ``sum(len(b))`` bytes at ``offset`` into ``bufs``, in order.

        Returns the number of bytes read (all of them).

        Raises:
            ImageError: the range is not inside the disk (``EINVAL``), or the file
                ended early (``EIO``), or the image is closed (``EBADF``).
            OSError: the read failed.
        """
        views, total = self._check_range(bufs, offset)
        if self._cow is not None:
            return self._cow.preadv(views, offset)
        done = 0
        while views:
            n = os.preadv(self._fd, views if len(views) <= _IOV_MAX else views[:_IOV_MAX],
                          offset + done)
            if n == 0:
                raise ImageError(errno.EIO, f"disk image ended at byte {offset + done}, "
                                 f"inside the disk", self.path)
            done += n
            if done == total:  # all of it (the common case): nothing to advance over
                break
            views = _advance(views, n)
        return total

    def pwritev(self, bufs: Sequence[Buffer], offset: int) -> int:
        """Write the bytes of ``bufs``, in order, at ``offset``. Returns the count.

        Raises:
            ImageError: read-only (``EROFS``), out of the disk (``EINVAL``), closed.
            OSError: the write failed (``ENOSPC`` on the host, ...).
        """
        if self._fd < 0 or self._readonly:
            self._check_writable("write")  # EBADF, then EROFS
        views, total = self._check_range(bufs, offset)
        if self._cow is not None:
            return self._cow.pwritev(views, offset)
        done = 0
        while views:
            n = os.pwritev(self._fd, views if len(views) <= _IOV_MAX else views[:_IOV_MAX],
                           offset + done)
            if n == 0:
                raise ImageError(errno.EIO, f"disk image write made no progress at byte "
                                 f"{offset + done}", self.path)
            done += n
            if done == total:  # all of it (the common case): nothing to advance over
                break
            views = _advance(views, n)
        return total

    def flush(self) -> None:
        """Make every completed write durable (``fdatasync``)."""
        self._check_open()
        if self._cow is not None:
            self._cow.flush()
            return
        os.fdatasync(self._fd)

    def discard(self, offset: int, length: int) -> None:
        """Discard ``length`` bytes at ``offset``: they read back as zeros.

        Punches a hole; if the host cannot, writes zeros.

        Raises:
            ImageError: read-only (``EROFS``), not inside the disk (``EINVAL``).
            OSError: the hole punch or the zeroing failed.
        """
        self._check_writable("discard")
        if offset < 0 or length < 0 or offset + length > self._size:
            raise ImageError(errno.EINVAL, f"discard of {length} bytes at {offset} is not "
                             f"inside the {self._size}-byte disk", self.path)
        if length == 0:
            return
        if self._cow is not None:
            self._cow.discard(offset, length)
            return
        err = _punch_hole(self._fd, offset, length)
        if err == 0:
            self.discards_punched += 1
            return
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise OSError(err, f"cannot punch a hole: {os.strerror(err)}", str(self.path))
        zeros = memoryview(bytes(min(length, _ZERO_CHUNK)))
        done = 0
        while done < length:
            n = min(length - done, len(zeros))
            self.pwritev([zeros[:n]], offset + done)
            done += n
        self.discards_zeroed += 1

    def close(self) -> None:
        """Close the file (idempotent); a snapshot's overlay is removed."""
        if self._cow is not None:
            self._cow.close()
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> DiskImage:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- checks -------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._fd < 0:
            raise ImageError(errno.EBADF, "disk image is closed", self.path)

    def _check_writable(self, what: str) -> None:
        self._check_open()
        if self._readonly:
            raise ImageError(errno.EROFS, f"{what} on a read-only disk image", self.path)

    def _check_range(self, bufs: Sequence[Buffer], offset: int
                     ) -> tuple[list[memoryview], int]:
        """The non-empty byte views of ``bufs`` and their total length."""
        if self._fd < 0:
            self._check_open()
        # one byte view (a 4 KiB request): no loop, no list of lengths
        if len(bufs) == 1 and type(v := bufs[0]) is memoryview and v.format == "B" and (
                v.ndim == 1):
            total = len(v)
            views = [v] if total > 0 else []
        else:
            views = _byte_views(bufs)
            lens = list(map(len, views))
            total = sum(lens)
            if 0 in lens:
                views = [v for v in views if len(v) > 0]
        if offset < 0 or offset + total > self._size:
            raise ImageError(errno.EINVAL, f"{total} bytes at {offset} are not inside the "
                             f"{self._size}-byte disk", self.path)
        return views, total


def _check_size(path: Path, size: int) -> None:
    if size <= 0 or size % SECTOR_SIZE != 0:
        raise ImageError(errno.EINVAL, f"disk size {size} is not a positive multiple of "
                         f"{SECTOR_SIZE} bytes", path)


def open_image(path: str | os.PathLike[str], *, size: int | None = None,
               readonly: bool = False) -> DiskImage:
    """Open a disk image, creating it sparse at ``size`` bytes if it does not exist.

    An existing image is used as it is; if ``size`` is given it must match.
    A read-only image that does not exist yet is created (empty, all zeros) and
    then opened read-only.

    Raises:
        ImageError: the image does not exist and no size was given (``ENOENT``),
            or it exists with another size (``EINVAL``), or see :meth:`DiskImage.create`.
        OSError: the file cannot be opened or created.
    """
    p = Path(path)
    if not p.exists():
        if size is None:
            raise ImageError(errno.ENOENT, "disk image does not exist and no size was "
                             "given to create it", p)
        img = DiskImage.create(p, size, exist_ok=True)
        if not readonly:
            return img
        img.close()
    img = DiskImage.open(p, readonly=readonly)
    if size is not None and img.size != size:
        actual = img.size
        img.close()
        raise ImageError(errno.EINVAL, f"disk image has {actual} bytes, not the {size} "
                         f"asked for", p)
    return img
