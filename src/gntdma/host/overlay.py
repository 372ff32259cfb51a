"""A temporary copy-on-write overlay over a disk image (QEMU's ``-snapshot``).

Writes go to a sparse temporary file of the disk's size; a sector once written
(or discarded) is read from the overlay from then on, every other sector from
the base image, which is never written. A write that covers part of a sector
not yet in the overlay copies that sector up from the base first. Which
sectors are in the overlay is kept in a bitmap of 4 KiB chunks allocated on
first use, so a huge sparse disk costs nothing until written. Removing the
overlay file drops every change: the base image is as it was.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Final

__all__ = ["Overlay"]

_SECTOR: Final = 512
_CHUNK_SECTORS: Final = 4096 * 8  #: sectors a bitmap chunk covers (one bit each)
_ZEROS: Final = bytes(1 << 20)


def _read_all(fd: int, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:  # past the end of a sparse overlay: zeros
            buf[done:] = bytes(len(buf) - done)
            return
        done += n


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        n = os.pwritev(fd, [data[done:]], offset + done)
        if n == 0:
            raise OSError(5, "overlay write made no progress")
        done += n


class Overlay:
    """The copy-on-write half of a snapshot disk: an overlay file and its bitmap."""

    def __init__(self, base_fd: int, size: int, directory: str | os.PathLike[str]) -> None:
        self.base_fd = base_fd
        self.size = size
        self.fd = -1
        fd, self.path = _mkstemp(directory)
        self.fd = fd
        try:
            os.ftruncate(fd, size)
        except BaseException:
            self.close()
            raise
        self._chunks: dict[int, bytearray] = {}

    # -- the bitmap ---------------------------------------------------------------

    def _is_written(self, sector: int) -> bool:
        chunk = self._chunks.get(sector // _CHUNK_SECTORS)
        if chunk is None:
            return False
        i = sector % _CHUNK_SECTORS
        return bool(chunk[i >> 3] & (1 << (i & 7)))

    def _mark(self, first: int, count: int) -> None:
        for s in range(first, first + count):
            chunk = self._chunks.get(s // _CHUNK_SECTORS)
            if chunk is None:
                chunk = self._chunks[s // _CHUNK_SECTORS] = bytearray(_CHUNK_SECTORS // 8)
            i = s % _CHUNK_SECTORS
            chunk[i >> 3] |= 1 << (i & 7)

    def _runs(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        """(offset, length, in overlay) runs of the byte range, split where that changes."""
        end = offset + length
        pos = offset
        while pos < end:
            sector = pos // _SECTOR
            state = self._is_written(sector)
            stop = (sector + 1) * _SECTOR
            while stop < end and self._is_written(stop // _SECTOR) == state:
                stop += _SECTOR
            stop = min(stop, end)
            yield pos, stop - pos, state
            pos = stop

    # -- I/O ------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytearray:
        out = bytearray(length)
        view = memoryview(out)
        for pos, n, written in self._runs(offset, length):
            _read_all(self.fd if written else self.base_fd, view[pos - offset:pos - offset + n],
                      pos)
        return out

    def preadv(self, bufs: Sequence[memoryview], offset: int) -> int:
        total = sum(len(b) for b in bufs)
        data = memoryview(self.read(offset, total))
        pos = 0
        for b in bufs:
            b[:] = data[pos:pos + len(b)]
            pos += len(b)
        return total

    def _copy_up(self, sector: int) -> None:
        if not self._is_written(sector):
            buf = bytearray(_SECTOR)
            _read_all(self.base_fd, memoryview(buf), sector * _SECTOR)
            _write_all(self.fd, memoryview(buf), sector * _SECTOR)
            self._mark(sector, 1)

    def write(self, data: memoryview, offset: int) -> None:
        if len(data) == 0:
            return
        first = offset // _SECTOR
        last = (offset + len(data) - 1) // _SECTOR
        if offset % _SECTOR != 0:
            self._copy_up(first)
        if (offset + len(data)) % _SECTOR != 0:
            self._copy_up(last)
        _write_all(self.fd, data, offset)
        self._mark(first, last - first + 1)

    def pwritev(self, bufs: Sequence[memoryview], offset: int) -> int:
        data = memoryview(b"".join(bufs))
        self.write(data, offset)
        return len(data)

    def discard(self, offset: int, length: int) -> None:
        done = 0
        while done < length:
            n = min(length - done, len(_ZEROS))
            self.write(memoryview(_ZEROS)[:n], offset + done)
            done += n

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def allocated_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        """Close and remove the overlay file (idempotent): every change is dropped."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _mkstemp(directory: str | os.PathLike[str]) -> tuple[int, str]:
    import tempfile

    fd, path = tempfile.mkstemp(prefix="overlay-", suffix=".img", dir=directory)
    return fd, path
