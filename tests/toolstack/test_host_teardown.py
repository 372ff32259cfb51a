"""The host's teardown of guests: nothing kept per destroyed guest, and a guest
destroyed with devices still attached has them removed by force first (libxl)."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from gntdma.sched import WITNESS, KThread, ThreadState
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
