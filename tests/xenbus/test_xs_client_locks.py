"""The guest xenstore client: one shared byte ring, FreeBSD's locks, sleeps with interlocks.

Sources:

- FreeBSD ``sys/dev/xen/xenstore/xenstore.c``: ``struct xs_softc`` and
  ``xs_attach`` (``request_mutex`` and ``xenwatch_mutex`` are sx locks,
  ``ring_lock``, ``reply_lock``, ``registered_watches_lock`` and
  ``watch_events_lock`` are ``MTX_DEF`` mutexes); ``xs_write_store`` sleeps for
  room with ``msleep(xen_store, &xs.ring_lock, ...)``; ``xs_read_reply`` with
  ``mtx_sleep(&xs.reply_list, &xs.reply_lock, ...)``; ``xenwatch_thread`` with
  ``mtx_sleep(&xs.watch_events, &xs.watch_events_lock, ...)``; ``xs_intr``
  holds ``ring_lock`` across its wakeup; ``xs_unregister_watch`` flushes a
  running callback by taking ``xenwatch_mutex``.
- FreeBSD ``sys/kern/kern_synch.c`` ``_sleep``: ``WITNESS_WARN`` reports a sleep
  with a non-sleepable lock held other than the interlock.
- Linux ``kernel/hung_task.c``: a ``TASK_IDLE`` sleep is not a hung task.
"""

from __future__ import annotations

import errno
import sys

from xenbus_testlib import RSP_CONS, RSP_PROD, on_guest, put_u32, store_page, u32, xs

import gntdma.xen.xenstore as xenstore_mod
from gntdma.abi.xs_ring import XsByteRing
from gntdma.sched import MTX_DEF, WITNESS, Mutex, Sx, ThreadState
from gntdma.toolstack.host import Guest, Host
from gntdma.xen.xenbus import XST_NIL, XsWatch


def test_guest_client_ring_is_the_shared_xs_byte_ring(host: Host) -> None:
    """Issue 9 item 11: the ring logic exists once, in gntdma.abi.xs_ring."""
    g = host.create_guest("g1", memory_mb=4)
    c = xs(g)
    assert isinstance(c.ring, XsByteRing) and c.ring.server is False
    # The client keeps no copy of the ring arithmetic of its own.
    assert not hasattr(xenstore_mod, "MASK_XENSTORE_IDX")
    page = store_page(g)
    assert c.xs_write(XST_NIL, "data", "", "x") == 0
    assert c.ring.prod == u32(page, 2052) and c.ring.cons == u32(page, RSP_CONS)
    page.release()


def test_xenstore_locks_are_freebsds_classes(host: Host) -> None:
    """xs_attach: sx_init(&xs.request_mutex), sx_init(&xs.xenwatch_mutex), the rest MTX_DEF."""
    c = xs(host.create_guest("g1", memory_mb=4))
    assert isinstance(c.request_lock, Sx) and c.request_lock.name == "xenstore request"
    assert isinstance(c.xenwatch_lock, Sx)
    for m in (c.ring_lock, c.reply_lock, c.registered_watches_lock, c.watch_events_lock):
        assert isinstance(m, Mutex) and m.flags & MTX_DEF == MTX_DEF and not m._spin


