"""Many guests in one host: creation costs the same at the first guest and the last,
and destroying them gives every kernel object back.

The small, fast version of ``benchmarks/scale.py``: costs are counted in
operations (scheduler decisions, threads visited, watches looked at), never
timed, so the test holds on a loaded machine.
"""

from __future__ import annotations

from pathlib import Path

from gntdma.sched import VirtualClock, tsleep
from gntdma.toolstack.host import Host
from gntdma.toolstack.vbd import attach_disk, detach_disk
from gntdma.toolstack.xlcfg import parse_disk_spec


def test_idle_disk_is_not_a_hung_task(tmp_path: Path) -> None:
    """blkback's workers idle for work (PIDLE): a disk nobody uses for longer than the
    hung-task threshold is not a hung task. FreeBSD's blkback (sys/dev/xen/blkback/
    blkback.c, xbb_attach) runs its I/O on a taskqueue, whose threads idle in
    taskqueue_thread_loop (sys/kern/subr_taskqueue.c); deadlkres (sys/kern/
    kern_clock.c) never reports them."""
    host = Host(clock=VirtualClock())
    try:
        g = host.create_guest("g", memory_mb=16)
        spec = parse_disk_spec("format=raw, vdev=xvda, access=rw, size=1M, target=a.img")
        vbd = attach_disk(host, g, spec, image_dir=tmp_path)
        tsleep(object(), "idle", 3 * 60.0)  # three times the hung-task threshold
        assert detach_disk(host, vbd)
        host.destroy_guest(g)
        assert host.leaks() == []
    finally:
        host.close()
