"""Semantics of the daemon core, in process: tree, permissions, watches, transactions."""

from __future__ import annotations

import dataclasses
import errno
import threading

import pytest
from xs_helpers import HDR, Client, T, errno_of, raw, z

from gntdma.xenstored import (
    XENSTORE_PAYLOAD_MAX,
    Quotas,
    Xenstored,
    XenstoredStatistics,
    XsError,
)

BASE = XenstoredStatistics(nodes=3, watches=0, transactions=0, connections=0, domains=0)


@pytest.fixture
def xsd() -> Xenstored:
    # Every domain a test names was created by the host; the XSA-322 rules for
    # domains that do not exist are in test_xs_domain_perms.py.
    return Xenstored(domain_exists=lambda domid: True)


def test_fresh_daemon(xsd: Xenstored) -> None:
    assert xsd.statistics() == BASE
    assert xsd.directory("/") == ["tool"]
    assert xsd.directory("/tool") == ["xenstored"]
    assert xsd.get_perms("/") == ["n0"]


# Tree.


def test_write_creates_parents_with_empty_values(xsd: Xenstored) -> None:
    c = Client(xsd)
    c.write("/a/b/c", b"v")
    assert c.read("/a") == b"" and c.read("/a/b") == b"" and c.read("/a/b/c") == b"v"
    assert c.ls("/") == ["tool", "a"]
    c.write("/a/b", b"w")  # values and children coexist
    assert c.read("/a/b") == b"w" and c.ls("/a/b") == ["c"]
    c.write("/a/b", b"")
    assert c.read("/a/b") == b""
    c.write("/a/z", b"\x00\xffbinary")  # values are bytes
    assert c.read("/a/z") == b"\x00\xffbinary"


def test_children_keep_creation_order(xsd: Xenstored) -> None:
    c = Client(xsd)
    for name in ("zz", "aa", "mm"):
        c.mkdir(f"/o/{name}")
    assert c.ls("/o") == ["zz", "aa", "mm"]
    c.rm("/o/aa")
    c.mkdir("/o/aa")
    assert c.ls("/o") == ["zz", "mm", "aa"]


def test_mkdir_is_idempotent_and_keeps_value(xsd: Xenstored) -> None:
    c = Client(xsd)
    c.write("/m", b"keep")
    c.mkdir("/m")
    assert c.read("/m") == b"keep"
    c.mkdir("/m/n/o")
    assert c.ls("/m/n") == ["o"]


def test_rm_rules(xsd: Xenstored) -> None:
    c = Client(xsd)
    c.write("/r/a/b", b"1")
    c.write("/r/c", b"2")
    c.rm("/r/a")
    assert c.ls("/r") == ["c"]
    c.rm("/r/a")  # already gone, parent there: fine
    assert errno_of(c.rm, "/r/a/b") == errno.ENOENT  # parent missing too
    assert errno_of(c.rm, "/") == errno.EINVAL
    c.rm("/r")
    assert errno_of(c.read, "/r/c") == errno.ENOENT
    assert xsd.statistics().nodes == 3


def test_missing_nodes(xsd: Xenstored) -> None:
    c = Client(xsd)
    for op in (c.read, c.ls, c.get_perms):
        assert errno_of(op, "/missing") == errno.ENOENT


@pytest.mark.parametrize(
    "path",
    [
        "/a//b",
        "/a/",
        "/a b",
        "/a\tb",
        "/a.b",
        "/a:b",
        "/é",
        "",
        "/x/" + "y" * 2048,  # 2051 bytes: over XENSTORE_REL_PATH_MAX outside /local/domain
        "/local/domain/1/" + "y" * 2049,
        "@introduceDomain",
    ],
)
def test_invalid_paths(xsd: Xenstored, path: str) -> None:
    c = Client(xsd)
    payload = path.encode("utf-8") + b"\0"
    for type_ in (T.XS_READ, T.XS_WRITE, T.XS_MKDIR, T.XS_RM, T.XS_DIRECTORY, T.XS_GET_PERMS):
        assert errno_of(c.call, type_, payload) == errno.EINVAL, (path, type_)


