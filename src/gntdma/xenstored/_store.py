"""The store: the node tree, transactions, quotas and the tree operations.

Theory of operation
-------------------
The tree is a flat ``dict`` from absolute path to an immutable :class:`Node`,
as C xenstored keeps it in a TDB keyed by path. A change replaces the node
object and stamps it with the next value of one global generation counter
(reported by DIRECTORY_PART).

A :class:`Transaction` works as C xenstored 4.17's (``xenstored_transaction.c``):
nothing is copied at TRANSACTION_START. The first time the transaction touches
a node it reads the node from the live tree *at that moment* and keeps its own
copy (an :class:`AccessedNode`: the node, or None if absent, with the live
generation it had); every later access in the transaction sees that copy, and
changes go to the copy. At commit only the nodes whose first access was a read
(``check_gen``) are compared with the live tree's generation; one that differs
(changed, created or deleted since) fails the commit with EAGAIN. Every
operation reads a node before it changes it, and creating a node reads (then
changes) its parent, so two transactions creating siblings conflict, as in C.
The copies the transaction modified are then written to the live tree. Start
and commit cost O(nodes touched), never a copy of the tree.

:class:`Access` is one caller's view (inside a transaction or not) and carries
the operations with the error rules of C xenstored 4.17: EINVAL for a bad path,
EACCES/ENOENT decided by the nearest existing parent, implicit creation of
parents that inherit the permissions of the first existing ancestor (an
unprivileged creator becomes the owner), recursive RM, quotas (ENOSPC).
Changes are returned as :class:`Change` values for the watch code; inside a
transaction they are queued in it and come back from :meth:`Store.commit`.
"""

from __future__ import annotations

import errno
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Final, Protocol

from gntdma.xenstored._tree import (
    Caller,
    Node,
    Perm,
    XsPerm,
    adjust_perms,
    basename,
    child_path,
    domain_path,
    is_valid_path,
    parent_path,
    parse_perm,
    perm_for,
)
from gntdma.xenstored._wire import XENSTORE_REL_PATH_MAX, XsError

__all__ = [
    "QUOTA_MAX_ENTRY_SIZE",
    "QUOTA_MAX_PATH_LEN",
    "QUOTA_MAX_TRANSACTION",
    "QUOTA_NB_ENTRY_PER_DOMAIN",
    "QUOTA_NB_PERMS_PER_NODE",
    "QUOTA_NB_WATCH_PER_DOMAIN",
    "QUOTA_TRANS_NODES",
    "SPECIAL_PATHS",
    "NO_GENERATION",
    "Access",
    "AccessedNode",
    "Change",
    "DomainTable",
    "Quotas",
    "Store",
    "Transaction",
]

# Defaults of C xenstored 4.17 (xenstored_core.c), by their C names.
QUOTA_NB_ENTRY_PER_DOMAIN: Final = 1000
QUOTA_NB_WATCH_PER_DOMAIN: Final = 128
QUOTA_MAX_ENTRY_SIZE: Final = 2048
QUOTA_MAX_TRANSACTION: Final = 10
QUOTA_NB_PERMS_PER_NODE: Final = 5
QUOTA_TRANS_NODES: Final = 1024
QUOTA_MAX_PATH_LEN: Final = XENSTORE_REL_PATH_MAX

#: Watch paths of the events xenstored invents, whose permissions SET_PERMS can set.
SPECIAL_PATHS: Final = ("@introduceDomain", "@releaseDomain")

#: The generation of an absent node (C's ``NO_GENERATION``, ~0).
NO_GENERATION: Final = -1

_R = XsPerm.XS_PERM_READ
_W = XsPerm.XS_PERM_WRITE
_OWNER = XsPerm.XS_PERM_OWNER
_DEFAULT_PERMS: Final = (Perm(0, XsPerm.XS_PERM_NONE),)
#: The tree of a new store (C's setup_structure), in creation order.
_INITIAL_NODES: Final = (
    ("/", Node(b"", _DEFAULT_PERMS, ("tool",), 1)),
    ("/tool", Node(b"", _DEFAULT_PERMS, ("xenstored",), 2)),
    ("/tool/xenstored", Node(b"", _DEFAULT_PERMS, (), 3)),
)


