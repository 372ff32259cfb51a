"""bio(9) block I/O requests and uio(9) scatter/gather descriptions.

A :class:`bio` is either mapped (``bio_data`` is a kernel virtual address) or
unmapped (``BIO_UNMAPPED``: ``bio_ma`` is a list of pfns, the data starting
``bio_ma_offset`` bytes into the first page, over ``bio_ma_n`` pages), as
FreeBSD's unmapped I/O. ``biodone`` marks it done and calls ``bio_done`` (or
wakes ``biowait``).

``biowait`` and ``biodone`` without a ``bio_done`` keep ``BIO_DONE`` under the
bio's done lock, a mutex of a pool found from the bio's address, as FreeBSD's
``sys/kern/vfs_bio.c`` does (``mtx_pool_find(mtxpool_sleep, bp)``; ``biowait``
sleeps with ``msleep(bp, mtxp, PRIBIO, wchan, 0)``), so the wakeup of a bio
completed between the check and the sleep is never lost. The pool belongs to
the scheduler the kernel runs on.

A :class:`uio` lists :class:`iovec` buffers; only ``UIO_SYSSPACE`` (kernel
addresses) exists in this kernel. ``uiomove`` copies between a kernel buffer
and the iovecs and advances them.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from gntdma.sched import (
    MTX_DEF,
    KernelPanic,
    Mutex,
    Scheduler,
    current_scheduler,
    msleep,
    mtx_init,
    mtx_lock,
    mtx_unlock,
    trace,
    wakeup,
)

if TYPE_CHECKING:
    from gntdma.sys._kernel import Kernel

__all__ = [
    "BIO_DELETE",
    "BIO_DONE",
    "BIO_ERROR",
    "BIO_FLUSH",
    "BIO_GETATTR",
    "BIO_ORDERED",
    "BIO_READ",
    "BIO_UNMAPPED",
    "BIO_WRITE",
    "UIO_NOCOPY",
    "UIO_READ",
    "UIO_SYSSPACE",
    "UIO_USERSPACE",
    "UIO_WRITE",
    "bio",
    "biodone",
    "biofinish",
    "biowait",
    "iovec",
    "uio",
    "uiomove",
]

#: bio_cmd values (``sys/bio.h``).
BIO_READ: Final = 0x01
BIO_WRITE: Final = 0x02
BIO_DELETE: Final = 0x03
BIO_GETATTR: Final = 0x04
BIO_FLUSH: Final = 0x05
#: bio_flags.
BIO_ERROR: Final = 0x01
BIO_DONE: Final = 0x02
BIO_ORDERED: Final = 0x08
BIO_UNMAPPED: Final = 0x10

#: uio_segflg and uio_rw.
UIO_USERSPACE: Final = 0
UIO_SYSSPACE: Final = 1
UIO_NOCOPY: Final = 2
UIO_READ: Final = 0
UIO_WRITE: Final = 1


@dataclass(eq=False, slots=True)
class bio:
    """``struct bio``."""

    bio_cmd: int = BIO_READ
    bio_flags: int = 0
    bio_offset: int = 0
    bio_bcount: int = 0
    bio_data: int = 0
    bio_ma: list[int] = field(default_factory=list)
    bio_ma_offset: int = 0
    bio_ma_n: int = 0
    bio_error: int = 0
    bio_resid: int = 0
    bio_completed: int = 0
    bio_done: Callable[[bio], None] | None = None
    bio_caller1: object = None
    bio_caller2: object = None
    bio_driver1: object = None
    bio_driver2: object = None
    #: The lock bio_done_lock found (a bio is waited for and done under one scheduler).
    _done_lock: Mutex | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if trace.active is not None:
            trace.active.bio_start(self)


#: Mutexes in the pool of bio done locks (FreeBSD's MTX_POOL_SLEEP_SIZE is 1024).
_POOL_SIZE: Final = 64
_POOL_SHIFT: Final = 64 - 6
_HASH_MULTIPLIER: Final = 11400714819323198485  # 2**64 * (sqrt(5) - 1) / 2
_MASK64: Final = (1 << 64) - 1

_pools: weakref.WeakKeyDictionary[Scheduler, list[Mutex]] = weakref.WeakKeyDictionary()


def bio_done_lock(bp: bio) -> Mutex:
    """The done lock of ``bp`` (``mtx_pool_find(mtxpool_sleep, bp)``), kept on ``bp``."""
    s = current_scheduler()
    last = _last_pool  # (a weak reference to the scheduler last asked for, its pool)
    if last is None or last[0]() is not s:  # seldom (_pool_of, at the end of the module)
        last = _pool_of(s)
    # mtx_pool_find: a Fibonacci hash of the address.
    m = bp._done_lock = last[1][((id(bp) * _HASH_MULTIPLIER) & _MASK64) >> _POOL_SHIFT]
    return m


def biodone(bp: bio) -> None:
    """Mark ``bp`` done; call its ``bio_done`` or wake ``biowait`` (under its done lock)."""
    if bp.bio_flags & BIO_DONE:
        raise KernelPanic(f"biodone: bio {id(bp):#x} already done")
    if trace.active is not None:
        trace.active.bio_done(bp)
    if bp.bio_error != 0:
        bp.bio_flags |= BIO_ERROR
    if bp.bio_done is not None:
        bp.bio_flags |= BIO_DONE
        bp.bio_done(bp)
    else:
        m = bp._done_lock if bp._done_lock is not None else bio_done_lock(bp)
        mtx_lock(m)
        bp.bio_flags |= BIO_DONE
        wakeup(bp)
        mtx_unlock(m)


def biofinish(bp: bio, error: int) -> None:
    """Complete ``bp`` with ``error`` (``g_io_deliver``-style helper)."""
    if error != 0:
        bp.bio_error = error
        bp.bio_resid = bp.bio_bcount
    biodone(bp)


def biowait(bp: bio, wmesg: str = "biowait") -> int:
    """Sleep until ``bp`` is done; its error. Sleeps, with the bio's done lock as interlock."""
    m = bp._done_lock if bp._done_lock is not None else bio_done_lock(bp)
    mtx_lock(m)
    while not bp.bio_flags & BIO_DONE:
        msleep(bp, m, wmesg)
    mtx_unlock(m)
    return bp.bio_error if bp.bio_flags & BIO_ERROR else 0


