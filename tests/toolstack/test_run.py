"""``gntdma run``: the summary, the JSON report, and a failing check's exit status."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gntdma import cli
from gntdma.toolstack import run as run_mod
from gntdma.toolstack.host import Guest, Host
from gntdma.toolstack.report import Report


def test_run_passes_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    assert cli.main(["run", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "0 failed" in text and "FAIL" not in text
    data = json.loads(out.read_text())
    assert data["ok"] is True
    names = {c["name"] for c in data["checks"]}
    assert "dom0 maps and reads every byte" in names
    assert "teardown: nothing leaked" in names
    assert "a sleepable load defers on a full grant table" in names
    assert "the deferred load completes once after references are freed" in names
    assert data["witness"] == {"reversals": 0, "panics": 0}


def test_a_failing_check_makes_the_exit_status_nonzero(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    real = run_mod.run_grant_demo

    def corrupting(host: Host, guest: Guest, report: Report, **kw: object) -> None:
        # Corrupt each page right after the guest grants it: dom0 must notice.
        orig_grant = guest.gnttab.gnttab_grant_foreign_access

        def grant(domid: int, frame: int, readonly: bool) -> tuple[int, int]:
            rv = orig_grant(domid, frame, readonly)
            guest.hc.own_page(frame)[100] ^= 0xFF
            return rv

        monkeypatch.setattr(guest.gnttab, "gnttab_grant_foreign_access", grant)
        real(host, guest, report)

    monkeypatch.setattr(run_mod, "run_grant_demo", corrupting)
    assert cli.main(["run"]) == 1
    assert "FAIL" in capsys.readouterr().out
