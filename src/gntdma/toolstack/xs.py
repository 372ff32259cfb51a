"""The toolstack's xenstore: the host's xenstored, the domains' rings, devices, the socket.

What libxl and the domain builder do around xenstore, for a :class:`~gntdma.toolstack.host.Host`:

- Domain creation: the domain builder sets aside one page after the domain's
  RAM for the xenstore ring (the HVM "magic" page: the guest kernel's page
  allocator never sees it, see :class:`GuestPhysMem`), allocates the guest's
  store port (unbound, for dom0), seeds grant reference 1
  (``GNTTAB_RESERVED_XENSTORE``) with that page for dom0, introduces the domain
  (home directory ``/local/domain/<domid>`` with ``name`` and ``domid``) and
  makes the daemon's end of the ring (:class:`~gntdma.xenstored._ring.DomainRing`).
  The guest kernel then attaches its client (:class:`~gntdma.xen.xenstore.XenStore`)
  to the page and port, as a guest reads them from ``HVM_PARAM_STORE_PFN`` and
  ``HVM_PARAM_STORE_EVTCHN``. Dom0 gets a ring too (Linux dom0 with a local
  xenstored: the kernel's page and a loopback port); it is never introduced.
- Domain destruction: the domain's devices go, the client detaches, the ring is
  closed (port closed, page unmapped), the domain is released (every node it
  owns is removed, ``@releaseDomain`` fires) and grant reference 1 is cleared.
- Devices (:meth:`HostXenstore.add_device`, :meth:`HostXenstore.remove_device`):
  libxl's sequence. Add: both directories in one transaction, each end owning
  its own and reading the other's, both states Initialising. Remove: ``online``
  = 0 and backend ``state`` = Closing in one transaction, wait (10 s) for the
  backend to reach Closed, then remove both directories (and their parents
  that became empty).
- The socket (:class:`XenstoredSocket`): the daemon on a Unix socket in a
  private temporary directory, for ``XENSTORED_PATH=... xenstore-ls``.

The toolstack reaches the daemon through its own privileged connection
(:class:`ToolstackXs`), which is synchronous: the core answers inside ``feed``.
Waiting for a backend state sleeps on the scheduler (thread0 runs the
scheduler while it waits) and is woken by a watch.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import signal
import stat
import sys
import tempfile
import threading
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Final, TypeVar, final

from gntdma.abi.grant_table import GNTTAB_RESERVED_XENSTORE, GTF_permit_access
from gntdma.abi.xen import PAGE_SIZE
from gntdma.errors import GntdmaError
from gntdma.hv import DomainMemory, DomainStatistics, Hypervisor
from gntdma.sched import Scheduler, tsleep, wakeup
from gntdma.toolstack.interrupt import signals_deferred
from gntdma.xen.xenbus import (
    XENBUS_KEY_BACKEND,
    XENBUS_KEY_BACKEND_ID,
    XENBUS_KEY_FRONTEND,
    XENBUS_KEY_FRONTEND_ID,
    XENBUS_KEY_ONLINE,
    XENBUS_KEY_STATE,
    XenbusState,
    xenbus_backend_path,
    xenbus_frontend_path,
)
from gntdma.xen.xenstore import XenStore, xs_attach
from gntdma.xenstored import Message, MessageReader, Xenstored, XsdType, XsError, errno_from_name
from gntdma.xenstored._home import mkdir as xs_mkdir
from gntdma.xenstored._home import peek_children, write_with_perms
from gntdma.xenstored._ring import DomainRing

if TYPE_CHECKING:
    from gntdma.toolstack.host import Guest

__all__ = [
    "GUEST_SPECIAL_PAGES",
    "LIBXL_DESTROY_TIMEOUT",
    "DeviceDirs",
    "GuestPhysMem",
    "HeldByXenstore",
    "HostXenstore",
    "ToolstackXs",
    "XenstoredSocket",
    "XenstoreSetupError",
    "hold_until_signal",
    "serve_host_xenstored",
    "store_pfn",
]

#: Pages the domain builder puts after a domain's RAM: the xenstore ring page.
GUEST_SPECIAL_PAGES: Final = 1
#: How long libxl waits for a backend to close on unplug (seconds).
LIBXL_DESTROY_TIMEOUT: Final = 10.0

_T = TypeVar("_T")
_ZERO_PAGE: Final = bytes(PAGE_SIZE)


class XenstoreSetupError(GntdmaError):
    """A domain's xenstore ring, or a device's directories, cannot be set up."""


# -- the store page ------------------------------------------------------------------


def store_pfn(memory: DomainMemory) -> int:
    """The pfn of a domain's xenstore page: the last page of its low range."""
    return memory.low_pages - 1


