"""``gntdma run`` never hangs: grant and memory starvation run to the end, a stall ends
the run with a failed check, a guest's panic crashes that guest only (issue 11, 1-3)."""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import pytest
from run_helpers import run_json, write_cfg

from gntdma.dev.blkback import Blkback


def _disks(tmp: Path, n: int, size: str = "8M") -> str:
    return ", ".join(f"'format=raw, vdev=xvd{'abcd'[i]}, access=rw, size={size}, "
                     f"target={tmp / f'd{i}.img'}'" for i in range(n))


@pytest.mark.parametrize("ndisks", [2, 3, 4])
def test_one_grant_frame_with_several_disks_runs_to_completion(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], ndisks: int) -> None:
    """Rings and indirect pages of several disks held for life used to leave fewer
    references than one large request needs: the deferred load waited forever."""
    cfg = write_cfg(tmp_path / "f1.cfg", f"name='g'\nmemory=64\nmax_grant_frames=1\n"
                    f"disk=[{_disks(tmp_path, ndisks)}]\n")
    rc, rep, err = run_json(capsys, tmp_path, "--duration", "0.5", str(cfg))
    assert rc == 0 and rep["ok"] is True, (err, [c for c in rep.get("checks", [])
                                                 if not c["ok"]])
    # Requests were cut down to fit: the user is told the config can only just run.
    assert rep["warnings"] and all("can only just run" in w for w in rep["warnings"])


