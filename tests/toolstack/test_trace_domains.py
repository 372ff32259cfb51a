"""Which process of a trace a thread goes in (README, Trace: a process per domain,
"host" for thread0 and threads of no domain)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.toolstack.run_helpers import run_cli

from gntdma.toolstack.trace import check_trace_file

pytestmark = pytest.mark.slow


def test_replay_trace_puts_dom0_backend_threads_in_domain_0(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The scenario's dom0/blkback0 and dom0/blkback1 are dom0's backend threads
    (spawned without a domain, named after dom0's domid): Domain-0's process."""
    replay, out = tmp_path / "R.json", tmp_path / "rp.json"
    rc, _o, _e = run_cli(capsys, "explore", "gnttab-shortage-blkfront", "--callback-delivery",
                         "inline", "--out", str(replay))
    assert rc == 1
    rc, _o, _e = run_cli(capsys, "replay", str(replay), "--trace", str(out))
    assert rc == 1
    assert check_trace_file(out) == []
    meta = [e for e in json.loads(out.read_text())["traceEvents"] if e["ph"] == "M"]
    procs = {e["pid"]: e["args"]["name"] for e in meta if e["name"] == "process_name"}
    threads = {e["args"]["name"]: procs[e["pid"]] for e in meta if e["name"] == "thread_name"}
    assert threads["dom0/blkback0"] == "Domain-0 (domid 0)"
    assert threads["dom0/blkback1"] == "Domain-0 (domid 0)"
    assert threads["guest1/xbd0-int"] == "guest1 (domid 1)"
    assert threads["thread0"] == "host"
