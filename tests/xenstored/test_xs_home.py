"""A domain's home built in one step is the home built request by request.

The toolstack's INTRODUCE, MKDIR, and WRITE followed by SET_PERMS
(``gntdma.xenstored._home``) touch the store directly instead of going through
``Access`` once per request. Whatever a client can observe must be the same:
the node tree (values, permissions with their XSA-322 ignore marks, children,
generation numbers), the generation count, the node counts per owner, the
domains' generations, the special paths' permissions, the watch events queued
on every connection and their order, and the errors. The rules themselves are
C xenstored 4.17's (xenstored_core.c: ``do_write``, ``do_mkdir``,
``create_node``, ``do_set_perms``; xenstored_domain.c: ``do_introduce``,
``domain_alloc_permrefs``, ``domain_adjust_node_perms``;
xenstored_watch.c: ``fire_watches``); here the reference is the per-request
path of this daemon, run on a twin daemon with the same history.
"""

from __future__ import annotations

import errno
import random
from collections.abc import Callable
from dataclasses import replace
from functools import partial

import pytest

from gntdma.xenstored import Message, MessageReader, Xenstored, XsdType, XsError
from gntdma.xenstored._home import (
    _absent,
    _forgets_domains,
    introduce_home,
    mkdir,
    peek_children,
    write_with_perms,
)
from gntdma.xenstored._store import SPECIAL_PATHS, Change
from gntdma.xenstored._tree import Perm, XsPerm, domain_path

DOMIDS = (0, 1, 2, 3, 5)
PERMS = ("n0", "r1", "b2", "w3", "n5", "r9", "b1", "n2")
NAMES = ("a", "b", "name", "domid", "device")


def _z(*parts: str) -> bytes:
    return b"".join(p.encode() + b"\0" for p in parts)


def _random_path(rng: random.Random) -> str:
    if rng.random() < 0.05:
        return rng.choice(("", "rel/name", "/bad//path", "/trailing/", "/", "@releaseDomain",
                           "/x" * 1100))
    parts = ["local", "domain", str(rng.choice(DOMIDS))]
    parts += [rng.choice(NAMES) for _ in range(rng.randrange(0, 3))]
    if rng.random() < 0.1:
        parts = [rng.choice(NAMES) for _ in range(rng.randrange(1, 3))]
    return "/" + "/".join(parts)


def _random_perms(rng: random.Random) -> list[str]:
    if rng.random() < 0.05:
        return rng.choice(([], ["x1"], ["n0", "q"], ["r"]))
    return [rng.choice(PERMS) for _ in range(rng.randrange(1, 4))]


class _Twin:
    """One daemon, its host's domains and its clients, driven by a seeded history."""

    def __init__(self, seed: int, owner: int | None = None) -> None:
        self.exists = {0, 1, 2}
        self.xsd = Xenstored(domain_exists=lambda domid: domid in self.exists)
        self.conns = []
        rng = random.Random(seed)
        self._watchers(rng, (0, 1, 2, 0))
        for _ in range(rng.randrange(0, 40)):
            self._step(rng)
        if owner is not None:  # subtrees here and there that one domain owns
            for _ in range(rng.randrange(0, 12)):
                try:
                    path = _random_path(rng)
                    self.xsd.mkdir(path)
                    self.xsd.set_perms(path, [f"n{owner}", *_random_perms(rng)[:1]])
                except XsError:
                    pass
            if rng.random() < 0.4:  # a domain the daemon knows of, gone from the host
                self.exists.add(9)
                self.xsd.mkdir("/stale")
                self.xsd.set_perms("/stale", ["n0", "r9"])
                self.exists.discard(9)
        # Clients of domains that may be younger than nodes naming them (XSA-322).
        self._watchers(rng, (1, 2, 3, 5))
        for conn in self.conns:
            conn.data_to_send()  # what the history queued: not compared

    def _watchers(self, rng: random.Random, domids: tuple[int, ...]) -> None:
        for domid in domids:
            conn = self.xsd.connect(domid, ring=domid != 0)
            self.conns.append(conn)
            for i, path in enumerate(("/local/domain", "/", "@introduceDomain",
                                      "@releaseDomain", "name", f"/local/domain/{domid}",
                                      "/local/domain/3", "/local/domain/1/name")):
                if rng.random() < 0.6:
                    conn.feed(Message(XsdType.XS_WATCH, i + 1, 0, _z(path, f"t{i}")).encode())

    def _step(self, rng: random.Random) -> None:
        xsd = self.xsd
        op = rng.randrange(8)
        d = rng.choice(DOMIDS[1:])
        try:
            if op == 0:
                xsd.introduce_domain(d)
            elif op == 1:
                xsd.release_domain(d)
            elif op == 2:
                self.exists.symmetric_difference_update({d})
            elif op == 3:
                xsd.write(_random_path(rng), rng.choice((b"", b"v", b"value")))
            elif op == 4:
                xsd.mkdir(_random_path(rng))
            elif op == 5:
                xsd.set_perms(_random_path(rng), _random_perms(rng))
            elif op == 6:
                xsd.rm(_random_path(rng))
            else:
                xsd.set_perms(rng.choice(("@introduceDomain", "@releaseDomain")),
                              _random_perms(rng))
        except XsError:
            pass

    def run(self, fn: Callable[[Xenstored], object]) -> tuple[object, ...]:
        try:
            result: object = fn(self.xsd)
        except XsError as e:
            result = ("XsError", e.errno)
        xsd = self.xsd
        store = xsd.store
        return (result, store.generation, dict(store.nodes),
                {k: v for k, v in store.owner_counts.items() if v != 0},
                dict(xsd._domain_gen), dict(store.special_perms),
                {k: vars(v) for k, v in xsd._domains.items()},
                [c.data_to_send() for c in self.conns])