def test_path_length_limits(xsd: Xenstored) -> None:
    c = Client(xsd)
    c.write("/x/" + "y" * 2045, b"")  # 2048 bytes in all: the limit
    c.write("/local/domain/1/" + "y" * 2048, b"")  # 2048 below the domain's home
    assert errno_of(c.write, "/x/" + "y" * 2046, b"") == errno.EINVAL


def test_relative_paths_resolve_against_the_domain_home(xsd: Xenstored) -> None:
    dom0 = Client(xsd)
    dom0.write("rel/x", b"0")  # socket-like dom0 connection: /local/domain/0
    assert dom0.read("/local/domain/0/rel/x") == b"0"
    xsd.introduce_domain(3)
    d3 = Client(xsd, domid=3)
    d3.write("data/v", b"3")
    assert dom0.read("/local/domain/3/data/v") == b"3"
    assert d3.read("data/v") == b"3"
    assert d3.ls("data") == ["v"]


def test_get_domain_path_and_is_introduced(xsd: Xenstored) -> None:
    c = Client(xsd)
    assert c.call(T.XS_GET_DOMAIN_PATH, b"12\0") == b"/local/domain/12\0"
    assert c.call(T.XS_GET_DOMAIN_PATH, b"junk\0") == b"/local/domain/0\0"
    assert errno_of(c.call, T.XS_GET_DOMAIN_PATH, z("1", "2")) == errno.EINVAL
    assert c.call(T.XS_IS_DOMAIN_INTRODUCED, b"0\0") == b"T\0"
    assert c.call(T.XS_IS_DOMAIN_INTRODUCED, b"32752\0") == b"T\0"  # DOMID_SELF
    assert c.call(T.XS_IS_DOMAIN_INTRODUCED, b"4\0") == b"F\0"


def test_directory_part_chunks_a_long_directory(xsd: Xenstored) -> None:
    c = Client(xsd)
    names = [f"child-{i:04d}-{'x' * 40}" for i in range(200)]  # ~10 KB of names
    for n in names:
        c.mkdir(f"/big/{n}")
    assert errno_of(c.ls, "/big") == errno.E2BIG  # reply would exceed 4096
    got: list[str] = []
    offset = 0
    gens = set()
    while True:
        reply = c.call(T.XS_DIRECTORY_PART, b"/big\0%d\0" % offset)
        assert len(reply) <= XENSTORE_PAYLOAD_MAX
        gen, rest = reply.split(b"\0", 1)
        gens.add(gen)
        if rest == b"\0":
            break
        final = rest.endswith(b"\0\0")
        chunk = rest[:-2] if final else rest[:-1]
        got += chunk.decode().split("\0")
        offset += len(chunk) + 1
        if final:
            break
    assert got == names
    assert len(gens) == 1
    c.mkdir("/big/another")
    gen2 = c.call(T.XS_DIRECTORY_PART, z("/big", "0")).split(b"\0", 1)[0]
    assert {gen2} != gens
    assert errno_of(c.call, T.XS_DIRECTORY_PART, b"/big\0") == errno.EINVAL


# Permissions.


def test_permission_strings(xsd: Xenstored) -> None:
    c = Client(xsd)
    c.mkdir("/p")
    c.set_perms("/p", ["b5", "r7", "w8", "n9"])
    assert c.get_perms("/p") == ["b5", "r7", "w8", "n9"]
    c.set_perms("/p", ["r0x10", "n010"])  # strtol base 0, as C xenstored
    assert c.get_perms("/p") == ["r16", "n8"]
    for bad in (["x1"], ["r"], ["r1x"], [""], ["R1"]):
        assert errno_of(c.set_perms, "/p", bad) == errno.EINVAL, bad
    assert errno_of(c.call, T.XS_SET_PERMS, b"/p\0") == errno.EINVAL
    assert errno_of(c.set_perms, "/missing", ["n0"]) == errno.ENOENT


