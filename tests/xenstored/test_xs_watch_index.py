"""Watch firing at scale: a change looks only at the watches it can fire, in C's order.

C xenstored's ``fire_watches`` (tools/xenstore/xenstored_watch.c, RELEASE-4.17)
walks every connection, in the order they were made (``new_connection``:
``list_add_tail`` on ``connections``), asks ``watch_permitted`` (or
``check_perms_special`` for "@" names) and then sends an event for each of
that connection's watches the change matches (``is_child``, or ``streq`` when
exact), in the order they were registered (``add_watch``: ``list_add_tail`` on
``conn->watches``). gntdma gives the same events in the same order, but finds
the watches through an index by path, so a change costs the watches on its
path and its ancestors, not one visit per connection.
"""

from __future__ import annotations

import pytest
from xs_helpers import Client

from gntdma.xenstored import Connection, Xenstored
from gntdma.xenstored._tree import is_child


@pytest.fixture
def xsd() -> Xenstored:
    return Xenstored(domain_exists=lambda domid: True)


def _connections_looked_at(monkeypatch: pytest.MonkeyPatch, xsd: Xenstored, n: int) -> int:
    """Connections whose permission to see one write was checked, with ``n``
    connections each watching a path of its own."""
    clients = [Client(xsd) for _ in range(n)]
    for i, c in enumerate(clients):
        c.watch(f"/w/{i}", f"t{i}")
        c.pump()
        assert c.take_events() == [(f"/w/{i}", f"t{i}")]
    looked: list[Connection] = []
    may_see = Xenstored._may_see

    def spy(self: Xenstored, conn: Connection, change: object) -> bool:
        looked.append(conn)
        return may_see(self, conn, change)  # type: ignore[arg-type]

    monkeypatch.setattr(Xenstored, "_may_see", spy)
    writer = Client(xsd)
    writer.write("/w/3/x", b"v")
    monkeypatch.undo()
    for c in clients:
        c.pump()
    assert [c.take_events() for c in clients[2:5]] == [[], [("/w/3/x", "t3")], []]
    for c in clients:
        c.conn.close()
    writer.conn.close()
    return len(looked)


def test_watch_firing_looks_only_at_connections_with_a_matching_watch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A write fires one watch among n: one connection looked at, whatever n."""
    counts = [_connections_looked_at(monkeypatch, Xenstored(domain_exists=lambda d: True), n)
              for n in (20, 200)]
    assert counts == [1, 1]


def test_watch_paths_are_the_paths_is_child_accepts() -> None:
    from gntdma.xenstored._watch import watch_paths

    for path in ("/", "/a", "/a/b", "/local/domain/7/device/vbd/51712/state", "@releaseDomain"):
        found = watch_paths(path)
        for w in ("/", "/a", "/a/b", "/a/bc", "/local", "/local/domain/7",
                  "/local/domain/70", "/local/domain/7/device/vbd/51712/state",
                  "/local/domain/7/device/vbd/51712/state/x", "@releaseDomain", "/b"):
            assert (w in found) == is_child(path, w), (path, w)


def test_watch_events_fire_in_c_xenstored_order(xsd: Xenstored) -> None:
    """Connections in the order they were made, each one's watches in the order they
    were registered (an unwatched and rewatched watch goes last), whatever the
    order of the paths in the tree."""
    a, b = Client(xsd), Client(xsd)
    woke: list[str] = []
    a.conn.set_callbacks(on_output=lambda: woke.append("a"))
    b.conn.set_callbacks(on_output=lambda: woke.append("b"))
    b.watch("/p/q", "b1")  # b registers first, but a's connection is older
    a.watch("/p/q", "a1")
    a.watch("/", "a2")
    a.watch("/p", "a3")
    a.watch("/p/q/r", "a4")
    a.watch("/p/qr", "no")
    a.unwatch("/p/q", "a1")
    a.watch("/p/q", "a1")  # goes to the end of a's list
    b.watch("/p", "b2")
    a.take_events(), b.take_events()
    woke.clear()
    writer = Client(xsd)
    writer.write("/p/q/r", b"x")
    a.pump(), b.pump()
    assert a.take_events() == [("/p/q/r", t) for t in ("a2", "a3", "a4", "a1")]
    assert b.take_events() == [("/p/q/r", "b1"), ("/p/q/r", "b2")]
    assert woke == ["a"] * 4 + ["b"] * 2
    # An RM: the nodes below its root first, exact (only watches on them), then the root.
    woke.clear()
    writer.rm("/p/q")
    a.pump(), b.pump()
    assert a.take_events() == [("/p/q/r", "a4"), ("/p/q", "a2"), ("/p/q", "a3"), ("/p/q", "a1")]
    assert b.take_events() == [("/p/q", "b1"), ("/p/q", "b2")]
    assert woke == ["a"] * 4 + ["b"] * 2


def test_watches_of_a_closed_connection_leave_the_index(xsd: Xenstored) -> None:
    a, b = Client(xsd), Client(xsd)
    a.watch("/x", "t")
    b.watch("/x", "t")
    assert xsd.statistics().watches == 2
    a.conn.close()
    assert xsd.statistics().watches == 1
    b.take_events()
    Client(xsd).write("/x", b"1")
    b.pump()
    assert b.take_events() == [("/x", "t")]
    b.unwatch("/x", "t")
    assert xsd.statistics().watches == 0
    assert xsd._watch_index.matching("/x", False) == []
