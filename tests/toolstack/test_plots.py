"""``--plots DIR`` (issue 15 item 2): PNGs of a real run, valid, of the expected size, their
axes labelled (checked on the figures before they are saved), named by the report;
the option refused up front when it cannot work."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from run_helpers import run_cli, subprocess_env

from gntdma.toolstack import plots
from gntdma.toolstack.plots import PLOT_DPI, PLOT_FILES, PLOT_SIZE

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG file (its IHDR chunk), checking the signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_MAGIC and head[12:16] == b"IHDR", path
    w, h = struct.unpack(">II", head[16:24])
    return int(w), int(h)


def test_plots_are_valid_pngs_of_the_expected_size_with_labelled_axes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    figures: dict[str, Any] = {}
    make = plots.make_figures

    def keep(metrics: Any) -> Any:
        figures.update(make(metrics))
        return figures

    monkeypatch.setattr(plots, "make_figures", keep)
    out = tmp_path / "new" / "plots"  # made, parents too
    report = tmp_path / "r.json"
    rc, stdout, err = run_cli(capsys, "run", "--duration", "3", "--plots", str(out),
                              "--json", str(report))
    assert rc == 0, err
    assert sorted(figures) == sorted(PLOT_FILES)
    for name, fig in figures.items():
        for ax in fig.axes:
            assert ax.get_xlabel() and ax.get_ylabel(), (name, ax.get_title())
            assert ax.get_title() or ax is not fig.axes[0]
    # Shortage periods shaded: the default's small grant table defers loads.
    grant = figures["grant-entries.png"].axes[0]
    assert any(p.get_label() == "loads deferred (shortage)" for p in grant.patches)
    lat = figures["deferred-latency.png"].axes[0]
    assert sum(p.get_height() for p in lat.patches) > 0  # the deferred loads' latencies
    ring = figures["ring-occupancy.png"].axes[0]
    assert {ln.get_label() for ln in ring.lines} >= {"guest1/xvda in flight",
                                                     "guest1/xvdb ring size"}
    want = (int(PLOT_SIZE[0] * PLOT_DPI), int(PLOT_SIZE[1] * PLOT_DPI))
    for name in PLOT_FILES:
        assert png_size(out / name) == want
    doc = json.loads(report.read_text())
    assert doc["plots"] == [str(out / n) for n in PLOT_FILES]
    assert f"plots: {out / PLOT_FILES[0]}" in stdout


def test_plots_dir_that_cannot_be_made_is_refused_up_front_with_status_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, out, err = run_cli(capsys, "run", "--plots", str(blocker / "plots"))
    assert rc == 2 and out == ""  # nothing ran
    assert err.startswith(f"gntdma run: --plots {blocker / 'plots'}: ")
    rc, out, err = run_cli(capsys, "run", "--plots", str(blocker))
    assert rc == 2 and "not a directory" in err and out == ""


def test_plots_without_matplotlib_are_refused_with_the_pip_hint(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    rc, out, err = run_cli(capsys, "run", "--plots", str(tmp_path / "p"))
    assert rc == 2 and "pip install 'gntdma[plots]'" in err and out == ""
    rc, out, err = run_cli(capsys, "serve", "--nbd", str(tmp_path / "s"), "--plots",
                           str(tmp_path / "p"))
    assert rc == 2 and "pip install 'gntdma[plots]'" in err


def test_matplotlib_is_imported_only_when_plots_are_asked_for(tmp_path: Path) -> None:
    code = ("import sys; from gntdma.cli import main; rc = main(['run', '--duration', '0.5']); "
            "print('matplotlib loaded:', 'matplotlib' in sys.modules); sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=subprocess_env(tmp_path),
                       capture_output=True, text=True, timeout=240, check=False)
    assert p.returncode == 0, p.stderr
    assert "matplotlib loaded: False" in p.stdout


def test_shortage_spans_cover_the_seconds_with_deferred_loads() -> None:
    spans = plots._shortages([0.0, 1.0, 2.0, 3.0, 4.0], [0, 2, 0, 0, 1], [0, 0, 5, 5, 5])
    assert spans == [(0.0, 2.0), (3.0, 4.0)]