def _traffic(host: Host) -> None:
    """Requests of every size from several threads, watches, an unregister, a reset."""
    guests = [host.create_guest(f"g{i}", memory_mb=4) for i in range(2)]
    fired: list[str] = []

    def cb_for(g: Guest) -> XsWatch:
        def cb(path: str, token: str) -> None:
            fired.append(path)
            xs(g).xs_read(XST_NIL, "name")  # a callback may call xenstore
        return XsWatch("data", cb)

    watches = {g.name: cb_for(g) for g in guests}
    for g in guests:
        assert on_guest(host, g, lambda g=g: xs(g).xs_register_watch(watches[g.name])) == 0

    def worker(g: Guest, i: int) -> None:
        c = xs(g)
        for j in range(15):
            value = f"{i}-{j}-" + "v" * (j * 130)  # up to 1.8 KiB: writers wait for room
            assert c.xs_write(XST_NIL, f"data/{i}", str(j), value) == 0
            assert c.xs_read(XST_NIL, f"data/{i}/{j}") == (0, value.encode())

    threads = [host.sched.spawn(worker, g, i, name=f"{g.name}/w{i}", domain=g.kernel)
               for g in guests for i in range(3)]
    host.sched.run(until=lambda: all(t.state is ThreadState.DONE for t in threads))
    assert all(t.exc is None for t in threads)
    assert len(fired) > 10

    # A hostile response index: the client resets the connection and goes on.
    bad = guests[0]
    page = store_page(bad)
    put_u32(page, RSP_PROD, u32(page, RSP_CONS) + 5000)
    page.release()
    assert host.hv.evtchn_send(0, host.xenstore.rings[bad.domid].local_port) == 0
    host.sched.run(until=lambda: xs(bad).statistics().reconnects == 1 and xs(bad).connected)
    assert on_guest(host, bad, lambda: xs(bad).xs_read(XST_NIL, "name")) == (0, b"g0")

    for g in guests:
        assert on_guest(host, g, lambda g=g: xs(g).xs_unregister_watch(watches[g.name])) == 0
    assert host.sched.failures == []


def test_guest_xenstore_traffic_under_strict_rules_has_no_witness_report(
        host: Host) -> None:
    """No sleep with a sleep mutex held (WITNESS_WARN in _sleep), no panic."""
    _traffic(host)
    assert WITNESS.sleeps() == [], [r.format() for r in WITNESS.sleeps()]
    assert WITNESS.panics() == [] and WITNESS.reports == []


def test_every_client_sleep_passes_its_interlock(host: Host) -> None:
    """A sleep with no interlock opens the SMP window; the client has none."""
    sched = host.sched
    real_point = sched.point
    bare: list[str] = []

    def point(name: str = "point") -> None:
        if name == "tsleep":
            f = sys._getframe(1)
            while f is not None and "/gntdma/sched/" in f.f_code.co_filename:
                f = f.f_back  # type: ignore[assignment]
            if f is not None and f.f_code.co_filename.endswith("xen/xenstore.py"):
                bare.append(f"{f.f_code.co_name}:{f.f_lineno}")
        real_point(name)

    sched.point = point  # type: ignore[method-assign]
    try:
        _traffic(host)
    finally:
        sched.point = real_point  # type: ignore[method-assign]
    assert bare == []


def test_xenwatch_idle_wait_is_not_counted_by_the_hung_task_watchdog(host: Host) -> None:
    g = host.create_guest("g1", memory_mb=4)
    host.sched.yield_()
    t = xs(g).xenwatch
    assert t.state is ThreadState.BLOCKED
    assert t.wait_counted is False  # PIDLE: idling for work, like TASK_IDLE


def test_a_reset_while_a_request_is_at_its_write_barrier_publishes_nothing(host: Host) -> None:
    """The bytes are copied with ring_lock dropped (xs_write_store); a reset meanwhile
    makes the ring's barrier abandon the copy: req_prod never covers the stale bytes."""
    g = host.create_guest("g1", memory_mb=4)
    c = xs(g)
    page = store_page(g)
    sched = host.sched
    real_point = sched.point
    seen: list[int] = []

    def point(name: str) -> None:
        if name == "wmb" and not seen and sched.curthread.name == "g1/test":
            seen.append(u32(page, 2052))  # req_prod at the barrier
            c._broken("reset under test")
        real_point(name)

    ring = host.xenstore.rings[g.domid]
    before = ring.statistics().request_bytes
    sched.point = point  # type: ignore[method-assign]
    try:
        assert on_guest(host, g, lambda: c.xs_read(XST_NIL, "name")) == (errno.EIO, b"")
    finally:
        sched.point = real_point  # type: ignore[method-assign]
    assert len(seen) == 1
    host.sched.run(until=lambda: c.connected)
    assert c.statistics().reconnects == 1
    st = ring.statistics()
    assert st.request_bytes == before and st.errors == 0  # the daemon saw none of it
    assert on_guest(host, g, lambda: c.xs_read(XST_NIL, "name")) == (0, b"g1")
    page.release()
