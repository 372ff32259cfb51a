"""Real clients against ``python -m gntdma.xenstored``: Debian's xenstore-utils and pyxs.

The tools find the daemon through ``XENSTORED_PATH`` (libxenstore's ``xs_open``
connects to it when it is a socket). A missing tool is a failure, not a skip:
``make test`` installs xenstore-utils.
"""

from __future__ import annotations

import errno
import os
import select
import shutil
import subprocess
import threading
from collections.abc import Iterator

import pytest
from xs_helpers import SockClient, T, daemon_process, wait_for, z

pytestmark = [pytest.mark.realclient, pytest.mark.slow]

TOOLS = (
    "xenstore-write",
    "xenstore-read",
    "xenstore-ls",
    "xenstore-list",
    "xenstore-exists",
    "xenstore-rm",
    "xenstore-chmod",
    "xenstore-watch",
)


@pytest.fixture(scope="module")
def daemon() -> Iterator[str]:
    with daemon_process() as path:
        yield path


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} is missing: install xenstore-utils (make test does)"
    return path


def xs(daemon: str, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XENSTORED_PATH": daemon}
    proc = subprocess.run(
        [_tool(tool), *args], env=env, capture_output=True, text=True, timeout=30
    )
    if check:
        assert proc.returncode == 0, (tool, args, proc.returncode, proc.stderr)
    return proc


def test_all_tools_are_installed() -> None:
    for tool in TOOLS:
        _tool(tool)


def test_write_read_list_exists(daemon: str) -> None:
    xs(daemon, "xenstore-write", "/rc/a", "hello", "/rc/b/c", "nested value")
    assert xs(daemon, "xenstore-read", "/rc/a").stdout == "hello\n"
    assert xs(daemon, "xenstore-read", "/rc/a", "/rc/b/c").stdout == "hello\nnested value\n"
    assert xs(daemon, "xenstore-read", "-p", "/rc/a").stdout == "/rc/a: hello\n"
    assert xs(daemon, "xenstore-list", "/rc").stdout == "a\nb\n"
    assert xs(daemon, "xenstore-exists", "/rc/b/c").returncode == 0
    missing = xs(daemon, "xenstore-exists", "/rc/nope", check=False)
    assert missing.returncode == 1
    bad = xs(daemon, "xenstore-read", "/rc/nope", check=False)
    assert bad.returncode == 1 and "couldn't read path /rc/nope" in bad.stderr
    with SockClient(daemon) as c:  # what the tools wrote is what the store holds
        assert c.read("/rc/b/c") == b"nested value"


def test_ls_shows_the_tree(daemon: str) -> None:
    xs(daemon, "xenstore-write", "/ls/x", "1", "/ls/y/z", "2")
    assert xs(daemon, "xenstore-ls", "/ls").stdout == 'x = "1"\ny = ""\n z = "2"\n'
    full = xs(daemon, "xenstore-ls", "-f", "/ls").stdout
    assert full == '/ls/x = "1"\n/ls/y = ""\n/ls/y/z = "2"\n'
    root = xs(daemon, "xenstore-ls").stdout.splitlines()
    assert root[:2] == ['tool = ""', ' xenstored = ""']
    assert 'ls = ""' in root


def test_rm(daemon: str) -> None:
    xs(daemon, "xenstore-write", "/rm/a/b", "1", "/rm/c", "2")
    xs(daemon, "xenstore-rm", "/rm/a")
    assert xs(daemon, "xenstore-list", "/rm").stdout == "c\n"
    xs(daemon, "xenstore-rm", "/rm/a")  # already gone: fine
    assert xs(daemon, "xenstore-rm", "/rm/a/b", check=False).returncode == 1
    xs(daemon, "xenstore-write", "/rm/t/u/v", "1")
    xs(daemon, "xenstore-rm", "-t", "/rm/t/u/v")  # tidy: empty parents go too
    assert xs(daemon, "xenstore-list", "/rm").stdout == "c\n"


def test_chmod_and_permissions(daemon: str) -> None:
    xs(daemon, "xenstore-write", "/perm/a/b", "v")
    xs(daemon, "xenstore-chmod", "/perm/a/b", "n0", "r5", "b7")
    with SockClient(daemon) as c:
        assert c.get_perms("/perm/a/b") == ["n0", "r5", "b7"]
    shown = xs(daemon, "xenstore-ls", "-p", "/perm").stdout.splitlines()
    assert shown[0].startswith('a = ""') and shown[0].endswith("(n0)")
    assert shown[1].startswith(' b = "v"') and shown[1].endswith("(n0,r5,b7)")
    # Owner 3 must exist (do_set_perms: ENOENT for an owner that does not, XSA-322).
    assert xs(daemon, "xenstore-chmod", "-r", "/perm", "b3", check=False).returncode == 1
    with SockClient(daemon) as c:
        c.call(T.XS_INTRODUCE, z("3", "0", "1"))
    xs(daemon, "xenstore-chmod", "-r", "/perm", "b3")
    with SockClient(daemon) as c:
        assert c.get_perms("/perm") == c.get_perms("/perm/a/b") == ["b3"]
    bad = xs(daemon, "xenstore-chmod", "/perm/none", "r1", check=False)
    assert bad.returncode != 0


def test_watch_prints_events(daemon: str) -> None:
    xs(daemon, "xenstore-write", "/wt/seed", "0")
    env = {**os.environ, "XENSTORED_PATH": daemon}
    proc = subprocess.Popen(
        [_tool("xenstore-watch"), "-n", "3", "/wt"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready, "no first event"
        assert proc.stdout.readline() == "/wt\n"  # fires once on registration
        xs(daemon, "xenstore-write", "/wt/a", "1")
        xs(daemon, "xenstore-write", "/other", "1")  # not below /wt
        xs(daemon, "xenstore-rm", "/wt/seed")
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert out == "/wt/a\n/wt/seed\n"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# pyxs


def test_pyxs_basic_operations(daemon: str) -> None:
    from pyxs import Client

    with Client(unix_socket_path=daemon) as c:
        c.write(b"/py/a", b"1")
        c.mkdir(b"/py/empty")
        assert c.read(b"/py/a") == b"1"
        assert c.read(b"/py/empty") == b""
        assert sorted(c.list(b"/py")) == [b"a", b"empty"]
        assert c.exists(b"/py/a") and not c.exists(b"/py/zz")
        c.set_perms(b"/py/a", [b"n0", b"r4"])
        assert c.get_perms(b"/py/a") == [b"n0", b"r4"]
        assert c.get_domain_path(3) == b"/local/domain/3"
        assert c.is_domain_introduced(0)
        c.delete(b"/py/empty")
        assert c.list(b"/py") == [b"a"]
        assert c.read(b"/py/zz", b"default") == b"default"


def test_pyxs_finds_the_daemon_through_xenstored_path(
    daemon: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyxs import Client

    monkeypatch.setenv("XENSTORED_PATH", daemon)
    with Client() as c:
        c.write(b"/py/env", b"ok")
        assert c.read(b"/py/env") == b"ok"


def test_pyxs_errors(daemon: str) -> None:
    from pyxs import Client, PyXSError

    with Client(unix_socket_path=daemon) as c:
        with pytest.raises(PyXSError) as ei:
            c.read(b"/py/none/at/all")
        assert ei.value.args[0] == errno.ENOENT
        with pytest.raises(PyXSError) as ei:
            c.delete(b"/")
        assert ei.value.args[0] == errno.EINVAL


def test_pyxs_transaction_conflict_gets_eagain(daemon: str) -> None:
    from pyxs import Client, PyXSError
    from pyxs._internal import Op

    with Client(unix_socket_path=daemon) as a, Client(unix_socket_path=daemon) as b:
        a.write(b"/pyt/x", b"0")
        # commit() reports the conflict as False ...
        a.transaction()
        assert a.read(b"/pyt/x") == b"0"
        a.write(b"/pyt/y", b"a")
        b.write(b"/pyt/x", b"b")  # concurrent write to what the transaction read
        assert a.commit() is False
        assert not a.exists(b"/pyt/y")
        # ... which is the EAGAIN error on the wire.
        a.transaction()
        a.read(b"/pyt/x")
        b.write(b"/pyt/x", b"c")
        with pytest.raises(PyXSError) as ei:
            a.ack(Op.TRANSACTION_END, b"T\0")
        assert ei.value.args[0] == errno.EAGAIN
        a.tx_id = 0
        # Redo, as clients do, and it commits.
        a.transaction()
        a.write(b"/pyt/x", a.read(b"/pyt/x") + b"+")
        assert a.commit() is True
        assert b.read(b"/pyt/x") == b"c+"


def test_pyxs_watches(daemon: str) -> None:
    from pyxs import Client

    with Client(unix_socket_path=daemon) as c, Client(unix_socket_path=daemon) as writer:
        m = c.monitor()
        m.watch(b"/pyw", b"token")
        events = m.wait()
        first = next(events)
        assert (first.path, first.token) == (b"/pyw", b"token")
        got: list[tuple[bytes, bytes]] = []
        done = threading.Event()

        def collect() -> None:
            for ev in events:
                got.append((ev.path, ev.token))
                if len(got) == 2:
                    done.set()
                    return

        t = threading.Thread(target=collect, daemon=True)
        t.start()
        writer.write(b"/pyw/a", b"1")
        writer.delete(b"/pyw")
        assert done.wait(20), got
        assert got == [(b"/pyw/a", b"token"), (b"/pyw", b"token")]
        m.unwatch(b"/pyw", b"token")


def test_daemon_has_no_leftovers(daemon: str) -> None:
    """Once the clients above are gone, dom0 holds no watches or transactions."""

    def usage() -> dict[str, str]:
        with SockClient(daemon) as c:
            text = c.call(T.XS_CONTROL, z("quota", "0")).decode().rstrip("\0")
        lines = text.splitlines()[1:]
        return dict(line.replace(" ", "").split(":") for line in lines)

    wait_for(lambda: usage()["watches"] == "0" and usage()["transactions"] == "0")
