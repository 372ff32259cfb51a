"""Scenarios for ``gntdma explore``: real kernel code under a controlled scheduler.

Each scenario builds a host on the scheduler it is given, runs driver-like
threads over the real grant table and busdma_xen handlers, tears everything
down and returns what leaked. The explorer decides every interleaving.

``gnttab-shortage-blkfront`` is the seed's pattern: submitter threads queue
I/O with the driver's I/O lock held (bus_dmamap_load through a Xen tag whose
lockfunc is that lock), a backend in dom0 maps the grants and answers, and the
guest's completion thread unloads the maps under the same lock. The grant
table is small enough that loads defer. With FreeBSD's inline free-callback
delivery the completion thread, holding the I/O lock, frees references, the
grant table runs the deferred load's callback right there with its lock held,
and that callback takes the I/O lock again: the seed's recursion panic (or,
with a recursive I/O lock, its lock-order reversal). With the default
delivery the callback runs on taskqueue_swi with no lock held.

``gnttab-shortage-blkfront-recursive`` is the seed's next step: the I/O lock
made recursive. Inline delivery then gives the lock-order reversal between
``gnttab_list`` and ``xbd_io`` (and, in the right schedule, the deadlock).

``busdma-deferred-unload`` races an unload against a deferred load's
completion.

The drivers' own sleeps keep FreeBSD's rules: the mini ring and its event
channels are protected by ``blkif_ring``, the interlock of the backend's and
the interrupt thread's idle sleeps. ``scenarios_rules`` adds one scenario per
bug class those rules catch (lost wakeup, sleep with a mutex, ABBA with a
callout armed, a sleep mutex in a spin section); each fails by design.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field

from gntdma.abi.grant_table import (
    GNTMAP_host_map,
    GNTMAP_readonly,
    GNTST_okay,
    GnttabMapGrantRef,
    GNTTABOP_map_grant_ref,
    GNTTABOP_unmap_grant_ref,
)
from gntdma.abi.xen import PAGE_MASK, PAGE_SIZE
from gntdma.hv import map_grant_ref_op, unmap_grant_ref_op
from gntdma.sched import (
    MTX_DEF,
    MTX_DUPOK,
    MTX_RECURSE,
    PIDLE,
    Mutex,
    Scheduler,
    checkpoint,
    msleep,
    mtx_lock,
    mtx_unlock,
    wakeup,
)
from gntdma.sys import (
    BUS_DMA_WAITOK,
    BUS_DMASYNC_POSTWRITE,
    BUS_DMASYNC_PREWRITE,
    BUS_SPACE_MAXADDR,
    M_DEVBUF,
    M_WAITOK,
    BusDmaMap,
    BusDmaTag,
    MapState,
    bus_dma_segment_t,
    bus_dma_tag_create,
    bus_dma_tag_destroy,
    bus_dmamap_create,
    bus_dmamap_destroy,
    bus_dmamap_load,
    bus_dmamap_sync,
    bus_dmamap_unload,
    busdma_lock_mutex,
)
from gntdma.toolstack.host import Guest, Host
from gntdma.toolstack.scenarios_rules import RULE_SCENARIOS
from gntdma.xen.busdma import BUS_DMA_XEN_RO, xen_dmamap_get_grefs, xen_get_dma_tag

__all__ = ["BUILTIN_SCENARIOS", "SCENARIOS", "ScenarioFn", "make_scenario"]

ScenarioFn = Callable[[Scheduler], list[str]]

_PATTERN = bytes(range(256))


@dataclass(eq=False)
class _Cmd:
    """One I/O of the mini driver (xbd_command)."""

    idx: int
    map: BusDmaMap
    buf: int
    data: bytes
    state: str = "free"  # free, loading, queued, done
    refs: list[int] = field(default_factory=list)
    segs: list[bus_dma_segment_t] = field(default_factory=list)
    callbacks: int = 0
    ok: bool = False


@dataclass(eq=False)
class _Driver:
    host: Host
    guest: Guest
    lock: Mutex
    tag: BusDmaTag
    cmds: list[_Cmd]
    to_backend: list[_Cmd] = field(default_factory=list)
    completed: list[_Cmd] = field(default_factory=list)
    #: The guest's event-channel pending bit for "responses ready".
    irq: bool = False
    errors: list[str] = field(default_factory=list)
    done: int = 0
    #: The shared ring and its event channels: protects to_backend, completed and
    #: irq, and is the interlock of the backend's and the interrupt thread's sleeps.
    ring: Mutex = field(default_factory=lambda: Mutex("blkif_ring"))


def _setup(s: Scheduler, delivery: str, ncmds: int, pages: int,
           free_refs: int, recursive: bool = False) -> tuple[_Driver, list[int]]:
    d, heads = _setup_disks(s, delivery, 1, ncmds, pages, free_refs, recursive)
    return d[0], heads


def _setup_disks(s: Scheduler, delivery: str, ndisks: int, ncmds: int, pages: int,
                 free_refs: int, recursive: bool) -> tuple[list[_Driver], list[int]]:
    """A guest with ``ndisks`` mini xbd drivers sharing its grant table."""
    host = Host(callback_delivery=delivery, sched=s, dom0_memory_mb=4)
    g = host.create_guest("guest1", memory_mb=8, max_grant_frames=1)
    drivers = []
    for disk in range(ndisks):
        # FreeBSD's xbd_io_lock is MTX_DEF, not recursive; the seed made it
        # recursive to get past the recursion panic, and then met the reversal.
        # Every disk's lock is of the one class "xbd_io", as in FreeBSD.
        lock = Mutex("xbd_io", _XBD_IO_RECURSE if recursive else _XBD_IO)
        error, tag = bus_dma_tag_create(
            xen_get_dma_tag(g.kernel), 512, PAGE_SIZE, BUS_SPACE_MAXADDR, BUS_SPACE_MAXADDR,
            pages * PAGE_SIZE, pages, PAGE_SIZE, 0, busdma_lock_mutex, lock)
        assert error == 0 and tag is not None
        cmds = []
        for i in range(ncmds):
            error, m = bus_dmamap_create(tag, 0)
            assert error == 0 and m is not None
            n = pages * PAGE_SIZE - 512
            data = _cmd_data(n, (disk * 7 + i + 1) * 37 % 256)
            buf = g.kernel.malloc(len(data), M_DEVBUF, M_WAITOK)
            g.kernel.kva_write(buf, data)
            cmds.append(_Cmd(i, m, buf, data))
        drivers.append(_Driver(host, g, lock, tag, cmds))
    # Hold all but ``free_refs`` references: loads must defer.
    gt = g.gnttab
    heads = []
    err, h = gt.gnttab_alloc_grant_references(gt.free_count - free_refs)
    if err == 0:
        heads.append(h.head)
    return drivers, heads


def _teardown(d: _Driver | list[_Driver], heads: list[int]) -> list[str]:
    drivers = d if isinstance(d, list) else [d]
    first = drivers[0]
    g = first.guest
    for dr in drivers:
        mtx_lock(dr.lock)
        for c in dr.cmds:
            bus_dmamap_unload(dr.tag, c.map)
        mtx_unlock(dr.lock)
    for h in heads:
        g.gnttab.gnttab_free_grant_references(h)
    leaks: list[str] = []
    for dr in drivers:
        for c in dr.cmds:
            bus_dmamap_destroy(dr.tag, c.map)
            g.kernel.free(c.buf, M_DEVBUF)
        bus_dma_tag_destroy(dr.tag)
        leaks += dr.errors
    first.host.sched.run(until=lambda: _no_tasks(g))
    leaks += first.host.leaks()
    first.host.close()
    return leaks


def _queue_cb(d: _Driver, c: _Cmd) -> Callable[[object, list[bus_dma_segment_t], int, int],
                                               None]:
    def cb(_arg: object, segs: list[bus_dma_segment_t], nseg: int, error: int) -> None:
        # xbd_queue_cb: runs with xbd_io held (directly, or via the tag's lockfunc).
        c.callbacks += 1
        if c.callbacks > 1:
            d.errors.append(f"cmd {c.idx}: load callback ran {c.callbacks} times")
        if d.lock.owner is None:
            d.errors.append(f"cmd {c.idx}: load callback ran without xbd_io held")
        if error != 0:
            d.errors.append(f"cmd {c.idx}: load failed with {error}")
            c.state = "done"
            wakeup(c)
            return
        bus_dmamap_sync(d.tag, c.map, BUS_DMASYNC_PREWRITE)
        c.refs = xen_dmamap_get_grefs(c.map)
        c.segs = list(segs)
        c.state = "queued"
        mtx_lock(d.ring)
        d.to_backend.append(c)
        wakeup(d.to_backend)
        mtx_unlock(d.ring)
    return cb


def _submitter(d: _Driver, mine: list[_Cmd]) -> None:
    for c in mine:
        mtx_lock(d.lock)
        c.state = "loading"
        c.callbacks = 0
        rv = bus_dmamap_load(d.tag, c.map, c.buf, len(c.data), _queue_cb(d, c), None,
                             BUS_DMA_WAITOK | BUS_DMA_XEN_RO)
        if rv not in (0, errno.EINPROGRESS):
            d.errors.append(f"cmd {c.idx}: bus_dmamap_load returned {rv}")
        while c.state != "done":  # the I/O completes (possibly after a deferral)
            msleep(c, d.lock, "xbdio")
        mtx_unlock(d.lock)


def _backend(d: _Driver, total: int) -> None:
    """dom0: map each request's grants, check the bytes, unmap, respond."""
    hc = d.host.dom0.hc
    served = 0
    while served < total:
        mtx_lock(d.ring)
        while not d.to_backend:
            msleep(d.to_backend, d.ring, "blkback", 0.0, PIDLE)
        c = d.to_backend.pop(0)
        mtx_unlock(d.ring)
        seen = b""
        for ref, seg in zip(c.refs, c.segs, strict=True):
            error, addr = hc.foreign.alloc()
            assert error == 0
            op = map_grant_ref_op(addr, _RO_MAP,
                                  ref, d.guest.domid)
            _, (r,) = hc.grant_table_op(GNTTABOP_map_grant_ref, [op])
            assert isinstance(r, GnttabMapGrantRef)
            if r.status != GNTST_okay:
                hc.foreign.free(addr)
                d.errors.append(f"cmd {c.idx}: backend map of ref {ref} failed: {r.status}")
                continue
            off = seg.ds_addr & PAGE_MASK
            seen += bytes(hc.mapped_page(r.handle)[off : off + seg.ds_len])
            checkpoint()
            hc.grant_table_op(GNTTABOP_unmap_grant_ref,
                              [unmap_grant_ref_op(addr, r.handle)])
            hc.foreign.free(addr)
        c.ok = seen == c.data
        if not c.ok:
            d.errors.append(f"cmd {c.idx}: backend read the wrong bytes")
        mtx_lock(d.ring)
        d.completed.append(c)
        d.irq = True  # notify: raise the guest's event channel
        wakeup(d)
        mtx_unlock(d.ring)
        served += 1


