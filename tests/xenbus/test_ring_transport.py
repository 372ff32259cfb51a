"""The xenstore ring transport: stress, wrap-around, hostile guests, the core lock."""

from __future__ import annotations

import errno
import random
from collections.abc import Callable, Iterator

import pytest
from xenbus_testlib import (
    CONNECTION,
    ERROR,
    FEATURES,
    REQ,
    REQ_CONS,
    REQ_PROD,
    RSP_CONS,
    RSP_PROD,
    U32,
    on_guest,
    put_u32,
    store_page,
    u32,
    xs,
)

from gntdma.abi.xs_wire import (
    XENSTORE_ERROR_NONE,
    XENSTORE_ERROR_PROTO,
    XENSTORE_ERROR_RINGIDX,
)
from gntdma.sched import WITNESS, RandomStrategy, ThreadState
from gntdma.toolstack.host import Guest, Host
from gntdma.xen.xenbus import XST_NIL, XsWatch

HDR = U32.size * 4


def raw_msg(type_: int, payload: bytes, req_id: int = 77, tx_id: int = 0) -> bytes:
    return b"".join(U32.pack(v) for v in (type_, req_id, tx_id, len(payload))) + payload


def run_workers(host: Host, workers: list[tuple[Guest, Callable[[], None]]]) -> None:
    threads = [host.sched.spawn(fn, name=f"{g.name}/w{i}", domain=g.kernel)
               for i, (g, fn) in enumerate(workers)]
    host.sched.run(until=lambda: all(t.state is ThreadState.DONE for t in threads))
    for t in threads:
        if t.exc is not None:
            raise t.exc


def small_requests(g: Guest, wid: int, n: int) -> Callable[[], None]:
    def body() -> None:
        c = xs(g)
        for j in range(n):
            key = f"stress/{wid}/{j % 7}"
            assert c.xs_write(XST_NIL, key, "", f"{wid}:{j}") == 0
            assert c.xs_read(XST_NIL, key) == (0, f"{wid}:{j}".encode())
            if j % 10 == 9:
                err, names = c.xs_directory(XST_NIL, f"stress/{wid}")
                assert err == 0 and len(names) == 7
        assert c.xs_rm(XST_NIL, f"stress/{wid}") == 0

    return body


def test_many_small_requests_from_several_threads_and_guests(host: Host) -> None:
    guests = [host.create_guest(f"g{i}", memory_mb=4) for i in range(3)]
    workers = [(g, small_requests(g, w, 150)) for g in guests for w in range(4)]
    workers += [(host.dom0, small_requests(host.dom0, 9, 100))]
    run_workers(host, workers)
    for g in guests:
        st = host.xenstore.rings[g.domid].statistics()
        assert st.errors == 0 and st.reconnects == 0
        # 4 workers x 150 x (write + read) at least, each request over 16 bytes.
        assert st.request_bytes > 4 * 150 * 2 * HDR
        assert xs(g).statistics().pending == 0
    assert host.xenstored.statistics().transactions == 0


def test_large_messages_wrap_the_rings(host: Host) -> None:
    """Requests and replies bigger than a ring go through in pieces, at every offset."""
    d0 = xs(host.dom0)
    base = "/local/domain/0/big"
    sizes = [1, 1000, 1023, 1024, 1025, 3000, 4096 - len(base) - 10]
    rng = random.Random(4)

    def body() -> None:
        for _round in range(3):
            for size in sizes:
                value = bytes(rng.randrange(32, 127) for _ in range(size))
                assert d0.xs_write(XST_NIL, base, f"v{size}", value) == 0
                assert d0.xs_read(XST_NIL, base, f"v{size}") == (0, value)
            err, names = d0.xs_directory(XST_NIL, base)
            assert err == 0 and len(names) == len(sizes)
        # Many children: a DIRECTORY reply over a ring's size.
        for i in range(120):
            assert d0.xs_mkdir(XST_NIL, base, f"child-with-a-long-name-{i:04d}") == 0
        err, names = d0.xs_directory(XST_NIL, base)
        assert err == 0 and len(names) == 120 + len(sizes)
        assert d0.xs_rm(XST_NIL, base) == 0

    on_guest(host, host.dom0, body)
    st = host.xenstore.rings[0].statistics()
    assert st.request_bytes > 3 * sum(sizes) and st.response_bytes > 120 * 28


