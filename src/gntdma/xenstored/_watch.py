"""Watches: a (path, token) pair a connection registered, event matching, and the index
that finds the watches a change fires without visiting every connection."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import final

from gntdma.xenstored._tree import is_child

__all__ = ["Watch", "WatchIndex"]

#: A watch's place in the index: (connection id, registration number).
WatchKey = tuple[int, int]


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


def watch_paths(path: str) -> list[str]:
    """Every watch path a non-exact change of ``path`` fires (``is_child(path, w)``):
    "/", each prefix of ``path`` that ends before a "/", and ``path`` itself."""
    out = ["/"]
    i = path.find("/")
    while i >= 0:
        if i > 0:
            out.append(path[:i])
        i = path.find("/", i + 1)
    if path != "/":
        out.append(path)
    return out


@final
class WatchIndex:
    """Every connection's watches by path.

    A change at ``path`` can fire only watches on ``path`` or one of its
    ancestors (on ``path`` alone when exact), so firing looks at those paths
    only: its cost is the depth of the path and the watches that fire, not the
    number of connections or watches. :meth:`matching` gives them in C
    xenstored's order (``fire_watches``: connections in the order they were
    made, each connection's watches in the order they were registered).
    """

    def __init__(self) -> None:
        self._by_path: dict[str, dict[WatchKey, Watch]] = {}
        self._seq = itertools.count()
        self.size = 0

    def add(self, conn_id: int, watch: Watch) -> int:
        """Index ``watch`` of connection ``conn_id``; its registration number."""
        seq = next(self._seq)
        self._by_path.setdefault(watch.path, {})[(conn_id, seq)] = watch
        self.size += 1
        return seq

    def remove(self, conn_id: int, seq: int, watch: Watch) -> None:
        ws = self._by_path[watch.path]
        del ws[(conn_id, seq)]
        self.size -= 1
        if not ws:
            del self._by_path[watch.path]

    def matching(self, path: str, exact: bool) -> list[tuple[WatchKey, Watch]]:
        """The watches a change of ``path`` fires, in firing order."""
        if not self._by_path:  # no watch at all (a host being built or torn down)
            return []
        if exact:
            ws = self._by_path.get(path)
            return sorted(ws.items()) if ws else []
        hits: list[tuple[WatchKey, Watch]] = []
        for p in watch_paths(path):
            ws = self._by_path.get(p)
            if ws:
                hits.extend(ws.items())
        hits.sort(key=_key)
        return hits


def _key(hit: tuple[WatchKey, Watch]) -> WatchKey:
    return hit[0]