def _completion(d: _Driver, total: int) -> None:
    """xbd_int: with xbd_io held, unload finished I/O (frees its grant refs)."""
    while d.done < total:
        mtx_lock(d.ring)
        while not d.irq:  # the interrupt thread waits for its event channel
            msleep(d, d.ring, "xbdint", 0.0, PIDLE)
        d.irq = False  # clear pending before handling, as the upcall does
        batch = list(d.completed)
        d.completed.clear()
        mtx_unlock(d.ring)
        mtx_lock(d.lock)
        for c in batch:
            bus_dmamap_sync(d.tag, c.map, BUS_DMASYNC_POSTWRITE)
            bus_dmamap_unload(d.tag, c.map)
            c.state = "done"
            d.done += 1
            wakeup(c)
        mtx_unlock(d.lock)


def gnttab_shortage_blkfront(delivery: str, recursive: bool = False) -> ScenarioFn:
    def scenario(s: Scheduler) -> list[str]:
        drivers, heads = _setup_disks(s, delivery, 2, ncmds=3, pages=3, free_refs=5,
                                      recursive=recursive)
        try:
            for n, d in enumerate(drivers):
                total = len(d.cmds)
                s.spawn(_submitter, d, d.cmds[0::2], name=f"guest1/xbd{n}-submit0")
                s.spawn(_submitter, d, d.cmds[1::2], name=f"guest1/xbd{n}-submit1")
                s.spawn(_backend, d, total, name=f"dom0/blkback{n}")
                s.spawn(_completion, d, total, name=f"guest1/xbd{n}-int")
            s.run()
        except BaseException:
            drivers[0].host.close()
            raise
        return _teardown(drivers, heads)
    return scenario