def test_unprivileged_domain_access(xsd: Xenstored) -> None:
    dom0 = Client(xsd)
    d1 = Client(xsd, domid=1)
    dom0.write("/secret/x", b"s")
    assert errno_of(d1.read, "/secret/x") == errno.EACCES
    assert errno_of(d1.write, "/secret/x", b"no") == errno.EACCES
    assert errno_of(d1.read, "/secret/none") == errno.EACCES  # parent unreadable: no leak
    assert errno_of(d1.ls, "/") == errno.EACCES
    dom0.set_perms("/secret", ["n0", "r1"])
    assert d1.ls("/secret") == ["x"]
    assert errno_of(d1.read, "/secret/x") == errno.EACCES  # x still n0
    assert errno_of(d1.read, "/secret/none") == errno.ENOENT  # parent readable now
    assert errno_of(d1.write, "/secret/new", b"v") == errno.EACCES  # read is not write
    dom0.set_perms("/secret", ["r0", "w1"])
    d1.write("/secret/new", b"v")
    assert dom0.get_perms("/secret/new") == ["r1", "w1"]  # inherited, creator owns it
    assert d1.read("/secret/new") == b"v"  # owner has full access
    assert errno_of(d1.rm, "/secret/x") == errno.EACCES
    assert errno_of(d1.set_perms, "/secret", ["n1"]) == errno.EACCES  # not the owner
    assert errno_of(d1.set_perms, "/secret/new", ["n0"]) == errno.EPERM  # owner change
    d1.set_perms("/secret/new", ["n1", "r2"])
    assert dom0.get_perms("/secret/new") == ["n1", "r2"]
    # Privileged-only requests.
    for type_, payload in (
        (T.XS_INTRODUCE, z("5", "1", "2")),
        (T.XS_RELEASE, b"5\0"),
        (T.XS_RESUME, b"5\0"),
        (T.XS_SET_TARGET, z("5", "1")),
        (T.XS_IS_DOMAIN_INTRODUCED, b"5\0"),
        (T.XS_CONTROL, b"check\0"),
    ):
        assert errno_of(d1.call, type_, payload) == errno.EACCES, type_


def test_default_access_from_the_first_entry(xsd: Xenstored) -> None:
    dom0 = Client(xsd)
    d2 = Client(xsd, domid=2)
    dom0.write("/pub", b"p")
    dom0.set_perms("/pub", ["r0"])  # everyone may read
    assert d2.read("/pub") == b"p"
    dom0.set_perms("/pub", ["r0", "n2"])  # except domain 2
    assert errno_of(d2.read, "/pub") == errno.EACCES


def test_node_quota_and_size(xsd: Xenstored) -> None:
    xsd.quotas = Quotas(nodes=5)
    dom0 = Client(xsd)
    dom0.mkdir("/q")
    dom0.set_perms("/q", ["b4"])  # domain 4 owns and may write
    d4 = Client(xsd, domid=4)  # already owns /q: 1 node
    d4.write("/q/a/b/c", b"")  # +3
    assert errno_of(d4.write, "/q/x/y", b"") == errno.ENOSPC  # would be 6
    d4.write("/q/x", b"")  # 5: the limit
    assert errno_of(d4.mkdir, "/q/y") == errno.ENOSPC
    d4.rm("/q/a")
    d4.mkdir("/q/y")
    assert errno_of(d4.write, "/q/y", b"v" * 2048) == errno.ENOSPC
    d4.write("/q/y", b"v" * 1000)
    dom0.write("/q/y", b"v" * 4000)  # dom0 has no quota
    assert errno_of(d4.set_perms, "/q/y", ["n4", "r1", "r2", "r3", "r5", "r6"]) == errno.ENOSPC


def test_watch_and_transaction_quotas(xsd: Xenstored) -> None:
    xsd.quotas = Quotas(watches=2, transactions=2)
    d5 = Client(xsd, domid=5)
    d5.watch("a", "1")
    d5.watch("b", "1")
    d5.watch("c", "1")  # one over, as C (test_xs_quota_edges.py)
    assert errno_of(d5.watch, "d", "1") == errno.E2BIG
    assert errno_of(d5.watch, "a", "1") == errno.EEXIST
    d5.start()
    d5.start()
    d5.start()
    assert errno_of(d5.start) == errno.ENOSPC
    dom0 = Client(xsd)
    for i in range(5):
        dom0.watch(f"/w{i}", "t")
        dom0.start()


# Watches.


