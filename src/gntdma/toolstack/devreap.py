"""The end of a device's xenbus drivers, as libxl's device removal waits for it.

Shared by :mod:`gntdma.toolstack.vbd` and :mod:`gntdma.toolstack.vif`: after
the directories are removed (``libxl__initiate_device_generic_remove``), each
driver's thread gets ``grace`` seconds to end; one that does not is stopped
(forced removal) and waited for again.
"""

from __future__ import annotations

from collections.abc import Sequence

from gntdma.xen.xenbus import XenbusDriver

__all__ = ["reap_driver", "reap_drivers"]


def reap_driver(drv: XenbusDriver, grace: float) -> bool:
    """Wait for ``drv``'s thread to end; stop it if it did not in ``grace`` seconds.

    True if it ended by itself in time.
    """
    if drv.wait_done(grace) == 0:
        return True
    drv.stop()
    drv.wait_done(grace)
    return False


def reap_drivers(drivers: Sequence[XenbusDriver], errors_before: Sequence[str],
                 grace: float) -> bool:
    """:func:`reap_driver` each of ``drivers`` in order (the backend first: the
    frontend frees once the backend let go); True if each ended in time with no
    error other than its ``errors_before`` entry (an error on the way down)."""
    clean = True
    for drv, before in zip(drivers, errors_before, strict=True):
        if not reap_driver(drv, grace):
            clean = False
        if drv.error != before:
            clean = False
    return clean
