"""Kernel synchronisation primitives: mutex(9) and barriers (condvar(9) and sleep(9):
``_sleepq``).

Rules: every function here says whether it is a scheduling point. Blocking
ones always are; the others are scheduling points only under a preemptive
(exploration) strategy, so the run strategy pays nothing for them.

Timeouts (``timo``) are in seconds; 0 means wait forever, as FreeBSD's 0 ticks.

Lock classes follow FreeBSD (mutex(9), sleep(9)): an ``MTX_DEF`` mutex is not
sleepable, so sleeping with one held other than the sleep's interlock is
reported by WITNESS, while blocking on a contested one
is allowed (a turnstile wait, not a sleep). An ``MTX_SPIN`` mutex is a critical
section: no scheduling point inside, no sleep mutex taken inside (panic), and
``msleep``/``cv_wait`` refuse it as an interlock (``msleep_spin`` takes it).
"""

from __future__ import annotations

from collections import deque
from enum import IntFlag
from sys import _getframe
from types import CodeType
from typing import Final, final

from gntdma.sched import _core, _trace
from gntdma.sched._core import KThread, Scheduler, current_scheduler
from gntdma.sched._errors import KernelPanic
from gntdma.sched._kthread import _BLOCKED
from gntdma.sched._witness import (
    _IN_SCHED,
    Site,
    caller_site,
    caller_site_raw,
    site_of,
    site_str,
)

__all__ = [
    "MA_NOTOWNED",
    "MA_NOTRECURSED",
    "MA_OWNED",
    "MA_RECURSED",
    "MTX_DEF",
    "MTX_DUPOK",
    "MTX_NEW",
    "MTX_NOPROFILE",
    "MTX_NOWITNESS",
    "MTX_QUIET",
    "MTX_RECURSE",
    "MTX_SPIN",
    "PIDLE",
    "Mutex",
    "mb",
    "mtx_assert",
    "mtx_destroy",
    "mtx_init",
    "mtx_lock",
    "mtx_owned",
    "mtx_trylock",
    "mtx_unlock",
    "rmb",
    "wmb",
]


#: The trace recorder while tracing, else None (kept by ``_trace.on_switch``).
_tr: _trace.TraceRecorder | None = None


def _trace_switch(rec: _trace.TraceRecorder | None) -> None:
    global _tr
    _tr = rec


_trace.on_switch(_trace_switch)


class MtxFlags(IntFlag):
    """mtx_init(9) options, with FreeBSD's values (``sys/sys/mutex.h``; ``MTX_QUIET`` and
    ``MTX_DUPOK`` are ``sys/sys/lock.h``'s ``LOP_QUIET`` and ``LOP_DUPOK``)."""

    MTX_DEF = 0x0  #: a sleep mutex
    MTX_SPIN = 0x1  #: a spin mutex: its holder may not sleep
    MTX_QUIET = 0x2  #: no KTR logging (nothing to do here)
    MTX_RECURSE = 0x4  #: may be recursed
    MTX_NOWITNESS = 0x8  #: not checked by WITNESS
    MTX_DUPOK = 0x10  #: several locks of this class may be held
    MTX_NOPROFILE = 0x20  #: not profiled (nothing to do here)
    MTX_NEW = 0x40  #: no check for a double init (nothing to do here)


MTX_DEF: Final = MtxFlags.MTX_DEF
MTX_SPIN: Final = MtxFlags.MTX_SPIN
MTX_RECURSE: Final = MtxFlags.MTX_RECURSE
MTX_NOWITNESS: Final = MtxFlags.MTX_NOWITNESS
MTX_DUPOK: Final = MtxFlags.MTX_DUPOK
MTX_QUIET: Final = MtxFlags.MTX_QUIET
MTX_NOPROFILE: Final = MtxFlags.MTX_NOPROFILE
MTX_NEW: Final = MtxFlags.MTX_NEW

#: The options ``_mtx_init`` accepts (sys/kern/kern_mutex.c: its MPASS).
#: A plain int: ``~`` of an IntFlag keeps only the defined bits.
_MTX_OPTS: Final = int(MTX_SPIN | MTX_QUIET | MTX_RECURSE | MTX_NOWITNESS | MTX_DUPOK
                       | MTX_NOPROFILE | MTX_NEW)

#: A sleep priority flag: a service thread idling for work (a taskqueue thread
#: waiting for tasks). The hung-task watchdog does not count such a sleep, like
#: Linux's TASK_IDLE; FreeBSD's deadlkres ignores plain sleeps altogether. The
#: value is clear of FreeBSD's PRIMASK, PCATCH, PDROP and PNOLOCK bits.
PIDLE: Final = 0x1000