def _old_introduce(xsd: Xenstored, domid: int) -> str:
    """``Xenstored.introduce_domain`` as it was, request by request."""
    with xsd.lock:
        xsd._check_guest(domid)
        xsd._domain_gen.setdefault(domid, xsd.store.generation)
        home = domain_path(domid)
        acc = xsd.access(None)
        acc.mkdir(home)
        node = xsd.store.nodes[home]
        if node.perms != (Perm(domid, XsPerm.XS_PERM_NONE),):
            acc.set_perms(home, [f"n{domid}"])
        xsd._fire(acc.changes)
        xsd._introduce(domid, 0, 0)
        return home


def _old_release(xsd: Xenstored, domid: int) -> None:
    """``Xenstored.release_domain`` as it was: the walk over every node."""
    with xsd.lock:
        if domid not in xsd._domains:
            raise XsError(errno.ENOENT, f"domain {domid} is not introduced")
        del xsd._domains[domid]
        xsd._domain_gen.pop(domid, None)
        for conn in list(xsd._domain_conns.get(domid, {}).values()):
            xsd._kill(conn, f"domain {domid} released")
        for dom in xsd._domains.values():
            if dom.target == domid:
                dom.target = None
        acc = xsd.access(None)
        acc.remove_domain_nodes(domid)
        xsd._fire(acc.changes)
        for name in SPECIAL_PATHS:
            perms = xsd.store.special_perms[name]
            owner = perms[0] if perms[0].domid != domid else Perm(0, perms[0].access)
            rest = tuple(p for p in perms[1:] if p.domid != domid)
            xsd.store.special_perms[name] = (owner, *rest)
        xsd._fire([Change("@releaseDomain", exact=True)])


def _old_directory(xsd: Xenstored, path: str) -> list[str]:
    try:
        return xsd.directory(path)
    except XsError:
        return []


def _one_step(xsd: Xenstored, *, path: str, value: bytes, perms: list[str]) -> None:
    write_with_perms(xsd, path, value, perms)


def _two_requests(xsd: Xenstored, *, path: str, value: bytes, perms: list[str]) -> None:
    xsd.write(path, value)
    xsd.set_perms(path, perms)


def _compare(seed: int, fast: Callable[[Xenstored], object],
             slow: Callable[[Xenstored], object], owner: int | None = None) -> None:
    assert _Twin(seed, owner).run(fast) == _Twin(seed, owner).run(slow)


SEEDS = range(300)


def test_a_write_then_set_perms_in_one_step_is_the_two_requests() -> None:
    taken = 0
    for seed in SEEDS:
        rng = random.Random(seed * 7 + 1)
        path, value, perms = _random_path(rng), rng.choice((b"", b"guest1")), _random_perms(rng)
        taken += _absent(_Twin(seed).xsd, path) is not None

        _compare(seed, partial(_one_step, path=path, value=value, perms=perms),
                 partial(_two_requests, path=path, value=value, perms=perms))
    assert taken > len(SEEDS) // 3  # the one-step path itself was compared


def test_a_mkdir_in_one_step_is_the_request() -> None:
    taken = 0
    for seed in SEEDS:
        path = _random_path(random.Random(seed * 7 + 2))
        taken += _absent(_Twin(seed).xsd, path) is not None
        _compare(seed, partial(mkdir, path=path), partial(Xenstored.mkdir, path=path))
    assert taken > len(SEEDS) // 3


def test_an_introduce_in_one_step_is_the_introduce_request_by_request() -> None:
    taken = 0
    for seed in SEEDS:
        domid = random.Random(seed * 7 + 3).choice((*DOMIDS, 0x7FF0))
        taken += 0 < domid < 0x7FF0 and _absent(_Twin(seed).xsd, domain_path(domid)) is not None
        _compare(seed, partial(Xenstored.introduce_domain, domid=domid),
                 partial(_old_introduce, domid=domid))
    assert taken > len(SEEDS) // 4