def busdma_deferred_unload(delivery: str) -> ScenarioFn:
    def scenario(s: Scheduler) -> list[str]:
        d, heads = _setup(s, delivery, ncmds=2, pages=3, free_refs=2)
        gt = d.guest.gnttab
        c = d.cmds[0]

        def loader() -> None:
            mtx_lock(d.lock)
            rv = bus_dmamap_load(d.tag, c.map, c.buf, len(c.data), _queue_cb(d, c), None,
                                 BUS_DMA_WAITOK)
            if rv not in (0, errno.EINPROGRESS):
                d.errors.append(f"bus_dmamap_load returned {rv}")
            mtx_unlock(d.lock)

        def freer() -> None:
            checkpoint()
            if heads:
                gt.gnttab_free_grant_references(heads.pop())

        def unloader() -> None:
            checkpoint()
            mtx_lock(d.lock)
            was_busy = c.map.state is not MapState.IDLE
            bus_dmamap_unload(d.tag, c.map)
            after = c.callbacks
            mtx_unlock(d.lock)
            checkpoint()
            mtx_lock(d.lock)
            if was_busy and c.callbacks != after:
                d.errors.append("the load called back after it was unloaded")
            mtx_unlock(d.lock)

        try:
            s.spawn(loader, name="guest1/load")
            s.spawn(freer, name="guest1/free")
            s.spawn(unloader, name="guest1/unload")
            s.run()
            s.run(until=lambda: _no_tasks(d.guest))
            if c.callbacks > 1:
                d.errors.append(f"the load called back {c.callbacks} times")
            d.to_backend.clear()
        except BaseException:
            d.host.close()
            raise
        return _teardown(d, heads)
    return scenario