#: mtx_assert(9) what values.
MA_OWNED: Final = 0x01
MA_NOTOWNED: Final = 0x02
MA_RECURSED: Final = 0x04
MA_NOTRECURSED: Final = 0x08


#: flags -> (MtxFlags(flags), recurse ok, spin, dupok, witnessed), filled as met.
_FLAG_BITS: dict[int, tuple[MtxFlags, bool, bool, bool, bool]] = {}


def _flag_bits(flags: int) -> tuple[MtxFlags, bool, bool, bool, bool]:
    if flags & ~_MTX_OPTS:  # kern_mutex.c, _mtx_init: MPASS, a KASSERT
        raise KernelPanic(
            f"Assertion (opts & ~(MTX_SPIN | MTX_QUIET | MTX_RECURSE | MTX_NOWITNESS | "
            f"MTX_DUPOK | MTX_NOPROFILE | MTX_NEW)) == 0 failed at {caller_site()} "
            f"(mtx_init options {int(flags):#x})")
    f = MtxFlags(flags)
    bits = (f, bool(f & MTX_RECURSE), bool(f & MTX_SPIN), bool(f & MTX_DUPOK),
            not f & MTX_NOWITNESS)
    if len(_FLAG_BITS) < 256:
        _FLAG_BITS[int(f)] = bits
    return bits


@final
class Mutex:
    """A FreeBSD mutex. The lock class is its name (``type`` if given).

    A mutex has one owner at a time, so it is its owner's record of the hold
    (:class:`Held`: ``lock`` is itself, ``site_at`` where it was taken), as
    FreeBSD keeps the acquisition's file and line in the lock itself.
    """

    __slots__ = ("_recurse_ok", "cls", "dupok", "flags", "name", "owner", "recurse",
                 "site_code", "site_lasti", "spin", "waiters", "witness")

    #: FreeBSD's LO_SLEEPABLE: never for a mutex; a mutex is never held shared.
    sleepable: Final = False
    shared: Final = False

    def __init__(self, name: str, flags: int = MTX_DEF, type: str | None = None) -> None:
        self.name = name
        self.cls = type if type is not None else name
        # The flag bits as plain bools: testing the IntFlag on every lock builds
        # a flag object per test. Each distinct flags value is converted once.
        kind = flags.__class__
        bits = _FLAG_BITS.get(flags) if kind is int or kind is MtxFlags else None
        if bits is None:
            bits = _flag_bits(flags)
        self.flags, self._recurse_ok, self.spin, self.dupok, self.witness = bits
        self.owner: KThread | None = None
        self.recurse = 0
        #: The threads waiting for it, made at the first contention.
        self.waiters: deque[KThread] | None = None
        #: Where the owner took it: the site token (see ``caller_site_raw``) in two parts.
        self.site_code: CodeType | None = None
        self.site_lasti = 0

    @property
    def lock(self) -> Mutex:
        return self

    @property
    def _spin(self) -> bool:
        return self.spin

    @property
    def site_at(self) -> Site:
        return self.site_code, self.site_lasti

    @property
    def site(self) -> str:
        """``file:line`` where the owner took it (formatted only when asked for)."""
        return site_str((self.site_code, self.site_lasti))

    def __repr__(self) -> str:
        owner = self.owner.name if self.owner is not None else None
        return f"<Mutex {self.name} owner={owner}>"


def mtx_init(name: str, flags: int = MTX_DEF, type: str | None = None) -> Mutex:
    """Create a mutex (mtx_init(9)). Never a scheduling point."""
    return Mutex(name, flags, type)


def mtx_destroy(m: Mutex) -> None:
    """Destroy a mutex: unheld, or held once by the caller. Never a scheduling point."""
    if m.owner is not None:
        _destroy_held(m)
    m.owner = _DESTROYED


def _panic(t: KThread, msg: str) -> KernelPanic:
    if t.held:
        msg += "\n locks held by " + t.name + ":" + "".join(
            f"\n  {h.cls} @ {h.site}" for h in t.held)
    current_scheduler().witness.record_panic(t.name, msg, caller_site())
    if _tr is not None:
        _tr.instant("panic", {"message": msg}, t)
    return KernelPanic(msg)


