"""``gntdma explore`` finds one bug of each class the lock rules catch, and replays it.

The rules are FreeBSD's (DESIGN 3): sys/kern/kern_synch.c (_sleep: the
WITNESS_WARN "Sleeping on ... with the following non-sleepable locks held");
sys/kern/subr_witness.c (witness_checkorder: "acquiring blockable sleep lock
with spinlock or critical section held"); sleep(9) (a condition checked
without the interlock can miss its wakeup on SMP).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gntdma import cli
from gntdma.toolstack.explorecmd import list_scenarios
from gntdma.toolstack.scenarios_rules import RULE_SCENARIOS

CASES = [
    ("lost-wakeup", "random", "deadlock", 'guest1/xbd0-wait waits for _Channel "xbdwait"'),
    ("sleep-with-mutex", "random", "sleep",
     'Sleeping on "xbdfree" with the following non-sleepable locks held:\n'
     "exclusive sleep mutex xbd_io r = 0 locked @"),
    ("abba-callout", "dfs", "deadlock",
     "deadlock: a cycle of threads each waiting for a lock another holds"),
    ("spin-barrier", "random", "panic",
     "acquiring blockable sleep lock with spinlock or critical section held "
     "(sleep mutex) xbd_io"),
]


@pytest.mark.parametrize(("scenario", "strategy", "kind", "text"), CASES)
def test_each_lock_rule_scenario_is_found_and_replayed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], scenario: str, strategy: str,
        kind: str, text: str) -> None:
    out = tmp_path / "replay.json"
    rc = cli.main(["explore", scenario, "--strategy", strategy, "--schedules", "500",
                   "--out", str(out)])
    found = capsys.readouterr().out
    assert rc == 1, found
    assert f"failure: {kind}" in found and text in found
    doc = json.loads(out.read_text())
    assert doc["outcome"]["kind"] == kind
    assert cli.main(["replay", str(out)]) == 1
    replayed = capsys.readouterr().out
    assert "reproduced: the same failure as recorded" in replayed and text in replayed


def test_explore_list_shows_the_lock_rule_scenarios(
        capsys: pytest.CaptureFixture[str]) -> None:
    lines = list_scenarios()
    for name in RULE_SCENARIOS:
        assert any(line.split()[0] == name for line in lines), lines
    assert cli.main(["explore", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in RULE_SCENARIOS)