@final
class GuestPhysMem:
    """A domain's memory as its kernel sees it: everything but the special pages."""

    def __init__(self, memory: DomainMemory) -> None:
        self._memory = memory
        ranges = list(memory.ranges)
        first, n = ranges[0]
        ranges[0] = (first, n - GUEST_SPECIAL_PAGES)
        self.ranges: Sequence[tuple[int, int]] = tuple(ranges)
        self._special = range(first + n - GUEST_SPECIAL_PAGES, first + n)

    def page(self, pfn: int) -> memoryview:
        if pfn in self._special:
            raise ValueError(f"pfn {pfn:#x} is a special page, not the kernel's")
        return self._memory.page(pfn)


# -- the toolstack's own connection ---------------------------------------------------


@final
class ToolstackXs:
    """A privileged, synchronous client on a core connection (libxl's xs handle)."""

    def __init__(self, xenstored: Xenstored, sched: Scheduler) -> None:
        self._sched = sched
        self.conn = xenstored.connect(0, name="toolstack")
        self._reader = MessageReader()
        self._req_ids = itertools.count(1)
        self._tokens = itertools.count(1)
        self._chan = object()
        self._waiting = False
        self._posted = False
        self.events: list[tuple[str, str]] = []
        self.conn.set_callbacks(on_output=self._on_output)

    def close(self) -> None:
        self.conn.set_callbacks(None, None)
        self.conn.close()

    def _on_output(self) -> None:
        # Core lock held, maybe on the socket's OS thread: only note and post.
        if self._waiting and not self._posted:
            self._posted = True
            self._sched.post(self._wake)

    def _wake(self) -> None:
        self._posted = False
        wakeup(self._chan)

    def _pump(self) -> list[Message]:
        replies: list[Message] = []
        for msg in self._reader.feed(self.conn.data_to_send()):
            if msg.type == XsdType.XS_WATCH_EVENT:
                parts = msg.payload.split(b"\0")
                self.events.append((parts[0].decode("latin-1"), parts[1].decode("latin-1")))
            else:
                replies.append(msg)
        del self.events[:-64]  # only recent ones are of interest
        return replies

    def request(self, type_: XsdType, payload: bytes, tx: int = 0) -> bytes:
        """One request; the reply payload, or XsError."""
        if self.conn.closed:
            raise XsError(errno.EIO, "toolstack connection closed")
        req_id = next(self._req_ids) & 0xFFFFFFFF
        self.conn.feed(Message(type_, req_id, tx, payload).encode())
        for msg in self._pump():
            if msg.req_id != req_id:
                continue
            if msg.type == XsdType.XS_ERROR:
                raise XsError(errno_from_name(msg.payload.rstrip(b"\0").decode("latin-1")))
            return msg.payload
        raise XsError(errno.EIO, f"no reply to request {req_id}")

    @staticmethod
    def _z(*parts: str) -> bytes:
        return b"".join(p.encode() + b"\0" for p in parts)

    def read(self, path: str, tx: int = 0) -> bytes:
        return self.request(XsdType.XS_READ, self._z(path), tx)

    def write(self, path: str, value: str | bytes, tx: int = 0) -> None:
        data = value.encode() if isinstance(value, str) else value
        self.request(XsdType.XS_WRITE, path.encode() + b"\0" + data, tx)

    def mkdir(self, path: str, tx: int = 0) -> None:
        self.request(XsdType.XS_MKDIR, self._z(path), tx)

    def rm(self, path: str, tx: int = 0) -> None:
        self.request(XsdType.XS_RM, self._z(path), tx)

    def directory(self, path: str, tx: int = 0) -> list[str]:
        data = self.request(XsdType.XS_DIRECTORY, self._z(path), tx)
        return [p.decode("latin-1") for p in data.split(b"\0")[:-1]]

    def exists(self, path: str, tx: int = 0) -> bool:
        try:
            self.read(path, tx)
        except XsError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        return True

    def set_perms(self, path: str, perms: Sequence[str], tx: int = 0) -> None:
        self.request(XsdType.XS_SET_PERMS, self._z(path, *perms), tx)

    def transaction(self, fn: Callable[[int], _T], retries: int = 64) -> _T:
        """Run ``fn(tx)`` in a transaction and commit it; rerun all of it on EAGAIN."""
        for _ in range(retries + 1):
            tx = int(self.request(XsdType.XS_TRANSACTION_START, b"\0").rstrip(b"\0"))
            try:
                result = fn(tx)
            except XsError as e:
                with contextlib.suppress(XsError):
                    self.request(XsdType.XS_TRANSACTION_END, b"F\0", tx)
                if e.errno == errno.EAGAIN:
                    continue
                raise
            except BaseException:
                with contextlib.suppress(XsError):
                    self.request(XsdType.XS_TRANSACTION_END, b"F\0", tx)
                raise
            try:
                self.request(XsdType.XS_TRANSACTION_END, b"T\0", tx)
            except XsError as e:
                if e.errno == errno.EAGAIN:
                    continue
                raise
            return result
        raise XsError(errno.EAGAIN, f"transaction still conflicting after {retries} retries")

    def read_state(self, path: str) -> XenbusState:
        """``path/state``; Unknown when missing or not a state."""
        try:
            text = self.read(f"{path}/{XENBUS_KEY_STATE}").decode("latin-1")
        except XsError:
            return XenbusState.Unknown
        if not text.isdigit() or int(text) > max(XenbusState):
            return XenbusState.Unknown
        return XenbusState(int(text))

    def wait_state(self, path: str, states: Iterable[XenbusState],
                   timeout: float) -> XenbusState | None:
        """Sleep until ``path/state`` is one of ``states``; None after ``timeout`` seconds.

        Sleeps on the scheduler: from thread0 this runs the other threads.
        """
        want = frozenset(states)
        token = f"toolstack:{next(self._tokens)}"
        wpath = f"{path}/{XENBUS_KEY_STATE}"
        self.request(XsdType.XS_WATCH, self._z(wpath, token))
        deadline = self._sched.now() + timeout
        try:
            while True:
                state = self.read_state(path)
                if state in want:
                    return state
                left = deadline - self._sched.now()
                if left <= 0:
                    return None
                self._waiting = True
                try:
                    if not self.conn.has_output:  # nothing arrived since the read
                        tsleep(self._chan, "xswait", left)
                finally:
                    self._waiting = False
                self._pump()
        finally:
            with contextlib.suppress(XsError):
                self.request(XsdType.XS_UNWATCH, self._z(wpath, token))