def test_unknown_message_type_gets_an_error_not_a_reset(host: Host) -> None:
    g = host.create_guest("g1", memory_mb=4)
    c = xs(g)
    assert on_guest(host, g, lambda: c._talk(99, XST_NIL, b"x\0")) == (errno.ENOSYS, b"")
    assert on_guest(host, g, lambda: c._talk(8, XST_NIL, b"5\x000\x001\0"))[0] == errno.EACCES
    assert c.xs_read(XST_NIL, "name") == (0, b"g1")
    assert host.xenstore.rings[g.domid].statistics().errors == 0


# -- hostile guests ---------------------------------------------------------------------


def scribble_indices(page: memoryview, how: str) -> None:
    if how == "req_prod far ahead":
        put_u32(page, REQ_PROD, u32(page, REQ_CONS) + 5000)
    elif how == "req_prod behind req_cons":
        put_u32(page, REQ_PROD, u32(page, REQ_CONS) - 1)
    elif how == "rsp_cons past rsp_prod":
        # Checked when the daemon has a reply to write: send it a request too.
        put_u32(page, RSP_CONS, u32(page, RSP_PROD) + 2)
        prod = u32(page, REQ_PROD)
        msg = raw_msg(2, b"name\0")
        for i, b in enumerate(msg):
            page[REQ + ((prod + i) & 1023)] = b
        put_u32(page, REQ_PROD, prod + len(msg))
    elif how == "oversized message":
        prod = u32(page, REQ_PROD)
        msg = raw_msg(2, b"x" * 16)[:12] + U32.pack(70000)  # len 70000
        for i, b in enumerate(msg):
            page[REQ + ((prod + i) & 1023)] = b
        put_u32(page, REQ_PROD, prod + len(msg))
    elif how == "random bytes":
        rng = random.Random(7)
        prod = u32(page, REQ_PROD)
        junk = bytes(rng.randrange(256) for _ in range(600))
        junk = junk[:12] + U32.pack(0xFFFF0000) + junk[16:]  # make sure it is bad
        for i, b in enumerate(junk):
            page[REQ + ((prod + i) & 1023)] = b
        put_u32(page, REQ_PROD, prod + len(junk))
    else:
        raise AssertionError(how)


HOSTILE = ["req_prod far ahead", "req_prod behind req_cons", "rsp_cons past rsp_prod",
           "oversized message", "random bytes"]


@pytest.mark.parametrize("how", HOSTILE)
def test_a_hostile_guest_gets_its_connection_reset_and_others_go_on(
        host: Host, how: str) -> None:
    bad = host.create_guest("bad", memory_mb=4)
    good = host.create_guest("good", memory_mb=4)
    home = f"/local/domain/{bad.domid}"
    events: list[str] = []
    w = XsWatch(f"{home}/w", lambda p, t: events.append(p))
    assert xs(bad).xs_register_watch(w) == 0
    assert xs(bad).xs_write(XST_NIL, "w", "", "1") == 0
    host.sched.run(until=lambda: len(events) >= 2)
    ring = host.xenstore.rings[bad.domid]
    old_conn = ring.conn
    assert old_conn.watches

    # The guest's own kernel goes hostile: garbage straight into the shared page.
    page = store_page(bad)
    scribble_indices(page, how)
    assert bad.hc.evtchn_send(xs(bad).store_port) == 0
    # Meanwhile the other guest works.
    run_workers(host, [(good, small_requests(good, 0, 30))])
    host.sched.yield_()

    st = ring.statistics()
    assert st.errors == 1
    assert old_conn.closed and old_conn.watches == [] and old_conn.transactions == {}
    want = XENSTORE_ERROR_PROTO if how in ("oversized message", "random bytes") \
        else XENSTORE_ERROR_RINGIDX
    assert st.last_error == want
    assert ring.error in (XENSTORE_ERROR_NONE, want)  # the client may have reset already
    assert host.xenstore.rings[good.domid].statistics().errors == 0
    assert xs(good).xs_read(XST_NIL, "name") == (0, b"good")

    # The hostile guest's client asked for a reset (XENSTORE_RECONNECT) and works again,
    # with its watch registered anew on the fresh connection.
    host.sched.run(until=lambda: xs(bad).connected)
    assert xs(bad).statistics().reconnects == 1 and ring.statistics().reconnects == 1
    assert u32(page, ERROR) == XENSTORE_ERROR_NONE and u32(page, CONNECTION) == 0
    assert u32(page, FEATURES) == 3
    page.release()
    assert xs(bad).xs_read(XST_NIL, "name") == (0, b"bad")
    host.sched.run(until=lambda: bool(ring.conn.watches))
    n = len(events)
    assert host.xenstored.statistics().watches == 1
    host.xenstored.write(f"{home}/w", b"2")
    host.sched.run(until=lambda: len(events) > n)
    assert xs(bad).xs_unregister_watch(w) == 0


