"""Physical-to-physical copies of many pieces in one call (``Kernel.phys_copy``).

A bounce or persistent-grant copy moves each page piece of a buffer between
the buffer's page and its own: a few hundred pieces for 1 MiB. Done with
``phys_read`` and ``phys_write`` each piece costs two existence checks, a
``bytes`` copy and a join; here the pieces' pages are checked once, as a span
within one memory range, and each piece is one slice assignment between the
two pages' views. Anything else (a piece that crosses a page, a page outside
that span) is copied exactly as ``phys_write(dst, phys_read(src, n))`` does,
with the same panic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from gntdma.sys._param import PAGE_MASK, PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from gntdma.sys._kernel import Kernel

__all__ = ["phys_copy"]


def phys_copy(kern: Kernel, dst: Sequence[int], src: Sequence[int],
              lens: Sequence[int]) -> None:
    """Copy ``lens[i]`` bytes from physical address ``src[i]`` to ``dst[i]``, for each
    i in order (device side; not checked by DMA-API debugging): what
    ``kern.phys_write(dst[i], kern.phys_read(src[i], lens[i]))`` does for each, with
    the same panic on a page that does not exist, after the pieces before it were
    copied. The three sequences have the same length (else ``ValueError``)."""
    if len(dst) != len(src) or len(src) != len(lens):
        raise ValueError(f"phys_copy: {len(dst)} destinations, {len(src)} sources, "
                         f"{len(lens)} lengths")
    if not dst:
        return
    lo = min(min(dst), min(src)) >> PAGE_SHIFT
    hi = max(max(dst), max(src)) >> PAGE_SHIFT
    for first, npages in kern.vm.ranges:
        if first <= lo and hi < first + npages:
            break
    else:
        # Pages in more than one memory range, or one that may not exist: piece by
        # piece, each checked as phys_read and phys_write check it.
        for d, s, n in zip(dst, src, lens, strict=True):
            kern.phys_write(d, kern.phys_read(s, n))
        return
    page = kern.physmem.page
    for d, s, n in zip(dst, src, lens, strict=True):
        if n == PAGE_SIZE and (d | s) & PAGE_MASK == 0:  # whole pages: no slices
            page(d >> PAGE_SHIFT)[:] = page(s >> PAGE_SHIFT)
            continue
        do = d & PAGE_MASK
        so = s & PAGE_MASK
        if do + n <= PAGE_SIZE and so + n <= PAGE_SIZE and n >= 0:
            page(d >> PAGE_SHIFT)[do : do + n] = page(s >> PAGE_SHIFT)[so : so + n]
        else:
            kern.phys_write(d, kern.phys_read(s, n))