@dataclass
class Quotas:
    """Per-domain limits; they apply to unprivileged callers only.

    As in C xenstored 4.17, ``watches`` and ``transactions`` may be exceeded
    by one (``do_watch`` and ``do_transaction_start`` refuse only when the
    count already held is *greater* than the quota), ``node_size`` is
    exclusive: a node record of ``node_size`` bytes or more is refused.
    """

    nodes: int = QUOTA_NB_ENTRY_PER_DOMAIN  #: nodes owned per domain
    watches: int = QUOTA_NB_WATCH_PER_DOMAIN  #: watches per domain
    transactions: int = QUOTA_MAX_TRANSACTION  #: open transactions per connection
    node_size: int = QUOTA_MAX_ENTRY_SIZE  #: bytes of a node record
    permissions: int = QUOTA_NB_PERMS_PER_NODE  #: entries of a permission list
    transaction_nodes: int = QUOTA_TRANS_NODES  #: nodes touched by one transaction
    path_max: int = QUOTA_MAX_PATH_LEN  #: path length (below /local/domain/N/)


class DomainTable(Protocol):
    """The domains xenstored knows of (C's list of ``struct domain``)."""

    def older(self, domid: int, generation: int) -> bool:
        """``chk_domain_generation``: ``domid`` exists and is not younger than
        a node of ``generation``."""
        ...

    def alloc_permref(self, domid: int) -> bool:
        """``domain_alloc_permrefs`` for one entry: True if ``domid`` exists
        (known, or created by the host: then it is known from now on)."""
        ...


class _Everyone:
    """The table of a bare store: every domain exists, since always."""

    def older(self, domid: int, generation: int) -> bool:
        return True

    def alloc_permref(self, domid: int) -> bool:
        return True


_EVERYONE: Final = _Everyone()


@dataclass(frozen=True, slots=True)
class Change:
    """Something watches must hear about: ``path`` changed.

    ``exact`` (a node removed below the root of an RM) matches only watches on
    that very path. ``node``/``parent`` are the node and its parent as they were
    (None: look them up), ``old_perms`` the permissions before the change; the
    watch code uses them to decide who may see the event.
    """

    path: str
    exact: bool = False
    node: Node | None = None
    parent: Node | None = None
    old_perms: tuple[Perm, ...] | None = None


@dataclass(slots=True)
class AccessedNode:
    """``struct accessed_node``: one node a transaction touched, and its copy of it."""

    #: the transaction's copy (None: absent, or removed in the transaction)
    node: Node | None
    #: generation of the live node at the first access (NO_GENERATION: absent)
    generation: int
    #: permissions of the live node at the first access (None: absent)
    perms: tuple[Perm, ...] | None
    #: the first access was a read: check the generation at commit
    check_gen: bool
    #: changed in the transaction: written to the live tree at commit
    modified: bool = False


@dataclass(eq=False)
class Transaction:
    """An open transaction: the nodes it touched (in order), what it will fire."""

    id: int
    #: the global generation count at TRANSACTION_START
    generation: int
    #: path -> the transaction's record of that node, in first-access order
    accessed: dict[str, AccessedNode] = field(default_factory=dict)
    #: path -> exact flag of the queued watch event
    events: dict[str, bool] = field(default_factory=dict)
    #: owner domid -> change in the number of nodes it owns
    entry_delta: Counter[int] = field(default_factory=Counter)
    node_created: bool = False