def test_the_home_of_an_introduce_is_made_the_same_way_with_or_without_a_parent() -> None:
    # /local/domain missing: the per-request path; present: the one-step path.
    for prepare in (lambda xsd: None, lambda xsd: xsd.mkdir("/local/domain")):
        a, b = Xenstored(), Xenstored()
        for xsd in (a, b):
            prepare(xsd)
        with a.lock:
            introduce_home(a, 4)
        with b.lock:
            b._domain_gen.setdefault(4, b.store.generation)
            acc = b.access(None)
            acc.mkdir(domain_path(4))
            acc.set_perms(domain_path(4), ["n4"])
            b._fire(acc.changes)
        assert a.store.nodes == b.store.nodes
        assert a.store.generation == b.store.generation


def test_the_daemons_directory_for_leak_checks_is_directory() -> None:
    for seed in SEEDS:
        path = _random_path(random.Random(seed * 7 + 4))
        _compare(seed, partial(peek_children, path=path), partial(_old_directory, path=path))


@pytest.mark.parametrize("perms", [["n0", "r7"], ["n7"]])
def test_a_write_with_perms_naming_a_domain_the_host_lacks_fails_as_set_perms(
        perms: list[str]) -> None:
    """``do_set_perms``: a non-existent owner is ENOENT after the write, an entry
    naming one is kept with the ignore mark (``domain_alloc_permrefs``)."""
    a, b = Xenstored(domain_exists=lambda d: d < 5), Xenstored(domain_exists=lambda d: d < 5)
    for xsd in (a, b):
        xsd.mkdir("/local/domain/1")
    outcomes = []
    for xsd, fn in ((a, lambda: write_with_perms(a, "/local/domain/1/name", b"g", perms)),
                    (b, lambda: (b.write("/local/domain/1/name", b"g"),
                                 b.set_perms("/local/domain/1/name", perms)))):
        try:
            fn()
            outcomes.append(0)
        except XsError as e:
            outcomes.append(e.errno)
        outcomes.append(xsd.store.nodes)
    assert outcomes[0] == outcomes[2]
    assert outcomes[1] == outcomes[3]


def test_a_release_removes_what_the_walk_over_every_node_removed_in_its_order() -> None:
    """``remove_domain_nodes``: every subtree whose top node the domain owns, in
    the pre-order of the tree (children in creation order), and the permission
    reads of the walk where they make the daemon forget a gone domain."""
    forgets = owners = 0
    for seed in SEEDS:
        rng = random.Random(seed * 7 + 5)
        domid = rng.choice(DOMIDS[1:])
        twin = _Twin(seed, domid)
        forgets += _forgets_domains(twin.xsd)
        owners += domid in twin.xsd._domains and twin.xsd.store.owner_counts[domid] > 1
        _compare(seed, partial(Xenstored.release_domain, domid=domid),
                 partial(_old_release, domid=domid), domid)
    assert forgets > len(SEEDS) // 10  # both ways were compared
    assert len(SEEDS) - forgets > len(SEEDS) // 3
    assert owners > len(SEEDS) // 10  # and domains owning more than their home


def test_a_release_removes_owned_subtrees_in_tree_order() -> None:
    xsd = Xenstored(domain_exists=lambda d: True)
    xsd.introduce_domain(3)
    for path in ("/b/x", "/a/y/z", "/a/w", "/local/domain/0/backend/vbd/3", "/c"):
        xsd.mkdir(path)
    for path in ("/b/x", "/a/y", "/a", "/local/domain/0/backend/vbd/3"):
        xsd.set_perms(path, ["n3"])
    watcher = xsd.connect(0)
    watcher.feed(Message(XsdType.XS_WATCH, 1, 0, _z("/", "t")).encode())
    watcher.data_to_send()
    xsd.release_domain(3)
    events = [m.payload.split(b"\0")[0].decode()
              for m in MessageReader().feed(watcher.data_to_send())]
    # A watch on "/" hears each top removed (the nodes below are exact changes).
    assert events == ["/local/domain/3", "/local/domain/0/backend/vbd/3", "/b/x", "/a"]
    assert set(xsd.store.nodes) == {"/", "/tool", "/tool/xenstored", "/local",
                                    "/local/domain", "/local/domain/0",
                                    "/local/domain/0/backend", "/local/domain/0/backend/vbd",
                                    "/b", "/c"}


def test_a_release_of_a_subtree_listing_a_missing_node_fails_as_rm_node_does() -> None:
    """``rm_node`` meeting a child it cannot read: ``corrupt()``, EIO, the nodes
    removed so far stay removed, the ones on the walk keep their remaining children."""
    outcomes = []
    for release in (Xenstored.release_domain, _old_release):
        xsd = Xenstored(domain_exists=lambda d: True)
        xsd.introduce_domain(3)
        for path in ("/local/domain/3/a/b", "/local/domain/3/c"):
            xsd.mkdir(path)
        home = xsd.store.nodes["/local/domain/3"]
        xsd.store.nodes["/local/domain/3"] = replace(home, children=("a", "ghost", "c"))
        try:
            release(xsd, 3)
            outcomes.append(0)
        except XsError as e:
            outcomes.append(e.errno)
        outcomes.append((dict(xsd.store.nodes), xsd.store.generation))
    assert outcomes[0] == outcomes[2] == errno.EIO
    assert outcomes[1] == outcomes[3]
