"""Many guests in one host: creation costs the same at the first guest and the last,
and destroying them gives every kernel object back.

The small, fast version of ``benchmarks/scale.py``: costs are counted in
operations (scheduler decisions, threads visited, watches looked at), never
timed, so the test holds on a loaded machine.
"""

from __future__ import annotations

import gc
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import greenlet
import pytest

from gntdma.dev.blkfront_io import xbd_read, xbd_write
from gntdma.hv import Hypervisor
from gntdma.sched import WITNESS, VirtualClock, tsleep
from gntdma.toolstack.domains import create_guest_from_config, destroy_guest
from gntdma.toolstack.host import Guest, Host
from gntdma.toolstack.vbd import Vbd, attach_disk, detach_disk
from gntdma.toolstack.xlcfg import parse_config, parse_disk_spec

_T = TypeVar("_T")


def test_idle_disk_is_not_a_hung_task(tmp_path: Path) -> None:
    """blkback's workers idle for work (PIDLE): a disk nobody uses for longer than the
    hung-task threshold is not a hung task. FreeBSD's blkback (sys/dev/xen/blkback/
    blkback.c, xbb_attach) runs its I/O on a taskqueue, whose threads idle in
    taskqueue_thread_loop (sys/kern/subr_taskqueue.c); deadlkres (sys/kern/
    kern_clock.c) never reports them."""
    host = Host(clock=VirtualClock())
    try:
        g = host.create_guest("g", memory_mb=16)
        spec = parse_disk_spec("format=raw, vdev=xvda, access=rw, size=1M, target=a.img")
        vbd = attach_disk(host, g, spec, image_dir=tmp_path)
        tsleep(object(), "idle", 3 * 60.0)  # three times the hung-task threshold
        assert detach_disk(host, vbd)
        host.destroy_guest(g)
        assert host.leaks() == []
    finally:
        host.close()


# -- many guests ---------------------------------------------------------------------------

GUESTS = 30
#: Kernel objects counted with gc (by class name) before and after.
KERNEL_TYPES = ("KThread", "Domain", "GrantTable", "Maptrack", "EventPort", "PortHandler",
                "Kernel", "GntTab", "Blkback", "xbd_softc", "DomainRing", "XenStore",
                "DiskImage", "Guest", "Vbd")


def _objects() -> dict[str, int]:
    gc.collect()
    objs = gc.get_objects()
    names = Counter(type(o).__name__ for o in objs)
    out = {k: names.get(k, 0) for k in KERNEL_TYPES}
    main = greenlet.getcurrent()
    out["greenlet"] = sum(1 for o in objs if isinstance(o, greenlet.greenlet) and o is not main)
    return out


def _host_tables(host: Host) -> dict[str, int]:
    xs = host.xenstored.statistics()
    return {"live threads": host.sched.statistics().live_threads,
            "domains": len(host.hv.domains), "dom0 ports": len(host.hv.domains[0].ports),
            "dom0 maptrack": len(host.hv.domains[0].maptrack.entries),
            "dom0 free pages": host.dom0.kernel.vm.nfree,
            "xenstore nodes": xs.nodes, "xenstore watches": xs.watches,
            "xenstore connections": xs.connections}


def _make_guest(host: Host, i: int, tmp: Path) -> tuple[Guest, list[Vbd]]:
    cfg = parse_config(
        f'name = "g{i}"\nmemory = 8\n'
        f"disk = [ 'format=raw, vdev=xvda, access=rw, size=1M, target=g{i}a.img',\n"
        f"         'format=raw, vdev=xvdb, access=rw, size=1M, target=g{i}b.img' ]\n",
        f"<g{i}>")
    guest, vbds = create_guest_from_config(host, cfg, tmp)
    for vbd in vbds:  # one verified I/O per disk
        data = (f"g{i}{vbd.vdev}".encode() * 1024)[:4096]

        def io(vbd: Vbd = vbd, data: bytes = data) -> bytes:
            assert xbd_write(vbd.sc, 8192, data) == 0
            error, got = xbd_read(vbd.sc, 8192, len(data))
            assert error == 0
            return got

        assert host.sched.call(io) == data
    return guest, vbds


def _calls(fn: Callable[[], _T]) -> tuple[int, _T]:
    """Python and C function calls made by ``fn()``: its cost in operations."""
    n = 0

    def count(frame: object, event: str, arg: object) -> None:
        nonlocal n
        if event == "call" or event == "c_call":
            n += 1

    sys.setprofile(count)
    try:
        out = fn()
    finally:
        sys.setprofile(None)
    return n, out


