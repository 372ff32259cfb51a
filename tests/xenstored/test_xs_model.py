"""The store against a plain-dict model: tree, permissions, transactions.

The model is written from the protocol rules, not from the implementation:
a tree is a dict from path to a frozen entry (value, permission strings,
children); every change replaces the entry. A transaction works as C
xenstored 4.17's (``tools/xenstore/xenstored_transaction.c``, the header
comment, ``access_node`` and ``finalize_transaction``): it copies nothing at its
start; the first time one of its operations touches a path (the node itself,
an ancestor consulted for an error or for creation, the subtree of an RM) it
takes the live entry of that moment as its own copy, and later operations in
the transaction see that copy (an absent one included: a path first found
missing stays missing for the transaction, even if a child of it is later read
from the live tree; RM of that child is then EINVAL, as ``rm_node``'s). Its
commit fails with EAGAIN when a path whose first access was a read holds a
different entry in the live tree than the one copied; otherwise its changed
copies go live.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from xs_helpers import Client

from gntdma.xenstored import Xenstored, XsError

DOMIDS = (0, 1, 2)
SEGMENTS = ("a", "b", "c")
paths = st.lists(st.sampled_from(SEGMENTS), min_size=0, max_size=3).map(
    lambda segs: "/t" + "".join("/" + s for s in segs)
)
values = st.binary(max_size=6)
perm_lists = st.lists(
    st.tuples(st.sampled_from("nrwb"), st.sampled_from(DOMIDS)).map(lambda t: f"{t[0]}{t[1]}"),
    min_size=1,
    max_size=3,
)


@dataclass(frozen=True)
class E:
    value: bytes
    perms: tuple[str, ...]
    children: tuple[str, ...] = ()


Tree = dict[str, E]


class ModelError(Exception):
    def __init__(self, err: int) -> None:
        self.errno = err


def parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def base(path: str) -> str:
    return path.rsplit("/", 1)[1]


def access(domid: int, perms: tuple[str, ...]) -> set[str]:
    """Rights of ``domid``: a subset of {"r", "w", "o"}."""
    entries = [(p[0], int(p[1:])) for p in perms]
    if domid == 0 or entries[0][1] == domid:
        return {"r", "w", "o"}
    letter = entries[0][0]
    for lt, d in entries[1:]:
        if d == domid:
            letter = lt
            break
    return {x for x in "rw" if letter in (x, "b")}


class TxnView(MutableMapping[str, E]):
    """A transaction's tree: its copies, each taken from the live tree on first access.

    ``first_read`` maps each path whose first access was a read to the live
    entry it saw then (None: absent); ``copies`` holds the transaction's
    version of every path it touched (None: absent or removed).
    """

    def __init__(self, live: Tree) -> None:
        self.live = live
        self.copies: dict[str, E | None] = {}
        self.first_read: dict[str, E | None] = {}

    def _copy(self, path: str) -> E | None:
        if path not in self.copies:
            e = self.live.get(path)
            self.copies[path] = e
            self.first_read[path] = e
        return self.copies[path]

    def __getitem__(self, path: str) -> E:
        e = self._copy(path)
        if e is None:
            raise KeyError(path)
        return e

    def __setitem__(self, path: str, e: E) -> None:
        self.copies[path] = e

    def __delitem__(self, path: str) -> None:
        if self._copy(path) is None:
            raise KeyError(path)
        self.copies[path] = None

    def __iter__(self) -> Iterator[str]:
        raise NotImplementedError("a transaction never lists the whole tree")

    def __len__(self) -> int:
        raise NotImplementedError("a transaction never counts the whole tree")


@dataclass
class Ops:
    """The operations on one tree, by one domain, noting what they depend on."""

    tree: MutableMapping[str, E]
    domid: int
    touched: set[str] = field(default_factory=set)
    modified: set[str] = field(default_factory=set)

    def _get(self, path: str) -> E | None:
        self.touched.add(path)
        return self.tree.get(path)

    def _set(self, path: str, e: E | None) -> None:
        self.touched.add(path)
        self.modified.add(path)
        if e is None:
            del self.tree[path]
        else:
            self.tree[path] = e

    def lookup(self, path: str, want: set[str]) -> E:
        e = self._get(path)
        if e is not None and want <= access(self.domid, e.perms):
            return e
        err = errno.EACCES if e is not None else errno.ENOENT
        anc = path
        while True:
            anc = parent(anc)
            a = self._get(anc)
            if a is not None:
                break
        if want & access(self.domid, a.perms):
            raise ModelError(err)
        raise ModelError(errno.EACCES)

    def _lookup_or_none(self, path: str, want: set[str]) -> E | None:
        try:
            return self.lookup(path, want)
        except ModelError as e:
            if e.errno != errno.ENOENT:
                raise
            return None

    def _create(self, path: str, value: bytes) -> None:
        missing = []
        p = path
        while self._get(p) is None:
            missing.append(p)
            p = parent(p)
        top = self.tree[p]
        perms = top.perms
        if self.domid != 0:
            perms = (f"{perms[0][0]}{self.domid}", *perms[1:])
        self._set(p, replace(top, children=(*top.children, base(missing[-1]))))
        for i, m in enumerate(reversed(missing)):
            below = (base(missing[-i - 2]),) if i + 1 < len(missing) else ()
            self._set(m, E(value if m == path else b"", perms, below))

    def read(self, path: str) -> bytes:
        return self.lookup(path, {"r"}).value

    def ls(self, path: str) -> list[str]:
        return list(self.lookup(path, {"r"}).children)

    def get_perms(self, path: str) -> list[str]:
        return list(self.lookup(path, {"r"}).perms)

    def write(self, path: str, value: bytes) -> None:
        e = self._lookup_or_none(path, {"w"})
        if e is None:
            self._create(path, value)
        else:
            self._set(path, replace(e, value=value))

    def mkdir(self, path: str) -> None:
        if self._lookup_or_none(path, {"w"}) is None:
            self._create(path, b"")

    def rm(self, path: str) -> None:
        try:
            self.lookup(path, {"w"})
        except ModelError as err:
            if err.errno == errno.ENOENT and self._get(parent(path)) is not None:
                return
            raise
        # rm_node reads the parent before walking the subtree: a transaction that
        # recorded it absent (a failed read leaves no copy) gets EINVAL, nothing removed.
        par = self._get(parent(path))
        if par is None:
            raise ModelError(errno.EINVAL)
        self._walk_rm(path, self.tree[path])
        if base(path) not in par.children:
            # delete_child: a transaction's older copy of the parent does not list
            # the node it read from the live tree: EIO, the subtree stays removed.
            raise ModelError(errno.EIO)
        kept = tuple(c for c in par.children if c != base(path))
        self._set(parent(path), replace(par, children=kept))

    def _walk_rm(self, path: str, e: E) -> None:
        """Remove ``path``'s subtree depth first, children in order, each node after
        its children. A listed child not found (only in a transaction: its copy of
        the node is older than the live child's removal, or it recorded the child
        absent) stops the walk with EIO, each node of the walk keeping the children
        not yet removed."""
        for i, c in enumerate(e.children):
            child = self._get(f"{path}/{c}")
            try:
                if child is None:
                    raise ModelError(errno.EIO)
                self._walk_rm(f"{path}/{c}", child)
            except ModelError:
                if i > 0:
                    self._set(path, replace(e, children=e.children[i:]))
                raise
        self._set(path, None)

    def set_perms(self, path: str, perms: list[str]) -> None:
        e = self.lookup(path, {"w", "o"})
        if self.domid != 0 and int(perms[0][1:]) != int(e.perms[0][1:]):
            raise ModelError(errno.EPERM)
        self._set(path, replace(e, perms=tuple(perms)))


@dataclass
class ModelTxn:
    wire_id: int
    view: TxnView
    touched: set[str] = field(default_factory=set)
    modified: set[str] = field(default_factory=set)


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.xsd = Xenstored(domain_exists=lambda domid: True)  # domains 1 and 2 exist
        self.clients = {d: Client(self.xsd, d) for d in DOMIDS}
        self.clients[0].mkdir("/t")
        root = E(b"", ("n0",), ("tool", "t"))
        self.live: Tree = {
            "/": root,
            "/tool": E(b"", ("n0",), ("xenstored",)),
            "/tool/xenstored": E(b"", ("n0",)),
            "/t": E(b"", ("n0",)),
        }
        self.txns: dict[int, list[ModelTxn]] = {d: [] for d in DOMIDS}

    def _run(self, domid: int, txi: int | None, name: str, *args: object) -> object:
        """Run one operation in the model and on the daemon; compare the outcomes."""
        txn = self.txns[domid][txi] if txi is not None else None
        ops = Ops(txn.view if txn is not None else self.live, domid)
        try:
            expected: object = getattr(ops, name)(*args)
        except ModelError as e:
            expected = ("error", e.errno)
        if txn is not None:
            txn.touched |= ops.touched
            txn.modified |= ops.modified
        client = self.clients[domid]
        try:
            got: object = getattr(client, name)(*args, tx=txn.wire_id if txn else 0)
        except XsError as e:
            got = ("error", e.errno)
        assert got == expected, (domid, txi, name, args)
        return got

    def _txi(self, data: st.DataObject, domid: int) -> int | None:
        n = len(self.txns[domid])
        txi: int | None = data.draw(st.sampled_from([None, *range(n)]), label="txn")
        return txi

    @rule(domid=st.sampled_from(DOMIDS), path=paths, value=values, data=st.data())
    def write(self, domid: int, path: str, value: bytes, data: st.DataObject) -> None:
        self._run(domid, self._txi(data, domid), "write", path, value)

    @rule(domid=st.sampled_from(DOMIDS), path=paths, data=st.data())
    def mkdir(self, domid: int, path: str, data: st.DataObject) -> None:
        self._run(domid, self._txi(data, domid), "mkdir", path)

    @rule(domid=st.sampled_from(DOMIDS), path=paths, data=st.data())
    def rm(self, domid: int, path: str, data: st.DataObject) -> None:
        if path != "/t":  # keep the playground
            self._run(domid, self._txi(data, domid), "rm", path)

    @rule(
        domid=st.sampled_from(DOMIDS),
        path=paths,
        data=st.data(),
        op=st.sampled_from(["read", "ls", "get_perms"]),
    )
    def look(self, domid: int, path: str, data: st.DataObject, op: str) -> None:
        self._run(domid, self._txi(data, domid), op, path)

    @rule(domid=st.sampled_from(DOMIDS), path=paths, perms=perm_lists, data=st.data())
    def set_perms(self, domid: int, path: str, perms: list[str], data: st.DataObject) -> None:
        self._run(domid, self._txi(data, domid), "set_perms", path, perms)

    @precondition(lambda self: sum(map(len, self.txns.values())) < 4)
    @rule(domid=st.sampled_from(DOMIDS))
    def start(self, domid: int) -> None:
        wire_id = self.clients[domid].start()
        self.txns[domid].append(ModelTxn(wire_id, TxnView(self.live)))

    @precondition(lambda self: any(self.txns.values()))
    @rule(data=st.data(), commit=st.booleans())
    def end(self, data: st.DataObject, commit: bool) -> None:
        domid = data.draw(st.sampled_from([d for d in DOMIDS if self.txns[d]]))
        txn = self.txns[domid].pop(data.draw(st.integers(0, len(self.txns[domid]) - 1)))
        expected: object = None
        if commit:
            first_read = txn.view.first_read
            if any(self.live.get(p) is not e for p, e in first_read.items()):
                expected = ("error", errno.EAGAIN)
            else:
                for p in txn.modified:
                    e = txn.view.copies[p]
                    if e is not None:
                        self.live[p] = replace(e)  # a new object, as a commit makes
                    else:
                        self.live.pop(p, None)
        got: object = None
        try:
            self.clients[domid].end(txn.wire_id, commit)
        except XsError as e:
            got = ("error", e.errno)
        assert got == expected

    @invariant()
    def same_tree(self) -> None:
        nodes = self.xsd.store.nodes
        assert set(nodes) == set(self.live)
        for path, e in self.live.items():
            n = nodes[path]
            assert (n.value, tuple(str(p) for p in n.perms), n.children) == (
                e.value,
                e.perms,
                e.children,
            ), path

    @invariant()
    def same_counts(self) -> None:
        stats = self.xsd.statistics()
        assert stats.transactions == sum(map(len, self.txns.values()))
        assert stats.nodes == len(self.live)
        assert sum(self.xsd.store.owner_counts.values()) == len(self.live)

    def teardown(self) -> None:
        for c in self.clients.values():
            c.conn.close()
        assert self.xsd.statistics().transactions == 0
        assert self.xsd.statistics().connections == 0


StoreMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
test_store_against_model = StoreMachine.TestCase


def test_rm_in_transaction_whose_view_lacks_the_parent_is_einval() -> None:
    """A transaction that found ``/t/a`` absent keeps seeing it absent, even after
    ``/t/a/b`` (which it reads afresh from the live tree) is created outside; its
    RM of ``/t/a/b`` is EINVAL and removes nothing, and its commit is EAGAIN.

    C xenstored 4.17.7: ``read_node`` in ``xenstored_core.c`` reads through
    ``transaction_prepend`` (``xenstored_transaction.c``), which takes a node the
    transaction has accessed from its own copy (``find_accessed_node``); a
    failed read records the node as accessed with ``NO_GENERATION`` and no copy
    (``access_node``), so later reads of it in the transaction are ENOENT. A node
    not yet accessed comes from the live tree. ``do_rm`` passes ``get_node`` and
    calls ``rm_node``, which reads the parent first and returns EINVAL when it is
    missing, before the tree walk deletes anything.
    """
    m = StoreMachine()
    m.start(domid=2)
    # The transaction's mkdir /t is refused (n0) and leaves it a copy of /t.
    assert m._run(2, 0, "mkdir", "/t") == ("error", errno.EACCES)
    m._run(0, None, "set_perms", "/t", ["n2"])
    # Its copy of /t still says n0: refused, /t/a recorded as absent.
    assert m._run(2, 0, "mkdir", "/t/a") == ("error", errno.EACCES)
    m._run(0, None, "mkdir", "/t/a/b")
    assert m._run(2, 0, "rm", "/t/a/b") == ("error", errno.EINVAL)
    m.same_tree()
    m.same_counts()
    assert m._run(2, 0, "read", "/t/a/b") == b""  # still there in the transaction
    txn = m.txns[2].pop()
    with pytest.raises(XsError) as err:
        m.clients[2].end(txn.wire_id, True)
    assert err.value.errno == errno.EAGAIN  # /t/a was read absent and now exists
    m.same_tree()
    m.same_counts()
    m.teardown()


def test_rm_in_transaction_whose_parent_copy_lacks_the_child_is_eio() -> None:
    """A transaction lists ``/t/a`` (its copy has no children), ``/t/a/b`` is
    created outside, then the transaction removes ``/t/a/b``: read from the live
    tree, it is removed from the transaction's view, but the parent's copy does
    not list it, so the RM is EIO (the removal stays); the commit is EAGAIN.

    C xenstored 4.17.7, ``xenstored_core.c``: ``do_rm`` -> ``rm_node`` walks the
    subtree (``walk_node_tree`` with ``delnode_sub``, deleting through
    ``access_node``) and then calls ``delete_child`` on the parent it read, which
    finds no entry for the child: ``corrupt()`` (a check of the live store) and
    EIO. ``read_node`` takes ``/t/a`` from the transaction's copy
    (``transaction_prepend``/``find_accessed_node`` in
    ``xenstored_transaction.c``) and ``/t/a/b``, not yet accessed, from the live
    tree.
    """
    m = StoreMachine()
    m._run(0, None, "mkdir", "/t/a")
    m.start(domid=0)
    assert m._run(0, 0, "ls", "/t/a") == []
    m._run(0, None, "mkdir", "/t/a/b")
    assert m._run(0, 0, "rm", "/t/a/b") == ("error", errno.EIO)
    assert m._run(0, 0, "read", "/t/a/b") == ("error", errno.ENOENT)
    assert m._run(0, 0, "ls", "/t/a") == []
    m.same_tree()
    m.same_counts()
    txn = m.txns[0].pop()
    with pytest.raises(XsError) as err:
        m.clients[0].end(txn.wire_id, True)
    assert err.value.errno == errno.EAGAIN  # /t/a changed outside after its copy
    m.same_tree()
    m.same_counts()
    m.teardown()


def test_rm_in_transaction_stops_at_a_listed_child_it_cannot_find_with_eio() -> None:
    """The transaction copies ``/t/a`` (children b, c), ``/t/a/c`` is removed
    outside, then the transaction removes ``/t/a``: the walk removes ``/t/a/b``,
    finds no ``/t/a/c`` and stops; the RM is EIO, ``/t/a`` stays in the
    transaction listing only ``c``; the commit is EAGAIN.

    C xenstored 4.17.7, ``xenstored_core.c``: ``rm_node`` walks the subtree with
    ``walk_node_tree`` (``delnode_sub`` on exit, then ``rm_from_parent``
    rewriting the parent without the child); a listed child ``read_node`` cannot
    find, with no ``enoent`` function, is ``WALK_TREE_ERROR_STOP``, on which
    ``rm_node`` calls ``corrupt()`` and answers EIO without ``delete_child``.
    """
    m = StoreMachine()
    m._run(0, None, "mkdir", "/t/a/b")
    m._run(0, None, "mkdir", "/t/a/c")
    m.start(domid=0)
    assert m._run(0, 0, "ls", "/t/a") == ["b", "c"]
    m._run(0, None, "rm", "/t/a/c")
    assert m._run(0, 0, "rm", "/t/a") == ("error", errno.EIO)
    assert m._run(0, 0, "ls", "/t/a") == ["c"]
    assert m._run(0, 0, "ls", "/t") == ["a"]
    assert m._run(0, 0, "read", "/t/a/b") == ("error", errno.ENOENT)
    m.same_tree()
    m.same_counts()
    txn = m.txns[0].pop()
    with pytest.raises(XsError) as err:
        m.clients[0].end(txn.wire_id, True)
    assert err.value.errno == errno.EAGAIN  # /t/a changed outside after its copy
    m.same_tree()
    m.same_counts()
    m.teardown()