def test_watch_fires_on_registration_and_on_changes_below(xsd: Xenstored) -> None:
    c = Client(xsd)
    w = Client(xsd)
    w.watch("/a", "tok")
    assert w.take_events() == [("/a", "tok")]
    c.write("/a/b/c", b"1")
    c.write("/ab", b"1")  # not below /a
    c.mkdir("/a/b")  # exists already: no change, no event
    c.set_perms("/a/b", ["n0", "r3"])
    c.write("/a", b"top")
    w.pump()
    assert w.take_events() == [("/a/b/c", "tok"), ("/a/b", "tok"), ("/a", "tok")]
    w.unwatch("/a", "tok")
    c.write("/a/d", b"")
    w.pump()
    assert w.take_events() == []
    assert errno_of(w.unwatch, "/a", "tok") == errno.ENOENT


def test_rm_events(xsd: Xenstored) -> None:
    c = Client(xsd)
    c.write("/t/a/b", b"")
    c.write("/t/a/c/d", b"")
    w = Client(xsd)
    for path in ("/t", "/t/a", "/t/a/c/d", "/t/a/c/d/e", "/other"):
        w.watch(path, path)
    w.take_events()
    c.rm("/t/a")
    w.pump()
    # Removed nodes below the root fire only watches on exactly them; the root of
    # the RM fires every watch at or above it. Events are reported with the path.
    assert sorted(w.take_events()) == [
        ("/t/a", "/t"),
        ("/t/a", "/t/a"),
        ("/t/a/c/d", "/t/a/c/d"),
    ]


def test_root_watch_and_duplicate_tokens(xsd: Xenstored) -> None:
    c = Client(xsd)
    w = Client(xsd)
    w.watch("/", "root")
    w.watch("/x", "same")
    w.watch("/x/y", "same")
    w.take_events()
    c.write("/x/y", b"1")
    w.pump()
    # Two watches, same token: identical events pending are sent once (as C does).
    assert sorted(w.take_events()) == [("/x/y", "root"), ("/x/y", "same")]


def test_relative_watch_reports_relative_paths(xsd: Xenstored) -> None:
    xsd.introduce_domain(6)
    d6 = Client(xsd, domid=6)
    d6.watch("device", "dev")
    d6.watch("/local/domain/6/device", "abs")
    assert d6.take_events() == [("device", "dev"), ("/local/domain/6/device", "abs")]
    d6.write("device/vbd/state", b"1")
    d6.pump()
    assert sorted(d6.take_events()) == [
        ("/local/domain/6/device/vbd/state", "abs"),
        ("device/vbd/state", "dev"),
    ]
    d6.unwatch("device", "dev")  # unwatch resolves the relative path too
    assert d6.conn.watches and all(w.token == "abs" for w in d6.conn.watches)


def test_watch_events_respect_permissions(xsd: Xenstored) -> None:
    dom0 = Client(xsd)
    d1 = Client(xsd, domid=1)
    dom0.mkdir("/shared")
    dom0.set_perms("/shared", ["n0", "r1"])
    dom0.write("/private", b"")
    d1.watch("/", "all")
    assert d1.take_events() == [("/", "all")]
    dom0.write("/private/x", b"s")  # unreadable node and parent: no event
    dom0.write("/shared/x", b"v")  # inherits n0,r1: event
    d1.pump()
    assert d1.take_events() == [("/shared/x", "all")]
    dom0.set_perms("/shared", ["n0"])  # losing access still reports (old perms)
    d1.pump()
    assert d1.take_events() == [("/shared", "all")]


def test_special_watches_introduce_release(xsd: Xenstored) -> None:
    dom0 = Client(xsd)
    d9 = Client(xsd, domid=9)
    dom0.watch("@introduceDomain", "intro")
    dom0.watch("@releaseDomain", "rel")
    d9.watch("@releaseDomain", "rel9")
    assert dom0.take_events() == [("@introduceDomain", "intro"), ("@releaseDomain", "rel")]
    assert d9.take_events() == [("@releaseDomain", "rel9")]  # the first event always comes
    assert xsd.introduce_domain(7) == "/local/domain/7"
    assert dom0.read("/local/domain/7") == b""
    assert dom0.get_perms("/local/domain/7") == ["n7"]
    d7 = Client(xsd, domid=7)
    d7.write("data/x", b"mine")
    d7.watch("@introduceDomain", "x")
    dom0.pump()
    assert dom0.take_events() == [("@introduceDomain", "intro")]
    xsd.release_domain(7)
    dom0.pump()
    d9.pump()
    assert dom0.take_events() == [("@releaseDomain", "rel")]
    assert d9.take_events() == []  # special events need read access on the special node
    assert d7.conn.closed
    assert errno_of(dom0.read, "/local/domain/7") == errno.ENOENT
    dom0.set_perms("@releaseDomain", ["n0", "r9"])
    xsd.introduce_domain(8)
    xsd.release_domain(8)
    d9.pump()
    assert d9.take_events() == [("@releaseDomain", "rel9")]
    assert errno_of(d9.set_perms, "@releaseDomain", ["r9"]) == errno.EACCES
    assert errno_of(dom0.set_perms, "@other", ["r9"]) == errno.EINVAL


