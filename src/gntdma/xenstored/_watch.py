"""Watches: a (path, token) pair a connection registered, and event matching."""

from __future__ import annotations

from dataclasses import dataclass

from gntdma.xenstored._tree import is_child

__all__ = ["Watch"]


@dataclass(frozen=True, slots=True)
class Watch:
    """A watch of one connection.

    ``path`` is absolute (or a special "@..." name); ``relative`` is the prefix
    to strip from reported paths when the watch was registered with a relative
    path, so that its events are relative too.
    """

    path: str
    token: str  #: latin-1 text of the token bytes
    relative: str | None = None

    def matches(self, path: str, exact: bool) -> bool:
        """Does a change of ``path`` fire this watch? (``exact``: only this very path.)"""
        return self.path == path if exact else is_child(path, self.path)

    def event_path(self, path: str) -> str:
        """``get_watch_path``: the path reported for an event on ``path``."""
        if self.relative is None:
            return path
        rest = path[len(self.relative) :]
        return rest[1:] if rest.startswith("/") else rest

    def event_payload(self, path: str) -> bytes:
        """The WATCH_EVENT payload ``epath\\0token\\0`` for a change of ``path``."""
        epath = self.event_path(path).encode("latin-1")
        return epath + b"\0" + self.token.encode("latin-1") + b"\0"