class Store:
    """The live tree, the generation counter, per-owner node counts."""

    def __init__(self) -> None:
        # setup_structure(): "/" -> "tool" -> "xenstored", all n0, generations 1 to 3
        # (the nodes are immutable: every store starts with the same three).
        self.generation = len(_INITIAL_NODES)
        self.nodes: dict[str, Node] = dict(_INITIAL_NODES)
        self.owner_counts: Counter[int] = Counter()
        self.owner_counts[0] = len(_INITIAL_NODES)
        self.special_perms: dict[str, tuple[Perm, ...]] = dict.fromkeys(
            SPECIAL_PATHS, _DEFAULT_PERMS
        )

    def next_generation(self) -> int:
        self.generation += 1
        return self.generation

    def _set(self, path: str, node: Node) -> None:
        nodes = self.nodes
        counts = self.owner_counts
        old = nodes.get(path)
        if old is not None:
            self._uncount(old.perms[0].domid)
        owner = node.perms[0].domid
        counts[owner] = counts.get(owner, 0) + 1  # no Counter.__missing__ call
        nodes[path] = node

    def _uncount(self, owner: int) -> None:
        """One node fewer for ``owner``; a domain owning none has no entry (the
        counts do not grow with every domain the host ever had)."""
        counts = self.owner_counts
        n = counts.get(owner, 0) - 1
        if n == 0:
            del counts[owner]
        else:
            counts[owner] = n

    def _delete(self, path: str) -> None:
        old = self.nodes.pop(path, None)
        if old is None:
            return
        self._uncount(old.owner)

    # Transactions.

    def begin(self, txid: int) -> Transaction:
        """``do_transaction_start``: nothing but a new generation count."""
        return Transaction(txid, self.next_generation())

    def commit(self, txn: Transaction, caller: Caller, quotas: Quotas) -> list[Change]:
        """Apply ``txn`` or raise ENOSPC (node quota) / EAGAIN (conflict).

        ``do_transaction_end``: the node quota (``transaction_fix_domains``)
        first, then ``finalize_transaction``: the generation check of the
        nodes first read, then the modified copies go live with new generations.
        """
        if txn.node_created and not caller.privileged:
            for domid, delta in txn.entry_delta.items():
                if domid != 0 and delta > 0 and self.owner_counts[domid] + delta > quotas.nodes:
                    raise XsError(errno.ENOSPC, f"domain {domid} node quota")
        live = self.nodes
        for path, a in txn.accessed.items():
            if a.check_gen:
                node = live.get(path)
                gen = NO_GENERATION if node is None else node.generation
                if gen != a.generation:
                    raise XsError(errno.EAGAIN, f"{path} changed during transaction {txn.id}")
        for path, a in txn.accessed.items():
            if not a.modified:
                continue
            if a.node is None:
                self._delete(path)
            else:
                n = a.node
                self._set(path, Node(n.value, n.perms, n.children, self.next_generation()))
        return [
            Change(path, exact, old_perms=txn.accessed[path].perms)
            for path, exact in txn.events.items()
        ]

    def walk(self, top: str = "/") -> Iterator[tuple[str, Node]]:
        """Pre-order walk of the live tree, children in creation order."""
        stack = [top]
        while stack:
            path = stack.pop()
            node = self.nodes.get(path)
            if node is None:
                continue
            yield path, node
            stack.extend(child_path(path, c) for c in reversed(node.children))


@dataclass(slots=True)
class _WalkFrame:
    """One node of ``remove_tree``'s walk; ``next`` indexes its next child."""

    path: str
    node: Node
    parent: Node
    next: int = 0


