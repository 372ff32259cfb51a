"""The live dashboard of ``gntdma run`` (issue 15 item 1): a recorded console holds each
panel with the run's figures, checker reports appear as they are made, piped output
keeps the plain progress lines without escape codes."""

from __future__ import annotations

import io
import re
import subprocess
from pathlib import Path

import pytest
from rich.console import Console
from run_helpers import gntdma_cmd, subprocess_env, write_cfg

from gntdma.dev.blkback import Blkback
from gntdma.sched import WITNESS
from gntdma.sys import DmaDebugKind
from gntdma.toolstack.dashboard import RunView, dashboard_wanted, render
from gntdma.toolstack.host import Host
from gntdma.toolstack.metrics import Metrics, percentile
from gntdma.toolstack.run import run_main_job

_PLAIN_LINE = re.compile(r"^  \[ *\d+\.\ds\] requests +\d+ +\d+\.\d MiB/s  grant entries in use "
                         r"( *\d+/\d+)+  deferred loads +\d+$", re.M)


def _recording_view(width: int = 120) -> tuple[RunView, Console]:
    console = Console(record=True, file=io.StringIO(), force_terminal=True, width=width)
    return RunView(dashboard=True, console=console), console


def test_recorded_console_holds_each_panel_with_the_runs_figures(tmp_path: Path) -> None:
    """The dashboard of a real default run, on a recording console: the guests panel
    (grant entries against the capacity of max_grant_frames = 3: 3 * 512 - 8 = 1528,
    deferred loads), the devices panel (both disks, ring size, latency percentiles)
    and the reports panel; no plain progress line is printed meanwhile."""
    view, console = _recording_view()
    lines: list[str] = []
    report = run_main_job(duration=2, view=view, log=lines.append)
    assert report.ok, report.format()
    text = console.export_text()
    for panel in ("guests: grant table", "devices: rings, throughput, latency", "reports (0)"):
        assert panel in text
    assert "guest1" in text and "/1528" in text
    assert "guest1/xvda" in text and "guest1/xvdb" in text
    assert re.search(r"guest1/xvda\s+\S+ \d+/\d+\s+\d+\.\d\s+\d+\s+[\d.]+ (us|ms)", text), text
    assert not _PLAIN_LINE.search("\n".join(lines))
    # The last frame: every deferred load of the workloads completed, none waits.
    m = view.metrics
    assert m is not None and len(m.samples) >= 3
    last = m.samples[-1].guests[0]
    deferred = sum(d.deferred_loads for d in m.samples[-1].disks)
    assert last.deferred_waiting == 0 and last.deferred_done == deferred > 0
    assert last.capacity == 1528


def test_a_dma_debug_report_appears_in_the_reports_panel_at_the_next_sample() -> None:
    """Reports are collected from the checkers' report lists as they grow (WITNESS for
    the process, DMA-API debugging per guest kernel), never parsed from output."""
    WITNESS.reset()
    host = Host(seed=0)
    try:
        g = host.create_guest("g1", memory_mb=16, max_grant_frames=2)
        m = Metrics(host, [g], [])
        assert m.events == []
        g.kernel.dma_debug.report(DmaDebugKind.DOUBLE_UNLOAD, "map unloaded twice", map="m0")
        WITNESS.record_sleep("g1/io0", "sleeping thread g1/io0 with \"xbd\" locked", "x.py:1")
        m.sample()
        kinds = [e.kind for e in m.events]
        assert kinds == ["witness", "dma-debug"]
        assert "map unloaded twice" in m.events[1].text and m.events[1].text.startswith("g1: ")
        m.sample()  # nothing new: nothing added
        assert len(m.events) == 2
        console = Console(record=True, file=io.StringIO(), width=120)
        console.print(render(m))
        text = console.export_text()
        assert "reports (2)" in text and "dma-debug: g1:" in text and "witness: sleeping" in text
        host.destroy_guest(g)
    finally:
        WITNESS.reset()
        host.close()


