"""A domain's home as the toolstack builds it, in one step under the core lock.

The toolstack writes a few nodes for every domain it creates: INTRODUCE makes
``/local/domain/<domid>`` (owned by the domain), then each of ``name`` and
``domid`` is a WRITE followed by a SET_PERMS. Run through :class:`Access`, each
of those looks the path up again, asks every ancestor for permissions and
builds its nodes twice. The functions here do the same to the store directly
when the caller is the daemon itself (privileged, outside transactions) and
the node is a new leaf below an existing node, which is the toolstack's case:

- the same nodes, with the same values, permissions (XSA-322 marks included),
  children and generation numbers: the global generation count advances once
  per node written, as :meth:`Access._put` does;
- the same node counts per owner, and the same domain generations
  (``alloc_permref`` and ``older`` are called as the per-request path calls them);
- the same :class:`Change` values (the watch code decides from them who may
  see an event), fired at the same points, so every watch event is queued in
  the same order;
- the same errors at the same points.

Anything else (an existing node, a missing parent, an invalid path or
permission string) goes through the per-request path. :func:`peek_children`
is ``DIRECTORY`` for the daemon itself, for leak checks.
"""

from __future__ import annotations

import errno
import functools
from collections.abc import Sequence
from dataclasses import fields, replace
from typing import TYPE_CHECKING, Final

from gntdma.xenstored._store import Access, Change
from gntdma.xenstored._tree import (
    DOMID_FIRST_RESERVED,
    Node,
    Perm,
    XsPerm,
    adjust_perms,
    basename,
    domain_path,
    is_valid_path,
    parent_path,
    parse_perm,
)
from gntdma.xenstored._wire import XsError

if TYPE_CHECKING:
    from gntdma.xenstored._core import Xenstored

__all__ = ["introduce_home", "mkdir", "peek_children", "remove_domain_nodes", "write_with_perms"]

_NONE = XsPerm.XS_PERM_NONE


def _read(xsd: Xenstored, node: Node) -> tuple[Perm, ...]:
    """The permissions ``Access.get`` reports for a live node (XSA-322 marks)."""
    perms = node.perms
    if len(perms) == 1:
        return perms
    return adjust_perms(perms, node.generation, xsd.older)


@functools.lru_cache(maxsize=256)
def _parse(perm_strings: tuple[str, ...]) -> tuple[Perm, ...] | None:
    """``Access.set_perms``'s parse; None where it raises EINVAL. Memoized (a
    pure function; a host sets the same lists on every domain it creates)."""
    if len(perm_strings) == 0:
        return None
    out = []
    for s in perm_strings:
        p = parse_perm(s)
        if p is None:
            return None
        out.append(p)
    return tuple(out)


def _absent(xsd: Xenstored, path: str) -> tuple[str, Node, list[str]] | None:
    """For a valid absent ``path``: its nearest existing ancestor (path and live
    node) and the nodes to create, top-most first. None for any other path
    (what the fast path does not handle)."""
    if not path.startswith("/") or path == "/":
        return None
    nodes = xsd.store.nodes
    if not is_valid_path(path, xsd.quotas.path_max) or path in nodes:
        return None
    missing = [path]
    up = parent_path(path)
    node = nodes.get(up)
    while node is None:
        if up == "/":
            return None
        missing.append(up)
        up = parent_path(up)
        node = nodes.get(up)
    missing.reverse()
    return up, node, missing


def _create(xsd: Xenstored, up: str, parent: Node, missing: list[str], value: bytes) -> Change:
    """``Access._create`` by the daemon itself: the ancestor lists the top-most
    missing node, then each missing node, top-most first, each with a new
    generation and the ancestor's permissions as read; the last one holds
    ``value``. The change of ``Access.write`` and ``Access.mkdir``."""
    store = xsd.store
    perms = _read(xsd, parent)
    gen = store.generation + 1
    store._set(up, _node(parent.value, perms, (*parent.children, basename(missing[0])), gen))
    last = len(missing) - 1
    for i in range(last):
        gen += 1
        store._set(missing[i], _node(b"", perms, (basename(missing[i + 1]),), gen))
    gen += 1
    store._set(missing[last], _node(value, perms, (), gen))
    store.generation = gen
    return Change(missing[last], node=_node(value, perms, (), 0))


def _set_perms(xsd: Xenstored, path: str, parsed: tuple[Perm, ...]) -> Change:
    """``Access.set_perms`` of an existing node by the daemon itself."""
    perms = tuple(p if xsd.alloc_permref(p.domid) else replace(p, ignore=True) for p in parsed)
    if perms[0].ignore:
        raise XsError(errno.ENOENT, f"owner domain {perms[0].domid} does not exist")
    store = xsd.store
    node = store.nodes[path]
    old = _read(xsd, node)
    new = _node(node.value, perms, node.children, node.generation)
    store.generation += 1
    store._set(path, _node(new.value, perms, new.children, store.generation))
    return Change(path, node=new, old_perms=old)


