"""The worked example of docs/busdma.md runs as written."""

from __future__ import annotations

import re
from pathlib import Path

from gntdma.sched import WITNESS, Scheduler

DOC = Path(__file__).resolve().parents[2] / "docs" / "busdma.md"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_worked_example_runs() -> None:
    blocks = _python_blocks(DOC.read_text())
    assert len(blocks) == 1
    WITNESS.reset()
    try:
        exec(compile(blocks[0], str(DOC), "exec"), {"__name__": "busdma_example"})
        assert WITNESS.reports == []
    finally:
        Scheduler.uninstall()
        WITNESS.reset()


def test_the_glossary_names_all_three_systems() -> None:
    text = DOC.read_text()
    assert "| gntdma (FreeBSD names) | OpenBSD | Linux |" in text
    for name in ("bus_dmamap_load", "xen_dmamap_get_grefs", "dma_map_sg", "BUS_DMA_XEN_RO"):
        assert name in text
