"""A guest that panics at any point of its life crashes that guest only (DESIGN 3,
issue 11 item 3): at boot, in its xenbus driver while a disk connects, in the attach of
a disk, in its workload, in the detach of its disks.

As xl does it: tools/xl/xl_vmcontrol.c ``handle_domain_death`` takes the action of
``on_crash`` for ``LIBXL_SHUTDOWN_REASON_CRASH`` (xl.cfg's default ``destroy``), which
``libxl_domain_destroy`` carries out (libxl_domain.c ``libxl__destroy_domid`` ->
``libxl__devices_destroy`` with ``LIBXL__FORCE_ON``, then ``xc_domain_destroy``); the
other domains go on. ``gntdma run`` with two configs: the victim is destroyed, the good
guest runs its workload and is checked, the JSON report has ``crashed`` and the failed
checks all name the victim, exit status 1.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from run_helpers import run_json, write_cfg

from gntdma.sched import KernelPanic

VICTIM = "victim"


def _victim(kern: Any) -> bool:
    return getattr(kern, "name", None) == VICTIM


def _did_io(sc: Any) -> bool:
    """The disk has completed writes and reads (its verified I/O is under way)."""
    st = sc.statistics()
    return bool(st.bytes_written > 0 and st.bytes_read > 0)


def _inject_boot(mp: pytest.MonkeyPatch) -> None:
    """The guest kernel's bus_dma attach at boot (on the toolstack's thread)."""
    from gntdma.toolstack import host

    real = host.xen_busdma_attach

    def attach(kernel: Any, gt: Any) -> Any:
        if _victim(kernel):
            raise KernelPanic("injected: boot")
        return real(kernel, gt)

    mp.setattr(host, "xen_busdma_attach", attach)


def _inject_initialise(mp: pytest.MonkeyPatch) -> None:
    """blkfront's ring setup, in the guest's xenbus thread (backend InitWait)."""
    from gntdma.dev.blkfront import xbd_softc

    real = xbd_softc.xbd_initialize

    def initialize(self: xbd_softc, order: int = 0) -> int:
        if _victim(self.xbd_kern):
            raise KernelPanic("injected: xbd_initialize")
        return real(self, order)

    mp.setattr(xbd_softc, "xbd_initialize", initialize)


def _inject_connect(mp: pytest.MonkeyPatch) -> None:
    """blkfront's connect, in the guest's xenbus thread (backend Connected)."""
    from gntdma.dev.blkfront import xbd_softc

    real = xbd_softc.xbd_connect

    def connect(self: xbd_softc, features: Any) -> int:
        if _victim(self.xbd_kern):
            raise KernelPanic("injected: xbd_connect")
        return real(self, features)

    mp.setattr(xbd_softc, "xbd_connect", connect)


def _inject_attach(mp: pytest.MonkeyPatch) -> None:
    """blkfront's probe of its device (xbd_attach, run for the guest by the toolstack)."""
    from gntdma.dev import blkfront_xenbus

    real = blkfront_xenbus.xenbus_frontend_device

    def probe(xs: Any, devtype: str, devid: int) -> Any:
        if xs.name == VICTIM:
            raise KernelPanic("injected: xbd_attach")
        return real(xs, devtype, devid)

    mp.setattr(blkfront_xenbus, "xenbus_frontend_device", probe)


def _inject_workload(mp: pytest.MonkeyPatch) -> None:
    """blkfront's interrupt handler in the workload: the first interrupt after the
    disk has completed writes and reads (the verified I/O under way; a count of
    interrupts is not, as an interrupt drains whatever responses are there)."""
    from gntdma.dev.blkfront import xbd_softc

    real = xbd_softc.xbd_int

    def intr(self: xbd_softc, port: int) -> None:
        if _victim(self.xbd_kern) and _did_io(self):
            raise KernelPanic("injected: xbd_int")
        real(self, port)

    mp.setattr(xbd_softc, "xbd_int", intr)


def _inject_detach(mp: pytest.MonkeyPatch) -> None:
    """blkfront's close when the toolstack unplugs the disk (backend Closing)."""
    from gntdma.dev.blkfront import xbd_softc

    real = xbd_softc.xbd_closing

    def closing(self: xbd_softc, **kw: Any) -> Any:
        if _victim(self.xbd_kern):
            raise KernelPanic("injected: xbd_closing")
        return real(self, **kw)

    mp.setattr(xbd_softc, "xbd_closing", closing)


INJECT: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "boot": _inject_boot,
    "xenbus-initialise": _inject_initialise,
    "xenbus-connect": _inject_connect,
    "disk-attach": _inject_attach,
    "workload": _inject_workload,
    "detach": _inject_detach,
}


@pytest.fixture
def alarm() -> Iterator[None]:
    """A hang fails the test instead of blocking the suite."""
    def hang(_s: int, _f: FrameType | None) -> None:
        raise TimeoutError("the run hung")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(120)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("point", sorted(INJECT))
def test_guest_panic_at_any_point_crashes_that_guest_only(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        alarm: None, point: str) -> None:
    INJECT[point](monkeypatch)
    cfgs = [write_cfg(tmp_path / f"{n}.cfg", f"name='{n}'\nmemory=32\n"
                      f"disk=['vdev=xvda, size=2M, target={tmp_path / n}.img']\n")
            for n in (VICTIM, "good")]
    t0 = time.monotonic()
    rc, rep, err = run_json(capsys, tmp_path, *map(str, cfgs), "--duration", "0.5",
                            "--stall-timeout", "5")
    took = time.monotonic() - t0
    assert "Traceback" not in err and "failed:" not in err, err[-1500:]
    assert rep, ("no JSON report", rc, err[-1500:])
    assert rc == 1 and rep["ok"] is False
    assert "injected" in rep["crashed"][VICTIM], rep["crashed"]
    assert "stalled" not in rep
    failed = [c for c in rep["checks"] if not c["ok"]]
    assert failed and all(c["name"].startswith(f"{VICTIM}: ") for c in failed), failed
    (crash,) = [c for c in failed if c["name"] == f"{VICTIM}: no guest crashed"]
    assert "injected" in crash["detail"]
    # The toolstack destroyed the victim (on_crash=destroy) and its disks are gone.
    (torn,) = [c for c in rep["checks"] if c["name"].startswith(f"{VICTIM}: crashed guest "
                                                                 "destroyed")]
    assert "domain destroyed" in torn["detail"]
    names = {c["name"] for c in rep["checks"] if c["ok"]}
    assert {"teardown: nothing leaked", "good: no grant reference left after the disks "
            "detached"} <= names, failed
    (good,) = [g for g in rep["guests"] if g["name"] == "good"]
    assert good["disks"][0]["bytes_verified"] > 0
    (victim,) = [g for g in rep["guests"] if g["name"] == VICTIM]
    assert "injected" in victim["crashed"]
    assert took < 8, took  # no wait for a dead guest's driver to time out
