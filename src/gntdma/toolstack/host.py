"""A host: the scheduler, the hypervisor, dom0 and guests with their kernels.

What ``xl create`` and the boot of a guest kernel do, in one object: create the
domain, attach a FreeBSD-style kernel to its memory, set up its grant table.
:meth:`Host.leaks` lists everything still held (grant entries, mappings,
maptrack handles, ports, malloc bytes, bus_dma maps), and :meth:`Host.close`
tears it all down.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, final

from gntdma.hv import Domain, Hypervisor
from gntdma.sched import WITNESS, Clock, KernelPanic, KThread, Scheduler, Strategy
from gntdma.sys import Kernel
from gntdma.toolstack.xs import GUEST_SPECIAL_PAGES, GuestPhysMem, HostXenstore
from gntdma.xen.busdma import xen_busdma_attach
from gntdma.xen.gnttab import GntTab
from gntdma.xen.hypercall import Hypercalls
from gntdma.xen.xenstore import XenStore

__all__ = ["Guest", "Host"]

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
    ) -> Guest:
        """Create a domain and boot its kernel (grant table with one frame)."""
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
        kernel = Kernel(name, GuestPhysMem(d.memory), seed=self.seed * 1000 + d.domid)
        gt = GntTab(hc, kernel.enqueue_swi, self.callback_delivery)
        xen_busdma_attach(kernel, gt)
        g = Guest(name, d, hc, kernel, gt)
        self.guests[d.domid] = g
        self.xenstore.domain_created(g)
        return g

    def _on_thread_exception(self, t: KThread, exc: BaseException) -> bool:
        """A kernel thread died: a guest's panic crashes that guest only (DESIGN 3).

        The guest is marked crashed (``crashed``) and the scheduler goes on with
        every other domain; its event channels are closed so that nothing is
        delivered to it any more. A panic of dom0, or of a thread of no domain,
        stops the host (the exception goes on up).
        """
        if not isinstance(exc, KernelPanic):
            return False
        for g in self.guests.values():
            if (t.domain is g.kernel or t.domain is g.domain) and g.domid != 0:
                if g.name not in self.crashed:
                    self.crashed[g.name] = f"panic in {t.name}: {exc}"
                return True
        return False

    def destroy_guest(self, g: Guest) -> None:
        """Shut the guest's kernel down and destroy its domain."""
        self.xenstore.domain_destroyed(g)
        g.kernel.shutdown()
        self.hv.destroy_domain(g.domid)
        del self.guests[g.domid]

    def leaks(self) -> list[str]:
        """Everything still held that a clean teardown must have given back."""
        out: list[str] = []
        for s in self.hv.statistics().domains:
            s = self.xenstore.discount(s)  # the xenstore rings' own ports and mappings
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
        self.xenstore.close(self.guests.values())
        for g in sorted(self.guests.values(), key=lambda g: -g.domid):
            g.kernel.shutdown()
        self.sched.shutdown()
        for domid in sorted(self.hv.domains, reverse=True):
            self.hv.destroy_domain(domid)
        self.guests.clear()
        Scheduler.uninstall()

    @property
    def witness(self) -> object:
        return WITNESS
