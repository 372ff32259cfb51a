"""Nodes, paths and permissions: the vocabulary of the store.

Rules follow C xenstored 4.17 (``xenstored_core.c``, ``xs_lib.c``):

* A valid path starts with "/", has no "//", no trailing "/" (except "/"), and
  only ``[A-Za-z0-9-/_@]``. Its length is limited to ``path_max`` (default
  XENSTORE_REL_PATH_MAX, 2048) counted after a leading ``/local/domain/<domid>/``,
  or from the start for any other path.
* A permission list has at least one entry. The first names the owner and gives
  the access of every domain not listed later; the owner (and a domain whose
  target is the owner) always has read, write and owner rights; privileged
  callers (domid 0) bypass all checks.
* XSA-322 (``xenstored_domain.c``: ``domain_alloc_permrefs``,
  ``domain_adjust_node_perms``, ``chk_domain_generation``): an entry after the
  first that names a domain which does not exist, or which came into being
  after the node was last written (a new domain reusing the domid), is marked
  ignored (C's ``XS_PERM_IGNORE``) and grants nothing; the mark is kept when
  the node is written again. GET_PERMS still lists the entry.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntFlag
from typing import Final

from gntdma.xenstored._wire import XENSTORE_REL_PATH_MAX

__all__ = [
    "DOMID_FIRST_RESERVED",
    "DOMID_SELF",
    "NODE_HEADER_SIZE",
    "Caller",
    "DomainOlder",
    "Node",
    "Perm",
    "XsPerm",
    "adjust_perms",
    "basename",
    "child_path",
    "domain_path",
    "is_child",
    "is_valid_path",
    "parent_path",
    "parse_perm",
    "perm_for",
]

#: First domid that names no real domain (``xen.h``).
DOMID_FIRST_RESERVED: Final = 0x7FF0
#: ``DOMID_SELF``.
DOMID_SELF: Final = 0x7FF0

#: ``sizeof(struct xs_tdb_record_hdr)``: u64 generation + 3 x u32, padded to 8.
NODE_HEADER_SIZE: Final = 24
#: ``sizeof(struct xs_permissions)``: two unsigned ints.
PERM_SIZE: Final = 8

_VALID_CHARS = re.compile(r"[A-Za-z0-9\-/_@]*\Z")
_LOCAL_PREFIX = re.compile(r"/local/domain/(\d{1,5})/")
_STRTOL = re.compile(r"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")


class XsPerm(IntFlag):
    """``XS_PERM_*`` of ``xenstore_lib.h`` (OWNER is internal)."""

    XS_PERM_NONE = 0x00
    XS_PERM_READ = 0x01
    XS_PERM_WRITE = 0x02
    XS_PERM_OWNER = 0x08


_NONE = XsPerm.XS_PERM_NONE
_READ = XsPerm.XS_PERM_READ
_WRITE = XsPerm.XS_PERM_WRITE
_OWNER = XsPerm.XS_PERM_OWNER
_ALL = _READ | _WRITE | _OWNER
_LETTER = {_NONE: "n", _READ: "r", _WRITE: "w", _READ | _WRITE: "b"}
_ACCESS = {letter: access for access, letter in _LETTER.items()}


@dataclass(frozen=True, slots=True)
class Perm:
    """One permission entry, ``r5`` = read for domain 5."""

    domid: int  #: u32 as stored by C xenstored
    access: XsPerm  #: NONE, READ, WRITE or READ|WRITE
    #: C's ``XS_PERM_IGNORE``: the entry names a domain that is gone (or newer)
    ignore: bool = False

    def __str__(self) -> str:
        signed = self.domid - (1 << 32) if self.domid >= 1 << 31 else self.domid
        return f"{_LETTER[self.access]}{signed}"


def _strtol(text: str) -> int | None:
    """C ``strtol(text, &end, 0)`` that must consume all of a non-empty text."""
    m = _STRTOL.fullmatch(text)
    if m is None:
        return None
    digits = m.group(2)
    if digits[:2] in ("0x", "0X"):
        value = int(digits[2:], 16)
    elif digits.startswith("0"):
        value = int(digits, 8)
    else:
        value = int(digits)
    if m.group(1) == "-":
        value = -value
    return value


@functools.lru_cache(maxsize=1024)
def parse_perm(text: str) -> Perm | None:
    """Parse ``[nrwb]<domid>`` the way ``xs_strings_to_perms`` does; None if invalid.

    Memoized (a pure function; :class:`Perm` is immutable): a host sets the same
    permission strings on every domain it creates."""
    if not text or text[0] not in _ACCESS:
        return None
    value = _strtol(text[1:])
    if value is None:
        return None
    return Perm(value & 0xFFFFFFFF, _ACCESS[text[0]])


@dataclass(frozen=True, slots=True)
class Node:
    """A node as stored: value, permissions, children (in creation order), generation."""

    value: bytes
    perms: tuple[Perm, ...]
    children: tuple[str, ...]
    generation: int

    @property
    def owner(self) -> int:
        return self.perms[0].domid

    @property
    def children_bytes(self) -> bytes:
        """The children list as sent by DIRECTORY: each name followed by a NUL."""
        return b"".join(c.encode() + b"\0" for c in self.children)

    def entry_size(self) -> int:
        """Size of the C xenstored TDB record, checked against the node-size quota."""
        childlen = sum(len(c) + 1 for c in self.children)
        return NODE_HEADER_SIZE + PERM_SIZE * len(self.perms) + len(self.value) + childlen


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking: a domain, whether it is privileged, and its target domain."""

    domid: int
    target: int | None = None

    @property
    def privileged(self) -> bool:
        return self.domid == 0


