"""The guest kernels' debugging switches in a run: config keys, command line, report.

A config turns a guest's DMA-API debugging or junk fill off (``dma_debug = 0``,
``junk_fill = 0``; :mod:`gntdma.toolstack.xlcfg`), ``gntdma run`` and
``gntdma serve`` turn them off for every guest (``--no-dma-debug``,
``--no-junk``); everything else runs with both on. The progress output names
each guest's settings before it starts, the summary repeats them and the
JSON report has them under ``kernel_tunables``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from gntdma.toolstack.preflight import RunPlan
from gntdma.toolstack.xlcfg import debug_limited

__all__ = ["apply_debug_options", "tunables_figures"]


def apply_debug_options(plan: RunPlan, *, dma_debug: bool, junk_fill: bool,
                        log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Turn off what the command line turns off in every guest of ``plan``, say what
    each guest runs with, and return the report's ``kernel_tunables`` figures."""
    plan.guests = [replace(gp, config=debug_limited(gp.config, dma_debug=dma_debug,
                                                    junk_fill=junk_fill))
                   for gp in plan.guests]
    figures = tunables_figures(plan)
    for name, fig in figures.items():
        log(f"{name}: kernel {fig['text']}")
    return figures


def tunables_figures(plan: RunPlan) -> dict[str, dict[str, Any]]:
    """Per guest: DMA-API debugging and junk fill on or off, with the kernel's names."""
    out: dict[str, dict[str, Any]] = {}
    for gp in plan.guests:
        t = gp.config.kernel_tunables()
        out[gp.config.name] = {"dma_debug": "on" if t.dma_debug else "off",
                               "junk_fill": "on" if t.junk else "off",
                               "sysctls": t.sysctls(), "text": t.describe()}
    return out
