"""Device directories with libxl's sequence; domain introduction, release and leaks."""

from __future__ import annotations

import errno

from xenbus_testlib import xs

from gntdma.sched import WITNESS, VirtualClock
from gntdma.toolstack.host import Guest, Host
from gntdma.xen.xenbus import (
    XST_NIL,
    XenbusState,
    XsWatch,
    xenbus_backend_device,
    xenbus_frontend_device,
    xenbus_set_state,
    xenbus_wait_otherend_state,
    xenbus_wait_state,
)

S = XenbusState


def test_add_device_lays_out_both_directories_as_libxl(host: Host) -> None:
    g = host.create_guest("g1", memory_mb=4)
    fe_id = g.domid
    xsd = host.xenstored
    dev = host.xenstore.add_device(fe_id, 0, "vbd", 51712, front={"virtual-device": "51712"},
                                   back={"params": "/tmp/disk.img", "mode": "w"})
    fe = f"/local/domain/{fe_id}/device/vbd/51712"
    be = f"/local/domain/0/backend/vbd/{fe_id}/51712"
    assert (dev.frontend_path, dev.backend_path) == (fe, be)
    assert sorted(xsd.directory(fe)) == ["backend", "backend-id", "state", "virtual-device"]
    assert sorted(xsd.directory(be)) == ["frontend", "frontend-id", "mode", "online",
                                         "params", "state"]
    assert xsd.read(f"{fe}/backend") == be.encode()
    assert xsd.read(f"{fe}/backend-id") == b"0"
    assert xsd.read(f"{be}/frontend") == fe.encode()
    assert xsd.read(f"{be}/frontend-id") == str(fe_id).encode()
    assert xsd.read(f"{be}/online") == b"1"
    assert xsd.read(f"{fe}/state") == xsd.read(f"{be}/state") == b"1"
    # Each end owns its directory and reads the other's.
    assert xsd.get_perms(fe) == [f"n{fe_id}", "r0"]
    assert xsd.get_perms(be) == ["n0", f"r{fe_id}"]
    assert xsd.get_perms(f"{be}/state") == ["n0", f"r{fe_id}"]
    c = xs(g)
    assert c.xs_read(XST_NIL, be, "state") == (0, b"1")
    assert c.xs_write(XST_NIL, be, "state", "4") == errno.EACCES
    assert c.xs_write(XST_NIL, fe, "ring-ref", "8") == 0
    assert host.xenstore.remove_device(dev, timeout=0.01) is False  # no backend driver
    assert not xsd.exists(fe) and not xsd.exists(be)
    # The parents that became empty went too, the domain's own nodes stayed.
    assert not xsd.exists(f"/local/domain/{fe_id}/device")
    assert not xsd.exists("/local/domain/0/backend")
    assert xsd.exists(f"/local/domain/{fe_id}/name")


def fake_backend(host: Host, fe: Guest, devtype: str, devid: int, log: list[str]) -> None:
    """A dom0 backend driver: InitWait; on its own Closing (the unplug), Closed."""
    err, dev = xenbus_backend_device(xs(host.dom0), devtype, fe.domid, devid)
    assert err == 0 and dev is not None
    assert xenbus_set_state(dev, S.InitWait) == 0
    log.append("be InitWait")
    err, st = xenbus_wait_state(dev.xs, dev.nodename, {S.Closing}, 30.0)
    assert err == 0, err
    err, online = dev.xs.xs_read(XST_NIL, dev.nodename, "online")
    log.append(f"be sees {st.name} online={online.decode()}")
    assert xenbus_set_state(dev, S.Closed) == 0
    log.append("be Closed")


def test_remove_device_waits_for_the_backend_to_close(host: Host) -> None:
    g = host.create_guest("g1", memory_mb=4)
    dev = host.xenstore.add_device(g.domid, 0, "vif", 0)
    log: list[str] = []
    host.sched.spawn(fake_backend, host, g, "vif", 0, log, name="Domain-0/netback",
                     domain=host.dom0.kernel)
    host.sched.run(until=lambda: bool(log))
    assert host.xenstore.remove_device(dev) is True  # thread0 sleeps, the backend runs
    host.sched.run(until=lambda: len(log) == 3)  # its commit reply is still on the way
    assert log == ["be InitWait", "be sees Closing online=0", "be Closed"]
    assert not host.xenstored.exists(dev.frontend_path)
    assert not host.xenstored.exists(dev.backend_path)
    assert host.xenstore.devices == []


