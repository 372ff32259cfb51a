"""Quota edges and argument rules of C xenstored 4.17, each named after its rule.

Sources (Xen RELEASE-4.17.x, ``tools/xenstore/``):

- ``xenstored_core.c``: the defaults ``quota_max_transaction = 10`` and
  ``quota_nb_watch_per_domain = 128``; ``get_strings`` counts every
  NUL-terminated string and ignores bytes after the last NUL.
- ``xenstored_transaction.c`` ``do_transaction_start``: ENOSPC when
  ``conn->transaction_started > quota_max_transaction`` (one over the quota
  is allowed).
- ``xenstored_watch.c`` ``do_watch``: E2BIG when
  ``domain_watch(conn) > quota_nb_watch_per_domain`` (one over the quota is
  allowed; ``domain_watch`` is 0 for privileged domains); EINVAL unless
  ``get_strings`` finds exactly two strings.
- ``xenstored_domain.c`` ``do_introduce``/``introduce_domain``: domain 0 is
  the master domain, introduced at start-up by ``dom0_init``; introducing it
  again only rebinds its port and resets its connection
  (``domain_conn_reset``), replying OK with no ``@introduceDomain`` event.
"""

from __future__ import annotations

import errno

import pytest
from xs_helpers import Client, T, errno_of, z

from gntdma.xenstored import (
    QUOTA_MAX_TRANSACTION,
    QUOTA_NB_WATCH_PER_DOMAIN,
    Quotas,
    Xenstored,
)


@pytest.fixture
def xsd() -> Xenstored:
    return Xenstored()


def test_default_quotas_are_those_of_c_xenstored_4_17() -> None:
    assert (QUOTA_MAX_TRANSACTION, QUOTA_NB_WATCH_PER_DOMAIN) == (10, 128)
    q = Quotas()
    assert (q.transactions, q.watches) == (10, 128)


def test_a_domain_may_open_one_transaction_more_than_the_quota(xsd: Xenstored) -> None:
    d5 = Client(xsd, domid=5)
    for _ in range(QUOTA_MAX_TRANSACTION + 1):  # 11 with the default of 10
        d5.start()
    assert errno_of(d5.start) == errno.ENOSPC
    assert xsd.statistics().transactions == QUOTA_MAX_TRANSACTION + 1


def test_transaction_quota_counts_per_connection(xsd: Xenstored) -> None:
    xsd.quotas = Quotas(transactions=1)
    a, b = Client(xsd, domid=5), Client(xsd, domid=5)
    a.start()
    a.start()
    assert errno_of(a.start) == errno.ENOSPC
    b.start()  # conn->transaction_started is per connection
    b.start()


def test_a_domain_may_hold_one_watch_more_than_the_quota(xsd: Xenstored) -> None:
    d5 = Client(xsd, domid=5)
    for i in range(QUOTA_NB_WATCH_PER_DOMAIN + 1):  # 129 with the default of 128
        d5.watch(f"w{i}", "t")
    assert errno_of(d5.watch, "one-more", "t") == errno.E2BIG
    assert xsd.statistics().watches == QUOTA_NB_WATCH_PER_DOMAIN + 1


def test_watch_quota_counts_per_domain(xsd: Xenstored) -> None:
    xsd.quotas = Quotas(watches=1)
    a, b = Client(xsd, domid=5), Client(xsd, domid=5)
    a.watch("x", "1")
    b.watch("y", "1")
    assert errno_of(a.watch, "z", "1") == errno.E2BIG
    assert errno_of(b.watch, "z", "1") == errno.E2BIG
    dom0 = Client(xsd)
    for i in range(3):  # domain_watch() is 0 for a privileged connection
        dom0.watch(f"/p{i}", "t")


def test_watch_ignores_trailing_bytes_after_the_last_nul(xsd: Xenstored) -> None:
    c = Client(xsd)
    assert c.call(T.XS_WATCH, b"/w\0tok\0trailing") == b"OK\0"
    c.pump()
    assert c.take_events() == [("/w", "tok")]
    assert c.call(T.XS_UNWATCH, b"/w\0tok\0junk") == b"OK\0"


def test_watch_with_a_third_string_is_einval_as_in_4_17(xsd: Xenstored) -> None:
    # get_strings() returns the number of NUL-terminated strings; do_watch wants
    # exactly 2 (the <depth> argument is XENSTORE_SERVER_FEATURE_WATCHDEPTH of 4.18).
    c = Client(xsd)
    assert errno_of(c.call, T.XS_WATCH, z("/w", "tok", "extra")) == errno.EINVAL
    assert errno_of(c.call, T.XS_UNWATCH, z("/w", "tok", "extra")) == errno.EINVAL
    assert xsd.statistics().watches == 0


def test_introduce_of_domain_0_replies_ok_without_an_event(xsd: Xenstored) -> None:
    dom0 = Client(xsd)
    dom0.watch("@introduceDomain", "i")
    dom0.take_events()
    assert dom0.call(T.XS_INTRODUCE, z("0", "0", "1")) == b"OK\0"
    dom0.pump()
    assert dom0.take_events() == []
    assert xsd.statistics().domains == 0  # dom0 is not a guest to release
    assert errno_of(dom0.call, T.XS_INTRODUCE, z("0", "0", "0")) == errno.EINVAL  # port 0


def test_introduce_of_domain_0_resets_only_dom0s_own_connection(xsd: Xenstored) -> None:
    ring = xsd.connect(0, name="ring0", ring=True)
    ring_client = Client(xsd)
    ring_client.conn.close()
    ring_client.conn = ring
    ring_client.watch("/r", "t")
    ring_tx = ring_client.start()
    sock = Client(xsd)
    sock.watch("/s", "t")
    sock_tx = sock.start()
    sock.call(T.XS_INTRODUCE, z("0", "0", "1"))
    assert ring.watches == [] and ring.transactions == {}
    assert errno_of(ring_client.read, "/tool", ring_tx) == errno.ENOENT
    assert len(sock.conn.watches) == 1
    sock.read("/tool", sock_tx)  # the caller's own transaction survives


def test_rm_in_a_transaction_that_reaches_its_node_quota_mid_walk_is_eio() -> None:
    """RM of ``/q/a`` in a transaction of domain 4 allowed 3 nodes: it touches
    ``/q/a``, ``/q`` and ``/q/a/b``, then reading ``/q/a/c`` is over the quota.
    C xenstored 4.17.7: ``access_node`` (xenstored_transaction.c) fails that read
    with ENOSPC, so ``read_node`` returns NULL; ``walk_node_tree`` (xenstored_core.c)
    stops with ``WALK_TREE_ERROR_STOP`` whatever the errno (RM has no ``enoent``
    function), and ``rm_node`` calls ``corrupt()`` and answers EIO, not ENOSPC.
    The transaction keeps ``/q/a`` listing the child not removed, as on the
    other stopped walks."""
    xsd = Xenstored(domain_exists=lambda domid: True)  # domain 4 was created by a host
    dom0 = Client(xsd)
    dom0.mkdir("/q")
    dom0.set_perms("/q", ["b4"])
    d4 = Client(xsd, domid=4)
    d4.mkdir("/q/a/b")
    d4.mkdir("/q/a/c")
    xsd.quotas = Quotas(transaction_nodes=3)
    tx = d4.start()
    assert errno_of(d4.rm, "/q/a", tx) == errno.EIO
    assert d4.ls("/q/a", tx) == ["c"]
    d4.end(tx, False)
    assert d4.ls("/q/a") == ["b", "c"]  # nothing of it outside the transaction
