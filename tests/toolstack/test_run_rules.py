"""``gntdma run`` keeps FreeBSD's lock rules, which are always on (DESIGN 3).

No sleep with a sleep mutex held (sys/kern/kern_synch.c, _sleep: WITNESS_WARN),
no lost wakeup (every sleep passes its interlock), no hung task (the watchdog,
as FreeBSD's deadlkres, is on with its 60 s default).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gntdma import cli
from gntdma.sched import WITNESS, rules


def test_gntdma_run_under_the_lock_rules_has_no_witness_report(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert not hasattr(rules, "strict")  # no switch: the rules cannot be turned off
    assert rules.hung_task_timeout == 60.0
    out = tmp_path / "r.json"
    rc = cli.main(["run", "--duration", "1", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    data = json.loads(out.read_text())
    checks = {c["name"]: c for c in data["checks"]}
    assert checks["WITNESS: no lock-order reversal or panic"]["ok"] is True
    assert WITNESS.sleeps() == [] and WITNESS.reports == []
    assert "Sleeping on" not in text and "hung task" not in text