# -- devices --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceDirs:
    """A split device as the toolstack created it."""

    devtype: str
    devid: int
    frontend_id: int
    backend_id: int

    @property
    def frontend_path(self) -> str:
        return xenbus_frontend_path(self.frontend_id, self.devtype, self.devid)

    @property
    def backend_path(self) -> str:
        return xenbus_backend_path(self.backend_id, self.devtype, self.frontend_id, self.devid)


@dataclass(frozen=True, slots=True)
class HeldByXenstore:
    """Hypervisor resources the xenstore rings hold in one domain (not leaks)."""

    ports: int = 0
    mappings: int = 0
    grants_pinned: int = 0


# -- the host's xenstore -----------------------------------------------------------------


@final
class HostXenstore:
    """The xenstored of a host and everything the toolstack does with it."""

    def __init__(self, hv: Hypervisor, sched: Scheduler) -> None:
        self._hv = hv
        self._sched = sched
        # A domain exists for xenstored from its creation by the host (XSA-322).
        self.xenstored = Xenstored(domain_exists=lambda domid: domid in hv.domains)
        self.toolstack = ToolstackXs(self.xenstored, sched)
        #: The daemon's own tree at start and /local/domain: with the live domains' homes,
        #: all a clean teardown may leave (leaks).
        self._base_nodes = frozenset({*self.xenstored.store.nodes, "/local", "/local/domain"})
        self.rings: dict[int, DomainRing] = {}
        self.clients: dict[int, XenStore] = {}
        self.store_ports: dict[int, int] = {}
        self._devices: dict[str, DeviceDirs] = {}  #: by frontend path, in order added
        self.closed = False

    @property
    def devices(self) -> list[DeviceDirs]:
        """The devices added and not yet removed, in the order they were added."""
        return list(self._devices.values())

    # Domains.

    def domain_created(self, g: Guest) -> None:
        """Set up the xenstore of a new domain (dom0 included) and attach its client."""
        hv, domid = self._hv, g.domid
        gfn = store_pfn(g.domain.memory)
        page = g.domain.memory.page(gfn)
        page[:] = _ZERO_PAGE
        page.release()
        rc, port = hv.evtchn_alloc_unbound(0, domid, 0)
        if rc != 0:
            raise XenstoreSetupError(f"dom{domid}: no store event channel ({rc})")
        self.store_ports[domid] = port
        try:
            if domid != 0:
                # xc_dom_gnttab_seed: the toolstack fills in the reserved xenstore entry.
                rc = hv.gnttab_seed(0, domid, GNTTAB_RESERVED_XENSTORE, 0, gfn,
                                    GTF_permit_access)
                if rc != 0:
                    raise XenstoreSetupError(f"dom{domid}: grant table not seeded ({rc})")
                home = self.xenstored.introduce_domain(domid, gfn=gfn, port=port)
            else:
                home = "/local/domain/0"
                xs_mkdir(self.xenstored, home)
            perms = ["n0", f"r{domid}"]
            for key, value in (("name", g.name), ("domid", str(domid))):
                # A write then a set_perms, in one step (same nodes and events).
                write_with_perms(self.xenstored, f"{home}/{key}", value.encode(), perms)
            self.rings[domid] = DomainRing(self.xenstored, hv, self._sched, domid,
                                           gfn=gfn, port=port)
            error, client = xs_attach(g.hc, gfn, port, name=g.name, domain=g.kernel)
            if client is None:
                raise XenstoreSetupError(f"dom{domid}: xenstore attach failed ({error})")
        except BaseException:
            self.domain_destroyed(g)
            raise
        self.clients[domid] = client
        g.xenstore = client

    def client(self, domid: int) -> XenStore:
        """The xenstore client of a live domain's kernel."""
        return self.clients[domid]

    def domain_destroyed(self, g: Guest, *, crashed: bool = False) -> None:
        """Tear down a domain's xenstore: devices, client, ring, home, grant, port.

        ``crashed``: the guest's kernel is dead, its client is dropped unrun.
        """
        domid = g.domid
        for dev in [d for d in self._devices.values() if domid in (d.frontend_id, d.backend_id)]:
            self._remove_dirs(dev)
        client = self.clients.pop(domid, None)
        if client is not None and not crashed:
            client.xs_detach()
        g.xenstore = None
        ring = self.rings.pop(domid, None)
        if ring is not None:
            ring.close()
        if domid != 0 and self.xenstored.is_domain_introduced(domid):
            self.xenstored.release_domain(domid)
        d = self._hv.domains.get(domid)
        if d is not None:
            if domid != 0:
                self._hv.gnttab_seed(0, domid, GNTTAB_RESERVED_XENSTORE, 0, 0, 0)
            port = self.store_ports.pop(domid, None)
            if port is not None and port in d.ports:
                self._hv.evtchn_close(domid, port)

    def close(self, guests: Iterable[Guest], crashed: Collection[str] = ()) -> None:
        """Host teardown: every domain's xenstore, then the daemon's connections.

        ``crashed``: names of guests whose kernel is dead.
        """
        if self.closed:
            return
        self.closed = True
        for g in sorted(guests, key=lambda g: -g.domid):
            self.domain_destroyed(g, crashed=g.name in crashed)
        self.toolstack.close()
        self.xenstored.close()

    # Devices.

    def add_device(self, frontend: int, backend: int, devtype: str, devid: int, *,
                   front: Mapping[str, str] | None = None,
                   back: Mapping[str, str] | None = None) -> DeviceDirs:
        """Create both directories of a device in one transaction (libxl's sequence)."""
        for domid in (frontend, backend):
            if domid not in self.rings:
                raise XenstoreSetupError(f"dom{domid} has no xenstore")
        dev = DeviceDirs(devtype, devid, frontend, backend)
        if dev.frontend_path in self._devices:
            raise XenstoreSetupError(f"{dev.frontend_path} exists")
        fe, be = dev.frontend_path, dev.backend_path
        initialising = str(int(XenbusState.Initialising))
        fents = {XENBUS_KEY_BACKEND: be, XENBUS_KEY_BACKEND_ID: str(backend),
                 XENBUS_KEY_STATE: initialising, **(front or {})}
        bents = {XENBUS_KEY_FRONTEND: fe, XENBUS_KEY_FRONTEND_ID: str(frontend),
                 XENBUS_KEY_ONLINE: "1", XENBUS_KEY_STATE: initialising, **(back or {})}
        xs = self.toolstack

        def create(tx: int) -> None:
            for path in (fe, be):  # leftovers of an earlier device (missing: fine)
                try:
                    xs.rm(path, tx)
                except XsError as e:
                    if e.errno != errno.ENOENT:
                        raise
            xs.mkdir(fe, tx)
            xs.set_perms(fe, [f"n{frontend}", f"r{backend}"], tx)
            xs.mkdir(be, tx)
            xs.set_perms(be, [f"n{backend}", f"r{frontend}"], tx)
            for key, value in fents.items():
                xs.write(f"{fe}/{key}", value, tx)
            for key, value in bents.items():
                xs.write(f"{be}/{key}", value, tx)

        xs.transaction(create)
        self._devices[dev.frontend_path] = dev
        return dev

    def remove_device(self, dev: DeviceDirs, timeout: float = LIBXL_DESTROY_TIMEOUT, *,
                      force: bool = False) -> bool:
        """Unplug: online 0 and state Closing, wait for Closed, remove both directories.

        True if the backend reached Closed; False if it did not in ``timeout``
        seconds (the directories are removed anyway, as libxl's forced remove).
        ``force`` (the frontend's domain is dead): the frontend directory goes in
        the same transaction, so the backend sees its frontend gone
        (``libxl__initiate_device_generic_remove`` with ``LIBXL__FORCE_ON``).
        Sleeps on the scheduler.
        """
        xs = self.toolstack
        be = dev.backend_path

        def unplug(tx: int) -> bool:
            if force:
                self._path_cleanup(dev.frontend_path, tx)
            if not xs.exists(f"{be}/{XENBUS_KEY_STATE}", tx):
                return False
            xs.write(f"{be}/{XENBUS_KEY_ONLINE}", "0", tx)
            xs.write(f"{be}/{XENBUS_KEY_STATE}", str(int(XenbusState.Closing)), tx)
            return True

        clean = True
        if xs.transaction(unplug):
            clean = xs.wait_state(be, (XenbusState.Closed,), timeout) is not None
        self._remove_dirs(dev)
        return clean

    def _remove_dirs(self, dev: DeviceDirs) -> None:
        xs = self.toolstack

        def destroy(tx: int) -> None:
            for path in (dev.frontend_path, dev.backend_path):
                self._path_cleanup(path, tx)

        xs.transaction(destroy)
        if self._devices.get(dev.frontend_path) == dev:
            del self._devices[dev.frontend_path]

    def _path_cleanup(self, path: str, tx: int) -> None:
        """libxl__xs_path_cleanup: remove ``path``, then its parents that became empty."""
        xs = self.toolstack
        with contextlib.suppress(XsError):
            xs.rm(path, tx)
        parts = path.split("/")
        # Stop at /local/domain/<domid>/<device|backend>: keep the domain's own nodes.
        while len(parts) > 5:
            parts.pop()
            parent = "/".join(parts)
            try:
                if xs.directory(parent, tx):
                    return
                xs.rm(parent, tx)
            except XsError:
                return

    # Accounting.

    def held(self) -> dict[int, HeldByXenstore]:
        """Per domain: the ports, mappings and pinned grants of the live rings."""
        counts: dict[int, list[int]] = {}
        for domid, ring in self.rings.items():
            if ring.closed:
                continue
            srv = counts.setdefault(ring.server_domid, [0, 0, 0])
            gst = counts.setdefault(domid, [0, 0, 0])
            srv[0] += 1
            if domid in self.store_ports:
                gst[0] += 1
            if ring.handle is not None:
                srv[1] += 1
                gst[2] += 1
        return {d: HeldByXenstore(*c) for d, c in counts.items()}

    def discount(self, s: DomainStatistics,
                 held: Mapping[int, HeldByXenstore] | None = None) -> DomainStatistics:
        """``s`` without what the live xenstore rings hold (those are not leaks);
        ``held`` is :meth:`held` if the caller has it already."""
        h = (self.held() if held is None else held).get(s.domid)
        if h is None:
            return s
        return DomainStatistics(s.domid, s.name, s.grant_frames, s.grant_entries_in_use,
                                s.grants_pinned - h.grants_pinned, s.mappings - h.mappings,
                                s.maptrack_peak, s.ports - h.ports)  # as replace() made it

    def _ls(self, path: str) -> list[str]:
        """The daemon's DIRECTORY of ``path``; [] if it has no such node."""
        return peek_children(self.xenstored, path)

    def leaks(self, live: Iterable[int]) -> list[str]:
        """Xenstore leftovers: state of dead domains, open transactions, stale devices."""
        alive = set(live)
        out: list[str] = []
        for conn in self.xenstored.connections():
            dead = conn.domid != 0 and conn.domid not in alive
            ring = self.rings.get(conn.domid)
            ours = conn is self.toolstack.conn or (ring is not None and conn is ring.conn)
            if dead and (conn.watches or conn.transactions):
                out.append(f"xenstore: dead dom{conn.domid} still has {len(conn.watches)} "
                           f"watches and {len(conn.transactions)} transactions")
            elif ours and conn.transactions:
                out.append(f"xenstore: dom{conn.domid} left {len(conn.transactions)} "
                           "transactions open")
        introduced = self.xenstored.statistics().domains
        guests = len([d for d in alive if d != 0])
        if introduced != guests:
            out.append(f"xenstore: {introduced} domains introduced, {guests} guests alive")
        for name in self._ls("/local/domain"):
            if not name.isdigit() or int(name) not in alive:
                out.append(f"xenstore: /local/domain/{name} of a dead domain")
                continue
            for devtype in self._ls(f"/local/domain/{name}/backend"):
                for fe in self._ls(f"/local/domain/{name}/backend/{devtype}"):
                    if not fe.isdigit() or int(fe) not in alive:
                        out.append(f"xenstore: /local/domain/{name}/backend/{devtype}/{fe}"
                                   " of a dead frontend")
            for dm in self._ls(f"/local/domain/{name}/device-model"):
                if not dm.isdigit() or int(dm) not in alive:
                    out.append(f"xenstore: /local/domain/{name}/device-model/{dm} of a dead "
                               "domain")
        # Any other node (/libxl/<domid>, /vm/<uuid>, ...) is one a teardown left: the top
        # of each such subtree. Read without the daemon's lock (no scheduling point).
        top = ""
        for path in sorted(p for p in list(self.xenstored.store.nodes)
                           if p not in self._base_nodes and not p.startswith("/local/domain/")):
            if top and path.startswith(top + "/"):
                continue
            top = path
            out.append(f"xenstore: {path} left behind")
        for dev in self._devices.values():
            if dev.frontend_id not in alive or dev.backend_id not in alive:
                out.append(f"xenstore: device {dev.frontend_path} of a dead domain")
        return out


