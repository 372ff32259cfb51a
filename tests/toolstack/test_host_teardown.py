"""The host's teardown of guests: nothing kept per destroyed guest, and a guest
destroyed with devices still attached has them removed by force first (libxl)."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from gntdma.sched import WITNESS, KThread, ThreadState
from gntdma.sys import M_DEVBUF, M_WAITOK
from gntdma.toolstack.domains import create_guest_from_config
from gntdma.toolstack.host import Host
from gntdma.toolstack.xlcfg import parse_config


def _kthreads() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, KThread))


def _guest_with_disk(host: Host, tmp_path: Path, name: str):  # type: ignore[no-untyped-def]
    cfg = parse_config(f'name = "{name}"\nmemory = 16\n'
                       f"disk = [ 'vdev=xvda, size=1M, target={tmp_path}/{name}.img' ]\n",
                       str(tmp_path / f"{name}.cfg"))
    return create_guest_from_config(host, cfg)


def test_finished_crash_destroyers_are_not_kept(tmp_path: Path) -> None:
    """Host.crash_guest spawns xl/<name>/destroy; once done it is dropped (on the next
    crash and in wait_crashes), and wait_crashes still waits for every one."""
    WITNESS.reset()
    h = Host()
    try:
        h.sched.yield_()
        base = _kthreads()
        for i in range(5):
            g, _vbds = _guest_with_disk(h, tmp_path, f"c{i}")
            h.crash_guest(g, "test")
            if i % 2 == 0:
                h.wait_crashes()
                assert h.crashes[f"c{i}"].done_at is not None
            del g, _vbds
        h.wait_crashes()
        assert all(c.done_at is not None for c in h.crashes.values())
        assert len(h.crashes) == 5
        h.sched.yield_()
        assert h.leaks() == [], h.leaks()
        assert _kthreads() == base
    finally:
        h.close()
        WITNESS.reset()


@pytest.mark.parametrize("on", ["thread0", "a toolstack thread"])
def test_destroy_guest_removes_attached_devices_by_force(tmp_path: Path, on: str) -> None:
    """libxl_domain.c libxl__destroy_domid -> libxl__devices_destroy: destroying a
    domain removes its remaining devices by force, so dom0 keeps no grant mapping
    or event channel of it."""
    WITNESS.reset()
    h = Host()
    try:
        g, vbds = _guest_with_disk(h, tmp_path, "g")
        assert [v.attached for v in vbds] == [True]
        if on == "thread0":
            h.destroy_guest(g)
        else:
            t = h.sched.spawn(h.destroy_guest, g, name="xl/g/destroy")
            h.sched.run(until=lambda: t.state is ThreadState.DONE)
        h.sched.yield_()
        assert h.leaks() == [], h.leaks()
        assert g.domid not in h.devices
        assert [v.attached for v in vbds] == [False]
    finally:
        h.close()
        WITNESS.reset()


@pytest.mark.parametrize("on", ["thread0", "a toolstack thread"])
def test_destroy_guest_stops_the_guests_threads_before_its_memory_goes(on: str) -> None:
    """libxl_domain.c libxl__destroy_domid -> xc_domain_destroy: a destroyed domain's
    vCPUs never run again. A thread of the guest still running when ``destroy_guest``
    is called ends there (as in ``crash_guest``); it neither runs on nor touches the
    domain's freed memory (which stopped the whole host with a ValueError)."""
    WITNESS.reset()
    h = Host()
    try:
        g = h.create_guest("g", memory_mb=8)
        va = g.kernel.malloc(4096, M_DEVBUF, M_WAITOK)
        seen: list[int] = []

        def loop() -> None:
            for i in range(1000):
                g.kernel.kva_write(va, b"x")
                seen.append(i)
                h.sched.yield_()

        t = h.sched.spawn(loop, domain=g.kernel, name="g/loop")
        for _ in range(5):
            h.sched.yield_()
        assert seen
        if on == "thread0":
            h.destroy_guest(g)
        else:
            d = h.sched.spawn(h.destroy_guest, g, name="xl/g/destroy")
            h.sched.run(until=lambda: d.state is ThreadState.DONE)
            assert d.exc is None, d.exc
        n = len(seen)
        for _ in range(5):
            h.sched.yield_()
        assert len(seen) == n, "the destroyed guest's thread still runs"
        assert t.state is ThreadState.DONE and t.exc is None, t.exc
        assert h.leaks() == [], h.leaks()
    finally:
        h.close()
        WITNESS.reset()