#: name -> factory taking the callback delivery ("taskqueue" or "inline").
SCENARIOS: dict[str, Callable[[str], ScenarioFn]] = {
    "gnttab-shortage-blkfront": gnttab_shortage_blkfront,
    "gnttab-shortage-blkfront-recursive": lambda d: gnttab_shortage_blkfront(d, True),
    "busdma-deferred-unload": busdma_deferred_unload,
    # One bug of each class the lock rules catch (scenarios_rules).
    **RULE_SCENARIOS,
}
#: The scenarios of gntdma itself; others are registered at run time (tests), and
#: travel to worker processes as their (importable) factory.
BUILTIN_SCENARIOS = frozenset(SCENARIOS)


def make_scenario(name: str, delivery: str) -> ScenarioFn:
    try:
        factory = SCENARIOS[name]
    except KeyError:
        raise ValueError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}") from None
    if delivery not in ("taskqueue", "inline"):
        raise ValueError(f"callback delivery must be taskqueue or inline, not {delivery!r}")
    return factory(delivery)


# At the end of the module so that the lines above, which WITNESS reports and
# saved replay files quote as sites, keep their numbers.
#: The flags of the backend's map and of the I/O lock, combined once (an enum
#: flag's ``|`` is Python code, run here for every grant the backend maps).
_RO_MAP = GNTMAP_host_map | GNTMAP_readonly
_XBD_IO = MTX_DEF | MTX_DUPOK
_XBD_IO_RECURSE = MTX_RECURSE | MTX_DUPOK

#: The bytes of each command, by (length, first byte): the same for every schedule.
_CMD_DATA: dict[tuple[int, int], bytes] = {}


def _cmd_data(n: int, start: int) -> bytes:
    """``n`` bytes of the 0..255 pattern from ``start`` (memoized: bytes are immutable)."""
    data = _CMD_DATA.get((n, start))
    if data is None:
        data = _CMD_DATA[(n, start)] = (_PATTERN * (n // 256 + 2))[start:][:n]
    return data


def _no_tasks(g: Guest) -> bool:
    """``g.kernel.statistics().taskqueue_pending == 0`` without the rest of the
    statistics: no task queued or running on the kernel's thread and swi queues."""
    k = g.kernel
    return k.taskqueue_thread.pending() + k.taskqueue_swi.pending() == 0