def mtx_lock(m: Mutex) -> None:
    """Acquire ``m``, sleeping while another thread holds it. Always a scheduling point.

    Recursing on a mutex without MTX_RECURSE panics.
    """
    s = _core._current  # current_scheduler() without the call
    if s is None:
        s = current_scheduler()
    t = s.curthread
    if m.owner is t:
        if not m._recurse_ok:
            raise _panic(t, f"recursing on non-recursive mutex {m.name} @ {caller_site()}")
        m.recurse += 1
        return
    # caller_site_raw() inlined for a caller outside gntdma.sched (nearly always).
    f = _getframe(1)
    fcode = f.f_code
    code: CodeType | None
    if _IN_SCHED.get(fcode.co_filename) is False:
        code = fcode
        lasti = f.f_lasti
    elif _retaking is not None and _retaking[0] is m:  # from _retake_after_sleep
        code, lasti = _retaking[1]
    else:
        code, lasti = site_of(f)
    if not m.spin and t.critnest > 0:
        # sys/kern/subr_witness.c, witness_checkorder: sleep locks before spin locks.
        raise _panic(t, "acquiring blockable sleep lock with spinlock or critical "
                        f"section held (sleep mutex) {m.name} @ {site_str((code, lasti))}")
    if m.witness and t.held:  # holding nothing, there is no order to check
        check_order_lazy(s, t, m.cls, code, lasti, m.spin, False, m.dupok)
    if s.point_active:
        hook = s.point_hook
        if hook is None:
            if t.critnest == 0:  # Scheduler._point in place
                s.yield_("mtx_lock")
        else:
            hook("mtx_lock")
    while m.owner is not None:
        if m.owner is _DESTROYED:  # kern_mutex.c, __mtx_lock_flags: KASSERT
            raise _panic(t, f"{'mtx_lock_spin' if m.spin else 'mtx_lock'}() of destroyed "
                            f"mutex {m.name} @ {site_str((code, lasti))}")
        if m.spin:
            # A spin lock is never held across a scheduling point, so an owner here
            # is a thread that blocked with it: that panicked already.
            raise _panic(t, f"spin mutex {m.name} held by a sleeping thread")
        if _tr is not None:
            _tr.lock_wait(t, m)
        waiters = m.waiters
        if waiters is None:
            waiters = m.waiters = deque()
        waiters.append(t)
        s.wait_onlock = True
        s.wait_site = (code, lasti)  # the site block would find: this one
        s.block(m, "mtx", 0.0)
    m.owner = t
    m.site_code = code
    m.site_lasti = lasti
    t.held.append(m)
    if _tr is not None:
        _tr.lock_acquired(t, m)
    if m.spin:
        t.critnest += 1


def check_order_lazy(s: Scheduler, t: KThread, cls: str, code: CodeType | None, lasti: int,
                     spin: bool, sleepable: bool, dupok: bool = False) -> None:
    """``check_order`` of a site in two parts, with nothing built when nothing is new.

    The usual case: every held lock of the same kind is of another class, the
    order from it to ``cls`` is known, and ``cls`` is not sleepable after a
    non-sleepable lock. ``check_order`` would then record and report nothing.
    """
    w = s.witness
    if not w.enabled:
        return
    order = w.order
    for h in t.held:
        if h.spin == spin and h.witness:
            hcls = h.cls
            if (hcls == cls or (sleepable and not h.sleepable)
                    or cls not in order.get(hcls, _NO_EDGES)):
                check_order(s, t, cls, (code, lasti), spin, sleepable, dupok)
                return


#: No successors in the order graph.
_NO_EDGES: Final[dict[str, object]] = {}


def check_order(s: Scheduler, t: KThread, cls: str, site: Site, spin: bool,
                sleepable: bool, dupok: bool = False) -> None:
    """WITNESS order check of taking class ``cls``; spin and sleep locks apart.

    As FreeBSD (``witness_checkorder``), spin locks are ordered among spin
    locks and sleep locks among sleep locks (every sleep lock comes before every
    spin lock, enforced by the critical-section panic). A lock without WITNESS
    (MTX_NOWITNESS, SX_NOWITNESS) is not in the list at all: ``witness_lock``
    returns at once for a lock without a witness, so it is neither the lock taken
    last nor a source of order.
    """
    held = [(h.cls, h.site_at, h.dupok, h.sleepable) for h in t.held
            if h.spin == spin and h.witness]
    if held:
        s.witness.check_order(t.name, held, cls, site, sleepable, dupok)


