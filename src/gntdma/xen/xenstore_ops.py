"""FreeBSD's ``xs_*`` request functions, over any transport that can ``_talk``.

The calls of ``sys/dev/xen/xenstore/xenstore.c`` (``xs_read``, ``xs_write``,
``xs_directory``, transactions, ...) each build one request payload and decode
its reply; :class:`XsOps` holds them so that the ring client
(:class:`gntdma.xen.xenstore.XenStore`) only carries the transport. Each
returns an errno int, 0 on success, with out-values after it.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Final, final

from gntdma.abi.xs_wire import XsdType

__all__ = [
    "XST_NIL",
    "XS_TRANSACTION_RETRIES",
    "XsOps",
    "XsWatch",
    "XsWatchCallback",
    "xs_join",
]

_T = XsdType
_M32: Final = 0xFFFFFFFF

#: The null transaction (FreeBSD's ``XST_NIL``).
XST_NIL: Final = 0
#: Times :meth:`XsOps.xs_transaction_run` reruns a transaction that got EAGAIN.
XS_TRANSACTION_RETRIES: Final = 64

#: ``callback(path, token)``, run on the xenwatch thread.
XsWatchCallback = Callable[[str, str], None]


def xs_join(dir: str, node: str) -> str:
    """FreeBSD ``xs_join``: ``dir/node``, or ``dir`` when ``node`` is empty."""
    return dir if node == "" else f"{dir}/{node}"


def _split(payload: bytes) -> list[str]:
    """NUL-terminated strings of a reply (what follows the last NUL is dropped)."""
    return [p.decode("latin-1") for p in payload.split(b"\0")[:-1]]


@final
class XsWatch:
    """``struct xs_watch``: a node to watch and the callback to run on changes."""

    __slots__ = ("callback", "node", "token")

    def __init__(self, node: str, callback: XsWatchCallback) -> None:
        self.node = node
        self.callback = callback
        #: the token the watch is registered under (None: not registered)
        self.token: str | None = None

    def __repr__(self) -> str:
        return f"<XsWatch {self.node} token={self.token}>"


class XsOps:
    """The request functions; a subclass supplies :meth:`_talk`."""

    def _talk(self, type_: int, xbt: int, payload: bytes) -> tuple[int, bytes]:
        """Send one request and wait for its reply: (error, reply payload)."""
        raise NotImplementedError

    def xs_read(self, xbt: int, dir: str, node: str = "") -> tuple[int, bytes]:
        """Read ``dir/node``: (error, value)."""
        return self._talk(_T.XS_READ, xbt, xs_join(dir, node).encode() + b"\0")

    def xs_write(self, xbt: int, dir: str, node: str, value: str | bytes) -> int:
        """Write ``value`` (no trailing NUL goes on the wire) to ``dir/node``."""
        data = value.encode() if isinstance(value, str) else value
        error, _ = self._talk(_T.XS_WRITE, xbt, xs_join(dir, node).encode() + b"\0" + data)
        return error

    def xs_mkdir(self, xbt: int, dir: str, node: str = "") -> int:
        error, _ = self._talk(_T.XS_MKDIR, xbt, xs_join(dir, node).encode() + b"\0")
        return error

    def xs_rm(self, xbt: int, dir: str, node: str = "") -> int:
        """Remove ``dir/node`` and everything below it."""
        error, _ = self._talk(_T.XS_RM, xbt, xs_join(dir, node).encode() + b"\0")
        return error

    def xs_directory(self, xbt: int, dir: str, node: str = "") -> tuple[int, list[str]]:
        """The children of ``dir/node``: (error, names)."""
        error, payload = self._talk(_T.XS_DIRECTORY, xbt, xs_join(dir, node).encode() + b"\0")
        return error, _split(payload) if error == 0 else []

    def xs_exists(self, xbt: int, dir: str, node: str = "") -> int:
        """1 if ``dir/node`` exists (and may be listed), 0 if not (FreeBSD's contract)."""
        error, _ = self.xs_directory(xbt, dir, node)
        return 1 if error == 0 else 0

    def xs_get_perms(self, xbt: int, dir: str, node: str = "") -> tuple[int, list[str]]:
        error, payload = self._talk(_T.XS_GET_PERMS, xbt, xs_join(dir, node).encode() + b"\0")
        return error, _split(payload) if error == 0 else []

    def xs_set_perms(self, xbt: int, dir: str, node: str, perms: list[str]) -> int:
        """Set the permission list (``["n1", "r0"]``: owner first)."""
        payload = xs_join(dir, node).encode() + b"\0" + b"".join(
            p.encode() + b"\0" for p in perms)
        error, _ = self._talk(_T.XS_SET_PERMS, xbt, payload)
        return error

    def xs_get_domain_path(self, domid: int) -> tuple[int, str]:
        error, payload = self._talk(_T.XS_GET_DOMAIN_PATH, XST_NIL, f"{domid}\0".encode())
        return error, payload.rstrip(b"\0").decode("latin-1") if error == 0 else ""

    def xs_transaction_start(self) -> tuple[int, int]:
        """Open a transaction: (error, xbt)."""
        error, payload = self._talk(_T.XS_TRANSACTION_START, XST_NIL, b"\0")
        if error != 0:
            return error, XST_NIL
        text = payload.rstrip(b"\0")
        if not text.isdigit() or int(text) == XST_NIL or int(text) > _M32:
            return errno.EIO, XST_NIL
        return 0, int(text)

    def xs_transaction_end(self, xbt: int, abort: bool) -> int:
        """Commit (``abort`` False) or abort ``xbt``; EAGAIN: redo the transaction."""
        error, _ = self._talk(_T.XS_TRANSACTION_END, xbt, b"F\0" if abort else b"T\0")
        return error

    def xs_transaction_run(self, fn: Callable[[int], int],
                           retries: int = XS_TRANSACTION_RETRIES) -> int:
        """Run ``fn(xbt)`` in a transaction and commit; redo all of it on EAGAIN.

        ``fn`` returns 0 to commit or an errno to abort with (an EAGAIN from
        ``fn`` also reruns it). Returns the first error that is not EAGAIN, or
        EAGAIN after ``retries`` reruns.
        """
        error = errno.EAGAIN
        for _ in range(retries + 1):
            error, xbt = self.xs_transaction_start()
            if error != 0:
                return error
            error = fn(xbt)
            if error != 0:
                self.xs_transaction_end(xbt, abort=True)
            else:
                error = self.xs_transaction_end(xbt, abort=False)
            if error != errno.EAGAIN:
                return error
        return error