def test_memory_3_runs_to_completion(tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Four threads each waiting for a 1 MiB buffer that 3 MiB can never free waited
    forever in malloc(M_WAITOK)."""
    cfg = write_cfg(tmp_path / "m3.cfg", f"name='g'\nmemory=3\n"
                    f"disk=[{_disks(tmp_path, 1)}]\n")
    rc, rep, err = run_json(capsys, tmp_path, "--duration", "0.5", str(cfg))
    assert rc == 0 and rep["ok"] is True, (err, [c for c in rep.get("checks", [])
                                                 if not c["ok"]])


def test_stalled_workload_ends_with_a_failed_check_saying_what_waits(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend that takes requests and never answers: the run ends within the stall
    timeout with a failed check naming the threads and what they wait for."""
    monkeypatch.setattr(Blkback, "_dispatch", lambda self, raw: None)  # never answers
    cfg = write_cfg(tmp_path / "s.cfg", f"name='g'\nmemory=64\n"
                    f"disk=[{_disks(tmp_path, 1)}]\n")
    t0 = time.monotonic()
    rc, rep, _err = run_json(capsys, tmp_path, "--duration", "30", "--stall-timeout", "1",
                             str(cfg))
    assert time.monotonic() - t0 < 25  # not --duration: the stall ended it
    assert rc == 1 and rep["ok"] is False
    (stall,) = [c for c in rep["checks"] if not c["ok"]]
    assert stall["name"] == "the workloads made progress (no stall)"
    assert "no I/O completed" in stall["detail"] and "g/xvda/io0 waits for" in stall["detail"]


def test_panic_in_a_guest_thread_crashes_that_guest_only_and_is_reported(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """DESIGN 3: a KernelPanic in a guest's kernel thread (here blkfront's interrupt
    thread) crashes that domain only: the host goes on, the run ends with a report
    and a failed check naming the guest and the panic."""
    from gntdma.dev.blkfront import xbd_softc
    from gntdma.sched import KernelPanic

    real = xbd_softc.xbd_int

    def panicking(self: xbd_softc, port: int) -> None:
        if self.xbd_kern.name == "victim":
            raise KernelPanic("injected: xbd_int")
        real(self, port)

    monkeypatch.setattr(xbd_softc, "xbd_int", panicking)
    cfg = write_cfg(tmp_path / "v.cfg", f"name='victim'\nmemory=64\n"
                    f"disk=[{_disks(tmp_path, 1)}]\n")
    rc, rep, err = run_json(capsys, tmp_path, "--duration", "2", "--stall-timeout", "1",
                            str(cfg))
    assert rc == 1 and rep["ok"] is False, err
    assert "Traceback" not in err
    assert "injected: xbd_int" in rep["crashed"]["victim"]
    crash = [c for c in rep["checks"] if c["name"] == "victim: no guest crashed"]
    assert crash and not crash[0]["ok"] and "injected: xbd_int" in crash[0]["detail"]
    # The self-test guest and dom0 went on: their checks passed.
    assert all(c["ok"] for c in rep["checks"] if c["name"].startswith("dom0"))


def _open_disk_files() -> list[object]:
    """File views of guest disks still open anywhere in the process (garbage included)."""
    from gntdma.dev.blkfront_io import XbdFile

    return [o for o in gc.get_objects() if isinstance(o, XbdFile) and not o.closed]


def test_a_run_ended_by_a_stall_leaves_no_open_disk_file_behind(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that ends without detaching its disks (a stall here) closes their file
    views at host teardown, without I/O: one left open is flushed by its finalizer
    whenever the garbage collector runs, on whatever scheduler is current then."""
    gc.collect()
    before = len(_open_disk_files())
    monkeypatch.setattr(Blkback, "_dispatch", lambda self, raw: None)  # never answers
    cfg = write_cfg(tmp_path / "s.cfg", f"name='g'\nmemory=64\n"
                    f"disk=[{_disks(tmp_path, 1)}]\n")
    rc, _rep, _err = run_json(capsys, tmp_path, "--duration", "30", "--stall-timeout", "0.5",
                              str(cfg))
    assert rc == 1
    assert len(_open_disk_files()) == before  # checked before any collection


@pytest.mark.timeout(120)
def test_two_runs_in_one_process_the_second_behaves_as_the_first(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What the first run leaves behind must not reach the second: a run that ended on
    a stall, then a good run during which the garbage collector runs (at the start of
    the workloads, the stall watchdog armed): it passes as it does alone."""
    from gntdma.toolstack import mainjob

    with monkeypatch.context() as m:
        m.setattr(Blkback, "_dispatch", lambda self, raw: None)  # never answers
        first = write_cfg(tmp_path / "s.cfg", f"name='g'\nmemory=64\n"
                          f"disk=[{_disks(tmp_path, 1)}]\n")
        rc, _rep, _err = run_json(capsys, tmp_path, "--duration", "30",
                                  "--stall-timeout", "0.5", str(first))
        assert rc == 1
    real = mainjob.verified_random_io

    def collect_first(*args: Any, **kw: Any) -> None:
        gc.collect()
        real(*args, **kw)

    monkeypatch.setattr(mainjob, "verified_random_io", collect_first)
    (tmp_path / "2").mkdir()
    second = write_cfg(tmp_path / "2" / "g.cfg", f"name='g'\nmemory=64\n"
                       f"disk=[{_disks(tmp_path / '2', 1)}]\n")
    rc, rep, err = run_json(capsys, tmp_path, "--duration", "0.3", "--stall-timeout", "2",
                            str(second))
    assert rc == 0 and rep["ok"] is True, (err, [c for c in rep.get("checks", [])
                                                 if not c["ok"]])


def test_a_guest_panic_mid_workload_destroys_it_at_once_and_the_other_guest_completes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """DESIGN 3 / issue 11 item 3, as Xen and xl do it: xl's default
    ``on_crash = "destroy"`` (docs/man/xl.cfg.5.pod.in) destroys the crashed domain:
    libxl_domain.c ``libxl__destroy_domid`` -> ``libxl__devices_destroy`` with
    ``LIBXL__FORCE_ON`` -> libxl_device.c ``libxl__initiate_device_generic_remove``
    (frontend directory removed, backend online 0 and Closing in one transaction,
    wait for the backend to close), then ``xc_domain_destroy`` (the domain's event
    channels closed). Here: two guests, one panics in its interrupt thread half way
    through its workload; its vbds are torn down in dom0 at once, while the other
    guest still runs, with no help from the stall watchdog; the other guest's
    workload completes and its checks pass; nothing leaks; the report names the crash
    and the run exits 1."""
    from gntdma.abi.event_channel import EVTCHNSTAT_interdomain
    from gntdma.dev.blkfront import xbd_softc
    from gntdma.sched import KernelPanic
    from gntdma.toolstack.host import Guest, Host

    real = xbd_softc.xbd_int
    panicked = {"n": 0}

    def panicking(self: xbd_softc, port: int) -> None:
        # The first interrupt after the disk completed writes and reads: its workload
        # is under way (a count of interrupts is not: one drains what is there).
        st = self.statistics()
        if self.xbd_kern.name == "victim" and st.bytes_written > 0 and st.bytes_read > 0:
            panicked["n"] += 1
            raise KernelPanic("injected: xbd_int")
        real(self, port)

    seen: dict[str, Any] = {}
    real_destroy = getattr(Host, "_destroy_crashed", None)

    def destroy(self: Host, g: Guest, crash: Any) -> None:
        assert real_destroy is not None
        real_destroy(self, g, crash)
        # The moment the toolstack is done with the crashed guest:
        seen["backend dirs"] = self.xenstored.directory("/local/domain/0/backend/vbd") \
            if self.xenstored.exists("/local/domain/0/backend/vbd") else []
        seen["victim alive"] = g.domid in self.hv.domains
        # dom0's maptrack (grant_table.c): no page of the crashed guest mapped any more.
        seen["dom0 mappings"] = sum(1 for m in self.hv.domains[0].maptrack.entries.values()
                                    if m.granter == g.domid)
        seen["victim ports bound in dom0"] = sum(
            1 for p in self.hv.domains[0].ports.values()
            if p.state == EVTCHNSTAT_interdomain and p.remote_dom == g.domid)
        seen["survivor still running"] = any(
            t.name.startswith("survivor/") and t.state.name != "DONE"
            for t in self.sched.threads)

    monkeypatch.setattr(xbd_softc, "xbd_int", panicking)
    monkeypatch.setattr(Host, "_destroy_crashed", destroy, raising=False)
    victim = write_cfg(tmp_path / "v.cfg", f"name='victim'\nmemory=64\n"
                       f"disk=[{_disks(tmp_path, 2)}]\n")
    (tmp_path / "s").mkdir()
    survivor = write_cfg(tmp_path / "s" / "s.cfg", f"name='survivor'\nmemory=64\n"
                         f"disk=[{_disks(tmp_path / 's', 1)}]\n")
    t0 = time.monotonic()
    rc, rep, err = run_json(capsys, tmp_path, "--duration", "1.5", "--stall-timeout", "30",
                            str(victim), str(survivor))
    assert time.monotonic() - t0 < 20  # the stall watchdog (30 s) played no part
    assert rc == 1 and rep["ok"] is False, err
    assert "Traceback" not in err and "stalled" not in rep
    assert panicked["n"] == 1, "the victim did not get far enough to panic"
    assert "injected: xbd_int" in rep["crashed"]["victim"]
    failed = [c for c in rep["checks"] if not c["ok"]]
    assert [c["name"] for c in failed] == ["victim: no guest crashed"], failed
    assert "injected: xbd_int" in failed[0]["detail"]
    # Torn down at the crash, the survivor's workload still running meanwhile.
    victim_domid = str(rep["guests"][0]["domid"])
    assert victim_domid not in seen.pop("backend dirs")
    assert seen == {"victim alive": False, "dom0 mappings": 0,
                    "victim ports bound in dom0": 0, "survivor still running": True}
    (torn,) = [c for c in rep["checks"] if c["name"].startswith("victim: crashed guest "
                                                                  "destroyed")]
    assert "xvdb, xvda" in torn["detail"] and "backends closed" in torn["detail"]
    # The survivor did its whole job: verified I/O, the file copy, detach.
    names = {c["name"] for c in rep["checks"] if c["ok"]}
    assert {"a file copied onto survivor/xvda and back: equal SHA-256",
            "survivor: no grant reference left after the disks detached",
            "teardown: nothing leaked"} <= names
    (rio,) = [c for c in rep["checks"] if c["name"].startswith("verified random I/O")]
    assert rio["ok"] and "2 disks of crashed guests not counted" in rio["detail"]
    (surv,) = [g for g in rep["guests"] if g["name"] == "survivor"]
    assert surv["disks"][0]["bytes_verified"] > 0


def test_a_guest_crash_during_the_toolstacks_file_copy_onto_its_disk_ends_that_copy_only(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """DESIGN 3: a crashed guest's teardown never breaks dom0 or another guest. After
    the workloads the toolstack copies a file onto the first writable disk through
    that guest's blkfront; the guest panics in its interrupt thread in the middle of
    the copy. The copy was a process of that guest: it dies with the guest
    (libxl_domain.c ``libxl__destroy_domid`` takes the domain's every process with
    it), the toolstack goes on with the next disk of a running guest. Before, the
    copy ran the dead guest's driver on the toolstack's own thread: it slept for an
    interrupt that never came (the run stalled) or, once the domain was destroyed,
    wrote into its released memory (``ValueError: operation forbidden on released
    memoryview object``)."""
    from gntdma.dev.blkfront import xbd_softc
    from gntdma.sched import KernelPanic
    from gntdma.toolstack import mainjob

    real_int, real_copy = xbd_softc.xbd_int, mainjob.file_copy
    copying: list[str] = []
    panicked = {"n": 0}

    def copy(f: Any, *args: Any, **kw: Any) -> tuple[bool, str]:
        copying.append(f.sc.xbd_kern.name)
        return real_copy(f, *args, **kw)

    def panicking(self: xbd_softc, port: int) -> None:
        if self.xbd_kern.name == "victim" and copying == ["victim"]:
            panicked["n"] += 1
            raise KernelPanic("injected: xbd_int")
        real_int(self, port)

    monkeypatch.setattr(mainjob, "file_copy", copy)
    monkeypatch.setattr(xbd_softc, "xbd_int", panicking)
    victim = write_cfg(tmp_path / "v.cfg", f"name='victim'\nmemory=64\n"
                       f"disk=[{_disks(tmp_path, 1)}]\n")
    (tmp_path / "s").mkdir()
    survivor = write_cfg(tmp_path / "s" / "s.cfg", f"name='survivor'\nmemory=64\n"
                         f"disk=[{_disks(tmp_path / 's', 1)}]\n")
    t0 = time.monotonic()
    rc, rep, err = run_json(capsys, tmp_path, "--duration", "0.3", "--stall-timeout", "10",
                            str(victim), str(survivor))
    assert time.monotonic() - t0 < 20  # not the stall watchdog
    assert "Traceback" not in err and "stalled" not in rep, (err[-2000:], rep.get("stalled"))
    assert copying == ["victim", "survivor"] and panicked["n"] == 1
    assert rc == 1 and rep["ok"] is False
    assert "injected: xbd_int" in rep["crashed"]["victim"]
    failed = [c for c in rep["checks"] if not c["ok"]]
    assert [c["name"] for c in failed] == ["victim: no guest crashed"], failed
    names = {c["name"] for c in rep["checks"] if c["ok"]}
    assert {"a file copied onto survivor/xvda and back: equal SHA-256",
            "flush and discard on survivor/xvda",
            "survivor: no grant reference left after the disks detached",
            "teardown: nothing leaked"} <= names, rep["checks"]
    (torn,) = [c for c in rep["checks"] if c["name"].startswith("victim: crashed guest "
                                                                  "destroyed")]
    assert "xvda" in torn["detail"] and "backends closed" in torn["detail"]