class Access:
    """One caller's view of the store, outside or inside a transaction."""

    def __init__(
        self, store: Store, caller: Caller, quotas: Quotas, txn: Transaction | None = None,
        domains: DomainTable | None = None,
    ) -> None:
        self.store = store
        self.caller = caller
        self.quotas = quotas
        self.txn = txn
        self.domains: DomainTable = domains if domains is not None else _EVERYONE
        #: changes made outside a transaction, for the caller to fire
        self.changes: list[Change] = []

    # Low level: node I/O through the transaction.

    def get(self, path: str) -> Node | None:
        """``read_node``: the node (the transaction's copy, made on first access),
        its permission entries for gone or younger domains marked ignored."""
        txn = self.txn
        if txn is None:
            node = self.store.nodes.get(path)
        else:
            a = txn.accessed.get(path)
            if a is None:
                a = self._first_access(txn, path, check_gen=True)
            node = a.node
        if node is None or len(node.perms) == 1:
            return node
        perms = adjust_perms(node.perms, node.generation, self.domains.older)
        return node if perms is node.perms else Node(node.value, perms, node.children,
                                                     node.generation)

    def _first_access(self, txn: Transaction, path: str, *, check_gen: bool) -> AccessedNode:
        """``access_node`` on a node the transaction has not touched yet."""
        if not self.caller.privileged and len(txn.accessed) >= self.quotas.transaction_nodes:
            raise XsError(errno.ENOSPC, "transaction touches too many nodes")
        node = self.store.nodes.get(path)
        if node is None:
            a = AccessedNode(None, NO_GENERATION, None, check_gen)
        else:
            a = AccessedNode(node, node.generation, node.perms, check_gen)
        txn.accessed[path] = a
        return a

    def _accessed(self, txn: Transaction, path: str) -> AccessedNode:
        a = txn.accessed.get(path)
        return a if a is not None else self._first_access(txn, path, check_gen=False)

    def _put(self, path: str, node: Node) -> None:
        txn = self.txn
        if txn is None:
            store = self.store
            store._set(path, Node(node.value, node.perms, node.children, store.next_generation()))
            return
        a = self._accessed(txn, path)
        if a.node is not None:
            txn.entry_delta[a.node.owner] -= 1
        txn.entry_delta[node.owner] += 1
        a.node = Node(node.value, node.perms, node.children, self.store.next_generation())
        a.modified = True

    def _remove(self, path: str) -> None:
        txn = self.txn
        if txn is None:
            self.store._delete(path)
            return
        a = self._accessed(txn, path)
        if a.node is not None:
            txn.entry_delta[a.node.owner] -= 1
        a.node = None
        a.modified = True

    def _changed(self, change: Change) -> None:
        txn = self.txn
        if txn is None:
            self.changes.append(change)
        elif change.path not in txn.events:
            txn.events[change.path] = change.exact
        elif not change.exact:
            txn.events[change.path] = False

    def _check_size(self, node: Node) -> None:
        if not self.caller.privileged and node.entry_size() >= self.quotas.node_size:
            raise XsError(errno.ENOSPC, "node too large")

    # Path and permission rules.

    def canonical(self, name: str) -> str:
        """An absolute path for ``name``: relative names are below the caller's domain."""
        if name.startswith(("/", "@")):
            return name
        return f"{domain_path(self.caller.domid)}/{name}"

    def perm(self, perms: tuple[Perm, ...]) -> XsPerm:
        return perm_for(self.caller, perms)

    def _parent_perm(self, path: str) -> XsPerm:
        """``ask_parents``: the caller's access on the nearest existing ancestor."""
        while path != "/":
            path = parent_path(path)
            node = self.get(path)
            if node is not None:
                return self.perm(node.perms)
        return XsPerm.XS_PERM_NONE  # no root: cannot happen

    def lookup(self, path: str, want: XsPerm) -> Node:
        """``get_node``: the node at absolute ``path`` if the caller has ``want`` on it.

        A missing node is ENOENT only if the nearest existing ancestor grants
        some of ``want``; otherwise EACCES, so that nothing leaks.
        """
        node = self._find(path, want)
        if node is None:
            raise XsError(errno.ENOENT, path)
        return node

    def _find(self, path: str, want: XsPerm) -> Node | None:
        """:meth:`lookup`, but None where it raises ENOENT (no exception to catch)."""
        if not is_valid_path(path, self.quotas.path_max):
            raise XsError(errno.EINVAL, f"invalid path {path!r}")
        node = self.get(path)
        if node is not None:
            if self.perm(node.perms) & want == want:
                return node
            if self._parent_perm(path) & want:
                raise XsError(errno.EACCES, path)
        elif self._parent_perm(path) & want:
            return None
        raise XsError(errno.EACCES, path)

    # Operations.

    def read_node(self, name: str) -> Node:
        """The node for READ, DIRECTORY, DIRECTORY_PART and GET_PERMS."""
        return self.lookup(self.canonical(name), _R)

    def write(self, name: str, value: bytes) -> None:
        path = self.canonical(name)
        node = self._lookup_for_write(path)
        if node is None:
            node = self._create(path, value)
        else:
            node = Node(value, node.perms, node.children, node.generation)
            self._check_size(node)
            self._put(path, node)
        self._changed(Change(path, node=node))

    def mkdir(self, name: str) -> None:
        path = self.canonical(name)
        if self._lookup_for_write(path) is None:
            node = self._create(path, b"")
            self._changed(Change(path, node=node))

    def _lookup_for_write(self, path: str) -> Node | None:
        return self._find(path, _W)

    def _create(self, path: str, value: bytes) -> Node:
        """``construct_node`` + ``create_node``: ``path`` and its missing parents."""
        missing = [path]
        parent_name = parent_path(path)
        parent = self.get(parent_name)
        while parent is None:
            missing.append(parent_name)
            parent_name = parent_path(parent_name)
            parent = self.get(parent_name)
        missing.reverse()  # top-most missing node first
        perms = parent.perms
        if not self.caller.privileged:
            perms = (Perm(self.caller.domid, perms[0].access), *perms[1:])
        if not self.caller.privileged:
            owned = self.store.owner_counts[self.caller.domid]
            if self.txn is not None:
                owned += self.txn.entry_delta[self.caller.domid]
            if owned + len(missing) > self.quotas.nodes:
                raise XsError(errno.ENOSPC, f"domain {self.caller.domid} node quota")
        new_parent = Node(parent.value, parent.perms, (*parent.children, basename(missing[0])),
                          parent.generation)
        nodes = [(parent_name, new_parent)]
        for i, p in enumerate(missing):
            children = (basename(missing[i + 1]),) if i + 1 < len(missing) else ()
            nodes.append((p, Node(value if p == path else b"", perms, children, 0)))
        for _, n in nodes:
            self._check_size(n)
        for p, n in nodes:
            self._put(p, n)
        if self.txn is not None:
            self.txn.node_created = True
        return nodes[-1][1]

    def rm(self, name: str) -> None:
        path = self.canonical(name)
        try:
            node = self.lookup(path, _W)
        except XsError as e:
            # Not there already? Fine, if the parent is.
            if e.errno == errno.ENOENT and self.get(parent_path(path)) is not None:
                return
            raise
        if path == "/":
            raise XsError(errno.EINVAL, "cannot remove /")
        self.remove_tree(path, node)

    def remove_tree(self, path: str, node: Node) -> None:
        """``rm_node``: remove ``path`` and everything below, children first."""
        parent_name = parent_path(path)
        parent = self.get(parent_name)
        if parent is None:
            raise XsError(errno.EINVAL, f"no parent for {path}")
        # Depth first, children in creation order, each node removed once its
        # children are (walk_node_tree with delnode_sub).
        stack = [_WalkFrame(path, node, parent)]
        while stack:
            f = stack[-1]
            if f.next < len(f.node.children):
                cp = child_path(f.path, f.node.children[f.next])
                f.next += 1
                try:
                    cn = self.get(cp)
                    why = "is listed but not found"
                except XsError as e:  # the transaction's node quota (access_node)
                    cn, why = None, f"cannot be read ({e})"
                if cn is None:
                    # Only in a transaction: a listed child it cannot read (not found,
                    # or over the quota: read_node fails whatever the errno) stops the
                    # walk, each node of it keeping the children not yet removed
                    # (rm_from_parent wrote them); rm_node calls corrupt(): EIO.
                    for g in stack:
                        if g.next > 1:
                            kept = g.node.children[g.next - 1 :]
                            self._put(g.path, replace(g.node, children=kept))
                    raise XsError(errno.EIO, f"{cp} {why}")
                stack.append(_WalkFrame(cp, cn, f.node))
                continue
            stack.pop()
            self._remove(f.path)
            self._changed(Change(f.path, exact=f.path != path, node=f.node, parent=f.parent))
        base = basename(path)
        if base not in parent.children:
            # delete_child: only a transaction's copy of the parent, taken before
            # the node was created outside, can miss it; C calls corrupt() (a
            # check of the live store, consistent here) and fails the RM.
            raise XsError(errno.EIO, f"{parent_name} does not list {base}")
        children = tuple(c for c in parent.children if c != base)
        self._put(parent_name, Node(parent.value, parent.perms, children, parent.generation))

    def set_perms(self, name: str, perm_strings: list[str]) -> None:
        if not perm_strings:
            raise XsError(errno.EINVAL, "no permissions")
        if not self.caller.privileged and len(perm_strings) > self.quotas.permissions:
            raise XsError(errno.ENOSPC, "too many permissions")
        parsed = [parse_perm(s) for s in perm_strings]
        perms = tuple(p for p in parsed if p is not None)
        if len(perms) != len(parsed):
            raise XsError(errno.EINVAL, f"bad permissions {perm_strings!r}")
        # domain_alloc_permrefs: entries naming no existing domain are ignored;
        # a non-existent owner is ENOENT (do_set_perms, before any node check).
        perms = tuple(p if self.domains.alloc_permref(p.domid) else replace(p, ignore=True)
                      for p in perms)
        if perms[0].ignore:
            raise XsError(errno.ENOENT, f"owner domain {perms[0].domid} does not exist")
        if name.startswith("@"):
            self._set_special_perms(name, perms)
            return
        path = self.canonical(name)
        node = self.lookup(path, _W | _OWNER)
        if not self.caller.privileged and perms[0].domid != node.owner:
            raise XsError(errno.EPERM, "only the control domain may change the owner")
        new = Node(node.value, perms, node.children, node.generation)
        self._check_size(new)
        self._put(path, new)
        self._changed(Change(path, node=new, old_perms=node.perms))

    def _set_special_perms(self, name: str, perms: tuple[Perm, ...]) -> None:
        current = self.store.special_perms.get(name)
        if current is None:
            raise XsError(errno.EINVAL, f"no special path {name!r}")
        if self.perm(current) & (_W | _OWNER) != _W | _OWNER:
            raise XsError(errno.EACCES, name)
        self.store.special_perms[name] = perms

    def remove_domain_nodes(self, domid: int) -> None:
        """Remove every subtree whose top node ``domid`` owns (domain destruction)."""
        stack = ["/"]
        while stack:
            path = stack.pop()
            node = self.get(path)
            if node is None:
                continue
            if path != "/" and node.owner == domid:
                self.remove_tree(path, node)
                continue
            stack.extend(child_path(path, c) for c in reversed(node.children))