def test_connect_and_unplug_with_both_ends(host: Host) -> None:
    """The whole handshake: connect, then the toolstack unplugs and both ends close."""
    g = host.create_guest("g1", memory_mb=4)
    dev = host.xenstore.add_device(g.domid, 0, "vbd", 768)
    log: list[str] = []

    def backend() -> None:
        err, be = xenbus_backend_device(xs(host.dom0), "vbd", g.domid, 768)
        assert err == 0 and be is not None
        assert xenbus_set_state(be, S.InitWait) == 0
        assert xenbus_wait_otherend_state(be, {S.Initialised}, 30.0) == (0, S.Initialised)
        assert be.xs.xs_read(XST_NIL, be.otherend, "ring-ref") == (0, b"8")
        assert xenbus_set_state(be, S.Connected) == 0
        log.append("be Connected")
        # The frontend closes when the toolstack sets us Closing.
        assert xenbus_wait_otherend_state(be, {S.Closed}, 30.0) == (0, S.Closed)
        assert xenbus_set_state(be, S.Closed) == 0
        log.append("be Closed")

    def frontend() -> None:
        err, fe = xenbus_frontend_device(xs(g), "vbd", 768)
        assert err == 0 and fe is not None
        assert xenbus_wait_otherend_state(fe, {S.InitWait}, 30.0) == (0, S.InitWait)
        assert fe.xs.xs_write(XST_NIL, fe.nodename, "ring-ref", "8") == 0
        assert xenbus_set_state(fe, S.Initialised) == 0
        assert xenbus_wait_otherend_state(fe, {S.Connected}, 30.0) == (0, S.Connected)
        assert xenbus_set_state(fe, S.Connected) == 0
        log.append("fe Connected")
        err, st = xenbus_wait_otherend_state(fe, {S.Closing, S.Closed}, 30.0)
        assert err == 0
        assert xenbus_set_state(fe, S.Closing) == 0
        assert xenbus_set_state(fe, S.Closed) == 0
        log.append(f"fe Closed after backend {st.name}")

    host.sched.spawn(backend, name="Domain-0/blkback", domain=host.dom0.kernel)
    host.sched.spawn(frontend, name="g1/blkfront", domain=g.kernel)
    host.sched.run(until=lambda: log.count("be Connected") + log.count("fe Connected") == 2)
    assert host.xenstored.read(f"{dev.frontend_path}/state") == b"4"
    assert host.xenstore.remove_device(dev) is True
    host.sched.run(until=lambda: len(log) == 4)
    assert log[2:] == ["fe Closed after backend Closing", "be Closed"]
    assert host.xenstored.statistics().watches == 0


def test_remove_device_times_out_without_a_backend() -> None:
    WITNESS.reset()
    host = Host(clock=VirtualClock())
    try:
        g = host.create_guest("g1", memory_mb=4)
        dev = host.xenstore.add_device(g.domid, 0, "vif", 1)
        t0 = host.sched.now()
        assert host.xenstore.remove_device(dev) is False
        assert host.sched.now() - t0 >= 10.0  # LIBXL_DESTROY_TIMEOUT
        assert not host.xenstored.exists(dev.backend_path)
        host.sched.yield_()
        assert host.leaks() == []
    finally:
        host.close()
        WITNESS.reset()


def test_destroying_a_domain_releases_it_and_closes_its_ring(host: Host) -> None:
    g = host.create_guest("g1", memory_mb=4)
    other = host.create_guest("g2", memory_mb=4)
    domid = g.domid
    dev = host.xenstore.add_device(domid, 0, "vif", 0)
    assert host.xenstored.is_domain_introduced(domid)
    assert xs(g).xs_write(XST_NIL, "data", "x", "1") == 0
    released: list[str] = []

    def on_release(path: str, token: str) -> None:
        released.append(path)

    w = XsWatch("@releaseDomain", on_release)  # dom0 may see it; guests, by default, not
    assert xs(host.dom0).xs_register_watch(w) == 0
    host.sched.run(until=lambda: len(released) == 1)  # the initial event

    host.destroy_guest(g)
    host.sched.run(until=lambda: len(released) == 2)
    assert g.xenstore is None
    assert not host.xenstored.is_domain_introduced(domid)
    assert not host.xenstored.exists(f"/local/domain/{domid}")
    assert not host.xenstored.exists(dev.backend_path)
    assert host.xenstore.devices == []
    assert domid not in host.xenstore.rings
    assert all(c.domid != domid for c in host.xenstored.connections())
    stats = {d.domid: d for d in host.hv.statistics().domains}
    assert domid not in stats
    # dom0 keeps only its own ring's two ports and the other guest's ring port.
    assert stats[0].ports == 3 and stats[0].mappings == 1
    assert xs(host.dom0).xs_unregister_watch(w) == 0
    host.destroy_guest(other)
    stats = {d.domid: d for d in host.hv.statistics().domains}
    assert stats[0].ports == 2 and stats[0].mappings == 0 and stats[0].grants_pinned == 0


def test_host_leaks_reports_xenstore_leftovers(host: Host) -> None:
    g = host.create_guest("g1", memory_mb=4)
    c = xs(g)
    err, t = c.xs_transaction_start()
    assert err == 0
    assert any("transactions open" in leak for leak in host.leaks())
    assert c.xs_transaction_end(t, abort=True) == 0
    # A backend directory for a domain that does not exist.
    host.xenstored.write("/local/domain/0/backend/vbd/42/768/state", b"1")
    assert any("backend/vbd/42" in leak for leak in host.leaks())
    host.xenstored.rm("/local/domain/0/backend")
    # A home directory of a dead domain.
    host.xenstored.mkdir("/local/domain/77")
    assert any("/local/domain/77" in leak for leak in host.leaks())
    host.xenstored.rm("/local/domain/77")
    assert host.leaks() == []