def test_a_guest_that_keeps_writing_garbage_is_ignored(host: Host) -> None:
    """No client: after the reset the daemon ignores the ring until a reconnect request."""
    bad = host.create_guest("bad", memory_mb=4)
    xs(bad).xs_detach()  # the guest's kernel stops using xenstore properly
    port = host.xenstore.store_ports[bad.domid]
    ring = host.xenstore.rings[bad.domid]
    page = store_page(bad)
    for _ in range(5):
        put_u32(page, REQ_PROD, u32(page, REQ_CONS) + 4000)
        bad.hc.evtchn_send(port)
        host.sched.yield_()
    assert ring.statistics().errors == 1
    assert u32(page, ERROR) == XENSTORE_ERROR_RINGIDX
    # A reconnect request resets the ring; then requests are served again.
    put_u32(page, CONNECTION, 1)
    bad.hc.evtchn_send(port)
    host.sched.yield_()
    assert u32(page, CONNECTION) == 0 and u32(page, ERROR) == 0
    assert all(u32(page, off) == 0 for off in (REQ_CONS, REQ_PROD, RSP_CONS, RSP_PROD))
    msg = raw_msg(2, b"name\0", req_id=5)
    page[REQ : REQ + len(msg)] = msg
    put_u32(page, REQ_PROD, len(msg))
    bad.hc.evtchn_send(port)
    host.sched.yield_()
    n = u32(page, RSP_PROD)
    reply = bytes(page[1024 : 1024 + n])
    assert reply == raw_msg(2, b"bad", req_id=5)
    page.release()
    bad.xenstore = None  # detached above


def test_a_guest_scribbling_the_daemons_indices_only_hurts_itself(host: Host) -> None:
    g = host.create_guest("g1", memory_mb=4)
    page = store_page(g)
    put_u32(page, REQ_CONS, 0xDEAD)  # the daemon's index: it keeps its own copy
    put_u32(page, RSP_PROD, 0xBEEF)
    page.release()
    other = host.create_guest("g2", memory_mb=4)
    run_workers(host, [(other, small_requests(other, 0, 10))])
    assert host.xenstore.rings[other.domid].statistics().errors == 0


# -- the core lock is never held across a scheduling point ------------------------------


@pytest.fixture(params=[11, 12, 13])
def preemptive_host(request: pytest.FixtureRequest) -> Iterator[Host]:
    WITNESS.reset()
    h = Host(strategy=RandomStrategy(request.param))
    lock = h.xenstored.lock
    held_at: list[str] = []
    points = [0]
    sched = h.sched
    real_yield, real_block = sched.yield_, sched.block

    def yield_(point: str = "yield") -> None:
        points[0] += 1
        if lock._is_owned():  # type: ignore[attr-defined]
            held_at.append(point)
        real_yield(point)

    def block(wchan: object, wmesg: str, timeout: float = 0.0, **kw: bool) -> int:
        if lock._is_owned():  # type: ignore[attr-defined]
            held_at.append(wmesg)
        return real_block(wchan, wmesg, timeout, **kw)

    sched.yield_ = yield_  # type: ignore[method-assign]
    sched.block = block  # type: ignore[method-assign]
    try:
        yield h
        assert points[0] > 1000  # the strategy did preempt, at barriers and locks
        assert held_at == []
        h.sched.yield_()
        assert h.leaks() == []
        assert WITNESS.reports == []
    finally:
        h.close()
        WITNESS.reset()


def test_preemptive_schedules_never_find_the_core_lock_held(preemptive_host: Host) -> None:
    host = preemptive_host
    with host.xenstored.lock:  # the check itself works
        assert host.xenstored.lock._is_owned()  # type: ignore[attr-defined]
    guests = [host.create_guest(f"g{i}", memory_mb=4) for i in range(2)]
    seen: list[str] = []
    for g in guests:
        w = XsWatch("stress", lambda p, t: seen.append(p))
        assert xs(g).xs_register_watch(w) == 0
    workers = [(g, small_requests(g, w, 40)) for g in guests for w in range(3)]
    run_workers(host, workers)
    assert len(seen) > 10
    for g in guests:
        for token, w in list(xs(g)._watches.items()):
            assert xs(g).xs_unregister_watch(w) == 0, token