#: The caller used for the daemon's own changes (toolstack API, domain release).
SYSTEM: Final = Caller(0)


def perm_for(caller: Caller, perms: tuple[Perm, ...]) -> XsPerm:
    """``perm_for_conn``: the access ``caller`` has on a node with ``perms``."""
    owner = perms[0].domid
    if (
        caller.privileged
        or owner == caller.domid
        or (caller.target is not None and owner == caller.target)
    ):
        return _ALL
    for p in perms[1:]:
        if p.ignore:
            continue
        if p.domid == caller.domid or (caller.target is not None and p.domid == caller.target):
            return p.access
    return perms[0].access


#: ``older(domid, generation)``: the domain exists and is not younger than a
#: node of that generation (``chk_domain_generation`` returning 1).
DomainOlder = Callable[[int, int], bool]


def adjust_perms(perms: tuple[Perm, ...], generation: int,
                 older: DomainOlder) -> tuple[Perm, ...]:
    """``domain_adjust_node_perms``: mark the entries after the first whose
    domain is gone or younger than the node (``generation``) as ignored."""
    out: list[Perm] | None = None
    for i in range(1, len(perms)):
        p = perms[i]
        if not p.ignore and not older(p.domid, generation):
            if out is None:
                out = list(perms)
            out[i] = Perm(p.domid, p.access, True)
    return perms if out is None else tuple(out)


def domain_path(domid: int) -> str:
    return f"/local/domain/{domid}"


@functools.lru_cache(maxsize=4096)
def is_valid_path(path: str, path_max: int = XENSTORE_REL_PATH_MAX) -> bool:
    """``is_valid_nodename`` of C xenstored (with ``quota_max_path_len`` = path_max).

    Memoized (a pure function of its arguments): the same paths are checked on
    every host a campaign builds."""
    if not path.startswith("/"):
        return False
    if path.endswith("/") and path != "/":
        return False
    if "//" in path:
        return False
    m = _LOCAL_PREFIX.match(path)
    local_off = m.end() if m is not None else 0
    if len(path) > local_off + path_max:
        return False
    return _VALID_CHARS.match(path) is not None


def parent_path(path: str) -> str:
    """``get_parent``: "/" for a top-level node. Path must not be "/"."""
    slash = path.rfind("/")
    return path[:slash] if slash > 0 else "/"


def basename(path: str) -> str:
    return path[path.rfind("/") + 1 :]


def child_path(parent: str, name: str) -> str:
    return f"/{name}" if parent == "/" else f"{parent}/{name}"


def is_child(child: str, parent: str) -> bool:
    """True if ``child`` is ``parent`` or below it (every path is below "/")."""
    if parent == "/":
        return True
    if not child.startswith(parent):
        return False
    return len(child) == len(parent) or child[len(parent)] == "/"
