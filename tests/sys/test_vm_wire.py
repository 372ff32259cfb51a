"""Wired pages (FreeBSD sys/vm/vm_page.c ``vm_page_wire``/``vm_page_unwire``): a page
freed while wired is not reused until its last hold is dropped (DESIGN section 4)."""

from __future__ import annotations

import pytest

from gntdma.sched import KernelPanic
from gntdma.sys import M_DEVBUF, M_NOWAIT, M_WAITOK, Kernel


def _drain(k: Kernel) -> list[int]:
    pfns = []
    while (pfn := k.vm_page_alloc(M_NOWAIT)) is not None:
        pfns.append(pfn)
    return pfns


def test_wired_page_freed_is_not_reused_until_unwired(kern: Kernel) -> None:
    pfn = kern.vm_page_alloc(M_NOWAIT)
    assert pfn is not None
    kern.vm_page_wire(pfn)
    kern.vm_page_wire(pfn)
    kern.vm_page_free(pfn)
    assert not kern.vm.is_free(pfn)
    rest = _drain(kern)
    assert pfn not in rest
    kern.vm_page_unwire(pfn)
    assert not kern.vm.is_free(pfn)  # one hold left
    kern.vm_page_unwire(pfn)
    assert kern.vm_page_alloc(M_NOWAIT) == pfn  # free again, reused first
    for p in (*rest, pfn):
        kern.vm_page_free(p)
    assert kern.statistics().pages_in_use == 0


def test_wiring_a_free_page_takes_it_out_of_circulation(kern: Kernel) -> None:
    pfn = kern.vm_page_alloc(M_NOWAIT)
    assert pfn is not None
    kern.vm_page_free(pfn)
    kern.vm_page_wire(pfn)
    rest = _drain(kern)
    assert pfn not in rest
    kern.vm_page_unwire(pfn)
    assert kern.vm.is_free(pfn)
    for p in rest:
        kern.vm_page_free(p)
    assert kern.statistics().pages_in_use == 0


def test_double_free_of_a_wired_page_and_unwire_of_an_unwired_page_panic(
        kern: Kernel) -> None:
    pfn = kern.vm_page_alloc(M_NOWAIT)
    assert pfn is not None
    kern.vm_page_wire(pfn)
    kern.vm_page_free(pfn)
    with pytest.raises(KernelPanic, match="already free"):
        kern.vm_page_free(pfn)
    kern.vm_page_unwire(pfn)
    with pytest.raises(KernelPanic, match="not wired"):
        kern.vm_page_unwire(pfn)


def test_malloc_whole_pages_freed_while_wired_stay_held(kern: Kernel) -> None:
    va = kern.malloc(2 * 4096, M_DEVBUF, M_WAITOK)
    pfn = kern.pmap_kextract(va) >> 12
    kern.vm_page_wire(pfn)
    kern.free(va, M_DEVBUF)
    assert kern.statistics().pages_in_use == 1
    kern.vm_page_unwire(pfn)
    assert kern.statistics().pages_in_use == 0
