"""The benchmarks' options: a bad value is refused by argparse (status 2, its
message), never a traceback from the middle of a run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"

BAD = [
    ("block", ["--seconds", "-1"], "--seconds: must be a number above 0"),
    ("block", ["--seconds", "nan"], "--seconds: must be a number above 0"),
    ("block", ["--size-mb", "0"], "--size-mb: must be at least 1"),
    ("block", ["--rounds", "0"], "--rounds: must be at least 1"),
    ("persistent", ["--max-persistent-grants", "-1"],
     "--max-persistent-grants: must be at least 0"),
    ("block", ["--grants", "none"], "--grants: invalid choice: 'none'"),
    ("block", ["--size-mb", "999999999"], "--size-mb: 1999999998 MiB of images do not fit"),
    ("persistent", ["--size-mb", "999999999"],
     "--size-mb: 1999999998 MiB of images do not fit"),
    ("scale", ["--guests", "20", "--profile", "/nonexistent-gntdma/x"],
     "--profile: no directory /nonexistent-gntdma"),
    ("gnttab", ["--ops", "0"], "--ops: must be at least 1"),
    ("gnttab", ["--rounds", "0"], "--rounds: must be at least 1"),
    ("persistent", ["--rounds", "0"], "--rounds: must be at least 1"),
    ("persistent", ["--seconds", "0"], "--seconds: must be a number above 0"),
    ("persistent", ["--memory-mb", "0"], "--memory-mb: must be at least 1"),
    ("persistent", ["--memory-mb", "1", "--seconds", "0.01", "--size-mb", "4"],
     "a disk of the bench guest did not connect"),
    ("explore", ["--schedules", "0"], "--schedules: must be at least 1"),
    ("kernel_debug", ["--rounds", "0"], "--rounds: must be at least 1"),
    ("locks", ["--pairs", "0"], "--pairs: must be at least 1"),
    ("nbd", ["--size-mb", "-3"], "--size-mb: must be at least 1"),
    ("net", ["--seconds", "inf"], "--seconds: must be a number above 0"),
    ("scale", ["--disk-mb", "0"], "--disk-mb: must be at least 1"),
    ("xenstored_txn", ["--clients", "0"], "--clients: must be at least 1"),
]


@pytest.mark.parametrize(("name", "args", "message"), BAD,
                         ids=[f"{n}{' '.join(a)}" for n, a, _ in BAD])
def test_benchmark_bad_option_is_a_usage_error(tmp_path: Path, name: str, args: list[str],
                                               message: str) -> None:
    r = subprocess.run([sys.executable, str(BENCHMARKS / f"{name}.py"), *args], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-800:]
    assert "Traceback" not in r.stderr
    assert (f"{name}.py: error: argument {message}" in r.stderr
            or f"{name}.py: error: {message}" in r.stderr), r.stderr[-800:]
    assert list(tmp_path.iterdir()) == []


def test_persistent_benchmark_says_it_has_no_target(tmp_path: Path) -> None:
    """The issue sets no target for persistent grants: the table says so, the JSON too."""
    r = subprocess.run([sys.executable, str(BENCHMARKS / "persistent.py"), "--seconds", "0.05",
                        "--rounds", "1", "--size-mb", "16", "--json"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-800:]
    assert "no target: a comparison of persistent and per-load grants" in r.stdout
    doc = json.loads(r.stdout[r.stdout.index("\n{") + 1:])
    assert doc["target"] is None
    assert list(tmp_path.iterdir()) == []


def test_block_benchmark_measures_each_grant_mode_against_the_targets(tmp_path: Path) -> None:
    """``--grants both``: every workload through the per-load disk and the persistent
    disk, each against direct I/O on its own image (the same page-cache pages), and the
    targets counted per mode."""
    r = subprocess.run([sys.executable, str(BENCHMARKS / "block.py"), "--seconds", "0.05",
                        "--size-mb", "8", "--case", "1M read qd1", "--case", "4K write qd32",
                        "--rounds", "2", "--json"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-800:]
    doc = json.loads(r.stdout[r.stdout.index("\n{") + 1:])
    assert doc["grants"] == ["per-load", "persistent"]
    rows = {(w["workload"], w["grants"]): w for w in doc["workloads"]}
    assert set(rows) == {(w, g) for w in ("seq 1M read qd1", "rand 4K write qd32")
                         for g in ("per-load", "persistent")}
    for (w, g), row in rows.items():
        assert row["image"] == {"per-load": "bench.img",
                                "persistent": "bench-persistent.img"}[g]
        assert row["direct_iops"] > 0
        # Two rounds, direct and gntdma alternately: the figures are the lower median's.
        assert len(row["round_ratios"]) == 2
        assert row["ratio"] == min(row["round_ratios"])
        assert row["gntdma_iops"] > 0
        assert row["ratio"] == row["gntdma_iops"] / row["direct_iops"]
        assert row["target"] == {"seq 1M read qd1": 0.15, "rand 4K write qd32": 0.3}[w]
        assert row["result"] == ("pass" if row["ratio"] >= row["target"] else "miss")
    assert doc["targets"] == 2
    assert doc["targets_met"] == {
        g: sum(rows[(w, g)]["result"] == "pass" for w in ("seq 1M read qd1", "rand 4K write qd32"))
        for g in ("per-load", "persistent")}
    assert "targets met with persistent grants:" in r.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_block_benchmark_signalled_removes_its_images(tmp_path: Path, signum: int) -> None:
    """A signalled benchmark ends with 128 + the signal and leaves no image behind (its
    temporary directory is under TMPDIR, here the test's own directory)."""
    p = subprocess.Popen([sys.executable, str(BENCHMARKS / "block.py"), "--seconds", "5",
                          "--size-mb", "4", "--grants", "per-load"], cwd=tmp_path,
                         env={**os.environ, "TMPDIR": str(tmp_path), "PYTHONUNBUFFERED": "1"},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None
    line = p.stdout.readline()  # "image 4 MiB, ...": the images are there
    assert line.startswith("image "), line
    assert any(tmp_path.rglob("*.img"))
    p.send_signal(signum)
    assert p.wait(timeout=60) == 128 + signum
    p.stdout.close()
    assert p.stderr is not None
    p.stderr.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("flags", "dma_debug", "junk"), [
    ([], 0, 0),
    (["--dma-debug", "on"], 1, 0),
    (["--dma-debug", "on", "--junk-fill", "on"], 1, 1),
])
def test_block_benchmark_kernels_debugging_is_off_unless_asked_in_both_kernels(
        tmp_path: Path, flags: list[str], dma_debug: int, junk: int) -> None:
    """The block benchmark measures production kernels by default (no DMA-API debugging,
    no junk fill) and says so; ``--dma-debug on``/``--junk-fill on`` turn them on in the
    guest's kernel and in dom0's, which runs blkback, and the table and JSON say which."""
    r = subprocess.run([sys.executable, str(BENCHMARKS / "block.py"), "--seconds", "0.02",
                        "--size-mb", "4", "--case", "4K read qd1", "--grants", "per-load",
                        "--json", *flags], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-800:]
    doc = json.loads(r.stdout[r.stdout.index("\n{") + 1:])
    want = {"hw.busdma.dma_debug": dma_debug, "vm.debug.divisor": junk}
    for who in ("guest", "dom0"):
        t = doc["kernel_tunables"][who]
        assert t["sysctls"] == want
        assert f"kernel tunables, {who}: {t['describe']} {t['sysctls']}" in r.stdout
        assert t["describe"] == (f"dma-debug {'on' if dma_debug else 'off'}, "
                                 f"junk fill {'on' if junk else 'off'}")
    assert list(tmp_path.iterdir()) == []


def test_block_benchmark_persistent_table_options(tmp_path: Path) -> None:
    """``--max-persistent-grants 0`` is Linux's ``max_persistent_grants=0`` (blkback keeps
    no grant mapped); it means nothing without the persistent disk and is refused there;
    the set-up line and the JSON describe the disks measured only."""
    r = subprocess.run([sys.executable, str(BENCHMARKS / "block.py"), "--seconds", "0.02",
                        "--rounds", "1", "--size-mb", "4", "--case", "4K read qd1",
                        "--grants", "persistent", "--max-persistent-grants", "0", "--json"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-800:]
    doc = json.loads(r.stdout[r.stdout.index("\n{") + 1:])
    assert list(doc["disks"]) == ["persistent"]
    assert doc["disks"]["persistent"]["blkback_max_persistent_grants"] == 0
    assert "per-load: ring order" not in r.stdout
    assert "blkback keeps 0 grants mapped at most" in r.stdout
    r = subprocess.run([sys.executable, str(BENCHMARKS / "block.py"), "--grants", "per-load",
                        "--max-persistent-grants", "8"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert "--max-persistent-grants: only with the persistent disk" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_block_benchmark_fails_a_run_whose_host_reports_a_problem(tmp_path: Path) -> None:
    """A run whose guest's DMA-API debugging reports a misuse (here a sync of a map never
    loaded, planted before the measurements) ends 1 and says its figures are not to be
    used, as a test host's teardown would fail."""
    plant = tmp_path / "plant"
    plant.mkdir()
    (plant / "sitecustomize.py").write_text(
        "import gntdma.toolstack.domains as d\n"
        "from gntdma.sys import BUS_DMASYNC_PREWRITE, bus_dmamap_create, bus_dmamap_sync\n"
        "_orig = d.create_guest_from_config\n"
        "def _planted(*a, **k):\n"
        "    g, vbds = _orig(*a, **k)\n"
        "    tag = vbds[0].sc.xbd_io_dmat\n"
        "    err, m = bus_dmamap_create(tag, 0)\n"
        "    bus_dmamap_sync(tag, m, BUS_DMASYNC_PREWRITE)\n"
        "    return g, vbds\n"
        "d.create_guest_from_config = _planted\n")
    env = dict(os.environ, PYTHONPATH=f"{plant}:{BENCHMARKS}", TMPDIR=str(tmp_path))
    r = subprocess.run([sys.executable, str(BENCHMARKS / "block.py"), "--seconds", "0.02",
                        "--rounds", "1", "--size-mb", "4", "--case", "4K read qd1",
                        "--grants", "per-load", "--dma-debug", "on"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 1, (r.stdout[-800:], r.stderr[-800:])
    assert "the run went wrong; its figures are not to be used:" in r.stderr
    assert "bench: DMA-API debugging:" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plant"]


def test_persistent_benchmark_takes_a_table_of_no_grants(tmp_path: Path) -> None:
    """``persistent.py --max-persistent-grants 0``: Linux's max_persistent_grants=0, as
    block.py takes it (it was refused, and a 0 would have fallen back to the default)."""
    r = subprocess.run([sys.executable, str(BENCHMARKS / "persistent.py"), "--seconds", "0.02",
                        "--rounds", "1", "--size-mb", "4", "--case", "1M read",
                        "--max-persistent-grants", "0", "--json"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-800:]
    doc = json.loads(r.stdout[r.stdout.index("\n{") + 1:])
    assert doc["blkback_max_persistent_grants"] == 0
    assert "blkback keeps 0 persistent grants mapped at most" in r.stdout
    assert list(tmp_path.iterdir()) == []
