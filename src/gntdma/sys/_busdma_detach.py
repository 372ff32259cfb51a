"""DMA-API debugging at a driver's detach: the maps still loaded under a tag or a kernel
(``LOADED_AT_DETACH``)."""

from __future__ import annotations

from gntdma.sys._busdma_types import BusDmaTag, MapState, kernel_state
from gntdma.sys._dmadebug import DmaDebugKind
from gntdma.sys._kernel import Kernel

__all__ = ["busdma_debug_check_detach"]


def _descends(tag: BusDmaTag, ancestor: BusDmaTag) -> bool:
    t: BusDmaTag | None = tag
    while t is not None:
        if t is ancestor:
            return True
        t = t.parent
    return False


def busdma_debug_check_detach(owner: BusDmaTag | Kernel) -> int:
    """Report every map still loaded (or with a load pending) under ``owner``.

    ``owner`` is a driver's tag (its maps and those of its child tags) or a
    whole kernel. Returns the number of maps reported.
    """
    kern = owner.kern if isinstance(owner, BusDmaTag) else owner
    st = kernel_state(kern)
    tags = list(st.tags.values())
    if st.root is not None:
        tags.append(st.root)
    n = 0
    for tag in tags:
        if isinstance(owner, BusDmaTag) and not _descends(tag, owner):
            continue
        for map in tag.maps.values():
            if map.state is not MapState.IDLE:
                kern.dma_debug.report(DmaDebugKind.LOADED_AT_DETACH,
                                      f"{map.state.value} at detach: {map.desc()}",
                                      tag=tag.desc(), map=map.desc())
                n += 1
    return n
