"""``gntdma xl --socket PATH VERB``: the xl-like console of a running host.

Output formats are Xen RELEASE-4.17.7's ``tools/xl``: ``list_domains``
(``xl_info.c``: ``"Name                                        ID   Mem VCPUs\\tState\\tTime(s)"``
and rows ``"%-40s %5d %5lu %5d     %c%c%c%c%c%c  %8.1f"``), ``main_blocklist``
(``xl_block.c``: ``"%-5s %-3s %-6s %-5s %-6s %-8s %-30s"``), ``main_networklist``
(``xl_nic.c``), and the errors of ``find_domain`` (``xl_utils.c``: ``"%s is an
invalid domain identifier (rc=%d)"``), ``main_blockdetach`` (``"Error: Device %s
not connected."``) and ``main_networkdetach`` (``"Unknown device %s."``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from tests.toolstack.serve_helpers import serve_env

from gntdma.host.netns import net_unavailable

pytestmark = pytest.mark.slow

_CLI = [sys.executable, "-c", "import sys; from gntdma.cli import main; sys.exit(main())"]
_LIST_HEADER = "Name                                        ID   Mem VCPUs\tState\tTime(s)"
# printf("%-5s %-3s %-6s %-5s %-6s %-8s %-30s\n", "Vdev", "BE", "handle", ...)
_BLOCK_HEADER = "Vdev  BE  handle state evt-ch ring-ref BE-path                       "


@dataclass
class Held:
    proc: subprocess.Popen[str]
    sock: Path
    tmp: Path
    lines: list[str] = field(default_factory=list)
    events: dict[str, threading.Event] = field(default_factory=dict)

    def wait_for(self, prefix: str, timeout: float = 60.0) -> None:
        ev = self.events.setdefault(prefix, threading.Event())
        deadline = time.monotonic() + timeout
        while not ev.is_set():
            if any(line.lstrip().startswith(prefix) for line in list(self.lines)):
                return
            assert time.monotonic() < deadline, f"no line {prefix!r} in {self.lines}"
            assert self.proc.poll() is None or any(
                line.lstrip().startswith(prefix) for line in self.lines), self.lines
            time.sleep(0.05)

    def xl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([*_CLI, "xl", "--socket", str(self.sock), *args], cwd=self.tmp,
                           env=serve_env(self.tmp), capture_output=True, text=True,
                           timeout=120)
        if check:
            assert r.returncode == 0, (args, r.stdout, r.stderr)
        return r

    def stop(self, sig: int = signal.SIGINT) -> tuple[int, str]:
        self.proc.send_signal(sig)
        status = self.proc.wait(timeout=120)
        assert self.proc.stderr is not None
        return status, self.proc.stderr.read()


@contextmanager
def held(tmp: Path, *args: str) -> Iterator[Held]:
    """``gntdma ARGS --control tmp/ctl.sock`` up, its output collected."""
    sock = tmp / "ctl.sock"
    proc = subprocess.Popen([*_CLI, *args, "--control", str(sock)], cwd=tmp,
                            env=serve_env(tmp), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    h = Held(proc, sock, tmp)

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            h.lines.append(line.rstrip("\n"))

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        h.wait_for("control: gntdma xl --socket")
        yield h
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        t.join(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()


def _config(tmp: Path, name: str = "g1") -> Path:
    cfg = tmp / f"{name}.cfg"
    cfg.write_text(f'name = "{name}"\nmemory = 32\nmax_grant_frames = 4\n'
                   f"disk = [ 'vdev=xvda, access=rw, size=16M, target={name}-xvda.img' ]\n")
    return cfg


def _devids(block_list: str) -> list[int]:
    lines = block_list.splitlines()
    assert lines[0] == _BLOCK_HEADER
    return [int(line.split()[0]) for line in lines[1:]]


def test_block_attach_then_detach_while_the_workload_runs_and_list_follows(
        tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    report = tmp_path / "r.json"
    with held(tmp_path, "run", str(cfg), "--duration", "8", "--hold", "--json",
              str(report)) as h:
        h.wait_for("[")  # the first progress line: the workload runs
        out = h.xl("list").stdout.splitlines()
        assert out[0].startswith(_LIST_HEADER)
        names = [line[:40].rstrip() for line in out[1:]]
        assert names == ["Domain-0", "g1"]
        g1 = out[2]
        assert int(g1[41:46]) > 0 and int(g1[47:52]) >= 32  # domid, MiB
        assert g1.split()[-1].endswith("/4")  # grant frames in use / max_grant_frames
        assert _devids(h.xl("block-list", "g1").stdout) == [51712]
        # xl block-attach: the image path is taken from the client's folder
        h.xl("block-attach", "g1", "vdev=xvdc, access=rw, size=8M, target=extra.img")
        assert (tmp_path / "extra.img").stat().st_size == 8 << 20
        rows = h.xl("block-list", "g1").stdout.splitlines()[1:]
        assert [int(r.split()[0]) for r in rows] == [51712, 51744]
        extra = rows[1].split()
        assert extra[1] == "0" and extra[3] == "4"  # backend dom0, XenbusStateConnected
        assert extra[-1] == f"/local/domain/0/backend/vbd/{out[2].split()[1]}/51744"
        h.xl("block-detach", "g1", "xvdc")
        assert _devids(h.xl("block-list", "g1").stdout) == [51712]
        # and again by number, the other way libxl names a disk
        h.xl("block-attach", "g1", "vdev=xvdd, access=rw, size=8M, target=extra2.img")
        h.xl("block-detach", "g1", "51760")
        assert _devids(h.xl("block-list", "g1").stdout) == [51712]
        h.wait_for("holding:")
        assert _devids(h.xl("block-list", g1.split()[1]).stdout) == [51712]  # by domid
        status, err = h.stop()
    assert status == 0, (h.lines[-30:], err)
    assert not h.sock.exists()
    rep = json.loads(report.read_text())
    assert rep["xl"]["requests"] >= 9
    assert all(c["ok"] for c in rep["checks"]), [c for c in rep["checks"] if not c["ok"]]


def test_a_disk_xl_attached_and_left_is_detached_before_the_guest_goes(
        tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    report = tmp_path / "r.json"
    with held(tmp_path, "run", str(cfg), "--duration", "1", "--hold", "--json",
              str(report)) as h:
        h.wait_for("holding:")
        h.xl("block-attach", "g1", f"vdev=xvdb, size=4M, target={tmp_path / 'left.img'}")
        assert _devids(h.xl("block-list", "g1").stdout) == [51712, 51728]
        status, err = h.stop(signal.SIGTERM)
    assert status == 0, (h.lines[-30:], err)
    rep = json.loads(report.read_text())
    checks = {c["name"]: c for c in rep["checks"]}
    assert checks["gntdma xl: what it attached detached cleanly"]["ok"]
    assert checks["teardown: nothing leaked"]["ok"], checks["teardown: nothing leaked"]


def test_xl_errors_are_xls_words_and_never_a_traceback(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    with held(tmp_path, "run", str(cfg), "--duration", "1", "--hold") as h:
        h.wait_for("holding:")
        r = h.xl("list", "nope", check=False)
        assert r.returncode == 1 and r.stderr == "nope is an invalid domain identifier (rc=-6)\n"
        r = h.xl("block-detach", "g1", "xvdq", check=False)
        assert r.returncode == 1 and r.stderr == "Error: Device xvdq not connected.\n"
        r = h.xl("network-detach", "g1", "7", check=False)
        assert r.returncode == 1 and r.stderr == "Unknown device 7.\n"
        r = h.xl("destroy", "0", check=False)
        assert r.returncode == 1 and "Not destroying dom 0" in r.stderr
        r = h.xl("block-attach", "g1", "vdev=bogus0, target=x.img", check=False)
        assert r.returncode == 1 and "vdev" in r.stderr and "Traceback" not in r.stderr
        r = h.xl("block-attach", "g1", "vdev=xvda, size=4M, target=dup.img", check=False)
        assert r.returncode == 1 and "libxl_device_disk_add failed." in r.stderr
        r = h.xl("block-attach", "g1", check=False)  # xl_utils.c def_getopt: exit(2)
        assert r.returncode == 2 and "requires at least 2 arguments" in r.stderr
        # a hostile client: garbage, a request that never ends, a client that leaves
        for data in (b"not json\n", b'{"verb": 3}\n', b"[]\n", b'{"verb": "list", '
                     b'"args": "x", "cwd": "/"}\n'):
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(h.sock))
                s.sendall(data)
                ans = json.loads(s.makefile().readline())
                assert ans["status"] == 1 and ans["err"].startswith("bad request"), ans
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(h.sock))
            s.sendall(b"x" * (70 << 10))
            assert json.loads(s.makefile().readline())["status"] == 1
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(h.sock))
        # still answering
        assert h.xl("list").stdout.startswith(_LIST_HEADER)
        info = {k.strip(): v.strip() for k, v in (
            line.split(":", 1) for line in h.xl("info").stdout.splitlines())}
        assert info["xen_version"] == "4.17.7" and info["xen_major"] == "4"
        status, err = h.stop()
    assert status == 0, err
    assert "Traceback" not in err


def test_xl_without_a_host_says_so(tmp_path: Path) -> None:
    env = serve_env(tmp_path)
    r = subprocess.run([*_CLI, "xl", "--socket", str(tmp_path / "none.sock"), "list"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1 and "no such control socket" in r.stderr
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))  # bound, never listening: what a dead host leaves
    s.close()
    r = subprocess.run([*_CLI, "xl", "--socket", str(stale), "list"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 1 and "connection refused" in r.stderr
    r = subprocess.run([*_CLI, "xl", "--socket", str(stale), "reboot", "g"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "invalid choice" in r.stderr
    # a control path that is taken is refused before anything runs
    r = subprocess.run([*_CLI, "run", "--hold", "--control", str(stale)],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "already there" in r.stderr
    assert stale.exists()  # not ours to remove


def test_destroy_removes_the_guest_at_once_with_its_disks(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    report = tmp_path / "serve.json"
    with held(tmp_path, "serve", str(cfg), "--nbd", str(tmp_path / "nbd.sock"), "--json",
              str(report)) as h:
        h.wait_for("serving until")
        h.xl("block-attach", "g1", "vdev=xvdb, size=4M, target=more.img")
        h.xl("destroy", "g1")
        names = [line[:40].rstrip() for line in h.xl("list").stdout.splitlines()[1:]]
        assert names == ["Domain-0"]
        r = h.xl("block-list", "g1", check=False)
        assert "g1 is an invalid domain identifier" in r.stderr
        status, _err = h.stop()
    rep = json.loads(report.read_text())
    assert rep["xl"]["destroyed"] == ["g1"]
    checks = {c["name"]: c for c in rep["checks"]}
    assert "destroyed by xl destroy" in checks["g1: no guest crashed"]["detail"]
    assert checks["teardown: nothing leaked"]["ok"], checks["teardown: nothing leaked"]
    assert status == 1  # the guest did not serve to the end: said, not hidden
    assert not h.sock.exists()


@pytest.mark.skipif(net_unavailable() is not None, reason=str(net_unavailable()))
def test_network_attach_list_detach_on_a_served_host(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    report = tmp_path / "serve.json"
    ns = f"gxl{os.getpid():x}"
    with held(tmp_path, "serve", str(cfg), "--nbd", str(tmp_path / "nbd.sock"), "--json",
              str(report)) as h:
        h.wait_for("serving until")
        h.xl("network-attach", "g1", f"bridge=xlbr{os.getpid() % 1000}, netns={ns}")
        rows = h.xl("network-list", "g1").stdout.splitlines()
        assert rows[0].split()[:3] == ["Idx", "BE", "Mac"]
        assert len(rows) == 2 and rows[1].split()[0] == "0"
        mac = rows[1].split()[2]
        assert mac.startswith("00:16:3e:")
        assert ns in os.listdir("/run/netns")
        r = subprocess.run(["ip", "netns", "exec", ns, "ip", "-o", "link"], capture_output=True,
                           text=True, timeout=30)
        assert mac in r.stdout.lower()
        h.xl("network-detach", "g1", mac)
        assert len(h.xl("network-list", "g1").stdout.splitlines()) == 1
        h.xl("network-attach", "g1", f"bridge=xlbr{os.getpid() % 1000}")
        status, err = h.stop()
    assert status == 0, (h.lines[-20:], err)
    rep = json.loads(report.read_text())
    assert all(c["ok"] for c in rep["checks"]), [c for c in rep["checks"] if not c["ok"]]
    assert ns not in os.listdir("/run/netns") if os.path.isdir("/run/netns") else True


def test_xl_list_long_prints_the_domain_configs_as_json(tmp_path: Path) -> None:
    # tools/xl/xl_info.c, main_list: "-l"/"--long" (getopt "lvhZcn") calls
    # list_domains_details, a JSON array of printf_info_one_json's {"domid", "config"};
    # more than one domain is help("list") and EXIT_FAILURE.
    cfg = _config(tmp_path)
    with held(tmp_path, "run", str(cfg), "--duration", "1", "--hold") as h:
        h.wait_for("holding:")
        for args in (("list", "-l"), ("list", "--long", "g1"), ("list", "g1", "-l")):
            doc = json.loads(h.xl(*args).stdout)
            g1 = [d for d in doc if d["config"]["c_info"]["name"] == "g1"]
            assert len(g1) == 1, (args, doc)
            c = g1[0]["config"]
            assert c["b_info"]["max_grant_frames"] == 4
            assert c["b_info"]["max_memkb"] == 32 * 1024
            assert [(d["vdev"], d["readwrite"]) for d in c["disks"]] == [("xvda", 1)]
            assert c["disks"][0]["pdev_path"].endswith("g1-xvda.img")
            assert isinstance(g1[0]["domid"], int)
        # def_getopt (xl_utils.c): an option getopt does not know ends xl with status 2
        for bad, opt in (("-x", "x"), ("-1", "1"), ("--longer", "--longer")):
            r = h.xl("list", bad, check=False)
            assert (r.returncode, r.stderr) == (2, f"option `{opt}' not supported.\n"), bad
        assert h.xl("list", "-h").stdout.startswith("Usage: xl [-v] list")
        r = h.xl("list", "g1", "g1", check=False)
        assert r.returncode == 1 and r.stderr.startswith("Usage: xl [-v] list")
        status, err = h.stop()
    assert status == 0, err
