"""The guest xenstore client over its ring: the xs_* calls, transactions, watches."""

from __future__ import annotations

import errno

from xenbus_testlib import on_guest, xs

from gntdma.sched import ThreadState, current_scheduler
from gntdma.toolstack.host import Host
from gntdma.toolstack.xs import store_pfn
from gntdma.xen.xenbus import XST_NIL, XsWatch, xs_attach


def test_home_directory_and_basic_ops(host: Host) -> None:
    g = host.create_guest("g1", memory_mb=4)
    c = xs(g)
    home = f"/local/domain/{g.domid}"

    def body() -> None:
        assert c.xs_read(XST_NIL, "name") == (0, b"g1")
        assert c.xs_read(XST_NIL, home, "domid") == (0, str(g.domid).encode())
        assert c.xs_get_domain_path(g.domid) == (0, home)
        assert c.xs_write(XST_NIL, "data", "a", "1") == 0
        assert c.xs_write(XST_NIL, f"{home}/data", "b", b"two") == 0
        assert c.xs_mkdir(XST_NIL, "data/dir") == 0
        assert c.xs_read(XST_NIL, "data/b") == (0, b"two")
        assert c.xs_directory(XST_NIL, "data") == (0, ["a", "b", "dir"])
        assert c.xs_directory(XST_NIL, "data", "dir") == (0, [])
        assert c.xs_exists(XST_NIL, "data", "a") == 1
        assert c.xs_exists(XST_NIL, "data", "zz") == 0
        assert c.xs_rm(XST_NIL, "data", "a") == 0
        assert c.xs_read(XST_NIL, "data/a") == (errno.ENOENT, b"")
        assert c.xs_rm(XST_NIL, "data") == 0
        assert c.xs_directory(XST_NIL, home)[1] == ["name", "domid"]
        # The daemon's errors come back as errnos.
        assert c.xs_read(XST_NIL, "/local/domain/0/name") == (errno.EACCES, b"")
        assert c.xs_write(XST_NIL, "/local/domain/0", "x", "1") == errno.EACCES
        assert c.xs_read(XST_NIL, "bad//path") == (errno.EINVAL, b"")
        assert c.xs_get_perms(XST_NIL, home) == (0, [f"n{g.domid}"])
        # Checked before sending: a payload over XENSTORE_PAYLOAD_MAX.
        assert c.xs_write(XST_NIL, "data", "big", b"x" * 4096) == errno.E2BIG
        assert c.xs_transaction_end(12345, abort=False) == errno.ENOENT

    on_guest(host, g, body)
    assert host.xenstored.read(f"{home}/name") == b"g1"


def test_calls_from_thread0_and_dom0(host: Host) -> None:
    g = host.create_guest("g1", memory_mb=4)
    d0 = xs(host.dom0)
    assert d0.xs_write(XST_NIL, f"/local/domain/{g.domid}", "fromdom0", "x") == 0
    assert xs(g).xs_read(XST_NIL, "fromdom0") == (0, b"x")
    # Dom0 is privileged and may write large values (no quota).
    big = bytes(range(256)) * 15
    assert d0.xs_write(XST_NIL, "/local/domain/0", "big", big) == 0
    assert d0.xs_read(XST_NIL, "/local/domain/0/big") == (0, big)
    assert d0.xs_rm(XST_NIL, "/local/domain/0/big") == 0


def test_transaction_commit_and_abort(host: Host) -> None:
    g = host.create_guest("g1", memory_mb=4)
    c = xs(g)

    def body() -> None:
        err, t = c.xs_transaction_start()
        assert err == 0 and t != XST_NIL
        assert c.xs_write(t, "data", "k", "in-tx") == 0
        assert c.xs_read(XST_NIL, "data/k") == (errno.ENOENT, b"")
        assert c.xs_transaction_end(t, abort=False) == 0
        assert c.xs_read(XST_NIL, "data/k") == (0, b"in-tx")
        err, t = c.xs_transaction_start()
        assert c.xs_write(t, "data", "k", "aborted") == 0
        assert c.xs_transaction_end(t, abort=True) == 0
        assert c.xs_read(XST_NIL, "data/k") == (0, b"in-tx")

    on_guest(host, g, body)
    assert host.xenstored.statistics().transactions == 0


def test_transaction_run_retries_on_eagain(host: Host) -> None:
    """A conflicting write from dom0 (through the core) makes the commit EAGAIN; it reruns."""
    g = host.create_guest("g1", memory_mb=4)
    c = xs(g)
    path = f"/local/domain/{g.domid}/counter"
    host.xenstored.write(path, b"10")
    attempts: list[int] = []

    def increment(t: int) -> int:
        err, raw = c.xs_read(t, path)
        if err != 0:
            return err
        attempts.append(int(raw))
        if len(attempts) == 1:
            host.xenstored.write(path, b"20")  # the toolstack, meanwhile
        return c.xs_write(t, path, "", str(int(raw) + 1))

    assert on_guest(host, g, lambda: c.xs_transaction_run(increment)) == 0
    assert attempts == [10, 20]
    assert host.xenstored.read(path) == b"21"

    # An error from the function aborts and is returned; nothing is written.
    def fail(t: int) -> int:
        assert c.xs_write(t, path, "", "99") == 0
        return errno.EPERM

    assert on_guest(host, g, lambda: c.xs_transaction_run(fail)) == errno.EPERM
    assert host.xenstored.read(path) == b"21"

    # A conflict every time: EAGAIN after the retries.
    def always(t: int) -> int:
        c.xs_read(t, path)
        host.xenstored.write(path, b"0")
        return c.xs_write(t, path, "", "1")

    assert on_guest(host, g, lambda: c.xs_transaction_run(always, retries=3)) == errno.EAGAIN
    assert host.xenstored.statistics().transactions == 0