def test_domain_release_removes_owned_nodes_everywhere(xsd: Xenstored) -> None:
    dom0 = Client(xsd)
    xsd.introduce_domain(4)
    dom0.write("/backend/vbd/4/51712/state", b"1")
    dom0.set_perms("/backend/vbd/4", ["n4"])  # owned by the domain elsewhere in the tree
    dom0.write("/local/domain/4/keep-owner-0", b"")
    before = xsd.statistics().nodes
    xsd.release_domain(4)
    assert not dom0.ls("/backend/vbd")
    assert errno_of(dom0.read, "/local/domain/4") == errno.ENOENT
    assert xsd.statistics().nodes == before - 5
    assert errno_of(xsd.release_domain, 4) == errno.ENOENT
    assert errno_of(xsd.introduce_domain, 0) == errno.EINVAL


def test_wire_introduce_release_and_target(xsd: Xenstored) -> None:
    dom0 = Client(xsd)
    dom0.watch("@introduceDomain", "i")
    dom0.take_events()
    dom0.call(T.XS_INTRODUCE, z("11", "100", "5"))
    assert dom0.take_events() == [("@introduceDomain", "i")]
    dom0.call(T.XS_INTRODUCE, z("11", "100", "6"))  # again: no event
    assert dom0.take_events() == []
    assert errno_of(dom0.call, T.XS_INTRODUCE, z("12", "100", "0")) == errno.EINVAL
    assert errno_of(dom0.call, T.XS_INTRODUCE, z("12", "100")) == errno.EINVAL
    assert errno_of(dom0.call, T.XS_RELEASE, b"0\0") == errno.EINVAL
    assert errno_of(dom0.call, T.XS_SET_TARGET, z("12", "11")) == errno.ENOENT
    # A device model (domain 12) targeting domain 11 gets 11's rights.
    dom0.call(T.XS_INTRODUCE, z("12", "100", "7"))
    dom0.call(T.XS_SET_TARGET, z("12", "11"))
    dom0.write("/dm/x", b"")
    dom0.set_perms("/dm/x", ["n11"])
    dm = Client(xsd, domid=12)
    dm.write("/dm/x", b"ok")
    assert dm.read("/dm/x") == b"ok"
    dom0.call(T.XS_RELEASE, b"11\0")
    assert errno_of(dom0.read, "/dm/x") == errno.ENOENT  # owned by 11: removed


def test_reset_watches(xsd: Xenstored) -> None:
    c = Client(xsd)
    c.watch("/a", "1")
    tx = c.start()
    assert xsd.statistics().watches == 1 and xsd.statistics().transactions == 1
    c.call(T.XS_RESET_WATCHES, b"\0")
    assert xsd.statistics().watches == 0 and xsd.statistics().transactions == 0
    assert errno_of(c.read, "/tool", tx) == errno.ENOENT


# Transactions.


def test_transaction_isolation_and_commit(xsd: Xenstored) -> None:
    a = Client(xsd)
    b = Client(xsd)
    w = Client(xsd)
    w.watch("/t", "w")
    w.take_events()
    tx = a.start()
    a.write("/t/x", b"1", tx)
    a.mkdir("/t/y", tx)
    assert a.read("/t/x", tx) == b"1"
    assert a.ls("/t", tx) == ["x", "y"]
    assert errno_of(b.read, "/t/x") == errno.ENOENT  # invisible outside
    w.pump()
    assert w.take_events() == []  # no events before commit
    a.end(tx)
    assert b.read("/t/x") == b"1" and b.ls("/t") == ["x", "y"]
    w.pump()
    assert sorted(w.take_events()) == [("/t/x", "w"), ("/t/y", "w")]
    assert errno_of(a.read, "/t/x", tx) == errno.ENOENT  # id no longer valid


