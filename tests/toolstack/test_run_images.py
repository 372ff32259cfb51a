"""``gntdma run`` and existing images (issue 11 items 4 to 6).

An existing image is never written without ``--overwrite`` (writes go to a
temporary overlay, as QEMU's ``-snapshot``), the same config passes every
time, a read-only disk is checked against the image's own bytes, an image in
use is refused (QEMU's locks), and one file named twice is refused.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import time
from pathlib import Path

import pytest
from run_helpers import run_cli, run_json, write_cfg

from gntdma.host.image import DiskImage


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_existing_image_is_not_written_without_overwrite(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "notes.img"  # 4 KiB of someone's text
    text.write_bytes((b"precious notes, keep them\n" * 200)[:4096])
    before = _digest(text)
    cfg = write_cfg(tmp_path / "g.cfg", "name='g'\nmemory=16\n"
                    "disk=['vdev=xvda, target=notes.img']\n")
    rc, rep, err = run_json(capsys, tmp_path, str(cfg), "--duration", "0.2")
    assert rc == 0, err
    assert rep["ok"] is True
    assert rep["guests"][0]["disks"][0]["mode"] == "snapshot"
    assert rep["guests"][0]["disks"][0]["bytes_written"] > 0  # the guest did write...
    assert _digest(text) == before  # ...to the overlay, not to the image
    assert sorted(os.listdir(tmp_path)) == ["g.cfg", "notes.img", "report.json"]


def test_the_same_config_passes_every_time(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_cfg(tmp_path / "g.cfg", "name='g'\nmemory=16\n"
                    "disk=['vdev=xvda, size=4M, target=g.img']\n")
    modes = []
    for _ in range(3):
        rc, rep, err = run_json(capsys, tmp_path, str(cfg), "--duration", "0.2")
        assert rc == 0 and rep["ok"] is True, err
        modes.append(rep["guests"][0]["disks"][0]["mode"])
    assert modes == ["create", "snapshot", "snapshot"]
    assert (tmp_path / "g.img").stat().st_size == 4 << 20  # the config's image stays


def test_overwrite_writes_the_existing_image_and_passes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "old.img"
    img.write_bytes(random.Random(1).randbytes(2 << 20))
    before = _digest(img)
    cfg = write_cfg(tmp_path / "g.cfg", "name='g'\nmemory=16\n"
                    "disk=['vdev=xvda, target=old.img']\n")
    for _ in range(2):
        rc, rep, err = run_json(capsys, tmp_path, str(cfg), "--duration", "0.2",
                                "--overwrite")
        assert rc == 0 and rep["ok"] is True, err
        assert rep["guests"][0]["disks"][0]["mode"] == "overwrite"
    assert _digest(img) != before  # told to: written


def test_readonly_disk_is_verified_against_the_images_own_bytes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "ro.img"
    img.write_bytes(random.Random(2).randbytes(1 << 20))
    before = _digest(img)
    cfg = write_cfg(tmp_path / "g.cfg", "name='g'\nmemory=16\n"
                    "disk=['vdev=xvda, access=ro, target=ro.img']\n")
    rc, rep, err = run_json(capsys, tmp_path, str(cfg), "--duration", "0.2")
    assert rc == 0 and rep["ok"] is True, err
    d = rep["guests"][0]["disks"][0]
    assert d["mode"] == "readonly" and d["bytes_written"] == 0 and d["bytes_verified"] > 0
    assert _digest(img) == before


def test_readonly_verifier_notices_bytes_that_differ_from_the_image(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from gntdma.toolstack import mainjob

    img = tmp_path / "ro.img"
    img.write_bytes(random.Random(3).randbytes(1 << 20))
    cfg = write_cfg(tmp_path / "g.cfg", "name='g'\nmemory=16\n"
                    "disk=['vdev=xvda, access=ro, target=ro.img']\n")
    monkeypatch.setattr(mainjob.OpenImage, "base",
                        lambda self, offset, n: bytes(n))  # a wrong oracle: zeros
    rc, _rep, _err = run_json(capsys, tmp_path, str(cfg), "--duration", "0.2")
    assert rc == 1


# -- locks (item 5): QEMU's byte-range OFD locks, block/file-posix.c
# raw_apply_lock_bytes / raw_check_lock_bytes (bytes 100+perm, 200+unshared perm).


def test_qemu_io_cannot_write_an_image_gntdma_holds(tmp_path: Path) -> None:
    img = tmp_path / "a.img"
    with DiskImage.create(img, 1 << 20):
        r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 512", str(img)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0
        assert 'Failed to get "write" lock' in r.stderr
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write 0 512", str(img)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr  # released with the image


def test_gntdma_refuses_an_image_qemu_io_holds_for_writing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "a.img"
    img.write_bytes(bytes(1 << 20))
    cfg = write_cfg(tmp_path / "g.cfg", "name='g'\nmemory=16\n"
                    "disk=['vdev=xvda, target=a.img']\n")
    q = subprocess.Popen(["qemu-io", "-f", "raw", str(img)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:  # wait until qemu-io has the image open (and locked)
            try:
                DiskImage.open(img, readonly=True).close()
            except OSError:
                break
            assert time.monotonic() < deadline, "qemu-io never locked the image"
            time.sleep(0.05)
        rc, out, err = run_cli(capsys, "run", str(cfg), "--duration", "0.1")
        assert rc == 2
        assert "g.cfg:3: disk xvda" in err and "lock" in err
        assert "xenstored:" not in out  # refused before anything was built
    finally:
        assert q.stdin is not None
        q.communicate("quit\n", timeout=30)


def test_a_second_run_on_an_image_in_use_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_cfg(tmp_path / "g.cfg", "name='g'\nmemory=16\n"
                    "disk=['vdev=xvda, size=1M, target=a.img']\n")
    with DiskImage.create(tmp_path / "a.img", 1 << 20):  # the first run, as it holds it
        rc, _out, err = run_cli(capsys, "run", str(cfg), "--duration", "0.1")
    assert rc == 2 and "lock" in err
    # readers share: a read-only open next to a read-only open is fine
    with DiskImage.open(tmp_path / "a.img", readonly=True), \
            DiskImage.open(tmp_path / "a.img", readonly=True):
        pass


# -- one file named twice (item 6)


@pytest.mark.parametrize("second", ["./a.img", "link.img", "hard.img", "sub/../a.img"])
def test_the_same_file_named_twice_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], second: str) -> None:
    (tmp_path / "a.img").write_bytes(bytes(1 << 20))
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.img").symlink_to("a.img")
    os.link(tmp_path / "a.img", tmp_path / "hard.img")
    cfg = write_cfg(tmp_path / "g.cfg", "name='g'\nmemory=16\ndisk=[\n"
                    "  'vdev=xvda, target=a.img',\n"
                    f"  'vdev=xvdb, target={second}' ]\n")
    rc, _out, err = run_cli(capsys, "run", str(cfg), "--duration", "0.1")
    assert rc == 2
    assert "g.cfg:5: disk xvdb" in err and "same file as the disk on" in err


def test_a_new_file_named_twice_is_refused(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_cfg(tmp_path / "g.cfg", "name='g'\nmemory=16\ndisk=[\n"
                    "  'vdev=xvda, size=1M, target=new.img',\n"
                    "  'vdev=xvdb, size=1M, target=./new.img' ]\n")
    rc, _out, err = run_cli(capsys, "run", str(cfg))
    assert rc == 2 and "g.cfg:5" in err and "same file" in err
    assert not (tmp_path / "new.img").exists()


def test_one_file_in_two_configs_is_refused(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.img").write_bytes(bytes(1 << 20))
    a = write_cfg(tmp_path / "a.cfg", "name='a'\nmemory=16\ndisk=['vdev=xvda, target=a.img']\n")
    b = write_cfg(tmp_path / "b.cfg", "name='b'\nmemory=16\n"
                  "disk=['vdev=xvda, target=./a.img']\n")
    rc, _out, err = run_cli(capsys, "run", str(a), str(b))
    assert rc == 2 and "b.cfg:3" in err and "a.cfg:3" in err
