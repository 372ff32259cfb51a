"""Lock sites: a cheap token at lock time, the same ``file:line`` text when reported.

FreeBSD records a lock's file and line at every acquisition (``__FILE__`` and
``__LINE__`` passed to ``_mtx_lock_flags``, kept in the lock's ``lo_file``/
``lo_line`` by ``witness_lock``, sys/kern/subr_witness.c) and formats them only
when WITNESS prints. Here a lock keeps the caller's code object and
instruction offset, and the text is made when a report asks for it: exactly
the ``file:line`` that reading ``f_lineno`` at the lock would have given.
"""

from __future__ import annotations

import sys
from types import CodeType

from gntdma.sched import (
    Condvar,
    Mutex,
    Scheduler,
    Sx,
    cv_signal,
    cv_wait,
    mtx_lock,
    mtx_unlock,
    sx_xlock,
    sx_xunlock,
)
from gntdma.sched._witness import caller_site_raw, site_str


def test_lock_site_is_a_code_token_formatted_only_when_reported(sched: Scheduler) -> None:
    m = Mutex("token_site")
    seen: list[object] = []

    def body() -> None:
        mtx_lock(m)  # LOCK-SITE
        seen.append(sched.curthread.held[-1].site_at)
        seen.append(sched.curthread.held[-1].site)
        mtx_unlock(m)

    sched.call(body)
    token, text = seen
    assert isinstance(token, tuple) and isinstance(token[0], CodeType)
    assert token[0] is body.__code__
    assert text == f"{__file__}:{_line('# LOCK-SITE')}"


def _probe() -> tuple[object, str]:
    """The token the lock code would record here, and ``f_lineno`` read directly."""
    token = caller_site_raw()
    f = sys._getframe(1)
    return token, f"{f.f_code.co_filename}:{f.f_lineno}"


def test_site_text_is_the_line_f_lineno_gives_everywhere() -> None:
    pairs = [_probe()]
    pairs.append(
        _probe()
    )
    x = [_probe() for _ in range(2)]
    pairs += x
    pairs.append(max(_probe(),
                     _probe()))
    for i in range(3):
        if i % 2 == 0:
            pairs.append(_probe())
    try:
        raise ValueError
    except ValueError:
        pairs.append(_probe())
    assert len(pairs) == 8
    for token, expected in pairs:
        assert isinstance(token, tuple)
        assert site_str(token) == expected


def test_sites_through_sleeps_and_sx_stay_exact(sched: Scheduler) -> None:
    """A mutex retaken after cv_wait is recorded at the cv_wait call (the walk leaves
    gntdma.sched through several frames), an sx at its own call."""
    m, sx, cv = Mutex("site_m"), Sx("site_sx"), Condvar("site_cv")
    sites: dict[str, str] = {}
    ready: list[bool] = []

    def waiter() -> None:
        mtx_lock(m)
        while not ready:
            cv_wait(cv, m)  # CV-SITE
        sites["cv"] = sched.curthread.held[-1].site
        mtx_unlock(m)
        sx_xlock(sx)  # SX-SITE
        sites["sx"] = sched.curthread.held[-1].site
        sx_xunlock(sx)

    def signaller() -> None:
        mtx_lock(m)
        ready.append(True)
        cv_signal(cv)
        mtx_unlock(m)

    sched.spawn(waiter)
    sched.spawn(signaller)
    sched.run()
    assert sites == {"cv": f"{__file__}:{_line('# CV-SITE')}",
                     "sx": f"{__file__}:{_line('# SX-SITE')}"}


def _line(marker: str) -> int:
    with open(__file__) as f:
        for n, line in enumerate(f, 1):
            if marker in line and "_line(" not in line:
                return n
    raise AssertionError(marker)
