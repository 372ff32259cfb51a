"""DiskImage.preadv/pwritev take any buffers: byte views of pages as they are, and
views of other layouts (a typed array, a 2-D view, a mix) as their bytes, in order."""

from __future__ import annotations

import array
import errno
import os
from pathlib import Path

import pytest

from gntdma.host.image import DiskImage, ImageError


def test_views_of_any_layout_read_and_write_their_bytes_in_order(tmp_path: Path) -> None:
    data = os.urandom(4 * 4096)
    with DiskImage.create(tmp_path / "d.img", 1 << 20) as img:
        img.pwritev([memoryview(data)], 4096)
        pages = [memoryview(bytearray(4096)) for _ in range(2)]
        words = array.array("I", bytes(4096))
        square = memoryview(bytearray(4096)).cast("B", (64, 64))
        assert img.preadv([pages[0], words, square, pages[1]], 4096) == 4 * 4096
        got = b"".join([pages[0].tobytes(), words.tobytes(), square.tobytes(),
                        pages[1].tobytes()])
        assert got == data
        signed = memoryview(bytearray(data[:4096])).cast("b")
        assert img.pwritev([signed, memoryview(data)[4096:8192]], 0) == 8192
        back = memoryview(bytearray(8192))
        assert img.preadv([back], 0) == 8192
        assert back.tobytes() == data[:8192]


def test_only_byte_views_of_pages_are_a_list_of_them(tmp_path: Path) -> None:
    with DiskImage.create(tmp_path / "d.img", 1 << 20) as img:
        pages = [memoryview(bytearray(4096)) for _ in range(3)]
        empty = memoryview(bytearray(0))
        assert img.preadv([pages[0], empty, pages[1], pages[2]], 0) == 3 * 4096


def test_one_buffer_of_any_layout_moves_its_bytes(tmp_path: Path) -> None:
    data = os.urandom(4096)
    with DiskImage.create(tmp_path / "d.img", 1 << 20) as img:
        for i, buf in enumerate([memoryview(bytearray(data)).cast("b"),
                                 array.array("I", data),
                                 memoryview(bytearray(data)).cast("B", (64, 64)),
                                 bytearray(data), data, memoryview(data)]):
            assert img.pwritev([buf], i * 4096) == 4096
            back = memoryview(bytearray(4096))
            assert img.preadv([back], i * 4096) == 4096
            assert back.tobytes() == data
        empty = memoryview(bytearray(0))
        assert img.pwritev([empty], 1 << 20) == 0  # at the end: inside, nothing moved
        assert img.preadv([empty], 0) == 0
        with pytest.raises(ImageError) as e:
            img.pwritev([memoryview(data)], (1 << 20) - 512)
        assert e.value.errno == errno.EINVAL
