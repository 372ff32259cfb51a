"""Generated configs either pass or are refused up front, never hang (issue 11).

``max_grant_frames`` from 1: a one-frame table with up to four disks runs (blkfront
sizes its requests by its share of the table, issue 11 item 1).
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from run_helpers import gntdma_cmd, subprocess_env


@st.composite
def configs(draw: st.DrawFn) -> tuple[str, int]:
    frames = draw(st.integers(1, 4))
    ndisks = draw(st.integers(0, 4))
    memory = draw(st.sampled_from([2, 3, 8, 16, 32]))
    threads = draw(st.integers(1, 8))
    disks = []
    for i in range(ndisks):
        size = draw(st.sampled_from(["512", "64K", "1M", "3M"]))
        access = draw(st.sampled_from(["rw", "rw", "ro"]))
        disks.append(f"'vdev=xvd{'abcd'[i]}, access={access}, size={size}, target=d{i}.img'")
    text = (f"name='p'\nmemory={memory}\nmax_grant_frames={frames}\n"
            f"disk=[{', '.join(disks)}]\n")
    return text, threads


@settings(max_examples=6, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cfg=configs())
def test_a_config_passes_or_is_refused_up_front(tmp_path_factory: pytest.TempPathFactory,
                                                cfg: tuple[str, int]) -> None:
    text, threads = cfg
    with tempfile.TemporaryDirectory(dir=tmp_path_factory.getbasetemp()) as d:
        work = Path(d)
        tmp = work / "tmp"
        tmp.mkdir()
        (work / "p.cfg").write_text(text)
        r = subprocess.run(gntdma_cmd("run", "p.cfg", "--duration", "0.2", "--threads",
                                      str(threads), "--json", "r.json"),
                           cwd=work, env=subprocess_env(tmp), capture_output=True,
                           text=True, timeout=120)  # a hang fails here
        assert r.returncode in (0, 2), (text, r.stdout[-2000:], r.stderr)
        if r.returncode == 0:
            assert json.loads((work / "r.json").read_text())["ok"] is True
        else:
            assert "p.cfg:" in r.stderr and "xenstored:" not in r.stdout
