"""The XenbusState machine: the transition tables, xenbus_set_state, waiting for a state."""

from __future__ import annotations

import errno
import itertools

import pytest
from xenbus_testlib import on_guest, xs

from gntdma.sched import WITNESS, VirtualClock
from gntdma.toolstack.host import Host
from gntdma.xen.xenbus import (
    BACKEND_TRANSITIONS,
    FRONTEND_TRANSITIONS,
    XST_NIL,
    XenbusDevice,
    XenbusRole,
    XenbusState,
    xenbus_backend_device,
    xenbus_frontend_device,
    xenbus_get_state,
    xenbus_read_driver_state,
    xenbus_read_otherend_state,
    xenbus_set_state,
    xenbus_strstate,
    xenbus_transition_legal,
    xenbus_wait_otherend_state,
    xenbus_wait_state,
)

S = XenbusState
FE, BE = XenbusRole.FRONTEND, XenbusRole.BACKEND

#: The legal moves, written out independently of the tables under test.
LEGAL: dict[XenbusRole, set[tuple[S, S]]] = {
    FE: {
        (S.Unknown, S.Initialising),
        (S.Initialising, S.Initialised), (S.Initialising, S.Connected),
        (S.Initialising, S.Closing), (S.Initialising, S.Closed),
        (S.Initialised, S.Connected), (S.Initialised, S.Closing), (S.Initialised, S.Closed),
        (S.Connected, S.Closing), (S.Connected, S.Closed), (S.Connected, S.Reconfiguring),
        (S.Closing, S.Closed),
        (S.Closed, S.Initialising),
        (S.Reconfiguring, S.Reconfigured), (S.Reconfiguring, S.Closing),
        (S.Reconfiguring, S.Closed),
        (S.Reconfigured, S.Connected), (S.Reconfigured, S.Closing), (S.Reconfigured, S.Closed),
    },
    BE: {
        (S.Unknown, S.Initialising),
        (S.Initialising, S.InitWait), (S.Initialising, S.Closing), (S.Initialising, S.Closed),
        (S.InitWait, S.Connected), (S.InitWait, S.Closing), (S.InitWait, S.Closed),
        (S.Connected, S.Closing), (S.Connected, S.Closed), (S.Connected, S.Reconfiguring),
        (S.Closing, S.Closed),
        (S.Closed, S.InitWait), (S.Closed, S.Closing),
        (S.Reconfiguring, S.Reconfigured), (S.Reconfiguring, S.Closing),
        (S.Reconfiguring, S.Closed),
        (S.Reconfigured, S.Connected), (S.Reconfigured, S.Closing), (S.Reconfigured, S.Closed),
    },
}
PAIRS = list(itertools.product(S, S))


def test_tables_cover_every_state() -> None:
    for table in (FRONTEND_TRANSITIONS, BACKEND_TRANSITIONS):
        assert set(table) == set(S)
        assert all(S.Unknown not in targets for targets in table.values())
    # A frontend never goes to InitWait, a backend never to Initialised.
    assert all(S.InitWait not in t for t in FRONTEND_TRANSITIONS.values())
    assert all(S.Initialised not in t for t in BACKEND_TRANSITIONS.values())


@pytest.mark.parametrize("role", [FE, BE], ids=["frontend", "backend"])
@pytest.mark.parametrize(("cur", "new"), PAIRS, ids=[f"{a.name}-{b.name}" for a, b in PAIRS])
def test_every_state_input_pair(role: XenbusRole, cur: S, new: S) -> None:
    legal = cur == new or (cur, new) in LEGAL[role]
    assert xenbus_transition_legal(role, cur, new) is legal


def test_strstate() -> None:
    assert xenbus_strstate(4) == "XenbusStateConnected"
    assert xenbus_strstate(42) == "XenbusStateUnknown(42)"


def _device(host: Host, role: XenbusRole) -> tuple[XenbusDevice, str]:
    g = host.create_guest("g1", memory_mb=4)
    dirs = host.xenstore.add_device(g.domid, 0, "vif", 0)
    if role is FE:
        err, dev = xenbus_frontend_device(xs(g), "vif", 0)
        path = dirs.frontend_path
    else:
        err, dev = xenbus_backend_device(xs(host.dom0), "vif", g.domid, 0)
        path = dirs.backend_path
    assert err == 0 and dev is not None
    return dev, path


@pytest.mark.parametrize("role", [FE, BE], ids=["frontend", "backend"])
def test_set_state_moves_only_along_the_table(host: Host, role: XenbusRole) -> None:
    """Every (state, input) pair through xenbus_set_state over the ring."""
    dev, path = _device(host, role)
    moves = 0
    for cur, new in PAIRS:
        host.xenstored.write(f"{path}/state", str(int(cur)).encode())
        err = xenbus_set_state(dev, new)
        stored = xenbus_read_driver_state(dev.xs, path)
        if cur == new or (cur, new) in LEGAL[role]:
            assert (err, stored) == (0, new), (cur, new)
            moves += 1
        else:
            assert (err, stored) == (errno.EINVAL, cur), (cur, new)
    assert moves == len(LEGAL[role]) + len(S)
    assert host.xenstored.statistics().transactions == 0
    host.xenstore.remove_device(host.xenstore.devices[0], timeout=0.01)


