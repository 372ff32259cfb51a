"""Xen's own xenstore test program against ``python -m gntdma.xenstored``.

``test-xenstore`` (``tools/tests/xenstore/test-xenstore.c`` of Xen 4.17) is
shipped by Debian as ``/usr/lib/xen-4.17/bin/test-xenstore`` in
``xen-utils-4.17``. That package is never installed (it pulls in systemd and
udev): ``make xen-utils`` (part of ``make test``) downloads it with
``apt-get download`` and unpacks it with ``dpkg -x`` under ``.cache/``; when
the cache is missing the test does the same in its own temporary directory.
The program links against ``libxenstore.so.4`` (libxen-dev's runtime
dependency ``libxenstore4``), which finds the daemon through
``XENSTORED_PATH``.

What it checks (``main`` and ``tests[]``): reads and writes of 1 and 2000
bytes, DIRECTORY, RM of a node and of a tree, empty transactions committed and
aborted, a read-modify-write transaction committed and aborted (the
transaction sees its own write, the outside does not until the commit), and a
transaction whose node is changed from outside after the transaction read it:
the transaction keeps seeing its own copy and the commit fails with EAGAIN.
The exit status is 0 only if every test passed; a failed test prints
``failed (ret = <errno>, stage <stage>)``.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from xs_helpers import SockClient, daemon_process

pytestmark = [pytest.mark.realclient, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CACHED = REPO / ".cache" / "xen-utils-4.17"
BINARY = Path("usr/lib/xen-4.17/bin/test-xenstore")
#: The names of ``tests[]`` in test-xenstore.c, in order.
TESTS = ("read 1", "read 2000", "write 1", "write 2000", "dir", "rm node", "rm dir",
         "ta empty", "ta empty x", "ta rmw", "ta rmw x", "ta err")


def _unpack(dest: Path) -> Path:
    """``apt-get download xen-utils-4.17`` and ``dpkg -x`` it into ``dest``."""
    debs = dest / "debs"
    debs.mkdir(parents=True)
    subprocess.run(["apt-get", "download", "-q", "xen-utils-4.17"], cwd=debs, check=True,
                   capture_output=True, timeout=300)
    (deb,) = debs.glob("xen-utils-4.17_*.deb")
    root = dest / "root"
    subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True, timeout=300)
    return root


@pytest.fixture(scope="module")
def xen_utils(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The unpacked xen-utils-4.17 tree (the repository's cache, or a fresh one)."""
    if (CACHED / BINARY).is_file():
        return CACHED
    return _unpack(tmp_path_factory.mktemp("xen-utils"))


@pytest.fixture(scope="module")
def daemon() -> Iterator[str]:
    with daemon_process() as path:
        yield path


def _run(root: Path, daemon: str, *args: str) -> subprocess.CompletedProcess[str]:
    libdirs = [str(root / d) for d in ("usr/lib/x86_64-linux-gnu", "usr/lib/xen-4.17/lib",
                                       "lib/x86_64-linux-gnu")]
    old = os.environ.get("LD_LIBRARY_PATH")
    env = {**os.environ, "XENSTORED_PATH": daemon,
           "LD_LIBRARY_PATH": ":".join([*libdirs, *([old] if old else [])])}
    return subprocess.run([str(root / BINARY), *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_test_xenstore_lists_the_tests_of_xen_4_17(xen_utils: Path, daemon: str) -> None:
    proc = _run(xen_utils, daemon, "--list-tests")
    assert proc.returncode == 0, proc.stderr
    names = tuple(line.split(":")[0].rstrip() for line in proc.stdout.splitlines())
    assert names == TESTS


def test_test_xenstore_passes_every_test(xen_utils: Path, daemon: str) -> None:
    proc = _run(xen_utils, daemon)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    ran = [line.split(":")[0].rstrip() for line in proc.stdout.splitlines() if ":" in line]
    assert tuple(ran) == TESTS, proc.stdout
    assert "failed" not in proc.stdout
    assert "Exhaustive transaction retries" not in proc.stdout
    with SockClient(daemon) as c:  # its cleanup removed what it wrote
        assert "xenstore-test" not in c.ls("/local/domain/0")


def test_test_xenstore_passes_repeated_iterations(xen_utils: Path, daemon: str) -> None:
    proc = _run(xen_utils, daemon, "--iterations", "20")
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert "failed" not in proc.stdout and "Exhaustive" not in proc.stdout


def test_test_xenstore_passes_its_random_mode(xen_utils: Path, daemon: str) -> None:
    proc = _run(xen_utils, daemon, "--random", "2")
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert "failed" not in proc.stdout