def mtx_trylock(m: Mutex) -> int:
    """Acquire ``m`` if free; returns 1 on success, 0 if held. Never blocks.

    A scheduling point only under a preemptive strategy.
    """
    s = _core._current  # current_scheduler() without the call
    if s is None:
        s = current_scheduler()
    t = s.curthread
    if m.spin or m.owner is _DESTROYED:
        raise _trylock_panic(t, m)
    if s.point_active:
        s.point("mtx_trylock")
    if m.owner is t:
        if not m._recurse_ok:
            return 0  # kern_mutex.c, _mtx_trylock_flags_int: owned, not recursable
        m.recurse += 1
        return 1
    if m.owner is not None:
        return 0
    m.owner = t
    # trylock never waits, so WITNESS records no order for it (as FreeBSD).
    m.site_code, m.site_lasti = caller_site_raw()
    t.held.append(m)
    if _tr is not None:
        _tr.lock_acquired(t, m)
    return 1  # never a spin mutex (above): no critical section to enter


def mtx_unlock(m: Mutex) -> None:
    """Release ``m``; hands it to the first waiter. A scheduling point only when preemptive.

    Unlock by a thread that does not own the mutex panics.
    """
    s = _core._current  # current_scheduler() without the call
    if s is None:
        s = current_scheduler()
    # _release(s, m) in place: the same steps, without the call.
    t = s.curthread
    if m.owner is not t:
        raise _unlock_panic(t, m)
    if m.recurse > 0:
        m.recurse -= 1
    else:
        held = t.held
        if held and held[-1] is m:  # usually the last lock taken is released first
            held.pop()
        else:
            for i in range(len(held) - 2, -1, -1):
                if held[i] is m:  # a mutex is its own record
                    del held[i]
                    break
        m.owner = None
        if _tr is not None:
            _tr.lock_released(t, m)
        if m.spin:
            t.critnest -= 1
        waiters = m.waiters
        while waiters:
            w = waiters.popleft()
            if w.wchan is m and w.state is _BLOCKED:
                s.wake(w)
                break
    if s.point_active:
        hook = s.point_hook
        if hook is None:
            if t.critnest == 0:  # Scheduler._point in place
                s.yield_("mtx_unlock")
        else:
            hook("mtx_unlock")


def _release(s: Scheduler, m: Mutex) -> None:
    """mtx_unlock without the scheduling point (for sleeps: no window before blocking).

    mtx_unlock makes the same steps in place: a change here is a change there.
    """
    t = s.curthread
    if m.owner is not t:
        raise _unlock_panic(t, m)
    if m.recurse > 0:
        m.recurse -= 1
        return
    held = t.held
    if held and held[-1] is m:  # usually the last lock taken is released first
        held.pop()
    else:
        for i in range(len(held) - 2, -1, -1):
            if held[i] is m:  # a mutex is its own record
                del held[i]
                break
    m.owner = None
    if _tr is not None:
        _tr.lock_released(t, m)
    if m.spin:
        t.critnest -= 1
    waiters = m.waiters
    while waiters:
        w = waiters.popleft()
        if w.wchan is m and w.state is _BLOCKED:
            s.wake(w)
            break


def mtx_owned(m: Mutex) -> bool:
    """Whether the current thread owns ``m``. Never a scheduling point."""
    return m.owner is current_scheduler().curthread


def mtx_assert(m: Mutex, what: int) -> None:
    """KASSERT on ownership (MA_OWNED, MA_NOTOWNED, with MA_RECURSED/MA_NOTRECURSED)."""
    s = _core._current  # current_scheduler() without the call
    t = (s if s is not None else current_scheduler()).curthread
    if what & MA_OWNED:
        if m.owner is not t:
            raise _panic(t, f"mutex {m.name} not owned at {caller_site()}")
        if what & MA_RECURSED and m.recurse == 0:
            raise _panic(t, f"mutex {m.name} not recursed at {caller_site()}")
        if what & MA_NOTRECURSED and m.recurse > 0:
            raise _panic(t, f"mutex {m.name} recursed at {caller_site()}")
    elif what & MA_NOTOWNED:
        if m.owner is t:
            raise _panic(t, f"mutex {m.name} owned at {caller_site()}")
    else:
        raise KernelPanic(f"mtx_assert: bad what {what:#x}")


def _drop_for_sleep(m: Mutex, s: Scheduler | None = None) -> int:
    """Release ``m`` entirely for a sleep; returns the recursion depth to restore.

    The caller is already on the sleep queue and no scheduling point comes
    between the release and the block, so a wakeup cannot fall in between
    (FreeBSD puts the thread on the sleep queue before dropping the interlock).
    """
    depth = m.recurse
    m.recurse = 0
    _release(current_scheduler() if s is None else s, m)
    return depth