# -- the socket ---------------------------------------------------------------------------


def _runtime_dir() -> str | None:
    base = os.environ.get("XDG_RUNTIME_DIR")
    if not base:
        return None
    try:
        st = os.stat(base)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or not os.access(base, os.W_OK | os.X_OK):
        return None
    return base if len(base) < 60 else None


@final
class XenstoredSocket:
    """A host's xenstored served on a Unix socket from a background OS thread.

    With no ``path``, the socket is ``xenstored.sock`` in a new private
    directory (under ``$XDG_RUNTIME_DIR`` if usable, else the temp directory);
    :meth:`close` removes both.
    """

    def __init__(self, xenstored: Xenstored, path: str | None = None) -> None:
        # The socket server is imported here: a host without a socket does not need it.
        from gntdma.xenstored._socket import XenstoredServer

        self._tmpdir: str | None = None
        server: XenstoredServer | None = None
        try:
            if path is None:
                with signals_deferred():
                    self._tmpdir = tempfile.mkdtemp(prefix=f"gntdma-{os.getpid()}-",
                                                    dir=_runtime_dir())
                path = os.path.join(self._tmpdir, "xenstored.sock")
            self.path = path
            with signals_deferred():
                server = XenstoredServer(xenstored, path)
            server.start()
        except BaseException:
            if server is not None:
                server.close()
            self._remove_dir()
            raise
        self.server = server

    def __enter__(self) -> XenstoredSocket:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _remove_dir(self) -> None:
        if self._tmpdir is not None:
            with contextlib.suppress(OSError):
                os.rmdir(self._tmpdir)
            self._tmpdir = None

    def close(self) -> None:
        """Stop serving, remove the socket and its directory."""
        with signals_deferred():  # a signal now is raised once both are gone
            try:
                self.server.close()
            finally:
                self._remove_dir()