def test_transaction_abort_discards(xsd: Xenstored) -> None:
    a = Client(xsd)
    a.write("/k", b"old")
    tx = a.start()
    a.write("/k", b"new", tx)
    a.rm("/k", tx)
    a.end(tx, commit=False)
    assert a.read("/k") == b"old"
    assert xsd.statistics().transactions == 0


def test_conflicts_give_eagain(xsd: Xenstored) -> None:
    a = Client(xsd)
    b = Client(xsd)
    a.write("/c/x", b"0")
    a.write("/c/y", b"0")
    # Read then someone else writes it: conflict.
    tx = a.start()
    a.read("/c/x", tx)
    b.write("/c/x", b"1")
    a.write("/c/y", b"1", tx)
    assert errno_of(a.end, tx) == errno.EAGAIN
    assert a.read("/c/y") == b"0"  # nothing applied
    assert errno_of(a.end, tx) == errno.ENOENT  # the id is gone after EAGAIN
    # Changed after start, before first access: the transaction reads the node
    # as it is at its first access, no conflict (xenstored_transaction.c).
    tx = a.start()
    b.write("/c/x", b"2")
    assert a.read("/c/x", tx) == b"2"
    a.end(tx)
    # Deleted and created concurrently.
    tx = a.start()
    assert errno_of(a.read, "/c/new", tx) == errno.ENOENT
    b.write("/c/new", b"")
    assert errno_of(a.end, tx) == errno.EAGAIN
    tx = a.start()
    a.read("/c/new", tx)
    b.rm("/c/new")
    assert errno_of(a.end, tx) == errno.EAGAIN
    # Unrelated changes do not conflict.
    tx = a.start()
    a.write("/c/x", b"3", tx)
    b.write("/c/other", b"")
    b.write("/elsewhere", b"")
    a.end(tx)
    assert a.read("/c/x") == b"3"
    # Two transactions writing the same node: the second loses.
    t1, t2 = a.start(), b.start()
    a.write("/c/y", b"a", t1)
    b.write("/c/y", b"b", t2)
    a.end(t1)
    assert errno_of(b.end, t2) == errno.EAGAIN
    assert a.read("/c/y") == b"a"


def test_transaction_errors(xsd: Xenstored) -> None:
    a = Client(xsd)
    tx = a.start()
    assert errno_of(a.read, "/tool", tx + 100) == errno.ENOENT
    assert errno_of(a.call, T.XS_TRANSACTION_START, b"\0", tx) == errno.EBUSY
    assert errno_of(a.call, T.XS_TRANSACTION_END, b"X\0", tx) == errno.EINVAL
    assert errno_of(a.call, T.XS_TRANSACTION_END, b"T\0") == errno.ENOENT
    a.watch("/wx", "t")  # tx ids of WATCH are ignored: works with any tx_id
    assert a.call(T.XS_WATCH, b"/wy\0t\0", 999) == b"OK\0"
    b = Client(xsd)
    assert errno_of(b.read, "/tool", tx) == errno.ENOENT  # ids are per connection
    assert b.start() == 1 and a.start() == tx + 1


def test_disconnect_mid_transaction(xsd: Xenstored) -> None:
    a = Client(xsd)
    other = Client(xsd)
    a.watch("/d", "t")
    tx = a.start()
    a.write("/d/x", b"1", tx)
    a.conn.close()
    assert xsd.statistics() == dataclasses.replace(BASE, connections=1)
    assert errno_of(other.read, "/d/x") == errno.ENOENT
    other.write("/d/x", b"2")
    assert other.read("/d/x") == b"2"
    a.conn.feed(raw(T.XS_READ, b"/d/x\0"))  # a closed connection ignores input
    assert a.conn.data_to_send() == b""


# Bad input.


