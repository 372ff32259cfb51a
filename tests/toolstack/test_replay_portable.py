"""A replay file is portable (issue 14 lever 5: "a run is its seed and steps"):
the failure it reproduces is compared without where gntdma's source sits on the
machine that wrote it nor the line numbers of its lock sites, which the
WITNESS lines quote (``xbd_io @ /a/checkout/src/gntdma/...py:277``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from run_helpers import run_cli


def _record(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    rp = tmp_path / "R.json"
    rc, _out, _err = run_cli(capsys, "explore", "gnttab-shortage-blkfront",
                             "--callback-delivery", "inline", "--out", str(rp))
    assert rc == 1 and rp.exists()
    return rp


def test_a_replay_written_in_another_checkout_with_other_lines_reproduces(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rp = _record(tmp_path, capsys)
    doc = json.loads(rp.read_text())
    report = doc["outcome"]["report"]
    assert re.search(r"/gntdma/\S+\.py:\d+", report), report  # it quotes sites
    moved = re.sub(r"\S*/(gntdma/\S+?\.py):(\d+)",
                   lambda m: f"/elsewhere/checkout/src/{m.group(1)}:{int(m.group(2)) + 7}",
                   report)
    assert moved != report
    doc["outcome"]["report"] = moved
    rp.write_text(json.dumps(doc))
    rc, out, _err = run_cli(capsys, "replay", str(rp))
    assert rc == 1 and "reproduced: the same failure as recorded" in out, out[-800:]


def test_a_replay_whose_recorded_failure_differs_says_so(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rp = _record(tmp_path, capsys)
    doc = json.loads(rp.read_text())
    doc["outcome"]["report"] = doc["outcome"]["report"].replace("xbd_io", "other_lock")
    rp.write_text(json.dumps(doc))
    rc, out, _err = run_cli(capsys, "replay", str(rp))
    assert rc == 1 and "a different failure than recorded" in out, out[-800:]
