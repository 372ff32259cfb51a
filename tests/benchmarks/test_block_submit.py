"""benchmarks/block.py ``--submit``: how the guest keeps its queue depth in flight.

``bio_done`` (the default) keeps N bios in flight from one guest thread with
``bio_done`` callbacks, as GEOM does (FreeBSD ``sys/geom/geom_disk.c``,
``g_disk_done``, and ``sys/geom/geom_io.c``, ``g_io_deliver``: a done bio is
queued for the ``g_up`` thread and never resubmitted from the driver's
completion); ``threads`` runs N guest threads each sleeping in ``biowait``.
Both must count each I/O once, reach blkback as one request each, and stop at
a failed bio.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gntdma.toolstack.domains import create_guest_from_config
from gntdma.toolstack.host import Host
from gntdma.toolstack.xlcfg import parse_config

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import block  # noqa: E402

KiB = 1024
SIZE = 1 << 20


def _guest(host: Host, tmp: Path):  # type: ignore[no-untyped-def]
    cfg = parse_config('name = "b"\nmemory = 32\n'
                       "disk = [ 'format=raw, vdev=xvda, access=rw, size=1M, target=b.img' ]\n",
                       "<test>")
    return create_guest_from_config(host, cfg, str(tmp))


@pytest.mark.parametrize("submit", ["bio_done", "threads"])
@pytest.mark.parametrize("op", ["read", "write"])
def test_each_io_is_one_request_and_counted_once(host: Host, tmp_path: Path, submit: str,
                                                 op: str) -> None:
    guest, (vbd,) = _guest(host, tmp_path)
    before = vbd.blkback.statistics()
    el, ios = block.SUBMIT[submit](host, vbd.sc, "rand", op, 4 * KiB, 8, SIZE, 0.01)
    st = vbd.blkback.statistics()
    assert el > 0 and ios >= 8  # every slot does one I/O at least
    assert st.requests_by_op.get(op, 0) - before.requests_by_op.get(op, 0) == ios
    moved = (st.bytes_read - before.bytes_read if op == "read"
             else st.bytes_written - before.bytes_written)
    assert moved == ios * 4 * KiB
    assert st.errors == before.errors
    if op == "write":  # slot i's first offset now holds the benchmark's random data
        data = (tmp_path / "b.img").read_bytes()
        for i in range(8):
            off = block.offsets("rand", 4 * KiB, SIZE, 4096, i)[0]
            assert data[off:off + 4 * KiB] != bytes(4 * KiB)
    host.destroy_guest(guest)


@pytest.mark.parametrize("submit", ["bio_done", "threads"])
def test_a_failed_bio_stops_the_measurement(host: Host, tmp_path: Path, submit: str) -> None:
    """Offsets past the 1 MiB disk: blkfront fails the bio (EIO), and the run raises
    rather than counting it, once the I/O in flight is done (nothing left behind)."""
    guest, (vbd,) = _guest(host, tmp_path)
    with pytest.raises(AssertionError, match=r"read of 4096 bytes at \d+: error 5"):
        block.SUBMIT[submit](host, vbd.sc, "rand", "read", 4 * KiB, 4, 64 * SIZE, 0.01)
    assert vbd.blkback.statistics().in_flight == 0
    host.destroy_guest(guest)


def test_the_run_says_which_submission_it_used(tmp_path: Path) -> None:
    for flags, want in (([], "bio_done"), (["--submit", "threads"], "threads")):
        r = subprocess.run([sys.executable, str(BENCHMARKS / "block.py"), "--seconds", "0.02",
                            "--rounds", "1", "--size-mb", "4", "--case", "4K write qd32",
                            "--grants", "persistent", "--json", *flags], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-800:]
        doc = json.loads(r.stdout[r.stdout.index("\n{") + 1:])
        assert doc["submit"] == want
        assert f"guest submission: {block.SUBMIT_TEXT[want]}" in r.stdout
        assert doc["workloads"][0]["requests_per_io"] == 1.0
    r = subprocess.run([sys.executable, str(BENCHMARKS / "block.py"), "--submit", "aio"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--submit: invalid choice: 'aio'" in r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("submit", ["bio_done", "threads"])
def test_one_failed_host_io_stops_the_sending(host: Host, tmp_path: Path, submit: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A single failed I/O (the host's 20th read fails once with EIO) ends the run with
    no more than the I/O then in flight (qd - 1) after it: with threads, each other
    thread stopped only at the deadline (hundreds more)."""
    import errno

    from gntdma.host.image import DiskImage

    guest, (vbd,) = _guest(host, tmp_path)
    calls = []
    real = DiskImage.preadv

    def preadv(self: DiskImage, bufs: object, offset: int) -> int:
        calls.append(offset)
        if len(calls) == 20:
            raise OSError(errno.EIO, "injected")
        return real(self, bufs, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(DiskImage, "preadv", preadv)
    with pytest.raises(AssertionError, match="error 5"):
        block.SUBMIT[submit](host, vbd.sc, "rand", "read", 4 * KiB, 8, SIZE, 0.5)
    assert 20 <= len(calls) <= 20 + 7
    monkeypatch.undo()
    host.destroy_guest(guest)