def test_device_views_and_states(host: Host) -> None:
    g = host.create_guest("g1", memory_mb=4)
    dirs = host.xenstore.add_device(g.domid, 0, "vbd", 768)
    err, fe = xenbus_frontend_device(xs(g), "vbd", 768)
    assert err == 0 and fe is not None
    assert (fe.nodename, fe.otherend, fe.otherend_id) == (dirs.frontend_path,
                                                           dirs.backend_path, 0)
    err, be = xenbus_backend_device(xs(host.dom0), "vbd", g.domid, 768)
    assert err == 0 and be is not None
    assert (be.nodename, be.otherend, be.otherend_id) == (dirs.backend_path,
                                                           dirs.frontend_path, g.domid)
    assert xenbus_get_state(fe) == S.Initialising
    assert xenbus_read_otherend_state(fe) == S.Initialising
    assert xenbus_set_state(be, S.InitWait) == 0
    assert xenbus_read_otherend_state(fe) == S.InitWait
    # Garbage in state reads as Unknown.
    for junk in (b"", b"abc", b"9", b"-1", b"4x"):
        host.xenstored.write(f"{dirs.backend_path}/state", junk)
        assert xenbus_read_otherend_state(fe) == S.Unknown
    # Missing devices and disagreeing keys.
    assert xenbus_frontend_device(xs(g), "vbd", 1)[0] == errno.ENOENT
    host.xenstored.write(f"{dirs.frontend_path}/backend-id", b"7")
    assert xenbus_frontend_device(xs(g), "vbd", 768) == (errno.EINVAL, None)
    host.xenstored.write(f"{dirs.frontend_path}/backend-id", b"zero")
    assert xenbus_frontend_device(xs(g), "vbd", 768) == (errno.EINVAL, None)
    assert xenbus_backend_device(xs(host.dom0), "vbd", 99, 768)[0] == errno.ENOENT
    host.xenstore.remove_device(dirs, timeout=0.01)


def test_set_state_never_recreates_a_removed_device(host: Host) -> None:
    dev, path = _device(host, BE)
    host.xenstore.remove_device(host.xenstore.devices[0], timeout=0.01)
    assert xenbus_set_state(dev, S.Closed) == errno.ENOENT
    assert not host.xenstored.exists(path)


def test_wait_state_times_out_with_etimedout() -> None:
    WITNESS.reset()
    host = Host(clock=VirtualClock())
    try:
        g = host.create_guest("g1", memory_mb=4)
        dirs = host.xenstore.add_device(g.domid, 0, "vif", 0)
        err, fe = xenbus_frontend_device(xs(g), "vif", 0)
        assert err == 0 and fe is not None
        t0 = host.sched.now()
        got = on_guest(host, g, lambda: xenbus_wait_otherend_state(fe, {S.Connected}, 5.0))
        assert got == (errno.ETIMEDOUT, S.Initialising)
        assert host.sched.now() - t0 >= 5.0
        # No watch is left behind.
        assert xs(g).statistics().watches == 0
        host.xenstore.remove_device(dirs, timeout=1.0)
        host.sched.yield_()
        assert host.leaks() == []
    finally:
        host.close()
        WITNESS.reset()


def test_wait_state_wakes_when_the_other_end_moves(host: Host) -> None:
    g = host.create_guest("g1", memory_mb=4)
    dirs = host.xenstore.add_device(g.domid, 0, "vif", 0)
    err, fe = xenbus_frontend_device(xs(g), "vif", 0)
    err2, be = xenbus_backend_device(xs(host.dom0), "vif", g.domid, 0)
    assert err == 0 and err2 == 0 and fe is not None and be is not None
    order: list[str] = []

    def backend() -> None:
        for st in (S.InitWait, S.Connected):
            order.append(f"be {st.name}")
            assert xenbus_set_state(be, st) == 0

    def frontend() -> tuple[int, S]:
        host.sched.spawn(backend, name="Domain-0/be", domain=host.dom0.kernel)
        return xenbus_wait_otherend_state(fe, {S.Connected}, 30.0)

    assert on_guest(host, g, frontend) == (0, S.Connected)
    assert order == ["be InitWait", "be Connected"]
    # Already there: returns at once; path-based form too.
    assert xenbus_wait_state(xs(g), dirs.backend_path, [S.Connected], 1.0) == (0, S.Connected)
    assert xs(g).xs_read(XST_NIL, dirs.backend_path, "online") == (0, b"1")
    host.xenstore.remove_device(dirs, timeout=0.01)
