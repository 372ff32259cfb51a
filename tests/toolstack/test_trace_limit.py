"""``--trace-limit``: a trace cut at any number of events is still well formed.

The limit may fall anywhere: on a notification's instant, on the short
``notify`` slice a flow starts in, on the flow's ``s``, on the handler slice
its ``f`` ends in. Whatever it cuts, the file must pass the structure check
(balanced B/E per thread, every flow's ``s`` with one ``f`` and no ``f``
without its ``s``, async ids matched) and an unserved notification is an
instant ``notify not served`` with its flow dropped (README, Trace).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.toolstack.run_helpers import run_cli, write_cfg

from gntdma.toolstack.trace import check_trace_file

pytestmark = pytest.mark.slow

_CFG = ("name = 'g'\nmemory = 16\nmax_grant_frames = 2\n"
        "disk = [ 'vdev=xvda, size=8M, target=new.img' ]\n")


def _instants(path: Path) -> int:
    ev = json.loads(path.read_text())["traceEvents"]
    return sum(1 for e in ev if e["name"] == "notify not served" and e["ph"] == "i")


def _unmatched_or_sliced(path: Path) -> list[str]:
    ev = json.loads(path.read_text())["traceEvents"]
    starts = {e["id"] for e in ev if e["ph"] == "s"}
    out = [f"f {e['id']} without s" for e in ev if e["ph"] == "f" and e["id"] not in starts]
    return out + [f"{e['ph']} notify not served" for e in ev
                  if e["name"] == "notify not served" and e["ph"] != "i"]


def _every_limit(capsys: pytest.CaptureFixture[str], tmp_path: Path, command: list[str],
                 status: int) -> None:
    """``command`` with ``--trace-limit`` 1 .. 60: each trace well formed, and some
    cut falls between a notification and its handler."""
    bad: dict[int, list[str]] = {}
    unserved = 0
    for limit in range(1, 61):
        out = tmp_path / f"t{limit}.json"
        rc, stdout, err = run_cli(capsys, *command, "--trace", str(out),
                                  "--trace-limit", str(limit))
        assert rc == status, (limit, stdout, err)
        problems = check_trace_file(out) + _unmatched_or_sliced(out)
        if problems:
            bad[limit] = problems[:3]
        unserved += _instants(out)
    assert bad == {}
    assert unserved > 0


def test_every_trace_limit_gives_a_well_formed_run_trace(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cfg = write_cfg(tmp_path / "g.cfg", _CFG)
    _every_limit(capsys, tmp_path, ["run", str(cfg), "--duration", "0.05"], 0)


def test_every_trace_limit_gives_a_well_formed_replay_trace(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The replay is deterministic: every cut of the same schedule is tried."""
    replay = tmp_path / "R.json"
    rc, _o, _e = run_cli(capsys, "explore", "gnttab-shortage-blkfront", "--callback-delivery",
                         "inline", "--out", str(replay))
    assert rc == 1
    _every_limit(capsys, tmp_path, ["replay", str(replay)], 1)
