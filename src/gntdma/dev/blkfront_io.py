"""blkfront: synchronous block I/O for kernel threads, and a Python file view of a disk.

:func:`xbd_read_buf` and :func:`xbd_write_buf` do the I/O in the caller's own
kernel buffer (a bio over its pages, as FreeBSD's ``physio`` hands the
driver the pages of the caller's buffer): nothing is allocated, filled or
copied on the way; the grants are of the caller's pages. :func:`xbd_read`
and :func:`xbd_write` take and return Python bytes: they do the same through
a kernel buffer of their own (``malloc(9)``, ``M_TEMP``) and copy in or out.
With :func:`xbd_flush` and :func:`xbd_discard`, they hand a bio to
``xbd_strategy`` and ``biowait`` for it: they sleep, so they run on a kernel
thread or on thread0 (which then runs the scheduler until the bio is done).
They keep the C contract: an errno int (and the data for a read).

:class:`XbdFile` is an :class:`io.RawIOBase` over a disk for workloads and
tests (thread0 or any kernel thread): any offset and length; the sectors a
transfer only partly covers are read, patched and written back whole
(read-modify-write), so unaligned writes are not atomic with respect to other
writers of the same sectors. Transfers go in pieces of at most ``chunk`` bytes.
Errors raise :class:`XbdIOError` (an :class:`OSError` with the errno).
"""

from __future__ import annotations

import errno
import io
import os
from typing import TYPE_CHECKING, Final, final

from gntdma.dev.blkfront import xbd_softc
from gntdma.dev.blkfront_cmd import XBDF_BARRIER, XBDF_FLUSH, XBDF_READONLY
from gntdma.errors import GntdmaError
from gntdma.sys import (
    BIO_DELETE,
    BIO_FLUSH,
    BIO_READ,
    BIO_WRITE,
    M_TEMP,
    M_WAITOK,
    MAXPHYS,
    bio,
    biowait,
)

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = [
    "XbdFile",
    "XbdIOError",
    "xbd_discard",
    "xbd_flush",
    "xbd_read",
    "xbd_read_buf",
    "xbd_write",
    "xbd_write_buf",
]

_WMESG: Final = "xbdio"


def _xbd_rw(sc: xbd_softc, cmd: int, offset: int, va: int, length: int) -> int:
    bp = bio(bio_cmd=cmd, bio_offset=offset, bio_bcount=length, bio_data=va)
    sc.xbd_strategy(bp)
    return biowait(bp, _WMESG)


def xbd_read_buf(sc: xbd_softc, offset: int, va: int, length: int) -> int:
    """Read ``length`` bytes at ``offset`` into the caller's kernel buffer at ``va``.

    The disk's data lands in the caller's pages (granted to the backend for
    the transfer); nothing is allocated or copied. Offset and length are
    sector multiples. Returns the error. Sleeps.
    """
    return _xbd_rw(sc, BIO_READ, offset, va, length)


def xbd_write_buf(sc: xbd_softc, offset: int, va: int, length: int) -> int:
    """Write ``length`` bytes of the caller's kernel buffer at ``va`` at ``offset``.

    The backend reads the caller's pages (granted read-only); nothing is
    allocated or copied. Returns the error. Sleeps.
    """
    return _xbd_rw(sc, BIO_WRITE, offset, va, length)


def _xbd_io(sc: xbd_softc, cmd: int, offset: int, length: int,
            data: bytes | bytearray | memoryview | None) -> tuple[int, bytes]:
    kern = sc.xbd_kern
    va = kern.malloc(length, M_TEMP, M_WAITOK) if length > 0 else 0
    try:
        if data is not None and length > 0:
            kern.kva_write(va, data)
        error = _xbd_rw(sc, cmd, offset, va, length)
        out = kern.kva_read(va, length) if error == 0 and cmd == BIO_READ and length > 0 \
            else b""
        return error, out
    finally:
        if va != 0:
            kern.free(va, M_TEMP)


def xbd_read(sc: xbd_softc, offset: int, length: int) -> tuple[int, bytes]:
    """Read ``length`` bytes at ``offset`` (sector multiples): (error, data). Sleeps."""
    return _xbd_io(sc, BIO_READ, offset, length, None)


def xbd_write(sc: xbd_softc, offset: int, data: bytes | bytearray | memoryview) -> int:
    """Write ``data`` at ``offset`` (sector multiples); the error. Sleeps."""
    return _xbd_io(sc, BIO_WRITE, offset, len(data), data)[0]


def xbd_flush(sc: xbd_softc) -> int:
    """Make every completed write durable (``BIO_FLUSH``); the error. Sleeps."""
    bp = bio(bio_cmd=BIO_FLUSH)
    sc.xbd_strategy(bp)
    return biowait(bp, _WMESG)


def xbd_discard(sc: xbd_softc, offset: int, length: int) -> int:
    """Discard ``length`` bytes at ``offset`` (``BIO_DELETE``); the error. Sleeps."""
    bp = bio(bio_cmd=BIO_DELETE, bio_offset=offset, bio_bcount=length)
    sc.xbd_strategy(bp)
    return biowait(bp, _WMESG)