def write_with_perms(xsd: Xenstored, path: str, value: bytes,
                     perm_strings: Sequence[str]) -> None:
    """``xsd.write(path, value)`` then ``xsd.set_perms(path, perm_strings)``."""
    with xsd.lock:
        where = _absent(xsd, path)
        parsed = _parse(tuple(perm_strings))
        if where is None or parsed is None:
            xsd.write(path, value)
            xsd.set_perms(path, list(perm_strings))
            return
        xsd._fire([_create(xsd, *where, value)])
        xsd._fire([_set_perms(xsd, path, parsed)])


def mkdir(xsd: Xenstored, path: str) -> None:
    """``xsd.mkdir(path)``."""
    with xsd.lock:
        where = _absent(xsd, path)
        if where is None:
            xsd.mkdir(path)
            return
        xsd._fire([_create(xsd, *where, b"")])


def introduce_home(xsd: Xenstored, domid: int) -> str:
    """The store half of :meth:`Xenstored.introduce_domain`: ``/local/domain/<domid>``
    made if absent and owned by the domain, both changes fired together."""
    store = xsd.store
    home = domain_path(domid)
    where = _absent(xsd, home) if 0 < domid < DOMID_FIRST_RESERVED else None
    if where is None:
        xsd._domain_gen.setdefault(domid, store.generation)
        acc = xsd.access(None)
        acc.mkdir(home)
        node = store.nodes[home]
        if node.perms != (Perm(domid, _NONE),):
            acc.set_perms(home, [f"n{domid}"])
        xsd._fire(acc.changes)
        return home
    xsd._domain_gen.setdefault(domid, store.generation)
    changes = [_create(xsd, *where, b"")]
    owner = (Perm(domid, _NONE),)
    if store.nodes[home].perms != owner:
        changes.append(_set_perms(xsd, home, owner))
    xsd._fire(changes)
    return home


def peek_children(xsd: Xenstored, path: str) -> list[str]:
    """``xsd.directory(path)``, or [] where it raises (no node, invalid path)."""
    with xsd.lock:
        if not path.startswith("/"):
            try:
                return xsd.directory(path)
            except XsError:
                return []
        if not is_valid_path(path, xsd.quotas.path_max):
            return []
        nodes = xsd.store.nodes
        node = nodes.get(path)
        if node is not None:
            _read(xsd, node)  # Access.get's reading of the permissions (XSA-322)
            return list(node.children)
        while path != "/":  # ENOENT: ask_parents read the nearest existing ancestor
            path = parent_path(path)
            up = nodes.get(path)
            if up is not None:
                _read(xsd, up)
                break
        return []


def _forgets_domains(xsd: Xenstored) -> bool:
    """Would reading a node's permissions forget a domain (``Xenstored._known``:
    one the host created, never introduced, and has destroyed since)?"""
    exists = xsd._domain_exists
    if exists is None:
        return False
    doms = xsd._domains
    return any(d != 0 and d not in doms and not exists(d) for d in xsd._domain_gen)


def _position(nodes: dict[str, Node], path: str, owned: set[str]) -> tuple[int, ...] | None:
    """Where the walk from "/" meets ``path``: the index of each node among its
    parent's children, root first. None if the walk never gets there: an
    ancestor is removed before (owned too), or a parent does not list it."""
    key = []
    while path != "/":
        up = parent_path(path)
        if up in owned:
            return None
        parent = nodes.get(up)
        if parent is None:
            return None
        try:
            key.append(parent.children.index(basename(path)))
        except ValueError:
            return None
        path = up
    key.reverse()
    return tuple(key)


def remove_domain_nodes(xsd: Xenstored, acc: Access, domid: int) -> None:
    """``acc.remove_domain_nodes(domid)`` (``acc``: the daemon's own, outside
    transactions) without visiting every node: the subtrees whose top node
    ``domid`` owns are found among the nodes it owns and removed in the order
    the pre-order walk meets them. Reading a node's permissions has no effect
    then, unless it would make the daemon forget a domain: the walk itself
    runs in that case, as it reads every node it visits."""
    if _forgets_domains(xsd):
        acc.remove_domain_nodes(domid)
        return
    nodes = xsd.store.nodes
    owned = {p for p, n in nodes.items() if n.perms[0].domid == domid and p != "/"}
    tops = []
    for path in owned:
        key = _position(nodes, path, owned)
        if key is not None:
            tops.append((key, path))
    tops.sort()
    for _, path in tops:
        node = acc.get(path)
        assert node is not None
        acc.remove_tree(path, node)


# At the end of the module so that the lines above keep their numbers.
_NODE_SETTERS: Final = tuple(vars(Node)[f.name].__set__ for f in fields(Node))
_N0, _N1, _N2, _N3 = _NODE_SETTERS


def _node(value: bytes, perms: tuple[Perm, ...], children: tuple[str, ...],
          generation: int) -> Node:
    """``Node(value, perms, children, generation)`` without the frozen dataclass'
    ``__init__`` (four ``object.__setattr__`` calls): each slot's own setter."""
    n: Node = object.__new__(Node)
    _N0(n, value)
    _N1(n, perms)
    _N2(n, children)
    _N3(n, generation)
    return n
