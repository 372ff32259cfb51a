"""benchmarks/block.py: the persistent disk is comparable with the per-load disk.

Linux xen-blkfront ``blkfront_setup_indirect`` sizes persistent requests by its
``max_indirect_segments`` and the backend's ``feature-max-indirect-segments``,
not by xen-blkback's ``max_pgrants``: both disks send a 1 MiB I/O as one request of
256 segments, and the table says how many requests each I/O took.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_block_benchmark_persistent_disk_has_the_per_load_disks_request_size(
        tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(BENCHMARKS / "block.py"), "--seconds", "0.05",
                        "--size-mb", "8", "--case", "1M read qd1", "--json"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-800:]
    assert "reqs/io" in r.stdout and "segs/req" in r.stdout
    assert "blkback keeps 8224 grants mapped at most" in r.stdout  # 32 x (256 + 1)
    doc = json.loads(r.stdout[r.stdout.index("\n{") + 1:])
    rows = {w["grants"]: w for w in doc["workloads"]}
    assert set(rows) == {"per-load", "persistent"}
    for row in rows.values():
        assert row["requests_per_io"] == 1.0
        assert row["segments_per_request"] == 256.0
    assert list(tmp_path.iterdir()) == []


def test_block_benchmark_max_persistent_grants_option(tmp_path: Path) -> None:
    """``--max-persistent-grants 1056``: Linux xen-blkback's default table."""
    r = subprocess.run([sys.executable, str(BENCHMARKS / "block.py"), "--seconds", "0.05",
                        "--size-mb", "8", "--case", "1M write qd1", "--grants", "persistent",
                        "--max-persistent-grants", "1056"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-800:]
    assert "blkback keeps 1056 grants mapped at most" in r.stdout
    assert list(tmp_path.iterdir()) == []


def test_a_measurement_shorter_than_one_io_still_counts_one(tmp_path: Path) -> None:
    """A worker that starts after its deadline (a loaded machine, a tiny --seconds)
    does one I/O: persistent.py's ratio is of two real figures, never a division by
    zero."""
    r = subprocess.run([sys.executable, str(BENCHMARKS / "persistent.py"), "--seconds", "1e-9",
                        "--rounds", "1", "--size-mb", "4", "--case", "1M read", "--json"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-800:]
    doc = json.loads(r.stdout[r.stdout.index("\n{") + 1:])
    (row,) = doc["workloads"]
    assert row["per_load_iops"] > 0 and row["persistent_iops"] > 0 and row["ratio"] > 0
    assert list(tmp_path.iterdir()) == []


def test_the_json_has_the_disk_set_up_and_tunables_the_table_prints(tmp_path: Path) -> None:
    """Issue 14: every benchmark prints its table and, with ``--json``, the same
    figures; a benchmark reports which tunables it used (lever 1)."""
    r = subprocess.run([sys.executable, str(BENCHMARKS / "block.py"), "--seconds", "0.05",
                        "--size-mb", "8", "--case", "1M read qd1", "--json",
                        "--max-persistent-grants", "1056"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-800:]
    doc = json.loads(r.stdout[r.stdout.index("\n{") + 1:])
    disks = doc["disks"]
    assert disks["per-load"]["ring_page_order"] == 2
    assert disks["persistent"]["ring_page_order"] == 0
    for mode, d in disks.items():
        assert (f"{mode}: ring order {d['ring_page_order']}, {d['commands']} commands, "
                f"{d['segments_per_request_max']} segments per request at most") in r.stdout
    assert disks["persistent"]["blkback_max_persistent_grants"] == 1056
    r = subprocess.run([sys.executable, str(BENCHMARKS / "persistent.py"), "--seconds", "0.02",
                        "--rounds", "1", "--size-mb", "4", "--case", "1M read", "--json"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-800:]
    doc = json.loads(r.stdout[r.stdout.index("\n{") + 1:])
    assert (f"{doc['segments_per_request_max']} segments per persistent request at most, "
            f"blkback keeps {doc['blkback_max_persistent_grants']} persistent grants") \
        in r.stdout
    for who in ("guest", "dom0"):
        assert doc["kernel_tunables"][who]["describe"] in r.stdout
    for mode, st in doc["grant_maps"].items():
        assert (f"{mode}: blkback mapped {st['segments_mapped']} grants for {st['segments']} "
                f"segments, {st['mapped_now']} mapped now") in r.stdout
    assert list(tmp_path.iterdir()) == []
