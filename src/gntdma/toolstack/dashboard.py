"""The live terminal dashboard of ``gntdma run``, ``serve`` and ``explore``.

A rich ``Live`` display that is refreshed only from the scheduler's one-second
timer (``auto_refresh=False``: rich starts no refresh thread, and nothing of
the host is ever read from another OS thread). Panels:

- guests: grant entries in use against the capacity ``max_grant_frames``
  gives, as a bar, and the deferred loads waiting and completed;
- devices: ring occupancy (requests in flight against the ring size) as a
  bar, throughput, IOPS and the request latency percentiles of the second;
- reports: WITNESS, DMA-API debugging and watchdog reports as they happen.

:class:`RunView` is what a command gives the job: the dashboard when it is
shown, and the :class:`~gntdma.toolstack.metrics.Metrics` series the plots
are drawn from. When stdout is not a terminal (``--dashboard auto``), no
dashboard: the plain progress lines of the job are printed as before.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Final, TextIO, TypeVar

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from gntdma.toolstack.metrics import Event, Metrics, Sample

if TYPE_CHECKING:
    from collections.abc import Callable

    from gntdma.toolstack.host import Guest, Host
    from gntdma.toolstack.vbd import Vbd
    from gntdma.toolstack.vif import Vif

__all__ = ["DASHBOARD_MODES", "ExploreView", "RunView", "dashboard_wanted", "render",
           "render_explore"]

#: ``--dashboard`` values: auto (when stdout is a terminal), on, off.
DASHBOARD_MODES: Final = ("auto", "on", "off")
#: Reports kept on screen (the newest).
_EVENTS_SHOWN: Final = 6
_BAR: Final = 24

T = TypeVar("T")


def dashboard_wanted(mode: str, stream: TextIO | None = None) -> bool:
    """Whether ``--dashboard mode`` shows the dashboard on ``stream`` (stdout)."""
    if mode == "on":
        return True
    if mode == "off":
        return False
    s = stream if stream is not None else sys.stdout
    try:
        return s.isatty()
    except (AttributeError, ValueError):
        return False


def _us(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1000:.2f} ms" if v >= 1000 else f"{v:.0f} us"


def _bar(used: int, total: int) -> RenderableType:
    row = Table.grid(padding=(0, 1))
    row.add_row(ProgressBar(total=max(total, 1), completed=min(used, max(total, 1)),
                            width=_BAR), Text(f"{used}/{total}"))
    return row


def _guests_panel(s: Sample) -> Panel:
    t = Table(expand=True, box=None)
    t.add_column("guest")
    t.add_column("grant entries in use")
    t.add_column("frames", justify="right")
    t.add_column("deferred loads waiting", justify="right")
    t.add_column("completed", justify="right")
    for g in s.guests:
        if g.crashed:
            t.add_row(g.name, Text("crashed", style="bold red"), "-", "-", "-")
            continue
        t.add_row(g.name, _bar(g.in_use, g.capacity), str(g.frames),
                  str(g.deferred_waiting), str(g.deferred_done))
    return Panel(t, title="guests: grant table", title_align="left")


def _devices_panel(s: Sample) -> Panel:
    t = Table(expand=True, box=None)
    t.add_column("device")
    t.add_column("ring occupancy")
    t.add_column("MiB/s", justify="right")
    t.add_column("IOPS", justify="right")
    t.add_column("p50", justify="right")
    t.add_column("p99", justify="right")
    t.add_column("requests", justify="right")
    for d in s.disks:
        t.add_row(d.name, _bar(d.in_flight, d.ring_size), f"{d.mib_s:.1f}", f"{d.iops:.0f}",
                  _us(d.p50_us), _us(d.p99_us), str(d.requests))
    # A NIC's two rings; packets a second where a disk has IOPS, and no latency
    # (nothing pairs a packet with an answer: see gntdma.toolstack.metrics).
    for n in s.nics:
        t.add_row(f"{n.name} tx", _bar(n.tx_in_flight, n.ring_size), f"{n.tx_mib_s:.1f}",
                  f"{n.tx_pps:.0f} pkt/s", "-", "-", str(n.packets))
        t.add_row(f"{n.name} rx", _bar(n.rx_posted, n.ring_size), f"{n.rx_mib_s:.1f}",
                  f"{n.rx_pps:.0f} pkt/s", "-", "-", "")
    if not s.disks and not s.nics:
        t.add_row("no disks", "", "", "", "", "", "")
    return Panel(t, title="devices: rings, throughput, latency", title_align="left")


def _events_panel(events: Sequence[Event]) -> Panel:
    body: RenderableType
    if not events:
        body = Text("none so far (WITNESS, DMA-API debugging, watchdogs)", style="green")
    else:
        lines = Text()
        for e in events[-_EVENTS_SHOWN:]:
            first = e.text.splitlines()[0] if e.text else ""
            lines.append(f"[{e.t:6.1f}s] ", style="dim")
            lines.append(f"{e.kind}: ", style="bold red")
            lines.append(first + "\n")
        if len(events) > _EVENTS_SHOWN:
            lines.append(f"... {len(events) - _EVENTS_SHOWN} earlier", style="dim")
        body = lines
    return Panel(body, title=f"reports ({len(events)})", title_align="left")


def render(metrics: Metrics, header: str = "", at: int = -1) -> RenderableType:
    """The dashboard of ``metrics``' sample ``at`` (the last; an empty one before the
    first), with the reports made until then."""
    s = metrics.samples[at] if metrics.samples else Sample(0.0, (), ())
    events = [e for e in metrics.events if e.t <= s.t] if at != -1 else metrics.events
    total = sum(d.mib_s for d in s.disks)
    iops = sum(d.iops for d in s.disks)
    head = Text(f"gntdma  [{s.t:5.1f}s]  {total:.1f} MiB/s  {iops:.0f} IOPS"
                + (f"  {header}" if header else ""), style="bold")
    return Group(head, _guests_panel(s), _devices_panel(s), _events_panel(events))


def render_explore(scenario: str, strategy: str, done: int, budget: int, failures: int,
                   rate: float, seconds: float) -> RenderableType:
    """Explore's dashboard: schedules done, failures found, rate."""
    t = Table.grid(padding=(0, 2))
    t.add_row("schedules", _bar(done, budget))
    t.add_row("failures found", Text(str(failures), style="bold red" if failures else "green"))
    t.add_row("rate", f"{rate:.0f} schedules/s")
    t.add_row("elapsed", f"{seconds:.1f} s")
    return Panel(t, title=f"explore {scenario} ({strategy})", title_align="left")


