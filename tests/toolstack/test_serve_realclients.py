"""``gntdma serve`` against NBD clients nobody here wrote: nbdinfo, fio, qemu-img,
qemu-io, nbdcopy, and mkfs.ext4/e2fsck through nbdfuse (Debian's libnbd-bin,
fio, qemu-utils, e2fsprogs, fuse3). Every byte goes through blkfront, the
grant tables, the ring and blkback of the emulated host."""

from __future__ import annotations

import hashlib
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.toolstack.serve_helpers import Served, run, serve_env, serving, starved_config

pytestmark = [pytest.mark.realclient, pytest.mark.slow]


def _check_clean(s: Served, sig: int = signal.SIGINT) -> dict:
    report = s.stop(sig)
    assert s.status == 0, f"{s.stderr}\n{s.lines[-15:]}"
    assert report["ok"], [c for c in report["checks"] if not c["ok"]]
    return report


def test_nbdinfo_shows_each_export_size_and_flags_and_list_lists_them(tmp_path: Path) -> None:
    cfg = tmp_path / "two.cfg"
    cfg.write_text('name = "g1"\nmemory = 32\n'
                   f"disk = [ 'format=raw, vdev=xvda, access=rw, size=16M, "
                   f"target={tmp_path / 'a.img'}',\n"
                   f"         'format=raw, vdev=xvdb, access=ro, size=8M, "
                   f"target={tmp_path / 'b.img'}' ]\n")
    with serving(tmp_path, cfg) as s:
        assert s.uris == [s.uri("g1/xvda"), s.uri("g1/xvdb")]
        a = json.loads(run("nbdinfo", "--json", s.uri("g1/xvda")).stdout)["exports"][0]
        b = json.loads(run("nbdinfo", "--json", s.uri("g1/xvdb")).stdout)["exports"][0]
        assert a["export-size"] == 16 << 20 and not a["is_read_only"]
        assert a["can_flush"] and a["can_fua"] and a["can_zero"]
        assert a["block_size_minimum"] == 512
        assert b["export-size"] == 8 << 20 and b["is_read_only"]
        d = json.loads(run("nbdinfo", "--json", s.uri("")).stdout)["exports"][0]
        assert d["export-name"] == "g1/xvda"  # the default export: the first disk
        listed = json.loads(run("nbdinfo", "--list", "--json", s.uri()).stdout)
        assert sorted(e["export-name"] for e in listed["exports"]) == ["g1/xvda", "g1/xvdb"]
        _check_clean(s)


def _fio(uri: str, qd: int, size: str, seed: int,
         bsrange: str = "4k-128k") -> subprocess.CompletedProcess[str]:
    return run("fio", "--name=verify", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
               f"--bsrange={bsrange}", f"--iodepth={qd}", f"--size={size}", "--verify=crc32c",
               "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", f"--randseed={seed}",
               "--output-format=json")


def test_fio_random_writes_verified_crc32c_qd1_and_qd32_on_a_grant_starved_guest(
        tmp_path: Path) -> None:
    with serving(tmp_path, starved_config(tmp_path)) as s:
        uri = s.uri("starved/xvda")
        # At QD 32, requests of up to 1 MiB (256 references each) in flight
        # together need more than the one-frame table's 504 references: loads defer.
        for qd, size, seed, bs in ((1, "8M", 1, "4k-128k"), (32, "32M", 2, "64k-1m")):
            text = _fio(uri, qd, size, seed, bs).stdout
            out = json.loads(text[text.index("{"):])
            job = out["jobs"][0]
            assert job["error"] == 0
            assert job["write"]["io_bytes"] > 0 and job["read"]["io_bytes"] > 0
        report = _check_clean(s)
    assert report["guests"][0]["deferred_loads"] > 0, report["guests"]


def test_qemu_img_convert_into_the_export_and_compare_back(tmp_path: Path) -> None:
    src = tmp_path / "random.img"
    src.write_bytes(random.Random(7).randbytes(16 << 20))
    with serving(tmp_path, starved_config(tmp_path, size="16M", frames=2)) as s:
        uri = s.uri("starved/xvda")
        run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri)
        out = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri).stdout
        assert "identical" in out.lower()
        _check_clean(s)


