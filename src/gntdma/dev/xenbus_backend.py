"""The backend half of a split driver's xenbus negotiation, shared by blkback and netback.

One state machine (Linux ``frontend_changed`` in ``xen-blkback/xenbus.c`` and
``xen-netback/xenbus.c``, FreeBSD ``xbb_frontend_changed``), run by the
driver's thread after every watch event on the frontend's ``state`` and on our
own ``state`` and ``online``:

- our directory gone (state Unknown, libxl's forced removal): disconnect, end;
- :meth:`~gntdma.xen.xenbus.XenbusDriver.stop`: disconnect, Closed, end;
- a broken ring while Connected: ``xenbus_dev_fatal`` (``<our dir>/error``,
  disconnect, Closing);
- our state Initialising (as the toolstack wrote it): probe (the backend's
  keys in one transaction), InitWait;
- frontend Closed or gone: disconnect, Closing then Closed, and end when
  ``online`` is 0 or the frontend's directory is gone;
- frontend Closing: disconnect, Closing;
- ``online`` 0: a connected device waits for the frontend to close, anything
  else goes Closed and ends;
- a frontend back at Initialising after we closed: InitWait again (reconnect);
- the frontend ready (:attr:`XenbusBackend._connect_on`) while we wait at
  InitWait: the driver's :meth:`XenbusBackend._connect`.

A driver gives its device's operations (:meth:`~XenbusBackend._disconnect`,
:meth:`~XenbusBackend._connected`, :meth:`~XenbusBackend._probe_keys`,
:meth:`~XenbusBackend._connect`) and its small differences as class attributes.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from typing import ClassVar, Final

from gntdma.sys import Kernel
from gntdma.xen.xenbus import (
    XENBUS_KEY_ONLINE,
    XENBUS_KEY_STATE,
    XST_NIL,
    XenbusDevice,
    XenbusDriver,
    XenbusState,
    xs_join,
)

__all__ = ["XENBUS_BACKEND_KEY_ERROR", "XenbusBackend"]

#: Where ``xenbus_dev_fatal`` writes its message, in the driver's own directory.
XENBUS_BACKEND_KEY_ERROR: Final = "error"

_S = XenbusState


class XenbusBackend(XenbusDriver):
    """A backend device's xenbus driver: the shared ``frontend_changed`` machine.

    :attr:`online` is the toolstack's ``online`` as last read; :attr:`errors`
    the fatal errors so far (garbage from the frontend, a broken ring...).
    """

    #: Our states in which a frontend's Closed only disconnects (no Closing/Closed).
    _closed_idle: ClassVar[tuple[XenbusState, ...]] = (_S.Closed, _S.Initialising)
    #: Our states from which a frontend back at Initialising gets a new InitWait.
    _reconnect_from: ClassVar[tuple[XenbusState, ...]] = (_S.Closed,)
    #: Frontend states that make us connect while we wait at InitWait.
    _connect_on: ClassVar[tuple[XenbusState, ...]] = (_S.Initialised, _S.Connected)
    #: What the fatal error says of a broken ring, and of a failed probe.
    _ring_error_what: ClassVar[str] = "the frontend broke the ring"
    _probe_error_what: ClassVar[str] = "cannot write the backend's keys"

    def __init__(self, kern: Kernel, dev: XenbusDevice, name: str) -> None:
        super().__init__(kern, dev, name)
        self.online = True
        self.errors = 0
        self._ring_error = ""

    # -- the device's operations -------------------------------------------------------------

    def _disconnect(self) -> None:
        raise NotImplementedError

    def _connected(self) -> bool:
        raise NotImplementedError

    def _probe_keys(self) -> Mapping[str, str]:
        raise NotImplementedError

    def _connect(self) -> None:
        raise NotImplementedError

    # -- the thread ---------------------------------------------------------------------------

    def _on_ring_error(self, reason: str) -> None:
        """The device's ``on_ring_error`` (its own thread): note and wake."""
        self._ring_error = reason
        self._kick()

    def _read_nodes(self) -> tuple[XenbusState, XenbusState, bool]:
        """Our state, the frontend's, ``online``: one consistent snapshot.

        Read in a transaction, so that the toolstack's unplug (``online`` and
        ``state`` written together) is seen whole or not at all.
        """
        xs, dev = self.dev.xs, self.dev

        def snapshot(xbt: int) -> tuple[XenbusState, XenbusState, bool]:
            me = self._xenbus_read_state(xbt, dev.nodename)
            fe = self._xenbus_read_state(xbt, dev.otherend)
            error, raw = xs.xs_read(xbt, dev.nodename, XENBUS_KEY_ONLINE)
            return me, fe, error == 0 and raw.strip() == b"1"

        return self._xenbus_snapshot(snapshot)

    def _xenbus_attach(self) -> None:
        dev = self.dev
        for node in (xs_join(dev.otherend, XENBUS_KEY_STATE),
                     xs_join(dev.nodename, XENBUS_KEY_STATE),
                     xs_join(dev.nodename, XENBUS_KEY_ONLINE)):
            self._xenbus_watch(node)  # a missing watch: the next event still re-reads all

    def _xenbus_step(self) -> bool:
        me, fe, self.online = self._read_nodes()
        self.otherend_state = fe
        if me != self.state:
            self._note_state(me)
        return self._frontend_changed(me, fe, self.online)

    def _xenbus_detach(self) -> None:
        self._disconnect()

    def _frontend_changed(self, me: XenbusState, fe: XenbusState, online: bool) -> bool:
        """One step of the state machine (``frontend_changed``); True: exit."""
        if me == _S.Unknown:  # our directory is gone: forced removal
            self._disconnect()
            return True
        if self._stopping:
            self._disconnect()
            self._xenbus_set_state(_S.Closed)
            return True
        if self._ring_error != "":
            reason, self._ring_error = self._ring_error, ""
            if me == _S.Connected:
                self._fatal(errno.EIO, f"{self._ring_error_what}: {reason}")
                return False
        if me == _S.Initialising:
            if self._probe() != 0:
                return False
            me = self.state
        if fe in (_S.Closed, _S.Unknown):
            self._disconnect()
            if me not in self._closed_idle:
                if me != _S.Closing:
                    self._xenbus_set_state(_S.Closing)
                self._xenbus_set_state(_S.Closed)
            # Unregister when unplugged, or when the frontend vanished.
            return not online or fe == _S.Unknown
        if fe == _S.Closing:
            self._disconnect()
            if me not in (_S.Closing, _S.Closed):
                self._xenbus_set_state(_S.Closing)
            return False
        if not online:
            # Unplug: a connected device waits for the frontend to close, so
            # that what is on the ring completes; anything else ends now.
            if self._connected():
                return False
            self._xenbus_set_state(_S.Closed)
            return True
        if fe == _S.Initialising and me in self._reconnect_from:
            self._reconnect(me)
            return False
        if me == _S.Closing:  # written by the toolstack or after an error
            return False
        if fe in self._connect_on and me == _S.InitWait:
            self._connect()
        return False

    # -- the steps ----------------------------------------------------------------------------

    def _probe(self) -> int:
        """Publish the backend's keys, InitWait."""
        error = self._xenbus_write_keys(self._probe_keys())
        if error != 0:
            self._fatal(error, self._probe_error_what)
            return error
        return self._xenbus_set_state(_S.InitWait)

    def _reconnect(self, me: XenbusState) -> None:
        """The frontend came back after a close while we stay online: InitWait again."""
        del me
        self.dev.xs.xs_rm(XST_NIL, self.dev.nodename, XENBUS_BACKEND_KEY_ERROR)
        self._probe()

    def _fatal(self, error: int, message: str) -> None:
        """``xenbus_dev_fatal``: publish the error, disconnect, Closing."""
        text = f"{error} {message} ({os.strerror(error) if error > 0 else 'failed'})"
        self.error = text
        self.errors += 1
        self.dev.xs.xs_write(XST_NIL, self.dev.nodename, XENBUS_BACKEND_KEY_ERROR, text)
        self._disconnect()
        self._xenbus_set_state(_S.Closing)