@dataclass(slots=True)
class iovec:
    iov_base: int
    iov_len: int


@dataclass(slots=True)
class uio:
    """``struct uio`` (kernel-space iovecs only)."""

    uio_iov: list[iovec]
    uio_offset: int = 0
    uio_resid: int = -1
    uio_segflg: int = UIO_SYSSPACE
    uio_rw: int = UIO_READ
    uio_td: object = None

    def __post_init__(self) -> None:
        if self.uio_resid < 0:
            self.uio_resid = sum(v.iov_len for v in self.uio_iov)

    @property
    def uio_iovcnt(self) -> int:
        return len(self.uio_iov)


def uiomove(kern: Kernel, cp: int, n: int, uio_: uio) -> int:
    """Move up to ``n`` bytes between kernel buffer ``cp`` and ``uio_``; returns 0.

    ``UIO_READ`` copies from ``cp`` into the iovecs, ``UIO_WRITE`` the other way.
    """
    if uio_.uio_segflg != UIO_SYSSPACE:
        raise KernelPanic("uiomove: only UIO_SYSSPACE is supported")
    idx = 0
    while n > 0 and uio_.uio_resid > 0:
        while idx < len(uio_.uio_iov) and uio_.uio_iov[idx].iov_len == 0:
            idx += 1
        if idx >= len(uio_.uio_iov):
            break
        iov = uio_.uio_iov[idx]
        cnt = min(iov.iov_len, n)
        if uio_.uio_rw == UIO_READ:
            kern.kva_write(iov.iov_base, kern.kva_read(cp, cnt))
        else:
            kern.kva_write(cp, kern.kva_read(iov.iov_base, cnt))
        iov.iov_base += cnt
        iov.iov_len -= cnt
        uio_.uio_resid -= cnt
        uio_.uio_offset += cnt
        cp += cnt
        n -= cnt
    return 0


# At the end of the module so that the lines above, which WITNESS reports and
# saved replay files quote as sites (biodone's and biowait's), keep their numbers.
#: The scheduler :func:`bio_done_lock` last asked for (a weak reference) and its pool.
_last_pool: tuple[weakref.ref[Scheduler], list[Mutex]] | None = None


def _pool_of(s: Scheduler) -> tuple[weakref.ref[Scheduler], list[Mutex]]:
    """The pool of bio done locks of ``s``, made at its first use, kept as the last."""
    global _last_pool
    pool = _pools.get(s)
    if pool is None:
        # kern_mtxpool.c, mtx_pool_setup_dynamic: MTX_DEF mutexes named "sleep mtxpool",
        # leaf locks (nothing else is taken while one is held).
        pool = [mtx_init("sleep mtxpool", MTX_DEF) for _ in range(_POOL_SIZE)]
        _pools[s] = pool
    _last_pool = (weakref.ref(s), pool)
    return _last_pool
