"""Indirect requests: indirect_grefs must be the references of the command's indirect pages.

The 2018 log's ``&cm_indirectionrefs`` bug copied the bytes of a pointer into
``indirect_grefs``: 35% of the I/O failed and it took four days to find. The
workload here checks every byte through indirect requests, and the mutation
tests show it fails for each way of handing the backend the wrong references.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from test_blkfront_lib import PAGE, Rig, make_rig, stamp, teardown

from gntdma.abi.grant_table import GTF_permit_access, GTF_readonly
from gntdma.dev.blkfront import xbd_command
from gntdma.dev.blkfront_io import xbd_read, xbd_write
from gntdma.sys import PAGE_SHIFT
from gntdma.toolstack.host import Host
from gntdma.xen.busdma import xen_dmamap_get_grefs


def indirect_workload(rig: Rig) -> list[str]:
    """Writes and reads through indirect requests, every byte checked; the problems seen."""
    problems: list[str] = []
    sc = rig.sc
    for i, (off, ln) in enumerate([(0, 1 << 20), (3 << 20, 300 * 1024), (5 << 20, 64 * 1024),
                                   (512, 200 * 1024), (6 << 20, 1 << 20)]):
        data = stamp(off, ln, 50 + i)
        error = xbd_write(sc, off, data)
        if error != 0:
            problems.append(f"write of {ln} at {off}: error {error}")
        error, got = xbd_read(sc, off, ln)
        if error != 0:
            problems.append(f"read of {ln} at {off}: error {error}")
        elif got != data:
            problems.append(f"read of {ln} at {off}: data differs")
        if bytes(rig.be.disk[off:off + ln]) != data:
            problems.append(f"disk at {off}: data differs")
    return problems


def test_indirect_requests_carry_the_refs_of_the_indirect_pages(host: Host) -> None:
    rig = make_rig(host)
    sc, g = rig.sc, rig.g
    assert indirect_workload(rig) == []
    assert sc.statistics().indirect_requests >= 5 and rig.be.ops["indirect"] >= 5
    by_refs = {tuple(cm.cm_indirectionrefs): cm for cm in sc.xbd_shadow}
    assert len(by_refs) == len(sc.xbd_shadow)  # every command has its own pages
    for grefs in rig.be.indirect_grefs_seen:
        cm = by_refs.get(grefs)
        assert cm is not None, f"indirect_grefs {grefs} are no command's indirect pages"
        for i, ref in enumerate(grefs):
            flags, domid, frame = g.gnttab.entry(ref)
            pa = g.kernel.pmap_kextract(cm.cm_indirectionpages + i * PAGE)
            assert frame == pa >> PAGE_SHIFT and domid == 0
            assert flags & GTF_permit_access and flags & GTF_readonly  # the backend only reads
    teardown(rig)


def _pointer_bytes(rig: Rig) -> Callable[[xbd_command, int], list[int]]:
    # memcpy(ring_req->indirect_grefs, &cm->cm_indirectionrefs, ...): the pointer's bytes.
    def wrong(cm: xbd_command, n: int) -> list[int]:
        p = id(cm.cm_indirectionrefs)
        words = [p & 0xFFFFFFFF, (p >> 32) & 0xFFFFFFFF]
        return (words * n)[:n]
    return wrong


def _data_refs(rig: Rig) -> Callable[[xbd_command, int], list[int]]:
    def wrong(cm: xbd_command, n: int) -> list[int]:
        assert cm.cm_map is not None
        return xen_dmamap_get_grefs(cm.cm_map)[:n]
    return wrong


def _other_command(rig: Rig) -> Callable[[xbd_command, int], list[int]]:
    def wrong(cm: xbd_command, n: int) -> list[int]:
        shadow = rig.sc.xbd_shadow
        return shadow[(cm.cm_id + 1) % len(shadow)].cm_indirectionrefs[:n]
    return wrong


@pytest.mark.parametrize("bug", [_pointer_bytes, _data_refs, _other_command],
                         ids=["pointer_bytes", "data_refs", "other_command"])
def test_wrong_indirect_refs_are_caught(
        host: Host, bug: Callable[[Rig], Callable[[xbd_command, int], list[int]]]) -> None:
    """Mutation test: the workload above must notice each wrong-refs bug."""
    rig = make_rig(host)
    sc = rig.sc
    sc._xbd_indirect_grefs = bug(rig)  # type: ignore[method-assign]
    problems = indirect_workload(rig)
    assert problems != [], "handing the wrong indirect refs went unnoticed"
    del sc._xbd_indirect_grefs
    assert indirect_workload(rig) == []  # the right refs again: all good
    rig.be.errors.clear()
    rig.be.ro_violations = 0
    teardown(rig)