#: The mutex _retake_after_sleep takes and its site, found from the sleep's caller
#: (the frames between are all in gntdma.sched: the site mtx_lock's walk finds).
_retaking: tuple[Mutex, Site] | None = None


def _retake_after_sleep(m: Mutex, depth: int, site: Site | None = None) -> None:
    """Retake ``m`` at ``site``: the sleep's own caller, found here if not given."""
    global _retaking
    if site is None:
        site = site_of(_getframe(2))  # the caller of msleep's _sleep or cv_timedwait
    _retaking = (m, site)
    try:
        mtx_lock(m)
    finally:
        _retaking = None
    m.recurse = depth


# -- memory barriers of ring code ---------------------------------------------------


def wmb() -> None:
    """Write barrier: the other domain may run here. A point only when preemptive."""
    s = _core._current  # current_scheduler() without the call
    if s is None:
        s = current_scheduler()
    if s.point_active:
        hook = s.point_hook
        if hook is None:
            if s.curthread.critnest == 0:  # Scheduler._point in place
                s.yield_("wmb")
        else:
            hook("wmb")


def rmb() -> None:
    """Read barrier. A scheduling point only when preemptive."""
    s = _core._current  # current_scheduler() without the call
    if s is None:
        s = current_scheduler()
    if s.point_active:
        hook = s.point_hook
        if hook is None:
            if s.curthread.critnest == 0:  # Scheduler._point in place
                s.yield_("rmb")
        else:
            hook("rmb")


def mb() -> None:
    """Full barrier. A scheduling point only when preemptive."""
    s = _core._current  # current_scheduler() without the call
    if s is None:
        s = current_scheduler()
    if s.point_active:
        hook = s.point_hook
        if hook is None:
            if s.curthread.critnest == 0:  # Scheduler._point in place
                s.yield_("mb")
        else:
            hook("mb")



#: The owner of a destroyed mutex (FreeBSD's MTX_DESTROYED lock word): never a thread.
_DESTROYED: Final = KThread(-1, "(destroyed)", daemon=True, domain=None)


def _destroy_held(m: Mutex) -> None:
    """``mtx_destroy`` of a mutex with an owner.

    sys/kern/kern_mutex.c, _mtx_destroy: a mutex the caller holds once may be
    destroyed (mutex(9): "It is permissible to have a single hold count on a
    mutex when it is destroyed"): its hold goes as an unlock's would, without a
    hand-over (WITNESS_UNLOCK, spinlock_exit); held by another thread, recursed
    or contested, or destroyed already, it panics (MPASS).
    """
    s = _core._current
    if s is None:
        s = current_scheduler()
    t = s.curthread
    owner = m.owner
    assert owner is not None
    if owner is _DESTROYED:
        raise _panic(t, f"mtx_destroy of destroyed mutex {m.name} @ {caller_site()}")
    if owner is not t:
        raise _panic(t, f"mtx_destroy of mutex {m.name} held by {owner.name} @ {caller_site()}")
    if m.recurse > 0 or m.waiters:
        raise _panic(t, f"mtx_destroy of {'recursed' if m.recurse > 0 else 'contested'} "
                        f"mutex {m.name} @ {caller_site()}")
    held = t.held
    for i in range(len(held) - 1, -1, -1):
        if held[i] is m:
            del held[i]
            break
    if m.spin:
        t.critnest -= 1
    if _tr is not None:
        _tr.lock_released(t, m)


def _trylock_panic(t: KThread, m: Mutex) -> KernelPanic:
    """sys/kern/kern_mutex.c, _mtx_trylock_flags_int: KASSERTs of a spin or destroyed mutex."""
    what = "of spin mutex" if m.spin else "of destroyed mutex"
    return _panic(t, f"mtx_trylock() {what} {m.name} @ {caller_site()}")


def _unlock_panic(t: KThread, m: Mutex) -> KernelPanic:
    """mtx_unlock by a thread that does not hold ``m``: kern_mutex.c, __mtx_unlock_flags's
    KASSERT for a destroyed mutex, else the ownership assertion."""
    if m.owner is _DESTROYED:
        op = "mtx_unlock_spin" if m.spin else "mtx_unlock"
        return _panic(t, f"{op}() of destroyed mutex {m.name} @ {caller_site()}")
    owner = m.owner.name if m.owner is not None else "nobody"
    return _panic(t, f"mutex {m.name} not owned by {t.name} (owner {owner}) @ {caller_site()}")
