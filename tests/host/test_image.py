"""gntdma.host.image: sparse creation, vectored I/O, flush, discard, errors."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from gntdma.errors import GntdmaError
from gntdma.host import image as image_mod
from gntdma.host.image import SECTOR_SIZE, DiskImage, ImageError, open_image

MiB = 1 << 20


def test_create_is_sparse_and_sized(tmp_path: Path) -> None:
    p = tmp_path / "d.img"
    with DiskImage.create(p, 64 * MiB) as img:
        assert img.size == 64 * MiB
        assert img.sectors == 64 * MiB // SECTOR_SIZE
        assert not img.readonly
        assert img.allocated_bytes() < MiB  # nothing written yet
    assert p.stat().st_size == 64 * MiB
    assert img.closed


def test_create_refuses_bad_sizes_and_existing(tmp_path: Path) -> None:
    p = tmp_path / "d.img"
    for bad in (0, -512, 1000):
        with pytest.raises(ImageError) as ei:
            DiskImage.create(p, bad)
        assert ei.value.errno == errno.EINVAL
        assert "multiple of 512" in str(ei.value)
    assert not p.exists()
    DiskImage.create(p, 4096).close()
    with pytest.raises(ImageError) as ei:
        DiskImage.create(p, 4096)
    assert ei.value.errno == errno.EEXIST
    assert isinstance(ei.value, GntdmaError) and isinstance(ei.value, OSError)
    DiskImage.create(p, 4096, exist_ok=True).close()  # same size: fine
    with pytest.raises(ImageError, match="exists with 4096 bytes"):
        DiskImage.create(p, 8192, exist_ok=True)
    with pytest.raises(FileNotFoundError):
        DiskImage.create(tmp_path / "no" / "such" / "dir.img", 4096)


def test_open_image_creates_on_demand(tmp_path: Path) -> None:
    p = tmp_path / "d.img"
    with pytest.raises(ImageError) as ei:
        open_image(p)
    assert ei.value.errno == errno.ENOENT and str(p) in str(ei.value)
    with open_image(p, size=MiB) as img:
        img.pwritev([b"x" * 512], 512)
    with open_image(p, size=MiB) as img:  # reopened with its data
        buf = bytearray(512)
        img.preadv([buf], 512)
        assert buf == b"x" * 512
    with pytest.raises(ImageError, match="not the 2097152"):
        open_image(p, size=2 * MiB)
    with open_image(p) as img:
        assert img.size == MiB
    q = tmp_path / "ro.img"
    with open_image(q, size=MiB, readonly=True) as img:
        assert img.readonly and img.size == MiB


def test_open_refuses_non_regular_and_odd_sizes(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not a regular file"):
        DiskImage.open(tmp_path, readonly=True)
    with pytest.raises(IsADirectoryError):
        DiskImage.open(tmp_path)
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"z" * 1000)
    with pytest.raises(ImageError, match="multiple of 512"):
        DiskImage.open(odd)
    with pytest.raises(FileNotFoundError):
        DiskImage.open(tmp_path / "missing.img")


def test_vectored_read_write_roundtrip(tmp_path: Path) -> None:
    with DiskImage.create(tmp_path / "d.img", MiB) as img:
        page = bytearray(os.urandom(4096))
        view = memoryview(page)
        # two pieces of one page and a whole second buffer, one vectored write
        other = bytearray(os.urandom(1024))
        n = img.pwritev([view[512:1024], view[3072:4096], memoryview(other)], 8192)
        assert n == 512 + 1024 + 1024
        raw = (tmp_path / "d.img").read_bytes()
        assert raw[8192:8192 + 2560] == bytes(page[512:1024]) + bytes(page[3072:]) + other
        a, b = bytearray(1000), bytearray(1560)
        assert img.preadv([memoryview(a), memoryview(b)], 8192) == 2560
        assert a + b == raw[8192:8192 + 2560]
        assert img.preadv([], 0) == 0
        img.flush()


def test_many_iovecs_beyond_iov_max(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image_mod, "_IOV_MAX", 3)
    with DiskImage.create(tmp_path / "d.img", MiB) as img:
        chunks = [bytes([i]) * 512 for i in range(10)]
        assert img.pwritev(chunks, 0) == 5120
        outs = [bytearray(512) for _ in range(10)]
        assert img.preadv(outs, 0) == 5120
        assert [bytes(o) for o in outs] == chunks


def test_short_transfers_are_resumed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_preadv, real_pwritev = os.preadv, os.pwritev

    def short_preadv(fd: int, bufs: list[memoryview], off: int) -> int:
        return real_preadv(fd, [bufs[0][:100]], off)

    def short_pwritev(fd: int, bufs: list[memoryview], off: int) -> int:
        return real_pwritev(fd, [bufs[0][:77]], off)

    with DiskImage.create(tmp_path / "d.img", MiB) as img:
        data = os.urandom(3000)
        monkeypatch.setattr(os, "pwritev", short_pwritev)
        assert img.pwritev([data[:1000], data[1000:]], 4096) == 3000
        monkeypatch.setattr(os, "preadv", short_preadv)
        a, b = bytearray(1500), bytearray(1500)
        assert img.preadv([a, b], 4096) == 3000
        assert a + b == data


def test_out_of_range_and_readonly_and_closed(tmp_path: Path) -> None:
    p = tmp_path / "d.img"
    DiskImage.create(p, 4096).close()
    with DiskImage.open(p, readonly=True) as img:
        assert img.readonly
        for fn in (lambda: img.pwritev([b"a" * 512], 0), lambda: img.discard(0, 512)):
            with pytest.raises(ImageError) as ei:
                fn()
            assert ei.value.errno == errno.EROFS
        buf = bytearray(512)
        img.preadv([buf], 3584)  # the last sector
        with pytest.raises(ImageError) as ei:
            img.preadv([buf], 3585)
        assert ei.value.errno == errno.EINVAL and "not inside" in str(ei.value)
        with pytest.raises(ImageError):
            img.preadv([buf], -1)
        img.flush()  # fdatasync on a read-only descriptor is fine
    with DiskImage.open(p) as img:
        with pytest.raises(ImageError):
            img.pwritev([b"a" * 1024], 3584)
        with pytest.raises(ImageError):
            img.discard(4096, 512)
        with pytest.raises(ImageError):
            img.discard(0, -1)
    assert p.stat().st_size == 4096  # never grown
    with pytest.raises(ImageError) as ei:
        img.preadv([bytearray(1)], 0)
    assert ei.value.errno == errno.EBADF
    img.close()  # idempotent


def test_file_shrunk_under_us_is_eio(tmp_path: Path) -> None:
    p = tmp_path / "d.img"
    with DiskImage.create(p, 8192) as img:
        os.truncate(p, 1024)
        with pytest.raises(ImageError) as ei:
            img.preadv([bytearray(4096)], 0)
        assert ei.value.errno == errno.EIO


def test_discard_punches_a_hole(tmp_path: Path) -> None:
    p = tmp_path / "d.img"
    with DiskImage.create(p, 4 * MiB) as img:
        img.pwritev([b"\xaa" * (2 * MiB)], 0)
        img.flush()
        before = img.allocated_bytes()
        img.discard(4096, MiB)
        img.discard(0, 0)
        out = bytearray(2 * MiB)
        img.preadv([out], 0)
        assert out[:4096] == b"\xaa" * 4096
        assert out[4096:4096 + MiB] == bytes(MiB)
        assert out[4096 + MiB:] == b"\xaa" * (MiB - 4096)
        assert img.size == 4 * MiB
        if img.discards_punched == 1:
            assert img.allocated_bytes() <= before - MiB + 8192
        else:  # a file system that cannot punch holes: zeros were written
            assert img.discards_zeroed == 1


def test_discard_falls_back_to_zeros(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image_mod, "_punch_hole", lambda fd, off, n: errno.EOPNOTSUPP)
    with DiskImage.create(tmp_path / "d.img", 4 * MiB) as img:
        img.pwritev([b"\x55" * (3 * MiB)], 0)
        img.discard(512, MiB + MiB // 2 + 512)  # more than one zero chunk
        out = bytearray(3 * MiB)
        img.preadv([out], 0)
        assert out[:512] == b"\x55" * 512
        assert out[512:512 + MiB + MiB // 2 + 512] == bytes(MiB + MiB // 2 + 512)
        assert out[MiB + MiB // 2 + 1024:] == b"\x55" * (3 * MiB - (MiB + MiB // 2 + 1024))
        assert (img.discards_zeroed, img.discards_punched) == (1, 0)


def test_discard_reports_other_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image_mod, "_punch_hole", lambda fd, off, n: errno.EIO)
    with DiskImage.create(tmp_path / "d.img", MiB) as img:
        with pytest.raises(OSError) as ei:
            img.discard(0, 512)
        assert ei.value.errno == errno.EIO and "punch a hole" in str(ei.value)


def test_punch_hole_without_fallocate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image_mod, "_FALLOCATE", None)
    assert image_mod._punch_hole(0, 0, 512) == errno.ENOSYS


def test_repr_names_the_state(tmp_path: Path) -> None:
    img = DiskImage.create(tmp_path / "d.img", 4096)
    assert "rw" in repr(img)
    img.close()
    assert "closed" in repr(img)
    with pytest.raises(ImageError):
        img.fileno()


def test_typed_buffers_and_special_files(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    with DiskImage.create(tmp_path / "d.img", 4096) as img:
        words = memoryview(bytearray(512)).cast("I")  # not bytes: cast for the transfer
        words[0] = 0x01020304
        assert img.pwritev([words], 0) == 512
        out = memoryview(bytearray(512)).cast("H")
        assert img.preadv([out], 0) == 512
        assert bytes(out[:2]) == b"\x04\x03\x02\x01"
        assert img.fileno() >= 0
        monkeypatch.setattr(os, "pwritev", lambda fd, bufs, off: 0)
        with pytest.raises(ImageError) as ei:
            img.pwritev([b"x" * 512], 0)
        assert ei.value.errno == errno.EIO and "no progress" in str(ei.value)
    if os.access("/dev/null", os.W_OK):
        with pytest.raises(ImageError, match="not a regular file"):
            DiskImage.create("/dev/null", 4096, exist_ok=True)
