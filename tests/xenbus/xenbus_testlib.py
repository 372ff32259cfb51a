"""Helpers for the xenbus tests: run kernel code on a guest thread, read the store raw."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TypeVar

from gntdma.sched import ThreadState
from gntdma.toolstack.host import Guest, Host
from gntdma.toolstack.xs import store_pfn
from gntdma.xen.xenstore import XenStore

T = TypeVar("T")
U32 = struct.Struct("=I")

# struct xenstore_domain_interface, spelled out again (independent of the code under test).
REQ, RSP = 0, 1024
REQ_CONS, REQ_PROD, RSP_CONS, RSP_PROD = 2048, 2052, 2056, 2060
FEATURES, CONNECTION, ERROR = 2064, 2068, 2072


def xs(g: Guest) -> XenStore:
    """The guest kernel's xenstore client."""
    assert g.xenstore is not None
    return g.xenstore


def on_guest(host: Host, g: Guest, fn: Callable[[], T], name: str = "test") -> T:
    """Run ``fn`` on a new kernel thread of ``g`` to completion; its result."""
    out: list[T] = []

    def body() -> None:
        out.append(fn())

    t = host.sched.spawn(body, name=f"{g.name}/{name}", domain=g.kernel)
    host.sched.run(until=lambda: t.state is ThreadState.DONE)
    if t.exc is not None:
        raise t.exc
    return out[0]


def store_page(g: Guest) -> memoryview:
    """The guest's store page, as the guest itself sees it (release after use)."""
    return g.hc.own_page(store_pfn(g.domain.memory))


def u32(page: memoryview, off: int) -> int:
    return int(U32.unpack_from(page, off)[0])


def put_u32(page: memoryview, off: int, value: int) -> None:
    U32.pack_into(page, off, value & 0xFFFFFFFF)
