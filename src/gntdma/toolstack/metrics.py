"""Time series of a running host, sampled once a second from the scheduler's timer.

:class:`Metrics` reads the counters the kernel objects keep (the guests' grant
tables, blkfront's statistics and latency histograms) and turns each second
into a :class:`Sample`: per guest the grant entries in use against the
capacity ``max_grant_frames`` gives, the deferred loads waiting and completed;
per disk the ring occupancy, throughput, IOPS and latency percentiles of the
second; per NIC (a vif's netfront) the occupancy of its tx and rx rings and
its packets and bytes a second each way. A NIC has no latency: netfront's
transmit ring gives a packet's slots back when netback is done with them,
and nothing pairs a packet with an answer (a ping's reply is another packet
on the rx ring), so there is no request/response time to measure. It also
collects the reports of the checkers as they appear (WITNESS, DMA-API
debugging of each guest kernel, the watchdogs) as
:class:`Event` records. Sampling never blocks and never takes a kernel lock:
it runs on the hub, between two scheduling points of kernel threads.

The dashboard (:mod:`~gntdma.toolstack.dashboard`) shows the last sample and
the events; the plots (:mod:`~gntdma.toolstack.plots`) draw the whole series.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gntdma.sched import WITNESS

if TYPE_CHECKING:
    from collections.abc import Callable

    from gntdma.toolstack.host import Guest, Host
    from gntdma.toolstack.vbd import Vbd
    from gntdma.toolstack.vif import Vif

__all__ = ["DiskSample", "Event", "GuestSample", "Metrics", "NicSample", "Sample",
           "percentile"]

#: Slots of a netif tx or rx ring on a 4 KiB page (xen/include/public/io/netif.h:
#: __CONST_RING_SIZE(netif_tx, XEN_PAGE_SIZE) and netif_rx: 256), per queue.
NET_RING_SIZE = 256


def percentile(hist: Sequence[int], q: float) -> float | None:
    """The ``q``-quantile (0..1) in microseconds of a log2 histogram, or None if empty.

    Bucket ``b`` holds values in ``[2**(b-1), 2**b)`` (bucket 0: below 1 us);
    the value is interpolated linearly inside its bucket.
    """
    total = sum(hist)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for b, n in enumerate(hist):
        if n > 0 and seen + n >= rank:
            lo = 0.0 if b == 0 else float(1 << (b - 1))
            hi = float(1 << b)
            return lo + (hi - lo) * max(0.0, rank - seen) / n
        seen += n
    return float(1 << (len(hist) - 1))


@dataclass(frozen=True, slots=True)
class GuestSample:
    """A guest at one instant."""

    name: str
    in_use: int  #: grant entries allocated
    capacity: int  #: entries max_grant_frames gives (less the reserved ones)
    frames: int  #: grant frames set up so far
    deferred_waiting: int  #: loads waiting for grant references (callbacks queued)
    deferred_done: int  #: deferred loads whose callback ran
    crashed: bool = False


@dataclass(frozen=True, slots=True)
class DiskSample:
    """A disk over the last second."""

    name: str  #: guest/vdev
    in_flight: int  #: requests on the ring
    ring_size: int
    mib_s: float
    iops: float
    p50_us: float | None  #: request latency percentiles of the second (None: no request)
    p99_us: float | None
    requests: int  #: since the disk connected
    deferred_loads: int


@dataclass(frozen=True, slots=True)
class NicSample:
    """A NIC (a vif, seen from the guest's netfront) over the last second."""

    name: str  #: guest/vifD.N
    tx_in_flight: int  #: tx ring slots netback has not answered yet
    rx_posted: int  #: rx ring slots holding a buffer for netback to fill
    ring_size: int  #: slots of each ring (all queues)
    tx_pps: float
    rx_pps: float
    tx_mib_s: float
    rx_mib_s: float
    packets: int  #: sent and received since the sampling began


@dataclass(frozen=True, slots=True)
class Sample:
    """Everything at second ``t`` of the run."""

    t: float
    guests: tuple[GuestSample, ...]
    disks: tuple[DiskSample, ...]
    nics: tuple[NicSample, ...] = ()


@dataclass(frozen=True, slots=True)
class Event:
    """A checker's report: ``kind`` is "witness", "dma-debug" or "watchdog"."""

    t: float
    kind: str
    text: str


@dataclass(eq=False)
class _DiskState:
    vbd: Vbd
    bytes: int = 0
    requests: int = 0
    hist: list[int] = field(default_factory=list)


@dataclass(eq=False)
class _NicState:
    vif: Vif
    counts: tuple[int, int, int, int]  #: tx/rx packets, tx/rx bytes at the last sample
    base: int  #: packets when the sampling began


class Metrics:
    """The series of a host's guests, disks and NICs; :meth:`sample` takes one second's.

    ``vifs`` gives the NICs attached now (asked at every sample: one attached
    later is sampled from then on, one detached is dropped).
    """

    def __init__(self, host: Host, guests: Sequence[Guest], vbds: Sequence[Vbd],
                 vifs: Callable[[], Sequence[Vif]] | None = None) -> None:
        self.host = host
        self.guests = list(guests)
        self.vifs = vifs
        self._nics: dict[int, _NicState] = {}
        self._disks = [_DiskState(v) for v in vbds]
        self.t0 = host.sched.now()
        self._last_t = self.t0
        self.samples: list[Sample] = []
        self.events: list[Event] = []
        self._witness_seen = len(WITNESS.reports)
        self._dma_seen: dict[str, int] = {
            g.name: len(g.kernel.dma_debug.reports()) for g in self.guests}
        for d in self._disks:  # the series starts here: what came before is not counted
            d.vbd.sc.xbd_latency = True
            fr = d.vbd.statistics().frontend
            d.bytes, d.requests = fr.bytes_read + fr.bytes_written, fr.requests
            d.hist = list(d.vbd.sc.xbd_lat_request)
        self.sample()

    # -- sampling ------------------------------------------------------------------------

    def sample(self) -> Sample:
        """Take the sample of the second just ended (and collect the new reports)."""
        now = self.host.sched.now()
        dt = max(now - self._last_t, 1e-6)
        self._last_t = now
        crashed = self.host.crashed
        guests = []
        for g in self.guests:
            if g.name in crashed:
                guests.append(GuestSample(g.name, 0, 0, 0, 0, 0, crashed=True))
                continue
            st = g.gnttab.statistics()
            done = sum(sum(d.vbd.sc.xbd_lat_deferred) for d in self._disks
                       if d.vbd.guest is g)
            guests.append(GuestSample(g.name, st.allocated, g.gnttab.capacity, st.nr_frames,
                                      st.callbacks_queued, done))
        disks = []
        for d in self._disks:
            fr = d.vbd.statistics().frontend
            nbytes = fr.bytes_read + fr.bytes_written
            hist = list(d.vbd.sc.xbd_lat_request)
            delta = [a - b for a, b in zip(hist, d.hist, strict=False)] if d.hist else hist
            disks.append(DiskSample(
                f"{d.vbd.guest.name}/{d.vbd.vdev}", fr.in_flight, fr.ring_size,
                (nbytes - d.bytes) / dt / (1 << 20), (fr.requests - d.requests) / dt,
                percentile(delta, 0.5), percentile(delta, 0.99), fr.requests,
                fr.deferred_loads))
            d.bytes, d.requests, d.hist = nbytes, fr.requests, hist
        s = Sample(now - self.t0, tuple(guests), tuple(disks), self._sample_nics(dt))
        self.samples.append(s)
        self.collect_reports()
        return s

    def _sample_nics(self, dt: float) -> tuple[NicSample, ...]:
        vifs = [v for v in (self.vifs() if self.vifs is not None else ())
                if v.attached and v.guest.name not in self.host.crashed]
        out = []
        seen = set()
        for v in vifs:
            fr = v.netfront.statistics()
            counts = (fr.tx_packets, fr.rx_packets, fr.tx_bytes, fr.rx_bytes)
            st = self._nics.get(id(v))
            if st is None or st.vif is not v:
                st = self._nics[id(v)] = _NicState(v, counts, counts[0] + counts[1])
            seen.add(id(v))
            queues = v.netfront.queues
            d = [(a - b) / dt for a, b in zip(counts, st.counts, strict=True)]
            out.append(NicSample(
                f"{v.guest.name}/{v.name}", sum(len(q.tx_pkts) for q in queues),
                fr.rx_posted, NET_RING_SIZE * max(1, len(queues)), d[0], d[1],
                d[2] / (1 << 20), d[3] / (1 << 20), counts[0] + counts[1] - st.base))
            st.counts = counts
        for k in set(self._nics) - seen:
            del self._nics[k]
        return tuple(out)

    def collect_reports(self) -> list[Event]:
        """The WITNESS and DMA-API debugging reports made since the last call."""
        t = self.host.sched.now() - self.t0
        new: list[Event] = []
        reports = WITNESS.reports
        if len(reports) < self._witness_seen:  # reset meanwhile
            self._witness_seen = 0
        new += [Event(t, "witness", r.format()) for r in reports[self._witness_seen:]]
        self._witness_seen = len(reports)
        for g in self.guests:
            if g.name in self.host.crashed:
                continue
            dma = g.kernel.dma_debug.reports()
            seen = self._dma_seen.get(g.name, 0)
            if len(dma) < seen:
                seen = 0
            new += [Event(t, "dma-debug", f"{g.name}: {r.format()}") for r in dma[seen:]]
            self._dma_seen[g.name] = len(dma)
        self.events += new
        return new

    def watchdog(self, text: str) -> None:
        """A watchdog's report (the stall watchdog, the hung-task watchdog)."""
        self.events.append(Event(self.host.sched.now() - self.t0, "watchdog", text))

    # -- whole-run figures ---------------------------------------------------------------

    def deferred_latency_hist(self) -> list[int]:
        """Every deferred load's latency (EINPROGRESS to callback), log2 us buckets."""
        out = [0] * 40
        for d in self._disks:
            for b, n in enumerate(d.vbd.sc.xbd_lat_deferred):
                out[b] += n
        return out
