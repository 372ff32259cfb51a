"""Network namespaces are held by a child tied to the run's life: closing
deletes them, and a run killed with SIGKILL leaves none behind (nor its TAP)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from gntdma.host.netns import IFNAMSIZ, Netns, NetnsError, ip, net_unavailable, unique_name

pytestmark = pytest.mark.skipif(net_unavailable() is not None, reason=str(net_unavailable()))


def _gone(name: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not os.path.exists(f"/run/netns/{name}"):
            return True
        time.sleep(0.05)
    return False


def test_names_are_unique_and_fit_ifnamsiz() -> None:
    names = {unique_name("t") for _ in range(100)}
    assert len(names) == 100
    assert all(len(n) <= IFNAMSIZ - 1 for n in names)


def test_namespace_lives_until_closed() -> None:
    ns = Netns()
    try:
        assert ns.alive
        assert "lo" in ns.ip("-o", "link", "show")
    finally:
        ns.close()
    assert _gone(ns.name)
    assert ns.name not in ip("netns", "list")


def test_a_name_in_use_is_refused_with_ips_message() -> None:
    with Netns() as ns, pytest.raises(NetnsError, match=ns.name):
        Netns(ns.name)


def test_a_command_that_outlives_its_timeout_is_a_netns_error() -> None:
    """A network check's program that hangs is an error the caller reports, never a
    subprocess.TimeoutExpired traceback (DESIGN section 11: a run never hangs, every
    failure is a check)."""
    with Netns() as ns:
        t0 = time.monotonic()
        with pytest.raises(NetnsError, match=r"sleep 30 in .*timed out after 0.3 s"):
            ns.run(["sleep", "30"], timeout=0.3)
        assert time.monotonic() - t0 < 10
        with pytest.raises(NetnsError, match="gntdma-no-such-tool"):
            ns.run(["gntdma-no-such-tool"])


_VICTIM = r"""
import sys, time
from gntdma.host.netns import Netns, unique_name
from gntdma.host.tap import Tap
ns = Netns()
tap = Tap(unique_name("t"))
ns.add_link(tap.name, "198.18.0.1/24")
print(ns.name, tap.name, ns.holder_pid, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_run_leaves_no_namespace_behind(sig: int) -> None:
    p = subprocess.Popen([sys.executable, "-c", _VICTIM], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    name, tap, holder = p.stdout.readline().split()
    assert os.path.exists(f"/run/netns/{name}")
    assert tap in ip("-n", name, "-o", "link", "show")
    p.send_signal(sig)
    p.wait()
    p.stdout.close()
    assert _gone(name)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the holder exits after deleting it
        try:
            os.kill(int(holder), 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the namespace holder outlived the run")
    assert tap not in ip("-o", "link", "show")
