"""Transactions as C xenstored 4.17 does them, each rule a test.

Source: Xen RELEASE-4.17.x ``tools/xenstore/xenstored_transaction.c``: the
header comment ("Transaction conflicts are detected by checking the generation
count of all nodes read in the transaction"), ``access_node`` (a node is
copied into the transaction when the transaction first accesses it; a first
access that is a read sets ``check_gen``), ``finalize_transaction`` (only
``check_gen`` nodes are compared with the global generation; the modified
ones are then written) and ``do_transaction_start`` (no copy of the data base,
just ``trans->generation = ++generation``). ``xenstored_core.c``
``construct_node``/``create_node``: creating a node reads its parent and
writes it with the new child.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from typing import Any

import pytest
from xs_helpers import Client, errno_of

from gntdma.xenstored import Xenstored


@pytest.fixture
def xsd() -> Xenstored:
    return Xenstored()


def test_transaction_reads_a_node_as_it_is_at_its_first_access(xsd: Xenstored) -> None:
    a, b = Client(xsd), Client(xsd)
    a.write("/n", b"old")
    tx = a.start()
    b.write("/n", b"new")  # after the start, before the transaction touched it
    assert a.read("/n", tx) == b"new"
    a.end(tx)  # nothing it read changed after it read it: no conflict


def test_transaction_keeps_its_copy_once_it_touched_a_node(xsd: Xenstored) -> None:
    a, b = Client(xsd), Client(xsd)
    a.write("/n", b"a")
    tx = a.start()
    assert a.read("/n", tx) == b"a"
    b.write("/n", b"b")
    assert a.read("/n", tx) == b"a"  # its own copy, as test-xenstore's "ta err"
    a.write("/n", b"c", tx)
    assert a.read("/n", tx) == b"c"
    assert errno_of(a.end, tx) == errno.EAGAIN
    assert a.read("/n") == b"b"


def test_commit_fails_when_a_node_first_read_changed(xsd: Xenstored) -> None:
    a, b = Client(xsd), Client(xsd)
    a.write("/x", b"0")
    tx = a.start()
    a.read("/x", tx)
    b.write("/x", b"1")
    a.write("/y", b"1", tx)
    assert errno_of(a.end, tx) == errno.EAGAIN
    assert errno_of(a.read, "/y") == errno.ENOENT


def test_commit_ignores_changes_to_nodes_the_transaction_never_touched(xsd: Xenstored) -> None:
    a, b = Client(xsd), Client(xsd)
    a.write("/d/x", b"0")
    tx = a.start()
    a.write("/d/x", b"1", tx)
    b.write("/d/y", b"1")  # a sibling: /d changes, but the transaction never read /d
    b.write("/elsewhere", b"")
    a.end(tx)
    assert a.read("/d/x") == b"1" and a.ls("/d") == ["x", "y"]


def test_concurrent_sibling_creations_in_transactions_conflict(xsd: Xenstored) -> None:
    a, b = Client(xsd), Client(xsd)
    a.mkdir("/s")
    t1, t2 = a.start(), b.start()
    a.write("/s/one", b"", t1)  # reads /s, then writes it with the new child
    b.write("/s/two", b"", t2)
    a.end(t1)
    assert errno_of(b.end, t2) == errno.EAGAIN
    assert a.ls("/s") == ["one"]
    t2 = b.start()  # the retry succeeds
    b.write("/s/two", b"", t2)
    b.end(t2)
    assert a.ls("/s") == ["one", "two"]


def test_a_node_created_outside_after_the_transaction_saw_it_missing_conflicts(
    xsd: Xenstored,
) -> None:
    a, b = Client(xsd), Client(xsd)
    tx = a.start()
    assert errno_of(a.read, "/late", tx) == errno.ENOENT  # NO_GENERATION is recorded
    b.write("/late", b"")
    assert errno_of(a.end, tx) == errno.EAGAIN


class _CountingDict(dict[str, Any]):
    """The live tree, counting every node looked up or listed in it."""

    visits = 0

    def __getitem__(self, key: str) -> Any:
        self.visits += 1
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.visits += 1
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        self.visits += 1
        return super().__contains__(key)

    def __iter__(self) -> Iterator[str]:
        for key in super().__iter__():
            self.visits += 1
            yield key

    def keys(self) -> Any:
        return list(iter(self))

    def items(self) -> Any:
        return [(k, super(_CountingDict, self).__getitem__(k)) for k in iter(self)]

    def values(self) -> Any:
        return [v for _, v in self.items()]

    def copy(self) -> dict[str, Any]:
        return dict(self.items())


def _nodes_visited_by_one_transaction(tree_size: int) -> tuple[int, int]:
    """(live nodes visited, nodes the transaction copied) to create one sibling."""
    xsd = Xenstored()
    for i in range(tree_size):
        xsd.write(f"/big/n{i}", b"")
    xsd.mkdir("/small")
    live = _CountingDict(xsd.store.nodes)
    xsd.store.nodes = live
    c = Client(xsd)
    tx = c.start()
    c.write("/small/x", b"1", tx)
    copied = len(xsd.connections()[0].transactions[tx].accessed)
    c.end(tx)
    assert xsd.read("/small/x") == b"1"
    return live.visits, copied


def test_transaction_cost_does_not_scale_with_tree_size() -> None:
    small = _nodes_visited_by_one_transaction(10)
    large = _nodes_visited_by_one_transaction(3000)
    assert small == large
    visits, copied = large
    assert copied <= 3 and visits < 20  # /small/x, /small: what it touched
