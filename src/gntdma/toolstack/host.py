"""A host: the scheduler, the hypervisor, dom0 and guests with their kernels.

What ``xl create`` and the boot of a guest kernel do, in one object: create the
domain, attach a FreeBSD-style kernel to its memory, set up its grant table.
:meth:`Host.leaks` lists everything still held (grant entries, mappings,
maptrack handles, ports, malloc bytes, bus_dma maps), and :meth:`Host.close`
tears it all down (devices still attached are abandoned without I/O first).

A panic in a guest crashes that guest only (DESIGN 3), as ``xl`` with its
default ``on_crash = "destroy"`` handles it: the guest's threads stop where
they are (its vcpus never run again), and a toolstack thread destroys the
domain at once, as libxl's ``libxl__destroy_domid`` does: every device the
toolstack attached is removed by force (``libxl__devices_destroy``: frontend
directory gone, backend ``online`` 0 and Closing, a wait for the backend to
close, which disconnects, unmaps and frees its ring), then the domain's
xenstore and the domain itself (its event channels closed, its grant table
released). No code of the dead guest runs in any of this.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Final, final

from gntdma.errors import GntdmaError
from gntdma.hv import Domain, Hypervisor
from gntdma.sched import (
    WITNESS,
    Clock,
    KernelPanic,
    KThread,
    Scheduler,
    Strategy,
    ThreadState,
)
from gntdma.sys import Kernel, KernelTunables
from gntdma.toolstack.xs import GUEST_SPECIAL_PAGES, GuestPhysMem, HostXenstore
from gntdma.xen.busdma import xen_busdma_attach
from gntdma.xen.gnttab import GntTab
from gntdma.xen.hypercall import Hypercalls
from gntdma.xen.xenstore import XenStore

__all__ = ["CrashTeardown", "Guest", "GuestCrashed", "GuestDevice", "Host"]

PAGES_PER_MIB: Final = 256


@final
@dataclass(eq=False)
class Guest:
    """A domain with its kernel: the hypercall shim, the grant table."""

    name: str
    domain: Domain
    hc: Hypercalls
    kernel: Kernel
    gnttab: GntTab
    #: the kernel's xenstore client (set up by HostXenstore; None once torn down)
    xenstore: XenStore | None = None

    @property
    def domid(self) -> int:
        return self.domain.domid


@final
@dataclass(eq=False)
class GuestDevice:
    """A device the toolstack attached to a guest (a vbd), as the host tears it down."""

    name: str
    #: Forced removal after the guest crashed (``libxl__devices_destroy``): sleeps on
    #: a toolstack thread; True if the backend closed cleanly.
    destroy: Callable[[], bool]
    #: The host goes away with the device still attached: drop it, no I/O, no sleep.
    abandon: Callable[[], None]


@final
@dataclass(eq=False)
class CrashTeardown:
    """A guest that crashed, and its destruction by the toolstack."""

    name: str
    why: str  #: the panic
    at: float  #: when it crashed (the run's clock)
    devices: list[str] = field(default_factory=list)  #: what was torn down
    done_at: float | None = None  #: when the domain was destroyed
    clean: bool = False  #: every backend closed in time


class GuestCrashed(GntdmaError):
    """What the toolstack was doing with a guest ended: the guest crashed (its
    kernel panicked); the host destroys it (:meth:`Host.crash_guest`)."""

    def __init__(self, guest: Guest, why: str) -> None:
        self.guest = guest
        self.why = why
        super().__init__(f"{guest.name} crashed: {why}")


@final
class Host:
    """One emulated Xen host."""

    def __init__(
        self,
        *,
        seed: int = 0,
        callback_delivery: str = "taskqueue",
        io_mode: str = "inline",
        strategy: Strategy | None = None,
        clock: Clock | None = None,
        dom0_memory_mb: int = 64,
        sched: Scheduler | None = None,
    ) -> None:
        """Build a host; with ``sched`` it runs on that (installed) scheduler."""
        self.seed = seed
        self.callback_delivery = callback_delivery
        if sched is None:
            sched = Scheduler(strategy=strategy, clock=clock, io_mode=io_mode)
        self.sched = sched.install()
        self.hv = Hypervisor()
        self.guests: dict[int, Guest] = {}
        #: Guests whose kernel panicked, by name: the panic message (DESIGN 3).
        self.crashed: dict[str, str] = {}
        #: Their destruction, by name.
        self.crashes: dict[str, CrashTeardown] = {}
        #: Devices the toolstack attached, by frontend domid, in attach order.
        self.devices: dict[int, list[GuestDevice]] = {}
        self._destroyers: list[KThread] = []
        self.sched.on_thread_exception = self._on_thread_exception
        self.closed = False
        # xenstore (issue 4): one daemon per host, a ring per domain.
        self.xenstore = HostXenstore(self.hv, self.sched)
        self.xenstored = self.xenstore.xenstored
        self.dom0 = self.create_guest("Domain-0", memory_mb=dom0_memory_mb, domid=0)

    def create_guest(
        self,
        name: str,
        *,
        memory_mb: int = 64,
        high_memory_mb: int = 0,
        max_grant_frames: int = 64,
        max_maptrack_frames: int = 1024,
        domid: int | None = None,
        tunables: KernelTunables | None = None,
    ) -> Guest:
        """Create a domain and boot its kernel (grant table with one frame); ``tunables``
        are its kernel's debugging switches (default: all on)."""
        if memory_mb <= 0:
            raise ValueError("memory must be at least 1 MiB")
        d = self.hv.create_domain(
            name,
            memory_mb * PAGES_PER_MIB + GUEST_SPECIAL_PAGES,  # + the xenstore page
            high_pages=high_memory_mb * PAGES_PER_MIB,
            max_grant_frames=max_grant_frames,
            max_maptrack_frames=max_maptrack_frames,
            domid=domid,
        )
        hc = Hypercalls(self.hv, d.domid)
        kernel = Kernel(name, GuestPhysMem(d.memory), seed=self.seed * 1000 + d.domid,
                        tunables=tunables)
        gt = GntTab(hc, kernel.enqueue_swi, self.callback_delivery)
        g = Guest(name, d, hc, kernel, gt)
        self.guests[d.domid] = g
        if d.domid == 0:
            xen_busdma_attach(kernel, gt)
            self.xenstore.domain_created(g)
            return g
        # The guest's boot: a panic in it crashes the guest (GuestCrashed).
        with self.guest_code(g, "booting"):
            xen_busdma_attach(kernel, gt)
            self.xenstore.domain_created(g)
        return g

    @contextlib.contextmanager
    def guest_code(self, g: Guest, what: str) -> Iterator[None]:
        """Guest kernel code the toolstack runs for ``g`` on its own thread (its
        boot, a driver's attach): a panic there crashes ``g`` only, as one in a
        thread of ``g`` does, and raises :class:`GuestCrashed` to the caller."""
        try:
            yield
        except KernelPanic as e:
            if g.domid == 0:
                raise
            self.crash_guest(g, f"panic while {what}: {e}")
            raise GuestCrashed(g, self.crashed[g.name]) from e

    def add_device(self, g: Guest, dev: GuestDevice) -> None:
        """Record a device attached to ``g`` (torn down with it if it crashes)."""
        self.devices.setdefault(g.domid, []).append(dev)

    def remove_device(self, g: Guest, dev: GuestDevice) -> None:
        """Forget a device that was detached."""
        devs = self.devices.get(g.domid, [])
        if dev in devs:
            devs.remove(dev)
        if not devs:
            self.devices.pop(g.domid, None)

    def _on_thread_exception(self, t: KThread, exc: BaseException) -> bool:
        """A kernel thread died: a guest's panic crashes that guest only (DESIGN 3).

        Runs in the scheduler's hub. A panic of dom0, or of a thread of no
        domain, stops the host (the exception goes on up).
        """
        if not isinstance(exc, KernelPanic):
            return False
        for g in self.guests.values():
            if self._owns(g, t) and g.domid != 0:
                self.crash_guest(g, f"panic in {t.name}: {exc}")
                return True
        return False

    @staticmethod
    def _owns(g: Guest, t: KThread) -> bool:
        return t.domain is g.kernel or t.domain is g.domain

    def crash_guest(self, g: Guest, why: str) -> None:
        """``g`` crashed: stop its threads and destroy it on a toolstack thread.

        Never sleeps (it runs in the hub or on thread0); :meth:`wait_crashes`
        waits for the destruction.
        """
        if g.name in self.crashed or g.domid == 0:
            return
        self.crashed[g.name] = why
        crash = CrashTeardown(g.name, why, self.sched.now())
        self.crashes[g.name] = crash
        for t in list(self.sched.threads):
            if self._owns(g, t):
                self.sched.kill(t)
        self._prune_destroyers()
        self._destroyers.append(self.sched.spawn(
            self._destroy_crashed, g, crash, name=f"xl/{g.name}/destroy"))

    def _destroy_crashed(self, g: Guest, crash: CrashTeardown) -> None:
        """libxl__destroy_domid for a dead guest: its devices by force, then the domain."""
        clean = True
        for dev in reversed(self.devices.pop(g.domid, [])):
            crash.devices.append(dev.name)
            clean = dev.destroy() and clean
        self._destroy_domain(g, crashed=True)
        crash.clean = clean
        crash.done_at = self.sched.now()

    def wait_crashes(self) -> None:
        """Sleep until every crashed guest has been destroyed (thread0 only)."""
        self.sched.run(until=lambda: all(t.state is ThreadState.DONE
                                         for t in self._destroyers))
        self._prune_destroyers()

    def _prune_destroyers(self) -> None:
        """Forget the destroyer threads that finished (their CrashTeardown stays)."""
        self._destroyers = [t for t in self._destroyers if t.state is not ThreadState.DONE]

    def destroy_guest(self, g: Guest) -> None:
        """Destroy the guest's domain as ``libxl__destroy_domid`` does: the devices
        the toolstack still has attached are removed by force first
        (``libxl__devices_destroy``), then its kernel is shut down and the domain
        destroyed. Sleeps when devices remain (thread0 or a toolstack thread). A
        crashed guest's devices are its destroyer's (:meth:`crash_guest`)."""
        if g.domid in self.guests and g.name not in self.crashed:  # else its destroyer's
            for dev in reversed(self.devices.pop(g.domid, [])):
                dev.destroy()
        self._destroy_domain(g, crashed=g.name in self.crashed)

    def _destroy_domain(self, g: Guest, *, crashed: bool) -> None:
        if g.domid not in self.guests:
            return
        # A crashed guest's kernel never runs again: none of its code is called.
        self.xenstore.domain_destroyed(g, crashed=crashed)
        if not crashed:
            g.kernel.shutdown()
        # xc_domain_destroy: the domain's vCPUs never run again. A thread of it the
        # shutdown left running ends here, before its memory goes (crash_guest did so).
        for t in list(self.sched.threads):
            if self._owns(g, t):
                self.sched.kill(t)
        self.hv.destroy_domain(g.domid)
        del self.guests[g.domid]

    def leaks(self) -> list[str]:
        """Everything still held that a clean teardown must have given back."""
        out: list[str] = []
        held = self.xenstore.held()
        for s in self.hv.statistics().domains:
            s = self.xenstore.discount(s, held)  # the xenstore rings' own ports and mappings
            if s.mappings:
                out.append(f"{s.name}: {s.mappings} grant mappings still held")
            if s.grants_pinned:
                out.append(f"{s.name}: {s.grants_pinned} grant entries still pinned")
            if s.ports:
                out.append(f"{s.name}: {s.ports} event channels open")
        for g in self.guests.values():
            st = g.gnttab.statistics()
            if st.allocated:
                out.append(f"{g.name}: {st.allocated} grant references not freed")
            if st.granted:
                out.append(f"{g.name}: {st.granted} grant entries still granted")
            if st.callbacks_queued:
                out.append(f"{g.name}: {st.callbacks_queued} free callbacks queued")
            out.extend(f"{g.name}: {leak}" for leak in g.kernel.leaks())
        out.extend(self.xenstore.leaks(self.guests))
        return out

    def close(self) -> None:
        """Tear everything down (kernels, domains, threads)."""
        if self.closed:
            return
        self.closed = True
        for devs in self.devices.values():
            for dev in devs:
                dev.abandon()
        self.devices.clear()
        self.xenstore.close(self.guests.values(), crashed=set(self.crashed))
        for g in sorted(self.guests.values(), key=lambda g: -g.domid):
            if g.name not in self.crashed:
                g.kernel.shutdown()
        self.sched.shutdown()
        for domid in sorted(self.hv.domains, reverse=True):
            self.hv.destroy_domain(domid)
        self.guests.clear()
        Scheduler.uninstall()

    @property
    def witness(self) -> object:
        return WITNESS