def test_qemu_io_writes_and_pattern_checks_at_unaligned_offsets(tmp_path: Path) -> None:
    # qemu's NBD client honours the advertised minimum block (512) and does the
    # read-modify-write of unaligned requests itself (block/nbd.c, request_alignment)
    with serving(tmp_path, starved_config(tmp_path, size="16M", frames=2)) as s:
        uri = s.uri("starved/xvda")
        p = run("qemu-io", "-f", "raw",
                "-c", "write -P 0xab 1000 3000", "-c", "write -P 0x5c 70001 65537",
                "-c", "read -P 0xab 1000 3000", "-c", "read -P 0x5c 70001 65537",
                "-c", "read -P 0 0 1000", "-c", "read -P 0 4000 66001",
                "-c", "read -P 0 135538 1000", uri)
        assert "fail" not in p.stdout.lower() and "fail" not in p.stderr.lower(), p.stdout
        bad = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x11 1000 3000", uri],
                             capture_output=True, text=True, timeout=120)
        assert "Pattern verification failed" in bad.stdout + bad.stderr
        _check_clean(s)


def test_nbdcopy_in_and_out_give_equal_sha256(tmp_path: Path) -> None:
    src = tmp_path / "in.img"
    src.write_bytes(random.Random(3).randbytes(16 << 20))
    back = tmp_path / "out.img"
    with serving(tmp_path, starved_config(tmp_path, size="16M")) as s:
        uri = s.uri("starved/xvda")
        run("nbdcopy", str(src), uri)
        run("nbdcopy", uri, str(back))
        assert hashlib.sha256(back.read_bytes()).hexdigest() == \
            hashlib.sha256(src.read_bytes()).hexdigest()
        _check_clean(s)


def test_mkfs_ext4_through_nbdfuse_files_copied_in_and_back_e2fsck_clean(
        tmp_path: Path) -> None:
    # The seed's newfs test with real tools: nbdfuse shows the export as a file,
    # mkfs.ext4 makes a file system on it, debugfs copies files in and out of it
    # (no mount needed), e2fsck -fn finds it clean.
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    files = {f"f{i}": random.Random(i).randbytes(n)
             for i, n in enumerate((1, 4095, 70000, 1 << 20, 3 << 20))}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with serving(tmp_path, starved_config(tmp_path, size="32M", frames=2)) as s:
        fuse = subprocess.Popen(["nbdfuse", str(mnt / "disk"), s.uri("starved/xvda")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        disk = mnt / "disk"
        try:
            deadline = time.monotonic() + 30
            while not disk.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert disk.exists(), "nbdfuse did not come up"
            run("mkfs.ext4", "-q", "-F", str(disk))
            for name in files:
                run("debugfs", "-w", "-R", f"write {tmp_path / name} {name}", str(disk))
            for name, data in files.items():
                out = tmp_path / f"{name}.back"
                run("debugfs", "-R", f"dump {name} {out}", str(disk))
                assert out.read_bytes() == data
            run("e2fsck", "-fn", str(disk))
        finally:
            subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=30)
            try:
                fuse.wait(timeout=30)
            except subprocess.TimeoutExpired:
                fuse.kill()
                fuse.wait()
        _check_clean(s)


def test_serve_over_tcp_loopback_prints_nbd_uri_and_sigterm_ends_it_with_0(
        tmp_path: Path) -> None:
    cfg = starved_config(tmp_path, name="tcp", size="8M")
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from gntdma.cli import main; "
                             "sys.exit(main())", "serve", str(cfg), "--nbd-listen",
                             "127.0.0.1:0"], cwd=tmp_path, env=serve_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        uri = ""
        for line in proc.stdout:
            if line.startswith("export: "):
                uri = line.split(" ", 1)[1].strip()
            if line.startswith("serving until"):
                break
        assert uri.startswith("nbd://127.0.0.1:") and uri.endswith("/tcp/xvda")
        info = json.loads(run("nbdinfo", "--json", uri).stdout)["exports"][0]
        assert info["export-size"] == 8 << 20
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert (tmp_path / "tcp-xvda.img").exists()  # images a config names stay
