"""What makes exploration fast without changing what a schedule does."""

from __future__ import annotations

import pytest

from gntdma.sys import BytePhysMem, _vm


def test_scatter_order_is_drawn_once_per_memory_and_seed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The explorer builds the same host with the same kernel seeds for every
    # schedule: the second kernel of a layout and seed must not draw the order again.
    mem = BytePhysMem([(0, 96), (200, 40)])
    first = _vm.VmPhys(mem, 12345)
    boot = list(first._order)
    draws = []
    real = _vm.SplitMix64.next

    def counting(self: _vm.SplitMix64) -> int:
        draws.append(1)
        return real(self)

    monkeypatch.setattr(_vm.SplitMix64, "next", counting)
    second = _vm.VmPhys(mem, 12345)
    assert draws == []
    assert list(second._order) == list(first._order)
    # Allocation pops from the queue: the memo must hand each VmPhys its own copy.
    assert second.alloc() == first.alloc()
    assert list(second._order) == list(first._order)
    other = _vm.VmPhys(mem, 54321)
    assert draws != []
    assert list(other._order) != boot
    assert sorted(other._order) == sorted(boot)
