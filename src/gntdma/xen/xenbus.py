"""XenBus: the front/back state machine and the device directories (``io/xenbus.h``).

Rules (``io/xenbus.h``, FreeBSD ``xenbusvar.h``, Linux ``xenbus_client.c``, libxl):

- A device has two directories, laid out as libxl lays them out:
  ``/local/domain/<fe>/device/<type>/<devid>`` (the frontend's, keys
  ``backend``, ``backend-id``, ``state``) and
  ``/local/domain/<be>/backend/<type>/<fe>/<devid>`` (the backend's, keys
  ``frontend``, ``frontend-id``, ``online``, ``state``). Each end owns its own
  directory and may read the other's.
- ``state`` holds a :class:`XenbusState` as a decimal string; a missing or
  unparsable ``state`` reads as ``XenbusStateUnknown``.
- Each end moves only its own state, and only along the transitions of its
  role (:data:`FRONTEND_TRANSITIONS`, :data:`BACKEND_TRANSITIONS`); writing the
  state it is already in is a no-op. The toolstack is not a driver: on unplug it
  writes the backend's ``state`` (Closing) itself.
- A state change is a transaction that reads ``state`` first, so that a device
  whose directory the toolstack removed is never re-created by a late write
  (Linux ``__xenbus_switch_state``); EAGAIN reruns it.

Theory of operation
-------------------
The transition tables are data, keyed by (state, input) where the input is the
state an end asks to move to: :func:`xenbus_transition_legal` answers from
them and :func:`xenbus_set_state` refuses (EINVAL) what they do not list.
Waiting for the other end (:func:`xenbus_wait_state`) registers a watch on its
``state`` node, re-reads the node after every event (a watch says only that
something changed) and sleeps until a wanted state shows or the timeout
passes (ETIMEDOUT).

A device driver's xenbus side (:class:`XenbusDriver`) is one kernel thread per
device, ``<name>/xenbus``: watch callbacks and :meth:`XenbusDriver.stop` only
count events and wake it; it re-reads the nodes after every event and runs one
step of the driver's state machine on what it read, so a step that sleeps never
holds up the ``xenwatch`` thread and missed intermediate states do not matter.

The xenstore client itself (``xs_read``, ``xs_write``, transactions, watches)
is :class:`~gntdma.xen.xenstore.XenStore`; its names are re-exported here.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import TYPE_CHECKING, ClassVar, Final, TypeVar, final

from gntdma.sched import (
    PIDLE,
    KThread,
    current_scheduler,
    msleep,
    mtx_init,
    mtx_lock,
    mtx_unlock,
    wakeup,
)
from gntdma.xen.xenstore import (
    XST_NIL,
    XenStore,
    XenStoreStatistics,
    XsWatch,
    XsWatchCallback,
    xs_attach,
    xs_join,
)

if TYPE_CHECKING:
    from gntdma.sys import Kernel

__all__ = [
    "BACKEND_TRANSITIONS",
    "FRONTEND_TRANSITIONS",
    "XENBUS_KEY_BACKEND",
    "XENBUS_KEY_BACKEND_ID",
    "XENBUS_KEY_FRONTEND",
    "XENBUS_KEY_FRONTEND_ID",
    "XENBUS_KEY_ONLINE",
    "XENBUS_KEY_STATE",
    "XST_NIL",
    "XenStore",
    "XenStoreStatistics",
    "XenbusDevice",
    "XenbusDriver",
    "XenbusRole",
    "XenbusState",
    "XenbusStateClosed",
    "XenbusStateClosing",
    "XenbusStateConnected",
    "XenbusStateInitWait",
    "XenbusStateInitialised",
    "XenbusStateInitialising",
    "XenbusStateReconfigured",
    "XenbusStateReconfiguring",
    "XenbusStateUnknown",
    "XsWatch",
    "XsWatchCallback",
    "xenbus_backend_device",
    "xenbus_backend_path",
    "xenbus_frontend_device",
    "xenbus_frontend_path",
    "xenbus_get_state",
    "xenbus_read_driver_state",
    "xenbus_read_otherend_state",
    "xenbus_set_state",
    "xenbus_strstate",
    "xenbus_transition_legal",
    "xenbus_wait_otherend_state",
    "xenbus_wait_state",
    "xs_attach",
    "xs_join",
]


class XenbusState(IntEnum):
    """``enum xenbus_state`` (``io/xenbus.h``)."""

    Unknown = 0  #: no state node (or an unreadable one)
    Initialising = 1  #: the toolstack created the device; the driver starts
    InitWait = 2  #: early initialisation done, waiting for the peer or hotplug
    Initialised = 3  #: waiting for a connection from the peer
    Connected = 4  #: the device works
    Closing = 5  #: going down: error or unplug
    Closed = 6  #: down; the peer may reconnect
    Reconfiguring = 7  #: hot add or remove of functions (pciback)
    Reconfigured = 8  #: reconfiguration done


XenbusStateUnknown: Final = XenbusState.Unknown
XenbusStateInitialising: Final = XenbusState.Initialising
XenbusStateInitWait: Final = XenbusState.InitWait
XenbusStateInitialised: Final = XenbusState.Initialised
XenbusStateConnected: Final = XenbusState.Connected
XenbusStateClosing: Final = XenbusState.Closing
XenbusStateClosed: Final = XenbusState.Closed
XenbusStateReconfiguring: Final = XenbusState.Reconfiguring
XenbusStateReconfigured: Final = XenbusState.Reconfigured


class XenbusRole(Enum):
    """Which end of a split device a driver is."""

    FRONTEND = "frontend"
    BACKEND = "backend"


_S = XenbusState

#: state -> states a frontend may move to from it (Linux blkfront/netfront,
#: FreeBSD xbd/xn, pcifront for the Reconfigur* pair).
FRONTEND_TRANSITIONS: Final[Mapping[XenbusState, frozenset[XenbusState]]] = {
    _S.Unknown: frozenset({_S.Initialising}),
    _S.Initialising: frozenset({_S.Initialised, _S.Connected, _S.Closing, _S.Closed}),
    _S.InitWait: frozenset(),  # a backend state
    _S.Initialised: frozenset({_S.Connected, _S.Closing, _S.Closed}),
    _S.Connected: frozenset({_S.Closing, _S.Closed, _S.Reconfiguring}),
    _S.Closing: frozenset({_S.Closed}),
    _S.Closed: frozenset({_S.Initialising}),  # reconnect
    _S.Reconfiguring: frozenset({_S.Reconfigured, _S.Closing, _S.Closed}),
    _S.Reconfigured: frozenset({_S.Connected, _S.Closing, _S.Closed}),
}

#: state -> states a backend may move to from it (Linux netback
#: ``set_backend_state``, blkback ``frontend_changed``, pciback).
BACKEND_TRANSITIONS: Final[Mapping[XenbusState, frozenset[XenbusState]]] = {
    _S.Unknown: frozenset({_S.Initialising}),
    _S.Initialising: frozenset({_S.InitWait, _S.Closing, _S.Closed}),
    _S.InitWait: frozenset({_S.Connected, _S.Closing, _S.Closed}),
    _S.Initialised: frozenset(),  # a frontend state
    _S.Connected: frozenset({_S.Closing, _S.Closed, _S.Reconfiguring}),
    _S.Closing: frozenset({_S.Closed}),
    _S.Closed: frozenset({_S.InitWait, _S.Closing}),  # reconnect, or unplug
    _S.Reconfiguring: frozenset({_S.Reconfigured, _S.Closing, _S.Closed}),
    _S.Reconfigured: frozenset({_S.Connected, _S.Closing, _S.Closed}),
}

_TABLES: Final = {XenbusRole.FRONTEND: FRONTEND_TRANSITIONS,
                  XenbusRole.BACKEND: BACKEND_TRANSITIONS}

# Keys of the device directories (libxl ``libxl__device_generic_add``).
XENBUS_KEY_STATE: Final = "state"
XENBUS_KEY_BACKEND: Final = "backend"
XENBUS_KEY_BACKEND_ID: Final = "backend-id"
XENBUS_KEY_FRONTEND: Final = "frontend"
XENBUS_KEY_FRONTEND_ID: Final = "frontend-id"
XENBUS_KEY_ONLINE: Final = "online"


def xenbus_strstate(state: int) -> str:
    """The header name of a state (``xenbus_strstate``), "Unknown" for garbage."""
    try:
        return f"XenbusState{XenbusState(state).name}"
    except ValueError:
        return f"XenbusStateUnknown({state})"


def xenbus_transition_legal(role: XenbusRole, cur: XenbusState, new: XenbusState) -> bool:
    """Whether a ``role`` driver in state ``cur`` may move to ``new`` (same state: yes)."""
    return cur == new or new in _TABLES[role][cur]


def xenbus_frontend_path(fe_domid: int, devtype: str, devid: int) -> str:
    """``/local/domain/<fe>/device/<type>/<devid>``."""
    return f"/local/domain/{fe_domid}/device/{devtype}/{devid}"


def xenbus_backend_path(be_domid: int, devtype: str, fe_domid: int, devid: int) -> str:
    """``/local/domain/<be>/backend/<type>/<fe>/<devid>``."""
    return f"/local/domain/{be_domid}/backend/{devtype}/{fe_domid}/{devid}"


def _parse_state(raw: bytes) -> XenbusState:
    text = raw.decode("latin-1").strip()
    if not text.isdigit() or len(text) > 3:
        return XenbusStateUnknown
    try:
        return XenbusState(int(text))
    except ValueError:
        return XenbusStateUnknown


def _parse_domid(raw: bytes) -> int | None:
    text = raw.decode("latin-1")
    if not text.isdigit() or len(text) > 5:
        return None
    domid = int(text)
    return domid if domid < 0x7FF0 else None


def xenbus_read_driver_state(xs: XenStore, path: str) -> XenbusState:
    """The state in ``path/state``; Unknown if it is missing or not a state."""
    error, raw = xs.xs_read(XST_NIL, path, XENBUS_KEY_STATE)
    if error != 0:
        return XenbusStateUnknown
    return _parse_state(raw)


def xenbus_wait_state(xs: XenStore, path: str, states: Collection[XenbusState],
                      timeout: float) -> tuple[int, XenbusState]:
    """Sleep until ``path/state`` is one of ``states``: (0 or ETIMEDOUT, last state seen).

    ``timeout`` is in seconds (0: no limit). Always a scheduling point. The
    watch's count of events is kept under a mutex that is the sleep's
    interlock, so an event between the read and the sleep wakes it.
    """
    sched = current_scheduler()
    deadline = sched.now() + timeout if timeout > 0 else None
    chan = object()
    events = [0]
    lock = mtx_init("xbwait")

    def changed(_path: str, _token: str) -> None:
        mtx_lock(lock)
        events[0] += 1
        wakeup(chan)
        mtx_unlock(lock)

    watch = XsWatch(xs_join(path, XENBUS_KEY_STATE), changed)
    error = xs.xs_register_watch(watch)
    if error != 0:
        return error, xenbus_read_driver_state(xs, path)
    try:
        while True:
            seen = events[0]
            state = xenbus_read_driver_state(xs, path)
            if state in states:
                return 0, state
            if deadline is None:
                left = 0.0
            else:
                left = deadline - sched.now()
                if left <= 0:
                    return errno.ETIMEDOUT, state
            mtx_lock(lock)
            if events[0] == seen:  # nothing changed while we read
                msleep(chan, lock, "xbwait", left)
            mtx_unlock(lock)
    finally:
        xs.xs_unregister_watch(watch)


@final
@dataclass(eq=False)
class XenbusDevice:
    """One end of a split device (FreeBSD's xenbus ivars)."""

    xs: XenStore
    role: XenbusRole
    devtype: str
    devid: int
    #: our directory
    nodename: str
    #: the other end's directory, as our directory names it
    otherend: str
    otherend_id: int

    def __repr__(self) -> str:
        return f"<XenbusDevice {self.role.value} {self.nodename}>"


def _read_otherend(xs: XenStore, nodename: str, path_key: str,
                   id_key: str) -> tuple[int, str, int]:
    error, raw_path = xs.xs_read(XST_NIL, nodename, path_key)
    if error != 0:
        return error, "", 0
    error, raw_id = xs.xs_read(XST_NIL, nodename, id_key)
    if error != 0:
        return error, "", 0
    otherend = raw_path.decode("latin-1")
    otherend_id = _parse_domid(raw_id)
    if otherend_id is None or not otherend.startswith(f"/local/domain/{otherend_id}/"):
        return errno.EINVAL, "", 0
    return 0, otherend, otherend_id


def xenbus_frontend_device(xs: XenStore, devtype: str,
                           devid: int) -> tuple[int, XenbusDevice | None]:
    """The frontend of our device ``<type>/<devid>``: (error, device).

    Reads ``backend`` and ``backend-id``; EINVAL if they do not agree.
    """
    nodename = xenbus_frontend_path(xs.domid, devtype, devid)
    error, otherend, otherend_id = _read_otherend(xs, nodename, XENBUS_KEY_BACKEND,
                                                  XENBUS_KEY_BACKEND_ID)
    if error != 0:
        return error, None
    return 0, XenbusDevice(xs, XenbusRole.FRONTEND, devtype, devid, nodename, otherend,
                           otherend_id)


def xenbus_backend_device(xs: XenStore, devtype: str, fe_domid: int,
                          devid: int) -> tuple[int, XenbusDevice | None]:
    """The backend (in our domain) of ``fe_domid``'s device ``<type>/<devid>``."""
    nodename = xenbus_backend_path(xs.domid, devtype, fe_domid, devid)
    error, otherend, otherend_id = _read_otherend(xs, nodename, XENBUS_KEY_FRONTEND,
                                                  XENBUS_KEY_FRONTEND_ID)
    if error != 0:
        return error, None
    if otherend_id != fe_domid:
        return errno.EINVAL, None
    return 0, XenbusDevice(xs, XenbusRole.BACKEND, devtype, devid, nodename, otherend,
                           otherend_id)


def xenbus_get_state(dev: XenbusDevice) -> XenbusState:
    """Our own state as stored."""
    return xenbus_read_driver_state(dev.xs, dev.nodename)


def xenbus_read_otherend_state(dev: XenbusDevice) -> XenbusState:
    """The other end's state as stored."""
    return xenbus_read_driver_state(dev.xs, dev.otherend)


def xenbus_set_state(dev: XenbusDevice, state: XenbusState) -> int:
    """Move our end to ``state``: 0, EINVAL (not a legal move), ENOENT (device gone).

    In a transaction that reads the current state first, reran on EAGAIN.
    """
    xs = dev.xs

    def switch(xbt: int) -> int:
        error, raw = xs.xs_read(xbt, dev.nodename, XENBUS_KEY_STATE)
        if error != 0:
            return error
        cur = _parse_state(raw)
        if cur == state:
            return 0
        if not xenbus_transition_legal(dev.role, cur, state):
            return errno.EINVAL
        return xs.xs_write(xbt, dev.nodename, XENBUS_KEY_STATE, str(int(state)))

    return xs.xs_transaction_run(switch)


def xenbus_wait_otherend_state(dev: XenbusDevice, states: Collection[XenbusState],
                               timeout: float) -> tuple[int, XenbusState]:
    """Sleep until the other end is in one of ``states`` (ETIMEDOUT after ``timeout``)."""
    return xenbus_wait_state(dev.xs, dev.otherend, states, timeout)


_T = TypeVar("_T")


class XenbusDriver:
    """The thread and states of one device's xenbus driver; subclasses add the protocol.

    :meth:`start` spawns the thread ``<name>/xenbus``: it runs
    :meth:`_xenbus_attach` (register the watches with :meth:`_xenbus_watch`),
    then :meth:`_xenbus_step` after every event (a watch, :meth:`_kick`) until
    a step returns True, then unregisters the watches, runs
    :meth:`_xenbus_detach` and ends (:attr:`done`). :attr:`state` is our end's
    state as last read or written; :attr:`otherend_state` the other end's, as
    last read; :attr:`error` the driver's fatal error ("" if none).

    Events, :attr:`state` and :attr:`done` change under the ``xenbus_dev``
    mutex, the interlock of every sleep on them (the thread's idle ``PIDLE``
    sleep, :meth:`wait_state`, :meth:`wait_done`): no wakeup is lost.
    """

    #: Prefix of the sleep messages (``<p>xb`` thread, ``<p>wst``, ``<p>wdone``).
    _wmesg: ClassVar[str] = "xb"

    def __init__(self, kern: Kernel, dev: XenbusDevice, name: str) -> None:
        self.kern = kern
        self.dev = dev
        self.name = name
        self.state = XenbusState.Initialising
        self.otherend_state = XenbusState.Unknown
        self.error = ""
        self.thread: KThread | None = None
        #: True once the thread has exited (the device is gone for this driver)
        self.done = False
        self._events = 0
        self._stopping = False
        #: Protects _events, state and done; the interlock of the sleeps on them.
        self._lock = mtx_init("xenbus_dev")
        self._chan = object()  # the thread's sleep
        self._state_chan = object()  # waiters for a state or the end
        self._watches: list[XsWatch] = []

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.name} {self.dev.nodename} {self.state.name}"
                f"/{self.otherend_state.name}>")

    # -- control -------------------------------------------------------------------------

    def start(self) -> int:
        """Start the device's xenbus thread (once). Returns 0 or EALREADY."""
        if self.thread is not None:
            return errno.EALREADY
        self.thread = current_scheduler().spawn(self._xenbus_thread, name=f"{self.name}/xenbus",
                                                daemon=True, domain=self.kern)
        return 0

    def stop(self) -> None:
        """Ask the thread to end (the driver's step sees ``_stopping``) and exit."""
        self._stopping = True
        self._kick()

    def wait_state(self, states: Collection[XenbusState],
                   timeout: float) -> tuple[int, XenbusState]:
        """Sleep until :attr:`state` is in ``states``: (0, state), (ENXIO, state) if
        the thread ended first, (ETIMEDOUT, state) after ``timeout`` seconds."""
        sched = current_scheduler()
        deadline = sched.now() + timeout
        mtx_lock(self._lock)
        while True:
            state, left = self.state, deadline - sched.now()
            error = (0 if state in states else errno.ENXIO if self.done
                     else errno.ETIMEDOUT if left <= 0 else -1)
            if error != -1:
                break
            msleep(self._state_chan, self._lock, f"{self._wmesg}wst", left)
        mtx_unlock(self._lock)
        return error, state

    def wait_done(self, timeout: float) -> int:
        """Sleep until the thread has exited: 0, or ETIMEDOUT."""
        sched = current_scheduler()
        deadline = sched.now() + timeout
        error = 0
        mtx_lock(self._lock)
        while not self.done and self.thread is not None:
            left = deadline - sched.now()
            if left <= 0:
                error = errno.ETIMEDOUT
                break
            msleep(self._state_chan, self._lock, f"{self._wmesg}wdone", left)
        mtx_unlock(self._lock)
        return error

    # -- the thread ---------------------------------------------------------------------------

    def _kick(self) -> None:
        mtx_lock(self._lock)
        self._events += 1
        wakeup(self._chan)
        mtx_unlock(self._lock)

    def _xenbus_changed(self, _path: str, _token: str) -> None:
        """Watch callback (xenwatch thread): only note and wake."""
        self._kick()

    def _xenbus_watch(self, node: str) -> int:
        """Watch ``node`` until the thread ends (:meth:`_xenbus_changed`): 0 or errno."""
        watch = XsWatch(node, self._xenbus_changed)
        error = self.dev.xs.xs_register_watch(watch)
        if error == 0:
            self._watches.append(watch)
        return error

    def _xenbus_unwatch(self) -> None:
        for watch in self._watches:
            self.dev.xs.xs_unregister_watch(watch)
        self._watches = []

    def _xenbus_thread(self) -> None:
        self._xenbus_attach()
        try:
            while True:
                seen = self._events
                if self._xenbus_step():
                    break
                mtx_lock(self._lock)
                if self._events == seen:
                    msleep(self._chan, self._lock, f"{self._wmesg}xb", 0.0, PIDLE)
                mtx_unlock(self._lock)
        except BaseException:
            # Killed (the host shuts down) or a panic: no sleeping cleanup here.
            self.done = True
            raise
        self._xenbus_unwatch()
        self._xenbus_detach()
        mtx_lock(self._lock)
        self.done = True
        wakeup(self._state_chan)
        mtx_unlock(self._lock)

    def _xenbus_attach(self) -> None:
        """First thing the thread does: register its watches."""

    def _xenbus_step(self) -> bool:
        """Read the nodes and run one step of the state machine; True: exit."""
        raise NotImplementedError

    def _xenbus_detach(self) -> None:
        """Last thing the thread does (watches gone): free what is left."""

    def _note_state(self, state: XenbusState) -> None:
        mtx_lock(self._lock)
        self.state = state
        wakeup(self._state_chan)
        mtx_unlock(self._lock)

    # -- xenstore helpers ---------------------------------------------------------------------

    def _xenbus_read_state(self, xbt: int, path: str) -> XenbusState:
        """``path/state`` in transaction ``xbt``; Unknown if missing or not a state."""
        error, raw = self.dev.xs.xs_read(xbt, path, XENBUS_KEY_STATE)
        text = raw.decode("latin-1").strip() if error == 0 else ""
        if not text.isascii() or not text.isdigit() or len(text) > 3:
            return XenbusState.Unknown
        try:
            return XenbusState(int(text))
        except ValueError:
            return XenbusState.Unknown

    def _xenbus_snapshot(self, read: Callable[[int], _T]) -> _T:
        """``read(xbt)`` in one transaction (a consistent snapshot); without one if
        the transaction fails (the connection is going)."""
        xs = self.dev.xs
        out: list[_T] = []

        def snapshot(xbt: int) -> int:
            out.clear()
            out.append(read(xbt))
            return 0

        if xs.xs_transaction_run(snapshot) != 0 or not out:
            snapshot(XST_NIL)
        return out[0]

    def _xenbus_otherend_reader(self) -> Callable[[str], str | None]:
        """``read(key)``: the other end's ``key``, or None if it cannot be read."""
        xs, otherend = self.dev.xs, self.dev.otherend

        def read(key: str) -> str | None:
            error, raw = xs.xs_read(XST_NIL, otherend, key)
            return raw.decode("latin-1") if error == 0 else None

        return read

    def _xenbus_write_keys(self, keys: Mapping[str, str]) -> int:
        """Write ``keys`` in our directory, in one transaction (rerun on EAGAIN)."""
        xs, node = self.dev.xs, self.dev.nodename

        def publish(xbt: int) -> int:
            for key, value in keys.items():
                err = xs.xs_write(xbt, node, key, value)
                if err != 0:
                    return err
            return 0

        return xs.xs_transaction_run(publish)

    def _xenbus_set_state(self, state: XenbusState) -> int:
        """Move our end to ``state``; a failure other than ENOENT (the device is
        going) is recorded in :attr:`error` if it is still empty."""
        error = xenbus_set_state(self.dev, state)
        if error == 0:
            self._note_state(state)
        elif error != errno.ENOENT and self.error == "":  # ENOENT: the device is going
            self.error = f"{error} cannot switch to {xenbus_strstate(state)}"
        return error
