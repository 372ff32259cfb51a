"""A new store's tree, and the special watch permissions a release leaves.

C xenstored 4.17 ``setup_structure`` (tools/xenstore/xenstored_core.c) writes "/",
"/tool" and "/tool/xenstored", each owned by dom0 with no access for others, and
bumps the generation count for each: dom0 owns three nodes. A release
(``destroy_domain``, xenstored_domain.c) drops the entries naming the domain
from the special watch permissions; the others stay as they were.
"""

from __future__ import annotations

from gntdma.xenstored import Xenstored
from gntdma.xenstored._store import SPECIAL_PATHS, Store
from gntdma.xenstored._tree import Node, Perm, XsPerm

_N0 = (Perm(0, XsPerm.XS_PERM_NONE),)


def test_a_new_store_holds_setup_structure():
    a, b = Store(), Store()
    assert list(a.nodes.items()) == [
        ("/", Node(b"", _N0, ("tool",), 1)),
        ("/tool", Node(b"", _N0, ("xenstored",), 2)),
        ("/tool/xenstored", Node(b"", _N0, (), 3)),
    ]
    assert a.generation == 3
    assert dict(a.owner_counts) == {0: 3}
    assert a.special_perms == dict.fromkeys(SPECIAL_PATHS, _N0)
    # Each store's own tables: a change to one leaves another as it was.
    a._set("/tool/x", Node(b"1", (Perm(5, XsPerm.XS_PERM_READ),), (), 4))
    a.next_generation()
    assert "/tool/x" not in b.nodes and b.generation == 3 and dict(b.owner_counts) == {0: 3}


def test_a_release_keeps_special_perms_that_do_not_name_the_domain():
    xsd = Xenstored()
    xsd.introduce_domain(3)
    xsd.introduce_domain(4)
    conn = xsd.connect(0)
    acc = xsd.access(conn)
    acc.set_perms("@releaseDomain", ["n0", "r4"])
    acc.set_perms("@introduceDomain", ["n3", "r4"])
    before = dict(xsd.store.special_perms)
    xsd.introduce_domain(6)
    xsd.release_domain(6)
    assert xsd.store.special_perms == before
    xsd.release_domain(4)
    assert xsd.store.special_perms == {
        "@releaseDomain": _N0,
        "@introduceDomain": (Perm(3, XsPerm.XS_PERM_NONE),),
    }
    xsd.release_domain(3)
    assert xsd.store.special_perms == dict.fromkeys(SPECIAL_PATHS, _N0)