class XbdIOError(GntdmaError, OSError):
    """A block I/O through :class:`XbdFile` failed; ``errno`` says why."""


def _raise(error: int, what: str) -> None:
    if error != 0:
        raise XbdIOError(error, f"{what}: {os.strerror(error)}")


@final
class XbdFile(io.RawIOBase):
    """A file view of a connected disk: read, write, seek, flush, at any offset.

    Reads stop at the end of the disk (they return fewer bytes, then 0);
    a write that starts at the end fails with ENOSPC, one that crosses it is
    cut short. ``flush`` sends BIO_FLUSH when the backend supports it.
    ``close`` flushes a connected disk; :meth:`abandon` and the finalizer never
    do I/O.
    """

    _abandoned = False

    def __init__(self, sc: xbd_softc, *, chunk: int = MAXPHYS) -> None:
        super().__init__()
        if chunk <= 0 or chunk % sc.xbd_sector_size != 0:
            raise ValueError(f"chunk {chunk} is not a positive multiple of the sector size")
        self.sc = sc
        self.chunk = chunk
        self._pos = 0

    @property
    def size(self) -> int:
        """Bytes on the disk."""
        return self.sc.xbd_media_size

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return self.sc.statistics().state == "connected" and not self._readonly()

    def seekable(self) -> bool:
        return True

    def _readonly(self) -> bool:
        return bool(self.sc.xbd_flags & XBDF_READONLY)

    def tell(self) -> int:
        self._checkClosed()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._checkClosed()
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError(f"negative seek position {pos}")
        self._pos = pos
        return pos

    def _span(self, pos: int, n: int) -> tuple[int, int]:
        """The whole sectors covering ``[pos, pos + n)``: (start, length)."""
        ss = self.sc.xbd_sector_size
        start = pos - pos % ss
        end = -(-(pos + n) // ss) * ss
        return start, end - start

    def readinto(self, buffer: WriteableBuffer) -> int:
        self._checkClosed()
        out = memoryview(buffer).cast("B")
        n = min(len(out), max(0, self.size - self._pos))
        done = 0
        while done < n:
            pos = self._pos + done
            start, span = self._span(pos, min(n - done, self.chunk))
            span = min(span, self.chunk)
            error, data = xbd_read(self.sc, start, span)
            _raise(error, f"read of {span} bytes at {start}")
            skip = pos - start
            take = min(n - done, span - skip)
            out[done:done + take] = data[skip:skip + take]
            done += take
        self._pos += done
        return done

    def write(self, b: ReadableBuffer) -> int:
        self._checkClosed()
        src = memoryview(b).cast("B")
        if len(src) == 0:
            return 0
        if self._pos >= self.size:
            raise XbdIOError(errno.ENOSPC, f"write at {self._pos}: end of the disk")
        n = min(len(src), self.size - self._pos)
        ss = self.sc.xbd_sector_size
        done = 0
        while done < n:
            pos = self._pos + done
            start, span = self._span(pos, min(n - done, self.chunk))
            span = min(span, self.chunk)
            skip = pos - start
            take = min(n - done, span - skip)
            if skip == 0 and take == span:
                buf = src[done:done + take]
            else:  # read-modify-write of the partly covered sectors
                whole = bytearray(span)
                if skip != 0:
                    error, head = xbd_read(self.sc, start, ss)
                    _raise(error, f"read of the sector at {start}")
                    whole[:ss] = head
                if (skip + take) % ss != 0:
                    last = start + span - ss
                    if last != start or skip == 0:
                        error, tail = xbd_read(self.sc, last, ss)
                        _raise(error, f"read of the sector at {last}")
                        whole[span - ss:] = tail
                whole[skip:skip + take] = src[done:done + take]
                buf = memoryview(whole)
            _raise(xbd_write(self.sc, start, buf), f"write of {span} bytes at {start}")
            done += take
        self._pos += done
        return done

    def flush(self) -> None:
        if self.closed or self._abandoned:
            return
        super().flush()
        if self.sc.xbd_flags & (XBDF_FLUSH | XBDF_BARRIER):
            _raise(xbd_flush(self.sc), "flush")

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self.sc.statistics().state == "connected":
                self.flush()
        finally:
            super().close()

    def abandon(self) -> None:
        """Close without any I/O: the disk's domain is gone, or its host is."""
        self._abandoned = True
        self.close()

    def __del__(self) -> None:
        # A finalizer runs whenever the collector does, under whatever scheduler
        # is current then (another host's, or none): it must never sleep on I/O.
        self._abandoned = True
        super().__del__()

    def discard(self, offset: int, length: int) -> None:
        """Discard whole sectors in ``[offset, offset + length)`` (an extension of the file API)."""
        self._checkClosed()
        _raise(xbd_discard(self.sc, offset, length), f"discard of {length} bytes at {offset}")