def test_oversize_payload_closes_only_that_connection(xsd: Xenstored) -> None:
    bad = Client(xsd)
    good = Client(xsd)
    closed: list[object] = []
    bad.conn.set_callbacks(on_close=closed.append)
    tx = bad.start()
    bad.watch("/z", "t")
    bad.conn.feed(raw(T.XS_READ, b"/tool\0", 1) + HDR.pack(T.XS_WRITE, 2, 0, 4097) + b"x" * 100)
    assert closed == [bad.conn] and bad.conn.closed
    # The request before the bad header was still answered.
    assert bad.reader.feed(bad.conn.data_to_send())[0].payload == b""
    assert xsd.statistics().transactions == 0 and xsd.statistics().watches == 0
    assert tx == 1
    good.write("/fine", b"yes")
    assert good.read("/fine") == b"yes"


@pytest.mark.parametrize(
    ("type_", "payload", "err"),
    [
        (T.XS_READ, b"/tool", errno.EINVAL),  # no NUL
        (T.XS_READ, b"", errno.EINVAL),
        (T.XS_READ, b"/tool\0\0", errno.EINVAL),  # two strings
        (T.XS_WRITE, b"/novalue", errno.EINVAL),
        (T.XS_WATCH, b"/a\0", errno.EINVAL),
        (T.XS_WATCH, b"/a\0t\0extra\0", errno.EINVAL),
        (T.XS_WATCH, b"/a b\0t\0", errno.EINVAL),
        (T.XS_UNWATCH, b"/a", errno.EINVAL),
        (T.XS_SET_PERMS, b"/tool", errno.EINVAL),
        (T.XS_CONTROL, b"", errno.EINVAL),
        (T.XS_CONTROL, b"log\0maybe\0", errno.EINVAL),
        (T.XS_DIRECTORY_PART, z("/tool", "0", "1"), errno.EINVAL),
        (T.XS_TRANSACTION_END, b"T", errno.EINVAL),
        (99, b"/a\0", errno.ENOSYS),
    ],
)
def test_malformed_payloads_get_errors(
    xsd: Xenstored, type_: int, payload: bytes, err: int
) -> None:
    c = Client(xsd)
    assert errno_of(c.call, type_, payload) == err
    assert c.read("/tool") == b""  # the connection goes on


def test_control_commands(xsd: Xenstored) -> None:
    c = Client(xsd)
    assert c.call(T.XS_CONTROL, b"check\0") == b"OK\0"
    assert c.call(T.XS_CONTROL, b"log\0on\0") == b"OK\0"
    assert c.call(T.XS_CONTROL, b"print\0hello\0") == b"OK\0"
    assert b"quota\t" in c.call(T.XS_CONTROL, b"help\0")
    text = c.call(T.XS_CONTROL, b"quota\0").decode()
    assert text.startswith("Quota settings:\n") and "nodes            :     1000" in text
    assert c.call(T.XS_CONTROL, z("quota", "set", "nodes", "7")) == b"OK\0"
    assert xsd.quotas.nodes == 7
    assert errno_of(c.call, T.XS_CONTROL, z("quota", "set", "bogus", "1")) == errno.EINVAL
    xsd.introduce_domain(3)
    assert c.call(T.XS_CONTROL, z("quota", "3")).startswith(b"Domain 3:\nnodes")
    assert errno_of(c.call, T.XS_CONTROL, z("quota", "44")) == errno.ENOENT


def test_toolstack_api(xsd: Xenstored) -> None:
    xsd.write("/vm/name", b"guest")
    assert xsd.read("/vm/name") == b"guest"
    assert xsd.exists("/vm") and not xsd.exists("/nope")
    xsd.mkdir("/vm/dev")
    assert xsd.directory("/vm") == ["name", "dev"]
    xsd.set_perms("/vm", ["n0", "r3"])
    assert xsd.get_perms("/vm") == ["n0", "r3"]
    xsd.rm("/vm")
    with pytest.raises(XsError) as ei:
        xsd.read("/vm")
    assert ei.value.errno == errno.ENOENT


def test_core_is_safe_across_threads(xsd: Xenstored) -> None:
    w = Client(xsd)
    w.watch("/th", "t")
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            c = Client(xsd)
            for i in range(200):
                c.write(f"/th/{n}/{i}", b"%d" % i)
                if i % 20 == 0:
                    xsd.write(f"/th/direct{n}", b"")
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    w.pump()
    assert len(w.take_events()) >= 1 + 4 * 200
    assert all(len(xsd.directory(f"/th/{n}")) == 200 for n in range(4))
