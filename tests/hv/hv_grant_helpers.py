"""Grant-op helpers for the hypervisor tests: table setup, entries, map, unmap, copy.

A mapper passes a host address of its own; :func:`map_` takes the next free one
from a range with no RAM behind it (as a dom0 kernel's ``xenmem_alloc``) unless
the test names one, and :func:`unmap` names the address the map was given.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator

from gntdma.abi.grant_table import (
    GNTMAP_host_map,
    GnttabCopy,
    GnttabCopyPtr,
    GnttabMapGrantRef,
    GNTTABOP_copy,
    GNTTABOP_map_grant_ref,
    GNTTABOP_setup_table,
    GNTTABOP_unmap_grant_ref,
    GnttabSetupTable,
    GnttabUnmapGrantRef,
)
from gntdma.abi.xen import DOMID_SELF
from gntdma.hv import Domain, Hypervisor

#: Host addresses for maps: gfns from 64 GiB up, never RAM of a test domain.
FOREIGN_BASE = 0x1000000 << 12
_addrs: Iterator[int] = itertools.count(FOREIGN_BASE, 4096)


def next_addr() -> int:
    """A fresh page-aligned host address no mapping uses."""
    return next(_addrs)


def setup(hv: Hypervisor, d: Domain, frames: int = 1) -> int:
    op = GnttabSetupTable(dom=DOMID_SELF, nr_frames=frames, status=0, frame_list=0)
    rc, (res,) = hv.grant_table_op(d.domid, GNTTABOP_setup_table, [op])
    assert rc == 0
    assert isinstance(res, GnttabSetupTable)
    return res.status


def grant(hv: Hypervisor, d: Domain, ref: int, domid: int, frame: int, flags: int) -> None:
    frames = hv.grant_frames(d.domid)
    f, i = divmod(ref, 512)
    struct.pack_into("<HHI", frames[f], i * 8, flags, domid, frame)


def entry_flags(hv: Hypervisor, d: Domain, ref: int) -> int:
    f, i = divmod(ref, 512)
    return int(struct.unpack_from("<H", hv.grant_frames(d.domid)[f], i * 8)[0])


def map_(hv: Hypervisor, caller: Domain, dom: int, ref: int,
         flags: int = GNTMAP_host_map, host_addr: int | None = None) -> GnttabMapGrantRef:
    addr = next_addr() if host_addr is None else host_addr
    op = GnttabMapGrantRef(host_addr=addr, flags=flags, ref=ref, dom=dom, status=0, handle=0,
                           dev_bus_addr=0)
    rc, (res,) = hv.grant_table_op(caller.domid, GNTTABOP_map_grant_ref, [op])
    assert rc == 0 and isinstance(res, GnttabMapGrantRef)
    return res


def unmap(hv: Hypervisor, caller: Domain, mapped: GnttabMapGrantRef,
          host_addr: int | None = None, dev_bus_addr: int = 0) -> int:
    """Unmap what ``mapped`` (a map result) mapped, at its host address by default."""
    addr = mapped.host_addr if host_addr is None else host_addr
    op = GnttabUnmapGrantRef(host_addr=addr, dev_bus_addr=dev_bus_addr, handle=mapped.handle,
                             status=0)
    rc, (res,) = hv.grant_table_op(caller.domid, GNTTABOP_unmap_grant_ref, [op])
    assert rc == 0 and isinstance(res, GnttabUnmapGrantRef)
    return res.status


def copy(hv: Hypervisor, caller: Domain, src: tuple[int, int, int], dst: tuple[int, int, int],
         length: int, flags: int) -> int:
    op = GnttabCopy(source=GnttabCopyPtr(u=src[0], domid=src[1], offset=src[2]),
                    dest=GnttabCopyPtr(u=dst[0], domid=dst[1], offset=dst[2]),
                    len=length, flags=flags, status=0)
    rc, (res,) = hv.grant_table_op(caller.domid, GNTTABOP_copy, [op])
    assert rc == 0 and isinstance(res, GnttabCopy)
    return res.status