@pytest.mark.slow
def test_guests_cost_the_same_to_create_and_everything_is_released(tmp_path: Path) -> None:
    """Creating the 30th guest costs what the 5th does (counted in function calls,
    all layers: xenstored's watches, the scheduler, domids, ports), and once all
    are destroyed every kernel object (threads and their greenlets, domains, grant
    tables, ports, pages, xenstore nodes, watches, connections) is back to the
    start."""
    WITNESS.reset()
    host = Host(clock=VirtualClock())
    try:
        g, vbds = _make_guest(host, 0, tmp_path)  # warm-up: caches, first imports
        assert destroy_guest(host, g, vbds)
        del g, vbds
        host.sched.yield_()
        start = _objects() | _host_tables(host)
        guests: list[tuple[Guest, list[Vbd]]] = []
        costs: list[int] = []
        for i in range(1, GUESTS + 1):
            if i <= 5 or i > GUESTS - 5:
                n, made = _calls(lambda i=i: _make_guest(host, i, tmp_path))  # type: ignore[misc]
                costs.append(n)
            else:
                made = _make_guest(host, i, tmp_path)
            guests.append(made)
        assert host.sched.statistics().live_threads > GUESTS * 10
        while guests:
            g, vbds = guests.pop()
            assert destroy_guest(host, g, vbds)
        del g, vbds, made
        host.sched.yield_()
        assert host.leaks() == []
        assert WITNESS.reports == []
        assert _objects() | _host_tables(host) == start
        early, late = sum(costs[:5]) / 5, sum(costs[5:]) / 5
        assert late <= 1.03 * early, (early, late)
    finally:
        host.close()
        WITNESS.reset()


def _lines(fn: Callable[[], _T]) -> tuple[int, _T]:
    """Lines of Python executed by ``fn()`` (loops included): its cost in steps."""
    n = 0

    def trace(frame: object, event: str, arg: object) -> object:
        nonlocal n
        if event == "line":
            n += 1
        return trace

    sys.settrace(trace)  # type: ignore[arg-type]
    try:
        out = fn()
    finally:
        sys.settrace(None)
    return n, out


def test_port_allocation_takes_the_lowest_free_port_in_steps_independent_of_open_ports(
        ) -> None:
    """dom0 holds a few ports per guest (xenstore ring, each disk): taking one must not
    scan them. Xen's rule is kept: the lowest free port (xen/common/event_channel.c,
    get_free_port), port 0 never."""
    hv = Hypervisor()
    dom0 = hv.create_domain("Domain-0", 16)
    costs = []
    for opened in (10, 3000):
        while len(dom0.ports) < opened:
            rc, _ = hv.evtchn_alloc_unbound(0, 0, 0)
            assert rc == 0
        n, (rc, port) = _lines(lambda: hv.evtchn_alloc_unbound(0, 0, 0))
        assert (rc, port) == (0, opened + 1)
        costs.append(n)
    assert costs[1] == costs[0], costs
    for p in (700, 5, 2000):
        assert hv.evtchn_close(0, p) == 0
    assert [hv.evtchn_alloc_unbound(0, 0, 0)[1] for _ in range(4)] == [5, 700, 2000, 3002]
    n, (rc, port) = _lines(lambda: hv.evtchn_alloc_unbound(0, 0, 0))
    assert (rc, port) == (0, 3003) and n == costs[0]


def test_adding_and_removing_a_device_does_not_walk_the_hosts_devices(host: Host) -> None:
    """The toolstack's device list: a duplicate check, an add and a removal of one
    guest's device cost the same with 5 devices of another guest on the host as
    with 300 (libxl keeps them in xenstore, a directory per domain: nothing walks
    every device of the host)."""
    other, g = host.create_guest("other", memory_mb=4), host.create_guest("g", memory_mb=4)
    xs = host.xenstore
    costs = []
    made = []
    for existing in (5, 300):
        while len(made) < existing:
            made.append(xs.add_device(other.domid, 0, "vbd", 100 + len(made)))
        n_add, dev = _lines(lambda: xs.add_device(g.domid, 0, "vbd", 51712))
        n_rm, _ = _lines(lambda dev=dev: xs._remove_dirs(dev))  # type: ignore[misc]
        costs.append((n_add, n_rm))
    assert costs[1] == costs[0], costs
    assert xs.devices == made
    for dev in made:
        xs._remove_dirs(dev)
    assert xs.devices == []
    host.destroy_guest(g)
    host.destroy_guest(other)