def test_a_stall_is_shown_as_a_watchdog_report(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The stall watchdog's report reaches the dashboard's last frame (a backend that
    never answers, as in test_run_liveness)."""
    monkeypatch.setattr(Blkback, "_dispatch", lambda self, raw: None)
    cfg = write_cfg(tmp_path / "s.cfg", "name='g'\nmemory=64\ndisk=['format=raw, vdev=xvda, "
                    f"access=rw, size=8M, target={tmp_path / 'd.img'}']\n")
    view, console = _recording_view(160)
    report = run_main_job(cfg, duration=30, stall_timeout=1, view=view, log=lambda _l: None)
    assert not report.ok
    text = console.export_text()
    assert "watchdog: no I/O completed" in text
    assert view.metrics is not None and view.metrics.events[-1].kind == "watchdog"


def test_piped_output_has_no_escape_codes_and_the_plain_progress_lines(tmp_path: Path) -> None:
    """--dashboard auto with stdout a pipe: the progress lines of before, no escape code."""
    p = subprocess.run(gntdma_cmd("run", "--duration", "2"), cwd=tmp_path,
                       env=subprocess_env(tmp_path), capture_output=True, text=True,
                       timeout=240, check=False)
    assert p.returncode == 0, p.stderr
    assert "\x1b" not in p.stdout and "\x1b" not in p.stderr
    assert len(_PLAIN_LINE.findall(p.stdout)) >= 1, p.stdout
    assert "guests: grant table" not in p.stdout


def test_dashboard_modes() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert dashboard_wanted("auto", Tty()) is True
    assert dashboard_wanted("auto", io.StringIO()) is False
    assert dashboard_wanted("on", io.StringIO()) is True
    assert dashboard_wanted("off", Tty()) is False


def test_latency_percentiles_of_a_log2_histogram() -> None:
    hist = [0] * 40
    assert percentile(hist, 0.5) is None
    hist[11] = 100  # [1024, 2048) us
    p50 = percentile(hist, 0.5)
    assert p50 is not None and 1024 <= p50 < 2048
    hist[20] = 2  # two slow ones: p99 falls among them
    p99 = percentile(hist, 0.99)
    assert p99 is not None and (1 << 19) <= p99 <= (1 << 20)


def test_the_devices_panel_and_the_ring_plot_show_each_nic(tmp_path: Path) -> None:
    """Issue 15: "per device ring occupancy, throughput": the default guest's vif
    (netfront's tx and rx rings, NET_TX_RING_SIZE = NET_RX_RING_SIZE = 256 on a 4 KiB
    page a queue: xen/include/public/io/netif.h, __CONST_RING_SIZE) is a device of the
    dashboard and of the ring-occupancy and throughput plots, beside the disks."""
    from gntdma.host.netns import net_unavailable

    if net_unavailable() is not None:
        pytest.skip(f"no NICs here: {net_unavailable()}")
    from gntdma.toolstack.plots import make_figures

    view, console = _recording_view(width=140)
    report = run_main_job(duration=2, view=view, log=lambda _l: None)
    assert report.ok, report.format()
    text = console.export_text()
    assert re.search(r"guest1/vif\d+\.\d+ tx\s+\S+ \d+/\d+\s+\d+\.\d\s+\d+ pkt/s", text), text
    assert re.search(r"guest1/vif\d+\.\d+ rx\s+\S+ \d+/\d+", text), text
    m = view.metrics
    assert m is not None
    nics = m.samples[-1].nics
    # 256 slots a ring per queue (netfront's default: 2 queues, multi-queue-num-queues)
    assert len(nics) == 1 and nics[0].ring_size % 256 == 0
    assert 0 < nics[0].rx_posted <= nics[0].ring_size
    figs = make_figures(m)
    labels = [t.get_text() for t in figs["ring-occupancy.png"].axes[0].get_legend().get_texts()]
    assert any(lb.startswith(nics[0].name) and "rx posted" in lb for lb in labels), labels
    labels = [t.get_text() for t in figs["throughput.png"].axes[0].get_legend().get_texts()]
    assert f"{nics[0].name} tx" in labels and f"{nics[0].name} rx" in labels
