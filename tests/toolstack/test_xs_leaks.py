"""The toolstack's xenstore leak check finds every leftover it looks for.

Each leftover is planted on a live host and must be reported by
``HostXenstore.leaks`` (through ``Host.leaks``), then removed; a clean host
reports nothing. The check reads the daemon's tree for itself (DIRECTORY of the
daemon's own connection); these cases hold whichever way it reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from gntdma.toolstack.host import Host
from gntdma.xenstored import Message, XsdType


@pytest.fixture
def host() -> Iterator[Host]:
    h = Host()
    try:
        yield h
    finally:
        h.close()


def _z(*parts: str) -> bytes:
    return b"".join(p.encode() + b"\0" for p in parts)


def _planted(host: Host, plant: Callable[[], None], remove: Callable[[], None],
             expected: str) -> None:
    assert host.leaks() == []
    plant()
    leaks = host.leaks()
    assert any(expected in leak for leak in leaks), leaks
    remove()
    assert host.leaks() == []


def test_a_home_of_a_dead_domain_is_a_leak(host: Host) -> None:
    xsd = host.xenstored
    _planted(host, lambda: xsd.mkdir("/local/domain/77/name"),
             lambda: xsd.rm("/local/domain/77"), "/local/domain/77 of a dead domain")


def test_a_home_that_names_no_domain_is_a_leak(host: Host) -> None:
    xsd = host.xenstored
    _planted(host, lambda: xsd.mkdir("/local/domain/vm"),
             lambda: xsd.rm("/local/domain/vm"), "/local/domain/vm of a dead domain")


def test_a_backend_of_a_dead_frontend_is_a_leak_in_any_live_domain(host: Host) -> None:
    g = host.create_guest("g1", memory_mb=4)
    xsd = host.xenstored
    for backend in (0, g.domid):
        path = f"/local/domain/{backend}/backend/vif/42/0/state"
        _planted(host, lambda path=path: xsd.write(path, b"1"),
                 lambda backend=backend: xsd.rm(f"/local/domain/{backend}/backend"),
                 f"/local/domain/{backend}/backend/vif/42 of a dead frontend")
    _planted(host, lambda: xsd.mkdir("/local/domain/0/backend/vbd/front"),
             lambda: xsd.rm("/local/domain/0/backend"),
             "/local/domain/0/backend/vbd/front of a dead frontend")
    host.destroy_guest(g)


def test_a_transaction_left_open_by_the_toolstack_is_a_leak(host: Host) -> None:
    conn = host.xenstore.toolstack.conn
    tx: list[int] = []

    def plant() -> None:
        tx.append(int(host.xenstore.toolstack.request(
            XsdType.XS_TRANSACTION_START, b"\0").rstrip(b"\0")))

    def remove() -> None:
        host.xenstore.toolstack.request(XsdType.XS_TRANSACTION_END, b"F\0", tx[0])

    _planted(host, plant, remove, "dom0 left 1 transactions open")
    assert conn.transactions == {}


def test_a_dead_domains_connection_with_watches_is_a_leak(host: Host) -> None:
    xsd = host.xenstored
    conns = []

    def plant() -> None:
        conn = xsd.connect(55, name="stray")
        conn.feed(Message(XsdType.XS_WATCH, 1, 0, _z("/local", "t")).encode())
        conns.append(conn)

    _planted(host, plant, lambda: conns[0].close(),
             "dead dom55 still has 1 watches and 0 transactions")


def test_an_introduced_domain_with_no_guest_is_a_leak(host: Host) -> None:
    g = host.create_guest("g1", memory_mb=4)
    assert host.leaks() == []
    leaks = host.xenstore.leaks([0])  # g1 no longer among the live guests
    assert "xenstore: 1 domains introduced, 0 guests alive" in leaks
    assert f"xenstore: /local/domain/{g.domid} of a dead domain" in leaks
    host.destroy_guest(g)
    assert host.leaks() == []


def test_a_device_of_a_dead_domain_is_a_leak(host: Host) -> None:
    g = host.create_guest("g1", memory_mb=4)
    dev = host.xenstore.add_device(g.domid, 0, "vbd", 768)
    leaks = host.leaks()
    assert leaks == []
    live = [d for d in host.guests if d != g.domid]
    assert any("device /local/domain/" in leak and "of a dead domain" in leak
               for leak in host.xenstore.leaks(live))
    host.xenstore.remove_device(dev, 0.0)
    host.destroy_guest(g)
    assert host.leaks() == []



@pytest.mark.parametrize(("path", "listed", "removed"), [
    ("/libxl/{d}/type", "xenstore: /libxl left behind", "/libxl"),
    ("/vm/leftover", "xenstore: /vm left behind", "/vm"),
    ("/local/domain/0/device-model/{d}/state",
     "xenstore: /local/domain/0/device-model/{d} of a dead domain",
     "/local/domain/0/device-model"),
])
def test_a_node_a_teardown_left_outside_the_homes_is_listed(path: str, listed: str,
                                                             removed: str) -> None:
    """DESIGN 10: teardown asserts no xenstore nodes are left. libxl's
    libxl__destroy_domid removes /libxl/<domid>, /vm/<uuid> and dom0's
    device-model/<domid> of a destroyed domain; such a node (or any node outside the
    daemon's own tree and the live domains' homes) left behind is a leak, listed once
    by its subtree's top, and nothing is once it is removed."""
    h = Host()
    try:
        g = h.create_guest("guest1", memory_mb=8)
        d = g.domid
        h.destroy_guest(g)
        assert h.leaks() == []
        h.xenstored.write(path.format(d=d), b"x")
        assert h.leaks() == [listed.format(d=d)]
        h.xenstored.rm(removed)
        assert h.leaks() == []
    finally:
        h.close()