def hold_until_signal(log: Callable[[str], None] = print,
                      stop: threading.Event | None = None) -> int:
    """Block until SIGINT or SIGTERM (or ``stop`` is set); the signal number, or 0.

    Outside the main thread no handler can be installed: only ``stop`` ends it.
    """
    event = stop if stop is not None else threading.Event()
    got = [0]

    def handler(signum: int, frame: FrameType | None) -> None:
        got[0] = signum
        event.set()

    old: dict[int, object] = {}
    if threading.current_thread() is threading.main_thread():
        old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    log("holding: the host stays up until SIGINT or SIGTERM (Ctrl-C)")
    with contextlib.suppress(ValueError, OSError):
        sys.stdout.flush()
    try:
        while not event.wait(0.2):
            pass
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)  # type: ignore[arg-type]
    return got[0]


def serve_host_xenstored(xenstored: Xenstored, log: Callable[[str], None] = print,
                         path: str | None = None) -> XenstoredSocket:
    """Start serving ``xenstored`` on a socket and say where (for ``gntdma run``)."""
    sock = XenstoredSocket(xenstored, path)
    log(f"xenstored: {sock.path} (try: XENSTORED_PATH={sock.path} xenstore-ls)")
    with contextlib.suppress(ValueError, OSError):
        sys.stdout.flush()
    return sock
