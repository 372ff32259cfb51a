"""``--plots DIR``: PNG plots of a job's series, drawn with matplotlib (Agg).

matplotlib is the optional ``plots`` extra: it is imported only when plots
are asked for, and :func:`check_plots_dir` (run before anything is built)
refuses the option when it is missing or the directory cannot be written.
The figures are built first (:func:`make_figures`, which a test inspects:
axes labelled) and then saved (:func:`write_plots`):

- ``grant-entries.png``: grant entries in use per guest over time against
  the capacity, with the shortage periods (loads deferred) shaded;
- ``deferred-latency.png``: the histogram of deferred-load latencies
  (EINPROGRESS to callback);
- ``ring-occupancy.png``: ring slots in use per device over time against the
  ring size (a disk's requests in flight; a NIC's tx slots in flight and rx
  buffers posted);
- ``throughput.png``: MiB/s and IOPS (a NIC: packets/s) per device over time,
  a NIC's each way.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Final

from gntdma.errors import ConfigError
from gntdma.toolstack.interrupt import signals_deferred
from gntdma.toolstack.metrics import Metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["PLOT_DPI", "PLOT_FILES", "PLOT_SIZE", "check_plots_dir", "make_figures",
           "write_plots"]

#: Inches and dots per inch of every plot: 900 x 500 pixels.
PLOT_SIZE: Final = (9.0, 5.0)
PLOT_DPI: Final = 100
#: The files, in the order they are written.
PLOT_FILES: Final = ("grant-entries.png", "deferred-latency.png", "ring-occupancy.png",
                     "throughput.png")


def _matplotlib() -> None:
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("--plots needs matplotlib: pip install 'gntdma[plots]'") from None
    matplotlib.use("Agg")


def check_plots_dir(path: Path) -> None:
    """Refuse ``--plots path`` up front: matplotlib missing, or a directory that
    cannot be made or written. Makes nothing: :func:`write_plots` makes the
    directory when the plots are written, at the end of a run that ran (a
    refused or interrupted run leaves no directory behind).

    Raises:
        ConfigError: with what to do about it.
    """
    _matplotlib()
    if str(path) == "":
        raise ConfigError("--plots: an empty path")
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"--plots {path}: not a directory")
        # Tried for real (os.access says yes to root on /proc or a read-only mount).
        try:
            with signals_deferred():  # the probe never stays in the user's directory
                fd, probe = tempfile.mkstemp(prefix=".gntdma-probe-", dir=path)
                os.close(fd)
                os.unlink(probe)
        except OSError as e:
            raise ConfigError(f"--plots {path}: not writable ({e.strerror or e})") from None
        return
    # The nearest existing ancestor must be a directory the missing ones can be made in.
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--plots {path}: {parent} is not a directory")
    try:
        with signals_deferred():
            os.rmdir(tempfile.mkdtemp(prefix=".gntdma-probe-", dir=parent))
    except OSError as e:
        raise ConfigError(f"--plots {path}: cannot make a directory in {parent} "
                          f"({e.strerror or e})") from None


def _shortages(t: list[float], waiting: list[int], done: list[int]) -> list[tuple[float, float]]:
    """The spans in which loads were deferred (some waiting, or some completed)."""
    spans: list[tuple[float, float]] = []
    prev_t, prev_done = 0.0, 0
    for ti, w, d in zip(t, waiting, done, strict=True):
        if w > 0 or d > prev_done:
            if spans and spans[-1][1] >= prev_t:
                spans[-1] = (spans[-1][0], ti)
            else:
                spans.append((prev_t, ti))
        prev_t, prev_done = ti, d
    return spans


def make_figures(metrics: Metrics) -> dict[str, Figure]:
    """The plots of ``metrics``, by file name (not saved yet)."""
    _matplotlib()
    from matplotlib.figure import Figure

    samples = metrics.samples
    figs: dict[str, Figure] = {}

    fig = Figure(figsize=PLOT_SIZE, dpi=PLOT_DPI, layout="constrained")
    ax = fig.add_subplot()
    shaded = False
    for g in metrics.guests:
        pts = [(s.t, x) for s in samples for x in s.guests if x.name == g.name and not x.crashed]
        if not pts:
            continue
        ts = [p[0] for p in pts]
        line = ax.plot(ts, [p[1].in_use for p in pts], label=f"{g.name} in use")[0]
        ax.plot(ts, [p[1].capacity for p in pts], linestyle="--", color=line.get_color(),
                label=f"{g.name} capacity")
        for a, b in _shortages(ts, [p[1].deferred_waiting for p in pts],
                               [p[1].deferred_done for p in pts]):
            ax.axvspan(a, b, color="tab:red", alpha=0.15,
                       label=None if shaded else "loads deferred (shortage)")
            shaded = True
    ax.set_title("grant entries in use")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("grant entries")
    ax.set_ylim(bottom=0)
    ax.legend(loc="lower right", fontsize="small")
    figs["grant-entries.png"] = fig

    fig = Figure(figsize=PLOT_SIZE, dpi=PLOT_DPI, layout="constrained")
    ax = fig.add_subplot()
    hist = metrics.deferred_latency_hist()
    used = [b for b, n in enumerate(hist) if n > 0]
    lo, hi = (min(used), max(used)) if used else (0, 0)
    buckets = list(range(lo, hi + 1))
    ax.bar([str(1 << b) for b in buckets], [hist[b] for b in buckets], color="tab:orange")
    ax.set_title(f"deferred-load latency, EINPROGRESS to callback ({sum(hist)} loads)")
    ax.set_xlabel("latency below (us)")
    ax.set_ylabel("deferred loads")
    ax.tick_params(axis="x", labelrotation=45)
    figs["deferred-latency.png"] = fig

    disk_names = [d.name for d in samples[-1].disks] if samples else []
    fig = Figure(figsize=PLOT_SIZE, dpi=PLOT_DPI, layout="constrained")
    ax = fig.add_subplot()
    for name in disk_names:
        dts = [(s.t, x) for s in samples for x in s.disks if x.name == name]
        line = ax.plot([p[0] for p in dts], [p[1].in_flight for p in dts],
                       label=f"{name} in flight")[0]
        ax.plot([p[0] for p in dts], [p[1].ring_size for p in dts], linestyle="--",
                color=line.get_color(), label=f"{name} ring size")
    nic_names = list(dict.fromkeys(n.name for s in samples for n in s.nics))
    for name in nic_names:
        nts = [(s.t, x) for s in samples for x in s.nics if x.name == name]
        ts = [p[0] for p in nts]
        line = ax.plot(ts, [p[1].tx_in_flight for p in nts], label=f"{name} tx in flight")[0]
        ax.plot(ts, [p[1].rx_posted for p in nts], linestyle=":", color=line.get_color(),
                label=f"{name} rx posted")
        ax.plot(ts, [p[1].ring_size for p in nts], linestyle="--", color=line.get_color(),
                label=f"{name} ring size")
    ax.set_title("ring occupancy")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("slots in use on the ring")
    ax.set_ylim(bottom=0)
    if disk_names or nic_names:
        ax.legend(loc="lower right", fontsize="small")
    figs["ring-occupancy.png"] = fig

    fig = Figure(figsize=PLOT_SIZE, dpi=PLOT_DPI, layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    for name in disk_names:
        dts = [(s.t, x) for s in samples for x in s.disks if x.name == name]
        top.plot([p[0] for p in dts], [p[1].mib_s for p in dts], label=name)
        bottom.plot([p[0] for p in dts], [p[1].iops for p in dts], label=name)
    for name in nic_names:
        nts = [(s.t, x) for s in samples for x in s.nics if x.name == name]
        ts = [p[0] for p in nts]
        for way in ("tx", "rx"):
            top.plot(ts, [getattr(p[1], f"{way}_mib_s") for p in nts], linestyle="--",
                     label=f"{name} {way}")
            bottom.plot(ts, [getattr(p[1], f"{way}_pps") for p in nts], linestyle="--",
                        label=f"{name} {way} (packets/s)")
    top.set_title("throughput and IOPS")
    top.set_ylabel("MiB/s")
    top.set_xlabel("time (s)")
    bottom.set_ylabel("IOPS, packets/s")
    bottom.set_xlabel("time (s)")
    if disk_names or nic_names:
        top.legend(loc="upper right", fontsize="small")
    figs["throughput.png"] = fig
    return figs


def write_plots(metrics: Metrics, directory: Path) -> list[Path]:
    """Draw and save the plots of ``metrics`` into ``directory`` (made if missing);
    the files written."""
    figs = make_figures(metrics)
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for name, fig in figs.items():
        path = directory / name
        fig.savefig(path, dpi=PLOT_DPI)
        out.append(path)
    return out
