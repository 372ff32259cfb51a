"""The wire-struct pattern shared by every ABI module.

Rules:

- A wire struct is a frozen, slotted dataclass deriving from :class:`WireStruct`.
- Its layout is written once, as :func:`layout` items in C declaration order:
  ``(member, format)`` or ``(member, format, attribute)``. ``format`` is one
  :mod:`struct` code with an optional count (``"H"``, ``"h"``, ``"Q"``, ``"88s"``);
  padding is ``"Nx"``. Everything is little-endian (``"<"``), with no implicit
  alignment: every pad byte of the C layout is written out.
- ``member`` is the C member designator. A padding item with a member name is a
  real C member (``pad``, ``__pad``) that Python does not expose; a padding
  item with an empty name is the compiler's implicit padding. A value item with
  an empty member name is a Python attribute over bytes that C names only
  through a union: its C members are listed in ``extra`` instead.
- From that one list come ``STRUCT`` (the :class:`struct.Struct`), ``FIELDS``
  (``(c_member, offset, size)`` for every C member, checked against the Xen
  headers by ``tests/abi/test_c_layout.py``) and the attribute names used to
  pack and unpack.
- :func:`wire` checks, at import, the size against the header's and that the
  dataclass attributes are the layout's values in order, unless the class
  converts its values itself (nested structs, arrays).

Values are plain ints: a peer writes whatever it likes, and callers validate.
Packing a value that does not fit raises :class:`ValueError` (our bug, not the
peer's); unpacking never fails on content, only on a too-short buffer.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Self, TypeVar, cast

__all__ = ["Buffer", "Field", "Layout", "WireStruct", "layout", "wire"]

#: Anything :mod:`struct` can read from.
Buffer = bytes | bytearray | memoryview

#: ``(C member designator, byte offset, byte size)``.
Field = tuple[str, int, int]


@dataclass(frozen=True, slots=True)
class Layout:
    """A C struct layout: its :class:`struct.Struct`, value names and C members."""

    struct: struct.Struct
    #: Python attribute for each value of ``struct``, in order.
    names: tuple[str, ...]
    #: The :mod:`struct` code of each value (``"H"``, ``"88s"``), in order.
    codes: tuple[str, ...]
    #: The C member of each value ("" where C has only union views of it), in order.
    members: tuple[str, ...]
    #: Every C member: ``(designator, offset, size)``.
    fields: tuple[Field, ...]


def layout(*items: tuple[str, str] | tuple[str, str, str],
           extra: tuple[Field, ...] = ()) -> Layout:
    """Build a :class:`Layout` from ``(member, format[, attribute])`` items.

    Args:
        items: the members in declaration order, padding included.
        extra: further C members (union views) not expressed by ``items``.

    Returns:
        The layout; offsets are computed from the formats.
    """
    fmt = "<"
    names: list[str] = []
    codes: list[str] = []
    members: list[str] = []
    out: list[Field] = []
    for item in items:
        member, code = item[0], item[1]
        attr = item[2] if len(item) == 3 else member
        offset = struct.calcsize(fmt)
        size = struct.calcsize("<" + code)
        fmt += code
        if member:
            out.append((member, offset, size))
        if not code.endswith("x"):
            if not attr.isidentifier():
                raise AssertionError(f"layout item {item!r} needs a Python attribute")
            names.append(attr)
            codes.append(code)
            members.append(member)
    out.extend(extra)
    return Layout(struct.Struct(fmt), tuple(names), tuple(codes), tuple(members), tuple(out))


class WireStruct:
    """Base of every wire struct: pack and unpack through ``STRUCT``."""

    __slots__ = ()

    #: The C type this struct mirrors, as the probe names it (``struct gnttab_copy``).
    CTYPE: ClassVar[str]
    LAYOUT: ClassVar[Layout]
    STRUCT: ClassVar[struct.Struct]
    FIELDS: ClassVar[tuple[Field, ...]]

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, n) for n in self.LAYOUT.names)

    @classmethod
    def _from_values(cls, values: tuple[Any, ...]) -> Self:
        return cast(Callable[..., Self], cls)(*values)

    def pack(self) -> bytes:
        """The wire bytes of this struct (``STRUCT.size`` long)."""
        try:
            return self.STRUCT.pack(*self._values())
        except struct.error as e:
            raise ValueError(f"{type(self).__name__}: {e}") from None

    def pack_into(self, buf: bytearray | memoryview, offset: int = 0) -> None:
        """Write the wire bytes into ``buf`` at ``offset``."""
        try:
            self.STRUCT.pack_into(buf, offset, *self._values())
        except struct.error as e:
            raise ValueError(f"{type(self).__name__}: {e}") from None

    @classmethod
    def unpack(cls, buf: Buffer) -> Self:
        """Decode exactly ``STRUCT.size`` bytes."""
        try:
            return cls._from_values(cls.STRUCT.unpack(buf))
        except struct.error as e:
            raise ValueError(f"{cls.__name__}: {e}") from None

    @classmethod
    def unpack_from(cls, buf: Buffer, offset: int = 0) -> Self:
        """Decode ``STRUCT.size`` bytes of ``buf`` starting at ``offset``."""
        try:
            return cls._from_values(cls.STRUCT.unpack_from(buf, offset))
        except struct.error as e:
            raise ValueError(f"{cls.__name__}: {e}") from None


W = TypeVar("W", bound=type[WireStruct])


def wire(size: int) -> Callable[[W], W]:
    """Class decorator: check a wire struct against its header size at import.

    Raises:
        AssertionError: the layout is not ``size`` bytes, or (for classes that use
            the default value conversion) the dataclass attributes are not the
            layout's values in order.
    """

    def check(cls: W) -> W:
        if cls.STRUCT is not cls.LAYOUT.struct or cls.FIELDS is not cls.LAYOUT.fields:
            raise AssertionError(f"{cls.__name__}: STRUCT/FIELDS must come from LAYOUT")
        if cls.STRUCT.size != size:
            raise AssertionError(f"{cls.__name__} is {cls.STRUCT.size} bytes, header says {size}")
        if "_values" not in vars(cls):
            attrs = tuple(f.name for f in fields(cls))  # type: ignore[arg-type]
            if attrs != cls.LAYOUT.names:
                raise AssertionError(f"{cls.__name__}: attributes {attrs} != {cls.LAYOUT.names}")
        for member, offset, width in cls.FIELDS:
            if offset + width > size:
                raise AssertionError(f"{cls.__name__}.{member} overruns the struct")
        return cls

    return check