class ExploreView:
    """Explore's dashboard: schedules done, failures found, rate.

    The explorer runs one schedule after another on this thread; :meth:`watch`
    wraps its stream of strategies (one is taken per schedule) and refreshes the
    display between two schedules, at most once a second of wall-clock time.
    """

    def __init__(self, scenario: str, strategy: str, budget: int,
                 console: Console | None = None) -> None:
        self.scenario, self.strategy, self.budget = scenario, strategy, budget
        self.console = console if console is not None else Console()
        self.live: Live | None = None
        self.done = 0
        self.t0 = self.last = 0.0

    def _render(self, failures: int) -> RenderableType:
        now = time.monotonic()
        secs = now - self.t0
        return render_explore(self.scenario, self.strategy, self.done, self.budget, failures,
                              self.done / secs if secs > 0 else 0.0, secs)

    def watch(self, stream: Iterator[T]) -> Iterator[T]:
        """``stream``, counting the schedules taken and refreshing the display."""
        self.t0 = self.last = time.monotonic()
        self.live = Live(self._render(0), console=self.console, auto_refresh=False,
                         transient=False)
        self.live.start(refresh=True)
        for i, item in enumerate(stream):
            self.done = i  # the schedules before this one are done
            if time.monotonic() - self.last >= 1.0:
                self.last = time.monotonic()
                self.live.update(self._render(0), refresh=True)
            yield item

    def stop(self, schedules: int, failures: int) -> None:
        """The last frame: ``schedules`` explored, ``failures`` found."""
        self.done = schedules
        if self.live is not None:
            self.live.update(self._render(failures), refresh=True)
            self.live.stop()
            self.live = None


class RunView:
    """The dashboard (when shown) and the series of a job (when plots are asked for).

    The job calls :meth:`attach` with its guests and disks, :meth:`tick` from its
    one-second timer, and :meth:`stop` at its end. :meth:`tick` returns whether
    the dashboard took the place of the plain progress line.
    """

    def __init__(self, *, dashboard: bool, console: Console | None = None) -> None:
        self.dashboard = dashboard
        self.console = console
        self.metrics: Metrics | None = None
        self.live: Live | None = None
        self.header = ""
        self._running = False
        #: The NICs to show (see :meth:`set_vifs`).
        self.vifs: Callable[[], Sequence[Vif]] | None = None

    def set_vifs(self, vifs: Callable[[], Sequence[Vif]]) -> None:
        """Show the NICs ``vifs()`` gives (asked at every sample), from now on."""
        self.vifs = vifs
        if self.metrics is not None:
            self.metrics.vifs = vifs

    def attach(self, host: Host, guests: Sequence[Guest], vbds: Sequence[Vbd]) -> Metrics:
        """Start the series (and the display) for these guests and disks (and the
        NICs given to :meth:`set_vifs`)."""
        self.stop()
        self.metrics = Metrics(host, guests, vbds, self.vifs)
        self._running = True
        if self.dashboard:
            console = self.console if self.console is not None else Console()
            self.live = Live(render(self.metrics), console=console, auto_refresh=False,
                             transient=False, redirect_stdout=True, redirect_stderr=True)
            self.live.start(refresh=True)
        return self.metrics

    def tick(self, header: str = "") -> bool:
        """Take a sample; refresh the display. True when the dashboard is shown."""
        if self.metrics is None:
            return False
        self.metrics.sample()
        self.header = header
        if self.live is None:
            return False
        self.live.update(render(self.metrics, header), refresh=True)
        return True

    def watchdog(self, text: str) -> None:
        """A watchdog report (shown at the next refresh, or at :meth:`stop`)."""
        if self.metrics is not None:
            self.metrics.watchdog(text)

    def stop(self) -> None:
        """The last refresh (with the reports collected since the last tick); the
        display stays on screen and later lines go below it."""
        m = self.metrics
        if not self._running:
            return
        self._running = False
        if m is not None and (not m.samples or m.host.sched.now() - m.t0 > m.samples[-1].t):
            # The part of a second since the last tick, however short: the last frame
            # is the state at the end (a tick just before it showed loads still waiting).
            m.sample()
        if self.live is not None and self.metrics is not None:
            self.metrics.collect_reports()
            self.live.update(render(self.metrics, self.header), refresh=True)
            self.live.stop()
        self.live = None
