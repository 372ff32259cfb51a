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
    assert cli.main(["run", "--duration", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "0 failed" in text and "FAIL" not in text
    assert "deferred loads" in text  # the live progress line
    data = json.loads(out.read_text())
    assert data["ok"] is True
    assert all({"name", "ok", "detail"} <= set(c) for c in data["checks"])
    (guest,) = data["guests"]
    for key in ("name", "domid", "max_grant_frames", "grant_entries_peak", "deferred_loads",
                "leaked_grant_refs", "disks"):
        assert key in guest, key
    assert guest["deferred_loads"] > 0 and guest["leaked_grant_refs"] == 0
    assert [d["vdev"] for d in guest["disks"]] == ["xvda", "xvdb"]
    for d in guest["disks"]:
        for key in ("requests", "indirect_requests", "bytes_read", "bytes_written",
                    "bytes_verified", "errors"):
            assert key in d, key
        assert d["bytes_verified"] > 0 and d["errors"] == 0 and d["indirect_requests"] > 0
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


def test_run_with_a_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "small.cfg"
    cfg.write_text(
        'name = "vm7"\nmemory = 32\nmax_grant_frames = 4\n'
        "disk = [ 'format=raw, vdev=xvda, access=rw, size=16M, target=vm7.img' ]\n")
    out = tmp_path / "r.json"
    assert cli.main(["run", str(cfg), "--duration", "0.5", "--threads", "2",
                     "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["guests"][0]["name"] == "vm7"
    assert (tmp_path / "vm7.img").stat().st_size == 16 << 20  # created sparse beside it
    capsys.readouterr()


def test_a_bad_config_is_refused_with_its_line(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "bad.cfg"
    cfg.write_text('name = "x"\nmemroy = 32\n')
    assert cli.main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "bad.cfg:2" in err
    assert cli.main(["run", "--threads", "0"]) == 2