def test_watches_run_on_the_xenwatch_thread(host: Host) -> None:
    g = host.create_guest("g1", memory_mb=4)
    c = xs(g)
    home = f"/local/domain/{g.domid}"
    seen: list[tuple[str, str, str]] = []

    def cb(path: str, token: str) -> None:
        seen.append((path, token, current_scheduler().curthread.name))

    w = XsWatch("data", cb)
    assert on_guest(host, g, lambda: c.xs_register_watch(w)) == 0
    assert w.token is not None
    host.sched.run(until=lambda: len(seen) == 1)
    assert seen[0] == ("data", w.token, "g1/xenwatch")  # fired once on registration
    assert c.xs_register_watch(w) == errno.EEXIST

    # A change by another connection (dom0's core access, from thread0).
    host.xenstored.write(f"{home}/data/x", b"1")
    host.sched.run(until=lambda: len(seen) == 2)
    assert seen[1] == ("data/x", w.token, "g1/xenwatch")
    # A change by dom0's kernel over its own ring.
    assert xs(host.dom0).xs_write(XST_NIL, home, "data/y", "2") == 0
    host.sched.run(until=lambda: len(seen) == 3)
    assert seen[2][0] == "data/y"
    # Changes elsewhere do not fire it.
    host.xenstored.write(f"{home}/other", b"1")
    host.sched.yield_()
    assert len(seen) == 3

    assert c.xs_unregister_watch(w) == 0
    assert w.token is None
    host.xenstored.write(f"{home}/data/z", b"1")
    host.sched.yield_()
    assert len(seen) == 3
    assert c.xs_unregister_watch(w) == errno.EINVAL
    assert c.statistics().watches == 0
    assert host.xenstored.statistics().watches == 0


def test_a_callback_may_call_xenstore_and_unregister_itself(host: Host) -> None:
    g = host.create_guest("g1", memory_mb=4)
    c = xs(g)
    home = f"/local/domain/{g.domid}"
    got: list[bytes] = []

    def cb(path: str, token: str) -> None:
        err, value = c.xs_read(XST_NIL, home, "flag")
        if err == 0:
            got.append(value)
            assert c.xs_unregister_watch(w) == 0

    w = XsWatch(f"{home}/flag", cb)
    assert c.xs_register_watch(w) == 0
    host.sched.yield_()
    host.xenstored.write(f"{home}/flag", b"up")
    host.sched.run(until=lambda: w.token is None)
    assert got == [b"up"]
    host.xenstored.write(f"{home}/flag", b"again")
    host.sched.yield_()
    assert got == [b"up"]


def test_unregister_waits_for_a_running_callback(host: Host) -> None:
    """After xs_unregister_watch returns, its callback is not running any more."""
    g = host.create_guest("g1", memory_mb=4)
    c = xs(g)
    log: list[str] = []

    def cb(path: str, token: str) -> None:
        log.append("cb start")
        assert c.xs_write(XST_NIL, "data", "cb", "1") == 0  # sleeps for the reply
        log.append("cb end")

    w = XsWatch("data", cb)

    def body() -> None:
        assert c.xs_register_watch(w) == 0
        while not log:
            c.xs_read(XST_NIL, "name")
        assert c.xs_unregister_watch(w) == 0
        log.append("unregistered")

    on_guest(host, g, body)
    assert log[:3] == ["cb start", "cb end", "unregistered"]


def test_requests_in_flight_from_several_threads(host: Host) -> None:
    g = host.create_guest("g1", memory_mb=4)
    c = xs(g)
    done: list[int] = []

    def worker(i: int) -> None:
        for j in range(20):
            assert c.xs_write(XST_NIL, f"data/{i}", str(j), f"{i}.{j}") == 0
        for j in range(20):
            assert c.xs_read(XST_NIL, f"data/{i}/{j}") == (0, f"{i}.{j}".encode())
        done.append(i)

    for i in range(5):
        host.sched.spawn(worker, i, name=f"g1/w{i}", domain=g.kernel)
    host.sched.run(until=lambda: len(done) == 5)
    assert sorted(done) == list(range(5))
    assert c.statistics().pending == 0
    assert c.statistics().requests >= 200


def test_xs_attach_reports_a_bad_port(host: Host) -> None:
    g = host.create_guest("g1", memory_mb=4)
    gfn = store_pfn(g.domain.memory)
    assert xs_attach(g.hc, gfn, 999, name="g1-bad") == (errno.EINVAL, None)
    host.sched.yield_()
    assert all(t.state is ThreadState.DONE for t in host.sched.threads
               if t.name == "g1-bad/xenwatch")
