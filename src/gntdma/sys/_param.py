"""Machine parameters and the address arithmetic of ``sys/param.h`` (amd64)."""

from __future__ import annotations

from typing import Final

__all__ = [
    "KVA_BASE",
    "MAXPHYS",
    "PAGE_MASK",
    "PAGE_SHIFT",
    "PAGE_SIZE",
    "atop",
    "howmany",
    "powerof2",
    "ptoa",
    "round_page",
    "roundup2",
    "rounddown2",
    "trunc_page",
]

PAGE_SHIFT: Final = 12
PAGE_SIZE: Final = 1 << PAGE_SHIFT
PAGE_MASK: Final = PAGE_SIZE - 1
#: Largest single I/O the kernel issues (FreeBSD's default MAXPHYS, 1 MiB).
MAXPHYS: Final = 1 << 20
#: Where kernel virtual addresses handed out by :class:`Kernel` start (the amd64 DMAP base).
KVA_BASE: Final = 0xFFFF_F800_0000_0000


def trunc_page(x: int) -> int:
    return x & ~PAGE_MASK


def round_page(x: int) -> int:
    return (x + PAGE_MASK) & ~PAGE_MASK


def atop(x: int) -> int:
    return x >> PAGE_SHIFT


def ptoa(x: int) -> int:
    return x << PAGE_SHIFT


def howmany(x: int, y: int) -> int:
    return (x + y - 1) // y


def roundup2(x: int, y: int) -> int:
    """Round ``x`` up to a multiple of ``y``, a power of two."""
    return (x + (y - 1)) & ~(y - 1)


def rounddown2(x: int, y: int) -> int:
    return x & ~(y - 1)


def powerof2(x: int) -> bool:
    """True for 0 as in FreeBSD's ``powerof2()``; callers that must reject 0 check it."""
    return (x & (x - 1)) == 0
